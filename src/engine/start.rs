//! How the engine starts calls: while the limit, the window and the budget
//! allow, with items pulled only as far as the input has them ready.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use futures::Stream;
use tokio::runtime::Handle;

use super::{Engine, Phase, Running};
use crate::batch::Batch;
use crate::call::Call;
use crate::deadline::Progress;
use crate::sizer;
use crate::spawn::{IsFailure, Spawn};

impl<U> Engine<U> {
    /// Starts calls while the limit and the window have room.
    pub(super) fn start_calls<T, St, R>(
        &mut self,
        mut input: Pin<&mut Option<St>>,
        runner: &mut R,
        is_failure: IsFailure<U>,
        cx: &mut Context<'_>,
    ) where
        St: Stream<Item = T>,
        R: Spawn<T, Output = U>,
    {
        while self.can_start(R::BATCHES) {
            let most = self.sizer.next_size();
            let room = self.window() - (self.pulled - self.yielded);
            // While calls run, wait for the consumer to make room for a
            // fair share of the window rather than start a call on a few
            // items: its dispatch would cost more than their work.
            let share = self.window() / self.options.limit.saturating_mul(2);
            if self.in_flight > 0 && room < most.min(share).max(1) {
                break;
            }
            // Adaptive sizes also keep to a fair share of the window, so that
            // a small window still lets every worker have a call.
            let size = match self.options.batch {
                None => most.min(share),
                Some(_) => most,
            };
            let Some(items) = self.pull(input.as_mut(), cx, size.min(room).max(1)) else {
                break;
            };
            let first = self.pulled;
            self.pulled += items.len();
            self.counters.pulled(items.len());
            // Adaptive sizes: while workers are idle, what came is shared
            // among them rather than queued behind one, so a slow item never
            // holds back the ones after it while a worker is free.
            let pieces = match self.options.batch {
                None => self.options.limit.saturating_sub(self.in_flight),
                Some(_) => 1,
            };
            items.split(first, pieces, |first, piece| {
                let len = piece.len();
                let running = self.start(runner, first, piece, is_failure);
                self.calls.push(len, running);
            });
        }
    }

    pub(super) fn can_start(&self, batches: bool) -> bool {
        // Blocking calls: one queued behind each running one, so a worker
        // never waits for the consumer to hand it the next call.
        let most_in_flight = if batches {
            self.options.limit.saturating_mul(2)
        } else {
            self.options.limit
        };
        // A call takes its permit of the budget where it runs; while none is
        // free, one call waiting for it is enough (its report wakes the
        // map), so a starved map holds one input item at most.
        let budget_allows = self.in_flight == 0
            || self
                .options
                .budget
                .as_ref()
                .is_none_or(|budget| budget.available_permits() > 0);
        // A call that failed cut the map off at once; until its report is
        // taken in, pull nothing the failure makes unwanted.
        let wanted = self
            .shared
            .as_ref()
            .is_none_or(|shared| !shared.is_cut_off(self.pulled));
        self.phase == Phase::Pulling
            && wanted
            && self.in_flight < most_in_flight
            && self.pulled - self.yielded < self.window()
            && budget_allows
    }

    /// Pulls the items of the next call: at least one, at most `most`, only
    /// what the input has ready.
    pub(super) fn pull<T, St: Stream<Item = T>>(
        &mut self,
        mut input: Pin<&mut Option<St>>,
        cx: &mut Context<'_>,
        most: usize,
    ) -> Option<Batch<T>> {
        let mut next = || match input.as_mut().as_pin_mut()?.poll_next(cx) {
            Poll::Ready(Some(item)) => Some(item),
            Poll::Ready(None) => {
                self.phase = Phase::InputDone;
                None
            }
            Poll::Pending => None,
        };
        let first = next()?;
        if most <= 1 {
            return Some(Batch::One(first));
        }
        let mut items = Vec::with_capacity(most.min(sizer::MOST));
        items.push(first);
        while items.len() < most {
            match next() {
                Some(item) => items.push(item),
                None => break,
            }
        }
        Some(Batch::Many(items))
    }

    /// Starts the call over `items`, the first of which is item `first`.
    pub(super) fn start<T, R: Spawn<T, Output = U>>(
        &mut self,
        runner: &mut R,
        first: usize,
        items: Batch<T>,
        is_failure: IsFailure<U>,
    ) -> Running<U> {
        // Blocking calls share their progress for the engine to time out an
        // item that hangs; an async call keeps its own deadline.
        let progress = self
            .options
            .timeout
            .filter(|_| R::BATCHES)
            .map(|timeout| Progress::new(first, timeout));
        // Only calls of several items are open to thieves.
        let steal_after = match &items {
            Batch::Many(items) => self.sizer.steal_after(items.len()),
            Batch::One(_) => Duration::ZERO,
        };
        let shared = Arc::clone(self.shared());
        let call = Call::new(first, shared, progress.clone(), steal_after);
        let runtime = self.runtime.get_or_insert_with(Handle::current);
        runner.spawn(runtime, items, call, is_failure);
        self.in_flight += 1;
        Running {
            progress,
            deadline: None,
        }
    }
}
