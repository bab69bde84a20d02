//! What the builder methods set, before the first poll, and what follows
//! from it: the limit and the window.

use crate::keys::Keys;
use crate::limit::Limiter;
use crate::options::Options;
use crate::sizer::Sizer;

use super::{Engine, Retrying};

impl<U> Engine<U> {
    pub(crate) fn options(&self) -> &Options {
        &self.options
    }

    /// Before the first poll only: later changes would not reach the calls
    /// (a half-applied option could hang the map), so they panic.
    #[track_caller]
    pub(crate) fn options_mut(&mut self) -> &mut Options {
        assert!(
            self.shared.is_none(),
            "par_imap: builder methods (window, timeout, batch, ...) go before the first poll"
        );
        &mut self.options
    }

    /// `.batch(k)`: every call takes up to `k` items.
    #[track_caller]
    pub(crate) fn set_batch(&mut self, k: usize) {
        self.options_mut().batch = Some(k);
        self.sizer = Sizer::new(Some(k), true);
    }

    /// `.key_order`: items of one key never run at the same time.
    #[track_caller]
    pub(crate) fn set_key_order(&mut self) {
        self.options_mut().key_order = true;
        self.keys.get_or_insert_with(Keys::default);
    }

    /// `.adaptive_limit(max)`: the limit moves within `1..=max`, from
    /// `limit`.
    #[track_caller]
    pub(crate) fn set_adaptive_limit(&mut self, max: usize) {
        let options = self.options_mut();
        options.adaptive = Some(max);
        self.limiter = Some(Limiter::new(options.limit, max));
    }

    /// The calls that may run at once now: the fixed limit, or where
    /// `.adaptive_limit` moved it.
    pub(crate) fn limit(&self) -> usize {
        self.limiter
            .as_ref()
            .map_or(self.options.limit, Limiter::limit)
    }

    /// `.retry`: failed attempts that `retrying` accepts are tried again.
    /// Items then wait in the window between attempts, as they wait for
    /// their key; every item is its own key unless `.key_order` says.
    #[track_caller]
    pub(crate) fn set_retry(&mut self, retrying: Retrying<U>) {
        self.options_mut();
        self.keys.get_or_insert_with(Keys::default);
        self.retry = Some(retrying);
    }

    pub(crate) fn has_retry(&self) -> bool {
        self.retry.is_some()
    }

    pub(crate) fn has_key_order(&self) -> bool {
        self.options.key_order
    }

    /// At most this many items pulled and not yet yielded.
    pub(crate) fn window(&self) -> usize {
        self.options.window.unwrap_or_else(|| {
            self.options
                .adaptive
                .unwrap_or(self.options.limit)
                .saturating_mul(2)
                .saturating_mul(match self.retry {
                    // `.retry`: calls of one item each.
                    Some(_) => 1,
                    None => self.sizer.most(),
                })
        })
    }
}
