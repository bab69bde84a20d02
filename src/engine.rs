//! The one engine behind every variant: pulls input while the limit and the
//! window allow, starts calls through the variant's spawner, collects their
//! results from a channel, and yields them in input or completion order.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, VecDeque};
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
use crate::spawn::{Call, Event, Kind, Output, Shared, Spawn};

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
        mapper: Arc<F>,
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

/// A pulled item that has not been yielded yet.
#[derive(Debug)]
enum Slot<U> {
    /// Its call runs; dropping the handle aborts an async call.
    Running(#[allow(dead_code)] Option<AbortOnDropHandle<()>>),
    /// Its result waits for its turn (input order only).
    Done(Result<U, Error>),
}

/// The engine's state, apart from the input and the mapper.
struct Engine<U> {
    order: Order,
    limit: usize,
    window: usize,
    timeout: Option<Duration>,
    /// Resolves when the caller's cancellation token is cancelled.
    cancelled: Option<Pin<Box<WaitForCancellationFutureOwned>>>,
    /// The shared budget, and the permit taken for the next item to start.
    budget: Option<PollSemaphore>,
    reserved: Option<OwnedSemaphorePermit>,
    /// Deadlines of running calls, earliest first, and the timer for it.
    deadlines: BinaryHeap<Reverse<(Instant, usize)>>,
    timer: Option<Pin<Box<Sleep>>>,
    runtime: Option<Handle>,
    shared: Arc<Shared>,
    _cancel_on_drop: CancelOnDrop,
    report: UnboundedSender<Event<U>>,
    events: UnboundedReceiver<Event<U>>,
    /// Pulled and not yielded, by input index.
    slots: HashMap<usize, Slot<U>>,
    /// Completion order only: results ready to yield, with their index.
    ready: VecDeque<(usize, Result<U, Error>)>,
    /// Input order only: the index of the next item to yield.
    head: usize,
    pulled: usize,
    yielded: usize,
    /// Calls started and not yet really ended (a timed-out blocking call
    /// still counts until it returns).
    running: usize,
    input_done: bool,
    failed_at: Option<usize>,
    finished: bool,
}

/// Tells calls that have not started yet not to, when the stream is dropped.
struct CancelOnDrop(Arc<Shared>);

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        self.0.cancel_from(0);
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
        let shared = Shared::new();
        let (report, events) = mpsc::unbounded_channel();
        ParImap {
            input,
            mapper: Arc::new(mapper),
            engine: Engine {
                order,
                limit,
                window: limit.saturating_mul(2),
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
                slots: HashMap::new(),
                ready: VecDeque::new(),
                head: 0,
                pulled: 0,
                yielded: 0,
                running: 0,
                input_done: false,
                failed_at: None,
                finished: false,
            },
            kind: PhantomData,
        }
    }

    /// Sets the window: at most `window` items pulled from the input and not
    /// yet yielded, whether their call is running or their result waits for
    /// its turn. The default is `2 * limit`.
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
        self.engine.window = window;
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
}

