//! A parallel file hasher: `sha256sum` for a whole directory tree, on all
//! cores, with a progress bar.
//!
//! ```text
//! cargo run --release --example hash -- <DIR>...
//! ```
//!
//! With no argument it hashes this crate's own tree (without `target/` and
//! hidden directories). It prints `digest  path` lines in a stable order
//! (paths sorted), byte-identical to `sha256sum` over the same files. An
//! unreadable file is reported on stderr and the run goes on; the exit status
//! is then 1, as `sha256sum`'s. Ctrl-C cancels cleanly. The progress bar on
//! stderr is hidden when stderr is not a terminal.

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

/// Every regular file under `roots`, in a stable order.
fn files(roots: &[PathBuf], skip_build_dirs: bool) -> Vec<PathBuf> {
    let mut files = Vec::new();
    for root in roots {
        let walk = WalkDir::new(root)
            .sort_by_file_name()
            .into_iter()
            .filter_entry(|entry| {
                let name = entry.file_name().to_string_lossy();
                let skipped = entry.depth() > 0 && (name.starts_with('.') || name == "target");
                !(skip_build_dirs && entry.file_type().is_dir() && skipped)
            });
        for entry in walk {
            match entry {
                Ok(entry) if entry.file_type().is_file() => files.push(entry.into_path()),
                Ok(_) => {}
                Err(error) => eprintln!("hash: {error}"),
            }
        }
    }
    files
}

/// The SHA-256 of a file, read through the worker's own buffer.
fn sha256(buffer: &mut [u8], path: &Path) -> io::Result<String> {
    let mut file = File::open(path)?;
    let mut hasher = Sha256::new();
    loop {
        match file.read(buffer)? {
            0 => break,
            read => hasher.update(&buffer[..read]),
        }
    }
    Ok(hasher
        .finalize()
        .iter()
        .map(|byte| format!("{byte:02x}"))
        .collect())
}

/// A `sha256sum` output line: names holding `\`, newline or carriage return
/// are escaped, and the line then starts with `\`.
fn line(digest: &str, path: &Path) -> String {
    let name = path.to_string_lossy();
    if name.contains(['\\', '\n', '\r']) {
        let escaped = name
            .replace('\\', "\\\\")
            .replace('\n', "\\n")
            .replace('\r', "\\r");
        format!("\\{digest}  {escaped}\n")
    } else {
        format!("{digest}  {name}\n")
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    let args: Vec<PathBuf> = std::env::args_os().skip(1).map(PathBuf::from).collect();
    let (roots, skip_build_dirs) = if args.is_empty() {
        (vec![PathBuf::from(env!("CARGO_MANIFEST_DIR"))], true)
    } else {
        (args, false)
    };
    let files = files(&roots, skip_build_dirs);
    let limit = std::thread::available_parallelism().map_or(2, usize::from);

    let cancel = CancellationToken::new();
    let on_ctrl_c = cancel.clone();
    tokio::spawn(async move {
        if tokio::signal::ctrl_c().await.is_ok() {
            on_ctrl_c.cancel();
        }
    });

    let total = files.len() as u64;
    let mut digests = futures::stream::iter(files)
        .par_imap_init(
            limit,
            || vec![0_u8; 1 << 16],
            |buffer: &mut Vec<u8>, path: PathBuf| {
                let digest = sha256(buffer, &path);
                (path, digest)
            },
        )
        .cancel_token(cancel);

    let progress = ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stderr());
    progress.set_style(
        ProgressStyle::with_template("{bar:40} {pos}/{len} files, {per_sec}, {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let stats = digests.stats();
    let bar = progress.clone();
    let ticker = tokio::spawn(async move {
        loop {
            let now = stats.snapshot();
            bar.set_position(now.yielded);
            bar.set_message(format!("{} hashing", now.in_flight));
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });

    let mut stdout = io::stdout().lock();
    let mut status = ExitCode::SUCCESS;
    while let Some(result) = digests.next().await {
        match result {
            Ok((path, Ok(digest))) => {
                if stdout.write_all(line(&digest, &path).as_bytes()).is_err() {
                    // stdout closed (`| head`): nothing more to say.
                    break;
                }
            }
            Ok((path, Err(error))) => {
                progress.suspend(|| eprintln!("hash: {}: {error}", path.display()));
                status = ExitCode::FAILURE;
            }
            Err(error) if error.is_cancelled() => {
                progress.suspend(|| eprintln!("hash: cancelled"));
                status = ExitCode::from(130);
            }
            Err(error) => {
                progress.suspend(|| eprintln!("hash: {error}"));
                status = ExitCode::FAILURE;
            }
        }
    }
    ticker.abort();
    progress.finish_and_clear();
    let _ = stdout.flush();
    status
}
