//! `.retry(Retry::attempts(n).backoff(initial, max))` (DESIGN, "For
//! services"): a failed attempt (an `Err`, a timeout, a panic only with
//! `.retry_panics()`, narrowed by `.when`) is tried again after
//! `min(max, initial * 2^(a - 1))`, jittered unless `.jitter(false)`; the
//! item fails only after its last attempt. A backoff wait holds no call and
//! no permit, counts in the window and in `Snapshot::waiting`, keeps its key
//! busy, and ends (dropping its item) when the map no longer wants it. Every
//! attempt but the last maps a clone; every value is dropped exactly once.
//! Time is paused wherever there is a backoff, so every run is the same.
mod common;
#[path = "common/retrying.rs"]
mod retrying;

use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::{StreamExt, TryStreamExt, stream};
use par_imap::{ParImapExt, Retry};
use retrying::{Attempts, Counted, Counts, HOUR, ms, pending_until};
use tokio::sync::Semaphore;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// The flaky downstream: attempt `attempt` of item `n` fails on the first
/// attempt of every third item and on the second of every ninth.
fn flaky(n: usize, attempt: u32) -> bool {
    (attempt == 1 && n % 3 == 0) || (attempt == 2 && n % 9 == 0)
}

/// Awaits `future`, failing (not hanging) if it takes longer than `bound`:
/// in paused time a deadlocked map has no timer left, so the clock jumps
/// to this one at once.
async fn bounded<T>(what: &str, bound: Duration, future: impl Future<Output = T>) -> T {
    tokio::time::timeout(bound, future)
        .await
        .unwrap_or_else(|_| panic!("hung: {what}"))
}

