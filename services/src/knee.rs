//! A local HTTP server whose latency rises past a capacity knee.
//!
//! It serves at most `capacity` requests at once; the others wait in a
//! first-come-first-served queue. Each admitted request is served for a
//! fixed [`service_time`](KneeServer::start) (a sleep, so the server itself
//! costs next to no CPU), then answered `200 ok`. So with capacity `C` and
//! service time `S`, throughput is at most `C / S`, and a client that keeps
//! `n > C` requests in flight gets no more throughput than with `C`, only a
//! latency of about `n / C * S`: the knee a concurrency limit should find.
//!
//! The capacity changes at runtime ([`KneeServer::set_capacity`]): raising
//! it admits queued requests at once; lowering it lets running requests
//! finish and admits no new one until fewer than the new capacity run.
//!
//! Every path answers the same way. A request whose client goes away (for
//! instance a timed-out call) leaves the queue, or frees its place.
//!
//! ```no_run
//! # async fn demo() -> std::io::Result<()> {
//! use par_imap_services::knee::KneeServer;
//!
//! let server = KneeServer::start(32, KneeServer::SERVICE_TIME).await?;
//! let url = server.url(); // http://127.0.0.1:<free port>/
//! // ... drive it ...
//! server.set_capacity(8); // the knee moves to 8
//! server.shutdown().await?;
//! # Ok(())
//! # }
//! ```

use std::collections::VecDeque;
use std::io;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::serve::ListenerExt;
use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;

/// A running knee server on `127.0.0.1` (a free port). Dropping it stops
/// accepting connections and lets requests in progress finish (as
/// [`shutdown`](KneeServer::shutdown) does, without waiting for them).
#[derive(Debug)]
pub struct KneeServer {
    addr: SocketAddr,
    shared: Arc<Shared>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<io::Result<()>>>,
}

impl KneeServer {
    /// The service time the bench uses: 10 ms.
    ///
    /// Long against what one HTTP/1 request over loopback costs in CPU
    /// (tens of µs, client and server together), so that on a 2-core
    /// machine running both ends the knee is the server's capacity, not
    /// the CPU: with `C = 32` the server tops out at 3 200 req/s. Short
    /// enough that a few seconds per limit give thousands of latencies,
    /// so a p99 over 1 s windows means something. It is ten ticks of
    /// tokio's 1 ms timer, which rounds a sleep up: a request is served in
    /// about 11 ms, so the measured ceiling at `C = 32` is ~2 900 req/s.
    pub const SERVICE_TIME: Duration = Duration::from_millis(10);

