//! Retries with backoff (`.retry`): the policy a user builds ([`Retry`]),
//! and the engine's side of it ([`Backoff`]): how many attempts each item
//! made, and the timers of the items waiting to be tried again.
//!
//! A backoff wait lives here, in the engine, not in a task or a worker: the
//! item waits in the window like an item waiting for its key (see
//! [`keys`](crate::keys)), holding no worker and no permit, and its key
//! stays busy. When its timer fires it becomes ready again, and the engine
//! gives it to a call of its own before any item with a higher index.

use std::collections::HashMap;
use std::collections::hash_map::RandomState;
use std::fmt;
use std::hash::BuildHasher;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::Context;
use std::time::Duration;

use tokio::time::Instant;

use crate::deadline::{Deadlines, Due, RuntimeGone};
use crate::error::{Error, drop_each};

/// A `.when` predicate.
type Predicate<E> = Arc<dyn Fn(&E) -> bool + Send + Sync>;

/// How a map tries a failed item again: at most `n` attempts in all, with a
/// growing, jittered wait between them. Set with
/// [`ParImap::retry`](crate::ParImap::retry).
///
/// `E` is the stream's error type: the mapper's error for the `try_`
/// variants, [`par_imap::Error`](crate::Error) for the others.
///
/// - **What retries:** an `Err` of a `try_` mapper, or a timeout
///   ([`timeout`](crate::ParImap::timeout) applies to each attempt); a panic
///   only with [`retry_panics`](Retry::retry_panics). [`when`](Retry::when)
///   narrows it further.
/// - **The wait** before attempt `a + 1` is `min(max, initial * 2^(a - 1))`,
///   with full jitter (uniform between zero and that) unless
///   [`jitter(false)`](Retry::jitter). Without [`backoff`](Retry::backoff)
///   an item is tried again at once.
///
/// # Examples
///
/// ```
/// use std::time::Duration;
/// use par_imap::Retry;
///
/// let policy: Retry<std::io::Error> = Retry::attempts(5)
///     .backoff(Duration::from_millis(50), Duration::from_secs(5))
///     .when(|err: &std::io::Error| err.kind() != std::io::ErrorKind::NotFound);
/// # drop(policy);
/// ```
pub struct Retry<E = Error> {
    attempts: u32,
    initial: Duration,
    max: Duration,
    when: Option<Predicate<E>>,
    panics: bool,
    jitter: bool,
}

impl<E> Retry<E> {
    /// At most `n` attempts per item, the first included: `attempts(1)`
    /// never retries.
    ///
    /// # Panics
    ///
    /// Panics if `n` is 0.
    ///
    /// ```
    /// let policy: par_imap::Retry = par_imap::Retry::attempts(3);
    /// # drop(policy);
    /// ```
    #[track_caller]
    pub fn attempts(n: u32) -> Self {
        assert!(
            n > 0,
            "par_imap: Retry::attempts(n): `attempts` must be at least 1 (the first attempt counts), got 0"
        );
        Retry {
            attempts: n,
            initial: Duration::ZERO,
            max: Duration::ZERO,
            when: None,
            panics: false,
            jitter: true,
        }
    }

    /// Waits `initial` before the second attempt, twice that before the
    /// third, and so on, never more than `max`. `Duration::MAX` is accepted
    /// (a wait past the clock's range lasts until the map no longer wants
    /// the item).
    ///
    /// # Panics
    ///
    /// Panics if `initial` is greater than `max`.
    ///
    /// ```
    /// use std::time::Duration;
    /// let policy: par_imap::Retry =
    ///     par_imap::Retry::attempts(4).backoff(Duration::from_millis(10), Duration::from_secs(1));
    /// # drop(policy);
    /// ```
    #[track_caller]
    pub fn backoff(mut self, initial: Duration, max: Duration) -> Self {
        assert!(
            initial <= max,
            "par_imap: Retry::backoff(initial, max): `initial` ({initial:?}) must not exceed `max` ({max:?})"
        );
        self.initial = initial;
        self.max = max;
        self
    }

