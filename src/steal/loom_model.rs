//! The steal protocol under loom: an owner taking its call's items in
//! order and handing in each result, as `map_call` does, while thieves take
//! the back half of the items not started and the results so far, and the
//! cutoff is lowered, in every interleaving up to a preemption bound
//! (`LOOM_MAX_PREEMPTIONS` overrides it). The models check that every item
//! is taken exactly once (the owner's a prefix, each steal one consecutive
//! range at the end, beginning at the index it announced), that every
//! result reaches the engine exactly once and in index order across the
//! thieves' announces and the owner's report (which comes last), and that
//! an owner stops within one item of a lowered cutoff, its items not
//! started dropped by the time `finish` returns. What the engine hears is
//! recorded in one loom `Mutex<Vec<Heard>>`, from `steal`'s announce and
//! `finish`'s report, so its order is the order the engine would hear it
//! in. Run with
//! `RUSTFLAGS="--cfg par_imap_loom" CARGO_TARGET_DIR=target/loom cargo test --release --lib loom`.

use std::sync::atomic::AtomicUsize as Tally;
use std::time::Instant;

use loom::sync::atomic::Ordering::{Relaxed, SeqCst};
use loom::sync::atomic::{AtomicUsize, fence};
use loom::sync::{Arc, Mutex};
use loom::thread::{self, JoinHandle};

use super::{Loot, Taken};

/// The models run in a few seconds at this bound in release mode; the
/// broken variants tried (MUTANTS.md) are caught at 2 already.
const PREEMPTIONS: usize = 4;

fn model(f: impl Fn() + Send + Sync + 'static) {
    let mut builder = loom::model::Builder::new();
    if builder.preemption_bound.is_none() {
        builder.preemption_bound = Some(PREEMPTIONS);
    }
    builder.check(f);
}

/// The result of item `index`, told apart from the item.
fn result_of(index: usize) -> usize {
    100 + index
}

/// What the engine hears about one call, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Heard {
    /// A thief's announce: `items` items from `at` on (none for a harvest),
    /// and the results from index `done` on.
    Stolen {
        at: usize,
        items: usize,
        done: usize,
        results: Vec<usize>,
    },
    /// The owner's report: its results from index `done` on.
    Report { done: usize, results: Vec<usize> },
}

type Ear = Arc<Mutex<Vec<Heard>>>;

/// An idle worker's steal from `loot` (the back half of the items if
/// `take_items`, and the results so far), announced to `ear` under the lock
/// as `Job::steal` does. Returns where its items begin, and the items.
fn steal<T>(loot: &Loot<T, usize>, ear: &Ear, take_items: bool) -> Option<(usize, Vec<T>)> {
    loot.steal(take_items, false, |taken: Taken<usize>| {
        ear.lock().unwrap().push(Heard::Stolen {
            at: taken.at,
            items: taken.items,
            done: taken.done,
            results: taken.results,
        });
    })
    .map(|(at, items, ())| (at, items))
}

/// A thief on its own thread, stealing once.
fn thief<T: 'static>(
    loot: &Arc<Loot<T, usize>>,
    ear: &Ear,
    take_items: bool,
) -> JoinHandle<Option<(usize, Vec<T>)>> {
    let (loot, ear) = (Arc::clone(loot), Arc::clone(ear));
    thread::spawn(move || steal(&loot, &ear, take_items))
}

/// The owner's report, made in `finish`'s closure (under the loot's lock).
fn report(loot: &Loot<impl Sized, usize>, ear: &Ear, last: Option<usize>) {
    loot.finish(last, |done, results| {
        ear.lock().unwrap().push(Heard::Report { done, results });
    });
}

/// What the engine heard about a call of `len` items from index 0 whose
/// owner mapped `mapped`: the owner's report last and once, each announce
/// with something in it, and the results delivered, concatenated in the
/// order heard, exactly the owner's items, each once, in index order.
/// Returns the steals announced with items, as (at, how many).
fn check_heard(heard: &[Heard], mapped: &[usize]) -> Vec<(usize, usize)> {
    let Some((Heard::Report { done, results }, announces)) = heard.split_last() else {
        panic!("the owner's report is heard last: {heard:?}");
    };
    let mut next = 0;
    let mut steals = Vec::new();
    let mut deliver = |done: usize, results: &[usize], heard: &Heard| {
        assert_eq!(
            done, next,
            "results delivered contiguously, in index order: {heard:?}"
        );
        let expected: Vec<_> = (done..done + results.len()).map(result_of).collect();
        assert_eq!(results, expected, "results match their indices: {heard:?}");
        next += results.len();
    };
    for announce in announces {
        let Heard::Stolen {
            at,
            items,
            done,
            results,
        } = announce
        else {
            panic!("one report, and nothing heard after it: {heard:?}");
        };
        assert!(
            *items > 0 || !results.is_empty(),
            "an announce with nothing in it: {heard:?}"
        );
        if *items > 0 {
            steals.push((*at, *items));
        }
        deliver(*done, results, announce);
    }
    deliver(*done, results, heard.last().unwrap());
    assert_eq!(
        next,
        mapped.len(),
        "every result of the owner's delivered exactly once: {heard:?}"
    );
    steals
}

