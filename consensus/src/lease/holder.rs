//! The holder side of quorum leases: when a local read is safe.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;

use crate::config::ReplicaConfig;
use crate::ids::{Ballot, NodeId, Revision};
use crate::room::RoomState;
use crate::time::Millis;

/// How many unanswered lease requests a holder remembers.
const REQUESTS_REMEMBERED_MAX: usize = 16;

/// Why a local read is not allowed right now.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ReadError {
    /// This node is not configured as a lease holder.
    #[error("this node does not hold leases for the room")]
    NotHolder,
    /// Fewer than a majority of grants are unexpired.
    #[error("no valid lease (fewer than a majority of unexpired grants)")]
    NoLease,
    /// An accepted change newer than the local copy may be committing.
    #[error("a membership change is in progress")]
    Pending,
    /// The local copy has never been learned.
    #[error("membership not known locally yet")]
    Unknown,
}

/// One room's lease holder state on one node. Volatile: a restarted node
/// holds no grants.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct Holder {
    /// Whether the node asks for leases on this room.
    wanted: bool,
    /// Grantor → end of its grant, on this node's clock.
    grants: BTreeMap<NodeId, Millis>,
    /// Recent requests: sequence number and when each was sent.
    requests: VecDeque<(u64, Millis)>,
    /// The next request's sequence number. Starts at a base that differs
    /// per incarnation (see [`Holder::restore`]).
    next_seq: u64,
    last_request: Option<Millis>,
    /// The newest committed state this node knows, and its ballot.
    known: Option<(Ballot, Arc<RoomState>)>,
    /// Set when an accepted value newer than `known` was seen; cleared by
    /// learning a commit at this ballot or above.
    pending: Option<Ballot>,
}

impl Holder {
    /// A holder that starts from a committed state read from local storage
    /// (possibly stale: grants will tell), numbering its lease requests
    /// from `seq_base`.
    ///
    /// A grant is matched to the request it answers by sequence number
    /// alone, and the lease is counted from when that request was sent. A
    /// grant answering the previous incarnation's request may still be in
    /// flight after a restart; were the numbers to restart at zero, it
    /// would be taken as an answer to the new request with the same number
    /// and the lease would run from too late a start (and with too old an
    /// accepted revision). The caller therefore passes a base that differs
    /// between incarnations of the node — the node draws it at random, so
    /// two incarnations share a number with probability about
    /// requests² / 2⁶⁴.
    pub fn restore(known: Option<(Ballot, Arc<RoomState>)>, seq_base: u64) -> Holder {
        Holder {
            known,
            next_seq: seq_base,
            ..Holder::default()
        }
    }

    /// After a restart: until a commit at `ballot` or above is learned, act
    /// as if an accept at `ballot` were pending.
    ///
    /// Before the restart this node may have answered accepts as a holder
    /// (which proposers count as its acknowledgement) and then lost the
    /// pending mark with its memory. Every accept it answered carried a
    /// ballot at or below its acceptor's durable promise, so that promise
    /// covers them all.
    pub fn assume_pending(&mut self, ballot: Ballot) {
        self.mark_pending(ballot);
    }

    /// The newest committed state known here.
    pub fn known(&self) -> Option<&(Ballot, Arc<RoomState>)> {
        self.known.as_ref()
    }

    /// Starts or stops asking for leases.
    pub fn set_wanted(&mut self, wanted: bool) {
        self.wanted = wanted;
        if !wanted {
            self.last_request = None;
        }
    }

    /// Whether this node asks for leases.
    pub fn wanted(&self) -> bool {
        self.wanted
    }

    fn is_newer(&self, revision: Revision) -> bool {
        self.known
            .as_ref()
            .is_none_or(|(_, state)| revision > state.revision)
    }

    fn mark_pending(&mut self, ballot: Ballot) {
        self.pending = Some(self.pending.map_or(ballot, |p| p.max(ballot)));
    }

    /// An accept passed through this node: if it carries something newer
    /// than the local copy, stop local reads until its fate is known. This
    /// happens before the node answers the accept, which is what lets a
    /// proposer count the answer as the holder's acknowledgement.
    pub fn on_accept_seen(&mut self, ballot: Ballot, revision: Revision) {
        if self.is_newer(revision) {
            self.mark_pending(ballot);
        }
    }

