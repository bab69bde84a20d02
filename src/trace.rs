//! tracing, behind the default-on `tracing` feature: one `trace`-level span
//! per mapper call, `debug` events for the map's life. Without the feature,
//! or with no subscriber listening, each costs a branch.

use std::future::Future;

#[cfg(feature = "tracing")]
pub(crate) use tracing::Span;

/// Stands in for a span when the feature is off.
#[cfg(not(feature = "tracing"))]
#[derive(Debug)]
pub(crate) struct Span;

#[cfg(not(feature = "tracing"))]
impl Span {
    pub(crate) fn entered(self) -> Span {
        self
    }
}

/// The span of the mapper call over the items from `index` on; `attempt`
/// is its item's attempt (`.retry`; 1 otherwise).
#[cfg(feature = "tracing")]
pub(crate) fn call_span(index: usize, attempt: u32) -> Span {
    tracing::trace_span!("par_imap.call", index, attempt)
}

#[cfg(not(feature = "tracing"))]
pub(crate) fn call_span(_index: usize, _attempt: u32) -> Span {
    Span
}

/// `future`, inside `span` whenever it is polled.
#[cfg(feature = "tracing")]
pub(crate) fn instrument<F: Future>(span: Span, future: F) -> impl Future<Output = F::Output> {
    tracing::Instrument::instrument(future, span)
}

#[cfg(not(feature = "tracing"))]
pub(crate) fn instrument<F: Future>(_span: Span, future: F) -> impl Future<Output = F::Output> {
    future
}

/// A `debug` event of the map's life: `life!("message", field = value, ...)`.
macro_rules! life {
    ($message:literal $(, $field:ident = $value:expr)* $(,)?) => {
        #[cfg(feature = "tracing")]
        tracing::debug!($($field = $value,)* $message);
        // Without the feature: the fields are named, never evaluated.
        #[cfg(not(feature = "tracing"))]
        let _ = || { $(let _ = &$value;)* };
    };
}

pub(crate) use life;
