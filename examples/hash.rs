//! A parallel file hasher: `sha256sum` for whole directory trees, on all
//! cores, with a progress bar.
//!
//! ```text
//! cargo run --release --example hash -- [-j N] [PATH]...
//! ```
//!
//! It behaves like the tool it replaces. A directory argument stands for
//! every regular file under it (symlinks not followed, FIFOs and sockets
//! skipped, as `find DIR -type f`), in the byte order of their whole paths,
//! so `hash DIR` prints exactly what
//! `find DIR -type f -print0 | LC_ALL=C sort -z | xargs -0 sha256sum` prints.
//! Unlike that pipeline it streams: the walk is the map's lazy input, each
//! directory read and sorted when the walk reaches it, so the first line
//! comes out after a few `readdir`s rather than after a walk of the whole
//! tree. Any other argument is hashed as `sha256sum ARG` hashes it: a file,
//! a symlink to one, `-` for standard input; a symlink to a directory is
//! not walked and is reported as `sha256sum` reports it (`--help` says how
//! that differs from the pipeline). Arguments come out in the order given.
//! A path that cannot be hashed (missing, unreadable, a dangling symlink or
//! a loop) is reported on stderr at its place, the rest is still printed,
//! and the exit status is then 1. Ctrl-C stops it within a read of 64 KiB,
//! even in the middle of a huge file, and at once while it waits on
//! standard input: exit status 130. `-j N` hashes N files at once (default:
//! the number of cores). With no argument it hashes this crate's own tree
//! (without `target/` and hidden directories). The progress bar on stderr
//! is hidden when stderr is not a terminal.

use std::borrow::Cow;
use std::ffi::OsString;
use std::fs::File;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::time::Duration;

use futures::{FutureExt, StreamExt};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use par_imap::ParImapExt;
use sha2::{Digest, Sha256};
use tokio_util::sync::CancellationToken;

const USAGE: &str = "\
Usage: hash [OPTION]... [PATH]...
Print the SHA-256 of each file, like sha256sum, hashing on all cores.

A directory stands for every regular file under it: `hash DIR` prints what
  find DIR -type f -print0 | LC_ALL=C sort -z | xargs -0 sha256sum
prints, in the same byte order of whole paths, but streams: each directory
is read and sorted when the walk reaches it, so the first line comes out as
soon as the first file is hashed. Any other PATH is hashed as
`sha256sum PATH` hashes it. That is where hash differs from the pipeline,
whose `find PATH -type f` prints nothing for these:
  a symlink to a file       is followed and hashed;
  a symlink to a directory  is not walked but reported, as sha256sum does
                            (PATH: Is a directory), exit status 1;
                            name it PATH/ to walk it;
  -                         is standard input, printed as `-` (find
                            would look for a file named `-`).
With no PATH, hash this crate's source tree (without `target/` and hidden
directories).

  -j, --jobs N  hash N files at once (default: the number of cores)
  -h, --help    print this help and exit

Exit status: 0 if every file was hashed, 1 if any could not be, 130 on Ctrl-C.
";

/// What the command line asks for.
#[derive(Debug, PartialEq)]
enum Command {
    Help,
    Hash {
        paths: Vec<PathBuf>,
        /// The most files hashed at once.
        jobs: usize,
        /// Print the paths the walk finds, one a line, and hash nothing
        /// (hidden: to time the walk alone).
        walk_only: bool,
    },
}

/// `-j`'s value: a whole number of at least 1.
fn jobs(value: Option<OsString>) -> Result<usize, String> {
    let value = value.ok_or("option requires an argument -- 'j'")?;
    match value.to_str().and_then(|text| text.parse().ok()) {
        Some(jobs) if jobs > 0 => Ok(jobs),
        _ => Err(format!(
            "invalid number of jobs: '{}'",
            value.to_string_lossy()
        )),
    }
}

