//! The article's problems, answered: temp files never left behind, closures
//! that capture what they like, the sum of squares.
mod common;

use std::collections::HashMap;
use std::io::{Read, Seek, Write};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use common::eventually;
use futures::{StreamExt, TryStreamExt, stream};
use par_imap::ParImapExt;
use tempfile::NamedTempFile;

/// The article's mapper: writes `n * n` to a temp file and returns it. The
/// file is deleted when its handle is dropped, so every unyielded output
/// must be dropped for the directory to end up empty.
fn square_to_file(dir: &Path, n: u64) -> anyhow::Result<NamedTempFile> {
    anyhow::ensure!(n != 3, "cannot map {n}");
    let mut file = NamedTempFile::new_in(dir)?;
    write!(file, "{}", n * n)?;
    Ok(file)
}

fn read_square(mut file: NamedTempFile) -> anyhow::Result<u64> {
    let mut text = String::new();
    file.rewind()?;
    file.read_to_string(&mut text)?;
    Ok(text.parse()?)
}

fn files_in(dir: &Path) -> usize {
    std::fs::read_dir(dir).unwrap().count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn temp_file_example_leaves_no_file_behind_after_a_failure() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().to_owned();
    let sum = stream::iter(0..100_u64)
        .try_par_imap(4, move |n| square_to_file(&root, n))
        .try_fold(0, |sum, file| async move { Ok(sum + read_square(file)?) })
        .await;
    assert_eq!(sum.unwrap_err().to_string(), "cannot map 3");
    // Calls running at the failure end on their own; their files go with them.
    eventually("every temp file removed", || files_in(dir.path()) == 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn temp_file_example_leaves_no_file_behind_when_the_consumer_stops_early() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().to_owned();
    let first_two: Vec<NamedTempFile> = stream::iter(0..100_u64)
        .try_par_imap(4, move |n| square_to_file(&root, n))
        .take(2)
        .try_collect()
        .await
        .unwrap();
    let squares: Vec<u64> = first_two
        .into_iter()
        .map(|file| read_square(file).unwrap())
        .collect();
    assert_eq!(squares, [0, 1]);
    eventually("every temp file removed", || files_in(dir.path()) == 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn temp_file_sum_of_squares_without_failures() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().to_owned();
    let sum = stream::iter([0, 1, 2, 4, 5, 6, 7, 8, 9])
        .try_par_imap(4, move |n| square_to_file(&root, n))
        .try_fold(0, |sum, file| async move { Ok(sum + read_square(file)?) })
        .await
        .unwrap();
    assert_eq!(sum, 285 - 9);
    assert_eq!(files_in(dir.path()), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closures_capture_owned_and_shared_state() {
    let base = 2_u64;
    let names: Arc<HashMap<u64, &str>> = Arc::new([(1, "one"), (8, "eight")].into_iter().collect());
    let calls = Arc::new(AtomicUsize::new(0));
    let (seen, lookup) = (calls.clone(), names.clone());
    let labelled: Vec<String> = stream::iter(0..4_u32)
        .par_imap(2, move |n| {
            seen.fetch_add(1, Ordering::Relaxed);
            let power = base.pow(n);
            format!("{power}:{}", lookup.get(&power).unwrap_or(&"?"))
        })
        .try_collect()
        .await
        .unwrap();
    assert_eq!(labelled, ["1:one", "2:?", "4:?", "8:eight"]);
    assert_eq!(calls.load(Ordering::Relaxed), 4);
    // The captures go once the stream is dropped and its workers have left.
    eventually("the map to drop its clone", || {
        Arc::strong_count(&names) == 1
    });

    let prefix = String::from("item");
    let async_labels: Vec<String> = stream::iter(0..3)
        .par_imap_async(2, move |n: i32| {
            let prefix = prefix.clone();
            async move { format!("{prefix}-{n}") }
        })
        .try_collect()
        .await
        .unwrap();
    assert_eq!(async_labels, ["item-0", "item-1", "item-2"]);
}
