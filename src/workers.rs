//! The blocking worker pool: at most `limit` long-lived workers fed through
//! one queue. A worker runs job after job without a thread hand-off in
//! between, which is what makes short items cheap; it leaves when the pool
//! is closed or after an idle spell. The pool knows nothing else of the
//! crate: a [`Job`] brings its own work and shares one `Shared` value (the
//! mapper) with the other jobs of its pool, and whoever pushes starts each
//! [`Worker`] it is handed on a blocking thread. So this file is
//! model-checked alone (`workers/loom_model.rs`).
//!
//! Invariants. The queue and its counters change only under the one lock,
//! and at every release `idle + woken <= workers <= limit`: `workers`
//! counts each `Worker` handed out and not yet gone, `idle` those waiting
//! for work that no pusher has woken, `woken` the wake-ups sent and not yet
//! taken (a pusher moves one worker from `idle` to `woken` as it notifies,
//! so two pushes never count on one worker; a worker that wakes takes a
//! `woken` if there is one, else leaves `idle` itself: its timeout or a
//! spurious wake-up). A worker leaves, uncounting itself, only after seeing
//! the queue empty under the lock, and only when the pool is closed or its
//! idle spell is over, so a pusher that saw it counted may rely on it.
//! `push` queues the job, then wakes an idle worker, or counts a new one
//! while `workers < limit`, or else relies on the busy ones, which look at
//! the queue before they idle or leave; hence a queued job always has a
//! counted worker that is not idle (`jobs` empty or `workers > idle`).
//! `push` releases the lock before returning the new `Worker`, because a
//! refused spawn drops that `Worker` and its `Drop` locks again. A `Worker`
//! that goes without leaving (never started, or unwound by a panic) gives
//! its place back, and the last one out drops the queued jobs, as nobody is
//! left to run them. `close` marks the pool closed and takes the queue under
//! the lock, then wakes every idle worker (they leave) and drops the jobs;
//! a push after it drops its job and starts no worker. So every job pushed
//! is either run by one worker or dropped once (by a closed `push`, by
//! `close`, or by the last worker out), never stranded; and no job is run
//! or dropped under the lock, so a job's code cannot poison or deadlock the
//! pool. Under `cfg(par_imap_loom)` the sync types are loom's and time is a
//! tick count kept in the queue: an idle spell is over once a tick has
//! passed since it began, and the model's clock thread ticks under the lock
//! and then wakes every waiter, which stands for the timeout firing (loom's
//! `wait_timeout` never times out) and for spurious wake-ups too. The
//! counting invariants are asserted at every lock in debug builds and in
//! the model.
//!
//! The types are `pub` inside this private module, like the other seams,
//! because `Spawn::Runner` (a public trait's associated type) names them.

use std::collections::VecDeque;
use std::fmt;
use std::mem;
use std::sync::PoisonError;

#[cfg(par_imap_loom)]
use loom::sync::{Arc, Condvar, Mutex, MutexGuard};
#[cfg(not(par_imap_loom))]
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

#[cfg(all(test, par_imap_loom))]
mod loom_model;

/// One unit of work for the pool.
pub(crate) trait Job: Send + Sized + 'static {
    /// What every job of one pool shares (e.g. the mapper).
    type Crew: Send + Sync + 'static;

    /// Does the work, on a worker's thread. A job that [`opens`](Job::opens)
    /// drops `opening` once others may steal from it (or once it knows it
    /// never will); until then the pool's idle workers stay.
    fn run(self, shared: &Self::Crew, opening: Opening<'_>);

    /// Whether the job, once running, may open itself to thieves later than
    /// it starts (a call of several items that first waits for a permit,
    /// say). Asked under the lock as a worker takes it from the queue.
    fn opens(&self) -> bool {
        false
    }

    /// Work a worker that found the queue empty may take from jobs running
    /// on other workers (work stealing), or when to look again. Asked
    /// outside the lock, before the worker idles.
    fn steal(_shared: &Self::Crew) -> Steal<Self> {
        Steal::Nothing
    }

    /// Drops the job unrun (the pool closed); a panic here is contained by
    /// the pool.
    fn discard(self) {}
}

