//! One mapper call as the engine sees it: the ticket that reports its
//! results exactly once, the cutoff that says whether it is still wanted, and
//! `is_cancelled()` for the blocking closure that runs it.
#![allow(unreachable_pub)]

use std::cell::RefCell;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::sync::OwnedSemaphorePermit;
use tokio::sync::mpsc::UnboundedSender;
use tokio::time::Instant;

use crate::Error;
use crate::stats::Counters;

/// What the engine and its running calls share.
#[derive(Debug)]
pub struct Shared {
    /// Items at or above this index must not be mapped, and their results
    /// are no longer wanted. `usize::MAX` while the map runs normally.
    cutoff: AtomicUsize,
    /// In input order a failure at `k` leaves items before `k` wanted; in
    /// completion order it ends everything.
    in_input_order: bool,
    counters: Counters,
}

impl Shared {
    pub(crate) fn new(in_input_order: bool) -> Arc<Self> {
        Arc::new(Shared {
            cutoff: AtomicUsize::new(usize::MAX),
            in_input_order,
            counters: Counters::default(),
        })
    }

    pub(crate) fn counters(&self) -> &Counters {
        &self.counters
    }

    /// Item `index` failed: nothing the failure makes unwanted may start.
    pub(crate) fn failed_at(&self, index: usize) {
        self.cancel_from(if self.in_input_order { index } else { 0 });
    }

    /// Cancel every item from `index` on.
    pub(crate) fn cancel_from(&self, index: usize) {
        self.cutoff.fetch_min(index, Ordering::SeqCst);
    }

    pub(crate) fn is_cancelled(&self, index: usize) -> bool {
        index >= self.cutoff.load(Ordering::SeqCst)
    }
}

/// The items of one call, or its results: one (the common case, without an
/// allocation) or several (`.batch`).
#[derive(Debug)]
pub enum Batch<T> {
    One(T),
    Many(Vec<T>),
}

impl<T> Batch<T> {
    pub(crate) fn len(&self) -> usize {
        match self {
            Batch::One(_) => 1,
            Batch::Many(values) => values.len(),
        }
    }

    pub(crate) fn last(&self) -> Option<&T> {
        match self {
            Batch::One(value) => Some(value),
            Batch::Many(values) => values.last(),
        }
    }
}

impl<T> IntoIterator for Batch<T> {
    type Item = T;
    type IntoIter = BatchIter<T>;

    fn into_iter(self) -> BatchIter<T> {
        match self {
            Batch::One(value) => BatchIter::One(Some(value)),
            Batch::Many(values) => BatchIter::Many(values.into_iter()),
        }
    }
}

/// The values of a [`Batch`], in order.
#[derive(Debug)]
pub enum BatchIter<T> {
    One(Option<T>),
    Many(std::vec::IntoIter<T>),
}

impl<T> Iterator for BatchIter<T> {
    type Item = T;

    fn next(&mut self) -> Option<T> {
        match self {
            BatchIter::One(value) => value.take(),
            BatchIter::Many(values) => values.next(),
        }
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        let left = match self {
            BatchIter::One(value) => usize::from(value.is_some()),
            BatchIter::Many(values) => values.len(),
        };
        (left, Some(left))
    }
}

impl<T> ExactSizeIterator for BatchIter<T> {}

/// The results of one call, in input order: one per item, cut short after
/// the first failure (the items after it are never mapped).
pub type Results<U> = Batch<Result<U, Error>>;

/// Whether a result fails the map; it depends on the variant (`try_` or not).
pub type IsFailure<U> = fn(&Result<U, Error>) -> bool;

/// What a call tells the engine.
#[derive(Debug)]
pub enum Event<U> {
    /// The call's mapper started now (sent only when the engine asked: for
    /// timeouts).
    Started { first: usize, at: Instant },
    /// The call ended, for good or not.
    Finished { first: usize, results: Results<U> },
    /// The call never ran: by the time a worker took it, a failure had made
    /// it unwanted (the engine may not have heard of that failure yet).
    Skipped,
}

/// The ticket of one mapper call over the items `first..`: it reports the
/// call's results to the engine exactly once. A call dropped before it
/// finished (aborted, never started, or torn down with its runtime) reports
/// itself cancelled, so the engine never waits for a result that cannot come.
/// It holds the call's permit of a shared semaphore, released when the call
/// really ends.
#[derive(Debug)]
pub struct Call<U> {
    first: usize,
    shared: Arc<Shared>,
    report: Option<UnboundedSender<Event<U>>>,
    report_start: bool,
    /// When the mapper started, for the busy time; `None` until then.
    started_at: Option<std::time::Instant>,
    _permit: Option<OwnedSemaphorePermit>,
}

