//! The error of the machinery: a mapper call that panicked, timed out or was
//! cancelled, as opposed to an error of the user's own function.

use std::any::Any;
use std::fmt;
use std::sync::Mutex;

/// Why one item of a parallel map failed, other than by its mapper returning `Err`.
///
/// Every failure carries the 0-based [`index`](Error::index) of its item in the
/// input. A panic keeps its payload, so it can be re-raised with
/// [`std::panic::resume_unwind`] after [`into_panic`](Error::into_panic).
///
/// `Error` is `std::error::Error + Send + Sync + 'static`: `anyhow`,
/// `Box<dyn Error + Send + Sync>` and `thiserror`'s `#[from]` take it as it is,
/// and the `try_` variants of [`ParImapExt`](crate::ParImapExt) convert it into
/// the mapper's own error type through `From<Error>`; `std::io::Error` has
/// that `From` too, so a closure returning [`std::io::Result`] just works.
///
/// # Which item failed, in your own error
///
/// `Error` carries its item's index; an `Err` of your own closure does not,
/// and with `_unordered` the position in the output does not say it either.
/// Number the items with `.enumerate()` before the map and put the index into
/// your error:
///
/// ```
/// use futures::{stream, StreamExt};
/// use par_imap::ParImapExt;
///
/// #[derive(Debug)]
/// enum ParseError {
///     /// Your own failure, with the item it happened to.
///     Parse { index: usize, error: std::num::ParseIntError },
///     /// The machinery's: a panic, a timeout, a cancellation; it has its index.
///     Map(par_imap::Error),
/// }
///
/// impl From<par_imap::Error> for ParseError {
///     fn from(error: par_imap::Error) -> Self {
///         ParseError::Map(error)
///     }
/// }
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// let results: Vec<Result<u64, ParseError>> = stream::iter(["1", "x", "3"])
///     .enumerate()
///     .try_par_imap_unordered(2, |(index, text): (usize, &str)| {
///         text.parse::<u64>().map_err(|error| ParseError::Parse { index, error })
///     })
///     .collect()
///     .await;
/// let failed = results.iter().find_map(|result| match result {
///     Err(ParseError::Parse { index, .. }) => Some(*index),
///     _ => None,
/// });
/// assert_eq!(failed, Some(1));
/// # }
/// ```
///
/// # Examples
///
/// ```
/// use futures::{stream, StreamExt};
/// use par_imap::ParImapExt;
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// let results: Vec<_> = stream::iter(0..3)
///     .par_imap(2, |n: u32| if n == 1 { panic!("no ones") } else { n })
///     .collect()
///     .await;
///
/// let error = results[1].as_ref().unwrap_err();
/// assert_eq!(error.index(), 1);
/// assert!(error.is_panic());
/// assert_eq!(error.to_string(), "item 1 panicked: no ones");
/// # }
/// ```
pub struct Error {
    // Boxed: a map's results are `Result<U, Error>`, moved per item from
    // the worker to the consumer, and an `Error` kept inline made each of
    // them 72 bytes for a `u64`, which cost time at ~0.15 µs per item
    // (issue 19). Errors are rare; their allocation is not.
    inner: Box<Inner>,
}

struct Inner {
    index: usize,
    repr: Repr,
}

enum Repr {
    // The payload is `Send` but not `Sync`; the mutex makes `Error: Sync`
    // without unsafe code. It is only ever locked by `&self` readers of the
    // message, which is captured up front instead, so it is never contended.
    Panic {
        payload: Mutex<Box<dyn Any + Send + 'static>>,
        message: Option<String>,
    },
    Timeout,
    Cancelled,
}

impl Error {
    fn new(index: usize, repr: Repr) -> Self {
        Error {
            inner: Box::new(Inner { index, repr }),
        }
    }

    pub(crate) fn panic(index: usize, payload: Box<dyn Any + Send + 'static>) -> Self {
        let message = payload
            .downcast_ref::<&str>()
            .map(|message| (*message).to_owned())
            .or_else(|| payload.downcast_ref::<String>().cloned());
        Error::new(
            index,
            Repr::Panic {
                payload: Mutex::new(payload),
                message,
            },
        )
    }

    pub(crate) fn timeout(index: usize) -> Self {
        Error::new(index, Repr::Timeout)
    }

