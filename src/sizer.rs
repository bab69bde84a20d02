//! How many items one blocking call takes: fixed by `.batch(k)`, or sized
//! from the measured time per item so that a call's work costs far more
//! than handing it to a worker (about 10–20 µs here), while a slow item is
//! never held back behind many others.

use std::time::Duration;

/// The work one adaptive call aims at. A call's hand-off (a report, a
/// wake-up of the consumer and often of a worker) costs 10–20 µs here:
/// 2–4 % of a 500 µs call, which was the aim until measured (issue 19:
/// 2 ms gave 2–4 % more items/s from ~1.6 µs to ~165 µs per item). A slow
/// or hung item no longer needs short calls: past [`STEAL_AFTER`] idle
/// workers take the rest of its call.
const TARGET: Duration = Duration::from_millis(2);

/// An adaptive call that runs this long is open to idle workers: they may
/// take the items it has not started (its items got slower, or one hangs).
/// It opens sooner, at twice its expected run time, when that is shorter.
pub(crate) const STEAL_AFTER: Duration = Duration::from_millis(2);

/// No call opens to thieves sooner than this: a steal costs a call.
const STEAL_AFTER_LEAST: Duration = Duration::from_micros(50);

/// The most items an adaptive call takes: the default window is
/// `2 * limit * MOST`.
pub(crate) const MOST: usize = 1024;

/// The batch size of the next call.
#[derive(Debug)]
pub(crate) struct Sizer {
    /// `.batch(k)`, or 1 for runners that take one item per call.
    fixed: Option<usize>,
    /// The runner takes one item per call (async): nothing to size.
    single: bool,
    /// The estimated time per item, in nanoseconds.
    per_item: Option<f64>,
    size: usize,
}

impl Sizer {
    /// `fixed`: `.batch(k)`; `batches`: whether the runner takes batches.
    pub(crate) fn new(fixed: Option<usize>, batches: bool) -> Self {
        Sizer {
            fixed: fixed.or((!batches).then_some(1)),
            single: !batches,
            per_item: None,
            size: 1,
        }
    }

    /// The most items a call may take.
    pub(crate) fn most(&self) -> usize {
        self.fixed.unwrap_or(MOST)
    }

    /// How long a call of `size` items runs before idle workers may take
    /// its items: twice the expected run time of the call (from the measured
    /// time per item), at most [`STEAL_AFTER`] for adaptive sizes (and at
    /// least 50 µs); [`STEAL_AFTER`] until a call has been measured.
    pub(crate) fn steal_after(&self, size: usize) -> Duration {
        let Some(per_item) = self.per_item else {
            return STEAL_AFTER;
        };
        // At most an hour: the moment must stay on the clock.
        let twice_expected = Duration::try_from_secs_f64(per_item * size as f64 * 2.0 / 1e9)
            .unwrap_or(Duration::MAX)
            .min(Duration::from_secs(3600));
        match self.fixed {
            Some(_) => twice_expected,
            None => twice_expected.clamp(STEAL_AFTER_LEAST, STEAL_AFTER),
        }
    }

    /// The size of the next call: 1 until a call has been measured.
    pub(crate) fn next_size(&self) -> usize {
        self.fixed.unwrap_or(self.size)
    }