#[tokio::test(start_paused = true)]
async fn retry_turns_flaky_errors_into_results_in_input_order_async() {
    for unordered in [false, true] {
        let attempts = Attempts::default();
        let seen = attempts.clone();
        let mapper = move |n: usize| {
            let fail = seen.failed(flaky(n, seen.start(n)));
            async move {
                tokio::task::yield_now().await;
                if fail {
                    Err(anyhow::anyhow!("item {n} failed"))
                } else {
                    Ok(n)
                }
            }
        };
        let retry = Retry::attempts(5);
        let (stats, mut out): (_, Vec<usize>) = if unordered {
            let map = stream::iter(0..90)
                .try_par_imap_async_unordered(4, mapper)
                .retry(retry);
            (map.stats(), map.try_collect().await.unwrap())
        } else {
            let map = stream::iter(0..90)
                .try_par_imap_async(4, mapper)
                .retry(retry);
            (map.stats(), map.try_collect().await.unwrap())
        };
        if unordered {
            out.sort_unstable();
        }
        assert_eq!(out, (0..90).collect::<Vec<_>>(), "unordered: {unordered}");
        // 30 items fail their first attempt, 10 of them their second too.
        assert_eq!(attempts.failures(), 40);
        let snapshot = stats.snapshot();
        assert_eq!(snapshot.retried, attempts.failures(), "{snapshot:?}");
        assert_eq!(snapshot.started, 90 + 40, "attempts: {snapshot:?}");
        assert_eq!(snapshot.completed, 90 + 40, "attempts: {snapshot:?}");
        assert_eq!(snapshot.failed, 0, "{snapshot:?}");
        assert_eq!(snapshot.yielded, 90);
        assert_eq!((snapshot.waiting, snapshot.in_flight), (0, 0));
        assert_eq!(attempts.of(0), 3);
        assert_eq!(attempts.of(3), 2);
        assert_eq!(attempts.of(1), 1);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_turns_flaky_errors_into_results_in_input_order_blocking() {
    // Adaptive sizes and a fixed batch alike: with `.retry` a call maps
    // one item, and a retry is a call of its own.
    for batch in [None, Some(4)] {
        let attempts = Attempts::default();
        let seen = attempts.clone();
        let map = stream::iter(0..90)
            .try_par_imap(3, move |n: usize| {
                if seen.failed(flaky(n, seen.start(n))) {
                    Err(anyhow::anyhow!("item {n} failed"))
                } else {
                    Ok(n)
                }
            })
            .retry(Retry::attempts(5));
        let map = match batch {
            Some(k) => map.batch(k),
            None => map,
        };
        let stats = map.stats();
        let out: Vec<usize> = map.try_collect().await.unwrap();
        assert_eq!(out, (0..90).collect::<Vec<_>>(), "batch {batch:?}");
        assert_eq!(attempts.failures(), 40);
        let snapshot = stats.snapshot();
        assert_eq!(snapshot.retried, 40, "{snapshot:?}");
        assert_eq!(snapshot.started, 130, "{snapshot:?}");
        assert_eq!(snapshot.completed, 130, "{snapshot:?}");
        assert_eq!(snapshot.failed, 0, "{snapshot:?}");
        assert_eq!(attempts.of(9), 3);
    }
}

/// A plain variant's failures are timeouts: each attempt has its own
/// deadline, and a timed-out attempt is tried again.
#[tokio::test(start_paused = true)]
async fn retry_retries_timed_out_attempts_each_with_its_own_deadline() {
    let attempts = Attempts::default();
    let seen = attempts.clone();
    let map = stream::iter(0..27)
        .par_imap_async(27, move |n: usize| {
            let fail = seen.failed(flaky(n, seen.start(n)));
            async move {
                // A failing attempt hangs; the others take 600 ms, which
                // fits the deadline only if it counts from the attempt.
                tokio::time::sleep(if fail { HOUR } else { ms(600) }).await;
                n
            }
        })
        .timeout(Duration::from_secs(1))
        .retry(Retry::attempts(3).backoff(ms(500), ms(500)).jitter(false));
    let stats = map.stats();
    let out: Vec<usize> = map.try_collect().await.unwrap();
    assert_eq!(out, (0..27).collect::<Vec<_>>());
    assert_eq!(attempts.failures(), 9 + 3);
    assert_eq!(stats.snapshot().retried, 12);
    // Item 0 timed out twice: 1 s, a 500 ms wait, 1 s, a 500 ms wait (the
    // doubled backoff, capped), then its third attempt.
    assert_eq!(
        attempts.times(0),
        [ms(0), ms(1_500), ms(3_000)],
        "no deadline runs during a wait"
    );
}

/// While every item waits in backoff, nothing runs: no call, no permit of
/// the shared budget; the items count in `waiting` and fill the window.
#[tokio::test(start_paused = true)]
async fn retry_backoff_holds_no_call_and_no_permit_and_counts_in_waiting_and_the_window() {
    let budget = Arc::new(Semaphore::new(3));
    let pulled = Arc::new(AtomicUsize::new(0));
    let counter = pulled.clone();
    let attempts = Attempts::default();
    let seen = attempts.clone();
    let mut map = stream::iter(0..8_usize)
        .inspect(move |_| {
            counter.fetch_add(1, Ordering::SeqCst);
        })
        .try_par_imap_async(2, move |n| {
            let attempt = seen.start(n);
            async move {
                if attempt == 1 {
                    Err(anyhow::anyhow!("item {n}: first attempt"))
                } else {
                    Ok(n)
                }
            }
        })
        .window(4)
        .semaphore(budget.clone())
        .retry(Retry::attempts(2).backoff(HOUR, HOUR).jitter(false));
    let stats = map.stats();
    let start = Instant::now();
    pending_until(&mut map, "four items to wait", || {
        stats.snapshot().waiting == 4
    })
    .await;
    let snapshot = stats.snapshot();
    assert_eq!(snapshot.in_flight, 0, "{snapshot:?}");
    assert_eq!(budget.available_permits(), 3, "a wait holds no permit");
    assert_eq!(snapshot.pulled, 4, "waiting items fill the window");
    assert_eq!(pulled.load(Ordering::SeqCst), 4);
    assert_eq!((snapshot.started, snapshot.retried), (4, 0), "{snapshot:?}");
    assert_eq!(start.elapsed(), Duration::ZERO);
    // A consumer may take the whole budget during the wait.
    let all = budget.clone().try_acquire_many_owned(3).unwrap();
    drop(all);

    let out: Vec<usize> = map.try_collect().await.unwrap();
    assert_eq!(out, (0..8).collect::<Vec<_>>());
    // Items 0..4 come back after an hour, then 4..8 wait their hour.
    assert_eq!(start.elapsed(), 2 * HOUR);
    let snapshot = stats.snapshot();
    assert_eq!(snapshot.retried, 8, "{snapshot:?}");
    assert_eq!((snapshot.waiting, snapshot.in_flight), (0, 0));
    assert_eq!(budget.available_permits(), 3);
}

#[tokio::test(start_paused = true)]
async fn retry_delay_doubles_from_initial_and_is_capped_at_max() {
    for (initial, max, expected) in [
        (ms(10), ms(40), vec![ms(10), ms(20), ms(40), ms(40)]),
        (ms(10), ms(10), vec![ms(10); 4]),
        (Duration::ZERO, ms(40), vec![Duration::ZERO; 4]),
        // `Duration::MAX` as the cap: plain doubling.
        (ms(1), Duration::MAX, vec![ms(1), ms(2), ms(4), ms(8)]),
    ] {
        let attempts = Attempts::default();
        let seen = attempts.clone();
        let out: Vec<usize> = stream::iter([0_usize])
            .try_par_imap_async(1, move |n| {
                let attempt = seen.start(n);
                async move {
                    if attempt < 5 {
                        Err(anyhow::anyhow!("attempt {attempt}"))
                    } else {
                        Ok(n)
                    }
                }
            })
            .retry(Retry::attempts(5).backoff(initial, max).jitter(false))
            .try_collect()
            .await
            .unwrap();
        assert_eq!(out, [0]);
        assert_eq!(attempts.gaps(0), expected, "backoff({initial:?}, {max:?})");
    }
}

/// Many attempts at the cap cost exactly the cap each: the doubling never
/// overflows however many attempts came before.
#[tokio::test(start_paused = true)]
async fn retry_delay_stays_at_max_however_many_attempts() {
    // 99 waits, capped at 5 ms from the fourth: 1 + 2 + 4 + 96 * 5 ms.
    let attempts = Attempts::default();
    let seen = attempts.clone();
    let start = Instant::now();
    let out: Vec<usize> = stream::iter([0_usize])
        .try_par_imap_async(1, move |n| {
            let attempt = seen.start(n);
            async move {
                if attempt < 100 {
                    Err(anyhow::anyhow!("attempt {attempt}"))
                } else {
                    Ok(n)
                }
            }
        })
        .retry(Retry::attempts(100).backoff(ms(1), ms(5)).jitter(false))
        .try_collect()
        .await
        .unwrap();
    assert_eq!(out, [0]);
    assert_eq!(start.elapsed(), ms(487));
}

/// Uncapped (`max` = `Duration::MAX`), the wait before attempt `a + 1` is
/// `initial * 2^(a - 1)` for every `a`: it does not stop doubling at
/// `2^31 * initial`.
#[tokio::test(start_paused = true)]
async fn retry_delay_keeps_doubling_past_thirty_two_attempts_when_max_is_duration_max() {
    let attempts = Attempts::default();
    let seen = attempts.clone();
    let out: Vec<usize> = stream::iter([0_usize])
        .try_par_imap_async(1, move |n| {
            let attempt = seen.start(n);
            async move {
                if attempt < 35 {
                    Err(anyhow::anyhow!("attempt {attempt}"))
                } else {
                    Ok(n)
                }
            }
        })
        .retry(
            Retry::attempts(35)
                .backoff(ms(1), Duration::MAX)
                .jitter(false),
        )
        .try_collect()
        .await
        .unwrap();
    assert_eq!(out, [0]);
    let expected: Vec<Duration> = (0..34).map(|a| ms(1 << a)).collect();
    assert_eq!(attempts.gaps(0), expected);
}

#[tokio::test(start_paused = true)]
async fn retry_jitter_is_on_by_default_and_draws_each_wait_within_zero_and_the_delay() {
    let attempts = Attempts::default();
    let seen = attempts.clone();
    let out: Vec<usize> = stream::iter(0..20_usize)
        .try_par_imap_async(20, move |n| {
            let attempt = seen.start(n);
            async move {
                if attempt < 4 {
                    Err(anyhow::anyhow!("attempt {attempt}"))
                } else {
                    Ok(n)
                }
            }
        })
        .retry(Retry::attempts(4).backoff(ms(100), ms(100)))
        .try_collect()
        .await
        .unwrap();
    assert_eq!(out, (0..20).collect::<Vec<_>>());
    let gaps: Vec<Duration> = (0..20).flat_map(|n| attempts.gaps(n)).collect();
    assert_eq!(gaps.len(), 60);
    assert!(gaps.iter().all(|&gap| gap <= ms(100)), "{gaps:?}");
    // Full jitter: 60 draws never all land on the full delay.
    assert!(gaps.iter().any(|&gap| gap < ms(100)), "{gaps:?}");
}

/// When its wait ends, an item's retry starts before any item with a higher
/// index: limit 1, item 0 fails at 0 ms and may come back at 10 ms, while
/// items 1.. take 3 ms each; it runs when item 4 frees the call at 12 ms.
#[tokio::test(start_paused = true)]
async fn retry_starts_before_any_item_with_a_higher_index_once_its_wait_ends() {
    let attempts = Attempts::default();
    let seen = attempts.clone();
    let out: Vec<usize> = stream::iter(0..7_usize)
        .try_par_imap_async(1, move |n| {
            let attempt = seen.start(n);
            async move {
                if (n, attempt) == (0, 1) {
                    return Err(anyhow::anyhow!("item 0 fails first"));
                }
                tokio::time::sleep(ms(3)).await;
                Ok(n)
            }
        })
        .window(10)
        .retry(Retry::attempts(2).backoff(ms(10), ms(10)).jitter(false))
        .try_collect()
        .await
        .unwrap();
    assert_eq!(out, (0..7).collect::<Vec<_>>());
    assert_eq!(
        attempts.order(),
        [
            (0, 1),
            (1, 1),
            (2, 1),
            (3, 1),
            (4, 1),
            (0, 2),
            (5, 1),
            (6, 1)
        ]
    );
    assert_eq!(attempts.times(0), [ms(0), ms(12)]);
}

#[tokio::test(start_paused = true)]
async fn retry_unordered_yields_a_retried_item_when_its_retry_ends() {
    let attempts = Attempts::default();
    let seen = attempts.clone();
    let out: Vec<usize> = stream::iter(0..4_usize)
        .try_par_imap_async_unordered(4, move |n| {
            let attempt = seen.start(n);
            async move {
                if (n, attempt) == (0, 1) {
                    Err(anyhow::anyhow!("item 0 fails first"))
                } else {
                    Ok(n)
                }
            }
        })
        .retry(Retry::attempts(2).backoff(ms(10), ms(10)).jitter(false))
        .try_collect()
        .await
        .unwrap();
    assert_eq!(out.len(), 4);
    assert_eq!(out[3], 0, "item 0 comes last, after its wait: {out:?}");
    assert_eq!(attempts.of(0), 2);
}

/// An item that fails every attempt fails with its last attempt's error:
/// fail-fast yields the items before it, then that error, then ends.
#[tokio::test(start_paused = true)]
async fn retry_exhausted_fails_fast_with_the_last_attempts_error_after_the_items_before_it() {
    let attempts = Attempts::default();
    let seen = attempts.clone();
    let map = stream::iter(0..10_usize)
        .try_par_imap_async(3, move |n| {
            let attempt = seen.start(n);
            async move {
                if n == 4 {
                    Err(anyhow::anyhow!("item 4, attempt {attempt}"))
                } else {
                    Ok(n)
                }
            }
        })
        .retry(Retry::attempts(3).backoff(ms(100), ms(100)).jitter(false));
    let stats = map.stats();
    let out: Vec<anyhow::Result<usize>> = map.collect().await;
    assert_eq!(out.len(), 5, "{out:?}");
    for (n, result) in out[..4].iter().enumerate() {
        assert_eq!(*result.as_ref().unwrap(), n);
    }
    let error = out[4].as_ref().unwrap_err();
    assert_eq!(error.to_string(), "item 4, attempt 3");
    assert_eq!(attempts.of(4), 3);
    let snapshot = stats.snapshot();
    assert_eq!((snapshot.failed, snapshot.retried), (1, 2), "{snapshot:?}");

    // A plain variant: the last attempt's timeout, at the item's index.
    let attempts = Attempts::default();
    let seen = attempts.clone();
    let out: Vec<Result<usize, par_imap::Error>> = stream::iter(0..10_usize)
        .par_imap_async(3, move |n| {
            seen.start(n);
            async move {
                if n == 4 {
                    std::future::pending::<()>().await;
                }
                n
            }
        })
        .timeout(Duration::from_secs(1))
        .retry(Retry::attempts(3))
        .collect()
        .await;
    assert_eq!(out.len(), 5);
    assert!(out[..4].iter().all(Result::is_ok));
    let error = out[4].as_ref().unwrap_err();
    assert!(error.is_timeout() && error.index() == 4, "{error}");
    assert_eq!(attempts.of(4), 3);
}

#[tokio::test(start_paused = true)]
async fn retry_exhausted_with_keep_going_yields_the_last_error_at_its_place_and_goes_on() {
    let attempts = Attempts::default();
    let seen = attempts.clone();
    let map = stream::iter(0..10_usize)
        .try_par_imap_async(3, move |n| {
            let attempt = seen.start(n);
            async move {
                if n == 4 || (n == 7 && attempt == 1) {
                    Err(anyhow::anyhow!("item {n}, attempt {attempt}"))
                } else {
                    Ok(n)
                }
            }
        })
        .keep_going()
        .retry(Retry::attempts(3).backoff(ms(100), ms(100)).jitter(false));
    let stats = map.stats();
    let out: Vec<anyhow::Result<usize>> = map.collect().await;
    assert_eq!(out.len(), 10, "{out:?}");
    for (n, result) in out.iter().enumerate() {
        match result {
            Ok(value) => assert_eq!(*value, n),
            Err(error) => {
                assert_eq!(n, 4, "{error}");
                assert_eq!(error.to_string(), "item 4, attempt 3");
            }
        }
    }
    assert!(out[4].is_err());
    assert_eq!((attempts.of(4), attempts.of(7)), (3, 2));
    let snapshot = stats.snapshot();
    assert_eq!((snapshot.failed, snapshot.retried), (1, 3), "{snapshot:?}");
    assert_eq!(snapshot.yielded, 10);
}

/// After a failure at `j`, the retries of items before `j` still run (an
/// ordered map owes them); the retries of items after it are dropped.
#[tokio::test(start_paused = true)]
async fn retry_after_a_failure_still_retries_earlier_items_and_drops_later_retries() {
    let counts = Arc::new(Counts::default());
    let attempts = Attempts::default();
    let seen = attempts.clone();
    let items: Vec<Counted> = (0..8).map(|n| counts.item(n)).collect();
    let mut map = stream::iter(items)
        .try_par_imap_async(8, move |item: Counted| {
            let n = item.value;
            let attempt = seen.start(n);
            async move {
                match (n, attempt) {
                    (1 | 5, 1) => Err(anyhow::anyhow!("item {n}: transient")),
                    (3, _) => Err(anyhow::anyhow!("item 3: fatal")),
                    _ => Ok(item.value),
                }
            }
        })
        .retry(
            Retry::attempts(3)
                .backoff(HOUR, HOUR)
                .jitter(false)
                .when(|error: &anyhow::Error| !error.to_string().contains("fatal")),
        );
    let start = Instant::now();
    for n in 0..3 {
        assert_eq!(map.next().await.unwrap().unwrap(), n);
    }
    assert_eq!(
        start.elapsed(),
        HOUR,
        "item 1 was tried again after its wait"
    );
    let error = map.next().await.unwrap().unwrap_err();
    assert_eq!(error.to_string(), "item 3: fatal");
    assert!(map.next().await.is_none());
    assert_eq!(attempts.of(1), 2);
    assert_eq!(attempts.of(3), 1, "`.when` said no: not tried again");
    assert!(attempts.of(5) <= 1, "item 5's retry is dropped");
    drop(map);
    counts.all_dropped().await;
}

#[tokio::test(start_paused = true)]
async fn retry_when_false_fails_the_item_after_one_attempt() {
    let attempts = Attempts::default();
    let seen = attempts.clone();
    let out: Vec<anyhow::Result<usize>> = stream::iter(0..4_usize)
        .try_par_imap_async(4, move |n| {
            let attempt = seen.start(n);
            async move {
                match (n, attempt) {
                    (1, 1) => Err(anyhow::anyhow!("transient")),
                    (2, _) => Err(anyhow::anyhow!("permanent")),
                    _ => Ok(n),
                }
            }
        })
        .keep_going()
        .retry(Retry::attempts(5).when(|error: &anyhow::Error| error.to_string() != "permanent"))
        .collect()
        .await;
    assert_eq!(*out[0].as_ref().unwrap(), 0);
    assert_eq!(*out[1].as_ref().unwrap(), 1);
    assert_eq!(out[2].as_ref().unwrap_err().to_string(), "permanent");
    assert_eq!(*out[3].as_ref().unwrap(), 3);
    assert_eq!((attempts.of(1), attempts.of(2)), (2, 1));
}

/// `.when` sees a timeout as `E::from(par_imap::Error)`, and decides.
#[tokio::test(start_paused = true)]
async fn retry_when_sees_a_timeout_as_the_streams_error() {
    for retry_timeouts in [true, false] {
        let attempts = Attempts::default();
        let seen = attempts.clone();
        let shown = Arc::new(Mutex::new(Vec::new()));
        let record = shown.clone();
        let out: Vec<anyhow::Result<usize>> = stream::iter(0..2_usize)
            .try_par_imap_async(2, move |n| {
                let attempt = seen.start(n);
                async move {
                    if (n, attempt) == (1, 1) {
                        tokio::time::sleep(HOUR).await;
                    }
                    Ok::<_, anyhow::Error>(n)
                }
            })
            .timeout(Duration::from_secs(1))
            .retry(Retry::attempts(2).when(move |error: &anyhow::Error| {
                let error = error.downcast_ref::<par_imap::Error>();
                record
                    .lock()
                    .unwrap()
                    .push(error.map(|e| (e.is_timeout(), e.index())));
                retry_timeouts
            }))
            .collect()
            .await;
        assert_eq!(*shown.lock().unwrap(), [Some((true, 1))]);
        assert_eq!(*out[0].as_ref().unwrap(), 0);
        if retry_timeouts {
            assert_eq!(*out[1].as_ref().unwrap(), 1);
            assert_eq!(attempts.of(1), 2);
        } else {
            let error = out[1].as_ref().unwrap_err();
            let error = error.downcast_ref::<par_imap::Error>().unwrap();
            assert!(error.is_timeout() && error.index() == 1, "{error}");
            assert_eq!(attempts.of(1), 1);
        }
    }
}

/// A panic fails its item at once, unless `.retry_panics()`; `.when` sees
/// it as a `par_imap::Error` with `is_panic()`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_retries_panics_only_with_retry_panics() {
    for blocking in [true, false] {
        for (retry_panics, when_accepts) in [(false, true), (true, true), (true, false)] {
            let attempts = Attempts::default();
            let seen = attempts.clone();
            let mut retry = Retry::attempts(3).when(move |error: &par_imap::Error| {
                assert!(error.is_panic(), "{error}");
                when_accepts
            });
            if retry_panics {
                retry = retry.retry_panics();
            }
            let out: Vec<Result<usize, par_imap::Error>> = if blocking {
                stream::iter(0..3_usize)
                    .par_imap(2, move |n| {
                        let attempt = seen.start(n);
                        assert!((n, attempt) != (1, 1), "item 1 panics once");
                        n
                    })
                    .retry(retry)
                    .collect()
                    .await
            } else {
                stream::iter(0..3_usize)
                    .par_imap_async(2, move |n| {
                        let attempt = seen.start(n);
                        async move {
                            assert!((n, attempt) != (1, 1), "item 1 panics once");
                            n
                        }
                    })
                    .retry(retry)
                    .collect()
                    .await
            };
            let case =
                format!("blocking {blocking}, retry_panics {retry_panics}, when {when_accepts}");
            if retry_panics && when_accepts {
                let out: Vec<usize> = out.into_iter().map(Result::unwrap).collect();
                assert_eq!(out, [0, 1, 2], "{case}");
                assert_eq!(attempts.of(1), 2, "{case}");
            } else {
                assert_eq!(out.len(), 2, "{case}: {out:?}");
                let error = out[1].as_ref().unwrap_err();
                assert!(error.is_panic() && error.index() == 1, "{case}: {error}");
                assert!(error.to_string().contains("item 1 panics once"), "{error}");
                assert_eq!(attempts.of(1), 1, "{case}");
            }
        }
    }
}

/// A timed-out blocking attempt keeps its thread until it returns (threads
/// cannot be killed); its retry starts only after that, though a worker is
/// free for it all along.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_of_a_timed_out_blocking_attempt_starts_after_its_thread_returns() {
    let events = Arc::new(Mutex::new(Vec::new()));
    let record = events.clone();
    let attempts = Attempts::default();
    let seen = attempts.clone();
    let out: Vec<usize> = stream::iter([0_usize])
        .par_imap(2, move |n| {
            if seen.start(n) == 1 {
                common::eventually("attempt 1 to time out", par_imap::is_cancelled);
                // Long enough that a retry started at the timeout would
                // start before this returns.
                std::thread::sleep(ms(50));
                record.lock().unwrap().push("attempt 1 returns");
            } else {
                record.lock().unwrap().push("attempt 2 starts");
            }
            n
        })
        .timeout(ms(20))
        .retry(Retry::attempts(2))
        .try_collect()
        .await
        .unwrap();
    assert_eq!(out, [0]);
    assert_eq!(
        *events.lock().unwrap(),
        ["attempt 1 returns", "attempt 2 starts"]
    );
}

