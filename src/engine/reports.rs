//! What the engine does with the reports of its calls: results handed to
//! the reorder buffer, a steal splitting a call, failures observed and
//! fail-fast applied.

use std::time::Duration;

use tokio::time::Instant;

use super::retries::Retries;
use super::{Engine, Phase, Running};
use crate::batch::{Batch, Results};
use crate::call::Event;
use crate::error::Error;
use crate::error::{drop_contained, drop_each};
use crate::options::Order;
use crate::reorder::Part;
use crate::spawn::IsFailure;
use crate::trace;

impl<U> Engine<U> {
    /// Takes in one report of a call.
    pub(super) fn take_in(&mut self, event: Event<U>, is_failure: IsFailure<U>) {
        {
            match event {
                Event::Started { call } => {
                    // Its first item may have ended already and the next not
                    // begun: then no item runs to take a deadline from, and
                    // the call is looked at a timeout from now, no later than
                    // the next item's own deadline (a hung item of a batch was
                    // never timed out when the report came in that moment).
                    let next_look = self
                        .options
                        .timeout
                        .and_then(|timeout| Instant::now().checked_add(timeout));
                    self.arm(call, next_look);
                }
                Event::Skipped { call } => {
                    self.in_flight -= 1;
                    self.ended_for_good(call);
                    // A failure at a lower index, or the end of the map,
                    // explains it; until then its items stay owed.
                    let running = self.calls.skip(call);
                    self.disarm(call, running);
                }
                Event::Stolen {
                    call,
                    done,
                    results,
                    at,
                    progress,
                } => {
                    if let Some(at) = at {
                        // A call is named by its first index: a thief's
                        // part never starts at its owner's (see `Loot::steal`).
                        debug_assert_ne!(at, call, "a stolen part named like its owner");
                        self.in_flight += 1;
                        if let Some(keys) = &mut self.keys {
                            keys.split(call, at);
                        }
                    }
                    self.take_stolen(call, done, results, is_failure);
                    let Some(at) = at else { return };
                    let thief = Running {
                        progress,
                        deadline: None,
                        retry_on_return: false,
                    };
                    // After a failure below it, the stolen part is not wanted.
                    if self.failed_at().is_some_and(|failed| failed < at) {
                        return drop_contained(thief);
                    }
                    match self.calls.split(call, at, thief) {
                        Ok(None) => {}
                        Ok(Some(owner)) => self.disarm(call, Some(owner)),
                        Err(thief) => drop_contained(thief),
                    }
                }
                Event::Finished {
                    call,
                    first,
                    mut results,
                    mapped,
                    busy,
                    accepted,
                } => {
                    let retries =
                        self.retries(call, &mut results, accepted.map(|verdict| *verdict));
                    self.adapt(busy, results.last(), retries != Retries::No, self.in_flight);
                    self.in_flight -= 1;
                    self.sizer.observe(mapped, busy);
                    if retries == Retries::Yes {
                        // Its key stays busy through the wait.
                        return self.retry_later(call, results);
                    }
                    self.ended_for_good(call);
                    if retries == Retries::Unwanted {
                        drop_each(results);
                        let running = self.calls.skip(call);
                        return self.disarm(call, running);
                    }
                    if !self.calls.is_running(call) {
                        // No longer wanted: dropped here, a panic of its
                        // `Drop` contained.
                        drop_each(results);
                        return;
                    }
                    if results.last().is_some_and(Self::is_cancellation) {
                        self.phase = Phase::CancelledUnder;
                        drop_each(results);
                        return;
                    }
                    let failure = self.count_failures(first, &results, is_failure);
                    let running = self.calls.complete(call, first, results);
                    self.disarm(call, running);
                    if let Some(index) = failure {
                        self.failed(index);
                    }
                }
            }
        }
    }