    /// A call mapped `mapped` items in `busy`. Slower items shrink the size
    /// quickly, to the geometric mean of the old estimate and the new one
    /// (a 1000-fold slowdown takes two calls, a call that was merely
    /// preempted costs little); faster ones grow it at most twofold per call.
    pub(crate) fn observe(&mut self, mapped: usize, busy: Duration) {
        // An async runner's calls have nothing to size, nor items to steal.
        if mapped == 0 || self.single {
            return;
        }
        let sample = busy.as_nanos() as f64 / mapped as f64;
        let estimate = match self.per_item {
            Some(old) if sample < old => (old + sample) / 2.0,
            Some(old) => (old * sample).sqrt(),
            None => sample,
        };
        self.per_item = Some(estimate);
        if self.fixed.is_some() {
            return;
        }
        let ideal = (TARGET.as_nanos() as f64 / estimate.max(1.0)).clamp(1.0, MOST as f64) as usize;
        self.size = ideal.min(self.size.saturating_mul(2)).max(1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn starts_at_one_and_grows_at_most_twofold() {
        let mut sizer = Sizer::new(None, true);
        assert_eq!(sizer.next_size(), 1);
        sizer.observe(1, Duration::from_nanos(150));
        assert_eq!(sizer.next_size(), 2);
        for _ in 0..20 {
            let size = sizer.next_size();
            sizer.observe(size, Duration::from_nanos(150) * size as u32);
        }
        assert_eq!(sizer.next_size(), MOST);
    }

    #[test]
    fn slower_items_shrink_it_at_once() {
        let mut sizer = Sizer::new(None, true);
        for _ in 0..20 {
            let size = sizer.next_size();
            sizer.observe(size, Duration::from_nanos(150) * size as u32);
        }
        // 10 000 times slower: from 1024 items a call to a few within
        // three calls, and one item per call (1.6 ms of the 2 ms aimed at)
        // within five.
        sizer.observe(10, Duration::from_millis(16));
        sizer.observe(1, Duration::from_micros(1600));
        sizer.observe(1, Duration::from_micros(1600));
        assert!(sizer.next_size() <= 3, "{}", sizer.next_size());
        sizer.observe(1, Duration::from_micros(1600));
        sizer.observe(1, Duration::from_micros(1600));
        assert_eq!(sizer.next_size(), 1, "1.6 ms items: one per call");
    }

    #[test]
    fn calls_are_open_to_thieves_after_2_ms_or_twice_their_expected_time() {
        let mut adaptive = Sizer::new(None, true);
        assert_eq!(adaptive.steal_after(1), STEAL_AFTER);
        adaptive.observe(10, Duration::from_millis(10));
        assert_eq!(adaptive.steal_after(10), STEAL_AFTER, "at most 2 ms");
        let mut adaptive = Sizer::new(None, true);
        adaptive.observe(8, Duration::from_micros(160));
        assert_eq!(adaptive.steal_after(8), Duration::from_micros(320));
        assert_eq!(adaptive.steal_after(1), STEAL_AFTER_LEAST, "at least 50 µs");
        let mut fixed = Sizer::new(Some(100), true);
        assert_eq!(fixed.steal_after(100), STEAL_AFTER, "not measured yet");
        fixed.observe(100, Duration::from_millis(100));
        assert_eq!(fixed.steal_after(100), Duration::from_millis(200));
        assert_eq!(fixed.steal_after(10), Duration::from_millis(20));
    }

    /// The estimate, read back through `steal_after` of a fixed size (twice
    /// the expected time of `size` items, no clamp).
    fn per_item_ns(sizer: &Sizer) -> u128 {
        sizer.steal_after(1000).as_nanos() / 2000
    }

    #[test]
    fn faster_items_move_the_estimate_halfway_slower_ones_to_the_geometric_mean() {
        let mut sizer = Sizer::new(Some(1000), true);
        sizer.observe(0, Duration::from_secs(1));
        assert_eq!(
            sizer.per_item, None,
            "a call that mapped nothing says nothing"
        );
        sizer.observe(1000, Duration::from_micros(400));
        assert_eq!(per_item_ns(&sizer), 400);
        sizer.observe(1000, Duration::from_micros(200));
        assert_eq!(per_item_ns(&sizer), 300, "halfway down");
        sizer.observe(1000, Duration::from_micros(1200));
        assert_eq!(per_item_ns(&sizer), 600, "geometric mean up");
    }

    #[test]
    fn items_faster_than_a_nanosecond_still_make_calls_of_at_most_most() {
        let mut sizer = Sizer::new(None, true);
        for _ in 0..20 {
            let size = sizer.next_size();
            sizer.observe(size, Duration::ZERO);
            assert!(sizer.next_size() <= (2 * size).min(MOST));
        }
        assert_eq!(sizer.next_size(), MOST);
    }

    #[test]
    fn a_fixed_size_stays() {
        let mut sizer = Sizer::new(Some(7), true);
        sizer.observe(7, Duration::from_nanos(1));
        assert_eq!((sizer.next_size(), sizer.most()), (7, 7));
        let single = Sizer::new(None, false);
        assert_eq!((single.next_size(), single.most()), (1, 1));
    }
}
