//! The replicated log of one partition: the core of the quorum-replicated
//! timeline, specified in `specs/PartitionLog.tla`.
//!
//! Slot `i` of a partition's log holds its `i`-th post (or a no-op); one
//! replica leads at a time and assigns slots. It is Multi-Paxos with terms:
//!
//! - **Elect.** A candidate picks a term above every term it has seen and
//!   promises it itself first (the promise is durable before any Prepare
//!   leaves, so a restarted node never runs for a term it used). A replica
//!   promises a higher term and answers with its entries from the slot the
//!   candidate asks for; from then on it refuses writes of older terms
//!   (*fencing*: a deposed leader, even one that can still reach storage,
//!   cannot write after its successor was elected).
//! - **Recover.** With promises from a quorum, the new leader adopts, for
//!   every slot, the entry of the highest term among them (*tail read*),
//!   fills holes below the last one with no-ops, and writes all of them
//!   again in its own term. Anything acknowledged was on a quorum, which
//!   overlaps this one, so it is recovered in its slot.
//! - **Append.** The leader writes new entries at the next free slots; a
//!   replica stores them durably, then answers; a slot commits when a
//!   quorum answered in the leader's term, and committed slots are released
//!   ([`Committed`]) strictly in slot order, so acknowledgements and
//!   delivery follow one gapless order.
//!
//! - **Fail over** (`specs/HomeFailover.tla`). When the partition's home
//!   datacenter is lost, the cluster map moves the home to another one in
//!   a new epoch. With [`LogConfig::home_lease`] set, a leader releases
//!   only while a majority of *all* the replicas grant it a lease
//!   ([`home_lease`]); an election of a failover epoch
//!   ([`LogConfig::failover`]) reads the learners too, needs a majority of
//!   all the replicas and of every other datacenter, waits until the
//!   grants its promisers gave ran out, and cuts the recovered log at its
//!   first hole. The old home, even alive behind a cut, releases nothing
//!   after the new home does, and every post acknowledged at the
//!   cross-datacenter level is in the new home's log.
//!
//! Like the room register, everything durable is a command in [`LogReady`]
//! that the node performs before it sends anything of the same `LogReady`.

pub mod acceptor;
pub mod home_lease;
pub mod replica;

use std::fmt;

use crate::ids::NodeId;

pub use acceptor::{LogAcceptor, LogWrite};
pub use home_lease::{LeaseGrantor, LeaseHolder};
pub use replica::{
    Checks, Committed, Failover, HeldCopies, LogConfig, LogReady, LogReplica, NotLeader,
};

/// A leadership term: a round made unique by the node that runs for it,
/// in the epoch of the partition's replica set it runs in. Ordered by
/// epoch, then round, then node (the field order): a term of a later
/// epoch is above every term of an earlier one, so electing a leader of
/// epoch `e` fences every earlier epoch on a quorum of `e`'s set
/// (`specs/PartitionMove.tla`, `EPOCH_IN_TERM`). Terms stored before
/// epochs existed read as epoch 0, below every epoch the map hands out.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Term {
    /// The map epoch of the replica set the term runs in (see
    /// `saferchat_placement::ClusterMap::partition_epoch`).
    pub epoch: u64,
    /// Raised by a candidate above every round it has seen, whatever the
    /// epoch (see [`crate::partition_log::LogReplica::campaign`]).
    pub round: u64,
    /// The node that runs for (and leads in) this term.
    pub node: NodeId,
}

impl Term {
    /// Below every term a node runs for.
    pub const ZERO: Term = Term {
        epoch: 0,
        round: 0,
        node: NodeId(0),
    };
    /// The highest round used or accepted, for the same reason as
    /// [`crate::Ballot::ROUND_MAX`]: `+ 1` never overflows, absurd terms
    /// are refused.
    pub const ROUND_MAX: u64 = 1 << 62;
    /// The highest epoch accepted: map epochs count map changes, and
    /// anything near `u64::MAX` is corrupt or hostile.
    pub const EPOCH_MAX: u64 = 1 << 62;

    /// Whether the epoch and round are within bounds.
    pub fn is_sane(self) -> bool {
        self.round <= Self::ROUND_MAX && self.epoch <= Self::EPOCH_MAX
    }

    /// The lowest term of `epoch`: what a replica that knows `epoch`
    /// answers a message of an earlier epoch with, so that its sender
    /// learns the epoch moved on.
    pub fn floor_of(epoch: u64) -> Term {
        Term {
            epoch,
            round: 0,
            node: NodeId(0),
        }
    }
}

impl fmt::Display for Term {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "e{}t{}.{}", self.epoch, self.round, self.node.0)
    }
}

/// A position in the log, from 1.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Slot(pub u64);

impl Slot {
    /// The slot after this one.
    pub fn next(self) -> Slot {
        Slot(self.0 + 1)
    }
}

impl fmt::Display for Slot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "#{}", self.0)
    }
}

/// What a slot holds.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Value<T> {
    /// A post (opaque to the log).
    Post(T),
    /// Nothing: a hole a new leader filled so that later slots can commit.
    Noop,
}

/// A value as written in some term.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Entry<T> {
    /// The term of the leader that wrote it.
    pub term: Term,
    /// The value.
    pub value: Value<T>,
}

