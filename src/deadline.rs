//! Per-item deadlines: what a blocking call running items with deadlines
//! shares with the engine ([`Progress`]), and the engine's deadlines of its
//! running calls (the earliest first, one timer for it, and a watch on the
//! runtime that made the timer).
//!
//! Under `cfg(par_imap_loom)` the progress's lock is loom's, so that the
//! engine's models (`engine/loom_model.rs`) explore a deadline expiring
//! while its item finishes.

use std::collections::BTreeSet;
use std::future::Future;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::pin::Pin;
use std::sync::{Arc, PoisonError};

#[cfg(par_imap_loom)]
use loom::sync::{Mutex, MutexGuard};
#[cfg(not(par_imap_loom))]
use std::sync::{Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::sync::oneshot;
use tokio::time::{Instant, Sleep};
use tokio_util::task::AbortOnDropHandle;

use crate::error::{Error, drop_contained};

/// Deadlines by call, at most one per running call: removed when the call
/// ends, so they never outnumber the calls in flight.
#[derive(Debug, Default)]
pub(crate) struct Deadlines {
    pending: BTreeSet<(Instant, usize)>,
    timer: Option<Timer>,
}

/// A timer belongs to the runtime it was made on; polling it after that
/// runtime shut down panics inside tokio. A task of the same runtime holds
/// `alive`'s sender: when the runtime drops its tasks, the receiver says so.
#[derive(Debug)]
struct Timer {
    sleep: Pin<Box<Sleep>>,
    alive: oneshot::Receiver<()>,
    _watch: AbortOnDropHandle<()>,
}

impl Timer {
    fn new(deadline: Instant) -> Self {
        let (keep_alive, alive) = oneshot::channel::<()>();
        let watch = tokio::spawn(async move {
            let _keep_alive = keep_alive;
            std::future::pending::<()>().await;
        });
        Timer {
            sleep: Box::pin(tokio::time::sleep_until(deadline)),
            alive,
            _watch: AbortOnDropHandle::new(watch),
        }
    }

    fn is_runtime_gone(&mut self) -> bool {
        matches!(
            self.alive.try_recv(),
            Err(oneshot::error::TryRecvError::Closed)
        )
    }
}

/// What the deadlines say at this poll.
#[derive(Debug)]
pub(crate) enum Due {
    /// This call's deadline has passed.
    Call(Instant, usize),
    /// Nothing is due; the timer will wake the task when something is.
    Nothing,
    /// The runtime that owns the timer has shut down.
    RuntimeGone,
}

/// The runtime that owns the timer has shut down: the timer is dropped.
#[derive(Debug)]
pub(crate) struct RuntimeGone;

impl Deadlines {
    pub(crate) fn insert(&mut self, at: Instant, call: usize) {
        self.pending.insert((at, call));
    }

    pub(crate) fn remove(&mut self, at: Instant, call: usize) {
        self.pending.remove(&(at, call));
    }

    /// Forgets the deadlines of the calls from `index` on.
    pub(crate) fn forget_from(&mut self, index: usize) {
        self.retain(|call| call < index);
    }

    /// Keeps the deadlines of the calls for which `keep` says so.
    pub(crate) fn retain(&mut self, mut keep: impl FnMut(usize) -> bool) {
        self.pending.retain(|&(_, call)| keep(call));
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.pending.is_empty()
    }

    /// The next deadline that has passed, if any (removed); otherwise arms
    /// the timer for the earliest.
    pub(crate) fn poll_due(&mut self, cx: &mut Context<'_>) -> Due {
        if self.timer.as_mut().is_some_and(Timer::is_runtime_gone) {
            self.timer = None;
            return Due::RuntimeGone;
        }
        let Some(&(at, call)) = self.pending.first() else {
            return Due::Nothing;
        };
        // A timer that fired means the deadline has come, whatever the
        // clock read a moment ago.
        if at > Instant::now() {
            match self.poll_timer(at, cx) {
                Err(RuntimeGone) => return Due::RuntimeGone,
                Ok(Poll::Pending) => return Due::Nothing,
                Ok(Poll::Ready(())) => {}
            }
        }
        self.pending.pop_first();
        Due::Call(at, call)
    }

    /// Sets the timer for the earliest deadline, or wakes the task at once
    /// if it is due already.
    pub(crate) fn arm(&mut self, cx: &mut Context<'_>) -> Result<(), RuntimeGone> {
        let Some(&(at, _)) = self.pending.first() else {
            return Ok(());
        };
        if self.poll_timer(at, cx)?.is_ready() {
            cx.waker().wake_by_ref();
        }
        Ok(())
    }

    /// Polls the one timer, set to `at` (made on this runtime if there is
    /// none; re-registered if it fired for an earlier deadline).
    ///
    /// The watch says when the timer's runtime has dropped its tasks, but
    /// tokio may shut the timer down a moment before (or while) it does,
    /// and polling a timer shut down panics inside tokio ("being
    /// shutdown"). That panic is caught here and read as the runtime gone:
    /// it never unwinds out of `poll_next`.
    fn poll_timer(&mut self, at: Instant, cx: &mut Context<'_>) -> Result<Poll<()>, RuntimeGone> {
        let timer = self.timer.get_or_insert_with(|| Timer::new(at));
        if timer.is_runtime_gone() {
            self.timer = None;
            return Err(RuntimeGone);
        }
        let polled = catch_unwind(AssertUnwindSafe(|| {
            if timer.sleep.deadline() != at || timer.sleep.is_elapsed() {
                timer.sleep.as_mut().reset(at);
            }
            timer.sleep.as_mut().poll(cx)
        }));
        polled.map_err(|payload| {
            self.timer = None;
            drop_contained(Some(payload));
            RuntimeGone
        })
    }

    pub(crate) fn clear(&mut self) {
        self.pending.clear();
        self.timer = None;
    }
}

/// What a call running items with deadlines shares with the engine, so
/// that the engine can time out exactly the item running now and deliver
/// the results of the call's items before it.
#[derive(Debug)]
pub struct Progress<U> {
    state: Mutex<ProgressState<U>>,
    timeout: Duration,
}

#[derive(Debug)]
struct ProgressState<U> {
    /// The item mapping now, and when it began.
    running: Option<(usize, Instant)>,
    /// The index of `results[0]`: the first result not taken by the engine.
    untaken: usize,
    results: Vec<Result<U, Error>>,
    /// The item the engine gave up on while it ran: its result is dropped.
    given_up: Option<usize>,
    /// Results up to this index were announced to the engine by a thief or
    /// the watch: announcing them again, before it took them, would only
    /// queue more reports while the consumer does not poll.
    announced: usize,
}

/// What the engine finds when a call's deadline comes.
#[derive(Debug)]
pub(crate) enum Expiry<U> {
    /// Item `index` ran past its deadline: it is given up, and `earlier`
    /// holds the call's results before it, from index `first`.
    TimedOut {
        first: usize,
        earlier: Vec<Result<U, Error>>,
        index: usize,
    },
    /// The item running now has a later deadline: this one.
    Later(Instant),
    /// No item runs right now (between two items, or the call ended): the
    /// next one starts no earlier than now.
    Idle,
}

impl<U> Progress<U> {
    pub(crate) fn new(first: usize, timeout: Duration) -> Arc<Self> {
        Arc::new(Progress {
            state: Mutex::new(ProgressState {
                running: None,
                untaken: first,
                results: Vec::new(),
                given_up: None,
                announced: first,
            }),
            timeout,
        })
    }

    /// Whether item `index` runs now and is past its deadline.
    fn overran(&self, state: &ProgressState<U>, index: usize) -> bool {
        match state.running {
            Some((running, started)) if running == index => started
                .checked_add(self.timeout)
                .is_some_and(|deadline| deadline <= Instant::now()),
            _ => false,
        }
    }

    /// Never held around user code, so never poisoned by a mapper's panic;
    /// recover anyway rather than panic in turn.
    fn lock(&self) -> MutexGuard<'_, ProgressState<U>> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Item `index` starts now.
    pub(crate) fn begin(&self, index: usize) {
        self.lock().running = Some((index, Instant::now()));
    }

    /// Item `index` ended with `result`: kept for the engine, as a timeout
    /// if it ran past its deadline (the engine had not seen it yet), or
    /// dropped if the engine gave up on it already. Returns which.
    pub(crate) fn end(&self, index: usize, result: Result<U, Error>) -> Ended {
        let mut state = self.lock();
        let overran = self.overran(&state, index);
        state.running = None;
        let (ended, dropped) = if state.given_up == Some(index) {
            (Ended::GivenUp, Some(result))
        } else if overran {
            state.results.push(Err(Error::timeout(index)));
            (Ended::Overran, Some(result))
        } else {
            state.results.push(result);
            (Ended::Kept, None)
        };
        drop(state);
        // Outside the lock: the result's `Drop` is user code.
        drop_contained(dropped);
        ended
    }

    /// When the item running now reaches its deadline (`None` if no item
    /// runs, or the one running was given up already).
    pub(crate) fn deadline(&self) -> Option<Instant> {
        let state = self.lock();
        match state.running {
            Some((index, started)) if state.given_up != Some(index) => {
                started.checked_add(self.timeout)
            }
            _ => None,
        }
    }

    /// The engine's deadline for this call came at `now`.
    pub(crate) fn expire(&self, now: Instant) -> Expiry<U> {
        let timeout = self.timeout;
        let mut state = self.lock();
        let Some((index, started)) = state.running else {
            return Expiry::Idle;
        };
        if state.given_up == Some(index) {
            // Timed out already; the worker has yet to return from it.
            return Expiry::Idle;
        }
        match started.checked_add(timeout) {
            Some(deadline) if deadline > now => Expiry::Later(deadline),
            // Past the clock's range: no deadline at all.
            None => Expiry::Later(now.checked_add(timeout).unwrap_or(now)),
            Some(_) => {
                state.given_up = Some(index);
                let first = state.untaken;
                state.untaken = index + 1;
                Expiry::TimedOut {
                    first,
                    earlier: std::mem::take(&mut state.results),
                    index,
                }
            }
        }
    }

    /// Whether results wait for the engine to take them.
    pub(crate) fn has_untaken(&self) -> bool {
        !self.lock().results.is_empty()
    }

    /// Whether results wait for the engine that it has not been told of
    /// yet; they count as told from now on.
    pub(crate) fn announce(&self) -> bool {
        let mut state = self.lock();
        let end = state.untaken + state.results.len();
        let new = end > state.announced;
        state.announced = state.announced.max(end);
        new
    }

    /// Everything not taken yet, and the index of its first result.
    pub(crate) fn take(&self) -> (usize, Vec<Result<U, Error>>) {
        let mut state = self.lock();
        let first = state.untaken;
        state.untaken += state.results.len();
        (first, std::mem::take(&mut state.results))
    }
}

/// What became of an item's result as its worker handed it in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Ended {
    /// Kept for the engine as it is.
    Kept,
    /// It ran past its deadline before the engine saw it: a timeout now,
    /// which the engine has yet to hear of.
    Overran,
    /// The engine timed it out already: dropped.
    GivenUp,
}

