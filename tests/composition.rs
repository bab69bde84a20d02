//! Property tests of composition (DESIGN.md semantics 1–8 across maps):
//! two or three maps share one `Semaphore` budget of 1–3 permits, and a
//! consumer interleaves them (`zip`, `select`, alternating `next()`, or
//! taking a permit of the budget itself between items). Each map draws its
//! own order, variant, limit, window, batch (blocking: adaptive sizes or
//! `.batch(k)`), `.keep_going()`, failure and pattern; the case
//! draws one deadline for all (none, a per-item timeout with one slow
//! outlier, `Duration::MAX`, `from_secs(u64::MAX)`, `ZERO`), an early drop,
//! and a token cancelling one map at a random point. A second property
//! shuts a map's runtime down at a random point and polls it again from
//! another runtime.
//!
//! Every case checks what it can observe: order; the window (items pulled
//! and not yet yielded, from an instrumented input); the limit per map and
//! the budget across maps (counters of running calls); fail-fast (values
//! `0..k` then `k`'s failure, nothing started once the consumer saw the
//! end; with keep_going, every item once, failures at their place); a cancellation names the lowest index never yielded; values
//! dropped exactly once; no hang (every wait bounded); the budget whole
//! again once the maps have ended, before they are dropped.
//!
//! Async-only cases run on a current-thread runtime with paused time;
//! cases with blocking maps on a real 2-thread runtime with µs durations.
//! `PAR_IMAP_CASES` sets the cases per mode (default 256, what CI runs).
mod common;
#[path = "common/variants.rs"]
mod variants;

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{Calls, Tracker};
use futures::stream::BoxStream;
use futures::{StreamExt, stream};
use proptest::prelude::*;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use variants::{FailKind, Map, Seen, With};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Deadline {
    None,
    /// A per-item timeout of `TIMEOUT_UNITS`, one item far slower.
    Outlier,
    Max,
    SecsMax,
    Zero,
}

