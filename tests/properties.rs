//! Property tests: every invariant of DESIGN.md, checked on generated cases
//! under schedules nobody chose by hand.
//!
//! Each case draws an input length, `limit`, `window`, order, blocking or
//! async, try or plain, `batch` (blocking), a pattern of per-item durations,
//! at most one failure (`Err` or panic) at a random index, and optionally: a
//! consumer that drops the stream after some items, a cancellation token
//! fired after some items, a per-item timeout with one item too slow for it.
//!
//! Async cases run on a current-thread runtime with paused time: thousands
//! take seconds, and a failing case replays from its seed. Blocking cases run
//! on a real 2-thread runtime with short durations.
//!
//! `PAR_IMAP_CASES` sets the number of cases per mode (default 256, what CI
//! runs); a long local run: `PAR_IMAP_CASES=20000 cargo test --release --test properties`.
mod common;

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use common::{Calls, Tracked, Tracker};
use futures::stream::BoxStream;
use futures::{StreamExt, stream};
use par_imap::ParImapExt;
use proptest::prelude::*;
use tokio_util::sync::CancellationToken;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum FailKind {
    Err,
    Panic,
}

#[derive(Debug, Clone, Copy)]
enum Pattern {
    Uniform,
    /// Every 10th item takes 20 times longer.
    Skewed,
    /// Item 0 takes 50 times longer than the rest.
    SlowHead,
}

#[derive(Debug, Clone)]
struct Case {
    len: usize,
    limit: usize,
    window: Option<usize>,
    batch: usize,
    ordered: bool,
    blocking: bool,
    fallible: bool,
    pattern: Pattern,
    failure: Option<(usize, FailKind)>,
    drop_after: Option<usize>,
    cancel_after: Option<usize>,
    /// The index of the one item too slow for the timeout.
    timeout_at: Option<usize>,
}

impl Case {
    /// Time units (µs for blocking, ms for async) item `index` takes.
    fn units(&self, index: usize) -> u64 {
        if self.timeout_at == Some(index) {
            return 1_000_000;
        }
        match self.pattern {
            Pattern::Uniform => 1,
            Pattern::Skewed if index % 10 == 0 => 20,
            Pattern::Skewed => 1,
            Pattern::SlowHead if index == 0 => 50,
            Pattern::SlowHead => 1,
        }
    }

    fn window(&self) -> usize {
        self.window.unwrap_or(2 * self.limit * self.batch)
    }

    /// The first index the map must fail at, if it runs to its end: the
    /// lowest of the failure and the timed-out item.
    fn failing_index(&self) -> Option<usize> {
        let failure = self.failure.map(|(index, _)| index);
        match (failure, self.timeout_at) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }
}

fn case(blocking: bool) -> impl Strategy<Value = Case> {
    let max_len: usize = if blocking { 600 } else { 2000 };
    (
        0..max_len,
        1..=8_usize,
        prop_oneof![Just(None), (0..=3_usize).prop_map(Some)],
        if blocking {
            (1..=8_usize).boxed()
        } else {
            Just(1).boxed()
        },
        any::<bool>(),
        any::<bool>(),
        prop_oneof![
            Just(Pattern::Uniform),
            Just(Pattern::Skewed),
            Just(Pattern::SlowHead)
        ],
        proptest::option::weighted(0.5, (any::<prop::sample::Index>(), any::<bool>())),
        proptest::option::weighted(0.25, any::<prop::sample::Index>()),
        proptest::option::weighted(0.2, any::<prop::sample::Index>()),
        proptest::option::weighted(0.2, any::<prop::sample::Index>()),
    )
        .prop_map(
            move |(
                len,
                limit,
                extra,
                batch,
                ordered,
                fallible,
                pattern,
                failure,
                drop_after,
                cancel_after,
                timeout_at,
            )| {
                let pick = |index: prop::sample::Index| (len > 0).then(|| index.index(len));
                Case {
                    len,
                    limit,
                    window: extra.map(|extra| limit + extra * limit),
                    batch,
                    ordered,
                    blocking,
                    fallible,
                    pattern,
                    failure: failure.and_then(|(index, err)| {
                        // Plain variants fail only by panicking.
                        let kind = if err && fallible {
                            FailKind::Err
                        } else {
                            FailKind::Panic
                        };
                        pick(index).map(|index| (index, kind))
                    }),
                    drop_after: drop_after.and_then(pick),
                    cancel_after: cancel_after.and_then(pick),
                    // DESIGN.md: the deadline is per item, also inside a batch.
                    timeout_at: timeout_at.and_then(pick),
                }
            },
        )
}