    /// Binds `127.0.0.1:0` and serves on the current tokio runtime, at most
    /// `capacity` requests at once, each for `service_time`.
    ///
    /// # Panics
    ///
    /// If `capacity` is 0, or if not called within a tokio runtime.
    pub async fn start(capacity: usize, service_time: Duration) -> io::Result<Self> {
        assert!(capacity > 0, "knee server: capacity must be at least 1");
        let listener = tokio::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await?;
        let addr = listener.local_addr()?;
        // Answers go out in one write; no reason to let Nagle hold them.
        let listener = listener.tap_io(|tcp| {
            let _ = tcp.set_nodelay(true);
        });
        let shared = Arc::new(Shared {
            gate: Mutex::new(Gate {
                capacity,
                running: 0,
                peak: 0,
                queue: VecDeque::new(),
            }),
            service_time,
            served: AtomicU64::new(0),
            held: watch::Sender::new(false),
        });
        let router = Router::new()
            .fallback(serve_one)
            .with_state(Arc::clone(&shared));
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            axum::serve(listener, router)
                .with_graceful_shutdown(async move {
                    let _ = stopped.await;
                })
                .await
        });
        Ok(Self {
            addr,
            shared,
            stop: Some(stop),
            task: Some(task),
        })
    }

    /// The address the server listens on (`127.0.0.1`).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The port the server listens on.
    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// `http://127.0.0.1:<port>/`; any path below it is served the same.
    pub fn url(&self) -> String {
        format!("http://{}/", self.addr)
    }

    /// The current capacity: how many requests may be served at once.
    pub fn capacity(&self) -> usize {
        self.shared.gate().capacity
    }

    /// Sets the capacity. Raising it admits queued requests at once.
    /// Lowering it stops no running request: new requests wait until fewer
    /// than `capacity` run, so [`running`](KneeServer::running) may exceed
    /// `capacity` for one service time.
    ///
    /// # Panics
    ///
    /// If `capacity` is 0.
    pub fn set_capacity(&self, capacity: usize) {
        assert!(capacity > 0, "knee server: capacity must be at least 1");
        let mut gate = self.shared.gate();
        gate.capacity = capacity;
        self.shared.admit_waiting(&mut gate);
    }

    /// How many requests are being served now (admitted, not yet answered).
    pub fn running(&self) -> usize {
        self.shared.gate().running
    }

    /// How many requests wait in the queue now.
    pub fn queued(&self) -> usize {
        let gate = self.shared.gate();
        gate.queue
            .iter()
            .filter(|waiter| !waiter.is_closed())
            .count()
    }

    /// How many requests were answered `200 ok` since the start.
    pub fn served(&self) -> u64 {
        self.shared.served.load(Ordering::Relaxed)
    }

    /// The most requests ever served at once, since the start or the last
    /// [`reset_peak`](KneeServer::reset_peak).
    pub fn peak(&self) -> usize {
        self.shared.gate().peak
    }

    /// Returns the peak and restarts it from the number running now, so
    /// that the next [`peak`](KneeServer::peak) is the most served at once
    /// from this moment on.
    pub fn reset_peak(&self) -> usize {
        let mut gate = self.shared.gate();
        let peak = gate.peak;
        gate.peak = gate.running;
        peak
    }

    /// For tests: while held, an admitted request that has served its time
    /// keeps its place and does not answer until [`release`]. This makes
    /// "how many run at once" observable without racing a clock.
    ///
    /// [`release`]: KneeServer::release
    pub fn hold(&self) {
        self.shared.held.send_replace(true);
    }

    /// Ends a [`hold`](KneeServer::hold): held requests answer now.
    pub fn release(&self) {
        self.shared.held.send_replace(false);
    }

    /// Stops accepting connections, releases any hold, and waits until the
    /// requests in progress are answered and their connections closed.
    pub async fn shutdown(mut self) -> io::Result<()> {
        self.stop_accepting();
        match self.task.take() {
            Some(task) => task.await.map_err(io::Error::other)?,
            None => Ok(()),
        }
    }

    fn stop_accepting(&mut self) {
        self.release();
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

impl Drop for KneeServer {
    fn drop(&mut self) {
        self.stop_accepting();
    }
}

/// What the handle and the handlers share.
#[derive(Debug)]
struct Shared {
    gate: Mutex<Gate>,
    service_time: Duration,
    served: AtomicU64,
    held: watch::Sender<bool>,
}

/// Admission: at most `capacity` running, the rest queued in arrival order.
/// Invariant after every change: the queue is empty or `running >= capacity`.
#[derive(Debug)]
struct Gate {
    capacity: usize,
    running: usize,
    peak: usize,
    queue: VecDeque<oneshot::Sender<Permit>>,
}

impl Gate {
    fn take_place(&mut self) {
        self.running += 1;
        self.peak = self.peak.max(self.running);
    }
}

impl Shared {
    fn gate(&self) -> MutexGuard<'_, Gate> {
        self.gate.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Waits for a place; `None` only if the server state went away.
    async fn admit(self: &Arc<Self>) -> Option<Permit> {
        let admitted = {
            let mut gate = self.gate();
            if gate.running < gate.capacity && gate.queue.is_empty() {
                gate.take_place();
                return Some(Permit(Some(Arc::clone(self))));
            }
            let (waiter, admitted) = oneshot::channel();
            gate.queue.push_back(waiter);
            admitted
        };
        // Dropping this future (client gone) drops the receiver: a permit
        // sent meanwhile is dropped with it and frees its place.
        admitted.await.ok()
    }

    /// Gives free places to queued requests, first come first served,
    /// skipping those whose client went away.
    fn admit_waiting(self: &Arc<Self>, gate: &mut Gate) {
        while gate.running < gate.capacity {
            let Some(waiter) = gate.queue.pop_front() else {
                break;
            };
            gate.take_place();
            if let Err(mut permit) = waiter.send(Permit(Some(Arc::clone(self)))) {
                // Nobody waits: undo, without the permit's drop taking the
                // lock we hold.
                permit.0 = None;
                gate.running -= 1;
            }
        }
    }

    fn leave(self: &Arc<Self>) {
        let mut gate = self.gate();
        gate.running -= 1;
        self.admit_waiting(&mut gate);
    }
}

/// A place among the `capacity` running requests, freed on drop.
#[derive(Debug)]
struct Permit(Option<Arc<Shared>>);

impl Drop for Permit {
    fn drop(&mut self) {
        if let Some(shared) = self.0.take() {
            shared.leave();
        }
    }
}

/// Every request: wait for a place, hold it for the service time (and any
/// [`hold`](KneeServer::hold)), answer.
async fn serve_one(State(shared): State<Arc<Shared>>) -> Result<&'static str, StatusCode> {
    let _place = shared
        .admit()
        .await
        .ok_or(StatusCode::SERVICE_UNAVAILABLE)?;
    tokio::time::sleep(shared.service_time).await;
    let mut held = shared.held.subscribe();
    // The sender lives in `shared`, which we hold: this cannot fail.
    let _ = held.wait_for(|held| !held).await;
    shared.served.fetch_add(1, Ordering::Relaxed);
    Ok("ok\n")
}