/// The owner's loop of `map_call` without a cutoff, on the model's main
/// thread, racing one thief per entry of `thieves` (`true`: it may take
/// items; `false`: results alone) over `len` items: every item taken once,
/// the owner's a prefix in order, the thieves' consecutive ranges tiling the
/// rest from where the owner stopped, and every result delivered once, in
/// order, the owner's report last.
fn steal_race(len: usize, thieves: &'static [bool]) {
    model(move || {
        let loot = Arc::new(Loot::new(0, (0..len).collect(), Instant::now()));
        let ear = Ear::default();
        let thieves: Vec<_> = thieves
            .iter()
            .map(|&take_items| thief(&loot, &ear, take_items))
            .collect();
        let mut mapped = Vec::new();
        let mut last = None;
        while let Some((index, item)) = loot.next(last.take()) {
            assert_eq!(index, item, "the index the owner is told is its item's");
            mapped.push(index);
            last = Some(result_of(item));
        }
        report(&loot, &ear, last);
        assert_eq!(
            mapped,
            (0..mapped.len()).collect::<Vec<_>>(),
            "the owner's items are a prefix, in order"
        );
        let mut stolen: Vec<_> = thieves
            .into_iter()
            .filter_map(|thief| thief.join().unwrap())
            .filter(|(_, items)| !items.is_empty())
            .collect();
        stolen.sort_unstable();
        let mut from = mapped.len();
        for (at, items) in &stolen {
            assert_eq!(
                *at, from,
                "the steals tile the call from where the owner stopped"
            );
            assert_eq!(
                *items,
                (*at..at + items.len()).collect::<Vec<_>>(),
                "a steal is one consecutive range from the index it announced"
            );
            from += items.len();
        }
        assert_eq!(from, len, "every item taken exactly once");
        let mut steals = check_heard(&ear.lock().unwrap(), &mapped);
        steals.sort_unstable();
        let taken: Vec<_> = stolen
            .iter()
            .map(|(at, items)| (*at, items.len()))
            .collect();
        assert_eq!(steals, taken, "each steal announced as taken, and no other");
    });
}

/// One thief races the owner's next item, from the start of a call of 4.
#[test]
fn loom_steal_races_the_owners_next_item() {
    steal_race(4, &[true]);
}

/// Two thieves and the owner: the second steals the back half of what the
/// first left, or harvests results alone, or finds nothing.
#[test]
fn loom_two_thieves_and_the_owner() {
    steal_race(4, &[true, true]);
}

/// A thief without a permit harvests the results alone while the owner
/// goes on (and, when it has stopped, finds nothing).
#[test]
fn loom_harvest_races_the_owner() {
    steal_race(3, &[false]);
}

/// How many items the cutoff models run, and the cutoff they lower to.
const CALL: usize = 3;
const CUTOFF: usize = 1;

/// What became of each item: mapped or dropped unmapped, by anyone. Plain
/// std atomics: this is the test's bookkeeping, read only by the thread
/// that wrote it or after a join, so loom need not explore it.
#[derive(Default)]
struct Fates {
    mapped: [Tally; CALL],
    dropped: [Tally; CALL],
}

impl Fates {
    fn settled(&self, index: usize) -> usize {
        self.mapped[index].load(SeqCst) + self.dropped[index].load(SeqCst)
    }
}

/// An item that counts its fate.
struct Item {
    index: usize,
    fates: std::sync::Arc<Fates>,
    mapped: bool,
}

impl Item {
    fn map(mut self) -> usize {
        self.mapped = true;
        self.fates.mapped[self.index].fetch_add(1, SeqCst);
        result_of(self.index)
    }
}

impl Drop for Item {
    fn drop(&mut self) {
        if !self.mapped {
            self.fates.dropped[self.index].fetch_add(1, SeqCst);
        }
    }
}

