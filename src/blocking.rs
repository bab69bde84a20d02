//! Blocking calls: the mapper, the job that maps one call's items on a
//! worker thread, and the runner that feeds the [`workers`](crate::workers).
#![allow(unreachable_pub)]

use std::fmt;
use std::future::Future;
use std::marker::PhantomData;
use std::panic::{self, AssertUnwindSafe};
use std::pin::pin;
use std::sync::Arc;
use std::task::{Context, Poll, Wake, Waker};
use std::thread::{self, Thread};

use tokio::runtime::Handle;
use tokio::sync::mpsc::{self, UnboundedReceiver, UnboundedSender};
use tokio::sync::{AcquireError, OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;

use crate::Error;
use crate::batch::Batch;
use crate::call::{Call, Current, Event, Progress};
use crate::spawn::{IsFailure, Spawn};
use crate::trace;
use crate::workers::{Job, Workers};

/// The function a blocking call applies to each of its items: a closure,
/// or a closure with per-worker state ([`WithInit`](crate::WithInit)).
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

/// The runner of the blocking variants: at most `limit` long-lived
/// workers, and the channel on which their calls report.
pub struct Blocking<T, F>
where
    T: Send + 'static,
    F: Mapper<T>,
    F::Output: Send + 'static,
{
    workers: Workers<BlockingJob<T, F>>,
    report: UnboundedSender<Event<T, F::Output>>,
    reports: UnboundedReceiver<Event<T, F::Output>>,
}

impl<T, F> Blocking<T, F>
where
    T: Send + 'static,
    F: Mapper<T>,
    F::Output: Send + 'static,
{
    pub(crate) fn new(mapper: F, limit: usize) -> Self {
        let (report, reports) = mpsc::unbounded_channel();
        Blocking {
            workers: Workers::new(mapper, limit),
            report,
            reports,
        }
    }
}

impl<T, F> fmt::Debug for Blocking<T, F>
where
    T: Send + 'static,
    F: Mapper<T>,
    F::Output: Send + 'static,
{
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Blocking")
            .field("workers", &self.workers)
            .finish()
    }
}

impl<T, F> Spawn<T> for Blocking<T, F>
where
    T: Send + 'static,
    F: Mapper<T>,
    F::Output: Send + 'static,
{
    type Output = F::Output;
    const BATCHES: bool = true;

    fn spawn(
        &mut self,
        runtime: &Handle,
        items: Batch<T>,
        mut call: Call<T, F::Output>,
        is_failure: IsFailure<F::Output>,
    ) {
        call.report_to(self.report.clone());
        let job = BlockingJob {
            items,
            call,
            is_failure,
            mapper: PhantomData,
        };
        if let Some(worker) = self.workers.push(job) {
            // A runtime shutting down drops the closure unrun: the worker
            // gives its place back and its jobs report themselves cancelled.
            runtime.spawn_blocking(move || worker.run());
        }
    }

    /// A blocking call cannot be aborted: it sees the cutoff (and
    /// `is_cancelled()`) and stops at its next item.
    fn abort_from(&mut self, _index: usize) {}

    fn poll_report(&mut self, cx: &mut Context<'_>, wait: bool) -> Poll<Event<T, F::Output>> {
        // Registering the waker costs more than the rest of a poll: only
        // when the map is about to wait.
        let event = if wait {
            self.reports.poll_recv(cx)
        } else {
            Poll::Ready(self.reports.try_recv().ok())
        };
        match event {
            Poll::Ready(Some(event)) => Poll::Ready(event),
            // The runner holds a sender: the channel closes only in `close`.
            Poll::Ready(None) | Poll::Pending => Poll::Pending,
        }
    }

    fn close(&mut self) {
        self.workers.close();
        // Reports still queued (items given back, outputs of calls that
        // ended late) are dropped now; later ones by their senders.
        self.reports.close();
        while self.reports.try_recv().is_ok() {}
    }
}

/// One call on a worker: its items, its ticket, and what counts as a failure.
pub struct BlockingJob<T, F: Mapper<T>> {
    items: Batch<T>,
    call: Call<T, F::Output>,
    is_failure: IsFailure<F::Output>,
    mapper: PhantomData<fn() -> F>,
}

impl<T, F> Job for BlockingJob<T, F>
where
    T: Send + 'static,
    F: Mapper<T>,
    F::Output: Send + 'static,
{
    type Shared = F;

    /// Maps the items in order, stopping at the first item the map no
    /// longer wants; the rest are dropped unmapped.
    fn run(self, mapper: &F) {
        let BlockingJob {
            items,
            mut call,
            is_failure,
            ..
        } = self;
        let event = map_call(&mut call, items, mapper, is_failure);
        call.send(event);
    }
}