/// A call whose items the engine may give up on one by one (timeouts).
pub(crate) trait GiveUp: Send + Sync {
    fn is_given_up(&self, index: usize) -> bool;
}

impl<U: Send> GiveUp for Progress<U> {
    /// Given up by the engine, or past its deadline already: the worker
    /// sees its own deadline even while nobody polls the map.
    fn is_given_up(&self, index: usize) -> bool {
        let state = self.lock();
        state.given_up == Some(index) || self.overran(&state, index)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .expect("a runtime")
    }

    /// A waker that says whether it was woken.
    #[derive(Default)]
    struct Flag(std::sync::atomic::AtomicBool);

    impl std::task::Wake for Flag {
        fn wake(self: Arc<Self>) {
            self.0.store(true, std::sync::atomic::Ordering::SeqCst);
        }
    }

    /// What a call's deadlines hold is announced to the engine once: the
    /// watch looks every 10 ms, and while the consumer does not poll, each
    /// look re-announcing the same results queued another report (about
    /// 470 a second, found in review).
    #[test]
    fn results_are_announced_once_until_new_ones_come() {
        let progress = Progress::<u32>::new(5, Duration::from_secs(3600));
        assert!(!progress.announce(), "nothing finished");
        progress.begin(5);
        progress.end(5, Ok(5));
        assert!(progress.announce());
        assert!(!progress.announce(), "told of item 5 already");
        progress.begin(6);
        progress.end(6, Ok(6));
        assert!(progress.announce(), "item 6 is new");
        assert_eq!(progress.take().0, 5);
        assert!(!progress.announce(), "taken: nothing left to tell");
    }

