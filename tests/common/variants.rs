//! One map of a property case, built as whichever of the eight variants
//! (blocking or async, ordered or unordered, try or plain) was drawn, with
//! its options, over an instrumented input and a mapper that records its
//! calls and fails where the case says. Shared by the property models,
//! tests/properties.rs and tests/composition.rs, so both check the same
//! streams. They include it beside `common` (`#[path]`), not through it:
//! it needs proptest, which not every includer of `common` has.
#![allow(dead_code, unreachable_pub)]

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use futures::stream::BoxStream;
use futures::{StreamExt, stream};
use par_imap::ParImapExt;
use proptest::sample::Index;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use crate::common::{Calls, Running, Tracked, Tracker};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailKind {
    Err,
    Panic,
}

/// One map as drawn: its input's length, its variant and options, and at
/// most one failure.
#[derive(Debug, Clone)]
pub struct Map {
    pub len: usize,
    pub limit: usize,
    pub window: Option<usize>,
    pub batch: usize,
    pub ordered: bool,
    pub blocking: bool,
    pub fallible: bool,
    pub failure: Option<(usize, FailKind)>,
}

impl Map {
    /// The window in effect: the one drawn, or the default.
    pub fn window(&self) -> usize {
        self.window.unwrap_or(2 * self.limit * self.batch)
    }
}

/// The item a drawn `index` picks of `len` items, if there are any.
pub fn pick(index: Index, len: usize) -> Option<usize> {
    (len > 0).then(|| index.index(len))
}

/// The failure a map of `len` items gets from a drawn (index, `Err`?):
/// plain variants fail only by panicking.
pub fn failure(
    drawn: Option<(Index, bool)>,
    len: usize,
    fallible: bool,
) -> Option<(usize, FailKind)> {
    drawn.and_then(|(index, err)| {
        let kind = if err && fallible {
            FailKind::Err
        } else {
            FailKind::Panic
        };
        pick(index, len).map(|index| (index, kind))
    })
}

/// What the consumer saw of one map, one entry per item.
#[derive(Debug, Clone, PartialEq)]
pub enum Seen {
    Value(usize),
    Failed { index: usize, kind: &'static str },
}

#[derive(Debug)]
pub enum TestError {
    Mine(usize),
    Machinery(par_imap::Error),
}

impl From<par_imap::Error> for TestError {
    fn from(error: par_imap::Error) -> Self {
        TestError::Machinery(error)
    }
}

pub fn kind(error: &par_imap::Error) -> &'static str {
    if error.is_panic() {
        "panic"
    } else if error.is_timeout() {
        "timeout"
    } else {
        "cancelled"
    }
}

pub fn seen(result: Result<Tracked, TestError>) -> Seen {
    match result {
        Ok(output) => Seen::Value(output.value),
        Err(TestError::Mine(index)) => Seen::Failed { index, kind: "err" },
        Err(TestError::Machinery(error)) => Seen::Failed {
            index: error.index(),
            kind: kind(&error),
        },
    }
}

/// What the consumer saw, from a plain variant (whose mapper only panics).
pub fn seen_plain(result: Result<Result<Tracked, ()>, par_imap::Error>) -> Seen {
    seen(
        result
            .map_err(TestError::from)
            .map(|ok| ok.expect("plain variants only panic")),
    )
}

/// Everything one map's input and mapper report.
#[derive(Clone, Default)]
pub struct Probe {
    pub calls: Calls,
    /// Items taken from the input.
    pub pulled: Arc<AtomicUsize>,
    /// Items the consumer took, counted by the test.
    pub yielded: Arc<AtomicUsize>,
    /// The most items ever pulled and not yet yielded.
    pub lookahead: Arc<AtomicUsize>,
    /// Set by the test once the consumer is done with the map.
    pub over: Arc<AtomicBool>,
    /// Calls that started once `over` was set.
    pub started_after_over: Arc<AtomicUsize>,
}

/// What a map is built with beyond what was drawn for it.
pub struct With<'a> {
    /// Counts every value, input and output.
    pub tracker: &'a Tracker,
    /// A budget shared with other maps, and the count of all their calls.
    pub budget: Option<(&'a Arc<Semaphore>, &'a Calls)>,
    pub timeout: Option<Duration>,
    pub token: &'a CancellationToken,
    /// An async call takes its units in µs (a real runtime), not ms
    /// (paused time). A blocking call always takes µs.
    pub real: bool,
}

