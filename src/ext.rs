//! The extension trait that puts the parallel maps on every stream.

use std::future::Future;

use futures::Stream;

use crate::error::Error;
use crate::init::WithInit;
use crate::options::Order;
use crate::stream::ParImap;
use crate::variant::{Async, Blocking, Try};

/// Parallel maps on any [`Stream`]: `stream.par_imap(limit, f)`.
///
/// Every method returns a [`ParImap`] stream with the same semantics; they
/// differ in how the mapper runs and what order results come out in:
///
/// | method | mapper | results |
/// | --- | --- | --- |
/// | [`par_imap`](ParImapExt::par_imap) | blocking `Fn(T) -> U`, on the blocking pool | input order |
/// | [`par_imap_unordered`](ParImapExt::par_imap_unordered) | blocking | completion order |
/// | [`par_imap_async`](ParImapExt::par_imap_async) | `Fn(T) -> impl Future<Output = U>`, each call in a tokio task | input order |
/// | [`par_imap_async_unordered`](ParImapExt::par_imap_async_unordered) | async | completion order |
/// | `try_` + each of the above | returns `Result<U, E>`, `E: From<Error>` | `Result<U, E>` |
///
/// # Semantics
///
/// 1. **Order.** Input-order variants yield each result as soon as it and all
///    before it are done; `_unordered` variants as soon as it is done.
/// 2. **Laziness and bounded memory.** Nothing is pulled or started before the
///    first poll. An input item is pulled only when a call can start and the
///    window (see [`ParImap::window`]: by default `2 * limit * 1024` for
///    blocking maps, `2 * limit` for async ones) has room, so at most `window`
///    items are pulled and not yet yielded, however long the input and
///    whatever the options. Blocking calls run on at most `limit` long-lived
///    workers, each call on a batch of items sized from the measured time per
///    item (see [`ParImap::batch`]); so that a worker never waits for the
///    consumer to hand it work, up to `limit` more calls may wait in their
///    queue. They count in the window, and a queued call that is no longer
///    wanted never starts.
/// 3. **Concurrency.** At most `limit` mapper calls run at once. A call's slot
///    frees as soon as it ends, so a slow item does not idle the others while
///    the window has room.
/// 4. **Fail-fast.** An item fails when its mapper panics, times out, or
///    (`try_` variants) returns `Err`. From the moment a failure is seen, no input is pulled and
///    no call starts; async calls after it are aborted and results after it are
///    dropped. In input order the consumer receives items `0..k`, then item
///    `k`'s failure, then the end; unordered, the failure comes as soon as it is
///    seen, then the end. After the end the stream yields `None` forever.
/// 5. **Drop is cancellation.** Dropping the stream (after `take(3)`, an early
///    return, `try_fold` stopping at an `Err`) starts no new call, aborts async
///    calls at their next `.await`, and drops every value it holds exactly once:
///    unmapped inputs, unyielded outputs, and outputs of blocking calls that end
///    later. A blocking closure that is already running cannot be pre-empted
///    (tokio cannot abort `spawn_blocking`): it runs to its end and its output
///    is dropped.
/// 6. **Panics never hang.** A panicking mapper becomes an [`Error`] at its
///    item's index, payload kept for [`std::panic::resume_unwind`]. A panic in
///    the *input* stream happens in the consumer's task, as with any combinator.
///    A runtime shutting down under the map ends it with an error for which
///    [`Error::is_cancelled`] is true, not with a hang, and no argument a
///    caller can pass panics inside `poll_next`.
/// 7. **Runtimes.** Works in any tokio runtime, multi-thread or current-thread.
///    Polling outside a runtime panics with tokio's message. A map's tasks
///    (its async calls, a `.timeout`'s timer) and blocking threads belong to
///    the runtime of its first poll, as with `tokio::spawn`: polled later
///    from another runtime while that one is alive but not running (an idle
///    current-thread runtime), its async calls and deadlines wait for it;
///    once that runtime has shut down, the calls it held end as cancelled.
/// 8. **Composition.** Several maps, nested maps, maps sharing a
///    [`semaphore`](ParImap::semaphore) budget, maps inside `zip` or `select`,
///    consumers that stop polling for a while: none of these can deadlock, as
///    a permit is held only by a running call.
///
/// Closures capture what they like, by move or through an `Arc`, as long as
/// they are `Send + Sync + 'static`.
///
/// # Examples
///
/// ```
/// use futures::{stream, TryStreamExt};
/// use par_imap::ParImapExt;
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), par_imap::Error> {
/// let sum_of_squares = stream::iter(1..=10_u64)
///     .par_imap(4, |n| n * n)
///     .try_fold(0, |sum, square| async move { Ok(sum + square) })
///     .await?;
/// assert_eq!(sum_of_squares, 385);
/// # Ok(())
/// # }
/// ```
pub trait ParImapExt: Stream {
    /// Maps each item with the blocking closure `f` on tokio's blocking pool,
    /// at most `limit` calls at once, yielding `Ok(f(item))` in input order, or
    /// an [`Error`] at the item whose call panicked, then the end.
    ///
    /// See the [trait docs](ParImapExt#semantics) for the full semantics.
    ///
    /// # Panics
    ///
    /// Panics at the caller's line if `limit` is 0.
    ///
    /// # Cancellation
    ///
    /// Dropping the stream starts no new call and drops every held value; a
    /// call already running on the blocking pool runs to its end and its output
    /// is dropped.
    ///
    /// # Examples
    ///
    /// ```
    /// use futures::{stream, TryStreamExt};
    /// use par_imap::ParImapExt;
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), par_imap::Error> {
    /// let base = 2_u64;
    /// let powers: Vec<u64> = stream::iter(0..10)
    ///     .par_imap(4, move |n| base.pow(n))
    ///     .try_collect()
    ///     .await?;
    /// assert_eq!(powers[..4], [1, 2, 4, 8]);
    /// # Ok(())
    /// # }
    /// ```
    #[track_caller]
    fn par_imap<F, U>(self, limit: usize, f: F) -> ParImap<Self, F, Blocking>
    where
        Self: Sized,
        Self::Item: Send + 'static,
        F: Fn(Self::Item) -> U + Send + Sync + 'static,
        U: Send + 'static,
    {
        ParImap::new(self, limit, f, Order::Input)
    }

    /// Like [`par_imap`](ParImapExt::par_imap), with per-worker state, as
    /// rayon's `map_init` or `Pool(initializer=...)`: each call gets a
    /// `&mut S` made by `init`, for a connection, a buffer, a compiled regex.
    ///
    /// At most `limit` states exist: they are made lazily, when a call starts
    /// and no idle state is left, and reused by later calls. A state whose
    /// call panicked is dropped, not reused; a panic in `init` fails the item
    /// whose call ran it. Results come in input order, with the semantics of
    /// [`par_imap`](ParImapExt::par_imap).
    ///
    /// # Panics
    ///
    /// Panics at the caller's line if `limit` is 0.
    ///
    /// # Cancellation
    ///
    /// As for [`par_imap`](ParImapExt::par_imap); the states are dropped with
    /// the stream, or when the last running call ends.
    ///
    /// # Examples
    ///
    /// ```
    /// use std::sync::atomic::{AtomicUsize, Ordering};
    /// use futures::{stream, TryStreamExt};
    /// use par_imap::ParImapExt;
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), par_imap::Error> {
    /// static BUFFERS: AtomicUsize = AtomicUsize::new(0);
    /// let lines: Vec<String> = stream::iter(0..100)
    ///     .par_imap_init(
    ///         2,
    ///         || {
    ///             BUFFERS.fetch_add(1, Ordering::Relaxed);
    ///             String::with_capacity(64)
    ///         },
    ///         |buffer: &mut String, n: u32| {
    ///             buffer.clear();
    ///             buffer.push_str(&format!("line {n}"));
    ///             buffer.clone()
    ///         },
    ///     )
    ///     .try_collect()
    ///     .await?;
    /// assert_eq!(lines[99], "line 99");
    /// assert!(BUFFERS.load(Ordering::Relaxed) <= 2);
    /// # Ok(())
    /// # }
    /// ```
    #[track_caller]
    fn par_imap_init<I, S, F, U>(
        self,
        limit: usize,
        init: I,
        f: F,
    ) -> ParImap<Self, WithInit<I, F, S>, Blocking>
    where
        Self: Sized,
        Self::Item: Send + 'static,
        I: Fn() -> S + Send + Sync + 'static,
        F: Fn(&mut S, Self::Item) -> U + Send + Sync + 'static,
        S: Send + 'static,
        U: Send + 'static,
    {
        ParImap::new(self, limit, WithInit::new(init, f), Order::Input)
    }

    /// Like [`par_imap`](ParImapExt::par_imap), but yields each result as soon
    /// as its call ends (completion order).
    ///
    /// # Panics
    ///
    /// Panics at the caller's line if `limit` is 0.
    ///
    /// # Cancellation
    ///
    /// As for [`par_imap`](ParImapExt::par_imap).
    ///
    /// # Examples
    ///
    /// ```
    /// use futures::{stream, TryStreamExt};
    /// use par_imap::ParImapExt;
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), par_imap::Error> {
    /// let mut lengths: Vec<usize> = stream::iter(["a", "bb", "ccc"])
    ///     .par_imap_unordered(3, |s: &str| s.len())
    ///     .try_collect()
    ///     .await?;
    /// lengths.sort();
    /// assert_eq!(lengths, [1, 2, 3]);
    /// # Ok(())
    /// # }
    /// ```
    #[track_caller]
    fn par_imap_unordered<F, U>(self, limit: usize, f: F) -> ParImap<Self, F, Blocking>
    where
        Self: Sized,
        Self::Item: Send + 'static,
        F: Fn(Self::Item) -> U + Send + Sync + 'static,
        U: Send + 'static,
    {
        ParImap::new(self, limit, f, Order::Completion)
    }

    /// Maps each item with the async closure `f`, each call running in a
    /// tokio task of the map's own, at most `limit` at once, yielding
    /// results in input order, or an [`Error`] at the item whose future
    /// panicked, then the end.
    ///
    /// See the [trait docs](ParImapExt#semantics) for the full semantics.
    ///
    /// # Panics
    ///
    /// Panics at the caller's line if `limit` is 0.
    ///
    /// # Cancellation
    ///
    /// Dropping the stream aborts every running call at its next `.await` and
    /// starts no new one.
    ///
    /// # Examples
    ///
    /// ```
    /// use std::time::Duration;
    /// use futures::{stream, TryStreamExt};
    /// use par_imap::ParImapExt;
    ///
    /// # #[tokio::main(flavor = "current_thread", start_paused = true)]
    /// # async fn main() -> Result<(), par_imap::Error> {
    /// let replies: Vec<String> = stream::iter([3, 1, 2])
    ///     .par_imap_async(3, |secs| async move {
    ///         tokio::time::sleep(Duration::from_secs(secs)).await;
    ///         format!("slept {secs}s")
    ///     })
    ///     .try_collect()
    ///     .await?;
    /// assert_eq!(replies, ["slept 3s", "slept 1s", "slept 2s"]);
    /// # Ok(())
    /// # }
    /// ```
    #[track_caller]
    fn par_imap_async<F, Fut>(self, limit: usize, f: F) -> ParImap<Self, F, Async>
    where
        Self: Sized,
        Self::Item: Send + 'static,
        F: Fn(Self::Item) -> Fut + Send + Sync + 'static,
        Fut: Future + Send + 'static,
        Fut::Output: Send + 'static,
    {
        ParImap::new(self, limit, f, Order::Input)
    }

    /// Like [`par_imap_async`](ParImapExt::par_imap_async), but yields each
    /// result as soon as its call ends (completion order).
    ///
    /// # Panics
    ///
    /// Panics at the caller's line if `limit` is 0.
    ///
    /// # Cancellation
    ///
    /// As for [`par_imap_async`](ParImapExt::par_imap_async).
    ///
    /// # Examples
    ///
    /// ```
    /// use std::time::Duration;
    /// use futures::{stream, TryStreamExt};
    /// use par_imap::ParImapExt;
    ///
    /// # #[tokio::main(flavor = "current_thread", start_paused = true)]
    /// # async fn main() -> Result<(), par_imap::Error> {
    /// let first_done: Vec<u64> = stream::iter([3, 1, 2])
    ///     .par_imap_async_unordered(3, |secs| async move {
    ///         tokio::time::sleep(Duration::from_secs(secs)).await;
    ///         secs
    ///     })
    ///     .try_collect()
    ///     .await?;
    /// assert_eq!(first_done, [1, 2, 3]);
    /// # Ok(())
    /// # }
    /// ```
    #[track_caller]
    fn par_imap_async_unordered<F, Fut>(self, limit: usize, f: F) -> ParImap<Self, F, Async>
    where
        Self: Sized,
        Self::Item: Send + 'static,
        F: Fn(Self::Item) -> Fut + Send + Sync + 'static,
        Fut: Future + Send + 'static,
        Fut::Output: Send + 'static,
    {
        ParImap::new(self, limit, f, Order::Completion)
    }

    /// Like [`par_imap`](ParImapExt::par_imap) for a fallible blocking closure:
    /// an `Err` from `f` fails the map as a panic does. Yields `Result<U, E>`;
    /// a panic comes out as `E::from(Error)`.
    ///
    /// # Panics
    ///
    /// Panics at the caller's line if `limit` is 0.
    ///
    /// # Cancellation
    ///
    /// As for [`par_imap`](ParImapExt::par_imap).
    ///
    /// # Examples
    ///
    /// ```
    /// use futures::{stream, StreamExt};
    /// use par_imap::ParImapExt;
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() {
    /// let parsed: Vec<Result<u8, anyhow::Error>> = stream::iter(["1", "2", "x", "4"])
    ///     .try_par_imap(1, |s: &str| Ok(s.parse::<u8>()?))
    ///     .collect()
    ///     .await;
    /// // Items 0..2, then the failure of item 2, then the end.
    /// assert_eq!(parsed.len(), 3);
    /// assert!(parsed[2].is_err());
    /// # }
    /// ```
    ///
    /// # Which item failed
    ///
    /// Your own error does not know its item: number the items with
    /// `.enumerate()` before the map and put the index in it. The map's own
    /// failures (a panic, a timeout, a cancellation) are a [`par_imap::Error`](Error)
    /// with its [`index`](Error::index); with `E = std::io::Error` it is kept
    /// inside, and `get_ref()` then `downcast_ref::<par_imap::Error>()` gives
    /// it back:
    ///
    /// ```
    /// use std::io;
    /// use futures::{stream, StreamExt};
    /// use par_imap::ParImapExt;
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() {
    /// let results: Vec<io::Result<u64>> = stream::iter(["7", "x", "boom"])
    ///     .enumerate()
    ///     .try_par_imap(2, |(index, text): (usize, &str)| {
    ///         assert_ne!(text, "boom", "a bug"); // a panic: the map's own error
    ///         text.parse::<u64>()
    ///             .map_err(|error| io::Error::other(format!("item {index}: {error}")))
    ///     })
    ///     .keep_going() // yield every failure at its place, to show both kinds
    ///     .collect()
    ///     .await;
    /// assert_eq!(results[0].as_ref().unwrap(), &7);
    /// // Your error: the index is the one you put in.
    /// let yours = results[1].as_ref().unwrap_err();
    /// assert_eq!(yours.to_string(), "item 1: invalid digit found in string");
    /// // The map's error, inside the io::Error.
    /// let panicked = results[2].as_ref().unwrap_err();
    /// let map_error = panicked.get_ref().and_then(|inner| inner.downcast_ref::<par_imap::Error>());
    /// assert!(map_error.is_some_and(|error| error.is_panic() && error.index() == 2));
    /// # }
    /// ```
    ///
    /// # When the error type cannot be inferred (E0283)
    ///
    /// A closure whose only error-typed expression is its final `Ok(n)` says
    /// nothing about `E`, and many types satisfy `E: From<par_imap::Error>`:
    ///
    /// ```compile_fail,E0283
    /// use futures::{stream, StreamExt};
    /// use par_imap::ParImapExt;
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() {
    /// let lengths: Vec<_> = stream::iter(["a", "bb"])
    ///     .try_par_imap(2, |line: &str| {
    ///         let n = line.len();
    ///         Ok(n)
    ///     })
    ///     .collect()
    ///     .await;
    /// # }
    /// ```
    ///
    /// (The doctest above checks that this does not compile; rustdoc checks
    /// the error code itself only on a nightly toolchain.) rustc stops with
    /// `error[E0283]: type annotations needed`, pointing at
    /// `Ok` with "cannot infer type of the type parameter `E` declared on the
    /// enum `Result`" and the note "cannot satisfy `_: From<par_imap::Error>`".
    /// Name the error type where the value is made, `Ok::<_, E>(..)` (or in the
    /// closure's return type, or in the type of what you collect):
    ///
    /// ```
    /// use futures::{stream, StreamExt};
    /// use par_imap::ParImapExt;
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() {
    /// let lengths: Vec<_> = stream::iter(["a", "bb"])
    ///     .try_par_imap(2, |line: &str| {
    ///         let n = line.len();
    ///         Ok::<_, std::io::Error>(n)
    ///     })
    ///     .collect()
    ///     .await;
    /// assert_eq!(lengths.len(), 2);
    /// # }
    /// ```
    #[track_caller]
    fn try_par_imap<F, U, E>(self, limit: usize, f: F) -> ParImap<Self, F, Try<Blocking>>
    where
        Self: Sized,
        Self::Item: Send + 'static,
        F: Fn(Self::Item) -> Result<U, E> + Send + Sync + 'static,
        U: Send + 'static,
        E: From<Error> + Send + 'static,
    {
        ParImap::new(self, limit, f, Order::Input)
    }

    /// Like [`try_par_imap`](ParImapExt::try_par_imap), in completion order.
    ///
    /// # Panics
    ///
    /// Panics at the caller's line if `limit` is 0.
    ///
    /// # Cancellation
    ///
    /// As for [`par_imap`](ParImapExt::par_imap).
    ///
    /// # Examples
    ///
    /// ```
    /// use futures::{stream, TryStreamExt};
    /// use par_imap::ParImapExt;
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() {
    /// let checked = stream::iter([1_u32, 2, 0])
    ///     .try_par_imap_unordered(2, |n| 100_u32.checked_div(n).ok_or_else(|| anyhow::anyhow!("divide by zero")))
    ///     .try_collect::<Vec<u32>>()
    ///     .await;
    /// assert!(checked.is_err());
    /// # }
    /// ```
    ///
    /// # Which item failed
    ///
    /// In completion order the position in the output says nothing: number
    /// the items with `.enumerate()` and put the index in your error. The
    /// map's own failures are a [`par_imap::Error`](Error) with its
    /// [`index`](Error::index), kept inside an `io::Error` (`get_ref()`, then
    /// `downcast_ref::<par_imap::Error>()`). A closure ending in a bare
    /// `Ok(n)` needs its error type named, `Ok::<_, E>(n)`: see
    /// [`try_par_imap`](ParImapExt::try_par_imap), "When the error type cannot be inferred".
    ///
    /// ```
    /// use std::io;
    /// use futures::{stream, StreamExt};
    /// use par_imap::ParImapExt;
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() {
    /// let results: Vec<io::Result<u64>> = stream::iter(["7", "x", "boom"])
    ///     .enumerate()
    ///     .try_par_imap_unordered(2, |(index, text): (usize, &str)| {
    ///         assert_ne!(text, "boom", "a bug"); // a panic: the map's own error
    ///         text.parse::<u64>()
    ///             .map_err(|error| io::Error::other(format!("item {index}: {error}")))
    ///     })
    ///     .keep_going() // yield every failure, to show both kinds
    ///     .collect()
    ///     .await;
    /// let mut failures: Vec<String> = results
    ///     .iter()
    ///     .filter_map(|result| result.as_ref().err())
    ///     .map(|error| match error.get_ref().and_then(|inner| inner.downcast_ref::<par_imap::Error>()) {
    ///         Some(map_error) => format!("item {} panicked", map_error.index()),
    ///         None => error.to_string(), // yours, with the index you put in
    ///     })
    ///     .collect();
    /// failures.sort();
    /// assert_eq!(failures, ["item 1: invalid digit found in string", "item 2 panicked"]);
    /// # }
    /// ```
    #[track_caller]
    fn try_par_imap_unordered<F, U, E>(self, limit: usize, f: F) -> ParImap<Self, F, Try<Blocking>>
    where
        Self: Sized,
        Self::Item: Send + 'static,
        F: Fn(Self::Item) -> Result<U, E> + Send + Sync + 'static,
        U: Send + 'static,
        E: From<Error> + Send + 'static,
    {
        ParImap::new(self, limit, f, Order::Completion)
    }

    /// Like [`par_imap_async`](ParImapExt::par_imap_async) for a fallible async
    /// closure: an `Err` fails the map as a panic does. Yields `Result<U, E>`;
    /// a panic comes out as `E::from(Error)`.
    ///
    /// # Panics
    ///
    /// Panics at the caller's line if `limit` is 0.
    ///
    /// # Cancellation
    ///
    /// As for [`par_imap_async`](ParImapExt::par_imap_async).
    ///
    /// # Examples
    ///
    /// ```
    /// use futures::{stream, TryStreamExt};
    /// use par_imap::ParImapExt;
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> anyhow::Result<()> {
    /// let ids: Vec<u64> = stream::iter(["7", "8"])
    ///     .try_par_imap_async(2, |s: &str| async move { Ok::<_, anyhow::Error>(s.parse::<u64>()?) })
    ///     .try_collect()
    ///     .await?;
    /// assert_eq!(ids, [7, 8]);
    /// # Ok(())
    /// # }
    /// ```
    ///
    /// The `Ok::<_, anyhow::Error>` above is needed: an `async` block ending in
    /// a bare `Ok(..)` leaves `E` open, and rustc stops with E0283, "cannot
    /// satisfy `_: From<par_imap::Error>`"; see
    /// [`try_par_imap`](ParImapExt::try_par_imap), "When the error type cannot be inferred".
    ///
    /// # Which item failed
    ///
    /// Number the items with `.enumerate()` and put the index in your error.
    /// The map's own failures, here a [`timeout`](ParImap::timeout), are a
    /// [`par_imap::Error`](Error) with its [`index`](Error::index), kept
    /// inside an `io::Error` of kind `TimedOut` (`get_ref()`, then
    /// `downcast_ref::<par_imap::Error>()`):
    ///
    /// ```
    /// use std::{io, time::Duration};
    /// use futures::{stream, StreamExt};
    /// use par_imap::ParImapExt;
    ///
    /// # #[tokio::main(flavor = "current_thread", start_paused = true)]
    /// # async fn main() {
    /// let results: Vec<io::Result<u64>> = stream::iter(["7", "x", "hang"])
    ///     .enumerate()
    ///     .try_par_imap_async(2, |(index, text): (usize, &str)| async move {
    ///         if text == "hang" {
    ///             std::future::pending::<()>().await;
    ///         }
    ///         text.parse::<u64>()
    ///             .map_err(|error| io::Error::other(format!("item {index}: {error}")))
    ///     })
    ///     .timeout(Duration::from_secs(5))
    ///     .keep_going() // yield every failure at its place, to show both kinds
    ///     .collect()
    ///     .await;
    /// assert_eq!(results[0].as_ref().unwrap(), &7);
    /// assert_eq!(results[1].as_ref().unwrap_err().to_string(), "item 1: invalid digit found in string");
    /// let timed_out = results[2].as_ref().unwrap_err();
    /// assert_eq!(timed_out.kind(), io::ErrorKind::TimedOut);
    /// let map_error = timed_out.get_ref().and_then(|inner| inner.downcast_ref::<par_imap::Error>());
    /// assert!(map_error.is_some_and(|error| error.is_timeout() && error.index() == 2));
    /// # }
    /// ```
    #[track_caller]
    fn try_par_imap_async<F, Fut, U, E>(self, limit: usize, f: F) -> ParImap<Self, F, Try<Async>>
    where
        Self: Sized,
        Self::Item: Send + 'static,
        F: Fn(Self::Item) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<U, E>> + Send + 'static,
        U: Send + 'static,
        E: From<Error> + Send + 'static,
    {
        ParImap::new(self, limit, f, Order::Input)
    }

    /// Like [`try_par_imap_async`](ParImapExt::try_par_imap_async), in
    /// completion order.
    ///
    /// # Panics
    ///
    /// Panics at the caller's line if `limit` is 0.
    ///
    /// # Cancellation
    ///
    /// As for [`par_imap_async`](ParImapExt::par_imap_async).
    ///
    /// # Examples
    ///
    /// ```
    /// use futures::{stream, TryStreamExt};
    /// use par_imap::ParImapExt;
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> anyhow::Result<()> {
    /// let mut ids: Vec<u64> = stream::iter(["7", "8"])
    ///     .try_par_imap_async_unordered(2, |s: &str| async move { Ok::<_, anyhow::Error>(s.parse::<u64>()?) })
    ///     .try_collect()
    ///     .await?;
    /// ids.sort();
    /// assert_eq!(ids, [7, 8]);
    /// # Ok(())
    /// # }
    /// ```
    ///
    /// A bare `Ok(..)` at the end of the `async` block needs its error type
    /// named, `Ok::<_, E>(..)` (E0283 otherwise: see
    /// [`try_par_imap`](ParImapExt::try_par_imap), "When the error type cannot be inferred").
    ///
    /// # Which item failed
    ///
    /// In completion order the position in the output says nothing: number
    /// the items with `.enumerate()` and put the index in your error. The
    /// map's own failures, here a [`timeout`](ParImap::timeout), are a
    /// [`par_imap::Error`](Error) with its [`index`](Error::index), kept
    /// inside an `io::Error` (`get_ref()`, then
    /// `downcast_ref::<par_imap::Error>()`):
    ///
    /// ```
    /// use std::{io, time::Duration};
    /// use futures::{stream, StreamExt};
    /// use par_imap::ParImapExt;
    ///
    /// # #[tokio::main(flavor = "current_thread", start_paused = true)]
    /// # async fn main() {
    /// let results: Vec<io::Result<u64>> = stream::iter(["7", "x", "hang"])
    ///     .enumerate()
    ///     .try_par_imap_async_unordered(2, |(index, text): (usize, &str)| async move {
    ///         if text == "hang" {
    ///             std::future::pending::<()>().await;
    ///         }
    ///         text.parse::<u64>()
    ///             .map_err(|error| io::Error::other(format!("item {index}: {error}")))
    ///     })
    ///     .timeout(Duration::from_secs(5))
    ///     .keep_going() // yield every failure, to show both kinds
    ///     .collect()
    ///     .await;
    /// let mut failures: Vec<String> = results
    ///     .iter()
    ///     .filter_map(|result| result.as_ref().err())
    ///     .map(|error| match error.get_ref().and_then(|inner| inner.downcast_ref::<par_imap::Error>()) {
    ///         Some(map_error) if map_error.is_timeout() => format!("item {} timed out", map_error.index()),
    ///         Some(map_error) => map_error.to_string(),
    ///         None => error.to_string(), // yours, with the index you put in
    ///     })
    ///     .collect();
    /// failures.sort();
    /// assert_eq!(failures, ["item 1: invalid digit found in string", "item 2 timed out"]);
    /// # }
    /// ```
    #[track_caller]
    fn try_par_imap_async_unordered<F, Fut, U, E>(
        self,
        limit: usize,
        f: F,
    ) -> ParImap<Self, F, Try<Async>>
    where
        Self: Sized,
        Self::Item: Send + 'static,
        F: Fn(Self::Item) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<U, E>> + Send + 'static,
        U: Send + 'static,
        E: From<Error> + Send + 'static,
    {
        ParImap::new(self, limit, f, Order::Completion)
    }
}

impl<St: Stream + ?Sized> ParImapExt for St {}
