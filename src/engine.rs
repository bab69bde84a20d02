//! The one engine behind every variant: pulls input while the limit and the
//! window allow, starts calls through the variant's spawner, collects their
//! results from a channel, and yields them in input or completion order.

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::marker::PhantomData;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use futures::stream::{FusedStream, Stream};
use pin_project_lite::pin_project;
use tokio::runtime::Handle;
use tokio::sync::mpsc::{self, UnboundedReceiver, UnboundedSender};
use tokio_util::task::AbortOnDropHandle;

use crate::Error;
use crate::spawn::{Call, Completion, Kind, Output, Shared, Spawn};

pin_project! {
    /// Stream returned by every method of [`ParImapExt`](crate::ParImapExt):
    /// the items of the input stream mapped in parallel.
    ///
    /// `K` names the variant (see [`kind`](crate::kind)). Builder methods
    /// such as [`window`](ParImap::window) configure it before the first poll.
    ///
    /// Dropping it cancels the map: no new mapper call starts, running async
    /// calls are aborted, and every value it holds is dropped.
    ///
    /// # Examples
    ///
    /// ```
    /// use futures::StreamExt;
    /// use par_imap::ParImapExt;
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() {
    /// let mut words = futures::stream::iter(["par", "imap"]).par_imap(2, str::to_uppercase);
    /// assert_eq!(words.next().await.unwrap().unwrap(), "PAR");
    /// // Dropping the stream here is all the clean-up there is.
    /// # }
    /// ```
    #[must_use = "streams do nothing unless polled"]
    pub struct ParImap<St, F, K>
    where
        St: Stream,
        K: Kind<St::Item, F>,
    {
        #[pin]
        input: St,
        mapper: Arc<F>,
        engine: Engine<Output<K, St::Item, F>>,
        kind: PhantomData<fn() -> K>,
    }
}

/// Whether results come out in input or in completion order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Order {
    Input,
    Completion,
}

/// A pulled item that has not been yielded yet.
#[derive(Debug)]
enum Slot<U> {
    /// Its call runs; dropping the handle aborts an async call.
    Running(#[allow(dead_code)] Option<AbortOnDropHandle<()>>),
    /// Its result waits for its turn (input order only).
    Done(Result<U, Error>),
}

/// The engine's state, apart from the input and the mapper.
struct Engine<U> {
    order: Order,
    limit: usize,
    window: usize,
    runtime: Option<Handle>,
    shared: Arc<Shared>,
    _cancel_on_drop: CancelOnDrop,
    report: UnboundedSender<Completion<U>>,
    completions: UnboundedReceiver<Completion<U>>,
    /// Pulled and not yielded, by input index.
    slots: HashMap<usize, Slot<U>>,
    /// Completion order only: results ready to yield.
    ready: VecDeque<Result<U, Error>>,
    /// Input order only: the index of the next item to yield.
    head: usize,
    pulled: usize,
    yielded: usize,
    running: usize,
    input_done: bool,
    failed_at: Option<usize>,
    finished: bool,
}

/// Tells calls that have not started yet not to, when the stream is dropped.
struct CancelOnDrop(Arc<Shared>);

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        self.0.cancel_from(0);
    }
}

impl<St, F, K> ParImap<St, F, K>
where
    St: Stream,
    K: Kind<St::Item, F>,
{
    #[track_caller]
    pub(crate) fn new(input: St, limit: usize, mapper: F, order: Order) -> Self {
        assert!(
            limit > 0,
            "par_imap: `limit` must be at least 1 (the most mapper calls running at once), got 0"
        );
        let shared = Shared::new();
        let (report, completions) = mpsc::unbounded_channel();
        ParImap {
            input,
            mapper: Arc::new(mapper),
            engine: Engine {
                order,
                limit,
                window: limit.saturating_mul(2),
                runtime: None,
                _cancel_on_drop: CancelOnDrop(Arc::clone(&shared)),
                shared,
                report,
                completions,
                slots: HashMap::new(),
                ready: VecDeque::new(),
                head: 0,
                pulled: 0,
                yielded: 0,
                running: 0,
                input_done: false,
                failed_at: None,
                finished: false,
            },
            kind: PhantomData,
        }
    }

    /// Sets the window: at most `window` items pulled from the input and not
    /// yet yielded, whether their call is running or their result waits for
    /// its turn. The default is `2 * limit`.
    ///
    /// A wider window lets fast items run ahead of a slow one in input order
    /// (more memory, better throughput under skew); `window == limit` lets no
    /// result wait while a worker could start the next item.
    ///
    /// # Panics
    ///
    /// Panics at the caller's line if `window < limit`.
    ///
    /// # Examples
    ///
    /// ```
    /// use futures::{stream, TryStreamExt};
    /// use par_imap::ParImapExt;
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), par_imap::Error> {
    /// let lengths: Vec<usize> = stream::iter(["a", "bb", "ccc"])
    ///     .par_imap(2, |s: &str| s.len())
    ///     .window(16)
    ///     .try_collect()
    ///     .await?;
    /// assert_eq!(lengths, [1, 2, 3]);
    /// # Ok(())
    /// # }
    /// ```
    #[track_caller]
    pub fn window(mut self, window: usize) -> Self {
        assert!(
            window >= self.engine.limit,
            "par_imap: `window` ({window}) must be at least `limit` ({})",
            self.engine.limit
        );
        self.engine.window = window;
        self
    }
}

