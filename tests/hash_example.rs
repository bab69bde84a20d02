//! `examples/hash.rs` prints exactly what `sha256sum` prints for the same
//! files, and goes on past a file it cannot read.
#![cfg(unix)]
mod common;

use std::process::Command;

/// The features this test was built with: the example is built with the
/// same, so both share every artifact.
const FEATURES: &[&str] = &[
    #[cfg(feature = "tracing")]
    "tracing",
    #[cfg(feature = "process")]
    "process",
];

fn fixture() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    std::fs::create_dir_all(root.join("nested/deeper")).unwrap();
    std::fs::write(root.join("empty"), b"").unwrap();
    std::fs::write(root.join("hello.txt"), b"hello\n").unwrap();
    std::fs::write(root.join("with space.txt"), b"spaced out").unwrap();
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
    dir
}

#[test]
fn hash_example_output_is_byte_identical_to_sha256sum() {
    let dir = fixture();
    let ours = Command::new(common::example_binary("hash", FEATURES))
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(
        ours.status.success(),
        "{}",
        String::from_utf8_lossy(&ours.stderr)
    );
    let stdout = String::from_utf8(ours.stdout).unwrap();
    let paths: Vec<&str> = stdout.lines().map(|line| &line[66..]).collect();
    assert_eq!(paths.len(), 54, "every file, once");
    let mut sorted = paths.clone();
    sorted.sort_unstable();
    sorted.dedup();
    assert_eq!(sorted.len(), 54);

    let theirs = Command::new("sha256sum").args(&paths).output().unwrap();
    assert!(theirs.status.success());
    assert_eq!(stdout, String::from_utf8(theirs.stdout).unwrap());
}

#[test]
fn hash_example_reports_an_unreadable_file_and_goes_on() {
    use std::os::unix::fs::PermissionsExt;
    let dir = fixture();
    let secret = dir.path().join("secret");
    std::fs::write(&secret, b"no").unwrap();
    std::fs::set_permissions(&secret, PermissionsExt::from_mode(0o000)).unwrap();
    let mut hash = Command::new(common::example_binary("hash", FEATURES));
    if std::fs::read(&secret).is_ok() {
        // Root reads anything: run the example as `nobody` instead, which
        // may read the fixture but not the secret.
        std::fs::set_permissions(dir.path(), PermissionsExt::from_mode(0o755)).unwrap();
        hash = Command::new("setpriv");
        hash.args(["--reuid=65534", "--regid=65534", "--clear-groups"])
            .arg(common::example_binary("hash", FEATURES));
    }
    let ours = hash.arg(dir.path()).output().unwrap();
    let stderr = String::from_utf8_lossy(&ours.stderr);
    assert_eq!(ours.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("secret: Permission denied"), "{stderr}");
    assert_eq!(
        String::from_utf8_lossy(&ours.stdout).lines().count(),
        54,
        "the other files"
    );
}