/// What an idle worker finds to steal.
#[derive(Debug)]
pub(crate) enum Steal<J> {
    /// A job to run now.
    Job(J),
    /// Nothing yet; something may be taken from this moment on.
    At(std::time::Instant),
    /// Nothing, and nothing will be without a new job or a running one
    /// opening (see [`Job::opens`]).
    Nothing,
}

/// A running job's promise to say when it is open to thieves: dropping it
/// wakes the idle workers to look again. While a job holds one, an idle
/// worker that finds nothing to steal waits, without a deadline, instead of
/// leaving: it is woken by the opening, not by polling.
#[derive(Debug)]
pub(crate) struct Opening<'a> {
    pool: Option<&'a dyn Opened>,
}

impl Opening<'_> {
    /// For a job run outside a pool (a stolen one opens at once).
    pub(crate) fn none() -> Self {
        Opening { pool: None }
    }
}

impl Drop for Opening<'_> {
    fn drop(&mut self) {
        if let Some(pool) = self.pool.take() {
            pool.opened();
        }
    }
}

/// The pool's side of [`Opening`], without its job type.
trait Opened: fmt::Debug + Sync {
    fn opened(&self);
}

/// The workers of one map, owned by its stream. Dropping it closes the
/// pool (see [`Workers::close`]).
pub(crate) struct Workers<J: Job> {
    pool: Arc<Pool<J>>,
}

struct Pool<J: Job> {
    shared: J::Crew,
    limit: usize,
    queue: Mutex<Queue<J>>,
    /// Signalled when a job is queued for an idle worker, and on close.
    work: Condvar,
}

struct Queue<J> {
    jobs: VecDeque<J>,
    workers: usize,
    /// Workers waiting for work that nobody has woken yet.
    idle: usize,
    /// Wake-ups sent and not yet taken by a worker.
    woken: usize,
    /// Running jobs that may still open to thieves (their `Opening` lives).
    unopened: usize,
    /// How many jobs opened so far: a worker that looked for work to steal
    /// outside the lock looks again if this moved meanwhile.
    openings: usize,
    closed: bool,
    clock: idle::Clock,
}

impl<J: Job> Workers<J> {
    /// A pool of at most `limit` workers, which must be at least 1.
    pub(crate) fn new(shared: J::Crew, limit: usize) -> Self {
        assert!(limit > 0, "a pool needs room for one worker");
        Workers {
            pool: Arc::new(Pool {
                shared,
                limit,
                queue: Mutex::new(Queue {
                    jobs: VecDeque::new(),
                    workers: 0,
                    idle: 0,
                    woken: 0,
                    unopened: 0,
                    openings: 0,
                    closed: false,
                    clock: idle::Clock::new(),
                }),
                work: Condvar::new(),
            }),
        }
    }

    /// Queues a job. Returns a worker the caller must start on a blocking
    /// thread when fewer than `limit` exist and none is idle; the lock is
    /// released before return, since dropping the worker (a refused spawn)
    /// takes it again. After [`close`](Self::close) the job is dropped at
    /// once and no worker is started.
    pub(crate) fn push(&self, job: J) -> Option<Worker<J>> {
        let mut queue = self.pool.lock();
        if queue.closed {
            drop(queue);
            discard(job);
            return None;
        }
        queue.jobs.push_back(job);
        self.wake_or_start(queue)
    }

    /// One more worker to look at the running jobs for work to steal, after
    /// a job that can be shared was pushed: an idle worker is woken (it
    /// looks again at once instead of at the end of its spell), or a new
    /// one is counted and returned, to be started like `push`'s, while
    /// fewer than `limit` exist. Without it the only job of a map, pushed
    /// when no worker existed, would have nobody to share it with.
    pub(crate) fn add_thief(&self) -> Option<Worker<J>> {
        let queue = self.pool.lock();
        if queue.closed {
            return None;
        }
        self.wake_or_start(queue)
    }

