//! Work stealing inside blocking calls. A call of several items keeps its
//! items not started, and its results not yet delivered, in its [`Loot`]:
//! its own worker hands in each result and takes the next item in one step,
//! and once the call is past its steal time an idle worker may, at any
//! moment, even while the owner is stuck inside one item, take the back
//! half of the items not started (a call of its own) and the results
//! finished so far (delivered at once). The map's watch (`blocking.rs`)
//! takes finished results too, as a thief that takes no item would, so
//! that they come out even when no worker is idle (`limit` 1, or every
//! worker stuck). So a slow or hung item never holds back the items of its
//! call, before or after it.
//!
//! Protocol. One lock per call guards both; the owner takes it once per
//! item, a thief once per steal. A thief announces what it took (to the
//! engine, as one report) while it holds the lock, and the owner makes its
//! last report under the same lock, so the engine always hears of a steal
//! before the owner's end, and results come to it in index order. Nothing
//! is ever in two hands: each item and each result leaves the loot once.
//!
//! Per-key order needs no check here: with `.key_order` a call never holds
//! two items of one key (see `keys.rs`), so whatever a thief takes, no two
//! items of a key can run at once.
//!
//! Under `cfg(par_imap_loom)` the lock is loom's, as in the worker pool,
//! and the protocol is model-checked (`steal/loom_model.rs`).

use std::collections::VecDeque;
use std::sync::PoisonError;
use std::time::Instant;

#[cfg(par_imap_loom)]
use loom::sync::{Mutex, MutexGuard};
#[cfg(not(par_imap_loom))]
use std::sync::{Mutex, MutexGuard};

use crate::error::drop_each;

#[cfg(all(test, par_imap_loom))]
mod loom_model;

/// The items not started and the results not delivered of one running
/// call, shared between its worker and thieves.
#[derive(Debug)]
pub(crate) struct Loot<T, R> {
    state: Mutex<State<T, R>>,
    /// From this moment on, thieves may take.
    steal_at: Instant,
    /// The call's first index: its name, which a thief's call must not take.
    first: usize,
}

#[derive(Debug)]
struct State<T, R> {
    /// The items not started, from index `next` on.
    items: VecDeque<T>,
    next: usize,
    /// The results not delivered, from index `done` on.
    results: Vec<R>,
    done: usize,
}

/// What a thief took, as it announces it: `items` items from index `at`
/// on (none for a harvest of results only), and the `results` from index
/// `done` on.
#[derive(Debug)]
pub(crate) struct Taken<R> {
    pub(crate) at: usize,
    pub(crate) items: usize,
    pub(crate) done: usize,
    pub(crate) results: Vec<R>,
}

impl<T, R> Loot<T, R> {
    /// `items`, the first of which is item `first`, stealable from `steal_at`.
    pub(crate) fn new(first: usize, items: Vec<T>, steal_at: Instant) -> Self {
        Loot {
            state: Mutex::new(State {
                results: Vec::with_capacity(items.len()),
                items: items.into(),
                next: first,
                done: first,
            }),
            steal_at,
            first,
        }
    }

    fn lock(&self) -> MutexGuard<'_, State<T, R>> {
        // Never held around user code: a poisoned lock is recovered.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The owner hands in the result of the item it mapped last (if any)
    /// and takes the next item: `None` at the end of its items, or when a
    /// thief took the rest.
    pub(crate) fn next(&self, result: Option<R>) -> Option<(usize, T)> {
        let mut state = self.lock();
        state.results.extend(result);
        let item = state.items.pop_front()?;
        let index = state.next;
        state.next += 1;
        Some((index, item))
    }

    /// The owner stops: it hands in its last result, and `report` makes
    /// its report, under the lock, from the results not delivered (from
    /// their first index). The items it did not start, and no thief took,
    /// are dropped (the map no longer wants them).
    pub(crate) fn finish<E>(
        &self,
        result: Option<R>,
        report: impl FnOnce(usize, Vec<R>) -> E,
    ) -> E {
        let mut state = self.lock();
        state.results.extend(result);
        let left = std::mem::take(&mut state.items);
        let done = state.done;
        state.done += state.results.len();
        let event = report(done, std::mem::take(&mut state.results));
        drop(state);
        drop_each(left);
        event
    }

