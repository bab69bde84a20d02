//! Per-key order (`.key_order`): which pulled items may be given to a call
//! now, so that items of one key never run at the same time and start in
//! input order.
//!
//! Keys are known here by a 64-bit hash of the user's key (with a hasher
//! seeded per map): two different keys with the same hash are only kept
//! apart less (they take turns), never run together when equal. A key is
//! known only while an item of it is in the window: memory is O(window).
//!
//! The rule, for calls of consecutive items:
//! - a key is *busy* from the moment one of its items is given to a call
//!   until that call has really ended (its report came, so a timed-out
//!   blocking item holds its key until its thread returned);
//! - an item is *ready* when it is the first waiting item of its key and
//!   the key is not busy;
//! - a call takes the lowest ready item, and then the items right after it
//!   while they are ready; so a call never holds two items of one key, and
//!   whatever part of it a thief takes, no two items of a key overlap.

use std::collections::hash_map::{Entry, RandomState};
use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::hash::{BuildHasher, Hash};
use std::pin::Pin;
use std::sync::{Arc, Weak};
use std::task::{Context, Poll};

use futures::Stream;
use pin_project_lite::pin_project;

use crate::batch::Batch;
use crate::error::{drop_contained, drop_each};
use crate::retry::{Cut, Kept};

pin_project! {
    /// The map's input: the stream, and with `.key_order` the items pulled
    /// that wait for their key. Dropped together when the map ends.
    pub(crate) struct Input<St: Stream> {
        #[pin]
        stream: St,
        keyed: Option<Keyed<St::Item>>,
    }

    impl<St: Stream> PinnedDrop for Input<St> {
        fn drop(this: Pin<&mut Self>) {
            // Waiting items one by one: a panic of their `Drop` is contained.
            if let Some(keyed) = this.project().keyed.as_mut() {
                drop_each(std::mem::take(&mut keyed.items).into_values());
                if let Some(kept) = &keyed.kept {
                    kept.clear();
                }
            }
        }
    }
}

impl<St: Stream> Input<St> {
    pub(crate) fn new(stream: St) -> Self {
        Input {
            stream,
            keyed: None,
        }
    }

    pub(crate) fn stream(&self) -> &St {
        &self.stream
    }

    pub(crate) fn set_key(&mut self, key: KeyFn<St::Item>) {
        self.keyed_mut().key = Some(key);
    }

    /// `.retry`: items are kept while they wait for an attempt or run one
    /// on a clone, where what makes them unwanted reaches them (returned).
    pub(crate) fn set_retry(&mut self, clone: fn(&St::Item) -> St::Item) -> Weak<dyn Cut>
    where
        St::Item: Send + 'static,
    {
        let kept = Arc::new(Kept::new());
        let keyed = self.keyed_mut();
        keyed.clone = Some(clone);
        keyed.kept = Some(Arc::clone(&kept));
        let kept: Arc<dyn Cut> = kept;
        Arc::downgrade(&kept)
    }

    fn keyed_mut(&mut self) -> &mut Keyed<St::Item> {
        self.keyed.get_or_insert_with(|| Keyed {
            key: None,
            clone: None,
            kept: None,
            items: BTreeMap::new(),
        })
    }

    pub(crate) fn poll_item(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<St::Item>> {
        self.project().stream.poll_next(cx)
    }

    pub(crate) fn keyed(self: Pin<&mut Self>) -> Option<&mut Keyed<St::Item>> {
        self.project().keyed.as_mut()
    }
}

impl<St: Stream + std::fmt::Debug> std::fmt::Debug for Input<St> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.stream.fmt(f)
    }
}

/// The key function and the items waiting for their key (or for their
/// next attempt), by index; with `.retry`, also the items whose attempt
/// runs on a clone.
pub(crate) struct Keyed<T> {
    /// Without `.key_order` (`.retry` alone) every item is its own key.
    key: Option<KeyFn<T>>,
    /// `.retry`: `T::clone`.
    clone: Option<fn(&T) -> T>,
    /// `.retry`: the items whose attempt runs on a clone, or that wait for
    /// the next.
    kept: Option<Arc<Kept<T>>>,
    items: BTreeMap<usize, T>,
}

