//! Adversarial checks of `.retry` (DESIGN, "For services"): compositions
//! (shared budgets, `zip`, `select`, nested maps), runtimes that go away
//! during a backoff, consumers that stop polling, items whose `Clone` or
//! `Drop` panics, huge backoffs, and the map's own polls during a wait.
mod common;
#[path = "common/retrying.rs"]
mod retrying;

use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use futures::{Stream, StreamExt, TryStreamExt, stream};
use par_imap::{ParImapExt, Retry};
use retrying::{Attempts, Counted, Counts, HOUR, ms, pending_until};
use tokio::sync::Semaphore;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// An item's index and its value, or its error's index and whether it
/// is a panic.
type Outcome = (usize, Result<usize, (usize, bool)>);

/// A stream that counts how often it is polled.
struct CountPolls<S> {
    inner: S,
    polls: Arc<AtomicUsize>,
}

impl<S: Stream + Unpin> Stream for CountPolls<S> {
    type Item = S::Item;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<S::Item>> {
        self.polls.fetch_add(1, Ordering::SeqCst);
        self.inner.poll_next_unpin(cx)
    }
}

fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| (*s).to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "<non-string panic>".to_string())
}

// ---- the runtime goes away during a backoff ----

/// DESIGN 6: "A runtime shutting down under the map ends it with
/// `is_cancelled()` errors, not a hang, and a later poll (even from another
/// runtime) never panics inside the library." Here the only thing the map
/// holds when its runtime goes is an item in backoff (its timer belongs to
/// that runtime).
#[test]
fn retry_runtime_shut_down_during_a_backoff_then_polled_outside_a_runtime_ends_cancelled() {
    runtime_shut_down_during_a_backoff(false);
}

/// The same, polled from another runtime afterwards.
#[test]
fn retry_runtime_shut_down_during_a_backoff_then_polled_from_another_runtime_ends_cancelled() {
    runtime_shut_down_during_a_backoff(true);
}

fn runtime_shut_down_during_a_backoff(from_another_runtime: bool) {
    {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let mut map = stream::iter(0..2_usize)
            .try_par_imap_async(2, |n| async move {
                if n == 1 {
                    Err(anyhow::anyhow!("item 1 fails"))
                } else {
                    Ok(n)
                }
            })
            .retry(Retry::attempts(3).backoff(HOUR, HOUR).jitter(false));
        let stats = map.stats();
        runtime.block_on(async {
            assert_eq!(map.next().await.unwrap().unwrap(), 0);
            pending_until(&mut map, "item 1 to wait", || stats.snapshot().waiting == 1).await;
        });
        drop(runtime);
        let (send, outcome) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let polled = std::panic::catch_unwind(AssertUnwindSafe(move || {
                let drain = async move {
                    let mut seen = Vec::new();
                    while let Some(result) = map.next().await {
                        seen.push(result.map_err(|error| {
                            error
                                .downcast_ref::<par_imap::Error>()
                                .map(|e| (e.index(), e.is_cancelled()))
                        }));
                    }
                    seen
                };
                if from_another_runtime {
                    tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                        .unwrap()
                        .block_on(drain)
                } else {
                    futures::executor::block_on(drain)
                }
            }));
            let _ = send.send(polled.map_err(|payload| panic_message(&*payload)));
        });
        let seen = outcome
            .recv_timeout(common::hang())
            .unwrap_or_else(|_| panic!("the map hung (another runtime: {from_another_runtime})"))
            .unwrap_or_else(|message| {
                panic!("poll_next panicked (another runtime: {from_another_runtime}): {message}")
            });
        assert_eq!(seen, [Err(Some((1, true)))], "{from_another_runtime}");
    }
}

// ---- no spin, no permit ----

/// A pending backoff wakes the map once, when it ends: the map is not
/// polled over and over while an item waits (paused time would not even
/// advance if it were).
#[tokio::test(start_paused = true)]
async fn retry_pending_backoff_does_not_make_the_map_spin() {
    for unordered in [false, true] {
        let attempts = Attempts::default();
        let seen = attempts.clone();
        let mapper = move |n: usize| {
            let attempt = seen.start(n);
            async move {
                if attempt < 3 {
                    Err(anyhow::anyhow!("item {n}, attempt {attempt}"))
                } else {
                    Ok(n)
                }
            }
        };
        let retry = Retry::attempts(3).backoff(HOUR, 2 * HOUR);
        let map = if unordered {
            stream::iter(0..4_usize)
                .try_par_imap_async_unordered(2, mapper)
                .retry(retry)
                .boxed()
        } else {
            stream::iter(0..4_usize)
                .try_par_imap_async(2, mapper)
                .retry(retry)
                .boxed()
        };
        let polls = Arc::new(AtomicUsize::new(0));
        let counted = CountPolls {
            inner: map,
            polls: polls.clone(),
        };
        let start = Instant::now();
        let mut out: Vec<usize> = counted.try_collect().await.unwrap();
        out.sort_unstable();
        assert_eq!(out, [0, 1, 2, 3]);
        assert!(start.elapsed() >= HOUR / 1000, "it waited");
        // 4 items, 3 attempts each: a few polls per attempt at most.
        let polls = polls.load(Ordering::SeqCst);
        assert!(polls < 100, "{polls} polls for 12 attempts: the map spins");
    }
}

/// A blocking map's backoff holds no permit either, and no call.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_blocking_backoff_holds_no_permit_and_no_call() {
    let budget = Arc::new(Semaphore::new(2));
    let attempts = Attempts::default();
    let seen = attempts.clone();
    let mut map = stream::iter(0..2_usize)
        .try_par_imap(2, move |n: usize| {
            if seen.start(n) == 1 {
                Err(anyhow::anyhow!("item {n} fails first"))
            } else {
                Ok(n)
            }
        })
        .semaphore(budget.clone())
        .retry(Retry::attempts(2).backoff(ms(300), ms(300)).jitter(false));
    let stats = map.stats();
    let waiting = tokio::time::timeout(common::hang(), async {
        loop {
            tokio::select! {
                item = map.next() => panic!("yielded {item:?} during the backoff"),
                () = tokio::time::sleep(ms(1)) => {}
            }
            let snapshot = stats.snapshot();
            if snapshot.waiting == 2 {
                return snapshot;
            }
        }
    })
    .await
    .expect("both items to wait");
    assert_eq!(waiting.in_flight, 0, "{waiting:?}");
    assert_eq!(budget.available_permits(), 2, "a wait holds no permit");
    let out: Vec<usize> = map.try_collect().await.unwrap();
    assert_eq!(out, [0, 1]);
    let snapshot = stats.snapshot();
    assert_eq!(
        (snapshot.started, snapshot.completed, snapshot.retried),
        (4, 4, 2),
        "{snapshot:?}"
    );
    assert_eq!(
        (snapshot.waiting, snapshot.in_flight, snapshot.failed),
        (0, 0, 0)
    );
    assert_eq!(budget.available_permits(), 2);
}

