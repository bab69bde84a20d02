//! One mapper call as the engine sees it: the cutoff that says which items
//! are still wanted, the ticket that reports a call's results exactly once,
//! the progress a call shares when items have deadlines, and
//! `is_cancelled()` for the blocking closure that runs it.
#![allow(unreachable_pub)]

use std::cell::RefCell;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use tokio::sync::mpsc::UnboundedSender;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::batch::{Batch, Results};
use crate::error::Error;
use crate::error::{drop_contained, drop_each};
use crate::stats::Counters;

/// Whether results come out in input or in completion order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Order {
    Input,
    Completion,
}

/// What the engine and its running calls share.
#[derive(Debug)]
pub(crate) struct Shared {
    /// Items at or above this index must not be mapped, and their results
    /// are no longer wanted. `usize::MAX` while the map runs normally.
    cutoff: AtomicUsize,
    order: Order,
    /// With `.keep_going()` a failure makes nothing else unwanted.
    keep_going: bool,
    /// The caller's cancellation token: `is_cancelled()` reads it directly,
    /// so a running call sees it without waiting for the consumer's poll.
    token: Option<CancellationToken>,
    /// Cancelled when the map ends or is dropped: wakes calls waiting for a
    /// permit of the budget, so that an ended map leaves no waiting acquire.
    closed: CancellationToken,
    /// The shared budget: each call holds one permit while it runs.
    budget: Option<Arc<Semaphore>>,
    /// The per-item deadline; an async call keeps its own.
    timeout: Option<Duration>,
    counters: Arc<Counters>,
}

impl Shared {
    pub(crate) fn new(
        order: Order,
        keep_going: bool,
        token: Option<CancellationToken>,
        budget: Option<Arc<Semaphore>>,
        timeout: Option<Duration>,
        counters: Arc<Counters>,
    ) -> Arc<Self> {
        Arc::new(Shared {
            cutoff: AtomicUsize::new(usize::MAX),
            order,
            keep_going,
            token,
            closed: CancellationToken::new(),
            budget,
            timeout,
            counters,
        })
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
        self.cutoff.fetch_min(index, Ordering::Relaxed);
    }

    /// The map ended or was dropped: nothing may start, and calls waiting
    /// for a permit give up.
    pub(crate) fn close(&self) {
        self.cancel_from(0);
        self.closed.cancel();
    }

    /// The one "still wanted?" rule, asked before every item of every call:
    /// whether item `index` is no longer wanted. The cutoff is lowered by a
    /// failure, by the end or drop of the map, and by the caller's token
    /// (a watch task of the map lowers it when the token is cancelled,
    /// polled or not); an item's own deadline runs only once it started.
    /// One relaxed load: cheap enough for every item of a batch.
    pub(crate) fn is_cut_off(&self, index: usize) -> bool {
        index >= self.cutoff.load(Ordering::Relaxed)
    }

    /// Whether the caller gave a token (async calls then watch `closed`).
    pub(crate) fn has_token(&self) -> bool {
        self.token.is_some()
    }

    /// Whether the caller's token was cancelled (takes its lock).
    pub(crate) fn is_token_cancelled(&self) -> bool {
        self.token
            .as_ref()
            .is_some_and(CancellationToken::is_cancelled)
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
    /// dropped if the engine gave up on it already. Returns whether it is
    /// a timeout the engine has yet to hear of.
    pub(crate) fn end(&self, index: usize, result: Result<U, Error>) -> bool {
        let mut state = self.lock();
        let overran = self.overran(&state, index);
        state.running = None;
        let dropped = if state.given_up == Some(index) {
            Some(result)
        } else if overran {
            state.results.push(Err(Error::timeout(index)));
            Some(result)
        } else {
            state.results.push(result);
            None
        };
        drop(state);
        // Outside the lock: the result's `Drop` is user code.
        drop_contained(dropped);
        overran
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

    /// Everything not taken yet, and the index of its first result.
    pub(crate) fn take(&self) -> (usize, Vec<Result<U, Error>>) {
        let mut state = self.lock();
        let first = state.untaken;
        state.untaken += state.results.len();
        (first, std::mem::take(&mut state.results))
    }
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
    /// Where a blocking call reports.
    report: Option<UnboundedSender<Event<U>>>,
    /// The report was made: dropping the ticket says nothing more.
    reported: bool,
    progress: Option<Arc<Progress<U>>>,
    /// Whether the mapper started.
    started: bool,
    /// When the mapper started, if the busy time is wanted (by `Stats`, or
    /// by the sizer of blocking calls): async calls read no clock otherwise.
    started_at: Option<std::time::Instant>,
    /// The busy time counts in `Stats` (`.stats()` was called before the
    /// call started).
    counts_busy: bool,
    permit: Option<OwnedSemaphorePermit>,
    /// A call of several items: after running this long, idle workers may
    /// take the items it has not started.
    steal_after: Duration,
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
            reported: false,
            progress,
            started: false,
            started_at: None,
            counts_busy: false,
            permit: None,
            steal_after,
        }
    }

