//! Helpers for the `services` examples and tests of par-imap.
//!
//! [`knee`]: a local HTTP server with a capacity knee, to measure a
//! concurrency limit against (the `knee` example, `tests/knee_server.rs`).

#![warn(missing_docs)]

pub mod knee;