// ---- composition ----

/// Two retrying maps on one budget of one permit, zipped: a wait of one
/// holds no permit, so the other runs; both finish, every permit returns.
#[tokio::test(start_paused = true)]
async fn retry_two_retrying_maps_on_one_budget_zipped_both_finish() {
    let budget = Arc::new(Semaphore::new(1));
    let make = |name: &'static str, budget: &Arc<Semaphore>| {
        let attempts = Attempts::default();
        let seen = attempts.clone();
        let map = stream::iter(0..6_usize)
            .try_par_imap_async(3, move |n| {
                let attempt = seen.start(n);
                async move {
                    tokio::time::sleep(ms(10)).await;
                    if attempt == 1 && n % 2 == 0 {
                        Err(anyhow::anyhow!("{name}: item {n} fails first"))
                    } else {
                        Ok(n)
                    }
                }
            })
            .semaphore(budget.clone())
            .retry(Retry::attempts(2).backoff(ms(500), ms(500)));
        (map, attempts)
    };
    let (left, left_attempts) = make("left", &budget);
    let (right, right_attempts) = make("right", &budget);
    let (left_stats, right_stats) = (left.stats(), right.stats());
    let zipped: Vec<(usize, usize)> = tokio::time::timeout(
        HOUR,
        left.zip(right)
            .map(|(l, r)| (l.unwrap(), r.unwrap()))
            .collect(),
    )
    .await
    .expect("zip of two retrying maps on one budget hung");
    assert_eq!(zipped, (0..6).map(|n| (n, n)).collect::<Vec<_>>());
    assert_eq!(left_attempts.total(), 9);
    assert_eq!(right_attempts.total(), 9);
    assert_eq!(budget.available_permits(), 1);
    for stats in [left_stats, right_stats] {
        let snapshot = stats.snapshot();
        assert_eq!((snapshot.retried, snapshot.waiting), (3, 0), "{snapshot:?}");
    }
}

/// `select` of two retrying maps, one of whose items waits for an hour:
/// the other map's items come meanwhile, then the waiting one.
#[tokio::test(start_paused = true)]
async fn retry_select_of_two_retrying_maps_yields_everything() {
    let slow_attempts = Attempts::default();
    let seen = slow_attempts.clone();
    let slow = stream::iter([100_usize])
        .try_par_imap_async(1, move |n| {
            let attempt = seen.start(n);
            async move {
                if attempt == 1 {
                    Err(anyhow::anyhow!("slow fails first"))
                } else {
                    Ok(n)
                }
            }
        })
        .retry(Retry::attempts(2).backoff(HOUR, HOUR).jitter(false));
    let fast_attempts = Attempts::default();
    let seen = fast_attempts.clone();
    let fast = stream::iter(0..5_usize)
        .try_par_imap_async(2, move |n| {
            let attempt = seen.start(n);
            async move {
                tokio::time::sleep(ms(1)).await;
                if attempt == 1 && n == 2 {
                    Err(anyhow::anyhow!("fast 2 fails first"))
                } else {
                    Ok(n)
                }
            }
        })
        .retry(Retry::attempts(2).backoff(ms(5), ms(5)).jitter(false));
    let start = Instant::now();
    let out: Vec<(usize, Duration)> = stream::select(slow, fast)
        .map(|item| (item.unwrap(), start.elapsed()))
        .collect()
        .await;
    let values: Vec<usize> = out.iter().map(|&(v, _)| v).collect();
    assert_eq!(values, [0, 1, 2, 3, 4, 100]);
    assert!(
        out[4].1 < HOUR,
        "the fast map did not wait for the slow one"
    );
    assert_eq!(out[5].1, HOUR);
}

/// A retrying map inside the mapper of a retrying map: an inner failure
/// that exhausts its attempts fails the outer attempt, which is retried
/// with fresh inner attempts.
#[tokio::test(start_paused = true)]
async fn retry_nested_retrying_maps() {
    let inner_attempts = Attempts::default();
    let outer_attempts = Attempts::default();
    let (inner_seen, outer_seen) = (inner_attempts.clone(), outer_attempts.clone());
    let out: Vec<usize> = stream::iter(0..4_usize)
        .try_par_imap_async(2, move |n| {
            let outer = outer_seen.start(n);
            let inner_seen = inner_seen.clone();
            async move {
                let inner: Vec<usize> = stream::iter(0..3_usize)
                    .map(move |m| n * 10 + m)
                    .try_par_imap_async(2, move |key| {
                        let attempt = inner_seen.start(key);
                        async move {
                            tokio::time::sleep(ms(1)).await;
                            // Item 21 fails its two attempts in the first
                            // outer attempt of 2 (the inner map's attempts
                            // are counted across outer attempts).
                            if key == 21 && attempt <= 2 {
                                Err(anyhow::anyhow!("inner {key}, attempt {attempt}"))
                            } else if attempt == 1 && key % 2 == 0 {
                                Err(anyhow::anyhow!("inner {key} fails first"))
                            } else {
                                Ok(key)
                            }
                        }
                    })
                    .retry(Retry::attempts(2).backoff(ms(10), ms(10)))
                    .try_collect()
                    .await?;
                let _ = outer;
                anyhow::Ok(inner.iter().sum::<usize>())
            }
        })
        .retry(Retry::attempts(2).backoff(ms(100), ms(100)))
        .try_collect()
        .await
        .unwrap();
    assert_eq!(out, [3, 33, 63, 93]);
    assert_eq!(outer_attempts.of(2), 2);
    assert_eq!(outer_attempts.of(0), 1);
}

// ---- panicking user code ----

/// A panic of the item's `clone` is that item's panic error (DESIGN and the
/// doc of `retry`), on a first attempt or on a retry; every value is
/// dropped exactly once, and `keep_going` goes on.
#[tokio::test(start_paused = true)]
async fn retry_clone_panic_is_the_items_panic_error_and_drops_each_value_once() {
    // Item 1's clone for its first attempt (0) or for its second (1).
    for nth in [0_usize, 1] {
        for unordered in [false, true] {
            let counts = Counts::new();
            counts.clone_panics.lock().unwrap().push((1, nth));
            let attempts = Attempts::default();
            let seen = attempts.clone();
            let items: Vec<Counted> = (0..3).map(|n| counts.item(n)).collect();
            let mapper = move |item: Counted| {
                let attempt = seen.start(item.value);
                async move {
                    if item.value == 1 && attempt == 1 {
                        Err(anyhow::anyhow!("item 1 fails first"))
                    } else {
                        Ok(item.value)
                    }
                }
            };
            let retry = Retry::attempts(3).backoff(ms(10), ms(10));
            let mut out: Vec<Outcome> = if unordered {
                stream::iter(items)
                    .enumerate()
                    .map(|(_, item)| item)
                    .try_par_imap_async_unordered(2, mapper)
                    .keep_going()
                    .retry(retry)
                    .map(|r| {
                        let r = r.map_err(|e| {
                            let e = e.downcast_ref::<par_imap::Error>().unwrap();
                            (e.index(), e.is_panic())
                        });
                        (r.unwrap_or_else(|(i, _)| i), r)
                    })
                    .collect()
                    .await
            } else {
                stream::iter(items)
                    .try_par_imap_async(2, mapper)
                    .keep_going()
                    .retry(retry)
                    .map(|r| {
                        let r = r.map_err(|e| {
                            let e = e.downcast_ref::<par_imap::Error>().unwrap();
                            (e.index(), e.is_panic())
                        });
                        (r.unwrap_or_else(|(i, _)| i), r)
                    })
                    .collect()
                    .await
            };
            out.sort_unstable();
            assert_eq!(
                out,
                [(0, Ok(0)), (1, Err((1, true))), (2, Ok(2))],
                "clone {nth}, unordered: {unordered}"
            );
            assert_eq!(attempts.of(1), nth as u32, "clone {nth}");
            counts.all_dropped().await;
        }
    }
}

