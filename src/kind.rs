//! Type-level tags naming the variant of a [`ParImap`](crate::ParImap) stream.
//!
//! You never build these: the methods of [`ParImapExt`](crate::ParImapExt)
//! choose them, and they appear only in the stream's type, as in
//! `ParImap<St, F, Try<Async>>`. They exist so that one stream type, with one
//! set of builder methods, serves all eight variants.
//!
//! ```
//! use futures::stream::{self, Iter};
//! use par_imap::kind::{Blocking, Try};
//! use par_imap::{ParImap, ParImapExt};
//!
//! fn parse(lines: Vec<String>) -> ParImap<Iter<std::vec::IntoIter<String>>, fn(String) -> Result<u64, anyhow::Error>, Try<Blocking>> {
//!     stream::iter(lines).try_par_imap(4, |line: String| Ok(line.trim().parse::<u64>()?))
//! }
//! # let _ = parse(vec![]);
//! ```

use std::fmt;
use std::marker::PhantomData;

/// The mapper is a blocking closure, each call run on tokio's blocking pool
/// (`spawn_blocking`).
///
/// ```
/// use futures::stream;
/// use par_imap::{kind::Blocking, ParImap, ParImapExt};
///
/// let squares: ParImap<_, _, Blocking> = stream::iter(0..4_u64).par_imap(2, |n: u64| n * n);
/// # drop(squares);
/// ```
#[derive(Debug)]
pub enum Blocking {}

/// The mapper returns a future, each call spawned as a tokio task.
///
/// ```
/// use futures::stream;
/// use par_imap::{kind::Async, ParImap, ParImapExt};
///
/// let doubled: ParImap<_, _, Async> =
///     stream::iter(0..4_u64).par_imap_async(2, |n: u64| async move { n * 2 });
/// # drop(doubled);
/// ```
#[derive(Debug)]
pub enum Async {}

/// The mapper is fallible: it returns `Result<U, E>`, and an `Err` fails the
/// map like a panic does. `S` is [`Blocking`] or [`Async`].
///
/// ```
/// use futures::stream;
/// use par_imap::kind::{Blocking, Try};
/// use par_imap::{ParImap, ParImapExt};
///
/// let parsed: ParImap<_, _, Try<Blocking>> = stream::iter(["1", "x"])
///     .try_par_imap(2, |s: &str| s.parse::<u8>().map_err(anyhow::Error::from));
/// # drop(parsed);
/// ```
pub struct Try<S> {
    _spawn: PhantomData<fn() -> S>,
}

impl<S> fmt::Debug for Try<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Try")
    }
}

pub use crate::init::WithInit;
