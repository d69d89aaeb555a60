//! The chaos harness: a seeded fault schedule played against a real
//! cluster while clients post and listen, and checkers over what the
//! clients saw.
//!
//! - [`schedule`]: the seeded nemesis schedule (pure).
//! - [`history`]: what clients saw, and the checkers over it (pure).
//! - [`linear`]: a linearizability checker (pure).
//! - [`membership`]: membership operations and their sequential model.
//! - [`run`]: plays a schedule against node processes with clients.
//!
//! Every run prints its seed; `SEED=…` replays the same schedule.

pub mod history;
pub mod linear;
pub mod membership;
pub mod run;
pub mod schedule;