/// An original whose `Drop` panics, dropped by the map (after a retry
/// succeeded on a clone, at a cutoff during a backoff, at the map's drop):
/// contained, never unwinding out of `poll_next` or the map's `Drop`.
#[tokio::test(start_paused = true)]
async fn retry_an_items_drop_panic_is_contained_wherever_the_map_drops_it() {
    // 1. An item that succeeds on a clone: the map drops the kept original.
    let counts = Counts::new();
    counts.drop_panics.store(true, Ordering::SeqCst);
    let items: Vec<Counted> = (0..4).map(|n| counts.item(n)).collect();
    let attempts = Attempts::default();
    let seen = attempts.clone();
    let out = std::panic::AssertUnwindSafe(
        stream::iter(items)
            .try_par_imap_async(2, move |item: Counted| {
                let attempt = seen.start(item.value);
                async move {
                    if attempt == 1 && item.value % 2 == 1 {
                        Err(anyhow::anyhow!("odd items fail first"))
                    } else {
                        Ok(item.value)
                    }
                }
            })
            .retry(Retry::attempts(3).backoff(ms(10), ms(10)))
            .try_collect::<Vec<usize>>(),
    );
    let out = futures::FutureExt::catch_unwind(out)
        .await
        .unwrap_or_else(|payload| panic!("unwound: {}", panic_message(&*payload)));
    assert_eq!(out.unwrap(), [0, 1, 2, 3]);
    counts.all_dropped().await;

    // 2. Dropped and cancelled during a backoff.
    for cancel in [false, true] {
        let counts = Counts::new();
        counts.drop_panics.store(true, Ordering::SeqCst);
        let token = CancellationToken::new();
        let items: Vec<Counted> = (0..3).map(|n| counts.item(n)).collect();
        let mut map = stream::iter(items)
            .try_par_imap_async(3, move |item: Counted| async move {
                Err::<usize, _>(anyhow::anyhow!("item {} fails", item.value))
            })
            .cancel_token(token.clone())
            .retry(Retry::attempts(3).backoff(HOUR, HOUR));
        let stats = map.stats();
        pending_until(&mut map, "three items to wait", || {
            stats.snapshot().waiting == 3
        })
        .await;
        let unwound = std::panic::catch_unwind(AssertUnwindSafe(|| {
            if cancel {
                token.cancel();
            }
        }));
        assert!(unwound.is_ok(), "token.cancel() unwound");
        let unwound = std::panic::catch_unwind(AssertUnwindSafe(move || drop(map)));
        assert!(unwound.is_ok(), "the map's drop unwound");
        counts.all_dropped().await;
    }
}

// ---- attempts(1), huge backoffs ----

/// `attempts(1)` never retries and never clones: the original is mapped.
#[tokio::test(start_paused = true)]
async fn retry_attempts_one_maps_the_original_and_fails_at_once() {
    let counts = Counts::new();
    let items: Vec<Counted> = (0..4).map(|n| counts.item(n)).collect();
    let originals = Arc::new(AtomicUsize::new(0));
    let count = originals.clone();
    let out: Vec<anyhow::Result<usize>> = stream::iter(items)
        .try_par_imap_async(2, move |item: Counted| {
            if item.original {
                count.fetch_add(1, Ordering::SeqCst);
            }
            async move {
                if item.value == 2 {
                    Err(anyhow::anyhow!("item 2 fails"))
                } else {
                    Ok(item.value)
                }
            }
        })
        .keep_going()
        .retry(Retry::attempts(1).backoff(HOUR, HOUR))
        .collect()
        .await;
    assert!(out[2].is_err() && out.iter().filter(|r| r.is_ok()).count() == 3);
    assert_eq!(counts.clones(), 0);
    assert_eq!(originals.load(Ordering::SeqCst), 4);
    counts.all_dropped().await;
}

/// `Duration::MAX` is accepted, with or without jitter: the item waits
/// until the map no longer wants it (here: the token, then a failure
/// before it in input order), and nothing panics inside `poll_next`.
#[tokio::test(start_paused = true)]
async fn retry_duration_max_backoff_waits_until_the_map_no_longer_wants_the_item() {
    for jitter in [false, true] {
        // The token.
        let counts = Counts::new();
        let token = CancellationToken::new();
        let items: Vec<Counted> = (0..3).map(|n| counts.item(n)).collect();
        let map = stream::iter(items)
            .try_par_imap_async(3, move |item: Counted| async move {
                if item.value == 1 {
                    Err(anyhow::anyhow!("item 1 fails"))
                } else {
                    Ok(item.value)
                }
            })
            .cancel_token(token.clone())
            .retry(
                Retry::attempts(5)
                    .backoff(Duration::MAX, Duration::MAX)
                    .jitter(jitter),
            );
        let canceller = token.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(7 * 24 * 3600)).await;
            canceller.cancel();
        });
        let out: Vec<Result<usize, String>> =
            map.map(|r| r.map_err(|e| e.to_string())).collect().await;
        assert_eq!(out.len(), 2, "{jitter}: {out:?}");
        assert_eq!(out[0], Ok(0));
        assert!(
            out[1].as_ref().is_err_and(|e| e.contains("cancel")),
            "{out:?}"
        );
        counts.all_dropped().await;

        // A failure below it.
        let counts = Counts::new();
        let items: Vec<Counted> = (0..3).map(|n| counts.item(n)).collect();
        let (gate, opened) = tokio::sync::oneshot::channel::<()>();
        let opened = Arc::new(tokio::sync::Mutex::new(Some(opened)));
        let out: Vec<Result<usize, String>> = stream::iter(items)
            .try_par_imap_async(3, move |item: Counted| {
                let opened = opened.clone();
                async move {
                    match item.value {
                        0 => {
                            let gate = opened.lock().await.take();
                            if let Some(gate) = gate {
                                let _ = gate.await;
                            }
                            Err(anyhow::anyhow!("item 0 fails"))
                        }
                        _ => Err(anyhow::anyhow!("item {} fails", item.value)),
                    }
                }
            })
            .retry(
                Retry::attempts(2)
                    .backoff(Duration::MAX, Duration::MAX)
                    .jitter(jitter)
                    .when(|e: &anyhow::Error| !e.to_string().contains("item 0")),
            )
            .map(|r| r.map_err(|e| e.to_string()))
            .take_until(async move {
                tokio::time::sleep(ms(10)).await;
                drop(gate);
                std::future::pending::<()>().await
            })
            .collect()
            .await;
        assert_eq!(out, [Err("item 0 fails".to_string())], "{jitter}");
        counts.all_dropped().await;
    }
}

