//! Scale-out on a real broker: three `redis_worker` processes share a Redis
//! Streams consumer group; one is killed with SIGKILL half-way. Every job
//! still gets a result, duplicates only for the jobs the dead worker held,
//! each worker's results follow its read order, jobs of one key never run
//! at the same time within a worker (`.key_order` on the job's field
//! `key`), nothing stays pending, and no process is left running.
//!
//! Needs Debian's `redis-server`: `.ci/run` installs it. Elsewhere, without
//! it, the test says it was skipped; under `CI` it fails instead.
#![cfg(unix)]
#[path = "../../tests/common/mod.rs"]
mod common;

use std::collections::{HashMap, HashSet};
use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use redis::aio::MultiplexedConnection;
use redis::streams::{StreamPendingCountReply, StreamRangeReply};

const JOBS: usize = 20_000;

/// A child process killed (and reaped) when dropped, so a failing test
/// leaves nothing running.
struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn redis_server() -> Option<PathBuf> {
    let found = std::env::split_paths(&std::env::var_os("PATH")?)
        .chain([PathBuf::from("/usr/bin"), PathBuf::from("/usr/sbin")])
        .map(|dir| dir.join("redis-server"))
        .find(|path| path.exists());
    if found.is_none() {
        assert!(
            std::env::var_os("CI").is_none(),
            "redis-server is missing in CI: .ci/run installs it with apt-get"
        );
        eprintln!("skipped: redis-server is not installed (apt-get install redis-server)");
    }
    found
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

async fn until<T>(what: &str, limit: Duration, mut check: impl AsyncFnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(Instant::now() < deadline, "never happened: {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Every entry of stream `results`: (job id, worker, read sequence number,
/// whether it records a failure).
async fn results(redis: &mut MultiplexedConnection) -> Vec<(String, String, u64, bool)> {
    entries(redis)
        .await
        .into_iter()
        .map(|entry| (entry.job, entry.worker, entry.seq, entry.span.is_none()))
        .collect()
}

/// One entry of stream `results`.
struct Entry {
    job: String,
    key: String,
    worker: String,
    seq: u64,
    /// When the job started and ended in its worker (µs), unless it failed.
    span: Option<(u64, u64)>,
    /// How many attempts it took, unless it failed.
    attempts: Option<u32>,
}

/// How many times job `n` fails at the downstream before it succeeds.
fn flaky(n: usize) -> u32 {
    if n % 97 == 5 {
        1 + (n / 97 % 3) as u32
    } else {
        0
    }
}

async fn entries(redis: &mut MultiplexedConnection) -> Vec<Entry> {
    let all: StreamRangeReply = redis::cmd("XRANGE")
        .arg("results")
        .arg("-")
        .arg("+")
        .query_async(redis)
        .await
        .unwrap();
    all.ids
        .iter()
        .map(|entry| {
            let failed = entry.get::<String>("error").is_some();
            let micros = |field: &str| entry.get::<String>(field).unwrap().parse().unwrap();
            Entry {
                job: entry.get("job").unwrap(),
                key: entry.get("key").unwrap(),
                worker: entry.get("worker").unwrap(),
                seq: entry.get::<String>("seq").unwrap().parse().unwrap(),
                span: (!failed).then(|| (micros("started_us"), micros("ended_us"))),
                attempts: (!failed)
                    .then(|| entry.get::<String>("attempts").unwrap().parse().unwrap()),
            }
        })
        .collect()
}

async fn pending_of(redis: &mut MultiplexedConnection, consumer: Option<&str>) -> Vec<String> {
    let mut command = redis::cmd("XPENDING");
    command
        .arg("jobs")
        .arg("workers")
        .arg("-")
        .arg("+")
        .arg(JOBS * 2);
    if let Some(consumer) = consumer {
        command.arg(consumer);
    }
    let pending: StreamPendingCountReply = command.query_async(redis).await.unwrap();
    pending.ids.into_iter().map(|entry| entry.id).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consumer_group_of_three_loses_nothing_when_one_is_killed() {
    let Some(server) = redis_server() else { return };
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let _redis_server = KillOnDrop(
        Command::new(server)
            .args([
                "--port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .arg("--dir")
            .arg(dir.path())
            .stdout(Stdio::null())
            .spawn()
            .expect("redis-server starts"),
    );
    let url = format!("redis://127.0.0.1:{port}");
    let client = redis::Client::open(url.as_str()).unwrap();
    let mut redis = until(
        "redis-server to answer",
        Duration::from_secs(20),
        async || client.get_multiplexed_async_connection().await.ok(),
    )
    .await;
    redis.set_response_timeout(Duration::from_secs(60));

    // The jobs, and the group from the start of the stream.
    let mut ids = Vec::with_capacity(JOBS);
    for chunk in (0..JOBS).collect::<Vec<_>>().chunks(1000) {
        let mut pipe = redis::pipe();
        for n in chunk {
            pipe.cmd("XADD")
                .arg("jobs")
                .arg("*")
                // 40 keys: jobs of one key must not overlap in a worker.
                .arg("key")
                .arg(format!("customer-{}", n % 40))
                // Every 97th job fails 1 to 3 times at the downstream: the
                // worker retries it, with backoff, until it succeeds.
                .arg("flaky")
                .arg(flaky(*n).to_string())
                .arg("payload")
                // Every 1000th job makes the mapper panic: the worker
                // records its failure and goes on.
                .arg(if n % 1000 == 999 {
                    format!("poison {n}")
                } else {
                    format!("job {n}")
                });
        }
        let added: Vec<String> = pipe.query_async(&mut redis).await.unwrap();
        ids.extend(added);
    }
    let _: () = redis::cmd("XGROUP")
        .arg("CREATE")
        .arg("jobs")
        .arg("workers")
        .arg("0")
        .query_async(&mut redis)
        .await
        .unwrap();

    let log = |name: &str| dir.path().join(format!("{name}.log"));
    let start_worker = |name: &str| {
        KillOnDrop(
            Command::new(common::example_binary("redis_worker", &[]))
                .arg(name)
                .env("REDIS_URL", &url)
                .env("JOB_ROUNDS", "20")
                .env("CLAIM_IDLE_MS", "1000")
                .env("BATCH", "32")
                .stderr(std::fs::File::create(log(name)).unwrap())
                .spawn()
                .expect("a worker starts"),
        )
    };
    let mut workers: HashMap<&str, KillOnDrop> = ["w1", "w2", "w3"]
        .into_iter()
        .map(|name| (name, start_worker(name)))
        .collect();

    // Half-way, w2 dies without a word.
    until("half the jobs done", Duration::from_secs(120), async || {
        let done: usize = redis::cmd("XLEN")
            .arg("results")
            .query_async(&mut redis)
            .await
            .ok()?;
        (done >= JOBS / 2).then_some(())
    })
    .await;
    let mut killed = workers.remove("w2").unwrap();
    killed.0.kill().unwrap();
    killed.0.wait().unwrap();
    let held_by_the_dead: HashSet<String> = pending_of(&mut redis, Some("w2"))
        .await
        .into_iter()
        .collect();

    // Every job gets a result, and nothing stays pending.
    let all = until(
        "every job to have a result",
        Duration::from_secs(180),
        async || {
            let all = results(&mut redis).await;
            let done: HashSet<&String> = all.iter().map(|(job, ..)| job).collect();
            (done.len() == JOBS).then_some(all)
        },
    )
    .await;
    until(
        "the pending list to empty",
        Duration::from_secs(60),
        async || pending_of(&mut redis, None).await.is_empty().then_some(()),
    )
    .await;
    let all = {
        // Results written after the last check (a reclaimed duplicate).
        let _ = all;
        results(&mut redis).await
    };

    // At least once, never lost: duplicates only for what w2 held.
    let mut count: HashMap<&str, usize> = HashMap::new();
    for (job, ..) in &all {
        *count.entry(job.as_str()).or_default() += 1;
    }
    assert_eq!(count.len(), JOBS);
    assert!(ids.iter().all(|id| count.contains_key(id.as_str())));
    let redone = count.values().filter(|times| **times > 1).count();
    eprintln!(
        "w2 held {} jobs when killed; {redone} jobs were done twice",
        held_by_the_dead.len()
    );
    for (job, times) in &count {
        if *times > 1 {
            assert!(
                held_by_the_dead.contains(*job),
                "job {job} done {times} times, not held by w2"
            );
        }
    }
    // Each worker wrote its results in the order it read the jobs.
    for worker in ["w1", "w2", "w3"] {
        let order: Vec<u64> = all
            .iter()
            .filter(|(_, w, ..)| w == worker)
            .map(|(_, _, seq, _)| *seq)
            .collect();
        assert!(
            order.windows(2).all(|pair| pair[0] < pair[1]),
            "{worker} out of read order"
        );
    }
    // Poisoned jobs have their failure as their result; every other job a
    // digest.
    let poisoned: HashSet<&str> = ids
        .iter()
        .enumerate()
        .filter(|(n, _)| n % 1000 == 999)
        .map(|(_, id)| id.as_str())
        .collect();
    for (job, _, _, failed) in &all {
        assert_eq!(
            *failed,
            poisoned.contains(job.as_str()),
            "job {job}: a failure recorded exactly for poisoned jobs"
        );
    }
    // Within a worker, the jobs of one key ran one after another, in read
    // order (the poisoned ones have no span).
    // (worker, key) → (read order, started, ended) of each job.
    type Spans = HashMap<(String, String), Vec<(u64, u64, u64)>>;
    let mut spans = Spans::new();
    // Flaky jobs succeeded after exactly their failures plus one attempts
    // (counted in the worker that wrote the result); the others at once.
    let number: HashMap<&str, usize> = ids
        .iter()
        .enumerate()
        .map(|(n, id)| (id.as_str(), n))
        .collect();
    let mut retried = 0;
    for entry in entries(&mut redis).await {
        if let Some(attempts) = entry.attempts {
            let expected = flaky(number[entry.job.as_str()]) + 1;
            assert_eq!(attempts, expected, "job {}: its attempts", entry.job);
            retried += usize::from(expected > 1);
        }
        if let Some((started, ended)) = entry.span {
            spans
                .entry((entry.worker, entry.key))
                .or_default()
                .push((entry.seq, started, ended));
        }
    }
    assert!(spans.len() >= 40, "every key ran: {}", spans.len());
    assert!(retried >= 200, "flaky jobs were retried: {retried}");
    for ((worker, key), jobs) in &mut spans {
        jobs.sort_unstable();
        for pair in jobs.windows(2) {
            let ((seq_a, _, ended_a), (seq_b, started_b, _)) = (pair[0], pair[1]);
            assert!(
                ended_a <= started_b,
                "{worker}: jobs {seq_a} and {seq_b} of {key} overlapped, or ran out of read order"
            );
        }
    }
    let by_survivors = all.iter().filter(|(_, w, ..)| w != "w2").count();
    assert!(
        by_survivors > 0 && all.len() - by_survivors > 0,
        "all three took part"
    );

    // SIGTERM: each survivor stops reading and exits 0; none is left.
    for (name, worker) in &mut workers {
        let pid = worker.0.id().to_string();
        assert!(
            Command::new("kill")
                .args(["-TERM", &pid])
                .status()
                .unwrap()
                .success()
        );
        let deadline = Instant::now() + Duration::from_secs(20);
        let status = loop {
            if let Some(status) = worker.0.try_wait().unwrap() {
                break status;
            }
            assert!(Instant::now() < deadline, "{name} did not exit on SIGTERM");
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        let said = std::fs::read_to_string(log(name)).unwrap_or_default();
        assert!(status.success(), "{name} exited with {status}: {said}");
    }
}