impl<U> Engine<U> {
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
                .keys()
                .chain(self.ready.iter().map(|(index, _)| index))
                .copied()
                .min()
                .unwrap_or(self.pulled),
        }
    }

    /// Takes in what calls report. A failure stops the map from pulling at
    /// once; in input order the items before it still run to be yielded.
    fn collect_events<T, F, K: Kind<T, F>>(&mut self, cx: &mut Context<'_>)
    where
        K::Spawner: Spawn<T, F, Output = U>,
    {
        while let Poll::Ready(Some(event)) = self.events.poll_recv(cx) {
            match event {
                Event::Started { index, at } => {
                    if let (Some(timeout), true) = (self.timeout, self.is_running(index)) {
                        self.deadlines.push(Reverse((at + timeout, index)));
                    }
                }
                Event::Finished { index, result } => {
                    self.running -= 1;
                    // Otherwise the map no longer wants it (after a failure
                    // or a timeout): the result is dropped here.
                    if self.is_running(index) {
                        let failed = K::is_failure(&result);
                        self.complete(index, result, failed);
                    }
                }
            }
        }
    }

    /// Fails the calls whose deadline has passed, and sets the timer for
    /// the next one.
    fn expire_deadlines(&mut self, cx: &mut Context<'_>) {
        while let Some(&Reverse((deadline, index))) = self.deadlines.peek() {
            if !self.is_running(index) {
                self.deadlines.pop();
            } else if deadline <= Instant::now() {
                self.deadlines.pop();
                self.complete(index, Err(Error::timeout(index)), true);
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

    fn is_running(&self, index: usize) -> bool {
        matches!(self.slots.get(&index), Some(Slot::Running(_)))
    }

    /// Records the result of item `index`; a failure stops the map.
    fn complete(&mut self, index: usize, result: Result<U, Error>, failed: bool) {
        match self.order {
            Order::Input => {
                // Replacing the running slot aborts a timed-out async call.
                self.slots.insert(index, Slot::Done(result));
                if failed && self.failed_at.is_none_or(|first| index < first) {
                    self.failed_at = Some(index);
                    self.shared.cancel_from(index);
                    self.slots.retain(|&pending, _| pending <= index);
                }
            }
            Order::Completion => {
                self.slots.remove(&index);
                self.ready.push_back((index, result));
                if failed {
                    self.failed_at = Some(index);
                    self.shared.cancel_from(0);
                    self.slots.clear();
                }
            }
        }
    }

    fn can_start(&self) -> bool {
        !self.input_done
            && self.failed_at.is_none()
            && self.running < self.limit
            && self.pulled - self.yielded < self.window
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
                    let index = self.pulled;
                    self.pulled += 1;
                    self.slots.insert(index, Slot::Running(None));
                    self.complete(index, Err(Error::cancelled(index)), true);
                    return Poll::Ready(false);
                }
                Poll::Pending => return Poll::Pending,
            }
        }
        Poll::Ready(true)
    }

    fn start<T, F, S: Spawn<T, F, Output = U>>(&mut self, mapper: &Arc<F>, item: T) {
        let index = self.pulled;
        let call = Call::new(
            index,
            Arc::clone(&self.shared),
            self.report.clone(),
            self.timeout.is_some(),
            self.reserved.take(),
        );
        let runtime = self.runtime.get_or_insert_with(Handle::current);
        let abort = S::spawn(runtime, mapper, item, call);
        self.slots.insert(index, Slot::Running(abort));
        self.pulled += 1;
        self.running += 1;
    }

    /// The next result to yield, if its turn has come.
    fn next_result(&mut self) -> Option<Result<U, Error>> {
        let result = match self.order {
            Order::Input => match self.slots.remove(&self.head) {
                Some(Slot::Done(result)) => result,
                Some(running) => {
                    self.slots.insert(self.head, running);
                    return None;
                }
                None => return None,
            },
            Order::Completion => self.ready.pop_front()?.1,
        };
        self.head += 1;
        self.yielded += 1;
        Some(result)
    }

    fn is_drained(&self) -> bool {
        self.input_done && self.slots.is_empty() && self.ready.is_empty()
    }

    /// Ends the map: nothing more starts, running async calls are aborted,
    /// and every held value is dropped.
    fn finish(&mut self) {
        self.finished = true;
        self.shared.cancel_from(0);
        self.slots.clear();
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
            engine.finish();
            return Poll::Ready(owed.map(|index| K::into_item(Err(Error::cancelled(index)))));
        }

        // Take in what calls report, then deadlines, so a failure is seen
        // before pulling more.
        engine.collect_events::<St::Item, F, K>(cx);
        engine.expire_deadlines(cx);

        // Start calls while the limit, the window and the budget have room.
        while engine.can_start() {
            match engine.reserve_budget(cx) {
                Poll::Ready(true) => {}
                Poll::Ready(false) | Poll::Pending => break,
            }
            match this.input.as_mut().poll_next(cx) {
                Poll::Ready(Some(item)) => engine.start::<_, _, K::Spawner>(this.mapper, item),
                Poll::Ready(None) => engine.input_done = true,
                Poll::Pending => {
                    // Do not sit on a permit of the shared budget while the
                    // input has nothing to give.
                    engine.reserved = None;
                    break;
                }
            }
        }
        if !engine.can_start() {
            engine.reserved = None;
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
                Order::Completion => engine.ready.len(),
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
            .field("window", &engine.window)
            .field("timeout", &engine.timeout)
            .field("pulled", &engine.pulled)
            .field("yielded", &engine.yielded)
            .field("running", &engine.running)
            .field("finished", &engine.finished)
            .finish_non_exhaustive()
    }
}
