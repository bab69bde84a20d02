//! A consumer of a Redis Streams consumer group, with par-imap inside: when
//! one machine is not enough, run several of these, on as many machines.
//!
//! ```text
//! cargo run --release -p par-imap-services --example redis_worker -- <consumer-name>
//! ```
//!
//! It joins group `workers` on stream `jobs`, reads jobs in batches
//! (`XREADGROUP ... BLOCK`), maps them with `par_imap` (a CPU-bound job:
//! hashing the payload `JOB_ROUNDS` times), and for each result, in the order
//! it read the jobs, writes it to stream `results` (`XADD`, with the job's id,
//! the consumer's name and its read sequence number) and then acks the job
//! (`XACK`), the results that are ready together in one round trip. At start-up and every second it reclaims jobs left pending
//! longer than `CLAIM_IDLE_MS` by a dead consumer (`XAUTOCLAIM`), so a crash
//! loses nothing: delivery is at least once. SIGINT or SIGTERM cancel it
//! through a `CancellationToken`: it stops reading, abandons the jobs in
//! flight (they stay pending, for another consumer to reclaim) and exits 0.
//!
//! A job whose mapper fails (here: a payload starting with `poison` makes it
//! panic) does not stop the consumer: with `.keep_going()` its error is
//! recorded as its result (field `error`) and the job is acknowledged.
//!
//! A job marked flaky (field `flaky`: N) stands for a call to a downstream
//! that fails now and then: its first N attempts in this worker fail with
//! an `Err`, and `.retry` tries it again after a growing, jittered wait (up
//! to 5 attempts; panics are not retried). Its result records how many
//! attempts it took (field `attempts`).
//!
//! Jobs of one key (field `key`, say a customer; a job without one is its
//! own key) never run at the same time in one worker, and run in the order
//! it read them (`.key_order`); jobs of other keys run beside them. Each
//! result records the key and when its job started and ended (µs since the
//! worker started), so this can be checked. Across workers it takes jobs
//! sharded by key: one stream (and group) per shard of keys, each read by
//! one worker at a time; one consumer group shares jobs out by arrival, not
//! by key.
//!
//! Environment: `REDIS_URL` (default `redis://127.0.0.1:6379`), `JOB_ROUNDS`
//! (default 2000), `CLAIM_IDLE_MS` (default 5000), `BATCH` (default 64).

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::{StreamExt, stream};
use par_imap::{ParImapExt, Retry};
use redis::aio::MultiplexedConnection;
use redis::streams::{StreamAutoClaimReply, StreamId, StreamReadReply};
use sha2::{Digest, Sha256};
use tokio_util::sync::CancellationToken;

const JOBS: &str = "jobs";
const RESULTS: &str = "results";
const GROUP: &str = "workers";

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|value| value.parse().ok())
        .unwrap_or(default)
}

/// A job as read: its stream id, its payload, and its place in this
/// consumer's reading order.
#[derive(Clone)]
struct Job {
    id: String,
    /// The job's key: its field `key`, or else its id.
    key: String,
    payload: Vec<u8>,
    seq: u64,
    /// Its first `flaky` attempts fail (field `flaky`, default 0).
    flaky: u32,
}

/// A job's digest, when its last attempt started and ended (µs since
/// `since`), and how many attempts it took.
struct Done {
    digest: String,
    started: u128,
    ended: u128,
    attempts: u32,
}

/// A downstream that fails now and then: the first `job.flaky` calls for a
/// job fail. Counted per worker.
#[derive(Clone, Default)]
struct Downstream {
    calls: Arc<Mutex<HashMap<String, u32>>>,
}

/// A failure worth trying again.
#[derive(Debug)]
struct Flaky;

impl std::fmt::Display for Flaky {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("the downstream failed; try again")
    }
}

impl std::error::Error for Flaky {}

impl Downstream {
    /// Calls the downstream for `job`: its attempt number, or `Flaky`.
    fn call(&self, job: &Job) -> Result<u32, Flaky> {
        let mut calls = self
            .calls
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let made = calls.entry(job.id.clone()).or_default();
        *made += 1;
        let attempt = *made;
        if attempt <= job.flaky {
            return Err(Flaky);
        }
        calls.remove(&job.id);
        Ok(attempt)
    }
}

/// The CPU-bound work: SHA-256 of the payload, `rounds` times over.
fn digest(payload: &[u8], rounds: u32) -> String {
    let mut hash = Sha256::digest(payload);
    for _ in 1..rounds {
        hash = Sha256::digest(hash);
    }
    hash.iter().map(|byte| format!("{byte:02x}")).collect()
}

