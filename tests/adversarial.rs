//! Adversarial tests against DESIGN.md: error kinds through the map, retry
//! with fail-fast / keep_going / timeouts, work stealing with panics,
//! timeouts and stats, and compositions.
mod common;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{Calls, Gates, OpenOnDrop, Tracker, eventually, hang};
use futures::{StreamExt, stream};
use par_imap::{ParImapExt, Retry};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

/// Waits (blocking thread, bounded) until `is_cancelled()`; returns it.
fn wait_cancelled() -> bool {
    let deadline = Instant::now() + hang();
    while !par_imap::is_cancelled() {
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    true
}

async fn bounded<F: std::future::Future>(what: &str, f: F) -> F::Output {
    tokio::time::timeout(hang(), f)
        .await
        .unwrap_or_else(|_| panic!("hung: {what}"))
}

/// A value that counts live copies; `Clone` counts too.
#[derive(Debug)]
struct Counted {
    n: usize,
    alive: Arc<AtomicUsize>,
}

impl Counted {
    fn new(n: usize, alive: &Arc<AtomicUsize>) -> Self {
        alive.fetch_add(1, Ordering::SeqCst);
        Counted {
            n,
            alive: Arc::clone(alive),
        }
    }
}

impl Clone for Counted {
    fn clone(&self) -> Self {
        Counted::new(self.n, &self.alive)
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        self.alive.fetch_sub(1, Ordering::SeqCst);
    }
}

#[derive(Debug)]
enum MyErr {
    Map(par_imap::Error),
    Mine(usize),
}

impl From<par_imap::Error> for MyErr {
    fn from(e: par_imap::Error) -> Self {
        MyErr::Map(e)
    }
}

// ---------------------------------------------------------------- errors

#[tokio::test(start_paused = true)]
async fn error_timeout_from_the_map_has_its_index_display_kind_and_survives_try_into_panic() {
    let results: Vec<_> = stream::iter(0..3u64)
        .par_imap_async(3, |n| async move {
            if n == 2 {
                std::future::pending::<()>().await;
            }
            n
        })
        .timeout(Duration::from_secs(1))
        .collect()
        .await;
    assert_eq!(results.len(), 3, "{results:?}");
    let mut results = results.into_iter();
    assert_eq!(results.next().unwrap().unwrap(), 0);
    assert_eq!(results.next().unwrap().unwrap(), 1);
    let error = results.next().unwrap().unwrap_err();
    assert_eq!(error.index(), 2);
    assert!(error.is_timeout() && !error.is_panic() && !error.is_cancelled());
    assert_eq!(error.to_string(), "item 2 timed out");
    assert!(format!("{error:?}").contains("index: 2"), "{error:?}");
    let error = error.try_into_panic().unwrap_err();
    assert_eq!(error.index(), 2);
    assert!(error.is_timeout());
    assert_eq!(error.to_string(), "item 2 timed out");
    let io: std::io::Error = error.into();
    assert_eq!(io.kind(), std::io::ErrorKind::TimedOut);
    let inner = io
        .get_ref()
        .unwrap()
        .downcast_ref::<par_imap::Error>()
        .unwrap();
    assert_eq!(inner.index(), 2);
    assert!(inner.is_timeout());
}

#[tokio::test(flavor = "current_thread")]
async fn error_cancelled_by_a_closed_budget_has_its_index_display_and_kind() {
    let budget = Arc::new(Semaphore::new(1));
    let b = Arc::clone(&budget);
    let mut map = stream::iter(0..5u64)
        .par_imap_async(1, move |n| {
            let b = Arc::clone(&b);
            async move {
                if n == 2 {
                    b.close();
                }
                n
            }
        })
        .semaphore(Arc::clone(&budget));
    let mut got = Vec::new();
    while let Some(r) = bounded("closed budget", map.next()).await {
        got.push(r);
    }
    // Items 0, 1 Ok; item 2 may or may not be delivered (it closed the budget
    // while running); then one cancelled error at the lowest unyielded index.
    let last = got.pop().unwrap().unwrap_err();
    for (i, r) in got.iter().enumerate() {
        assert_eq!(*r.as_ref().unwrap(), i as u64);
    }
    assert!(
        last.is_cancelled() && !last.is_panic() && !last.is_timeout(),
        "{last:?}"
    );
    assert_eq!(last.index(), got.len());
    assert_eq!(last.to_string(), format!("item {} cancelled", got.len()));
    let back = last.try_into_panic().unwrap_err();
    assert!(back.is_cancelled());
    assert_eq!(back.index(), got.len());
    let io: std::io::Error = back.into();
    assert_eq!(io.kind(), std::io::ErrorKind::Other);
}

#[tokio::test(flavor = "current_thread")]
async fn error_panic_payloads_of_every_shape() {
    let results: Vec<_> = stream::iter(0..4u64)
        .par_imap(2, |n| -> u64 {
            match n {
                0 => std::panic::panic_any(7_u32),
                1 => panic!("formatted {}", n),
                2 => panic!("static"),
                _ => std::panic::panic_any(Box::new(5_i8) as Box<dyn std::any::Any + Send>),
            }
        })
        .keep_going()
        .collect()
        .await;
    let errors: Vec<par_imap::Error> = results.into_iter().map(|r| r.unwrap_err()).collect();
    assert_eq!(errors.len(), 4);
    for (i, e) in errors.iter().enumerate() {
        assert_eq!(e.index(), i);
        assert!(e.is_panic() && !e.is_timeout() && !e.is_cancelled());
    }
    assert_eq!(errors[0].to_string(), "item 0 panicked");
    assert_eq!(errors[1].to_string(), "item 1 panicked: formatted 1");
    assert_eq!(errors[2].to_string(), "item 2 panicked: static");
    assert_eq!(errors[3].to_string(), "item 3 panicked");
    let mut errors = errors.into_iter();
    let p0 = errors.next().unwrap().into_panic();
    assert_eq!(p0.downcast_ref::<u32>(), Some(&7));
    let p1 = errors.next().unwrap().try_into_panic().unwrap();
    assert_eq!(
        p1.downcast_ref::<String>().map(String::as_str),
        Some("formatted 1")
    );
}

#[tokio::test(start_paused = true)]
async fn error_into_panic_on_a_timeout_panics_naming_the_error() {
    let error = stream::iter([0u64])
        .par_imap_async(1, |n| async move {
            std::future::pending::<()>().await;
            n
        })
        .timeout(Duration::from_millis(5))
        .next()
        .await
        .unwrap()
        .unwrap_err();
    let caught = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| error.into_panic()));
    let payload = caught.expect_err("into_panic on a timeout must panic");
    let message = payload
        .downcast_ref::<String>()
        .cloned()
        .unwrap_or_default();
    assert!(message.contains("item 0 timed out"), "{message}");
}

