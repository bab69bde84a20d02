//! The one engine behind every variant: pulls input while the limit and the
//! window allow, starts calls through the variant's spawner, collects their
//! results from a channel, and yields them in input or completion order.
//!
//! A call maps one item, or with `.batch(k)` up to `k` consecutive items; the
//! engine tracks calls by the index of their first item.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, VecDeque};
use std::fmt;
use std::future::Future;
use std::marker::PhantomData;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use futures::stream::{FusedStream, Stream};
use pin_project_lite::pin_project;
use tokio::runtime::Handle;
use tokio::sync::mpsc::{self, UnboundedReceiver, UnboundedSender};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::{Instant, Sleep};
use tokio_util::sync::{CancellationToken, PollSemaphore, WaitForCancellationFutureOwned};
use tokio_util::task::AbortOnDropHandle;

use crate::Error;
use crate::call::{Batch, BatchIter, Call, Event, Results, Shared};
use crate::spawn::{Batching, Kind, Output, Runner, Spawn};
use crate::stats::Stats;
use crate::trace;

pin_project! {
    /// Stream returned by every method of [`ParImapExt`](crate::ParImapExt):
    /// the items of the input stream mapped in parallel.
    ///
    /// `K` names the variant (see [`kind`](crate::kind)). Builder methods
    /// such as [`window`](ParImap::window) configure it before the first poll.
    ///
    /// Dropping it cancels the map: no new mapper call starts, running async
    /// calls are aborted, and every value it holds is dropped.
    ///
    /// # Examples
    ///
    /// ```
    /// use futures::StreamExt;
    /// use par_imap::ParImapExt;
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() {
    /// let mut words = futures::stream::iter(["par", "imap"]).par_imap(2, str::to_uppercase);
    /// assert_eq!(words.next().await.unwrap().unwrap(), "PAR");
    /// // Dropping the stream here is all the clean-up there is.
    /// # }
    /// ```
    #[must_use = "streams do nothing unless polled"]
    pub struct ParImap<St, F, K>
    where
        St: Stream,
        K: Kind<St::Item, F>,
    {
        #[pin]
        input: St,
        runner: Runner<K, St::Item, F>,
        engine: Engine<Output<K, St::Item, F>>,
        kind: PhantomData<fn() -> K>,
    }
}

/// Whether results come out in input or in completion order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Order {
    Input,
    Completion,
}

/// A call whose items are pulled and not all yielded yet.
#[derive(Debug)]
enum Slot<U> {
    /// It runs (or waits for a worker); dropping the handle aborts an async call.
    Running(#[allow(dead_code)] Option<AbortOnDropHandle<()>>),
    /// Its results wait for their turn (input order only).
    Done(Drain<U>),
}

/// The results of one finished call, yielded one by one.
#[derive(Debug)]
struct Drain<U> {
    /// The index of the next result.
    next: usize,
    results: BatchIter<Result<U, Error>>,
}

impl<U> Drain<U> {
    fn new(first: usize, results: Results<U>) -> Self {
        Drain {
            next: first,
            results: results.into_iter(),
        }
    }
}

impl<U> Iterator for Drain<U> {
    type Item = Result<U, Error>;

    fn next(&mut self) -> Option<Result<U, Error>> {
        let result = self.results.next()?;
        self.next += 1;
        Some(result)
    }
}

/// Calls not yet fully yielded, by the index of their first item, in
/// increasing order. In input order they span at most the window; in
/// completion order only running calls stay, at most `limit` (or `2 * limit`
/// with queued blocking calls). A sorted deque beats a hash map at that size.
#[derive(Debug)]
struct Calls<U> {
    calls: VecDeque<(usize, Slot<U>)>,
}

impl<U> Calls<U> {
    fn position(&self, first: usize) -> Option<usize> {
        self.calls
            .binary_search_by_key(&first, |&(call, _)| call)
            .ok()
    }

    fn is_running(&self, first: usize) -> bool {
        self.position(first)
            .is_some_and(|at| matches!(self.calls[at].1, Slot::Running(_)))
    }

    /// Calls start in input order, so a new one goes last.
    fn push(&mut self, first: usize, slot: Slot<U>) {
        self.calls.push_back((first, slot));
    }

