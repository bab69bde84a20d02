//! Helpers shared by the integration tests: gates that decide completion
//! order, counters of running calls, and values that count their drops.
//! (`variants.rs`, the property models' map builder, is a module of its
//! own: it needs proptest, which services' tests, that include this one,
//! do not have.)
#![allow(dead_code, unreachable_pub)]

use std::collections::HashSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

/// Long enough that a loaded machine never hits it; a test that does has
/// hung. `PAR_IMAP_TEST_HANG_SECS` shortens it for mutation testing, where
/// most runs are expected to fail.
pub fn hang() -> Duration {
    let secs = std::env::var("PAR_IMAP_TEST_HANG_SECS")
        .ok()
        .and_then(|secs| secs.parse().ok());
    Duration::from_secs(secs.unwrap_or(20))
}

/// Gates that blocking calls wait on, opened by the test in the order it wants.
#[derive(Clone, Default)]
pub struct Gates {
    inner: Arc<(Mutex<HashSet<usize>>, Condvar)>,
}

impl Gates {
    pub fn open(&self, index: usize) {
        self.inner.0.lock().unwrap().insert(index);
        self.inner.1.notify_all();
    }

    /// Blocks until gate `index` is open; panics if that takes a hang's time.
    pub fn wait(&self, index: usize) {
        let (open, changed) = &*self.inner;
        let deadline = Instant::now() + hang();
        let mut open = open.lock().unwrap();
        while !open.contains(&index) {
            let left = deadline
                .checked_duration_since(Instant::now())
                .unwrap_or_else(|| panic!("gate {index} never opened"));
            open = changed.wait_timeout(open, left).unwrap().0;
        }
    }
}

/// Opens one gate when dropped, so that a failing test never leaves a
/// blocking worker hung (the runtime's shutdown would wait for it).
pub struct OpenOnDrop(pub Gates, pub usize);

impl Drop for OpenOnDrop {
    fn drop(&mut self) {
        self.0.open(self.1);
    }
}

/// Counts calls started, calls running now, and the most ever running.
#[derive(Clone, Default)]
pub struct Calls {
    started: Arc<AtomicUsize>,
    running: Arc<AtomicUsize>,
    peak: Arc<AtomicUsize>,
    started_indices: Arc<Mutex<Vec<usize>>>,
}

impl Calls {
    /// Marks a call as running until the guard drops.
    pub fn enter(&self, index: usize) -> Running {
        self.started.fetch_add(1, Ordering::SeqCst);
        self.started_indices.lock().unwrap().push(index);
        let now = self.running.fetch_add(1, Ordering::SeqCst) + 1;
        self.peak.fetch_max(now, Ordering::SeqCst);
        Running(self.running.clone())
    }

    pub fn started(&self) -> usize {
        self.started.load(Ordering::SeqCst)
    }

    pub fn running(&self) -> usize {
        self.running.load(Ordering::SeqCst)
    }

    pub fn peak(&self) -> usize {
        self.peak.load(Ordering::SeqCst)
    }

    pub fn started_indices(&self) -> Vec<usize> {
        let mut indices = self.started_indices.lock().unwrap().clone();
        indices.sort_unstable();
        indices
    }
}

pub struct Running(Arc<AtomicUsize>);

impl Drop for Running {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Values that count how many of them are alive.
#[derive(Clone, Default)]
pub struct Tracker {
    alive: Arc<AtomicUsize>,
    created: Arc<AtomicUsize>,
}

impl Tracker {
    pub fn track(&self, value: usize) -> Tracked {
        self.alive.fetch_add(1, Ordering::SeqCst);
        self.created.fetch_add(1, Ordering::SeqCst);
        Tracked {
            value,
            alive: self.alive.clone(),
        }
    }

    pub fn alive(&self) -> usize {
        self.alive.load(Ordering::SeqCst)
    }

    pub fn created(&self) -> usize {
        self.created.load(Ordering::SeqCst)
    }