    /// A deadline earlier than the one the timer is set for (a call re-armed
    /// while others were looked at) moves the timer: `arm` resets it, and
    /// the task is woken at the earlier one (found by `cargo mutants`: an
    /// `arm` that did nothing passed every test).
    #[test]
    fn arm_moves_the_timer_to_an_earlier_deadline() {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .start_paused(true)
            .build()
            .expect("a runtime");
        runtime.block_on(async {
            let flag = Arc::new(Flag::default());
            let waker = std::task::Waker::from(Arc::clone(&flag));
            let mut cx = Context::from_waker(&waker);
            let start = Instant::now();
            let mut deadlines = Deadlines::default();
            deadlines.insert(start + Duration::from_secs(10), 1);
            assert!(matches!(deadlines.poll_due(&mut cx), Due::Nothing));
            deadlines.insert(start + Duration::from_secs(1), 0);
            assert!(deadlines.arm(&mut cx).is_ok());
            // Paused time: the clock moves to each timer in turn.
            tokio::time::sleep(Duration::from_secs(2)).await;
            assert!(
                flag.0.load(std::sync::atomic::Ordering::SeqCst),
                "not woken at the earlier deadline"
            );
            assert!(matches!(deadlines.poll_due(&mut cx), Due::Call(_, 0)));
        });
    }

    /// tokio may shut a runtime's timer down before it drops the runtime's
    /// tasks, so the watch can still say "alive" when the timer is gone
    /// (seen once in CI: a panic "being shutdown" out of `poll_next`). Here
    /// the watch is held alive by the test while the runtime goes away.
    #[test]
    fn a_timer_whose_runtime_shut_down_before_its_watch_says_runtime_gone() {
        let first = runtime();
        let mut deadlines = Deadlines::default();
        let far = first.block_on(async { Instant::now() + Duration::from_secs(3600) });
        deadlines.insert(far, 0);
        let (keep_alive, alive) = oneshot::channel::<()>();
        first.block_on(std::future::poll_fn(|cx| {
            assert!(matches!(deadlines.poll_due(cx), Due::Nothing));
            Poll::Ready(())
        }));
        let timer = deadlines.timer.as_mut().expect("armed");
        timer.alive = alive;
        drop(first);
        let second = runtime();
        second.block_on(std::future::poll_fn(|cx| {
            assert!(matches!(deadlines.poll_due(cx), Due::RuntimeGone));
            Poll::Ready(())
        }));
        assert!(deadlines.timer.is_none());
        drop(keep_alive);
    }
}
