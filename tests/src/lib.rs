//! Test harness: real processes (the `saferchat-node` and `saferchat`
//! binaries, grpcurl) and in-process nodes.
//!
//! # Layout
//!
//! - [`process`]: start, stop, kill and restart node binaries; run the CLI.
//! - [`inproc`]: a node inside the test process, for fast protocol tests.
//! - [`cluster`], [`netproxy`]: several node processes whose peer links a
//!   test can cut or slow down.
//! - [`load`]: members posting and listening through any node, for
//!   cluster tests, and the room's history read back.
//! - [`netns`]: packet loss on chosen links, inside a network namespace
//!   a test makes for itself.
//! - [`raw`]: the chat protocol by hand, for bad-input tests.
//! - [`bin`]: where the binaries are.
//! - [`cassandra`]: the Cassandra address the tests use, a store on it,
//!   and private Cassandra instances for fault tests.
//! - [`procfs`]: CPU time and memory of processes, and machine facts for
//!   benchmark reports.
//! - [`stats`]: the one percentile definition of every report.
//! - [`tmpfs`]: a small tmpfs for a node's data folder, to fill its disk.
//! - [`watchdog`]: a bound on how long a test may hold node processes.
//! - [`chaos`]: seeded fault schedules against a cluster, and checkers over
//!   what its clients saw.
//!
//! Nodes listen on port 0 and report the port they got in a JSON log line,
//! so tests never guess ports and never sleep waiting for a server.

pub mod bin;
pub mod cassandra;
pub mod chaos;
pub mod cluster;
pub mod inproc;
pub mod load;
pub mod netns;
pub mod netproxy;
pub mod process;
pub mod procfs;
pub mod raw;
pub mod stats;
pub mod tmpfs;
pub mod watchdog;

/// An admin token used by every test node (a secret only in tests).
pub const ADMIN_TOKEN: &str = "test-admin-token-0123456789";