// ---- memory ----

/// Many items, each failing its first attempt: the values alive at once
/// (originals kept for their next attempt, clones in calls, items waiting)
/// stay O(window), however long the input.
#[tokio::test(start_paused = true)]
async fn retry_values_alive_stay_within_the_window_over_many_items() {
    for (unordered, key_order) in [(false, false), (true, false), (false, true), (true, true)] {
        let counts = Counts::new();
        let made = counts.clone();
        let attempts = Attempts::default();
        let seen = attempts.clone();
        let input = stream::iter(0..3_000_usize).map(move |n| made.item(n));
        let mapper = move |item: Counted| {
            let attempt = seen.start(item.value);
            async move {
                tokio::task::yield_now().await;
                if attempt == 1 {
                    Err(anyhow::anyhow!("first attempt"))
                } else {
                    Ok(item.value)
                }
            }
        };
        let retry = Retry::attempts(3).backoff(ms(1), ms(4));
        let stream = match (unordered, key_order) {
            (false, false) => input
                .try_par_imap_async(4, mapper)
                .window(8)
                .retry(retry)
                .boxed(),
            (true, false) => input
                .try_par_imap_async_unordered(4, mapper)
                .window(8)
                .retry(retry)
                .boxed(),
            (false, true) => input
                .try_par_imap_async(4, mapper)
                .window(8)
                .key_order(|item: &Counted| item.value % 5)
                .retry(retry)
                .boxed(),
            (true, true) => input
                .try_par_imap_async_unordered(4, mapper)
                .window(8)
                .key_order(|item: &Counted| item.value % 5)
                .retry(retry)
                .boxed(),
        };
        let count = stream
            .try_fold(0_usize, |n, _| async move { Ok(n + 1) })
            .await;
        assert_eq!(count.unwrap(), 3_000);
        let peak = counts.peak.load(Ordering::SeqCst);
        // The window's 8 originals, a clone in each of 4 calls, and a few
        // originals whose end the map has not yet seen.
        assert!(
            peak <= 24,
            "unordered {unordered}, key_order {key_order}: {peak} values alive at once"
        );
        counts.all_dropped().await;
    }
}

// ---- user code on the consumer's task ----

/// DESIGN 6: a panic in user code outside the mapper never unwinds out of
/// `poll_next` (the key function's panic is that item's panic error). A
/// `.when` predicate runs on the consumer's task when a report comes in.
#[tokio::test(start_paused = true)]
async fn retry_a_panicking_when_predicate_does_not_unwind_out_of_poll_next() {
    let map = stream::iter(0..3_usize)
        .try_par_imap_async(2, |n| async move {
            if n == 1 {
                Err(anyhow::anyhow!("item 1 fails"))
            } else {
                Ok(n)
            }
        })
        .keep_going()
        .retry(Retry::attempts(3).when(|_: &anyhow::Error| panic!("the predicate panics")));
    let collected = futures::FutureExt::catch_unwind(AssertUnwindSafe(
        map.map(|r| r.map_err(|e| e.to_string()))
            .collect::<Vec<_>>(),
    ))
    .await;
    let out = collected.unwrap_or_else(|payload| {
        panic!(
            "a panic of `.when` unwound out of poll_next: {}",
            panic_message(&*payload)
        )
    });
    assert_eq!(out.len(), 3, "{out:?}");
    assert_eq!(out[0], Ok(0));
    assert!(out[1].is_err(), "{out:?}");
    assert_eq!(out[2], Ok(2));
}

// ---- runtimes ----

/// A backoff needs the runtime's timer. Like `.timeout` (DESIGN 6), a map
/// with `.retry(...backoff(..))` on a runtime without the time driver
/// should say so at its first poll, not panic inside `poll_next` at the
/// first failed attempt, with the map's state half-updated.
#[test]
fn retry_backoff_without_a_time_driver_panics_at_the_first_poll_naming_enable_time() {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let mut map = stream::iter(0..3_usize)
        .try_par_imap_async(1, |n| async move {
            if n == 1 {
                Err(anyhow::anyhow!("item 1 fails"))
            } else {
                Ok(n)
            }
        })
        .retry(Retry::attempts(2).backoff(ms(10), ms(10)).jitter(false));
    let first = runtime.block_on(async {
        std::panic::catch_unwind(AssertUnwindSafe(|| {
            futures::executor::block_on(async { futures::poll!(map.next()) })
        }))
    });
    let Err(payload) = first else {
        // The first poll did not panic: then the map must not panic later
        // either (it yields 0, and item 1 waits for a timer that must run).
        let rest = runtime.block_on(async {
            futures::FutureExt::catch_unwind(AssertUnwindSafe(
                map.map(|r| r.map_err(|e| e.to_string()))
                    .collect::<Vec<_>>(),
            ))
            .await
        });
        let rest = rest.unwrap_or_else(|payload| {
            panic!(
                "the first poll was fine, a later one panicked: {}",
                panic_message(&*payload)
            )
        });
        panic!("no panic at all without a time driver: {first:?} then {rest:?}");
    };
    assert!(
        panic_message(&*payload).contains("enable_time"),
        "{}",
        panic_message(&*payload)
    );
}

/// ...but a retry without a wait (`backoff(ZERO, ZERO)`) needs no timer:
/// it works on a runtime without the time driver (cargo mutants: a check
/// that asked for the timer whenever `.retry` was set passed every test).
#[test]
fn retry_without_a_backoff_needs_no_time_driver() {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let failed_once = Arc::new(AtomicBool::new(false));
    let out: Vec<usize> = runtime
        .block_on(
            stream::iter(0..3_usize)
                .try_par_imap_async(1, move |n| {
                    let failed_once = Arc::clone(&failed_once);
                    async move {
                        if n == 1 && !failed_once.swap(true, Ordering::SeqCst) {
                            Err(anyhow::anyhow!("item 1 fails once"))
                        } else {
                            Ok(n)
                        }
                    }
                })
                .retry(
                    Retry::attempts(2)
                        .backoff(Duration::ZERO, Duration::ZERO)
                        .jitter(false),
                )
                .try_collect(),
        )
        .expect("item 1 succeeds on its second attempt");
    assert_eq!(out, [0, 1, 2]);
}

// ---- consumers that stop polling ----

