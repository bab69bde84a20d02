//! `examples/article.rs` prints each error on one line, even with
//! `RUST_BACKTRACE=1` (`{:#}`, not an `anyhow::Error`'s `{:?}` with its
//! backtrace). The test builds the example itself.
mod common;

use std::process::Command;

/// The features this test was built with, for the example's build too.
const FEATURES: &[&str] = &[
    #[cfg(feature = "tracing")]
    "tracing",
    #[cfg(feature = "process")]
    "process",
];

#[test]
fn article_prints_errors_on_one_line_under_rust_backtrace() {
    let output = Command::new(common::example_binary("article", FEATURES))
        .env("RUST_BACKTRACE", "1")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{stdout}");
    assert!(
        stdout.contains("sum: error: cannot make a temp file for 3\n"),
        "{stdout}"
    );
    assert!(stdout.contains("error: ValueError at 5\n"), "{stdout}");
    assert!(!stdout.to_lowercase().contains("backtrace"), "{stdout}");
    let frame = |line: &str| {
        let line = line.trim_start();
        line.split_once(": ")
            .is_some_and(|(number, _)| number.parse::<u32>().is_ok())
    };
    assert!(!stdout.lines().any(frame), "no stack frame: {stdout}");
}