impl<T> Keyed<T> {
    /// The key of item `index`.
    pub(crate) fn key(&self, index: usize, item: &T) -> u64 {
        match &self.key {
            Some(key) => key.key(item),
            None => index as u64,
        }
    }

    /// Item `index` for its next attempt: a clone when another attempt may
    /// follow (the item itself is kept), else the item itself. `None`: the
    /// map no longer wants it (dropped already); `Err`: the clone panicked
    /// (the item is dropped).
    pub(crate) fn take_attempt(
        &mut self,
        index: usize,
        keep: bool,
    ) -> Option<Result<T, Box<dyn std::any::Any + Send>>> {
        let item = match self.items.remove(&index) {
            Some(item) => item,
            None => self.kept.as_ref()?.take(index)?,
        };
        let (Some(clone), Some(kept), true) = (self.clone, &self.kept, keep) else {
            return Some(Ok(item));
        };
        // Cloned outside the store's lock: `clone` is the user's code.
        let copy = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| clone(&item)));
        if copy.is_err() {
            drop_contained(item);
        } else if let Some(unwanted) = kept.put(index, item) {
            drop_contained(unwanted);
        }
        Some(copy)
    }

    /// Item `index` ended for good: what is kept of it goes.
    pub(crate) fn forget(&mut self, index: usize) {
        if let Some(item) = self.items.remove(&index) {
            drop_contained(item);
        }
        if let Some(item) = self.kept.as_ref().and_then(|kept| kept.take(index)) {
            drop_contained(item);
        }
    }

    pub(crate) fn wait(&mut self, index: usize, item: T) {
        self.items.insert(index, item);
    }

    /// The items `first..first + len`, for their call.
    pub(crate) fn take(&mut self, first: usize, len: usize) -> Batch<T> {
        let items = (first..first + len).filter_map(|index| self.items.remove(&index));
        Batch::from_vec(items.collect())
    }

    /// The items from `index` on will never be mapped (fail-fast).
    pub(crate) fn forget_from(&mut self, index: usize) {
        drop_each(self.items.split_off(&index).into_values());
        if let Some(kept) = &self.kept {
            kept.cut_from(index);
        }
    }
}

/// The user's key function, hashing its key: called once per item, when the
/// item is pulled.
pub(crate) struct KeyFn<T> {
    key: Box<dyn Fn(&T) -> u64 + Send + Sync>,
}

impl<T> KeyFn<T> {
    pub(crate) fn new<K, F>(key: F) -> Self
    where
        F: Fn(&T) -> K + Send + Sync + 'static,
        K: Hash + Eq,
    {
        let hasher = Arc::new(RandomState::new());
        KeyFn {
            key: Box::new(move |item| hasher.hash_one(key(item))),
        }
    }

    pub(crate) fn key(&self, item: &T) -> u64 {
        (self.key)(item)
    }
}

impl<T> std::fmt::Debug for KeyFn<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("KeyFn")
    }
}

#[derive(Debug, Default)]
struct Key {
    /// An item of the key is in a call that has not ended.
    busy: bool,
    /// Its items pulled and not given to a call, in input order.
    waiting: VecDeque<usize>,
}

/// The keys of the items in the window.
#[derive(Debug)]
pub(crate) struct Keys {
    keys: HashMap<u64, Key>,
    /// The first waiting item of every key that is not busy.
    ready: BTreeSet<usize>,
    /// The key of every item pulled and not yet released.
    of: BTreeMap<usize, u64>,
    /// The running calls (by first index) and the end of their items.
    calls: BTreeMap<usize, usize>,
    /// Items pulled and not given to a call.
    waiting: usize,
    /// Items from this index on were forgotten (fail-fast).
    forgotten_from: usize,
}