/// A consumer that stops polling during a backoff: the wait ends
/// unpolled, and the retry starts at the next poll; a token cancelled
/// meanwhile (still unpolled) drops the kept item at once.
#[tokio::test(start_paused = true)]
async fn retry_a_consumer_that_stops_polling_during_a_backoff() {
    let counts = Counts::new();
    let attempts = Attempts::default();
    let seen = attempts.clone();
    let items: Vec<Counted> = (0..4).map(|n| counts.item(n)).collect();
    let mut map = stream::iter(items)
        .try_par_imap_async(2, move |item: Counted| {
            let attempt = seen.start(item.value);
            async move {
                if attempt == 1 && item.value == 1 {
                    Err(anyhow::anyhow!("item 1 fails first"))
                } else {
                    Ok(item.value)
                }
            }
        })
        .retry(Retry::attempts(2).backoff(ms(100), ms(100)).jitter(false));
    let stats = map.stats();
    assert_eq!(map.next().await.unwrap().unwrap(), 0);
    pending_until(&mut map, "item 1 to wait", || stats.snapshot().waiting == 1).await;
    // Not polled for an hour: nothing runs meanwhile.
    tokio::time::sleep(HOUR).await;
    assert_eq!(attempts.of(1), 1);
    let snapshot = stats.snapshot();
    assert_eq!(
        (snapshot.waiting, snapshot.in_flight),
        (1, 0),
        "{snapshot:?}"
    );
    let rest: Vec<usize> = map.try_collect().await.unwrap();
    assert_eq!(rest, [1, 2, 3]);
    assert_eq!(attempts.of(1), 2);
    let snapshot = stats.snapshot();
    assert_eq!(
        (
            snapshot.started,
            snapshot.completed,
            snapshot.retried,
            snapshot.failed
        ),
        (5, 5, 1, 0),
        "{snapshot:?}"
    );
    counts.all_dropped().await;
}

// ---- key order, timeouts ----

/// A timed-out blocking attempt holds its key until its thread returns,
/// and so does its backoff: a later item of the key starts only after the
/// retry succeeded; another key goes on meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_key_order_a_timed_out_blocking_attempt_holds_its_key_through_its_retry() {
    let events = Arc::new(Mutex::new(Vec::new()));
    let record = events.clone();
    let attempts = Attempts::default();
    let seen = attempts.clone();
    let out: Vec<usize> = stream::iter([0_usize, 1, 2])
        .par_imap(3, move |n| {
            let attempt = seen.start(n);
            record.lock().unwrap().push(format!("{n}.{attempt} starts"));
            if (n, attempt) == (0, 1) {
                common::eventually("attempt 0.1 to time out", par_imap::is_cancelled);
                std::thread::sleep(ms(50));
            }
            record.lock().unwrap().push(format!("{n}.{attempt} ends"));
            n
        })
        .timeout(ms(20))
        .key_order(|n: &usize| *n % 2)
        .retry(Retry::attempts(2).backoff(ms(30), ms(30)).jitter(false))
        .try_collect()
        .await
        .unwrap();
    assert_eq!(out, [0, 1, 2]);
    let events = events.lock().unwrap().clone();
    let at = |what: &str| {
        events
            .iter()
            .position(|e| e == what)
            .unwrap_or_else(|| panic!("{what} missing: {events:?}"))
    };
    assert!(at("0.1 ends") < at("0.2 starts"), "{events:?}");
    assert!(at("0.2 ends") < at("2.1 starts"), "{events:?}");
    assert!(at("1.1 ends") < at("0.1 ends"), "key 1 goes on: {events:?}");
    assert_eq!(attempts.of(2), 1);
}

/// Polls `map` (which must stay pending) while paused time moves on, a
/// minute at a time, until `condition` holds.
async fn pending_over_time<S>(map: &mut S, what: &str, condition: impl Fn() -> bool)
where
    S: Stream + Unpin,
    S::Item: std::fmt::Debug,
{
    for _ in 0..1_000 {
        if condition() {
            return;
        }
        tokio::select! {
            item = map.next() => panic!("the map yielded {item:?} while waiting for: {what}"),
            () = tokio::time::sleep(Duration::from_secs(60)) => {}
        }
    }
    panic!("never happened: {what}");
}

/// Ordered fail-fast, item 1 fails for good while items 0 and 2 wait in
/// backoff: item 0 is still retried (owed), item 2 is dropped at once,
/// unpolled (DESIGN: "It ends — and its item is dropped at once — when the
/// still-wanted rule says no (token, failure cutoff, ...), polled or not").
/// Here item 1's failure is one that `.when` does not retry, on its first
/// attempt of two.
#[tokio::test(start_paused = true)]
async fn retry_a_failure_when_rejects_drops_a_later_waiting_item_at_once_unpolled() {
    failure_between_two_waiting_items(false).await;
}

/// The same, item 1 failing its last attempt: passes (the worker's
/// failure lowers the cutoff at once).
#[tokio::test(start_paused = true)]
async fn retry_a_last_attempts_failure_drops_a_later_waiting_item_at_once_unpolled() {
    failure_between_two_waiting_items(true).await;
}

async fn failure_between_two_waiting_items(on_last_attempt: bool) {
    let counts = Counts::new();
    let attempts = Attempts::default();
    let seen = attempts.clone();
    let items: Vec<Counted> = (0..3).map(|n| counts.item(n)).collect();
    let (fail, failing) = tokio::sync::oneshot::channel::<()>();
    let failing = Arc::new(Mutex::new(Some(failing)));
    // Item 1's gated attempt: its first (failing in a way `.when` rejects),
    // or its second and last (items 0 and 2 fail their first half an hour
    // in, so they wait while it runs).
    let gated = if on_last_attempt { 2 } else { 1 };
    let mut map = stream::iter(items)
        .try_par_imap_async(3, move |item: Counted| {
            let attempt = seen.start(item.value);
            let failing = (item.value == 1 && attempt == gated)
                .then(|| failing.lock().unwrap().take())
                .flatten();
            async move {
                match (item.value, attempt) {
                    (1, _) if failing.is_some() => {
                        let _ = failing.unwrap().await;
                        Err(anyhow::anyhow!("item 1 fails for good"))
                    }
                    (1, _) => Err(anyhow::anyhow!("item 1 fails first")),
                    (_, 1) => {
                        if on_last_attempt {
                            tokio::time::sleep(HOUR / 2).await;
                        }
                        Err(anyhow::anyhow!("item {} fails first", item.value))
                    }
                    _ => Ok(item.value),
                }
            }
        })
        .retry(
            Retry::attempts(2)
                .backoff(HOUR, HOUR)
                .jitter(false)
                .when(|e: &anyhow::Error| !e.to_string().contains("for good")),
        );
    let stats = map.stats();
    pending_over_time(&mut map, "items 0 and 2 to wait, item 1 to run", || {
        stats.snapshot().waiting == 2 && attempts.of(1) == gated
    })
    .await;
    // Items 0 and 2 are kept, and item 1 too while its first attempt runs
    // on a clone.
    let kept = if on_last_attempt { 2 } else { 3 };
    assert_eq!(counts.alive(), kept, "{:?}", stats.snapshot());
    drop(fail);
    for _ in 0..100 {
        tokio::task::yield_now().await;
    }
    assert_eq!(
        counts.alive(),
        1,
        "item 2 dropped at once, unpolled; item 0 kept"
    );
    assert_eq!(map.next().await.unwrap().unwrap(), 0);
    let error = map.next().await.unwrap().unwrap_err();
    assert_eq!(error.to_string(), "item 1 fails for good");
    assert!(map.next().await.is_none());
    assert_eq!(attempts.of(0), 2);
    assert_eq!(attempts.of(2), 1);
    let snapshot = stats.snapshot();
    assert_eq!((snapshot.failed, snapshot.waiting), (1, 0), "{snapshot:?}");
    counts.all_dropped().await;
}

