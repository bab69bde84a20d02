//! Work stealing inside blocking calls. A call of several items keeps them
//! in its [`Loot`]: its own worker takes them one by one, in order, and once
//! the call is past its steal time an idle worker may take the back half of
//! the items it has not started, at any moment, even while the owner is
//! stuck inside one item. So a slow or hung item never holds back the items
//! after it in its call.
//!
//! Protocol. Every item sits in a slot of its own. The owner takes slot
//! after slot and stops at the first empty one: a thief took it, and with
//! it every slot after it. A thief, one at a time under the `end` lock,
//! takes the first slot it can from the middle of what the owner has not
//! started, then every slot after it up to the owner's end, and announces
//! the steal before it lets go of that lock. An owner that finds a slot
//! empty takes the same lock once before it reports, so the engine always
//! hears of a steal before it hears the owner's last results. Nothing is
//! ever in two hands: a slot is emptied under its own lock, by exactly one.
//!
//! The owner pays one uncontended lock per item; a thief never touches the
//! slots the owner is about to take unless it takes them from the middle.

use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::Instant;

use crate::error::drop_contained;

/// The items of one running call, shared between its worker and thieves.
#[derive(Debug)]
pub(crate) struct Loot<T> {
    /// The index of the item in `slots[0]`.
    first: usize,
    slots: Box<[Mutex<Option<T>>]>,
    /// The owner's next slot: a thief takes only from here on.
    next: AtomicUsize,
    /// The end of the owner's slots: what a thief took is past it. Thieves
    /// take one at a time, under this lock, and announce under it.
    end: Mutex<usize>,
    /// From this moment on, thieves may take.
    steal_at: Instant,
}

fn lock<X>(mutex: &Mutex<X>) -> MutexGuard<'_, X> {
    // Never held around user code: a poisoned lock is recovered.
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

impl<T> Loot<T> {
    /// `items`, the first of which is item `first`, stealable from `steal_at`.
    pub(crate) fn new(first: usize, items: Vec<T>, steal_at: Instant) -> Self {
        let slots: Box<[Mutex<Option<T>>]> = items
            .into_iter()
            .map(|item| Mutex::new(Some(item)))
            .collect();
        Loot {
            first,
            end: Mutex::new(slots.len()),
            slots,
            next: AtomicUsize::new(0),
            steal_at,
        }
    }

    /// The owner takes item `index`; `None` at the end of its items, or
    /// when a thief took this one and every later one.
    pub(crate) fn take(&self, index: usize) -> Option<T> {
        let at = index.checked_sub(self.first)?;
        let item = lock(self.slots.get(at)?).take();
        self.next.store(at + 1, Relaxed);
        if item.is_none() {
            // The thief announced the steal under this lock: once we hold
            // it, the engine has heard of the steal before our report.
            drop(lock(&self.end));
        }
        item
    }

    /// The owner stops at item `index`, which the map no longer wants:
    /// its items not taken by a thief are dropped here.
    pub(crate) fn abandon(&self, index: usize) {
        let mut index = index;
        while let Some(item) = self.take(index) {
            drop_contained(item);
            index += 1;
        }
    }

    /// When thieves may take from this call.
    pub(crate) fn steal_at(&self) -> Instant {
        self.steal_at
    }

    /// The index of the next item the owner will take.
    pub(crate) fn next_index(&self) -> usize {
        self.first + self.next.load(Relaxed)
    }

    /// How many items the owner has not started.
    pub(crate) fn left(&self) -> usize {
        lock(&self.end).saturating_sub(self.next.load(Relaxed))
    }

    /// A thief takes the back half (rounded up) of the items the owner has
    /// not started. `announce(first)` is called with the index of the first
    /// item taken before the owner can see the steal; the items come back
    /// from that index on.
    pub(crate) fn steal<A>(&self, announce: impl FnOnce(usize) -> A) -> Option<(usize, Vec<T>, A)> {
        let mut end = lock(&self.end);
        let next = self.next.load(Relaxed);
        if next >= *end {
            return None;
        }
        let mut at = next + (*end - next) / 2;
        // The owner may have moved past the middle meanwhile: the first slot
        // still full is where the steal begins.
        let first_item = loop {
            if at >= *end {
                return None;
            }
            if let Some(item) = lock(&self.slots[at]).take() {
                break item;
            }
            at += 1;
        };
        let mut items = Vec::with_capacity(*end - at);
        items.push(first_item);
        // The owner stops at slot `at`: the rest is the thief's alone.
        for slot in &self.slots[at + 1..*end] {
            items.extend(lock(slot).take());
        }
        let announced = announce(self.first + at);
        *end = at;
        Some((self.first + at, items, announced))
    }
}