    /// Wakes an idle worker, or counts a new one and returns it for the
    /// caller to start while fewer than `limit` exist; else the busy ones
    /// will look. The lock is released before the new `Worker` exists,
    /// since dropping it (a refused spawn) takes it again.
    fn wake_or_start(&self, mut queue: MutexGuard<'_, Queue<J>>) -> Option<Worker<J>> {
        let start_worker = if queue.idle > 0 {
            queue.idle -= 1;
            queue.woken += 1;
            self.pool.work.notify_one();
            false
        } else if queue.workers < self.pool.limit {
            queue.workers += 1;
            true
        } else {
            false
        };
        drop(queue);
        start_worker.then(|| Worker {
            pool: Arc::clone(&self.pool),
            left: false,
        })
    }

    /// Drops every queued job now (outside the lock) and wakes the idle
    /// workers so they leave; running jobs end on their own. Later pushes
    /// drop their job at once.
    pub(crate) fn close(&self) {
        let queued = {
            let mut queue = self.pool.lock();
            queue.closed = true;
            mem::take(&mut queue.jobs)
        };
        self.pool.work.notify_all();
        queued.into_iter().for_each(discard);
    }
}

/// Drops a job nobody will run without letting a panic of its values'
/// `Drop` (user code) unwind into the one dropping it.
fn discard<J: Job>(job: J) {
    let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || job.discard()));
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
            .field("idle", &queue.idle)
            .field("queued", &queue.jobs.len())
            .field("closed", &queue.closed)
            .finish_non_exhaustive()
    }
}

impl<J: Job> Pool<J> {
    /// No job is run or dropped under the lock, so it is poisoned only by
    /// a failed `check`; recover anyway rather than panic in turn.
    fn lock(&self) -> MutexGuard<'_, Queue<J>> {
        let queue = self.queue.lock().unwrap_or_else(PoisonError::into_inner);
        queue.check(self.limit);
        queue
    }

    /// The next job and its [`Opening`], or `None` when the worker leaves;
    /// it is then no longer counted, decided under the same lock so that a
    /// pusher never counts on a worker that is leaving.
    fn next_job(&self) -> Option<(J, Opening<'_>)> {
        let mut queue = self.lock();
        let spell_end = queue.clock.spell_end();
        loop {
            if let Some(job) = queue.jobs.pop_front() {
                return Some(self.take(&mut queue, job));
            }
            if queue.closed {
                queue.workers -= 1;
                return None;
            }
            // Nothing queued: before idling, look for work to steal from the
            // running jobs, outside the lock (this worker stays counted and
            // not idle, so a pusher meanwhile relies on it to look again).
            let openings = queue.openings;
            drop(queue);
            let steal_at = match J::steal(&self.shared) {
                Steal::Job(job) => return Some((job, Opening::none())),
                Steal::At(at) => Some(at),
                Steal::Nothing => None,
            };
            queue = self.lock();
            if let Some(job) = queue.jobs.pop_front() {
                return Some(self.take(&mut queue, job));
            }
            if queue.openings != openings {
                continue; // a job opened while this one looked: look again
            }
            // A running job may still open: stay, without a deadline, until
            // its opening (or a push, or close) wakes this worker.
            let stay = steal_at.is_none() && queue.unopened > 0;
            // Only here, with the queue seen empty under the lock, may a
            // worker leave: no job can be stranded by its going. A worker
            // that may steal soon stays.
            if queue.closed || (steal_at.is_none() && !stay && queue.clock.is_past(spell_end)) {
                queue.workers -= 1;
                return None;
            }
            queue.idle += 1;
            queue = idle::wait(&self.work, queue, spell_end, steal_at, stay);
            queue.check(self.limit);
            if queue.woken > 0 {
                // A pusher already took one worker off `idle`: this is it.
                queue.woken -= 1;
            } else {
                // The spell is over, or a spurious wake-up: leave `idle` ourselves.
                queue.idle -= 1;
            }
        }
    }

    /// A job taken from the queue, counted as unopened if it may open.
    fn take(&self, queue: &mut Queue<J>, job: J) -> (J, Opening<'_>) {
        if !job.opens() {
            return (job, Opening::none());
        }
        queue.unopened += 1;
        (job, Opening { pool: Some(self) })
    }
}

