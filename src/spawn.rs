//! The seam between the engine and how mapper calls run: on the blocking
//! workers (`blocking.rs`) or as async tasks
//! (`task.rs`).
//!
//! The traits are `pub` inside a private module: the public stream type
//! names them in its bounds, yet no user can name or implement them.

use std::task::{Context, Poll};

use tokio::runtime::Handle;

use crate::batch::Batch;
use crate::call::{Call, Event};
use crate::error::Error;

/// Whether a result fails the map; it depends on the variant (`try_` or not).
pub(crate) type IsFailure<U> = fn(&Result<U, Error>) -> bool;

/// What runs the mapper calls of one map, owned by its stream.
pub trait Spawn<T>: Send {
    /// What one item maps to.
    type Output: Send + 'static;
    /// Whether a call may take several items (`.batch`), and wait in a
    /// queue for a free worker.
    const BATCHES: bool;

    /// Starts the call of the mapper on `items`.
    fn spawn(
        &mut self,
        runtime: &Handle,
        items: Batch<T>,
        call: Call<Self::Output>,
        is_failure: IsFailure<Self::Output>,
    );

    /// Aborts the running calls whose first item is `index` or later, where
    /// calls can be aborted (async ones); their reports still come.
    fn abort_from(&mut self, index: usize);

    /// The report of a call that ended, if one is ready. With `wait`, `cx`
    /// is woken when the next one comes; without, it may or may not be.
    fn poll_report(&mut self, cx: &mut Context<'_>, wait: bool) -> Poll<Event<Self::Output>>;

    /// The map ended: running async calls are aborted, and calls that have
    /// not started and reports not taken in are dropped now.
    fn close(&mut self);
}