impl<U> Call<U> {
    pub(crate) fn new(
        first: usize,
        shared: Arc<Shared>,
        report: UnboundedSender<Event<U>>,
        report_start: bool,
        permit: Option<OwnedSemaphorePermit>,
    ) -> Self {
        Call {
            first,
            shared,
            report: Some(report),
            report_start,
            started_at: None,
            _permit: permit,
        }
    }

    pub(crate) fn first(&self) -> usize {
        self.first
    }

    pub(crate) fn is_cancelled(&self, index: usize) -> bool {
        self.shared.is_cancelled(index)
    }

    /// Item `index` of this call failed. Set at once, from the worker, so a
    /// call queued behind this one does not start before the engine hears.
    pub(crate) fn failed_at(&self, index: usize) {
        self.shared.failed_at(index);
    }

    /// Marks the moment the mapper starts: a deadline and the busy time
    /// count from here.
    pub(crate) fn start(&mut self) {
        self.shared.counters.started();
        self.started_at = Some(std::time::Instant::now());
        if let (true, Some(report)) = (self.report_start, &self.report) {
            let _ = report.send(Event::Started {
                first: self.first,
                at: Instant::now(),
            });
        }
    }

    pub(crate) fn finish(mut self, results: Results<U>) {
        self.send(results);
    }

    /// The call will not run: it is no longer wanted. Not a failure.
    pub(crate) fn skip(mut self) {
        if let Some(report) = self.report.take() {
            let _ = report.send(Event::Skipped);
        }
    }

    fn send(&mut self, results: Results<U>) {
        if let Some(started_at) = self.started_at.take() {
            self.shared.counters.completed(started_at.elapsed());
        }
        if let Some(report) = self.report.take() {
            // The engine is gone when this fails: the results are dropped here.
            let _ = report.send(Event::Finished {
                first: self.first,
                results,
            });
        }
    }
}

impl<U> Drop for Call<U> {
    fn drop(&mut self) {
        let first = self.first;
        self.send(Batch::One(Err(Error::cancelled(first))));
    }
}

thread_local! {
    /// The item a blocking call maps on this thread, for [`is_cancelled`].
    static CURRENT: RefCell<Option<(Arc<Shared>, usize)>> = const { RefCell::new(None) };
}

/// Marks this thread as mapping item `index` until dropped, even by a panic.
pub(crate) struct Current;

impl Current {
    pub(crate) fn enter<U>(call: &Call<U>, index: usize) -> Current {
        CURRENT.with(|current| *current.borrow_mut() = Some((Arc::clone(&call.shared), index)));
        Current
    }
}

impl Drop for Current {
    fn drop(&mut self) {
        CURRENT.with(|current| current.borrow_mut().take());
    }
}

/// Inside a blocking mapper call, whether its result can no longer be used:
/// the map was dropped, failed at or before this item, was cancelled, or this
/// item timed out. `false` outside a blocking mapper call.
///
/// A running blocking closure cannot be pre-empted: tokio cannot abort
/// `spawn_blocking`. A long closure that polls `is_cancelled()` now and then
/// is the one way it can stop early and free its worker.
///
/// # Examples
///
/// ```
/// use std::time::Duration;
/// use futures::StreamExt;
/// use par_imap::ParImapExt;
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// let slow = futures::stream::iter([0]).par_imap(1, |_: u32| {
///     // Works until nobody wants the result any more.
///     let mut rounds = 0_u64;
///     while !par_imap::is_cancelled() {
///         std::thread::sleep(Duration::from_millis(1));
///         rounds += 1;
///     }
///     rounds
/// });
/// let timed_out = slow.timeout(Duration::from_millis(20)).next().await.unwrap();
/// assert!(timed_out.unwrap_err().is_timeout());
/// assert!(!par_imap::is_cancelled());
/// # }
/// ```
pub fn is_cancelled() -> bool {
    CURRENT.with(|current| {
        current
            .borrow()
            .as_ref()
            .is_some_and(|(shared, index)| shared.is_cancelled(*index))
    })
}
