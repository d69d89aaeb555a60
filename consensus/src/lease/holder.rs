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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::LeaseConfig;

    /// Three replicas, all holders; this node is n1. Lease 2,000 ms,
    /// renewed every 500 ms.
    fn config() -> ReplicaConfig {
        ReplicaConfig::three_holders(1)
    }

    fn state(revision: u64) -> Arc<RoomState> {
        Arc::new(RoomState {
            revision: Revision(revision),
            created: true,
            ..RoomState::default()
        })
    }

    fn ballot(round: u64) -> Ballot {
        Ballot {
            epoch: 0,
            round,
            node: NodeId(2),
        }
    }

    /// A wanting holder that knows revision 1 and has sent requests at 0,
    /// 500 and 1,000 ms (sequence numbers 10, 11, 12).
    fn requested() -> (ReplicaConfig, Holder) {
        let c = config();
        let mut h = Holder::restore(Some((ballot(1), state(1))), 10);
        h.set_wanted(true);
        for (at, seq) in [(0, 10), (500, 11), (1_000, 12)] {
            assert_eq!(h.due_request(&c, Millis(at)), Some(seq));
        }
        (c, h)
    }

    #[test]
    fn restore_keeps_the_known_state_and_numbers_requests_from_the_base() {
        let c = config();
        let mut h = Holder::restore(Some((ballot(3), state(7))), 40);
        assert_eq!(h.known(), Some(&(ballot(3), state(7))));
        assert!(!h.wanted());
        h.set_wanted(true);
        assert!(h.wanted());
        assert_eq!(h.due_request(&c, Millis(0)), Some(40));
        assert_eq!(h.due_request(&c, Millis(500)), Some(41));
    }

    #[test]
    fn requests_are_due_every_renewal_period_while_wanted() {
        let c = config();
        let mut h = Holder::restore(None, 0);
        assert_eq!(h.next_request(&c), None, "not wanted");
        assert_eq!(h.due_request(&c, Millis(0)), None, "not wanted");
        h.set_wanted(true);
        assert_eq!(h.next_request(&c), Some(Millis(0)), "due at once");
        assert_eq!(h.due_request(&c, Millis(100)), Some(0));
        assert_eq!(h.next_request(&c), Some(Millis(600)));
        assert_eq!(h.due_request(&c, Millis(599)), None);
        // Wanting again changes nothing: no early renewal.
        h.set_wanted(true);
        assert_eq!(h.due_request(&c, Millis(599)), None);
        assert_eq!(h.due_request(&c, Millis(600)), Some(1));
        // Stopping forgets the last request: wanted again, one is due at
        // once.
        h.set_wanted(false);
        assert!(!h.wanted());
        assert_eq!(h.next_request(&c), None);
        assert_eq!(h.due_request(&c, Millis(700)), None);
        h.set_wanted(true);
        assert_eq!(h.next_request(&c), Some(Millis(0)));
        assert_eq!(h.due_request(&c, Millis(700)), Some(2));
    }

    #[test]
    fn a_node_that_is_not_a_holder_never_requests() {
        let c = ReplicaConfig {
            holders: vec![NodeId(2), NodeId(3)],
            ..config()
        };
        let mut h = Holder::restore(None, 0);
        h.set_wanted(true);
        assert_eq!(h.due_request(&c, Millis(0)), None);
        assert_eq!(h.next_request(&c), None);
        assert_eq!(h.read(&c, Millis(0)), Err(ReadError::NotHolder));
    }

    #[test]
    fn a_lease_is_a_majority_of_grants_counted_from_each_request() {
        let (c, mut h) = requested();
        assert_eq!(h.read(&c, Millis(1_000)), Err(ReadError::NoLease));
        h.on_grant(&c, NodeId(1), 10, None); // until 2,000
        assert!(!h.holds(&c, Millis(1_000)), "one grant of three");
        h.on_grant(&c, NodeId(2), 11, None); // until 2,500
        h.on_grant(&c, NodeId(3), 12, None); // until 3,000
        assert!(h.holds(&c, Millis(1_000)));
        assert_eq!(h.read(&c, Millis(1_000)), Ok(&state(1)));
        // Two grants beyond 1,999, ending at 2,500 and 3,000: the read
        // stays valid until the second of them ends.
        assert_eq!(h.readable_until(&c, Millis(1_999)), Some(Millis(2_500)));
        assert_eq!(h.readable_until(&c, Millis(2_000)), Some(Millis(2_500)));
        // A renewal request keeps the grants that are still running.
        assert_eq!(h.due_request(&c, Millis(1_500)), Some(13));
        assert!(h.holds(&c, Millis(1_500)));
        assert!(h.holds(&c, Millis(2_499)));
        // A grant that ends at `now` no longer counts.
        assert!(!h.holds(&c, Millis(2_500)));
        assert_eq!(h.readable_until(&c, Millis(2_500)), None);
        assert_eq!(h.read(&c, Millis(2_500)), Err(ReadError::NoLease));
    }

    #[test]
    fn readable_until_is_the_majority_th_latest_end_in_a_set_of_five() {
        let c = ReplicaConfig {
            replicas: (1..=5).map(NodeId).collect(),
            holders: (1..=5).map(NodeId).collect(),
            ..config()
        };
        let mut h = Holder::restore(Some((ballot(1), state(1))), 0);
        h.set_wanted(true);
        for at in [0, 500, 1_000, 1_500, 2_000] {
            assert!(h.due_request(&c, Millis(at)).is_some());
        }
        for (from, seq) in [(1, 0), (2, 1), (3, 2), (4, 3), (5, 4)] {
            h.on_grant(&c, NodeId(from), seq, None);
        }
        // Ends 2,000 … 4,000; three are needed, so the third latest.
        assert_eq!(h.readable_until(&c, Millis(2_100)), Some(Millis(3_000)));
    }

    #[test]
    fn a_holder_remembers_its_last_sixteen_requests() {
        // Renewals every millisecond, so that every request is recent.
        let c = ReplicaConfig {
            lease: LeaseConfig {
                renew_every_ms: 1,
                ..LeaseConfig::default()
            },
            ..config()
        };
        let mut h = Holder::restore(Some((ballot(1), state(1))), 0);
        h.set_wanted(true);
        for at in 0..=16 {
            assert_eq!(h.due_request(&c, Millis(at)), Some(at));
        }
        let now = Millis(16);
        // Request 0 was the 17th from last: forgotten, its grants ignored.
        let mut forgotten = h.clone();
        forgotten.on_grant(&c, NodeId(2), 0, None);
        forgotten.on_grant(&c, NodeId(3), 0, None);
        assert_eq!(forgotten.read(&c, now), Err(ReadError::NoLease));
        // Request 1 is the oldest one remembered.
        h.on_grant(&c, NodeId(2), 1, None);
        h.on_grant(&c, NodeId(3), 1, None);
        assert_eq!(h.read(&c, now), Ok(&state(1)));
        assert_eq!(
            h.readable_until(&c, now),
            Some(Millis(1 + c.lease.lease_ms))
        );
    }

    #[test]
    fn a_newer_accepted_value_blocks_reads_until_its_commit_is_learned() {
        let (c, mut h) = requested();
        h.on_grant(&c, NodeId(2), 12, None);
        h.on_grant(&c, NodeId(3), 12, None);
        assert!(!h.is_pending());
        h.on_accept_seen(ballot(1), Revision(1));
        assert!(!h.is_pending(), "not newer than the known revision");
        h.on_accept_seen(ballot(2), Revision(2));
        assert!(h.is_pending());
        assert_eq!(h.read(&c, Millis(1_000)), Err(ReadError::Pending));
        assert_eq!(h.readable_until(&c, Millis(1_000)), None);
        assert!(h.learn(ballot(2), &state(2)));
        assert!(!h.is_pending());
        assert_eq!(h.read(&c, Millis(1_000)), Ok(&state(2)));
        // A grant reporting a newer accepted value blocks reads too.
        h.on_grant(&c, NodeId(1), 12, Some((ballot(3), Revision(3))));
        assert!(h.is_pending());
    }
}
