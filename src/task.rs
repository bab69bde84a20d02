//! Async calls: each call one tokio task, whose join handle brings its
//! report back and aborts it when the map no longer wants it.

use std::fmt;
use std::future::Future;
use std::future::poll_fn;
use std::marker::PhantomData;
use std::panic::AssertUnwindSafe;
use std::pin::{Pin, pin};
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use futures::stream::FuturesUnordered;
use futures::{FutureExt, StreamExt};
use tokio::runtime::Handle;
use tokio::task::{JoinError, JoinHandle};
use tokio::time::Instant;

use crate::batch::Batch;
use crate::call::{Call, Event};
use crate::error::Error;
use crate::spawn::{IsFailure, Spawn};
use crate::trace;

/// The runner of the async variants: the mapper, shared by the tasks, and
/// the join handles of the tasks running.
pub struct Tasks<T, F, U> {
    mapper: Arc<F>,
    running: FuturesUnordered<Report<U>>,
    items: PhantomData<fn(T)>,
}

impl<T, F, U> fmt::Debug for Tasks<T, F, U> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Tasks")
            .field("running", &self.running.len())
            .finish()
    }
}

impl<T, F, U> Tasks<T, F, U> {
    /// Aborts the running tasks of the calls from item `index` on.
    fn abort_running(&self, index: usize) {
        for report in self.running.iter().filter(|report| report.call >= index) {
            report.handle.abort();
        }
    }

    pub(crate) fn new(mapper: F) -> Self {
        Tasks {
            mapper: Arc::new(mapper),
            running: FuturesUnordered::new(),
            items: PhantomData,
        }
    }
}

/// The report of call `call`, read from its task's join handle.
struct Report<U> {
    call: usize,
    handle: JoinHandle<Event<U>>,
}

impl<U> Future for Report<U> {
    type Output = Event<U>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Event<U>> {
        let call = self.call;
        Poll::Ready(match ready!(self.handle.poll_unpin(cx)) {
            Ok(event) => event,
            // Aborted by the engine (which no longer waits for it), or torn
            // down with its runtime: a cancellation the map did not ask for.
            Err(error) => Event::torn_down(call, call, torn_down(call, error)),
        })
    }
}

/// What a task that ended without its report stands for: the mapper's
/// panics are caught inside the task, so only the machinery panics here.
fn torn_down(call: usize, error: JoinError) -> Error {
    match error.try_into_panic() {
        Ok(payload) => Error::panic(call, payload),
        Err(_cancelled) => Error::cancelled(call),
    }
}

impl<T, F, Fut> Spawn<T> for Tasks<T, F, Fut::Output>
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
        &mut self,
        runtime: &Handle,
        items: Batch<T>,
        mut call: Call<Fut::Output>,
        is_failure: IsFailure<Fut::Output>,
    ) {
        let mapper = Arc::clone(&self.mapper);
        let first = call.first();
        let attempt = call.attempt_number();
        let item = match items {
            Batch::One(item) => item,
            // `BATCHES` is false: the engine's sizer is fixed at one item,
            // and only given-back items (blocking calls) are ever split.
            Batch::Many(_) => unreachable!("par_imap: an async call takes one item"),
        };
        let task = async move {
            if let Some(budget) = call.shared().budget() {
                // Taken inside the task: an aborted or dropped call leaves
                // no waiting acquire behind. Boxed: most maps have no
                // budget, and the task stays small without it.
                match Box::pin(Arc::clone(budget).acquire_owned()).await {
                    Ok(permit) => call.hold(permit),
                    Err(_closed) => return call.finish_one(Err(Error::cancelled(first))),
                }
            }
            if call.is_unwanted() {
                return call.skip();
            }
            call.start();
            // The mapper is called inside the task, so an aborted task that
            // never ran never calls it; and inside `catch_unwind` too: a
            // panic while making the future is an error of its item as well.
            let mapped = AssertUnwindSafe(async move { mapper(item).await }).catch_unwind();
            // The call keeps its own deadline, so it ends (and gives its
            // permit back) at its deadline even while nobody polls the map.
            // A deadline past the clock's range is none. The timer is boxed
            // for the same reason as the budget's wait.
            let deadline = call
                .shared()
                .timeout()
                .and_then(|timeout| Instant::now().checked_add(timeout));
            // With a token, the call also ends when the map ends (the token's
            // watch ends it when the token is cancelled), polled or not.
            let closed = call
                .shared()
                .has_token()
                .then(|| call.shared().closed().clone());
            let result = match (deadline, closed) {
                (None, None) => mapped.await.map_err(|payload| Error::panic(first, payload)),
                (deadline, closed) => {
                    // In a block of its own: the future is dropped at its
                    // end, before the call gives its permit back.
                    let stopped = {
                        let mut mapped = pin!(mapped);
                        let mut expired = deadline.map(|at| Box::pin(tokio::time::sleep_until(at)));
                        let mut closed = closed.map(|closed| Box::pin(closed.cancelled_owned()));
                        poll_fn(|cx| {
                            if let Some(closed) = &mut closed {
                                if closed.as_mut().poll(cx).is_ready() {
                                    return Poll::Ready(None);
                                }
                            }
                            match mapped.as_mut().poll(cx) {
                                Poll::Ready(result) => Poll::Ready(Some(
                                    result.map_err(|payload| Error::panic(first, payload)),
                                )),
                                Poll::Pending => match &mut expired {
                                    Some(expired) => expired
                                        .as_mut()
                                        .poll(cx)
                                        .map(|()| Some(Err(Error::timeout(first)))),
                                    None => Poll::Pending,
                                },
                            }
                        })
                        .await
                    };
                    match stopped {
                        Some(result) => result,
                        // Nobody wants the item: its future is dropped
                        // already, before its permit is given back.
                        None => return call.skip(),
                    }
                }
            };
            if is_failure(&result) && call.cuts_off(&result) {
                call.failed_at(first);
            }
            call.finish_one(result)
        };
        let handle = runtime.spawn(trace::instrument(trace::call_span(first, attempt), task));
        self.running.push(Report {
            call: first,
            handle,
        });
    }

    /// One pass over the running tasks: only after a failure.
    fn abort_from(&mut self, index: usize) {
        self.abort_running(index);
    }

    fn poll_report(&mut self, cx: &mut Context<'_>, _wait: bool) -> Poll<Event<Fut::Output>> {
        match self.running.poll_next_unpin(cx) {
            Poll::Ready(Some(event)) => Poll::Ready(event),
            // None running: nothing to wake the map for.
            Poll::Ready(None) | Poll::Pending => Poll::Pending,
        }
    }

    fn close(&mut self) {
        self.abort_from(0);
        self.running.clear();
    }
}

impl<T, F, U> Drop for Tasks<T, F, U> {
    /// Dropping the map aborts its running calls.
    fn drop(&mut self) {
        self.abort_running(0);
    }
}
