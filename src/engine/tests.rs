//! Unit tests of the engine's bookkeeping, driven by hand: reports fed to
//! `take_in`, deadlines fired by calling `expire`, without a runtime's
//! workers in between.

use std::sync::Arc;
use std::time::Duration;

use super::*;
use crate::batch::Batch;
use crate::call::Event;
use crate::deadline::Progress;
use crate::options::{Options, Order};

/// A fail-fast engine with an hour's timeout and one blocking call of
/// `len` items handed to a worker, its progress shared, no deadline armed.
fn call_of(len: usize) -> (Engine<u32>, Arc<Progress<u32>>, Duration) {
    let timeout = Duration::from_secs(3600);
    let options = Options {
        timeout: Some(timeout),
        ..Options::new(Order::Input, 2)
    };
    let mut engine: Engine<u32> = Engine::new(options, true);
    let progress = Progress::new(0, timeout);
    let running = Running {
        progress: Some(Arc::clone(&progress)),
        deadline: None,
        retry_on_return: false,
    };
    assert_eq!(engine.calls.push(len, running), 0);
    engine.in_flight = 1;
    (engine, progress, timeout)
}

/// As [`call_of`], item 0 started and the call's deadline armed.
fn running_call_of(len: usize) -> (Engine<u32>, Duration) {
    let (mut engine, progress, timeout) = call_of(len);
    progress.begin(0);
    engine.arm(0, None);
    (engine, timeout)
}

/// A fail-fast timeout forgets the rest of its call (and the calls
/// after it), and their deadlines with them: no timer stays armed for
/// a call nobody waits for. Found by the engine's loom model
/// (`loom_deadline_expires_while_the_item_finishes`); here without loom.
#[test]
fn a_fail_fast_timeout_leaves_no_deadline_armed_for_what_it_forgot() {
    let (mut engine, timeout) = running_call_of(3);
    let at = engine
        .calls
        .running(0)
        .and_then(|(running, _)| running.deadline);
    let at = at.expect("armed from the item running");
    // The timer fires, long after: `poll_due` takes the deadline out.
    engine.deadlines.remove(at, 0);
    engine.expire(0, at, at + timeout, timeout, |result| result.is_err());
    assert_eq!(engine.failed_at(), Some(0), "item 0 timed out: fail-fast");
    assert!(
        engine.deadlines.is_empty(),
        "a deadline left armed for the forgotten rest of call 0"
    );
}

/// A call that reports its end takes its deadline with it: no timer
/// stays armed for it (found by `cargo mutants`: with `disarm` a no-op,
/// the deadlines of ended calls piled up until each came due, one per
/// call within a timeout's span, and every suite passed).
#[test]
fn a_call_that_ended_leaves_no_deadline_armed() {
    let (mut engine, _) = running_call_of(1);
    assert!(!engine.deadlines.is_empty(), "armed from the item running");
    let event = Event::Finished {
        call: 0,
        first: 0,
        results: Batch::One(Ok(7)),
        mapped: 1,
        busy: Duration::ZERO,
        accepted: None,
    };
    engine.take_in(event, |result| result.is_err());
    assert!(
        engine.deadlines.is_empty(),
        "the deadline of an ended call stayed armed"
    );
}

/// A call that found itself unwanted before it started (`Skipped`, a
/// failure below it lowered the cutoff) gives back its place in flight, so
/// the calls still owed below the failure can start. Found by `cargo
/// mutants`: with `in_flight -= 1` made `/= 1`, only the loom model
/// `report_from_a_call_the_engine_forgot` noticed; under `.key_order` the
/// leaked place could keep an owed item that waits for its key from ever
/// starting at a limit of 1.
#[test]
fn a_skipped_call_gives_back_its_place_in_flight() {
    let (mut engine, _) = running_call_of(1);
    let running = Running {
        progress: None,
        deadline: None,
        retry_on_return: false,
    };
    assert_eq!(engine.calls.push(1, running), 1);
    engine.in_flight = 2;
    engine.take_in(Event::Skipped { call: 1 }, |result| result.is_err());
    assert_eq!(
        engine.progress().2,
        1,
        "the skipped call still counts in flight"
    );
    assert!(
        !engine.calls.is_running(1),
        "call 1 is skipped, not running"
    );
}

/// The engine may hear a call start after its first item ended and before
/// the next began: no item runs then to take a deadline from, and the call
/// is still armed, to be looked at again. Found by a CI run where
/// `keep_going_blocking_timeout_given_up_by_the_map_keeps_the_rest_of_its_batch_in_place`
/// hung: its item 1 was never timed out, no deadline being armed for its
/// call.
#[test]
fn a_call_heard_starting_between_two_items_still_has_a_deadline() {
    let (mut engine, progress, _) = call_of(2);
    progress.begin(0);
    progress.end(0, Ok(0));
    engine.take_in(Event::Started { call: 0 }, |result| result.is_err());
    assert!(
        !engine.deadlines.is_empty(),
        "no deadline armed: item 1 could hang for ever without a timeout"
    );
}