    /// Replacing a running slot aborts an async call (a timeout).
    fn set_done(&mut self, first: usize, drain: Drain<U>) {
        if let Some(at) = self.position(first) {
            self.calls[at].1 = Slot::Done(drain);
        }
    }

    fn remove(&mut self, first: usize) {
        if let Some(at) = self.position(first) {
            self.calls.remove(at);
        }
    }

    /// Drops (and so aborts) every call that starts after `index`.
    fn truncate_after(&mut self, index: usize) {
        let keep = self.calls.partition_point(|&(call, _)| call <= index);
        self.calls.truncate(keep);
    }

    /// The results of the call starting at `head`, once it has finished.
    fn pop_done(&mut self, head: usize) -> Option<Drain<U>> {
        match self.calls.front() {
            Some((first, Slot::Done(_))) if *first == head => match self.calls.pop_front() {
                Some((_, Slot::Done(drain))) => Some(drain),
                _ => None,
            },
            _ => None,
        }
    }

    fn lowest(&self) -> Option<usize> {
        self.calls.front().map(|&(first, _)| first)
    }

    fn is_empty(&self) -> bool {
        self.calls.is_empty()
    }

    fn clear(&mut self) {
        self.calls.clear();
    }
}

/// The engine's state, apart from the input and the runner.
struct Engine<U> {
    order: Order,
    limit: usize,
    /// Set by `.window`; otherwise `2 * limit * batch`.
    window: Option<usize>,
    batch: usize,
    /// Calls may wait in the runner's queue for a free worker, up to `limit`
    /// of them, so a worker finds its next call at once.
    queues: bool,
    timeout: Option<Duration>,
    /// Resolves when the caller's cancellation token is cancelled.
    cancelled: Option<Pin<Box<WaitForCancellationFutureOwned>>>,
    /// The shared budget, and the permit taken for the next call to start.
    budget: Option<PollSemaphore>,
    reserved: Option<OwnedSemaphorePermit>,
    /// Deadlines of running calls (by first index), earliest first, and the
    /// timer for it.
    deadlines: BinaryHeap<Reverse<(Instant, usize)>>,
    timer: Option<Pin<Box<Sleep>>>,
    runtime: Option<Handle>,
    shared: Arc<Shared>,
    _cancel_on_drop: CancelOnDrop,
    report: UnboundedSender<Event<U>>,
    events: UnboundedReceiver<Event<U>>,
    /// Calls not yet fully yielded.
    slots: Calls<U>,
    /// The results being yielded now.
    draining: Option<Drain<U>>,
    /// Completion order only: finished calls waiting to be yielded.
    ready: VecDeque<Drain<U>>,
    /// Input order only: the index of the next item to yield.
    head: usize,
    pulled: usize,
    yielded: usize,
    /// Calls started and not yet really ended (a timed-out blocking call
    /// still counts until it returns).
    in_flight: usize,
    input_done: bool,
    failed_at: Option<usize>,
    finished: bool,
}

/// Tells calls that have not started yet not to, when the stream is dropped.
struct CancelOnDrop(Arc<Shared>);

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        self.0.cancel_from(0);
        let in_flight = self.0.counters().in_flight();
        if in_flight > 0 {
            trace::life!(
                "par_imap: dropped with calls in flight",
                in_flight = in_flight
            );
        }
    }
}