// ---------------------------------------------------------------- retry

/// Blocking, ordered, fail-fast: item 0's first attempt times out and its
/// thread returns only after item 1 failed for good; the retry of item 0
/// still runs (item 0 is below the failure), then the failure of item 1.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_blocking_timed_out_attempt_below_a_later_failure_is_still_retried() {
    let alive = Arc::new(AtomicUsize::new(0));
    let one_failed = Arc::new(AtomicBool::new(false));
    let attempts0 = Arc::new(AtomicUsize::new(0));
    let (f, a0) = (Arc::clone(&one_failed), Arc::clone(&attempts0));
    let items: Vec<Counted> = (0..2).map(|n| Counted::new(n, &alive)).collect();
    let map = stream::iter(items)
        .try_par_imap(2, move |c: Counted| -> Result<usize, MyErr> {
            if c.n == 1 {
                f.store(true, Ordering::SeqCst);
                return Err(MyErr::Mine(1));
            }
            if a0.fetch_add(1, Ordering::SeqCst) == 0 {
                assert!(
                    wait_cancelled(),
                    "the timed-out attempt never saw is_cancelled"
                );
                eventually("flag set", || f.load(Ordering::SeqCst));
                std::thread::sleep(Duration::from_millis(20));
            }
            Ok(c.n)
        })
        .timeout(Duration::from_millis(50))
        .retry(
            Retry::attempts(2)
                .jitter(false)
                .when(|e: &MyErr| matches!(e, MyErr::Map(e) if e.is_timeout())),
        );
    let stats = map.stats();
    let results: Vec<_> = bounded("retry", map.collect::<Vec<_>>()).await;
    assert_eq!(results.len(), 2, "{results:?}");
    assert_eq!(*results[0].as_ref().unwrap(), 0);
    assert!(matches!(results[1], Err(MyErr::Mine(1))), "{results:?}");
    assert_eq!(attempts0.load(Ordering::SeqCst), 2);
    let snap = stats.snapshot();
    assert_eq!(snap.retried, 1, "{snap:?}");
    assert_eq!(snap.failed, 1, "{snap:?}");
    assert_eq!(snap.yielded, 2, "{snap:?}");
    assert_eq!(alive.load(Ordering::SeqCst), 0, "every value dropped");
}

/// Unordered fail-fast: item 1 fails for good while item 0 waits in a
/// long backoff: the retry of item 0 is dropped at once (unpolled), only
/// the failure is yielded, and every value is dropped exactly once.
#[tokio::test(start_paused = true)]
async fn retry_unordered_failure_drops_a_waiting_retry_and_yields_only_the_failure() {
    let alive = Arc::new(AtomicUsize::new(0));
    let calls = Arc::new(Mutex::new(Vec::new()));
    let (tx1, rx1) = tokio::sync::oneshot::channel::<()>();
    let rx1 = Arc::new(Mutex::new(Some(rx1)));
    let c = Arc::clone(&calls);
    let items: Vec<Counted> = (0..2).map(|n| Counted::new(n, &alive)).collect();
    let mut map = stream::iter(items)
        .try_par_imap_async_unordered(2, move |item: Counted| {
            let c = Arc::clone(&c);
            let rx = if item.n == 1 {
                rx1.lock().unwrap().take()
            } else {
                None
            };
            async move {
                c.lock().unwrap().push(item.n);
                if item.n == 0 {
                    return Err::<usize, MyErr>(MyErr::Mine(0));
                }
                if let Some(rx) = rx {
                    let _ = rx.await;
                }
                Err(MyErr::Mine(100))
            }
        })
        .retry(
            Retry::attempts(3)
                .backoff(Duration::from_secs(3600), Duration::from_secs(3600))
                .jitter(false)
                .when(|e: &MyErr| matches!(e, MyErr::Mine(0))),
        );
    let stats = map.stats();
    // Poll until item 0 failed its first attempt and waits.
    for _ in 0..50 {
        assert!(futures::poll!(map.next()).is_pending());
        tokio::task::yield_now().await;
        if stats.snapshot().waiting == 1 {
            break;
        }
    }
    assert_eq!(stats.snapshot().waiting, 1, "{:?}", stats.snapshot());
    tx1.send(()).unwrap();
    let first = bounded("failure", map.next()).await.unwrap();
    assert!(matches!(first, Err(MyErr::Mine(100))), "{first:?}");
    assert!(map.next().await.is_none());
    assert_eq!(*calls.lock().unwrap(), [0, 1], "item 0 never retried");
    assert_eq!(alive.load(Ordering::SeqCst), 0);
    let snap = stats.snapshot();
    assert_eq!(
        (snap.failed, snap.retried, snap.waiting),
        (1, 0, 0),
        "{snap:?}"
    );
}

