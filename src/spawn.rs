//! The seams between the variants: how one mapper call runs (on the blocking
//! workers or as an async task), what the mapper is (a closure, or a closure
//! with per-worker state), and what its output means (plain value or
//! `Result`).
//!
//! Everything here is `pub` inside a private module: the public stream type
//! names these traits in its bounds, yet no user can name or implement them.
#![allow(unreachable_pub)]

use std::future::Future;

use futures::FutureExt;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use tokio::runtime::Handle;
use tokio_util::task::AbortOnDropHandle;

use crate::Error;
use crate::call::{Batch, Call, IsFailure};
use crate::kind::{Async, Blocking, Try};
use crate::trace;
use crate::workers::Workers;

/// The function a blocking call applies to each of its items.
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

/// How mapper calls run.
pub trait Spawn<T, F> {
    /// What one item maps to.
    type Output: Send + 'static;
    /// What runs the calls of one map, owned by its stream.
    type Runner: Send;
    /// Whether a call may take several items (`.batch`), and whether calls
    /// may wait in a queue for a free worker.
    const QUEUES: bool;

    /// The runner for `mapper` with at most `limit` calls at once.
    fn runner(mapper: F, limit: usize) -> Self::Runner;

    /// Starts the call of the mapper on `items`; the handle, if any, aborts it.
    fn spawn(
        runner: &Self::Runner,
        runtime: &Handle,
        items: Batch<T>,
        call: Call<Self::Output>,
        is_failure: IsFailure<Self::Output>,
    ) -> Option<AbortOnDropHandle<()>>;
}

impl<T, F> Spawn<T, F> for Blocking
where
    T: Send + 'static,
    F: Mapper<T>,
    F::Output: Send + 'static,
{
    type Output = F::Output;
    type Runner = Workers<T, F>;
    const QUEUES: bool = true;

    fn runner(mapper: F, limit: usize) -> Workers<T, F> {
        Workers::new(mapper, limit)
    }

    fn spawn(
        runner: &Workers<T, F>,
        runtime: &Handle,
        items: Batch<T>,
        call: Call<F::Output>,
        is_failure: IsFailure<F::Output>,
    ) -> Option<AbortOnDropHandle<()>> {
        runner.push(runtime, items, call, is_failure);
        None
    }
}

impl<T, F, Fut> Spawn<T, F> for Async
where
    T: Send + 'static,
    F: Fn(T) -> Fut + Send + Sync + 'static,
    Fut: Future + Send + 'static,
    Fut::Output: Send + 'static,
{
    type Output = Fut::Output;
    type Runner = Arc<F>;
    const QUEUES: bool = false;

    fn runner(mapper: F, _limit: usize) -> Arc<F> {
        Arc::new(mapper)
    }

    fn spawn(
        mapper: &Arc<F>,
        runtime: &Handle,
        items: Batch<T>,
        call: Call<Fut::Output>,
        _is_failure: IsFailure<Fut::Output>,
    ) -> Option<AbortOnDropHandle<()>> {
        let mapper = Arc::clone(mapper);
        let index = call.first();
        let task = runtime.spawn(trace::instrument(trace::call_span(index), async move {
            let mut call = call;
            call.start();
            // Async calls take one item each. The mapper itself is called
            // inside the task, so an aborted task that never ran never calls it.
            let result = AssertUnwindSafe(async move {
                // The engine never batches async calls (`QUEUES` is false).
                let item = items.into_iter().next();
                mapper(item.expect("an async call has one item")).await
            })
            .catch_unwind()
            .await;
            call.finish(Batch::One(
                result.map_err(|payload| Error::panic(index, payload)),
            ));
        }));
        Some(AbortOnDropHandle::new(task))
    }
}

/// What a call's output means: which outputs fail the map, and what the
/// stream yields for it.
pub trait Kind<T, F> {
    /// How calls run.
    type Spawner: Spawn<T, F>;
    /// What the stream yields.
    type Item;

    /// Whether this result fails the map (fail-fast).
    fn is_failure(result: &Result<Output<Self, T, F>, Error>) -> bool;

    /// The stream item for this result.
    fn into_item(result: Result<Output<Self, T, F>, Error>) -> Self::Item;
}

/// The output of one item of kind `K`.
pub type Output<K, T, F> = <<K as Kind<T, F>>::Spawner as Spawn<T, F>>::Output;

/// The runner of kind `K`.
pub type Runner<K, T, F> = <<K as Kind<T, F>>::Spawner as Spawn<T, F>>::Runner;

/// Plain variants: every value is a success; only the machinery fails.
macro_rules! plain_kind {
    ($spawner:ty) => {
        impl<T, F> Kind<T, F> for $spawner
        where
            $spawner: Spawn<T, F>,
        {
            type Spawner = $spawner;
            type Item = Result<Output<Self, T, F>, Error>;

            fn is_failure(result: &Result<Output<Self, T, F>, Error>) -> bool {
                result.is_err()
            }

            fn into_item(result: Result<Output<Self, T, F>, Error>) -> Self::Item {
                result
            }
        }
    };
}

plain_kind!(Blocking);
plain_kind!(Async);

impl<T, F, S, V, E> Kind<T, F> for Try<S>
where
    S: Spawn<T, F, Output = Result<V, E>>,
    E: From<Error>,
{
    type Spawner = S;
    type Item = Result<V, E>;

    fn is_failure(result: &Result<Result<V, E>, Error>) -> bool {
        !matches!(result, Ok(Ok(_)))
    }

    fn into_item(result: Result<Result<V, E>, Error>) -> Self::Item {
        result.unwrap_or_else(|error| Err(E::from(error)))
    }
}

/// The kinds whose calls may take several items: the blocking ones.
pub trait Batching {}

impl Batching for Blocking {}
impl Batching for Try<Blocking> {}
