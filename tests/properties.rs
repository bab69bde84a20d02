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
#[path = "common/variants.rs"]
mod variants;

use std::collections::HashSet;
use std::sync::atomic::Ordering;
use std::time::Duration;

use common::Tracker;
use futures::StreamExt;
use futures::stream::BoxStream;
use proptest::prelude::*;
use tokio_util::sync::CancellationToken;
use variants::{FailKind, Map, Seen, With};

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
    map: Map,
    pattern: Pattern,
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

    /// The first index the map must fail at, if it runs to its end: the
    /// lowest of the failure and the timed-out item.
    fn failing_index(&self) -> Option<usize> {
        let failure = self.map.failure.map(|(index, _)| index);
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
                let pick = |index| variants::pick(index, len);
                Case {
                    map: Map {
                        len,
                        limit,
                        window: extra.map(|extra| limit + extra * limit),
                        batch,
                        ordered,
                        blocking,
                        fallible,
                        failure: variants::failure(failure, len, fallible),
                    },
                    pattern,
                    drop_after: drop_after.and_then(pick),
                    cancel_after: cancel_after.and_then(pick),
                    // DESIGN.md: the deadline is per item, also inside a batch.
                    timeout_at: timeout_at.and_then(pick),
                }
            },
        )
}

/// Everything a case's input and mapper report.
#[derive(Clone, Default)]
struct Probe {
    tracker: Tracker,
    map: variants::Probe,
}

/// The per-item timeout, when a case has one: far above every item's time
/// (µs blocking, ms async) but the slow one's.
const TIMEOUT_UNITS: u64 = 200;

/// Builds the stream of `case` over tracked inputs, normalised to one item
/// type. Async cases run in paused time.
fn build(case: &Case, probe: &Probe, token: &CancellationToken) -> BoxStream<'static, Seen> {
    let for_units = case.clone();
    let with = With {
        tracker: &probe.tracker,
        budget: None,
        timeout: case
            .timeout_at
            .map(|_| Duration::from_millis(TIMEOUT_UNITS)),
        token,
        real: false,
    };
    variants::build(
        &case.map,
        move |index| for_units.units(index),
        &probe.map,
        &with,
    )
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
                probe.map.yielded.fetch_add(1, Ordering::SeqCst);
                out.push(item);
            }
            None => break,
        }
    }
    drop(results);
    probe.map.over.store(true, Ordering::SeqCst);
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
        let failure = case.map.failure.is_some_and(|(at, fail)| {
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

    if case.map.ordered {
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
                None => prop_assert_eq!(out.len(), case.map.len, "every item"),
            }
        }
    } else {
        let mut values = HashSet::new();
        for seen in out {
            match seen {
                Seen::Value(value) => {
                    prop_assert!(
                        value % 2 == 1 && value / 2 < case.map.len,
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
            prop_assert_eq!(values.len(), case.map.len, "every item");
        }
        if !stopped_early && case.failing_index().is_some() {
            prop_assert_eq!(errors.len(), 1, "the failure comes out");
        }
    }

    prop_assert!(
        probe.map.calls.peak() <= case.map.limit,
        "peak {} > limit {}",
        probe.map.calls.peak(),
        case.map.limit
    );
    prop_assert!(
        probe.map.lookahead.load(Ordering::SeqCst) <= case.map.window(),
        "lookahead {} > window {}",
        probe.map.lookahead.load(Ordering::SeqCst),
        case.map.window()
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
        prop_assert_eq!(probe.map.started_after_over.load(Ordering::SeqCst), 0, "a call started after the end");
        prop_assert_eq!(probe.map.calls.running(), 0);
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
        common::eventually("running calls to end", || probe.map.calls.running() == 0);
        // A worker may be between taking a queued call and entering the
        // mapper when the stream goes; no more than one per worker.
        prop_assert!(probe.map.started_after_over.load(Ordering::SeqCst) <= case.map.limit);
        drop(runtime);
    }
}
