//! One mapper call as the engine sees it: what the engine and its calls
//! share (the cutoff, the one "still wanted?" rule), the reports a call
//! makes, and the ticket that makes them exactly once.

use std::cell::Cell;
use std::collections::VecDeque;
use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};
use std::task::{Context, Poll};
use std::time::Duration;

use futures::task::AtomicWaker;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;

use crate::batch::{Batch, Results};
use crate::deadline::Progress;
use crate::engine::Retryable;
use crate::error::{Error, drop_contained, drop_each};
use crate::options::Order;
use crate::retry::Cut;
use crate::stats::Counters;

#[cfg(not(par_imap_loom))]
type Cutoff = std::sync::atomic::AtomicUsize;

/// The cutoff's cell under loom: a lock, so that a lowered cutoff is seen
/// at the next check. The memory model does not promise that to a relaxed
/// load (loom would let a call read the old cutoff for ever; no machine
/// does), and the engine's models (`engine/loom_model.rs`) ask what
/// happens when it comes down between two steps of a call.
#[cfg(par_imap_loom)]
#[derive(Debug)]
struct Cutoff(loom::sync::Mutex<usize>);

#[cfg(par_imap_loom)]
impl Cutoff {
    fn new(cutoff: usize) -> Self {
        Cutoff(loom::sync::Mutex::new(cutoff))
    }

    fn fetch_min(&self, index: usize, _: Ordering) -> usize {
        let mut cutoff = self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let before = *cutoff;
        *cutoff = before.min(index);
        before
    }

