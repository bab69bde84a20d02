//! The engine and its workers under loom: the real engine ([`Engine`]'s
//! `take_in`, `failed`, `expire`, the reorder buffer), the real blocking
//! calls (`BlockingJob::run`, a thief's `BlockingJob::steal`, their
//! [`Loot`](crate::steal::Loot) and [`Progress`]) and the real report
//! channel, the calls on loom threads, the engine on the model's main
//! thread, in every interleaving up to a preemption bound
//! (`LOOM_MAX_PREEMPTIONS` overrides it). Two races the steal models
//! (`steal/loom_model.rs`) cannot see, because they are between the engine
//! and the calls:
//!
//! - a report from a call the engine already forgot: the engine takes in a
//!   failure (fail-fast forgets the calls after it) or is dropped while an
//!   owner and a thief run that call, and their reports (a thief's
//!   announce, the owner's end, the thief's end) come after;
//! - a per-item deadline expiring while the item finishes: the engine's
//!   timer for a call (armed from the call's `Started`, or before that came)
//!   fires while its worker is ending that item, beginning the next or
//!   reporting.
//!
//! Checked in each: the consumer gets exactly what the contract says, in
//! order, each result once; every item is mapped or dropped exactly once
//! and every output dropped exactly once (none leaks in a forgotten slot or
//! a report nobody reads); no item starts after the engine lowered the
//! cutoff but, with deadlines, the one item a call checked just before
//! (its deadline's lock lies between its check and its mapper); the engine
//! ends with no call in flight and `Stats` saying the same, and with
//! deadlines, none left armed. Each model also checks that the
//! interleavings explored reached every case it is about. Run with
//! `RUSTFLAGS="--cfg par_imap_loom" CARGO_TARGET_DIR=target/loom cargo test --release --lib loom`.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::sync::atomic::AtomicUsize as Tally;
use std::sync::atomic::Ordering::SeqCst;
use std::time::Duration;

use loom::thread;
use tokio::time::Instant;

use super::{Engine, Running};
use crate::batch::Batch;
use crate::blocking::{BlockingJob, Crew};
use crate::call::{Call, Event, ReportTo, Reports};
use crate::deadline::Progress;
use crate::error::Error;
use crate::options::{Options, Order};
use crate::spawn::IsFailure;
use crate::stats::{Snapshot, Stats};
use crate::workers::{Job, Opening, Steal};

/// About two seconds for the five in release mode, which catch every
/// broken variant tried (MUTANTS.md).
const PREEMPTIONS: usize = 4;

