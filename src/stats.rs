//! Live counters of a map, readable from any task while it runs.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::Ordering::{Acquire, Relaxed, Release};
use std::sync::atomic::{AtomicBool, AtomicU64};
use std::time::Duration;

/// The counters themselves: relaxed atomics, bumped once per call or per
/// item, never behind a lock. The engine's counters (one writer: the task
/// polling the map) and the calls' counters (written by the workers) sit on
/// cache lines of their own, so that neither side's writes slow the other.
#[derive(Debug, Default)]
pub(crate) struct Counters {
    engine: Line<EngineCounters>,
    calls: Line<CallCounters>,
}

/// One cache line (two on the CPUs whose prefetcher pairs them).
#[derive(Debug, Default)]
#[repr(align(128))]
struct Line<T>(T);

#[derive(Debug, Default)]
struct EngineCounters {
    pulled: AtomicU64,
    waiting: AtomicU64,
    limit: AtomicU64,
    failed: AtomicU64,
    yielded: AtomicU64,
}

#[derive(Debug, Default)]
struct CallCounters {
    /// Set by the first `.stats()`: from then on calls count their busy time.
    timing: AtomicBool,
    started: AtomicU64,
    /// Attempts after an item's first that started (`.retry`).
    retried: AtomicU64,
    /// Calls running now: one up at a call's start, one down at its end,
    /// so that `in_flight` never counts a call twice, not even while a
    /// batch's items are being counted.
    running: AtomicU64,
    completed: AtomicU64,
    busy_nanos: AtomicU64,
}

/// Adds `n` to a counter only the engine writes: a load and a store, no
/// read-modify-write.
fn bump(counter: &AtomicU64, n: u64) {
    counter.store(counter.load(Relaxed).wrapping_add(n), Relaxed);
}

impl Counters {
    pub(crate) fn pulled(&self, items: usize) {
        bump(&self.engine.0.pulled, items as u64);
    }

    /// Items pulled and waiting for their key (`.key_order`) or for their
    /// next attempt (`.retry`).
    pub(crate) fn waiting(&self, items: usize) {
        self.engine.0.waiting.store(items as u64, Relaxed);
    }

    /// The limit on calls running at once.
    pub(crate) fn limit(&self, limit: usize) {
        self.engine.0.limit.store(limit as u64, Relaxed);
    }

    /// An attempt after the first started (`.retry`).
    pub(crate) fn retried(&self) {
        self.calls.0.retried.fetch_add(1, Relaxed);
    }

    /// A call's first item began: one increment per call, not per item,
    /// so that short items in a batch do not contend on this line.
    pub(crate) fn call_started(&self) {
        self.calls.0.started.fetch_add(1, Relaxed);
        self.calls.0.running.fetch_add(1, Relaxed);
    }

    /// Whether `.stats()` was called: only then do calls count busy time
    /// (an async call reads the clock only then).
    pub(crate) fn is_timing(&self) -> bool {
        self.calls.0.timing.load(Relaxed)
    }

    /// A call that mapped `items` items ended after `busy`: the rest of its
    /// items count as started, all of them as completed. `busy` is `None`
    /// for a call that started before `.stats()` was called.
    pub(crate) fn call_completed(&self, items: usize, busy: Option<Duration>) {
        let calls = &self.calls.0;
        if let Some(busy) = busy {
            let nanos = u64::try_from(busy.as_nanos()).unwrap_or(u64::MAX);
            calls.busy_nanos.fetch_add(nanos, Relaxed);
        }
        let items = items as u64;
        if items > 1 {
            calls.started.fetch_add(items - 1, Relaxed);
        }
        // A call that mapped nothing (it stopped before its first item)
        // still ends the one start it counted.
        // Release: a reader that sees this completion also sees the starts
        // counted before it, so `completed <= started` in every snapshot.
        calls.completed.fetch_add(items.max(1), Release);
        calls.running.fetch_sub(1, Relaxed);
    }

    pub(crate) fn failed(&self) {
        bump(&self.engine.0.failed, 1);
    }

    pub(crate) fn yielded(&self) {
        bump(&self.engine.0.yielded, 1);
    }
}

