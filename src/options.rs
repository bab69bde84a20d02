//! What the builder methods of [`ParImap`](crate::ParImap) set.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

/// What the builder methods set.
#[derive(Debug)]
pub(crate) struct Options {
    pub(crate) order: Order,
    pub(crate) limit: usize,
    /// Set by `.window`; otherwise derived from the batch size.
    pub(crate) window: Option<usize>,
    /// Set by `.batch`; otherwise sized from the measured time per item.
    pub(crate) batch: Option<usize>,
    pub(crate) timeout: Option<Duration>,
    pub(crate) keep_going: bool,
    pub(crate) token: Option<CancellationToken>,
    pub(crate) budget: Option<Arc<Semaphore>>,
    /// Set by `.adaptive_limit(max)`: the limit moves within `1..=max`.
    pub(crate) adaptive: Option<usize>,
    /// Set by `.key_order`.
    pub(crate) key_order: bool,
}

impl Options {
    /// A map's settings before any builder method: `limit` calls at most,
    /// results in `order`.
    pub(crate) fn new(order: Order, limit: usize) -> Self {
        Options {
            order,
            limit,
            window: None,
            batch: None,
            timeout: None,
            keep_going: false,
            token: None,
            budget: None,
            adaptive: None,
            key_order: false,
        }
    }
}

/// Whether results come out in input or in completion order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Order {
    Input,
    Completion,
}