    /// Retries only the failures for which `retryable` returns true. It sees
    /// every failed attempt that could be retried; a timeout or a panic as
    /// `E::from(par_imap::Error)`.
    ///
    /// ```
    /// let policy: par_imap::Retry<std::io::Error> = par_imap::Retry::attempts(3)
    ///     .when(|err: &std::io::Error| err.kind() == std::io::ErrorKind::TimedOut);
    /// # drop(policy);
    /// ```
    pub fn when(mut self, retryable: impl Fn(&E) -> bool + Send + Sync + 'static) -> Self {
        self.when = Some(Arc::new(retryable));
        self
    }

    /// Retries panics too (by default a panic fails its item at once: a
    /// panic is a bug more often than a flaky downstream).
    ///
    /// ```
    /// let policy: par_imap::Retry = par_imap::Retry::attempts(2).retry_panics();
    /// # drop(policy);
    /// ```
    pub fn retry_panics(mut self) -> Self {
        self.panics = true;
        self
    }

    /// Turns the jitter off (`false`) or on (the default): with it, each
    /// wait is drawn uniformly between zero and its nominal length, so
    /// that items failing together do not come back together.
    ///
    /// ```
    /// let exact: par_imap::Retry = par_imap::Retry::attempts(3).jitter(false);
    /// # drop(exact);
    /// ```
    pub fn jitter(mut self, on: bool) -> Self {
        self.jitter = on;
        self
    }

    /// Whether this failure of an item may be tried again.
    pub(crate) fn accepts(&self, error: &E) -> bool {
        self.when.as_ref().is_none_or(|when| when(error))
    }

    /// Whether a panic may be tried again at all.
    pub(crate) fn retries_panics(&self) -> bool {
        self.panics
    }

    /// The engine's side of this policy.
    pub(crate) fn backoff_state(&self) -> Backoff {
        Backoff {
            attempts: self.attempts,
            initial: self.initial,
            max: self.max,
            jitter: self
                .jitter
                .then(|| RandomState::new().hash_one(0x5eed_u64) | 1),
            made: HashMap::new(),
            waits: Deadlines::default(),
        }
    }
}

impl<E> Clone for Retry<E> {
    fn clone(&self) -> Self {
        Retry {
            attempts: self.attempts,
            initial: self.initial,
            max: self.max,
            when: self.when.clone(),
            panics: self.panics,
            jitter: self.jitter,
        }
    }
}

impl<E> fmt::Debug for Retry<E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Retry")
            .field("attempts", &self.attempts)
            .field("initial", &self.initial)
            .field("max", &self.max)
            .field("when", &self.when.as_ref().map(|_| ".."))
            .field("retry_panics", &self.panics)
            .field("jitter", &self.jitter)
            .finish()
    }
}

/// What makes items unwanted reaches them here at once, polled or not:
/// the cutoff of the map's [`Shared`](crate::call::Shared) calls it when it
/// falls (a failure on a worker, the caller's token, the end or drop of the
/// map).
pub(crate) trait Cut: Send + Sync {
    /// Items from `index` on are no longer wanted.
    fn cut_from(&self, index: usize);
}

/// The items whose attempt runs on a clone or that wait for their next
/// attempt, by index: shared with the map's [`Shared`](crate::call::Shared),
/// so that an item no longer wanted is dropped at once, polled or not.
#[derive(Debug)]
pub(crate) struct Kept<T> {
    state: Mutex<KeptState<T>>,
}

#[derive(Debug)]
struct KeptState<T> {
    items: std::collections::BTreeMap<usize, T>,
    /// Items from here on are no longer wanted: none is kept.
    cut: usize,
}

