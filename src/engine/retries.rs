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
use std::sync::Weak;
use std::task::Context;

use super::Engine;
use crate::batch::Results;
use crate::error::{Error, drop_each};
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
pub(crate) type Retryable<U> = Box<dyn Fn(&Result<U, Error>) -> bool + Send + Sync>;

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
    pub(super) fn retries(&mut self, call: usize, results: &Results<U>) -> Retries {
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
        let failed = running.retry_on_return
            || (results.len() == 1 && results.last().is_some_and(|last| (retry.retryable)(last)));
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
        let timed_out = Err(Error::timeout(index));
        if call != index || !retry.backoff.has_attempt_left(index) || !(retry.retryable)(&timed_out)
        {
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
            self.counters.waiting(keys.waiting());
        }
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
        for index in retry.backoff.poll_due(cx) {
            if let Some(keys) = &mut self.keys {
                keys.wake(index);
            }
        }
    }
}
