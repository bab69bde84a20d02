//! Named regressions for the contract breaks of issue 11 (points 1–9 and 11;
//! point 10, process groups, is tested with `process`). Each test
//! reproduces the repro and checks the rule DESIGN.md settled.
//!
//! A wait that would hang on a broken engine is bounded (`BOUND`, real or
//! paused time) so that the break is a failure, not a stuck suite. No
//! duration is asserted.
mod common;

use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use common::{Calls, Gates, Tracked, Tracker, eventually, eventually_async};
use futures::{Stream, StreamExt, TryStreamExt, stream};
use par_imap::ParImapExt;
use tokio::sync::{Semaphore, oneshot};
use tokio::time::timeout;
use tokio_util::sync::CancellationToken;

/// A generous bound on a wait that only a broken engine can exceed.
const BOUND: Duration = Duration::from_secs(10);

/// Waits (real time, at most `BOUND`) until `condition` holds; false if it
/// never did.
fn within_bound(condition: impl Fn() -> bool) -> bool {
    let deadline = Instant::now() + BOUND;
    while !condition() {
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    true
}

#[derive(Debug, PartialEq)]
struct Mine(usize);

impl From<par_imap::Error> for Mine {
    fn from(error: par_imap::Error) -> Self {
        Mine(error.index())
    }
}

// ---- 1. a shared budget: a permit is held only by a running call ----

/// Takes item 0 of a map of `0..20` on the one-permit `budget`, checks that
/// the map, idle, leaves the permit free, then takes the rest. The map
/// stays the caller's: ended, not dropped.
async fn idle_map_leaves_the_permit(
    results: &mut (impl Stream<Item = Result<u64, par_imap::Error>> + Unpin),
    budget: &Semaphore,
) {
    assert_eq!(results.next().await.unwrap().unwrap(), 0);
    // The map is not polled now: nothing of it may sit on the one permit.
    let permit = timeout(BOUND, budget.acquire()).await;
    assert!(
        permit.is_ok(),
        "an idle map keeps the budget: {} available",
        budget.available_permits()
    );
    drop(permit);
    let rest: Vec<u64> = timeout(BOUND, results.try_collect())
        .await
        .expect("the map hung")
        .unwrap();
    assert_eq!(rest, (1..20).collect::<Vec<_>>());
}

#[tokio::test(start_paused = true)]
async fn idle_map_holds_no_permit_of_shared_budget() {
    let budget = Arc::new(Semaphore::new(1));
    let mut results = stream::iter(0..20_u64)
        .par_imap_async(2, |n| async move { n })
        .semaphore(budget.clone());
    idle_map_leaves_the_permit(&mut results, &budget).await;
    assert_eq!(budget.available_permits(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_blocking_map_holds_no_permit_of_shared_budget() {
    let budget = Arc::new(Semaphore::new(1));
    let mut results = stream::iter(0..20_u64)
        .par_imap(2, |n| n)
        .semaphore(budget.clone());
    idle_map_leaves_the_permit(&mut results, &budget).await;
}

/// Runs a map on the one-permit `budget` to its end, item 0's failure, and
/// checks that the map, ended, leaves the permit free.
async fn ended_map_leaves_the_permit(
    mut results: impl Stream<Item = Result<usize, Mine>> + Unpin,
    budget: &Semaphore,
) {
    assert_eq!(results.next().await.unwrap(), Err(Mine(0)));
    assert!(results.next().await.is_none());
    // Ended, not dropped: it holds no permit, now or later.
    assert!(
        timeout(BOUND, budget.acquire()).await.is_ok(),
        "an ended map keeps the budget: {} available",
        budget.available_permits()
    );
    assert_eq!(budget.available_permits(), 1);
}

#[tokio::test(start_paused = true)]
async fn ended_try_map_holds_no_permit_of_shared_budget() {
    let budget = Arc::new(Semaphore::new(1));
    let results = stream::iter(0..20_usize)
        .try_par_imap_async(
            2,
            |n| async move { if n == 0 { Err(Mine(0)) } else { Ok(n) } },
        )
        .semaphore(budget.clone());
    ended_map_leaves_the_permit(results, &budget).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ended_blocking_try_map_holds_no_permit_of_shared_budget() {
    let budget = Arc::new(Semaphore::new(1));
    let results = stream::iter(0..20_usize)
        .try_par_imap(2, |n| if n == 0 { Err(Mine(0)) } else { Ok(n) })
        .semaphore(budget.clone());
    ended_map_leaves_the_permit(results, &budget).await;
}

#[tokio::test(start_paused = true)]
async fn zip_of_two_maps_on_one_permit_budget_does_not_hang() {
    // Current-thread, paused: each (len, limits, yields) is one schedule.
    for len in [2_u64, 3, 10, 50] {
        for (limit_a, limit_b) in [(1, 1), (2, 2), (2, 1), (1, 2), (3, 2)] {
            for yields in [0, 1, 3] {
                let budget = Arc::new(Semaphore::new(1));
                let map = |offset: u64, limit: usize| {
                    stream::iter(0..len)
                        .par_imap_async(limit, move |n| async move {
                            for _ in 0..(n as usize + offset as usize) % (yields + 1) {
                                tokio::task::yield_now().await;
                            }
                            n + offset
                        })
                        .semaphore(budget.clone())
                };
                let pairs: Vec<_> =
                    timeout(BOUND, map(0, limit_a).zip(map(100, limit_b)).collect())
                        .await
                        .unwrap_or_else(|_| {
                            panic!(
                                "zip hung (len {len}, limits {limit_a}/{limit_b}, yields {yields})"
                            )
                        });
                let pairs: Vec<(u64, u64)> = pairs
                    .into_iter()
                    .map(|(a, b)| (a.unwrap(), b.unwrap()))
                    .collect();
                assert_eq!(pairs, (0..len).map(|n| (n, n + 100)).collect::<Vec<_>>());
                assert_eq!(budget.available_permits(), 1);
            }
        }
    }
}

#[tokio::test(start_paused = true)]
async fn zip_of_a_failing_map_and_an_empty_map_on_one_permit_does_not_hang() {
    // Found by tests/composition.rs, deterministic: the empty map waits for
    // a permit before it may see that its input is empty; the failed map's
    // pending acquire takes the permit its call gave back, and keeps it.
    let budget = Arc::new(Semaphore::new(1));
    let failing = stream::iter(0..1_usize)
        .par_imap_async_unordered(2, |n| async move {
            assert!(n != 0, "item 0 panics");
            n
        })
        .semaphore(budget.clone());
    let empty = stream::iter(0..0_usize)
        .par_imap_async_unordered(1, |n| async move { n })
        .semaphore(budget.clone());
    let pairs: Vec<_> = timeout(BOUND, failing.zip(empty).collect())
        .await
        .expect("zip hung");
    assert!(pairs.is_empty());
    assert_eq!(budget.available_permits(), 1);
}

/// Zips `map(budget, 0)` and `map(budget, 100)`, maps of `0..30` adding
/// their offset, on a fresh one-permit budget, 20 rounds: the issue saw
/// this hang about two runs in three.
async fn zip_two_maps_on_one_permit<S>(map: impl Fn(&Arc<Semaphore>, u64) -> S)
where
    S: Stream<Item = Result<u64, par_imap::Error>>,
{
    for round in 0..20_u64 {
        let budget = Arc::new(Semaphore::new(1));
        let pairs: Vec<_> = timeout(BOUND, map(&budget, 0).zip(map(&budget, 100)).collect())
            .await
            .unwrap_or_else(|_| panic!("zip hung in round {round}"));
        assert_eq!(pairs.len(), 30);
        for (n, (a, b)) in pairs.into_iter().enumerate() {
            assert_eq!((a.unwrap(), b.unwrap()), (n as u64, n as u64 + 100));
        }
        assert!(
            within_bound(|| budget.available_permits() == 1),
            "the budget never came back"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zip_of_two_async_maps_on_one_permit_budget_does_not_hang_on_a_multi_thread_runtime() {
    zip_two_maps_on_one_permit(|budget, offset| {
        stream::iter(0..30_u64)
            .par_imap_async(2, move |n| async move { n + offset })
            .semaphore(budget.clone())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zip_of_two_blocking_maps_on_one_permit_budget_does_not_hang() {
    zip_two_maps_on_one_permit(|budget, offset| {
        stream::iter(0..30_u64)
            .par_imap(2, move |n| n + offset)
            .semaphore(budget.clone())
    })
    .await;
}

/// Takes every item of a map on `budget`, handling each with a permit of
/// that same budget; returns the items handled.
async fn handle_with_a_permit_of_the_budget(
    mut results: impl Stream<Item = Result<u64, par_imap::Error>> + Unpin,
    budget: &Semaphore,
) -> Vec<u64> {
    let mut handled = Vec::new();
    while let Some(result) = timeout(BOUND, results.next()).await.expect("the map hung") {
        let _permit = timeout(BOUND, budget.acquire())
            .await
            .expect("the consumer never got a permit")
            .unwrap();
        handled.push(result.unwrap());
    }
    handled
}

#[tokio::test(start_paused = true)]
async fn consumer_taking_a_permit_between_items_does_not_hang() {
    let budget = Arc::new(Semaphore::new(1));
    let results = stream::iter(0..20_u64)
        .par_imap_async(2, |n| async move { n })
        .semaphore(budget.clone());
    let handled = handle_with_a_permit_of_the_budget(results, &budget).await;
    assert_eq!(handled, (0..20).collect::<Vec<_>>());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consumer_taking_a_permit_between_blocking_items_does_not_hang() {
    let budget = Arc::new(Semaphore::new(1));
    let results = stream::iter(0..50_u64)
        .par_imap(2, |n| n)
        .semaphore(budget.clone());
    let handled = handle_with_a_permit_of_the_budget(results, &budget).await;
    assert_eq!(handled, (0..50).collect::<Vec<_>>());
}

// ---- 2. memory: see tests/memory.rs (a counting allocator, own binary) ----

// ---- 3. any duration is accepted ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timeout_duration_max_never_panics() {
    for huge in [Duration::MAX, Duration::from_secs(u64::MAX)] {
        // Each variant in its own task: a panic inside `poll_next` is reported
        // as such instead of tearing the test down at the first one.
        let runs = [
            tokio::spawn(
                stream::iter(0..10_u64)
                    .par_imap_async(2, |n| async move { n })
                    .timeout(huge)
                    .try_collect::<Vec<_>>(),
            ),
            tokio::spawn(
                stream::iter(0..10_u64)
                    .par_imap_async_unordered(2, |n| async move { n })
                    .timeout(huge)
                    .try_collect::<Vec<_>>(),
            ),
            tokio::spawn(
                stream::iter(0..10_u64)
                    .par_imap(2, |n| n)
                    .timeout(huge)
                    .try_collect::<Vec<_>>(),
            ),
            tokio::spawn(
                stream::iter(0..10_u64)
                    .par_imap_unordered(2, |n| n)
                    .batch(3)
                    .timeout(huge)
                    .try_collect::<Vec<_>>(),
            ),
        ];
        for (variant, run) in runs.into_iter().enumerate() {
            let mut out = timeout(BOUND, run)
                .await
                .expect("the map hung")
                .unwrap_or_else(|error| panic!("variant {variant}, {huge:?}: {error}"))
                .unwrap();
            out.sort_unstable();
            assert_eq!(out, (0..10).collect::<Vec<_>>(), "variant {variant}");
        }
    }
}

#[tokio::test(start_paused = true)]
async fn timeout_zero_never_panics_and_fails_in_order() {
    // Whether a zero deadline lets an instant call through is not settled;
    // what is: no panic, no hang, and an ordered prefix then one timeout.
    let out: Vec<_> = timeout(
        BOUND,
        stream::iter(0..10_usize)
            .par_imap_async(2, |n| async move { n })
            .timeout(Duration::ZERO)
            .collect(),
    )
    .await
    .expect("the map hung");
    for (position, result) in out.iter().enumerate() {
        match result {
            Ok(n) => assert_eq!(*n, position),
            Err(error) => {
                assert!(error.is_timeout() && error.index() == position, "{error}");
                assert_eq!(position + 1, out.len(), "an error ends the stream");
            }
        }
    }
}

// ---- 4. unordered cancellation names the lowest index never yielded ----

#[tokio::test(start_paused = true)]
async fn unordered_cancel_never_names_a_yielded_index() {
    let (open, gate) = oneshot::channel::<()>();
    let gate = Arc::new(Mutex::new(Some(gate)));
    let token = CancellationToken::new();
    let mut results = stream::iter(0..3_usize)
        .par_imap_async_unordered(3, move |n| {
            let gate = gate.clone();
            async move {
                match n {
                    0 => {
                        let gate = gate.lock().unwrap().take().unwrap();
                        let _ = gate.await;
                    }
                    2 => std::future::pending::<()>().await,
                    _ => {}
                }
                n
            }
        })
        .cancel_token(token.clone());
    assert_eq!(results.next().await.unwrap().unwrap(), 1);
    open.send(()).unwrap();
    assert_eq!(results.next().await.unwrap().unwrap(), 0);
    token.cancel();
    let error = results.next().await.unwrap().unwrap_err();
    assert!(error.is_cancelled());
    assert_eq!(error.index(), 2, "items 0 and 1 were yielded already");
    assert!(results.next().await.is_none());
}

// ---- 5. with .batch(k), the timeout is per item ----

/// Maps `0..4` with `mapper`, limit 1, all four items in one call
/// (`.batch(4)`), each with the deadline `per_item`; in input order or not.
async fn one_call_of_four(
    unordered: bool,
    mapper: impl Fn(usize) -> usize + Send + Sync + 'static,
    per_item: Duration,
) -> Vec<Result<usize, par_imap::Error>> {
    let input = stream::iter(0..4_usize);
    let results = if unordered {
        input.par_imap_unordered(1, mapper)
    } else {
        input.par_imap(1, mapper)
    };
    results.batch(4).timeout(per_item).collect().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batch_timeout_is_per_item_and_delivers_earlier_items() {
    // One call maps all four items, 400 ms each: 1.6 s for the call, far
    // within the 1 s deadline for each item.
    for unordered in [false, true] {
        let slow = |n: usize| {
            std::thread::sleep(Duration::from_millis(400));
            n
        };
        let out = one_call_of_four(unordered, slow, Duration::from_secs(1)).await;
        let out: Vec<_> = out
            .into_iter()
            .map(|result| result.map_err(|error| error.to_string()))
            .collect();
        assert_eq!(out, [Ok(0), Ok(1), Ok(2), Ok(3)], "unordered: {unordered}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batch_timeout_names_the_hung_item_not_the_first_of_its_call() {
    for unordered in [false, true] {
        let calls = Calls::default();
        let count = calls.clone();
        let mapper = move |n: usize| {
            let _running = count.enter(n);
            if n == 2 {
                // Hangs until nobody wants it (bounded by the gate's hang).
                let deadline = Instant::now() + common::hang();
                while !par_imap::is_cancelled() {
                    assert!(Instant::now() < deadline, "item 2 never cancelled");
                    std::thread::sleep(Duration::from_millis(1));
                }
            }
            n
        };
        let out = one_call_of_four(unordered, mapper, Duration::from_millis(300)).await;
        let (error, values) = out.split_last().expect("something comes out");
        let error = error.as_ref().unwrap_err();
        assert!(error.is_timeout(), "{error}");
        assert_eq!(error.index(), 2, "the hung item, not its call's first");
        let mut values: Vec<usize> = values.iter().map(|r| *r.as_ref().unwrap()).collect();
        values.sort_unstable();
        assert_eq!(values, [0, 1], "items before it in its call are delivered");
        eventually("item 2 to return", || calls.running() == 0);
        assert_eq!(calls.started_indices(), [0, 1, 2], "item 3 never mapped");
    }
}

// ---- 6. the map cancels before it drops its input ----

/// An input stream that runs `on_drop` when dropped, and counts its pulls.
struct InputWithDrop<S> {
    inner: S,
    pulled: Arc<AtomicUsize>,
    on_drop: Option<Box<dyn FnOnce() + Send>>,
}

impl<S: Stream + Unpin> Stream for InputWithDrop<S> {
    type Item = S::Item;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<S::Item>> {
        let next = self.inner.poll_next_unpin(cx);
        if let Poll::Ready(Some(_)) = next {
            self.pulled.fetch_add(1, Ordering::SeqCst);
        }
        next
    }
}

impl<S> Drop for InputWithDrop<S> {
    fn drop(&mut self) {
        if let Some(on_drop) = self.on_drop.take() {
            on_drop();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn input_drop_runs_after_the_map_cancelled() {
    // Limit 1: item 0 runs (gated), item 1 waits in the queue. The input's
    // drop opens item 0's gate and waits for it to look at is_cancelled():
    // the map must already be cancelled then, so item 0 sees it and item 1
    // never starts.
    let (gates, calls) = (Gates::default(), Calls::default());
    let saw_cancelled: Arc<Mutex<Option<bool>>> = Arc::default();
    let pulled = Arc::new(AtomicUsize::new(0));
    let (wait, count, saw) = (gates.clone(), calls.clone(), saw_cancelled.clone());
    let (opener, looked) = (gates.clone(), saw_cancelled.clone());
    let input = InputWithDrop {
        inner: stream::iter(0..10_usize),
        pulled: pulled.clone(),
        on_drop: Some(Box::new(move || {
            opener.open(0);
            assert!(
                within_bound(|| looked.lock().unwrap().is_some()),
                "item 0 never ended"
            );
        })),
    };
    let mut results = input.par_imap(1, move |n| {
        let _running = count.enter(n);
        if n == 0 {
            wait.wait(0);
            *saw.lock().unwrap() = Some(par_imap::is_cancelled());
        }
        n
    });
    tokio::select! {
        _ = results.next() => panic!("item 0 is gated"),
        _ = eventually_async("item 0 to run", || calls.running() == 1) => {}
    }
    eventually("item 1 to be queued", || pulled.load(Ordering::SeqCst) == 2);
    drop(results);
    assert_eq!(
        *saw_cancelled.lock().unwrap(),
        Some(true),
        "while the input's drop ran, the map was not cancelled yet"
    );
    eventually("item 0 to return", || calls.running() == 0);
    assert_eq!(calls.started_indices(), [0], "a queued call started");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn input_drop_runs_after_async_calls_are_aborted() {
    // Item 0's call waits for a signal that the input's drop sends: the call
    // must be aborted before, so it never gets to finish.
    let (signal, wait) = oneshot::channel::<()>();
    let wait = Arc::new(Mutex::new(Some(wait)));
    let (calls, finished) = (Calls::default(), Arc::new(AtomicBool::new(false)));
    let pulled = Arc::new(AtomicUsize::new(0));
    let (count, done, seen) = (calls.clone(), finished.clone(), finished.clone());
    let signal = Mutex::new(Some(signal));
    let input = InputWithDrop {
        inner: stream::iter(0..1_usize),
        pulled: pulled.clone(),
        on_drop: Some(Box::new(move || {
            let _ = signal.lock().unwrap().take().unwrap().send(());
            // Only a call still alive could finish now; give it a second.
            let deadline = Instant::now() + Duration::from_secs(1);
            while !seen.load(Ordering::SeqCst) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(1));
            }
        })),
    };
    let mut results = input.par_imap_async(1, move |n| {
        let running = count.enter(n);
        let (wait, done) = (wait.lock().unwrap().take().unwrap(), done.clone());
        async move {
            let _running = running;
            if wait.await.is_ok() {
                done.store(true, Ordering::SeqCst);
            }
            n
        }
    });
    tokio::select! {
        _ = results.next() => panic!("item 0 waits for the input's drop"),
        _ = eventually_async("item 0 to run", || calls.running() == 1) => {}
    }
    drop(results);
    assert!(
        !finished.load(Ordering::SeqCst),
        "an async call finished while the input's drop ran"
    );
}

// ---- 7. a runtime shut down under a map with a timeout ----

/// One result as the consumer saw it: a value, or (index, is_cancelled).
type Seen = Result<usize, (usize, bool)>;

#[test]
fn poll_after_runtime_shutdown_with_timeout_ends_cancelled() {
    for background in [false, true] {
        let first = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let (gates, calls) = (Gates::default(), Calls::default());
        let (wait, count, opener) = (gates.clone(), calls.clone(), gates.clone());
        let mut results = stream::iter(0..6_usize)
            .par_imap(2, move |n| {
                let _running = count.enter(n);
                wait.wait(n);
                n
            })
            .timeout(Duration::from_secs(3600));
        first.block_on(async {
            tokio::select! {
                _ = results.next() => panic!("every call is gated"),
                _ = eventually_async("items 0 and 1 to run", || calls.running() == 2) => {}
            }
            // One more poll: the map takes in that both calls started, and
            // arms its timer for their deadlines on this runtime.
            assert!(futures::poll!(results.next()).is_pending());
        });
        // The calls still run when their runtime goes away.
        if background {
            first.shutdown_background();
        } else {
            first.shutdown_timeout(Duration::from_millis(10));
        }
        let second = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let seen = second.block_on(async move {
            let poll = tokio::spawn(async move {
                let mut seen = Vec::new();
                let record = |result: Result<usize, par_imap::Error>| {
                    result.map_err(|error| (error.index(), error.is_cancelled()))
                };
                // One poll while items 0 and 1 still run: the map's timer
                // belongs to the runtime that is gone.
                match futures::poll!(results.next()) {
                    Poll::Ready(Some(result)) => seen.push(record(result)),
                    Poll::Ready(None) => return seen,
                    Poll::Pending => {}
                }
                // Then the calls return, and the map ends one way or another.
                for n in 0..6 {
                    opener.open(n);
                }
                while let Some(result) = results.next().await {
                    seen.push(record(result));
                }
                seen
            });
            timeout(BOUND, poll)
                .await
                .expect("the map hung after its runtime shut down")
                .unwrap_or_else(|error| panic!("polled from another runtime: {error}"))
        });
        for n in 0..6 {
            gates.open(n);
        }
        // Ordered values, then at most one error, a cancellation.
        let (values, error): (Vec<&Seen>, Vec<_>) = seen.iter().partition(|result| result.is_ok());
        let values: Vec<usize> = values.into_iter().map(|r| *r.as_ref().unwrap()).collect();
        assert_eq!(values, (0..values.len()).collect::<Vec<_>>(), "{seen:?}");
        match error.as_slice() {
            [] => assert_eq!(values.len(), 6, "{seen:?}"),
            [Err((index, cancelled))] => {
                assert!(*cancelled, "{seen:?}");
                assert_eq!(*index, values.len(), "{seen:?}");
                assert!(seen.last().unwrap().is_err(), "{seen:?}");
            }
            _ => panic!("more than one error: {seen:?}"),
        }
        eventually("the calls to return", || calls.running() == 0);
    }
}

// ---- 8. an ended map holds no input ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ended_map_drops_queued_inputs_at_once() {
    // Limit 1: item 0 blocks (it ignores is_cancelled) and times out; item 1
    // was queued behind it. Once the stream has ended, item 1 is dropped,
    // not kept until the worker frees up.
    let (gates, tracker) = (Gates::default(), Tracker::default());
    let (wait, inputs) = (gates.clone(), tracker.clone());
    let mut results = stream::iter(0..10)
        .map(move |n| inputs.track(n))
        .par_imap(1, move |item: Tracked| {
            wait.wait(item.value);
            item.value
        })
        .timeout(Duration::from_millis(50));
    let error = results.next().await.unwrap().unwrap_err();
    assert!(error.is_timeout() && error.index() == 0, "{error}");
    assert!(results.next().await.is_none());
    let alive = within_bound(|| tracker.alive() <= 1);
    // Item 0 is held by its call, which cannot be pre-empted.
    let held = tracker.alive();
    gates.open(0);
    assert!(
        alive,
        "{held} inputs alive after the end, only item 0 may be"
    );
    tracker.wait_all_dropped();
    drop(results);
}

// ---- 9. is_cancelled() sees the token at once ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn is_cancelled_sees_token_without_a_poll() {
    let token = CancellationToken::new();
    let (calls, saw) = (Calls::default(), Arc::new(AtomicBool::new(false)));
    let (count, seen) = (calls.clone(), saw.clone());
    let mut results = stream::iter(0..4_usize)
        .par_imap(1, move |n| {
            let _running = count.enter(n);
            let deadline = Instant::now() + common::hang();
            while !par_imap::is_cancelled() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(1));
            }
            seen.store(par_imap::is_cancelled(), Ordering::SeqCst);
            n
        })
        .cancel_token(token.clone());
    tokio::select! {
        _ = results.next() => panic!("item 0 runs until cancelled"),
        _ = eventually_async("item 0 to run", || calls.running() == 1) => {}
    }
    token.cancel();
    // Nobody polls the map now.
    let seen = within_bound(|| saw.load(Ordering::SeqCst));
    assert!(seen, "the running call never saw the cancelled token");
    let error = results.next().await.unwrap().unwrap_err();
    assert!(error.is_cancelled() && error.index() == 0, "{error}");
    assert!(results.next().await.is_none());
}

// ---- 11. a snapshot's in_flight agrees with its own started/completed ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_in_flight_zero_when_started_equals_completed() {
    let results = stream::iter(0..50_000_u64).par_imap_async(2, |n| async move { n });
    let stats = results.stats();
    let done = Arc::new(AtomicBool::new(false));
    let (over, watched) = (done.clone(), stats.clone());
    let watcher = std::thread::spawn(move || {
        let (mut snapshots, mut wrong) = (0_u64, None);
        while !over.load(Ordering::SeqCst) {
            let snapshot = watched.snapshot();
            snapshots += 1;
            // Limit 2: never more than two calls in flight, and none when
            // every started call has completed.
            if (snapshot.started == snapshot.completed && snapshot.in_flight != 0)
                || snapshot.in_flight > 2
            {
                wrong.get_or_insert(snapshot);
            }
        }
        (snapshots, wrong)
    });
    let count = results.try_fold(0_u64, |count, _| async move { Ok(count + 1) });
    assert_eq!(count.await.unwrap(), 50_000);
    done.store(true, Ordering::SeqCst);
    let (snapshots, wrong) = watcher.join().unwrap();
    assert!(
        wrong.is_none(),
        "of {snapshots} snapshots, one disagrees with itself (limit 2): {wrong:?}"
    );
    let end = stats.snapshot();
    assert_eq!(
        (end.started, end.completed, end.in_flight),
        (50_000, 50_000, 0)
    );
}

// ---- 4b. unordered: a call forgotten after a failure is still owed ----

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn unordered_cancel_after_an_observed_failure_names_the_forgotten_item() {
    // Item 0 never ends; item 2 ends, then item 1 panics: the failure is
    // seen (item 0 forgotten) but waits behind item 2's result. Cancelling
    // then must name item 0, the lowest index never yielded, not item 1.
    let token = CancellationToken::new();
    let (tx0, rx0) = tokio::sync::oneshot::channel::<()>();
    let (tx1, rx1) = tokio::sync::oneshot::channel::<()>();
    let (tx2, rx2) = tokio::sync::oneshot::channel::<()>();
    let gates = Arc::new(std::sync::Mutex::new(vec![Some(rx0), Some(rx1), Some(rx2)]));
    let mut results = stream::iter(0..3_usize)
        .par_imap_async_unordered(3, move |n| {
            let gate = gates.lock().unwrap()[n].take();
            async move {
                if let Some(gate) = gate {
                    let _ = gate.await;
                }
                assert!(n != 1, "item 1 fails");
                n
            }
        })
        .cancel_token(token.clone());
    assert!(futures::poll!(results.next()).is_pending());
    tx2.send(()).unwrap();
    for _ in 0..8 {
        tokio::task::yield_now().await;
    }
    tx1.send(()).unwrap();
    for _ in 0..8 {
        tokio::task::yield_now().await;
    }
    assert_eq!(results.next().await.unwrap().unwrap(), 2);
    token.cancel();
    let error = results.next().await.unwrap().unwrap_err();
    assert!(error.is_cancelled(), "{error}");
    assert_eq!(error.index(), 0, "item 0 was never yielded");
    assert!(results.next().await.is_none());
    drop(tx0);
}

// ---- found by review: a huge limit, and what an ended map still held ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn huge_limit_never_panics_in_poll_next() {
    // Adaptive sizes share pulled items among idle workers: `limit` of them.
    let (tx, rx) = futures::channel::mpsc::unbounded::<u64>();
    let mut results = rx.par_imap(usize::MAX / 4, |x| x);
    tx.unbounded_send(0).unwrap();
    assert_eq!(results.next().await.unwrap().unwrap(), 0);
    for i in 1..100 {
        tx.unbounded_send(i).unwrap();
    }
    drop(tx);
    let mut count = 0;
    while let Some(result) = timeout(BOUND, results.next()).await.expect("no hang") {
        result.unwrap();
        count += 1;
    }
    assert_eq!(count, 99);
}

/// A value that counts its drops.
struct Counted(u64, Arc<AtomicUsize>);

impl Drop for Counted {
    fn drop(&mut self) {
        self.1.fetch_add(1, Ordering::SeqCst);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ended_map_holds_no_given_back_input() {
    let drops = Arc::new(AtomicUsize::new(0));
    let token = CancellationToken::new();
    let (tx, rx) = futures::channel::mpsc::unbounded::<Counted>();
    let mut results = rx
        .par_imap(1, |item: Counted| {
            if item.0 >= 1000 {
                std::thread::sleep(Duration::from_millis(5));
            }
            item.0
        })
        .cancel_token(token.clone());
    let mut sent = 0;
    // Grow the adaptive size: 1, 2, 4, 8, 16.
    for round in 0..5 {
        let n = 1 << round;
        for _ in 0..n {
            tx.unbounded_send(Counted(sent, Arc::clone(&drops)))
                .unwrap();
            sent += 1;
        }
        for _ in 0..n {
            results.next().await.unwrap().unwrap();
        }
    }
    for k in 0..16 {
        tx.unbounded_send(Counted(1000 + k, Arc::clone(&drops)))
            .unwrap();
    }
    let sent = sent as usize + 16;
    assert!(futures::poll!(results.next()).is_pending());
    // Long enough for the call of 16 slow items to give the rest back.
    tokio::time::sleep(Duration::from_millis(200)).await;
    token.cancel();
    assert!(results.next().await.unwrap().unwrap_err().is_cancelled());
    assert!(results.next().await.is_none());
    // Ended, not dropped: every input item goes, whatever the worker is at.
    let all = within_bound(|| drops.load(Ordering::SeqCst) == sent);
    assert!(
        all,
        "{} of {sent} inputs dropped",
        drops.load(Ordering::SeqCst)
    );
    drop(results);
    assert_eq!(drops.load(Ordering::SeqCst), sent);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ended_map_drops_outputs_of_calls_that_end_late() {
    let drops = Arc::new(AtomicUsize::new(0));
    let (late, gate) = (Gates::default(), Gates::default());
    let (opened, wait) = (late.clone(), gate.clone());
    let counter = Arc::clone(&drops);
    let mut results = stream::iter(0..2_u64)
        .try_par_imap(2, move |i| {
            if i == 0 {
                // Item 1 runs before item 0 fails, so it is not skipped.
                wait.wait(0);
                return Err(anyhow::anyhow!("item 0 fails"));
            }
            wait.open(0);
            wait.wait(1);
            opened.open(1);
            Ok(Counted(i, Arc::clone(&counter)))
        })
        .batch(1);
    assert!(results.next().await.unwrap().is_err());
    assert!(results.next().await.is_none());
    // Item 1 ends after the map did: its output is dropped at once, not
    // kept by the ended (but not dropped) stream.
    gate.open(1);
    late.wait(1);
    let dropped = within_bound(|| drops.load(Ordering::SeqCst) == 1);
    assert!(dropped, "the late output is still held");
    drop(results);
    assert_eq!(drops.load(Ordering::SeqCst), 1);
}

/// Records, when dropped, how many permits of the budget were free.
struct SeesBudget(Arc<Semaphore>, Arc<Mutex<Vec<usize>>>);

impl Drop for SeesBudget {
    fn drop(&mut self) {
        self.1.lock().unwrap().push(self.0.available_permits());
    }
}

/// An async call whose future is still pending when the token is
/// cancelled, when it times out, or when the map is dropped: the future is
/// dropped while the call still holds its permit, never after it gave it
/// back, so another map on the budget cannot run beside a future that has
/// not ended (found by the composition property: 2 calls at once on a
/// budget of 1, after a token ended an async map).
#[tokio::test(start_paused = true)]
async fn an_async_call_drops_its_future_before_it_gives_its_permit_back() {
    for way in ["token", "timeout", "drop"] {
        let budget = Arc::new(Semaphore::new(1));
        let seen = Arc::new(Mutex::new(Vec::new()));
        let token = CancellationToken::new();
        let (probe, watched) = (budget.clone(), seen.clone());
        let mut results = stream::iter(0..1u32)
            .par_imap_async(1, move |n| {
                let guard = SeesBudget(probe.clone(), watched.clone());
                async move {
                    let _guard = guard;
                    std::future::pending::<u32>().await + n
                }
            })
            .semaphore(budget.clone())
            .cancel_token(token.clone());
        if way == "timeout" {
            results = results.timeout(Duration::from_secs(1));
        }
        // Let the call start and take its permit.
        assert!(
            futures::poll!(results.next()).is_pending(),
            "{way}: nothing is ready"
        );
        eventually_async("the permit taken", || budget.available_permits() == 0).await;
        if way == "drop" {
            drop(results);
        } else {
            if way == "token" {
                // Not polled: the call ends on its own, from the token.
                token.cancel();
                eventually_async("the permit back", || budget.available_permits() == 1).await;
            }
            let ended = timeout(Duration::from_secs(5), results.next()).await;
            assert!(ended.unwrap().unwrap().is_err(), "{way}: ends in an error");
        }
        eventually_async("the permit back", || budget.available_permits() == 1).await;
        assert_eq!(
            *seen.lock().unwrap(),
            [0],
            "{way}: the future saw its permit still held as it dropped"
        );
    }
}