fn parse_args(mut args: impl Iterator<Item = OsString>) -> Result<Command, String> {
    let mut paths = Vec::new();
    let mut jobs_given = None;
    let mut walk_only = false;
    let mut options_done = false;
    while let Some(arg) = args.next() {
        if options_done {
            paths.push(PathBuf::from(arg));
            continue;
        }
        match arg.to_str() {
            Some("-h" | "--help") => return Ok(Command::Help),
            Some("--") => options_done = true,
            Some("-j" | "--jobs") => jobs_given = Some(jobs(args.next())?),
            Some("--walk-only") => walk_only = true,
            Some(option) if option.starts_with("--jobs=") => {
                jobs_given = Some(jobs(Some(option["--jobs=".len()..].into()))?);
            }
            Some(option) if option.starts_with("-j") => {
                jobs_given = Some(jobs(Some(option["-j".len()..].into()))?);
            }
            Some(option) if option.starts_with('-') && option != "-" => {
                return Err(format!("unrecognized option '{option}'"));
            }
            _ => paths.push(PathBuf::from(arg)),
        }
    }
    let jobs =
        jobs_given.unwrap_or_else(|| std::thread::available_parallelism().map_or(2, usize::from));
    Ok(Command::Hash {
        paths,
        jobs,
        walk_only,
    })
}

/// An I/O error as coreutils words it: the OS's message without Rust's
/// " (os error N)".
fn reason(error: &io::Error) -> String {
    let text = error.to_string();
    match text.rfind(" (os error ") {
        Some(at) if text.ends_with(')') => text[..at].to_owned(),
        _ => text,
    }
}

/// One input item of the map: a regular file found by the walk, an
/// argument handed to the hasher as given (a file, a symlink, a FIFO, a
/// path that does not exist: `sha256sum` decides), standard input (`-`,
/// with its turn among the `-` arguments), or a problem of the walk, which
/// is reported at its place in the output.
enum Job {
    File(PathBuf),
    Stdin(usize),
    Failed(PathBuf, io::Error),
}

/// An entry the walk has seen and not yet handed out.
enum Pending {
    File(PathBuf),
    Dir(PathBuf),
    Failed(PathBuf, io::Error),
}

/// The walk: each argument in turn, a directory expanded to its regular
/// files in byte order of their whole paths, lazily. A directory is read and
/// sorted only when the walk reaches it, so the first file comes out after a
/// few `readdir`s, not after a walk of the whole tree.
struct Walk {
    roots: std::vec::IntoIter<PathBuf>,
    /// Entries still to visit, the next one last.
    pending: Vec<Pending>,
    /// With no argument: leave out hidden directories and `target/`.
    skip_build_dirs: bool,
    /// `-` arguments met so far.
    stdin_turns: usize,
    /// Regular files and arguments handed out so far (for the progress bar).
    found: Arc<AtomicU64>,
}

impl Walk {
    fn new(roots: Vec<PathBuf>, skip_build_dirs: bool, found: Arc<AtomicU64>) -> Self {
        Self {
            roots: roots.into_iter(),
            pending: Vec::new(),
            skip_build_dirs,
            stdin_turns: 0,
            found,
        }
    }