    /// Waits (bounded) until every tracked value has been dropped: blocking
    /// calls that outlive the stream drop their output when they end.
    pub fn wait_all_dropped(&self) {
        let deadline = Instant::now() + hang();
        while self.alive() > 0 {
            assert!(
                Instant::now() < deadline,
                "{} of {} tracked values never dropped",
                self.alive(),
                self.created()
            );
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}

#[derive(Debug)]
pub struct Tracked {
    pub value: usize,
    alive: Arc<AtomicUsize>,
}

impl Drop for Tracked {
    fn drop(&mut self) {
        self.alive.fetch_sub(1, Ordering::SeqCst);
    }
}

/// The binary of example `name` of the package under test, built now by
/// `cargo build --example name`, in this test's own target directory and
/// profile, with the package's default features off and `features` on.
///
/// So `cargo test --test X` on a fresh clone builds what it runs, a stale
/// binary is never run, and an example that does not build fails its test
/// with cargo's message. Cargo holds no lock on the target directory while
/// tests run, so the nested build only waits for other builds; it reuses
/// every artifact the test build made. Built once per test binary.
pub fn example_binary(name: &str, features: &[&str]) -> std::path::PathBuf {
    use std::path::{Path, PathBuf};
    use std::process::Command;

    static BUILT: Mutex<Vec<(String, PathBuf)>> = Mutex::new(Vec::new());
    let mut built = BUILT
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    if let Some((_, binary)) = built.iter().find(|(built, _)| built == name) {
        return binary.clone();
    }

    // This test runs as <target>[/<triple>]/<profile>/deps/<test>.
    let test = std::env::current_exe().expect("own path");
    let profile_dir = test
        .parent()
        .and_then(Path::parent)
        .expect("<target>/<profile>/deps/<test>");
    let profile = match profile_dir.file_name().and_then(|name| name.to_str()) {
        Some("debug") => "dev",
        Some(profile) => profile,
        None => panic!("no profile in {}", test.display()),
    };
    let mut target_dir = profile_dir.parent().expect("<target>");
    let mut cargo = Command::new(env!("CARGO"));
    cargo.args(["build", "--message-format=short", "--example", name]);
    // Cargo marks the root of a target directory; without it here, this is
    // <target>/<triple> of a cross build.
    if !target_dir.join("CACHEDIR.TAG").exists() {
        let triple = target_dir.file_name().expect("a target triple");
        cargo.arg("--target").arg(triple);
        target_dir = target_dir.parent().expect("<target>");
    }
    cargo
        .args(["--profile", profile, "--no-default-features"])
        .arg("--features")
        .arg(features.join(","))
        .arg("--manifest-path")
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/Cargo.toml"))
        .arg("--target-dir")
        .arg(target_dir);
    let build = cargo.output().expect("cargo runs");
    assert!(
        build.status.success(),
        "example {name} does not build:\n{}",
        String::from_utf8_lossy(&build.stderr)
    );
    let binary = profile_dir
        .join("examples")
        .join(format!("{name}{}", std::env::consts::EXE_SUFFIX));
    assert!(binary.exists(), "cargo built no {}", binary.display());
    built.push((name.to_owned(), binary.clone()));
    binary
}

/// Waits (bounded, real time) until `condition` holds.
pub fn eventually(what: &str, condition: impl Fn() -> bool) {
    let deadline = Instant::now() + hang();
    while !condition() {
        assert!(Instant::now() < deadline, "never happened: {what}");
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// Async version of [`eventually`], yielding to the runtime while it waits.
pub async fn eventually_async(what: &str, condition: impl Fn() -> bool) {
    let deadline = Instant::now() + hang();
    while !condition() {
        assert!(Instant::now() < deadline, "never happened: {what}");
        tokio::task::yield_now().await;
        std::thread::sleep(Duration::from_micros(200));
    }
}
