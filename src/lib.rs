//! Parallel `map` over async streams on tokio: results in input order as soon as
//! each is ready, bounded memory, and failures, panics and cancellation handled
//! so that nothing hangs, nothing leaks and no work runs that nobody will read.
//!
//! It is what Python's `multiprocessing.Pool.imap` should have been, for async
//! Rust services:
//!
//! ```
//! use futures::{stream, TryStreamExt};
//! use par_imap::ParImapExt;
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), par_imap::Error> {
//! // CPU-bound work on tokio's blocking pool, 4 calls at a time, in input order.
//! let sum_of_squares = stream::iter(0..100_u64)
//!     .par_imap(4, |n| n * n)
//!     .try_fold(0, |sum, square| async move { Ok(sum + square) })
//!     .await?;
//! assert_eq!(sum_of_squares, 328_350);
//! # Ok(())
//! # }
//! ```
//!
//! # Choosing a variant
//!
//! | your mapper | results wanted | method | stream item |
//! | --- | --- | --- | --- |
//! | CPU-bound or blocking `Fn(T) -> U` | in input order | [`par_imap`](ParImapExt::par_imap) | `Result<U, Error>` |
//! | CPU-bound or blocking | as they finish | [`par_imap_unordered`](ParImapExt::par_imap_unordered) | `Result<U, Error>` |
//! | blocking, with per-worker state | in input order | [`par_imap_init`](ParImapExt::par_imap_init) | `Result<U, Error>` |
//! | async `Fn(T) -> impl Future<Output = U>` (I/O) | in input order | [`par_imap_async`](ParImapExt::par_imap_async) | `Result<U, Error>` |
//! | async | as they finish | [`par_imap_async_unordered`](ParImapExt::par_imap_async_unordered) | `Result<U, Error>` |
//! | any of these returning `Result<U, E>`, an `Err` to stop the map | either | `try_` + the method | `Result<U, E>`, `E: From<Error>` |
//! | work that may crash the process | either | a `try_..._async` method with `process::output` (cargo feature `process`) | `Result<Vec<u8>, process::ProcessError>` |
//!
//! Plain variants treat every value as a success: only a panic (or a timeout,
//! a cancellation) fails the map. `try_` variants also fail it at the first
//! `Err`, which comes out in your own error type.
//!
//! # Coming from Python's `Pool.imap`
//!
//! | `multiprocessing.Pool` | par-imap |
//! | --- | --- |
//! | `pool.imap(f, xs)` | `stream.par_imap(limit, f)` |
//! | `pool.imap_unordered(f, xs)` | `stream.par_imap_unordered(limit, f)` |
//! | `Pool(processes=n)` | `limit`: at most `n` calls at once, per map; share a budget across maps with [`.semaphore(s)`](ParImap::semaphore) |
//! | `chunksize=k` | not needed: calls are sized from the measured time per item; [`.batch(k)`](ParImap::batch) fixes it, never waits to fill a chunk, failures keep their exact index |
//! | `concurrent.futures`, pebble: a failed task, the rest go on | [`.keep_going()`](ParImap::keep_going) |
//! | `initializer=init` | [`par_imap_init(limit, init, f)`](ParImapExt::par_imap_init): `f(&mut state, item)` |
//! | `maxtasksperchild=n` | not needed: no process to recycle; for code that can crash, a child per call with `process::output` (cargo feature `process`) |
//! | `AsyncResult.get(timeout)` | [`.timeout(d)`](ParImap::timeout), per item, from the moment its call starts |
//! | `pool.terminate()` | drop the stream, or [`.cancel_token(t)`](ParImap::cancel_token) |
//! | results kept until read; input consumed eagerly | at most [`.window(w)`](ParImap::window) items pulled and not yet yielded |
//! | a pickling error for lambdas | any `Fn + Send + Sync + 'static` closure |
//!
//! # Watching it work
//!
//! [`ParImap::stats`] gives a cloneable [`Stats`] handle to read live counters
//! (a progress bar, a metrics exporter). With the default `tracing` feature,
//! each mapper call runs in a `trace`-level `par_imap.call` span with its
//! `index`, and the map's life (a failure observed, a cancellation, a drop
//! with calls in flight) is logged at `debug`. Without a subscriber this
//! costs a branch; `default-features = false` removes it.
//!
//! # Panics and logging
//!
//! A panicking mapper never unwinds into the consumer: its item comes out as
//! an [`Error`] at its index ([`Error::is_panic`], the message in its
//! `Display`, the payload kept for [`std::panic::resume_unwind`] through
//! [`Error::into_panic`]). The process's panic hook still runs first, on the
//! panicking thread, so the default hook prints it to stderr though nothing
//! crashed. Replace the hook once at start-up to keep it quiet or to send it
//! through `tracing` ([`std::panic::take_hook`] gives back the old one):
//!
//! ```
//! use futures::{stream, StreamExt};
//! use par_imap::ParImapExt;
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! let printing_hook = std::panic::take_hook();
//! std::panic::set_hook(Box::new(|info| tracing::error!(target: "panic", "{info}")));
//! let results: Vec<_> = stream::iter([1_u32, 0]).par_imap(2, |n| 10 / n).collect().await;
//! std::panic::set_hook(printing_hook);
//! let error = results[1].as_ref().unwrap_err();
//! assert!(error.is_panic() && error.index() == 1);
//! assert_eq!(error.to_string(), "item 1 panicked: attempt to divide by zero");
//! # }
//! ```
//!
//! Every method is on [`ParImapExt`], implemented for every
//! [`Stream`](futures::Stream); its docs list the variants and the semantics
//! they share: order, laziness, the concurrency limit, fail-fast, drop as
//! cancellation, panics as [`Error`] items.
//!
//! | `Pool.imap` problem | par-imap answer |
//! | --- | --- |
//! | the mapper raises at item 5, yet items 6..15 keep being started | fail-fast: after a failure no input is pulled and no call starts; in-flight async calls are aborted |
//! | results of submitted items (temp files) leak when the consumer stops | every value is owned: whatever is computed and never yielded is dropped exactly once, so `Drop` cleans up |
//! | the workaround drains the whole mapping just to clean up | dropping the stream is the clean-up |
//! | a worker killed by a signal deadlocks the pool | a panicking mapper becomes an `Err` item at its index; nothing hangs |
//! | lambdas and closures cannot be pickled | any `Fn + Send + Sync + 'static` closure works |
//! | `Pool.imap` consumes its input eagerly | input is pulled only when there is room in the window |
#![forbid(unsafe_code)]
#![warn(
    missing_docs,
    missing_debug_implementations,
    unreachable_pub,
    rust_2018_idioms
)]