// ---- fail-fast is unchanged for failures that do not retry ----

/// DESIGN 4 (fail-fast) with `.retry`: a panic is not retried without
/// `.retry_panics()`, so it is the item's last attempt and fails the map
/// like any failure: nothing after it starts. Without `.retry` a blocking
/// worker lowers the cutoff at once ("so a call queued behind this one does
/// not start before the engine hears", `Call::failed_at`); here the call
/// queued behind the panic must not map its item either, however late the
/// consumer polls.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_a_panic_not_retried_starts_nothing_after_it_like_fail_fast() {
    for with_retry in [false, true] {
        let calls = common::Calls::default();
        let count = calls.clone();
        let panicked = Arc::new(AtomicBool::new(false));
        let flag = panicked.clone();
        let map = stream::iter(0..4_usize).par_imap(1, move |n: usize| {
            let _running = count.enter(n);
            if n == 0 {
                flag.store(true, Ordering::SeqCst);
                panic!("item 0 panics");
            }
            n
        });
        let mut map = if with_retry {
            map.retry(Retry::attempts(3)).boxed()
        } else {
            map.boxed()
        };
        // One poll starts item 0's call and queues item 1's behind it;
        // then the consumer looks away while the worker goes on. (The
        // panic can be reported within that first poll on a fast worker.)
        let mut out = Vec::new();
        if let std::task::Poll::Ready(first) = futures::poll!(map.next()) {
            out.extend(first);
        }
        common::eventually_async("item 0 to panic", || panicked.load(Ordering::SeqCst)).await;
        tokio::time::sleep(ms(100)).await;
        out.extend(map.collect::<Vec<_>>().await);
        assert_eq!(out.len(), 1, "{out:?}");
        assert!(out[0].as_ref().unwrap_err().is_panic());
        assert_eq!(
            calls.started_indices(),
            [0],
            "with .retry: {with_retry}: an item after the failure was mapped"
        );
    }
}

/// DESIGN: "When a wait ends, the retry starts before any item with a
/// higher index." On a blocking map, limit 1: item 0 fails at once and may
/// come back after 1 s; items 1 and 2 come meanwhile, in one call
/// (`.batch(2)`), and item 1 runs until well after that. When item 1
/// ends, item 0's retry is due: it must start before item 2, the next
/// item of item 1's call.
///
/// Item 0 comes alone, and items 1 to 3 all at once later, so that the
/// calls are what the test says whatever the machine's load: with every item ready
/// and adaptive sizes, a first attempt of item 0 slower than 250 µs (seen
/// on a loaded machine: 275 µs) kept the next call at one item, item 2 was
/// never pulled, and the test waited for it for 20 s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_blocking_a_due_retry_starts_before_a_higher_item_queued_during_its_wait() {
    let attempts = Attempts::default();
    let seen = attempts.clone();
    let gates = common::Gates::default();
    let gate = gates.clone();
    let (more, more_came) = tokio::sync::oneshot::channel::<()>();
    let input = stream::iter([0_usize])
        .chain(stream::once(more_came).flat_map(|_| stream::iter(1..4_usize)));
    let map = input
        .try_par_imap(1, move |n: usize| {
            let attempt = seen.start(n);
            if (n, attempt) == (0, 1) {
                return Err(anyhow::anyhow!("item 0 fails first"));
            }
            if n == 1 {
                gate.wait(1);
            }
            Ok(n)
        })
        .batch(2)
        .window(8)
        .retry(Retry::attempts(2).backoff(ms(1000), ms(1000)).jitter(false));
    let stats = map.stats();
    let collect = tokio::spawn(map.try_collect::<Vec<usize>>());
    // Waiting on the runtime's timer, not by `eventually_async`'s spin:
    // that blocks a worker thread between looks.
    let deadline = std::time::Instant::now() + common::hang();
    let wait_for = async |what: &str, done: &dyn Fn() -> bool| {
        while !done() {
            assert!(
                std::time::Instant::now() < deadline,
                "{what}: {:?}, {:?}",
                stats.snapshot(),
                attempts.order()
            );
            tokio::time::sleep(ms(1)).await;
        }
    };
    wait_for("item 0 never failed to wait", &|| {
        stats.snapshot().waiting == 1
    })
    .await;
    // Item 0 waits; items 1 and 2 come, in one call, and item 1 runs.
    more.send(()).unwrap();
    wait_for("item 1 never started", &|| {
        attempts.of(1) == 1 && stats.snapshot().pulled >= 3
    })
    .await;
    // Item 0's wait ends (1 s, with ample room) while item 1 runs; only
    // then item 1 returns.
    tokio::time::sleep(ms(1500)).await;
    gates.open(1);
    let out = collect.await.unwrap().unwrap();
    assert_eq!(out, [0, 1, 2, 3]);
    let order = attempts.order();
    let at = |item: (usize, u32)| order.iter().position(|&x| x == item).unwrap();
    assert!(
        at((0, 2)) < at((2, 1)),
        "item 2 started before item 0's due retry: {order:?}"
    );
}

/// With `.key_order`, an item whose clone panics frees its key: the key's
/// later items are still mapped (keep_going), in order.
#[tokio::test(start_paused = true)]
async fn retry_key_order_a_clone_panic_frees_the_key() {
    let counts = Counts::new();
    counts.clone_panics.lock().unwrap().push((0, 0));
    let attempts = Attempts::default();
    let seen = attempts.clone();
    let items: Vec<Counted> = (0..4).map(|n| counts.item(n)).collect();
    let out: Vec<Result<usize, bool>> = stream::iter(items)
        .try_par_imap_async(2, move |item: Counted| {
            seen.start(item.value);
            async move { anyhow::Ok(item.value) }
        })
        .keep_going()
        .key_order(|_: &Counted| 7)
        .retry(Retry::attempts(2))
        .map(|r| {
            r.map_err(|e| {
                e.downcast_ref::<par_imap::Error>()
                    .is_some_and(par_imap::Error::is_panic)
            })
        })
        .collect()
        .await;
    assert_eq!(out, [Err(true), Ok(1), Ok(2), Ok(3)]);
    counts.all_dropped().await;
}

