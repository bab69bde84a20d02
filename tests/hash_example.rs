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
            text(&help.stdout).starts_with("Usage: hash [PATH]..."),
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