/// keep_going + key_order + timeout + retry, async: key A's item 0 times
/// out on its first attempt and succeeds on its second; key A's item 2
/// must be mapped only after item 0's last attempt; item 1 (key B) fails
/// for good, yielded at its place.
#[tokio::test(start_paused = true)]
async fn retry_keep_going_key_order_timeouts_async() {
    let log = Arc::new(Mutex::new(Vec::<(usize, &'static str)>::new()));
    let attempts0 = Arc::new(AtomicUsize::new(0));
    let (l, a0) = (Arc::clone(&log), Arc::clone(&attempts0));
    let map = stream::iter([(0usize, 'A'), (1, 'B'), (2, 'A'), (3, 'B')])
        .try_par_imap_async(4, move |(n, _k): (usize, char)| {
            let l = Arc::clone(&l);
            let first0 = n == 0 && a0.fetch_add(1, Ordering::SeqCst) == 0;
            async move {
                l.lock().unwrap().push((n, "start"));
                if first0 {
                    std::future::pending::<()>().await;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
                l.lock().unwrap().push((n, "end"));
                if n == 1 {
                    return Err(MyErr::Mine(1));
                }
                Ok::<usize, MyErr>(n)
            }
        })
        .key_order(|(_, k): &(usize, char)| *k)
        .timeout(Duration::from_millis(100))
        .keep_going()
        .retry(
            Retry::attempts(2)
                .backoff(Duration::from_millis(5), Duration::from_millis(5))
                .jitter(false)
                .when(|e: &MyErr| matches!(e, MyErr::Map(e) if e.is_timeout())),
        );
    let stats = map.stats();
    let results: Vec<_> = bounded("keyed retry", map.collect::<Vec<_>>()).await;
    assert_eq!(results.len(), 4, "{results:?}");
    assert_eq!(*results[0].as_ref().unwrap(), 0);
    assert!(matches!(results[1], Err(MyErr::Mine(1))), "{results:?}");
    assert_eq!(*results[2].as_ref().unwrap(), 2);
    assert_eq!(*results[3].as_ref().unwrap(), 3);
    let log = log.lock().unwrap().clone();
    let end0 = log.iter().position(|e| *e == (0, "end")).unwrap();
    let start2 = log.iter().position(|e| *e == (2, "start")).unwrap();
    assert!(
        end0 < start2,
        "item 2 of key A started before item 0's last attempt ended: {log:?}"
    );
    let end1 = log.iter().position(|e| *e == (1, "end")).unwrap();
    let start3 = log.iter().position(|e| *e == (3, "start")).unwrap();
    assert!(end1 < start3, "{log:?}");
    let snap = stats.snapshot();
    assert_eq!(snap.retried, 1, "{snap:?}");
    assert_eq!(snap.failed, 1, "{snap:?}");
    assert_eq!(snap.started, 5, "{snap:?}");
    assert_eq!(snap.completed, 5, "{snap:?}");
    assert_eq!(
        (snap.in_flight, snap.waiting, snap.yielded, snap.pulled),
        (0, 0, 4, 4),
        "{snap:?}"
    );
}

/// Blocking retry with keep_going and a panic retried: each attempt of
/// item 1 panics, the last one's error is yielded at its place.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_blocking_keep_going_retried_panic_yields_the_last_attempts_panic() {
    let attempts = Arc::new(AtomicUsize::new(0));
    let a = Arc::clone(&attempts);
    let map = stream::iter(0..4u64)
        .par_imap(2, move |n| {
            if n == 1 {
                let k = a.fetch_add(1, Ordering::SeqCst);
                panic!("attempt {k}");
            }
            n
        })
        .keep_going()
        .retry(Retry::attempts(3).retry_panics().jitter(false));
    let stats = map.stats();
    let results: Vec<_> = bounded("retry panics", map.collect::<Vec<_>>()).await;
    assert_eq!(results.len(), 4);
    let e = results[1].as_ref().unwrap_err();
    assert!(e.is_panic());
    assert_eq!(e.index(), 1);
    assert_eq!(e.to_string(), "item 1 panicked: attempt 2");
    for i in [0, 2, 3] {
        assert_eq!(*results[i].as_ref().unwrap(), i as u64);
    }
    let snap = stats.snapshot();
    assert_eq!(
        (snap.retried, snap.failed, snap.started, snap.completed),
        (2, 1, 6, 6),
        "{snap:?}"
    );
}

// ---------------------------------------------------------------- stealing

/// Ordered, fail-fast, fixed batch: item 1 hangs until item 2 (its call
/// mate, so taken by a thief) has panicked; the consumer gets 0, 1, then
/// item 2's panic, then the end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn steal_panic_right_after_a_slow_item_in_the_same_call_ordered() {
    let two_ran = Arc::new(AtomicBool::new(false));
    let t = Arc::clone(&two_ran);
    let results: Vec<_> = bounded(
        "steal panic",
        stream::iter(0..8u64)
            .par_imap(2, move |n| {
                if n == 1 {
                    eventually("flag set", || t.load(Ordering::SeqCst));
                }
                if n == 2 {
                    t.store(true, Ordering::SeqCst);
                    panic!("two");
                }
                n
            })
            .batch(8)
            .collect::<Vec<_>>(),
    )
    .await;
    assert_eq!(results.len(), 3, "{results:?}");
    assert_eq!(*results[0].as_ref().unwrap(), 0);
    assert_eq!(*results[1].as_ref().unwrap(), 1);
    let e = results[2].as_ref().unwrap_err();
    assert!(e.is_panic() && e.index() == 2, "{e:?}");
}

/// Unordered fail-fast: item 1 hangs until cancelled; item 2 (stolen)
/// panics; item 1 sees `is_cancelled()`, the consumer gets the panic and
/// the end, and nothing else that was after the panic.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn steal_panic_after_a_hung_item_unordered_cancels_the_hung_one() {
    let saw = Arc::new(AtomicBool::new(false));
    let s = Arc::clone(&saw);
    let tracker = Tracker::default();
    let tr = tracker.clone();
    let results: Vec<_> = bounded(
        "steal panic unordered",
        stream::iter((0..8).map(move |n| tr.track(n)))
            .par_imap_unordered(2, move |t| {
                if t.value == 1 {
                    s.store(wait_cancelled(), Ordering::SeqCst);
                }
                if t.value == 2 {
                    panic!("two");
                }
                t
            })
            .batch(8)
            .collect::<Vec<_>>(),
    )
    .await;
    let errors: Vec<_> = results.iter().filter_map(|r| r.as_ref().err()).collect();
    assert_eq!(errors.len(), 1, "{results:?}");
    assert!(errors[0].is_panic() && errors[0].index() == 2);
    assert!(
        results.last().unwrap().is_err(),
        "the failure is the last item: {results:?}"
    );
    let oks: Vec<usize> = results
        .iter()
        .filter_map(|r| r.as_ref().ok().map(|t| t.value))
        .collect();
    assert!(!oks.contains(&1), "{oks:?}");
    drop(results);
    tracker.wait_all_dropped();
    assert!(
        saw.load(Ordering::SeqCst),
        "the hung item never saw is_cancelled"
    );
}

/// keep_going + per-item timeout + stealing: items 0 and 5 of one fixed
/// batch hang until their own deadline; every other item comes out, the
/// two timeouts at their own indices, in order; stats add up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn steal_keep_going_two_hung_items_in_one_call_time_out_at_their_indices() {
    let map = stream::iter(0..8u64)
        .par_imap(2, |n| {
            if n == 0 || n == 5 {
                assert!(wait_cancelled());
            }
            n
        })
        .batch(8)
        .timeout(Duration::from_millis(200))
        .keep_going();
    let stats = map.stats();
    let results: Vec<_> = bounded("two hung", map.collect::<Vec<_>>()).await;
    assert_eq!(results.len(), 8, "{results:?}");
    for (i, r) in results.iter().enumerate() {
        match r {
            Ok(n) => assert!(*n == i as u64 && i != 0 && i != 5, "{results:?}"),
            Err(e) => assert!(
                (i == 0 || i == 5) && e.is_timeout() && e.index() == i,
                "{results:?}"
            ),
        }
    }
    // Threads of timed-out items return right after their deadline.
    let deadline = Instant::now() + hang();
    loop {
        let snap = stats.snapshot();
        if snap.in_flight == 0 && snap.completed == 8 {
            assert_eq!(
                (snap.pulled, snap.started, snap.failed, snap.yielded),
                (8, 8, 2, 8),
                "{snap:?}"
            );
            break;
        }
        assert!(Instant::now() < deadline, "{snap:?}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Stats add up after a run with steals (an adaptive map whose item hangs
/// until every other item arrived), and `in_flight` never exceeds limit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn steal_stats_add_up_and_in_flight_stays_within_the_limit() {
    const N: u64 = 20_000;
    const HUNG: u64 = 9_000;
    let gates = Gates::default();
    let _open = OpenOnDrop(gates.clone(), 0);
    let g = gates.clone();
    let mut map = stream::iter(0..N).par_imap_unordered(2, move |n| {
        if n == HUNG {
            g.wait(0);
        }
        n
    });
    let stats = map.stats();
    let mut seen = 0;
    let mut max_in_flight = 0;
    while seen < N - 1 {
        let r = bounded("steal stats", map.next()).await.unwrap().unwrap();
        assert_ne!(r, HUNG);
        seen += 1;
        let snap = stats.snapshot();
        max_in_flight = max_in_flight.max(snap.in_flight);
        assert!(
            snap.completed <= snap.started && snap.started <= snap.pulled,
            "{snap:?}"
        );
        // Not asserted: yielded <= completed (a running batch counts its
        // harvested items when it ends, DESIGN `.stats()`).
    }
    gates.open(0);
    assert_eq!(bounded("last", map.next()).await.unwrap().unwrap(), HUNG);
    assert!(map.next().await.is_none());
    assert!(max_in_flight <= 2, "in_flight {max_in_flight} > limit");
    let snap = stats.snapshot();
    assert_eq!(
        (
            snap.pulled,
            snap.started,
            snap.completed,
            snap.yielded,
            snap.failed,
            snap.in_flight
        ),
        (N, N, N, N, 0, 0),
        "{snap:?}"
    );
}

/// The window holds while an item hangs and thieves take its call mates:
/// pulled - yielded never exceeds the window, ordered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn steal_window_holds_while_an_item_hangs_ordered() {
    const WINDOW: usize = 64;
    let pulled = Arc::new(AtomicUsize::new(0));
    let p = Arc::clone(&pulled);
    let gates = Gates::default();
    let _open = OpenOnDrop(gates.clone(), 0);
    let g = gates.clone();
    let mut map = stream::iter(0..2000usize)
        .inspect(move |_| {
            p.fetch_add(1, Ordering::SeqCst);
        })
        .par_imap(2, move |n| {
            if n == 10 {
                g.wait(0);
            }
            n
        })
        .window(WINDOW);
    let stats = map.stats();
    for i in 0..10 {
        assert_eq!(bounded("head", map.next()).await.unwrap().unwrap(), i);
        assert!(pulled.load(Ordering::SeqCst) - (i + 1) <= WINDOW);
    }
    // Let the others fill the window while 10 hangs.
    let deadline = Instant::now() + hang();
    // (Not `completed`: a running call counts its items when it ends.)
    while pulled.load(Ordering::SeqCst) < 10 + WINDOW {
        if Instant::now() >= deadline {
            gates.open(0);
            panic!("the window never filled: {:?}", stats.snapshot());
        }
        assert!(futures::poll!(map.next()).is_pending());
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    assert!(
        pulled.load(Ordering::SeqCst) - 10 <= WINDOW,
        "pulled {}",
        pulled.load(Ordering::SeqCst)
    );
    gates.open(0);
    let mut yielded = 10;
    while let Some(r) = bounded("rest", map.next()).await {
        assert_eq!(r.unwrap(), yielded);
        yielded += 1;
        assert!(pulled.load(Ordering::SeqCst) - yielded <= WINDOW);
    }
    assert_eq!(yielded, 2000);
}

/// batch(usize::MAX) and window == limit == 1 are accepted and map
/// everything in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn extreme_batch_and_window_values() {
    let all: Vec<_> = bounded(
        "batch max",
        stream::iter(0..5000u64)
            .par_imap(2, |n| n * 2)
            .batch(usize::MAX)
            .collect::<Vec<_>>(),
    )
    .await;
    assert_eq!(
        all.into_iter().map(Result::unwrap).collect::<Vec<_>>(),
        (0..5000).map(|n| n * 2).collect::<Vec<_>>()
    );
    let all: Vec<_> = bounded(
        "window 1",
        stream::iter(0..500u64)
            .par_imap(1, |n| n + 1)
            .window(1)
            .collect::<Vec<_>>(),
    )
    .await;
    assert_eq!(
        all.into_iter().map(Result::unwrap).collect::<Vec<_>>(),
        (1..501).collect::<Vec<_>>()
    );
    let all: Vec<_> = bounded(
        "batch 1 window==limit",
        stream::iter(0..500u64)
            .par_imap_unordered(3, |n| n + 1)
            .batch(1)
            .window(3)
            .collect::<Vec<_>>(),
    )
    .await;
    let mut all: Vec<u64> = all.into_iter().map(Result::unwrap).collect();
    all.sort_unstable();
    assert_eq!(all, (1..501).collect::<Vec<_>>());
    let all: Vec<_> = bounded(
        "huge limit async",
        stream::iter(0..100u64)
            .par_imap_async(usize::MAX, |n| async move { n })
            .collect::<Vec<_>>(),
    )
    .await;
    assert_eq!(all.len(), 100);
}

/// batch(usize::MAX) with a hung item: thieves still take the rest.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn steal_from_a_batch_of_usize_max() {
    let gates = Gates::default();
    let _open = OpenOnDrop(gates.clone(), 0);
    let g = gates.clone();
    let mut map = stream::iter(0..1000u64)
        .par_imap_unordered(2, move |n| {
            if n == 0 {
                g.wait(0);
            }
            n
        })
        .batch(usize::MAX);
    for _ in 0..999 {
        assert_ne!(bounded("stolen", map.next()).await.unwrap().unwrap(), 0);
    }
    gates.open(0);
    assert_eq!(bounded("last", map.next()).await.unwrap().unwrap(), 0);
    assert!(map.next().await.is_none());
}

