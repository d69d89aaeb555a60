//! Test harness: real processes (the `saferchat-node` and `saferchat`
//! binaries, grpcurl) and in-process nodes.
//!
//! # Layout
//!
//! - [`process`]: start, stop, kill and restart node binaries; run the CLI.
//! - [`inproc`]: a node inside the test process, for fast protocol tests.
//! - [`bin`]: where the binaries are.
//!
//! Nodes listen on port 0 and report the port they got in a JSON log line,
//! so tests never guess ports and never sleep waiting for a server.

pub mod bin;
pub mod inproc;
pub mod process;

/// An admin token used by every test node (a secret only in tests).
pub const ADMIN_TOKEN: &str = "test-admin-token-0123456789";