impl<U> Engine<U> {
    /// Takes in every finished call. A failure stops the map from pulling at
    /// once; in input order the items before it still run to be yielded.
    fn collect_completions<T, F, K: Kind<T, F>>(&mut self, cx: &mut Context<'_>)
    where
        K::Spawner: Spawn<T, F, Output = U>,
    {
        while let Poll::Ready(Some(Completion { index, result })) = self.completions.poll_recv(cx) {
            self.running -= 1;
            if !self.slots.contains_key(&index) {
                // A call the map no longer wants (cancelled after a failure).
                continue;
            }
            let failed = K::is_failure(&result);
            match self.order {
                Order::Input => {
                    self.slots.insert(index, Slot::Done(result));
                    if failed && self.failed_at.is_none_or(|first| index < first) {
                        self.failed_at = Some(index);
                        self.shared.cancel_from(index + 1);
                        self.slots.retain(|&pending, _| pending <= index);
                    }
                }
                Order::Completion => {
                    self.slots.remove(&index);
                    self.ready.push_back(result);
                    if failed {
                        self.failed_at = Some(index);
                        self.shared.cancel_from(0);
                        self.slots.clear();
                    }
                }
            }
        }
    }

    fn can_start(&self) -> bool {
        !self.input_done
            && self.failed_at.is_none()
            && self.running < self.limit
            && self.pulled - self.yielded < self.window
    }

    fn start<T, F, S: Spawn<T, F, Output = U>>(&mut self, mapper: &Arc<F>, item: T) {
        let index = self.pulled;
        let call = Call::new(index, Arc::clone(&self.shared), self.report.clone());
        let runtime = self.runtime.get_or_insert_with(Handle::current);
        let abort = S::spawn(runtime, mapper, item, call);
        self.slots.insert(index, Slot::Running(abort));
        self.pulled += 1;
        self.running += 1;
    }

    /// The next result to yield, if its turn has come.
    fn next_result(&mut self) -> Option<Result<U, Error>> {
        let result = match self.order {
            Order::Input => match self.slots.remove(&self.head) {
                Some(Slot::Done(result)) => result,
                Some(running) => {
                    self.slots.insert(self.head, running);
                    return None;
                }
                None => return None,
            },
            Order::Completion => self.ready.pop_front()?,
        };
        self.head += 1;
        self.yielded += 1;
        Some(result)
    }

    fn is_drained(&self) -> bool {
        self.input_done && self.slots.is_empty() && self.ready.is_empty()
    }

    /// Ends the map: nothing more starts, running async calls are aborted,
    /// and every held value is dropped.
    fn finish(&mut self) {
        self.finished = true;
        self.shared.cancel_from(0);
        self.slots.clear();
        self.ready.clear();
    }
}

impl<St, F, K> Stream for ParImap<St, F, K>
where
    St: Stream,
    K: Kind<St::Item, F>,
{
    type Item = K::Item;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<K::Item>> {
        let mut this = self.project();
        let engine = this.engine;
        if engine.finished {
            return Poll::Ready(None);
        }

        // Take in finished calls first, so a failure is seen before pulling more.
        engine.collect_completions::<St::Item, F, K>(cx);

        // Start calls while the limit and the window have room.
        while engine.can_start() {
            match this.input.as_mut().poll_next(cx) {
                Poll::Ready(Some(item)) => engine.start::<_, _, K::Spawner>(this.mapper, item),
                Poll::Ready(None) => engine.input_done = true,
                Poll::Pending => break,
            }
        }

        // Yield the next result whose turn it is.
        if let Some(result) = engine.next_result() {
            if K::is_failure(&result) {
                engine.finish();
            }
            return Poll::Ready(Some(K::into_item(result)));
        }
        if engine.is_drained() {
            engine.finish();
            return Poll::Ready(None);
        }
        Poll::Pending
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        let engine = &self.engine;
        if engine.finished {
            return (0, Some(0));
        }
        let pending = engine.pulled - engine.yielded;
        let upper = match engine.failed_at {
            Some(index) => Some(match engine.order {
                Order::Input => index + 1 - engine.head,
                Order::Completion => engine.ready.len(),
            }),
            None if engine.input_done => Some(pending),
            None => self
                .input
                .size_hint()
                .1
                .and_then(|rest| rest.checked_add(pending)),
        };
        // Any item still owed comes out as a value or as an error, but an
        // error ends the stream: one item is all that can be promised.
        let lower = usize::from(upper != Some(0) && (pending > 0 || self.input.size_hint().0 > 0));
        (lower, upper)
    }
}

impl<St, F, K> FusedStream for ParImap<St, F, K>
where
    St: Stream,
    K: Kind<St::Item, F>,
{
    fn is_terminated(&self) -> bool {
        self.engine.finished
    }
}

impl<St, F, K> fmt::Debug for ParImap<St, F, K>
where
    St: Stream + fmt::Debug,
    K: Kind<St::Item, F>,
{
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let engine = &self.engine;
        f.debug_struct("ParImap")
            .field("input", &self.input)
            .field("order", &engine.order)
            .field("limit", &engine.limit)
            .field("window", &engine.window)
            .field("pulled", &engine.pulled)
            .field("yielded", &engine.yielded)
            .field("running", &engine.running)
            .field("finished", &engine.finished)
            .finish_non_exhaustive()
    }
}
