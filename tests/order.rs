//! Semantics 1: input order for `par_imap*`, completion order for `*_unordered`.
mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{Calls, Gates, eventually};
use futures::{StreamExt, TryStreamExt, stream};
use par_imap::ParImapExt;
use tokio::time::{Instant, sleep};

/// A fixed shuffle of `0..n` (a multiplicative walk, no RNG needed).
fn shuffled(n: usize) -> Vec<usize> {
    (0..n).map(|i| (i * 7 + 3) % n).collect()
}

#[tokio::test(start_paused = true)]
async fn async_ordered_yields_input_order_under_shuffled_completion() {
    let delays = shuffled(50);
    let finished = Arc::new(Mutex::new(Vec::new()));
    let log = finished.clone();
    let out: Vec<usize> = stream::iter(0..50)
        .par_imap_async(50, move |i| {
            let (delay, log) = (delays[i], log.clone());
            async move {
                sleep(Duration::from_millis(delay as u64)).await;
                log.lock().unwrap().push(i);
                i
            }
        })
        .try_collect()
        .await
        .unwrap();
    assert_eq!(out, (0..50).collect::<Vec<_>>());
    assert_ne!(
        *finished.lock().unwrap(),
        out,
        "completions were not shuffled"
    );
}

#[tokio::test(start_paused = true)]
async fn async_unordered_yields_completion_order() {
    let delays = shuffled(20);
    let expected: Vec<usize> = {
        let mut by_delay: Vec<usize> = (0..20).collect();
        by_delay.sort_by_key(|&i| delays[i]);
        by_delay
    };
    let out: Vec<usize> = stream::iter(0..20)
        .par_imap_async_unordered(20, move |i| {
            let delay = delays[i];
            async move {
                sleep(Duration::from_millis(delay as u64 + 1)).await;
                i
            }
        })
        .try_collect()
        .await
        .unwrap();
    assert_eq!(out, expected);
}

/// Opens the gates of `order` one by one, each after the previous call ended.
fn release_in_order(gates: Gates, done: Arc<Mutex<Vec<usize>>>, order: Vec<usize>) {
    std::thread::spawn(move || {
        for (step, index) in order.into_iter().enumerate() {
            gates.open(index);
            eventually("the released call to end", || {
                done.lock().unwrap().len() > step
            });
        }
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blocking_ordered_yields_input_order_under_shuffled_completion() {
    let (gates, done) = (Gates::default(), Arc::new(Mutex::new(Vec::new())));
    let (wait, log) = (gates.clone(), done.clone());
    let results = stream::iter(0..16).par_imap(16, move |i| {
        wait.wait(i);
        log.lock().unwrap().push(i);
        i * 10
    });
    release_in_order(gates, done.clone(), shuffled(16));
    let out: Vec<usize> = results.try_collect().await.unwrap();
    assert_eq!(out, (0..16).map(|i| i * 10).collect::<Vec<_>>());
    assert_eq!(*done.lock().unwrap(), shuffled(16));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blocking_unordered_yields_completion_order() {
    // One item released at a time, the next only once the consumer has the
    // last: a worker's report is sent just after its mapper returns, so
    // releasing on the mapper's return raced the reports (seen once under
    // load: two results swapped).
    let gates = Gates::default();
    let wait = gates.clone();
    let mut results = stream::iter(0..16).par_imap_unordered(16, move |i| {
        wait.wait(i);
        i
    });
    for index in shuffled(16) {
        gates.open(index);
        let next = tokio::time::timeout(common::hang(), results.next()).await;
        assert_eq!(next.expect("a result").unwrap().unwrap(), index);
    }
    assert!(results.next().await.is_none());
}

#[tokio::test(start_paused = true)]
async fn async_head_released_as_soon_as_ready() {
    let start = Instant::now();
    let mut results = stream::iter([1_u64, 100, 100]).par_imap_async(3, |secs| async move {
        sleep(Duration::from_secs(secs)).await;
        secs
    });
    assert_eq!(results.next().await.unwrap().unwrap(), 1);
    assert_eq!(start.elapsed(), Duration::from_secs(1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blocking_head_released_as_soon_as_ready() {
    let (gates, calls) = (Gates::default(), Calls::default());
    let (wait, count) = (gates.clone(), calls.clone());
    let mut results = stream::iter(0..3).par_imap(3, move |i| {
        let _running = count.enter(i);
        wait.wait(i);
        i
    });
    gates.open(0);
    assert_eq!(results.next().await.unwrap().unwrap(), 0);
    // Item 0 came out while items 1 and 2 run, blocked on gates still shut.
    eventually("items 1 and 2 to run", || calls.running() == 2);
    gates.open(1);
    gates.open(2);
    assert_eq!(results.try_collect::<Vec<_>>().await.unwrap(), [1, 2]);
}

#[tokio::test(start_paused = true)]
async fn async_ordered_slow_head_does_not_idle_other_workers() {
    // Item 0 takes 10 s; with limit 2 and window 8, items 1..8 all run on the
    // second worker meanwhile, one second each.
    let start = Instant::now();
    let out: Vec<u64> = stream::iter(0..8_u64)
        .par_imap_async(2, |i| async move {
            sleep(Duration::from_secs(if i == 0 { 10 } else { 1 })).await;
            i
        })
        .window(8)
        .try_collect()
        .await
        .unwrap();
    assert_eq!(out, (0..8).collect::<Vec<_>>());
    assert_eq!(start.elapsed(), Duration::from_secs(10));
}