mod batch;
mod blocking;
mod call;
mod current;
mod deadline;
mod engine;
mod error;
mod ext;
mod init;
mod keys;
mod limit;
mod options;
#[cfg(feature = "process")]
pub mod process;
mod reorder;
mod retry;
mod sizer;
mod spawn;
mod stats;
mod steal;
mod stream;
mod task;
mod trace;
mod variant;
mod workers;

pub use current::is_cancelled;
pub use error::Error;
pub use ext::ParImapExt;
pub use init::WithInit;
pub use retry::Retry;
pub use stats::{Snapshot, Stats};
pub use stream::ParImap;

/// Type-level tags naming the variant of a [`ParImap`] stream.
///
/// You never build these: the methods of [`ParImapExt`] choose them, and
/// they appear only in the stream's type, as in `ParImap<St, F, Try<Async>>`.
/// They exist so that one stream type, with one set of builder methods,
/// serves all eight variants.
///
/// ```
/// use futures::stream::{self, Iter};
/// use par_imap::kind::{Blocking, Try};
/// use par_imap::{ParImap, ParImapExt};
///
/// fn parse(lines: Vec<String>) -> ParImap<Iter<std::vec::IntoIter<String>>, fn(String) -> Result<u64, anyhow::Error>, Try<Blocking>> {
///     stream::iter(lines).try_par_imap(4, |line: String| Ok(line.trim().parse::<u64>()?))
/// }
/// # let _ = parse(vec![]);
/// ```
pub mod kind {
    pub use crate::variant::{Async, Blocking, Try};
}

/// `use par_imap::prelude::*;` brings the extension trait into scope.
///
/// ```
/// use par_imap::prelude::*;
/// # let _ = futures::stream::iter([1]).par_imap(1, |n: i32| n);
/// ```
pub mod prelude {
    pub use crate::ext::ParImapExt;
}

// The README's examples are compiled and run as doc tests, so it cannot lie.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;
