//! Blocking calls: the mapper, the job that maps one call's items on a
//! worker thread, the runner that feeds the [`workers`](crate::workers),
//! and the map's watch, which hands over what a running call finished, so
//! that it comes out even when no worker is idle to take it.

use std::fmt;
use std::future::Future;
use std::marker::PhantomData;
use std::panic::{self, AssertUnwindSafe};
use std::pin::pin;
use std::sync::{Arc, PoisonError};

#[cfg(par_imap_loom)]
use loom::sync::{Condvar, Mutex, MutexGuard};
#[cfg(not(par_imap_loom))]
use std::sync::{Condvar, Mutex, MutexGuard};
use std::task::{Context, Poll, Wake, Waker};
use std::thread::{self, Thread};
use std::time::{Duration, Instant};

use tokio::runtime::Handle;
use tokio::sync::{AcquireError, OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;

use crate::batch::Batch;
use crate::call::{Call, Event, ReportTo, Reports, Shared};
use crate::current::Current;
use crate::deadline::{Ended, GiveUp, Progress};
use crate::error::Error;
use crate::error::{drop_contained, drop_each};
use crate::spawn::{IsFailure, Spawn};
use crate::steal::Loot;
use crate::trace;
use crate::workers::{Job, Opening, Steal, Workers};

/// The function a blocking call applies to each of its items: a closure,
/// or a closure with per-worker state ([`WithInit`](crate::WithInit)).
pub trait Mapper<T>: Send + Sync + 'static {
    /// What one item maps to.
    type Output;

    /// Applies the mapper to one item.
    fn call(&self, item: T) -> Self::Output;
}

impl<T, F, U> Mapper<T> for F
where
    F: Fn(T) -> U + Send + Sync + 'static,
{
    type Output = U;

    fn call(&self, item: T) -> U {
        self(item)
    }
}

/// The runner of the blocking variants: at most `limit` long-lived
/// workers, and the channel on which their calls report. Dropping it
/// closes both (their own `Drop`s, in field order: the pool first).
pub struct BlockingRunner<T, F>
where
    T: Send + 'static,
    F: Mapper<T>,
    F::Output: Send + 'static,
{
    workers: Workers<BlockingJob<T, F>>,
    board: Arc<Board<T, F::Output>>,
    reports: Reports<F::Output>,
}

impl<T, F> BlockingRunner<T, F>
where
    T: Send + 'static,
    F: Mapper<T>,
    F::Output: Send + 'static,
{
    pub(crate) fn new(mapper: F, limit: usize) -> Self {
        let reports = Reports::new();
        let crew = Crew::new(mapper, reports.sender().clone());
        BlockingRunner {
            board: Arc::clone(&crew.board),
            workers: Workers::new(crew, limit),
            reports,
        }
    }
}

impl<T, F> Drop for BlockingRunner<T, F>
where
    T: Send + 'static,
    F: Mapper<T>,
    F::Output: Send + 'static,
{
    /// The watch leaves with the runner, even one never closed.
    fn drop(&mut self) {
        self.board.close();
    }
}

impl<T, F> fmt::Debug for BlockingRunner<T, F>
where
    T: Send + 'static,
    F: Mapper<T>,
    F::Output: Send + 'static,
{
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BlockingRunner")
            .field("workers", &self.workers)
            .finish()
    }
}

impl<T, F> Spawn<T> for BlockingRunner<T, F>
where
    T: Send + 'static,
    F: Mapper<T>,
    F::Output: Send + 'static,
{
    type Output = F::Output;
    const BATCHES: bool = true;

    fn spawn(
        &mut self,
        runtime: &Handle,
        items: Batch<T>,
        mut call: Call<F::Output>,
        is_failure: IsFailure<F::Output>,
    ) {
        call.report_to(self.reports.sender().clone(), true);
        let job = BlockingJob::new(items, call, is_failure);
        let shared = job.opens();
        // Where the map's watch will run (see `Board::list`).
        if shared && self.board.runtime.get().is_none() {
            let _ = self.board.runtime.set(runtime.clone());
        }
        let worker = self.workers.push(job);
        // Someone to take the items of a call of several should one hang.
        let thief = if shared {
            self.workers.add_thief()
        } else {
            None
        };
        for worker in worker.into_iter().chain(thief) {
            // A runtime shutting down drops the closure unrun: the worker
            // gives its place back and its jobs report themselves cancelled.
            runtime.spawn_blocking(move || worker.run());
        }
    }

    /// A blocking call cannot be aborted: it sees the cutoff (and
    /// `is_cancelled()`) and stops at its next item.
    fn abort_from(&mut self, _index: usize) {}

    fn poll_report(&mut self, cx: &mut Context<'_>, wait: bool) -> Poll<Event<F::Output>> {
        self.reports.poll(cx, wait).map(|(event, _)| event)
    }

    fn close(&mut self) {
        self.workers.close();
        self.board.close();
        self.reports.close();
    }
}

