//! The public types' auto traits, `Debug`, `FusedStream` and `size_hint`.
use std::marker::PhantomPinned;
use std::pin::Pin;
use std::task::{Context, Poll};

use futures::StreamExt;
use futures::stream::{self, FusedStream, Stream};
use par_imap::ParImapExt;

fn is_send<T: Send>(_: &T) {}
fn is_unpin<T: Unpin>(_: &T) {}

/// A `Send` stream that is not `Unpin`.
struct Pinned(PhantomPinned);

impl Stream for Pinned {
    type Item = u8;
    fn poll_next(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<Option<u8>> {
        Poll::Ready(None)
    }
}

#[test]
fn every_variant_is_send_and_unpin_when_its_input_is() {
    is_send(&stream::iter([1]).par_imap(1, |n: i32| n));
    is_unpin(&stream::iter([1]).par_imap(1, |n: i32| n));
    is_send(&stream::iter([1]).par_imap_unordered(1, |n: i32| n));
    is_send(&stream::iter([1]).par_imap_async(1, |n: i32| async move { n }));
    is_unpin(&stream::iter([1]).par_imap_async(1, |n: i32| async move { n }));
    is_send(&stream::iter([1]).try_par_imap(1, |n: i32| Ok::<_, par_imap::Error>(n)));
    is_send(
        &stream::iter([1]).try_par_imap_async(1, |n: i32| async move { Ok::<_, anyhow::Error>(n) }),
    );
    is_unpin(
        &stream::iter([1])
            .try_par_imap_async_unordered(1, |n: i32| async move { Ok::<_, anyhow::Error>(n) }),
    );
}

#[test]
fn not_unpin_when_the_input_is_not_but_still_send() {
    let results = Pinned(PhantomPinned).par_imap(1, |n| n);
    is_send(&results);
    // `Box::pin` is how such a stream is polled.
    let _ = Box::pin(results).boxed();
}

#[test]
fn static_assertions_of_unpin_follow_the_input() {
    fn unpin_iff_input_unpin<St: Stream + Unpin>(st: St) -> impl Unpin
    where
        St::Item: Send + 'static,
    {
        st.par_imap(1, |n| n)
    }
    let _ = unpin_iff_input_unpin(stream::iter([1]));
}

#[tokio::test(flavor = "current_thread")]
async fn debug_fused_and_size_hint() {
    let mut results = stream::iter(0..10).par_imap(2, |n: i32| n).window(4);
    let debug = format!("{results:?}");
    assert!(
        debug.starts_with("ParImap {") && debug.contains("limit: 2") && debug.contains("window: 4"),
        "{debug}"
    );
    // Before the first poll: at least one item, at most ten.
    assert_eq!(results.size_hint(), (1, Some(10)));
    assert!(!results.is_terminated());
    assert_eq!(results.next().await.unwrap().unwrap(), 0);
    assert_eq!(results.size_hint(), (1, Some(9)));
    let rest: Vec<_> = results.by_ref().collect().await;
    assert_eq!(rest.len(), 9);
    assert_eq!(results.size_hint(), (0, Some(0)));
    assert!(results.is_terminated());
}

#[tokio::test(start_paused = true)]
async fn size_hint_after_an_unordered_failure_counts_what_is_left() {
    // All three finish at the same instant; item 1 fails. Item 0 comes out
    // first, then exactly one item is left: the failure.
    let mut results = stream::iter(0..3_u64).try_par_imap_async_unordered(3, |n| async move {
        tokio::time::sleep(std::time::Duration::from_secs(1)).await;
        if n == 1 {
            Err(anyhow::anyhow!("one"))
        } else {
            Ok(n)
        }
    });
    let first = results.next().await.unwrap();
    assert_eq!(first.unwrap(), 0);
    assert_eq!(results.size_hint(), (1, Some(1)));
    assert!(results.next().await.unwrap().is_err());
    assert_eq!(results.size_hint(), (0, Some(0)));
}

#[tokio::test(start_paused = true)]
async fn size_hint_while_an_ordered_failure_waits_for_its_turn() {
    // Item 2 fails at 1 s; items 0 and 1 come out first: the upper bound
    // counts down to the failure, which is the last item.
    let mut results = stream::iter(0..10_u64).try_par_imap_async(3, |n| async move {
        tokio::time::sleep(std::time::Duration::from_secs([2, 0, 1][n as usize % 3])).await;
        if n == 2 {
            Err(anyhow::anyhow!("two"))
        } else {
            Ok(n)
        }
    });
    assert_eq!(results.next().await.unwrap().unwrap(), 0);
    assert_eq!(results.size_hint(), (1, Some(2)));
    assert_eq!(results.next().await.unwrap().unwrap(), 1);
    assert_eq!(results.size_hint(), (1, Some(1)));
    assert!(results.next().await.unwrap().is_err());
    assert_eq!(results.size_hint(), (0, Some(0)));
}

#[tokio::test(start_paused = true)]
async fn size_hint_with_a_cancel_token_once_the_input_has_ended() {
    // A cancellation can only replace owed items once the input is known to
    // have ended: no extra error item in the bound.
    let token = tokio_util::sync::CancellationToken::new();
    let mut results = stream::iter(0..2_u64)
        .par_imap_async(4, |n| async move {
            tokio::time::sleep(std::time::Duration::from_secs(n + 1)).await;
            n
        })
        .cancel_token(token);
    assert_eq!(results.next().await.unwrap().unwrap(), 0);
    assert_eq!(results.size_hint(), (1, Some(1)));
}

#[test]
fn size_hint_before_the_first_poll_is_honest_about_what_may_come() {
    // Nothing promised from an input that promises nothing.
    let (_send, input) = futures::channel::mpsc::unbounded::<u64>();
    assert_eq!(input.par_imap(2, |n| n).size_hint(), (0, None));
    // A cancel token or a shared budget may add one error item after an
    // input that ends unseen.
    let cancellable = stream::iter(0..10_u64)
        .par_imap(2, |n| n)
        .cancel_token(tokio_util::sync::CancellationToken::new());
    assert_eq!(cancellable.size_hint(), (1, Some(11)));
    let budgeted = stream::iter(0..10_u64)
        .par_imap(2, |n| n)
        .semaphore(std::sync::Arc::new(tokio::sync::Semaphore::new(1)));
    assert_eq!(budgeted.size_hint(), (1, Some(11)));
    assert_eq!(
        stream::iter(0..10_u64).par_imap(2, |n| n).size_hint(),
        (1, Some(10))
    );
}

/// `Debug` shows where the map is: items pulled, yielded, and calls in
/// flight (found by `cargo mutants`: the three could read anything).
#[tokio::test(flavor = "current_thread")]
async fn debug_shows_pulled_yielded_and_in_flight() {
    let mut results = stream::iter(0..10_u64)
        .par_imap_async(2, |n| async move {
            if n > 0 {
                std::future::pending::<()>().await;
            }
            n
        })
        .window(4);
    assert_eq!(results.next().await.unwrap().unwrap(), 0);
    // Item 0 came; items 1 and 2 run (limit 2); an async map pulls an item
    // when it can start it.
    tokio::task::yield_now().await;
    let debug = format!("{results:?}");
    assert!(
        debug.contains("limit: 2, ")
            && debug.contains("key_order: false, retry: false, ")
            && debug.contains("pulled: 3, yielded: 1, in_flight: 2"),
        "{debug}"
    );
    let keyed = stream::iter(0..10_u64)
        .par_imap(2, |n| n)
        .key_order(|n: &u64| n % 2);
    let debug = format!("{keyed:?}");
    assert!(debug.contains("key_order: true, "), "{debug}");
}
