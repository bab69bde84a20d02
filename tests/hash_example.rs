//! `examples/hash.rs` behaves like `sha256sum`: the same bytes out for the
//! same files, a failing path reported with exit status 1 while the rest is
//! still printed, `--help`, and Ctrl-C that ends it mid-file. Each test builds
//! the example itself (`common::example_binary`), so it never runs a stale
//! binary.
#![cfg(unix)]
mod common;

use std::ffi::OsStr;
use std::fs::File;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The features this test was built with: the example is built with the
/// same, so both share every artifact.
const FEATURES: &[&str] = &[
    #[cfg(feature = "tracing")]
    "tracing",
    #[cfg(feature = "process")]
    "process",
];

fn hash() -> Command {
    Command::new(common::example_binary("hash", FEATURES))
}

fn symlink(target: &str, link: &Path) {
    std::os::unix::fs::symlink(target, link).unwrap();
}

/// A tree whose names sort differently by path component and by bytes
/// (`a/…` against `a.rs`, `a-b`, `a0`), with names `sha256sum` escapes or
/// that are not UTF-8, and entries `find -type f` leaves out: a FIFO, a
/// symlink to a file, a dangling symlink and a symlink loop.
fn fixture() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    for sub in ["a/b", "a/c.d", "nested/deeper", "a.d"] {
        std::fs::create_dir_all(root.join(sub)).unwrap();
    }
    for (name, content) in [
        ("a.rs", &b"fn main() {}\n"[..]),
        ("a-b", b"dash"),
        ("a0", b"zero"),
        ("a/z", b"in a"),
        ("a/b/c", b"deep"),
        ("a/c.d/e", b"dotted dir"),
        ("a.d/f", b"dotted sibling"),
        ("empty", b""),
        ("with space.txt", b"spaced out"),
        ("back\\slash", b"escaped"),
        ("new\nline", b"escaped too"),
        ("carriage\rreturn", b"and this"),
    ] {
        std::fs::write(root.join(name), content).unwrap();
    }
    std::fs::write(root.join(OsStr::from_bytes(b"not-utf8-\xff")), b"raw bytes").unwrap();
    std::fs::write(
        root.join("nested/binary.bin"),
        (0..=255_u8).cycle().take(300_000).collect::<Vec<u8>>(),
    )
    .unwrap();
    for n in 0..50 {
        std::fs::write(
            root.join(format!("nested/deeper/file-{n:02}")),
            n.to_string().repeat(n * 100),
        )
        .unwrap();
    }
    let fifo = Command::new("mkfifo").arg(root.join("fifo")).status();
    assert!(fifo.unwrap().success(), "mkfifo");
    symlink("a.rs", &root.join("link-to-file"));
    symlink("nowhere", &root.join("dangling"));
    symlink("loop-b", &root.join("loop-a"));
    symlink("loop-a", &root.join("loop-b"));
    dir
}

