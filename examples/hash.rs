//! A parallel file hasher: `sha256sum` for whole directory trees, on all
//! cores, with a progress bar.
//!
//! ```text
//! cargo run --release --example hash -- [PATH]...
//! ```
//!
//! It behaves like the tool it replaces. A file argument (or a symlink to
//! one) is hashed as `sha256sum FILE` hashes it; a directory argument stands
//! for every regular file under it (symlinks not followed, FIFOs and sockets
//! skipped, as `find DIR -type f`), in the byte order of their whole paths, so
//! `hash DIR` prints exactly what
//! `find DIR -type f -print0 | LC_ALL=C sort -z | xargs -0 sha256sum` prints.
//! Arguments come out in the order given. A path that cannot be hashed
//! (missing, unreadable, a dangling symlink or a loop) is reported on stderr,
//! the rest is still printed, and the exit status is then 1. Ctrl-C stops it
//! within a read of 64 KiB, even in the middle of a huge file: exit status
//! 130. With no argument it hashes this crate's own tree (without `target/`
//! and hidden directories). The progress bar on stderr is hidden when stderr
//! is not a terminal.

use std::borrow::Cow;
use std::ffi::OsString;
use std::fs::File;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use futures::StreamExt;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use par_imap::ParImapExt;
use sha2::{Digest, Sha256};
use tokio_util::sync::CancellationToken;
use walkdir::WalkDir;

const USAGE: &str = "\
Usage: hash [PATH]...
Print the SHA-256 of each file, like sha256sum, hashing on all cores.

A directory stands for every regular file under it, in byte order of the
whole paths (as `find DIR -type f | LC_ALL=C sort`). With no PATH, hash this
crate's source tree.

  -h, --help  print this help and exit

Exit status: 0 if every file was hashed, 1 if any could not be, 130 on Ctrl-C.
";

/// The paths to hash, or `None` for `--help`.
fn parse_args(args: impl Iterator<Item = OsString>) -> Result<Option<Vec<PathBuf>>, String> {
    let mut paths = Vec::new();
    let mut options_done = false;
    for arg in args {
        if options_done {
            paths.push(PathBuf::from(arg));
            continue;
        }
        match arg.to_str() {
            Some("-h" | "--help") => return Ok(None),
            Some("--") => options_done = true,
            Some(option) if option.starts_with('-') && option != "-" => {
                return Err(format!("unrecognized option '{option}'"));
            }
            _ => paths.push(PathBuf::from(arg)),
        }
    }
    Ok(Some(paths))
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

/// The files to hash, with their sizes (for the progress bar): each
/// argument in turn, a directory expanded to its regular files in byte
/// order of their paths. Problems of the walk are reported and set `failed`.
fn files(roots: &[PathBuf], skip_build_dirs: bool, failed: &mut bool) -> Vec<(PathBuf, u64)> {
    let mut files = Vec::new();
    for root in roots {
        if !std::fs::metadata(root).is_ok_and(|metadata| metadata.is_dir()) {
            // Not a directory (a file, a symlink to one, a FIFO, or nothing
            // at all): hashed, or reported, as `sha256sum` would.
            let size = std::fs::metadata(root).map_or(0, |metadata| metadata.len());
            files.push((root.clone(), size));
            continue;
        }
        let walk = WalkDir::new(root).into_iter().filter_entry(|entry| {
            let name = entry.file_name().to_string_lossy();
            let skipped = entry.depth() > 0 && (name.starts_with('.') || name == "target");
            !(skip_build_dirs && entry.file_type().is_dir() && skipped)
        });
        let mut found = Vec::new();
        for entry in walk {
            match entry {
                // `file_type` does not follow symlinks: regular files only.
                Ok(entry) if entry.file_type().is_file() => {
                    let size = entry.metadata().map_or(0, |metadata| metadata.len());
                    found.push((entry.into_path(), size));
                }
                Ok(_) => {}
                Err(error) => {
                    let path = error.path().unwrap_or(root).display().to_string();
                    match error.io_error() {
                        Some(io) => eprintln!("hash: {path}: {}", reason(io)),
                        None => eprintln!("hash: {path}: {error}"),
                    }
                    *failed = true;
                }
            }
        }
        // Byte order of the whole path, as `LC_ALL=C sort`: comparing `Path`s
        // would go component by component and put `a/b` before `a.rs`.
        found.sort_unstable_by(|(a, _), (b, _)| a.as_os_str().cmp(b.as_os_str()));
        files.extend(found);
    }
    files
}

/// The SHA-256 of a file, read through the worker's own buffer. Stops
/// between two reads once nobody will read the result (Ctrl-C).
fn sha256(buffer: &mut [u8], path: &Path, progress: &ProgressBar) -> io::Result<[u8; 32]> {
    let mut file = File::open(path)?;
    let mut hasher = Sha256::new();
    loop {
        if par_imap::is_cancelled() {
            return Err(io::Error::other("cancelled"));
        }
        match file.read(buffer) {
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
        line.extend_from_slice(format!("{byte:02x}").as_bytes());
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
    let args = match parse_args(std::env::args_os().skip(1)) {
        Ok(Some(paths)) => paths,
        Ok(None) => {
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
    let mut failed = false;
    let files = files(&roots, skip_build_dirs, &mut failed);
    let total_files = files.len();
    let total_bytes = files.iter().map(|(_, size)| size).sum();
    let limit = std::thread::available_parallelism().map_or(2, usize::from);

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

    // indicatif counts the bytes hashed from the workers, and redraws on
    // its own thread, so the bar moves inside one huge file too.
    let progress = ProgressBar::with_draw_target(Some(total_bytes), ProgressDrawTarget::stderr());
    progress.set_style(
        ProgressStyle::with_template(
            "{wide_bar} {binary_bytes}/{binary_total_bytes} {binary_bytes_per_sec} eta {eta} {msg}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    if !progress.is_hidden() {
        progress.enable_steady_tick(Duration::from_millis(200));
    }

    let bar = progress.clone();
    let mut digests = futures::stream::iter(files.into_iter().map(|(path, _)| path))
        .par_imap_init(
            limit,
            || vec![0_u8; 1 << 16],
            move |buffer: &mut Vec<u8>, path: PathBuf| {
                let digest = sha256(buffer, &path, &bar);
                (path, digest)
            },
        )
        .cancel_token(cancel);
    let stats = digests.stats();

    let mut stdout = io::stdout().lock();
    let mut status = if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    };
    while let Some(result) = digests.next().await {
        match result {
            Ok((path, Ok(digest))) => {
                if stdout.write_all(&line(&digest, &path)).is_err() {
                    // stdout closed (`| head`): nothing more to say.
                    break;
                }
            }
            Ok((path, Err(error))) => {
                progress.suspend(|| eprintln!("hash: {}: {}", path.display(), reason(&error)));
                status = ExitCode::FAILURE;
            }
            Err(error) if error.is_cancelled() => {
                progress.suspend(|| eprintln!("hash: cancelled"));
                status = ExitCode::from(130);
            }
            Err(error) => {
                progress.suspend(|| eprintln!("hash: {error:#}"));
                status = ExitCode::FAILURE;
            }
        }
        let now = stats.snapshot();
        progress.set_message(format!(
            "{}/{total_files} files, {} hashing",
            now.yielded, now.in_flight
        ));
    }
    // Ends the map: a worker still reading stops at its next read.
    drop(digests);
    progress.finish_and_clear();
    let _ = stdout.flush();
    status
}