    fn load(&self, _: Ordering) -> usize {
        *self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// What the engine and its running calls share.
#[derive(Debug)]
pub(crate) struct Shared {
    /// Items at or above this index must not be mapped, and their results
    /// are no longer wanted. `usize::MAX` while the map runs normally.
    cutoff: Cutoff,
    order: Order,
    /// With `.keep_going()` a failure makes nothing else unwanted.
    keep_going: bool,
    /// Whether the caller gave a token: its watch (see [`is_cut_off`])
    /// lowers the cutoff, and async calls also watch `closed`.
    ///
    /// [`is_cut_off`]: Shared::is_cut_off
    has_token: bool,
    /// Cancelled when the map ends or is dropped: wakes calls waiting for a
    /// permit of the budget, so that an ended map leaves no waiting acquire.
    closed: CancellationToken,
    /// The shared budget: each call holds one permit while it runs.
    budget: Option<Arc<Semaphore>>,
    /// The per-item deadline; an async call keeps its own.
    timeout: Option<Duration>,
    /// `.adaptive_limit`: every call reads the clock, for its latency.
    timed: bool,
    counters: Arc<Counters>,
    /// `.retry`: the items kept for their next attempt, dropped at once
    /// when the cutoff falls below them.
    kept: Option<Weak<dyn Cut>>,
}

impl Shared {
    pub(crate) fn new(
        order: Order,
        keep_going: bool,
        has_token: bool,
        budget: Option<Arc<Semaphore>>,
        timeout: Option<Duration>,
        timed: bool,
        counters: Arc<Counters>,
    ) -> Arc<Self> {
        Arc::new(Shared {
            cutoff: Cutoff::new(usize::MAX),
            order,
            keep_going,
            has_token,
            closed: CancellationToken::new(),
            budget,
            timeout,
            timed,
            counters,
            kept: None,
        })
    }

    /// `.retry`: the store of kept items, to cut when the cutoff falls.
    pub(crate) fn with_kept(mut self: Arc<Self>, kept: Option<Weak<dyn Cut>>) -> Arc<Self> {
        if let Some(shared) = Arc::get_mut(&mut self) {
            shared.kept = kept;
        }
        self
    }

    /// Item `index` failed: nothing the failure makes unwanted may start.
    pub(crate) fn failed_at(&self, index: usize) {
        match (self.keep_going, self.order) {
            (true, _) => {}
            (false, Order::Input) => self.cancel_from(index),
            (false, Order::Completion) => self.cancel_from(0),
        }
    }

    /// Cancel every item from `index` on. Relaxed: the cutoff orders no
    /// other memory; a call that reads a stale value maps one item more,
    /// whose result the engine drops.
    pub(crate) fn cancel_from(&self, index: usize) {
        let before = self.cutoff.fetch_min(index, Ordering::Relaxed);
        // Only when it falls: at most a few times per map.
        if index < before {
            if let Some(kept) = self.kept.as_ref().and_then(Weak::upgrade) {
                kept.cut_from(index);
            }
        }
    }

    /// The map ended or was dropped: nothing may start, and calls waiting
    /// for a permit give up.
    pub(crate) fn close(&self) {
        self.cancel_from(0);
        self.closed.cancel();
    }

    /// The one "still wanted?" rule, asked before every item of every call:
    /// whether item `index` is no longer wanted. The cutoff is lowered by a
    /// failure, by the end or drop of the map, and by the caller's token:
    /// the map registers a waker on it at its first poll, which lowers the
    /// cutoff inside `cancel()`, polled or not, before `cancel()` returns.
    /// An item's own deadline runs only once it started.
    /// One relaxed load: cheap enough for every item of a batch.
    pub(crate) fn is_cut_off(&self, index: usize) -> bool {
        index >= self.cutoff.load(Ordering::Relaxed)
    }

    /// The lowest index no longer wanted (`usize::MAX` while every item is).
    pub(crate) fn cutoff(&self) -> usize {
        self.cutoff.load(Ordering::Relaxed)
    }

    /// Whether the caller gave a token (async calls then watch `closed`).
    pub(crate) fn has_token(&self) -> bool {
        self.has_token
    }

    pub(crate) fn budget(&self) -> Option<&Arc<Semaphore>> {
        self.budget.as_ref()
    }

    pub(crate) fn timeout(&self) -> Option<Duration> {
        self.timeout
    }

    pub(crate) fn closed(&self) -> &CancellationToken {
        &self.closed
    }
}

/// What a call tells the engine.
#[derive(Debug)]
pub enum Event<U> {
    /// The call's first item started (sent only when items have deadlines).
    /// Calls are named by their first item's index.
    Started { call: usize },
    /// The call ended: `results` are for its items from `first` on (the
    /// results the engine did not already take, see [`Progress`]).
    Finished {
        call: usize,
        first: usize,
        results: Results<U>,
        /// How many items the call mapped, in how long: for batch sizing.
        mapped: usize,
        busy: Duration,
        /// `.retry`: what the policy said of its failed item, if the call
        /// asked (so the user's predicate sees each failure once), or the
        /// panic of the predicate. Boxed: rare, and the report is moved a
        /// few times.
        accepted: Option<Box<Verdict>>,
    },
    /// An idle worker took from the running `call` (see
    /// [`steal`](crate::steal)) its `results` so far, from index `done` on
    /// (with deadlines they are in the call's progress, for the engine to
    /// take), and, with `at`, its items from `at` on: they are the call
    /// `at` now, with its own progress when items have deadlines. Sent
    /// before the thief's call starts and before the owner's next report.
    Stolen {
        call: usize,
        done: usize,
        results: Results<U>,
        at: Option<usize>,
        progress: Option<Arc<Progress<U>>>,
    },
    /// The call never ran: it was no longer wanted when it came to run. A
    /// failure at a lower index, or the end of the map, explains it: the
    /// engine has seen it or its report is on its way.
    Skipped { call: usize },
}

/// The ticket of one mapper call over the items `first..`: it makes the
/// call's report exactly once. An async call returns its report from its
/// task (the engine reads it through the task's join handle, which also
/// tells of a task aborted or torn down with its runtime); a blocking call
/// sends it on its runner's channel ([`report_to`](Call::report_to)), and a
/// blocking call dropped before it finished (never run, or its worker torn
/// down) sends itself cancelled, so the engine never waits for a report that
/// cannot come. It holds the call's permit of the shared budget once it has
/// one, released when the call really ends.
#[derive(Debug)]
pub struct Call<U> {
    first: usize,
    shared: Arc<Shared>,
    /// Where the call reports.
    report: Option<ReportTo<U>>,
    /// Its busy time sizes the next calls (blocking calls).
    sizes: bool,
    /// The report was made: dropping the ticket says nothing more.
    reported: bool,
    progress: Option<Arc<Progress<U>>>,
    /// Whether the mapper started.
    started: bool,
    /// When the mapper started, if the busy time is wanted (by `Stats`, or
    /// by the sizer of blocking calls): async calls read no clock otherwise.
    started_at: Option<std::time::Instant>,
    /// With `.adaptive_limit`: when the call held its permit and started, on
    /// the runtime's clock (so that paused time is seen as the runtime sees
    /// it).
    latency_from: Option<tokio::time::Instant>,
    /// The busy time counts in `Stats` (`.stats()` was called before the
    /// call started).
    counts_busy: bool,
    permit: Option<OwnedSemaphorePermit>,
    /// A call of several items: after running this long, idle workers may
    /// take the items it has not started.
    steal_after: Duration,
    /// `.retry` only, boxed: the ticket is moved a few times per call, and
    /// most maps have no `.retry`.
    retry: Option<Box<Attempt<U>>>,
}

/// `.retry`: which attempt of its item a call is, whether the item may be
/// tried again, and what the policy said of its failure.
#[derive(Debug)]
struct Attempt<U> {
    /// 1 for the first.
    number: u32,
    /// Its item may be tried again, so a failure that the policy retries
    /// does not cut the map off here; the engine decides when the report
    /// comes.
    may_retry: Option<Retryable<U>>,
    /// What `may_retry` said of the call's failed item.
    accepted: Said,
}

impl<U> Call<U> {
    pub(crate) fn new(
        first: usize,
        shared: Arc<Shared>,
        progress: Option<Arc<Progress<U>>>,
        steal_after: Duration,
    ) -> Self {
        Call {
            first,
            shared,
            report: None,
            sizes: false,
            reported: false,
            progress,
            started: false,
            started_at: None,
            latency_from: None,
            counts_busy: false,
            permit: None,
            steal_after,
            retry: None,
        }
    }

    /// Which attempt of its item the call is (1 without `.retry`).
    pub(crate) fn attempt_number(&self) -> u32 {
        self.retry.as_ref().map_or(1, |retry| retry.number)
    }

    /// `.retry`: the call is attempt `attempt` of its item, and the item
    /// may be tried again after a failure that `may_retry` accepts.
    pub(crate) fn attempt(&mut self, attempt: u32, may_retry: Option<Retryable<U>>) {
        self.retry = Some(Box::new(Attempt {
            number: attempt,
            may_retry,
            accepted: Said(Cell::new(None)),
        }));
    }

    /// Whether `.retry` may try the call's item again.
    pub(crate) fn may_retry(&self) -> bool {
        self.retry
            .as_ref()
            .is_some_and(|retry| retry.may_retry.is_some())
    }

    /// Whether the failed `result` cuts the map off now: unless `.retry`
    /// will try it again (a panic of the predicate: it does not).
    pub(crate) fn cuts_off(&self, result: &Result<U, Error>) -> bool {
        let Some(retry) = self.retry.as_deref() else {
            return true;
        };
        let Some(retryable) = &retry.may_retry else {
            return true;
        };
        // A panic of the predicate: not retried; the engine asks again and
        // makes it the item's panic error.
        let verdict = retryable.accepts(result);
        let retries = verdict.as_ref().is_ok_and(|accepted| *accepted);
        // Kept for the engine, the panic too: it is the item's panic error,
        // and the predicate is not asked again.
        retry.accepted.0.set(Some(verdict));
        !retries
    }

    /// What [`cuts_off`](Self::cuts_off) said no longer stands: the result
    /// it judged became a timeout, or was dropped (the engine gave the item
    /// up), and the engine judges the item.
    pub(crate) fn forget_verdict(&self) {
        if let Some(retry) = &self.retry {
            retry.accepted.0.set(None);
        }
    }

    /// The call reports on `report`, also when dropped unfinished; with
    /// `sizes`, its busy time is measured for the sizer (blocking calls).
    pub(crate) fn report_to(&mut self, report: ReportTo<U>, sizes: bool) {
        self.report = Some(report);
        self.sizes = sizes;
    }

    /// How long the call runs before idle workers may take its items.
    pub(crate) fn steal_after(&self) -> Duration {
        self.steal_after
    }

    pub(crate) fn first(&self) -> usize {
        self.first
    }

    pub(crate) fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }

    pub(crate) fn progress(&self) -> Option<&Progress<U>> {
        self.progress.as_deref()
    }

    /// The shared progress, for `is_cancelled()` on the worker's thread.
    pub(crate) fn progress_handle(&self) -> Option<&Arc<Progress<U>>> {
        self.progress.as_ref()
    }

    /// Whether item `index` is no longer wanted.
    pub(crate) fn is_cut_off(&self, index: usize) -> bool {
        self.shared.is_cut_off(index)
    }

    /// Whether the call should not start at all: the still-wanted rule for
    /// its first item.
    pub(crate) fn is_unwanted(&self) -> bool {
        self.shared.is_cut_off(self.first)
    }

    /// Keeps the budget's permit until the call ends.
    pub(crate) fn hold(&mut self, permit: OwnedSemaphorePermit) {
        self.permit = Some(permit);
    }

    /// Whether the call holds its permit already (a thief's call takes it
    /// before it steals).
    pub(crate) fn holds_permit(&self) -> bool {
        self.permit.is_some()
    }

    /// Item `index` of this call failed. Set at once, from the worker, so a
    /// call queued behind this one does not start before the engine hears.
    pub(crate) fn failed_at(&self, index: usize) {
        self.shared.failed_at(index);
    }

    /// Marks the moment the mapper starts: busy time counts from here, and
    /// the engine hears of it when items have deadlines.
    pub(crate) fn start(&mut self) {
        self.shared.counters.call_started();
        if self.attempt_number() > 1 {
            self.shared.counters.retried();
        }
        self.started = true;
        self.counts_busy = self.shared.counters.is_timing();
        // A blocking call's busy time also sizes the next calls.
        if self.counts_busy || self.sizes {
            self.started_at = Some(std::time::Instant::now());
        }
        if self.shared.timed {
            self.latency_from = Some(tokio::time::Instant::now());
        }
        if let Some(progress) = &self.progress {
            progress.begin(self.first);
            if let Some(report) = &self.report {
                report.send(Event::Started { call: self.first });
            }
        }
    }

    /// The call ended: `results` are its results from `first` on, unless
    /// they went through the progress, which then holds what is left.
    pub(crate) fn finish(&mut self, results: Vec<Result<U, Error>>, mapped: usize) -> Event<U> {
        self.report(self.first, Batch::Many(results), mapped)
    }

    /// The call ended: `results` are its results from item `first` on (a
    /// thief delivered those before), unless they went through the progress.
    pub(crate) fn finish_from(
        &mut self,
        first: usize,
        results: Vec<Result<U, Error>>,
        mapped: usize,
    ) -> Event<U> {
        self.report(first, Batch::Many(results), mapped)
    }

    /// The call of one item ended, without a batch's allocation.
    pub(crate) fn finish_one(&mut self, result: Result<U, Error>) -> Event<U> {
        self.report(self.first, Batch::One(result), 1)
    }

    /// The call unwound outside its mapper before it reported (a value's
    /// `Drop` panicked): its item's panic error.
    pub(crate) fn unwound(&mut self, payload: Box<dyn std::any::Any + Send>) -> Event<U> {
        debug_assert!(!self.reported, "par_imap: a call unwound after its report");
        self.report(
            self.first,
            Batch::One(Err(Error::panic(self.first, payload))),
            0,
        )
    }

    /// The call will not run: it is no longer wanted. Not a failure.
    pub(crate) fn skip(&mut self) -> Event<U> {
        self.count_end(0);
        Event::Skipped { call: self.first }
    }

    /// Sends the call's report on its channel. The engine is gone when this
    /// fails: the report is dropped here, a panic of its values' `Drop`
    /// contained.
    pub(crate) fn send(self, event: Event<U>) {
        self.send_from(event, None);
    }

    /// As [`send`](Self::send), from the async worker `from`: the report
    /// also tells the runner that the worker is free for the next call.
    pub(crate) fn send_from(mut self, event: Event<U>, from: Option<WorkerId>) {
        if let Some(report) = self.report.take() {
            report.send_from(event, from);
        }
    }

    /// Counts the call as ended and makes its report. With a progress, the
    /// results not taken by the engine come from there: `results` is then
    /// empty.
    fn report(&mut self, first: usize, results: Results<U>, mapped: usize) -> Event<U> {
        let (first, results) = match &self.progress {
            Some(progress) if results.len() == 0 => {
                let (first, taken) = progress.take();
                (first, Batch::Many(taken))
            }
            _ => (first, results),
        };
        let busy = self.count_end(mapped);
        // What `.adaptive_limit` reads: the latency on the runtime's clock.
        let busy = self.latency_from.take().map_or(busy, |from| from.elapsed());
        Event::Finished {
            call: self.first,
            first,
            results,
            mapped,
            busy,
            accepted: self
                .retry
                .as_ref()
                .and_then(|retry| retry.accepted.0.take())
                .map(Box::new),
        }
    }

    /// The call ended having mapped `mapped` items: counted, its permit
    /// given back (before the engine hears, so that a call it starts next
    /// can take it). Returns how long the mapper ran.
    fn count_end(&mut self, mapped: usize) -> Duration {
        self.reported = true;
        self.permit = None;
        if !std::mem::take(&mut self.started) {
            return Duration::ZERO;
        }
        let busy = self
            .started_at
            .take()
            .map_or(Duration::ZERO, |started_at| started_at.elapsed());
        let counted = self.counts_busy.then_some(busy);
        self.shared.counters.call_completed(mapped, counted);
        busy
    }
}

impl<U> Event<U> {
    /// Drops a report nobody will take in, its results one by one: a panic
    /// of a result's `Drop` is contained.
    pub(crate) fn discard(self) {
        match self {
            Event::Finished { results, .. } => drop_each(results),
            Event::Stolen {
                results, progress, ..
            } => {
                drop_each(results);
                drop_contained(progress);
            }
            Event::Started { .. } | Event::Skipped { .. } => {}
        }
    }

