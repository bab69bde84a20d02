//! Semantics 6: a panicking mapper is an `Err` at its index, payload intact,
//! and nothing hangs.
use futures::{StreamExt, stream};
use par_imap::ParImapExt;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blocking_panic_becomes_error_at_its_index_with_payload_intact() {
    let mut results = stream::iter(0..4).par_imap(2, |i: usize| {
        if i == 2 {
            std::panic::panic_any(vec![1_u8, 2, 3]);
        }
        i
    });
    assert_eq!(results.next().await.unwrap().unwrap(), 0);
    assert_eq!(results.next().await.unwrap().unwrap(), 1);
    let error = results.next().await.unwrap().unwrap_err();
    assert!(error.is_panic() && !error.is_timeout() && !error.is_cancelled());
    assert_eq!(error.index(), 2);
    assert_eq!(error.to_string(), "item 2 panicked");
    let payload = error.into_panic();
    assert_eq!(payload.downcast_ref::<Vec<u8>>(), Some(&vec![1, 2, 3]));
    assert!(results.next().await.is_none());
}

#[tokio::test(start_paused = true)]
async fn async_panic_becomes_error_with_message_in_display() {
    let results: Vec<_> = stream::iter(0..3)
        .par_imap_async(3, |i: usize| async move {
            tokio::task::yield_now().await;
            if i == 1 {
                panic!("item {i} is bad");
            }
            i
        })
        .collect()
        .await;
    assert_eq!(results.len(), 2);
    let error = results[1].as_ref().unwrap_err();
    assert_eq!(error.to_string(), "item 1 panicked: item 1 is bad");
    assert!(format!("{error:?}").contains("item 1 is bad"));
}

#[tokio::test(start_paused = true)]
async fn async_panic_while_building_the_future_is_an_error_too() {
    let results: Vec<_> = stream::iter(0..2)
        .par_imap_async(1, |i: usize| {
            assert!(i == 0, "no future for {i}");
            async move { i }
        })
        .collect()
        .await;
    assert_eq!(
        results[1].as_ref().unwrap_err().to_string(),
        "item 1 panicked: no future for 1"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn panic_payload_resumes_unwinding_in_the_consumer() {
    let error = stream::iter([0])
        .par_imap(1, |_: i32| -> i32 { panic!("deep") })
        .next()
        .await
        .unwrap()
        .unwrap_err();
    let resumed = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        std::panic::resume_unwind(error.into_panic())
    }))
    .unwrap_err();
    assert_eq!(resumed.downcast_ref::<&str>(), Some(&"deep"));
}

#[test]
fn try_into_panic_returns_non_panics_unchanged() {
    let runtime_gone = {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let mut results = stream::iter(0..2).par_imap_async(2, |i: usize| async move {
            if i == 1 {
                std::future::pending::<()>().await;
            }
            i
        });
        runtime.block_on(results.next());
        drop(runtime);
        futures::executor::block_on(results.next())
            .unwrap()
            .unwrap_err()
    };
    let error = runtime_gone.try_into_panic().unwrap_err();
    assert!(error.is_cancelled());
    assert_eq!(error.to_string(), "item 1 cancelled");
}

#[test]
fn error_is_send_sync_static_and_an_std_error() {
    fn is_error<E: std::error::Error + Send + Sync + 'static>() {}
    is_error::<par_imap::Error>();
    let boxed: Box<dyn std::error::Error + Send + Sync> =
        tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap()
            .block_on(
                stream::iter([0])
                    .par_imap(1, |_: i32| -> i32 { panic!("x") })
                    .next(),
            )
            .unwrap()
            .unwrap_err()
            .into();
    assert_eq!(boxed.to_string(), "item 0 panicked: x");
    let _: anyhow::Error = anyhow::Error::from(*boxed.downcast::<par_imap::Error>().unwrap());
}

/// An input item that panics as it drops, outside any unwinding.
struct PanicsOnDrop(usize);

impl Drop for PanicsOnDrop {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            panic!("input item {} panics as it drops", self.0);
        }
    }
}

/// Input items never pulled are input items too: the map fails at item 0
/// and ends, dropping its input, which still holds items 1 to 3; their
/// `Drop`'s panic is contained, not out of `poll_next` (found in review).
/// Async and blocking.
#[tokio::test(flavor = "current_thread")]
async fn unpulled_input_items_panicking_in_drop_at_the_maps_end_are_contained() {
    use futures::FutureExt;
    for blocking in [false, true] {
        let input = stream::iter((0..4).map(PanicsOnDrop).collect::<Vec<_>>());
        let map = if blocking {
            input
                .par_imap(1, |item: PanicsOnDrop| -> usize {
                    std::mem::forget(item);
                    panic!("mapper fails")
                })
                .window(1)
                .boxed()
        } else {
            input
                .par_imap_async(1, |item: PanicsOnDrop| {
                    std::mem::forget(item);
                    async move { panic!("mapper fails") }
                })
                .window(1)
                .boxed()
        };
        let collected = std::panic::AssertUnwindSafe(map.collect::<Vec<Result<usize, _>>>())
            .catch_unwind()
            .await;
        let results = collected.unwrap_or_else(|_| panic!("blocking {blocking}: out of poll_next"));
        assert_eq!(results.len(), 1);
        assert!(results[0].as_ref().unwrap_err().is_panic());
    }
}

/// The same items dropped with the stream, the consumer having taken what
/// it wanted: contained, not out of the map's `Drop` (found in review).
#[tokio::test(flavor = "current_thread")]
async fn unpulled_input_items_panicking_in_drop_when_the_map_is_dropped_are_contained() {
    let mut map = stream::iter((0..4).map(PanicsOnDrop).collect::<Vec<_>>())
        .par_imap_async(1, |item: PanicsOnDrop| {
            let n = item.0;
            std::mem::forget(item);
            async move { n }
        })
        .window(1);
    assert_eq!(map.next().await.unwrap().unwrap(), 0);
    let dropped = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| drop(map)));
    assert!(dropped.is_ok(), "a panic out of the map's Drop");
}
