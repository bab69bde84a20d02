//! The stream every method of [`ParImapExt`](crate::ParImapExt) returns:
//! its builder methods, and the `Stream` impl that hands each poll to the
//! [engine](crate::engine).

use std::fmt;
use std::hash::Hash;
use std::marker::PhantomData;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use futures::stream::{FusedStream, Stream};
use pin_project_lite::pin_project;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use crate::engine::{Engine, Retryable, Retrying, drop_input};
#[cfg(doc)]
use crate::error::Error;
use crate::keys::{Input, KeyFn};
use crate::options::Options;
use crate::options::Order;
use crate::retry::Retry;
use crate::spawn::Spawn;
use crate::stats::Stats;
use crate::variant::{Adapting, Batching, Kind, Output};

pin_project! {
    /// Stream returned by every method of [`ParImapExt`](crate::ParImapExt):
    /// the items of the input stream mapped in parallel.
    ///
    /// `K` names the variant (see [`kind`](crate::kind)). Builder methods
    /// such as [`window`](ParImap::window) configure it before the first
    /// poll; each panics at the caller's line if called after it.
    ///
    /// Dropping it cancels the map: no new mapper call starts, running async
    /// calls are aborted, and every value it holds is dropped, the input
    /// last, once nothing runs on.
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
        // Fields drop in this order: the engine cancels first, then the
        // runner aborts the running async calls and drops the queued ones,
        // then the input goes.
        engine: Engine<Output<K, St::Item, F>>,
        runner: K::Runner,
        kind: PhantomData<fn() -> K>,
        // `None` once the map has ended: an ended map holds no input.
        #[pin]
        input: Option<Input<St>>,
    }

    impl<St, F, K> PinnedDrop for ParImap<St, F, K>
    where
        St: Stream,
        K: Kind<St::Item, F>,
    {
        /// In the fields' order: the engine cancels, the runner aborts the
        /// running async calls and drops the queued ones, then the input
        /// goes, a panic of its items' `Drop` contained (those never pulled
        /// are input items too).
        fn drop(this: Pin<&mut Self>) {
            let this = this.project();
            this.engine.cancel_on_drop();
            this.runner.close();
            drop_input(this.input);
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
        ParImap {
            engine: Engine::new(
                Options::new(order, limit),
                <K::Runner as Spawn<St::Item>>::BATCHES,
            ),
            runner: K::runner(mapper, limit),
            kind: PhantomData,
            input: Some(Input::new(input)),
        }
    }

    /// Sets the window: at most `window` items pulled from the input and not
    /// yet yielded, whether their call is running or their result waits for
    /// its turn. It is a hard cap, which adaptive batch sizes respect.
    ///
    /// The default lets calls fill: `2 * limit * 1024` for the blocking
    /// variants (their calls take up to 1024 items each, sized by the
    /// measured time per item, see [`batch`](ParImap::batch)), `2 * limit * k`
    /// with `batch(k)`, and `2 * limit` for the async variants. So with the
    /// defaults a blocking map of `limit` 4 holds at most 8192 input items
    /// (and their results) pulled and not yet yielded; set a window to hold
    /// fewer. With [`retry`](ParImap::retry) calls take one item each, and
    /// the default is `2 * limit`.
    ///
    /// A wider window lets fast items run ahead of a slow one in input order
    /// (more memory, better throughput under skew); `window == limit` lets no
    /// result wait while a worker could start the next item.
    ///
    /// # Panics
    ///
    /// Panics at the caller's line if `window < limit`, or if the stream
    /// was already polled.
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
        let options = self.engine.options();
        match options.adaptive {
            Some(max) => assert!(
                window >= max,
                "par_imap: `window` ({window}) must be at least the `adaptive_limit` ({max})"
            ),
            None => assert!(
                window >= options.limit,
                "par_imap: `window` ({window}) must be at least `limit` ({})",
                options.limit
            ),
        }
        self.engine.options_mut().window = Some(window);
        self
    }

    /// Sets a per-item deadline, counted from the moment the item's mapper
    /// starts (time waiting for the limit or the window does not count).
    ///
    /// An item still running at its deadline fails with an [`Error`] for
    /// which [`is_timeout`](Error::is_timeout) is true, at its own index
    /// (inside a [`batch`](ParImap::batch) too: each item's deadline counts
    /// from its own start, and the items of its call before it are
    /// delivered). The map then fails fast as for any failure: in input
    /// order, items before it that are still running go on and are yielded
    /// first; unordered, the timeout is yielded at once. With
    /// [`keep_going`](ParImap::keep_going) the map goes on instead.
    ///
    /// Any `Duration` is accepted, up to `Duration::MAX`: a deadline past
    /// the clock's range means no deadline, never a panic.
    ///
    /// With `tokio_stream::StreamExt` in scope, which has a `timeout` method
    /// of its own (a deadline between items of any stream), this inherent
    /// method still wins: `results.timeout(d)` on a `ParImap` is always this
    /// per-item deadline. Call `tokio_stream::StreamExt::timeout(results, d)`
    /// to get the other one.
    ///
    /// An async call is aborted at its deadline. A blocking call cannot be
    /// pre-empted: from its deadline on [`is_cancelled`](crate::is_cancelled)
    /// is true inside it, its output is dropped when it returns, and it
    /// counts against `limit` (and holds its [`semaphore`](ParImap::semaphore)
    /// permit) until it really ends. So an item that still has to run while
    /// such a call goes on (after it with `.keep_going()`; or, under
    /// fail-fast, an item below it that [`key_order`](ParImap::key_order) or
    /// a `.retry` wait let it overtake) waits for a free place; with every
    /// place held by a hung thread, it waits for that thread to return.
    ///
    /// # Panics
    ///
    /// Panics at the caller's line if the stream was already polled.
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
    #[track_caller]
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.engine.options_mut().timeout = Some(timeout);
        self
    }

    /// Cancels the whole map when `token` is cancelled: at once, whether or
    /// not anyone polls the stream, running async calls are aborted, running
    /// blocking calls map no further item (the map registers on the token,
    /// so `cancel()` itself stops them), and no call starts; then the
    /// stream yields one [`Error`] for
    /// which [`is_cancelled`](Error::is_cancelled) is true, at the lowest
    /// index not yet yielded, then ends. Results computed but not yet yielded
    /// are dropped; a failure waiting for its turn gives way to the
    /// cancellation. If everything was already yielded, the stream just ends.
    ///
    /// The map only watches the token: dropping the stream never cancels it.
    /// Pass a [`child_token`](CancellationToken::child_token) to cancel one
    /// map among several.
    ///
    /// # Panics
    ///
    /// Panics at the caller's line if the stream was already polled.
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
    #[track_caller]
    pub fn cancel_token(mut self, token: CancellationToken) -> Self {
        self.engine.options_mut().token = Some(token);
        self
    }

    /// Makes every mapper call also hold one permit of `semaphore`, so that
    /// several maps, or a map and other work, share one concurrency budget.
    ///
    /// A permit is held only by a call that runs: each call takes its own
    /// where it runs (an async call inside its task, a blocking call on its
    /// worker) and gives it back when it really ends. A map that is idle,
    /// not being polled, waiting for input, ended or dropped holds none and
    /// leaves no waiting acquire behind, so maps sharing a budget never
    /// deadlock however the consumer interleaves them (`zip`, `select`), and
    /// the consumer may take a permit itself between two items. While no
    /// permit is free, a map holds at most one pulled item: the call waiting
    /// for a permit. If the semaphore is closed, the map ends with one
    /// [`Error`] for which [`is_cancelled`](Error::is_cancelled) is true, at
    /// the lowest index not yet yielded.
    ///
    /// # Panics
    ///
    /// Panics at the caller's line if the stream was already polled.
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
    #[track_caller]
    pub fn semaphore(mut self, semaphore: Arc<Semaphore>) -> Self {
        self.engine.options_mut().budget = Some(semaphore);
        self
    }

    /// Maps items with equal keys one after another, in input order, while
    /// items of different keys run in parallel: per-key order, as Kafka
    /// gives per partition and Confluent's parallel-consumer per key.
    ///
    /// `key` is called once per item, on the consumer's task, when the item
    /// is pulled; a panic there is that item's panic error
    /// ([`Error::is_panic`]). Items with equal keys are never mapped at the
    /// same time and start in input order: a key is busy from the moment one
    /// of its items is given to a call until that call has really ended (a
    /// timed-out blocking item holds its key until its thread returns).
    ///
    /// While the window has room and a call could start, input is pulled
    /// even if the pulled item then waits for its key. A waiting item counts
    /// in the window, not in `in_flight`, holds no permit of a
    /// [`semaphore`](ParImap::semaphore), and shows in
    /// [`Snapshot::waiting`](crate::Snapshot::waiting). When a call can
    /// start it takes the lowest-index waiting item whose key is free (and,
    /// for blocking calls, the items right after it whose keys are free and
    /// differ: a call never holds two items of one key, so work stealing
    /// needs no extra rule). Items that overtook a waiting one wait in the
    /// window for their turn in input order; unordered, they are yielded
    /// when done.
    ///
    /// Output order, fail-fast, timeouts and what is dropped are unchanged;
    /// with [`keep_going`](ParImap::keep_going) a key's later items are
    /// mapped after its failed item. Keys are kept only while an item of
    /// theirs is in the window (as a 64-bit hash: two different keys that
    /// collide only take turns), so memory is O(window) however many
    /// distinct keys go by. One key is a serial loop; all keys distinct cost
    /// about what the map costs without `key_order`.
    ///
    /// # Panics
    ///
    /// Panics at the caller's line if the stream was already polled.
    ///
    /// # Examples
    ///
    /// ```
    /// use futures::{stream, TryStreamExt};
    /// use par_imap::ParImapExt;
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), par_imap::Error> {
    /// // Events of one account apply one after another; accounts in parallel.
    /// let events = [("alice", 10), ("bob", 5), ("alice", -3), ("bob", 1)];
    /// let applied: Vec<(&str, i32)> = stream::iter(events)
    ///     .par_imap_async(4, |(account, amount)| async move { (account, amount) })
    ///     .key_order(|&(account, _)| account)
    ///     .try_collect()
    ///     .await?;
    /// assert_eq!(applied, events);
    /// # Ok(())
    /// # }
    /// ```
    #[track_caller]
    pub fn key_order<Key, KeyOf>(mut self, key: KeyOf) -> Self
    where
        KeyOf: Fn(&St::Item) -> Key + Send + Sync + 'static,
        Key: Hash + Eq + Send + 'static,
    {
        self.engine.set_key_order();
        if let Some(input) = &mut self.input {
            input.set_key(KeyFn::new(key));
        }
        self
    }

    /// Goes on past failures: a failed item (a panic, a timeout, or a `try_`
    /// mapper's `Err`) is yielded at its place as its error, and the map
    /// goes on with the next items, as `concurrent.futures` or pebble do.
    /// The limit, the window, the order and what is dropped are unchanged.
    ///
    /// Cancellation still ends the map: the token, a closed budget, a
    /// runtime shutting down, or dropping the stream. A blocking call whose
    /// item timed out keeps its worker until it returns (a thread cannot be
    /// killed; [`is_cancelled`](crate::is_cancelled) is true inside it), and
    /// the other items of its call are mapped after it.
    ///
    /// # Panics
    ///
    /// Panics at the caller's line if the stream was already polled.
    ///
    /// # Examples
    ///
    /// ```
    /// use futures::StreamExt;
    /// use par_imap::ParImapExt;
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() {
    /// // One poisoned message must not stop the consumer.
    /// let parsed: Vec<Result<u64, anyhow::Error>> = futures::stream::iter(["1", "x", "3"])
    ///     .try_par_imap(2, |s: &str| Ok(s.parse::<u64>()?))
    ///     .keep_going()
    ///     .collect()
    ///     .await;
    /// assert_eq!(*parsed[0].as_ref().unwrap(), 1);
    /// assert!(parsed[1].is_err());
    /// assert_eq!(*parsed[2].as_ref().unwrap(), 3);
    /// # }
    /// ```
    #[track_caller]
    pub fn keep_going(mut self) -> Self {
        self.engine.options_mut().keep_going = true;
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
        Stats::new(Arc::clone(self.engine.counters()))
    }
}

impl<St, F, K> ParImap<St, F, K>
where
    St: Stream,
    St::Item: Clone + Send + 'static,
    K: Kind<St::Item, F>,
    K::Error: 'static,
{
    /// Tries a failed item again, after a growing, jittered wait, before it
    /// counts as a failure: for a flaky downstream. See [`Retry`] for what
    /// retries and how long each wait is.
    ///
    /// - Every attempt but the last maps a clone of the item (so the item
    ///   type must be `Clone`); the last maps the item itself. Every clone
    ///   is dropped exactly once.
    /// - A wait between attempts lives in the map, not in a task or a
    ///   worker: it holds no worker and no permit of a
    ///   [`semaphore`](ParImap::semaphore), does not count in `in_flight`,
    ///   and counts in the window and in [`Snapshot::waiting`](crate::Snapshot::waiting).
    ///   It ends, and its item is dropped, as soon as the map no longer
    ///   wants the item: the token, a failure that makes the item unwanted,
    ///   the end or drop of the map, polled or not. When a
    ///   wait ends, the item's next attempt starts before any item with a
    ///   higher index.
    /// - [`timeout`](ParImap::timeout) applies to each attempt; no deadline
    ///   runs during a wait. A timed-out blocking attempt is tried again
    ///   only once its thread has returned.
    /// - An item fails (fail-fast or [`keep_going`](ParImap::keep_going))
    ///   only after its last attempt; with fail-fast in input order, the
    ///   items before a failed one are still tried again (they are owed).
    /// - With [`key_order`](ParImap::key_order) the item's key stays busy
    ///   through its waits: the key's later items wait for its last attempt.
    /// - Every call maps one item (a retry is a call of its own), so a
    ///   blocking map's [`batch`](ParImap::batch) size is 1 with `.retry`,
    ///   and its default window `2 * limit`: it is for items that call
    ///   something flaky, not for microsecond ones.
    /// - [`Snapshot`](crate::Snapshot): `started` and `completed` count
    ///   attempts, `retried` the attempts after the first, `failed` the
    ///   items that failed after their last. With
    ///   [`adaptive_limit`](ParImap::adaptive_limit), a failure that is
    ///   tried again shrinks the limit like a timeout. A trace event per
    ///   retry names the item and its wait.
    ///
    /// # Panics
    ///
    /// Panics at the caller's line if the stream was already polled. A
    /// panic of the item's `clone`, or of the `.when` predicate, is that
    /// item's panic error (not tried again); a backoff on a runtime without
    /// a time driver panics at the first poll, naming `enable_time`, like
    /// [`timeout`](ParImap::timeout). A runtime that shuts down during a
    /// wait ends the map with a cancellation error.
    ///
    /// # Examples
    ///
    /// ```
    /// use std::collections::HashSet;
    /// use std::sync::{Arc, Mutex};
    /// use std::time::Duration;
    /// use futures::{stream, TryStreamExt};
    /// use par_imap::{ParImapExt, Retry};
    ///
    /// # #[tokio::main(flavor = "current_thread", start_paused = true)]
    /// # async fn main() -> Result<(), std::io::Error> {
    /// // A flaky downstream: the first call for every item fails.
    /// let seen = Arc::new(Mutex::new(HashSet::new()));
    /// let stats;
    /// let fetched: Vec<u32> = {
    ///     let map = stream::iter(0..6_u32)
    ///         .try_par_imap_async(4, move |n| {
    ///             let first = seen.lock().unwrap().insert(n);
    ///             async move {
    ///                 if first {
    ///                     Err(std::io::Error::other("503"))
    ///                 } else {
    ///                     Ok(n * 10)
    ///                 }
    ///             }
    ///         })
    ///         .retry(Retry::attempts(3).backoff(Duration::from_millis(100), Duration::from_secs(2)));
    ///     stats = map.stats();
    ///     map.try_collect().await?
    /// };
    /// assert_eq!(fetched, [0, 10, 20, 30, 40, 50]);
    /// assert_eq!(stats.snapshot().retried, 6);
    /// # Ok(())
    /// # }
    /// ```
    #[track_caller]
    pub fn retry(mut self, retry: Retry<K::Error>) -> Self {
        self.engine.options_mut(); // Panics here once polled.
        let backoff = retry.backoff_state();
        let Some(input) = &mut self.input else {
            return self;
        };
        let kept = input.set_retry(<St::Item as Clone>::clone);
        self.engine.set_retry(Retrying::new(
            Retryable::new(Arc::new(move |result| K::is_retryable(result, &retry))),
            backoff,
            kept,
        ));
        self
    }
}

impl<St, F, K> ParImap<St, F, K>
where
    St: Stream,
    K: Kind<St::Item, F> + Batching,
{
    /// Fixes how many items one mapper call takes: up to `k` consecutive
    /// input items that are already available. Blocking variants only;
    /// `.batch(1)` is one item per call.
    ///
    /// Without it the size is adaptive: each call is sized from the
    /// measured time per item so that its work (about 2 ms) costs far
    /// more than handing it to a worker, from 1 item up to 1024; it starts
    /// at 1 (the first result is never held back), shrinks within a call or
    /// two when items get slower, and what is pulled is shared among idle
    /// workers. `.batch(k)` fixes the size instead.
    ///
    /// A running call is never a black box: once it has run past its steal
    /// time (2 ms with adaptive sizes; with `.batch(k)`, twice the call's
    /// expected run time from the measured time per item), an idle worker
    /// may at any moment take the back half of the items it has not
    /// started, and the results it has finished, even while it is stuck in
    /// one item. So a slow or hung item never holds back the items of its
    /// call, with or without a timeout. Its finished results come out even
    /// when no worker is idle to take them (`limit` 1, or every worker
    /// inside an item that hangs): the map's watch looks every 10 ms while
    /// a call runs and hands over what a call past its steal time finished.
    /// It is one more blocking thread per map with calls of several items,
    /// which runs no user code and takes no item, so it counts in no limit;
    /// a runtime whose `max_blocking_threads` are all taken by hung items
    /// has none left for it, and the results wait as before.
    ///
    /// A batch never waits to fill up: a call takes what the input has ready
    /// (at least one item), so latency does not grow. Results stay per item,
    /// with every semantic intact: order, the exact index of a failure inside
    /// a batch (the items before it are delivered, the items after it are
    /// never mapped), fail-fast, drop. `limit` counts calls, so up to
    /// `limit * k` items may be in progress. Unless set with
    /// [`window`](ParImap::window), the window becomes `2 * limit * k`. With
    /// [`timeout`](ParImap::timeout), each item's deadline counts from its
    /// own start: an item that runs too long fails at its own index, and the
    /// items of its call before it are delivered.
    ///
    /// Async calls map one item each, so async variants have no `batch`:
    ///
    /// ```compile_fail
    /// use par_imap::ParImapExt;
    /// let _ = futures::stream::iter([1]).par_imap_async(2, |n: i32| async move { n }).batch(4);
    /// ```
    ///
    /// # Panics
    ///
    /// Panics at the caller's line if `k` is 0, or if the stream was already
    /// polled.
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
        self.engine.set_batch(k);
        self
    }
}