    /// Reads one directory and queues its regular files and subdirectories,
    /// sorted by name with a `/` after a directory's name. Then the files
    /// come out in the byte order of their whole paths, as `LC_ALL=C sort`
    /// puts them: `-` (0x2d) < `.` (0x2e) < `/` (0x2f) < `0` (0x30), so
    /// `a-c` < `a.d/f` < `a/b` < `a0`.
    fn read_dir(&mut self, dir: &Path) {
        let entries = match std::fs::read_dir(dir) {
            Ok(entries) => entries,
            Err(error) => {
                self.pending.push(Pending::Failed(dir.to_owned(), error));
                return;
            }
        };
        let mut found = Vec::new();
        for entry in entries {
            let entry = match entry {
                Ok(entry) => entry,
                Err(error) => {
                    found.push((Vec::new(), Pending::Failed(dir.to_owned(), error)));
                    continue;
                }
            };
            let name = entry.file_name();
            let path = entry.path();
            // `file_type` does not follow symlinks (and needs no `stat` where
            // the file system reports types in the directory itself).
            let pending = match entry.file_type() {
                Ok(kind) if kind.is_file() => Pending::File(path),
                Ok(kind) if kind.is_dir() => {
                    let hidden = name.as_encoded_bytes().starts_with(b".") || name == "target";
                    if self.skip_build_dirs && hidden {
                        continue;
                    }
                    Pending::Dir(path)
                }
                // Symlinks, FIFOs, sockets, devices: not `-type f`.
                Ok(_) => continue,
                Err(error) => Pending::Failed(path, error),
            };
            let mut key = name.into_encoded_bytes();
            if matches!(pending, Pending::Dir(_)) {
                key.push(b'/');
            }
            found.push((key, pending));
        }
        // Largest first: the next entry is popped from the end.
        found.sort_unstable_by(|(a, _), (b, _)| b.cmp(a));
        self.pending
            .extend(found.into_iter().map(|(_, pending)| pending));
    }

    /// The next argument as a job, or `None` when it is a directory (now
    /// queued) or there is none left.
    fn next_root(&mut self) -> Option<Job> {
        let root = self.roots.next()?;
        if root.as_os_str() == "-" {
            self.stdin_turns += 1;
            return Some(Job::Stdin(self.stdin_turns - 1));
        }
        // `symlink_metadata`: a symlink to a directory is not walked (`find
        // LINK` does not follow it either); it goes to the hasher, which
        // reports it as `sha256sum LINK` does. `LINK/` is a directory, as
        // it is for `find`.
        if std::fs::symlink_metadata(&root).is_ok_and(|metadata| metadata.is_dir()) {
            self.pending.push(Pending::Dir(root));
            return None;
        }
        Some(Job::File(root))
    }
}

impl Iterator for Walk {
    type Item = Job;

    fn next(&mut self) -> Option<Job> {
        loop {
            let job = match self.pending.pop() {
                Some(Pending::File(path)) => Job::File(path),
                Some(Pending::Failed(path, error)) => Job::Failed(path, error),
                Some(Pending::Dir(dir)) => {
                    self.read_dir(&dir);
                    continue;
                }
                None if self.roots.len() == 0 => return None,
                None => match self.next_root() {
                    Some(job) => job,
                    None => continue,
                },
            };
            if !matches!(job, Job::Failed(..)) {
                self.found.fetch_add(1, Ordering::Relaxed);
            }
            return Some(job);
        }
    }
}

/// The SHA-256 of what `reader` holds, read through the worker's own
/// buffer. Stops between two reads once nobody will read the result
/// (Ctrl-C).
fn sha256(
    buffer: &mut [u8],
    mut reader: impl Read,
    progress: &ProgressBar,
) -> io::Result<[u8; 32]> {
    let mut hasher = Sha256::new();
    loop {
        if par_imap::is_cancelled() {
            return Err(io::Error::other("cancelled"));
        }
        match reader.read(buffer) {
            Ok(0) => break,
            Ok(read) => {
                hasher.update(&buffer[..read]);
                progress.inc(read as u64);
            }
            Err(error) if error.kind() == io::ErrorKind::Interrupted => {}
            Err(error) => return Err(error),
        }
    }
    Ok(hasher.finalize().into())
}

/// Whose turn it is to read standard input: each `-` argument reads it to
/// its end, in the order given, as `sha256sum - -` does (the second one
/// reads what is left: nothing, from a pipe or a file).
#[derive(Default)]
struct StdinTurns {
    next: Mutex<usize>,
    changed: Condvar,
}

