//! Messages between the replicas of one room. The node wraps each in a
//! peer-API frame that names the room; the core never sees the network.

use std::sync::Arc;

use crate::ids::{Ballot, NodeId, Revision};
use crate::room::RoomState;

/// Which phase a [`Message::Nack`] refuses.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Phase {
    /// Phase 1 (prepare / promise).
    Prepare,
    /// Phase 2 (accept / accepted).
    Accept,
}

/// One protocol message.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Message {
    /// Phase 1a: promise to ignore ballots below `ballot`.
    Prepare {
        /// The proposer's ballot.
        ballot: Ballot,
    },
    /// Phase 1b: the promise, with what the acceptor accepted last.
    Promise {
        /// The ballot promised.
        ballot: Ballot,
        /// The last accepted ballot and value, if any.
        accepted: Option<(Ballot, Arc<RoomState>)>,
    },
    /// Phase 2a: accept `value` at `ballot`; with `next`, also promise the
    /// proposer's next ballot (so its next change can skip phase 1).
    Accept {
        /// The proposer's ballot.
        ballot: Ballot,
        /// The new state.
        value: Arc<RoomState>,
        /// The piggybacked promise for the proposer's next round.
        next: Option<Ballot>,
    },
    /// Phase 2b: the value is accepted (and `next`, if any, promised).
    /// Sent by a node that has also processed the accept as a lease holder.
    Accepted {
        /// The ballot accepted.
        ballot: Ballot,
        /// Lease holders this acceptor has promised, with the milliseconds
        /// each promise has left on the acceptor's clock. The proposer must
        /// hear from each of them, or wait that long, before committing.
        holders: Vec<(NodeId, u64)>,
    },
    /// Refusal: the acceptor promised a higher ballot. A refusal of an
    /// accept still means the sender processed the accept as a holder.
    Nack {
        /// The ballot refused.
        ballot: Ballot,
        /// What the acceptor promised instead.
        promised: Ballot,
        /// The refused phase.
        phase: Phase,
    },
    /// The value at `ballot` is committed: every unexpired lease holder has
    /// seen it and a majority accepted it.
    Commit {
        /// The ballot of the committing round.
        ballot: Ballot,
        /// The committed state.
        value: Arc<RoomState>,
    },
    /// A holder asks for a lease; `seq` ties the grant to the request time.
    LeaseRequest {
        /// Holder-chosen sequence number.
        seq: u64,
        /// How long the holder will read on this grant, from the request,
        /// on its own clock (its `LeaseConfig::lease_ms`). A grantor grants
        /// only what its promise and its recovery window cover (see
        /// [`LeaseConfig::covers`](crate::LeaseConfig::covers)).
        lease_ms: u64,
        /// The epoch of the acceptor set the holder asks in: a grantor
        /// grants only in its own, and none once a later epoch sealed it.
        epoch: u64,
    },
    /// A grantor's promise: until the promise expires it will report the
    /// holder on every accept. Carries what the grantor has accepted so a
    /// holder that missed commits learns that it is stale.
    LeaseGrant {
        /// The request this answers.
        seq: u64,
        /// The grantor's last accepted ballot and the revision of that value.
        accepted: Option<(Ballot, Revision)>,
    },
}

impl Message {
    /// The epoch of a message that asks something of an acceptor or a
    /// grantor (a Prepare, an Accept or a lease request); `None` for
    /// answers and commits.
    pub fn asked_epoch(&self) -> Option<u64> {
        match self {
            Message::Prepare { ballot } | Message::Accept { ballot, .. } => Some(ballot.epoch),
            Message::LeaseRequest { epoch, .. } => Some(*epoch),
            _ => None,
        }
    }

    /// Whether every ballot, epoch and revision in the message is within
    /// [`Ballot::ROUND_MAX`], [`Ballot::EPOCH_MAX`] and [`Revision::MAX`]. A replica drops a
    /// message that is not: no honest node ever sends one, and taking it
    /// would let one frame exhaust a room's ballots.
    pub fn is_sane(&self) -> bool {
        let value_ok = |v: &RoomState| v.revision.is_sane();
        match self {
            Message::Prepare { ballot } => ballot.is_sane(),
            Message::Promise { ballot, accepted } => {
                ballot.is_sane()
                    && accepted
                        .as_ref()
                        .is_none_or(|(b, v)| b.is_sane() && value_ok(v))
            }
            Message::Accept {
                ballot,
                value,
                next,
            } => ballot.is_sane() && value_ok(value) && next.is_none_or(Ballot::is_sane),
            Message::Accepted { ballot, .. } => ballot.is_sane(),
            Message::Nack {
                ballot, promised, ..
            } => ballot.is_sane() && promised.is_sane(),
            Message::Commit { ballot, value } => ballot.is_sane() && value_ok(value),
            Message::LeaseRequest { epoch, .. } => *epoch <= Ballot::EPOCH_MAX,
            Message::LeaseGrant { accepted, .. } => accepted
                .as_ref()
                .is_none_or(|(b, r)| b.is_sane() && r.is_sane()),
        }
    }
}