    /// When thieves may take from this call.
    pub(crate) fn steal_at(&self) -> Instant {
        self.steal_at
    }

    /// How many items the owner has not started, and whether results wait.
    pub(crate) fn left(&self) -> (usize, bool) {
        let state = self.lock();
        (state.items.len(), !state.results.is_empty())
    }

    /// The index of the next item the owner will take.
    pub(crate) fn next_index(&self) -> usize {
        self.lock().next
    }

    /// A thief takes the back half (rounded up) of the items the owner has
    /// not started, if it may `take_items`, and the results the owner has
    /// finished; with no item taken, the results alone (`items` empty), and
    /// with neither, nothing, unless `results_elsewhere` (the owner keeps
    /// its results in its deadlines' progress): then the announcement alone,
    /// for the engine to take them from there.
    /// `announce` is called with what was taken before the owner can go on,
    /// so that the engine hears of it before the owner's next report; it
    /// returns what the thief keeps beside the items.
    pub(crate) fn steal<A>(
        &self,
        take_items: bool,
        results_elsewhere: bool,
        announce: impl FnOnce(Taken<R>) -> A,
    ) -> Option<(usize, Vec<T>, A)> {
        let mut state = self.lock();
        let keep = if take_items {
            // Never every item before the owner took its first: the thief's
            // call would begin at the owner's first index, its name, and the
            // engine would take the owner's (empty) report for the thief's.
            let least = usize::from(state.next == self.first);
            (state.items.len() / 2).max(least).min(state.items.len())
        } else {
            state.items.len()
        };
        if keep == state.items.len() && state.results.is_empty() && !results_elsewhere {
            return None;
        }
        let items: Vec<T> = state.items.split_off(keep).into();
        let at = state.next + keep;
        let done = state.done;
        state.done += state.results.len();
        let results = std::mem::take(&mut state.results);
        let kept = announce(Taken {
            at,
            items: items.len(),
            done,
            results,
        });
        drop(state);
        Some((at, items, kept))
    }
}

