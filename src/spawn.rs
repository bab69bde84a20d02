//! The seam between the engine and how mapper calls run: on the blocking
//! workers (`blocking.rs`) or as async tasks
//! (`task.rs`).
//!
//! The traits are `pub` inside a private module: the public stream type
//! names them in its bounds, yet no user can name or implement them.
#![allow(unreachable_pub)]

use tokio::runtime::Handle;
use tokio_util::task::AbortOnDropHandle;

use crate::Error;
use crate::batch::Batch;
use crate::call::Call;

/// Whether a result fails the map; it depends on the variant (`try_` or not).
pub type IsFailure<U> = fn(&Result<U, Error>) -> bool;

/// What runs the mapper calls of one map, owned by its stream.
pub trait Spawn<T>: Send {
    /// What one item maps to.
    type Output: Send + 'static;
    /// Whether a call may take several items (`.batch`), and wait in a
    /// queue for a free worker.
    const BATCHES: bool;

    /// Starts the call of the mapper on `items`; the handle, if any, aborts
    /// it when dropped.
    fn spawn(
        &self,
        runtime: &Handle,
        items: Batch<T>,
        call: Call<T, Self::Output>,
        is_failure: IsFailure<Self::Output>,
    ) -> Option<AbortOnDropHandle<()>>;

    /// The map ended: calls that have not started are dropped now.
    fn close(&self);
}
