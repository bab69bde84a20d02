//! `.batch(k)`: one blocking call maps up to `k` items that are already
//! available; per-item results and every semantic unchanged.
mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use common::{Calls, Gates, Tracked, Tracker, eventually};
use futures::{StreamExt, TryStreamExt, stream};
use par_imap::ParImapExt;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batched_results_keep_input_order_and_every_item() {
    let out: Vec<u64> = stream::iter(0..10_000_u64)
        .par_imap(2, |n| n * 3)
        .batch(64)
        .try_collect()
        .await
        .unwrap();
    assert_eq!(out, (0..10_000).map(|n| n * 3).collect::<Vec<_>>());

    let mut unordered: Vec<u64> = stream::iter(0..10_000_u64)
        .par_imap_unordered(2, |n| n * 3)
        .batch(64)
        .try_collect()
        .await
        .unwrap();
    unordered.sort_unstable();
    assert_eq!(unordered, out);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failure_inside_a_batch_has_its_exact_index_and_nothing_after_it_is_mapped() {
    let calls = Calls::default();
    let count = calls.clone();
    let out: Vec<Result<u64, Boom>> = stream::iter(0..100_u64)
        .try_par_imap(1, move |n| {
            let _running = count.enter(n as usize);
            if n == 5 { Err(Boom(500)) } else { Ok(n) }
        })
        .batch(8)
        .collect()
        .await;
    assert_eq!(out, [Ok(0), Ok(1), Ok(2), Ok(3), Ok(4), Err(Boom(500))]);
    assert_eq!(calls.started_indices(), [0, 1, 2, 3, 4, 5]);
}

impl From<par_imap::Error> for Boom {
    fn from(error: par_imap::Error) -> Self {
        Boom(error.index())
    }
}

#[derive(Debug, PartialEq)]
struct Boom(usize);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn panic_inside_a_batch_is_an_error_at_its_index() {
    let out: Vec<Result<u64, Boom>> = stream::iter(0..20_u64)
        .try_par_imap(2, |n| {
            assert!(n != 11, "eleven");
            Ok(n)
        })
        .batch(4)
        .collect()
        .await;
    assert_eq!(out.len(), 12);
    assert_eq!(out[11], Err(Boom(11)));
    assert!(out[..11].iter().all(Result::is_ok));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_never_waits_to_fill_up() {
    let (send, input) = futures::channel::mpsc::unbounded::<u64>();
    let mut results = input.par_imap(2, |n| n + 1).batch(100);
    send.unbounded_send(1).unwrap();
    // One item is all there is: its call runs without waiting for 99 more.
    let first = tokio::time::timeout(Duration::from_secs(20), results.next()).await;
    assert_eq!(first.unwrap().unwrap().unwrap(), 2);
    drop(send);
    assert!(results.next().await.is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batched_default_window_is_twice_limit_times_k() {
    let (gates, pulled) = (Gates::default(), Arc::new(AtomicUsize::new(0)));
    let (wait, pulls) = (gates.clone(), pulled.clone());
    let results = stream::iter(0..)
        .inspect(move |_| {
            pulls.fetch_add(1, Ordering::SeqCst);
        })
        .par_imap(2, move |n: usize| {
            wait.wait(n);
            n
        })
        .batch(4);
    let consumer = tokio::spawn(results.take(100).try_collect::<Vec<_>>());
    eventually("the window to fill", || pulled.load(Ordering::SeqCst) == 16);
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(
        pulled.load(Ordering::SeqCst),
        16,
        "never more than 2 * 2 * 4"
    );
    for i in 0..200 {
        gates.open(i);
    }
    assert_eq!(
        consumer.await.unwrap().unwrap(),
        (0..100).collect::<Vec<_>>()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batched_drop_drops_every_value_once() {
    let tracker = Tracker::default();
    let (inputs, outputs) = (tracker.clone(), tracker.clone());
    let first: Vec<Tracked> = stream::iter(0..10_000)
        .map(move |i| inputs.track(i))
        .par_imap(2, move |item: Tracked| outputs.track(item.value))
        .batch(16)
        .take(20)
        .try_collect()
        .await
        .unwrap();
    assert_eq!(
        first.iter().map(|t| t.value).collect::<Vec<_>>(),
        (0..20).collect::<Vec<_>>()
    );
    drop(first);
    tracker.wait_all_dropped();
}
