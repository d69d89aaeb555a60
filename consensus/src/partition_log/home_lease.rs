//! The home lease of a partition's log: the fence that lets a partition's
//! home move to another datacenter while the old home may still be alive
//! behind a cut (`specs/HomeFailover.tla`, `LEASE` and `LEASE_WAIT`).
//!
//! A leader releases slots (acknowledges and delivers them) only while it
//! holds unexpired grants from a majority of *all* the partition's
//! replicas, voters and learners of every datacenter ([`LeaseHolder`]). A
//! replica answers a Prepare of a failover epoch only once every grant it
//! gave has run out ([`LeaseGrantor`]). An election of a failover epoch
//! needs promises from a majority of all the replicas too, so the two sets
//! meet: once the new home leads, no leader of the old epoch can hold a
//! lease, and the old home releases nothing more.
//!
//! The timing is the room leases' ([`LeaseConfig`]): a holder counts
//! `lease_ms` from when it *sent* its request, a grantor keeps its promise
//! for `promise_ms` (the drift cover plus a guard) from when it answered,
//! so the grantor's promise outlasts the holder's lease whatever the
//! clocks' rates within the drift bound (`QuorumLeases.tla` checks that
//! arithmetic). A grant is matched to its request by term and sequence
//! number; a node never leads a term twice (its terms are durable), so the
//! numbers can start again with every term.

use std::collections::{BTreeMap, VecDeque};

use crate::config::LeaseConfig;
use crate::ids::NodeId;
use crate::time::Millis;

/// How many unanswered requests a holder remembers: a grant answering an
/// older one is dropped (the next renewal brings a fresh one).
const REQUESTS_REMEMBERED_MAX: usize = 16;

/// A leader's side: the grants it holds in its term.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LeaseHolder {
    /// Recent requests: sequence number and when each was sent.
    requests: VecDeque<(u64, Millis)>,
    next_seq: u64,
    last_request: Option<Millis>,
    /// Replica → end of its grant, on this node's clock.
    grants: BTreeMap<NodeId, Millis>,
}

impl LeaseHolder {
    /// A new request to send to every other replica if one is due at
    /// `now` (the first at once, then every `renew_every_ms`); this node's
    /// own grant is counted at once.
    pub fn due(&mut self, config: &LeaseConfig, me: NodeId, now: Millis) -> Option<u64> {
        let due = self
            .last_request
            .is_none_or(|last| now.since(last) >= config.renew_every_ms);
        if !due {
            return None;
        }
        self.grants.retain(|_, until| *until > now);
        let seq = self.next_seq;
        self.next_seq += 1;
        self.last_request = Some(now);
        if self.requests.len() == REQUESTS_REMEMBERED_MAX {
            self.requests.pop_front();
        }
        self.requests.push_back((seq, now));
        self.on_grant(config, me, seq);
        Some(seq)
    }

    /// `from` granted request `seq`: valid for `lease_ms` from when the
    /// request was sent, which is before the grantor started its promise.
    pub fn on_grant(&mut self, config: &LeaseConfig, from: NodeId, seq: u64) {
        let Some(&(_, sent_at)) = self.requests.iter().find(|(s, _)| *s == seq) else {
            return;
        };
        let until = sent_at.plus(config.lease_ms);
        let entry = self.grants.entry(from).or_default();
        *entry = (*entry).max(until);
    }

    /// Until when (on this clock) a majority of `replicas` keep their
    /// grants, if they do at `now`: the lease's end unless renewed.
    pub fn holds_until(&self, replicas: &[NodeId], now: Millis) -> Option<Millis> {
        let majority = replicas.len() / 2 + 1;
        let mut ends: Vec<Millis> = replicas
            .iter()
            .filter_map(|n| self.grants.get(n).copied())
            .filter(|until| *until > now)
            .collect();
        ends.sort_unstable_by(|a, b| b.cmp(a));
        ends.get(majority - 1).copied()
    }

    /// When the next renewal is due.
    pub fn next_request(&self, config: &LeaseConfig) -> Millis {
        self.last_request
            .map_or(Millis(0), |last| last.plus(config.renew_every_ms))
    }
}