    /// `.adaptive_limit`: a call that ran for `latency` (from the moment it
    /// held its permit), its last result, and the calls running with it
    /// move the limit. Timeouts, panics and failures that `.retry` tries
    /// again count as drops; another `Err` only by its latency.
    fn adapt(
        &mut self,
        latency: Duration,
        last: Option<&Result<U, Error>>,
        retries: bool,
        in_flight: usize,
    ) {
        let Some(limiter) = &mut self.limiter else {
            return;
        };
        if latency.is_zero() {
            return; // never started
        }
        let dropped = retries
            || last.is_some_and(|result| {
                result
                    .as_ref()
                    .is_err_and(|e| e.is_timeout() || e.is_panic())
            });
        if let Some(limit) = limiter.observe(latency, dropped, in_flight) {
            self.counters.limit(limit);
            trace::life!("par_imap: limit moved", limit = limit);
        }
    }

    /// The call ended for good (not to be tried again): its items' keys
    /// are free (`.key_order`), and with `.retry` what was kept of its one
    /// item goes.
    pub(super) fn ended_for_good(&mut self, call: usize) {
        if let Some(keys) = &mut self.keys {
            keys.release(call);
        }
        if let Some(retry) = &mut self.retry {
            retry.ended(call);
        }
    }

    /// A thief delivered the results of the running `call` so far (from
    /// `done` on; with deadlines they wait in the call's progress, taken
    /// here, where timeouts are taken too).
    pub(super) fn take_stolen(
        &mut self,
        call: usize,
        done: usize,
        results: Results<U>,
        is_failure: IsFailure<U>,
    ) {
        let (done, results) = match self.calls.running(call) {
            None => return drop_each(results),
            Some((running, _)) => match &running.progress {
                Some(progress) => {
                    let (done, taken) = progress.take();
                    (done, Batch::Many(taken))
                }
                None => (done, results),
            },
        };
        if results.len() == 0 {
            return;
        }
        let failure = self.count_failures(done, &results, is_failure);
        if let Some(Part::Ended(running)) = self.calls.complete_part(call, done, results) {
            self.disarm(call, Some(running));
        }
        if let Some(index) = failure {
            self.failed(index);
        }
    }

    /// Only the machinery makes cancellation errors: a call that brings one
    /// was torn down (its runtime shut down) or found the budget closed.
    pub(super) fn is_cancellation(result: &Result<U, Error>) -> bool {
        result.as_ref().is_err_and(Error::is_cancelled)
    }

    /// Counts the failures among `results` (from index `first`); returns
    /// the one that fails the map, if any: fail-fast stops a call at its
    /// first failure, so it is the last result.
    pub(super) fn count_failures(
        &self,
        first: usize,
        results: &Results<U>,
        is_failure: IsFailure<U>,
    ) -> Option<usize> {
        if self.options.keep_going {
            for _ in results.iter().filter(|result| is_failure(result)) {
                self.counters.failed();
            }
            return None;
        }
        let last = results.last().filter(|result| is_failure(result))?;
        let index = first + results.len() - 1;
        self.observe_failure(index, last);
        Some(index)
    }

    pub(super) fn observe_failure(&self, index: usize, result: &Result<U, Error>) {
        self.counters.failed();
        trace::life!(
            "par_imap: failure observed",
            index = index,
            kind = match result {
                Err(error) if error.is_panic() => "panic",
                Err(error) if error.is_timeout() => "timeout",
                Err(_) => "cancelled",
                Ok(_) => "error",
            }
        );
    }

    /// Fail-fast: item `index` failed. Nothing after it starts; in input
    /// order the items before it still run to be yielded.
    pub(super) fn failed(&mut self, index: usize) {
        if let Some(shared) = &self.shared {
            shared.failed_at(index);
        }
        // A cancellation under the map ends it anyway, before any failure.
        if matches!(self.phase, Phase::CancelledUnder | Phase::Ended) {
            return;
        }
        match self.options.order {
            Order::Input => {
                if self.failed_at().is_none_or(|earlier| index < earlier) {
                    self.phase = Phase::Failed { at: index };
                    self.calls.truncate_after(index);
                    self.forget_deadlines();
                    self.abort(index + 1);
                }
            }
            Order::Completion => {
                self.phase = Phase::Failed { at: index };
                self.calls.forget_unfinished();
                self.forget_deadlines();
                self.abort(0);
            }
        }
    }

    /// The running calls from item `index` on are no longer wanted: the
    /// async ones are aborted before this poll ends.
    pub(super) fn abort(&mut self, index: usize) {
        self.abort_from = Some(self.abort_from.map_or(index, |from| from.min(index)));
    }
}
