//! The `tracing` feature: a `par_imap.call` span per mapper call and debug
//! events for the map's life. Alone in its binary: it sets the global
//! subscriber, which every worker thread sees.
#![cfg(feature = "tracing")]

use std::fmt::Debug;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::{StreamExt, TryStreamExt, stream};
use par_imap::ParImapExt;
use tokio_util::sync::CancellationToken;
use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id, Record};
use tracing::{Event, Metadata, Subscriber};

/// Records span names with their fields, and events' messages with theirs.
#[derive(Clone, Default)]
struct Recorder {
    lines: Arc<Mutex<Vec<String>>>,
    next_id: Arc<AtomicU64>,
}

struct Line(String);

impl Visit for Line {
    fn record_debug(&mut self, field: &Field, value: &dyn Debug) {
        self.0.push_str(&format!(" {}={value:?}", field.name()));
    }
}

impl Subscriber for Recorder {
    fn enabled(&self, _: &Metadata<'_>) -> bool {
        true
    }

    fn new_span(&self, span: &Attributes<'_>) -> Id {
        let mut line = Line(format!("span {}", span.metadata().name()));
        span.record(&mut line);
        self.lines.lock().unwrap().push(line.0);
        Id::from_u64(self.next_id.fetch_add(1, Ordering::Relaxed) + 1)
    }

    fn record(&self, _: &Id, _: &Record<'_>) {}

    fn record_follows_from(&self, _: &Id, _: &Id) {}

    fn event(&self, event: &Event<'_>) {
        let mut line = Line(format!("event {}", event.metadata().level()));
        event.record(&mut line);
        self.lines.lock().unwrap().push(line.0);
    }

    fn enter(&self, _: &Id) {}

    fn exit(&self, _: &Id) {}
}

impl Recorder {
    fn take(&self) -> Vec<String> {
        std::mem::take(&mut *self.lines.lock().unwrap())
    }
}

fn has(lines: &[String], wanted: &str) -> bool {
    lines.iter().any(|line| line.contains(wanted))
}

/// Two attempts, without jitter: a `fails_once` mapper's item comes out.
fn two_attempts() -> par_imap::Retry<std::io::Error> {
    par_imap::Retry::attempts(2).jitter(false)
}

/// Whether `lines` hold the span of the call of item 0's second attempt.
fn has_second_attempt_span(lines: &[String]) -> bool {
    lines
        .iter()
        .any(|line| line.starts_with("span par_imap.call") && line.ends_with("index=0 attempt=2"))
}

/// A mapper whose first call fails, for `.retry` to try again.
fn fails_once() -> impl Fn(u32) -> Result<u32, std::io::Error> + Send + Sync + 'static {
    let first = std::sync::atomic::AtomicBool::new(true);
    move |n| {
        if first.swap(false, std::sync::atomic::Ordering::SeqCst) {
            Err(std::io::Error::other("flaky"))
        } else {
            Ok(n)
        }
    }
}

#[test]
fn spans_per_call_and_events_for_the_maps_life() {
    let recorder = Recorder::default();
    tracing::subscriber::set_global_default(recorder.clone()).unwrap();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();

    // One span per call, blocking and async, with the item's index.
    runtime.block_on(async {
        let blocking: Vec<u32> = stream::iter(0..3)
            .par_imap(2, |n: u32| n)
            .try_collect()
            .await
            .unwrap();
        let spawned: Vec<u32> = stream::iter(0..3)
            .par_imap_async(2, |n: u32| async move { n })
            .try_collect()
            .await
            .unwrap();
        assert_eq!((blocking.len(), spawned.len()), (3, 3));
    });
    let lines = recorder.take();
    assert!(
        !has(&lines, "dropped with calls in flight"),
        "nothing was in flight: {lines:#?}"
    );
    let calls: Vec<&String> = lines
        .iter()
        .filter(|line| line.starts_with("span par_imap.call"))
        .collect();
    assert_eq!(calls.len(), 6, "{lines:#?}");
    for index in 0..3 {
        assert_eq!(
            calls
                .iter()
                .filter(|line| line.ends_with(&format!("index={index} attempt=1")))
                .count(),
            2
        );
    }

    // A failure, with its index and kind.
    runtime.block_on(async {
        let out: Vec<_> = stream::iter(0..5)
            .par_imap(1, |n: u32| {
                assert!(n != 2, "two");
                n
            })
            .collect()
            .await;
        assert_eq!(out.len(), 3);
    });
    let lines = recorder.take();
    assert!(
        has(
            &lines,
            "event DEBUG message=par_imap: failure observed index=2 kind=\"panic\""
        ),
        "{lines:#?}"
    );

    // A retry: its wait, and its second attempt's span.
    runtime.block_on(async {
        let flaky = fails_once();
        let out: Vec<u32> = stream::iter([7_u32])
            .try_par_imap_async(1, move |n: u32| {
                let result = flaky(n);
                async move { result }
            })
            .retry(two_attempts())
            .try_collect()
            .await
            .unwrap();
        assert_eq!(out, [7]);
    });
    let lines = recorder.take();
    assert!(
        has(&lines, "message=par_imap: retry index=0 delay_ms=0"),
        "{lines:#?}"
    );
    assert!(has_second_attempt_span(&lines), "{lines:#?}");

    // The same for a blocking call, whose span names its attempt from the
    // call (cargo mutants: an attempt number stuck at 1 went unnoticed).
    runtime.block_on(async {
        let out: Vec<u32> = stream::iter([7_u32])
            .try_par_imap(1, fails_once())
            .retry(two_attempts())
            .try_collect()
            .await
            .unwrap();
        assert_eq!(out, [7]);
    });
    let lines = recorder.take();
    assert!(has_second_attempt_span(&lines), "{lines:#?}");

    // A cancellation, and a drop with calls in flight.
    runtime.block_on(async {
        let token = CancellationToken::new();
        let mut results = stream::iter(0..5)
            .par_imap_async(2, |n: u32| async move {
                tokio::time::sleep(Duration::from_secs(3600)).await;
                n
            })
            .cancel_token(token.clone());
        token.cancel();
        assert!(results.next().await.unwrap().unwrap_err().is_cancelled());

        let mut hanging = stream::iter(0..5).par_imap_async(2, |n: u32| async move {
            tokio::time::sleep(Duration::from_secs(3600)).await;
            n
        });
        tokio::select! {
            _ = hanging.next() => unreachable!("an hour"),
            _ = tokio::time::sleep(Duration::from_millis(50)) => {}
        }
    });
    let lines = recorder.take();
    assert!(
        has(&lines, "message=par_imap: cancelled index=0"),
        "{lines:#?}"
    );
    assert!(
        has(
            &lines,
            "message=par_imap: dropped with calls in flight in_flight=2"
        ),
        "{lines:#?}"
    );
}
