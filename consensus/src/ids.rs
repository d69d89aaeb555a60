//! Identifiers and counters: nodes, ballots, revisions (defined in
//! `saferchat-vocabulary`), requests, changes.

use std::fmt;

/// A node of the cluster, as named in the replica configuration.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct NodeId(pub u64);

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "n{}", self.0)
    }
}

/// A Paxos ballot: a round counter made unique by the proposing node, in
/// the epoch of the acceptor set it runs in.
///
/// Ordered by epoch, then round, then node (the field order), so two
/// proposers never use the same ballot, every ballot has a successor owned
/// by its node, and every ballot of a later acceptor set is above every
/// ballot of an earlier one: an acceptor's promise in a new epoch fences
/// the old epoch by itself (`specs/Reconfiguration.tla`). The epoch is the
/// cluster map's epoch of the room's partition; ballots stored before
/// epochs existed read as epoch 0.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Ballot {
    /// The map epoch of the acceptor set (see
    /// [`ReplicaConfig::epoch`](crate::ReplicaConfig::epoch)).
    pub epoch: u64,
    /// Round counter; the part a proposer raises to preempt others.
    pub round: u64,
    /// The node that owns this ballot.
    pub node: NodeId,
}

impl Ballot {
    /// The ballot below every ballot a proposer can use.
    pub const ZERO: Ballot = Ballot {
        epoch: 0,
        round: 0,
        node: NodeId(0),
    };

    /// The highest round a node proposes or accepts.
    ///
    /// Far beyond any real use (2^62 rounds at a million per second last
    /// 146,000 years) and far below `u64::MAX`, so `round + 1` never
    /// overflows, and a frame that names a bigger round is refused as
    /// absurd instead of freezing the room: an acceptor that promised
    /// `u64::MAX` could never be outbid again.
    pub const ROUND_MAX: u64 = 1 << 62;

    /// The highest epoch accepted, for the same reason.
    pub const EPOCH_MAX: u64 = 1 << 62;

    /// Whether the epoch and round are within bounds.
    pub fn is_sane(self) -> bool {
        self.round <= Self::ROUND_MAX && self.epoch <= Self::EPOCH_MAX
    }

    /// The lowest ballot of `epoch`: what an acceptor that knows `epoch`
    /// refuses an earlier epoch's ballot with, so that its proposer learns
    /// that the room's acceptor set moved on.
    pub fn floor_of(epoch: u64) -> Ballot {
        Ballot {
            epoch,
            round: 0,
            node: NodeId(0),
        }
    }

    /// The next ballot of the same node: the one a proposer piggybacks as
    /// a promise on its accept, for a one-round-trip next change. `None`
    /// once the rounds are exhausted.
    pub fn successor(self) -> Option<Ballot> {
        (self.round < Self::ROUND_MAX).then(|| Ballot {
            round: self.round + 1,
            ..self
        })
    }
}

impl fmt::Display for Ballot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}.{}", self.epoch, self.round, self.node.0)
    }
}

// Revisions are vocabulary shared with the envelope crate; re-exported
// here at the path they had when they were defined in this module.
pub use saferchat_vocabulary::Revision;

/// A caller's handle on one proposal, echoed in its reply.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RequestId(pub u64);

/// A globally unique id of one requested change, kept in the room state
/// for a while so that a change retried after an unknown outcome is
/// applied once and reports its first outcome.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ChangeId(pub u128);
