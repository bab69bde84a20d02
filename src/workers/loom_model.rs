//! The pool under loom: every interleaving of pushers, workers, the idle
//! clock and close, up to a preemption bound (`LOOM_MAX_PREEMPTIONS`
//! overrides it). Each model checks that every job pushed is run once or
//! dropped once, that no thread waits forever (loom reports a deadlock), and
//! that the counters are back to 0 once the pool is closed and its workers
//! are gone; every lock also asserts the counting invariants. Run with
//! `RUSTFLAGS="--cfg par_imap_loom" cargo test --release --lib loom`.

use loom::sync::atomic::Ordering::SeqCst;
use loom::sync::atomic::{AtomicBool, AtomicUsize};
use loom::sync::{Arc, Notify};
use loom::thread::{self, JoinHandle};

use super::{Job, Pool, Worker, Workers};

/// Keeps the six models to about a minute in release mode; the
/// mutants tried (MUTANTS.md) are caught at 3 already.
const PREEMPTIONS: usize = 4;

fn model(f: impl Fn() + Send + Sync + 'static) {
    let mut builder = loom::model::Builder::new();
    if builder.preemption_bound.is_none() {
        builder.preemption_bound = Some(PREEMPTIONS);
    }
    builder.check(f);
}

/// What became of the jobs of one run. `SeqCst` throughout: this is the
/// test's bookkeeping, not the code under test, so weak orders would only
/// grow the model.
struct Fate {
    ran: AtomicUsize,
    dropped: AtomicUsize,
    settled: Notify,
}

impl Fate {
    fn new() -> Arc<Self> {
        Arc::new(Fate {
            ran: AtomicUsize::new(0),
            dropped: AtomicUsize::new(0),
            settled: Notify::new(),
        })
    }

    fn ran(&self) -> usize {
        self.ran.load(SeqCst)
    }

    fn settled_count(&self) -> usize {
        self.ran.load(SeqCst) + self.dropped.load(SeqCst)
    }

    /// Waits until `pushed` jobs were each run or dropped, without closing
    /// the pool: a job stranded in the queue deadlocks here.
    fn wait_settled(&self, pushed: usize) {
        while self.settled_count() < pushed {
            self.settled.wait();
        }
    }
}

/// A job that reports whether it ran or was dropped unrun.
struct Probe {
    fate: Arc<Fate>,
    ran: bool,
}

impl Probe {
    fn new(fate: &Arc<Fate>) -> Self {
        Probe {
            fate: Arc::clone(fate),
            ran: false,
        }
    }
}

impl Job for Probe {
    type Crew = ();

    fn run(mut self, (): &(), _opening: super::Opening<'_>) {
        self.ran = true;
        self.fate.ran.fetch_add(1, SeqCst);
        self.fate.settled.notify();
    }
}

impl Drop for Probe {
    fn drop(&mut self) {
        if !self.ran {
            self.fate.dropped.fetch_add(1, SeqCst);
            self.fate.settled.notify();
        }
    }
}

/// Starts the worker a push handed out, as `spawn_blocking` would.
fn start(worker: Option<Worker<Probe>>) -> Option<JoinHandle<()>> {
    worker.map(|worker| thread::spawn(move || worker.run()))
}

/// A clock thread that lets time pass once: every idle spell begun before
/// the tick is over, and every waiting worker wakes (see the module doc).
fn clock(pool: &Arc<Pool<Probe>>) -> JoinHandle<()> {
    let pool = Arc::clone(pool);
    thread::spawn(move || {
        pool.lock().clock.tick();
        pool.work.notify_all();
    })
}

/// Once closed and with every worker joined: each job run or dropped
/// exactly once, and nothing counted or queued.
fn assert_done(pool: &Pool<Probe>, fate: &Fate, pushed: usize) {
    assert_eq!(fate.settled_count(), pushed, "a job lost or counted twice");
    let queue = pool.lock();
    assert!(queue.closed);
    assert_eq!(
        (queue.workers, queue.idle, queue.woken, queue.jobs.len()),
        (0, 0, 0, 0),
        "(workers, idle, woken, queued) after the last worker left"
    );
}

fn join(threads: Vec<JoinHandle<()>>) {
    for thread in threads {
        thread.join().unwrap();
    }
}

/// The owner pushes twice and closes while the only worker may be running,
/// idle, timing out or gone (then the second push starts another); a push
/// after close drops its job at once.
#[test]
fn loom_push_vs_idle_timeout_vs_close() {
    model(|| {
        let fate = Fate::new();
        let workers = Workers::<Probe>::new((), 1);
        let pool = Arc::clone(&workers.pool);
        let clock = clock(&pool);
        let mut started: Vec<_> = start(workers.push(Probe::new(&fate))).into_iter().collect();
        assert_eq!(started.len(), 1, "the first push starts a worker");
        started.extend(start(workers.push(Probe::new(&fate))));
        workers.close();
        let late = Fate::new();
        assert!(
            workers.push(Probe::new(&late)).is_none(),
            "closed: no worker"
        );
        assert_eq!(
            late.settled_count(),
            1,
            "closed: the job is dropped at once"
        );
        drop(workers);
        clock.join().unwrap();
        join(started);
        assert_done(&pool, &fate, 2);
    });
}