impl<St, F, K> ParImap<St, F, K>
where
    St: Stream,
    K: Kind<St::Item, F> + Adapting,
{
    /// Lets the limit find itself: it moves between 1 and `max`, starting at
    /// the `limit` the map was made with, from the latency calls show, like
    /// TCP's congestion window. Async variants only. For a map that calls a
    /// server: too low a limit wastes throughput, too high a one queues
    /// requests at the server and drives latency and timeouts up.
    ///
    /// The algorithm is TCP Vegas, as Netflix's concurrency-limits applies it
    /// to requests. A call's latency counts from the moment it holds its
    /// permit (with [`semaphore`](ParImap::semaphore)) or starts, to its end.
    /// The lowest latency seen is the no-load floor. Every `300 * limit`
    /// calls a probe re-learns it, so that a server that got slower for good
    /// is not taken for a congested one forever: the limit is held at a
    /// quarter for `2 * limit` calls, their lowest latency is the new floor,
    /// and the limit goes back to where it was. From a call's latency `rtt`, `queue = limit * (1 - floor /
    /// rtt)` estimates the calls waiting at the other end; with `lg =
    /// max(1, log10(limit))`, the limit grows by `6 * lg` while `queue <=
    /// lg`, by `lg` while `queue < 2 * lg`, shrinks by `lg` when `queue > 4 *
    /// lg`, halves at a timeout or a panic, and stays otherwise. An `Err` of a
    /// `try_` variant counts by its latency only. The limit does not grow
    /// while fewer than half of it are running (the input, the window or the
    /// consumer is what limits the map then). It moves at most once a
    /// round trip, like TCP's window: it decides once per `limit` calls,
    /// from their mean latency (a timeout or a panic at once), and after a
    /// change it does not read the calls that were running then (they
    /// started under the old limit).
    ///
    /// [`Snapshot::limit`](crate::Snapshot::limit) shows it as it moves,
    /// never reduced by a shared budget (which still caps how many calls
    /// run), and a `debug` trace event marks each change. When the limit
    /// shrinks, the running calls finish: `in_flight` may stay above it until
    /// they do. Unless set with [`window`](ParImap::window), the window is
    /// `2 * max`.
    ///
    /// Blocking variants have no `adaptive_limit`: their limit is the
    /// number of threads given to the map, which latency says nothing about.
    ///
    /// ```compile_fail
    /// use par_imap::ParImapExt;
    /// let _ = futures::stream::iter([1]).par_imap(2, |n: i32| n).adaptive_limit(8);
    /// ```
    ///
    /// # Panics
    ///
    /// Panics at the caller's line if `max` is below the map's `limit`, if a
    /// `window` below `max` was set, or if the stream was already polled.
    ///
    /// # Examples
    ///
    /// ```
    /// use std::time::Duration;
    /// use futures::{stream, TryStreamExt};
    /// use par_imap::ParImapExt;
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), par_imap::Error> {
    /// let calls = stream::iter(0..200_u64)
    ///     .par_imap_async(4, |n| async move {
    ///         tokio::time::sleep(Duration::from_millis(1)).await; // a request
    ///         n
    ///     })
    ///     .adaptive_limit(64);
    /// let stats = calls.stats();
    /// let answers: Vec<u64> = calls.try_collect().await?;
    /// assert_eq!(answers, (0..200).collect::<Vec<_>>());
    /// let limit = stats.snapshot().limit;
    /// assert!((1..=64).contains(&limit), "it moved within 1..=64: {limit}");
    /// # Ok(())
    /// # }
    /// ```
    #[track_caller]
    pub fn adaptive_limit(mut self, max: usize) -> Self {
        let options = self.engine.options();
        assert!(
            max >= options.limit,
            "par_imap: `adaptive_limit` ({max}) must be at least `limit` ({})",
            options.limit
        );
        if let Some(window) = options.window {
            assert!(
                window >= max,
                "par_imap: `window` ({window}) must be at least the `adaptive_limit` ({max})"
            );
        }
        self.engine.set_adaptive_limit(max);
        self
    }
}