/// Messages between the replicas of one partition.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum LogMessage<T> {
    /// A candidate asks for a promise and for the entries from `from`.
    Prepare {
        /// The candidate's term.
        term: Term,
        /// The first slot the candidate does not know to be committed.
        from: Slot,
    },
    /// The promise, with the replica's entries from the asked slot.
    Promise {
        /// The term promised.
        term: Term,
        /// The replica's compaction floor: slots up to it are committed and
        /// applied there, and no longer in `entries`.
        floor: Slot,
        /// Entries at or after the asked slot, in slot order; in a
        /// failover epoch's election preceded by the replica's entries of
        /// that epoch below the asked slot (at most
        /// [`replica::EPOCH_ENTRIES_BELOW_MAX`]), so that a candidate sees
        /// what a leader of the epoch wrote within its released prefix.
        entries: Vec<(Slot, Entry<T>)>,
        /// In a failover epoch's election, the prefix this replica has
        /// released when its timeline is still the one the epochs before
        /// left it ([`LogReplica::untouched`]): the candidate then knows
        /// that timeline to be a prefix of the log it recovers, and says
        /// so when it establishes the epoch, so that the replica is spared
        /// the check against the new home (`Slot(0)` when it released
        /// nothing: untouched, but not vouched for). `None` otherwise,
        /// and from nodes of a version before it.
        untouched: Option<Slot>,
    },
    /// Write `values` at `first`, `first + 1`, … in `term`; slots up to
    /// `commit` are committed.
    Accept {
        /// The leader's term.
        term: Term,
        /// The slot of the first value.
        first: Slot,
        /// The values.
        values: Vec<Value<T>>,
        /// The leader's committed prefix.
        commit: Slot,
        /// How much of what a replica held owing this failover epoch's
        /// check released before it was held the leader's log shares
        /// with it: every slot up to here (see `LogReplica::reported`).
        /// Below the first slot a leader of the epoch may have written,
        /// so 0 from a leader that cannot tell, and from nodes of a
        /// version before it.
        shared: Slot,
    },
    /// The slots `first .. first + count` are stored in `term`, and the
    /// replica has released everything up to `released`.
    Accepted {
        /// The term written in.
        term: Term,
        /// The first slot.
        first: Slot,
        /// How many.
        count: u64,
        /// The replica's own committed prefix, so the leader can resend
        /// what it missed.
        released: Slot,
    },
    /// The leader compacted the slots this replica still needs: slots up
    /// to `floor` are committed and applied there but no longer in its
    /// log, so the replica must copy the partition's timeline (a snapshot)
    /// before the log can catch it up.
    Compacted {
        /// The leader's term.
        term: Term,
        /// The leader's compaction floor.
        floor: Slot,
    },
    /// The leader of `term` asks for a home lease ([`home_lease`]).
    LeaseRequest {
        /// The leader's term.
        term: Term,
        /// The request's number within the term.
        seq: u64,
    },
    /// The home lease asked for by request `seq` of `term` is granted.
    LeaseGrant {
        /// The leader's term.
        term: Term,
        /// The request answered.
        seq: u64,
    },
    /// Refused: the replica promised `promised`, above `term`.
    Refused {
        /// The refused term.
        term: Term,
        /// The replica's promise.
        promised: Term,
    },
}

impl<T> LogMessage<T> {
    /// The term the message is about.
    pub fn term(&self) -> Term {
        match self {
            LogMessage::Prepare { term, .. }
            | LogMessage::Promise { term, .. }
            | LogMessage::Accept { term, .. }
            | LogMessage::Accepted { term, .. }
            | LogMessage::Compacted { term, .. }
            | LogMessage::LeaseRequest { term, .. }
            | LogMessage::LeaseGrant { term, .. }
            | LogMessage::Refused { term, .. } => *term,
        }
    }

    /// Whether every term and slot in it is within bounds; a replica drops
    /// messages that are not (no honest node sends one).
    pub fn is_sane(&self) -> bool {
        let slot_ok = |s: Slot| s.0 >= 1 && s.0 <= SLOT_MAX;
        self.term().is_sane()
            && match self {
                LogMessage::Prepare { from, .. } => slot_ok(*from),
                LogMessage::Promise {
                    entries, untouched, ..
                } => {
                    entries.iter().all(|(s, e)| slot_ok(*s) && e.term.is_sane())
                        && untouched.is_none_or(|s| s.0 <= SLOT_MAX)
                }
                LogMessage::Accept {
                    first,
                    values,
                    commit,
                    shared,
                    ..
                } => {
                    slot_ok(*first)
                        && (values.len() as u64) <= SLOT_MAX - first.0
                        && commit.0 <= SLOT_MAX
                        && shared.0 <= SLOT_MAX
                }
                LogMessage::Accepted {
                    first,
                    count,
                    released,
                    ..
                } => slot_ok(*first) && *count <= SLOT_MAX - first.0 && released.0 <= SLOT_MAX,
                LogMessage::Compacted { floor, .. } => floor.0 <= SLOT_MAX,
                LogMessage::LeaseRequest { .. } | LogMessage::LeaseGrant { .. } => true,
                LogMessage::Refused { promised, .. } => promised.is_sane(),
            }
    }
}

/// The highest slot; like the round bounds, far beyond use (2^62 posts)
/// and far below overflow.
pub const SLOT_MAX: u64 = 1 << 62;
/// How far beyond its own committed prefix a candidate recovers from the
/// log: a candidate further behind than this (or behind a promiser's
/// compaction floor) catches up from a snapshot before it may lead, and
/// no Promise can make it fill billions of holes.
pub const RECOVERY_SLOTS_MAX: u64 = 1 << 20;