impl<T> Drop for Loot<T> {
    /// Items left (a call torn down between two items) are dropped without
    /// letting a panic of theirs unwind.
    fn drop(&mut self) {
        for slot in self.slots.iter_mut() {
            if let Some(item) = slot
                .get_mut()
                .unwrap_or_else(PoisonError::into_inner)
                .take()
            {
                drop_contained(item);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn loot(first: usize, len: usize) -> Loot<usize> {
        Loot::new(first, (first..first + len).collect(), Instant::now())
    }

    #[test]
    fn the_owner_takes_every_item_in_order_when_nobody_steals() {
        let loot = loot(10, 4);
        let taken: Vec<_> = (10..15).map_while(|index| loot.take(index)).collect();
        assert_eq!(taken, [10, 11, 12, 13]);
        assert_eq!(loot.left(), 0);
        assert!(loot.steal(|_| ()).is_none(), "nothing left to steal");
    }

    #[test]
    fn a_thief_takes_the_back_half_and_the_owner_stops_before_it() {
        let loot = loot(0, 10);
        assert_eq!(loot.take(0), Some(0)); // the owner runs item 0 (hung, say)
        let (first, items, announced) = loot.steal(|first| first * 100).unwrap();
        // Left: 1..10 (9 items); the thief takes the back 5.
        assert_eq!((first, announced), (5, 500));
        assert_eq!(items, [5, 6, 7, 8, 9]);
        assert_eq!(loot.next_index(), 1);
        let owner: Vec<_> = (1..10).map_while(|index| loot.take(index)).collect();
        assert_eq!(owner, [1, 2, 3, 4], "the owner stops where the thief began");
    }

    #[test]
    fn thieves_split_again_until_one_item_is_left_to_the_owner() {
        let loot = loot(0, 8);
        assert_eq!(loot.take(0), Some(0));
        let mut stolen = Vec::new();
        while let Some((first, items, ())) = loot.steal(|_| ()) {
            assert_eq!(items[0], first, "a steal is one consecutive range");
            stolen.push(items);
        }
        // 1..8 left: the thieves take 4..8, then 2..4, then 1..2.
        assert_eq!(stolen, [vec![4, 5, 6, 7], vec![2, 3], vec![1]]);
        assert_eq!(loot.take(1), None, "the owner finds the rest taken");
    }

    #[test]
    fn a_steal_begins_past_items_the_owner_took_meanwhile() {
        let loot = loot(0, 6);
        // The owner took 0..4 but has not yet published its position 4 for
        // the middle: emulate by taking the slots directly.
        for index in 0..4 {
            assert_eq!(loot.take(index), Some(index));
        }
        let (first, items, ()) = loot.steal(|_| ()).unwrap();
        assert_eq!((first, items), (5, vec![5]));
        assert_eq!(loot.take(4), Some(4));
        assert_eq!(loot.take(5), None);
    }

    #[test]
    fn abandon_drops_what_the_owner_did_not_take_and_leaves_the_thiefs() {
        use std::sync::Arc;
        let counted = Arc::new(());
        let items: Vec<_> = (0..6).map(|_| Arc::clone(&counted)).collect();
        let loot = Loot::new(0, items, Instant::now());
        drop(loot.take(0));
        let (_, stolen, ()) = loot.steal(|_| ()).unwrap();
        assert_eq!(stolen.len(), 3, "1..6: the back 3");
        loot.abandon(1);
        assert_eq!(Arc::strong_count(&counted), 4, "the thief's 3 and ours");
        drop(stolen);
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
        let loot = Loot::new(0, vec![Bomb, Bomb, Bomb], Instant::now());
        std::mem::forget(loot.take(0));
        loot.abandon(1);
        drop(Loot::new(0, vec![Bomb], Instant::now()));
    }
}
