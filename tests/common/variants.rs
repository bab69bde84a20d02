//! One map of a property case, built as whichever of the eight variants
//! (blocking or async, ordered or unordered, try or plain) was drawn, with
//! its options, over an instrumented input and a mapper that records its
//! calls and fails where the case says. Shared by the property models,
//! tests/properties.rs and tests/composition.rs, so both check the same
//! streams. They include it beside `common` (`#[path]`), not through it:
//! it needs proptest, which not every includer of `common` has.
#![allow(dead_code, unreachable_pub)]

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::stream::BoxStream;
use futures::{StreamExt, stream};
use par_imap::ParImapExt;
use proptest::sample::Index;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use crate::common::{Calls, Gates, Running, Tracked, Tracker};

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
    /// `.batch(k)` (blocking only); `None`: adaptive sizes (the default).
    pub batch: Option<usize>,
    pub ordered: bool,
    pub blocking: bool,
    pub fallible: bool,
    pub failure: Option<(usize, FailKind)>,
    /// `.keep_going()`: every failure is yielded at its place, the map
    /// goes on.
    pub keep_going: bool,
    /// Input items whose `Drop` panics (see [`Bomb`]).
    pub bombs: Vec<BombAt>,
}

impl Map {
    /// The window in effect: the one drawn, or the default (adaptive
    /// blocking calls count as 1024 items).
    pub fn window(&self) -> usize {
        let per_call = if self.blocking {
            self.batch.unwrap_or(1024)
        } else {
            1
        };
        self.window.unwrap_or(2 * self.limit * per_call)
    }

    /// Whether item `index`'s bomb goes off inside its mapper call, where
    /// it is that item's panic error.
    pub fn bomb_in_mapper(&self, index: usize) -> bool {
        self.bombs
            .iter()
            .any(|bomb| bomb.index == index && bomb.in_mapper)
    }

    /// The lowest index that fails on its own, of a drawn failure and the
    /// bombs that go off in their mapper.
    pub fn first_failure(&self) -> Option<usize> {
        let failure = self.failure.map(|(index, _)| index);
        let bomb = self
            .bombs
            .iter()
            .filter(|bomb| bomb.in_mapper)
            .map(|bomb| bomb.index)
            .min();
        match (failure, bomb) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }
}

/// An input item whose `Drop` panics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BombAt {
    pub index: usize,
    /// The mapper lets it go off (it drops the item armed, at the end of its
    /// call: that item's panic error); otherwise the mapper defuses it, and
    /// it goes off only if the map drops the item unmapped (nobody wants
    /// it: ignored).
    pub in_mapper: bool,
}

/// The part of an input item that panics in `Drop` while armed.
#[derive(Debug)]
pub struct Bomb {
    index: usize,
    armed: bool,
    in_mapper: bool,
}

impl Bomb {
    /// What the mapper does with it at the end of its call: defuse it, or
    /// drop it armed.
    fn settle(mut self) {
        if !self.in_mapper {
            self.armed = false;
        }
    }
}

