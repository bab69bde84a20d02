//! Helpers shared by the integration tests: gates that decide completion
//! order, counters of running calls, and values that count their drops.
#![allow(dead_code, unreachable_pub)]

use std::collections::HashSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

/// Long enough that a loaded machine never hits it; a test that does has
/// hung. `PAR_IMAP_TEST_HANG_SECS` shortens it for mutation testing, where
/// most runs are expected to fail.
pub fn hang() -> Duration {
    let secs = std::env::var("PAR_IMAP_TEST_HANG_SECS")
        .ok()
        .and_then(|secs| secs.parse().ok());
    Duration::from_secs(secs.unwrap_or(20))
}

/// Gates that blocking calls wait on, opened by the test in the order it wants.
#[derive(Clone, Default)]
pub struct Gates {
    inner: Arc<(Mutex<HashSet<usize>>, Condvar)>,
}

impl Gates {
    pub fn open(&self, index: usize) {
        self.inner.0.lock().unwrap().insert(index);
        self.inner.1.notify_all();
    }

    /// Blocks until gate `index` is open; panics if that takes a hang's time.
    pub fn wait(&self, index: usize) {
        let (open, changed) = &*self.inner;
        let deadline = Instant::now() + hang();
        let mut open = open.lock().unwrap();
        while !open.contains(&index) {
            let left = deadline
                .checked_duration_since(Instant::now())
                .unwrap_or_else(|| panic!("gate {index} never opened"));
            open = changed.wait_timeout(open, left).unwrap().0;
        }
    }
}

/// Counts calls started, calls running now, and the most ever running.
#[derive(Clone, Default)]
pub struct Calls {
    started: Arc<AtomicUsize>,
    running: Arc<AtomicUsize>,
    peak: Arc<AtomicUsize>,
    started_indices: Arc<Mutex<Vec<usize>>>,
}

impl Calls {
    /// Marks a call as running until the guard drops.
    pub fn enter(&self, index: usize) -> Running {
        self.started.fetch_add(1, Ordering::SeqCst);
        self.started_indices.lock().unwrap().push(index);
        let now = self.running.fetch_add(1, Ordering::SeqCst) + 1;
        self.peak.fetch_max(now, Ordering::SeqCst);
        Running(self.running.clone())
    }

    pub fn started(&self) -> usize {
        self.started.load(Ordering::SeqCst)
    }

    pub fn running(&self) -> usize {
        self.running.load(Ordering::SeqCst)
    }

    pub fn peak(&self) -> usize {
        self.peak.load(Ordering::SeqCst)
    }

    pub fn started_indices(&self) -> Vec<usize> {
        let mut indices = self.started_indices.lock().unwrap().clone();
        indices.sort_unstable();
        indices
    }
}

pub struct Running(Arc<AtomicUsize>);

impl Drop for Running {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Values that count how many of them are alive.
#[derive(Clone, Default)]
pub struct Tracker {
    alive: Arc<AtomicUsize>,
    created: Arc<AtomicUsize>,
}

impl Tracker {
    pub fn track(&self, value: usize) -> Tracked {
        self.alive.fetch_add(1, Ordering::SeqCst);
        self.created.fetch_add(1, Ordering::SeqCst);
        Tracked {
            value,
            alive: self.alive.clone(),
        }
    }

    pub fn alive(&self) -> usize {
        self.alive.load(Ordering::SeqCst)
    }

    pub fn created(&self) -> usize {
        self.created.load(Ordering::SeqCst)
    }

    /// Waits (bounded) until every tracked value has been dropped: blocking
    /// calls that outlive the stream drop their output when they end.
    pub fn wait_all_dropped(&self) {
        let deadline = Instant::now() + hang();
        while self.alive() > 0 {
            assert!(
                Instant::now() < deadline,
                "{} of {} tracked values never dropped",
                self.alive(),
                self.created()
            );
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}

#[derive(Debug)]
pub struct Tracked {
    pub value: usize,
    alive: Arc<AtomicUsize>,
}

impl Drop for Tracked {
    fn drop(&mut self) {
        self.alive.fetch_sub(1, Ordering::SeqCst);
    }
}

/// The binary of example `name`, which `cargo test` builds beside the tests.
pub fn example_binary(name: &str) -> std::path::PathBuf {
    let test = std::env::current_exe().expect("own path");
    let target = test
        .parent()
        .and_then(std::path::Path::parent)
        .expect("target/<profile>");
    let example = target.join("examples").join(name);
    assert!(
        example.exists(),
        "{} not built: run `cargo test`",
        example.display()
    );
    example
}

/// Waits (bounded, real time) until `condition` holds.
pub fn eventually(what: &str, condition: impl Fn() -> bool) {
    let deadline = Instant::now() + hang();
    while !condition() {
        assert!(Instant::now() < deadline, "never happened: {what}");
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// Async version of [`eventually`], yielding to the runtime while it waits.
pub async fn eventually_async(what: &str, condition: impl Fn() -> bool) {
    let deadline = Instant::now() + hang();
    while !condition() {
        assert!(Instant::now() < deadline, "never happened: {what}");
        tokio::task::yield_now().await;
        std::thread::sleep(Duration::from_micros(200));
    }
}