impl<St, F, K> Stream for ParImap<St, F, K>
where
    St: Stream,
    K: Kind<St::Item, F>,
{
    type Item = K::Item;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<K::Item>> {
        let this = self.project();
        this.engine
            .poll_next(this.input, this.runner, K::is_failure, cx)
            .map(|item| item.map(K::into_item))
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        let input = self
            .input
            .as_ref()
            .map_or((0, Some(0)), |input| input.stream().size_hint());
        self.engine.size_hint(input)
    }
}

impl<St, F, K> FusedStream for ParImap<St, F, K>
where
    St: Stream,
    K: Kind<St::Item, F>,
{
    fn is_terminated(&self) -> bool {
        self.engine.is_ended()
    }
}

impl<St, F, K> fmt::Debug for ParImap<St, F, K>
where
    St: Stream + fmt::Debug,
    K: Kind<St::Item, F>,
{
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let engine = &self.engine;
        let options = engine.options();
        let (pulled, yielded, in_flight) = engine.progress();
        f.debug_struct("ParImap")
            .field("input", &self.input)
            .field("order", &options.order)
            .field("limit", &engine.limit())
            .field("adaptive_limit", &options.adaptive)
            .field("window", &engine.window())
            .field("batch", &options.batch)
            .field("timeout", &options.timeout)
            .field("keep_going", &options.keep_going)
            .field("key_order", &engine.has_key_order())
            .field("retry", &engine.has_retry())
            .field("pulled", &pulled)
            .field("yielded", &yielded)
            .field("in_flight", &in_flight)
            .field("ended", &engine.is_ended())
            .finish_non_exhaustive()
    }
}