// ---------------------------------------------------------------- composition

/// Dropped mid-run while blocking calls hang: nothing not yet started ever
/// starts, every value is dropped once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drop_while_both_calls_hang_starts_nothing_more() {
    let started = Arc::new(Mutex::new(Vec::new()));
    let gates = Gates::default();
    let _open = OpenOnDrop(gates.clone(), 0);
    let tracker = Tracker::default();
    let (s, g, tr) = (Arc::clone(&started), gates.clone(), tracker.clone());
    let mut map = stream::iter((0..100).map(move |n| tr.track(n)))
        .par_imap(2, move |t| {
            s.lock().unwrap().push(t.value);
            if t.value == 1 || t.value == 5 {
                g.wait(0);
            }
            t
        })
        .batch(4);
    assert!(futures::poll!(map.next()).is_pending());
    let deadline = Instant::now() + hang();
    while started.lock().unwrap().len() < 4 {
        assert!(Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    drop(map);
    gates.open(0);
    tracker.wait_all_dropped();
    let mut s = started.lock().unwrap().clone();
    s.sort_unstable();
    assert_eq!(s, [0, 1, 4, 5]);
}

/// A blocking map nested inside another blocking map's mapper, with a
/// shared budget of 1 between the inner maps only; and a `take` of the
/// outer map.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nested_blocking_maps_on_a_shared_inner_budget() {
    let budget = Arc::new(Semaphore::new(1));
    let handle = tokio::runtime::Handle::current();
    let b = Arc::clone(&budget);
    let outer: Vec<_> = bounded(
        "nested",
        stream::iter(0..6u64)
            .par_imap(3, move |n| {
                let inner = stream::iter(0..50u64)
                    .par_imap(2, move |m| n * 100 + m)
                    .semaphore(Arc::clone(&b));
                let v: Vec<u64> = handle.block_on(inner.map(Result::unwrap).collect());
                v.iter().sum::<u64>()
            })
            .take(4)
            .collect::<Vec<_>>(),
    )
    .await;
    let sums: Vec<u64> = outer.into_iter().map(Result::unwrap).collect();
    assert_eq!(
        sums,
        (0..4u64)
            .map(|n| (0..50).map(|m| n * 100 + m).sum())
            .collect::<Vec<_>>()
    );
    let deadline = Instant::now() + hang();
    while budget.available_permits() != 1 {
        assert!(Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

/// Two blocking maps sharing one permit, zipped and selected, with calls
/// of many items and a slow item in each: both finish, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_batched_blocking_maps_on_one_permit_zip_and_select() {
    let budget = Arc::new(Semaphore::new(1));
    let mk = |b: &Arc<Semaphore>, slow: u64| {
        stream::iter(0..3000u64)
            .par_imap(2, move |n| {
                if n == slow {
                    std::thread::sleep(Duration::from_millis(30));
                }
                n
            })
            .semaphore(Arc::clone(b))
    };
    let zipped: Vec<_> = bounded(
        "zip",
        mk(&budget, 100).zip(mk(&budget, 2000)).collect::<Vec<_>>(),
    )
    .await;
    assert_eq!(zipped.len(), 3000);
    for (i, (a, b)) in zipped.into_iter().enumerate() {
        assert_eq!((a.unwrap(), b.unwrap()), (i as u64, i as u64));
    }
    let selected: Vec<_> = bounded(
        "select",
        stream::select(mk(&budget, 5), mk(&budget, 2500)).collect::<Vec<_>>(),
    )
    .await;
    assert_eq!(selected.len(), 6000);
    assert_eq!(budget.available_permits(), 1);
}

/// Token cancelled while a big call is mid-way and one item hangs until
/// cancelled: one cancelled error at the lowest unyielded index, values
/// dropped once, and no item after the cancel starts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_cancel_mid_call_yields_one_cancelled_error_at_the_lowest_unyielded_index() {
    let token = CancellationToken::new();
    let tracker = Tracker::default();
    let started_after = Arc::new(AtomicUsize::new(0));
    let cancelled = Arc::new(AtomicBool::new(false));
    let (tr, sa, c) = (
        tracker.clone(),
        Arc::clone(&started_after),
        Arc::clone(&cancelled),
    );
    let mut map = stream::iter((0..100).map(move |n| tr.track(n)))
        .par_imap(2, move |t| {
            if c.load(Ordering::SeqCst) {
                sa.fetch_add(1, Ordering::SeqCst);
            }
            if t.value == 3 {
                assert!(wait_cancelled());
            }
            t
        })
        .batch(50)
        .cancel_token(token.clone());
    let mut got = Vec::new();
    for _ in 0..3 {
        got.push(bounded("head", map.next()).await.unwrap().unwrap().value);
    }
    assert_eq!(got, [0, 1, 2]);
    // Let thieves take what they will, then cancel.
    tokio::time::sleep(Duration::from_millis(20)).await;
    cancelled.store(true, Ordering::SeqCst);
    token.cancel();
    let e = bounded("cancel", map.next()).await.unwrap().unwrap_err();
    assert!(e.is_cancelled() && e.index() == 3, "{e:?}");
    assert_eq!(e.to_string(), "item 3 cancelled");
    assert!(map.next().await.is_none());
    drop(map);
    tracker.wait_all_dropped();
    assert!(
        started_after.load(Ordering::SeqCst) <= 2,
        "items started after the cancel: {}",
        started_after.load(Ordering::SeqCst)
    );
}

/// A consumer that stops polling while thieves work, then resumes: all
/// results arrive in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_polling_then_resume_with_a_hung_item() {
    let gates = Gates::default();
    let _open = OpenOnDrop(gates.clone(), 0);
    let g = gates.clone();
    let mut map = stream::iter(0..5000u64)
        .par_imap(2, move |n| {
            if n == 3 {
                g.wait(0);
            }
            n
        })
        .window(200);
    assert_eq!(map.next().await.unwrap().unwrap(), 0);
    tokio::time::sleep(Duration::from_millis(50)).await;
    gates.open(0);
    tokio::time::sleep(Duration::from_millis(50)).await;
    let mut next = 1;
    while let Some(r) = bounded("resume", map.next()).await {
        assert_eq!(r.unwrap(), next);
        next += 1;
    }
    assert_eq!(next, 5000);
}

