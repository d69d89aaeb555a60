//! Harness code shared by the model check (`model_check.rs`) and the
//! randomized simulation (`simulation.rs`): cluster configuration, the
//! catalogue of proposed changes, and the *oracle* that watches what the real
//! core persists and replies and checks the protocol's invariants.
//!
//! The oracle never looks inside a replica. It sees exactly what a node would
//! see from the outside — the acceptor state handed over in
//! [`Ready::persist`](saferchat_consensus::Ready), the replies, and the result
//! of [`RoomReplica::read`](saferchat_consensus::RoomReplica::read) — and
//! checks these properties, named like their TLA+ counterparts:
//!
//! - `Agreement`: at most one value is chosen per revision, where a value is
//!   *chosen* once a majority of acceptors accepted it at one ballot.
//! - `LinearHistory`: chosen values form one chain. Every chosen value is the
//!   result of applying proposed changes, one after another, to the room that
//!   was never created (it is replayed from the change ids it records), and of
//!   any two chosen values the older one's history is a prefix of the newer
//!   one's. In particular a value chosen at revision `r + 1` is a proposed
//!   change applied to the value chosen at revision `r`. (A value records
//!   its last 64 changes; runs stay below that, so the record is whole.)
//! - `LeaseReadSafety`: a local read that succeeds returns a value that has
//!   every value committed before the read (reported to a caller in a
//!   `Decided` reply) as a prefix of its history: the same history, at the
//!   same or a later revision. This is the TLA+ property word for word; a
//!   check of the revision alone would accept a read of a forked history.
//! - `CommittedChosen`: every `Decided` reply carries a chosen value, and
//!   the change's own result agrees with that value's recorded history.
//! - `OneValuePerBallot`: no two acceptors accept different values at the
//!   same ballot. Not a property a client sees, but the inductive invariant
//!   `Agreement` rests on (as in the TLA+ `Voting` specification); checking
//!   it catches a reused ballot long before two chosen values diverge.

// Each test binary compiles this module separately and uses a different
// subset of it.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;

use bytes::Bytes;
use saferchat_consensus::{
    AcceptorState, Ballot, Change, ChangeError, ChangeId, Handle, LeaseConfig, NodeId, Outcome,
    Proposal, ProposerConfig, PublicKey, ReplicaConfig, Revision, RoomState, apply,
};

/// A member handle derived from a short name.
pub fn handle(name: &str) -> Handle {
    Handle::of_modulus(name.as_bytes())
}

/// A fake public key for `name` (the core treats keys as opaque bytes).
pub fn key(name: &str) -> PublicKey {
    PublicKey::new(Bytes::from(format!("key-of-{name}").into_bytes()))
}

/// The configuration of node `me` in a cluster of nodes `1..=n`, all of them
/// acceptors and lease holders.
pub fn config(me: u64, n: u64, lease: LeaseConfig, proposer: ProposerConfig) -> ReplicaConfig {
    let ids: Vec<NodeId> = (1..=n).map(NodeId).collect();
    ReplicaConfig {
        me: NodeId(me),
        replicas: ids.clone(),
        epoch: 0,
        holders: ids,
        lease,
        proposer,
    }
}

/// Every change proposed in one run, by id, so that a value's recorded
/// history can be replayed, with how many times each was proposed.
#[derive(Clone, Debug, Default)]
pub struct Catalog(BTreeMap<ChangeId, (Proposal, u32)>);

impl Catalog {
    /// Registers a proposal (a retry registers the same proposal again).
    pub fn add(&mut self, proposal: &Proposal) {
        let entry = self.0.entry(proposal.id).or_insert((proposal.clone(), 0));
        assert_eq!(entry.0, *proposal, "one change id, two changes");
        entry.1 += 1;
    }

    /// The proposal with this id.
    pub fn get(&self, id: ChangeId) -> Option<&Proposal> {
        self.0.get(&id).map(|(p, _)| p)
    }

    /// Whether the change was proposed more than once (retried).
    pub fn retried(&self, id: ChangeId) -> bool {
        self.0.get(&id).is_some_and(|(_, n)| *n > 1)
    }
}

/// A broken invariant: which property and what exactly happened.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Violation {
    /// The property's name, as in the TLA+ specification.
    pub property: &'static str,
    /// A human-readable account.
    pub detail: Arc<str>,
}

impl Violation {
    fn new(property: &'static str, detail: String) -> Violation {
        Violation {
            property,
            detail: detail.into(),
        }
    }
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} violated: {}", self.property, self.detail)
    }
}

/// Property names.
pub const AGREEMENT: &str = "Agreement";
/// See the module documentation.
pub const LINEAR_HISTORY: &str = "LinearHistory";
/// See the module documentation.
pub const LEASE_READ_SAFETY: &str = "LeaseReadSafety";
/// See the module documentation.
pub const COMMITTED_CHOSEN: &str = "CommittedChosen";
/// See the module documentation.
pub const ONE_VALUE_PER_BALLOT: &str = "OneValuePerBallot";

