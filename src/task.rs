//! Async calls: each runs in one of the map's own tokio tasks, its
//! *workers*. A worker maps one call at a time and is handed the next by
//! the map once it has finished; a call is reported on the runner's
//! channel (also when its worker is aborted or torn down: the call's ticket
//! reports itself). Aborting a call aborts the worker that runs it; the map
//! hires another when it needs one. Long-lived workers spare each call a
//! task's allocation, spawn and join handle.

use std::fmt;
use std::future::Future;
use std::future::poll_fn;
use std::panic::AssertUnwindSafe;
use std::pin::pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};

use futures::FutureExt;
use futures::task::AtomicWaker;
use tokio::runtime::Handle;
use tokio::task::AbortHandle;
use tokio::time::Instant;

use crate::batch::Batch;
use crate::call::{Call, Event, Reports, WorkerId};
use crate::error::{Error, drop_contained};
use crate::spawn::{IsFailure, Spawn};
use crate::trace;

/// The runner of the async variants: the mapper, shared by the workers,
/// the workers, and the channel on which their calls report.
pub struct Tasks<T, F, U> {
    mapper: Arc<F>,
    workers: Vec<Worker<T, U>>,
    /// Workers with no call, ready for the next.
    idle: Vec<usize>,
    /// Places of workers that were aborted, for the next hired.
    vacant: Vec<usize>,
    reports: Reports<U>,
}

/// One call for a worker: the call's ticket first, so that a job dropped
/// unrun reports its call cancelled before its item's `Drop` runs.
struct Job<T, U> {
    call: Call<U>,
    item: T,
    is_failure: IsFailure<U>,
}

/// The one job a worker is handed at a time.
struct Mailbox<J> {
    slot: Mutex<Slot<J>>,
    waker: AtomicWaker,
}

struct Slot<J> {
    job: Option<J>,
    /// The worker is gone: nothing more goes in.
    closed: bool,
}

impl<J> Mailbox<J> {
    fn new() -> Self {
        Mailbox {
            slot: Mutex::new(Slot {
                job: None,
                closed: false,
            }),
            waker: AtomicWaker::new(),
        }
    }

    fn slot(&self) -> std::sync::MutexGuard<'_, Slot<J>> {
        self.slot.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Hands `job` to the worker; gives it back if the worker is gone.
    fn put(&self, job: J) -> Result<(), J> {
        {
            let mut slot = self.slot();
            if slot.closed {
                return Err(job);
            }
            debug_assert!(slot.job.is_none(), "par_imap: a busy worker handed a call");
            slot.job = Some(job);
        }
        self.waker.wake();
        Ok(())
    }

    /// The worker's next job, once there is one.
    fn poll_take(&self, cx: &mut Context<'_>) -> Poll<J> {
        if let Some(job) = self.slot().job.take() {
            return Poll::Ready(job);
        }
        self.waker.register(cx.waker());
        match self.slot().job.take() {
            Some(job) => Poll::Ready(job),
            None => Poll::Pending,
        }
    }

    /// Nothing more goes in; the job not taken, if any, comes back.
    fn close(&self) -> Option<J> {
        let mut slot = self.slot();
        slot.closed = true;
        slot.job.take()
    }
}

/// Closes a worker's mailbox when the worker goes (aborted, or torn down
/// with its runtime): a job still in it is dropped, and its call reports
/// itself cancelled.
struct Closing<J>(Arc<Mailbox<J>>);

impl<J> Drop for Closing<J> {
    fn drop(&mut self) {
        drop_contained(self.0.close());
    }
}

/// The runner's side of one worker.
struct Worker<T, U> {
    mailbox: Arc<Mailbox<Job<T, U>>>,
    task: AbortHandle,
    generation: u64,
    /// The call it runs, if any.
    call: Option<usize>,
}

impl<T, F, U> fmt::Debug for Tasks<T, F, U> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Tasks")
            .field("workers", &self.workers.len())
            .field("idle", &self.idle.len())
            .finish()
    }
}

impl<T, F, U> Tasks<T, F, U> {
    pub(crate) fn new(mapper: F) -> Self {
        Tasks {
            mapper: Arc::new(mapper),
            workers: Vec::new(),
            idle: Vec::new(),
            vacant: Vec::new(),
            reports: Reports::new(),
        }
    }

    /// The worker `from` reported the end of its call: it is idle now,
    /// unless it was aborted meanwhile (its place is vacant or another's).
    fn freed(&mut self, (place, generation): WorkerId) {
        let Some(worker) = self.workers.get_mut(place) else {
            return;
        };
        if worker.generation == generation && worker.call.take().is_some() {
            self.idle.push(place);
        }
    }

    /// Aborts the workers running the calls from item `index` on: each
    /// call's ticket reports it cancelled as its worker drops it.
    fn abort_running(&mut self, index: usize) {
        for (place, worker) in self.workers.iter_mut().enumerate() {
            if worker.call.is_some_and(|call| call >= index) {
                worker.task.abort();
                // Not taken yet: its call reports itself cancelled now.
                drop_contained(worker.mailbox.close());
                worker.call = None;
                self.vacant.push(place);
            }
        }
    }
}