impl StdinTurns {
    /// Hashes standard input once every earlier `-` has.
    fn sha256(
        &self,
        turn: usize,
        buffer: &mut [u8],
        progress: &ProgressBar,
    ) -> io::Result<[u8; 32]> {
        let mut next = self.next.lock().unwrap_or_else(PoisonError::into_inner);
        while *next != turn {
            if par_imap::is_cancelled() {
                return Err(io::Error::other("cancelled"));
            }
            let waited = self.changed.wait_timeout(next, Duration::from_millis(50));
            next = waited.unwrap_or_else(PoisonError::into_inner).0;
        }
        drop(next);
        let digest = sha256(buffer, io::stdin().lock(), progress);
        *self.next.lock().unwrap_or_else(PoisonError::into_inner) += 1;
        self.changed.notify_all();
        digest
    }
}

/// The path's bytes as the OS has them, as `sha256sum` prints them.
fn path_bytes(path: &Path) -> Cow<'_, [u8]> {
    #[cfg(unix)]
    {
        use std::os::unix::ffi::OsStrExt;
        Cow::Borrowed(path.as_os_str().as_bytes())
    }
    #[cfg(not(unix))]
    {
        Cow::Owned(path.to_string_lossy().into_owned().into_bytes())
    }
}

/// A `sha256sum` output line: a name holding `\`, a newline or a carriage
/// return is escaped, and the line then starts with `\`.
fn line(digest: &[u8; 32], path: &Path) -> Vec<u8> {
    let name = path_bytes(path);
    let escaped = name
        .iter()
        .any(|byte| matches!(byte, b'\\' | b'\n' | b'\r'));
    let mut line = Vec::with_capacity(name.len() + 68);
    if escaped {
        line.push(b'\\');
    }
    for byte in digest {
        const HEX: &[u8; 16] = b"0123456789abcdef";
        line.extend_from_slice(&[HEX[usize::from(byte >> 4)], HEX[usize::from(byte & 15)]]);
    }
    line.extend_from_slice(b"  ");
    for &byte in name.iter() {
        match byte {
            b'\\' if escaped => line.extend_from_slice(b"\\\\"),
            b'\n' => line.extend_from_slice(b"\\n"),
            b'\r' => line.extend_from_slice(b"\\r"),
            byte => line.push(byte),
        }
    }
    line.push(b'\n');
    line
}

