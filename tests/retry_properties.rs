//! `.retry` as a property (DESIGN, "For services"): over random lengths,
//! limits, orders, kinds, per-item failure counts (as `Err`s, panics, or
//! attempts that hang past a `.timeout`),
//! attempt budgets, backoffs with and without jitter, `.key_order` keys,
//! `.keep_going`, a shared budget, and drops and cancellations, every item
//! makes exactly the attempts the policy allows, succeeds or fails as its
//! failures say, results keep their order, no more than `limit` attempts
//! run at once, a key's attempts never overlap and start in input order,
//! `Snapshot::retried` counts the attempts after the first, nothing waits
//! or runs at the end, the budget gets all its permits back, and every
//! value (originals and clones) is dropped exactly once.
//!
//! Async cases run in paused time (backoffs of up to a second cost
//! nothing); blocking cases in real time with backoffs of a few
//! milliseconds. `PAR_IMAP_CASES` sets the number of cases (default 128).
use std::collections::HashMap;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::{FutureExt, StreamExt, stream};
use par_imap::{ParImapExt, Retry};
use proptest::prelude::*;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

/// A value that counts how many of its kind are alive, clones included.
struct Counted {
    index: usize,
    key: usize,
    alive: Arc<AtomicUsize>,
}

impl Clone for Counted {
    fn clone(&self) -> Self {
        self.alive.fetch_add(1, Ordering::SeqCst);
        Counted {
            index: self.index,
            key: self.key,
            alive: Arc::clone(&self.alive),
        }
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        self.alive.fetch_sub(1, Ordering::SeqCst);
    }
}

/// How a failing attempt fails.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Err,
    Panic,
    /// It runs past the map's `.timeout`.
    Hang,
}

/// The per-attempt timeout of cases whose attempts hang, and how long a
/// hanging blocking attempt sleeps (async ones sleep an hour of paused
/// time). Blocking cases run in real time: an attempt that does not hang
/// takes microseconds, far from the deadline even on a loaded machine.
const TIMEOUT: Duration = Duration::from_millis(30);
const BLOCKING_HANG: Duration = Duration::from_millis(45);

#[derive(Debug, Clone)]
struct Case {
    blocking: bool,
    ordered: bool,
    limit: usize,
    /// Per item: how many of its first attempts fail.
    fails: Vec<u8>,
    /// Per item: its key, with `.key_order`.
    keys: Option<Vec<usize>>,
    attempts: u32,
    /// Failing attempts panic instead of returning `Err`.
    /// How failing attempts fail.
    mode: Mode,
    retry_panics: bool,
    /// Backoff `initial` and `max`, in milliseconds.
    backoff: (u64, u64),
    jitter: bool,
    keep_going: bool,
    budget: bool,
    /// Stop after this many results: drop the map, or cancel its token.
    stop: Option<(usize, bool)>,
}

impl Case {
    fn len(&self) -> usize {
        self.fails.len()
    }

    /// Whether item `index` fails for good, and the attempts it makes when
    /// the map runs to its end.
    fn outcome(&self, index: usize) -> (bool, u32) {
        let fails = u32::from(self.fails[index]);
        if fails == 0 {
            return (false, 1);
        }
        if self.mode == Mode::Panic && !self.retry_panics {
            return (true, 1);
        }
        if fails < self.attempts {
            (false, fails + 1)
        } else {
            (true, self.attempts)
        }
    }
}

