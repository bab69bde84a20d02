//! Mapper work in child processes that can be killed: an error at its index,
//! no hang, no orphan, no zombie.
#![cfg(unix)]
mod common;

use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use common::{Calls, eventually, eventually_async};
use futures::{Stream, StreamExt, TryStreamExt, stream};
use par_imap::ParImapExt;
use par_imap::process::{self, ProcessError};
use tokio::process::Command;

/// A duration of about ten minutes unique to this call: as the argument of
/// `sleep`, it marks that process among every process on the machine.
fn marker() -> String {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let unique = NEXT.fetch_add(1, Ordering::SeqCst);
    format!("600.{}{unique:04}", std::process::id())
}

fn sleep(marker: &str) -> Command {
    let mut sleep = Command::new("sleep");
    sleep.arg(marker);
    sleep
}

/// Processes whose command line contains `marker`.
fn running_with(marker: &str) -> usize {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return 0;
    };
    entries
        .filter_map(Result::ok)
        .filter(|entry| {
            entry
                .file_name()
                .to_string_lossy()
                .bytes()
                .all(|b| b.is_ascii_digit())
        })
        .filter_map(|entry| std::fs::read(entry.path().join("cmdline")).ok())
        .filter(|cmdline| String::from_utf8_lossy(cmdline).contains(marker))
        .count()
}

/// Zombie children of this process.
fn zombies() -> usize {
    let me = std::process::id().to_string();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return 0;
    };
    entries
        .filter_map(Result::ok)
        .filter_map(|entry| std::fs::read_to_string(entry.path().join("stat")).ok())
        .filter(|stat| {
            // "pid (comm) state ppid ...": comm may hold spaces, so split
            // after its closing parenthesis.
            let after = stat.rsplit_once(") ").map_or("", |(_, rest)| rest);
            let mut fields = after.split_whitespace();
            fields.next() == Some("Z") && fields.next() == Some(me.as_str())
        })
        .count()
}

fn shell(script: &str) -> Command {
    let mut command = Command::new("sh");
    command.arg("-c").arg(script);
    command
}

