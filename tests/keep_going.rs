//! `.keep_going()`: a failed item is yielded at its place as its error and
//! the map goes on, in every variant; cancellation still ends the map.
mod common;

use std::time::Duration;

use common::{Gates, Tracker};
use futures::{StreamExt, stream};
use par_imap::ParImapExt;
use tokio_util::sync::CancellationToken;

/// Item 3 panics, item 6 fails in the `try_` variants.
fn plain(n: u64) -> u64 {
    assert!(n != 3, "no threes");
    n * 10
}

fn fallible(n: u64) -> Result<u64, anyhow::Error> {
    anyhow::ensure!(n != 6, "no sixes");
    Ok(plain(n))
}

/// What the stream yielded, item by item: `Ok(value)` or `Err(message)`.
fn summary<E: std::fmt::Display>(results: Vec<Result<u64, E>>) -> Vec<Result<u64, String>> {
    results
        .into_iter()
        .map(|result| result.map_err(|error| error.to_string()))
        .collect()
}

fn expected(fallible: bool) -> Vec<Result<u64, String>> {
    (0..10)
        .map(|n| match n {
            3 => Err("item 3 panicked: no threes".to_owned()),
            6 if fallible => Err("no sixes".to_owned()),
            n => Ok(n * 10),
        })
        .collect()
}

