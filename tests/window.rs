//! Semantics 2 and 3: laziness, the window bound on lookahead, the limit.
mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use common::{Calls, Gates, eventually};
use futures::{Stream, StreamExt, TryStreamExt, stream};
use par_imap::ParImapExt;
use tokio::time::{Instant, sleep};

/// An endless input that counts what was pulled from it.
fn counted_naturals(pulled: &Arc<AtomicUsize>) -> impl Stream<Item = usize> + use<> {
    let pulled = pulled.clone();
    stream::iter(0..).inspect(move |_| {
        pulled.fetch_add(1, Ordering::SeqCst);
    })
}

#[tokio::test(start_paused = true)]
async fn nothing_pulled_or_started_before_first_poll() {
    let (pulled, calls) = (Arc::new(AtomicUsize::new(0)), Calls::default());
    let count = calls.clone();
    let results = counted_naturals(&pulled).par_imap_async(4, move |i| {
        let _running = count.enter(i);
        async move { i }
    });
    sleep(Duration::from_secs(1)).await;
    assert_eq!(pulled.load(Ordering::SeqCst), 0);
    assert_eq!(calls.started(), 0);
    drop(results);
}

/// An endless input that records, at every pull, how far it runs ahead of
/// what the consumer has taken.
#[derive(Clone, Default)]
struct Lookahead {
    pulled: Arc<AtomicUsize>,
    yielded: Arc<AtomicUsize>,
    peak: Arc<AtomicUsize>,
}

impl Lookahead {
    fn input(&self) -> impl Stream<Item = usize> + Send + 'static {
        let watch = self.clone();
        counted_naturals(&self.pulled).inspect(move |_| {
            let ahead = watch.pulled.load(Ordering::SeqCst) - watch.yielded.load(Ordering::SeqCst);
            watch.peak.fetch_max(ahead, Ordering::SeqCst);
        })
    }

    fn took_one(&self) {
        self.yielded.fetch_add(1, Ordering::SeqCst);
    }

    fn peak(&self) -> usize {
        self.peak.load(Ordering::SeqCst)
    }

    fn pulled(&self) -> usize {
        self.pulled.load(Ordering::SeqCst)
    }
}

#[tokio::test(start_paused = true)]
async fn async_lookahead_never_above_window_on_endless_input() {
    for unordered in [false, true] {
        let lookahead = Lookahead::default();
        let input = lookahead.input();
        // Every tenth item is slow, so results pile up behind it.
        let mapper = |i: usize| async move {
            sleep(Duration::from_millis(if i % 10 == 0 { 50 } else { 1 })).await;
            i
        };
        let results = if unordered {
            input.par_imap_async_unordered(3, mapper).window(7).boxed()
        } else {
            input.par_imap_async(3, mapper).window(7).boxed()
        };
        let mut results = results.take(500);
        while let Some(result) = results.next().await {
            result.unwrap();
            lookahead.took_one();
            sleep(Duration::from_millis(2)).await;
        }
        assert_eq!(lookahead.peak(), 7, "unordered: {unordered}");
        assert!(lookahead.pulled() <= 500 + 7);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blocking_lookahead_never_above_window_on_endless_input() {
    for unordered in [false, true] {
        let lookahead = Lookahead::default();
        let input = lookahead.input();
        let mapper = |i: usize| {
            std::thread::sleep(Duration::from_micros(if i % 10 == 0 { 2000 } else { 50 }));
            i
        };
        let results = if unordered {
            input.par_imap_unordered(2, mapper).window(5).boxed()
        } else {
            input.par_imap(2, mapper).window(5).boxed()
        };
        let mut results = results.take(300);
        while let Some(result) = results.next().await {
            result.unwrap();
            lookahead.took_one();
        }
        assert!(lookahead.peak() <= 5, "unordered: {unordered}");
        assert!(lookahead.pulled() <= 300 + 5);
    }
}

#[tokio::test(start_paused = true)]
async fn default_window_is_twice_the_limit() {
    let pulled = Arc::new(AtomicUsize::new(0));
    let mut results = counted_naturals(&pulled).par_imap_async(3, |i| async move {
        // The head never finishes; everything else does at once.
        if i == 0 {
            std::future::pending::<()>().await;
        }
        i
    });
    tokio::select! {
        _ = results.next() => panic!("the head never finishes"),
        _ = sleep(Duration::from_secs(5)) => {}
    }
    assert_eq!(pulled.load(Ordering::SeqCst), 6);
}

#[tokio::test(start_paused = true)]
async fn async_at_most_limit_running_and_limit_reached() {
    for unordered in [false, true] {
        let calls = Calls::default();
        let count = calls.clone();
        let mapper = move |i: usize| {
            let running = count.enter(i);
            async move {
                sleep(Duration::from_secs(1)).await;
                drop(running);
                i
            }
        };
        let start = Instant::now();
        let results = if unordered {
            stream::iter(0..20)
                .par_imap_async_unordered(4, mapper)
                .boxed()
        } else {
            stream::iter(0..20).par_imap_async(4, mapper).boxed()
        };
        assert_eq!(results.try_collect::<Vec<_>>().await.unwrap().len(), 20);
        assert_eq!(calls.peak(), 4);
        // 20 one-second calls, 4 at a time, back to back.
        assert_eq!(start.elapsed(), Duration::from_secs(5));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blocking_at_most_limit_running_and_limit_reached() {
    for unordered in [false, true] {
        let (gates, calls) = (Gates::default(), Calls::default());
        let (wait, count) = (gates.clone(), calls.clone());
        let mapper = move |i: usize| {
            let _running = count.enter(i);
            wait.wait(i);
            i
        };
        let results = if unordered {
            stream::iter(0..12).par_imap_unordered(3, mapper).boxed()
        } else {
            stream::iter(0..12).par_imap(3, mapper).boxed()
        };
        let consumer = tokio::spawn(results.try_collect::<Vec<_>>());
        eventually("3 calls to run", || calls.running() == 3);
        // Give a fourth call every chance to start wrongly.
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(calls.started(), 3);
        for i in 0..12 {
            gates.open(i);
        }
        assert_eq!(consumer.await.unwrap().unwrap().len(), 12);
        assert_eq!(calls.peak(), 3);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blocking_limit_is_reached_again_after_the_workers_went_idle() {
    // A first item runs alone, and its worker goes idle (or leaves, after
    // 50 ms). Then two items come at once: both must run together.
    let (gates, calls) = (Gates::default(), Calls::default());
    let (wait, count) = (gates.clone(), calls.clone());
    let (send, input) = futures::channel::mpsc::unbounded::<usize>();
    let mut results = input.par_imap(2, move |i| {
        let _running = count.enter(i);
        wait.wait(i);
        i
    });
    for pause in [Duration::from_millis(5), Duration::from_millis(200)] {
        let first = calls.started();
        gates.open(first);
        send.unbounded_send(first).unwrap();
        assert_eq!(results.next().await.unwrap().unwrap(), first);
        tokio::time::sleep(pause).await;
        send.unbounded_send(first + 1).unwrap();
        send.unbounded_send(first + 2).unwrap();
        let both = tokio::spawn(async move {
            let pair = [results.next().await, results.next().await];
            (results, pair)
        });
        eventually("two calls to run together", || calls.running() == 2);
        gates.open(first + 1);
        gates.open(first + 2);
        let (back, pair) = both.await.unwrap();
        results = back;
        assert_eq!(pair.map(|r| r.unwrap().unwrap()), [first + 1, first + 2]);
    }
}