impl Drop for Bomb {
    fn drop(&mut self) {
        // Never while unwinding already: that would abort the test binary.
        if self.armed && !std::thread::panicking() {
            let place = if self.in_mapper {
                "in its mapper call, or unmapped"
            } else {
                "dropped unmapped"
            };
            panic!("bomb {} went off in Drop ({place})", self.index);
        }
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
    /// Set by the test once it has cancelled the map's token.
    pub cancelled: Arc<AtomicBool>,
    /// Items whose mapper call began once `cancelled` was set.
    pub started_after_cancel: Arc<AtomicUsize>,
    /// Of those, blocking ones for which `par_imap::is_cancelled()` was
    /// false: the token's cancel did not reach them.
    pub unaware_after_cancel: Arc<AtomicUsize>,
    /// Items whose mapper call ended, in the order they ended.
    pub finished: Arc<Mutex<Vec<usize>>>,
    /// The map's `.stats()` handle, when it was built with one.
    pub stats: Arc<Mutex<Option<par_imap::Stats>>>,
}

impl Probe {
    pub fn stats(&self) -> Option<par_imap::Stats> {
        self.stats.lock().unwrap().clone()
    }
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
    /// A blocking item that waits on its gate (of these gates) before it
    /// takes its time: hung until the test opens it.
    pub hang: Option<(usize, &'a Gates)>,
    /// Build with `.stats()` (kept in the probe).
    pub stats: bool,
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
    let bombs = map.bombs.clone();
    let input = stream::iter(0..map.len).map(move |index| {
        let now = pulled.fetch_add(1, Ordering::SeqCst) + 1;
        lookahead.fetch_max(now - yielded.load(Ordering::SeqCst), Ordering::SeqCst);
        let bomb = bombs.iter().find(|bomb| bomb.index == index);
        // Dropped in this order when unmapped: the value first, so that the
        // tracker counts it however the bomb's panic is handled.
        (
            tracker.track(index),
            Bomb {
                index,
                armed: bomb.is_some(),
                in_mapper: bomb.is_some_and(|bomb| bomb.in_mapper),
            },
        )
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
    let (cancelled, after_cancel, unaware, finished) = (
        probe.cancelled.clone(),
        probe.started_after_cancel.clone(),
        probe.unaware_after_cancel.clone(),
        probe.finished.clone(),
    );
    let failure = map.failure;
    let blocking = map.blocking;
    let enter = move |item: &Tracked| -> (Running, Option<Running>) {
        if over.load(Ordering::SeqCst) {
            late.fetch_add(1, Ordering::SeqCst);
        }
        if cancelled.load(Ordering::SeqCst) {
            after_cancel.fetch_add(1, Ordering::SeqCst);
            if blocking && !par_imap::is_cancelled() {
                unaware.fetch_add(1, Ordering::SeqCst);
            }
        }
        (
            calls.enter(item.value),
            all.as_ref().map(|all| all.enter(item.value)),
        )
    };
    // Takes the whole input item: its bomb goes off or is defused last,
    // once the result is made.
    let finish = move |(item, bomb): (Tracked, Bomb)| -> Result<Tracked, TestError> {
        let index = item.value;
        let result = match failure {
            Some((at, FailKind::Panic)) if at == index => panic!("item {at} panics"),
            Some((at, FailKind::Err)) if at == index => Err(TestError::Mine(at)),
            _ => Ok(outputs.track(index * 2 + 1)),
        };
        finished.lock().unwrap().push(index);
        bomb.settle();
        result
    };
    let (budget, timeout, token, real, keep_going) = (
        with.budget.map(|(budget, _)| budget.clone()),
        with.timeout,
        with.token.clone(),
        with.real,
        map.keep_going,
    );
    let hang = with.hang.map(|(index, gates)| (index, gates.clone()));
    let stats = with.stats.then(|| probe.stats.clone());

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
            if keep_going {
                stream = stream.keep_going();
            }
            let stream = stream.cancel_token(token);
            if let Some(stats) = &stats {
                *stats.lock().unwrap() = Some(stream.stats());
            }
            stream
        }};
    }
    macro_rules! batched {
        ($stream:expr) => {{
            let stream = $stream;
            match map.batch {
                Some(k) => configure!(stream.batch(k)),
                None => configure!(stream),
            }
        }};
    }

    if map.blocking {
        let mapper = move |input: (Tracked, Bomb)| {
            let item = &input.0;
            let _running = enter(item);
            if let Some((at, gates)) = &hang
                && *at == item.value
            {
                gates.wait(*at);
            }
            let spin = Duration::from_micros(units(item.value));
            let start = std::time::Instant::now();
            // Busy for its time, or until nobody wants it (a timeout).
            while start.elapsed() < spin && !par_imap::is_cancelled() {
                std::thread::sleep(Duration::from_micros(20).min(spin));
            }
            finish(input)
        };
        let plain = {
            let mapper = mapper.clone();
            move |input: (Tracked, Bomb)| {
                mapper(input).map_err(|_| unreachable!("plain variants only panic"))
            }
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
        let mapper = move |input: (Tracked, Bomb)| {
            let running = enter(&input.0);
            let units = units(input.0.value);
            let wait = if real {
                Duration::from_micros(units)
            } else {
                Duration::from_millis(units)
            };
            let finish = finish.clone();
            async move {
                let _running = running;
                tokio::time::sleep(wait).await;
                finish(input)
            }
        };
        let plain = {
            let mapper = mapper.clone();
            move |input: (Tracked, Bomb)| {
                let call = mapper(input);
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
