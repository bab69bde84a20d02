//! The engine's per-item deadlines for blocking calls: armed from what a
//! call shares of the item it runs, looked at once per poll when due, and
//! turned into a timeout of exactly that item.

use std::task::Context;
use std::time::Duration;

use tokio::time::Instant;

use super::{Engine, Phase, Running};
use crate::batch::Batch;
use crate::deadline::Due;
use crate::deadline::Expiry;
use crate::error::Error;
use crate::reorder::Part;
use crate::spawn::IsFailure;

/// How soon to look again at a call with deadlines that ran no item when
/// its deadline came (between two items, or its report on its way).
const IDLE_RECHECK: Duration = Duration::from_millis(1);

impl<U> Engine<U> {
    /// Sets the deadline of `call` from the item it runs now, or no
    /// earlier than `at_least` when it runs none.
    pub(super) fn arm(&mut self, call: usize, at_least: Option<Instant>) {
        if self.options.timeout.is_none() {
            return;
        }
        let Some((running, _)) = self.calls.running(call) else {
            return;
        };
        let deadline = running
            .progress
            .as_ref()
            .and_then(|progress| progress.deadline())
            .or(at_least);
        if let Some(old) = std::mem::replace(&mut running.deadline, deadline) {
            self.deadlines.remove(old, call);
        }
        if let Some(deadline) = deadline {
            self.deadlines.insert(deadline, call);
        }
    }

    pub(super) fn disarm(&mut self, call: usize, running: Option<Running<U>>) {
        if let Some(deadline) = running.and_then(|running| running.deadline) {
            self.deadlines.remove(deadline, call);
        }
    }

    /// Drops the deadlines of the calls the map forgot (fail-fast), so
    /// that no timer stays armed for a call nobody waits for.
    pub(super) fn forget_deadlines(&mut self) {
        let calls = &self.calls;
        self.deadlines.retain(|call| calls.is_running(call));
    }

    /// Times out the items that ran past their deadline.
    pub(super) fn expire_deadlines(&mut self, cx: &mut Context<'_>, is_failure: IsFailure<U>) {
        let Some(timeout) = self.options.timeout else {
            return;
        };
        // The deadlines due now, each looked at once in this poll: what they
        // re-arm waits for the next one (a call between two items, or whose
        // report is on its way, must not keep this loop turning).
        let mut due = Vec::new();
        loop {
            match self.deadlines.poll_due(cx) {
                Due::Call(at, call) => due.push((at, call)),
                Due::Nothing => break,
                Due::RuntimeGone => {
                    self.phase = Phase::CancelledUnder;
                    return;
                }
            }
        }
        for (at, call) in due {
            // The timer may fire within its millisecond before `at`.
            self.expire(call, at, Instant::now().max(at), timeout, is_failure);
        }
        if self.deadlines.arm(cx).is_err() {
            self.phase = Phase::CancelledUnder;
        }
    }

    /// The deadline `at` of `call` came at `now`: the item it runs now is
    /// timed out if it is past its own deadline; otherwise the call's
    /// deadline is armed again. The call's worker may be finishing that
    /// item at this very moment (`engine/loom_model.rs`).
    pub(super) fn expire(
        &mut self,
        call: usize,
        at: Instant,
        now: Instant,
        timeout: Duration,
        is_failure: IsFailure<U>,
    ) {
        let Some((running, _)) = self.calls.running(call) else {
            return;
        };
        if running.deadline == Some(at) {
            running.deadline = None;
        }
        let Some(progress) = running.progress.clone() else {
            return;
        };
        match progress.expire(now) {
            Expiry::Later(deadline) => self.arm(call, Some(deadline)),
            // No item runs right now: look again a little later.
            Expiry::Idle => self.arm(call, now.checked_add(timeout.max(IDLE_RECHECK))),
            Expiry::TimedOut {
                first,
                mut earlier,
                index,
            } => {
                // `.keep_going()`: failures the call finished before the item
                // timed out come with the timeout, and count like any other
                // (under fail-fast none can: the call stopped at the first).
                if self.options.keep_going {
                    for _ in earlier.iter().filter(|result| is_failure(result)) {
                        self.counters.failed();
                    }
                }
                self.time_out(call, first, &mut earlier, index, now, timeout);
            }
        }
    }

    /// Item `index` of `call` timed out: the call's results before it are
    /// delivered with the timeout; the call goes on (`.keep_going()`) or
    /// the map fails at `index`.
    fn time_out(
        &mut self,
        call: usize,
        first: usize,
        earlier: &mut Vec<Result<U, Error>>,
        index: usize,
        now: Instant,
        timeout: Duration,
    ) {
        // `.retry`: tried again once its thread returned; nothing fails now.
        if earlier.is_empty() && self.retry_on_return(call, index) {
            return;
        }
        let timed_out: Result<U, Error> = Err(Error::timeout(index));
        self.observe_failure(index, &timed_out);
        earlier.push(timed_out);
        let results = Batch::Many(std::mem::take(earlier));
        match self.calls.complete_part(call, first, results) {
            Some(Part::GoesOn) => self.arm(call, now.checked_add(timeout.max(IDLE_RECHECK))),
            // Only blocking calls are timed out here (an async call keeps
            // its own deadline): it runs on, its result dropped when it
            // returns.
            Some(Part::Ended(running)) => self.disarm(call, Some(running)),
            None => {}
        }
        if !self.options.keep_going {
            self.failed(index);
        }
    }
}
