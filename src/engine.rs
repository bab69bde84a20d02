//! The one engine behind every variant: pulls input while the limit and the
//! window allow, starts calls through the variant's runner, takes in what
//! the calls report, times out items, and hands results to the
//! [reorder buffer](crate::reorder), which yields them in input or in
//! completion order.
//!
//! A call maps one item, or several consecutive items (a batch); calls are
//! named by the index of their first item.
//!
//! The map's life is one [`Phase`], which only moves forward. The parts:
//! `setup.rs` takes the builder methods' settings, `start.rs` starts
//! calls, `reports.rs` takes in what they report, `timeouts.rs` gives up
//! items past their deadline; "is this item still
//! wanted?" is one rule, the cutoff in [`Shared`], asked by every call
//! before every item.
//!
//! An item's walk through a blocking map, seven hand-offs: (1) `pull` takes
//! it from the input into a call's items; (2) the runner queues the call
//! for the workers; (3) a worker takes the call and moves its items into
//! the call's [`Loot`](crate::steal::Loot); (4) the worker, or an idle
//! worker that stole it, takes it out and maps it; (5) its result goes back
//! into the loot; (6) it leaves the loot in the call's report (or a
//! thief's), on the runner's channel, to the engine, which completes the
//! call's slot in the [reorder buffer](crate::reorder) with it; (7) the
//! buffer hands it to the consumer. The buffer is touched once per result
//! on the way in and once on the way out.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, Wake, Waker};

use futures::Stream;
use tokio::runtime::Handle;
use tokio::time::Instant;
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};

use crate::call::Shared;
use crate::deadline::Deadlines;
use crate::deadline::Progress;
use crate::error::Error;
use crate::keys::{Input, Keys};
use crate::limit::Limiter;
use crate::options::Options;
use crate::options::Order;
use crate::reorder::Reorder;
use crate::sizer::Sizer;
use crate::spawn::{IsFailure, Spawn};
use crate::stats::Counters;
use crate::trace;

mod reports;
mod retries;
mod setup;
mod start;
mod timeouts;

#[cfg(all(test, not(par_imap_loom)))]
mod tests;

#[cfg(all(test, par_imap_loom))]
mod loom_model;

pub(crate) use retries::{Retryable, Retrying};

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
            self.shared.close();
        }
    }
}

/// The engine's hold on a running call.
#[derive(Debug)]
pub(crate) struct Running<U> {
    /// With a timeout: what the call shares about the item it runs.
    progress: Option<Arc<Progress<U>>>,
    deadline: Option<Instant>,
    /// `.retry`: its blocking item timed out and is tried again once the
    /// call has really returned.
    retry_on_return: bool,
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
    phase: Phase,
    /// Async calls from this index on are to be aborted: a failure made
    /// them unwanted.
    abort_from: Option<usize>,
    /// Results to hand out before phases 2 and 3 are looked at again.
    quick_yields: u8,
    /// With `.key_order`: the keys of the items in the window.
    keys: Option<Keys>,
    /// With `.adaptive_limit`: what moves the limit.
    limiter: Option<Limiter>,
    /// With `.retry`: which failures retry, and the items waiting.
    retry: Option<Retrying<U>>,
}

/// Where a map is in its life. It moves only forward, through the methods
/// of [`Engine`] named beside each phase.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Pulling input and starting calls.
    Pulling,
    /// The input ended (`pull`): the calls in flight finish.
    InputDone,
    /// Fail-fast (`failed`): item `at` failed; nothing is pulled or started
    /// any more, and in input order the results before it are still owed.
    Failed { at: usize },
    /// A call came back cancelled by something other than the map (its
    /// runtime shut down, the budget was closed): the map cancels at once.
    CancelledUnder,
    /// Ended (`finish`): nothing runs, nothing is held, `poll_next` returns
    /// `None` from now on.
    Ended,
}

impl<U> Engine<U> {
    /// `batches`: whether the runner takes several items per call.
    pub(crate) fn new(options: Options, batches: bool) -> Self {
        let counters = Arc::new(Counters::default());
        counters.limit(options.limit);
        Engine {
            calls: Reorder::new(options.order),
            sizer: Sizer::new(options.batch, batches),
            options,
            counters,
            shared: None,
            cancelled: None,
            token_watch: None,
            deadlines: Deadlines::default(),
            runtime: None,
            pulled: 0,
            yielded: 0,
            in_flight: 0,
            phase: Phase::Pulling,
            abort_from: None,
            quick_yields: 0,
            keys: None,
            limiter: None,
            retry: None,
        }
    }

    pub(crate) fn counters(&self) -> &Arc<Counters> {
        &self.counters
    }

    pub(crate) fn is_ended(&self) -> bool {
        self.phase == Phase::Ended
    }

    /// The failure that ends the map once it is yielded (fail-fast).
    fn failed_at(&self) -> Option<usize> {
        match self.phase {
            Phase::Failed { at } => Some(at),
            _ => None,
        }
    }

