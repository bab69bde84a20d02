//! The options for services: `.timeout`, `.cancel_token`, `.semaphore`,
//! `is_cancelled()` inside blocking calls, and `par_imap_init`.
mod common;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{Calls, Gates, eventually};
use futures::stream::FusedStream;
use futures::{StreamExt, TryStreamExt, stream};
use par_imap::ParImapExt;
use tokio::sync::{Semaphore, oneshot};
use tokio::time::{Instant, sleep};
use tokio_util::sync::CancellationToken;

/// An async mapper sleeping `secs(i)` seconds, whose futures report through
/// the returned receivers whether they were torn down before their end.
fn sleeper(
    secs: impl Fn(usize) -> u64 + Send + Sync + 'static,
    calls: &Calls,
    torn_down: &Arc<Mutex<Vec<oneshot::Receiver<()>>>>,
) -> impl Fn(usize) -> std::pin::Pin<Box<dyn Future<Output = usize> + Send>> + Send + Sync + 'static
{
    let (count, tear) = (calls.clone(), torn_down.clone());
    move |i| {
        let running = count.enter(i);
        let (alive, closed) = oneshot::channel::<()>();
        tear.lock().unwrap().push(closed);
        let secs = secs(i);
        Box::pin(async move {
            let _running = running;
            sleep(Duration::from_secs(secs)).await;
            let _ = alive.send(());
            i
        })
    }
}

/// How many futures were torn down before their end.
async fn aborted(torn_down: &Arc<Mutex<Vec<oneshot::Receiver<()>>>>) -> usize {
    let receivers = std::mem::take(&mut *torn_down.lock().unwrap());
    let mut aborted = 0;
    for closed in receivers {
        aborted += usize::from(closed.await.is_err());
    }
    aborted
}

// ---- timeout ----

#[tokio::test(start_paused = true)]
async fn async_timeout_fails_the_item_with_is_timeout_and_aborts_it() {
    let (calls, torn_down) = (Calls::default(), Arc::default());
    let start = Instant::now();
    let results: Vec<_> = stream::iter(0..10)
        .par_imap_async(
            2,
            sleeper(|i| if i == 1 { 60 } else { 1 }, &calls, &torn_down),
        )
        .timeout(Duration::from_secs(10))
        .collect()
        .await;
    assert_eq!(*results[0].as_ref().unwrap(), 0);
    let error = results[1].as_ref().unwrap_err();
    assert!(error.is_timeout() && error.index() == 1);
    assert_eq!(error.to_string(), "item 1 timed out");
    assert_eq!(results.len(), 2);
    assert_eq!(start.elapsed(), Duration::from_secs(10));
    // Items 2..5 ran beside item 1 until the window (4) was full; item 1,
    // the only one running at 10 s, was aborted, and nothing started after.
    assert_eq!(aborted(&torn_down).await, 1);
    assert_eq!(calls.started_indices(), [0, 1, 2, 3, 4]);
}

#[tokio::test(start_paused = true)]
async fn timeout_counts_from_the_mappers_start_not_from_queueing() {
    // Limit 1: item 2 waits 12 s for its turn, then runs 6 s of its 10.
    let (calls, torn_down) = (Calls::default(), Arc::default());
    let start = Instant::now();
    let results: Vec<usize> = stream::iter(0..3)
        .par_imap_async(1, sleeper(|_| 6, &calls, &torn_down))
        .timeout(Duration::from_secs(10))
        .try_collect()
        .await
        .unwrap();
    assert_eq!(results, [0, 1, 2]);
    assert_eq!(start.elapsed(), Duration::from_secs(18));
}