impl<St, F, K> ParImap<St, F, K>
where
    St: Stream,
    K: Kind<St::Item, F>,
{
    #[track_caller]
    pub(crate) fn new(input: St, limit: usize, mapper: F, order: Order) -> Self {
        assert!(
            limit > 0,
            "par_imap: `limit` must be at least 1 (the most mapper calls running at once), got 0"
        );
        let shared = Shared::new(order == Order::Input);
        let (report, events) = mpsc::unbounded_channel();
        ParImap {
            input,
            runner: K::Spawner::runner(mapper, limit),
            engine: Engine {
                order,
                limit,
                window: None,
                batch: 1,
                queues: <K::Spawner as Spawn<St::Item, F>>::QUEUES,
                timeout: None,
                cancelled: None,
                budget: None,
                reserved: None,
                deadlines: BinaryHeap::new(),
                timer: None,
                runtime: None,
                _cancel_on_drop: CancelOnDrop(Arc::clone(&shared)),
                shared,
                report,
                events,
                slots: Calls {
                    calls: VecDeque::new(),
                },
                draining: None,
                ready: VecDeque::new(),
                head: 0,
                pulled: 0,
                yielded: 0,
                in_flight: 0,
                input_done: false,
                failed_at: None,
                finished: false,
            },
            kind: PhantomData,
        }
    }

    /// Sets the window: at most `window` items pulled from the input and not
    /// yet yielded, whether their call is running or their result waits for
    /// its turn. The default is `2 * limit`, or `2 * limit * k` with
    /// [`batch(k)`](ParImap::batch).
    ///
    /// A wider window lets fast items run ahead of a slow one in input order
    /// (more memory, better throughput under skew); `window == limit` lets no
    /// result wait while a worker could start the next item.
    ///
    /// # Panics
    ///
    /// Panics at the caller's line if `window < limit`.
    ///
    /// # Examples
    ///
    /// ```
    /// use futures::{stream, TryStreamExt};
    /// use par_imap::ParImapExt;
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), par_imap::Error> {
    /// let lengths: Vec<usize> = stream::iter(["a", "bb", "ccc"])
    ///     .par_imap(2, |s: &str| s.len())
    ///     .window(16)
    ///     .try_collect()
    ///     .await?;
    /// assert_eq!(lengths, [1, 2, 3]);
    /// # Ok(())
    /// # }
    /// ```
    #[track_caller]
    pub fn window(mut self, window: usize) -> Self {
        assert!(
            window >= self.engine.limit,
            "par_imap: `window` ({window}) must be at least `limit` ({})",
            self.engine.limit
        );
        self.engine.window = Some(window);
        self
    }

    /// Sets a per-item deadline, counted from the moment the item's mapper
    /// starts (time waiting for the limit or the window does not count).
    ///
    /// An item still running at its deadline fails with an [`Error`] for
    /// which [`is_timeout`](Error::is_timeout) is true, and the map fails
    /// fast as for any failure: in input order, items before it that are
    /// still running go on and are yielded first; unordered, the timeout is
    /// yielded at once.
    ///
    /// An async call is aborted at its deadline. A blocking call cannot be
    /// pre-empted: from its deadline on [`is_cancelled`](crate::is_cancelled)
    /// is true inside it, its output is dropped when it returns, and it
    /// counts against `limit` (and holds its [`semaphore`](ParImap::semaphore)
    /// permit) until it really ends.
    ///
    /// # Examples
    ///
    /// ```
    /// use std::time::Duration;
    /// use futures::StreamExt;
    /// use par_imap::ParImapExt;
    ///
    /// # #[tokio::main(flavor = "current_thread", start_paused = true)]
    /// # async fn main() {
    /// let results: Vec<_> = futures::stream::iter([1, 60, 2])
    ///     .par_imap_async(3, |secs| async move {
    ///         tokio::time::sleep(Duration::from_secs(secs)).await;
    ///         secs
    ///     })
    ///     .timeout(Duration::from_secs(10))
    ///     .collect()
    ///     .await;
    /// assert_eq!(*results[0].as_ref().unwrap(), 1);
    /// assert!(results[1].as_ref().unwrap_err().is_timeout());
    /// assert_eq!(results.len(), 2);
    /// # }
    /// ```
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.engine.timeout = Some(timeout);
        self
    }

    /// Cancels the whole map when `token` is cancelled: running async calls
    /// are aborted, no call starts, and the stream yields one [`Error`] for
    /// which [`is_cancelled`](Error::is_cancelled) is true, at the lowest
    /// index not yet yielded, then ends. Results computed but not yet yielded
    /// are dropped; a failure waiting for its turn gives way to the
    /// cancellation. If everything was already yielded, the stream just ends.
    ///
    /// The map only watches the token: dropping the stream never cancels it.
    /// Pass a [`child_token`](CancellationToken::child_token) to cancel one
    /// map among several.
    ///
    /// # Examples
    ///
    /// ```
    /// use futures::StreamExt;
    /// use par_imap::ParImapExt;
    /// use tokio_util::sync::CancellationToken;
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() {
    /// let shutdown = CancellationToken::new();
    /// let mut results = futures::stream::iter(0..)
    ///     .par_imap_async(2, |n: u64| async move { n })
    ///     .cancel_token(shutdown.child_token());
    /// assert_eq!(results.next().await.unwrap().unwrap(), 0);
    /// shutdown.cancel();
    /// let error = results.next().await.unwrap().unwrap_err();
    /// assert!(error.is_cancelled());
    /// assert_eq!(error.index(), 1);
    /// assert!(results.next().await.is_none());
    /// # }
    /// ```
    pub fn cancel_token(mut self, token: CancellationToken) -> Self {
        self.engine.cancelled = Some(Box::pin(token.cancelled_owned()));
        self
    }

    /// Makes every mapper call also hold one permit of `semaphore`, so that
    /// several maps, or a map and other work, share one concurrency budget.
    ///
    /// The permit is taken before the input item is pulled, so a map waiting
    /// for the budget does not hoard input; it is not held while the input
    /// has nothing to give; and it is released when the call really ends. If
    /// the semaphore is closed, the map fails at the item that could not
    /// start with an [`Error`] for which [`is_cancelled`](Error::is_cancelled)
    /// is true.
    ///
    /// # Examples
    ///
    /// ```
    /// use std::sync::Arc;
    /// use futures::{stream, TryStreamExt};
    /// use par_imap::ParImapExt;
    /// use tokio::sync::Semaphore;
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), par_imap::Error> {
    /// // One CPU budget for every pipeline of the service.
    /// let cpu = Arc::new(Semaphore::new(2));
    /// let squares = stream::iter(0..10_u64).par_imap(2, |n| n * n).semaphore(cpu.clone());
    /// let cubes = stream::iter(0..10_u64).par_imap(2, |n| n * n * n).semaphore(cpu);
    /// let (squares, cubes): (Vec<u64>, Vec<u64>) =
    ///     futures::try_join!(squares.try_collect(), cubes.try_collect())?;
    /// assert_eq!((squares[3], cubes[3]), (9, 27));
    /// # Ok(())
    /// # }
    /// ```
    pub fn semaphore(mut self, semaphore: Arc<Semaphore>) -> Self {
        self.engine.budget = Some(PollSemaphore::new(semaphore));
        self
    }

    /// A handle on this map's live counters, readable from any task while
    /// it runs and after: items pulled, calls started and completed, items
    /// failed and yielded, calls in flight, and the summed busy time of the
    /// calls. See [`Snapshot`](crate::Snapshot).
    ///
    /// # Examples
    ///
    /// ```
    /// use std::time::Duration;
    /// use futures::StreamExt;
    /// use par_imap::ParImapExt;
    ///
    /// # #[tokio::main(flavor = "current_thread", start_paused = true)]
    /// # async fn main() {
    /// let results = futures::stream::iter(0..8_u64).par_imap_async(2, |n| async move {
    ///     tokio::time::sleep(Duration::from_secs(1)).await;
    ///     n
    /// });
    /// let stats = results.stats();
    /// let progress = tokio::spawn(async move {
    ///     tokio::time::sleep(Duration::from_millis(2500)).await;
    ///     stats.snapshot()
    /// });
    /// let all: Vec<_> = results.collect().await;
    /// let midway = progress.await.unwrap();
    /// assert_eq!(all.len(), 8);
    /// assert_eq!((midway.completed, midway.in_flight), (4, 2));
    /// # }
    /// ```
    pub fn stats(&self) -> Stats {
        Stats {
            shared: Arc::clone(&self.engine.shared),
        }
    }
}

