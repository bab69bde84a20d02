//! The seams between the variants: how one mapper call runs (blocking pool or
//! async task), what the mapper is (a closure, or a closure with per-worker
//! state), and what its output means (plain value or `Result`).
//!
//! Everything here is `pub` inside a private module: the public stream type
//! names these traits in its bounds, yet no user can name or implement them.
#![allow(unreachable_pub)]

use std::cell::RefCell;
use std::future::Future;
use std::panic::{self, AssertUnwindSafe};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use futures::FutureExt;
use tokio::runtime::Handle;
use tokio::sync::OwnedSemaphorePermit;
use tokio::sync::mpsc::UnboundedSender;
use tokio::time::Instant;
use tokio_util::task::AbortOnDropHandle;

use crate::Error;
use crate::kind::{Async, Blocking, Try};

/// What the engine and its running calls share.
#[derive(Debug)]
pub struct Shared {
    /// Calls with an index at or above this must not start, and their results
    /// are no longer wanted. `usize::MAX` while the map runs normally.
    cutoff: AtomicUsize,
}

impl Shared {
    pub(crate) fn new() -> Arc<Self> {
        Arc::new(Shared {
            cutoff: AtomicUsize::new(usize::MAX),
        })
    }

    /// Cancel every call from `index` on.
    pub(crate) fn cancel_from(&self, index: usize) {
        self.cutoff.fetch_min(index, Ordering::SeqCst);
    }

    fn is_cancelled(&self, index: usize) -> bool {
        index >= self.cutoff.load(Ordering::SeqCst)
    }
}

/// What a call tells the engine.
#[derive(Debug)]
pub enum Event<U> {
    /// The mapper started now (sent only when the engine asked: for timeouts).
    Started { index: usize, at: Instant },
    /// The call ended, for good or not.
    Finished {
        index: usize,
        result: Result<U, Error>,
    },
}

/// The ticket of one mapper call: it reports the call's result to the engine
/// exactly once. A call dropped before it finished (aborted, never started,
/// or torn down with its runtime) reports itself cancelled, so the engine
/// never waits for a result that cannot come. It holds the call's permit of a
/// shared semaphore, released when the call really ends.
#[derive(Debug)]
pub struct Call<U> {
    index: usize,
    shared: Arc<Shared>,
    report: Option<UnboundedSender<Event<U>>>,
    report_start: bool,
    _permit: Option<OwnedSemaphorePermit>,
}

impl<U> Call<U> {
    pub(crate) fn new(
        index: usize,
        shared: Arc<Shared>,
        report: UnboundedSender<Event<U>>,
        report_start: bool,
        permit: Option<OwnedSemaphorePermit>,
    ) -> Self {
        Call {
            index,
            shared,
            report: Some(report),
            report_start,
            _permit: permit,
        }
    }

    fn is_cancelled(&self) -> bool {
        self.shared.is_cancelled(self.index)
    }

    /// Marks the moment the mapper starts: a deadline counts from here.
    fn start(&self) {
        if let (true, Some(report)) = (self.report_start, &self.report) {
            let _ = report.send(Event::Started {
                index: self.index,
                at: Instant::now(),
            });
        }
    }

    fn finish(mut self, result: Result<U, Error>) {
        self.send(result);
    }

    fn send(&mut self, result: Result<U, Error>) {
        if let Some(report) = self.report.take() {
            // The engine is gone when this fails: the result is dropped here.
            let _ = report.send(Event::Finished {
                index: self.index,
                result,
            });
        }
    }
}

impl<U> Drop for Call<U> {
    fn drop(&mut self) {
        let index = self.index;
        self.send(Err(Error::cancelled(index)));
    }
}

thread_local! {
    /// The blocking call running on this thread, for [`is_cancelled`].
    static CURRENT: RefCell<Option<(Arc<Shared>, usize)>> = const { RefCell::new(None) };
}

/// Marks this thread as running a blocking call until dropped, even by a panic.
struct Current;

impl Current {
    fn enter<U>(call: &Call<U>) -> Current {
        CURRENT
            .with(|current| *current.borrow_mut() = Some((Arc::clone(&call.shared), call.index)));
        Current
    }
}

impl Drop for Current {
    fn drop(&mut self) {
        CURRENT.with(|current| current.borrow_mut().take());
    }
}

/// Inside a blocking mapper call, whether its result can no longer be used:
/// the map was dropped, failed at or before this item, was cancelled, or this
/// item timed out. `false` outside a blocking mapper call.
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
        current
            .borrow()
            .as_ref()
            .is_some_and(|(shared, index)| shared.is_cancelled(*index))
    })
}