/// A blocking map with `.key_order`: a token cancelled while an item waits
/// in backoff, the map unpolled, drops the kept item at once; the next
/// poll is one cancellation error at the lowest index not yielded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_blocking_token_cancelled_unpolled_during_a_backoff_drops_the_item() {
    let counts = Counts::new();
    let token = CancellationToken::new();
    let attempts = Attempts::default();
    let seen = attempts.clone();
    let items: Vec<Counted> = (0..3).map(|n| counts.item(n)).collect();
    let mut map = stream::iter(items)
        .try_par_imap(2, move |item: Counted| {
            if seen.start(item.value) == 1 && item.value == 1 {
                Err(anyhow::anyhow!("item 1 fails first"))
            } else {
                Ok(item.value)
            }
        })
        .key_order(|item: &Counted| item.value % 2)
        .cancel_token(token.clone())
        .retry(Retry::attempts(2).backoff(HOUR, HOUR));
    let stats = map.stats();
    assert_eq!(map.next().await.unwrap().unwrap(), 0);
    let waiting = tokio::time::timeout(common::hang(), async {
        loop {
            tokio::select! {
                item = map.next() => panic!("yielded {item:?}"),
                () = tokio::time::sleep(ms(1)) => {}
            }
            if stats.snapshot().waiting >= 1
                && attempts.of(1) == 1
                && stats.snapshot().in_flight == 0
            {
                return;
            }
        }
    })
    .await;
    assert!(waiting.is_ok(), "item 1 never waited");
    token.cancel();
    // Item 2 may have been mapped already; item 1's original is kept only
    // for its retry, and goes now.
    common::eventually_async("item 1's original to go", || counts.alive() <= 1).await;
    let error = map.next().await.unwrap().unwrap_err();
    let error = error.downcast_ref::<par_imap::Error>().unwrap();
    assert!(error.is_cancelled() && error.index() == 1, "{error}");
    assert!(map.next().await.is_none());
    assert_eq!(attempts.of(1), 1);
    counts.all_dropped().await;
}

/// The same on a blocking map (real time: a spinning map would poll
/// thousands of times during a 300 ms wait), with a timeout armed too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_blocking_pending_backoff_does_not_make_the_map_spin() {
    let attempts = Attempts::default();
    let seen = attempts.clone();
    let map = stream::iter(0..3_usize)
        .try_par_imap(2, move |n: usize| {
            if seen.start(n) == 1 {
                Err(anyhow::anyhow!("item {n} fails first"))
            } else {
                Ok(n)
            }
        })
        .timeout(HOUR)
        .retry(Retry::attempts(2).backoff(ms(300), ms(300)).jitter(false));
    let polls = Arc::new(AtomicUsize::new(0));
    let counted = CountPolls {
        inner: map,
        polls: polls.clone(),
    };
    let out: Vec<usize> = counted.try_collect().await.unwrap();
    assert_eq!(out, [0, 1, 2]);
    let polls = polls.load(Ordering::SeqCst);
    assert!(polls < 200, "{polls} polls for 6 attempts: the map spins");
}

// ---- a late result of an item the map timed out (blocking, `.timeout`) ----

/// The error of the mappers below: their own, or the map's (a timeout).
#[derive(Debug)]
enum Late {
    Map(par_imap::Error),
    Mine,
}

impl From<par_imap::Error> for Late {
    fn from(error: par_imap::Error) -> Self {
        Late::Map(error)
    }
}

/// `.retry` that tries timeouts again and nothing else.
fn retry_timeouts_only() -> Retry<Late> {
    Retry::attempts(3)
        .backoff(ms(1), ms(1))
        .jitter(false)
        .when(|error: &Late| matches!(error, Late::Map(error) if error.is_timeout()))
}

/// The map times item 0 out while its first attempt runs (polled, 30 ms),
/// to retry it once its thread returns; the attempt then returns an `Err`
/// that `.retry` does not take. The timeout stands and is retried; the
/// late `Err` is dropped. (Found in review: the worker judged the late
/// `Err` itself, cut the map off at item 0, and the map, finding its retry
/// unwanted, skipped it and hung.) Ordered and unordered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_a_late_err_after_the_map_timed_its_item_out_is_retried_as_the_timeout() {
    for unordered in [false, true] {
        let attempts = Attempts::default();
        let seen = attempts.clone();
        let mapper = move |n: usize| {
            if (n, seen.start(n)) == (0, 1) {
                // Well past its 30 ms, so that the map gives it up first
                // (if a loaded machine lets the worker see its own overrun
                // first, the timeout is the same and so is the outcome).
                std::thread::sleep(ms(200));
                return Err(Late::Mine);
            }
            Ok(n)
        };
        let input = stream::iter(0..4_usize);
        let map = if unordered {
            input
                .try_par_imap_unordered(2, mapper)
                .timeout(ms(30))
                .retry(retry_timeouts_only())
                .boxed()
        } else {
            input
                .try_par_imap(2, mapper)
                .timeout(ms(30))
                .retry(retry_timeouts_only())
                .boxed()
        };
        let out: Vec<Result<usize, Late>> = tokio::time::timeout(common::hang(), map.collect())
            .await
            .unwrap_or_else(|_| panic!("the map hung (unordered: {unordered})"));
        let mut ok: Vec<usize> = out
            .iter()
            .filter_map(|r| r.as_ref().ok().copied())
            .collect();
        ok.sort_unstable();
        assert_eq!(ok, [0, 1, 2, 3], "unordered: {unordered}: {out:?}");
        assert_eq!(attempts.of(0), 2, "item 0 retried once");
    }
}

/// The same with a plain variant and a late panic (not retried without
/// `.retry_panics()`): the map's timeout stands and is retried.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_a_late_panic_after_the_map_timed_its_item_out_is_retried_as_the_timeout() {
    let attempts = Attempts::default();
    let seen = attempts.clone();
    let map = stream::iter(0..4_usize)
        .par_imap(2, move |n: usize| {
            if (n, seen.start(n)) == (0, 1) {
                std::thread::sleep(ms(200));
                panic!("late");
            }
            n
        })
        .timeout(ms(30))
        .retry(Retry::attempts(3).backoff(ms(1), ms(1)).jitter(false));
    let out: Vec<Result<usize, par_imap::Error>> =
        tokio::time::timeout(common::hang(), map.collect())
            .await
            .expect("the map hung");
    assert!(out.iter().all(Result::is_ok), "{out:?}");
    assert_eq!(attempts.of(0), 2, "item 0 retried once");
}

/// Polls `map` once (its calls start), then not at all for 400 ms, then
/// collects it (bounded: a hang fails).
async fn collect_after_400_ms_unpolled<S: Stream>(map: S) -> Vec<S::Item> {
    let mut map = std::pin::pin!(map);
    assert!(futures::poll!(map.next()).is_pending());
    tokio::time::sleep(ms(400)).await;
    tokio::time::timeout(common::hang(), map.collect())
        .await
        .expect("the map hung")
}