impl<St, F, K> ParImap<St, F, K>
where
    St: Stream,
    K: Kind<St::Item, F> + Batching,
{
    /// Lets one mapper call process up to `k` consecutive input items that
    /// are already available, to spread the cost of a call over several
    /// items when each is short. Blocking variants only.
    ///
    /// A batch never waits to fill up: a call takes what the input has ready
    /// (at least one item), so latency does not grow. Results stay per item,
    /// with every semantic intact: order, the exact index of a failure inside
    /// a batch (the items before it are delivered, the items after it are
    /// never mapped), fail-fast, drop. `limit` counts calls, so up to
    /// `limit * k` items may be in progress. Unless set with
    /// [`window`](ParImap::window), the window becomes `2 * limit * k`. With
    /// [`timeout`](ParImap::timeout), the deadline applies to a whole call,
    /// and a call that times out fails at its first item.
    ///
    /// The default is `k = 1`. Async calls map one item each, so async
    /// variants have no `batch`:
    ///
    /// ```compile_fail
    /// use par_imap::ParImapExt;
    /// let _ = futures::stream::iter([1]).par_imap_async(2, |n: i32| async move { n }).batch(4);
    /// ```
    ///
    /// # Panics
    ///
    /// Panics at the caller's line if `k` is 0.
    ///
    /// # Examples
    ///
    /// ```
    /// use futures::{stream, TryStreamExt};
    /// use par_imap::ParImapExt;
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), par_imap::Error> {
    /// // Sub-microsecond items: 256 of them per call.
    /// let sum = stream::iter(0..100_000_u64)
    ///     .par_imap(2, |n| n.wrapping_mul(n) % 7)
    ///     .batch(256)
    ///     .try_fold(0, |sum, r| async move { Ok(sum + r) })
    ///     .await?;
    /// assert_eq!(sum, (0..100_000_u64).map(|n| n.wrapping_mul(n) % 7).sum::<u64>());
    /// # Ok(())
    /// # }
    /// ```
    #[track_caller]
    pub fn batch(mut self, k: usize) -> Self {
        assert!(k > 0, "par_imap: `batch` must be at least 1, got 0");
        self.engine.batch = k;
        self
    }
}

