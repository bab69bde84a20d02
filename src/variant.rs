//! The variants of a map: the tags that name them in the stream's type
//! (public as `par_imap::kind`), and what each tag means:
//! which runner runs the calls, which outputs fail the map, what the
//! stream yields, and whether calls take batches.

use std::fmt;
use std::future::Future;
use std::marker::PhantomData;

use crate::blocking::{self, Mapper};
use crate::error::Error;
use crate::retry::Retry;
use crate::spawn::Spawn;
use crate::task::Tasks;

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

/// The mapper returns a future, each call run in a tokio task of the map's own.
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

/// How calls of a plain (not `try_`) variant run, by tag.
pub trait Runs<T, F> {
    /// What runs the calls.
    type Runner: Spawn<T>;

    /// The runner for `mapper` with at most `limit` calls at once.
    fn runner(mapper: F, limit: usize) -> Self::Runner;
}

impl<T, F> Runs<T, F> for Blocking
where
    T: Send + 'static,
    F: Mapper<T>,
    F::Output: Send + 'static,
{
    type Runner = blocking::BlockingRunner<T, F>;

    fn runner(mapper: F, limit: usize) -> Self::Runner {
        blocking::BlockingRunner::new(mapper, limit)
    }
}

impl<T, F, Fut> Runs<T, F> for Async
where
    T: Send + 'static,
    F: Fn(T) -> Fut + Send + Sync + 'static,
    Fut: Future + Send + 'static,
    Fut::Output: Send + 'static,
{
    type Runner = Tasks<T, F, Fut::Output>;

    fn runner(mapper: F, _limit: usize) -> Self::Runner {
        Tasks::new(mapper)
    }
}

/// What a variant's output means: which outputs fail the map, and what the
/// stream yields for it.
///
/// Sealed: it is `pub` because [`ParImap`](crate::ParImap)'s impls name it
/// in their bounds, but it lives in this private module, so no code outside
/// the crate can name it, let alone implement it. The four tags above are
/// its only implementors, and a new method here breaks no user. The same
/// holds for [`Runs`], [`Spawn`] and [`Mapper`]: `unreachable_pub` counts
/// them reachable through those bounds, and everything the engine uses
/// only inside the crate is `pub(crate)`.
pub trait Kind<T, F> {
    /// What runs the calls.
    type Runner: Spawn<T>;
    /// What the stream yields.
    type Item;
    /// The stream's error type: what a `.retry` predicate sees.
    type Error;

    /// The runner for `mapper` with at most `limit` calls at once.
    fn runner(mapper: F, limit: usize) -> Self::Runner;

    /// Whether this result is a failure (fail-fast, or `.keep_going()`).
    fn is_failure(result: &Result<Output<Self, T, F>, Error>) -> bool;

    /// The stream item for this result.
    fn into_item(result: Result<Output<Self, T, F>, Error>) -> Self::Item;

    /// Whether `retry` tries this failed attempt again (`.retry`): an `Err`
    /// or a timeout, a panic only if it retries panics, never a
    /// cancellation; and only what its predicate accepts.
    fn is_retryable(result: &Result<Output<Self, T, F>, Error>, retry: &Retry<Self::Error>)
    -> bool;
}

/// Whether a failure of the machinery may be retried, and the error a
/// predicate of type `E` sees for it.
fn machinery_retryable<E: From<Error>>(error: &Error, retry: &Retry<E>) -> bool {
    if error.is_cancelled() || (error.is_panic() && !retry.retries_panics()) {
        return false;
    }
    error
        .duplicate()
        .is_some_and(|copy| retry.accepts(&E::from(copy)))
}

/// The output of one item of kind `K`.
pub(crate) type Output<K, T, F> = <<K as Kind<T, F>>::Runner as Spawn<T>>::Output;

/// Plain variants: every value is a success; only the machinery fails.
macro_rules! plain_kind {
    ($tag:ty) => {
        impl<T, F> Kind<T, F> for $tag
        where
            $tag: Runs<T, F>,
        {
            type Runner = <$tag as Runs<T, F>>::Runner;
            type Item = Result<Output<Self, T, F>, Error>;
            type Error = Error;

            fn runner(mapper: F, limit: usize) -> Self::Runner {
                <$tag as Runs<T, F>>::runner(mapper, limit)
            }

            fn is_failure(result: &Result<Output<Self, T, F>, Error>) -> bool {
                result.is_err()
            }

            fn into_item(result: Result<Output<Self, T, F>, Error>) -> Self::Item {
                result
            }

            fn is_retryable(
                result: &Result<Output<Self, T, F>, Error>,
                retry: &Retry<Error>,
            ) -> bool {
                match result {
                    Ok(_) => false,
                    Err(error) => machinery_retryable(error, retry),
                }
            }
        }
    };
}

plain_kind!(Blocking);
plain_kind!(Async);

impl<T, F, S, V, E> Kind<T, F> for Try<S>
where
    S: Runs<T, F>,
    S::Runner: Spawn<T, Output = Result<V, E>>,
    E: From<Error>,
{
    type Runner = S::Runner;
    type Item = Result<V, E>;
    type Error = E;

    fn runner(mapper: F, limit: usize) -> Self::Runner {
        S::runner(mapper, limit)
    }

    fn is_failure(result: &Result<Result<V, E>, Error>) -> bool {
        !matches!(result, Ok(Ok(_)))
    }

    fn into_item(result: Result<Result<V, E>, Error>) -> Self::Item {
        result.unwrap_or_else(|error| Err(E::from(error)))
    }

    fn is_retryable(result: &Result<Result<V, E>, Error>, retry: &Retry<E>) -> bool {
        match result {
            Ok(Ok(_)) => false,
            Ok(Err(error)) => retry.accepts(error),
            Err(error) => machinery_retryable(error, retry),
        }
    }
}

/// The variants whose limit may adapt: the async ones.
pub trait Adapting {}

impl Adapting for Async {}
impl Adapting for Try<Async> {}

/// The variants whose calls may take several items: the blocking ones.
pub trait Batching {}

impl Batching for Blocking {}
impl Batching for Try<Blocking> {}