/// Two threads push at once into a pool of one: one worker is started and
/// runs both jobs, before any close.
#[test]
fn loom_two_pushers_one_worker() {
    model(|| {
        let fate = Fate::new();
        let workers = Arc::new(Workers::<Probe>::new((), 1));
        let pool = Arc::clone(&workers.pool);
        let other = {
            let (workers, fate) = (Arc::clone(&workers), Arc::clone(&fate));
            thread::spawn(move || start(workers.push(Probe::new(&fate))))
        };
        let mut started: Vec<_> = start(workers.push(Probe::new(&fate))).into_iter().collect();
        started.extend(other.join().unwrap());
        assert_eq!(started.len(), 1, "one worker for a limit of one");
        fate.wait_settled(2);
        assert_eq!(fate.ran(), 2, "nothing is dropped before close");
        drop(workers);
        join(started);
        assert_done(&pool, &fate, 2);
    });
}

/// The worker's idle spell may end while a second job is pushed: it takes
/// the job, or leaves and the push starts a new worker; never both, never
/// neither (the job would be stranded, and `wait_settled` deadlock).
#[test]
fn loom_worker_leaves_while_job_pushed() {
    model(|| {
        let fate = Fate::new();
        let workers = Workers::<Probe>::new((), 1);
        let pool = Arc::clone(&workers.pool);
        let mut started: Vec<_> = start(workers.push(Probe::new(&fate))).into_iter().collect();
        let clock = clock(&pool);
        started.extend(start(workers.push(Probe::new(&fate))));
        fate.wait_settled(2);
        assert_eq!(fate.ran(), 2, "nothing is dropped before close");
        drop(workers);
        clock.join().unwrap();
        join(started);
        assert_done(&pool, &fate, 2);
    });
}

/// A spawn refused (the runtime shutting down drops the worker unrun)
/// while another thread pushes and starts its worker: every job is run by
/// a worker still counted, or dropped by the last one out, before close.
fn refused_spawn_while_pushing(limit: usize) {
    model(move || {
        let fate = Fate::new();
        let workers = Arc::new(Workers::<Probe>::new((), limit));
        let pool = Arc::clone(&workers.pool);
        let other = {
            let (workers, fate) = (Arc::clone(&workers), Arc::clone(&fate));
            thread::spawn(move || start(workers.push(Probe::new(&fate))))
        };
        drop(workers.push(Probe::new(&fate)));
        let started: Vec<_> = other.join().unwrap().into_iter().collect();
        fate.wait_settled(2);
        drop(workers);
        join(started);
        assert_done(&pool, &fate, 2);
    });
}

#[test]
fn loom_refused_spawn_while_pushing_limit_1() {
    refused_spawn_while_pushing(1);
}

#[test]
fn loom_refused_spawn_while_pushing_limit_2() {
    refused_spawn_while_pushing(2);
}

/// A shared job's extra worker (`add_thief`) in a pool of two, while the
/// first worker's spell may end and the pool closes: the thief is woken or
/// started only while there is room, and every worker, thief or not,
/// leaves; the job is run or dropped once.
#[test]
fn loom_thief_added_vs_idle_timeout_vs_close() {
    model(|| {
        let fate = Fate::new();
        let workers = Workers::<Probe>::new((), 2);
        let pool = Arc::clone(&workers.pool);
        let mut started: Vec<_> = start(workers.push(Probe::new(&fate))).into_iter().collect();
        let clock = clock(&pool);
        started.extend(start(workers.add_thief()));
        assert!(started.len() <= 2, "no more workers than the limit");
        workers.close();
        assert!(workers.add_thief().is_none(), "closed: no thief");
        drop(workers);
        clock.join().unwrap();
        join(started);
        assert_done(&pool, &fate, 1);
    });
}

/// What the job that opens late and the workers that look saw.
struct Sight {
    opened: AtomicBool,
    seen: AtomicBool,
    noticed: Notify,
    done: AtomicBool,
    finished: Notify,
}

/// A running job that opens to thieves, then waits until a worker other
/// than its own has looked since (its own is busy running it).
struct Opener;

impl Job for Opener {
    type Crew = Arc<Sight>;

    fn run(self, sight: &Arc<Sight>, opening: super::Opening<'_>) {
        sight.opened.store(true, SeqCst);
        drop(opening);
        while !sight.seen.load(SeqCst) {
            sight.noticed.wait();
        }
        sight.done.store(true, SeqCst);
        sight.finished.notify();
    }

    fn opens(&self) -> bool {
        true
    }

    fn steal(sight: &Arc<Sight>) -> super::Steal<Self> {
        if sight.opened.load(SeqCst) {
            sight.seen.store(true, SeqCst);
            sight.noticed.notify();
        }
        super::Steal::Nothing
    }
}

/// A job that opens while the thief added for it looks, finds nothing and
/// idles: the thief looks again (its look raced the opening, or the opening
/// woke it), so no wake-up is lost; without the pool's count of openings
/// the thief would idle through it and the job wait forever.
#[test]
fn loom_a_job_opening_while_a_thief_looks_is_seen() {
    model(|| {
        let sight = Arc::new(Sight {
            opened: AtomicBool::new(false),
            seen: AtomicBool::new(false),
            noticed: Notify::new(),
            done: AtomicBool::new(false),
            finished: Notify::new(),
        });
        let workers = Workers::<Opener>::new(Arc::clone(&sight), 2);
        let mut started: Vec<_> = workers.push(Opener).into_iter().collect();
        started.extend(workers.add_thief());
        assert_eq!(started.len(), 2, "a busy owner and a thief");
        let started: Vec<_> = started
            .into_iter()
            .map(|worker| thread::spawn(move || worker.run()))
            .collect();
        while !sight.done.load(SeqCst) {
            sight.finished.wait();
        }
        drop(workers);
        join(started);
    });
}
