//! `limit == 0` and `window < limit` panic at the caller's line.
//!
//! Alone in its own test binary: it swaps the process-wide panic hook.
use std::panic::{self, Location};
use std::sync::{Arc, Mutex};

use futures::stream;
use par_imap::ParImapExt;

/// The panic hook is process-wide: one test at a time may swap it, and a
/// test that panics on purpose holds this too, so that its panic never
/// reaches another test's hook.
static HOOK: Mutex<()> = Mutex::new(());

/// Runs `f`, which must panic, and returns the file of its panic location
/// and its message.
fn panic_site(f: impl FnOnce() + panic::UnwindSafe) -> (String, String) {
    let _hook = HOOK.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    let site = Arc::new(Mutex::new(None));
    let seen = site.clone();
    let previous = panic::take_hook();
    panic::set_hook(Box::new(move |info| {
        let location = info.location().map(Location::to_string).unwrap_or_default();
        let message = info
            .payload()
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| info.payload().downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_default();
        *seen.lock().unwrap() = Some((location, message));
    }));
    let outcome = panic::catch_unwind(f);
    panic::set_hook(previous);
    assert!(outcome.is_err(), "did not panic");
    site.lock().unwrap().take().unwrap()
}

#[test]
fn zero_limit_panics_at_the_callers_line_naming_limit() {
    for build in [
        (|| drop(stream::iter([1]).par_imap(0, |n: i32| n))) as fn(),
        || drop(stream::iter([1]).par_imap_unordered(0, |n: i32| n)),
        || drop(stream::iter([1]).par_imap_async(0, |n: i32| async move { n })),
        || drop(stream::iter([1]).par_imap_async_unordered(0, |n: i32| async move { n })),
        || drop(stream::iter([1]).try_par_imap(0, |n: i32| Ok::<_, par_imap::Error>(n))),
        || drop(stream::iter([1]).try_par_imap_unordered(0, |n: i32| Ok::<_, par_imap::Error>(n))),
        || {
            drop(
                stream::iter([1])
                    .try_par_imap_async(0, |n: i32| async move { Ok::<_, par_imap::Error>(n) }),
            )
        },
        || {
            drop(
                stream::iter([1]).try_par_imap_async_unordered(0, |n: i32| async move {
                    Ok::<_, par_imap::Error>(n)
                }),
            )
        },
    ] {
        let (location, message) = panic_site(build);
        assert!(location.starts_with(file!()), "panicked at {location}");
        assert!(message.contains("`limit`"), "message: {message}");
    }
}

#[test]
fn window_below_limit_panics_at_the_callers_line() {
    let (location, message) =
        panic_site(|| drop(stream::iter([1]).par_imap(4, |n: i32| n).window(3)));
    assert!(location.starts_with(file!()), "panicked at {location}");
    assert!(
        message.contains("`window` (3) must be at least `limit` (4)"),
        "message: {message}"
    );
}

#[tokio::test]
async fn a_builder_method_after_the_first_poll_panics_at_the_callers_line() {
    use futures::StreamExt;
    let mut results = futures::stream::iter([1_u32, 2]).par_imap(2, |n| n);
    assert_eq!(results.next().await.unwrap().unwrap(), 1);
    let hook = HOOK.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    let late = std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || {
        drop(results.keep_going());
    }));
    drop(hook);
    let message = late.unwrap_err();
    let message = message.downcast_ref::<&str>().copied().unwrap_or_default();
    assert!(message.contains("before the first poll"), "{message}");
}
