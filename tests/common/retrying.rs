//! What the `.retry` suites share (tests/retry.rs and
//! tests/retry_adversarial.rs): items that count their clones and drops
//! (and may be told to panic in either), a log of every attempt, and a
//! way to poll a map that must stay pending. Included beside `common`
//! (`#[path]`), like variants.rs.
#![allow(dead_code, unreachable_pub)]

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::{Stream, StreamExt};
use tokio::time::Instant;

pub const HOUR: Duration = Duration::from_secs(3600);

pub fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

/// Counts the values created (originals and clones) and dropped.
#[derive(Default, Debug)]
pub struct Counts {
    pub created: AtomicUsize,
    pub clones: AtomicUsize,
    pub dropped: AtomicUsize,
    /// The most values alive at once, as seen when one was created.
    pub peak: AtomicUsize,
    /// `(value, n)`: the `n`th clone (from 0) of item `value` panics.
    pub clone_panics: Mutex<Vec<(usize, usize)>>,
    /// Clones made of each item.
    pub clones_of: Mutex<std::collections::HashMap<usize, usize>>,
    /// Originals panic in their `Drop`.
    pub drop_panics: AtomicBool,
}

impl Counts {
    pub fn new() -> Arc<Self> {
        Arc::new(Counts::default())
    }

    pub fn created(&self) {
        let created = self.created.fetch_add(1, Ordering::SeqCst) + 1;
        let alive = created - self.dropped.load(Ordering::SeqCst);
        self.peak.fetch_max(alive, Ordering::SeqCst);
    }

    pub fn item(self: &Arc<Self>, value: usize) -> Counted {
        self.created();
        Counted {
            value,
            original: true,
            counts: self.clone(),
        }
    }

    pub fn alive(&self) -> usize {
        let created = self.created.load(Ordering::SeqCst);
        let dropped = self.dropped.load(Ordering::SeqCst);
        assert!(dropped <= created, "a value dropped twice");
        created - dropped
    }

    pub fn clones(&self) -> usize {
        self.clones.load(Ordering::SeqCst)
    }

    pub async fn all_dropped(&self) {
        crate::common::eventually_async("every value to be dropped", || self.alive() == 0).await;
        assert_eq!(
            self.created.load(Ordering::SeqCst),
            self.dropped.load(Ordering::SeqCst)
        );
    }
}

/// An input item that is `Clone`, knows whether it is the original, and
/// counts its drops; its `Clone` and its `Drop` may be told to panic.
#[derive(Debug)]
pub struct Counted {
    pub value: usize,
    pub original: bool,
    pub counts: Arc<Counts>,
}

impl Clone for Counted {
    fn clone(&self) -> Self {
        self.counts.clones.fetch_add(1, Ordering::SeqCst);
        let nth = {
            let mut of = self.counts.clones_of.lock().unwrap();
            let nth = of.entry(self.value).or_insert(0);
            *nth += 1;
            *nth - 1
        };
        if self
            .counts
            .clone_panics
            .lock()
            .unwrap()
            .contains(&(self.value, nth))
        {
            panic!("clone {nth} of item {} panics", self.value);
        }
        self.counts.created();
        Counted {
            value: self.value,
            original: false,
            counts: self.counts.clone(),
        }
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        self.counts.dropped.fetch_add(1, Ordering::SeqCst);
        if self.original && self.counts.drop_panics.load(Ordering::SeqCst) {
            panic!("drop of item {} panics", self.value);
        }
    }
}

/// The attempts every item made, in the order they started.
#[derive(Clone, Default)]
pub struct Attempts {
    pub log: Arc<Mutex<Vec<(usize, u32, Duration)>>>,
    pub failures: Arc<AtomicU64>,
    pub start: Arc<Mutex<Option<Instant>>>,
}

impl Attempts {
    /// Item `n` starts an attempt: logs it with the (paused) time since the
    /// first attempt of the map, and returns its number (1 for the first).
    pub fn start(&self, n: usize) -> u32 {
        let now = Instant::now();
        let since = now - *self.start.lock().unwrap().get_or_insert(now);
        let mut log = self.log.lock().unwrap();
        let attempt = log.iter().filter(|&&(i, _, _)| i == n).count() as u32 + 1;
        log.push((n, attempt, since));
        attempt
    }

    /// Counts a failed attempt; returns `fail`.
    pub fn failed(&self, fail: bool) -> bool {
        if fail {
            self.failures.fetch_add(1, Ordering::SeqCst);
        }
        fail
    }

    pub fn failures(&self) -> u64 {
        self.failures.load(Ordering::SeqCst)
    }

    /// How many attempts all items made.
    pub fn total(&self) -> usize {
        self.log.lock().unwrap().len()
    }

    /// How many attempts item `n` made.
    pub fn of(&self, n: usize) -> u32 {
        let log = self.log.lock().unwrap();
        log.iter().filter(|&&(i, _, _)| i == n).count() as u32
    }

    /// `(item, attempt)` in the order the attempts started.
    pub fn order(&self) -> Vec<(usize, u32)> {
        let log = self.log.lock().unwrap();
        log.iter().map(|&(i, a, _)| (i, a)).collect()
    }

    /// When each attempt of item `n` started.
    pub fn times(&self, n: usize) -> Vec<Duration> {
        let log = self.log.lock().unwrap();
        log.iter()
            .filter(|&&(i, _, _)| i == n)
            .map(|&(_, _, at)| at)
            .collect()
    }

    /// The waits between the attempts of item `n`.
    pub fn gaps(&self, n: usize) -> Vec<Duration> {
        self.times(n)
            .windows(2)
            .map(|pair| pair[1] - pair[0])
            .collect()
    }
}

/// Polls `map` (which must stay pending) and lets the runtime's other tasks
/// run until `condition` holds. Paused time does not move meanwhile: a
/// yield never lets the clock auto-advance.
pub async fn pending_until<S>(map: &mut S, what: &str, condition: impl Fn() -> bool)
where
    S: Stream + Unpin,
    S::Item: std::fmt::Debug,
{
    for _ in 0..10_000 {
        if condition() {
            return;
        }
        if let std::task::Poll::Ready(item) = futures::poll!(map.next()) {
            panic!("the map yielded {item:?} while waiting for: {what}");
        }
        tokio::task::yield_now().await;
    }
    panic!("never happened: {what}");
}