/// What the workers of one map share: the mapper, and the board of the
/// calls of several items running now.
pub(crate) struct Crew<T, F: Mapper<T>> {
    mapper: F,
    board: Arc<Board<T, F::Output>>,
}

/// The calls of several items running now, open to idle workers (work
/// stealing) and to the map's watch, and where a thief's call reports.
pub(crate) struct Board<T, U> {
    open: Mutex<OpenCalls<T, U>>,
    /// Where a thief's call reports.
    report: ReportTo<U>,
    watch: Mutex<Watch>,
    /// Signalled when a call opens while the watch sleeps, and on close.
    watched: Condvar,
    /// The runtime the watch runs on: the one the map's first call of
    /// several items was started on.
    runtime: std::sync::OnceLock<Handle>,
}

/// The state of the map's watch: a thread that, past a running call's
/// steal time, hands over the results it finished, so that they come out
/// even when no worker is idle to take them (`limit` 1, or every worker
/// inside an item that hangs); it takes them as an idle worker would, under
/// the call's lock, whichever comes first. It runs no user code and takes
/// no item, so it counts in no limit.
#[derive(Debug, Default)]
struct Watch {
    /// A watch thread exists (or is about to start).
    running: bool,
    /// It waits, with no call open, for one to open.
    asleep: bool,
    /// The map ended: the watch leaves.
    closed: bool,
}

/// The calls open to thieves.
type OpenCalls<T, U> = Vec<Arc<Open<T, U>>>;

/// How often the watch looks at the open calls while any is open. It
/// wakes on a core the workers need, so seldom: looking every 2 ms cost
/// ~1 % at ~1.6 µs items, this nothing measurable. A call's finished
/// results wait at most this long past its steal time for the watch.
const WATCH_EVERY: Duration = Duration::from_millis(10);

/// How long the watch waits, with no call open, before it gives its
/// thread back (as long as an idle worker's spell).
const WATCH_SPELL: Duration = Duration::from_millis(50);

/// A running call of several items, as a thief sees it: its items and what
/// a call over some of them needs.
struct Open<T, U> {
    call: usize,
    loot: Loot<T, Result<U, Error>>,
    shared: Arc<Shared>,
    is_failure: IsFailure<U>,
    steal_after: std::time::Duration,
    /// With deadlines, where the owner keeps its results.
    progress: Option<Arc<Progress<U>>>,
}

impl<T, U> Open<T, U> {
    /// Whether the owner's deadlines' progress holds results not taken.
    fn has_untaken(&self) -> bool {
        self.progress
            .as_ref()
            .is_some_and(|progress| progress.has_untaken())
    }

    /// Whether that progress holds results the engine was not told of yet
    /// (they count as told from now on).
    fn announces(&self) -> bool {
        self.progress
            .as_ref()
            .is_some_and(|progress| progress.announce())
    }
}

impl<T, F: Mapper<T>> Crew<T, F> {
    /// The crew of a map whose thieves' calls report on `report`.
    pub(crate) fn new(mapper: F, report: ReportTo<F::Output>) -> Self {
        Crew {
            mapper,
            board: Arc::new(Board {
                open: Mutex::new(Vec::new()),
                report,
                watch: Mutex::new(Watch::default()),
                watched: Condvar::new(),
                runtime: std::sync::OnceLock::new(),
            }),
        }
    }
}

impl<T, U> Board<T, U> {
    fn open(&self) -> MutexGuard<'_, OpenCalls<T, U>> {
        // Never held around user code.
        self.open.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn watch(&self) -> MutexGuard<'_, Watch> {
        // Never held around user code.
        self.watch.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The map ended: the watch leaves.
    fn close(&self) {
        self.watch().closed = true;
        self.watched.notify_all();
    }