fn case() -> impl Strategy<Value = Case> {
    (0..40_usize, 1..5_usize).prop_flat_map(|(len, distinct)| {
        (
            (any::<bool>(), any::<bool>(), 1..4_usize),
            proptest::collection::vec(prop_oneof![3 => Just(0_u8), 2 => 1..5_u8], len),
            proptest::option::of(proptest::collection::vec(0..distinct, len)),
            (
                1..5_u32,
                prop_oneof![Just(Mode::Err), Just(Mode::Panic), Just(Mode::Hang)],
                any::<bool>(),
            ),
            (0..20_u64, 0..40_u64, any::<bool>()),
            (any::<bool>(), any::<bool>()),
            proptest::option::weighted(0.3, (0..len.max(1), any::<bool>())),
        )
            .prop_map(
                |(
                    (blocking, ordered, limit),
                    fails,
                    keys,
                    (attempts, mode, retry_panics),
                    (initial, extra, jitter),
                    (keep_going, budget),
                    stop,
                )| {
                    // Blocking cases run in real time: short waits.
                    let backoff = if blocking {
                        (initial % 3, initial % 3 + extra % 3)
                    } else {
                        (initial * 10, initial * 10 + extra * 10)
                    };
                    Case {
                        blocking,
                        ordered,
                        limit,
                        fails,
                        keys,
                        attempts,
                        mode,
                        retry_panics,
                        backoff,
                        jitter,
                        keep_going,
                        budget,
                        stop,
                    }
                },
            )
    })
}

/// What the mappers saw.
#[derive(Default)]
struct Watch {
    state: Mutex<WatchState>,
}

#[derive(Default)]
struct WatchState {
    running: usize,
    most_running: usize,
    /// Attempts per item.
    attempts: HashMap<usize, u32>,
    /// Per key: attempts running now, and the items whose attempt started, in order.
    key_running: HashMap<usize, usize>,
    key_started: HashMap<usize, Vec<usize>>,
    overlaps: Vec<usize>,
}

impl Watch {
    /// Item `index` starts an attempt: its number.
    fn enter(&self, index: usize, key: Option<usize>) -> u32 {
        let mut state = self.state.lock().unwrap();
        state.running += 1;
        state.most_running = state.most_running.max(state.running);
        if let Some(key) = key {
            let running = state.key_running.entry(key).or_default();
            *running += 1;
            if *running > 1 {
                state.overlaps.push(index);
            }
            state.key_started.entry(key).or_default().push(index);
        }
        let attempt = state.attempts.entry(index).or_default();
        *attempt += 1;
        *attempt
    }

    fn leave(&self, key: Option<usize>) {
        let mut state = self.state.lock().unwrap();
        state.running -= 1;
        if let Some(key) = key {
            *state.key_running.get_mut(&key).unwrap() -= 1;
        }
    }
}

/// Ends an attempt's watch when the attempt ends, however it ends.
struct Leave<'a>(&'a Watch, Option<usize>);

impl Drop for Leave<'_> {
    fn drop(&mut self) {
        self.0.leave(self.1);
    }
}

/// A failed attempt of item `.0`.
#[derive(Debug)]
struct Failed(usize);

impl std::fmt::Display for Failed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "item {} failed", self.0)
    }
}

impl std::error::Error for Failed {}

/// One attempt of item `item`: fails (an `Err`, a panic, or a hang past
/// the timeout) while its attempt is among its first `fails`.
async fn attempt(watch: &Watch, case: &Case, item: &Counted) -> anyhow::Result<usize> {
    let key = case.keys.as_ref().map(|_| item.key);
    let number = watch.enter(item.index, key);
    let _leave = Leave(watch, key);
    if number <= u32::from(case.fails[item.index]) {
        match case.mode {
            Mode::Panic => panic!("item {} attempt {number}", item.index),
            Mode::Err => return Err(Failed(item.index).into()),
            Mode::Hang if case.blocking => std::thread::sleep(BLOCKING_HANG),
            Mode::Hang => tokio::time::sleep(Duration::from_secs(3600)).await,
        }
    }
    Ok(item.index)
}

/// The options every kind takes alike, then boxed, with its stats.
macro_rules! finish {
    ($map:expr, $case:expr, $token:expr, $budget:expr) => {{
        let mut map = $map.cancel_token($token.clone());
        if $case.keys.is_some() {
            map = map.key_order(|item: &Counted| item.key);
        }
        if $case.keep_going {
            map = map.keep_going();
        }
        if $case.budget {
            map = map.semaphore(Arc::clone($budget));
        }
        if $case.mode == Mode::Hang {
            map = map.timeout(TIMEOUT);
        }
        let stats = map.stats();
        (map.boxed(), stats)
    }};
}