    /// The report of call `call`, torn down before it ended: `error` for
    /// its item `first`, the first it had not reported.
    pub(crate) fn torn_down(call: usize, first: usize, error: Error) -> Self {
        Event::Finished {
            call,
            first,
            results: Batch::One(Err(error)),
            mapped: 0,
            busy: Duration::ZERO,
            accepted: None,
        }
    }
}

impl<U> Drop for Call<U> {
    /// A call dropped unfinished ends its start (`Stats`) and reports
    /// itself: cancelled when it never ran, was aborted, or its worker was
    /// torn down; a panic error of its item when the machinery unwound (a
    /// call that vanishes is not a runtime gone).
    fn drop(&mut self) {
        if self.reported {
            return;
        }
        let Some(report) = self.report.take() else {
            self.count_end(0);
            return;
        };
        let index = match &self.progress {
            Some(progress) => progress.take().0,
            None => self.first,
        };
        self.count_end(0);
        let error = if std::thread::panicking() {
            Error::panic(
                index,
                Box::new("par_imap: a call unwound outside its mapper"),
            )
        } else {
            Error::cancelled(index)
        };
        report.send(Event::torn_down(self.first, index, error));
    }
}

/// The channel on which a runner's calls report to the engine: a queue
/// under a lock, taken by the engine a batch at a time, and the engine's
/// waker, registered only when it is about to wait.
struct Channel<U> {
    queue: Mutex<Queue<U>>,
    /// Something is queued: the engine looks without taking the lock, which
    /// the calls reporting would otherwise contend for with every look.
    queued: AtomicBool,
    waker: AtomicWaker,
}

/// What `.retry`'s predicate said of a failure: whether it retries, or its
/// panic.
pub(crate) type Verdict = Result<bool, Box<dyn std::any::Any + Send>>;

/// What the call's worker learnt from the predicate, until it reports.
struct Said(Cell<Option<Verdict>>);

impl fmt::Debug for Said {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let verdict = self.0.take();
        let shown = match &verdict {
            None => "not asked",
            Some(Ok(true)) => "retries",
            Some(Ok(false)) => "does not retry",
            Some(Err(_)) => "panicked",
        };
        self.0.set(verdict);
        f.write_str(shown)
    }
}