    /// Takes from a running call past its steal time (the one with the
    /// most left): with `take_items`, the back half of the items it has not
    /// started, as a call of its own, and the results it finished,
    /// delivered at once; without, or with no item left, the results alone.
    /// Otherwise when to look again, if a call may be taken from later.
    fn take(&self, take_items: bool) -> Steal<(Vec<T>, Call<U>, IsFailure<U>)> {
        let now = Instant::now();
        let mut open: Vec<_> = self
            .open()
            .iter()
            .map(|open| {
                let (left, waiting) = open.loot.left();
                (left, waiting || open.has_untaken(), Arc::clone(open))
            })
            .filter(|(left, waiting, open)| {
                (*left > 0 || *waiting) && !open.shared.is_cut_off(open.loot.next_index())
            })
            .collect();
        // Most left first: the steal that moves the most work; then the
        // lowest call, whose results input order waits for first.
        open.sort_by_key(|(left, _, open)| (std::cmp::Reverse(*left), open.call));
        let mut soonest: Option<Instant> = None;
        for (left, _, open) in open {
            if open.loot.steal_at() > now {
                soonest =
                    Some(soonest.map_or(open.loot.steal_at(), |at| at.min(open.loot.steal_at())));
                continue;
            }
            let left = if take_items { left } else { 0 };
            // A thief's call holds its permit before it takes any item: with
            // none free it takes the results alone.
            let permit = match open.shared.budget() {
                Some(budget) if left > 0 => Arc::clone(budget).try_acquire_owned().ok(),
                _ => None,
            };
            let may_take = left > 0 && (permit.is_some() || open.shared.budget().is_none());
            let stolen = open.loot.steal(may_take, open.announces(), |taken| {
                let at = (taken.items > 0).then_some(taken.at);
                let progress = at.and_then(|at| {
                    let timeout = open.shared.timeout()?;
                    Some(Progress::new(at, timeout))
                });
                // With deadlines the owner's results are in its progress:
                // the engine takes them from there when it hears of this.
                self.report.send(Event::Stolen {
                    call: open.call,
                    done: taken.done,
                    results: Batch::Many(taken.results),
                    at,
                    progress: progress.clone(),
                });
                progress
            });
            let Some((at, items, progress)) = stolen else {
                continue;
            };
            if items.is_empty() {
                continue; // results only: delivered
            }
            let mut call = Call::new(at, Arc::clone(&open.shared), progress, open.steal_after);
            call.report_to(self.report.clone(), true);
            if let Some(permit) = permit {
                call.hold(permit);
            }
            trace::life!(
                "par_imap: items stolen",
                call = open.call,
                at = at,
                items = items.len()
            );
            return Steal::Job((items, call, open.is_failure));
        }
        soonest.map_or(Steal::Nothing, Steal::At)
    }
}

impl<T: Send + 'static, U: Send + 'static> Board<T, U> {
    /// Lists a call that opens, and wakes the watch if it sleeps, or
    /// starts it if there is none (the first call, or the watch left after
    /// an idle spell): a call is watched from the moment it can be taken
    /// from, however long it waited for its permit.
    fn list(self: &Arc<Self>, open: Arc<Open<T, U>>) {
        self.open().push(open);
        let mut watch = self.watch();
        if watch.asleep {
            self.watched.notify_one();
            return;
        }
        if watch.running || watch.closed {
            return;
        }
        let Some(runtime) = self.runtime.get() else {
            return; // a call run outside a runner (unit tests)
        };
        watch.running = true;
        drop(watch);
        let watching = Watching {
            board: Some(Arc::clone(self)),
        };
        // A runtime shutting down drops the closure unrun: `Watching`'s
        // `Drop` then lets the next call start another.
        runtime.spawn_blocking(move || watching.watch());
    }
}

/// The map's watch, about to run. Dropped unrun (the runtime shuts down)
/// or unwound, it marks the watch gone, so that the next call to open
/// starts another.
struct Watching<T, U> {
    board: Option<Arc<Board<T, U>>>,
}

