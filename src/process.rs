//! Mapper work in a child process, for work that can crash the process:
//! native code, untrusted input, external tools.
//!
//! Needs the cargo feature `process` (off by default; it turns on tokio's
//! `process` and `io-util`): `par-imap = { version = "0.1", features =
//! ["process"] }`.
//!
//! Threads cannot be killed one by one; processes can. Run each call as a
//! child with [`output`] inside
//! [`try_par_imap_async`](crate::ParImapExt::try_par_imap_async), and a
//! child killed by a signal becomes an error at its item's index, a hung one
//! is killed at its [`timeout`](crate::ParImap::timeout), and dropping the
//! stream kills every child still running, with its whole process group:
//! no hang, no orphan, not even a shell's grandchild.
//!
//! ```
//! # #[cfg(unix)] {
//! use futures::StreamExt;
//! use par_imap::{ParImapExt, process};
//! use tokio::process::Command;
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! let results: Vec<_> = futures::stream::iter(["3", "kill", "4"])
//!     .try_par_imap_async(2, |arg: &str| {
//!         let mut command = Command::new("sh");
//!         command.arg("-c").arg(r#"[ "$1" = kill ] && kill -TERM $$; echo $(($1 * $1))"#).arg("sh").arg(arg);
//!         process::output(command, Vec::new())
//!     })
//!     .collect()
//!     .await;
//! assert_eq!(results[0].as_ref().unwrap(), b"9\n");
//! assert_eq!(results[1].as_ref().unwrap_err().signal(), Some(15));
//! assert_eq!(results.len(), 2);
//! # }
//! # }
//! ```

use std::fmt;
use std::io;
use std::panic::{self, AssertUnwindSafe};
use std::process::{ExitStatus, Stdio};

#[cfg(unix)]
use rustix::process::{Pid, Signal, kill_process_group};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::process::{Child, Command};

/// Why a child process did not produce its output.
///
/// More reasons may be added: match with a `_` arm.
#[derive(Debug)]
#[non_exhaustive]
pub enum ProcessError {
    /// The command could not be started, or its pipes failed.
    Io(io::Error),
    /// The child was killed by a signal (Unix): its number is
    /// [`signal`](ProcessError::signal).
    Killed {
        /// The signal's number, e.g. 15 for `SIGTERM`, 9 for `SIGKILL`.
        signal: i32,
        /// What the child wrote to stderr before it died.
        stderr: Vec<u8>,
    },
    /// The child exited with a non-zero status.
    Exited {
        /// The exit code.
        code: i32,
        /// What the child wrote to stderr.
        stderr: Vec<u8>,
    },
    /// The map failed the item: a timeout (the child was killed), a
    /// cancellation, or a panic in the mapper.
    Map(crate::Error),
}

impl ProcessError {
    /// The signal that killed the child, if one did.
    ///
    /// ```
    /// use par_imap::process::ProcessError;
    /// let killed = ProcessError::Killed { signal: 9, stderr: Vec::new() };
    /// assert_eq!(killed.signal(), Some(9));
    /// assert_eq!(killed.to_string(), "child killed by signal 9 (SIGKILL)");
    /// ```
    pub fn signal(&self) -> Option<i32> {
        match self {
            ProcessError::Killed { signal, .. } => Some(*signal),
            _ => None,
        }
    }

    /// Whether the map timed the item out (and so killed its child).
    ///
    /// ```
    /// use par_imap::process::ProcessError;
    /// assert!(!ProcessError::Exited { code: 1, stderr: Vec::new() }.is_timeout());
    /// ```
    pub fn is_timeout(&self) -> bool {
        matches!(self, ProcessError::Map(error) if error.is_timeout())
    }

    fn from_status(status: ExitStatus, stderr: Vec<u8>) -> Self {
        #[cfg(unix)]
        {
            use std::os::unix::process::ExitStatusExt;
            if let Some(signal) = status.signal() {
                return ProcessError::Killed { signal, stderr };
            }
        }
        ProcessError::Exited {
            // No code and no signal cannot happen on Unix; elsewhere it
            // means the platform gave none.
            code: status.code().unwrap_or(-1),
            stderr,
        }
    }
}

/// The usual name of a signal, for messages.
fn signal_name(signal: i32) -> Option<&'static str> {
    Some(match signal {
        1 => "SIGHUP",
        2 => "SIGINT",
        3 => "SIGQUIT",
        4 => "SIGILL",
        6 => "SIGABRT",
        7 => "SIGBUS",
        8 => "SIGFPE",
        9 => "SIGKILL",
        11 => "SIGSEGV",
        13 => "SIGPIPE",
        14 => "SIGALRM",
        15 => "SIGTERM",
        _ => return None,
    })
}

impl fmt::Display for ProcessError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ProcessError::Io(error) => write!(f, "child process i/o failed: {error}"),
            ProcessError::Killed { signal, .. } => match signal_name(*signal) {
                Some(name) => write!(f, "child killed by signal {signal} ({name})"),
                None => write!(f, "child killed by signal {signal}"),
            },
            ProcessError::Exited { code, .. } => write!(f, "child exited with status {code}"),
            ProcessError::Map(error) => error.fmt(f),
        }
    }
}

impl std::error::Error for ProcessError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            ProcessError::Io(error) => Some(error),
            ProcessError::Map(error) => Some(error),
            _ => None,
        }
    }
}

impl From<crate::Error> for ProcessError {
    fn from(error: crate::Error) -> Self {
        ProcessError::Map(error)
    }
}

impl From<io::Error> for ProcessError {
    fn from(error: io::Error) -> Self {
        ProcessError::Io(error)
    }
}