/// Nobody polls while item 0 overruns: its worker sees the overrun and
/// makes the late `Err` a timeout, which `.retry` takes. The timeout is
/// what is judged, not the `Err` it replaced. (Found in review: the worker
/// judged the `Err`, which `.retry` refuses, and the item failed with a
/// timeout that `.retry` would have tried again.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_an_item_that_overran_while_nobody_polled_is_judged_as_its_timeout() {
    let attempts = Attempts::default();
    let seen = attempts.clone();
    let judged = Arc::new(Mutex::new(Vec::new()));
    let record = Arc::clone(&judged);
    let map =
        stream::iter(0..2_usize)
            .try_par_imap(2, move |n: usize| {
                if (n, seen.start(n)) == (0, 1) {
                    std::thread::sleep(ms(150));
                    return Err(Late::Mine);
                }
                Ok(n)
            })
            .timeout(ms(30))
            .retry(Retry::attempts(3).backoff(ms(1), ms(1)).jitter(false).when(
                move |error: &Late| {
                    record.lock().unwrap().push(format!("{error:?}"));
                    matches!(error, Late::Map(error) if error.is_timeout())
                },
            ));
    // Not polled while item 0 runs past its deadline and returns.
    let out = collect_after_400_ms_unpolled(map).await;
    assert!(
        out.iter().all(Result::is_ok),
        "{out:?}; the predicate saw {:?}",
        judged.lock().unwrap()
    );
    assert_eq!(attempts.of(0), 2, "item 0 retried once");
}

/// The `.when` predicate (user code, asked where the call runs) itself
/// runs past the item's deadline while nobody polls: its verdict was on the
/// `Err`, but the item's result became a timeout meanwhile, so the verdict
/// is forgotten and the timeout judged, which `.retry` takes. (cargo
/// mutants: with the verdict kept, `forget_verdict` made a no-op, every
/// test passed; the item then failed with a timeout `.retry` would try.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_a_verdict_that_came_after_the_items_deadline_is_not_the_timeouts() {
    let attempts = Attempts::default();
    let seen = attempts.clone();
    let slow_once = Arc::new(AtomicBool::new(true));
    let map =
        stream::iter(0..1_usize)
            .try_par_imap(1, move |n: usize| {
                if seen.start(n) == 1 {
                    return Err(Late::Mine);
                }
                Ok(n)
            })
            .timeout(ms(30))
            .retry(Retry::attempts(3).backoff(ms(1), ms(1)).jitter(false).when(
                move |error: &Late| {
                    if slow_once.swap(false, Ordering::SeqCst) {
                        std::thread::sleep(ms(150));
                    }
                    matches!(error, Late::Map(error) if error.is_timeout())
                },
            ));
    // Not polled while the predicate runs past item 0's deadline.
    let out = collect_after_400_ms_unpolled(map).await;
    assert!(out.iter().all(Result::is_ok), "{out:?}");
    assert_eq!(attempts.of(0), 2, "item 0 retried once");
}

/// A blocking item times out, and `.when` refuses timeouts: the timeout is
/// the item's failure, with attempts left or not (cargo mutants: with the
/// engine's check `!accepted || !attempts_left` made `&&`, the refused
/// timeout was tried again and every test passed).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_a_timeout_that_when_refuses_is_not_tried_again() {
    let attempts = Attempts::default();
    let seen = attempts.clone();
    let out: Vec<Result<usize, Late>> = tokio::time::timeout(
        common::hang(),
        stream::iter(0..1_usize)
            .try_par_imap(1, move |n: usize| {
                if seen.start(n) == 1 {
                    std::thread::sleep(ms(200));
                }
                Ok(n)
            })
            .timeout(ms(30))
            .retry(
                Retry::attempts(3)
                    .backoff(ms(1), ms(1))
                    .jitter(false)
                    .when(|error: &Late| !matches!(error, Late::Map(error) if error.is_timeout())),
            )
            .collect(),
    )
    .await
    .expect("the map hung");
    assert!(
        matches!(out.as_slice(), [Err(Late::Map(error))] if error.is_timeout()),
        "{out:?}"
    );
    assert_eq!(attempts.of(0), 1, "item 0 not tried again");
}

// ---- a `.when` predicate that panics where the call runs ----

/// A `.when` predicate that panics on its first call only, then retries.
fn panics_once_then_retries() -> Retry<anyhow::Error> {
    let calls = Arc::new(AtomicUsize::new(0));
    Retry::attempts(3).when(move |_: &anyhow::Error| {
        assert!(
            calls.fetch_add(1, Ordering::SeqCst) != 0,
            "the predicate panics on its first call"
        );
        true
    })
}

/// Whether `error` is the map's own error and `what` holds of it.
fn is_maps(error: &anyhow::Error, what: fn(&par_imap::Error) -> bool) -> bool {
    error.downcast_ref::<par_imap::Error>().is_some_and(what)
}

/// DESIGN (`.retry`): "A panic of ... the `.when` predicate, is that item's
/// panic error (not tried again)", also when it panics where the call runs.
/// (Found in review: the call cut the map off at the item, the engine asked
/// the predicate again, which retried, found the item cut off and skipped
/// it: no failure was ever recorded and the map hung.)
#[tokio::test(start_paused = true)]
async fn retry_a_predicate_panicking_where_the_call_runs_is_the_items_panic_error() {
    let map = stream::iter(0..3_usize)
        .try_par_imap_async(2, |n| async move {
            if n == 1 {
                Err(anyhow::anyhow!("item 1 fails"))
            } else {
                Ok(n)
            }
        })
        .retry(panics_once_then_retries());
    let out = tokio::time::timeout(Duration::from_secs(600), map.collect::<Vec<_>>())
        .await
        .expect("the map hung after the predicate panicked");
    assert_eq!(out.len(), 2, "{out:?}");
    assert_eq!(*out[0].as_ref().unwrap(), 0);
    let error = out[1].as_ref().unwrap_err();
    assert!(is_maps(error, par_imap::Error::is_panic), "{error:?}");
}

/// The same with `.keep_going()`: the item's panic error at its place, not
/// tried again (found in review: it was retried, and yielded its mapper's
/// `Err` after three attempts).
#[tokio::test(start_paused = true)]
async fn retry_keep_going_a_predicate_panicking_where_the_call_runs_is_not_retried() {
    let map = stream::iter(0..3_usize)
        .try_par_imap_async(2, |n| async move {
            if n == 1 {
                Err(anyhow::anyhow!("item 1 fails"))
            } else {
                Ok(n)
            }
        })
        .keep_going()
        .retry(panics_once_then_retries());
    let stats = map.stats();
    let out = tokio::time::timeout(Duration::from_secs(600), map.collect::<Vec<_>>())
        .await
        .expect("the map hung");
    assert_eq!(out.len(), 3, "{out:?}");
    let error = out[1].as_ref().unwrap_err();
    assert!(is_maps(error, par_imap::Error::is_panic), "{error:?}");
    assert_eq!(stats.snapshot().retried, 0);
}