fn sorted(mut results: Vec<Result<u64, String>>) -> Vec<Result<u64, String>> {
    results.sort_by_key(|result| match result {
        Ok(value) => *value,
        Err(message) if message.contains("three") => 30,
        Err(_) => 60,
    });
    results
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keep_going_yields_failures_at_their_place_in_all_eight_variants() {
    let input = || stream::iter(0..10_u64);
    let ordered = summary(input().par_imap(2, plain).keep_going().collect().await);
    assert_eq!(ordered, expected(false));
    let unordered = summary(
        input()
            .par_imap_unordered(2, plain)
            .keep_going()
            .collect()
            .await,
    );
    assert_eq!(sorted(unordered), expected(false));
    let ordered_async = summary(
        input()
            .par_imap_async(2, |n| async move { plain(n) })
            .keep_going()
            .collect()
            .await,
    );
    assert_eq!(ordered_async, expected(false));
    let unordered_async = summary(
        input()
            .par_imap_async_unordered(2, |n| async move { plain(n) })
            .keep_going()
            .collect()
            .await,
    );
    assert_eq!(sorted(unordered_async), expected(false));

    let try_ordered = summary(
        input()
            .try_par_imap(2, fallible)
            .keep_going()
            .collect()
            .await,
    );
    assert_eq!(try_ordered, expected(true));
    let try_unordered = summary(
        input()
            .try_par_imap_unordered(2, fallible)
            .keep_going()
            .collect()
            .await,
    );
    assert_eq!(sorted(try_unordered), expected(true));
    let try_async = summary(
        input()
            .try_par_imap_async(2, |n| async move { fallible(n) })
            .keep_going()
            .collect()
            .await,
    );
    assert_eq!(try_async, expected(true));
    let try_async_unordered = summary(
        input()
            .try_par_imap_async_unordered(2, |n| async move { fallible(n) })
            .keep_going()
            .collect()
            .await,
    );
    assert_eq!(sorted(try_async_unordered), expected(true));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keep_going_inside_a_batch_maps_the_items_after_a_failure() {
    for k in [1, 3, 4, 64] {
        let results = summary(
            stream::iter(0..10_u64)
                .try_par_imap(2, fallible)
                .batch(k)
                .keep_going()
                .collect()
                .await,
        );
        assert_eq!(results, expected(true), "batch({k})");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keep_going_with_par_imap_init_replaces_a_panicked_state() {
    let results = summary(
        stream::iter(0..10_u64)
            .par_imap_init(
                2,
                || 0_u64,
                |calls: &mut u64, n| {
                    *calls += 1;
                    plain(n)
                },
            )
            .keep_going()
            .collect()
            .await,
    );
    assert_eq!(results, expected(false));
}

#[tokio::test(start_paused = true)]
async fn keep_going_async_timeout_is_an_error_and_the_map_goes_on() {
    let results: Vec<_> = stream::iter([1_u64, 60, 2, 90, 3])
        .par_imap_async(2, |secs| async move {
            tokio::time::sleep(Duration::from_secs(secs)).await;
            secs
        })
        .timeout(Duration::from_secs(10))
        .keep_going()
        .collect()
        .await;
    let indices: Vec<Result<u64, usize>> = results
        .into_iter()
        .map(|result| {
            result.map_err(|error| {
                assert!(error.is_timeout());
                error.index()
            })
        })
        .collect();
    assert_eq!(indices, [Ok(1), Err(1), Ok(2), Err(3), Ok(3)]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keep_going_blocking_timeout_in_a_batch_goes_on_after_the_item_returns() {
    // Item 1 runs until it sees it was given up; items 0 and 2 of the same
    // call are delivered, 1 is a timeout at its own index.
    let gates = Gates::default();
    let wait = gates.clone();
    let results: Vec<_> = stream::iter(0..3_u64)
        .par_imap(1, move |n| {
            if n == 1 {
                while !par_imap::is_cancelled() {
                    std::thread::sleep(Duration::from_millis(1));
                }
                wait.open(1);
            }
            n
        })
        .batch(3)
        .timeout(Duration::from_millis(50))
        .keep_going()
        .collect()
        .await;
    gates.wait(1);
    assert_eq!(*results[0].as_ref().unwrap(), 0);
    let timed_out = results[1].as_ref().unwrap_err();
    assert!(timed_out.is_timeout());
    assert_eq!(timed_out.index(), 1);
    assert_eq!(*results[2].as_ref().unwrap(), 2);
    assert_eq!(results.len(), 3);
}

/// As above, but item 1 returns only once the consumer has its timeout:
/// the map gave it up while it ran (not the worker at its end), and the
/// results after it in its call come at their own indices (found by
/// `cargo mutants`: a give-up that left the item's index as the first not
/// taken passed every test, the worker always seeing the overrun first).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keep_going_blocking_timeout_given_up_by_the_map_keeps_the_rest_of_its_batch_in_place() {
    let gates = Gates::default();
    let wait = gates.clone();
    let mut results = stream::iter(0..4_u64)
        .par_imap(1, move |n| {
            if n == 1 {
                wait.wait(1);
            }
            n
        })
        .batch(4)
        // Long enough that trivial item 0 never overruns on a loaded
        // machine (seen once at 50 ms: item 0 timed out instead).
        .timeout(Duration::from_millis(500))
        .keep_going();
    let bound = common::hang();
    let first = tokio::time::timeout(bound, results.next()).await.unwrap();
    assert_eq!(first.unwrap().unwrap(), 0);
    let second = tokio::time::timeout(bound, results.next()).await.unwrap();
    let timed_out = second.unwrap().unwrap_err();
    assert!(
        timed_out.is_timeout() && timed_out.index() == 1,
        "{timed_out:?}"
    );
    gates.open(1);
    let rest: Vec<u64> = tokio::time::timeout(bound, (&mut results).map(Result::unwrap).collect())
        .await
        .expect("the rest of the call comes");
    assert_eq!(rest, [2, 3]);
}

#[tokio::test(start_paused = true)]
async fn keep_going_still_ends_at_cancellation() {
    let token = CancellationToken::new();
    let mut results = stream::iter(0_u64..)
        .par_imap_async(2, |n| async move {
            assert!(n != 1, "no ones");
            n
        })
        .keep_going()
        .cancel_token(token.clone());
    assert_eq!(results.next().await.unwrap().unwrap(), 0);
    assert!(results.next().await.unwrap().unwrap_err().is_panic());
    token.cancel();
    let cancelled = results.next().await.unwrap().unwrap_err();
    assert!(cancelled.is_cancelled());
    assert_eq!(cancelled.index(), 2);
    assert!(results.next().await.is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keep_going_drops_every_value_once() {
    let tracker = Tracker::default();
    let (inputs, outputs) = (tracker.clone(), tracker.clone());
    let first: Vec<_> = stream::iter(0..1_000)
        .map(move |i| inputs.track(i))
        .par_imap(2, move |item: common::Tracked| {
            assert!(item.value % 7 != 3, "a failure every seven items");
            outputs.track(item.value)
        })
        .keep_going()
        .take(50)
        .collect()
        .await;
    assert_eq!(first.len(), 50);
    assert_eq!(first.iter().filter(|result| result.is_err()).count(), 7);
    drop(first);
    tracker.wait_all_dropped();
}

/// `.keep_going()` with `.timeout`: a failure that comes to the map along
/// with a later item's timeout in the same call is counted in `Stats`,
/// like the timeout (found in review: only the timeout was counted, unless
/// a thief happened to deliver the failure first).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keep_going_a_failure_delivered_with_a_timeout_is_counted() {
    let gates = Gates::default();
    let wait = gates.clone();
    let map = stream::iter(0..2_u64)
        .try_par_imap(1, move |n| {
            if n == 0 {
                return Err(anyhow::anyhow!("item 0 fails"));
            }
            // Item 1 runs until the consumer has its timeout.
            wait.wait(1);
            Ok(n)
        })
        .batch(2)
        // Long enough that item 0's `Err` never overruns on a loaded machine.
        .timeout(Duration::from_millis(250))
        .keep_going();
    let stats = map.stats();
    let mut map = std::pin::pin!(map);
    let bound = common::hang();
    let first = tokio::time::timeout(bound, map.next()).await.unwrap();
    let first = first.unwrap().unwrap_err();
    assert_eq!(first.to_string(), "item 0 fails");
    let second = tokio::time::timeout(bound, map.next()).await.unwrap();
    let second = second.unwrap().unwrap_err();
    let timeout = second.downcast_ref::<par_imap::Error>();
    assert!(
        timeout.is_some_and(par_imap::Error::is_timeout),
        "{second:?}"
    );
    gates.open(1);
    assert!(
        tokio::time::timeout(bound, map.next())
            .await
            .unwrap()
            .is_none()
    );
    assert_eq!(stats.snapshot().failed, 2, "{:?}", stats.snapshot());
}