/// Runtime shut down (shutdown_timeout) while batched blocking calls hang;
/// polled later from another runtime: cancelled errors, no panic, every
/// value dropped once when the threads return.
#[test]
fn runtime_shutdown_mid_batch_then_poll_from_another_runtime() {
    let gates = Gates::default();
    let _open = OpenOnDrop(gates.clone(), 0);
    let tracker = Tracker::default();
    let (g, tr) = (gates.clone(), tracker.clone());
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    // Limit 3: a third worker is free to harvest item 3 and 4 of the
    // call [0..8] in which item 5 hangs.
    let mut map = stream::iter((0..1000).map(move |n| tr.track(n)))
        .par_imap(3, move |t| {
            if t.value == 5 || t.value == 10 {
                g.wait(0);
            }
            t
        })
        .timeout(Duration::from_secs(600))
        .batch(8);
    let got: Vec<usize> = rt.block_on(async {
        let mut got = Vec::new();
        for _ in 0..5 {
            got.push(map.next().await.unwrap().unwrap().value);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
        got
    });
    assert_eq!(got, [0, 1, 2, 3, 4]);
    rt.shutdown_timeout(Duration::from_millis(10));
    let other = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let rest: Vec<_> = other.block_on(async {
        let mut rest = Vec::new();
        // One poll while the calls of items 5 and 600 still run.
        if let std::task::Poll::Ready(Some(r)) = futures::poll!(map.next()) {
            rest.push(r);
        }
        gates.open(0);
        while let Some(r) = tokio::time::timeout(hang(), map.next())
            .await
            .expect("hung after shutdown")
        {
            rest.push(r);
        }
        rest
    });
    let errors = rest.iter().filter(|r| r.is_err()).count();
    assert!(
        errors <= 1,
        "{:?}",
        rest.iter()
            .filter_map(|r| r.as_ref().err())
            .collect::<Vec<_>>()
    );
    for (i, r) in rest.iter().enumerate() {
        match r {
            Ok(t) => assert_eq!(t.value, 5 + i),
            Err(e) => {
                assert!(e.is_cancelled(), "{e:?}");
                assert_eq!(e.index(), 5 + i);
                assert_eq!(i + 1, rest.len());
            }
        }
    }
    eprintln!(
        "after shutdown: {} values, {} errors",
        rest.len() - errors,
        errors
    );
    drop(rest);
    drop(map);
    gates.open(0);
    tracker.wait_all_dropped();
}

// ------------------------- finished results never held behind a hung item

/// Ordered, `.batch(4)`, limit 2: calls [0..4] and [4..8]; item 1 and item
/// 5 hang, so both workers are stuck and no worker is idle to steal. Item
/// 0 is done and every item before it is done: it must be yielded.
async fn done_item_before_a_hung_one_when_every_worker_hangs(timeout: Option<Duration>) {
    let gates = Gates::default();
    let _open = OpenOnDrop(gates.clone(), 0);
    let g = gates.clone();
    let map = stream::iter(0..8u64)
        .par_imap(2, move |n| {
            if n == 1 || n == 5 {
                g.wait(0);
            }
            n
        })
        .batch(4);
    let mut map = match timeout {
        Some(t) => map.timeout(t),
        None => map,
    };
    let first = tokio::time::timeout(Duration::from_secs(5), map.next()).await;
    gates.open(0);
    let first = first.expect("item 0 (done, first in order) was held back while item 1 hung");
    assert_eq!(first.unwrap().unwrap(), 0);
    let rest: Vec<u64> = map.map(Result::unwrap).collect().await;
    assert_eq!(rest, (1..8).collect::<Vec<_>>());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_finished_result_comes_out_while_every_worker_is_in_a_hung_item() {
    done_item_before_a_hung_one_when_every_worker_hangs(None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_finished_result_comes_out_while_every_worker_is_in_a_hung_item_with_a_timeout() {
    done_item_before_a_hung_one_when_every_worker_hangs(Some(Duration::from_secs(3600))).await;
}

/// Limit 1, `.batch(2)`: there is never an idle worker to harvest. Item 0
/// is done, item 1 (same call) hangs: item 0 must still be yielded, in
/// input order and in completion order alike.
async fn limit_1_item_0_comes_while_item_1_of_its_call_hangs(ordered: bool) {
    let gates = Gates::default();
    let _open = OpenOnDrop(gates.clone(), 0);
    let g = gates.clone();
    let f = move |n: u64| {
        if n == 1 {
            g.wait(0);
        }
        n
    };
    let mut map = if ordered {
        stream::iter(0..2u64).par_imap(1, f).batch(2).boxed()
    } else {
        stream::iter(0..2u64)
            .par_imap_unordered(1, f)
            .batch(2)
            .boxed()
    };
    let first = tokio::time::timeout(Duration::from_secs(5), map.next()).await;
    gates.open(0);
    let first = first.expect("item 0 (done) was held back while item 1 of its call hung");
    assert_eq!(first.unwrap().unwrap(), 0);
    assert_eq!(map.next().await.unwrap().unwrap(), 1);
    assert!(map.next().await.is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_limit_1_a_finished_result_comes_out_while_the_next_item_of_its_call_hangs() {
    limit_1_item_0_comes_while_item_1_of_its_call_hangs(true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unordered_with_limit_1_a_finished_result_comes_out_while_its_call_hangs() {
    limit_1_item_0_comes_while_item_1_of_its_call_hangs(false).await;
}

/// Limit 1, adaptive sizes (calls double: [0], [1,2], [3..7], ... [31..63]):
/// item 50 hangs; items 0..50 are done and must be yielded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_limit_1_and_adaptive_calls_every_result_before_a_hung_item_comes_out() {
    let gates = Gates::default();
    let _open = OpenOnDrop(gates.clone(), 0);
    let g = gates.clone();
    let mut map = stream::iter(0..100u64).par_imap(1, move |n| {
        if n == 50 {
            g.wait(0);
        }
        n
    });
    let mut got = 0;
    while got < 50 {
        match tokio::time::timeout(Duration::from_secs(5), map.next()).await {
            Ok(r) => assert_eq!(r.unwrap().unwrap(), got),
            Err(_) => {
                gates.open(0);
                panic!("only {got} of the 50 done items before item 50 were yielded");
            }
        }
        got += 1;
    }
    gates.open(0);
    assert_eq!(map.count().await, 50);
}

/// Limit 1, `.batch(4)`, item 1 hangs: the watch hands over item 0's
/// result, but takes no item, so items 2 and 3 start only after item 1
/// returns, and never two calls run at once. (A watch that took items
/// would start them within a few of its 2 ms looks; the 50 ms below is no
/// bound on anything that must happen.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_limit_1_the_watch_hands_over_results_but_runs_no_item() {
    let gates = Gates::default();
    let _open = OpenOnDrop(gates.clone(), 0);
    let calls = Calls::default();
    let (g, c) = (gates.clone(), calls.clone());
    let mut map = stream::iter(0..4_usize)
        .par_imap(1, move |n| {
            let _running = c.enter(n);
            if n == 1 {
                g.wait(0);
            }
            n
        })
        .batch(4);
    let first = tokio::time::timeout(hang(), map.next()).await;
    let first = first.expect("item 0 held back while item 1 of its call hung");
    assert_eq!(first.unwrap().unwrap(), 0);
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(
        calls.started_indices(),
        vec![0, 1],
        "an item taken past the hung one"
    );
    gates.open(0);
    let rest: Vec<usize> = map.map(Result::unwrap).collect().await;
    assert_eq!(rest, vec![1, 2, 3]);
    assert_eq!(calls.peak(), 1, "two items of a limit-1 map ran at once");
}

/// Limit 1, `.batch(2)`, a budget of one whose permit is held elsewhere
/// for 200 ms: the call waits for it on its worker before it opens. A
/// watch started when the call was handed out would find nothing open,
/// sleep its 50 ms spell and leave; the call, opening later, must still be
/// watched, and item 0 come out while item 1 hangs (found in review).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_that_waited_for_its_permit_is_watched_once_it_opens() {
    let gates = Gates::default();
    let _open = OpenOnDrop(gates.clone(), 0);
    let g = gates.clone();
    let budget = Arc::new(Semaphore::new(1));
    let held = Arc::clone(&budget).acquire_owned().await.unwrap();
    let mut map = stream::iter(0..2_u64)
        .par_imap(1, move |n| {
            if n == 1 {
                g.wait(0);
            }
            n
        })
        .batch(2)
        .semaphore(Arc::clone(&budget));
    let release = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(200)).await;
        drop(held);
    });
    let first = tokio::time::timeout(hang(), map.next()).await;
    gates.open(0);
    release.await.unwrap();
    let first = first.expect("item 0 held back while item 1 of its call hung");
    assert_eq!(first.unwrap().unwrap(), 0);
    assert_eq!(map.next().await.unwrap().unwrap(), 1);
}

/// A fixed batch larger than the window: the window is still a hard cap.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn window_below_batch_is_a_hard_cap() {
    for (limit, window, batch) in [
        (2usize, 3usize, 8usize),
        (1, 1, 64),
        (2, 2, 2),
        (3, 5, usize::MAX),
    ] {
        let pulled = Arc::new(AtomicUsize::new(0));
        let p = Arc::clone(&pulled);
        let mut map = stream::iter(0..500usize)
            .inspect(move |_| {
                p.fetch_add(1, Ordering::SeqCst);
            })
            .par_imap(limit, |n| n)
            .batch(batch)
            .window(window);
        let mut yielded = 0;
        while let Some(r) = bounded("window", map.next()).await {
            assert_eq!(r.unwrap(), yielded);
            yielded += 1;
            let p = pulled.load(Ordering::SeqCst);
            assert!(
                p - yielded <= window,
                "limit {limit} window {window} batch {batch}: pulled {p} yielded {yielded}"
            );
        }
        assert_eq!(yielded, 500);
    }
}

/// Retry, unordered, keep_going, blocking: flaky items retried; stats
/// settle with waiting 0 and in_flight 0; every clone dropped once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_unordered_keep_going_blocking_stats_settle() {
    let alive = Arc::new(AtomicUsize::new(0));
    let tries = Arc::new(Mutex::new(std::collections::HashMap::<usize, u32>::new()));
    let t = Arc::clone(&tries);
    let items: Vec<Counted> = (0..40).map(|n| Counted::new(n, &alive)).collect();
    let map = stream::iter(items)
        .try_par_imap_unordered(2, move |c: Counted| -> Result<usize, MyErr> {
            let k = {
                let mut t = t.lock().unwrap();
                let e = t.entry(c.n).or_insert(0);
                *e += 1;
                *e
            };
            // n % 3 == 0 fails twice, n % 7 == 0 always.
            if c.n % 7 == 0 || (c.n % 3 == 0 && k <= 2) {
                return Err(MyErr::Mine(c.n));
            }
            Ok(c.n)
        })
        .keep_going()
        .retry(Retry::attempts(3).backoff(Duration::from_millis(1), Duration::from_millis(2)));
    let stats = map.stats();
    let results: Vec<_> = bounded("retry unordered", map.collect::<Vec<_>>()).await;
    assert_eq!(results.len(), 40);
    let mut ok: Vec<usize> = results
        .iter()
        .filter_map(|r| r.as_ref().ok().copied())
        .collect();
    ok.sort_unstable();
    let expect_ok: Vec<usize> = (0..40).filter(|n| n % 7 != 0).collect();
    assert_eq!(ok, expect_ok);
    let mut failed: Vec<usize> = results
        .iter()
        .filter_map(|r| match r {
            Err(MyErr::Mine(n)) => Some(*n),
            Err(e) => panic!("{e:?}"),
            Ok(_) => None,
        })
        .collect();
    failed.sort_unstable();
    assert_eq!(failed, (0..40).filter(|n| n % 7 == 0).collect::<Vec<_>>());
    let total_attempts: u32 = tries.lock().unwrap().values().sum();
    let snap = stats.snapshot();
    assert_eq!(snap.started, total_attempts as u64, "{snap:?}");
    assert_eq!(snap.completed, total_attempts as u64, "{snap:?}");
    assert_eq!(snap.retried, total_attempts as u64 - 40, "{snap:?}");
    assert_eq!(
        (
            snap.failed,
            snap.waiting,
            snap.in_flight,
            snap.yielded,
            snap.pulled
        ),
        (6, 0, 0, 40, 40),
        "{snap:?}"
    );
    drop(results);
    assert_eq!(alive.load(Ordering::SeqCst), 0);
}

