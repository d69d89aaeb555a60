//! Quorum leases (Moraru, Andersen, Kaminsky, SoCC 2014), per room.
//!
//! Every replica is a *grantor*; the configured *holders* ask every grantor
//! for a lease and may read their local copy of the room while a majority
//! of grants are unexpired and nothing newer is pending. Safety comes from
//! two rules, one per side:
//!
//! - a grantor that accepts a value while it has promised holder `h`
//!   reports `h` (and how long the promise has left) in its `Accepted`; the
//!   proposer commits only after `h` has answered the same accept (and so
//!   marked the room pending) or the promise has run out (see
//!   [`crate::paxos::proposer`]);
//! - a grant carries the grantor's last accepted revision, so a holder
//!   that missed commits while away learns it is stale from the grant that
//!   would let it read.
//!
//! Leases are per room: a grant must say what its grantor accepted *for
//! that room*, which a grant for a group of rooms could only do by carrying
//! a per-group log that independent per-room registers do not have. The
//! node batches the requests and grants of many rooms into one frame per
//! peer, so renewal traffic grows with active rooms in bytes, not messages.

pub mod grantor;
pub mod holder;