/// Every attempt but the last maps a clone, the last the original, and
/// every value (originals and clones) is dropped exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_maps_a_clone_on_every_attempt_but_the_last_and_drops_each_value_once() {
    for blocking in [true, false] {
        let counts = Arc::new(Counts::default());
        let got = Arc::new(Mutex::new(Vec::new()));
        let record = got.clone();
        let attempts = Attempts::default();
        let seen = attempts.clone();
        // Item n fails its first n attempts: 0 succeeds on its first, 1 on
        // its second, 2 on its third (the last), 3 never.
        let mapper = move |item: Counted| {
            let attempt = seen.start(item.value);
            record
                .lock()
                .unwrap()
                .push((item.value, attempt, item.original));
            if attempt as usize <= item.value {
                Err(anyhow::anyhow!("item {}, attempt {attempt}", item.value))
            } else {
                Ok(item.value)
            }
        };
        let items: Vec<Counted> = (0..4).map(|n| counts.item(n)).collect();
        let retry = Retry::attempts(3);
        let out: Vec<anyhow::Result<usize>> = if blocking {
            stream::iter(items)
                .try_par_imap(2, mapper)
                .keep_going()
                .retry(retry)
                .collect()
                .await
        } else {
            stream::iter(items)
                .try_par_imap_async(2, move |item| std::future::ready(mapper(item)))
                .keep_going()
                .retry(retry)
                .collect()
                .await
        };
        assert_eq!(out.len(), 4);
        assert!(out[..3].iter().all(Result::is_ok), "{out:?}");
        assert_eq!(
            out[3].as_ref().unwrap_err().to_string(),
            "item 3, attempt 3"
        );
        let mut got = got.lock().unwrap().clone();
        got.sort_unstable();
        assert_eq!(
            got,
            [
                (0, 1, false),
                (1, 1, false),
                (1, 2, false),
                (2, 1, false),
                (2, 2, false),
                (2, 3, true),
                (3, 1, false),
                (3, 2, false),
                (3, 3, true),
            ],
            "blocking: {blocking}"
        );
        assert_eq!(counts.clones(), 7);
        counts.all_dropped().await;
    }
}

