//! `.key_order(key)` (DESIGN, "For services"): items with equal keys never
//! run at the same time and start in input order; other keys overtake a
//! waiting item; a waiting item counts in the window, not in `in_flight`,
//! holds no permit and shows in `Snapshot::waiting`; fail-fast, keep_going,
//! timeouts and drops unchanged. Named tests drive order with gates; a
//! property test draws keys, costs, failures, drops and cancellations for
//! every kind.
mod common;

use std::collections::HashMap;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{Calls, Gates, Tracker, eventually_async};
use futures::{StreamExt, TryStreamExt, stream};
use par_imap::ParImapExt;
use tokio::sync::Semaphore;

/// Watches the key rule: per key, how many of its items map now, and the
/// order in which its items started.
#[derive(Clone, Default)]
struct KeyWatch {
    state: Arc<Mutex<KeyState>>,
}

#[derive(Default)]
struct KeyState {
    running: HashMap<usize, usize>,
    started: HashMap<usize, Vec<usize>>,
    overlaps: Vec<(usize, usize)>,
}

impl KeyWatch {
    /// Item `index` of `key` starts; the guard marks its end.
    fn enter(&self, key: usize, index: usize) -> KeyGuard {
        let mut state = self.state.lock().unwrap();
        let running = state.running.entry(key).or_default();
        *running += 1;
        if *running > 1 {
            state.overlaps.push((key, index));
        }
        state.started.entry(key).or_default().push(index);
        KeyGuard {
            watch: self.clone(),
            key,
        }
    }

    /// No two items of a key overlapped, and each key's items started in
    /// input order.
    fn check(&self) {
        let state = self.state.lock().unwrap();
        assert!(state.overlaps.is_empty(), "overlaps: {:?}", state.overlaps);
        for (key, started) in &state.started {
            assert!(
                started.windows(2).all(|pair| pair[0] < pair[1]),
                "key {key} started out of order: {started:?}"
            );
        }
    }

    fn started(&self, key: usize) -> Vec<usize> {
        let state = self.state.lock().unwrap();
        state.started.get(&key).cloned().unwrap_or_default()
    }
}

struct KeyGuard {
    watch: KeyWatch,
    key: usize,
}