/// Builds `map` over tracked inputs `0..len`, normalised to one item type.
/// Item `index` takes `units(index)` of time.
pub fn build(
    map: &Map,
    units: impl Fn(usize) -> u64 + Clone + Send + Sync + 'static,
    probe: &Probe,
    with: &With<'_>,
) -> BoxStream<'static, Seen> {
    let (tracker, pulled, yielded, lookahead) = (
        with.tracker.clone(),
        probe.pulled.clone(),
        probe.yielded.clone(),
        probe.lookahead.clone(),
    );
    let input = stream::iter(0..map.len).map(move |index| {
        let now = pulled.fetch_add(1, Ordering::SeqCst) + 1;
        lookahead.fetch_max(now - yielded.load(Ordering::SeqCst), Ordering::SeqCst);
        tracker.track(index)
    });

    // The mapper's body, shared by every variant: records the call, takes its
    // time, fails where the case says so.
    let (calls, all, outputs, over, late) = (
        probe.calls.clone(),
        with.budget.map(|(_, all)| all.clone()),
        with.tracker.clone(),
        probe.over.clone(),
        probe.started_after_over.clone(),
    );
    let failure = map.failure;
    let enter = move |item: &Tracked| -> (Running, Option<Running>) {
        if over.load(Ordering::SeqCst) {
            late.fetch_add(1, Ordering::SeqCst);
        }
        (
            calls.enter(item.value),
            all.as_ref().map(|all| all.enter(item.value)),
        )
    };
    let finish = move |item: Tracked| -> Result<Tracked, TestError> {
        match failure {
            Some((index, FailKind::Panic)) if index == item.value => panic!("item {index} panics"),
            Some((index, FailKind::Err)) if index == item.value => Err(TestError::Mine(index)),
            _ => Ok(outputs.track(item.value * 2 + 1)),
        }
    };
    let (budget, timeout, token, real) = (
        with.budget.map(|(budget, _)| budget.clone()),
        with.timeout,
        with.token.clone(),
        with.real,
    );

    macro_rules! configure {
        ($stream:expr) => {{
            let mut stream = $stream;
            if let Some(budget) = budget {
                stream = stream.semaphore(budget);
            }
            if let Some(window) = map.window {
                stream = stream.window(window);
            }
            if let Some(timeout) = timeout {
                stream = stream.timeout(timeout);
            }
            stream.cancel_token(token)
        }};
    }
    macro_rules! batched {
        ($stream:expr) => {
            configure!($stream.batch(map.batch))
        };
    }

    if map.blocking {
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
            move |item: Tracked| mapper(item).map_err(|_| unreachable!("plain variants only panic"))
        };
        match (map.ordered, map.fallible) {
            (true, true) => batched!(input.try_par_imap(map.limit, mapper))
                .map(seen)
                .boxed(),
            (false, true) => batched!(input.try_par_imap_unordered(map.limit, mapper))
                .map(seen)
                .boxed(),
            (true, false) => batched!(input.par_imap(map.limit, plain))
                .map(seen_plain)
                .boxed(),
            (false, false) => batched!(input.par_imap_unordered(map.limit, plain))
                .map(seen_plain)
                .boxed(),
        }
    } else {
        let mapper = move |item: Tracked| {
            let running = enter(&item);
            let units = units(item.value);
            let wait = if real {
                Duration::from_micros(units)
            } else {
                Duration::from_millis(units)
            };
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
        match (map.ordered, map.fallible) {
            (true, true) => configure!(input.try_par_imap_async(map.limit, mapper))
                .map(seen)
                .boxed(),
            (false, true) => configure!(input.try_par_imap_async_unordered(map.limit, mapper))
                .map(seen)
                .boxed(),
            (true, false) => configure!(input.par_imap_async(map.limit, plain))
                .map(seen_plain)
                .boxed(),
            (false, false) => configure!(input.par_imap_async_unordered(map.limit, plain))
                .map(seen_plain)
                .boxed(),
        }
    }
}