/// Cancelling the token while an item waits in backoff ends the map at
/// once, with one cancellation error at the lowest index not yielded, and
/// drops the waiting item; dropping the map drops it too.
#[tokio::test(start_paused = true)]
async fn retry_cancel_or_drop_during_backoff_ends_the_map_at_once_and_drops_the_waiting_item() {
    for cancel in [true, false] {
        let counts = Arc::new(Counts::default());
        let attempts = Attempts::default();
        let seen = attempts.clone();
        let token = CancellationToken::new();
        let items: Vec<Counted> = (0..3).map(|n| counts.item(n)).collect();
        let mut map = stream::iter(items)
            .try_par_imap_async(3, move |item: Counted| {
                let attempt = seen.start(item.value);
                async move {
                    if (item.value, attempt) == (1, 1) {
                        Err(anyhow::anyhow!("item 1 fails first"))
                    } else {
                        Ok(item.value)
                    }
                }
            })
            .cancel_token(token.clone())
            .retry(Retry::attempts(3).backoff(HOUR, HOUR).jitter(false));
        let stats = map.stats();
        let start = Instant::now();
        assert_eq!(map.next().await.unwrap().unwrap(), 0);
        pending_until(&mut map, "item 1 to wait", || {
            let snapshot = stats.snapshot();
            snapshot.waiting == 1 && snapshot.completed == 3
        })
        .await;
        if cancel {
            let canceller = token.clone();
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_secs(1)).await;
                canceller.cancel();
            });
            let error = map.next().await.unwrap().unwrap_err();
            let error = error.downcast_ref::<par_imap::Error>().unwrap();
            assert!(error.is_cancelled() && error.index() == 1, "{error}");
            assert_eq!(start.elapsed(), Duration::from_secs(1), "at once");
            assert_eq!(counts.alive(), 0, "the waiting item is dropped");
            assert!(map.next().await.is_none());
            assert_eq!(stats.snapshot().waiting, 0);
        } else {
            drop(map);
            assert_eq!(counts.alive(), 0, "the waiting item is dropped");
            assert!(!token.is_cancelled());
        }
        assert_eq!(attempts.of(1), 1, "never tried again");
        // Three originals, and a clone for each first attempt (of three).
        assert_eq!(counts.created.load(Ordering::SeqCst), 6);
        counts.all_dropped().await;
    }
}

