//! Per-item deadlines of running calls: the earliest first, one timer for
//! it, and a watch on the runtime that made the timer.

use std::collections::BTreeSet;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::sync::oneshot;
use tokio::time::{Instant, Sleep};
use tokio_util::task::AbortOnDropHandle;

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

impl Deadlines {
    pub(crate) fn insert(&mut self, at: Instant, call: usize) {
        self.pending.insert((at, call));
    }

    pub(crate) fn remove(&mut self, at: Instant, call: usize) {
        self.pending.remove(&(at, call));
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
        if at > Instant::now() && self.poll_timer(at, cx).is_pending() {
            return Due::Nothing;
        }
        self.pending.pop_first();
        Due::Call(at, call)
    }

    /// Sets the timer for the earliest deadline, or wakes the task at once
    /// if it is due already.
    pub(crate) fn arm(&mut self, cx: &mut Context<'_>) {
        let Some(&(at, _)) = self.pending.first() else {
            return;
        };
        if self.poll_timer(at, cx).is_ready() {
            cx.waker().wake_by_ref();
        }
    }

    /// Polls the one timer, set to `at` (made on this runtime if there is
    /// none; re-registered if it fired for an earlier deadline).
    fn poll_timer(&mut self, at: Instant, cx: &mut Context<'_>) -> Poll<()> {
        let timer = self.timer.get_or_insert_with(|| Timer::new(at));
        if timer.sleep.deadline() != at || timer.sleep.is_elapsed() {
            timer.sleep.as_mut().reset(at);
        }
        timer.sleep.as_mut().poll(cx)
    }

    pub(crate) fn clear(&mut self) {
        self.pending.clear();
        self.timer = None;
    }
}