impl<U> Engine<U> {
    fn window(&self) -> usize {
        self.window
            .unwrap_or_else(|| self.limit.saturating_mul(2).saturating_mul(self.batch))
    }

    /// External cancellation, checked before anything else: it wins.
    fn is_cancelled_from_outside(&mut self, cx: &mut Context<'_>) -> bool {
        self.cancelled
            .as_mut()
            .is_some_and(|cancelled| cancelled.as_mut().poll(cx).is_ready())
    }

    /// The lowest index not yet yielded.
    fn lowest_owed(&self) -> usize {
        match self.order {
            Order::Input => self.head,
            Order::Completion => self
                .slots
                .lowest()
                .into_iter()
                .chain(
                    self.draining
                        .iter()
                        .chain(&self.ready)
                        .map(|drain| drain.next),
                )
                .min()
                .unwrap_or(self.pulled),
        }
    }

    /// Takes in what calls report. A failure stops the map from pulling at
    /// once; in input order the items before it still run to be yielded.
    fn collect_events(&mut self, cx: &mut Context<'_>, is_failure: fn(&Result<U, Error>) -> bool) {
        while let Poll::Ready(Some(event)) = self.events.poll_recv(cx) {
            match event {
                Event::Started { first, at } => {
                    if let (Some(timeout), true) = (self.timeout, self.is_running(first)) {
                        self.deadlines.push(Reverse((at + timeout, first)));
                    }
                }
                Event::Skipped => {
                    // The failure that made it unwanted is on its way and
                    // drops its slot with the others after it.
                    self.in_flight -= 1;
                }
                Event::Finished { first, results } => {
                    self.in_flight -= 1;
                    // Otherwise the map no longer wants it (after a failure
                    // or a timeout): the results are dropped here.
                    if self.is_running(first) {
                        let failed = results.last().is_some_and(is_failure);
                        self.complete(first, results, failed);
                    }
                }
            }
        }
    }

    /// Fails the calls whose deadline has passed, and sets the timer for
    /// the next one.
    fn expire_deadlines(&mut self, cx: &mut Context<'_>) {
        while let Some(&Reverse((deadline, first))) = self.deadlines.peek() {
            if !self.is_running(first) {
                self.deadlines.pop();
            } else if deadline <= Instant::now() {
                self.deadlines.pop();
                self.complete(first, Batch::One(Err(Error::timeout(first))), true);
            } else {
                let timer = self
                    .timer
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
                if timer.deadline() != deadline {
                    timer.as_mut().reset(deadline);
                }
                if timer.as_mut().poll(cx).is_pending() {
                    return;
                }
            }
        }
    }

    fn is_running(&self, first: usize) -> bool {
        self.slots.is_running(first)
    }