impl<T> Kept<T> {
    pub(crate) fn new() -> Self {
        Kept {
            state: Mutex::new(KeptState {
                items: std::collections::BTreeMap::new(),
                cut: usize::MAX,
            }),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, KeptState<T>> {
        // Nothing user-written runs under the lock: it is never poisoned by
        // a user's panic, and a poisoned one holds consistent data anyway.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Keeps item `index`; gives it back when it is no longer wanted.
    pub(crate) fn put(&self, index: usize, item: T) -> Option<T> {
        let mut state = self.state();
        if index >= state.cut {
            return Some(item);
        }
        state.items.insert(index, item);
        None
    }

    /// Takes item `index`, if it is kept.
    pub(crate) fn take(&self, index: usize) -> Option<T> {
        self.state().items.remove(&index)
    }

    /// Forgets everything: dropped outside the lock, each one's `Drop`
    /// contained.
    pub(crate) fn clear(&self) {
        let items = std::mem::take(&mut self.state().items);
        drop_each(items.into_values());
    }
}

impl<T: Send> Cut for Kept<T> {
    fn cut_from(&self, index: usize) {
        Kept::cut_from(self, index);
    }
}

impl<T> Kept<T> {
    /// Items from `index` on are no longer wanted: they are dropped now.
    pub(crate) fn cut_from(&self, index: usize) {
        let later = {
            let mut state = self.state();
            state.cut = state.cut.min(index);
            state.items.split_off(&index)
        };
        // Outside the lock: a `Drop` may do anything, even cancel a token.
        drop_each(later.into_values());
    }
}

/// The engine's retry state: attempts made per item, and the items waiting
/// for their next attempt, by when.
#[derive(Debug)]
pub(crate) struct Backoff {
    attempts: u32,
    initial: Duration,
    max: Duration,
    /// The jitter's generator state (splitmix64), seeded per map.
    jitter: Option<u64>,
    /// Attempts started, for the items that started one and have not
    /// ended for good.
    made: HashMap<usize, u32>,
    /// The items waiting for their next attempt, by when it may start.
    /// The same timer as the per-item deadlines: safe to poll after its
    /// runtime shut down.
    waits: Deadlines,
}

impl Backoff {
    /// Item `index` starts an attempt: returns its number (1 for the first)
    /// and whether another may follow.
    pub(crate) fn start(&mut self, index: usize) -> (u32, bool) {
        let made = self.made.entry(index).or_insert(0);
        *made += 1;
        (*made, *made < self.attempts)
    }

    /// Whether item `index` has an attempt left after the one it made.
    pub(crate) fn has_attempt_left(&self, index: usize) -> bool {
        self.made
            .get(&index)
            .is_some_and(|&made| made < self.attempts)
    }

    /// Item `index` ended for good (its result is in, or it is no longer
    /// wanted).
    pub(crate) fn forget(&mut self, index: usize) {
        self.made.remove(&index);
    }

    /// Forgets every item from `index` on (fail-fast).
    pub(crate) fn forget_from(&mut self, index: usize) {
        self.made.retain(|&at, _| at < index);
        self.waits.forget_from(index);
    }

    /// Item `index` failed its attempt and waits for the next: returns the
    /// wait (one past the clock's range arms no timer: the item waits until
    /// it is forgotten).
    pub(crate) fn wait(&mut self, index: usize) -> Duration {
        let made = self.made.get(&index).copied().unwrap_or(1);
        // `initial * 2^(made - 1)`, capped: at most ~100 doublings before
        // it saturates.
        let mut nominal = self.initial.min(self.max);
        for _ in 1..made {
            if nominal >= self.max || nominal.is_zero() {
                break;
            }
            nominal = nominal.saturating_mul(2).min(self.max);
        }
        let delay = match &mut self.jitter {
            Some(state) => nominal.mul_f64(unit(next(state))),
            None => nominal,
        };
        if let Some(at) = Instant::now().checked_add(delay) {
            self.waits.insert(at, index);
        }
        delay
    }

    /// Whether no item waits for a timer.
    pub(crate) fn is_idle(&self) -> bool {
        self.waits.is_empty()
    }

    /// Whether a wait may need the runtime's timer (checked at the first
    /// poll, like `.timeout`).
    pub(crate) fn needs_timer(&self) -> bool {
        !self.max.is_zero()
    }

    /// The items whose wait is over, lowest index first; arms the timer for
    /// the next wait, so the map is woken when it ends. `Err`: the timer's
    /// runtime has shut down.
    pub(crate) fn poll_due(&mut self, cx: &mut Context<'_>) -> Result<Vec<usize>, RuntimeGone> {
        let mut due = Vec::new();
        loop {
            match self.waits.poll_due(cx) {
                Due::Call(_, index) => due.push(index),
                Due::Nothing => break,
                Due::RuntimeGone => return Err(RuntimeGone),
            }
        }
        self.waits.arm(cx)?;
        due.sort_unstable();
        Ok(due)
    }

    /// Forgets every wait: the map ended.
    pub(crate) fn clear(&mut self) {
        self.made.clear();
        self.waits.clear();
    }
}

/// splitmix64: the jitter needs spread, not secrecy.
fn next(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// A draw in `[0, 1]`.
fn unit(draw: u64) -> f64 {
    (draw >> 11) as f64 / ((1_u64 << 53) - 1) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_wait_doubles_up_to_its_cap() {
        let mut backoff = Retry::<Error>::attempts(6)
            .backoff(Duration::from_millis(10), Duration::from_millis(40))
            .jitter(false)
            .backoff_state();
        let mut waits = Vec::new();
        for _ in 0..5 {
            assert!(backoff.start(7).1);
            waits.push(backoff.wait(7).as_millis());
        }
        assert_eq!(waits, [10, 20, 40, 40, 40]);
        assert_eq!(backoff.start(7), (6, false));
    }

    #[test]
    fn jitter_draws_within_the_nominal_wait() {
        let mut state = 42;
        let draws: Vec<f64> = (0..1000).map(|_| unit(next(&mut state))).collect();
        assert!(draws.iter().all(|d| (0.0..=1.0).contains(d)));
        let mean = draws.iter().sum::<f64>() / 1000.0;
        assert!((0.4..0.6).contains(&mean), "uniform: mean {mean}");
    }

    #[test]
    #[should_panic(expected = "`attempts` must be at least 1")]
    fn zero_attempts_panics() {
        let _ = Retry::<Error>::attempts(0);
    }

    #[test]
    #[should_panic(expected = "`initial`")]
    fn initial_above_max_panics() {
        let _ = Retry::<Error>::attempts(2).backoff(Duration::from_secs(2), Duration::from_secs(1));
    }

    /// Fail-fast forgets the waits of the items from its index on, and no
    /// other (found by `cargo mutants`: a `forget_from` that kept them, or
    /// kept the item at the index, passed every test).
    #[test]
    fn fail_fast_forgets_the_waits_from_its_index_on() {
        let mut backoff = Retry::<Error>::attempts(3)
            .backoff(Duration::from_secs(1), Duration::from_secs(1))
            .jitter(false)
            .backoff_state();
        for index in [2, 3, 5] {
            backoff.start(index);
            backoff.wait(index);
        }
        backoff.forget_from(3);
        assert!(!backoff.is_idle(), "item 2 still waits");
        backoff.forget_from(2);
        assert!(backoff.is_idle(), "items 2, 3 and 5 forgotten");
    }

    #[test]
    fn a_huge_backoff_is_accepted_and_waits_until_forgotten() {
        let mut backoff = Retry::<Error>::attempts(3)
            .backoff(Duration::MAX, Duration::MAX)
            .jitter(false)
            .backoff_state();
        backoff.start(0);
        assert_eq!(backoff.wait(0), Duration::MAX);
        assert!(backoff.is_idle(), "no timer past the clock's range");
    }
}