/// A handle on the live counters of one map, from
/// [`ParImap::stats`](crate::ParImap::stats). Cheap to clone, `Send + Sync`:
/// read it from another task (a progress bar, a metrics exporter) while the
/// map runs, and after it ended.
///
/// # Examples
///
/// ```
/// use futures::TryStreamExt;
/// use par_imap::ParImapExt;
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), par_imap::Error> {
/// let squares = futures::stream::iter(0..100_u64).par_imap(4, |n| n * n);
/// let stats = squares.stats();
/// let all: Vec<u64> = squares.try_collect().await?;
/// let done = stats.snapshot();
/// assert_eq!((done.pulled, done.started, done.completed, done.yielded), (100, 100, 100, 100));
/// assert_eq!((done.failed, done.in_flight), (0, 0));
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct Stats {
    counters: Arc<Counters>,
}

impl Stats {
    pub(crate) fn new(counters: Arc<Counters>) -> Self {
        counters.calls.0.timing.store(true, Relaxed);
        Stats { counters }
    }
}

impl Stats {
    /// The counters now. Each is read on its own (relaxed), so a snapshot
    /// taken while the map runs may be off by the calls of that instant.
    ///
    /// ```
    /// # use futures::StreamExt;
    /// # use par_imap::ParImapExt;
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() {
    /// let results = futures::stream::iter(0..10).par_imap(2, |n: u32| n);
    /// let stats = results.stats();
    /// assert_eq!(stats.snapshot().pulled, 0, "nothing happens before the first poll");
    /// # drop(results);
    /// # }
    /// ```
    pub fn snapshot(&self) -> Snapshot {
        let (engine, counters) = (&self.counters.engine.0, &self.counters.calls.0);
        // `started` and `completed` as they were at one instant: `started`
        // read on both sides of `completed` and unchanged between, so that
        // `completed <= started`. Acquire pairs with the Release of a
        // completion. `in_flight` is bounded by both counts of running
        // calls: `started - completed` (which is 0 when they agree, but too
        // high while a batch adds its items), and the calls counter, which
        // is exact but may lag a call that has just completed.
        let (started, completed) = {
            let mut reads = (0, 0);
            for _ in 0..64 {
                let before = counters.started.load(Acquire);
                let completed = counters.completed.load(Acquire);
                let after = counters.started.load(Acquire);
                reads = (after.max(completed), completed);
                if before == after {
                    break;
                }
            }
            reads
        };
        Snapshot {
            in_flight: counters.running.load(Acquire).min(started - completed),
            pulled: engine.pulled.load(Relaxed),
            started,
            completed,
            failed: engine.failed.load(Relaxed),
            yielded: engine.yielded.load(Relaxed),
            busy: Duration::from_nanos(counters.busy_nanos.load(Relaxed)),
            waiting: engine.waiting.load(Relaxed),
            limit: engine.limit.load(Relaxed),
            retried: counters.retried.load(Relaxed),
        }
    }
}

impl fmt::Debug for Stats {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("Stats").field(&self.snapshot()).finish()
    }
}

/// The counters of a map at one moment; see [`Stats::snapshot`].
///
/// `started` and `completed` count items; a call that maps several items
/// (a batch) counts its first item as started when it begins and the rest
/// when it ends. `in_flight` counts calls, not items: never more than run at
/// that instant, and 0 once nothing runs.
/// `busy / (wall time × limit)` is how busy the map kept its workers.
///
/// ```
/// let idle = par_imap::Snapshot::default();
/// assert_eq!(idle.in_flight, 0);
/// ```
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Snapshot {
    /// Input items taken from the input stream.
    pub pulled: u64,
    /// Items whose mapping began (for a running batch, its first item).
    pub started: u64,
    /// Items whose mapping ended (a timed-out blocking call counts when it
    /// really returns).
    pub completed: u64,
    /// Items that failed: a panic, a timeout, or an `Err` from a `try_` mapper.
    pub failed: u64,
    /// Items handed to the consumer, errors included.
    pub yielded: u64,
    /// Mapper calls running now: never more than really run, not even while
    /// a batch completes. After a map ended (failed, cancelled, dropped) it
    /// falls to 0 as soon as its calls are gone: an aborted async call when
    /// its task is dropped by tokio (at its next `.await`), a blocking call
    /// when its closure returns.
    pub in_flight: u64,
    /// The summed run time of the mapper calls that started after
    /// [`ParImap::stats`](crate::ParImap::stats) was first called (before
    /// that, async calls read no clock at all).
    pub busy: Duration,
    /// Items pulled that wait for a call: with
    /// [`key_order`](crate::ParImap::key_order), items whose key is busy;
    /// with [`retry`](crate::ParImap::retry), items waiting for their next
    /// attempt. They count in the window, not in `in_flight`, and hold no
    /// permit.
    pub waiting: u64,
    /// The most mapper calls that may run at once: the map's `limit`, or,
    /// with [`adaptive_limit`](crate::ParImap::adaptive_limit), where the
    /// algorithm has moved it now (never reduced by a shared budget).
    pub limit: u64,
    /// Attempts after an item's first that started
    /// ([`retry`](crate::ParImap::retry)); `started` and `completed` count
    /// every attempt, `failed` the items that failed after their last.
    pub retried: u64,
}
