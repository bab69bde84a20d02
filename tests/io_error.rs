//! `try_` closures returning `std::io::Result` work as they are: a
//! `par_imap::Error` becomes an `io::Error` of a fitting kind that keeps it.
use std::io;
use std::time::Duration;

use futures::{StreamExt, TryStreamExt, stream};
use par_imap::ParImapExt;

fn inner(error: &io::Error) -> &par_imap::Error {
    error
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<par_imap::Error>())
        .expect("the par_imap::Error is kept inside")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_try_closure_returning_io_result_compiles_and_fails_with_its_own_error() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("a"), b"12").unwrap();
    let root = dir.path().to_owned();
    let sizes: io::Result<Vec<usize>> = stream::iter(["a", "a"])
        .try_par_imap(2, move |name: &str| {
            Ok(std::fs::read(root.join(name))?.len())
        })
        .try_collect()
        .await;
    assert_eq!(sizes.unwrap(), [2, 2]);

    let root = dir.path().to_owned();
    let missing: io::Result<Vec<usize>> = stream::iter(["a", "missing", "a"])
        .try_par_imap_async(1, move |name: &str| {
            let path = root.join(name);
            async move { Ok(tokio::fs::read(path).await?.len()) }
        })
        .try_collect()
        .await;
    assert_eq!(missing.unwrap_err().kind(), io::ErrorKind::NotFound);
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn a_timeout_is_timed_out_and_keeps_its_index() {
    let mut results = stream::iter([0_u64, 1])
        .try_par_imap_async(1, |n| async move {
            if n == 1 {
                std::future::pending::<()>().await;
            }
            io::Result::Ok(n)
        })
        .timeout(Duration::from_secs(1));
    assert_eq!(results.next().await.unwrap().unwrap(), 0);
    let error = results.next().await.unwrap().unwrap_err();
    assert_eq!(error.kind(), io::ErrorKind::TimedOut);
    assert!(inner(&error).is_timeout());
    assert_eq!(inner(&error).index(), 1);
    assert_eq!(error.to_string(), "item 1 timed out");
    let back = error.into_inner().unwrap().downcast::<par_imap::Error>();
    assert!(back.unwrap().is_timeout());
}

#[tokio::test(flavor = "current_thread")]
async fn a_panic_and_a_cancellation_are_other_not_interrupted() {
    let panicked = stream::iter([0])
        .try_par_imap(1, |_: i32| -> io::Result<i32> { panic!("boom") })
        .next()
        .await
        .unwrap()
        .unwrap_err();
    assert_eq!(panicked.kind(), io::ErrorKind::Other);
    assert!(inner(&panicked).is_panic());

    let token = tokio_util::sync::CancellationToken::new();
    token.cancel();
    let cancelled = stream::iter([0])
        .try_par_imap(1, |n: i32| io::Result::Ok(n))
        .cancel_token(token)
        .next()
        .await
        .unwrap()
        .unwrap_err();
    assert_eq!(cancelled.kind(), io::ErrorKind::Other);
    assert!(inner(&cancelled).is_cancelled());
}
