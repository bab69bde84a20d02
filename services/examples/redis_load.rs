//! Load for `redis_worker`: pushes M jobs onto stream `jobs`, waits until
//! every job id has a result on stream `results`, and prints the throughput.
//!
//! ```text
//! cargo run --release -p par-imap-services --example redis_load -- 20000
//! ```
//!
//! Start the workers first (any number, anywhere); `REDIS_URL` as for them.
//! It clears `jobs` and `results` before it starts.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use redis::streams::StreamRangeReply;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let jobs: usize = std::env::args()
        .nth(1)
        .and_then(|n| n.parse().ok())
        .unwrap_or(20_000);
    let url = std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".to_string());
    let mut redis = redis::Client::open(url)?
        .get_multiplexed_async_connection()
        .await?;
    redis.set_response_timeout(Duration::from_secs(30));
    let _: () = redis::cmd("DEL")
        .arg("results")
        .query_async(&mut redis)
        .await?;
    let _: () = redis::cmd("XTRIM")
        .arg("jobs")
        .arg("MAXLEN")
        .arg(0)
        .query_async(&mut redis)
        .await?;

    let start = Instant::now();
    let mut ids = HashSet::new();
    for chunk in (0..jobs).collect::<Vec<_>>().chunks(1000) {
        let mut pipe = redis::pipe();
        for n in chunk {
            pipe.cmd("XADD")
                .arg("jobs")
                .arg("*")
                .arg("payload")
                .arg(format!("job {n}"));
        }
        let added: Vec<String> = pipe.query_async(&mut redis).await?;
        ids.extend(added);
    }
    println!("pushed {jobs} jobs in {:.2?}", start.elapsed());

    let mut seen = HashSet::new();
    let mut from = "-".to_string();
    while seen.len() < ids.len() {
        let page: StreamRangeReply = redis::cmd("XRANGE")
            .arg("results")
            .arg(&from)
            .arg("+")
            .arg("COUNT")
            .arg(10_000)
            .query_async(&mut redis)
            .await?;
        match page.ids.last() {
            Some(last) => from = format!("({}", last.id),
            None => tokio::time::sleep(Duration::from_millis(50)).await,
        }
        seen.extend(
            page.ids
                .iter()
                .filter_map(|entry| entry.get::<String>("job")),
        );
    }
    let elapsed = start.elapsed();
    println!(
        "every job has a result: {jobs} jobs in {elapsed:.2?}, {:.0} jobs/s",
        jobs as f64 / elapsed.as_secs_f64()
    );
    Ok(())
}