/// A worker: maps the calls it is handed, one at a time, until it is aborted
/// (by the runner: at the latest when the map ends or is dropped).
async fn work<T, F, Fut>(
    mapper: Arc<F>,
    // A guard, not the mailbox: a worker dropped before its first poll (its
    // runtime shut down) closes its mailbox too.
    closing: Closing<Job<T, Fut::Output>>,
    id: WorkerId,
) where
    F: Fn(T) -> Fut,
    Fut: Future,
{
    loop {
        let Job {
            mut call,
            item,
            is_failure,
        } = poll_fn(|cx| closing.0.poll_take(cx)).await;
        let span = trace::call_span(call.first(), call.attempt_number());
        let run = trace::instrument(span, run_call(&*mapper, item, &mut call, is_failure));
        let event = match AssertUnwindSafe(run).catch_unwind().await {
            Ok(event) => event,
            // A value's `Drop` panicked outside the mapper (its future's,
            // dropped at its deadline, say): the item's panic error, and the
            // worker goes on.
            Err(payload) => call.unwound(payload),
        };
        // The report frees the worker: the engine, once it hears, may hand
        // it the next call at once.
        call.send_from(event, Some(id));
    }
}

/// Maps one call's item: its permit of the budget, the still-wanted rule,
/// the mapper inside `catch_unwind`, its deadline and the map's end.
async fn run_call<T, F, Fut>(
    mapper: &F,
    item: T,
    call: &mut Call<Fut::Output>,
    is_failure: IsFailure<Fut::Output>,
) -> Event<Fut::Output>
where
    F: Fn(T) -> Fut,
    Fut: Future,
{
    let first = call.first();
    if let Some(budget) = call.shared().budget() {
        // Taken inside the task: an aborted or dropped call leaves
        // no waiting acquire behind. Boxed: most maps have no
        // budget, and the task stays small without it.
        match Box::pin(Arc::clone(budget).acquire_owned()).await {
            Ok(permit) => call.hold(permit),
            Err(_closed) => {
                // Before the report: a panic of its `Drop` must not lose it.
                drop_contained(item);
                return call.finish_one(Err(Error::cancelled(first)));
            }
        }
    }
    if call.is_unwanted() {
        drop_contained(item);
        return call.skip();
    }
    call.start();
    // The mapper is called inside the task, so an aborted task that
    // never ran never calls it; and inside `catch_unwind` too: a
    // panic while making the future is an error of its item as well.
    let mapped = AssertUnwindSafe(async { mapper(item).await }).catch_unwind();
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
        let item = match items {
            Batch::One(item) => item,
            // `BATCHES` is false: the engine's sizer is fixed at one item,
            // and only given-back items (blocking calls) are ever split.
            Batch::Many(_) => unreachable!("par_imap: an async call takes one item"),
        };
        let first = call.first();
        call.report_to(self.reports.sender().clone(), false);
        let mut job = Job {
            call,
            item,
            is_failure,
        };
        // An idle worker, else a new one; a worker that is gone (its
        // runtime shut down) hands the job back: one new worker more, and
        // if that one is gone too, the job is dropped and its call reports
        // itself cancelled.
        for _ in 0..2 {
            let place = match self.idle.pop() {
                Some(place) => place,
                None => self.hire(runtime),
            };
            let worker = &mut self.workers[place];
            match worker.mailbox.put(job) {
                Ok(()) => {
                    worker.call = Some(first);
                    return;
                }
                Err(returned) => {
                    job = returned;
                    worker.task.abort();
                    self.vacant.push(place);
                }
            }
        }
        // Its item's `Drop` may panic: not out of the consumer's poll.
        drop_contained(job);
    }

    /// One pass over the workers: only after a failure.
    fn abort_from(&mut self, index: usize) {
        self.abort_running(index);
    }

    fn poll_report(&mut self, cx: &mut Context<'_>, wait: bool) -> Poll<Event<Fut::Output>> {
        self.reports.poll(cx, wait).map(|(event, from)| {
            if let Some(from) = from {
                self.freed(from);
            }
            event
        })
    }

    fn close(&mut self) {
        self.abort_running(0);
        for worker in &self.workers {
            worker.task.abort();
        }
        self.workers.clear();
        self.idle.clear();
        self.vacant.clear();
        self.reports.close();
    }
}

impl<T, F, Fut> Tasks<T, F, Fut::Output>
where
    T: Send + 'static,
    F: Fn(T) -> Fut + Send + Sync + 'static,
    Fut: Future + Send + 'static,
    Fut::Output: Send + 'static,
{
    /// A new worker on `runtime`, in a vacant place or a new one.
    fn hire(&mut self, runtime: &Handle) -> usize {
        let mailbox = Arc::new(Mailbox::new());
        let place = self.vacant.pop().unwrap_or(self.workers.len());
        let generation = self
            .workers
            .get(place)
            .map_or(0, |worker| worker.generation + 1);
        let task = runtime
            .spawn(work(
                Arc::clone(&self.mapper),
                Closing(Arc::clone(&mailbox)),
                (place, generation),
            ))
            .abort_handle();
        let worker = Worker {
            mailbox,
            task,
            generation,
            call: None,
        };
        match self.workers.get_mut(place) {
            Some(vacant) => *vacant = worker,
            None => self.workers.push(worker),
        }
        place
    }
}

impl<T, F, U> Drop for Tasks<T, F, U> {
    /// Dropping the map aborts its workers, and with them its running calls.
    fn drop(&mut self) {
        for worker in &self.workers {
            worker.task.abort();
        }
    }
}