/// What the consumer saw, one entry per item.
#[derive(Debug, Clone, PartialEq)]
enum Seen {
    Value(usize),
    Failed { index: usize, kind: &'static str },
}

#[derive(Debug)]
enum TestError {
    Mine(usize),
    Machinery(par_imap::Error),
}

impl From<par_imap::Error> for TestError {
    fn from(error: par_imap::Error) -> Self {
        TestError::Machinery(error)
    }
}

fn seen(result: Result<Tracked, TestError>) -> Seen {
    match result {
        Ok(output) => Seen::Value(output.value),
        Err(TestError::Mine(index)) => Seen::Failed { index, kind: "err" },
        Err(TestError::Machinery(error)) => Seen::Failed {
            index: error.index(),
            kind: if error.is_panic() {
                "panic"
            } else if error.is_timeout() {
                "timeout"
            } else {
                "cancelled"
            },
        },
    }
}

/// What the consumer saw, from a plain variant (whose mapper only panics).
fn seen_plain(result: Result<Result<Tracked, ()>, par_imap::Error>) -> Seen {
    seen(
        result
            .map_err(TestError::from)
            .map(|ok| ok.expect("plain cases only panic")),
    )
}

/// Everything a case's mapper and input report.
#[derive(Clone, Default)]
struct Probe {
    tracker: Tracker,
    calls: Calls,
    pulled: Arc<AtomicUsize>,
    yielded: Arc<AtomicUsize>,
    lookahead: Arc<AtomicUsize>,
    /// Set once the consumer saw the end or dropped the stream.
    over: Arc<AtomicBool>,
    started_after_over: Arc<AtomicUsize>,
}

/// The per-item timeout, when a case has one: far above every item's time
/// (µs blocking, ms async) but the slow one's.
const TIMEOUT_UNITS: u64 = 200;

/// Builds the stream of `case` over tracked inputs, normalised to one item type.
fn build(case: &Case, probe: &Probe, token: &CancellationToken) -> BoxStream<'static, Seen> {
    let (tracker, pulled, yielded, lookahead) = (
        probe.tracker.clone(),
        probe.pulled.clone(),
        probe.yielded.clone(),
        probe.lookahead.clone(),
    );
    let input = stream::iter(0..case.len).map(move |index| {
        let now = pulled.fetch_add(1, Ordering::SeqCst) + 1;
        lookahead.fetch_max(now - yielded.load(Ordering::SeqCst), Ordering::SeqCst);
        tracker.track(index)
    });

    // The mapper's body, shared by every variant: records the call, takes its
    // time, fails where the case says so.
    let (calls, outputs, over, late) = (
        probe.calls.clone(),
        probe.tracker.clone(),
        probe.over.clone(),
        probe.started_after_over.clone(),
    );
    let failure = case.failure;
    let enter = move |item: &Tracked| {
        if over.load(Ordering::SeqCst) {
            late.fetch_add(1, Ordering::SeqCst);
        }
        calls.enter(item.value)
    };
    let finish = move |item: Tracked| -> Result<Tracked, TestError> {
        match failure {
            Some((index, FailKind::Panic)) if index == item.value => panic!("item {index} panics"),
            Some((index, FailKind::Err)) if index == item.value => Err(TestError::Mine(index)),
            _ => Ok(outputs.track(item.value * 2 + 1)),
        }
    };
    let case_for_units = case.clone();
    let units = move |index: usize| case_for_units.units(index);