    /// The call reports on `report` (blocking calls), also when dropped
    /// unfinished.
    pub(crate) fn report_to(&mut self, report: UnboundedSender<Event<U>>) {
        self.report = Some(report);
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

    /// Whether item `index` is no longer wanted.
    pub(crate) fn is_cut_off(&self, index: usize) -> bool {
        self.shared.is_cut_off(index)
    }

    /// Whether the call should not start at all.
    pub(crate) fn is_unwanted(&self) -> bool {
        self.shared.is_cut_off(self.first) || self.shared.is_token_cancelled()
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
        self.started = true;
        self.counts_busy = self.shared.counters.is_timing();
        // A blocking call's busy time also sizes the next calls.
        if self.counts_busy || self.report.is_some() {
            self.started_at = Some(std::time::Instant::now());
        }
        if let Some(progress) = &self.progress {
            progress.begin(self.first);
            if let Some(report) = &self.report {
                let _ = report.send(Event::Started { call: self.first });
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

    /// The call will not run: it is no longer wanted. Not a failure.
    pub(crate) fn skip(&mut self) -> Event<U> {
        self.count_end(0);
        Event::Skipped { call: self.first }
    }

    /// Sends the call's report on its channel. The engine is gone when this
    /// fails: the report is dropped here, a panic of its values' `Drop`
    /// contained.
    pub(crate) fn send(mut self, event: Event<U>) {
        if let Some(report) = self.report.take() {
            send(&report, event);
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
        Event::Finished {
            call: self.first,
            first,
            results,
            mapped,
            busy,
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
        }
    }
}

impl<U> Drop for Call<U> {
    /// A call dropped unfinished ends its start (`Stats`); a blocking one
    /// also reports itself: cancelled when it never ran or its worker was
    /// torn down, a panic error of its item when the machinery unwound (a
    /// call that vanishes is not a runtime gone). An async one's join
    /// handle tells.
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
        send(&report, Event::torn_down(self.first, index, error));
    }
}

/// Sends `event`; if the engine is gone, the event is dropped here without
/// letting a panic of its values' `Drop` unwind.
pub(crate) fn send<U>(report: &UnboundedSender<Event<U>>, event: Event<U>) {
    if let Err(unsent) = report.send(event) {
        unsent.0.discard();
    }
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

/// What [`is_cancelled`] reads on a worker thread.
struct OnThread {
    shared: Arc<Shared>,
    progress: Option<Arc<dyn GiveUp>>,
    index: usize,
}

thread_local! {
    /// The call a blocking worker runs on this thread, and its item.
    static CURRENT: RefCell<Option<OnThread>> = const { RefCell::new(None) };
}

/// Marks this thread as running a blocking call until dropped, even by a
/// panic. Set once per call; the item index is updated per item.
#[derive(Debug)]
pub(crate) struct Current;

impl Current {
    pub(crate) fn enter<U: Send + 'static>(call: &Call<U>) -> Current {
        let running = OnThread {
            shared: Arc::clone(&call.shared),
            progress: call
                .progress
                .as_ref()
                .map(|progress| Arc::clone(progress) as Arc<dyn GiveUp>),
            index: call.first,
        };
        CURRENT.with(|current| *current.borrow_mut() = Some(running));
        Current
    }

    /// The call moves on to item `index`.
    pub(crate) fn item(&self, index: usize) {
        CURRENT.with(|current| {
            if let Some(running) = current.borrow_mut().as_mut() {
                running.index = index;
            }
        });
    }
}

impl Drop for Current {
    fn drop(&mut self) {
        CURRENT.with(|current| current.borrow_mut().take());
    }
}

/// Inside a blocking mapper call, whether its result can no longer be used:
/// the map was dropped, failed at or before this item, was cancelled (the
/// token is read directly, so this turns true as soon as it is cancelled),
/// or this item timed out. `false` outside a blocking mapper call.
///
/// A running blocking closure cannot be pre-empted: tokio cannot abort
/// `spawn_blocking`. A long closure that polls `is_cancelled()` now and then
/// is the one way it can stop early and free its worker.
///
/// # Examples
///
/// ```
/// use std::time::Duration;
/// use futures::StreamExt;
/// use par_imap::ParImapExt;
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// let slow = futures::stream::iter([0]).par_imap(1, |_: u32| {
///     // Works until nobody wants the result any more.
///     let mut rounds = 0_u64;
///     while !par_imap::is_cancelled() {
///         std::thread::sleep(Duration::from_millis(1));
///         rounds += 1;
///     }
///     rounds
/// });
/// let timed_out = slow.timeout(Duration::from_millis(20)).next().await.unwrap();
/// assert!(timed_out.unwrap_err().is_timeout());
/// assert!(!par_imap::is_cancelled());
/// # }
/// ```
pub fn is_cancelled() -> bool {
    CURRENT.with(|current| {
        current.borrow().as_ref().is_some_and(|running| {
            running.shared.is_cut_off(running.index)
                || running.shared.is_token_cancelled()
                || running
                    .progress
                    .as_ref()
                    .is_some_and(|progress| progress.is_given_up(running.index))
        })
    })
}