impl Deadline {
    fn duration(self, real: bool) -> Option<Duration> {
        match self {
            Deadline::None => None,
            // Real time: wide enough that a worker starved by a loaded
            // machine does not time out an ordinary item (100 ms did, once,
            // in a 20 000-case run beside a CI build).
            Deadline::Outlier if real => Some(Duration::from_millis(500)),
            Deadline::Outlier => Some(Duration::from_millis(TIMEOUT_UNITS)),
            Deadline::Max => Some(Duration::MAX),
            Deadline::SecsMax => Some(Duration::from_secs(u64::MAX)),
            Deadline::Zero => Some(Duration::ZERO),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Consumer {
    Zip,
    Select,
    Alternate,
    /// Alternating `next()`, and a permit of the budget taken and given
    /// back after every item.
    PermitBetween,
}

#[derive(Debug, Clone)]
struct MapCase {
    map: Map,
    /// Item 0 takes 50 units, or every 7th item 10 units.
    slow_head: bool,
    skewed: bool,
    /// The item too slow for the `Outlier` deadline.
    outlier: Option<usize>,
}

impl MapCase {
    fn units(&self, index: usize) -> u64 {
        if self.outlier == Some(index) {
            1_000_000
        } else if self.slow_head && index == 0 {
            50
        } else if self.skewed && index % 7 == 0 {
            10
        } else {
            1
        }
    }

    fn failing_index(&self) -> Option<usize> {
        let failure = self.map.failure.map(|(index, _)| index);
        match (failure, self.outlier) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }
}

#[derive(Debug, Clone)]
struct Case {
    maps: Vec<MapCase>,
    permits: usize,
    consumer: Consumer,
    deadline: Deadline,
    /// Drop everything after this many items in total.
    drop_after: Option<usize>,
    /// Cancel map `.0`'s token after `.1` items in total.
    cancel: Option<(usize, usize)>,
    /// A real multi-thread runtime (some map is blocking), or paused time.
    real: bool,
}

/// A per-item timeout far above every item's time but the outlier's.
const TIMEOUT_UNITS: u64 = 200;

/// No case may wait longer than this for anything: generous in real time,
/// free in paused time.
const BOUND: Duration = Duration::from_secs(10);

fn map_case(real: bool, deadline: Deadline) -> impl Strategy<Value = MapCase> {
    let max_len: usize = if real { 40 } else { 150 };
    (
        0..max_len,
        1..=3_usize,
        prop_oneof![Just(None), (0..=2_usize).prop_map(Some)],
        prop_oneof![1 => Just(None), 3 => (1..=4_usize).prop_map(Some)],
        (any::<bool>(), proptest::bool::weighted(0.3)),
        if real {
            any::<bool>().boxed()
        } else {
            Just(false).boxed()
        },
        any::<bool>(),
        (any::<bool>(), any::<bool>()),
        proptest::option::weighted(0.3, (any::<prop::sample::Index>(), any::<bool>())),
        proptest::option::weighted(0.7, any::<prop::sample::Index>())
            .prop_map(move |outlier| outlier.filter(|_| deadline == Deadline::Outlier)),
    )
        .prop_map(
            move |(
                len,
                limit,
                extra,
                batch,
                (ordered, keep_going),
                blocking,
                fallible,
                (slow_head, skewed),
                failure,
                outlier,
            )| {
                MapCase {
                    map: Map {
                        len,
                        limit,
                        window: extra.map(|extra| limit + extra * limit),
                        batch: if blocking { batch } else { Some(1) },
                        ordered,
                        blocking,
                        fallible,
                        failure: variants::failure(failure, len, fallible),
                        keep_going,
                        bombs: Vec::new(),
                    },
                    slow_head,
                    skewed,
                    outlier: outlier.and_then(|index| variants::pick(index, len)),
                }
            },
        )
}

fn case(real: bool) -> impl Strategy<Value = Case> {
    prop_oneof![
        3 => Just(Deadline::None),
        3 => Just(Deadline::Outlier),
        1 => Just(Deadline::Max),
        1 => Just(Deadline::SecsMax),
        1 => Just(Deadline::Zero),
    ]
    .prop_flat_map(move |deadline| {
        (
            proptest::collection::vec(map_case(real, deadline), 2..=3),
            1..=3_usize,
            prop_oneof![
                Just(Consumer::Zip),
                Just(Consumer::Select),
                Just(Consumer::Alternate),
                Just(Consumer::PermitBetween),
            ],
            Just(deadline),
            proptest::option::weighted(0.15, 0..100_usize),
            proptest::option::weighted(0.25, (0..3_usize, 0..100_usize)),
        )
    })
    .prop_map(
        move |(maps, permits, consumer, deadline, drop_after, cancel)| {
            let count = maps.len();
            Case {
                real: real && maps.iter().any(|drawn| drawn.map.blocking),
                maps,
                permits,
                consumer,
                deadline,
                drop_after,
                cancel: cancel.map(|(map, after)| (map % count, after)),
            }
        },
    )
}

/// Everything one map's input and mapper report, and what it yielded.
#[derive(Clone, Default)]
struct Probe {
    /// Its `over` is set once the consumer saw this map's error or end, or
    /// dropped it.
    map: variants::Probe,
    log: Arc<Mutex<Vec<Seen>>>,
    ended: Arc<AtomicBool>,
}

/// The probes of a whole case.
#[derive(Clone, Default)]
struct Probes {
    tracker: Tracker,
    /// Calls running across all maps: at most one per permit.
    budget_calls: Calls,
    maps: Vec<Probe>,
}

/// Builds map `m` of `case`, normalised to one item type and logged.
fn build(
    case: &Case,
    m: usize,
    probes: &Probes,
    budget: &Arc<Semaphore>,
    token: &CancellationToken,
) -> BoxStream<'static, Seen> {
    let drawn = &case.maps[m];
    let probe = &probes.maps[m];
    let for_units = drawn.clone();
    let with = With {
        tracker: &probes.tracker,
        budget: Some((budget, &probes.budget_calls)),
        timeout: case.deadline.duration(case.real),
        token,
        real: case.real,
        hang: None,
        stats: false,
    };
    let results = variants::build(
        &drawn.map,
        move |index| for_units.units(index),
        &probe.map,
        &with,
    );
    logged(results, probe.clone(), drawn.map.keep_going)
}

/// Records what a map yields, and its end, as the consumer takes them.
fn logged(
    mut results: BoxStream<'static, Seen>,
    probe: Probe,
    keep_going: bool,
) -> BoxStream<'static, Seen> {
    stream::poll_fn(move |cx| {
        let next = results.poll_next_unpin(cx);
        match &next {
            std::task::Poll::Ready(Some(seen)) => {
                probe.map.yielded.fetch_add(1, Ordering::SeqCst);
                // An error ends the map, but with keep_going only a
                // cancellation does.
                if let Seen::Failed { kind, .. } = seen
                    && (!keep_going || *kind == "cancelled")
                {
                    probe.map.over.store(true, Ordering::SeqCst);
                }
                probe.log.lock().unwrap().push(seen.clone());
            }
            std::task::Poll::Ready(None) => {
                probe.map.over.store(true, Ordering::SeqCst);
                probe.ended.store(true, Ordering::SeqCst);
            }
            std::task::Poll::Pending => {}
        }
        next
    })
    .boxed()
}

/// What went wrong while consuming, if anything.
type Outcome = Result<(), String>;

/// Runs the consumer of `case` over its maps, bounded everywhere.
async fn consume(case: &Case, probes: &Probes, budget: &Arc<Semaphore>) -> Outcome {
    let tokens: Vec<CancellationToken> =
        case.maps.iter().map(|_| CancellationToken::new()).collect();
    let mut maps: Vec<Option<BoxStream<'static, Seen>>> = (0..case.maps.len())
        .map(|m| Some(build(case, m, probes, budget, &tokens[m])))
        .collect();
    let mut taken = 0_usize;
    // Before each item: fire the token or stop, as the case says.
    let before = |taken: usize| -> bool {
        if let Some((map, after)) = case.cancel
            && after == taken
        {
            tokens[map].cancel();
        }
        case.drop_after != Some(taken)
    };
    let hung = |what: &str, taken: usize| Err(format!("hung: {what} after {taken} items"));

    if case.consumer == Consumer::Zip || case.consumer == Consumer::Select {
        let (a, b) = (maps[0].take().unwrap(), maps[1].take().unwrap());
        let mut both: BoxStream<'static, Vec<Seen>> = if case.consumer == Consumer::Zip {
            a.zip(b).map(|(a, b)| vec![a, b]).boxed()
        } else {
            stream::select(a, b).map(|one| vec![one]).boxed()
        };
        loop {
            if !before(taken) {
                return Ok(());
            }
            match tokio::time::timeout(BOUND, both.next()).await {
                Err(_) => return hung("zip/select", taken),
                Ok(None) => break,
                Ok(Some(items)) => taken += items.len(),
            }
        }
        drop(both);
    }
    // Alternate over the maps left, until each has ended.
    let permit_between = case.consumer == Consumer::PermitBetween;
    while maps.iter().any(Option::is_some) {
        for (slot, map) in maps.iter_mut().enumerate() {
            let Some(map) = map.as_mut() else {
                continue;
            };
            if probes.maps[slot].ended.load(Ordering::SeqCst) {
                continue;
            }
            if !before(taken) {
                return Ok(());
            }
            match tokio::time::timeout(BOUND, map.next()).await {
                Err(_) => return hung(&format!("map {slot}"), taken),
                Ok(None) => {}
                Ok(Some(_)) => {
                    taken += 1;
                    if permit_between {
                        match tokio::time::timeout(BOUND, budget.acquire()).await {
                            Err(_) => return hung("the consumer's permit", taken),
                            Ok(permit) => drop(permit),
                        }
                    }
                }
            }
        }
        if maps
            .iter()
            .enumerate()
            .all(|(slot, map)| map.is_none() || probes.maps[slot].ended.load(Ordering::SeqCst))
        {
            // Every map left has ended and is still alive: none may hold a
            // permit (a timed-out blocking call may, until it returns).
            let all = u32::try_from(case.permits).unwrap();
            if tokio::time::timeout(BOUND, budget.acquire_many(all))
                .await
                .is_err()
            {
                return Err(format!(
                    "ended maps keep the budget: {} of {} available",
                    budget.available_permits(),
                    case.permits
                ));
            }
            break;
        }
    }
    drop(maps);
    Ok(())
}