#[tokio::test(start_paused = true)]
async fn unordered_timeout_is_yielded_at_once() {
    let (calls, torn_down) = (Calls::default(), Arc::default());
    let start = Instant::now();
    let mut results = stream::iter(0..4)
        .par_imap_async_unordered(
            4,
            sleeper(|i| if i == 0 { 60 } else { 30 }, &calls, &torn_down),
        )
        .timeout(Duration::from_secs(5));
    let error = results.next().await.unwrap().unwrap_err();
    assert!(error.is_timeout());
    assert_eq!(start.elapsed(), Duration::from_secs(5));
    assert!(results.next().await.is_none());
    drop(results);
    assert_eq!(aborted(&torn_down).await, 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blocking_timeout_sets_is_cancelled_and_holds_its_permit_until_it_returns() {
    let budget = Arc::new(Semaphore::new(1));
    let (gates, saw_cancelled) = (Gates::default(), Arc::new(AtomicBool::new(false)));
    let (wait, saw) = (gates.clone(), saw_cancelled.clone());
    let mut results = stream::iter(0..5)
        .par_imap(1, move |i: usize| {
            assert!(!par_imap::is_cancelled());
            while !par_imap::is_cancelled() {
                std::thread::sleep(Duration::from_millis(1));
            }
            saw.store(true, Ordering::SeqCst);
            // Cannot be pre-empted: it ends when the test says so.
            wait.wait(i);
            i
        })
        .timeout(Duration::from_millis(30))
        .semaphore(budget.clone());
    let error = results.next().await.unwrap().unwrap_err();
    assert!(error.is_timeout() && error.index() == 0);
    eventually("the call to see is_cancelled()", || {
        saw_cancelled.load(Ordering::SeqCst)
    });
    // The call still runs, so it still holds the shared permit.
    assert_eq!(budget.available_permits(), 0);
    assert!(results.next().await.is_none());
    gates.open(0);
    eventually("the permit to come back", || {
        budget.available_permits() == 1
    });
}

// ---- cancel_token ----

#[tokio::test(start_paused = true)]
async fn cancel_token_yields_one_cancelled_error_at_the_lowest_unyielded_index_then_ends() {
    let (calls, torn_down) = (Calls::default(), Arc::default());
    let token = CancellationToken::new();
    let mut results = stream::iter(0..100)
        .par_imap_async(
            3,
            sleeper(|i| if i == 0 { 1 } else { 3600 }, &calls, &torn_down),
        )
        .cancel_token(token.clone());
    assert_eq!(results.next().await.unwrap().unwrap(), 0);
    let canceller = token.clone();
    tokio::spawn(async move {
        sleep(Duration::from_secs(5)).await;
        canceller.cancel();
    });
    let error = results.next().await.unwrap().unwrap_err();
    assert!(error.is_cancelled());
    assert_eq!(error.index(), 1);
    assert!(results.next().await.is_none());
    assert!(results.is_terminated());
    let started = calls.started();
    assert_eq!(
        aborted(&torn_down).await,
        started - 1,
        "every call but item 0 aborted"
    );
    sleep(Duration::from_secs(7200)).await;
    assert_eq!(
        calls.started(),
        started,
        "nothing started after the cancellation"
    );
}

#[tokio::test(start_paused = true)]
async fn unordered_cancel_error_names_the_lowest_index_not_yet_yielded() {
    let (calls, torn_down) = (Calls::default(), Arc::default());
    let token = CancellationToken::new();
    let mut results = stream::iter(0..3)
        .par_imap_async_unordered(3, sleeper(|i| [100, 1, 100][i], &calls, &torn_down))
        .cancel_token(token.clone());
    assert_eq!(results.next().await.unwrap().unwrap(), 1);
    token.cancel();
    assert_eq!(results.next().await.unwrap().unwrap_err().index(), 0);
    assert!(results.next().await.is_none());
}

#[tokio::test(start_paused = true)]
async fn cancel_while_a_failure_waits_for_its_turn_yields_the_cancellation() {
    let token = CancellationToken::new();
    let mut results = stream::iter(0..3)
        .try_par_imap_async(3, |i: u64| async move {
            sleep(Duration::from_secs(if i == 0 { 100 } else { 1 })).await;
            if i == 1 {
                Err(anyhow::anyhow!("item 1 failed"))
            } else {
                Ok(i)
            }
        })
        .cancel_token(token.clone());
    tokio::select! {
        _ = results.next() => panic!("item 0 takes 100 s"),
        _ = sleep(Duration::from_secs(5)) => token.cancel(),
    }
    let error = results.next().await.unwrap().unwrap_err();
    let error = error.downcast::<par_imap::Error>().unwrap();
    assert!(error.is_cancelled() && error.index() == 0);
    assert!(results.next().await.is_none());
}

#[tokio::test(start_paused = true)]
async fn cancel_after_everything_was_yielded_just_ends() {
    let token = CancellationToken::new();
    let mut results = stream::iter(0..2)
        .par_imap_async(2, |i: u64| async move { i })
        .cancel_token(token.clone());
    assert_eq!(results.next().await.unwrap().unwrap(), 0);
    assert_eq!(results.next().await.unwrap().unwrap(), 1);
    token.cancel();
    assert!(results.next().await.is_none());
}

#[tokio::test(start_paused = true)]
async fn dropping_the_map_does_not_cancel_the_callers_token() {
    let token = CancellationToken::new();
    let results = stream::iter(0..10)
        .par_imap_async(2, |i: u64| async move { i })
        .cancel_token(token.clone());
    let first: Vec<u64> = results.take(2).try_collect().await.unwrap();
    assert_eq!(first, [0, 1]);
    assert!(!token.is_cancelled());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_token_sets_is_cancelled_inside_running_blocking_calls() {
    let token = CancellationToken::new();
    let (calls, rounds) = (Calls::default(), Arc::new(AtomicUsize::new(0)));
    let (count, spins) = (calls.clone(), rounds.clone());
    let results = stream::iter(0..10)
        .par_imap(2, move |i: usize| {
            let _running = count.enter(i);
            while !par_imap::is_cancelled() {
                spins.fetch_add(1, Ordering::SeqCst);
                std::thread::sleep(Duration::from_millis(1));
            }
            i
        })
        .cancel_token(token.clone());
    let consumer = tokio::spawn(results.collect::<Vec<_>>());
    eventually("both calls to run", || calls.running() == 2);
    token.cancel();
    let out = consumer.await.unwrap();
    assert_eq!(out.len(), 1);
    assert!(out[0].as_ref().unwrap_err().is_cancelled());
    eventually("both calls to stop", || calls.running() == 0);
    assert_eq!(calls.started_indices(), [0, 1]);
}

// ---- semaphore ----

#[tokio::test(start_paused = true)]
async fn a_shared_semaphore_bounds_calls_across_maps() {
    let budget = Arc::new(Semaphore::new(2));
    let calls = Calls::default();
    let map = |offset: usize| {
        let count = calls.clone();
        stream::iter(0..6)
            .par_imap_async(3, move |i: usize| {
                let running = count.enter(offset + i);
                async move {
                    sleep(Duration::from_secs(1)).await;
                    drop(running);
                    i
                }
            })
            .semaphore(budget.clone())
            .try_collect::<Vec<_>>()
    };
    let start = Instant::now();
    let (first, second) = tokio::join!(map(0), map(100));
    assert_eq!(first.unwrap(), (0..6).collect::<Vec<_>>());
    assert_eq!(second.unwrap(), (0..6).collect::<Vec<_>>());
    assert_eq!(calls.peak(), 2);
    // 12 one-second calls, two at a time.
    assert_eq!(start.elapsed(), Duration::from_secs(6));
    assert_eq!(budget.available_permits(), 2);
}

#[tokio::test(start_paused = true)]
async fn a_starved_map_pulls_one_input_item_at_most() {
    let budget = Arc::new(Semaphore::new(1));
    let held = budget.clone().acquire_owned().await.unwrap();
    let pulled = Arc::new(AtomicUsize::new(0));
    let pulls = pulled.clone();
    let mut results = stream::iter(0..3)
        .inspect(move |_| {
            pulls.fetch_add(1, Ordering::SeqCst);
        })
        .par_imap_async(2, |i: u64| async move { i })
        .semaphore(budget);
    tokio::select! {
        _ = results.next() => panic!("no permit, no item"),
        _ = sleep(Duration::from_secs(5)) => {}
    }
    // The one call that waits for a permit (inside its task, holding none).
    assert_eq!(pulled.load(Ordering::SeqCst), 1);
    drop(held);
    assert_eq!(results.try_collect::<Vec<_>>().await.unwrap(), [0, 1, 2]);
}

#[tokio::test(start_paused = true)]
async fn no_permit_is_held_while_the_input_has_nothing_to_give() {
    let budget = Arc::new(Semaphore::new(1));
    let (send, input) = futures::channel::mpsc::unbounded::<u64>();
    let mut results = input
        .par_imap_async(2, |i| async move { i })
        .semaphore(budget.clone());
    tokio::select! {
        _ = results.next() => panic!("nothing was sent"),
        _ = sleep(Duration::from_secs(1)) => {}
    }
    assert_eq!(budget.available_permits(), 1);
    send.unbounded_send(7).unwrap();
    assert_eq!(results.next().await.unwrap().unwrap(), 7);
    drop(send);
    assert!(results.next().await.is_none());
    assert_eq!(budget.available_permits(), 1);
}

#[tokio::test(start_paused = true)]
async fn a_closed_semaphore_fails_the_map_at_the_item_that_could_not_start() {
    let budget = Arc::new(Semaphore::new(1));
    let closer = budget.clone();
    let results: Vec<_> = stream::iter(0..10)
        .par_imap_async(1, move |i: u64| {
            let closer = closer.clone();
            async move {
                if i == 2 {
                    closer.close();
                }
                i
            }
        })
        .semaphore(budget)
        .collect()
        .await;
    assert_eq!(results.len(), 4);
    let error = results[3].as_ref().unwrap_err();
    assert!(error.is_cancelled() && error.index() == 3);
}

/// A mapper whose item 0 holds its call (and its permit) until the sender
/// returned is dropped; the other items return at once. Only item 0 takes
/// the hold: another item's call may take the permit first (the budget
/// promises no order).
fn item_0_held() -> (
    oneshot::Sender<()>,
    impl Fn(u64) -> futures::future::BoxFuture<'static, u64> + Send + Sync + 'static,
) {
    let (release, hold) = oneshot::channel::<()>();
    let hold = Mutex::new(Some(hold));
    let mapper = move |i: u64| {
        let hold = if i == 0 {
            hold.lock().unwrap().take()
        } else {
            None
        };
        Box::pin(async move {
            if let Some(hold) = hold {
                let _ = hold.await;
            }
            i
        }) as futures::future::BoxFuture<'static, u64>
    };
    (release, mapper)
}

/// A closed budget ends the map at once, with the error at the lowest
/// index not yet yielded, even while an item before the call that found it
/// closed still runs (found by `cargo mutants`: a map that took that call's
/// cancellation for an ordinary failure waited for item 0, then failed at
/// item 1, and passed every test).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_closed_semaphore_ends_the_map_at_once_at_the_lowest_index_not_yet_yielded() {
    let budget = Arc::new(Semaphore::new(1));
    let (release, mapper) = item_0_held();
    let mut results = stream::iter(0..3_u64)
        .par_imap_async(2, mapper)
        .semaphore(Arc::clone(&budget));
    // Item 0 runs, item 1's call waits for the permit; then the budget closes.
    assert!(futures::poll!(results.next()).is_pending());
    common::eventually_async("item 0 holds the permit", || {
        budget.available_permits() == 0
    })
    .await;
    budget.close();
    let first = tokio::time::timeout(common::hang(), results.next())
        .await
        .expect("the map ends while item 0 still runs")
        .unwrap();
    let error = first.unwrap_err();
    assert!(error.is_cancelled() && error.index() == 0, "{error:?}");
    assert!(results.next().await.is_none());
    drop(release);
}

/// A budget closed while the one call holding its last permit runs, and no
/// call waits for it, still ends the map at once: the next call starts to
/// find it closed (found in review of a flaky run: the map waited for the
/// running call, since no permit was free to start another).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_semaphore_closed_while_no_call_waits_ends_the_map_at_once() {
    let budget = Arc::new(Semaphore::new(1));
    let (release, mapper) = item_0_held();
    let (items, input) = futures::channel::mpsc::unbounded::<u64>();
    items.unbounded_send(0).unwrap();
    let mut results = input
        .par_imap_async(2, mapper)
        .semaphore(Arc::clone(&budget));
    // Item 0 runs and holds the only permit; then items 1 and 2 come, and
    // the budget closes before the map looks at them.
    assert!(futures::poll!(results.next()).is_pending());
    common::eventually_async("item 0 holds the permit", || {
        budget.available_permits() == 0
    })
    .await;
    items.unbounded_send(1).unwrap();
    items.unbounded_send(2).unwrap();
    budget.close();
    let first = tokio::time::timeout(common::hang(), results.next())
        .await
        .expect("the map ends while item 0 still runs")
        .unwrap();
    let error = first.unwrap_err();
    assert!(error.is_cancelled() && error.index() == 0, "{error:?}");
    assert!(results.next().await.is_none());
    drop(release);
}

/// The same with a blocking map whose items have deadlines: the call that
/// finds the budget closed reports its item cancelled although its results
/// would otherwise come through its deadlines' progress (found by `cargo
/// mutants`: a report that always read the progress lost the error).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_closed_semaphore_fails_a_blocking_map_with_a_timeout_at_the_item_that_could_not_start() {
    let budget = Arc::new(Semaphore::new(1));
    let closer = budget.clone();
    let results: Vec<_> = tokio::time::timeout(
        common::hang(),
        stream::iter(0..10)
            .par_imap(1, move |i: u64| {
                if i == 2 {
                    closer.close();
                }
                i
            })
            .batch(1)
            .timeout(Duration::from_secs(3600))
            .semaphore(budget)
            .collect::<Vec<_>>(),
    )
    .await
    .expect("the map ends");
    // One cancellation error at the lowest index not yet yielded: item 3,
    // or item 2 if its result was still owed when the map saw the budget
    // closed; before it, the items in order.
    let (last, before) = results.split_last().expect("results");
    let error = last.as_ref().expect_err("the map ends with an error");
    assert!(error.is_cancelled(), "{results:?}");
    assert!((2..=3).contains(&error.index()), "{results:?}");
    let before: Vec<u64> = before.iter().map(|r| *r.as_ref().unwrap()).collect();
    assert_eq!(before, (0..error.index() as u64).collect::<Vec<_>>());
}

