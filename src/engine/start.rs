//! How the engine starts calls: while the limit, the window and the budget
//! allow, with items pulled only as far as the input has them ready.

use std::panic::{self, AssertUnwindSafe};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use futures::Stream;
use tokio::runtime::Handle;

use super::{Engine, Phase, Running};
use crate::batch::Batch;
use crate::call::Call;
use crate::deadline::Progress;
use crate::engine::Retryable;
use crate::error::{Error, drop_contained, drop_each};
use crate::keys::Input;
use crate::sizer;
use crate::spawn::{IsFailure, Spawn};
use crate::trace;

impl<U> Engine<U> {
    /// Starts calls while the limit and the window have room.
    pub(super) fn start_calls<T, St, R>(
        &mut self,
        mut input: Pin<&mut Option<Input<St>>>,
        runner: &mut R,
        is_failure: IsFailure<U>,
        cx: &mut Context<'_>,
    ) where
        St: Stream<Item = T>,
        R: Spawn<T, Output = U>,
    {
        self.start_waiting(input.as_mut(), runner, is_failure);
        while self.can_start(R::BATCHES) {
            let most = self.sizer.next_size();
            let room = self.window() - (self.pulled - self.yielded);
            // While every worker has a call, wait for the consumer to make
            // room for a fair share of the window rather than start a call
            // on a few items: its dispatch would cost more than their work.
            // A worker idle takes what room there is: a slow or hung item
            // holding the window's head must not idle it.
            let share = self.share();
            if self.in_flight >= self.limit() && room < most.min(share).max(1) {
                break;
            }
            // Adaptive sizes also keep to a fair share of the window, so that
            // a small window still lets every worker have a call.
            let size = match self.options.batch {
                None => most.min(share),
                Some(_) => most,
            };
            let Some(items) = self.pull(input.as_mut(), cx, size.min(room).max(1)) else {
                break;
            };
            let first = self.pulled;
            self.pulled += items.len();
            self.counters.pulled(items.len());
            if self.keys.is_some() {
                self.wait_for_keys(input.as_mut(), first, items, is_failure);
                self.start_waiting(input.as_mut(), runner, is_failure);
                continue;
            }
            let pieces = self.pieces();
            items.split(first, pieces, |first, piece| {
                let len = piece.len();
                let running = self.start(runner, first, piece, is_failure, None);
                self.calls.push(len, running);
            });
        }
    }

    /// A fair share of the window for one call.
    fn share(&self) -> usize {
        self.window() / self.limit().saturating_mul(2)
    }

    /// Adaptive sizes: while workers are idle, what came is shared among
    /// them rather than queued behind one, so a slow item never holds back
    /// the ones after it while a worker is free.
    fn pieces(&self) -> usize {
        match self.options.batch {
            None => self.limit().saturating_sub(self.in_flight).max(1),
            Some(_) => 1,
        }
    }

    /// `.key_order`: the items pulled from `first` on wait for their keys.
    /// A panic of the key function is that item's panic error.
    fn wait_for_keys<St: Stream>(
        &mut self,
        mut input: Pin<&mut Option<Input<St>>>,
        first: usize,
        items: Batch<St::Item>,
        is_failure: IsFailure<U>,
    ) {
        self.calls.push_waiting(items.len());
        let Some(keyed) = input.as_mut().as_pin_mut().and_then(Input::keyed) else {
            return drop_each(items);
        };
        for (index, item) in (first..).zip(items) {
            let Some(keys) = self.keys.as_mut() else {
                drop_contained(item);
                continue;
            };
            match panic::catch_unwind(AssertUnwindSafe(|| keyed.key(index, &item))) {
                Ok(key) => {
                    keys.arrive(index, key);
                    keyed.wait(index, item);
                }
                Err(payload) => {
                    drop_contained(item);
                    self.key_panicked(index, payload, is_failure);
                }
            }
        }
        self.count_waiting();
    }

