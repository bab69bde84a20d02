//! Async calls: each call one tokio task, aborted when its handle drops.
#![allow(unreachable_pub)]

use std::fmt;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;

use futures::FutureExt;
use tokio::runtime::Handle;
use tokio::time::Instant;
use tokio_util::task::AbortOnDropHandle;

use crate::Error;
use crate::batch::Batch;
use crate::call::Call;
use crate::spawn::{IsFailure, Spawn};
use crate::trace;

/// The runner of the async variants: the mapper, shared by the tasks.
pub struct Tasks<F> {
    mapper: Arc<F>,
}

impl<F> fmt::Debug for Tasks<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Tasks")
    }
}

impl<F> Tasks<F> {
    pub(crate) fn new(mapper: F) -> Self {
        Tasks {
            mapper: Arc::new(mapper),
        }
    }
}

impl<T, F, Fut> Spawn<T> for Tasks<F>
where
    T: Send + 'static,
    F: Fn(T) -> Fut + Send + Sync + 'static,
    Fut: Future + Send + 'static,
    Fut::Output: Send + 'static,
{
    type Output = Fut::Output;
    /// One item per call: an async call waits without holding a thread, so
    /// there is no dispatch cost to spread.
    const BATCHES: bool = false;

    fn spawn(
        &self,
        runtime: &Handle,
        items: Batch<T>,
        call: Call<T, Fut::Output>,
        is_failure: IsFailure<Fut::Output>,
    ) -> Option<AbortOnDropHandle<()>> {
        let mapper = Arc::clone(&self.mapper);
        let first = call.first();
        let task = async move {
            let mut call = call;
            if let Some(budget) = call.shared().budget() {
                let budget = Arc::clone(budget);
                // Taken inside the task: an aborted or dropped call leaves
                // no waiting acquire behind.
                match budget.acquire_owned().await {
                    Ok(permit) => call.hold(permit),
                    Err(_closed) => return call.finish_one(Err(Error::cancelled(first))),
                }
            }
            if call.is_unwanted() {
                return call.skip();
            }
            call.start();
            // The mapper is called inside the task, so an aborted task that
            // never ran never calls it.
            let mapper = &mapper;
            let timeout = call.shared().timeout();
            let map_one = |index: usize, item: T| async move {
                // The mapper is called inside `catch_unwind` too: a panic
                // while making the future is an error of its item as well.
                let mapped = AssertUnwindSafe(async move { mapper(item).await }).catch_unwind();
                // The call keeps its own deadline, so it ends (and gives its
                // permit back) at its deadline even while nobody polls the
                // map. A deadline past the clock's range is none.
                let deadline = timeout.and_then(|timeout| Instant::now().checked_add(timeout));
                let result = match deadline {
                    Some(deadline) => match tokio::time::timeout_at(deadline, mapped).await {
                        Ok(result) => result.map_err(|payload| Error::panic(index, payload)),
                        Err(_elapsed) => Err(Error::timeout(index)),
                    },
                    None => mapped.await.map_err(|payload| Error::panic(index, payload)),
                };
                (is_failure(&result), result)
            };
            match items {
                Batch::One(item) => {
                    let (failed, result) = map_one(first, item).await;
                    if failed {
                        call.failed_at(first);
                    }
                    call.finish_one(result);
                }
                // Not made by the engine (`BATCHES` is false), but correct:
                // the items one after another.
                Batch::Many(items) => {
                    let mut results = Vec::with_capacity(items.len());
                    for (index, item) in (first..).zip(items) {
                        if index > first && call.is_cut_off(index) {
                            break;
                        }
                        let (failed, result) = map_one(index, item).await;
                        if failed {
                            call.failed_at(index);
                        }
                        results.push(result);
                    }
                    let mapped = results.len();
                    call.finish(results, mapped);
                }
            }
        };
        let task = runtime.spawn(trace::instrument(trace::call_span(first), task));
        Some(AbortOnDropHandle::new(task))
    }

    fn close(&self) {}
}
