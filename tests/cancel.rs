//! Semantics 5 and 6: dropping the stream is cancellation; a runtime shutting
//! down under the map ends it with a cancelled error, not a hang.
mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{Calls, Gates, Tracked, Tracker, eventually_async};
use futures::{StreamExt, TryStreamExt, stream};
use par_imap::ParImapExt;
use tokio::sync::oneshot;
use tokio::time::sleep;

#[test]
fn blocking_drop_starts_nothing_new_even_if_a_call_is_queued() {
    // Limit 2: items 0 and 1 block both workers, and items 2 and 3 wait in
    // the queue behind them when the stream is dropped. They must never
    // reach the mapper, and their inputs must still be dropped.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .build()
        .unwrap();
    let (gates, calls, tracker) = (Gates::default(), Calls::default(), Tracker::default());
    let (wait, count, outputs) = (gates.clone(), calls.clone(), tracker.clone());
    let inputs = tracker.clone();
    runtime.block_on(async {
        let mut results =
            stream::iter(0..100)
                .map(move |i| inputs.track(i))
                .par_imap(2, move |item: Tracked| {
                    let _running = count.enter(item.value);
                    wait.wait(item.value);
                    outputs.track(item.value)
                });
        tokio::select! {
            _ = results.next() => panic!("every call is blocked"),
            _ = eventually_async("items 0 and 1 to run", || calls.running() == 2) => {}
        }
        assert_eq!(tracker.created(), 4, "items 0..4 pulled");
    });
    // The stream is gone: the queued calls' inputs went with it, at once;
    // items 0 and 1 are held by their blocked calls.
    assert_eq!(tracker.alive(), 2);
    for i in 0..4 {
        gates.open(i);
    }
    tracker.wait_all_dropped();
    assert_eq!(calls.started_indices(), [0, 1]);
    drop(runtime);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blocking_drop_drops_every_value_once_including_late_outputs() {
    for unordered in [false, true] {
        let (gates, calls, tracker) = (Gates::default(), Calls::default(), Tracker::default());
        let (wait, count, outputs) = (gates.clone(), calls.clone(), tracker.clone());
        let inputs = tracker.clone();
        let mapper = move |item: Tracked| {
            let _running = count.enter(item.value);
            wait.wait(item.value);
            outputs.track(item.value)
        };
        let input = stream::iter(0..100).map(move |i| inputs.track(i));
        let results = if unordered {
            input.par_imap_unordered(3, mapper).boxed()
        } else {
            input.par_imap(3, mapper).boxed()
        };
        gates.open(0);
        let first: Vec<Tracked> = results.take(1).try_collect().await.unwrap();
        assert_eq!(first[0].value, 0);
        drop(first);
        // The stream is gone; calls still blocked end later, and their
        // outputs are dropped by nobody but the map.
        for i in 0..100 {
            gates.open(i);
        }
        tracker.wait_all_dropped();
        let started = calls.started_indices();
        assert!(started.len() <= 4, "started after the drop: {started:?}");
        assert!(started.iter().all(|&i| i < 4), "started: {started:?}");
    }
}

#[tokio::test(start_paused = true)]
async fn async_drop_after_take_aborts_calls_and_drops_every_value_once() {
    for unordered in [false, true] {
        let (calls, tracker) = (Calls::default(), Tracker::default());
        let torn_down = Arc::new(Mutex::new(Vec::<oneshot::Receiver<()>>::new()));
        let (count, outputs, inputs, tear) = (
            calls.clone(),
            tracker.clone(),
            tracker.clone(),
            torn_down.clone(),
        );
        let mapper = move |item: Tracked| {
            let running = count.enter(item.value);
            // The future owns `_alive`: its receiver closes when the future is dropped.
            let (_alive, closed) = oneshot::channel::<()>();
            tear.lock().unwrap().push(closed);
            let outputs = outputs.clone();
            async move {
                let _alive = _alive;
                let _running = running;
                // Items 0..3 are quick; the rest take an hour.
                let secs = if item.value < 3 { 1 } else { 3600 };
                sleep(Duration::from_secs(secs)).await;
                outputs.track(item.value)
            }
        };
        let input = stream::iter(0..100).map(move |i| inputs.track(i));
        let results = if unordered {
            input.par_imap_async_unordered(4, mapper).boxed()
        } else {
            input.par_imap_async(4, mapper).boxed()
        };
        let first: Vec<Tracked> = results.take(3).try_collect().await.unwrap();
        assert_eq!(first.len(), 3);
        drop(first);
        let started = calls.started();
        // Every future still running when the stream dropped was aborted.
        let receivers = std::mem::take(&mut *torn_down.lock().unwrap());
        for closed in receivers {
            assert!(closed.await.is_err());
        }
        sleep(Duration::from_secs(7200)).await;
        assert_eq!(calls.started(), started, "no call starts after the drop");
        assert_eq!(calls.running(), 0);
        assert_eq!(tracker.alive(), 0, "every input and output dropped");
    }
}

#[tokio::test(start_paused = true)]
async fn async_unyielded_outputs_are_dropped_with_the_stream() {
    // Items 1..4 finish while item 0 runs: their outputs wait in the window,
    // and dropping the stream drops them.
    let tracker = Tracker::default();
    let outputs = tracker.clone();
    let mut results = stream::iter(0..4).par_imap_async(4, move |i: usize| {
        let outputs = outputs.clone();
        async move {
            sleep(Duration::from_secs(if i == 0 { 10 } else { 1 })).await;
            outputs.track(i)
        }
    });
    tokio::select! {
        _ = results.next() => panic!("item 0 takes 10 s"),
        _ = sleep(Duration::from_secs(5)) => {}
    }
    assert_eq!(tracker.alive(), 3);
    drop(results);
    assert_eq!(tracker.alive(), 0);
}

#[test]
fn runtime_shutdown_under_the_map_yields_cancelled_error_not_hang() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_time()
        .build()
        .unwrap();
    let mut results = stream::iter(0..10).par_imap_async(3, |i: usize| async move {
        if i > 0 {
            std::future::pending::<()>().await;
        }
        i
    });
    assert_eq!(runtime.block_on(results.next()).unwrap().unwrap(), 0);
    drop(runtime);
    // Outside any runtime now: the next poll sees the calls torn down.
    let error = futures::executor::block_on(results.next())
        .unwrap()
        .unwrap_err();
    assert!(error.is_cancelled());
    assert_eq!(error.index(), 1);
    assert!(futures::executor::block_on(results.next()).is_none());
}