fn sh(script: &str, args: &[&OsStr]) -> Output {
    Command::new("sh")
        .arg("-c")
        .arg(script)
        .arg("sh")
        .args(args)
        .output()
        .unwrap()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[test]
fn hash_of_a_tree_is_byte_identical_to_find_sort_sha256sum() {
    let dir = fixture();
    let ours = hash().arg(dir.path()).output().unwrap();
    let theirs = sh(
        r#"find "$1" -type f -print0 | LC_ALL=C sort -z | xargs -0 sha256sum"#,
        &[dir.path().as_os_str()],
    );
    assert!(theirs.status.success(), "{}", text(&theirs.stderr));
    assert_eq!(text(&ours.stderr), "", "nothing to report");
    assert_eq!(ours.status.code(), Some(0));
    assert_eq!(text(&ours.stdout), text(&theirs.stdout));
    assert_eq!(ours.stdout, theirs.stdout, "byte-identical");
    // Every regular file, and nothing else (FIFO, symlinks).
    assert_eq!(
        ours.stdout.iter().filter(|&&byte| byte == b'\n').count(),
        64
    );
}

#[test]
fn file_arguments_are_hashed_like_sha256sum_and_a_failure_exits_1() {
    let dir = fixture();
    let names = [
        "a.rs",
        "link-to-file",
        "/nonexistent",
        "dangling",
        "loop-a",
        "back\\slash",
    ];
    let paths: Vec<PathBuf> = names.iter().map(|name| dir.path().join(name)).collect();
    let ours = hash().args(&paths).output().unwrap();
    let theirs = Command::new("sha256sum").args(&paths).output().unwrap();
    assert_eq!(theirs.status.code(), Some(1));
    assert_eq!(ours.status.code(), Some(1), "{}", text(&ours.stderr));
    assert_eq!(ours.stdout, theirs.stdout, "the hashable ones, in order");
    assert_eq!(
        text(&ours.stderr).replace("hash: ", ""),
        text(&theirs.stderr).replace("sha256sum: ", ""),
        "the same three failures, in the same words"
    );
    assert_eq!(text(&ours.stderr).lines().count(), 3);
}

#[test]
fn a_missing_argument_still_prints_the_rest_and_exits_1() {
    let dir = fixture();
    let ours = hash().arg("/nonexistent").arg(dir.path()).output().unwrap();
    assert_eq!(ours.status.code(), Some(1));
    assert_eq!(
        text(&ours.stderr),
        "hash: /nonexistent: No such file or directory\n"
    );
    assert_eq!(
        ours.stdout.iter().filter(|&&byte| byte == b'\n').count(),
        64
    );
}

#[test]
fn help_is_help_not_a_path() {
    for flag in ["--help", "-h"] {
        let help = hash().arg(flag).output().unwrap();
        assert_eq!(help.status.code(), Some(0), "{flag}");
        assert!(
            text(&help.stdout).starts_with("Usage: hash [OPTION]... [PATH]..."),
            "{flag}"
        );
        assert_eq!(text(&help.stderr), "");
    }
    let unknown = hash().arg("--frobnicate").output().unwrap();
    assert_eq!(unknown.status.code(), Some(1));
    assert!(text(&unknown.stderr).contains("unrecognized option '--frobnicate'"));
    // After `--`, a dash is a name.
    let dir = fixture();
    let dashed = dir.path().join("-h");
    std::fs::write(&dashed, b"not a flag").unwrap();
    let ours = hash()
        .current_dir(dir.path())
        .args(["--", "-h"])
        .output()
        .unwrap();
    let theirs = Command::new("sha256sum")
        .current_dir(dir.path())
        .args(["--", "-h"])
        .output()
        .unwrap();
    assert_eq!(ours.status.code(), Some(0));
    assert_eq!(ours.stdout, theirs.stdout);
}

#[test]
fn hash_example_reports_an_unreadable_file_and_goes_on() {
    use std::os::unix::fs::PermissionsExt;
    let dir = fixture();
    let secret = dir.path().join("secret");
    std::fs::write(&secret, b"no").unwrap();
    std::fs::set_permissions(&secret, PermissionsExt::from_mode(0o000)).unwrap();
    let mut hash = hash();
    if std::fs::read(&secret).is_ok() {
        // Root reads anything: run the example as `nobody` instead, which
        // may read the fixture but not the secret.
        std::fs::set_permissions(dir.path(), PermissionsExt::from_mode(0o755)).unwrap();
        let binary = common::example_binary("hash", FEATURES);
        hash = Command::new("setpriv");
        hash.args(["--reuid=65534", "--regid=65534", "--clear-groups"])
            .arg(binary);
    }
    let ours = hash.arg(dir.path()).output().unwrap();
    let stderr = text(&ours.stderr);
    assert_eq!(ours.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("secret: Permission denied"), "{stderr}");
    assert_eq!(
        ours.stdout.iter().filter(|&&byte| byte == b'\n').count(),
        64,
        "the other files"
    );
}

/// Bytes this process has read so far (Linux).
#[cfg(target_os = "linux")]
fn bytes_read(pid: u32) -> u64 {
    let io = std::fs::read_to_string(format!("/proc/{pid}/io")).unwrap_or_default();
    io.lines()
        .find_map(|line| line.strip_prefix("rchar: "))
        .and_then(|count| count.trim().parse().ok())
        .unwrap_or(0)
}

/// Without a check of `is_cancelled()` between reads, the worker would read
/// this whole terabyte (an hour or more) before the process could exit.
#[cfg(target_os = "linux")]
#[test]
fn ctrl_c_ends_hash_in_the_middle_of_a_huge_file() {
    let dir = tempfile::tempdir().unwrap();
    let huge = dir.path().join("huge");
    // Sparse: a terabyte of zeros that takes no disk.
    File::create(&huge).unwrap().set_len(1 << 40).unwrap();
    let mut child = hash()
        .arg(&huge)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Reading has begun, so the Ctrl-C handler, installed before the first
    // read, is in place.
    let pid = child.id();
    common::eventually("hash to read the huge file", || bytes_read(pid) > 4 << 20);
    let pid = pid.to_string();
    let interrupt = sh(r#"kill -s INT "$1""#, &[OsStr::new(&pid)]);
    assert!(interrupt.status.success());
    let deadline = std::time::Instant::now() + common::hang();
    while child.try_wait().unwrap().is_none() {
        if std::time::Instant::now() > deadline {
            child.kill().unwrap();
            panic!("hash still runs a hang's time after Ctrl-C");
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    let output = child.wait_with_output().unwrap();
    assert_eq!(output.status.code(), Some(130));
    assert_eq!(text(&output.stderr), "hash: cancelled\n");
    assert!(output.stdout.is_empty());
}

/// Whether the process has installed a handler for SIGINT (Linux): `hash`
/// installs it before it walks or reads anything.
#[cfg(target_os = "linux")]
fn catches_sigint(pid: u32) -> bool {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|line| line.strip_prefix("SigCgt:"))
        .and_then(|mask| u64::from_str_radix(mask.trim(), 16).ok())
        .is_some_and(|mask| mask & (1 << (2 - 1)) != 0)
}

/// Waits (bounded) for the child to exit.
fn wait_bounded(child: &mut std::process::Child, what: &str) {
    let deadline = std::time::Instant::now() + common::hang();
    while child.try_wait().unwrap().is_none() {
        if std::time::Instant::now() > deadline {
            child.kill().unwrap();
            panic!("hash still runs a hang's time after {what}");
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
}

/// Runs `script` (`"$@"` = `args`) with `input` on standard input.
fn sh_with_input(script: &str, args: &[&OsStr], input: &[u8]) -> Output {
    use std::io::Write;
    let mut child = Command::new("sh")
        .arg("-c")
        .arg(script)
        .arg("sh")
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(input).unwrap();
    child.wait_with_output().unwrap()
}

#[test]
fn a_dash_hashes_standard_input_like_sha256sum() {
    let dir = fixture();
    let file = dir.path().join("a.rs");
    let binary = common::example_binary("hash", FEATURES);
    for args in [
        vec![OsStr::new("-")],
        // The second `-` reads what the first left: nothing.
        vec![OsStr::new("-"), file.as_os_str(), OsStr::new("-")],
        // After `--`, `-` is still standard input.
        vec![OsStr::new("--"), OsStr::new("-")],
    ] {
        let input = b"hi\n".repeat(50_000);
        let ours = sh_with_input(
            r#"hash="$1"; shift; exec "$hash" "$@""#,
            &[&[binary.as_os_str()][..], &args].concat(),
            &input,
        );
        let theirs = sh_with_input(r#"exec sha256sum "$@""#, &args, &input);
        assert_eq!(ours.status.code(), Some(0), "{}", text(&ours.stderr));
        assert_eq!(text(&ours.stdout), text(&theirs.stdout), "{args:?}");
        assert!(text(&ours.stdout).ends_with("  -\n"));
    }
}

/// A symlink to a directory, named as an argument, is not walked: it is
/// given to the hasher like any non-directory and reported as `sha256sum
/// LINK` reports it (`find LINK -type f` would print nothing). `LINK/` is
/// a directory, for `find` and for `hash`. The help says so.
#[test]
fn a_symlink_to_a_directory_is_reported_not_walked() {
    let dir = fixture();
    symlink("a", &dir.path().join("link-to-dir"));
    let link = dir.path().join("link-to-dir");
    let ours = hash().arg(&link).output().unwrap();
    let theirs = Command::new("sha256sum").arg(&link).output().unwrap();
    assert_eq!(ours.status.code(), Some(1));
    assert_eq!(theirs.status.code(), Some(1));
    assert_eq!(ours.stdout, b"");
    assert_eq!(
        text(&ours.stderr),
        format!("hash: {}: Is a directory\n", link.display())
    );
    assert_eq!(
        text(&ours.stderr).replace("hash: ", ""),
        text(&theirs.stderr).replace("sha256sum: ", "")
    );

    let slashed = dir.path().join("link-to-dir/");
    let ours = hash().arg(&slashed).output().unwrap();
    let theirs = sh(
        r#"find "$1" -type f -print0 | LC_ALL=C sort -z | xargs -0 sha256sum"#,
        &[slashed.as_os_str()],
    );
    assert_eq!(ours.status.code(), Some(0), "{}", text(&ours.stderr));
    assert_eq!(text(&ours.stdout), text(&theirs.stdout));
    assert_eq!(text(&ours.stdout).lines().count(), 3, "a/z, a/b/c, a/c.d/e");

    let help = text(&hash().arg("--help").output().unwrap().stdout);
    assert!(
        help.contains("a symlink to a directory  is not walked but reported"),
        "{help}"
    );
}

/// Names that sort differently by path component and by bytes, at several
/// depths: `-`, `.`, a space and `0` around the `/` that follows a
/// directory's name (0x2d, 0x2e, 0x20 and 0x30 around 0x2f).
#[test]
fn the_walk_puts_files_in_the_byte_order_of_sort() {
    let dir = tempfile::tempdir().unwrap();
    let names = ["a", "a-c", "a.d", "a b", "a0", "a ", "-", ".h", "b"];
    // Each name a directory holding a file of each name and a directory
    // `<name>.x`; beside them files named by two names, where that is not
    // a directory already (`a ` + `b`).
    for first in names {
        let sub = dir.path().join(first);
        std::fs::create_dir_all(sub.join(format!("{first}.x"))).unwrap();
        std::fs::write(sub.join(format!("{first}.x/y")), b"").unwrap();
        for second in names {
            std::fs::write(sub.join(second), second).unwrap();
            let beside = format!("{first}{second}");
            if !names.contains(&beside.as_str()) {
                std::fs::write(dir.path().join(beside), first).unwrap();
            }
        }
    }
    let ours = hash().arg(dir.path()).output().unwrap();
    let theirs = sh(
        r#"find "$1" -type f -print0 | LC_ALL=C sort -z | xargs -0 sha256sum"#,
        &[dir.path().as_os_str()],
    );
    assert_eq!(ours.status.code(), Some(0), "{}", text(&ours.stderr));
    assert_eq!(text(&ours.stdout), text(&theirs.stdout));
    // The walk alone, in the order of `find | sort` too (as a check that
    // the test above did not pass by sorting lines some other way).
    let walked = hash().arg("--walk-only").arg(dir.path()).output().unwrap();
    let sorted = sh(
        r#"find "$1" -type f -print0 | LC_ALL=C sort -z | tr '\0' '\n'"#,
        &[dir.path().as_os_str()],
    );
    assert_eq!(text(&walked.stdout), text(&sorted.stdout));
    assert!(text(&walked.stdout).lines().count() > 100);
}

#[test]
fn jobs_sets_how_many_files_are_hashed_at_once() {
    let dir = fixture();
    let expected = hash().arg(dir.path()).output().unwrap();
    assert_eq!(expected.status.code(), Some(0));
    for jobs in [&["-j", "1"][..], &["-j3"], &["--jobs", "2"], &["--jobs=64"]] {
        let ours = hash().args(jobs).arg(dir.path()).output().unwrap();
        assert_eq!(ours.status.code(), Some(0), "{jobs:?}");
        assert_eq!(ours.stdout, expected.stdout, "{jobs:?}");
    }
    for (jobs, message) in [
        (&["-j", "0"][..], "invalid number of jobs: '0'"),
        (&["--jobs=x"], "invalid number of jobs: 'x'"),
        (&["-j"], "option requires an argument -- 'j'"),
    ] {
        let ours = hash().args(jobs).output().unwrap();
        assert_eq!(ours.status.code(), Some(1), "{jobs:?}");
        assert!(text(&ours.stderr).contains(message), "{jobs:?}");
    }
}

/// The walk is the map's lazy input: while the one job waits for standard
/// input, no directory after it has been read yet, so a file created then
/// is hashed. (Walking the whole tree first, as `find | sort` must, would
/// miss it: the Ctrl-C handler this test waits for is installed after
/// that.) A blocking map keeps one call queued behind each running one, and
/// its first calls take one item each: three `-` keep the walk from `DIR`.
#[cfg(target_os = "linux")]
#[test]
fn the_walk_reads_a_directory_only_when_it_gets_there() {
    use std::io::Write;
    let dir = fixture();
    let mut child = hash()
        .args(["-j1", "-", "-", "-"])
        .arg(dir.path())
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    common::eventually("hash to catch SIGINT", || catches_sigint(pid));
    std::fs::write(dir.path().join("late"), b"created while hash runs").unwrap();
    child.stdin.take().unwrap().write_all(b"input").unwrap();
    wait_bounded(&mut child, "its input ended");
    let output = child.wait_with_output().unwrap();
    assert_eq!(output.status.code(), Some(0), "{}", text(&output.stderr));
    let lines = text(&output.stdout);
    assert!(lines.lines().take(3).all(|line| line.ends_with("  -")));
    assert!(lines.contains(&format!("  {}/late\n", dir.path().display())));
    assert_eq!(lines.lines().count(), 3 + 64 + 1);
}

/// Lines are buffered but written out as soon as nothing more is ready:
/// the file's line is out while `-`, after it, still waits for its input.
/// (The first call of a map takes one item, so the file's result does not
/// wait for `-` in the engine either: a result is handed over when its call
/// ends, and a call that holds several items ends after its last.)
#[test]
fn a_line_comes_out_while_a_later_file_is_still_being_read() {
    use std::io::{BufRead, BufReader, Write};
    let dir = fixture();
    let file = dir.path().join("a.rs");
    let mut child = hash()
        .args(["-j1", "--"])
        .arg(&file)
        .arg("-")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (lines_tx, lines_rx) = std::sync::mpsc::channel();
    let reader = std::thread::spawn(move || {
        for line in BufReader::new(stdout).split(b'\n') {
            if lines_tx.send(line.unwrap()).is_err() {
                break;
            }
        }
    });
    let first = lines_rx.recv_timeout(common::hang());
    let expected = Command::new("sha256sum").arg(&file).output().unwrap();
    assert_eq!(
        first.map(|line| text(&line) + "\n").ok(),
        Some(text(&expected.stdout)),
        "the file's line, out while `-` waits"
    );
    child.stdin.take().unwrap().write_all(b"input").unwrap();
    let last = lines_rx.recv_timeout(common::hang()).unwrap();
    assert!(text(&last).ends_with("  -"));
    wait_bounded(&mut child, "its input ended");
    assert_eq!(child.wait().unwrap().code(), Some(0));
    reader.join().unwrap();
}

/// Ctrl-C ends `hash -` even while it waits for input that never comes: no
/// read returns for it, so `hash` exits without waiting for that worker.
#[cfg(target_os = "linux")]
#[test]
fn ctrl_c_ends_hash_waiting_on_standard_input() {
    let mut child = hash()
        .arg("-")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    common::eventually("hash to catch SIGINT", || catches_sigint(pid));
    let interrupt = sh(r#"kill -s INT "$1""#, &[OsStr::new(&pid.to_string())]);
    assert!(interrupt.status.success());
    // Standard input stays open (held in `child.stdin`) all along.
    wait_bounded(&mut child, "Ctrl-C");
    let output = child.wait_with_output().unwrap();
    assert_eq!(output.status.code(), Some(130));
    assert_eq!(text(&output.stderr), "hash: cancelled\n");
    assert!(output.stdout.is_empty());
}