/// Limit 2 but a shared budget of 1: the only permit is held by the call
/// [0, 1] whose item 1 hangs; the idle worker may take no item, but item
/// 0's result is done and must come out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_finished_result_comes_out_under_a_budget_of_one_while_its_call_hangs() {
    let gates = Gates::default();
    let _open = OpenOnDrop(gates.clone(), 0);
    let g = gates.clone();
    let budget = Arc::new(Semaphore::new(1));
    let mut map = stream::iter(0..4u64)
        .par_imap(2, move |n| {
            if n == 1 {
                g.wait(0);
            }
            n
        })
        .batch(4)
        .semaphore(Arc::clone(&budget));
    let first = tokio::time::timeout(Duration::from_secs(5), map.next()).await;
    gates.open(0);
    let first = first.expect("item 0 (done) was held back while item 1 of its call hung");
    assert_eq!(first.unwrap().unwrap(), 0);
    let rest: Vec<u64> = map.map(Result::unwrap).collect().await;
    assert_eq!(rest, [1, 2, 3]);
    assert_eq!(budget.available_permits(), 1);
}

/// Unordered with steals: a token cancelled after many results names the
/// lowest index not yet yielded (the hung one), never a yielded one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unordered_cancel_with_steals_names_the_lowest_unyielded_index() {
    let token = CancellationToken::new();
    let tracker = Tracker::default();
    let tr = tracker.clone();
    let mut map = stream::iter((0..5000).map(move |n| tr.track(n)))
        .par_imap_unordered(2, |t| {
            if t.value == 100 {
                assert!(wait_cancelled());
            }
            t
        })
        .cancel_token(token.clone());
    let mut seen = std::collections::BTreeSet::new();
    while seen.len() < 1500 {
        let t = bounded("unordered", map.next()).await.unwrap().unwrap();
        assert!(seen.insert(t.value));
    }
    token.cancel();
    let e = bounded("cancel", map.next()).await.unwrap().unwrap_err();
    let lowest = (0..).find(|i| !seen.contains(i)).unwrap();
    assert!(e.is_cancelled(), "{e:?}");
    assert_eq!(e.index(), lowest, "{e:?}");
    assert!(!seen.contains(&e.index()));
    assert!(map.next().await.is_none());
    drop(map);
    tracker.wait_all_dropped();
}