    /// Records the results of the call over `first..`; a failure (always
    /// the last result) stops the map.
    fn complete(&mut self, first: usize, results: Results<U>, failed: bool) {
        let failure = first + results.len().saturating_sub(1);
        if failed {
            self.shared.counters().failed();
            trace::life!(
                "par_imap: failure observed",
                index = failure,
                kind = match results.last() {
                    Some(Err(error)) if error.is_panic() => "panic",
                    Some(Err(error)) if error.is_timeout() => "timeout",
                    Some(Err(error)) if error.is_cancelled() => "cancelled",
                    _ => "error",
                }
            );
        }
        let drain = Drain::new(first, results);
        match self.order {
            Order::Input => {
                self.slots.set_done(first, drain);
                if failed && self.failed_at.is_none_or(|earlier| failure < earlier) {
                    self.failed_at = Some(failure);
                    self.shared.failed_at(failure);
                    self.slots.truncate_after(failure);
                }
            }
            Order::Completion => {
                self.slots.remove(first);
                self.ready.push_back(drain);
                if failed {
                    self.failed_at = Some(failure);
                    self.shared.failed_at(failure);
                    self.slots.clear();
                }
            }
        }
    }

    fn can_start(&self) -> bool {
        let most_in_flight = if self.queues && self.budget.is_none() {
            // One call queued behind each running one: a worker never waits
            // for the consumer to hand it the next call.
            self.limit.saturating_mul(2)
        } else {
            self.limit
        };
        !self.input_done
            && self.failed_at.is_none()
            && self.in_flight < most_in_flight
            && self.pulled - self.yielded < self.window()
    }

    /// Takes a permit of the shared budget for the next call, if there is
    /// one. `Ready(false)`: the budget was closed, and the map failed.
    fn reserve_budget(&mut self, cx: &mut Context<'_>) -> Poll<bool> {
        let Some(budget) = &mut self.budget else {
            return Poll::Ready(true);
        };
        if self.reserved.is_none() {
            match budget.poll_acquire(cx) {
                Poll::Ready(Some(permit)) => self.reserved = Some(permit),
                Poll::Ready(None) => {
                    // No item was pulled: the failure takes the next index.
                    let index = self.pulled;
                    self.slots.push(index, Slot::Running(None));
                    self.complete(index, Batch::One(Err(Error::cancelled(index))), true);
                    return Poll::Ready(false);
                }
                Poll::Pending => return Poll::Pending,
            }
        }
        Poll::Ready(true)
    }

    /// Pulls the items of the next call: at least one, at most `batch`, only
    /// what the input has ready and the window has room for.
    fn pull<St: Stream>(
        &mut self,
        mut input: Pin<&mut St>,
        cx: &mut Context<'_>,
    ) -> Option<Batch<St::Item>> {
        let room = (self.window() - (self.pulled - self.yielded)).min(self.batch);
        let mut next = || match input.as_mut().poll_next(cx) {
            Poll::Ready(Some(item)) => Some(item),
            Poll::Ready(None) => {
                self.input_done = true;
                None
            }
            Poll::Pending => None,
        };
        let first = next()?;
        if room == 1 {
            return Some(Batch::One(first));
        }
        let mut items = Vec::with_capacity(room.min(1024));
        items.push(first);
        while items.len() < room {
            match next() {
                Some(item) => items.push(item),
                None => break,
            }
        }
        Some(Batch::Many(items))
    }

    fn start<T, F, K: Kind<T, F>>(&mut self, runner: &Runner<K, T, F>, items: Batch<T>)
    where
        K::Spawner: Spawn<T, F, Output = U>,
    {
        let first = self.pulled;
        let call = Call::new(
            first,
            Arc::clone(&self.shared),
            self.report.clone(),
            self.timeout.is_some(),
            self.reserved.take(),
        );
        self.pulled += items.len();
        self.shared.counters().pulled(items.len());
        let runtime = self.runtime.get_or_insert_with(Handle::current);
        let abort = K::Spawner::spawn(runner, runtime, items, call, K::is_failure);
        self.slots.push(first, Slot::Running(abort));
        self.in_flight += 1;
    }

    /// The next result to yield, if its turn has come.
    fn next_result(&mut self) -> Option<Result<U, Error>> {
        loop {
            if let Some(result) = self.draining.as_mut().and_then(Iterator::next) {
                self.head += 1;
                self.yielded += 1;
                self.shared.counters().yielded();
                return Some(result);
            }
            self.draining = Some(match self.order {
                Order::Input => self.slots.pop_done(self.head)?,
                Order::Completion => self.ready.pop_front()?,
            });
        }
    }

