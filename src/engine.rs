//! The one engine behind every variant: pulls input while the limit and the
//! window allow, starts calls through the variant's runner, takes in what
//! the calls report, times out items, and hands results to the
//! [reorder buffer](crate::reorder), which yields them in input or in
//! completion order.
//!
//! A call maps one item, or several consecutive items (a batch); calls are
//! named by the index of their first item.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, Wake, Waker};

use futures::Stream;
use tokio::runtime::Handle;
use tokio::time::Instant;
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};

use crate::Error;
use crate::batch::{Batch, Results};
use crate::call::{Call, Event, Order, Progress, Shared};
use crate::deadline::Deadlines;
use crate::error::{drop_contained, drop_each};
use crate::options::Options;
use crate::reorder::{Part, Reorder};
use crate::sizer::{self, Sizer};
use crate::spawn::{IsFailure, Spawn};
use crate::stats::Counters;
use crate::trace;

mod timeouts;

/// Results of one batch handed out in a row without looking at reports,
/// deadlines or new calls.
const QUICK_YIELDS: u8 = 15;

/// The waker the caller's token calls from `cancel()`: the map's calls stop
/// at once, whoever polls.
struct EndOnCancel {
    token: CancellationToken,
    shared: Arc<Shared>,
}

impl Wake for EndOnCancel {
    fn wake(self: Arc<Self>) {
        // The token's lock is released before it wakes its waiters.
        if self.token.is_cancelled() {
            self.shared.end();
        }
    }
}

/// The engine's hold on a running call.
#[derive(Debug)]
pub(crate) struct Running<U> {
    /// With a timeout: what the call shares about the item it runs.
    progress: Option<Arc<Progress<U>>>,
    deadline: Option<Instant>,
}

/// The engine's state, apart from the input and the runner.
#[derive(Debug)]
pub(crate) struct Engine<U> {
    options: Options,
    counters: Arc<Counters>,
    /// Made at the first poll, from the options.
    shared: Option<Arc<Shared>>,
    /// Resolves when the caller's token is cancelled.
    cancelled: Option<Pin<Box<WaitForCancellationFutureOwned>>>,
    /// Registered on the caller's token with a waker that lowers the
    /// cutoff: `cancel()` wakes it before it returns, so running calls map
    /// no further item, polled or not.
    token_watch: Option<Pin<Box<WaitForCancellationFutureOwned>>>,
    calls: Reorder<U, Running<U>>,
    deadlines: Deadlines,
    sizer: Sizer,
    runtime: Option<Handle>,
    pulled: usize,
    yielded: usize,
    /// Calls started and not yet really ended (a timed-out blocking call
    /// counts until it returns).
    in_flight: usize,
    input_done: bool,
    /// Fail-fast: the failure that ends the map once it is yielded.
    failed_at: Option<usize>,
    /// Async calls from this index on are to be aborted: a failure made
    /// them unwanted.
    abort_from: Option<usize>,
    /// A call came back cancelled by something other than the map: its
    /// runtime shut down, or the budget was closed.
    cancelled_under: bool,
    /// Results to hand out before phases 2 and 3 are looked at again.
    quick_yields: u8,
    finished: bool,
}

impl<U> Engine<U> {
    /// `batches`: whether the runner takes several items per call.
    pub(crate) fn new(options: Options, batches: bool) -> Self {
        Engine {
            calls: Reorder::new(options.order),
            sizer: Sizer::new(options.batch, batches),
            options,
            counters: Arc::default(),
            shared: None,
            cancelled: None,
            token_watch: None,
            deadlines: Deadlines::default(),
            runtime: None,
            pulled: 0,
            yielded: 0,
            in_flight: 0,
            input_done: false,
            failed_at: None,
            abort_from: None,
            cancelled_under: false,
            quick_yields: 0,
            finished: false,
        }
    }

    pub(crate) fn options(&self) -> &Options {
        &self.options
    }

    /// Before the first poll only: later changes would not reach the calls
    /// (a half-applied option could hang the map), so they panic.
    #[track_caller]
    pub(crate) fn options_mut(&mut self) -> &mut Options {
        assert!(
            self.shared.is_none(),
            "par_imap: builder methods (window, timeout, batch, ...) go before the first poll"
        );
        &mut self.options
    }

    /// `.batch(k)`: every call takes up to `k` items.
    #[track_caller]
    pub(crate) fn set_batch(&mut self, k: usize) {
        self.options_mut().batch = Some(k);
        self.sizer = Sizer::new(Some(k), true);
    }

    pub(crate) fn counters(&self) -> &Arc<Counters> {
        &self.counters
    }

    pub(crate) fn is_finished(&self) -> bool {
        self.finished
    }