/// A retried panic's last attempt keeps its own payload (for
/// `resume_unwind`), with or without a `.when` predicate that sees it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_last_panic_keeps_its_payload_blocking_and_async() {
    let seen = Arc::new(AtomicUsize::new(0));
    let s = Arc::clone(&seen);
    let results: Vec<_> = bounded(
        "blocking",
        stream::iter([0u64, 1])
            .par_imap(2, |n| -> u64 {
                if n == 1 {
                    std::panic::panic_any(7_u32);
                }
                n
            })
            .retry(
                Retry::attempts(2)
                    .retry_panics()
                    .when(move |e: &par_imap::Error| {
                        s.fetch_add(1, Ordering::SeqCst);
                        e.is_panic() && e.index() == 1
                    }),
            )
            .collect::<Vec<_>>(),
    )
    .await;
    assert_eq!(*results[0].as_ref().unwrap(), 0);
    let mut results = results;
    let e = results.pop().unwrap().unwrap_err();
    assert_eq!((e.index(), e.is_panic()), (1, true));
    assert_eq!(e.to_string(), "item 1 panicked");
    assert_eq!(e.into_panic().downcast_ref::<u32>(), Some(&7));
    assert!(seen.load(Ordering::SeqCst) >= 1);

    let results: Vec<_> = bounded(
        "async",
        stream::iter([0u64, 1])
            .par_imap_async(2, |n| async move {
                if n == 1 {
                    std::panic::panic_any(9_u32);
                }
                n
            })
            .retry(Retry::attempts(3).retry_panics())
            .collect::<Vec<_>>(),
    )
    .await;
    let mut results = results;
    let e = results.pop().unwrap().unwrap_err();
    assert_eq!((e.index(), e.is_panic()), (1, true));
    assert_eq!(e.into_panic().downcast_ref::<u32>(), Some(&9));
}

