//! The blocking seam: at most `limit` long-lived workers on tokio's blocking
//! pool, fed through a queue. A worker runs call after call without a thread
//! hand-off in between, which is what makes short items cheap; it leaves the
//! blocking pool when the map is dropped or after a short idle spell.

use std::collections::VecDeque;
use std::fmt;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

/// One unit of work for the pool.
pub(crate) trait Job: Send + 'static {
    /// What every job of one pool shares (the mapper).
    type Shared: Send + Sync + 'static;

    fn run(self, shared: &Self::Shared);
}

/// How long an idle worker waits for work before it gives its thread back.
const IDLE: Duration = Duration::from_millis(50);

/// The workers of one map, owned by its stream. Dropping it closes the
/// queue: queued calls are dropped (reporting themselves cancelled), idle
/// workers leave, and running calls end on their own.
pub(crate) struct Workers<J: Job> {
    pool: Arc<Pool<J>>,
}

struct Pool<J: Job> {
    shared: J::Shared,
    limit: usize,
    queue: Mutex<Queue<J>>,
    work: Condvar,
}

struct Queue<J> {
    jobs: VecDeque<J>,
    workers: usize,
    /// Workers waiting for work that nobody has woken yet.
    idle: usize,
    /// Wake-ups sent and not yet taken by a worker. A pusher takes a worker
    /// off `idle` as it wakes it, so two pushes never count on one worker.
    woken: usize,
    closed: bool,
}

impl<J: Job> Workers<J> {
    pub(crate) fn new(shared: J::Shared, limit: usize) -> Self {
        Workers {
            pool: Arc::new(Pool {
                shared,
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

    /// Queues a job; wakes an idle worker, or returns a new worker for the
    /// caller to start on a blocking thread if fewer than `limit` exist.
    /// The lock is released before the return: a refused start drops the
    /// worker, which locks again.
    pub(crate) fn push(&self, job: J) -> Option<Worker<J>> {
        let start_worker = {
            let mut queue = self.pool.lock();
            if queue.closed {
                drop(queue);
                drop(job);
                return None;
            }
            queue.jobs.push_back(job);
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
        start_worker.then(|| Worker {
            pool: Arc::clone(&self.pool),
            left: false,
        })
    }

    /// Drops every queued job now, and lets idle workers leave; later
    /// pushes drop their job at once.
    pub(crate) fn close(&self) {
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

impl<J: Job> Drop for Workers<J> {
    fn drop(&mut self) {
        self.close();
    }
}

impl<J: Job> fmt::Debug for Workers<J> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let queue = self.pool.lock();
        f.debug_struct("Workers")
            .field("limit", &self.pool.limit)
            .field("workers", &queue.workers)
            .field("queued", &queue.jobs.len())
            .finish()
    }
}

impl<J: Job> Pool<J> {
    /// The lock is never held around user code, so it cannot be poisoned by
    /// a mapper's panic; recover anyway rather than panic in turn.
    fn lock(&self) -> MutexGuard<'_, Queue<J>> {
        self.queue.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The next job, or `None` when the worker leaves; it is then no longer
    /// counted, decided under the same lock so that a pusher never counts
    /// on a worker that is leaving.
    fn next_job(&self) -> Option<J> {
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
pub(crate) struct Worker<J: Job> {
    pool: Arc<Pool<J>>,
    left: bool,
}

impl<J: Job> Worker<J> {
    pub(crate) fn run(mut self) {
        while let Some(job) = self.pool.next_job() {
            job.run(&self.pool.shared);
        }
        self.left = true;
    }
}

impl<J: Job> Drop for Worker<J> {
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
