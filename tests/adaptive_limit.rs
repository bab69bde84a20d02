//! `.adaptive_limit(max)` (DESIGN, "For services"): the limit of an async
//! map moves within `1..=max` from the latency its calls show. Driven in
//! paused time against a simulated server that serves `capacity` calls at
//! once and queues the rest (its latency rises past the knee), so every run
//! is the same.
mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use common::Calls;
use futures::{StreamExt, TryStreamExt, stream};
use par_imap::ParImapExt;
use tokio::sync::Semaphore;

/// A server that serves `capacity` calls at once in 10 ms each and queues
/// the rest, as seen from the caller: a call's latency is 10 ms times the
/// calls sent per place, at least one. Changes to `capacity` apply to
/// calls made after them.
#[derive(Clone)]
struct Knee {
    capacity: Arc<AtomicUsize>,
    calls: Calls,
}

impl Knee {
    fn new(capacity: usize) -> Self {
        Knee {
            capacity: Arc::new(AtomicUsize::new(capacity)),
            calls: Calls::default(),
        }
    }

    fn call(&self, n: u64) -> impl Future<Output = u64> + Send + use<> {
        let running = self.calls.enter(n as usize);
        let sent = self.calls.running();
        let capacity = self.capacity.load(Ordering::SeqCst);
        let latency = Duration::from_millis(10).mul_f64((sent as f64 / capacity as f64).max(1.0));
        async move {
            tokio::time::sleep(latency).await;
            drop(running);
            n
        }
    }
}

/// Runs `items` calls of an adaptive map against `knee`, starting at
/// `limit`, and returns the limit after each item (as Stats shows it).
async fn limits(
    knee: &Knee,
    items: u64,
    limit: usize,
    max: usize,
    drop_at: Option<(u64, usize)>,
) -> Vec<u64> {
    let server = knee.clone();
    let results = stream::iter(0..items)
        .par_imap_async(limit, move |n| server.call(n))
        .adaptive_limit(max);
    let stats = results.stats();
    assert_eq!(stats.snapshot().limit, limit as u64, "starts at limit");
    let mut results = results.enumerate();
    let mut seen = Vec::new();
    while let Some((index, result)) = results.next().await {
        assert_eq!(result.unwrap(), index as u64, "input order");
        if let Some((at, capacity)) = drop_at
            && at == index as u64
        {
            knee.capacity.store(capacity, Ordering::SeqCst);
        }
        seen.push(stats.snapshot().limit);
    }
    seen
}

/// Of `limits`, the share within `range` (per cent).
fn share_within(limits: &[u64], range: std::ops::RangeInclusive<u64>) -> usize {
    limits.iter().filter(|limit| range.contains(limit)).count() * 100 / limits.len()
}

#[tokio::test(start_paused = true)]
async fn adaptive_limit_finds_the_knee_of_a_server() {
    let knee = Knee::new(32);
    let seen = limits(&knee, 20_000, 1, 256, None).await;
    let settled = &seen[2_000..];
    assert!(
        share_within(settled, 32..=42) >= 95,
        "settled just past the capacity of 32: {:?}",
        &seen[..300]
    );
    assert!(seen.iter().all(|&limit| (1..=256).contains(&limit)));
    assert!(
        knee.calls.peak() <= 64,
        "one step past the knee at most, while it learns: peak {}",
        knee.calls.peak()
    );
}

#[tokio::test(start_paused = true)]
async fn adaptive_limit_follows_a_capacity_drop_down() {
    let knee = Knee::new(32);
    let seen = limits(&knee, 20_000, 4, 256, Some((5_000, 8))).await;
    assert!(share_within(&seen[3_000..5_000], 32..=42) >= 95);
    // Within a few hundred calls (about a second of this server's time).
    assert!(
        share_within(&seen[5_500..], 8..=13) >= 95,
        "settled just past the new capacity of 8: {:?}",
        &seen[5_000..5_300]
    );
}

#[tokio::test(start_paused = true)]
async fn adaptive_limit_starts_at_limit_and_never_leaves_one_to_max() {
    let knee = Knee::new(1_000);
    let seen = limits(&knee, 2_000, 3, 16, None).await;
    assert!(seen.iter().all(|&limit| (1..=16).contains(&limit)));
    assert_eq!(seen.last(), Some(&16), "no knee below max: grows to max");
    assert!(knee.calls.peak() <= 16);
}

