//! Semantics 4: after a failure nothing is pulled or started, in-flight async
//! calls are aborted, and the consumer gets the prefix, the failure, the end.
mod common;

use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{Calls, Gates, eventually};
use futures::stream::FusedStream;
use futures::{StreamExt, stream};
use par_imap::ParImapExt;
use tokio::sync::oneshot;
use tokio::time::{Instant, sleep};

/// Drains `results`, then checks the stream stays ended.
async fn drain<T, E>(
    mut results: impl FusedStream<Item = Result<T, E>> + Unpin,
) -> Vec<Result<T, E>> {
    let mut out = Vec::new();
    while let Some(result) = results.next().await {
        out.push(result);
    }
    assert!(results.is_terminated());
    assert!(results.next().await.is_none(), "None forever after the end");
    assert!(results.next().await.is_none(), "None forever after the end");
    out
}

fn oks<T: Clone, E>(results: &[Result<T, E>]) -> Vec<T> {
    results
        .iter()
        .filter_map(|r| r.as_ref().ok().cloned())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blocking_panic_at_k_yields_prefix_then_error_then_end_and_starts_nothing_after() {
    let calls = Calls::default();
    let count = calls.clone();
    let out = drain(stream::iter(0..100).par_imap(1, move |i: usize| {
        let _running = count.enter(i);
        assert!(i != 5, "item five");
        i
    }))
    .await;
    assert_eq!(oks(&out), [0, 1, 2, 3, 4]);
    assert_eq!(out.len(), 6);
    let error = out[5].as_ref().unwrap_err();
    assert_eq!(error.index(), 5);
    assert!(error.is_panic());
    assert_eq!(calls.started_indices(), [0, 1, 2, 3, 4, 5]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn try_blocking_err_at_k_yields_prefix_then_error_then_end_and_starts_nothing_after() {
    let calls = Calls::default();
    let count = calls.clone();
    let out = drain(stream::iter(0..100).try_par_imap(1, move |i: usize| {
        let _running = count.enter(i);
        if i == 5 {
            Err(TestError::Mine(i))
        } else {
            Ok(i)
        }
    }))
    .await;
    assert_eq!(oks(&out), [0, 1, 2, 3, 4]);
    assert_eq!(out[5].as_ref().unwrap_err(), &TestError::Mine(5));
    assert_eq!(out.len(), 6);
    assert_eq!(calls.started_indices(), [0, 1, 2, 3, 4, 5]);
}

/// With `.timeout` a blocking call's results go through its deadlines'
/// progress, where a failure is judged as it is kept: the call stops at
/// it, and its own later items are never started (cargo mutants: with the
/// verdict ignored there, items 6 and 7 of the one call of eight ran).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn try_blocking_err_at_k_with_a_timeout_starts_nothing_after_in_its_call() {
    let calls = Calls::default();
    let count = calls.clone();
    let out = drain(
        stream::iter(0..8)
            .try_par_imap(1, move |i: usize| {
                let _running = count.enter(i);
                if i == 5 {
                    Err(TestError::Mine(i))
                } else {
                    Ok(i)
                }
            })
            .batch(8)
            .timeout(Duration::from_secs(600)),
    )
    .await;
    assert_eq!(oks(&out), [0, 1, 2, 3, 4]);
    assert_eq!(out[5].as_ref().unwrap_err(), &TestError::Mine(5));
    assert_eq!(out.len(), 6);
    assert_eq!(calls.started_indices(), [0, 1, 2, 3, 4, 5]);
}

impl From<par_imap::Error> for TestError {
    fn from(error: par_imap::Error) -> Self {
        TestError::Machinery(error.to_string())
    }
}

#[derive(Debug, PartialEq)]
enum TestError {
    Mine(usize),
    Machinery(String),
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blocking_failure_seen_while_earlier_items_run_stops_new_starts() {
    // Limit 2: item 1 fails while item 0 still runs. Item 0 is still
    // delivered, and no item after 1 ever starts.
    let (gates, calls) = (Gates::default(), Calls::default());
    let (wait, count) = (gates.clone(), calls.clone());
    let results = stream::iter(0..50).try_par_imap(2, move |i: usize| {
        let _running = count.enter(i);
        wait.wait(i);
        if i == 1 {
            Err(TestError::Mine(i))
        } else {
            Ok(i)
        }
    });
    let consumer = tokio::spawn(drain(results));
    eventually("items 0 and 1 to run", || calls.running() == 2);
    gates.open(1);
    eventually("item 1 to end", || calls.running() == 1);
    tokio::time::sleep(Duration::from_millis(50)).await;
    gates.open(0);
    for i in 2..50 {
        gates.open(i);
    }
    let out = consumer.await.unwrap();
    assert_eq!(out, [Ok(0), Err(TestError::Mine(1))]);
    assert_eq!(calls.started_indices(), [0, 1]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn try_blocking_panic_becomes_the_callers_error_type() {
    let out = drain(
        stream::iter(0..3).try_par_imap(1, |i: usize| -> Result<usize, TestError> {
            assert!(i != 1, "one");
            Ok(i)
        }),
    )
    .await;
    assert_eq!(
        out,
        [
            Ok(0),
            Err(TestError::Machinery("item 1 panicked: one".into()))
        ]
    );
}

/// Async items: `i` sleeps `delays[i]` seconds, then fails if `i == fail`;
/// every future reports through `finished` whether it ran to its end.
type Mapper = Box<
    dyn Fn(usize) -> Pin<Box<dyn Future<Output = Result<usize, TestError>> + Send>> + Send + Sync,
>;
type Ends = Arc<Mutex<Vec<oneshot::Receiver<()>>>>;

fn async_case(delays: Vec<u64>, fail: usize) -> (Mapper, Calls, Ends) {
    let calls = Calls::default();
    let finished = Arc::new(Mutex::new(Vec::new()));
    let (count, ends) = (calls.clone(), finished.clone());
    let mapper: Mapper = Box::new(move |i: usize| {
        let running = count.enter(i);
        let (end, ended) = oneshot::channel::<()>();
        ends.lock().unwrap().push(ended);
        let delay = delays[i];
        Box::pin(async move {
            sleep(Duration::from_secs(delay)).await;
            drop(running);
            let _ = end.send(());
            if i == fail {
                Err(TestError::Mine(i))
            } else {
                Ok(i)
            }
        })
    });
    (mapper, calls, finished)
}

/// How many of the futures ran to their end (the others were aborted).
async fn count_completed(finished: Ends) -> usize {
    let receivers = std::mem::take(&mut *finished.lock().unwrap());
    let mut completed = 0;
    for ended in receivers {
        completed += usize::from(ended.await.is_ok());
    }
    completed
}

#[tokio::test(start_paused = true)]
async fn async_err_at_k_aborts_later_calls_and_delivers_earlier_ones() {
    // Limit 4: item 1 fails at 1 s while item 0 runs until 3 s and items 2
    // and 3 until 10 s. Item 0 is delivered; items 2 and 3 are aborted;
    // nothing after 3 starts.
    let (mapper, calls, finished) = async_case(vec![3, 1, 10, 10, 1, 1, 1, 1], 1);
    let start = Instant::now();
    let consumer = tokio::spawn(drain(stream::iter(0..8).try_par_imap_async(4, mapper)));
    // At 2 s the failure is known and item 0 still runs: items 2 and 3 are
    // aborted already, not when the failure's turn comes.
    sleep(Duration::from_secs(2)).await;
    assert_eq!(calls.running(), 1, "only item 0 still runs");
    let out = consumer.await.unwrap();
    assert_eq!(out, [Ok(0), Err(TestError::Mine(1))]);
    assert_eq!(start.elapsed(), Duration::from_secs(3));
    assert_eq!(calls.started_indices(), [0, 1, 2, 3]);
    assert_eq!(count_completed(finished).await, 2, "items 2 and 3 aborted");
}

#[tokio::test(start_paused = true)]
async fn async_lower_index_failure_wins() {
    // Item 2 fails at 1 s, then item 1 fails at 2 s: the consumer sees
    // item 0, then item 1's failure, then the end.
    let (mapper, _calls, _finished) = async_case(vec![0, 2, 1, 5], usize::MAX);
    let failing = move |i: usize| {
        let call = mapper(i);
        async move {
            let result = call.await;
            if i == 1 || i == 2 {
                Err(TestError::Mine(i))
            } else {
                result
            }
        }
    };
    let out = drain(stream::iter(0..4).try_par_imap_async(4, failing)).await;
    assert_eq!(out, [Ok(0), Err(TestError::Mine(1))]);
}

#[tokio::test(start_paused = true)]
async fn async_panic_at_k_yields_prefix_then_error_then_end() {
    let calls = Calls::default();
    let count = calls.clone();
    let out = drain(stream::iter(0..100).par_imap_async(3, move |i: usize| {
        let _running = count.enter(i);
        async move {
            sleep(Duration::from_secs(1)).await;
            assert!(i != 5, "item five");
            i
        }
    }))
    .await;
    assert_eq!(oks(&out), [0, 1, 2, 3, 4]);
    assert_eq!(out.len(), 6);
    assert!(out[5].as_ref().unwrap_err().is_panic());
    // Items 3..6 ran together; the failure at 5 stopped everything after 5.
    assert_eq!(calls.started_indices(), [0, 1, 2, 3, 4, 5]);
}

#[tokio::test(start_paused = true)]
async fn async_unordered_failure_yielded_as_soon_as_seen_then_end() {
    let (mapper, calls, finished) = async_case(vec![10, 1, 10, 1], 1);
    let start = Instant::now();
    let mut results = stream::iter(0..4).try_par_imap_async_unordered(2, mapper);
    assert_eq!(results.next().await, Some(Err(TestError::Mine(1))));
    assert_eq!(start.elapsed(), Duration::from_secs(1));
    assert_eq!(results.next().await, None);
    assert!(results.is_terminated());
    assert_eq!(calls.started_indices(), [0, 1]);
    drop(results);
    assert_eq!(count_completed(finished).await, 1, "item 0 aborted");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blocking_unordered_failure_yielded_then_end() {
    let calls = Calls::default();
    let count = calls.clone();
    let out = drain(stream::iter(0..100).par_imap_unordered(1, move |i: usize| {
        let _running = count.enter(i);
        assert!(i != 3, "three");
        i
    }))
    .await;
    assert_eq!(oks(&out), [0, 1, 2]);
    assert_eq!(out[3].as_ref().unwrap_err().index(), 3);
    assert_eq!(out.len(), 4);
    assert_eq!(calls.started_indices(), [0, 1, 2, 3]);
}

/// An input item whose drop waits for a gate: it holds a worker between a
/// failure in its batch and the report of that failure.
struct SlowDrop {
    value: usize,
    gates: Gates,
}

impl Drop for SlowDrop {
    fn drop(&mut self) {
        if self.value == 1 {
            self.gates.wait(1000);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn regression_unordered_call_skipped_before_the_failure_is_heard_is_not_an_error() {
    // Found by the property tests. Unordered, calls [0, 1] and [2, 3] run,
    // [4, 5] and [6, 7] are queued. Item 0 fails: its worker sets the
    // cutoff, then drops item 1, whose drop holds it before it reports.
    // Meanwhile the other worker takes the queued calls (and [2, 3], if it
    // had not started yet), which it must skip. The skips reached the engine first and came out as
    // "cancelled" errors; the only error must be item 0's.
    let gates = Gates::default();
    let wait = gates.clone();
    let drops = gates.clone();
    let consumer = tokio::spawn(
        stream::iter(0..8)
            .map(move |value| SlowDrop {
                value,
                gates: drops.clone(),
            })
            .try_par_imap_unordered(2, move |item: SlowDrop| {
                if item.value == 0 {
                    return Err(TestError::Mine(0));
                }
                if item.value == 2 {
                    wait.wait(2);
                }
                Ok(item.value)
            })
            .batch(2)
            .window(8)
            .collect::<Vec<_>>(),
    );
    // Let item 0 fail and its worker stop in item 1's drop; then let [2]
    // end, so that its worker meets the queued calls.
    tokio::time::sleep(Duration::from_millis(50)).await;
    gates.open(2);
    tokio::time::sleep(Duration::from_millis(50)).await;
    gates.open(1000);
    let out = consumer.await.unwrap();
    // Item 2 comes out if its call started before the failure; nothing
    // else does, and the one error is item 0's.
    assert_eq!(out.last(), Some(&Err(TestError::Mine(0))), "{out:?}");
    assert!(
        out[..out.len() - 1].is_empty() || out[..out.len() - 1] == [Ok(2)],
        "{out:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn async_lower_failure_seen_later_aborts_the_calls_after_it_at_once() {
    // Item 5 fails at 1 s, then item 2 at 2 s, while item 0 runs until 10 s
    // and items 3 and 4 for an hour: from 2 s on, only item 0 may run.
    let calls = Calls::default();
    let count = calls.clone();
    let secs = [10, 0, 2, 3600, 3600, 1];
    let results = stream::iter(0..6_usize).try_par_imap_async(6, move |i| {
        let running = count.enter(i);
        async move {
            sleep(Duration::from_secs(secs[i])).await;
            drop(running);
            if i == 2 || i == 5 {
                Err(TestError::Mine(i))
            } else {
                Ok(i)
            }
        }
    });
    let consumer = tokio::spawn(drain(results));
    sleep(Duration::from_secs(5)).await;
    assert_eq!(
        calls.running(),
        1,
        "items 3 and 4 aborted when item 2 failed"
    );
    assert_eq!(
        consumer.await.unwrap(),
        [Ok(0), Ok(1), Err(TestError::Mine(2))]
    );
}