/// `.timeout` + `.keep_going`, limit 1, `.batch(4)`: item 0
/// is done, item 1 overruns its deadline, item 2 is done after it, item 3
/// hangs. Announcing marks results as told: those that come after the first
/// announcement (the timeout, item 2) must still come out. `poll_late`: the
/// consumer does not poll for 700 ms first.
async fn timed_results_after_an_announcement(poll_late: bool) {
    let gates = Gates::default();
    let _open = OpenOnDrop(gates.clone(), 0);
    let g = gates.clone();
    let mut map = stream::iter(0..4_u64)
        .par_imap(1, move |n| {
            match n {
                1 => std::thread::sleep(Duration::from_millis(400)),
                3 => g.wait(0),
                _ => {}
            }
            n
        })
        .batch(4)
        .timeout(Duration::from_millis(150))
        .keep_going();
    if poll_late {
        tokio::time::sleep(Duration::from_millis(700)).await;
    }
    let mut got = Vec::new();
    for _ in 0..3 {
        match tokio::time::timeout(hang(), map.next()).await {
            Ok(Some(r)) => got.push(r.map_err(|e| e.is_timeout())),
            Ok(None) => break,
            Err(_) => break,
        }
    }
    gates.open(0);
    assert_eq!(got, vec![Ok(0), Err(true), Ok(2)], "poll_late {poll_late}");
    assert_eq!(map.next().await.unwrap().unwrap(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timed_results_announced_once_still_all_come() {
    timed_results_after_an_announcement(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timed_results_announced_once_still_all_come_when_the_consumer_polls_late() {
    timed_results_after_an_announcement(true).await;
}

/// Limit 2, `.timeout`, a thief takes items (at: Some) after
/// the watch may have announced the owner's results: item 0 still comes out
/// while item 1 hangs, and the stolen items too (unordered).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thief_taking_items_still_hands_over_the_owners_timed_results() {
    let gates = Gates::default();
    let _open = OpenOnDrop(gates.clone(), 0);
    let g = gates.clone();
    let mut map = stream::iter(0..6_u64)
        .par_imap_unordered(2, move |n| {
            if n == 1 {
                g.wait(0);
            }
            n
        })
        .batch(6)
        .timeout(Duration::from_secs(3600));
    let mut got = Vec::new();
    for _ in 0..5 {
        match tokio::time::timeout(hang(), map.next()).await {
            Ok(Some(r)) => got.push(r.unwrap()),
            _ => break,
        }
    }
    gates.open(0);
    got.sort();
    assert_eq!(got, vec![0, 2, 3, 4, 5]);
}