/// A blocking map with `.timeout` that has ended (not dropped) keeps no
/// task of its own alive on the runtime: its timer, and the watch task
/// beside it, go when it ends (found by `cargo mutants`: a map that kept them until
/// dropped passed every test).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ended_map_with_a_timeout_leaves_no_task_alive() {
    let metrics = tokio::runtime::Handle::current().metrics();
    let mut results = stream::iter(0..3_u64)
        .par_imap(2, |n| {
            // Long enough that the map arms its timer while this runs.
            std::thread::sleep(Duration::from_millis(30));
            n
        })
        .timeout(Duration::from_secs(3600));
    let mut all = Vec::new();
    while let Some(result) = results.next().await {
        all.push(result.unwrap());
    }
    assert_eq!(all, [0, 1, 2]);
    let deadline = std::time::Instant::now() + common::hang();
    while metrics.num_alive_tasks() > 0 && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    assert_eq!(
        metrics.num_alive_tasks(),
        0,
        "a task outlived the end of the map"
    );
    drop(results);
}

// ---- is_cancelled ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn is_cancelled_is_false_outside_a_mapper_and_in_async_mappers() {
    assert!(!par_imap::is_cancelled());
    let inside: Vec<bool> = stream::iter(0..3)
        .par_imap_async(2, |_: u8| async { par_imap::is_cancelled() })
        .try_collect()
        .await
        .unwrap();
    assert_eq!(inside, [false; 3]);
    let blocking: Vec<bool> = stream::iter(0..3)
        .par_imap(2, |_: u8| par_imap::is_cancelled())
        .try_collect()
        .await
        .unwrap();
    assert_eq!(blocking, [false; 3]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn is_cancelled_turns_true_when_the_stream_is_dropped() {
    let (calls, stopped) = (Calls::default(), Arc::new(AtomicBool::new(false)));
    let (count, stop) = (calls.clone(), stopped.clone());
    let results = stream::iter(0..10).par_imap(1, move |i: usize| {
        let _running = count.enter(i);
        while !par_imap::is_cancelled() {
            std::thread::sleep(Duration::from_millis(1));
        }
        stop.store(true, Ordering::SeqCst);
        i
    });
    let consumer = tokio::spawn(results.collect::<Vec<_>>());
    eventually("the call to run", || calls.running() == 1);
    consumer.abort();
    eventually("the call to see the drop", || {
        stopped.load(Ordering::SeqCst)
    });
    assert_eq!(calls.started_indices(), [0]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn is_cancelled_after_a_failure_only_for_items_after_it() {
    // Item 1 fails while items 0 and 2 run: item 2's result is no longer
    // wanted, item 0's still is.
    let (gates, seen) = (Gates::default(), Arc::new(Mutex::new(Vec::new())));
    let (wait, log) = (gates.clone(), seen.clone());
    let results = stream::iter(0..3).try_par_imap(3, move |i: usize| {
        match i {
            0 => wait.wait(0),
            1 => {
                // Fail only once item 2 runs: a worker free earlier would
                // rightly skip item 2 instead of starting it.
                wait.wait(102);
                return Err(anyhow::anyhow!("one"));
            }
            _ => {
                wait.open(102);
                eventually("item 2 to be cancelled", par_imap::is_cancelled);
            }
        }
        log.lock().unwrap().push((i, par_imap::is_cancelled()));
        Ok(i)
    });
    let consumer = tokio::spawn(
        results
            .map(|r| r.map_err(|e| e.to_string()))
            .collect::<Vec<_>>(),
    );
    eventually("item 2 to see the failure", || {
        seen.lock().unwrap().len() == 1
    });
    gates.open(0);
    let out = consumer.await.unwrap();
    assert_eq!(out, [Ok(0), Err("one".to_string())]);
    assert_eq!(*seen.lock().unwrap(), [(2, true), (0, false)]);
}

// ---- par_imap_init ----

/// A per-worker state that counts how many exist and how often each is used.
struct Worker {
    uses: usize,
    alive: Arc<AtomicUsize>,
    used: Arc<AtomicUsize>,
}

impl Drop for Worker {
    fn drop(&mut self) {
        self.alive.fetch_sub(1, Ordering::SeqCst);
        self.used.fetch_add(self.uses, Ordering::SeqCst);
    }
}

#[derive(Clone, Default)]
struct Workers {
    made: Arc<AtomicUsize>,
    alive: Arc<AtomicUsize>,
    used: Arc<AtomicUsize>,
}

impl Workers {
    fn init(&self) -> impl Fn() -> Worker + Send + Sync + 'static {
        let workers = self.clone();
        move || {
            workers.made.fetch_add(1, Ordering::SeqCst);
            workers.alive.fetch_add(1, Ordering::SeqCst);
            Worker {
                uses: 0,
                alive: workers.alive.clone(),
                used: workers.used.clone(),
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn init_makes_at_most_limit_states_lazily_and_reuses_them() {
    let workers = Workers::default();
    let out: Vec<usize> = stream::iter(0..200)
        .par_imap_init(3, workers.init(), |worker: &mut Worker, i: usize| {
            worker.uses += 1;
            i * 2
        })
        .try_collect()
        .await
        .unwrap();
    assert_eq!(out, (0..200).map(|i| i * 2).collect::<Vec<_>>());
    let made = workers.made.load(Ordering::SeqCst);
    assert!((1..=3).contains(&made), "made {made} states");
    eventually("the states to drop with the map", || {
        workers.alive.load(Ordering::SeqCst) == 0
    });
    assert_eq!(
        workers.used.load(Ordering::SeqCst),
        200,
        "every call used a state"
    );

    let lazy = Workers::default();
    let one: Vec<u8> = stream::iter([1_u8])
        .par_imap_init(8, lazy.init(), |_: &mut Worker, i| i)
        .try_collect()
        .await
        .unwrap();
    assert_eq!(one, [1]);
    assert_eq!(
        lazy.made.load(Ordering::SeqCst),
        1,
        "states are made only when needed"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn init_state_whose_call_panicked_is_discarded() {
    let workers = Workers::default();
    let mut results =
        stream::iter(0..10).par_imap_init(1, workers.init(), |worker: &mut Worker, i: usize| {
            worker.uses += 1;
            assert!(i != 2, "two");
            i
        });
    assert_eq!(results.next().await.unwrap().unwrap(), 0);
    assert_eq!(results.next().await.unwrap().unwrap(), 1);
    let error = results.next().await.unwrap().unwrap_err();
    assert!(error.is_panic() && error.index() == 2);
    // The one state was used three times and dropped by the panic; the map
    // still lives, and holds no state.
    assert_eq!(workers.made.load(Ordering::SeqCst), 1);
    assert_eq!(workers.alive.load(Ordering::SeqCst), 0);
    assert_eq!(workers.used.load(Ordering::SeqCst), 3);
    assert!(results.next().await.is_none());
}

#[test]
fn is_cancelled_is_false_on_a_blocking_thread_after_a_map_used_it() {
    // One blocking thread: the map's worker runs on it, then a plain
    // spawn_blocking does. The worker's item must not leak into it.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .max_blocking_threads(1)
        .build()
        .unwrap();
    let after = runtime.block_on(async {
        let out: Vec<u8> = stream::iter(0..3_u8)
            .par_imap(1, |n| n)
            .try_collect()
            .await
            .unwrap();
        assert_eq!(out, [0, 1, 2]);
        // The map is dropped: every one of its items is now unwanted.
        tokio::task::spawn_blocking(par_imap::is_cancelled)
            .await
            .unwrap()
    });
    assert!(!after);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unordered_cancel_in_the_middle_of_a_batch_names_the_next_item() {
    // One call maps items 0..4; the consumer has taken item 0 when the
    // token fires: the lowest index not yet yielded is 1.
    let token = CancellationToken::new();
    let mut results = stream::iter(0..4_u32)
        .par_imap_unordered(1, |n| n)
        .batch(4)
        .cancel_token(token.clone());
    assert_eq!(results.next().await.unwrap().unwrap(), 0);
    token.cancel();
    let error = results.next().await.unwrap().unwrap_err();
    assert!(error.is_cancelled());
    assert_eq!(error.index(), 1);
    assert!(results.next().await.is_none());
}

#[tokio::test(start_paused = true)]
async fn unordered_cancel_names_the_lowest_running_item() {
    // Items 0 and 2 are quick and come out; 1 and 3 still run when the
    // token fires: the lowest index not yet yielded is 1.
    let (calls, torn_down) = (Calls::default(), Arc::default());
    let token = CancellationToken::new();
    let mut results = stream::iter(0..4)
        .par_imap_async_unordered(4, sleeper(|i| [1, 100, 1, 100][i], &calls, &torn_down))
        .cancel_token(token.clone());
    let mut first_two = vec![
        results.next().await.unwrap().unwrap(),
        results.next().await.unwrap().unwrap(),
    ];
    first_two.sort_unstable();
    assert_eq!(first_two, [0, 2]);
    token.cancel();
    assert_eq!(results.next().await.unwrap().unwrap_err().index(), 1);
}

/// An async map runs its calls in tasks of its own, one call at a time
/// each: never more tasks than calls in flight, however many items (a pool
/// that hired a task per call would count up to the limit of the runtime's
/// spare work), and none alive once it has ended, before it is dropped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_async_map_runs_at_most_limit_tasks_and_leaves_none_alive_when_it_ends() {
    let metrics = tokio::runtime::Handle::current().metrics();
    let most = Arc::new(AtomicUsize::new(0));
    let seen = most.clone();
    let mut results = stream::iter(0..2_000_u64).par_imap_async(4, move |n| {
        let seen = seen.clone();
        let metrics = tokio::runtime::Handle::current().metrics();
        async move {
            tokio::task::yield_now().await;
            seen.fetch_max(metrics.num_alive_tasks(), Ordering::SeqCst);
            n
        }
    });
    let mut all = Vec::new();
    while let Some(result) = results.next().await {
        all.push(result.unwrap());
    }
    assert_eq!(all, (0..2_000).collect::<Vec<_>>());
    let most = most.load(Ordering::SeqCst);
    assert!((1..=4).contains(&most), "{most} tasks alive with limit 4");
    let deadline = std::time::Instant::now() + common::hang();
    while metrics.num_alive_tasks() > 0 && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    assert_eq!(
        metrics.num_alive_tasks(),
        0,
        "a task outlived the end of the map"
    );
    drop(results);
}

/// After fail-fast aborted the calls above a failure (hung here), the
/// calls below it still run to their end, and an ended map leaves no task
/// alive.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_async_map_after_an_abort_maps_what_is_still_owed_and_leaves_no_task() {
    let metrics = tokio::runtime::Handle::current().metrics();
    let (release, gate) = tokio::sync::watch::channel(false);
    let release = Arc::new(release);
    let results: Vec<_> = stream::iter(0..40_u64)
        .try_par_imap_async(64, move |n| {
            let mut gate = gate.clone();
            let release = release.clone();
            async move {
                match n {
                    // Held until item 20 has failed.
                    0..20 => drop(gate.wait_for(|open| *open).await),
                    20 => {
                        let _ = release.send(true);
                        return Err(anyhow::anyhow!("item 20 fails"));
                    }
                    _ => std::future::pending::<()>().await,
                }
                Ok(n)
            }
        })
        .collect()
        .await;
    let (last, before) = results.split_last().expect("results");
    assert_eq!(
        last.as_ref().expect_err("item 20 fails").to_string(),
        "item 20 fails"
    );
    let before: Vec<u64> = before.iter().map(|r| *r.as_ref().unwrap()).collect();
    assert_eq!(before, (0..20).collect::<Vec<_>>());
    let deadline = std::time::Instant::now() + common::hang();
    while metrics.num_alive_tasks() > 0 && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    assert_eq!(metrics.num_alive_tasks(), 0, "a task outlived the map");
}