/// Checks `f` in every interleaving, then that the executions explored
/// went through each case in `cases` (what `f` told `seen`): a rig that
/// never races, or a bound too low to reach a case, fails rather than
/// passing without having looked.
fn model(cases: &[&'static str], f: impl Fn(&Seen) + Send + Sync + 'static) {
    let mut builder = loom::model::Builder::new();
    if builder.preemption_bound.is_none() {
        builder.preemption_bound = Some(PREEMPTIONS);
    }
    let seen = Arc::new(Seen::default());
    let seen_in = Arc::clone(&seen);
    builder.check(move || f(&seen_in));
    let seen = seen.0.lock().unwrap();
    for case in cases {
        assert!(
            seen.contains_key(case),
            "never explored: {case}; seen {seen:?}"
        );
    }
}

/// How many explored executions went through each case.
#[derive(Debug, Default)]
struct Seen(std::sync::Mutex<BTreeMap<&'static str, usize>>);

impl Seen {
    fn saw(&self, case: &'static str) {
        *self.0.lock().unwrap().entry(case).or_default() += 1;
    }
}

/// A deadline that never comes by the clock (the worker's view) but that
/// the engine is told has come (its timer fired).
const HOUR: Duration = Duration::from_secs(3600);

/// What became of each item and each output; plain std atomics (the test's
/// bookkeeping, never where loom should look for a race).
#[derive(Debug, Default)]
struct Ledger {
    mapped: [Tally; 4],
    dropped: [Tally; 4],
    outputs_made: Tally,
    outputs_dropped: Tally,
    /// Set by the engine's thread once it lowered the cutoff.
    cut: AtomicBool,
    /// Items that started after that (a bit each).
    started_late: Tally,
}

impl Ledger {
    fn settled(&self, index: usize) -> usize {
        self.mapped[index].load(SeqCst) + self.dropped[index].load(SeqCst)
    }

    /// Every item of `0..len` mapped or dropped once, every output dropped
    /// once, and of the items started after the cutoff came down, at most
    /// one, and only among `may_be_late` (bits): one a call checked just
    /// before it came down.
    fn check(&self, len: usize, may_be_late: usize) {
        for index in 0..len {
            assert_eq!(self.settled(index), 1, "item {index} settled once");
        }
        assert_eq!(
            self.outputs_dropped.load(SeqCst),
            self.outputs_made.load(SeqCst),
            "every output dropped exactly once"
        );
        let late = self.started_late.load(SeqCst);
        assert!(
            late.count_ones() <= 1 && late & !may_be_late == 0,
            "items started after the engine lowered the cutoff (bits {late:b})"
        );
    }
}

struct Item {
    index: usize,
    ledger: Arc<Ledger>,
    mapped: bool,
}

impl Drop for Item {
    fn drop(&mut self) {
        if !self.mapped {
            self.ledger.dropped[self.index].fetch_add(1, SeqCst);
        }
    }
}

/// A mapper's output: item `index`'s, counted when dropped.
#[derive(Debug)]
struct Out {
    index: usize,
    ledger: Arc<Ledger>,
}

impl Drop for Out {
    fn drop(&mut self) {
        self.ledger.outputs_dropped.fetch_add(1, SeqCst);
    }
}

/// The mapper: counts the item.
fn map(mut item: Item) -> Out {
    item.mapped = true;
    let ledger = Arc::clone(&item.ledger);
    if ledger.cut.load(SeqCst) {
        ledger.started_late.fetch_or(1 << item.index, SeqCst);
    }
    ledger.mapped[item.index].fetch_add(1, SeqCst);
    ledger.outputs_made.fetch_add(1, SeqCst);
    Out {
        index: item.index,
        ledger,
    }
}

type Mapper = fn(Item) -> Out;

fn is_failure(result: &Result<Out, Error>) -> bool {
    result.is_err()
}

const IS_FAILURE: IsFailure<Out> = is_failure;

/// The engine, its report channel and the workers' crew, for a map with
/// these settings; calls are made and started by hand below, as `start.rs`
/// would.
struct Rig {
    engine: Engine<Out>,
    report: ReportTo<Out>,
    reports: Reports<Out>,
    crew: Arc<Crew<Item, Mapper>>,
    ledger: Arc<Ledger>,
}

impl Rig {
    fn new(order: Order, timeout: Option<Duration>, keep_going: bool) -> Rig {
        let options = Options {
            timeout,
            keep_going,
            ..Options::new(order, 2)
        };
        let reports = Reports::new();
        let report = reports.sender().clone();
        Rig {
            engine: Engine::new(options, true),
            crew: Arc::new(Crew::new(map as Mapper, report.clone())),
            report,
            reports,
            ledger: Arc::default(),
        }
    }

    fn items(&self, range: std::ops::Range<usize>) -> Batch<Item> {
        Batch::from_vec(
            range
                .map(|index| Item {
                    index,
                    ledger: Arc::clone(&self.ledger),
                    mapped: false,
                })
                .collect(),
        )
    }

    /// Registers a call over the next `len` items with the engine, as
    /// `start.rs` does; returns its ticket, reporting on the channel.
    fn call(&mut self, len: usize, progress: Option<Arc<Progress<Out>>>) -> Call<Out> {
        let shared = Arc::clone(self.engine.shared());
        let running = Running {
            progress: progress.clone(),
            deadline: None,
            retry_on_return: false,
        };
        let first = self.engine.calls.push(len, running);
        self.engine.in_flight += 1;
        let mut call = Call::new(first, shared, progress, Duration::ZERO);
        call.report_to(self.report.clone(), true);
        call
    }

    /// Runs `items` in `call` on a worker thread of its own.
    fn run(&self, call: Call<Out>, items: Batch<Item>) -> thread::JoinHandle<()> {
        let crew = Arc::clone(&self.crew);
        let job = BlockingJob::<Item, Mapper>::new(items, call, IS_FAILURE);
        thread::spawn(move || job.run(&crew, Opening::none()))
    }

    /// An idle worker: steals once, if there is anything, and runs it.
    /// Returns whether it took items.
    fn thief(&self) -> thread::JoinHandle<bool> {
        let crew = Arc::clone(&self.crew);
        thread::spawn(move || match BlockingJob::<Item, Mapper>::steal(&crew) {
            Steal::Job(job) => {
                job.run(&crew, Opening::none());
                true
            }
            Steal::At(_) | Steal::Nothing => false,
        })
    }

    /// Takes in the reports that came so far; returns how many, and how
    /// many of them were steals of items.
    fn take_in_reports(&mut self) -> (usize, usize) {
        let (mut taken, mut steals) = (0, 0);
        while let Some((event, _)) = self.reports.try_next() {
            if matches!(event, Event::Stolen { at: Some(_), .. }) {
                steals += 1;
            }
            self.engine.take_in(event, IS_FAILURE);
            taken += 1;
        }
        (taken, steals)
    }

    /// How many of the items in `range` are mapped or dropped by now.
    fn settled(&self, range: std::ops::Range<usize>) -> usize {
        range
            .filter(|&index| self.ledger.settled(index) > 0)
            .count()
    }

    /// The consumer: every result whose turn has come, as (index, ok).
    fn pop_all(&mut self) -> Vec<(usize, bool)> {
        std::iter::from_fn(|| self.engine.calls.pop())
            .map(|result| match result {
                Ok(out) => (out.index, true),
                Err(error) => {
                    assert!(error.is_timeout(), "only timeouts fail here: {error:?}");
                    (error.index(), false)
                }
            })
            .collect()
    }

    fn stats(&self) -> Snapshot {
        Stats::new(Arc::clone(self.engine.counters())).snapshot()
    }

    /// Once every call reported and the consumer took what was owed: no
    /// call in flight, no deadline armed, and `Stats` agreeing.
    fn check_idle(&self) {
        assert_eq!(self.engine.in_flight, 0, "a call still counted in flight");
        assert!(self.engine.deadlines.is_empty(), "a deadline left armed");
        let stats = self.stats();
        assert_eq!(stats.in_flight, 0, "Stats: {stats:?}");
        assert_eq!(stats.started, stats.completed, "Stats: {stats:?}");
    }
}

/// Call 0 (item 0, on a worker the model does not run) fails while call 1
/// (items 1..4) runs on its owner and a thief may take its back half: the
/// engine forgets call 1 (input order: it comes after the failure) and
/// lowers the cutoff, with reports of call 1 on their way or still to
/// come. With `engine_gone`, the map is dropped instead of failing: the
/// reports find nobody to read them.
fn forgotten_call(engine_gone: bool) {
    let cases = [
        "a thief took items",
        "the engine heard of a steal of items before the end",
        "the end came mid-call",
        "reports came after the end",
    ];
    let cases = if engine_gone { &cases[..1] } else { &cases[..] };
    model(cases, move |seen| {
        let mut rig = Rig::new(Order::Input, None, false);
        let mut failing = rig.call(1, None);
        let call = rig.call(3, None);
        let owner = rig.run(call, rig.items(1..4));
        let thief = rig.thief();
        // The engine's task waits for a wake-up; the workers run meanwhile.
        // It may have heard of a steal already.
        thread::yield_now();
        if rig.take_in_reports().1 > 0 {
            seen.saw("the engine heard of a steal of items before the end");
        }
        if (1..=2).contains(&rig.settled(1..4)) {
            seen.saw("the end came mid-call");
        }
        // Item 0 runs elsewhere: it is never an `Item` here.
        rig.ledger.dropped[0].fetch_add(1, SeqCst);
        if engine_gone {
            let Rig {
                engine,
                report,
                mut reports,
                crew,
                ledger,
            } = rig;
            // The map is dropped: the engine's `Drop` closes the map, then
            // the runner's `close` drops the reports queued; later ones
            // are dropped by their senders.
            drop(engine);
            ledger.cut.store(true, SeqCst);
            reports.close();
            drop((report, failing));
            owner.join().unwrap();
            if thief.join().unwrap() {
                seen.saw("a thief took items");
            }
            drop(crew);
            return ledger.check(4, 0);
        }
        rig.engine
            .take_in(failing.finish_one(Err(Error::timeout(0))), IS_FAILURE);
        drop(failing);
        rig.ledger.cut.store(true, SeqCst);
        owner.join().unwrap();
        if thief.join().unwrap() {
            seen.saw("a thief took items");
        }
        if rig.take_in_reports().0 > 0 {
            seen.saw("reports came after the end");
        }
        assert_eq!(
            rig.pop_all(),
            [(0, false)],
            "the failure, and nothing of the forgotten call"
        );
        rig.check_idle();
        let ledger = Arc::clone(&rig.ledger);
        drop(rig);
        ledger.check(4, 0);
    });
}

/// The engine hears of a failure before the call after it reports: that
/// call's reports, and a thief's, are dropped, counted and nothing leaks.
#[test]
fn loom_report_from_a_call_the_engine_forgot() {
    forgotten_call(false);
}

/// The map is dropped while an owner and a thief run: their reports find
/// the channel closed and are dropped where they are made.
#[test]
fn loom_reports_after_the_engine_is_gone() {
    forgotten_call(true);
}

/// One call over items 0..2 with a deadline per item (`timeout`); the
/// engine's timer for it fires while the worker runs it: between two
/// items, inside one, while it ends one, or after the call reported.
/// `timeout` is `HOUR` (the worker's clock says "not yet": only the engine
/// times it out) or zero (both sides see it overrun and race to say so).
fn deadline_while_finishing(timeout: Duration, keep_going: bool) {
    let mut cases = vec![
        "item 0 timed out",
        "item 1 timed out",
        "item 2 timed out",
        "no item timed out",
        "the deadline was armed from `Started`",
        "the timer fired before `Started` came",
    ];
    if timeout.is_zero() {
        // Every item overruns: item 0 is always the first timed out.
        cases = vec![
            "the deadline was armed from `Started`",
            "the timer fired before `Started` came",
            "the engine timed out first",
            "the worker timed out first",
        ];
    }
    model(&cases, move |seen| {
        let mut rig = Rig::new(Order::Input, Some(timeout), keep_going);
        let progress = Progress::new(0, timeout);
        let call = rig.call(3, Some(Arc::clone(&progress)));
        let owner = rig.run(call, rig.items(0..3));
        // The engine's task waits; the worker runs meanwhile. The engine
        // arms the call's deadline as `Started` tells it, if it came.
        thread::yield_now();
        let (heard, _) = rig.take_in_reports();
        // The timer fires: the engine's clock is past any deadline. The
        // deadline leaves the engine's list as `poll_due` takes it.
        let now = Instant::now() + 2 * HOUR;
        let at = rig
            .engine
            .calls
            .running(0)
            .and_then(|(running, _)| running.deadline);
        seen.saw(match at {
            Some(at) => {
                rig.engine.deadlines.remove(at, 0);
                "the deadline was armed from `Started`"
            }
            None => {
                // Heard start and not yet end: it must have a deadline, also
                // when `Started` came between two of its items.
                assert!(
                    heard == 0 || rig.engine.calls.running(0).is_none(),
                    "the engine heard call 0 start and armed no deadline for it"
                );
                "the timer fired before `Started` came"
            }
        });
        rig.engine
            .expire(0, at.unwrap_or(now), now, timeout, IS_FAILURE);
        let engine_first = rig.stats().failed > 0;
        rig.ledger
            .cut
            .store(!keep_going && rig.engine.failed_at().is_some(), SeqCst);
        owner.join().unwrap();
        rig.take_in_reports();
        let popped = rig.pop_all();
        let timed_out: Vec<_> = popped.iter().filter(|(_, ok)| !ok).collect();
        seen.saw(match timed_out.first() {
            Some((0, _)) => "item 0 timed out",
            Some((1, _)) => "item 1 timed out",
            Some(_) => "item 2 timed out",
            None => "no item timed out",
        });
        seen.saw(if engine_first {
            "the engine timed out first"
        } else {
            "the worker timed out first"
        });
        if keep_going {
            assert_eq!(
                popped.iter().map(|&(index, _)| index).collect::<Vec<_>>(),
                [0, 1, 2],
                "every item once, in order: {popped:?}"
            );
        } else {
            // Fail-fast: what came before the timeout, then the timeout,
            // then nothing.
            let ended = popped.iter().position(|(_, ok)| !ok);
            let len = ended.map_or(popped.len(), |at| at + 1);
            assert_eq!(popped.len(), len, "nothing after the timeout: {popped:?}");
            let expected_len = ended.map_or(3, |at| at + 1);
            assert_eq!(
                popped.iter().map(|&(index, _)| index).collect::<Vec<_>>(),
                (0..expected_len).collect::<Vec<_>>(),
                "in order, each once: {popped:?}"
            );
        }
        if timeout.is_zero() {
            assert_eq!(
                timed_out.len(),
                if keep_going { 3 } else { 1 },
                "an overrun item times out, once: {popped:?}"
            );
        }
        rig.check_idle();
        let ledger = Arc::clone(&rig.ledger);
        drop(rig);
        drop(progress);
        // Items after a fail-fast timeout are dropped unmapped, but one:
        // the engine gives the item up, then lowers the cutoff, and the
        // worker may check its next item in between and begin its deadline
        // (a lock) before its mapper starts. Not the first: nothing lies
        // between its check and the mapper. (Nor in the models above.)
        ledger.check(3, 0b110);
    });
}

/// The engine's timer fires while the item finishes in time by its
/// worker's clock: the engine's word wins, once.
#[test]
fn loom_deadline_expires_while_the_item_finishes() {
    deadline_while_finishing(HOUR, false);
}

/// As above with `.keep_going()`: the call goes on after the timeout.
#[test]
fn loom_deadline_expires_while_the_item_finishes_keep_going() {
    deadline_while_finishing(HOUR, true);
}

/// Both the engine and the worker see the item overrun and race to time
/// it out: one timeout per item, never one plus its late result.
#[test]
fn loom_deadline_seen_by_both_sides() {
    deadline_while_finishing(Duration::ZERO, true);
}