impl<J: Job> Opened for Pool<J> {
    /// A job opened (or ended without): every idle worker looks again.
    fn opened(&self) {
        let mut queue = self.lock();
        queue.unopened -= 1;
        queue.openings = queue.openings.wrapping_add(1);
        if queue.idle > 0 {
            queue.woken += queue.idle;
            queue.idle = 0;
            self.work.notify_all();
        }
    }
}

impl<J: Job> fmt::Debug for Pool<J> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Pool")
            .field("limit", &self.limit)
            .finish_non_exhaustive()
    }
}

impl<J> Queue<J> {
    /// The counting invariants of the module doc.
    fn check(&self, limit: usize) {
        if cfg!(any(debug_assertions, par_imap_loom)) {
            assert!(
                self.idle + self.woken <= self.workers && self.workers <= limit,
                "idle {} + woken {} <= workers {} <= limit {limit}",
                self.idle,
                self.woken,
                self.workers,
            );
            assert!(
                self.jobs.is_empty() || self.workers > self.idle,
                "a queued job with no worker coming"
            );
        }
    }
}

/// One worker's hold on the pool, to be run on a blocking thread. If it
/// goes other than by leaving (never started because the spawn was refused,
/// or unwound by a panic) it gives its place back; the last worker to go
/// drops the jobs still queued, as nobody would run them.
pub(crate) struct Worker<J: Job> {
    pool: Arc<Pool<J>>,
    left: bool,
}

impl<J: Job> Worker<J> {
    /// Runs jobs until the pool is closed or an idle spell is over.
    pub(crate) fn run(mut self) {
        while let Some((job, opening)) = self.pool.next_job() {
            job.run(&self.pool.shared, opening);
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
                mem::take(&mut queue.jobs)
            } else {
                VecDeque::new()
            }
        };
        orphans.into_iter().for_each(discard);
    }
}

impl<J: Job> fmt::Debug for Worker<J> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Worker")
            .field("left", &self.left)
            .finish_non_exhaustive()
    }
}

/// How long an idle spell lasts: real time in production.
#[cfg(not(par_imap_loom))]
mod idle {
    use std::sync::{Condvar, MutexGuard, PoisonError};
    use std::time::{Duration, Instant};

    /// How long an idle worker waits for work before it gives its thread back.
    pub(super) const SPELL: Duration = Duration::from_millis(50);

    /// Real time needs no state.
    #[derive(Debug)]
    pub(super) struct Clock;

    impl Clock {
        pub(super) fn new() -> Self {
            Clock
        }

        /// When an idle spell that starts now is over.
        pub(super) fn spell_end(&self) -> Instant {
            Instant::now() + SPELL
        }

        pub(super) fn is_past(&self, end: Instant) -> bool {
            Instant::now() >= end
        }
    }

    /// Waits for a wake-up, or until `end`, or until `steal_at` if that
    /// comes first or the spell is over; with `stay`, for a wake-up alone.
    pub(super) fn wait<'a, T>(
        work: &Condvar,
        queue: MutexGuard<'a, T>,
        end: Instant,
        steal_at: Option<Instant>,
        stay: bool,
    ) -> MutexGuard<'a, T> {
        if stay {
            return work.wait(queue).unwrap_or_else(PoisonError::into_inner);
        }
        let now = Instant::now();
        let end = match steal_at {
            Some(at) if at < end || now >= end => at,
            _ => end,
        };
        let left = end.saturating_duration_since(now);
        work.wait_timeout(queue, left)
            .unwrap_or_else(PoisonError::into_inner)
            .0
    }
}

/// How long an idle spell lasts in the model: one tick of a clock that a
/// test thread advances (see the module doc).
#[cfg(par_imap_loom)]
mod idle {
    use loom::sync::{Condvar, MutexGuard};
    use std::sync::PoisonError;