impl Default for Keys {
    fn default() -> Self {
        Keys {
            keys: HashMap::new(),
            ready: BTreeSet::new(),
            of: BTreeMap::new(),
            calls: BTreeMap::new(),
            waiting: 0,
            forgotten_from: usize::MAX,
        }
    }
}

impl Keys {
    /// Item `index`, of `key`, was pulled: it waits for a call.
    pub(crate) fn arrive(&mut self, index: usize, key: u64) {
        self.of.insert(index, key);
        self.waiting += 1;
        let entry = self.keys.entry(key).or_default();
        if !entry.busy && entry.waiting.is_empty() {
            self.ready.insert(index);
        }
        entry.waiting.push_back(index);
    }

    /// The lowest ready item below `below`, and how many ready items follow
    /// it without a gap (at most `most` in all): the items of the next call.
    pub(crate) fn next_run(&self, most: usize, below: usize) -> Option<(usize, usize)> {
        let &first = self.ready.first()?;
        if first >= below {
            return None;
        }
        let mut len = 1;
        while len < most && first + len < below && self.ready.contains(&(first + len)) {
            len += 1;
        }
        Some((first, len))
    }

    /// The items `first..first + len` (from [`next_run`](Self::next_run))
    /// are given to the call `first`: their keys are busy until it ends.
    pub(crate) fn give(&mut self, first: usize, len: usize) {
        for index in first..first + len {
            let removed = self.ready.remove(&index);
            debug_assert!(removed, "only ready items are given");
            let Some(&key) = self.of.get(&index) else {
                continue;
            };
            if let Some(entry) = self.keys.get_mut(&key) {
                entry.waiting.pop_front();
                entry.busy = true;
            }
        }
        self.waiting -= len;
        self.calls.insert(first, first + len);
    }

    /// A thief took the items of `call` from `at` on: they are the call `at`.
    pub(crate) fn split(&mut self, call: usize, at: usize) {
        if let Some(end) = self.calls.get_mut(&call) {
            if (call..*end).contains(&at) {
                let end = std::mem::replace(end, at);
                self.calls.insert(at, end);
            }
        }
    }

    /// The call `call` really ended: the keys of its items are free, and
    /// the next waiting item of each becomes ready.
    pub(crate) fn release(&mut self, call: usize) {
        let Some(end) = self.calls.remove(&call) else {
            return;
        };
        let ended: Vec<u64> = {
            let gone: Vec<usize> = self.of.range(call..end).map(|(&index, _)| index).collect();
            gone.iter()
                .filter_map(|index| self.of.remove(index))
                .collect()
        };
        for key in ended {
            let Entry::Occupied(mut entry) = self.keys.entry(key) else {
                continue;
            };
            entry.get_mut().busy = false;
            match entry.get().waiting.front() {
                Some(&next) => {
                    self.ready.insert(next);
                }
                None => {
                    entry.remove();
                }
            }
        }
    }

    /// `.retry`: the call `index` (of that one item) failed, and its item
    /// waits for its next attempt: it waits again, first of its key, whose
    /// key stays busy (no later item of the key may start), and is not
    /// ready until [`wake`](Self::wake).
    pub(crate) fn retry_later(&mut self, index: usize) {
        let Some(&key) = self.of.get(&index) else {
            return;
        };
        if let Some(entry) = self.keys.get_mut(&key) {
            entry.waiting.push_front(index);
            self.waiting += 1;
        }
    }

    /// `.retry`: the wait of item `index` is over: it is ready (its key is
    /// still busy, so it is the only one of its key that is). Returns
    /// whether it still waited.
    pub(crate) fn wake(&mut self, index: usize) -> bool {
        let Some(key) = self.of.get(&index) else {
            return false;
        };
        let waits = self
            .keys
            .get(key)
            .is_some_and(|entry| entry.waiting.front() == Some(&index));
        if waits && index < self.forgotten_from {
            self.ready.insert(index);
        }
        waits
    }