impl<T, R> Drop for Loot<T, R> {
    /// Items and results left (a call torn down between two items) are
    /// dropped without letting a panic of theirs unwind.
    fn drop(&mut self) {
        let state = self.state.get_mut().unwrap_or_else(PoisonError::into_inner);
        drop_each(std::mem::take(&mut state.items));
        drop_each(std::mem::take(&mut state.results));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn loot(first: usize, len: usize) -> Loot<usize, usize> {
        Loot::new(first, (first..first + len).collect(), Instant::now())
    }

    /// Steals once; returns (at, items, done, results).
    fn steal(loot: &Loot<usize, usize>) -> Option<(usize, Vec<usize>, usize, Vec<usize>)> {
        let (at, items, (done, results)) =
            loot.steal(true, false, |taken| (taken.done, taken.results))?;
        Some((at, items, done, results))
    }

    #[test]
    fn the_owner_takes_every_item_in_order_when_nobody_steals() {
        let loot = loot(10, 3);
        let mut last = None;
        let mut mapped = Vec::new();
        while let Some((index, item)) = loot.next(last.take()) {
            assert_eq!(index, item);
            mapped.push(index);
            last = Some(item * 2);
        }
        assert_eq!(mapped, [10, 11, 12]);
        let (done, results) = loot.finish(last, |done, results| (done, results));
        assert_eq!((done, results), (10, vec![20, 22, 24]));
        assert!(steal(&loot).is_none(), "nothing left to steal");
    }

    #[test]
    fn a_thief_takes_the_back_half_and_the_results_so_far() {
        let loot = loot(0, 10);
        assert_eq!(loot.next(None), Some((0, 0)));
        assert_eq!(loot.next(Some(100)), Some((1, 1))); // item 1 hangs, say
        // Not started: 2..10 (8 items); the thief takes the back 4.
        let (at, items, done, results) = steal(&loot).unwrap();
        assert_eq!((at, items), (6, vec![6, 7, 8, 9]));
        assert_eq!(
            (done, results),
            (0, vec![100]),
            "item 0's result goes at once"
        );
        assert_eq!(loot.next_index(), 2);
        let mut owner = Vec::new();
        let mut last = Some(101);
        while let Some((index, _)) = loot.next(last.take()) {
            owner.push(index);
            last = Some(100 + index);
        }
        assert_eq!(owner, [2, 3, 4, 5], "the owner stops where the thief began");
        let (done, results) = loot.finish(last, |done, results| (done, results));
        assert_eq!((done, results), (1, vec![101, 102, 103, 104, 105]));
    }

    #[test]
    fn thieves_split_again_until_the_owner_has_none_left() {
        let loot = loot(0, 8);
        assert_eq!(loot.next(None), Some((0, 0))); // hung
        let mut stolen = Vec::new();
        while let Some((at, items, _, _)) = steal(&loot) {
            assert_eq!(items.first(), Some(&at), "a steal is one consecutive range");
            stolen.push(items);
        }
        // 1..8 not started: the thieves take 4..8, 2..4, 1..2.
        assert_eq!(stolen, [vec![4, 5, 6, 7], vec![2, 3], vec![1]]);
        assert_eq!(loot.next(Some(0)), None, "the owner finds the rest taken");
    }

    /// Found by the property test (a result lost, or an ordered map stalled):
    /// two thieves took both items of a call of two before its owner took
    /// one; the second thief's call began at the owner's first index, so it
    /// had the owner's name, and the owner's empty report skipped it.
    #[test]
    fn a_thief_never_takes_the_owners_first_item_before_the_owner_started() {
        let loot = loot(10, 2);
        assert_eq!(steal(&loot), Some((11, vec![11], 10, vec![])));
        assert_eq!(steal(&loot), None, "item 10 stays the owner's");
        assert_eq!(loot.next(None), Some((10, 10)));
        assert_eq!(loot.next(Some(20)), None);
        let (done, results) = loot.finish(None, |done, results| (done, results));
        assert_eq!((done, results), (10, vec![20]));
    }

    #[test]
    fn a_thief_harvests_results_alone_when_no_item_is_left() {
        let loot = loot(0, 2);
        assert_eq!(loot.next(None), Some((0, 0)));
        assert_eq!(loot.next(Some(10)), Some((1, 1))); // the last item hangs
        assert_eq!(steal(&loot), Some((2, vec![], 0, vec![10])));
        assert_eq!(steal(&loot), None, "nothing more until the owner goes on");
        let (done, results) = loot.finish(Some(11), |done, results| (done, results));
        assert_eq!((done, results), (1, vec![11]));
    }

    #[test]
    fn finish_drops_what_nobody_started_and_leaves_the_thiefs() {
        use std::sync::Arc;
        let counted = Arc::new(());
        let items: Vec<_> = (0..6).map(|_| Arc::clone(&counted)).collect();
        let loot: Loot<Arc<()>, ()> = Loot::new(0, items, Instant::now());
        drop(loot.next(None));
        let (at, taken, ()) = loot.steal(true, false, |_| ()).unwrap();
        assert_eq!((at, taken.len()), (3, 3), "1..6: the back 3");
        loot.finish(None, |_, _| ());
        assert_eq!(Arc::strong_count(&counted), 4, "the thief's 3 and ours");
        drop(taken);
        drop(loot);
        assert_eq!(Arc::strong_count(&counted), 1);
    }

    #[test]
    fn a_panicking_drop_of_a_left_item_does_not_unwind() {
        struct Bomb;
        impl Drop for Bomb {
            fn drop(&mut self) {
                panic!("boom");
            }
        }
        let loot: Loot<Bomb, ()> = Loot::new(0, vec![Bomb, Bomb, Bomb], Instant::now());
        std::mem::forget(loot.next(None));
        loot.finish(None, |_, _| ());
        drop(Loot::<Bomb, Bomb>::new(0, vec![Bomb], Instant::now()));
    }
}
