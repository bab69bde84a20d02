//! Semantics 2, bounded memory, measured: a counting global allocator (for
//! this test binary only) tracks the live heap while a long run goes on,
//! and the growth between an early and a late reading must stay small
//! whatever the options. Issue 11, point 2: unordered + `.timeout` with one
//! early call stuck grew by megabytes (finished calls' deadlines stayed in
//! a heap behind the stuck one).
//!
//! The tests share the allocator's counter, so they run one at a time.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicIsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::stream::BoxStream;
use futures::{StreamExt, stream};
use par_imap::ParImapExt;
use tokio::sync::{Semaphore, oneshot};

struct Counting;

static LIVE: AtomicIsize = AtomicIsize::new(0);

// SAFETY: every call is forwarded to `System` unchanged; the counter only
// observes sizes.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: forwarded as is.
        let ptr = unsafe { System.alloc(layout) };
        if !ptr.is_null() {
            LIVE.fetch_add(layout.size() as isize, Ordering::Relaxed);
        }
        ptr
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: forwarded as is.
        let ptr = unsafe { System.alloc_zeroed(layout) };
        if !ptr.is_null() {
            LIVE.fetch_add(layout.size() as isize, Ordering::Relaxed);
        }
        ptr
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: forwarded as is.
        unsafe { System.dealloc(ptr, layout) };
        LIVE.fetch_sub(layout.size() as isize, Ordering::Relaxed);
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: forwarded as is.
        let new = unsafe { System.realloc(ptr, layout, new_size) };
        if !new.is_null() {
            LIVE.fetch_add(
                new_size as isize - layout.size() as isize,
                Ordering::Relaxed,
            );
        }
        new
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// One test at a time: they all read the one counter.
static SERIAL: Mutex<()> = Mutex::new(());

fn live() -> isize {
    LIVE.load(Ordering::Relaxed)
}

/// Runs `test` on a fresh runtime, on `workers` threads or the current
/// one, while no other test runs. The runtime is built once the others are
/// done: its heap would count in their growth.
fn alone(workers: Option<usize>, test: impl Future<Output = ()>) {
    let _serial = SERIAL
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let runtime = match workers {
        Some(workers) => tokio::runtime::Builder::new_multi_thread()
            .worker_threads(workers)
            .enable_all()
            .build(),
        None => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build(),
    };
    runtime.unwrap().block_on(test);
}

/// Far more than any fixed-size state, far less than the megabytes a
/// per-item leak adds over the run.
const MAX_GROWTH: isize = 256 * 1024;

/// Takes `late` values (never item 0, which is stuck) and reads the live
/// heap after `early` and after `late` of them; returns the growth.
async fn growth(
    mut results: BoxStream<'static, Result<usize, par_imap::Error>>,
    early: usize,
    late: usize,
) -> isize {
    let mut at_early = 0;
    for taken in 1..=late {
        let value = results
            .next()
            .await
            .expect("the input is longer")
            .unwrap_or_else(|error| panic!("after {taken}: {error}"));
        assert_ne!(value, 0, "item 0 is stuck");
        if taken == early {
            at_early = live();
        }
    }
    live() - at_early
}

/// An async mapper whose item 0 waits for the returned sender.
fn stuck_head_async() -> (
    oneshot::Sender<()>,
    impl Fn(usize) -> BoxFuture + Send + Sync + 'static,
) {
    let (open, gate) = oneshot::channel::<()>();
    let gate = Arc::new(Mutex::new(Some(gate)));
    let mapper = move |n: usize| -> BoxFuture {
        let gate = (n == 0).then(|| gate.lock().unwrap().take().unwrap());
        Box::pin(async move {
            if let Some(gate) = gate {
                let _ = gate.await;
            }
            n
        })
    };
    (open, mapper)
}

type BoxFuture = std::pin::Pin<Box<dyn Future<Output = usize> + Send>>;

/// Opened once, by [`open`].
type Gate = (Mutex<bool>, std::sync::Condvar);

/// A blocking mapper whose item 0 waits until the returned gate opens.
fn stuck_head_blocking() -> (Arc<Gate>, impl Fn(usize) -> usize + Send + Sync + 'static) {
    let gate = Arc::new((Mutex::new(false), std::sync::Condvar::new()));
    let wait = gate.clone();
    let mapper = move |n: usize| {
        if n == 0 {
            let (open, changed) = &*wait;
            let mut open = open.lock().unwrap();
            while !*open {
                open = changed
                    .wait_timeout(open, Duration::from_secs(60))
                    .unwrap()
                    .0;
            }
        }
        n
    };
    (gate, mapper)
}

fn open(gate: &Gate) {
    *gate.0.lock().unwrap() = true;
    gate.1.notify_all();
}

const HOUR: Duration = Duration::from_secs(3600);

/// The growth from item 20k to 200k of an unordered async map, limit 4,
/// whose item 0 is stuck all along; with a per-item `timeout` or none.
async fn unordered_async_growth(timeout: Option<Duration>) -> isize {
    let (gate, mapper) = stuck_head_async();
    let mut results = stream::iter(0..usize::MAX).par_imap_async_unordered(4, mapper);
    if let Some(timeout) = timeout {
        results = results.timeout(timeout);
    }
    let grew = growth(results.boxed(), 20_000, 200_000).await;
    let _ = gate.send(());
    grew
}

#[test]
fn unordered_timeout_memory_stays_flat_with_a_stuck_early_item() {
    alone(None, async {
        let grew = unordered_async_growth(Some(HOUR)).await;
        assert!(
            grew < MAX_GROWTH,
            "live heap grew by {grew} bytes from item 20k to 200k"
        );
    });
}

#[test]
fn unordered_memory_stays_flat_with_every_option_and_a_stuck_early_item() {
    // Async with a shared budget; blocking, one item per call and batched;
    // each with a timeout, the option that leaked.
    alone(Some(2), async {
        let budget = Arc::new(Semaphore::new(3));
        let (gate, mapper) = stuck_head_async();
        let results = stream::iter(0..usize::MAX)
            .par_imap_async_unordered(3, mapper)
            .timeout(HOUR)
            .semaphore(budget.clone())
            .window(16)
            .boxed();
        let mut grown = vec![(
            "async + budget".to_string(),
            growth(results, 10_000, 100_000).await,
        )];
        let _ = gate.send(());

        for batch in [1, 8] {
            let (gate, mapper) = stuck_head_blocking();
            let results = stream::iter(0..usize::MAX)
                .par_imap_unordered(2, mapper)
                .batch(batch)
                .timeout(HOUR)
                .boxed();
            grown.push((
                format!("blocking, batch {batch}"),
                growth(results, 10_000, 100_000).await,
            ));
            open(&gate);
        }
        assert!(
            grown.iter().all(|&(_, grew)| grew < MAX_GROWTH),
            "live heap growth from item 10k to 100k, in bytes: {grown:?}"
        );
    });
}

#[test]
fn unordered_memory_without_timeout_stays_flat_with_a_stuck_early_item() {
    // The control: the same run without `.timeout` was flat before the fix;
    // it shows the measure itself does not drift.
    alone(None, async {
        let grew = unordered_async_growth(None).await;
        assert!(grew < MAX_GROWTH, "live heap grew by {grew} bytes");
    });
}