/// One (ballot, value) pair and the acceptors that accepted it.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct Vote {
    ballot: Ballot,
    value: Arc<RoomState>,
    /// Bit `n` set: node `NodeId(n)` accepted.
    voters: u64,
}

/// The oracle: every accept ever persisted, the values chosen so far, and
/// the highest committed revision.
///
/// Kept in the model checker's state, hence `Clone + Eq + Hash`.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct History {
    majority: usize,
    /// Per map epoch, the acceptor set (bit `n`: node `n`), for histories
    /// whose acceptor set changes: a value is chosen at a ballot once a
    /// majority of the ballot's epoch's set accepted it. Empty: every
    /// acceptor is in one set of `majority`.
    sets: BTreeMap<u64, u64>,
    votes: Vec<Vote>,
    /// Distinct chosen values, in the order they became chosen.
    chosen: Vec<Arc<RoomState>>,
    /// The newest value any round committed (the committed values form one
    /// chain, which `LinearHistory` checks, so the newest has every other
    /// as a prefix).
    committed_newest: Option<Arc<RoomState>>,
}

impl History {
    /// An empty history for a cluster with this majority.
    pub fn new(majority: usize) -> History {
        History {
            majority,
            sets: BTreeMap::new(),
            votes: Vec::new(),
            chosen: Vec::new(),
            committed_newest: None,
        }
    }

    /// An empty history whose acceptor set depends on the ballot's epoch
    /// (`sets`: epoch → bit set of nodes; an epoch missing from it has no
    /// acceptors, so nothing is chosen in it).
    pub fn with_sets(sets: BTreeMap<u64, u64>) -> History {
        History {
            sets,
            ..History::new(usize::MAX)
        }
    }

    /// Whether `voters` are enough to choose a value at `ballot`.
    fn is_quorum(&self, ballot: Ballot, voters: u64) -> bool {
        if self.sets.is_empty() {
            return voters.count_ones() as usize >= self.majority;
        }
        self.sets
            .get(&ballot.epoch)
            .is_some_and(|set| (voters & set).count_ones() > set.count_ones() / 2)
    }

    /// The highest revision any round committed.
    pub fn committed_max(&self) -> Revision {
        self.committed_newest
            .as_ref()
            .map_or(Revision(0), |state| state.revision)
    }

    /// The distinct chosen values, oldest first.
    pub fn chosen(&self) -> &[Arc<RoomState>] {
        &self.chosen
    }

    /// Number of distinct (ballot, value) pairs accepted anywhere.
    pub fn vote_count(&self) -> usize {
        self.votes.len()
    }

    /// `node` made `state` durable. Records its accept, if any, and checks
    /// the value if it just became chosen.
    ///
    /// # Errors
    /// `Agreement` or `LinearHistory` when a newly chosen value breaks them.
    pub fn on_persist(
        &mut self,
        node: NodeId,
        state: &AcceptorState,
        catalog: &Catalog,
    ) -> Result<(), Violation> {
        let Some((ballot, value)) = &state.accepted else {
            return Ok(());
        };
        let bit = 1u64 << node.0;
        let index = match self
            .votes
            .iter()
            .position(|v| v.ballot == *ballot && v.value == *value)
        {
            Some(index) => index,
            None => {
                if let Some(other) = self.votes.iter().find(|v| v.ballot == *ballot) {
                    return Err(Violation::new(
                        ONE_VALUE_PER_BALLOT,
                        format!(
                            "{node} accepted {:?} at ballot {ballot}, which others accepted with {:?}",
                            value.recent, other.value.recent
                        ),
                    ));
                }
                self.votes.push(Vote {
                    ballot: *ballot,
                    value: Arc::clone(value),
                    voters: 0,
                });
                self.votes.len() - 1
            }
        };
        self.votes[index].voters |= bit;
        let is_chosen = self.is_quorum(*ballot, self.votes[index].voters);
        if is_chosen && !self.chosen.contains(value) {
            self.check_new_chosen(*ballot, value, catalog)?;
            self.chosen.push(Arc::clone(value));
        }
        Ok(())
    }

    fn check_new_chosen(
        &self,
        ballot: Ballot,
        value: &Arc<RoomState>,
        catalog: &Catalog,
    ) -> Result<(), Violation> {
        if let Some(other) = self
            .chosen
            .iter()
            .find(|c| c.revision == value.revision && **c != *value)
        {
            return Err(Violation::new(
                AGREEMENT,
                format!(
                    "two values chosen at revision {}: {:?} and, at ballot {ballot}, {:?}",
                    value.revision, other.recent, value.recent
                ),
            ));
        }
        replay(value, catalog).map_err(|why| {
            Violation::new(
                LINEAR_HISTORY,
                format!("value chosen at ballot {ballot} is not a replay of its changes: {why}"),
            )
        })?;
        for other in &self.chosen {
            let (older, newer) = if other.revision <= value.revision {
                (&**other, &**value)
            } else {
                (&**value, &**other)
            };
            if !is_prefix(older, newer) {
                return Err(Violation::new(
                    LINEAR_HISTORY,
                    format!(
                        "chosen histories fork: {:?} (rev {}) vs {:?} (rev {}), the latter chosen at ballot {ballot}",
                        older.recent, older.revision, newer.recent, newer.revision
                    ),
                ));
            }
        }
        Ok(())
    }