/// An async worker's name: its place in its runner's list, and which of
/// the workers that held that place it is.
pub(crate) type WorkerId = (usize, u64);

/// A report, and the async worker that sent it when one did.
pub(crate) type Report<U> = (Event<U>, Option<WorkerId>);

struct Queue<U> {
    events: VecDeque<Report<U>>,
    /// The engine is gone: reports are dropped by their senders.
    closed: bool,
}

impl<U> Channel<U> {
    fn queue(&self) -> MutexGuard<'_, Queue<U>> {
        self.queue.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Where a call reports: the sending side of its runner's [`Reports`].
pub(crate) struct ReportTo<U>(Arc<Channel<U>>);

impl<U> Clone for ReportTo<U> {
    fn clone(&self) -> Self {
        ReportTo(Arc::clone(&self.0))
    }
}

impl<U> fmt::Debug for ReportTo<U> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ReportTo")
    }
}

impl<U> ReportTo<U> {
    /// Sends `event`; if the engine is gone, the event is dropped here
    /// without letting a panic of its values' `Drop` unwind.
    pub(crate) fn send(&self, event: Event<U>) {
        self.send_from(event, None);
    }

    /// As [`send`](Self::send), from the async worker `from`.
    pub(crate) fn send_from(&self, event: Event<U>, from: Option<WorkerId>) {
        {
            let mut queue = self.0.queue();
            if !queue.closed {
                queue.events.push_back((event, from));
                // Under the lock: the engine clears it as it takes the queue.
                self.0.queued.store(true, Ordering::Release);
                drop(queue);
                self.0.waker.wake();
                return;
            }
        }
        event.discard();
    }
}