impl Drop for KeyGuard {
    fn drop(&mut self) {
        let mut state = self.watch.state.lock().unwrap();
        *state.running.get_mut(&self.key).unwrap() -= 1;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_order_never_overlaps_a_keys_items_and_starts_them_in_input_order() {
    let keys = [0, 1, 0, 2, 1, 0, 0, 3, 2, 1, 0, 4, 0, 0, 1, 2];
    let items: Vec<(usize, usize)> = (0..400).map(|i| (i, keys[i % keys.len()])).collect();
    // Blocking, every batch size regime.
    for batch in [None, Some(1), Some(3), Some(16)] {
        let watch = KeyWatch::default();
        let seen = watch.clone();
        let map = stream::iter(items.clone()).par_imap(4, move |(index, key)| {
            let _running = seen.enter(key, index);
            std::thread::sleep(Duration::from_micros(50 * (index % 3) as u64));
            index
        });
        let map = match batch {
            Some(k) => map.batch(k),
            None => map,
        };
        let out: Vec<usize> = map.key_order(|&(_, key)| key).try_collect().await.unwrap();
        assert_eq!(out, (0..400).collect::<Vec<_>>(), "batch {batch:?}");
        watch.check();
    }
    // Async, ordered and unordered.
    for unordered in [false, true] {
        let watch = KeyWatch::default();
        let seen = watch.clone();
        let mapper = move |(index, key): (usize, usize)| {
            let seen = seen.clone();
            async move {
                let _running = seen.enter(key, index);
                for _ in 0..index % 4 {
                    tokio::task::yield_now().await;
                }
                index
            }
        };
        let mut out: Vec<usize> = if unordered {
            stream::iter(items.clone())
                .par_imap_async_unordered(8, mapper)
                .key_order(|&(_, key)| key)
                .try_collect()
                .await
                .unwrap()
        } else {
            stream::iter(items.clone())
                .par_imap_async(8, mapper)
                .key_order(|&(_, key)| key)
                .try_collect()
                .await
                .unwrap()
        };
        if unordered {
            out.sort_unstable();
        }
        assert_eq!(out, (0..400).collect::<Vec<_>>());
        watch.check();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_order_with_one_key_is_a_serial_loop() {
    let calls = Calls::default();
    let count = calls.clone();
    let out: Vec<usize> = stream::iter(0..50_usize)
        .par_imap(4, move |n| {
            let _running = count.enter(n);
            std::thread::sleep(Duration::from_micros(200));
            n
        })
        .key_order(|_| "one")
        .try_collect()
        .await
        .unwrap();
    assert_eq!(out, (0..50).collect::<Vec<_>>());
    assert_eq!(calls.peak(), 1);
}

/// Items 0 (key A, held by a gate), 1 (key A) and 2 (key B): item 1 waits
/// for its key, item 2 overtakes it; in input order its result waits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_order_other_keys_overtake_an_item_waiting_for_its_key() {
    for blocking in [true, false] {
        let (gates, calls) = (Gates::default(), Calls::default());
        let (wait, count) = (gates.clone(), calls.clone());
        let items = [(0, 'a'), (1, 'a'), (2, 'b')];
        let mut map = if blocking {
            stream::iter(items)
                .par_imap(2, move |(n, _)| {
                    let _running = count.enter(n);
                    if n == 0 {
                        wait.wait(0);
                    }
                    n
                })
                .batch(1)
                .key_order(|&(_, key)| key)
                .boxed()
        } else {
            let gates = gates.clone();
            stream::iter(items)
                .par_imap_async(2, move |(n, _)| {
                    let (wait, count) = (gates.clone(), count.clone());
                    async move {
                        let _running = count.enter(n);
                        if n == 0 {
                            tokio::task::spawn_blocking(move || wait.wait(0))
                                .await
                                .unwrap();
                        }
                        n
                    }
                })
                .key_order(|&(_, key)| key)
                .boxed()
        };
        tokio::select! {
            _ = map.next() => panic!("item 0 is held"),
            _ = eventually_async("item 2 to overtake", || calls.started() == 2) => {}
        }
        assert_eq!(calls.started_indices(), [0, 2], "blocking: {blocking}");
        gates.open(0);
        let out: Vec<usize> = map.map(Result::unwrap).collect().await;
        assert_eq!(out, [0, 1, 2]);
        assert_eq!(calls.started_indices(), [0, 1, 2]);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_order_waiting_items_show_in_snapshot_hold_no_permit_and_count_in_the_window() {
    let gates = Gates::default();
    let wait = gates.clone();
    let budget = Arc::new(Semaphore::new(4));
    let pulled = Arc::new(AtomicUsize::new(0));
    let counter = pulled.clone();
    let input = stream::iter(0..100_usize).inspect(move |_| {
        counter.fetch_add(1, Ordering::SeqCst);
    });
    let mut map = input
        .par_imap(2, move |n| {
            if n == 0 {
                wait.wait(0);
            }
            n
        })
        .batch(1)
        .window(6)
        .semaphore(budget.clone())
        .key_order(|_| 0);
    let stats = map.stats();
    tokio::select! {
        _ = map.next() => panic!("item 0 is held"),
        _ = eventually_async("the window to fill", || {
            let snapshot = stats.snapshot();
            snapshot.waiting == 5 && snapshot.in_flight == 1
        }) => {}
    }
    let snapshot = stats.snapshot();
    assert_eq!(snapshot.in_flight, 1);
    assert_eq!(snapshot.limit, 2);
    assert_eq!(snapshot.pulled, 6, "the window holds the waiting items");
    assert_eq!(pulled.load(Ordering::SeqCst), 6);
    assert_eq!(
        budget.available_permits(),
        3,
        "only the running call holds one"
    );
    gates.open(0);
    let out: Vec<usize> = map.map(Result::unwrap).collect().await;
    assert_eq!(out, (0..100).collect::<Vec<_>>());
    assert_eq!(stats.snapshot().waiting, 0);
    assert_eq!(budget.available_permits(), 4);
}

#[tokio::test]
async fn key_order_panic_in_the_key_function_is_that_items_panic_error() {
    let out: Vec<Result<usize, par_imap::Error>> = stream::iter(0..5_usize)
        .par_imap(2, |n| n)
        .key_order(|&n| {
            assert!(n != 2, "no key for 2");
            n % 2
        })
        .collect()
        .await;
    assert_eq!(out.len(), 3);
    assert_eq!(*out[0].as_ref().unwrap(), 0);
    assert_eq!(*out[1].as_ref().unwrap(), 1);
    let error = out[2].as_ref().unwrap_err();
    assert!(error.is_panic() && error.index() == 2, "{error}");
    assert!(error.to_string().contains("no key for 2"), "{error}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_order_fail_fast_drops_waiting_items_unmapped_exactly_once() {
    for unordered in [false, true] {
        let tracker = Tracker::default();
        let calls = Calls::default();
        let count = calls.clone();
        let values: Vec<_> = (0..40).map(|n| tracker.track(n)).collect();
        let mapper = move |item: common::Tracked| {
            let _running = count.enter(item.value);
            if item.value == 3 {
                Err(anyhow::anyhow!("item {}", item.value))
            } else {
                Ok(item.value)
            }
        };
        let map = stream::iter(values);
        let out: Vec<anyhow::Result<usize>> = if unordered {
            map.try_par_imap_unordered(2, mapper)
                .batch(1)
                .key_order(|item| item.value % 2)
                .collect()
                .await
        } else {
            map.try_par_imap(2, mapper)
                .batch(1)
                .key_order(|item| item.value % 2)
                .collect()
                .await
        };
        if !unordered {
            assert_eq!(out.len(), 4);
            assert!(out[..3].iter().all(Result::is_ok));
        }
        assert!(out.last().unwrap().is_err(), "{out:?}");
        // Key 1 (odd) is serial: nothing past 3's key-mates after it.
        let started = calls.started_indices();
        assert!(!started.contains(&5) || unordered, "{started:?}");
        tracker.wait_all_dropped();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_order_keep_going_maps_a_keys_later_items_after_its_failure() {
    let watch = KeyWatch::default();
    let seen = watch.clone();
    let out: Vec<anyhow::Result<usize>> = stream::iter(0..12_usize)
        .try_par_imap(3, move |n| {
            let _running = seen.enter(n % 3, n);
            if n == 4 {
                Err(anyhow::anyhow!("four"))
            } else {
                Ok(n)
            }
        })
        .key_order(|&n| n % 3)
        .keep_going()
        .collect()
        .await;
    assert_eq!(out.len(), 12);
    assert!(out[4].is_err());
    assert_eq!(watch.started(1), [1, 4, 7, 10]);
    watch.check();
}

/// A timed-out blocking item holds its key until its thread returns.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_order_timed_out_blocking_item_holds_its_key_until_its_thread_returns() {
    let (gates, calls) = (Gates::default(), Calls::default());
    let (wait, count) = (gates.clone(), calls.clone());
    let mut map = stream::iter(0..3_usize)
        .par_imap(3, move |n| {
            let _running = count.enter(n);
            if n == 0 {
                wait.wait(0);
            }
            n
        })
        .batch(1)
        .timeout(Duration::from_millis(20))
        .keep_going()
        .key_order(|&n| n == 2);
    // Item 0 times out; item 1 (same key) must not start while 0 still runs.
    let first = map.next().await.unwrap();
    assert!(first.unwrap_err().is_timeout());
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(
        !calls.started_indices().contains(&1),
        "{:?}",
        calls.started_indices()
    );
    gates.open(0);
    let rest: Vec<usize> = map.map(Result::unwrap).collect().await;
    assert_eq!(rest, [1, 2]);
}

#[tokio::test]
async fn key_order_after_the_first_poll_panics() {
    let mut map = stream::iter(0..3_usize).par_imap(2, |n| n);
    assert_eq!(map.next().await.unwrap().unwrap(), 0);
    let late = std::panic::catch_unwind(AssertUnwindSafe(move || map.key_order(|&n| n)));
    assert!(late.is_err());
}

/// Dropping the map while items wait for their key drops them at once,
/// and `Snapshot::waiting` falls to 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_order_drop_drops_waiting_items() {
    let (gates, calls) = (Gates::default(), Calls::default());
    let (wait, count) = (gates.clone(), calls.clone());
    let tracker = Tracker::default();
    let values: Vec<_> = (0..20).map(|n| tracker.track(n)).collect();
    let mut map = stream::iter(values)
        .par_imap(2, move |item: common::Tracked| {
            let _running = count.enter(item.value);
            if item.value == 0 {
                wait.wait(0);
            }
            item
        })
        .key_order(|_| ());
    let stats = map.stats();
    tokio::select! {
        _ = map.next() => panic!("item 0 is held"),
        _ = eventually_async("items to wait", || {
            stats.snapshot().waiting > 0 && calls.running() == 1
        }) => {}
    }
    drop(map);
    assert_eq!(tracker.alive(), 1, "only the running item is alive");
    assert_eq!(
        stats.snapshot().waiting,
        0,
        "nothing waits in a dropped map"
    );
    gates.open(0);
    tracker.wait_all_dropped();
}

/// One drawn case of the key-order property.
#[derive(Debug, Clone)]
struct Case {
    blocking: bool,
    ordered: bool,
    limit: usize,
    batch: Option<usize>,
    /// The key of each item.
    keys: Vec<usize>,
    /// Each item's cost: yields (async) or microseconds (blocking).
    costs: Vec<u8>,
    /// The item whose mapper fails, if any.
    failure: Option<usize>,
    keep_going: bool,
    /// Stop after this many results: drop the map, or cancel its token.
    stop: Option<(usize, bool)>,
}

fn case() -> impl proptest::strategy::Strategy<Value = Case> {
    use proptest::prelude::*;
    (0..48_usize, 1..6_usize).prop_flat_map(|(len, distinct)| {
        (
            any::<bool>(),
            any::<bool>(),
            1..5_usize,
            prop_oneof![Just(None), (1..6_usize).prop_map(Some)],
            proptest::collection::vec(0..distinct, len),
            proptest::collection::vec(0..4_u8, len),
            proptest::option::weighted(0.3, 0..len.max(1)),
            any::<bool>(),
            proptest::option::weighted(0.3, (0..len.max(1), any::<bool>())),
        )
            .prop_map(
                |(blocking, ordered, limit, batch, keys, costs, failure, keep_going, stop)| Case {
                    blocking,
                    ordered,
                    limit,
                    batch: batch.filter(|_| blocking),
                    failure: failure.filter(|&at| at < keys.len()),
                    keys,
                    costs,
                    keep_going,
                    stop,
                },
            )
    })
}

/// Runs `case`; returns the indices yielded as values and whether a failure
/// came out.
async fn run(case: &Case, watch: &KeyWatch, tracker: &Tracker) -> (Vec<usize>, bool) {
    use futures::stream::BoxStream;
    let items: Vec<(common::Tracked, usize)> = case
        .keys
        .iter()
        .enumerate()
        .map(|(index, &key)| (tracker.track(index), key))
        .collect();
    let (costs, failure) = (Arc::new(case.costs.clone()), case.failure);
    let token = tokio_util::sync::CancellationToken::new();
    let map: BoxStream<'static, anyhow::Result<common::Tracked>> = if case.blocking {
        let seen = watch.clone();
        let mapper = move |(item, key): (common::Tracked, usize)| {
            let _running = seen.enter(key, item.value);
            std::thread::sleep(Duration::from_micros(u64::from(costs[item.value]) * 20));
            if Some(item.value) == failure {
                anyhow::bail!("item {} fails", item.value);
            }
            Ok(item)
        };
        let map = if case.ordered {
            stream::iter(items).try_par_imap(case.limit, mapper)
        } else {
            stream::iter(items).try_par_imap_unordered(case.limit, mapper)
        };
        let map = match case.batch {
            Some(k) => map.batch(k),
            None => map,
        };
        let map = map.key_order(|(_, key)| *key).cancel_token(token.clone());
        if case.keep_going {
            map.keep_going().boxed()
        } else {
            map.boxed()
        }
    } else {
        let seen = watch.clone();
        let mapper = move |(item, key): (common::Tracked, usize)| {
            let (seen, costs) = (seen.clone(), costs.clone());
            async move {
                let _running = seen.enter(key, item.value);
                for _ in 0..costs[item.value] {
                    tokio::task::yield_now().await;
                }
                if Some(item.value) == failure {
                    anyhow::bail!("item {} fails", item.value);
                }
                Ok(item)
            }
        };
        let map = if case.ordered {
            stream::iter(items).try_par_imap_async(case.limit, mapper)
        } else {
            stream::iter(items).try_par_imap_async_unordered(case.limit, mapper)
        };
        let map = map.key_order(|(_, key)| *key).cancel_token(token.clone());
        if case.keep_going {
            map.keep_going().boxed()
        } else {
            map.boxed()
        }
    };
    let mut map = map;
    let (mut values, mut failed) = (Vec::new(), false);
    let mut seen = 0;
    while let Some(result) = map.next().await {
        if let Some((after, cancel)) = case.stop {
            if seen == after {
                if !cancel {
                    break;
                }
                token.cancel();
            }
        }
        seen += 1;
        match result {
            Ok(item) => values.push(item.value),
            Err(_) => failed = true,
        }
    }
    drop(map);
    (values, failed)
}

/// Runs `case` on a runtime of its own, bounded by `bound`; checks the key
/// rule and that every value was dropped.
fn run_checked(case: &Case, bound: Duration) -> (Vec<usize>, bool) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_time()
        .build()
        .unwrap();
    let (watch, tracker) = (KeyWatch::default(), Tracker::default());
    let outcome = runtime.block_on(async {
        tokio::time::timeout(bound, run(case, &watch, &tracker))
            .await
            .expect("the case hung")
    });
    watch.check();
    tracker.wait_all_dropped();
    outcome
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig {
        cases: std::env::var("PAR_IMAP_CASES").ok().and_then(|n| n.parse().ok()).unwrap_or(128),
        failure_persistence: None,
        ..proptest::prelude::ProptestConfig::default()
    })]

    /// The key rule over random keys, costs, failures, drops and
    /// cancellations, for every kind: no two items of a key overlap, each
    /// key's items start in input order, results keep their order, and
    /// every value is dropped exactly once.
    #[test]
    fn key_order_rule_holds_for_every_kind(case in case()) {
        let (values, failed) = run_checked(&case, Duration::from_secs(60));
        let len = case.keys.len();
        if case.ordered {
            proptest::prop_assert!(values.windows(2).all(|pair| pair[0] < pair[1]), "{values:?}");
            if case.keep_going {
                proptest::prop_assert!(!values.iter().any(|&v| Some(v) == case.failure));
            } else if let Some(at) = case.failure {
                proptest::prop_assert!(values.iter().all(|&v| v < at));
            }
        }
        let complete = case.stop.is_none() && (case.failure.is_none() || case.keep_going);
        if complete {
            let mut sorted = values.clone();
            sorted.sort_unstable();
            let expected: Vec<usize> = (0..len).filter(|&i| Some(i) != case.failure).collect();
            proptest::prop_assert_eq!(sorted, expected);
            proptest::prop_assert_eq!(failed, case.failure.is_some());
        }
    }
}

/// Found by the property test: unordered, adaptive calls, keep_going.
#[test]
fn key_order_unordered_adaptive_keep_going_case_ends() {
    let keys = vec![
        0, 0, 1, 1, 3, 0, 1, 2, 3, 2, 0, 3, 0, 2, 1, 0, 0, 2, 2, 2, 3, 0, 2, 0, 3, 3, 0, 2, 2, 2,
        2, 3, 0, 2,
    ];
    let costs = vec![
        2, 3, 2, 3, 0, 1, 1, 3, 0, 2, 2, 3, 0, 1, 3, 1, 2, 2, 3, 3, 0, 2, 2, 1, 1, 3, 2, 1, 3, 2,
        0, 2, 0, 0,
    ];
    let case = Case {
        blocking: true,
        ordered: false,
        limit: 3,
        batch: None,
        costs: costs[..keys.len()].to_vec(),
        keys,
        failure: None,
        keep_going: true,
        stop: None,
    };
    for _ in 0..20 {
        let (values, _) = run_checked(&case, Duration::from_secs(20));
        assert_eq!(values.len(), case.keys.len());
    }
}