impl<T, U> Watching<T, U> {
    /// Every [`WATCH_EVERY`] while a call is open, hands over the results
    /// of the calls past their steal time (never their items). With no
    /// call open it sleeps until one opens, and leaves after an idle spell
    /// or when the map ends.
    fn watch(mut self) {
        let Some(board) = self.board.clone() else {
            return;
        };
        loop {
            let _ = board.take(false);
            let mut watch = board.watch();
            if !watch.closed && !board.open().is_empty() {
                drop(
                    board
                        .watched
                        .wait_timeout(watch, WATCH_EVERY)
                        .unwrap_or_else(PoisonError::into_inner),
                );
                continue;
            }
            if !watch.closed {
                // Under the watch's lock: a call listed after this look
                // finds the watch asleep and wakes it.
                watch.asleep = true;
                let slept;
                (watch, slept) = board
                    .watched
                    .wait_timeout(watch, WATCH_SPELL)
                    .unwrap_or_else(PoisonError::into_inner);
                watch.asleep = false;
                let spell_over = slept.timed_out() && board.open().is_empty();
                if !(watch.closed || spell_over) {
                    continue;
                }
            }
            // Leaving, decided under the lock that `list` starts a watch
            // under: nothing for `Drop` to undo.
            watch.running = false;
            self.board = None;
            return;
        }
    }
}

impl<T, U> Drop for Watching<T, U> {
    fn drop(&mut self) {
        if let Some(board) = self.board.take() {
            board.watch().running = false;
        }
    }
}

/// A call open to thieves until dropped.
struct Listed<'a, T, F: Mapper<T>> {
    crew: &'a Crew<T, F>,
    open: Arc<Open<T, F::Output>>,
}

impl<T, F: Mapper<T>> Drop for Listed<'_, T, F> {
    fn drop(&mut self) {
        self.crew
            .board
            .open()
            .retain(|open| !Arc::ptr_eq(open, &self.open));
    }
}

/// One call on a worker: its items, its ticket, and what counts as a failure.
pub(crate) struct BlockingJob<T, F: Mapper<T>> {
    items: Batch<T>,
    call: Call<F::Output>,
    is_failure: IsFailure<F::Output>,
    mapper: PhantomData<fn() -> F>,
}

impl<T, F: Mapper<T>> BlockingJob<T, F> {
    pub(crate) fn new(
        items: Batch<T>,
        call: Call<F::Output>,
        is_failure: IsFailure<F::Output>,
    ) -> Self {
        BlockingJob {
            items,
            call,
            is_failure,
            mapper: PhantomData,
        }
    }
}

impl<T, F> Job for BlockingJob<T, F>
where
    T: Send + 'static,
    F: Mapper<T>,
    F::Output: Send + 'static,
{
    type Crew = Crew<T, F>;

    /// Maps the items in order, stopping at the first item the map no
    /// longer wants; the rest are dropped unmapped.
    fn run(self, crew: &Crew<T, F>, opening: Opening<'_>) {
        let BlockingJob {
            items,
            mut call,
            is_failure,
            ..
        } = self;
        let event = map_call(&mut call, items, crew, is_failure, opening);
        call.send(event);
    }

    /// Dropped unrun: its items one by one, a panic of their `Drop` contained.
    fn discard(self) {
        let BlockingJob { items, call, .. } = self;
        drop_each(items);
        drop(call);
    }

    /// A call of several items opens to thieves once it holds its permit.
    fn opens(&self) -> bool {
        self.items.len() > 1
    }

    /// Takes from a running call past its steal time (see [`Board::take`]).
    fn steal(crew: &Crew<T, F>) -> Steal<Self> {
        match crew.board.take(true) {
            Steal::Job((items, call, is_failure)) => {
                Steal::Job(BlockingJob::new(Batch::from_vec(items), call, is_failure))
            }
            Steal::At(at) => Steal::At(at),
            Steal::Nothing => Steal::Nothing,
        }
    }
}

