//! The blocking seam: at most `limit` long-lived workers on tokio's blocking
//! pool, fed through a queue. A worker runs call after call without a thread
//! hand-off in between, which is what makes short items cheap; it leaves the
//! blocking pool when the map is dropped or after a short idle spell.
#![allow(unreachable_pub)]

use std::collections::VecDeque;
use std::fmt;
use std::panic::{self, AssertUnwindSafe};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use tokio::runtime::Handle;

use crate::Error;
use crate::call::{Batch, Call, Current, IsFailure};
use crate::spawn::Mapper;
use crate::trace;

/// How long an idle worker waits for work before it gives its thread back.
const IDLE: Duration = Duration::from_millis(50);

/// The workers of one map, owned by its stream. Dropping it closes the
/// queue: queued calls are dropped (reporting themselves cancelled), idle
/// workers leave, and running calls end on their own.
pub struct Workers<T, F: Mapper<T>> {
    pool: Arc<Pool<T, F>>,
}

struct Pool<T, F: Mapper<T>> {
    mapper: F,
    limit: usize,
    queue: Mutex<Queue<T, F::Output>>,
    work: Condvar,
}

struct Queue<T, U> {
    jobs: VecDeque<Job<T, U>>,
    workers: usize,
    /// Workers waiting for work that nobody has woken yet.
    idle: usize,
    /// Wake-ups sent and not yet taken by a worker. A pusher takes a worker
    /// off `idle` as it wakes it, so two pushes never count on one worker.
    woken: usize,
    closed: bool,
}

/// One call: its items, its ticket, and what counts as a failure.
struct Job<T, U> {
    items: Batch<T>,
    call: Call<U>,
    is_failure: IsFailure<U>,
}

impl<T, F> Workers<T, F>
where
    T: Send + 'static,
    F: Mapper<T>,
    F::Output: Send + 'static,
{
    pub(crate) fn new(mapper: F, limit: usize) -> Self {
        Workers {
            pool: Arc::new(Pool {
                mapper,
                limit,
                queue: Mutex::new(Queue {
                    jobs: VecDeque::new(),
                    workers: 0,
                    idle: 0,
                    woken: 0,
                    closed: false,
                }),
                work: Condvar::new(),
            }),
        }
    }

    /// Queues a call; wakes an idle worker, or starts one if fewer than
    /// `limit` exist.
    pub(crate) fn push(
        &self,
        runtime: &Handle,
        items: Batch<T>,
        call: Call<F::Output>,
        is_failure: IsFailure<F::Output>,
    ) {
        let start_worker = {
            let mut queue = self.pool.lock();
            queue.jobs.push_back(Job {
                items,
                call,
                is_failure,
            });
            if queue.idle > 0 {
                queue.idle -= 1;
                queue.woken += 1;
                self.pool.work.notify_one();
                false
            } else if queue.workers < self.pool.limit {
                queue.workers += 1;
                true
            } else {
                false
            }
        };
        if start_worker {
            let worker = Worker {
                pool: Arc::clone(&self.pool),
                left: false,
            };
            runtime.spawn_blocking(move || worker.run());
        }
    }
}

impl<T, F: Mapper<T>> Drop for Workers<T, F> {
    fn drop(&mut self) {
        let queued = {
            let mut queue = self.pool.lock();
            queue.closed = true;
            std::mem::take(&mut queue.jobs)
        };
        self.pool.work.notify_all();
        // Outside the lock: dropping a job drops its items and reports it.
        drop(queued);
    }
}

impl<T, F: Mapper<T>> fmt::Debug for Workers<T, F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let queue = self.pool.lock();
        f.debug_struct("Workers")
            .field("limit", &self.pool.limit)
            .field("workers", &queue.workers)
            .field("queued", &queue.jobs.len())
            .finish()
    }
}

impl<T, F: Mapper<T>> Pool<T, F> {
    /// The lock is never held around user code, so it cannot be poisoned by
    /// a mapper's panic; recover anyway rather than panic in turn.
    fn lock(&self) -> MutexGuard<'_, Queue<T, F::Output>> {
        self.queue.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The next job, or `None` when the worker leaves; it is then no longer
    /// counted, decided under the same lock so that a pusher never counts
    /// on a worker that is leaving.
    fn next_job(&self) -> Option<Job<T, F::Output>> {
        let idle_until = Instant::now() + IDLE;
        let mut queue = self.lock();
        loop {
            if let Some(job) = queue.jobs.pop_front() {
                return Some(job);
            }
            // Only here, with the queue seen empty under the lock, may a
            // worker leave: no job can be stranded by its going.
            let left = idle_until.saturating_duration_since(Instant::now());
            if queue.closed || left.is_zero() {
                queue.workers -= 1;
                return None;
            }
            queue.idle += 1;
            queue = self
                .work
                .wait_timeout(queue, left)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
            if queue.woken > 0 {
                // A pusher already took one worker off `idle`: this is it.
                queue.woken -= 1;
            } else {
                // Woken by the timeout or spuriously: leave `idle` ourselves.
                queue.idle -= 1;
            }
        }
    }
}

/// One worker thread's hold on the pool. If it ends other than by leaving
/// (its closure dropped unrun by a runtime shutting down, or a panic in a
/// value's `Drop`), it gives its place back; the last worker to go cancels
/// the calls still queued, as nobody would run them.
struct Worker<T, F: Mapper<T>> {
    pool: Arc<Pool<T, F>>,
    left: bool,
}

impl<T, F: Mapper<T>> Worker<T, F> {
    fn run(mut self) {
        while let Some(job) = self.pool.next_job() {
            job.run(&self.pool.mapper);
        }
        self.left = true;
    }
}

impl<T, F: Mapper<T>> Drop for Worker<T, F> {
    fn drop(&mut self) {
        if self.left {
            return;
        }
        let orphans = {
            let mut queue = self.pool.lock();
            queue.workers -= 1;
            if queue.workers == 0 {
                std::mem::take(&mut queue.jobs)
            } else {
                VecDeque::new()
            }
        };
        drop(orphans);
    }
}

impl<T, U> Job<T, U> {
    /// Maps the items in order, stopping at the first failure or at the
    /// first item the map no longer wants; the rest are dropped unmapped.
    fn run<F: Mapper<T, Output = U>>(self, mapper: &F) {
        let Job {
            items,
            mut call,
            is_failure,
        } = self;
        let first = call.first();
        if call.is_cancelled(first) {
            call.skip();
            return;
        }
        call.start();
        let _span = trace::call_span(first).entered();
        let map_one = |index: usize, item: T| {
            let current = Current::enter(&call, index);
            let result = panic::catch_unwind(AssertUnwindSafe(|| mapper.call(item)))
                .map_err(|payload| Error::panic(index, payload));
            drop(current);
            let failed = is_failure(&result);
            if failed {
                call.failed_at(index);
            }
            (result, failed)
        };
        let results = match items {
            Batch::One(item) => Batch::One(map_one(first, item).0),
            Batch::Many(items) => {
                let mut results = Vec::with_capacity(items.len());
                for (index, item) in (first..).zip(items) {
                    if index > first && call.is_cancelled(index) {
                        break;
                    }
                    let (result, failed) = map_one(index, item);
                    results.push(result);
                    if failed {
                        break;
                    }
                }
                Batch::Many(results)
            }
        };
        call.finish(results);
    }
}