    /// A grant arrived. Valid for `lease_ms` from when the request was
    /// *sent*, which is before the grantor started its (longer) promise.
    pub fn on_grant(
        &mut self,
        config: &ReplicaConfig,
        from: NodeId,
        seq: u64,
        accepted: Option<(Ballot, Revision)>,
    ) {
        let Some(&(_, sent_at)) = self.requests.iter().find(|(s, _)| *s == seq) else {
            return; // an answer to a request this holder no longer remembers
        };
        if let Some((ballot, revision)) = accepted
            && self.is_newer(revision)
        {
            self.mark_pending(ballot);
        }
        let until = sent_at.plus(config.lease.lease_ms);
        let entry = self.grants.entry(from).or_default();
        *entry = (*entry).max(until);
    }

    /// A committed state was learned. Returns whether the local copy moved.
    pub fn learn(&mut self, ballot: Ballot, value: &Arc<RoomState>) -> bool {
        if self.pending.is_some_and(|p| p <= ballot) {
            // Whatever was accepted at or below `ballot` is either part of
            // this value's history or was never chosen.
            self.pending = None;
        }
        if self.is_newer(value.revision) {
            self.known = Some((ballot, Arc::clone(value)));
            true
        } else {
            false
        }
    }

    /// The local copy, if a local read is linearizable at `now`.
    ///
    /// # Errors
    /// The [`ReadError`] saying why not.
    pub fn read(&self, config: &ReplicaConfig, now: Millis) -> Result<&Arc<RoomState>, ReadError> {
        if !config.is_holder(config.me) {
            return Err(ReadError::NotHolder);
        }
        if !self.holds(config, now) {
            return Err(ReadError::NoLease);
        }
        if self.pending.is_some() {
            return Err(ReadError::Pending);
        }
        self.known
            .as_ref()
            .map(|(_, state)| state)
            .ok_or(ReadError::Unknown)
    }

    /// Until when (on this clock) a local read stays valid if nothing else
    /// arrives: the point at which fewer than a majority of the current
    /// grants remain. `None` when a read is not valid at `now`.
    pub fn readable_until(&self, config: &ReplicaConfig, now: Millis) -> Option<Millis> {
        self.read(config, now).ok()?;
        let mut ends: Vec<Millis> = self.grants.values().copied().filter(|t| *t > now).collect();
        ends.sort_unstable_by(|a, b| b.cmp(a));
        ends.get(config.majority() - 1).copied()
    }

    /// Whether a majority of grants are unexpired at `now`.
    pub fn holds(&self, config: &ReplicaConfig, now: Millis) -> bool {
        let valid = self.grants.values().filter(|until| **until > now).count();
        valid >= config.majority()
    }

    /// Whether a read is blocked by a pending change.
    pub fn is_pending(&self) -> bool {
        self.pending.is_some()
    }

    /// A new lease request to broadcast, if one is due.
    pub fn due_request(&mut self, config: &ReplicaConfig, now: Millis) -> Option<u64> {
        self.grants.retain(|_, until| *until > now);
        if !self.wanted || !config.is_holder(config.me) {
            return None;
        }
        let due = self
            .last_request
            .is_none_or(|last| now.since(last) >= config.lease.renew_every_ms);
        if !due {
            return None;
        }
        let seq = self.next_seq;
        self.next_seq = self.next_seq.wrapping_add(1);
        self.last_request = Some(now);
        if self.requests.len() == REQUESTS_REMEMBERED_MAX {
            self.requests.pop_front();
        }
        self.requests.push_back((seq, now));
        Some(seq)
    }

    /// When the next renewal is due.
    pub fn next_request(&self, config: &ReplicaConfig) -> Option<Millis> {
        if !self.wanted || !config.is_holder(config.me) {
            return None;
        }
        Some(
            self.last_request
                .map_or(Millis(0), |last| last.plus(config.lease.renew_every_ms)),
        )
    }
}