/// The still-wanted rule ends a wait whether or not anyone polls the map:
/// a cancelled token drops the waiting item without the map's next poll.
#[tokio::test(start_paused = true)]
async fn retry_cancel_during_backoff_drops_the_waiting_item_without_a_poll() {
    let counts = Arc::new(Counts::default());
    let token = CancellationToken::new();
    let attempts = Attempts::default();
    let seen = attempts.clone();
    let mut map = stream::iter([counts.item(0)])
        .try_par_imap_async(1, move |item: Counted| {
            let attempt = seen.start(item.value);
            async move {
                if attempt == 1 {
                    Err(anyhow::anyhow!("first attempt"))
                } else {
                    Ok(item.value)
                }
            }
        })
        .cancel_token(token.clone())
        .retry(Retry::attempts(2).backoff(HOUR, HOUR).jitter(false));
    let stats = map.stats();
    pending_until(&mut map, "item 0 to wait", || stats.snapshot().waiting == 1).await;
    assert_eq!(counts.alive(), 1);
    token.cancel();
    for _ in 0..1_000 {
        if counts.alive() == 0 {
            break;
        }
        tokio::task::yield_now().await;
    }
    assert_eq!(counts.alive(), 0, "dropped, polled or not");
    let error = map.next().await.unwrap().unwrap_err();
    assert!(
        error
            .downcast_ref::<par_imap::Error>()
            .is_some_and(par_imap::Error::is_cancelled),
        "{error}"
    );
    assert_eq!(attempts.of(0), 1);
}

