//! Per-worker state for `par_imap_init`: a mapper that carries a pool of
//! states, each made by `init` when no idle one is left.

use std::fmt;
use std::sync::{Mutex, PoisonError};

use crate::blocking::Mapper;

/// The mapper of [`par_imap_init`](crate::ParImapExt::par_imap_init): `f`
/// applied with a per-worker state `S` made by `init`.
///
/// At most `limit` states exist, one per running call: a call takes an idle
/// state or makes a new one, and gives it back when it returns. A state whose
/// call panicked is dropped, not reused. It appears only in the stream's type.
///
/// ```
/// use futures::stream;
/// use par_imap::kind::Blocking;
/// use par_imap::WithInit;
/// use par_imap::{ParImap, ParImapExt};
///
/// let lengths: ParImap<_, WithInit<_, _, Vec<u8>>, Blocking> = stream::iter(["a", "bb"])
///     .par_imap_init(2, Vec::new, |buffer: &mut Vec<u8>, s: &str| {
///         buffer.clear();
///         buffer.extend_from_slice(s.as_bytes());
///         buffer.len()
///     });
/// # drop(lengths);
/// ```
pub struct WithInit<I, F, S> {
    init: I,
    f: F,
    idle: Mutex<Vec<S>>,
}

impl<I, F, S> WithInit<I, F, S> {
    pub(crate) fn new(init: I, f: F) -> Self {
        WithInit {
            init,
            f,
            idle: Mutex::new(Vec::new()),
        }
    }
}

impl<T, I, F, S, U> Mapper<T> for WithInit<I, F, S>
where
    I: Fn() -> S + Send + Sync + 'static,
    F: Fn(&mut S, T) -> U + Send + Sync + 'static,
    S: Send + 'static,
{
    type Output = U;

    fn call(&self, item: T) -> U {
        // The lock is held only to pop and push, never around user code.
        let idle = self
            .idle
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .pop();
        let mut state = idle.unwrap_or_else(|| (self.init)());
        // A panic unwinds past the push below: that state is dropped.
        let output = (self.f)(&mut state, item);
        self.idle
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(state);
        output
    }
}

impl<I, F, S> fmt::Debug for WithInit<I, F, S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let idle = self.idle.lock().map_or(0, |idle| idle.len());
        f.debug_struct("WithInit")
            .field("idle_states", &idle)
            .finish_non_exhaustive()
    }
}