async fn killed_by_own_signal_is_an_error_at_its_index(signal: &str, number: i32) {
    let calls = Calls::default();
    let count = calls.clone();
    let script = format!("kill -{signal} $$");
    let out: Vec<Result<Vec<u8>, ProcessError>> = stream::iter(0..20_usize)
        .try_par_imap_async(1, move |n| {
            let _started = count.enter(n);
            let command = if n == 5 { shell(&script) } else { shell("cat") };
            process::output(command, n.to_string().into_bytes())
        })
        .timeout(Duration::from_secs(30))
        .collect()
        .await;
    assert_eq!(out.len(), 6, "items 0..5, then the failure, then the end");
    for (n, result) in out[..5].iter().enumerate() {
        assert_eq!(result.as_ref().unwrap(), n.to_string().as_bytes());
    }
    let error = out[5].as_ref().unwrap_err();
    assert_eq!(error.signal(), Some(number));
    assert!(
        error
            .to_string()
            .contains(&format!("signal {number} (SIG{signal})")),
        "{error}"
    );
    assert_eq!(
        calls.started_indices(),
        [0, 1, 2, 3, 4, 5],
        "nothing starts after it"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn child_killed_by_sigterm_is_an_error_at_its_index() {
    killed_by_own_signal_is_an_error_at_its_index("TERM", 15).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn child_killed_by_sigkill_is_an_error_at_its_index() {
    killed_by_own_signal_is_an_error_at_its_index("KILL", 9).await;
}

/// Runs `command()` as the one call of a map with a 300 ms timeout, and
/// checks that the call times out. Returns the map, ended, not dropped.
async fn timed_out(command: impl Fn() -> Command + Send + Sync + 'static) -> impl Stream {
    let mut results = stream::iter([0])
        .try_par_imap_async(1, move |_: i32| process::output(command(), Vec::new()))
        .timeout(Duration::from_millis(300));
    let error = tokio::time::timeout(Duration::from_secs(20), results.next())
        .await
        .expect("the timeout fires")
        .unwrap()
        .unwrap_err();
    assert!(error.is_timeout(), "{error}");
    results
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hanging_child_is_killed_at_its_timeout() {
    let hung = marker();
    let name = hung.clone();
    let _results = timed_out(move || sleep(&name)).await;
    eventually("the hung child to be killed", || running_with(&hung) == 0);
}

/// Issue 11, point 10: a shell's own child (`sleep`, not the last command,
/// so the shell forks it instead of exec'ing it) dies with the shell when
/// the call times out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timeout_kills_the_childs_whole_process_group() {
    let grandchild = marker();
    let script = format!("sleep {grandchild}; echo never");
    let results = timed_out(move || shell(&script)).await;
    drop(results);
    eventually("the shell's grandchild to be killed", || {
        running_with(&grandchild) == 0
    });
}

/// The same through a dropped stream: a background grandchild that keeps the
/// output pipe open dies with its group.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_the_stream_kills_the_childs_whole_process_group() {
    let grandchild = marker();
    let script = format!("sleep {grandchild} & echo started; wait");
    let mut results = stream::iter([0])
        .try_par_imap_async(1, move |_: i32| process::output(shell(&script), Vec::new()));
    let pending = tokio::time::timeout(Duration::from_millis(1), results.next()).await;
    assert!(pending.is_err(), "the shell waits for its grandchild");
    eventually("the grandchild to start", || running_with(&grandchild) > 0);
    drop(results);
    eventually("the shell's grandchild to be killed", || {
        running_with(&grandchild) == 0
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_the_stream_after_three_items_leaves_no_child_running() {
    let markers: Vec<String> = (0..10).map(|_| marker()).collect();
    let names = markers.clone();
    let first: Vec<Vec<u8>> = stream::iter(0..10_usize)
        .try_par_imap_async(4, move |n| {
            let command = if n < 3 {
                shell("echo quick")
            } else {
                sleep(&names[n])
            };
            process::output(command, Vec::new())
        })
        .take(3)
        .try_collect()
        .await
        .unwrap();
    assert_eq!(
        first,
        [
            b"quick\n".to_vec(),
            b"quick\n".to_vec(),
            b"quick\n".to_vec()
        ]
    );
    for marker in &markers {
        eventually("every child to be killed", || running_with(marker) == 0);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_short_children_through_limit_eight_leave_no_zombie() {
    let outputs: Vec<Vec<u8>> = stream::iter(0..1000_u32)
        .try_par_imap_async(8, |n| {
            process::output(shell("cat"), n.to_string().into_bytes())
        })
        .try_collect()
        .await
        .unwrap();
    assert_eq!(outputs.len(), 1000);
    assert_eq!(outputs[999], b"999");
    eventually("no zombie child left", || zombies() == 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_child_that_exits_non_zero_is_an_error_with_its_code_and_stderr() {
    let error = process::output(shell("echo oops >&2; exit 3"), Vec::new())
        .await
        .unwrap_err();
    match &error {
        ProcessError::Exited { code, stderr } => {
            assert_eq!((*code, stderr.as_slice()), (3, &b"oops\n"[..]))
        }
        other => panic!("not an exit error: {other:?}"),
    }
    assert_eq!(error.to_string(), "child exited with status 3");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_input_and_output_do_not_deadlock() {
    // 4 MiB each way: far beyond a pipe's buffer, so the input must be
    // written while the output is read.
    let input = vec![b'x'; 4 << 20];
    let output = tokio::time::timeout(
        Duration::from_secs(30),
        process::output(shell("cat"), input.clone()),
    )
    .await
    .expect("no deadlock")
    .unwrap();
    assert_eq!(output, input);
}

#[test]
fn process_errors_name_the_usual_signals_and_chain_their_sources() {
    let names = [
        (1, "SIGHUP"),
        (2, "SIGINT"),
        (3, "SIGQUIT"),
        (4, "SIGILL"),
        (6, "SIGABRT"),
        (7, "SIGBUS"),
        (8, "SIGFPE"),
        (9, "SIGKILL"),
        (11, "SIGSEGV"),
        (13, "SIGPIPE"),
        (14, "SIGALRM"),
        (15, "SIGTERM"),
    ];
    for (signal, name) in names {
        let killed = ProcessError::Killed {
            signal,
            stderr: Vec::new(),
        };
        assert_eq!(
            killed.to_string(),
            format!("child killed by signal {signal} ({name})")
        );
        assert_eq!(killed.signal(), Some(signal));
        assert!(!killed.is_timeout());
    }
    let unnamed = ProcessError::Killed {
        signal: 10,
        stderr: Vec::new(),
    };
    assert_eq!(unnamed.to_string(), "child killed by signal 10");

    use std::error::Error as _;
    let io = ProcessError::from(std::io::Error::other("pipe burst"));
    assert_eq!(io.source().unwrap().to_string(), "pipe burst");
    assert_eq!(io.signal(), None);
    let exited = ProcessError::Exited {
        code: 2,
        stderr: Vec::new(),
    };
    assert!(exited.source().is_none() && exited.signal().is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_timed_out_child_is_a_map_error_with_its_source() {
    let mut results = stream::iter([0])
        .try_par_imap_async(1, |_: i32| process::output(sleep(&marker()), Vec::new()))
        .timeout(Duration::from_millis(100));
    let error = results.next().await.unwrap().unwrap_err();
    assert!(error.is_timeout() && error.signal().is_none());
    use std::error::Error as _;
    let source = error.source().expect("the map's error");
    assert!(
        source
            .downcast_ref::<par_imap::Error>()
            .is_some_and(par_imap::Error::is_timeout)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_child_that_does_not_read_its_input_is_not_an_error() {
    // It exits at once; writing 4 MiB to it breaks the pipe. It did not
    // want the input: its (empty) output is the result.
    let output = process::output(shell("exit 0"), vec![b'x'; 4 << 20])
        .await
        .unwrap();
    assert!(output.is_empty());
}

/// Whether process `pid` still exists in any state, a zombie included
/// (a reaped process has no `/proc` entry).
fn exists(pid: u32) -> bool {
    std::path::Path::new(&format!("/proc/{pid}")).exists()
}

/// Dropping a map with 32 children running, each a shell with a background
/// grandchild, leaves none of the 64 processes behind, not even as a zombie:
/// each group gets its `SIGKILL`, tokio reaps the shells, and the
/// grandchildren's new parent reaps them. The wait is bounded; no duration is
/// asserted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_a_map_of_32_children_leaves_no_child_grandchild_or_zombie() {
    const CHILDREN: usize = 32;
    let dir = tempfile::tempdir().unwrap();
    let pid_files: Vec<_> = (0..CHILDREN)
        .map(|n| dir.path().join(format!("{n}.pids")))
        .collect();
    let files = pid_files.clone();
    let mut results = stream::iter(0..CHILDREN).try_par_imap_async(CHILDREN, move |n| {
        // The shell ($$) starts a sleep in the background ($!), records both
        // pids (written to a side file, then renamed: never read half-done)
        // and waits for the sleep.
        let mut command = shell(r#"sleep 1000 & echo "$$ $!" >"$1.tmp" && mv "$1.tmp" "$1"; wait"#);
        command.arg("sh").arg(&files[n]);
        process::output(command, Vec::new())
    });
    let pending = tokio::time::timeout(Duration::from_millis(1), results.next()).await;
    assert!(pending.is_err(), "every shell waits for its sleep");
    let mut pids = Vec::new();
    for file in &pid_files {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        let recorded = loop {
            if let Ok(text) = std::fs::read_to_string(file) {
                break text;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "a child never started"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        };
        pids.extend(
            recorded
                .split_whitespace()
                .map(|pid| pid.parse::<u32>().unwrap()),
        );
    }
    assert_eq!(pids.len(), 2 * CHILDREN);
    assert!(
        pids.iter().all(|&pid| exists(pid)),
        "all 64 run before the drop"
    );

    drop(results);

    // Polled from a task, so that the runtime keeps reaping meanwhile.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let left: Vec<u32> = pids.iter().copied().filter(|&pid| exists(pid)).collect();
        if left.is_empty() && zombies() == 0 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "10 s after the drop these still exist: {left:?}, and {} zombie children",
            zombies()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Regression: tokio alone queues a dropped child that has not exited yet
/// for reaping at the next `SIGCHLD`, and a child whose own `SIGCHLD` was
/// handled before it was queued stayed a zombie until some other child
/// exited. Round after round, a map is dropped with its children just
/// started, and no child of the next round starts (its exit would reap a
/// stuck zombie) before every child of this one is gone, zombies included.
/// The waits are bounded; no duration is asserted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_map_after_map_of_running_children_leaves_no_zombie() {
    const ROUNDS: usize = 300;
    const CHILDREN: usize = 2;
    for round in 0..ROUNDS {
        let running = marker();
        let name = running.clone();
        let mut results = stream::iter(0..CHILDREN)
            .try_par_imap_async(CHILDREN, move |_| process::output(sleep(&name), Vec::new()));
        let pending = tokio::time::timeout(Duration::from_millis(1), results.next()).await;
        assert!(pending.is_err(), "round {round}: every child sleeps");
        eventually_async("every child to start", || {
            running_with(&running) == CHILDREN
        })
        .await;
        drop(results);
        eventually_async("every child to be killed and reaped", || {
            running_with(&running) == 0 && zombies() == 0
        })
        .await;
    }
}