    /// A reply reached the caller of `proposal`.
    ///
    /// Deduplication by change id only covers outcomes that changed the
    /// room: a change that was a no-op or failed is not recorded, so a retry
    /// of it is evaluated afresh and may apply later, possibly in the same
    /// batch. For a retried change the value may therefore record the id
    /// even though this reply says it changed nothing.
    ///
    /// # Errors
    /// `CommittedChosen` when the reply does not match the chosen values.
    pub fn on_reply(
        &mut self,
        proposal: &Proposal,
        outcome: &Outcome,
        catalog: &Catalog,
    ) -> Result<(), Violation> {
        let Outcome::Decided { result, state } = outcome else {
            return Ok(());
        };
        let fail = |why: String| Err(Violation::new(COMMITTED_CHOSEN, why));
        if !self.chosen.contains(state) {
            return fail(format!(
                "change {:?} decided with a value that is not chosen: {:?} rev {}",
                proposal.id, state.recent, state.revision
            ));
        }
        let recorded = state.recent.iter().find(|(id, _)| *id == proposal.id);
        let retried = catalog.retried(proposal.id);
        match (result, recorded) {
            (Ok(applied), Some((_, revision)))
                if applied.changed && applied.revision == *revision => {}
            (Ok(applied), Some((_, revision)))
                if !applied.changed && retried && applied.revision < *revision => {}
            (Err(_), Some(_)) if retried => {}
            (Ok(applied), None) if !applied.changed && applied.revision <= state.revision => {}
            (Err(ChangeError::RevisionMismatch { current }), None)
                if *current <= state.revision => {}
            (Err(e), None) if !matches!(e, ChangeError::RevisionMismatch { .. }) => {}
            _ => {
                return fail(format!(
                    "change {:?} ({:?}) decided as {result:?}, but the value records {recorded:?}",
                    proposal.id, proposal.change
                ));
            }
        }
        if self.committed_max() < state.revision {
            self.committed_newest = Some(Arc::clone(state));
        }
        Ok(())
    }

    /// `node` served a local read of `state`.
    ///
    /// # Errors
    /// `LeaseReadSafety` when some committed value is not a prefix of the
    /// value read.
    pub fn check_read(&self, node: NodeId, state: &RoomState) -> Result<(), Violation> {
        let Some(committed) = &self.committed_newest else {
            return Ok(());
        };
        if state.revision < committed.revision {
            return Err(Violation::new(
                LEASE_READ_SAFETY,
                format!(
                    "{node} read revision {} locally after revision {} committed",
                    state.revision, committed.revision
                ),
            ));
        }
        if !is_prefix(committed, state) {
            return Err(Violation::new(
                LEASE_READ_SAFETY,
                format!(
                    "{node} read {:?} (rev {}) locally, which does not extend the committed {:?} (rev {})",
                    state.recent, state.revision, committed.recent, committed.revision
                ),
            ));
        }
        Ok(())
    }
}

/// Whether `older`'s recorded history is a prefix of `newer`'s: the changes
/// `newer` records up to `older`'s revision are exactly `older`'s.
fn is_prefix(older: &RoomState, newer: &RoomState) -> bool {
    older.revision <= newer.revision
        && newer
            .recent
            .iter()
            .filter(|(_, r)| *r <= older.revision)
            .eq(older.recent.iter())
}

/// Replays a value's recorded history from the room nobody created and
/// checks that the result is the value itself.
fn replay(value: &RoomState, catalog: &Catalog) -> Result<(), String> {
    let mut state = RoomState::absent();
    for (id, revision) in &value.recent {
        let proposal = catalog
            .get(*id)
            .ok_or_else(|| format!("change {id:?} was never proposed"))?;
        match apply(&mut state, proposal) {
            Ok(applied) if applied.changed && applied.revision == *revision => {}
            other => return Err(format!("change {id:?} replays as {other:?}")),
        }
    }
    if state != *value {
        return Err(format!(
            "replay gives rev {} {:?}, value is rev {} {:?}",
            state.revision, state.members, value.revision, value.members
        ));
    }
    Ok(())
}

/// A proposal with the given id and change.
pub fn proposal(id: u128, change: Change) -> Proposal {
    Proposal {
        id: ChangeId(id),
        change,
        expected: None,
    }
}