    macro_rules! configure {
        ($stream:expr) => {{
            let mut stream = $stream;
            if let Some(window) = case.window {
                stream = stream.window(window);
            }
            if case.timeout_at.is_some() {
                stream = stream.timeout(Duration::from_millis(TIMEOUT_UNITS));
            }
            stream.cancel_token(token.clone())
        }};
    }
    macro_rules! batched {
        ($stream:expr) => {
            configure!($stream.batch(case.batch))
        };
    }

    if case.blocking {
        let mapper = move |item: Tracked| {
            let _running = enter(&item);
            let spin = Duration::from_micros(units(item.value));
            let start = std::time::Instant::now();
            // Busy for its time, or until nobody wants it (a timeout).
            while start.elapsed() < spin && !par_imap::is_cancelled() {
                std::thread::sleep(Duration::from_micros(20).min(spin));
            }
            finish(item)
        };
        let plain = {
            let mapper = mapper.clone();
            move |item: Tracked| mapper(item).map_err(|_| unreachable!("plain cases only panic"))
        };
        match (case.ordered, case.fallible) {
            (true, true) => batched!(input.try_par_imap(case.limit, mapper))
                .map(seen)
                .boxed(),
            (false, true) => batched!(input.try_par_imap_unordered(case.limit, mapper))
                .map(seen)
                .boxed(),
            (true, false) => batched!(input.par_imap(case.limit, plain))
                .map(seen_plain)
                .boxed(),
            (false, false) => batched!(input.par_imap_unordered(case.limit, plain))
                .map(seen_plain)
                .boxed(),
        }
    } else {
        let mapper = move |item: Tracked| {
            let running = enter(&item);
            let wait = Duration::from_millis(units(item.value));
            let finish = finish.clone();
            async move {
                let _running = running;
                tokio::time::sleep(wait).await;
                finish(item)
            }
        };
        let plain = {
            let mapper = mapper.clone();
            move |item: Tracked| {
                let call = mapper(item);
                async move { call.await.map_err(|_| ()) }
            }
        };
        match (case.ordered, case.fallible) {
            (true, true) => configure!(input.try_par_imap_async(case.limit, mapper))
                .map(seen)
                .boxed(),
            (false, true) => configure!(input.try_par_imap_async_unordered(case.limit, mapper))
                .map(seen)
                .boxed(),
            (true, false) => configure!(input.par_imap_async(case.limit, plain))
                .map(seen_plain)
                .boxed(),
            (false, false) => configure!(input.par_imap_async_unordered(case.limit, plain))
                .map(seen_plain)
                .boxed(),
        }
    }
}

/// Runs the consumer: takes items until the end, or drops the stream after
/// `drop_after`, and fires the token after `cancel_after`.
async fn consume(case: &Case, probe: &Probe) -> Vec<Seen> {
    let token = CancellationToken::new();
    let mut results = build(case, probe, &token);
    let mut out = Vec::new();
    loop {
        if case.drop_after == Some(out.len()) {
            break;
        }
        if case.cancel_after == Some(out.len()) {
            token.cancel();
        }
        match results.next().await {
            Some(item) => {
                probe.yielded.fetch_add(1, Ordering::SeqCst);
                out.push(item);
            }
            None => break,
        }
    }
    drop(results);
    probe.over.store(true, Ordering::SeqCst);
    out
}