/// Maps a call's items in order, asking before each item whether the map
/// still wants it (the rest are dropped unmapped); a call of several items
/// is open to idle workers while it runs, past its steal time. Returns the
/// call's report.
fn map_call<T, F: Mapper<T>>(
    call: &mut Call<F::Output>,
    items: Batch<T>,
    crew: &Crew<T, F>,
    is_failure: IsFailure<F::Output>,
    opening: Opening<'_>,
) -> Event<F::Output>
where
    T: Send + 'static,
    F::Output: Send + 'static,
{
    let first = call.first();
    if call.is_unwanted() {
        drop_each(items);
        return call.skip();
    }
    if let (Some(budget), false) = (call.shared().budget(), call.holds_permit()) {
        match wait_for_permit(budget, call.shared().closed()) {
            Some(Ok(permit)) => call.hold(permit),
            Some(Err(_closed)) => {
                drop_each(items);
                return call.finish_one(Err(Error::cancelled(first)));
            }
            None => {
                drop_each(items);
                return call.skip();
            }
        }
        if call.is_unwanted() {
            drop_each(items);
            return call.skip();
        }
    }
    call.start();
    let _span = trace::call_span(first, call.attempt_number()).entered();
    let current = Current::enter(call);
    let call_ref = &*call;
    let map_one = |index: usize, item: T| {
        // The item moves into the mapper: a panic of its `Drop` there is
        // this item's panic, like one of the mapper's.
        let result = panic::catch_unwind(AssertUnwindSafe(|| crew.mapper.call(item)))
            .map_err(|payload| Error::panic(index, payload));
        // With deadlines the result is judged as its progress takes it.
        if call_ref.progress().is_none() && is_failure(&result) && call_ref.cuts_off(&result) {
            call_ref.failed_at(index);
        }
        result
    };
    // With deadlines the result goes to the progress, which turns it into a
    // timeout if the item ran past its deadline, or drops it if the engine
    // gave the item up meanwhile. The result is judged first (the predicate
    // of `.retry` is user code, never asked under the progress's lock), and
    // the verdict stands only if the result was kept: an overrun is a
    // timeout, which cuts the map off unless `.retry` may try it (then the
    // engine judges it); an item given up is the engine's to decide. (A
    // late `Err` that `.retry` does not take, after the engine timed the
    // item out to retry it, cut the map off here, and the map hung.)
    let settle =
        |index: usize, result: Result<F::Output, Error>, progress: &Progress<F::Output>| {
            let cuts =
                !progress.is_given_up(index) && is_failure(&result) && call_ref.cuts_off(&result);
            match progress.end(index, result) {
                Ended::Kept if cuts => call_ref.failed_at(index),
                Ended::Kept => {}
                Ended::Overran => {
                    call_ref.forget_verdict();
                    if !call_ref.may_retry() {
                        call_ref.failed_at(index);
                    }
                }
                Ended::GivenUp => call_ref.forget_verdict(),
            }
        };
    let items = match items {
        Batch::One(item) => {
            let result = map_one(first, item);
            drop(current);
            return match call.progress() {
                Some(progress) => {
                    settle(first, result, progress);
                    call.finish(Vec::new(), 1)
                }
                None => call.finish_one(result),
            };
        }
        Batch::Many(items) => items,
    };
    let listed = Listed {
        crew,
        open: Arc::new(Open {
            call: first,
            loot: Loot::new(first, items, Instant::now() + call.steal_after()),
            shared: Arc::clone(call.shared()),
            is_failure,
            steal_after: call.steal_after(),
            progress: call.progress_handle().cloned(),
        }),
    };
    crew.board.list(Arc::clone(&listed.open));
    drop(opening);
    let loot = &listed.open.loot;
    let mut last = None;
    let mut mapped = 0;
    // `None`: the end of the call's items, or a thief took the rest.
    while let Some((index, item)) = loot.next(last.take()) {
        // The one "still wanted?" rule, before every item: a failure (here
        // or in another call), the token, the end of the map.
        if call.is_cut_off(index) {
            drop_contained(item);
            break;
        }
        current.item(index);
        if let (Some(progress), true) = (call.progress(), index > first) {
            progress.begin(index);
        }
        let result = map_one(index, item);
        mapped += 1;
        match call.progress() {
            Some(progress) => settle(index, result, progress),
            None => last = Some(result),
        }
    }
    drop(current);
    // Under the loot's lock, so that a thief's delivery comes first.
    let event = loot.finish(last, |done, results| {
        call.finish_from(done, results, mapped)
    });
    drop(listed);
    event
}

/// Waits on this worker thread for a permit of the budget, or for the map
/// to end (`None`). The wait is part of the call: a permit is taken only to
/// run the call at once, and given back when it ends.
fn wait_for_permit(
    budget: &Arc<Semaphore>,
    ended: &CancellationToken,
) -> Option<Result<OwnedSemaphorePermit, AcquireError>> {
    if let Ok(permit) = Arc::clone(budget).try_acquire_owned() {
        return Some(Ok(permit));
    }
    let mut acquire = pin!(Arc::clone(budget).acquire_owned());
    let mut ended = pin!(ended.cancelled());
    block_on(std::future::poll_fn(|cx| {
        if ended.as_mut().poll(cx).is_ready() {
            return Poll::Ready(None);
        }
        acquire.as_mut().poll(cx).map(Some)
    }))
}

