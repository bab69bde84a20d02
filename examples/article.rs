//! Replays each problem of "The Practice of Pool.imap in Python" with
//! par-imap, and prints what happens.
//!
//! ```text
//! cargo run --example article
//! ```

use std::io::{Read, Seek, Write};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use futures::{StreamExt, TryStreamExt, stream};
use par_imap::ParImapExt;
use tempfile::NamedTempFile;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    exceptions().await;
    temp_files().await?;
    signals().await;
    closures().await?;
    sum_of_squares().await?;
    Ok(())
}

/// "The output stops at 4 but the tasks until 15 have been executed."
async fn exceptions() {
    println!("## Exceptions: the mapper fails at item 5");
    let started = Arc::new(AtomicUsize::new(0));
    let counter = started.clone();
    let mut outputs = stream::iter(0..100_u64).try_par_imap(4, move |n| {
        counter.fetch_add(1, Ordering::SeqCst);
        println!("mapping {n}");
        std::thread::sleep(Duration::from_millis(50));
        if n == 5 {
            anyhow::bail!("ValueError at {n}");
        }
        Ok(n)
    });
    while let Some(output) = outputs.next().await {
        match output {
            Ok(n) => println!("output {n}"),
            Err(error) => println!("error: {error:#}"),
        }
    }
    // Items 6 and 7 were already running beside 5; nothing started after.
    println!(
        "mapper calls started: {} (Pool.imap in the article: 16); none after item 5 failed\n",
        started.load(Ordering::SeqCst)
    );
}

fn square_to_file(dir: &Path, n: u64) -> anyhow::Result<NamedTempFile> {
    anyhow::ensure!(n != 3, "cannot make a temp file for {n}");
    let mut file = NamedTempFile::new_in(dir)?;
    write!(file, "{}", n * n)?;
    Ok(file)
}

fn sum_up(sum: u64, mut file: NamedTempFile) -> anyhow::Result<u64> {
    let mut text = String::new();
    file.rewind()?;
    file.read_to_string(&mut text)?;
    Ok(sum + text.parse::<u64>()?)
}

/// "If an exception is raised by the square function ... the reduction
/// procedure will stop without cleaning up subsequent files."
async fn temp_files() -> anyhow::Result<()> {
    println!("## Temp files: mapper outputs that own a resource");
    let dir = tempfile::tempdir()?;
    let root = dir.path().to_owned();
    let sum = stream::iter(0..10)
        .try_par_imap(4, move |n| square_to_file(&root, n))
        .try_fold(0, |sum, file| async move { sum_up(sum, file) })
        .await;
    // `{:#}`: the error and its causes on one line; `{:?}` of an
    // `anyhow::Error` would add its backtrace under RUST_BACKTRACE=1.
    match sum {
        Ok(sum) => println!("sum: {sum}"),
        Err(error) => println!("sum: error: {error:#}"),
    }
    // Calls that were running at the failure end on their own, and their
    // files are deleted when the map drops their outputs.
    let mut left = usize::MAX;
    for _ in 0..1000 {
        left = std::fs::read_dir(dir.path())?.count();
        if left == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    println!("temp files left behind: {left} (no draining, no cleanup loop)\n");
    Ok(())
}

/// "If a worker process is killed by a signal, Pool may trap into a deadlock."
async fn signals() {
    println!("## Signals: a worker dies mid-call");
    // One short line instead of the default panic report.
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|info| eprintln!("(a mapper panicked: {info})")));
    let outputs: Vec<Result<u64, par_imap::Error>> = stream::iter(0..100_u64)
        .par_imap(4, |n| {
            if n == 2 {
                panic!("worker for item {n} died");
            }
            n
        })
        .collect()
        .await;
    std::panic::set_hook(default_hook);
    for output in &outputs {
        match output {
            Ok(n) => println!("output {n}"),
            Err(error) => println!("error: {error:#} (is_panic: {})", error.is_panic()),
        }
    }
    println!("no hang: the stream ended after {} items\n", outputs.len());
}

/// "pickle just can't serialize closures."
async fn closures() -> anyhow::Result<()> {
    println!("## Closures: a lambda capturing `base`");
    let base = 2_u64;
    let powers: Vec<u64> = stream::iter(0..10)
        .par_imap(4, move |n| base.pow(n))
        .try_collect()
        .await?;
    println!("{powers:?}\n");
    Ok(())
}

/// The article's first example: `reduce(operator.add, pl.imap(square, nums))`.
async fn sum_of_squares() -> anyhow::Result<()> {
    println!("## Sum of squares");
    let sum = stream::iter(0..10_u64)
        .par_imap(4, |n| n * n)
        .try_fold(0, |sum, square| async move { Ok(sum + square) })
        .await?;
    println!("{sum}");
    Ok(())
}