/// Checks every invariant of one map, after the case ran.
fn check_map(case: &Case, m: usize, probe: &Probe) -> Result<(), TestCaseError> {
    let drawn = &case.maps[m];
    let map = &drawn.map;
    let out = probe.log.lock().unwrap().clone();
    let expected = |index: usize| index * 2 + 1;
    let cancelled_here = case.cancel.is_some_and(|(target, _)| target == m);
    let errors: Vec<&Seen> = out
        .iter()
        .filter(|seen| matches!(seen, Seen::Failed { .. }))
        .collect();
    let is_cancel = |seen: &Seen| matches!(seen, Seen::Failed { kind, .. } if *kind == "cancelled");
    if !map.keep_going {
        prop_assert!(errors.len() <= 1, "map {m}: more than one error: {out:?}");
    }
    if let Some(error) = errors
        .iter()
        .find(|seen| !map.keep_going || is_cancel(seen))
    {
        prop_assert_eq!(Some(*error), out.last(), "map {}: this error ends it", m);
    }
    // The lowest index never yielded (a value, or with keep_going a
    // failure at its place), when the error came.
    let yielded: HashSet<usize> = out
        .iter()
        .filter_map(|seen| match seen {
            Seen::Value(value) => Some(value / 2),
            Seen::Failed { index, .. } if !is_cancel(seen) => Some(*index),
            Seen::Failed { .. } => None,
        })
        .collect();
    let lowest_unyielded = (0..).find(|index| !yielded.contains(index)).unwrap();
    let allowed = |index: usize, kind: &str| -> bool {
        let failure = map.failure.is_some_and(|(at, fail)| {
            at == index
                && kind
                    == if fail == FailKind::Err {
                        "err"
                    } else {
                        "panic"
                    }
        });
        let timeout =
            kind == "timeout" && (drawn.outlier == Some(index) || case.deadline == Deadline::Zero);
        // Cancellation names the lowest index never yielded, in both orders.
        let cancelled = cancelled_here && kind == "cancelled" && index == lowest_unyielded;
        failure || timeout || cancelled
    };
    for seen in &out {
        if let Seen::Failed { index, kind } = seen {
            prop_assert!(
                allowed(*index, kind),
                "map {m}: unexpected error {seen:?}, lowest unyielded {lowest_unyielded}: {out:?}"
            );
        }
    }
    let ran_to_end = probe.ended.load(Ordering::SeqCst) && !cancelled_here;
    if map.ordered {
        for (position, seen) in out.iter().enumerate() {
            match seen {
                Seen::Value(value) => {
                    prop_assert_eq!(*value, expected(position), "map {}: input order", m)
                }
                Seen::Failed { index, .. } => {
                    prop_assert_eq!(*index, position, "map {}: the error's index", m)
                }
            }
        }
        if ran_to_end {
            match (drawn.failing_index(), case.deadline) {
                _ if map.keep_going => {
                    prop_assert_eq!(out.len(), map.len, "map {}: every item once: {:?}", m, out)
                }
                (_, Deadline::Zero) => {
                    if errors.is_empty() {
                        prop_assert_eq!(out.len(), map.len, "map {}: every item", m);
                    }
                }
                (Some(first), _) => prop_assert_eq!(
                    out.len(),
                    first + 1,
                    "map {}: items 0..k, then k's failure: {:?}",
                    m,
                    out
                ),
                (None, _) => prop_assert_eq!(out.len(), map.len, "map {}: every item", m),
            }
        }
    } else {
        prop_assert_eq!(
            yielded.len(),
            out.iter().filter(|seen| !is_cancel(seen)).count(),
            "map {}: a duplicate: {:?}",
            m,
            out
        );
        prop_assert!(
            yielded.iter().all(|&index| index < map.len),
            "map {m}: foreign item"
        );
        if ran_to_end {
            if map.keep_going {
                prop_assert_eq!(yielded.len(), map.len, "map {}: every item once", m);
            } else if drawn.failing_index().is_some() {
                prop_assert_eq!(errors.len(), 1, "map {}: the failure comes out", m);
            } else if case.deadline != Deadline::Zero || errors.is_empty() {
                prop_assert_eq!(yielded.len(), map.len, "map {}: every item", m);
            }
        }
    }
    prop_assert!(
        probe.map.calls.peak() <= map.limit,
        "map {m}: peak {} > limit {}",
        probe.map.calls.peak(),
        map.limit
    );
    prop_assert!(
        probe.map.lookahead.load(Ordering::SeqCst) <= map.window(),
        "map {m}: lookahead {} > window {}",
        probe.map.lookahead.load(Ordering::SeqCst),
        map.window()
    );
    // A worker may be between taking a queued call and entering the mapper
    // when the map ends, and on a multi-thread runtime a task may be
    // entering its mapper as it is aborted: at most one per slot.
    let late = probe.map.started_after_over.load(Ordering::SeqCst);
    if case.real {
        prop_assert!(
            late <= map.limit,
            "map {m}: {late} calls started after the end"
        );
    } else {
        prop_assert_eq!(late, 0, "map {}: a call started after the end", m);
    }
    Ok(())
}

