//! The knee server keeps its capacity: never more requests served at once
//! than the capacity in force when they were admitted, all of them answered,
//! and a capacity change applies to new requests without stopping running
//! ones.
//!
//! No assertion bounds a duration: the server is held (requests that served
//! their time do not answer), so the test can wait, with a generous bound,
//! until the expected numbers run and queue, and only then check them.

use std::time::{Duration, Instant};

use par_imap_services::knee::KneeServer;
use tokio::task::JoinSet;

/// The bound on every wait: only a hung test should ever reach it.
const PATIENCE: Duration = Duration::from_secs(60);

/// Sends `n` concurrent requests, each on a connection of its own.
fn send(server: &KneeServer, n: usize) -> JoinSet<reqwest::StatusCode> {
    let client = reqwest::Client::new();
    let mut requests = JoinSet::new();
    for i in 0..n {
        let (client, url) = (client.clone(), format!("{}item/{i}", server.url()));
        requests.spawn(async move { client.get(url).send().await.unwrap().status() });
    }
    requests
}

/// Waits until `running` run and `queued` wait, or panics after `PATIENCE`.
async fn until(server: &KneeServer, running: usize, queued: usize) {
    let start = Instant::now();
    while (server.running(), server.queued()) != (running, queued) {
        assert!(
            start.elapsed() < PATIENCE,
            "waited {PATIENCE:?} for {running} running and {queued} queued; \
             now {} running, {} queued",
            server.running(),
            server.queued()
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Releases the hold and waits for every request: all answered `200`.
async fn answered(server: &KneeServer, mut requests: JoinSet<reqwest::StatusCode>) -> usize {
    server.release();
    let mut n = 0;
    tokio::time::timeout(PATIENCE, async {
        while let Some(status) = requests.join_next().await {
            assert_eq!(status.unwrap(), reqwest::StatusCode::OK);
            n += 1;
        }
    })
    .await
    .expect("every request is answered");
    until(server, 0, 0).await;
    n
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn capacity_is_kept_and_changes_at_runtime() {
    let server = KneeServer::start(2, Duration::from_millis(1))
        .await
        .unwrap();
    assert_ne!(server.port(), 0);

    // C = 2, 6 at once: 2 run, 4 queue, and it stays so while held.
    server.hold();
    let requests = send(&server, 6);
    until(&server, 2, 4).await;
    assert_eq!(server.peak(), 2);
    assert_eq!(answered(&server, requests).await, 6);
    assert_eq!(server.served(), 6);
    assert_eq!(server.peak(), 2, "never more than the capacity at once");

    // Down to 1: new requests run one at a time.
    server.set_capacity(1);
    server.reset_peak();
    server.hold();
    let requests = send(&server, 3);
    until(&server, 1, 2).await;
    assert_eq!(answered(&server, requests).await, 3);
    assert_eq!(server.peak(), 1);

    // Up to 3: the same load now runs 3 at once.
    server.set_capacity(3);
    server.reset_peak();
    server.hold();
    let requests = send(&server, 6);
    until(&server, 3, 3).await;
    assert_eq!(answered(&server, requests).await, 6);
    assert_eq!(server.peak(), 3);
    assert_eq!(server.served(), 15);

    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shrinking_lets_running_requests_finish() {
    let server = KneeServer::start(4, Duration::from_millis(1))
        .await
        .unwrap();
    server.hold();
    let mut requests = send(&server, 4);
    until(&server, 4, 0).await;

    // Down to 1 with 4 running: none is stopped, a new one waits.
    server.set_capacity(1);
    let (client, url) = (reqwest::Client::new(), server.url());
    requests.spawn(async move { client.get(url).send().await.unwrap().status() });
    until(&server, 4, 1).await;
    assert_eq!(server.capacity(), 1);

    assert_eq!(answered(&server, requests).await, 5);
    assert_eq!(server.served(), 5);
    assert_eq!(server.peak(), 4);
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_goes_away_frees_its_place() {
    let server = KneeServer::start(1, Duration::from_millis(1))
        .await
        .unwrap();
    server.hold();
    let running = send(&server, 1);
    until(&server, 1, 0).await;
    let mut gone = send(&server, 1);
    until(&server, 1, 1).await;

    // The queued client leaves: the queue empties, nothing is served for it.
    gone.abort_all();
    until(&server, 1, 0).await;
    assert_eq!(answered(&server, running).await, 1);
    assert_eq!(server.served(), 1);

    // And the place is free for the next one.
    assert_eq!(answered(&server, send(&server, 1)).await, 1);
    assert_eq!(server.served(), 2);
    server.shutdown().await.unwrap();
}