    /// Items pulled and not given to a call.
    pub(crate) fn waiting(&self) -> usize {
        self.waiting
    }

    /// Items from `index` on will never be given to a call (fail-fast):
    /// they are forgotten, and so are keys known only through them.
    /// Returns whether anything was forgotten now.
    pub(crate) fn forget_from(&mut self, index: usize) -> bool {
        if index >= self.forgotten_from {
            return false;
        }
        self.forgotten_from = index;
        drop(self.ready.split_off(&index));
        let mut forgotten = Vec::new();
        self.keys.retain(|_, key| {
            while key.waiting.back().is_some_and(|&last| last >= index) {
                forgotten.extend(key.waiting.pop_back());
            }
            key.busy || !key.waiting.is_empty()
        });
        self.waiting -= forgotten.len();
        for at in forgotten {
            self.of.remove(&at);
        }
        true
    }

    /// Forgets everything: the map ended.
    pub(crate) fn clear(&mut self) {
        *self = Keys::default();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys(pulled: &[u64]) -> Keys {
        let mut keys = Keys::default();
        for (index, &key) in pulled.iter().enumerate() {
            keys.arrive(index, key);
        }
        keys
    }

    #[test]
    fn distinct_keys_make_one_run() {
        let keys = keys(&[1, 2, 3, 4]);
        assert_eq!(keys.next_run(10, usize::MAX), Some((0, 4)));
        assert_eq!(keys.next_run(3, usize::MAX), Some((0, 3)));
        assert_eq!(
            keys.next_run(10, 2),
            Some((0, 2)),
            "nothing at or past `below`"
        );
    }

    #[test]
    fn a_repeated_key_ends_the_run_and_waits_for_the_call() {
        let mut keys = keys(&[1, 2, 1, 3]);
        assert_eq!(keys.next_run(10, usize::MAX), Some((0, 2)));
        keys.give(0, 2);
        assert_eq!(keys.waiting(), 2);
        // Item 2 waits for key 1; item 3 overtakes it.
        assert_eq!(keys.next_run(10, usize::MAX), Some((3, 1)));
        keys.give(3, 1);
        assert_eq!(keys.next_run(10, usize::MAX), None);
        keys.release(0);
        assert_eq!(keys.next_run(10, usize::MAX), Some((2, 1)));
    }

    #[test]
    fn a_keys_items_start_in_input_order() {
        let mut keys = keys(&[7, 7, 7]);
        for expected in 0..3 {
            assert_eq!(keys.next_run(10, usize::MAX), Some((expected, 1)));
            keys.give(expected, 1);
            assert_eq!(keys.next_run(10, usize::MAX), None, "key 7 is busy");
            keys.release(expected);
        }
        assert!(keys.keys.is_empty() && keys.of.is_empty(), "nothing kept");
    }

    #[test]
    fn a_stolen_part_holds_its_keys_until_the_thief_ends() {
        let mut keys = keys(&[1, 2, 3, 1, 3]);
        assert_eq!(keys.next_run(10, usize::MAX), Some((0, 3)));
        keys.give(0, 3);
        keys.split(0, 2);
        keys.release(0);
        // Key 1 is free: item 3 is ready; key 3 is still busy in call 2.
        assert_eq!(keys.next_run(10, usize::MAX), Some((3, 1)));
        keys.release(2);
        assert_eq!(keys.next_run(10, usize::MAX), Some((3, 2)));
    }

    #[test]
    fn forgotten_items_leave_nothing_behind() {
        let mut keys = keys(&[1, 1, 2, 2]);
        keys.give(0, 1);
        keys.forget_from(1);
        assert_eq!(keys.waiting(), 0);
        assert_eq!(keys.next_run(10, usize::MAX), None);
        keys.release(0);
        assert!(keys.keys.is_empty() && keys.of.is_empty() && keys.ready.is_empty());
    }
}