    fn shared(&mut self) -> &Arc<Shared> {
        let options = &self.options;
        let counters = &self.counters;
        let retry = &self.retry;
        self.shared.get_or_insert_with(|| {
            Shared::new(
                options.order,
                options.keep_going,
                options.token.is_some(),
                options.budget.clone(),
                options.timeout,
                options.adaptive.is_some(),
                Arc::clone(counters),
            )
            .with_kept(retry.as_ref().map(Retrying::kept))
        })
    }

    /// One poll of the map: the phases in order.
    pub(crate) fn poll_next<T, St, R>(
        &mut self,
        mut input: Pin<&mut Option<Input<St>>>,
        runner: &mut R,
        is_failure: IsFailure<U>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<U, Error>>>
    where
        St: Stream<Item = T>,
        R: Spawn<T, Output = U>,
    {
        if self.is_ended() {
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
            self.expire_deadlines(cx, is_failure);
            self.wake_retries(cx);
            if let Some(index) = self.abort_from.take() {
                runner.abort_from(index);
            }
            if self.phase == Phase::CancelledUnder {
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
                self.end_map(input, runner);
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
        if self.options.timeout.is_some() || self.retry.as_ref().is_some_and(Retrying::needs_timer)
        {
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
                self.shared().close();
            }
            self.token_watch = Some(watch);
        }
    }

    /// Counts `result` as yielded; a failure ends the map (fail-fast).
    fn hand_out<St: Stream, R: Spawn<St::Item>>(
        &mut self,
        result: Result<U, Error>,
        input: Pin<&mut Option<Input<St>>>,
        runner: &mut R,
        is_failure: IsFailure<U>,
    ) -> Result<U, Error> {
        self.yielded += 1;
        self.counters.yielded();
        if !self.options.keep_going && is_failure(&result) {
            self.end_map(input, runner);
        }
        result
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
        input: Pin<&mut Option<Input<St>>>,
        runner: &mut R,
    ) -> Option<Result<U, Error>> {
        let owed = (!self.is_drained()).then(|| self.calls.lowest_owed());
        trace::life!("par_imap: cancelled", index = owed);
        self.end_map(input, runner);
        owed.map(|index| {
            self.counters.yielded();
            Err(Error::cancelled(index))
        })
    }

    fn is_drained(&self) -> bool {
        self.phase == Phase::InputDone && self.calls.is_empty()
    }

    /// Ends the map: nothing more starts, running async calls are aborted,
    /// queued calls and the input are dropped, in that order.
    fn end_map<St: Stream, R: Spawn<St::Item>>(
        &mut self,
        input: Pin<&mut Option<Input<St>>>,
        runner: &mut R,
    ) {
        self.phase = Phase::Ended;
        if let Some(shared) = &self.shared {
            shared.close();
        }
        self.calls.clear();
        self.deadlines.clear();
        if let Some(keys) = &mut self.keys {
            keys.clear();
            self.counters.waiting(0);
        }
        if let Some(retry) = &mut self.retry {
            retry.clear();
        }
        self.cancelled = None;
        self.token_watch = None;
        runner.close();
        drop_input(input);
    }

    /// Upper bound of the items still to come, if the input gives one.
    pub(crate) fn size_hint(&self, input: (usize, Option<usize>)) -> (usize, Option<usize>) {
        if self.is_ended() {
            return (0, Some(0));
        }
        let pending = self.pulled - self.yielded;
        let upper = match self.failed_at() {
            Some(index) => Some(match self.options.order {
                Order::Input => index + 1 - self.calls.lowest_owed(),
                Order::Completion => self.calls.ready_len(),
            }),
            None if self.phase == Phase::InputDone => Some(pending),
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

/// Drops the map's input: the items it still holds, never pulled, are input
/// items too, and a panic of their `Drop` is contained.
pub(crate) fn drop_input<St: Stream>(input: Pin<&mut Option<Input<St>>>) {
    let mut input = input;
    let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| input.set(None)));
}

impl<U> Engine<U> {
    /// The map is dropped: nothing starts any more, and the results not
    /// yielded go. Before the runner and the input are dropped; again, at
    /// no cost, as the engine itself is dropped.
    pub(crate) fn cancel_on_drop(&mut self) {
        if let Some(shared) = &self.shared {
            shared.close();
        }
        // The results not yielded go now, a panic of their `Drop` contained.
        self.calls.clear();
        // Nothing waits for a key or an attempt any more.
        if self.keys.is_some() {
            self.counters.waiting(0);
        }
        if self.in_flight > 0 && !self.is_ended() {
            trace::life!(
                "par_imap: dropped with calls in flight",
                in_flight = self.in_flight
            );
        }
    }
}

impl<U> Drop for Engine<U> {
    /// Dropping the stream cancels first: nothing starts any more, before
    /// the runner and the input (declared after the engine) are dropped.
    fn drop(&mut self) {
        self.cancel_on_drop();
    }
}