/// The map's cutoff, as `Shared` keeps it, and the owner's progress as the
/// canceller reads it.
struct Cut {
    cutoff: AtomicUsize,
    /// How many items the owner has started (taken, about to be mapped).
    started: AtomicUsize,
}

/// The owner's loop of `map_call`: hand in the last result and take the
/// next item, then the "still wanted?" check (one relaxed load, as
/// `Shared::is_cut_off`), dropping the item and stopping when cut off;
/// `finish` with the last result. Returns the indices it mapped. The fence
/// after each start is the model's: with the canceller's, it stands for
/// "the lowered cutoff is visible at the owner's next check", which the
/// memory model does not promise a relaxed load (loom would let the owner
/// read the old cutoff for ever) but which is what the bound below is about.
fn owner(loot: &Loot<Item, usize>, cut: &Cut, ear: &Ear, fates: &Fates) -> Vec<usize> {
    let mut mapped = Vec::new();
    let mut last = None;
    while let Some((index, item)) = loot.next(last.take()) {
        assert_eq!(
            index, item.index,
            "the index the owner is told is its item's"
        );
        if index >= cut.cutoff.load(Relaxed) {
            drop(item);
            break;
        }
        cut.started.store(index + 1, Relaxed);
        fence(SeqCst);
        last = Some(item.map());
        mapped.push(index);
    }
    report(loot, ear, last);
    // Once `finish` returns, whatever a thief did not take (and announce)
    // is mapped or dropped, not left in the loot for its drop.
    let stolen_from = ear
        .lock()
        .unwrap()
        .iter()
        .filter_map(|heard| match heard {
            Heard::Stolen { at, items, .. } if *items > 0 => Some(*at),
            _ => None,
        })
        .min()
        .unwrap_or(CALL);
    for index in 0..stolen_from {
        assert_eq!(
            fates.settled(index),
            1,
            "item {index} is the owner's: settled when `finish` returns"
        );
    }
    mapped
}

/// The canceller lowers the cutoff while the owner (and a thief, if
/// `with_thief`) runs: every item is mapped or dropped exactly once, every
/// result delivered once and in order, and the owner starts at most the one
/// item it may have checked just before the cutoff came down.
fn cutoff_race(with_thief: bool) {
    model(move || {
        let fates = std::sync::Arc::new(Fates::default());
        let items = (0..CALL)
            .map(|index| Item {
                index,
                fates: std::sync::Arc::clone(&fates),
                mapped: false,
            })
            .collect();
        let loot = Arc::new(Loot::new(0, items, Instant::now()));
        let cut = Arc::new(Cut {
            cutoff: AtomicUsize::new(usize::MAX),
            started: AtomicUsize::new(0),
        });
        let ear = Ear::default();
        let thief = with_thief.then(|| {
            let (loot, cut, ear) = (Arc::clone(&loot), Arc::clone(&cut), Arc::clone(&ear));
            thread::spawn(move || {
                // The stolen call asks the same question before each item.
                if let Some((at, items)) = steal(&loot, &ear, true) {
                    for (index, item) in (at..).zip(items) {
                        if index < cut.cutoff.load(Relaxed) {
                            item.map();
                        }
                    }
                }
            })
        });
        let owner = {
            let (loot, cut, ear) = (Arc::clone(&loot), Arc::clone(&cut), Arc::clone(&ear));
            let fates = std::sync::Arc::clone(&fates);
            thread::spawn(move || owner(&loot, &cut, &ear, &fates))
        };
        // The canceller: a failure, the token, or the end of the map.
        cut.cutoff.fetch_min(CUTOFF, Relaxed);
        fence(SeqCst);
        let started = cut.started.load(Relaxed);
        let mapped = owner.join().unwrap();
        if let Some(thief) = thief {
            thief.join().unwrap();
        }
        for &index in &mapped {
            assert!(
                index < CUTOFF || index <= started,
                "item {index} started after the cutoff {CUTOFF} came down \
                 with {started} started: more than one item late"
            );
        }
        check_heard(&ear.lock().unwrap(), &mapped);
        drop(loot);
        for index in 0..CALL {
            assert_eq!(
                fates.settled(index),
                1,
                "item {index} mapped or dropped exactly once"
            );
        }
    });
}

/// The cutoff comes down while the owner runs its call.
#[test]
fn loom_cutoff_lowered_while_the_owner_runs() {
    cutoff_race(false);
}

/// The cutoff comes down while a thief takes the back of the call: the
/// owner's `finish` drops what it did not start, and the thief's stolen
/// call asks the same question.
#[test]
fn loom_cutoff_lowered_while_a_thief_steals() {
    cutoff_race(true);
}