/// A replica's side: how long the grants it gave still bind it. Volatile:
/// a restarted replica may have granted before it crashed, so until its
/// first reading of the clock it counts as promising, and then for one
/// whole promise from that reading (as the room grantors do after a
/// restart).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LeaseGrantor {
    /// The end of the latest promise, on this clock; `None` before the
    /// first reading of the clock since the replica was built.
    until: Option<Millis>,
}

impl LeaseGrantor {
    /// The first reading of the clock since the replica was built: honour
    /// whatever the node may have granted before, for one promise.
    pub fn start(&mut self, config: &LeaseConfig, now: Millis) {
        if self.until.is_none() {
            self.until = Some(now.plus(config.promise_ms()));
        }
    }

    /// Grants a lease at `now`.
    pub fn grant(&mut self, config: &LeaseConfig, now: Millis) {
        let until = now.plus(config.promise_ms());
        self.until = Some(self.until.map_or(until, |u| u.max(until)));
    }

    /// Whether a promise may still bind this replica at `now`.
    pub fn promising(&self, now: Millis) -> bool {
        self.until.is_none_or(|until| until > now)
    }

    /// When the last promise ends (for scheduling), if known.
    pub fn until(&self) -> Option<Millis> {
        self.until
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::time::Drift;

    fn config() -> LeaseConfig {
        LeaseConfig {
            lease_ms: 1_000,
            renew_every_ms: 250,
            guard_ms: 10,
            drift: Drift::new(500),
        }
    }

    fn nodes(ids: &[u64]) -> Vec<NodeId> {
        ids.iter().copied().map(NodeId).collect()
    }

    #[test]
    fn a_lease_counts_from_the_request_and_needs_a_majority_of_all_replicas() {
        let c = config();
        let mut h = LeaseHolder::default();
        let all = nodes(&[1, 2, 3, 4, 5]);
        let seq = h.due(&c, NodeId(1), Millis(100)).unwrap();
        assert_eq!(h.holds_until(&all, Millis(100)), None, "only its own grant");
        h.on_grant(&c, NodeId(4), seq);
        assert_eq!(h.holds_until(&all, Millis(300)), None, "two of five");
        h.on_grant(&c, NodeId(5), seq);
        assert_eq!(h.holds_until(&all, Millis(300)), Some(Millis(1_100)));
        assert_eq!(h.holds_until(&all, Millis(1_100)), None);
        // A grant for a request never sent, or for another node's set, counts nothing.
        h.on_grant(&c, NodeId(2), seq + 7);
        assert_eq!(h.holds_until(&nodes(&[1, 2, 3]), Millis(300)), None);
    }

    #[test]
    fn renewals_come_every_period_and_move_the_end() {
        let c = config();
        let mut h = LeaseHolder::default();
        let all = nodes(&[1, 2, 3]);
        let first = h.due(&c, NodeId(1), Millis(0)).unwrap();
        assert_eq!(h.due(&c, NodeId(1), Millis(249)), None);
        assert_eq!(h.next_request(&c), Millis(250));
        h.on_grant(&c, NodeId(2), first);
        let second = h.due(&c, NodeId(1), Millis(250)).unwrap();
        assert_ne!(first, second);
        h.on_grant(&c, NodeId(2), second);
        assert_eq!(h.holds_until(&all, Millis(1_100)), Some(Millis(1_250)));
        // A late grant of the first request does not shorten it.
        h.on_grant(&c, NodeId(2), first);
        assert_eq!(h.holds_until(&all, Millis(1_100)), Some(Millis(1_250)));
    }

    #[test]
    fn a_grantor_binds_for_a_promise_after_it_granted_and_after_it_started() {
        let c = config();
        let promise = c.promise_ms();
        assert!(promise > c.lease_ms);
        let mut g = LeaseGrantor::default();
        assert!(
            g.promising(Millis(0)),
            "a restarted replica may have granted"
        );
        g.start(&c, Millis(50));
        assert!(g.promising(Millis(50 + promise - 1)));
        assert!(!g.promising(Millis(50 + promise)));
        g.start(&c, Millis(10_000));
        assert!(!g.promising(Millis(10_000)), "started once");
        g.grant(&c, Millis(10_000));
        assert!(g.promising(Millis(10_000 + promise - 1)));
        assert!(!g.promising(Millis(10_000 + promise)));
        assert_eq!(g.until(), Some(Millis(10_000 + promise)));
    }
}