    /// The key function panicked on item `index`: its result is that panic.
    fn key_panicked(
        &mut self,
        index: usize,
        payload: Box<dyn std::any::Any + Send>,
        is_failure: IsFailure<U>,
    ) {
        let running = Running {
            progress: None,
            deadline: None,
            retry_on_return: false,
        };
        if self.calls.start_waiting(index, 1, running).is_err() {
            return drop_contained(payload);
        }
        let results = Batch::One(Err(Error::panic(index, payload)));
        let failure = self.count_failures(index, &results, is_failure);
        drop_contained(self.calls.complete(index, index, results));
        if let Some(index) = failure {
            self.failed(index);
        }
    }

    /// `.key_order`: gives the waiting items whose keys are free to calls,
    /// the lowest index first, while a call can start; forgets those a
    /// failure made unwanted.
    fn start_waiting<T, St, R>(
        &mut self,
        mut input: Pin<&mut Option<Input<St>>>,
        runner: &mut R,
        is_failure: IsFailure<U>,
    ) where
        St: Stream<Item = T>,
        R: Spawn<T, Output = U>,
    {
        if self.keys.is_none() {
            return;
        }
        let cutoff = self
            .shared
            .as_ref()
            .map_or(usize::MAX, |shared| shared.cutoff());
        let below = match self.phase {
            Phase::Failed { at } => cutoff.min(at),
            _ => cutoff,
        };
        let Some(keyed) = input.as_mut().as_pin_mut().and_then(Input::keyed) else {
            return;
        };
        if self
            .keys
            .as_mut()
            .is_some_and(|keys| keys.forget_from(below))
        {
            keyed.forget_from(below);
            if let Some(retry) = &mut self.retry {
                retry.forget_from(below);
            }
        }
        if let Some(retry) = &mut self.retry {
            for index in retry.take_ended() {
                keyed.forget(index);
            }
        }
        while self.can_give(R::BATCHES) {
            let most = match self.options.batch {
                // `.retry`: a retry is a call of its own, so every call is.
                _ if self.retry.is_some() => 1,
                Some(k) => k,
                None => self
                    .sizer
                    .next_size()
                    .min(self.share())
                    .div_ceil(self.pieces())
                    .max(1),
            };
            let Some(keys) = self.keys.as_mut() else {
                return;
            };
            let Some((first, len)) = keys.next_run(most, below) else {
                break;
            };
            keys.give(first, len);
            let (items, attempt) = match &mut self.retry {
                None => (keyed.take(first, len), None),
                Some(retry) => {
                    let (attempt, may_retry) = retry.start(first);
                    if attempt > 1 {
                        trace::life!("par_imap: attempt", index = first, attempt = attempt);
                    }
                    match keyed.take_attempt(first, may_retry) {
                        Some(Ok(item)) => (
                            Batch::One(item),
                            Some((attempt, may_retry.then(|| retry.retryable()))),
                        ),
                        Some(Err(payload)) => {
                            // Its clone panicked (the item is dropped): that
                            // is its panic error.
                            self.ended_for_good(first);
                            self.key_panicked(first, payload, is_failure);
                            continue;
                        }
                        None => {
                            // The cutoff fell below it since `below` was
                            // read (a failure on a worker, the token): it
                            // was dropped there, and its slot goes with the
                            // failure or the end of the map.
                            self.ended_for_good(first);
                            continue;
                        }
                    }
                }
            };
            let running = self.start(runner, first, items, is_failure, attempt);
            if let Err(running) = self.calls.start_waiting(first, len, running) {
                // The keys give only items the buffer holds as waiting.
                debug_assert!(false, "items {first}+{len} did not wait");
                drop_contained(running);
            }
        }
        self.count_waiting();
    }

    pub(super) fn count_waiting(&self) {
        if let Some(keys) = &self.keys {
            self.counters.waiting(keys.waiting());
        }
    }