    /// A copy of a timeout or a panic (its message, not its payload), for a
    /// `.retry` predicate that takes the stream's own error type.
    pub(crate) fn duplicate(&self) -> Option<Self> {
        match &self.inner.repr {
            Repr::Timeout => Some(Error::timeout(self.inner.index)),
            Repr::Panic { message, .. } => Some(Error::panic(
                self.inner.index,
                Box::new(message.clone().unwrap_or_else(|| "a panic".to_owned())),
            )),
            Repr::Cancelled => None,
        }
    }

    pub(crate) fn cancelled(index: usize) -> Self {
        Error::new(index, Repr::Cancelled)
    }

    /// The 0-based position in the input of the item that failed.
    ///
    /// ```
    /// # use futures::{stream, StreamExt};
    /// # use par_imap::ParImapExt;
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() {
    /// let mut results = stream::iter([7, 8]).par_imap(1, |n: i32| {
    ///     assert!(n != 8, "eight");
    ///     n
    /// });
    /// assert_eq!(results.next().await.unwrap().unwrap(), 7);
    /// assert_eq!(results.next().await.unwrap().unwrap_err().index(), 1);
    /// # }
    /// ```
    pub fn index(&self) -> usize {
        self.inner.index
    }

    /// Whether the mapper call panicked.
    ///
    /// ```
    /// # use futures::{stream, StreamExt};
    /// # use par_imap::ParImapExt;
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() {
    /// let first = stream::iter([0]).par_imap(1, |_: i32| -> i32 { panic!() }).next().await;
    /// assert!(first.unwrap().unwrap_err().is_panic());
    /// # }
    /// ```
    pub fn is_panic(&self) -> bool {
        matches!(self.inner.repr, Repr::Panic { .. })
    }

    /// Whether the mapper call ran past its deadline (set with `.timeout`).
    ///
    /// ```
    /// # use futures::{stream, StreamExt};
    /// # use par_imap::ParImapExt;
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() {
    /// let first = stream::iter([0]).par_imap(1, |_: i32| -> i32 { panic!() }).next().await;
    /// assert!(!first.unwrap().unwrap_err().is_timeout());
    /// # }
    /// ```
    pub fn is_timeout(&self) -> bool {
        matches!(self.inner.repr, Repr::Timeout)
    }

    /// Whether the item was cancelled before it could finish: the runtime shut
    /// down under the map, or the map was cancelled from outside.
    ///
    /// ```
    /// # use futures::{stream, StreamExt};
    /// # use par_imap::ParImapExt;
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() {
    /// let first = stream::iter([0]).par_imap(1, |_: i32| -> i32 { panic!() }).next().await;
    /// assert!(!first.unwrap().unwrap_err().is_cancelled());
    /// # }
    /// ```
    pub fn is_cancelled(&self) -> bool {
        matches!(self.inner.repr, Repr::Cancelled)
    }

    /// The panic payload, to re-raise with [`std::panic::resume_unwind`].
    ///
    /// # Panics
    ///
    /// Panics if the error is not a panic; see [`try_into_panic`](Error::try_into_panic).
    ///
    /// ```
    /// # use futures::{stream, StreamExt};
    /// # use par_imap::ParImapExt;
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() {
    /// let first = stream::iter([0]).par_imap(1, |_: i32| -> i32 { std::panic::panic_any(42_u8) });
    /// let payload = first.boxed().next().await.unwrap().unwrap_err().into_panic();
    /// assert_eq!(payload.downcast_ref::<u8>(), Some(&42));
    /// # }
    /// ```
    #[track_caller]
    pub fn into_panic(self) -> Box<dyn Any + Send + 'static> {
        match self.try_into_panic() {
            Ok(payload) => payload,
            Err(error) => {
                panic!("`par_imap::Error::into_panic` called on a non-panic error: {error}")
            }
        }
    }

    /// The panic payload, or the error itself when it is not a panic.
    ///
    /// ```
    /// # use futures::{stream, StreamExt};
    /// # use par_imap::ParImapExt;
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() {
    /// let first = stream::iter([0]).par_imap(1, |_: i32| -> i32 { panic!("boom") });
    /// let error = first.boxed().next().await.unwrap().unwrap_err();
    /// let payload = error.try_into_panic().unwrap();
    /// assert_eq!(payload.downcast_ref::<&str>(), Some(&"boom"));
    /// # }
    /// ```
    pub fn try_into_panic(self) -> Result<Box<dyn Any + Send + 'static>, Error> {
        match self.inner.repr {
            Repr::Panic { payload, .. } => Ok(payload
                .into_inner()
                .unwrap_or_else(|poisoned| poisoned.into_inner())),
            _ => Err(self),
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.inner.repr {
            Repr::Panic {
                message: Some(message),
                ..
            } => write!(f, "item {} panicked: {message}", self.inner.index),
            Repr::Panic { message: None, .. } => write!(f, "item {} panicked", self.inner.index),
            Repr::Timeout => write!(f, "item {} timed out", self.inner.index),
            Repr::Cancelled => write!(f, "item {} cancelled", self.inner.index),
        }
    }
}

impl fmt::Debug for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut debug = f.debug_struct("Error");
        debug.field("index", &self.inner.index);
        match &self.inner.repr {
            Repr::Panic { message, .. } => debug.field("panic", message),
            Repr::Timeout => debug.field("timeout", &true),
            Repr::Cancelled => debug.field("cancelled", &true),
        };
        debug.finish()
    }
}

impl std::error::Error for Error {}

/// An `Error` as an [`io::Error`](std::io::Error), so that `try_` closures
/// returning [`std::io::Result`] work as they are.
///
/// The kind is [`TimedOut`](std::io::ErrorKind::TimedOut) for a timeout and
/// [`Other`](std::io::ErrorKind::Other) for a panic or a cancellation.
/// Not `Interrupted` for a cancellation: std's own I/O loops (`read_exact`,
/// `write_all`, `io::copy`) retry on `Interrupted`, as for `EINTR`, and a
/// cancelled map must not be retried. The `Error` itself is kept as the
/// inner error: `get_ref`/`into_inner` and a downcast give back its index and
/// what happened.
///
/// ```
/// use std::io;
/// use futures::{stream, StreamExt};
/// use par_imap::ParImapExt;
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// let lengths: Vec<io::Result<usize>> = stream::iter(["Cargo.toml", "no such file"])
///     .try_par_imap(2, |path: &str| Ok(std::fs::read(path)?.len()))
///     .collect()
///     .await;
/// assert!(lengths[0].is_ok());
/// assert_eq!(lengths[1].as_ref().unwrap_err().kind(), io::ErrorKind::NotFound);
///
/// let panicked = stream::iter([0])
///     .try_par_imap(1, |_: i32| -> io::Result<i32> { panic!("boom") })
///     .next()
///     .await
///     .unwrap()
///     .unwrap_err();
/// let error = panicked.get_ref().and_then(|inner| inner.downcast_ref::<par_imap::Error>());
/// assert!(error.is_some_and(|error| error.is_panic() && error.index() == 0));
/// # }
/// ```
impl From<Error> for std::io::Error {
    fn from(error: Error) -> Self {
        let kind = if error.is_timeout() {
            std::io::ErrorKind::TimedOut
        } else {
            std::io::ErrorKind::Other
        };
        std::io::Error::new(kind, error)
    }
}

/// Drops `value` where a panic of its `Drop` (user code: an input item, an
/// output) must not unwind: in the consumer's `poll_next`, in the map's
/// `Drop`, on a worker between items. Used only for values nobody wants any
/// more, so the panic is ignored (the panic hook has printed it).
pub(crate) fn drop_contained<X>(value: X) {
    let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || drop(value)));
}

/// Drops each of `values` as [`drop_contained`] does: a collection whose
/// values' `Drop` panic must not be dropped whole, since a second panic
/// while the first unwinds aborts the process.
pub(crate) fn drop_each<I: IntoIterator>(values: I) {
    for value in values {
        drop_contained(value);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every result crosses from a worker to the consumer: an `Error` must
    /// not make a small output's `Result` several cache lines' worth.
    #[test]
    fn a_result_of_a_word_is_two_words() {
        assert_eq!(size_of::<Error>(), size_of::<usize>());
        assert_eq!(size_of::<Result<u64, Error>>(), 2 * size_of::<u64>());
    }

    #[test]
    fn try_into_panic_gives_back_an_error_that_is_not_a_panic_unchanged() {
        let error = Error::timeout(7).try_into_panic().unwrap_err();
        assert!(error.is_timeout());
        assert_eq!(error.index(), 7);
        let payload = Error::panic(3, Box::new("boom")).try_into_panic().unwrap();
        assert_eq!(payload.downcast_ref::<&str>(), Some(&"boom"));
    }
}