/// Maps a call's items in order, stopping at the first item the map no
/// longer wants (the rest are dropped unmapped); returns its report.
fn map_call<T, F: Mapper<T>>(
    call: &mut Call<T, F::Output>,
    items: Batch<T>,
    mapper: &F,
    is_failure: IsFailure<F::Output>,
) -> Event<T, F::Output>
where
    F::Output: Send + 'static,
{
    let first = call.first();
    if call.is_unwanted() {
        return call.skip();
    }
    if let Some(budget) = call.shared().budget() {
        match wait_for_permit(budget, call.shared().ended()) {
            Some(Ok(permit)) => call.hold(permit),
            Some(Err(_closed)) => return call.finish_one(Err(Error::cancelled(first))),
            None => return call.skip(),
        }
        if call.is_unwanted() {
            return call.skip();
        }
    }
    call.start();
    let _span = trace::call_span(first).entered();
    let current = Current::enter(call);
    let call_ref = &*call;
    let map_one = |index: usize, item: T| {
        let result = panic::catch_unwind(AssertUnwindSafe(|| mapper.call(item)))
            .map_err(|payload| Error::panic(index, payload));
        if is_failure(&result) {
            call_ref.failed_at(index);
        }
        result
    };
    // With deadlines the result goes to the progress, which turns it into a
    // timeout if the item ran past its deadline.
    let settle =
        |index: usize, result: Result<F::Output, Error>, progress: &Progress<F::Output>| {
            if progress.end(index, result) {
                call_ref.failed_at(index);
            }
        };
    let mut mapped = 0;
    let results = match items {
        Batch::One(item) => {
            let result = map_one(first, item);
            drop(current);
            return match call.progress() {
                Some(progress) => {
                    settle(first, result, progress);
                    call.finish(Vec::new(), 1)
                }
                None => call.finish_one(result),
            };
        }
        Batch::Many(items) => {
            let mut results = Vec::new();
            if call.progress().is_none() {
                results.reserve_exact(items.len());
            }
            let mut items = items.into_iter();
            let mut index = first;
            while let Some(item) = items.next() {
                // A failure (here or in another call) or the end of the
                // map: what is left is dropped unmapped.
                if index > first && call.is_cut_off(index) {
                    break;
                }
                current.item(index);
                let progress = call.progress();
                if let (Some(progress), true) = (progress, index > first) {
                    progress.begin(index);
                }
                let result = map_one(index, item);
                mapped += 1;
                match call.progress() {
                    Some(progress) => settle(index, result, progress),
                    None => results.push(result),
                }
                index += 1;
                // Reading the clock costs about as much as a short item:
                // every item at first, then every eighth.
                if items.len() > 0
                    && (mapped < 16 || mapped % 8 == 0)
                    && !call.is_cut_off(index)
                    && call.should_give_back()
                {
                    drop(current);
                    return call.give_back(results, items.collect());
                }
            }
            results
        }
    };
    drop(current);
    call.finish(results, mapped)
}

/// Waits on this worker thread for a permit of the budget, or for the map
/// to end (`None`). The wait is part of the call: a permit is taken only to
/// run the call at once, and given back when it ends.
fn wait_for_permit(
    budget: &Arc<Semaphore>,
    ended: &CancellationToken,
) -> Option<Result<OwnedSemaphorePermit, AcquireError>> {
    if let Ok(permit) = Arc::clone(budget).try_acquire_owned() {
        return Some(Ok(permit));
    }
    let mut acquire = pin!(Arc::clone(budget).acquire_owned());
    let mut ended = pin!(ended.cancelled());
    block_on(std::future::poll_fn(|cx| {
        if ended.as_mut().poll(cx).is_ready() {
            return Poll::Ready(None);
        }
        acquire.as_mut().poll(cx).map(Some)
    }))
}

/// Wakes the parked worker thread.
struct Unpark(Thread);

impl Wake for Unpark {
    fn wake(self: Arc<Self>) {
        self.0.unpark();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.0.unpark();
    }
}

/// Runs `future` on this thread, parking it while the future waits. For
/// futures that need no runtime driver (a semaphore, a token), so that it
/// works even while the runtime shuts down.
fn block_on<F: Future>(future: F) -> F::Output {
    let mut future = pin!(future);
    let waker = Waker::from(Arc::new(Unpark(thread::current())));
    let mut cx = Context::from_waker(&waker);
    loop {
        if let Poll::Ready(output) = future.as_mut().poll(&mut cx) {
            return output;
        }
        thread::park();
    }
}