/// Reads jobs for `consumer`: reclaimed ones first, then new ones, until
/// cancelled.
struct Reader {
    connection: MultiplexedConnection,
    consumer: String,
    batch: usize,
    claim_idle: usize,
    next_claim: Instant,
    seq: u64,
    cancel: CancellationToken,
}

impl Reader {
    async fn next_batch(&mut self) -> redis::RedisResult<Vec<StreamId>> {
        if Instant::now() >= self.next_claim {
            self.next_claim = Instant::now() + Duration::from_secs(1);
            let claimed: StreamAutoClaimReply = redis::cmd("XAUTOCLAIM")
                .arg(JOBS)
                .arg(GROUP)
                .arg(&self.consumer)
                .arg(self.claim_idle)
                .arg("0-0")
                .arg("COUNT")
                .arg(self.batch)
                .query_async(&mut self.connection)
                .await?;
            if !claimed.claimed.is_empty() {
                eprintln!(
                    "{}: reclaimed {} jobs",
                    self.consumer,
                    claimed.claimed.len()
                );
                return Ok(claimed.claimed);
            }
        }
        let read: Option<StreamReadReply> = redis::cmd("XREADGROUP")
            .arg("GROUP")
            .arg(GROUP)
            .arg(&self.consumer)
            .arg("COUNT")
            .arg(self.batch)
            .arg("BLOCK")
            .arg(500)
            .arg("STREAMS")
            .arg(JOBS)
            .arg(">")
            .query_async(&mut self.connection)
            .await?;
        Ok(read
            .map(|reply| reply.keys.into_iter().flat_map(|key| key.ids).collect())
            .unwrap_or_default())
    }