    fn is_drained(&self) -> bool {
        self.input_done
            && self.slots.is_empty()
            && self.ready.is_empty()
            && self
                .draining
                .as_ref()
                .is_none_or(|drain| drain.results.len() == 0)
    }

    /// Ends the map: nothing more starts, running async calls are aborted,
    /// and every held value is dropped.
    fn finish(&mut self) {
        self.finished = true;
        self.shared.cancel_from(0);
        self.slots.clear();
        self.draining = None;
        self.ready.clear();
        self.deadlines.clear();
        self.timer = None;
        self.reserved = None;
        self.cancelled = None;
    }
}

impl<St, F, K> Stream for ParImap<St, F, K>
where
    St: Stream,
    K: Kind<St::Item, F>,
{
    type Item = K::Item;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<K::Item>> {
        let mut this = self.project();
        let engine = this.engine;
        if engine.finished {
            return Poll::Ready(None);
        }

        // Cancellation from outside wins over anything still owed.
        if engine.is_cancelled_from_outside(cx) {
            let owed = (!engine.is_drained()).then(|| engine.lowest_owed());
            trace::life!("par_imap: cancelled", index = owed);
            engine.finish();
            return Poll::Ready(owed.map(|index| {
                engine.shared.counters().yielded();
                K::into_item(Err(Error::cancelled(index)))
            }));
        }

        // Take in what calls report, then deadlines, so a failure is seen
        // before pulling more.
        engine.collect_events(cx, K::is_failure);
        engine.expire_deadlines(cx);

        // Start calls while the limit, the window and the budget have room.
        while engine.can_start() {
            match engine.reserve_budget(cx) {
                Poll::Ready(true) => {}
                Poll::Ready(false) | Poll::Pending => break,
            }
            let Some(items) = engine.pull(this.input.as_mut(), cx) else {
                // Do not sit on a permit of the shared budget while the
                // input has nothing to give.
                engine.reserved = None;
                break;
            };
            engine.start::<St::Item, F, K>(this.runner, items);
        }

        // Yield the next result whose turn it is.
        if let Some(result) = engine.next_result() {
            if K::is_failure(&result) {
                engine.finish();
            }
            return Poll::Ready(Some(K::into_item(result)));
        }
        if engine.is_drained() {
            engine.finish();
            return Poll::Ready(None);
        }
        Poll::Pending
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        let engine = &self.engine;
        if engine.finished {
            return (0, Some(0));
        }
        let pending = engine.pulled - engine.yielded;
        let upper = match engine.failed_at {
            Some(index) => Some(match engine.order {
                Order::Input => index + 1 - engine.head,
                Order::Completion => engine
                    .draining
                    .iter()
                    .chain(&engine.ready)
                    .map(|drain| drain.results.len())
                    .sum(),
            }),
            None if engine.input_done => Some(pending),
            None => {
                // A cancellation or a closed budget may add one error item
                // after an input that has ended unseen.
                let extra = usize::from(engine.cancelled.is_some() || engine.budget.is_some());
                self.input
                    .size_hint()
                    .1
                    .and_then(|rest| rest.checked_add(pending + extra))
            }
        };
        // Any item still owed comes out as a value or as an error, but an
        // error ends the stream: one item is all that can be promised.
        let lower = usize::from(upper != Some(0) && (pending > 0 || self.input.size_hint().0 > 0));
        (lower, upper)
    }
}

impl<St, F, K> FusedStream for ParImap<St, F, K>
where
    St: Stream,
    K: Kind<St::Item, F>,
{
    fn is_terminated(&self) -> bool {
        self.engine.finished
    }
}

impl<St, F, K> fmt::Debug for ParImap<St, F, K>
where
    St: Stream + fmt::Debug,
    K: Kind<St::Item, F>,
{
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let engine = &self.engine;
        f.debug_struct("ParImap")
            .field("input", &self.input)
            .field("order", &engine.order)
            .field("limit", &engine.limit)
            .field("window", &engine.window())
            .field("batch", &engine.batch)
            .field("timeout", &engine.timeout)
            .field("pulled", &engine.pulled)
            .field("yielded", &engine.yielded)
            .field("in_flight", &engine.in_flight)
            .field("finished", &engine.finished)
            .finish_non_exhaustive()
    }
}
