//! `is_cancelled()` for the blocking closure a worker runs: which call and
//! item this thread runs, and whether the map still wants it.

use std::cell::RefCell;
use std::sync::Arc;

use crate::call::{Call, Shared};
use crate::deadline::GiveUp;

/// What [`is_cancelled`] reads on a worker thread.
struct OnThread {
    shared: Arc<Shared>,
    progress: Option<Arc<dyn GiveUp>>,
    index: usize,
}

#[cfg(not(par_imap_loom))]
thread_local! {
    /// The call a blocking worker runs on this thread, and its item.
    static CURRENT: RefCell<Option<OnThread>> = const { RefCell::new(None) };
}

// Under loom the model's threads share one OS thread: each keeps its own.
#[cfg(par_imap_loom)]
loom::thread_local! {
    static CURRENT: RefCell<Option<OnThread>> = RefCell::new(None);
}

/// Marks this thread as running a blocking call until dropped, even by a
/// panic. Set once per call; the item index is updated per item.
#[derive(Debug)]
pub(crate) struct Current;

impl Current {
    pub(crate) fn enter<U: Send + 'static>(call: &Call<U>) -> Current {
        let running = OnThread {
            shared: Arc::clone(call.shared()),
            progress: call
                .progress_handle()
                .map(|progress| Arc::clone(progress) as Arc<dyn GiveUp>),
            index: call.first(),
        };
        CURRENT.with(|current| *current.borrow_mut() = Some(running));
        Current
    }

    /// The call moves on to item `index`.
    pub(crate) fn item(&self, index: usize) {
        CURRENT.with(|current| {
            if let Some(running) = current.borrow_mut().as_mut() {
                running.index = index;
            }
        });
    }
}

impl Drop for Current {
    fn drop(&mut self) {
        CURRENT.with(|current| current.borrow_mut().take());
    }
}

/// Inside a blocking mapper call, whether its result can no longer be used:
/// the map was dropped, failed at or before this item, was cancelled (true
/// as soon as the token's `cancel()` returns, polled or not), or this item
/// timed out. `false` outside a blocking mapper call.
///
/// A running blocking closure cannot be pre-empted: tokio cannot abort
/// `spawn_blocking`. A long closure that polls `is_cancelled()` now and then
/// is the one way it can stop early and free its worker.
///
/// # Examples
///
/// ```
/// use std::time::Duration;
/// use futures::StreamExt;
/// use par_imap::ParImapExt;
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// let slow = futures::stream::iter([0]).par_imap(1, |_: u32| {
///     // Works until nobody wants the result any more.
///     let mut rounds = 0_u64;
///     while !par_imap::is_cancelled() {
///         std::thread::sleep(Duration::from_millis(1));
///         rounds += 1;
///     }
///     rounds
/// });
/// let timed_out = slow.timeout(Duration::from_millis(20)).next().await.unwrap();
/// assert!(timed_out.unwrap_err().is_timeout());
/// assert!(!par_imap::is_cancelled());
/// # }
/// ```
pub fn is_cancelled() -> bool {
    CURRENT.with(|current| {
        current.borrow().as_ref().is_some_and(|running| {
            running.shared.is_cut_off(running.index)
                || running
                    .progress
                    .as_ref()
                    .is_some_and(|progress| progress.is_given_up(running.index))
        })
    })
}