/// Checks every invariant on what a case did.
fn check(case: &Case, probe: &Probe, out: &[Seen]) -> Result<(), TestCaseError> {
    let expected = |index: usize| index * 2 + 1;
    let errors: Vec<&Seen> = out
        .iter()
        .filter(|seen| matches!(seen, Seen::Failed { .. }))
        .collect();
    prop_assert!(errors.len() <= 1, "more than one error: {out:?}");
    if let Some(error) = errors.first() {
        prop_assert_eq!(Some(*error), out.last(), "an error ends the stream");
    }
    let stopped_early = case.drop_after.is_some() || case.cancel_after.is_some();
    let kind_allowed = |index: usize, kind: &str| -> bool {
        let failure = case.failure.is_some_and(|(at, fail)| {
            at == index
                && kind
                    == if fail == FailKind::Err {
                        "err"
                    } else {
                        "panic"
                    }
        });
        let timeout = case.timeout_at == Some(index) && kind == "timeout";
        let cancelled = case.cancel_after.is_some() && kind == "cancelled";
        failure || timeout || cancelled
    };

    if case.ordered {
        for (position, seen) in out.iter().enumerate() {
            match seen {
                Seen::Value(value) => prop_assert_eq!(*value, expected(position), "input order"),
                Seen::Failed { index, kind } => {
                    prop_assert_eq!(*index, position, "the error's index is its position");
                    prop_assert!(kind_allowed(*index, kind), "unexpected error {seen:?}");
                }
            }
        }
        if !stopped_early {
            match case.failing_index() {
                Some(first) => {
                    prop_assert_eq!(
                        out.len(),
                        first + 1,
                        "items 0..k, then k's failure: {:?}",
                        out.last()
                    );
                }
                None => prop_assert_eq!(out.len(), case.len, "every item"),
            }
        }
    } else {
        let mut values = HashSet::new();
        for seen in out {
            match seen {
                Seen::Value(value) => {
                    prop_assert!(
                        value % 2 == 1 && value / 2 < case.len,
                        "foreign item {value}"
                    );
                    prop_assert!(values.insert(*value), "duplicate {value}");
                }
                Seen::Failed { index, kind } => {
                    prop_assert!(kind_allowed(*index, kind), "unexpected error {seen:?}")
                }
            }
        }
        if !stopped_early && case.failing_index().is_none() {
            prop_assert_eq!(values.len(), case.len, "every item");
        }
        if !stopped_early && case.failing_index().is_some() {
            prop_assert_eq!(errors.len(), 1, "the failure comes out");
        }
    }

    prop_assert!(
        probe.calls.peak() <= case.limit,
        "peak {} > limit {}",
        probe.calls.peak(),
        case.limit
    );
    prop_assert!(
        probe.lookahead.load(Ordering::SeqCst) <= case.window(),
        "lookahead {} > window {}",
        probe.lookahead.load(Ordering::SeqCst),
        case.window()
    );
    Ok(())
}

fn cases() -> u32 {
    std::env::var("PAR_IMAP_CASES")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(256)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(), failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn async_invariants_hold(case in case(false)) {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .start_paused(true)
            .build()
            .unwrap();
        let probe = Probe::default();
        let out = runtime.block_on(async {
            // In paused time a hang jumps straight to this deadline.
            tokio::time::timeout(Duration::from_secs(24 * 3600), consume(&case, &probe))
                .await
                .expect("the case hung")
        });
        check(&case, &probe, &out)?;
        // Aborted tasks are dropped by the runtime: let it run once more.
        runtime.block_on(tokio::task::yield_now());
        drop(runtime);
        prop_assert_eq!(probe.started_after_over.load(Ordering::SeqCst), 0, "a call started after the end");
        prop_assert_eq!(probe.calls.running(), 0);
        prop_assert_eq!(probe.tracker.alive(), 0, "values never dropped");
    }

    #[test]
    fn blocking_invariants_hold(case in case(true)) {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_time()
            .build()
            .unwrap();
        let probe = Probe::default();
        let out = runtime.block_on(async {
            tokio::time::timeout(Duration::from_secs(60), consume(&case, &probe))
                .await
                .expect("the case hung")
        });
        check(&case, &probe, &out)?;
        // Blocking calls still running end on their own, and drop their output.
        probe.tracker.wait_all_dropped();
        common::eventually("running calls to end", || probe.calls.running() == 0);
        // A worker may be between taking a queued call and entering the
        // mapper when the stream goes; no more than one per worker.
        prop_assert!(probe.started_after_over.load(Ordering::SeqCst) <= case.limit);
        drop(runtime);
    }
}