    /// At most this many items pulled and not yet yielded.
    pub(crate) fn window(&self) -> usize {
        self.options.window.unwrap_or_else(|| {
            self.options
                .limit
                .saturating_mul(2)
                .saturating_mul(self.sizer.most())
        })
    }

    fn shared(&mut self) -> &Arc<Shared> {
        let options = &self.options;
        let counters = &self.counters;
        self.shared.get_or_insert_with(|| {
            Shared::new(
                options.order,
                options.keep_going,
                options.token.clone(),
                options.budget.clone(),
                options.timeout,
                Arc::clone(counters),
            )
        })
    }

    /// One poll of the map: the phases in order.
    pub(crate) fn poll_next<T, St, R>(
        &mut self,
        mut input: Pin<&mut Option<St>>,
        runner: &mut R,
        is_failure: IsFailure<U>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<U, Error>>>
    where
        St: Stream<Item = T>,
        R: Spawn<T, Output = U>,
    {
        if self.finished {
            return Poll::Ready(None);
        }
        if self.shared.is_none() {
            self.first_poll();
        }

        // 1. Cancellation from outside wins over anything still owed.
        if self.is_cancelled_from_outside() {
            return Poll::Ready(self.cancel(input, runner));
        }
        // Inside a batch's results, most polls just hand the next one out:
        // the reports, deadlines and new calls (phases 2 and 3) are looked
        // at every `QUICK_YIELDS + 1` results. A result ready now is owed
        // before anything they bring, in either order; and calls of several
        // items are short items, with a call queued behind each running
        // one, so new calls starting a few results later leave no worker
        // idle. Calls of one item (async, slow items) never skip the look.
        if self.quick_yields > 0 {
            if let Some(result) = self.calls.pop_same_call() {
                self.quick_yields -= 1;
                return Poll::Ready(Some(self.hand_out(result, input, runner, is_failure)));
            }
        }
        loop {
            // 2. Take in what calls report, then the deadlines, so that a
            // failure is seen before more input is pulled.
            while let Poll::Ready(event) = runner.poll_report(cx, false) {
                self.take_in(event, is_failure);
            }
            self.expire_deadlines(cx);
            if let Some(index) = self.abort_from.take() {
                runner.abort_from(index);
            }
            if self.cancelled_under {
                return Poll::Ready(self.cancel(input, runner));
            }

            // 3. Start calls while the limit and the window have room.
            self.start_calls(input.as_mut(), runner, is_failure, cx);

            // 4. Yield the next result whose turn it is.
            if let Some(result) = self.calls.pop() {
                self.quick_yields = QUICK_YIELDS;
                return Poll::Ready(Some(self.hand_out(result, input, runner, is_failure)));
            }
            if self.is_drained() {
                self.finish(input, runner);
                return Poll::Ready(None);
            }

            // 5. Nothing to yield: a report or the token must wake the task.
            // Registering costs more than the rest of a poll, so it is done
            // only here, and a report that came meanwhile goes round again.
            if let Some(cancelled) = &mut self.cancelled {
                if cancelled.as_mut().poll(cx).is_ready() {
                    return Poll::Ready(self.cancel(input, runner));
                }
            }
            match runner.poll_report(cx, true) {
                Poll::Ready(event) => self.take_in(event, is_failure),
                Poll::Pending => return Poll::Pending,
            }
        }
    }

    /// What the first poll sets up: the check that a timeout has a timer to
    /// run on, the state shared with the calls, and the token's watch.
    fn first_poll(&mut self) {
        if self.options.timeout.is_some() {
            // Without the runtime's time driver this panics now, naming
            // `enable_time`, for every kind alike, rather than later inside
            // a call or a deadline.
            drop(tokio::time::sleep(std::time::Duration::ZERO));
        }
        let shared = Arc::clone(self.shared());
        if let Some(token) = &self.options.token {
            self.cancelled = Some(Box::pin(token.clone().cancelled_owned()));
            let mut watch = Box::pin(token.clone().cancelled_owned());
            let waker = Waker::from(Arc::new(EndOnCancel {
                token: token.clone(),
                shared,
            }));
            if watch
                .as_mut()
                .poll(&mut Context::from_waker(&waker))
                .is_ready()
            {
                self.shared().end();
            }
            self.token_watch = Some(watch);
        }
    }

    /// Counts `result` as yielded; a failure ends the map (fail-fast).
    fn hand_out<St: Stream, R: Spawn<St::Item>>(
        &mut self,
        result: Result<U, Error>,
        input: Pin<&mut Option<St>>,
        runner: &mut R,
        is_failure: IsFailure<U>,
    ) -> Result<U, Error> {
        self.yielded += 1;
        self.counters.yielded();
        if !self.options.keep_going && is_failure(&result) {
            self.finish(input, runner);
        }
        result
    }

    /// Starts calls while the limit and the window have room.
    fn start_calls<T, St, R>(
        &mut self,
        mut input: Pin<&mut Option<St>>,
        runner: &mut R,
        is_failure: IsFailure<U>,
        cx: &mut Context<'_>,
    ) where
        St: Stream<Item = T>,
        R: Spawn<T, Output = U>,
    {
        while self.can_start(R::BATCHES) {
            let most = self.sizer.next_size();
            let room = self.window() - (self.pulled - self.yielded);
            // While calls run, wait for the consumer to make room for a
            // fair share of the window rather than start a call on a few
            // items: its dispatch would cost more than their work.
            let share = self.window() / self.options.limit.saturating_mul(2);
            if self.in_flight > 0 && room < most.min(share).max(1) {
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
            // Adaptive sizes: while workers are idle, what came is shared
            // among them rather than queued behind one, so a slow item never
            // holds back the ones after it while a worker is free.
            let pieces = match self.options.batch {
                None => self.options.limit.saturating_sub(self.in_flight),
                Some(_) => 1,
            };
            items.split(first, pieces, |first, piece| {
                let len = piece.len();
                let running = self.start(runner, first, piece, is_failure);
                self.calls.push(len, running);
            });
        }
    }

    /// External cancellation, checked before anything else (the token's
    /// waker is registered only when the map waits).
    fn is_cancelled_from_outside(&self) -> bool {
        self.cancelled.is_some()
            && self
                .options
                .token
                .as_ref()
                .is_some_and(CancellationToken::is_cancelled)
    }

    /// Ends the map with one cancellation error at the lowest index not yet
    /// yielded, or just ends it if nothing is owed.
    fn cancel<St: Stream, R: Spawn<St::Item>>(
        &mut self,
        input: Pin<&mut Option<St>>,
        runner: &mut R,
    ) -> Option<Result<U, Error>> {
        let owed = (!self.is_drained()).then(|| self.calls.lowest_owed());
        trace::life!("par_imap: cancelled", index = owed);
        self.finish(input, runner);
        owed.map(|index| {
            self.counters.yielded();
            Err(Error::cancelled(index))
        })
    }

    /// Takes in one report of a call.
    fn take_in(&mut self, event: Event<U>, is_failure: IsFailure<U>) {
        {
            match event {
                Event::Started { call } => self.arm(call, None),
                Event::Skipped { call } => {
                    self.in_flight -= 1;
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
                    if at.is_some() {
                        self.in_flight += 1;
                    }
                    self.take_stolen(call, done, results, is_failure);
                    let Some(at) = at else { return };
                    let thief = Running {
                        progress,
                        deadline: None,
                    };
                    // After a failure below it, the stolen part is not wanted.
                    if self.failed_at.is_some_and(|failed| failed < at) {
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
                    results,
                    mapped,
                    busy,
                } => {
                    self.in_flight -= 1;
                    self.sizer.observe(mapped, busy);
                    if !self.calls.is_running(call) {
                        // No longer wanted: dropped here, a panic of its
                        // `Drop` contained.
                        drop_each(results);
                        return;
                    }
                    if results.last().is_some_and(Self::is_cancellation) {
                        self.cancelled_under = true;
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

    /// A thief delivered the results of the running `call` so far (from
    /// `done` on; with deadlines they wait in the call's progress, taken
    /// here, where timeouts are taken too).
    fn take_stolen(
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
    fn is_cancellation(result: &Result<U, Error>) -> bool {
        result.as_ref().is_err_and(Error::is_cancelled)
    }

    /// Counts the failures among `results` (from index `first`); returns
    /// the one that fails the map, if any: fail-fast stops a call at its
    /// first failure, so it is the last result.
    fn count_failures(
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

    fn observe_failure(&self, index: usize, result: &Result<U, Error>) {
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
    fn failed(&mut self, index: usize) {
        if let Some(shared) = &self.shared {
            shared.failed_at(index);
        }
        match self.options.order {
            Order::Input => {
                if self.failed_at.is_none_or(|earlier| index < earlier) {
                    self.failed_at = Some(index);
                    self.calls.truncate_after(index);
                    self.abort(index + 1);
                }
            }
            Order::Completion => {
                self.failed_at = Some(index);
                self.calls.forget_unfinished();
                self.abort(0);
            }
        }
    }

    /// The running calls from item `index` on are no longer wanted: the
    /// async ones are aborted before this poll ends.
    fn abort(&mut self, index: usize) {
        self.abort_from = Some(self.abort_from.map_or(index, |from| from.min(index)));
    }

    fn can_start(&self, batches: bool) -> bool {
        // Blocking calls: one queued behind each running one, so a worker
        // never waits for the consumer to hand it the next call.
        let most_in_flight = if batches {
            self.options.limit.saturating_mul(2)
        } else {
            self.options.limit
        };
        // A call takes its permit of the budget where it runs; while none is
        // free, one call waiting for it is enough (its report wakes the
        // map), so a starved map holds one input item at most.
        let budget_allows = self.in_flight == 0
            || self
                .options
                .budget
                .as_ref()
                .is_none_or(|budget| budget.available_permits() > 0);
        // A call that failed cut the map off at once; until its report is
        // taken in, pull nothing the failure makes unwanted.
        let wanted = self
            .shared
            .as_ref()
            .is_none_or(|shared| !shared.is_cut_off(self.pulled));
        !self.input_done
            && self.failed_at.is_none()
            && wanted
            && self.in_flight < most_in_flight
            && self.pulled - self.yielded < self.window()
            && budget_allows
    }

    /// Pulls the items of the next call: at least one, at most `most`, only
    /// what the input has ready.
    fn pull<T, St: Stream<Item = T>>(
        &mut self,
        mut input: Pin<&mut Option<St>>,
        cx: &mut Context<'_>,
        most: usize,
    ) -> Option<Batch<T>> {
        let mut next = || match input.as_mut().as_pin_mut()?.poll_next(cx) {
            Poll::Ready(Some(item)) => Some(item),
            Poll::Ready(None) => {
                self.input_done = true;
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
    fn start<T, R: Spawn<T, Output = U>>(
        &mut self,
        runner: &mut R,
        first: usize,
        items: Batch<T>,
        is_failure: IsFailure<U>,
    ) -> Running<U> {
        // Blocking calls share their progress for the engine to time out an
        // item that hangs; an async call keeps its own deadline.
        let progress = self
            .options
            .timeout
            .filter(|_| R::BATCHES)
            .map(|timeout| Progress::new(first, timeout));
        let steal_after = self.sizer.steal_after(items.len());
        let shared = Arc::clone(self.shared());
        let call = Call::new(first, shared, progress.clone(), steal_after);
        let runtime = self.runtime.get_or_insert_with(Handle::current);
        runner.spawn(runtime, items, call, is_failure);
        self.in_flight += 1;
        Running {
            progress,
            deadline: None,
        }
    }

    fn is_drained(&self) -> bool {
        self.input_done && self.calls.is_empty()
    }

    /// Ends the map: nothing more starts, running async calls are aborted,
    /// queued calls and the input are dropped, in that order.
    fn finish<St: Stream, R: Spawn<St::Item>>(
        &mut self,
        mut input: Pin<&mut Option<St>>,
        runner: &mut R,
    ) {
        self.finished = true;
        if let Some(shared) = &self.shared {
            shared.end();
        }
        self.calls.clear();
        self.deadlines.clear();
        self.cancelled = None;
        self.token_watch = None;
        runner.close();
        input.set(None);
    }

    /// Upper bound of the items still to come, if the input gives one.
    pub(crate) fn size_hint(&self, input: (usize, Option<usize>)) -> (usize, Option<usize>) {
        if self.finished {
            return (0, Some(0));
        }
        let pending = self.pulled - self.yielded;
        let upper = match self.failed_at {
            Some(index) => Some(match self.options.order {
                Order::Input => index + 1 - self.calls.lowest_owed(),
                Order::Completion => self.calls.ready_len(),
            }),
            None if self.input_done => Some(pending),
            None => {
                // A cancellation or a closed budget may add one error item
                // after an input that has ended unseen.
                let extra =
                    usize::from(self.options.token.is_some() || self.options.budget.is_some());
                input.1.and_then(|rest| rest.checked_add(pending + extra))
            }
        };
        // Any item still owed comes out as a value or as an error, but an
        // error ends the stream: one item is all that can be promised.
        let lower = usize::from(upper != Some(0) && (pending > 0 || input.0 > 0));
        (lower, upper)
    }

    pub(crate) fn progress(&self) -> (usize, usize, usize) {
        (self.pulled, self.yielded, self.in_flight)
    }
}

impl<U> Drop for Engine<U> {
    /// Dropping the stream cancels first: nothing starts any more, before
    /// the runner and the input (declared after the engine) are dropped.
    fn drop(&mut self) {
        if let Some(shared) = &self.shared {
            shared.end();
        }
        // The results not yielded go now, a panic of their `Drop` contained.
        self.calls.clear();
        if self.in_flight > 0 && !self.finished {
            trace::life!(
                "par_imap: dropped with calls in flight",
                in_flight = self.in_flight
            );
        }
    }
}
