//! `.retry` in the engine: which failed attempts are tried again, the wait
//! between attempts, and the items' way back into a call.
//!
//! An item that may be tried again runs on a clone (the original waits in
//! the input's keyed items); its call cuts nothing off when it fails. When
//! the report comes and the failure retries, the item's slot in the reorder
//! buffer waits again, its key stays busy, and a timer of
//! [`Backoff`](crate::retry::Backoff) makes it ready when its wait is over;
//! then [`start_waiting`](super::Engine) gives it to a call of its own,
//! before any item with a higher index. Every other result ends the item
//! for good, and what was kept of it is dropped.

use std::fmt;
use std::sync::{Arc, Weak};
use std::task::Context;

use super::{Engine, Phase};
use crate::batch::Batch;
use crate::batch::Results;
use crate::call::Verdict;
use crate::error::{Error, drop_contained, drop_each};
use crate::retry::{Backoff, Cut};
use crate::trace;

/// What becomes of a failed attempt that may be tried again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Retries {
    /// Not a failure that retries: the attempt's result is the item's.
    No,
    /// Tried again after its backoff.
    Yes,
    /// It would be, but the map no longer wants the item.
    Unwanted,
}

/// Whether a failed attempt is tried again, by the stream's policy.
/// Shared with the calls, which ask it before a failure cuts the map off.
pub(crate) struct Retryable<U>(Arc<RetryableFn<U>>);

type RetryableFn<U> = dyn Fn(&Result<U, Error>) -> bool + Send + Sync;

impl<U> Retryable<U> {
    pub(crate) fn new(retryable: Arc<RetryableFn<U>>) -> Self {
        Retryable(retryable)
    }

    /// Whether the policy tries `result` again; `Err` with the payload when
    /// the user's predicate panicked (contained: never out of `poll_next`
    /// or a worker).
    pub(crate) fn accepts(
        &self,
        result: &Result<U, Error>,
    ) -> Result<bool, Box<dyn std::any::Any + Send>> {
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| (self.0)(result)))
    }
}

impl<U> Clone for Retryable<U> {
    fn clone(&self) -> Self {
        Retryable(Arc::clone(&self.0))
    }
}

impl<U> fmt::Debug for Retryable<U> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Retryable")
    }
}

/// The engine's retry state.
pub(crate) struct Retrying<U> {
    /// Whether a failed attempt is tried again, by the stream's policy.
    retryable: Retryable<U>,
    backoff: Backoff,
    /// Items that ended for good since the input's keyed items were last
    /// seen: what is kept of them is dropped there.
    ended: Vec<usize>,
    /// The input's store of kept items, for the map's cutoff to reach.
    kept: Weak<dyn Cut>,
}

impl<U> Retrying<U> {
    pub(crate) fn new(retryable: Retryable<U>, backoff: Backoff, kept: Weak<dyn Cut>) -> Self {
        Retrying {
            retryable,
            backoff,
            ended: Vec::new(),
            kept,
        }
    }

    pub(crate) fn kept(&self) -> Weak<dyn Cut> {
        Weak::clone(&self.kept)
    }

    /// Item `index` starts an attempt: its number, and whether another may
    /// follow.
    pub(super) fn start(&mut self, index: usize) -> (u32, bool) {
        self.backoff.start(index)
    }

    /// Item `index` ended for good.
    pub(super) fn ended(&mut self, index: usize) {
        self.backoff.forget(index);
        self.ended.push(index);
    }

    /// The items that ended for good since the last call.
    pub(super) fn take_ended(&mut self) -> Vec<usize> {
        std::mem::take(&mut self.ended)
    }

    /// Items from `index` on will never be mapped (fail-fast).
    pub(super) fn forget_from(&mut self, index: usize) {
        self.backoff.forget_from(index);
    }

    /// The policy, for a call whose item may be tried again.
    pub(super) fn retryable(&self) -> Retryable<U> {
        self.retryable.clone()
    }

    /// Whether a wait may need the runtime's timer.
    pub(super) fn needs_timer(&self) -> bool {
        self.backoff.needs_timer()
    }

