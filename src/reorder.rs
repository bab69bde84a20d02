//! The reorder buffer: the results of calls, handed out in input order or
//! in completion order, like futures' `FuturesOrdered` and
//! `FuturesUnordered` in one type.
//!
//! A call covers the consecutive items `first..end`. The buffer knows each
//! call pulled and not fully yielded as a *slot*: running (with the
//! engine's handle on it, `R`), skipped (it will bring no results: a
//! failure at a lower index, or the end of the map, explains it), or done
//! (its results, waiting for their turn).
//!
//! Invariants:
//! - slots are sorted by `first` and never overlap; a done slot holds
//!   exactly one result per item of its range (a call cut short leaves the
//!   rest of its range as a skipped slot);
//! - input order: the slots cover `next_out..next_in` without a gap, until
//!   a failure truncates them; the front slot is the only one results come
//!   from, and only when it is done;
//! - completion order: finished results leave the slots at once for
//!   `ready`, in the order they finished; a drain is removed as soon as its
//!   last result is taken, so every drain in `ready` still owes a result;
//! - the lowest index not yet yielded is `next_out` in input order, and in
//!   completion order the lowest of the slots' and the drains' next indices
//!   and of the calls forgotten after a failure (`next_in` when there is
//!   none).

use std::collections::VecDeque;

use crate::batch::{BatchIter, Results};
use crate::error::Error;
use crate::error::{drop_contained, drop_each};
use crate::options::Order;

/// The results of one call, yielded one by one.
#[derive(Debug)]
struct Drain<U> {
    /// The index of the next result.
    index: usize,
    results: BatchIter<Result<U, Error>>,
}

impl<U> Drain<U> {
    fn next(&mut self) -> Option<Result<U, Error>> {
        let result = self.results.next()?;
        self.index += 1;
        Some(result)
    }

    fn is_empty(&self) -> bool {
        self.results.len() == 0
    }
}

/// What is left of a call after part of its results came.
#[derive(Debug)]
pub(crate) enum Part<R> {
    /// It runs on.
    GoesOn,
    /// It brought all its results; here is its handle.
    Ended(R),
}

#[derive(Debug)]
enum State<U, R> {
    /// Pulled, not given to a call yet (`.key_order`: its key is busy).
    Waiting,
    Running(R),
    Skipped,
    Done(Drain<U>),
}

#[derive(Debug)]
struct Slot<U, R> {
    /// The call it belongs to, named by the call's first index: a call may
    /// be split into a done part and a running part.
    call: usize,
    first: usize,
    end: usize,
    state: State<U, R>,
}

/// Drops slots the map no longer wants, their results one by one: a panic
/// of a result's `Drop` is contained.
fn drop_slots<U, R>(slots: impl IntoIterator<Item = Slot<U, R>>) {
    for slot in slots {
        match slot.state {
            State::Done(drain) => drop_each(drain.results),
            other => drop_contained(other),
        }
    }
}

/// Results of the calls of one map, in the order they are to be yielded.
#[derive(Debug)]
pub(crate) struct Reorder<U, R> {
    order: Order,
    slots: VecDeque<Slot<U, R>>,
    /// Completion order: finished results, in the order they finished.
    ready: VecDeque<Drain<U>>,
    /// Input order: the index of the next result to yield.
    next_out: usize,
    /// The first index of the next call.
    next_in: usize,
    /// Completion order: the lowest index of the calls forgotten after a
    /// failure; never yielded, so still the lowest a cancellation may name.
    forgotten: Option<usize>,
    /// The last result popped left more of its call's results to pop.
    mid_drain: bool,
}

impl<U, R> Reorder<U, R> {
    pub(crate) fn new(order: Order) -> Self {
        Reorder {
            order,
            slots: VecDeque::new(),
            ready: VecDeque::new(),
            next_out: 0,
            next_in: 0,
            forgotten: None,
            mid_drain: false,
        }
    }

    /// A call over the next `len` items started; returns its first index.
    pub(crate) fn push(&mut self, len: usize, running: R) -> usize {
        self.push_slot(len, State::Running(running))
    }

    /// The next `len` items were pulled and wait to be given to calls;
    /// returns the first one's index.
    pub(crate) fn push_waiting(&mut self, len: usize) -> usize {
        self.push_slot(len, State::Waiting)
    }

