//! Where a room lives: a pure function of its name and the cluster's node
//! list, the same in every binary, version and datacenter.
//!
//! # Layout
//!
//! - [`partition`]: the room hash (SHA-256 of the name, first 8 bytes big
//!   endian) and partitions as equal ranges of that 64-bit space; the
//!   partition count is fixed when a cluster is created.
//! - [`ring`]: replica sets of partitions, from a consistent-hash ring per
//!   datacenter with virtual nodes (the `hashring` crate, fed by
//!   [`stable_hash`]), so that adding a node moves only the replica slots it
//!   takes over.
//! - [`map`]: the cluster map (nodes, partition count, an epoch), the
//!   deterministic state machine the node replicates with Raft.
//! - [`moves`]: partitions moving between nodes in that map, one replica
//!   slot at a time (grow, establish, shrink; `specs/PartitionMove.tla`).
//! - [`stable_hash`]: the `std::hash` plumbing that makes `hashring`
//!   deterministic across builds.
//!
//! No I/O, no clocks, no randomness: the node crate decides what to do with
//! a placement (route, forward, host acceptors); this crate only computes it.

#![deny(missing_docs)]

pub mod map;
pub mod moves;
pub mod partition;
pub mod ring;
pub mod stable_hash;

pub use map::{ClusterMap, FailoverLeader, MapCommand, MapError, MapNode, NodeState};
pub use moves::{CREATED_EPOCH, MoveError, MoveStep, Pinned};
pub use partition::{PartitionCount, PartitionId, room_hash};
pub use ring::{ClusterNode, Placement, PlacementError};
