//! Semantics 7: any tokio runtime, multi-thread or current-thread.
mod common;

use futures::{Stream, StreamExt, TryStreamExt, stream};
use par_imap::ParImapExt;

async fn all_variants() -> Vec<u64> {
    let mut sums = Vec::new();
    let sum = |results: Vec<u64>| results.into_iter().sum::<u64>();
    sums.push(sum(stream::iter(0..50_u64)
        .par_imap(3, |n| n * n)
        .try_collect()
        .await
        .unwrap()));
    sums.push(sum(stream::iter(0..50_u64)
        .par_imap_unordered(3, |n| n * n)
        .try_collect()
        .await
        .unwrap()));
    sums.push(sum(stream::iter(0..50_u64)
        .par_imap_async(3, |n| async move { n * n })
        .try_collect()
        .await
        .unwrap()));
    sums.push(sum(stream::iter(0..50_u64)
        .par_imap_async_unordered(3, |n| async move { n * n })
        .try_collect()
        .await
        .unwrap()));
    sums.push(sum(stream::iter(0..50_u64)
        .try_par_imap(3, |n| Ok::<_, par_imap::Error>(n * n))
        .try_collect()
        .await
        .unwrap()));
    sums.push(sum(stream::iter(0..50_u64)
        .try_par_imap_unordered(3, |n| Ok::<_, par_imap::Error>(n * n))
        .try_collect()
        .await
        .unwrap()));
    sums.push(sum(stream::iter(0..50_u64)
        .try_par_imap_async(3, |n| async move { Ok::<_, par_imap::Error>(n * n) })
        .try_collect()
        .await
        .unwrap()));
    sums.push(sum(stream::iter(0..50_u64)
        .try_par_imap_async_unordered(3, |n| async move { Ok::<_, par_imap::Error>(n * n) })
        .try_collect()
        .await
        .unwrap()));
    sums
}

#[tokio::test(flavor = "current_thread")]
async fn every_variant_works_on_a_current_thread_runtime() {
    assert_eq!(all_variants().await, [40_425; 8]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_variant_works_on_a_multi_thread_runtime() {
    assert_eq!(all_variants().await, [40_425; 8]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consumer_inside_a_spawned_task() {
    let sums = tokio::spawn(all_variants()).await.unwrap();
    assert_eq!(sums, [40_425; 8]);
}

#[tokio::test(flavor = "current_thread")]
async fn empty_input_ends_at_once() {
    let mut results = stream::iter(Vec::<u8>::new()).par_imap(2, |n| n);
    assert_eq!(results.size_hint(), (0, Some(0)));
    assert!(results.next().await.is_none());
}

/// An async map whose runtime shut down right after its first poll, before
/// the tasks that run its calls were ever polled, ends when polled on
/// another runtime: each call it had handed out is reported cancelled
/// (a worker dropped unpolled must not keep a call it was handed).
#[test]
fn async_calls_handed_to_tasks_that_never_ran_end_as_cancelled_after_a_shutdown() {
    let before = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let mut map = stream::iter(0..8_u64).par_imap_async(4, |n| async move { n });
    // One poll hands calls to new tasks; `block_on` returns before the
    // runtime polls any of them, and dropping it drops them unpolled.
    before.block_on(async {
        assert!(futures::poll!(map.next()).is_pending());
    });
    drop(before);
    let after = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let results: Vec<_> = after.block_on(async {
        tokio::time::timeout(common::hang(), map.collect::<Vec<_>>())
            .await
            .expect("the map ended")
    });
    let error = results
        .last()
        .expect("a result")
        .as_ref()
        .expect_err("the calls were cancelled");
    assert!(error.is_cancelled(), "{results:?}");
}