/// Wakes the parked worker thread.
struct Unpark(Thread);

impl Wake for Unpark {
    fn wake(self: Arc<Self>) {
        self.0.unpark();
    }
}

/// Runs `future` on this thread, parking it while the future waits. For
/// futures that need no runtime driver (a semaphore, a token), so that it
/// works even while the runtime shuts down.
fn block_on<F: Future>(future: F) -> F::Output {
    let mut future = pin!(future);
    let waker = Waker::from(Arc::new(Unpark(thread::current())));
    let mut cx = Context::from_waker(&waker);
    loop {
        if let Poll::Ready(output) = future.as_mut().poll(&mut cx) {
            return output;
        }
        thread::park();
    }
}

#[cfg(all(test, not(par_imap_loom)))]
mod tests {
    use std::sync::mpsc as std_mpsc;
    use std::time::Duration;

    use super::*;
    use crate::options::Order;
    use crate::stats::Counters;

    type TestCrew = Arc<Crew<u32, Box<dyn Fn(u32) -> u32 + Send + Sync>>>;

    /// A crew whose mapper holds item 0 until `release` is sent; returns it,
    /// the channel that says item 0 started, and `release`.
    fn crew_with_a_hung_item_0() -> (TestCrew, std_mpsc::Receiver<()>, std_mpsc::Sender<()>) {
        let (started, on_start) = std_mpsc::channel();
        let (release, gate) = std_mpsc::channel::<()>();
        let gate = Mutex::new(Some(gate));
        let mapper = move |n: u32| {
            if n == 0 {
                let _ = started.send(());
                let gate = gate.lock().unwrap().take();
                gate.map(|gate| gate.recv());
            }
            n
        };
        // Reports nobody reads: the channel is closed at once.
        let report = Reports::new().sender().clone();
        (
            Arc::new(Crew::new(Box::new(mapper) as _, report)),
            on_start,
            release,
        )
    }

    fn shared() -> Arc<Shared> {
        Shared::new(
            Order::Input,
            false,
            false,
            None,
            None,
            false,
            Arc::new(Counters::default()),
        )
    }

    /// Runs a call over items `0..4` with `steal_after` on a thread of its
    /// own, and waits until item 0 (which hangs) started.
    fn run_hung_call(
        steal_after: Duration,
    ) -> (TestCrew, std_mpsc::Sender<()>, thread::JoinHandle<()>) {
        let (crew, on_start, release) = crew_with_a_hung_item_0();
        let call = Call::new(0, shared(), None, steal_after);
        let job = BlockingJob::new(Batch::from_vec(vec![0, 1, 2, 3]), call, Result::is_err);
        let owner = {
            let crew = Arc::clone(&crew);
            thread::spawn(move || job.run(&crew, Opening::none()))
        };
        on_start.recv().expect("item 0 started");
        (crew, release, owner)
    }

    /// An idle worker takes nothing from a call before its steal time
    /// (found by `cargo mutants`: a thief that stole at once, or a steal
    /// time in the past, passed every test), and says when to look again.
    #[test]
    fn a_call_is_not_stolen_from_before_its_steal_time() {
        let hour = Duration::from_secs(3600);
        let (crew, release, owner) = run_hung_call(hour);
        match BlockingJob::steal(&crew) {
            Steal::At(at) => assert!(
                at > Instant::now() + hour / 2,
                "look again at the steal time, an hour from now"
            ),
            Steal::Job(_) => panic!("stolen before its steal time"),
            Steal::Nothing => panic!("a running call with items left is not stealable later"),
        }
        release.send(()).unwrap();
        owner.join().unwrap();
    }

    /// Past its steal time the same call gives up the back half of what
    /// it has not started.
    #[test]
    fn a_call_past_its_steal_time_gives_up_the_back_half() {
        let (crew, release, owner) = run_hung_call(Duration::ZERO);
        match BlockingJob::steal(&crew) {
            Steal::Job(job) => {
                assert_eq!(job.call.first(), 2, "items 1..4 not started: the back 2");
                job.discard();
            }
            other => panic!(
                "nothing stolen past the steal time: {:?}",
                matches!(other, Steal::At(_))
            ),
        }
        release.send(()).unwrap();
        owner.join().unwrap();
    }
}
