//! The article's Signals scenario, literally: each item is mapped by a child
//! process, and the child for item 5 kills itself with SIGTERM, as
//! `os.kill(os.getpid(), signal.SIGTERM)` does in the article, where it
//! deadlocks `Pool.imap`. Here the consumer gets items 0..4, then an error for
//! item 5 that names the signal, then the end.
//!
//! ```text
//! cargo run --example processes
//! ```

use std::time::{Duration, Instant};

use futures::StreamExt;
use par_imap::{ParImapExt, process};
use tokio::process::Command;

/// The command for one item: gzip its text, or die like the article's worker.
fn command_for(n: u32) -> Command {
    let mut command = Command::new("sh");
    if n == 5 {
        command.arg("-c").arg("kill -TERM $$");
    } else {
        command.arg("-c").arg("gzip -c | wc -c");
    }
    command
}

#[tokio::main]
async fn main() {
    println!("## A child killed by SIGTERM at item 5");
    let start = Instant::now();
    let mut sizes = futures::stream::iter(0..100_u32)
        .try_par_imap_async(4, |n| {
            let text = format!("item {n} ").repeat(100 * (n as usize + 1));
            process::output(command_for(n), text.into_bytes())
        })
        .timeout(Duration::from_secs(10));
    // In input order, the n-th result is item n's.
    let mut index = 0;
    while let Some(size) = sizes.next().await {
        match size {
            Ok(size) => println!(
                "item {index}: gzipped to {} bytes",
                String::from_utf8_lossy(&size).trim()
            ),
            Err(error) => println!("item {index}: error: {error}"),
        }
        index += 1;
    }
    println!("the stream ended after {:.1?}, no hang\n", start.elapsed());

    println!("## A child that hangs is killed at its timeout");
    let start = Instant::now();
    let mut hung = futures::stream::iter([60_u32])
        .try_par_imap_async(1, |secs| {
            let mut sleep = Command::new("sleep");
            sleep.arg(secs.to_string());
            process::output(sleep, Vec::new())
        })
        .timeout(Duration::from_millis(500));
    if let Some(Err(error)) = hung.next().await {
        println!(
            "error: {error} (is_timeout: {}), after {:.1?}",
            error.is_timeout(),
            start.elapsed()
        );
    }
}