    fn push_slot(&mut self, len: usize, state: State<U, R>) -> usize {
        let first = self.next_in;
        self.next_in += len;
        self.slots.push_back(Slot {
            call: first,
            first,
            end: self.next_in,
            state,
        });
        first
    }

    /// The waiting items `first..first + len` were given to the call
    /// `first`, with the handle `running`; `Err` gives `running` back when
    /// they do not wait (any more: the map forgot them).
    pub(crate) fn start_waiting(&mut self, first: usize, len: usize, running: R) -> Result<(), R> {
        let end = first + len;
        let Some(at) = self
            .slots
            .partition_point(|slot| slot.first <= first)
            .checked_sub(1)
        else {
            return Err(running);
        };
        // The waiting slots that cover `first..end`, without a gap.
        let mut last = at;
        loop {
            let slot = &self.slots[last];
            if !matches!(slot.state, State::Waiting) || (last == at && first >= slot.end) {
                return Err(running);
            }
            if slot.end >= end {
                break;
            }
            match self.slots.get(last + 1) {
                Some(next) if next.first == slot.end => last += 1,
                _ => return Err(running),
            }
        }
        // What waits before and after the call stays waiting.
        let (before, after) = (self.slots[at].first, self.slots[last].end);
        drop(self.slots.drain(at..=last));
        let waiting = |first: usize, end: usize| Slot {
            call: first,
            first,
            end,
            state: State::Waiting,
        };
        if end < after {
            self.slots.insert(at, waiting(end, after));
        }
        self.slots.insert(
            at,
            Slot {
                call: first,
                first,
                end,
                state: State::Running(running),
            },
        );
        if before < first {
            self.slots.insert(at, waiting(before, first));
        }
        Ok(())
    }

    /// Where the running part of `call` is, if it still runs.
    fn position(&self, call: usize) -> Option<usize> {
        // Calls of one item each (async calls, slow items): the slot is as
        // far from the front as the call's index. A call has one running
        // part at most, so a running slot found there is the one.
        let guess = call.checked_sub(self.slots.front()?.first);
        if let Some(slot) = guess.and_then(|guess| self.slots.get(guess)) {
            if slot.call == call && matches!(slot.state, State::Running(_)) {
                return guess;
            }
        }
        let at = self
            .slots
            .partition_point(|slot| slot.call <= call)
            .checked_sub(1)?;
        let slot = &self.slots[at];
        (slot.call == call && matches!(slot.state, State::Running(_))).then_some(at)
    }

    /// The handle of `call` and the index of its next result, if it runs.
    pub(crate) fn running(&mut self, call: usize) -> Option<(&mut R, usize)> {
        let at = self.position(call)?;
        let slot = &mut self.slots[at];
        match &mut slot.state {
            State::Running(running) => Some((running, slot.first)),
            _ => None,
        }
    }

    /// Whether `call` still runs.
    pub(crate) fn is_running(&self, call: usize) -> bool {
        self.position(call).is_some()
    }

    /// The running `call` brought the results of its items from `first`
    /// on. Returns where it goes on, or its handle if these were its last
    /// items; `None` (the results dropped) when the map no longer wants
    /// them.
    pub(crate) fn complete_part(
        &mut self,
        call: usize,
        first: usize,
        results: Results<U>,
    ) -> Option<Part<R>> {
        let at = self.position(call)?;
        if self.slots[at].first != first {
            return None;
        }
        let end = self.slots[at].end;
        let mid = (first + results.len()).min(end);
        if mid == first {
            return Some(Part::GoesOn);
        }
        let drain = Drain {
            index: first,
            results: results.into_iter(),
        };
        let running = match self.order {
            Order::Input => {
                self.slots[at].end = mid;
                std::mem::replace(&mut self.slots[at].state, State::Done(drain))
            }
            Order::Completion => {
                self.ready.push_back(drain);
                if mid < end {
                    self.slots[at].first = mid;
                    return Some(Part::GoesOn);
                }
                self.slots
                    .remove(at)
                    .map_or(State::Skipped, |slot| slot.state)
            }
        };
        let State::Running(running) = running else {
            return None;
        };
        if mid == end {
            return Some(Part::Ended(running));
        }
        // Input order: the rest of the range runs on, after the done part.
        self.slots.insert(
            at + 1,
            Slot {
                call,
                first: mid,
                end,
                state: State::Running(running),
            },
        );
        Some(Part::GoesOn)
    }

