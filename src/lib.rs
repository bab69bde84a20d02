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

mod call;
mod engine;
mod error;
mod ext;
mod init;
pub mod kind;
pub mod process;
mod spawn;
mod workers;

pub use engine::ParImap;

// The README's examples are compiled and run as doc tests, so it cannot lie.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;
pub use call::is_cancelled;
pub use error::Error;
pub use ext::ParImapExt;

/// `use par_imap::prelude::*;` brings the extension trait into scope.
///
/// ```
/// use par_imap::prelude::*;
/// # let _ = futures::stream::iter([1]).par_imap(1, |n: i32| n);
/// ```
pub mod prelude {
    pub use crate::ext::ParImapExt;
}