#[test]
#[should_panic(expected = "must be called from the context of a Tokio 1.x runtime")]
fn polling_outside_a_runtime_panics_with_tokios_message() {
    let mut results = stream::iter(0..3).par_imap(2, |i: usize| i);
    let _ = futures::executor::block_on(results.next());
}

#[test]
fn blocking_calls_after_the_runtime_shut_down_are_cancelled_errors_not_a_hang() {
    // The map's worker has left (idle), then the runtime shuts down. The
    // next calls' worker can no longer start: tokio drops it unrun, and
    // the calls must come out cancelled instead of waiting forever.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .build()
        .unwrap();
    let mut results = stream::iter(0..10).par_imap(1, |n: u32| n);
    assert_eq!(runtime.block_on(results.next()).unwrap().unwrap(), 0);
    // Item 1 was queued behind item 0; then the worker idles and leaves
    // (after 50 ms: a second is ample even on a loaded machine).
    std::thread::sleep(Duration::from_secs(1));
    runtime.shutdown_background();
    let (send, outcome) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut seen = Vec::new();
        while let Some(result) = futures::executor::block_on(results.next()) {
            seen.push(result.map_err(|error| (error.index(), error.is_cancelled())));
        }
        let _ = send.send(seen);
    });
    let seen = outcome
        .recv_timeout(common::hang())
        .expect("the stream hung");
    // The calls that started before the shutdown (how many depends on how
    // fast the worker was: batches grow as items are measured) come out in
    // order, then the first call that could not start is a cancellation;
    // had the worker not left yet, it would still run the rest. No hang
    // either way, which is the point.
    let done = seen.iter().take_while(|result| result.is_ok()).count();
    let expected: Vec<_> = (1..10)
        .take(done)
        .map(Ok)
        .chain((done < 9).then_some(Err((done + 1, true))))
        .collect();
    assert_eq!(seen, expected);
}