    pub(super) fn clear(&mut self) {
        self.backoff.clear();
        self.ended.clear();
    }
}

impl<U> fmt::Debug for Retrying<U> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Retrying")
            .field("backoff", &self.backoff)
            .finish_non_exhaustive()
    }
}

impl<U> Engine<U> {
    /// Whether the one-item `call`, whose attempt ended with `results`, is
    /// tried again: its failure retries and it has an attempt left. Such a
    /// failure is never the item's result: when the map no longer wants
    /// the item, the attempt brings nothing (`Unwanted`), like a call that
    /// never ran; a failure elsewhere, or the end of the map, explains it.
    ///
    /// `accepted` is what the call's worker already learnt from the policy
    /// (so the user's predicate sees each failure once). A panic of the
    /// predicate is the item's panic error (in `results`), not tried again.
    pub(super) fn retries(
        &mut self,
        call: usize,
        results: &mut Results<U>,
        accepted: Option<Verdict>,
    ) -> Retries {
        let Some(retry) = &self.retry else {
            return Retries::No;
        };
        let wanted = self
            .shared
            .as_ref()
            .is_none_or(|shared| !shared.is_cut_off(call));
        let Some((running, _)) = self.calls.running(call) else {
            return Retries::No;
        };
        let accepted = match (accepted, results.last()) {
            (Some(verdict), _) => verdict,
            (None, Some(last)) if results.len() == 1 => retry.retryable.accepts(last),
            _ => Ok(false),
        };
        let failed = match accepted {
            Ok(accepted) => running.retry_on_return || accepted,
            Err(payload) => {
                drop_each(std::mem::replace(
                    results,
                    Batch::One(Err(Error::panic(call, payload))),
                ));
                return Retries::No;
            }
        };
        match (failed && retry.backoff.has_attempt_left(call), wanted) {
            (false, _) => Retries::No,
            (true, true) => Retries::Yes,
            (true, false) => Retries::Unwanted,
        }
    }

    /// The blocking item `index` of `call` timed out: if the timeout
    /// retries, the call is marked to retry its item once its thread has
    /// returned, and `true` is returned (nothing fails now).
    pub(super) fn retry_on_return(&mut self, call: usize, index: usize) -> bool {
        let Some(retry) = &self.retry else {
            return false;
        };
        if call != index {
            return false;
        }
        let accepted = match retry.retryable.accepts(&Err(Error::timeout(index))) {
            Ok(accepted) => accepted,
            Err(payload) => {
                // The timeout stays the item's failure.
                drop_contained(payload);
                false
            }
        };
        if !accepted || !retry.backoff.has_attempt_left(index) {
            return false;
        }
        match self.calls.running(call) {
            Some((running, _)) => {
                running.retry_on_return = true;
                true
            }
            None => false,
        }
    }

    /// The attempt of the one-item `call` failed and is tried again: its
    /// item waits in the window for its backoff, its key busy.
    pub(super) fn retry_later(&mut self, call: usize, results: Results<U>) {
        drop_each(results);
        let running = self.calls.wait_again(call);
        self.disarm(call, running);
        if let Some(keys) = &mut self.keys {
            keys.retry_later(call);
        }
        self.count_waiting();
        if let Some(retry) = &mut self.retry {
            let delay = retry.backoff.wait(call);
            trace::life!(
                "par_imap: retry",
                index = call,
                delay_ms = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX)
            );
        }
    }

    /// The items whose backoff is over become ready for a call.
    pub(super) fn wake_retries(&mut self, cx: &mut Context<'_>) {
        let Some(retry) = &mut self.retry else {
            return;
        };
        if retry.backoff.is_idle() {
            return;
        }
        let Ok(due) = retry.backoff.poll_due(cx) else {
            // Its runtime shut down: the map is cancelled under it.
            self.phase = Phase::CancelledUnder;
            return;
        };
        for index in due {
            if let Some(keys) = &mut self.keys {
                keys.wake(index);
            }
        }
    }
}