#[tokio::test(start_paused = true)]
async fn timeouts_shrink_the_adaptive_limit() {
    let results = stream::iter(0..200_u64)
        .par_imap_async(64, |n| async move {
            tokio::time::sleep(Duration::from_secs(1)).await;
            n
        })
        .adaptive_limit(64)
        .timeout(Duration::from_millis(100))
        .keep_going();
    let stats = results.stats();
    let all: Vec<_> = results.collect().await;
    assert!(
        all.iter()
            .all(|result| result.as_ref().unwrap_err().is_timeout())
    );
    assert!(
        stats.snapshot().limit <= 8,
        "every call timed out: {:?}",
        stats.snapshot()
    );
}

/// `Err`s that a `.retry` predicate accepts shrink the limit like
/// timeouts; other `Err`s count only by their latency.
#[tokio::test(start_paused = true)]
async fn errors_that_retry_shrink_the_adaptive_limit_and_others_do_not() {
    async fn run(retried: bool) -> u64 {
        let results = stream::iter(0..400_u64)
            .try_par_imap_async(64, |n| async move {
                tokio::time::sleep(Duration::from_millis(10)).await;
                // Every call fails; the predicate says whether it retries.
                Err::<u64, _>(anyhow::anyhow!("item {n}: 503"))
            })
            .adaptive_limit(64)
            .retry(
                par_imap::Retry::<anyhow::Error>::attempts(2)
                    .when(move |_| retried)
                    .jitter(false),
            )
            .keep_going();
        let stats = results.stats();
        let all: Vec<_> = results.collect().await;
        assert!(all.iter().all(Result::is_err));
        stats.snapshot().limit
    }
    let (with, without) = (run(true).await, run(false).await);
    // Half the calls (the first attempts) are drops: it stays low.
    assert!(with <= 16, "failures that retry: limit {with}");
    assert!(
        without >= 32,
        "steady latency lets it grow: limit {without}"
    );
}

#[tokio::test(start_paused = true)]
async fn a_shared_budget_caps_the_calls_but_not_the_adaptive_limit() {
    let budget = Arc::new(Semaphore::new(2));
    let calls = Calls::default();
    let watched = calls.clone();
    let results = stream::iter(0..500_u64)
        .par_imap_async(1, move |n| {
            let running = watched.enter(n as usize);
            async move {
                tokio::time::sleep(Duration::from_millis(1)).await;
                drop(running);
                n
            }
        })
        .adaptive_limit(32)
        .semaphore(budget.clone());
    let stats = results.stats();
    let all: Vec<u64> = results.try_collect().await.unwrap();
    assert_eq!(all, (0..500).collect::<Vec<_>>());
    assert!(calls.peak() <= 2, "the budget caps: {}", calls.peak());
    assert_eq!(
        stats.snapshot().limit,
        32,
        "latency from the permit on stays at its floor: the limit grows"
    );
    assert_eq!(budget.available_permits(), 2);
}

#[tokio::test(start_paused = true)]
async fn adaptive_limit_default_window_is_twice_max() {
    let pulled = Arc::new(AtomicUsize::new(0));
    let counted = pulled.clone();
    let gate = Arc::new(tokio::sync::Notify::new());
    let waiting = gate.clone();
    let mut results = Box::pin(
        stream::iter(0..1_000_u64)
            .inspect(move |_| {
                counted.fetch_add(1, Ordering::SeqCst);
            })
            .par_imap_async(2, move |n| {
                let gate = waiting.clone();
                async move {
                    if n == 0 {
                        gate.notified().await;
                    }
                    n
                }
            })
            .adaptive_limit(8),
    );
    // Item 0 hangs: the others run ahead, as far as the window lets them.
    assert!(
        tokio::time::timeout(Duration::from_secs(1), results.next())
            .await
            .is_err()
    );
    assert_eq!(pulled.load(Ordering::SeqCst), 16, "window 2 * max");
    gate.notify_one();
    assert_eq!(results.next().await.unwrap().unwrap(), 0);
}

#[test]
#[should_panic(expected = "`adaptive_limit` (2) must be at least `limit` (4)")]
fn adaptive_limit_below_limit_panics() {
    let _ = stream::iter([1])
        .par_imap_async(4, |n: i32| async move { n })
        .adaptive_limit(2);
}

#[test]
#[should_panic(expected = "`window` (8) must be at least the `adaptive_limit` (16)")]
fn window_below_the_adaptive_max_panics() {
    let _ = stream::iter([1])
        .par_imap_async(4, |n: i32| async move { n })
        .adaptive_limit(16)
        .window(8);
}

#[test]
#[should_panic(expected = "`window` (8) must be at least the `adaptive_limit` (16)")]
fn adaptive_max_above_the_window_panics() {
    let _ = stream::iter([1])
        .par_imap_async(4, |n: i32| async move { n })
        .window(8)
        .adaptive_limit(16);
}