/// The engine's side of the channel on which a runner's calls report.
pub(crate) struct Reports<U> {
    channel: Arc<Channel<U>>,
    sender: ReportTo<U>,
    /// Reports taken from the channel, not yet handed to the engine.
    taken: VecDeque<Report<U>>,
}

impl<U> fmt::Debug for Reports<U> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Reports")
            .field("taken", &self.taken.len())
            .finish()
    }
}

impl<U> Reports<U> {
    pub(crate) fn new() -> Self {
        let channel = Arc::new(Channel {
            queue: Mutex::new(Queue {
                events: VecDeque::new(),
                closed: false,
            }),
            queued: AtomicBool::new(false),
            waker: AtomicWaker::new(),
        });
        Reports {
            sender: ReportTo(Arc::clone(&channel)),
            channel,
            taken: VecDeque::new(),
        }
    }

    /// Where a call reports.
    pub(crate) fn sender(&self) -> &ReportTo<U> {
        &self.sender
    }

    /// The next report that came, if any.
    pub(crate) fn try_next(&mut self) -> Option<Report<U>> {
        if self.taken.is_empty() && self.channel.queued.load(Ordering::Acquire) {
            // All that came, in one go: the queue and the buffer swap.
            let mut queue = self.channel.queue();
            std::mem::swap(&mut queue.events, &mut self.taken);
            self.channel.queued.store(false, Ordering::Relaxed);
        }
        self.taken.pop_front()
    }