struct Run {
    /// Indices yielded as values, in order; whether an error came, and at
    /// which index.
    values: Vec<usize>,
    errors: Vec<usize>,
    stats: par_imap::Stats,
    budget: Arc<Semaphore>,
}

async fn run(case: Arc<Case>, watch: Arc<Watch>, alive: Arc<AtomicUsize>) -> Run {
    let items: Vec<Counted> = (0..case.len())
        .map(|index| {
            alive.fetch_add(1, Ordering::SeqCst);
            Counted {
                index,
                key: case.keys.as_ref().map_or(0, |keys| keys[index]),
                alive: Arc::clone(&alive),
            }
        })
        .collect();
    let mut retry = Retry::<anyhow::Error>::attempts(case.attempts)
        .backoff(
            Duration::from_millis(case.backoff.0),
            Duration::from_millis(case.backoff.1),
        )
        .jitter(case.jitter);
    if case.retry_panics {
        retry = retry.retry_panics();
    }
    let token = CancellationToken::new();
    let budget = Arc::new(Semaphore::new(case.limit));
    let map = {
        let (case, watch) = (Arc::clone(&case), Arc::clone(&watch));
        if case.blocking {
            let mapper = {
                let case = Arc::clone(&case);
                move |item: Counted| futures::executor::block_on(attempt(&watch, &case, &item))
            };
            if case.ordered {
                finish!(
                    stream::iter(items)
                        .try_par_imap(case.limit, mapper)
                        .retry(retry),
                    case,
                    token,
                    &budget
                )
            } else {
                finish!(
                    stream::iter(items)
                        .try_par_imap_unordered(case.limit, mapper)
                        .retry(retry),
                    case,
                    token,
                    &budget
                )
            }
        } else {
            let mapper = {
                let case = Arc::clone(&case);
                move |item: Counted| {
                    let (watch, case) = (Arc::clone(&watch), Arc::clone(&case));
                    async move {
                        tokio::task::yield_now().await;
                        attempt(&watch, &case, &item).await
                    }
                }
            };
            if case.ordered {
                finish!(
                    stream::iter(items)
                        .try_par_imap_async(case.limit, mapper)
                        .retry(retry),
                    case,
                    token,
                    &budget
                )
            } else {
                finish!(
                    stream::iter(items)
                        .try_par_imap_async_unordered(case.limit, mapper)
                        .retry(retry),
                    case,
                    token,
                    &budget
                )
            }
        }
    };
    let (mut map, stats) = map;
    let (mut values, mut errors, mut seen) = (Vec::new(), Vec::new(), 0);
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
            Ok(index) => values.push(index),
            Err(error) => errors.push(match error.downcast_ref::<Failed>() {
                Some(Failed(index)) => *index,
                None => error
                    .downcast_ref::<par_imap::Error>()
                    .map_or(usize::MAX, par_imap::Error::index),
            }),
        }
    }
    drop(map);
    Run {
        values,
        errors,
        stats,
        budget,
    }
}

