//! `.stats()`: live counters of a map, read from another task.
mod common;

use std::time::Duration;

use common::{Gates, eventually, eventually_async};
use futures::{StreamExt, TryStreamExt, stream};
use par_imap::ParImapExt;
use tokio::time::sleep;

#[tokio::test(start_paused = true)]
async fn stats_count_a_known_run_while_it_runs_and_after() {
    // Limit 2, window 4, every item takes 1 s.
    let results = stream::iter(0..10_u64).par_imap_async(2, |n| async move {
        sleep(Duration::from_secs(1)).await;
        n
    });
    let stats = results.stats();
    let before = stats.snapshot();
    let mut idle = par_imap::Snapshot::default();
    idle.limit = 2;
    assert_eq!(before, idle, "nothing happens before the first poll");
    let watcher = stats.clone();
    let midway = tokio::spawn(async move {
        sleep(Duration::from_millis(2500)).await;
        watcher.snapshot()
    });
    let all: Vec<u64> = results.try_collect().await.unwrap();
    assert_eq!(all.len(), 10);
    let midway = midway.await.unwrap();
    assert_eq!(midway.started, 6);
    assert_eq!(midway.completed, 4);
    assert_eq!(midway.in_flight, 2);
    assert_eq!(midway.yielded, 4);
    assert!(
        midway.pulled >= 6 && midway.pulled <= 4 + 4,
        "window bound: {midway:?}"
    );
    let done = stats.snapshot();
    let debug = format!("{stats:?}");
    assert!(
        debug.starts_with("Stats(Snapshot {") && debug.contains("pulled: 10"),
        "{debug}"
    );
    assert_eq!(
        (
            done.pulled,
            done.started,
            done.completed,
            done.failed,
            done.yielded,
            done.in_flight
        ),
        (10, 10, 10, 0, 10, 0)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stats_count_failures_and_the_busy_time_of_calls() {
    let results = stream::iter(0..10_u64).try_par_imap(1, |n| {
        std::thread::sleep(Duration::from_millis(20));
        if n == 4 {
            Err(anyhow::anyhow!("four"))
        } else {
            Ok(n)
        }
    });
    let stats = results.stats();
    let out: Vec<_> = results.collect().await;
    assert_eq!(out.len(), 5);
    let done = stats.snapshot();
    assert_eq!(
        (done.started, done.completed, done.failed, done.yielded),
        (5, 5, 1, 5)
    );
    // Five calls of at least 20 ms each, however loaded the machine.
    assert!(done.busy >= Duration::from_millis(100), "{done:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_flight_counts_blocking_calls_until_they_really_end() {
    let gates = Gates::default();
    let wait = gates.clone();
    let mut results = stream::iter(0..4_usize).par_imap(2, move |n| {
        wait.wait(n);
        n
    });
    let stats = results.stats();
    gates.open(0);
    assert_eq!(results.next().await.unwrap().unwrap(), 0);
    eventually("item 1 and 2 to run", || stats.snapshot().in_flight == 2);
    drop(results);
    // The stream is gone; its running calls are not, until they return.
    assert_eq!(stats.snapshot().in_flight, 2);
    for n in 1..4 {
        gates.open(n);
    }
    eventually("the calls to end", || stats.snapshot().in_flight == 0);
    let done = stats.snapshot();
    assert_eq!(done.started, done.completed);
    assert_eq!(done.yielded, 1);
}

/// Found by review: an async call aborted after it started (fail-fast,
/// drop) never counted its end, so `in_flight` stayed above 0 for good.
#[tokio::test(start_paused = true)]
async fn in_flight_returns_to_zero_after_a_failure_aborts_running_async_calls() {
    let results = stream::iter(0..2_u32).par_imap_async_unordered(2, |i| async move {
        if i == 0 {
            sleep(Duration::from_millis(10)).await;
            panic!("item 0 fails");
        }
        std::future::pending::<()>().await;
        i
    });
    let stats = results.stats();
    let all: Vec<_> = results.collect().await;
    assert!(all[0].as_ref().unwrap_err().is_panic());
    both_calls_end(&stats).await;
}

#[tokio::test(start_paused = true)]
async fn in_flight_returns_to_zero_after_the_stream_is_dropped_with_async_calls_running() {
    let mut results = Box::pin(stream::iter(0..2_u32).par_imap_async(2, |i| async move {
        if i == 1 {
            std::future::pending::<()>().await;
        }
        i
    }));
    let stats = results.stats();
    assert_eq!(results.next().await.unwrap().unwrap(), 0);
    drop(results);
    both_calls_end(&stats).await;
}

/// Both calls of the map started and ended: an aborted task is dropped on
/// its runtime, so this yields to it while it waits.
async fn both_calls_end(stats: &par_imap::Stats) {
    eventually_async("both calls to end", || {
        let now = stats.snapshot();
        (now.started, now.completed, now.in_flight) == (2, 2, 0)
    })
    .await;
}

/// `busy` counts only calls started after `.stats()` was first called: a
/// map whose calls all ran before reads 0, one asked before its first poll
/// counts them (and an async call reads no clock until then).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn busy_counts_only_calls_started_after_stats_was_called() {
    let work = |n: u64| {
        std::thread::sleep(Duration::from_millis(2));
        n
    };
    let mut unwatched = stream::iter(0..4_u64).par_imap(2, work);
    for _ in 0..4 {
        unwatched.next().await.unwrap().unwrap();
    }
    let late = unwatched.stats().snapshot();
    assert_eq!((late.completed, late.busy), (4, Duration::ZERO), "{late:?}");

    let watched = stream::iter(0..4_u64).par_imap(2, work);
    let stats = watched.stats();
    let all: Vec<u64> = watched.try_collect().await.unwrap();
    assert_eq!(all.len(), 4);
    assert!(
        stats.snapshot().busy >= Duration::from_millis(8),
        "{:?}",
        stats.snapshot()
    );

    let mut unwatched = stream::iter(0..4_u64).par_imap_async(2, |n| async move {
        std::thread::sleep(Duration::from_millis(2));
        n
    });
    for _ in 0..4 {
        unwatched.next().await.unwrap().unwrap();
    }
    assert_eq!(unwatched.stats().snapshot().busy, Duration::ZERO);
}
