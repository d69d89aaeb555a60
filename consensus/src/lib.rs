//! Sans-I/O core of saferchat's room membership: a per-room CASPaxos
//! register with quorum leases.
//!
//! # Layout
//!
//! - [`room`]: the replicated value ([`RoomState`]), the changes that move
//!   it ([`Change`]) and the pure function that applies them ([`apply`]).
//!   The nouns it is made of ([`RoomId`], [`Handle`], [`PublicKey`],
//!   [`Revision`], their limits, the read-only [`Membership`] view that
//!   [`RoomState`] implements) are defined in `saferchat-vocabulary`,
//!   which the envelope crate uses too, and re-exported here at their
//!   old paths.
//! - [`paxos::acceptor`], [`paxos::proposer`]: the register.
//! - [`lease::grantor`], [`lease::holder`]: quorum leases.
//! - [`replica`]: the four roles of one room on one node behind one
//!   interface, emitting a [`Ready`].
//! - [`handover`]: a partition's room registers handed from one
//!   acceptor set to the next when the cluster map moves it (seal, wait
//!   out leases, transfer).
//! - [`partition_log`]: the replicated log of one partition (terms,
//!   fencing, recovery from a quorum's tail), the core of the
//!   quorum-replicated timeline, with the home lease and the failover
//!   election that move a partition's home to another datacenter.
//! - [`time`], [`config`], [`ids`], [`message`]: the vocabulary of the
//!   protocol (nodes, ballots, drift, messages).
//!
//! # What this crate never does
//!
//! No I/O, no clocks, no threads, no randomness: time arrives as an
//! argument, storage and network are commands in [`Ready`], and the same
//! inputs always produce the same outputs. That is what lets the tests
//! check the real code exhaustively (stateright) and replay any simulated
//! schedule from its seed.
//!
//! # The protocol in one paragraph
//!
//! Each room is an independent register whose value is the whole
//! membership. A change is a function of the previous value: a proposer
//! learns the newest accepted value from a majority (phase 1), applies the
//! change, and has a majority accept the result (phase 2); the accept also
//! asks for a promise on the proposer's next ballot, so the next change
//! needs phase 2 only. Lease holders read locally while a majority of
//! grants are unexpired and no newer accepted value is pending; a round
//! commits only after every holder reported by an accepting acceptor has
//! answered the accept or its promise has expired. See `specs/README.md`
//! for the TLA+ specifications that state and check the invariants.

pub mod config;
pub mod handover;
pub mod ids;
pub mod lease;
pub mod message;
pub mod partition_log;
pub mod paxos;
pub mod replica;
pub mod room;
pub mod time;

pub use config::{ConfigError, LeaseConfig, ProposerConfig, ReplicaConfig};
pub use ids::{Ballot, ChangeId, NodeId, RequestId, Revision};
pub use lease::holder::ReadError;
pub use message::{Message, Phase};
pub use paxos::acceptor::AcceptorState;
pub use paxos::proposer::Outcome;
pub use replica::{LeaseStatus, Ready, RoomReplica, SealedRoom};
pub use room::{
    Applied, Change, ChangeError, Handle, Membership, ParseError, Proposal, PublicKey,
    RECENT_CHANGES_MAX, RoomId, RoomState, apply,
};
pub use time::{Drift, Millis};