    /// An idle worker took the items of the running `call` from `at` on:
    /// they are the running call `at` now, with the handle `running`.
    /// `Ok(None)`: `call` runs on before `at`; `Ok(Some(handle))`: nothing
    /// of `call` was left before `at`, here is its old handle; `Err`: `call`
    /// no longer runs there, and `running` comes back.
    pub(crate) fn split(&mut self, call: usize, at: usize, running: R) -> Result<Option<R>, R> {
        let Some(position) = self.position(call) else {
            return Err(running);
        };
        let slot = &mut self.slots[position];
        if !(slot.first <= at && at < slot.end) {
            return Err(running);
        }
        if slot.first == at {
            slot.call = at;
            let State::Running(old) = std::mem::replace(&mut slot.state, State::Running(running))
            else {
                unreachable!("position() finds running slots only")
            };
            return Ok(Some(old));
        }
        let end = std::mem::replace(&mut slot.end, at);
        self.slots.insert(
            position + 1,
            Slot {
                call: at,
                first: at,
                end,
                state: State::Running(running),
            },
        );
        Ok(None)
    }

    /// The running `call` ended with these results, from `first` on: what
    /// it did not map is skipped. Returns the handle of the call, or `None`
    /// (the results dropped) when the map no longer wants them.
    pub(crate) fn complete(&mut self, call: usize, first: usize, results: Results<U>) -> Option<R> {
        match self.complete_part(call, first, results)? {
            Part::Ended(running) => Some(running),
            Part::GoesOn => self.skip(call),
        }
    }

    /// The running `call` will bring no (more) results. Returns its
    /// handle, or `None` if it does not run.
    pub(crate) fn skip(&mut self, call: usize) -> Option<R> {
        let at = self.position(call)?;
        match std::mem::replace(&mut self.slots[at].state, State::Skipped) {
            State::Running(running) => Some(running),
            other => {
                self.slots[at].state = other;
                None
            }
        }
    }

    /// The running one-item `call` will run again later (`.retry`): its
    /// item waits again. Returns its handle, or `None` if it does not run.
    pub(crate) fn wait_again(&mut self, call: usize) -> Option<R> {
        let at = self.position(call)?;
        let slot = &mut self.slots[at];
        slot.call = slot.first;
        match std::mem::replace(&mut slot.state, State::Waiting) {
            State::Running(running) => Some(running),
            other => {
                slot.state = other;
                None
            }
        }
    }

    /// Forgets every call that starts after `index` (fail-fast in input
    /// order); their handles are dropped.
    pub(crate) fn truncate_after(&mut self, index: usize) {
        let keep = self.slots.partition_point(|slot| slot.first <= index);
        drop_slots(self.slots.split_off(keep));
        // Items after `index` that waited for a call will never get one.
        if let Some(last) = self.slots.back_mut() {
            if matches!(last.state, State::Waiting) {
                last.end = last.end.min(index + 1);
            }
        }
    }

    /// Forgets every call not finished yet (fail-fast in completion order);
    /// results already finished stay to be yielded.
    pub(crate) fn forget_unfinished(&mut self) {
        if let Some(lowest) = self.slots.front().map(|slot| slot.first) {
            self.forgotten = Some(self.forgotten.map_or(lowest, |low| low.min(lowest)));
        }
        let (done, unfinished) = std::mem::take(&mut self.slots)
            .into_iter()
            .partition(|slot| matches!(slot.state, State::Done(_)));
        self.slots = done;
        drop_slots::<U, R>(unfinished);
    }

    /// Forgets everything: the map ended.
    pub(crate) fn clear(&mut self) {
        drop_slots(std::mem::take(&mut self.slots));
        std::mem::take(&mut self.ready)
            .into_iter()
            .for_each(|drain| drop_each(drain.results));
        self.mid_drain = false;
    }

    /// The next result whose turn has come.
    pub(crate) fn pop(&mut self) -> Option<Result<U, Error>> {
        self.mid_drain = false;
        match self.order {
            Order::Input => {
                let front = self.slots.front_mut()?;
                let State::Done(drain) = &mut front.state else {
                    return None;
                };
                let result = drain.next()?;
                if drain.is_empty() {
                    self.slots.pop_front();
                } else {
                    self.mid_drain = true;
                }
                self.next_out += 1;
                Some(result)
            }
            Order::Completion => {
                let drain = self.ready.front_mut()?;
                let result = drain.next()?;
                if drain.is_empty() {
                    self.ready.pop_front();
                } else {
                    self.mid_drain = true;
                }
                Some(result)
            }
        }
    }