/// The function a call applies to its item.
pub trait Mapper<T>: Send + Sync + 'static {
    /// What one call returns.
    type Output;

    /// Applies the mapper to one item.
    fn call(&self, item: T) -> Self::Output;
}

impl<T, F, U> Mapper<T> for F
where
    F: Fn(T) -> U + Send + Sync + 'static,
{
    type Output = U;

    fn call(&self, item: T) -> U {
        self(item)
    }
}

/// How one mapper call runs.
pub trait Spawn<T, F> {
    /// What one call of the mapper returns.
    type Output: Send + 'static;

    /// Start the call of `mapper` on `item`; the handle, if any, aborts it.
    fn spawn(
        runtime: &Handle,
        mapper: &Arc<F>,
        item: T,
        call: Call<Self::Output>,
    ) -> Option<AbortOnDropHandle<()>>;
}

impl<T, F> Spawn<T, F> for Blocking
where
    T: Send + 'static,
    F: Mapper<T>,
    F::Output: Send + 'static,
{
    type Output = F::Output;

    fn spawn(
        runtime: &Handle,
        mapper: &Arc<F>,
        item: T,
        call: Call<F::Output>,
    ) -> Option<AbortOnDropHandle<()>> {
        let mapper = Arc::clone(mapper);
        // A blocking task cannot be aborted once it runs; the cutoff keeps a
        // queued one from starting after the map stopped wanting it. The
        // join handle is dropped: the result travels through `call`.
        runtime.spawn_blocking(move || {
            if call.is_cancelled() {
                return;
            }
            call.start();
            let current = Current::enter(&call);
            let result = panic::catch_unwind(AssertUnwindSafe(|| mapper.call(item)));
            drop(current);
            // Release the closure's captures before the result is seen.
            drop(mapper);
            let index = call.index;
            call.finish(result.map_err(|payload| Error::panic(index, payload)));
        });
        None
    }
}

impl<T, F, Fut> Spawn<T, F> for Async
where
    T: Send + 'static,
    F: Fn(T) -> Fut + Send + Sync + 'static,
    Fut: Future + Send + 'static,
    Fut::Output: Send + 'static,
{
    type Output = Fut::Output;

    fn spawn(
        runtime: &Handle,
        mapper: &Arc<F>,
        item: T,
        call: Call<Fut::Output>,
    ) -> Option<AbortOnDropHandle<()>> {
        let mapper = Arc::clone(mapper);
        let task = runtime.spawn(async move {
            call.start();
            let index = call.index;
            // The mapper itself is called inside the task, so an aborted
            // task that never ran never calls it.
            let result = AssertUnwindSafe(async move { mapper(item).await })
                .catch_unwind()
                .await;
            call.finish(result.map_err(|payload| Error::panic(index, payload)));
        });
        Some(AbortOnDropHandle::new(task))
    }
}

/// What a call's output means: which outputs fail the map, and what the
/// stream yields for it.
pub trait Kind<T, F> {
    /// How calls run.
    type Spawner: Spawn<T, F>;
    /// What the stream yields.
    type Item;

    /// Whether this result fails the map (fail-fast).
    fn is_failure(result: &Result<Output<Self, T, F>, Error>) -> bool;

    /// The stream item for this result.
    fn into_item(result: Result<Output<Self, T, F>, Error>) -> Self::Item;
}

/// The output of one mapper call of kind `K`.
pub type Output<K, T, F> = <<K as Kind<T, F>>::Spawner as Spawn<T, F>>::Output;

/// Plain variants: every value is a success; only the machinery fails.
macro_rules! plain_kind {
    ($spawner:ty) => {
        impl<T, F> Kind<T, F> for $spawner
        where
            $spawner: Spawn<T, F>,
        {
            type Spawner = $spawner;
            type Item = Result<Output<Self, T, F>, Error>;

            fn is_failure(result: &Result<Output<Self, T, F>, Error>) -> bool {
                result.is_err()
            }

            fn into_item(result: Result<Output<Self, T, F>, Error>) -> Self::Item {
                result
            }
        }
    };
}

plain_kind!(Blocking);
plain_kind!(Async);

impl<T, F, S, V, E> Kind<T, F> for Try<S>
where
    S: Spawn<T, F, Output = Result<V, E>>,
    E: From<Error>,
{
    type Spawner = S;
    type Item = Result<V, E>;

    fn is_failure(result: &Result<Result<V, E>, Error>) -> bool {
        !matches!(result, Ok(Ok(_)))
    }

    fn into_item(result: Result<Result<V, E>, Error>) -> Self::Item {
        result.unwrap_or_else(|error| Err(E::from(error)))
    }
}