fn check(case: &Case, watch: &Watch, run: &Run) -> Result<(), TestCaseError> {
    let state = watch.state.lock().unwrap();
    // Taken once the runtime is gone: nothing runs any more.
    let snapshot = run.stats.snapshot();
    prop_assert!(
        state.most_running <= case.limit,
        "{} attempts ran at once, limit {}",
        state.most_running,
        case.limit
    );
    prop_assert!(
        state.overlaps.is_empty(),
        "a key's attempts overlapped: {:?}",
        state.overlaps
    );
    for (key, started) in &state.key_started {
        prop_assert!(
            started.windows(2).all(|pair| pair[0] <= pair[1]),
            "key {key}'s attempts started out of input order: {started:?}"
        );
    }
    // Attempts: never more than the policy allows; exactly that for every
    // item whose result came.
    for (&index, &made) in &state.attempts {
        let (_, expected) = case.outcome(index);
        prop_assert!(
            made <= expected,
            "item {index}: {made} attempts, at most {expected}"
        );
    }
    for &index in run
        .values
        .iter()
        .chain(run.errors.iter().filter(|&&i| i != usize::MAX))
    {
        if run.errors.contains(&index) && case.stop.is_some_and(|(_, cancel)| cancel) {
            continue; // may be the cancellation's error
        }
        let (fails, expected) = case.outcome(index);
        prop_assert_eq!(
            state.attempts.get(&index).copied(),
            Some(expected),
            "item {}",
            index
        );
        prop_assert_eq!(run.errors.contains(&index), fails, "item {}", index);
    }
    let made: u64 = state.attempts.values().map(|&n| u64::from(n)).sum();
    prop_assert_eq!(snapshot.in_flight, 0);
    prop_assert_eq!(
        run.budget.available_permits(),
        case.limit,
        "the budget got its permits back"
    );
    prop_assert_eq!(snapshot.waiting, 0);
    if case.stop.is_none() {
        prop_assert_eq!(snapshot.retried, made - state.attempts.len() as u64);
        prop_assert_eq!(snapshot.started, made);
    } else {
        // An attempt may start and be ended by the cancellation before its
        // mapper runs: counted as started, never seen by the mapper.
        prop_assert!(snapshot.started >= made, "{snapshot:?}, {made} made");
    }
    if case.ordered {
        prop_assert!(
            run.values.windows(2).all(|pair| pair[0] < pair[1]),
            "{:?}",
            run.values
        );
    }
    let failing: Vec<usize> = (0..case.len()).filter(|&i| case.outcome(i).0).collect();
    if case.stop.is_none() {
        if case.keep_going {
            let expected: Vec<usize> = (0..case.len()).filter(|i| !failing.contains(i)).collect();
            let mut values = run.values.clone();
            values.sort_unstable();
            prop_assert_eq!(values, expected);
            let mut errors = run.errors.clone();
            errors.sort_unstable();
            prop_assert_eq!(errors, failing);
        } else if let (true, Some(&first)) = (case.ordered, failing.first()) {
            // Fail-fast in input order: everything before the first item
            // that fails for good, then its error.
            prop_assert_eq!(&run.values, &(0..first).collect::<Vec<_>>());
            prop_assert_eq!(&run.errors, &vec![first]);
        } else if failing.is_empty() {
            let mut values = run.values.clone();
            values.sort_unstable();
            prop_assert_eq!(values, (0..case.len()).collect::<Vec<_>>());
            prop_assert!(run.errors.is_empty());
        } else {
            prop_assert_eq!(run.errors.len(), 1);
            prop_assert!(failing.contains(&run.errors[0]), "{:?}", run.errors);
        }
    }
    Ok(())
}

fn cases() -> u32 {
    std::env::var("PAR_IMAP_CASES")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(128)
}

fn run_case(case: &Case) -> Result<(), TestCaseError> {
    let case = Arc::new(case.clone());
    let (watch, alive) = (Arc::new(Watch::default()), Arc::new(AtomicUsize::new(0)));
    let runtime = if case.blocking {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_time()
            .build()
            .unwrap()
    } else {
        tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .start_paused(true)
            .build()
            .unwrap()
    };
    let bound = Duration::from_secs(if case.blocking { 60 } else { 24 * 3600 });
    let outcome = runtime.block_on(
        AssertUnwindSafe(async {
            tokio::time::timeout(
                bound,
                run(Arc::clone(&case), Arc::clone(&watch), Arc::clone(&alive)),
            )
            .await
        })
        .catch_unwind(),
    );
    // Calls still running end on their own.
    drop(runtime);
    let run = match outcome {
        Ok(Ok(run)) => run,
        Ok(Err(_)) => return Err(TestCaseError::fail("the case hung")),
        Err(panic) => std::panic::resume_unwind(panic),
    };
    prop_assert_eq!(alive.load(Ordering::SeqCst), 0, "values never dropped");
    check(&case, &watch, &run)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(), failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn retry_rule_holds_for_every_kind(case in case()) {
        run_case(&case)?;
    }
}