    /// Whether a call can start on items pulled already (`.key_order`):
    /// also after the input ended, and after a failure for the items still
    /// owed.
    fn can_give(&self, batches: bool) -> bool {
        let running = matches!(
            self.phase,
            Phase::Pulling | Phase::InputDone | Phase::Failed { .. }
        );
        running && self.in_flight < self.most_in_flight(batches) && self.budget_allows()
    }

    fn most_in_flight(&self, batches: bool) -> usize {
        // Blocking calls: one queued behind each running one, so a worker
        // never waits for the consumer to hand it the next call. Not with
        // `.retry`: a retry whose wait ended must start before any item
        // with a higher index, not behind one queued meanwhile.
        if batches && self.retry.is_none() {
            self.limit().saturating_mul(2)
        } else {
            self.limit()
        }
    }

    /// A call takes its permit of the budget where it runs; while none is
    /// free, one call waiting for it is enough (its report wakes the map),
    /// so a starved map holds one input item at most. A closed budget lets
    /// a call start, to find it closed: the map ends at once, not when a
    /// call that holds a permit returns.
    fn budget_allows(&self) -> bool {
        self.in_flight == 0
            || self
                .options
                .budget
                .as_ref()
                .is_none_or(|budget| budget.available_permits() > 0 || budget.is_closed())
    }

    pub(super) fn can_start(&self, batches: bool) -> bool {
        // A call that failed cut the map off at once; until its report is
        // taken in, pull nothing the failure makes unwanted.
        let wanted = self
            .shared
            .as_ref()
            .is_none_or(|shared| !shared.is_cut_off(self.pulled));
        self.phase == Phase::Pulling
            && wanted
            && self.in_flight < self.most_in_flight(batches)
            && self.pulled - self.yielded < self.window()
            && self.budget_allows()
    }

    /// Pulls the items of the next call: at least one, at most `most`, only
    /// what the input has ready.
    pub(super) fn pull<T, St: Stream<Item = T>>(
        &mut self,
        mut input: Pin<&mut Option<Input<St>>>,
        cx: &mut Context<'_>,
        most: usize,
    ) -> Option<Batch<T>> {
        let mut next = || match input.as_mut().as_pin_mut()?.poll_item(cx) {
            Poll::Ready(Some(item)) => Some(item),
            Poll::Ready(None) => {
                self.phase = Phase::InputDone;
                None
            }
            Poll::Pending => None,
        };
        let first = next()?;
        if most <= 1 {
            return Some(Batch::One(first));
        }
        let mut items = Vec::with_capacity(most.min(sizer::MOST));
        items.push(first);
        while items.len() < most {
            match next() {
                Some(item) => items.push(item),
                None => break,
            }
        }
        Some(Batch::Many(items))
    }

    /// Starts the call over `items`, the first of which is item `first`.
    pub(super) fn start<T, R: Spawn<T, Output = U>>(
        &mut self,
        runner: &mut R,
        first: usize,
        items: Batch<T>,
        is_failure: IsFailure<U>,
        attempt: Option<(u32, Option<Retryable<U>>)>,
    ) -> Running<U> {
        // Blocking calls share their progress for the engine to time out an
        // item that hangs; an async call keeps its own deadline.
        let progress = self
            .options
            .timeout
            .filter(|_| R::BATCHES)
            .map(|timeout| Progress::new(first, timeout));
        // Only calls of several items are open to thieves.
        let steal_after = match &items {
            Batch::Many(items) => self.sizer.steal_after(items.len()),
            Batch::One(_) => Duration::ZERO,
        };
        let shared = Arc::clone(self.shared());
        let mut call = Call::new(first, shared, progress.clone(), steal_after);
        if let Some((attempt, may_retry)) = attempt {
            call.attempt(attempt, may_retry);
        }
        let runtime = self.runtime.get_or_insert_with(Handle::current);
        runner.spawn(runtime, items, call, is_failure);
        self.in_flight += 1;
        Running {
            progress,
            deadline: None,
            retry_on_return: false,
        }
    }
}