fn check(case: &Case, probes: &Probes, budget: &Semaphore) -> Result<(), TestCaseError> {
    for m in 0..case.maps.len() {
        check_map(case, m, &probes.maps[m])?;
    }
    prop_assert!(
        probes.budget_calls.peak() <= case.permits,
        "{} calls ran at once on a budget of {}",
        probes.budget_calls.peak(),
        case.permits
    );
    prop_assert_eq!(
        budget.available_permits(),
        case.permits,
        "the budget came back whole"
    );
    prop_assert_eq!(probes.tracker.alive(), 0, "values never dropped");
    Ok(())
}

fn probes(case: &Case) -> Probes {
    Probes {
        maps: case.maps.iter().map(|_| Probe::default()).collect(),
        ..Probes::default()
    }
}

fn cases() -> u32 {
    ["PAR_IMAP_CASES", "PROPTEST_CASES"]
        .iter()
        .find_map(|name| std::env::var(name).ok()?.parse().ok())
        .unwrap_or(256)
}

/// Runs `case` on the runtime its maps need, then checks it.
fn run(case: &Case) -> Result<(), TestCaseError> {
    let probes = probes(case);
    let budget = Arc::new(Semaphore::new(case.permits));
    if case.real {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_time()
            .build()
            .unwrap();
        let outcome = runtime.block_on(consume(case, &probes, &budget));
        prop_assert!(outcome.is_ok(), "{}", outcome.unwrap_err());
        // Blocking calls still running end on their own, then drop their
        // output and give their permit back.
        let deadline = std::time::Instant::now() + BOUND;
        while (probes.tracker.alive() > 0
            || budget.available_permits() < case.permits
            || probes.budget_calls.running() > 0)
            && std::time::Instant::now() < deadline
        {
            std::thread::sleep(Duration::from_millis(1));
        }
        drop(runtime);
    } else {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .start_paused(true)
            .build()
            .unwrap();
        let outcome = runtime.block_on(consume(case, &probes, &budget));
        prop_assert!(outcome.is_ok(), "{}", outcome.unwrap_err());
        // Aborted tasks are dropped by the runtime: let it run once more.
        runtime.block_on(tokio::task::yield_now());
        drop(runtime);
    }
    check(case, &probes, &budget)
}