    /// The next report. Registering the waker costs more than the rest of
    /// a poll: only with `wait`, when the map is about to wait.
    pub(crate) fn poll(&mut self, cx: &mut Context<'_>, wait: bool) -> Poll<Report<U>> {
        if let Some(report) = self.try_next() {
            return Poll::Ready(report);
        }
        if !wait {
            return Poll::Pending;
        }
        self.channel.waker.register(cx.waker());
        match self.try_next() {
            Some(report) => Poll::Ready(report),
            None => Poll::Pending,
        }
    }

    /// No more reports: those still queued (outputs of calls that ended
    /// late) are dropped now, later ones by their senders; a panic of an
    /// output's `Drop` is contained.
    pub(crate) fn close(&mut self) {
        let queued = {
            let mut queue = self.channel.queue();
            queue.closed = true;
            std::mem::take(&mut queue.events)
        };
        for (event, _) in self.taken.drain(..).chain(queued) {
            event.discard();
        }
    }
}

impl<U> Drop for Reports<U> {
    fn drop(&mut self) {
        self.close();
    }
}

#[cfg(all(test, target_pointer_width = "64"))]
mod tests {
    use super::*;

    /// A call's ticket and its report are moved a few times per call (into
    /// a worker's mailbox and out, onto the report queue and off): what
    /// only `.retry` uses stays behind one pointer.
    #[test]
    fn a_ticket_and_a_report_keep_retry_state_behind_a_box() {
        assert!(size_of::<Call<u64>>() <= 112, "{}", size_of::<Call<u64>>());
        assert!(size_of::<Event<u64>>() <= 72, "{}", size_of::<Event<u64>>());
    }
}