    /// The next result, if it comes from the same call's results as the
    /// last one popped: the rest of a batch.
    pub(crate) fn pop_same_call(&mut self) -> Option<Result<U, Error>> {
        if self.mid_drain { self.pop() } else { None }
    }

    /// The lowest index not yet yielded (`next_in` when every item pulled
    /// was yielded).
    pub(crate) fn lowest_owed(&self) -> usize {
        match self.order {
            Order::Input => self.next_out,
            Order::Completion => self
                .slots
                .iter()
                .map(|slot| slot.first)
                .chain(self.ready.iter().map(|drain| drain.index))
                .chain(self.forgotten)
                .min()
                .unwrap_or(self.next_in),
        }
    }

    /// Whether no result is owed: every item pulled was yielded or forgotten.
    pub(crate) fn is_empty(&self) -> bool {
        self.slots.is_empty() && self.ready.is_empty()
    }

    /// Results finished and waiting (completion order).
    pub(crate) fn ready_len(&self) -> usize {
        self.ready.iter().map(|drain| drain.results.len()).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::batch::Batch;

    fn ok(values: &[u32]) -> Results<u32> {
        Batch::Many(values.iter().map(|&v| Ok(v)).collect())
    }

    fn drain_all(buffer: &mut Reorder<u32, &'static str>) -> Vec<u32> {
        std::iter::from_fn(|| buffer.pop())
            .map(|result| result.unwrap())
            .collect()
    }

    #[test]
    fn waiting_items_hold_their_place_and_start_as_one_call() {
        let mut buffer = Reorder::new(Order::Input);
        assert_eq!(buffer.push_waiting(4), 0);
        assert_eq!(buffer.lowest_owed(), 0);
        // Items 2 and 3 overtake 0 and 1, as one call.
        assert!(buffer.start_waiting(2, 2, "call 2").is_ok());
        assert_eq!(
            buffer.start_waiting(2, 1, "again"),
            Err("again"),
            "runs already"
        );
        assert_eq!(buffer.complete(2, 2, ok(&[12, 13])), Some("call 2"));
        assert_eq!(drain_all(&mut buffer), [] as [u32; 0], "item 0 still waits");
        assert!(buffer.start_waiting(0, 1, "call 0").is_ok());
        assert!(buffer.start_waiting(1, 1, "call 1").is_ok());
        assert_eq!(buffer.complete(1, 1, ok(&[11])), Some("call 1"));
        assert_eq!(buffer.complete(0, 0, ok(&[10])), Some("call 0"));
        assert_eq!(drain_all(&mut buffer), [10, 11, 12, 13]);
        assert!(buffer.is_empty());
    }

    #[test]
    fn a_call_may_take_items_that_waited_in_several_pulls() {
        let mut buffer = Reorder::new(Order::Completion);
        buffer.push_waiting(1);
        buffer.push_waiting(2);
        buffer.push_waiting(1);
        assert!(buffer.start_waiting(1, 3, "call 1").is_ok());
        assert_eq!(buffer.start_waiting(3, 1, "again"), Err("again"));
        assert_eq!(buffer.lowest_owed(), 0, "item 0 still waits");
        assert_eq!(buffer.complete(1, 1, ok(&[11, 12, 13])), Some("call 1"));
        assert_eq!(drain_all(&mut buffer), [11, 12, 13]);
        assert!(buffer.start_waiting(0, 1, "call 0").is_ok());
        assert_eq!(buffer.complete(0, 0, ok(&[10])), Some("call 0"));
        assert_eq!(drain_all(&mut buffer), [10]);
        assert!(buffer.is_empty());
    }

    #[test]
    fn waiting_items_after_a_failure_are_forgotten() {
        let mut buffer = Reorder::<u32, &str>::new(Order::Input);
        buffer.push_waiting(3);
        buffer.truncate_after(0);
        assert_eq!(buffer.start_waiting(1, 1, "call 1"), Err("call 1"));
        assert!(buffer.start_waiting(0, 1, "call 0").is_ok());
        let mut unordered = Reorder::<u32, &str>::new(Order::Completion);
        unordered.push_waiting(2);
        unordered.forget_unfinished();
        assert!(unordered.is_empty());
        assert_eq!(unordered.lowest_owed(), 0, "the forgotten are still owed");
    }

    #[test]
    fn input_order_waits_for_the_head() {
        let mut buffer = Reorder::new(Order::Input);
        assert_eq!(buffer.push(2, "a"), 0);
        assert_eq!(buffer.push(1, "b"), 2);
        assert_eq!(buffer.complete(2, 2, ok(&[20])), Some("b"));
        assert!(buffer.pop().is_none(), "item 0 is not done");
        assert_eq!(buffer.lowest_owed(), 0);
        assert_eq!(buffer.complete(0, 0, ok(&[0, 1])), Some("a"));
        assert_eq!(drain_all(&mut buffer), [0, 1, 20]);
        assert!(buffer.is_empty());
        assert_eq!(buffer.lowest_owed(), 3);
    }

    #[test]
    fn pop_same_call_stays_inside_one_calls_results() {
        for order in [Order::Input, Order::Completion] {
            let mut buffer = Reorder::new(order);
            buffer.push(2, "a");
            buffer.push(1, "b");
            buffer.complete(0, 0, ok(&[0, 1]));
            buffer.complete(2, 2, ok(&[2]));
            assert!(buffer.pop_same_call().is_none(), "nothing popped yet");
            assert_eq!(buffer.pop().map(Result::unwrap), Some(0));
            assert_eq!(buffer.pop_same_call().map(Result::unwrap), Some(1));
            assert!(buffer.pop_same_call().is_none(), "item 2 is another call's");
            assert_eq!(buffer.pop().map(Result::unwrap), Some(2));
            assert!(buffer.pop_same_call().is_none());
            assert!(buffer.is_empty());
        }
    }

    /// The guess that a call's slot sits as far from the front as its index
    /// holds only for one-item calls: an index inside a longer call must
    /// not find the call after it.
    #[test]
    fn an_index_inside_a_call_is_not_the_next_call() {
        let mut buffer: Reorder<u32, &str> = Reorder::new(Order::Input);
        buffer.push(2, "a");
        buffer.push(1, "b");
        buffer.push(1, "c");
        assert!(!buffer.is_running(1), "index 1 is inside call 0");
        assert!(buffer.is_running(2) && buffer.is_running(0));
    }

    /// A drain counts the results it handed out: once some of a call's
    /// results came, the lowest index owed is the next of them.
    #[test]
    fn lowest_owed_moves_past_what_a_partly_drained_call_yielded() {
        let mut buffer = Reorder::new(Order::Completion);
        buffer.push(3, "a");
        buffer.push(1, "b");
        buffer.complete(0, 0, ok(&[0, 1, 2]));
        assert_eq!(buffer.pop().map(Result::unwrap), Some(0));
        assert_eq!(buffer.lowest_owed(), 1);
        assert_eq!(buffer.pop().map(Result::unwrap), Some(1));
        assert_eq!(buffer.lowest_owed(), 2);
    }

    #[test]
    fn completion_order_yields_as_finished() {
        let mut buffer = Reorder::new(Order::Completion);
        buffer.push(1, "a");
        buffer.push(1, "b");
        buffer.complete(1, 1, ok(&[1]));
        assert_eq!(buffer.lowest_owed(), 0);
        assert_eq!(drain_all(&mut buffer), [1]);
        buffer.complete(0, 0, ok(&[0]));
        assert_eq!(drain_all(&mut buffer), [0]);
        assert!(buffer.is_empty());
    }

    #[test]
    fn a_used_up_drain_is_not_owed() {
        // Item 0 runs long, item 1 is yielded, then 0 is yielded: the lowest
        // owed index is 2 (still running), never 1.
        let mut buffer = Reorder::new(Order::Completion);
        buffer.push(1, "a");
        buffer.push(1, "b");
        buffer.push(1, "c");
        buffer.complete(1, 1, ok(&[1]));
        assert_eq!(buffer.pop().unwrap().unwrap(), 1);
        buffer.complete(0, 0, ok(&[0]));
        assert_eq!(buffer.pop().unwrap().unwrap(), 0);
        assert_eq!(buffer.lowest_owed(), 2);
        assert_eq!(buffer.ready_len(), 0);
    }

    #[test]
    fn a_call_cut_short_leaves_its_rest_skipped() {
        let mut buffer = Reorder::new(Order::Input);
        buffer.push(4, "a");
        buffer.push(1, "b");
        buffer.complete(0, 0, ok(&[0, 1]));
        assert_eq!(drain_all(&mut buffer), [0, 1]);
        assert_eq!(buffer.lowest_owed(), 2, "items 2 and 3 never came");
        buffer.truncate_after(1);
        assert!(buffer.is_empty() || buffer.pop().is_none());
    }

    #[test]
    fn a_part_of_a_call_is_yielded_before_the_call_ends() {
        for order in [Order::Input, Order::Completion] {
            let mut buffer = Reorder::new(order);
            buffer.push(4, "a");
            assert!(matches!(
                buffer.complete_part(0, 0, ok(&[0, 1])),
                Some(Part::GoesOn)
            ));
            assert_eq!(drain_all(&mut buffer), [0, 1]);
            assert_eq!(buffer.lowest_owed(), 2);
            assert_eq!(buffer.running(0).map(|(_, next)| next), Some(2));
            assert_eq!(buffer.complete(0, 0, ok(&[9])), None, "misaligned: dropped");
            assert_eq!(buffer.complete(0, 2, ok(&[2, 3])), Some("a"));
            assert!(!buffer.is_running(0));
            assert_eq!(drain_all(&mut buffer), [2, 3]);
            assert!(buffer.is_empty());
        }
    }

    #[test]
    fn truncation_forgets_later_calls_and_their_results() {
        let mut buffer = Reorder::new(Order::Input);
        buffer.push(1, "a");
        buffer.push(1, "b");
        buffer.push(1, "c");
        buffer.complete(1, 1, Batch::One(Err(Error::timeout(1))));
        buffer.truncate_after(1);
        assert!(!buffer.is_running(2));
        assert_eq!(buffer.complete(2, 2, ok(&[2])), None, "unwanted: dropped");
        buffer.complete(0, 0, ok(&[0]));
        assert_eq!(buffer.pop().unwrap().unwrap(), 0);
        assert!(buffer.pop().unwrap().unwrap_err().is_timeout());
        assert!(buffer.is_empty());
    }

    #[test]
    fn skipped_calls_stay_owed_until_forgotten() {
        let mut buffer = Reorder::new(Order::Completion);
        buffer.push(2, "a");
        buffer.push(1, "b");
        assert_eq!(buffer.skip(0), Some("a"));
        assert_eq!(buffer.skip(0), None);
        assert_eq!(buffer.lowest_owed(), 0);
        buffer.complete(2, 2, ok(&[2]));
        buffer.forget_unfinished();
        assert_eq!(drain_all(&mut buffer), [2]);
        assert!(buffer.is_empty(), "nothing but a cancellation is owed");
        assert_eq!(buffer.lowest_owed(), 0, "items 0 and 1 were never yielded");
    }

    #[test]
    fn items_forgotten_after_a_failure_stay_the_lowest_not_yielded() {
        // Unordered: item 0 runs long, item 1 fails and is observed: item 0
        // is forgotten, but never yielded, so a cancellation must name it.
        let mut buffer = Reorder::new(Order::Completion);
        buffer.push(1, "a");
        buffer.push(1, "b");
        buffer.push(1, "c");
        buffer.complete(2, 2, ok(&[2]));
        buffer.complete(1, 1, Batch::One(Err(Error::timeout(1))));
        buffer.forget_unfinished();
        assert_eq!(buffer.pop().unwrap().unwrap(), 2);
        assert_eq!(buffer.lowest_owed(), 0);
    }

    #[test]
    fn a_call_never_completes_its_neighbour() {
        // Call 0 (one item) was given up; its late report must not land on
        // call 1, which starts where call 0's untaken results would.
        let mut buffer: Reorder<u32, &str> = Reorder::new(Order::Input);
        buffer.push(1, "a");
        buffer.push(1, "b");
        buffer.complete(0, 0, Batch::One(Err(Error::timeout(0))));
        assert_eq!(buffer.complete(0, 1, Batch::Many(Vec::new())), None);
        assert!(buffer.is_running(1));
    }

    #[test]
    fn a_result_for_a_finished_call_is_dropped() {
        let mut buffer = Reorder::new(Order::Input);
        buffer.push(1, "a");
        assert_eq!(
            buffer.complete(0, 0, Batch::One(Err(Error::timeout(0)))),
            Some("a")
        );
        assert_eq!(buffer.complete(0, 0, ok(&[0])), None);
        assert!(buffer.pop().unwrap().unwrap_err().is_timeout());
    }
}