/// With `.key_order`, an item's key stays busy through its backoff: a
/// later item of that key starts only after the retry has succeeded, while
/// other keys go on.
#[tokio::test(start_paused = true)]
async fn retry_key_stays_busy_through_the_backoff_async() {
    let attempts = Attempts::default();
    let seen = attempts.clone();
    let items = [(0, 'a'), (1, 'a'), (2, 'b')];
    let mut map = stream::iter(items)
        .try_par_imap_async(3, move |(n, _key): (usize, char)| {
            let attempt = seen.start(n);
            async move {
                if (n, attempt) == (0, 1) {
                    Err(anyhow::anyhow!("item 0 fails first"))
                } else {
                    Ok(n)
                }
            }
        })
        .key_order(|&(_, key)| key)
        .retry(
            Retry::attempts(2)
                .backoff(ms(1_000), ms(1_000))
                .jitter(false),
        );
    let stats = map.stats();
    pending_until(&mut map, "item 0 to wait, item 2 to overtake", || {
        attempts.of(2) == 1 && stats.snapshot().waiting == 2
    })
    .await;
    assert_eq!(attempts.of(1), 0, "key 'a' is busy through item 0's wait");
    assert_eq!(stats.snapshot().in_flight, 0);
    let out: Vec<usize> = bounded("the map to end", HOUR, map.try_collect())
        .await
        .unwrap();
    assert_eq!(out, [0, 1, 2]);
    let order = attempts.order();
    let at = |attempt| order.iter().position(|&seen| seen == attempt).unwrap();
    assert!(at((1, 1)) > at((0, 2)), "{order:?}");
    assert_eq!(attempts.times(1), [ms(1_000)]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_key_stays_busy_through_the_backoff_blocking() {
    let events = Arc::new(Mutex::new(Vec::new()));
    let record = events.clone();
    let attempts = Attempts::default();
    let seen = attempts.clone();
    let items = [(0, 'a'), (1, 'a'), (2, 'b')];
    let map = stream::iter(items)
        .try_par_imap(3, move |(n, _key): (usize, char)| {
            let attempt = seen.start(n);
            record.lock().unwrap().push((n, attempt, "start"));
            let result = if (n, attempt) == (0, 1) {
                Err(anyhow::anyhow!("item 0 fails first"))
            } else {
                Ok(n)
            };
            record.lock().unwrap().push((n, attempt, "end"));
            result
        })
        .key_order(|&(_, key)| key)
        // Real time: a free key would let item 1 start well within it.
        .retry(Retry::attempts(2).backoff(ms(30), ms(30)).jitter(false));
    let out: Vec<usize> = bounded("the map to end", common::hang(), map.try_collect())
        .await
        .unwrap();
    assert_eq!(out, [0, 1, 2]);
    let events = events.lock().unwrap().clone();
    let at = |event| events.iter().position(|&seen| seen == event).unwrap();
    assert!(at((1, 1, "start")) > at((0, 2, "end")), "{events:?}");
    assert_eq!(attempts.of(1), 1);
}

#[tokio::test]
async fn retry_after_the_first_poll_panics() {
    let mut map = stream::iter(0..3_usize).par_imap_async(2, |n| async move { n });
    assert_eq!(map.next().await.unwrap().unwrap(), 0);
    let late = std::panic::catch_unwind(AssertUnwindSafe(move || map.retry(Retry::attempts(2))));
    assert!(late.is_err());
}

#[test]
#[should_panic(expected = "`attempts`")]
fn retry_zero_attempts_panics_naming_attempts() {
    let _: Retry = Retry::attempts(0);
}

#[test]
#[should_panic(expected = "`initial`")]
fn retry_backoff_initial_above_max_panics_naming_initial() {
    let _: Retry = Retry::attempts(2).backoff(ms(2), ms(1));
}

/// `Duration::MAX` is accepted; every variant takes a `Retry` of its
/// stream's error type: `par_imap::Error` for the plain ones (the default),
/// the mapper's error for the `try_` ones.
#[test]
fn retry_takes_the_streams_error_type_and_accepts_duration_max() {
    let huge: Retry = Retry::attempts(u32::MAX)
        .backoff(Duration::MAX, Duration::MAX)
        .jitter(true);
    let _: Retry = Retry::attempts(1).backoff(Duration::ZERO, Duration::MAX);
    let plain = || {
        Retry::attempts(2)
            .when(|error: &par_imap::Error| error.is_timeout())
            .retry_panics()
    };
    drop(stream::iter([1]).par_imap(1, |n: i32| n).retry(huge));
    drop(
        stream::iter([1])
            .par_imap_unordered(1, |n: i32| n)
            .retry(plain()),
    );
    drop(
        stream::iter([1])
            .par_imap_async(1, |n: i32| async move { n })
            .retry(plain()),
    );
    drop(
        stream::iter([1])
            .par_imap_async_unordered(1, |n: i32| async move { n })
            .retry(plain()),
    );
    drop(
        stream::iter([1])
            .par_imap_init(1, || 0, |state: &mut i32, n: i32| *state + n)
            .retry(plain()),
    );
    let io = || {
        Retry::attempts(2)
            .when(|error: &std::io::Error| error.kind() == std::io::ErrorKind::TimedOut)
    };
    drop(
        stream::iter([1])
            .try_par_imap(1, |n: i32| Ok::<_, std::io::Error>(n))
            .retry(io()),
    );
    drop(
        stream::iter([1])
            .try_par_imap_unordered(1, |n: i32| Ok::<_, std::io::Error>(n))
            .retry(io()),
    );
    drop(
        stream::iter([1])
            .try_par_imap_async(1, |n: i32| async move { Ok::<_, anyhow::Error>(n) })
            .retry(Retry::<anyhow::Error>::attempts(2)),
    );
    drop(
        stream::iter([1])
            .try_par_imap_async_unordered(1, |n: i32| async move { Ok::<_, par_imap::Error>(n) })
            .retry(plain()),
    );
}