    #[derive(Debug)]
    pub(super) struct Clock {
        ticks: usize,
    }

    impl Clock {
        pub(super) fn new() -> Self {
            Clock { ticks: 0 }
        }

        pub(super) fn spell_end(&self) -> usize {
            self.ticks + 1
        }

        pub(super) fn is_past(&self, end: usize) -> bool {
            self.ticks >= end
        }

        /// Time passes; the caller then wakes every waiter, as their
        /// timeouts would.
        pub(super) fn tick(&mut self) {
            self.ticks += 1;
        }
    }

    /// Waits for a wake-up: a push, close, or the clock's tick. The model's
    /// jobs never steal.
    pub(super) fn wait<'a, T>(
        work: &Condvar,
        queue: MutexGuard<'a, T>,
        _end: usize,
        _steal_at: Option<std::time::Instant>,
        _stay: bool,
    ) -> MutexGuard<'a, T> {
        work.wait(queue).unwrap_or_else(PoisonError::into_inner)
    }
}

#[cfg(all(test, not(par_imap_loom)))]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
    use std::sync::mpsc;
    use std::thread;
    use std::time::Duration;

    use super::*;

    /// Counts the looks for work to steal, and tells of each.
    struct Looks {
        count: AtomicUsize,
        told: Mutex<mpsc::Sender<thread::ThreadId>>,
    }

    /// A running job that opens only when released (a call waiting for its
    /// permit, say).
    struct Gate(mpsc::Receiver<()>);

    impl Job for Gate {
        type Crew = Looks;

        fn run(self, _: &Looks, opening: Opening<'_>) {
            let _ = self.0.recv();
            drop(opening);
        }

        fn opens(&self) -> bool {
            true
        }

        fn steal(looks: &Looks) -> Steal<Self> {
            looks.count.fetch_add(1, SeqCst);
            let _ = looks
                .told
                .lock()
                .map(|told| told.send(thread::current().id()));
            Steal::Nothing
        }
    }

    const BOUND: Duration = Duration::from_secs(20);

    /// e279de9 kept idle workers with a look every 20 ms while a job had not
    /// opened yet (50 wake-ups a second); before it they left after one
    /// spell, and nobody was left to share the job once it opened.
    #[test]
    fn an_idle_worker_stays_for_a_job_that_may_open_and_looks_again_only_when_it_does() {
        let (told, looked) = mpsc::channel();
        let workers = Workers::new(
            Looks {
                count: AtomicUsize::new(0),
                told: Mutex::new(told),
            },
            2,
        );
        let (release, gate) = mpsc::channel();
        let owner = workers.push(Gate(gate)).expect("a first worker");
        let owner = thread::spawn(move || owner.run());
        // The owner takes the job (it never looks: the queue held one).
        let deadline = std::time::Instant::now() + BOUND;
        while workers.pool.lock().unopened == 0 {
            assert!(std::time::Instant::now() < deadline, "the job was taken");
            thread::sleep(Duration::from_millis(1));
        }
        let thief = workers.add_thief().expect("a second worker");
        let thief = thread::spawn(move || thief.run());
        let thief_id = thief.thread().id();
        assert_eq!(looked.recv_timeout(BOUND), Ok(thief_id), "the thief looked");
        // Six idle spells: it neither leaves nor looks again meanwhile (a
        // spurious wake-up of the condvar may make one more look).
        thread::sleep(idle::SPELL * 6);
        let pool = &workers.pool;
        assert!(
            pool.shared.count.load(SeqCst) <= 2,
            "looked {} times while nothing opened",
            pool.shared.count.load(SeqCst)
        );
        assert_eq!(pool.lock().workers, 2, "the idle worker stayed");
        release.send(()).expect("the job runs");
        // The owner, done, looks too: wait for the thief's look.
        while looked
            .recv_timeout(BOUND)
            .expect("the thief looked again as the job opened")
            != thief_id
        {}
        owner.join().expect("the owner ends");
        workers.close();
        thief.join().expect("the thief leaves on close");
    }
}