#[tokio::main]
async fn main() -> ExitCode {
    let (args, jobs, walk_only) = match parse_args(std::env::args_os().skip(1)) {
        Ok(Command::Hash {
            paths,
            jobs,
            walk_only,
        }) => (paths, jobs, walk_only),
        Ok(Command::Help) => {
            print!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Err(message) => {
            eprintln!("hash: {message}\nTry 'hash --help' for more information.");
            return ExitCode::FAILURE;
        }
    };
    let (roots, skip_build_dirs) = if args.is_empty() {
        (vec![PathBuf::from(env!("CARGO_MANIFEST_DIR"))], true)
    } else {
        (args, false)
    };
    let found = Arc::new(AtomicU64::new(0));
    let walk = Walk::new(roots, skip_build_dirs, found.clone());
    if walk_only {
        return print_walk(walk);
    }

    // Ctrl-C cancels the map. Its handler is installed by the first poll,
    // here, before any file is read: from now on SIGINT no longer kills.
    let cancel = CancellationToken::new();
    let mut ctrl_c = Box::pin(tokio::signal::ctrl_c());
    let _ = futures::poll!(ctrl_c.as_mut());
    let on_ctrl_c = cancel.clone();
    tokio::spawn(async move {
        if ctrl_c.await.is_ok() {
            on_ctrl_c.cancel();
        }
    });

    // The walk runs as the map pulls its input, so the total is not known
    // up front: the bar counts bytes hashed and files hashed of those found.
    // indicatif counts the bytes from the workers, and redraws on its own
    // thread, so the bar moves inside one huge file too.
    let progress = ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr());
    progress.set_style(
        ProgressStyle::with_template("{spinner} {binary_bytes} {binary_bytes_per_sec} {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_spinner()),
    );
    if !progress.is_hidden() {
        progress.enable_steady_tick(Duration::from_millis(200));
    }

    let bar = progress.clone();
    let stdin = StdinTurns::default();
    let mut digests = futures::stream::iter(walk)
        .par_imap_init(
            jobs,
            || vec![0_u8; 1 << 16],
            move |buffer: &mut Vec<u8>, job: Job| match job {
                Job::File(path) => {
                    let digest = File::open(&path).and_then(|file| sha256(buffer, file, &bar));
                    (path, digest)
                }
                Job::Stdin(turn) => (PathBuf::from("-"), stdin.sha256(turn, buffer, &bar)),
                Job::Failed(path, error) => (path, Err(error)),
            },
        )
        .cancel_token(cancel);
    let stats = digests.stats();

    // Lines are buffered, and written out whenever the next one is not
    // ready yet: few writes when the files come fast, no line held back
    // when they do not (`hash DIR | head -1`).
    let mut stdout = io::BufWriter::with_capacity(1 << 16, io::stdout().lock());
    let mut status = ExitCode::SUCCESS;
    let mut cancelled = false;
    loop {
        let next = match digests.next().now_or_never() {
            Some(next) => next,
            None => {
                if stdout.flush().is_err() {
                    break;
                }
                digests.next().await
            }
        };
        let Some(result) = next else { break };
        match result {
            Ok((path, Ok(digest))) => {
                if stdout.write_all(&line(&digest, &path)).is_err() {
                    // stdout closed (`| head`): nothing more to say.
                    break;
                }
            }
            Ok((path, Err(error))) => {
                // What came before it goes out first, as from `sha256sum`.
                let _ = stdout.flush();
                progress.suspend(|| eprintln!("hash: {}: {}", path.display(), reason(&error)));
                status = ExitCode::FAILURE;
            }
            Err(error) if error.is_cancelled() => {
                let _ = stdout.flush();
                progress.suspend(|| eprintln!("hash: cancelled"));
                cancelled = true;
            }
            Err(error) => {
                let _ = stdout.flush();
                progress.suspend(|| eprintln!("hash: {error:#}"));
                status = ExitCode::FAILURE;
            }
        }
        if !progress.is_hidden() {
            let now = stats.snapshot();
            progress.set_message(format!(
                "{}/{} files, {} hashing",
                now.yielded,
                found.load(Ordering::Relaxed),
                now.in_flight
            ));
        }
    }
    // Ends the map: a worker still reading a file stops at its next read.
    drop(digests);
    progress.finish_and_clear();
    let _ = stdout.flush();
    if cancelled {
        // Now, without waiting for the workers: one may be blocked reading
        // a terminal or a pipe that never ends (`-`), and no read returns
        // for Ctrl-C.
        std::process::exit(130);
    }
    status
}

/// `--walk-only`: the paths the walk finds, one a line, as
/// `find DIR -type f | LC_ALL=C sort` prints them (for names without a
/// newline); its problems on stderr.
fn print_walk(walk: Walk) -> ExitCode {
    let mut stdout = io::BufWriter::new(io::stdout().lock());
    let mut status = ExitCode::SUCCESS;
    for job in walk {
        let path = match job {
            Job::File(path) => path,
            Job::Stdin(_) => PathBuf::from("-"),
            Job::Failed(path, error) => {
                eprintln!("hash: {}: {}", path.display(), reason(&error));
                status = ExitCode::FAILURE;
                continue;
            }
        };
        let written = stdout
            .write_all(&path_bytes(&path))
            .and_then(|()| stdout.write_all(b"\n"));
        if written.is_err() {
            break;
        }
    }
    let _ = stdout.flush();
    status
}