    /// The next batch of jobs, or `None` once cancelled.
    async fn next(mut self) -> Option<(Vec<Job>, Self)> {
        let cancel = self.cancel.clone();
        loop {
            let batch = tokio::select! {
                _ = cancel.cancelled() => return None,
                batch = self.next_batch() => batch,
            };
            match batch {
                Ok(entries) if !entries.is_empty() => {
                    let jobs = entries
                        .into_iter()
                        .map(|entry| {
                            self.seq += 1;
                            let payload: Vec<u8> = entry.get("payload").unwrap_or_default();
                            let key: Option<String> = entry.get("key");
                            let flaky: Option<String> = entry.get("flaky");
                            Job {
                                key: key.unwrap_or_else(|| entry.id.clone()),
                                flaky: flaky.and_then(|n| n.parse().ok()).unwrap_or(0),
                                id: entry.id,
                                payload,
                                seq: self.seq,
                            }
                        })
                        .collect();
                    return Some((jobs, self));
                }
                Ok(_) => {}
                Err(error) => {
                    eprintln!("{}: read failed: {error}; retrying", self.consumer);
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        }
    }
}

/// The jobs pulled by the map and not yet answered, in read order. The map
/// yields in input order, so each result, or a failure (which carries only
/// its index), is the job at the front. The map's window bounds its length.
#[derive(Clone, Default)]
struct InFlight(Arc<Mutex<VecDeque<Read>>>);

/// What the result of a job records of it: its id, key and read sequence
/// number.
type Read = (String, String, u64);

impl InFlight {
    fn push(&self, job: &Job) {
        let mut jobs = self
            .0
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        jobs.push_back((job.id.clone(), job.key.clone(), job.seq));
    }

    /// The id, key and read sequence number of the job whose result came
    /// next.
    fn pop(&self) -> Read {
        let mut jobs = self
            .0
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        jobs.pop_front().expect("a result for a job that was read")
    }
}

/// Queues the job's result (its digest, or why it failed), then its ack:
/// a crash in between means the job is redone, never lost.
fn record(
    pipe: &mut redis::Pipeline,
    consumer: &str,
    (id, key, seq): Read,
    outcome: Result<Done, String>,
) {
    let mut fields = HashMap::from([
        ("job", id.clone()),
        ("key", key),
        ("worker", consumer.to_owned()),
        ("seq", seq.to_string()),
    ]);
    match outcome {
        Ok(done) => {
            fields.insert("digest", done.digest);
            fields.insert("started_us", done.started.to_string());
            fields.insert("ended_us", done.ended.to_string());
            fields.insert("attempts", done.attempts.to_string());
        }
        Err(error) => {
            fields.insert("error", error);
        }
    }
    pipe.xadd_map(RESULTS, "*", fields).ignore();
    pipe.xack(JOBS, GROUP, &[&id]).ignore();
}

async fn on_shutdown_signal(cancel: CancellationToken) {
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("a SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = terminate.recv() => {}
    }
    cancel.cancel();
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let consumer = std::env::args()
        .nth(1)
        .unwrap_or_else(|| format!("worker-{}", std::process::id()));
    let url: String = env_or("REDIS_URL", "redis://127.0.0.1:6379".to_string());
    let rounds: u32 = env_or("JOB_ROUNDS", 2000);
    let limit = std::thread::available_parallelism().map_or(2, usize::from);
    let client = redis::Client::open(url)?;
    // Blocking reads on one connection, writes on another.
    let mut writer = client.get_multiplexed_async_connection().await?;
    let mut reader = client.get_multiplexed_async_connection().await?;
    // The default response timeout is shorter than a blocking read.
    writer.set_response_timeout(Duration::from_secs(30));
    reader.set_response_timeout(Duration::from_secs(30));
    let created: redis::RedisResult<()> = redis::cmd("XGROUP")
        .arg("CREATE")
        .arg(JOBS)
        .arg(GROUP)
        .arg("0")
        .arg("MKSTREAM")
        .query_async(&mut writer)
        .await;
    if let Err(error) = created
        && error.code() != Some("BUSYGROUP")
    {
        return Err(error.into());
    }

    let cancel = CancellationToken::new();
    tokio::spawn(on_shutdown_signal(cancel.clone()));
    let reader = Reader {
        connection: reader,
        consumer: consumer.clone(),
        batch: env_or("BATCH", 64),
        claim_idle: env_or("CLAIM_IDLE_MS", 5000),
        next_claim: Instant::now(),
        seq: 0,
        cancel: cancel.clone(),
    };
    let in_flight = InFlight::default();
    let pulled = in_flight.clone();
    let jobs = stream::unfold(reader, Reader::next)
        .flat_map(stream::iter)
        .inspect(move |job| pulled.push(job))
        .boxed();
    let since = Instant::now();
    let downstream = Downstream::default();
    let results = jobs
        .try_par_imap(limit, move |job: Job| -> anyhow::Result<Done> {
            let started = since.elapsed().as_micros();
            assert!(!job.payload.starts_with(b"poison"), "a poisoned job");
            let attempts = downstream.call(&job)?;
            let digest = digest(&job.payload, rounds);
            Ok(Done {
                digest,
                started,
                ended: since.elapsed().as_micros(),
                attempts,
            })
        })
        // A flaky downstream is tried again, a poisoned job is not: up to 5
        // attempts, waits from 20 ms doubling to at most 1 s, jittered. The
        // job's key stays busy meanwhile; no thread waits.
        .retry(
            Retry::attempts(5)
                .backoff(Duration::from_millis(20), Duration::from_secs(1))
                .when(|error: &anyhow::Error| error.is::<Flaky>()),
        )
        // Jobs of one key one after another, in read order.
        .key_order(|job: &Job| job.key.clone())
        .cancel_token(cancel.clone())
        // One poisoned job must not stop the consumer.
        .keep_going();

    // Results ready together go out in one round trip, still in order.
    let mut done = 0_u64;
    let mut batches = results.ready_chunks(256);
    'reading: while let Some(batch) = batches.next().await {
        let mut pipe = redis::pipe();
        let mut stop = false;
        for result in batch {
            match result {
                Ok(finished) => {
                    record(&mut pipe, &consumer, in_flight.pop(), Ok(finished));
                    done += 1;
                }
                // A cancellation may name a job never read: nothing to pop.
                Err(error)
                    if error
                        .downcast_ref::<par_imap::Error>()
                        .is_some_and(par_imap::Error::is_cancelled) =>
                {
                    stop = true
                }
                // A failed job (a panic in the mapper): its error is its
                // result, and the job is acknowledged like any other.
                Err(error) => {
                    record(
                        &mut pipe,
                        &consumer,
                        in_flight.pop(),
                        Err(format!("{error:#}")),
                    );
                    done += 1;
                }
            }
        }
        if pipe.cmd_iter().next().is_some() {
            let _: () = pipe.query_async(&mut writer).await?;
        }
        if stop {
            break 'reading;
        }
    }
    eprintln!("{consumer}: stopped after {done} jobs; jobs in flight stay pending for others");
    Ok(())
}