/// Takes `first` items of one map on a runtime, shuts that runtime down,
/// then drains the map from another: no panic, no hang, and an end by a
/// cancellation at the lowest index never yielded, if not by its own end.
fn run_shutdown(case: &Case, first: usize) -> Result<(), TestCaseError> {
    let probes = probes(case);
    let budget = Arc::new(Semaphore::new(case.permits));
    let token = CancellationToken::new();
    let mut map = build(case, 0, &probes, &budget, &token);
    let before = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let taken = before.block_on(async {
        for _ in 0..first {
            match tokio::time::timeout(BOUND, map.next()).await {
                Err(_) => return Err("hung before the shutdown".to_string()),
                Ok(None) => break,
                Ok(Some(_)) => {}
            }
        }
        Ok(())
    });
    prop_assert!(taken.is_ok(), "{}", taken.unwrap_err());
    before.shutdown_background();
    let after = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let drained = after.block_on(async {
        tokio::spawn(async move {
            loop {
                match tokio::time::timeout(BOUND, map.next()).await {
                    Err(_) => return Err("hung after the shutdown".to_string()),
                    Ok(None) => return Ok(()),
                    Ok(Some(_)) => {}
                }
            }
        })
        .await
    });
    match drained {
        Err(panic) => prop_assert!(false, "polled from another runtime: {panic}"),
        Ok(outcome) => prop_assert!(outcome.is_ok(), "{}", outcome.unwrap_err()),
    }
    let deadline = std::time::Instant::now() + BOUND;
    while (probes.tracker.alive() > 0 || budget.available_permits() < case.permits)
        && std::time::Instant::now() < deadline
    {
        std::thread::sleep(Duration::from_millis(1));
    }
    drop(after);
    check(case, &probes, &budget)
}

/// One map of a real-runtime case, a runtime shutdown after `0..30` items.
fn shutdown_case() -> impl Strategy<Value = (Case, usize)> {
    (case(true), 0..30_usize).prop_map(|(mut case, first)| {
        case.maps.truncate(1);
        case.real = true;
        case.drop_after = None;
        // A shutdown may end the map with a cancellation, as a token would.
        case.cancel = Some((0, usize::MAX));
        (case, first)
    })
}

proptest! {
    // A hang costs `BOUND` of real time in blocking cases: cap the shrinking.
    #![proptest_config(ProptestConfig {
        cases: cases(),
        failure_persistence: None,
        max_shrink_time: 120_000,
        ..ProptestConfig::default()
    })]

    #[test]
    fn async_maps_on_one_budget_compose(case in case(false)) {
        run(&case)?;
    }

    #[test]
    fn blocking_and_async_maps_on_one_budget_compose(case in case(true)) {
        run(&case)?;
    }

    #[test]
    fn a_map_polled_again_after_its_runtime_shut_down_ends(
        (case, first) in shutdown_case()
    ) {
        run_shutdown(&case, first)?;
    }
}