/// Runs `command` with `stdin` as its standard input and returns its
/// standard output, like a shell pipe: the input is written while the output
/// is read, so a child that writes before it has read everything cannot
/// deadlock.
///
/// On Unix the child runs in a process group of its own, and dropping the
/// returned future before the child has ended kills **the whole group** with
/// `SIGKILL`: when the map aborts the call (fail-fast,
/// [`timeout`](crate::ParImap::timeout), the stream dropped), a shell's
/// grandchildren die with the shell. A task spawned on the current runtime
/// waits for the killed child, so none is left running or as a zombie
/// (dropped outside a runtime, the child is reaped by tokio at a later
/// `SIGCHLD`). Being in its own group, the child does not get the terminal's
/// Ctrl-C: the map's cancellation is what stops it. Elsewhere only the child
/// itself is killed.
///
/// The group is signalled with one `kill(2)` system call (through
/// [`rustix`](https://docs.rs/rustix), as the crate forbids `unsafe`); the
/// drop returns at once, without waiting for any process to exit.
///
/// # Errors
///
/// [`ProcessError::Killed`] if a signal killed the child,
/// [`ProcessError::Exited`] for a non-zero exit status,
/// [`ProcessError::Io`] if it could not be started or its pipes failed. A
/// child that closes its stdin early is not an error: it did not want the
/// rest.
///
/// # Examples
///
/// ```
/// # #[cfg(unix)] {
/// use tokio::process::Command;
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), par_imap::process::ProcessError> {
/// let mut tr = Command::new("tr");
/// tr.arg("a-z").arg("A-Z");
/// assert_eq!(par_imap::process::output(tr, b"shout".to_vec()).await?, b"SHOUT");
/// # Ok(())
/// # }
/// # }
/// ```
pub async fn output(mut command: Command, stdin: Vec<u8>) -> Result<Vec<u8>, ProcessError> {
    command
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        // Only where `Running` cannot reap the child itself (no runtime).
        .kill_on_drop(true);
    #[cfg(unix)]
    command.process_group(0);
    let mut child = command.spawn()?;
    let mut pipe = child.stdin.take();
    let stdout = child.stdout.take();
    let stderr = child.stderr.take();
    let mut child = Running::new(child);
    let feed = async move {
        if let Some(pipe) = &mut pipe {
            match pipe.write_all(&stdin).await {
                // The child stopped reading: it has what it wanted.
                Err(error) if error.kind() == io::ErrorKind::BrokenPipe => {}
                other => other?,
            }
        }
        // Dropping the pipe closes it: end of input for the child.
        drop(pipe);
        Ok::<_, io::Error>(())
    };
    // What `Child::wait_with_output` does, with the child left in `child`.
    let output = futures::future::try_join3(child.wait(), read_all(stdout), read_all(stderr));
    let (fed, output) = futures::future::join(feed, output).await;
    let (status, stdout, stderr) = output?;
    child.finished();
    if !status.success() {
        return Err(ProcessError::from_status(status, stderr));
    }
    fed?;
    Ok(stdout)
}

/// Everything `pipe` yields until its end.
async fn read_all(pipe: Option<impl AsyncRead + Unpin>) -> io::Result<Vec<u8>> {
    let mut read = Vec::new();
    if let Some(mut pipe) = pipe {
        pipe.read_to_end(&mut read).await?;
    }
    Ok(read)
}

/// A call's child until its output is complete. Dropped before that, it
/// kills the child's process group (Unix), then the child, and has the child
/// reaped at once.
///
/// tokio alone (`kill_on_drop`) queues a dropped child that has not exited
/// yet for reaping at the next `SIGCHLD`; when the child's own `SIGCHLD` is
/// handled before it is queued, it stays a zombie until some other child
/// exits. A task that waits for it has no such race.
struct Running {
    /// `None` only once dropped.
    child: Option<Child>,
    /// The child's pid, its group's id; `None` once the output is complete.
    #[cfg_attr(not(unix), allow(dead_code))]
    group: Option<u32>,
}

impl Running {
    fn new(child: Child) -> Self {
        Running {
            group: child.id(),
            child: Some(child),
        }
    }

    async fn wait(&mut self) -> io::Result<ExitStatus> {
        self.child
            .as_mut()
            .expect("only drop takes the child")
            .wait()
            .await
    }

    /// The output is complete: nothing to kill, the child has been reaped.
    fn finished(mut self) {
        self.group = None;
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        #[cfg(unix)]
        if let Some(group) = self.group.take() {
            // One `kill(-PGID, SIGKILL)`: every process of the group. The
            // result is ignored: a group already gone is what we want. The
            // group's id is not reused while the group has a process, nor
            // while its leader, the child, is not reaped (it is reaped below,
            // after this). The grandchildren's new parent reaps them.
            if let Some(group) = i32::try_from(group).ok().and_then(Pid::from_raw) {
                let _ = kill_process_group(group, Signal::KILL);
            }
        }
        let Some(mut child) = self.child.take() else {
            return;
        };
        // `id()` is `None` once the child has been waited for: never twice.
        if child.id().is_none() {
            return;
        }
        let _ = child.start_kill();
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            // Should the spawn panic, the child is dropped with the task and
            // tokio's `kill_on_drop` takes over; the panic must not unwind
            // out of a drop.
            let _ = panic::catch_unwind(AssertUnwindSafe(|| {
                runtime.spawn(async move {
                    let _ = child.wait().await;
                })
            }));
        }
        // Without a runtime, `child` is dropped here: tokio's `kill_on_drop`
        // reaps it if it has exited, else at a later `SIGCHLD`.
    }
}
