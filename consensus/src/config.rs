//! Static configuration of one room's replica set: who votes, who may hold
//! read leases, and every timing constant the protocol depends on.

use crate::ids::NodeId;
use crate::time::Drift;

/// Lease timing. Every constant that lease safety depends on is here.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct LeaseConfig {
    /// How long a holder may read locally after it *sent* a lease request,
    /// on its own clock.
    pub lease_ms: u64,
    /// How often a holder asks for fresh grants; well below `lease_ms` so
    /// that a lease never lapses while everyone is healthy.
    pub renew_every_ms: u64,
    /// Added to every promise a grantor keeps and every wait a proposer
    /// makes, for clock granularity and scheduling slop.
    pub guard_ms: u64,
    /// The bound on clock rate drift.
    pub drift: Drift,
}

impl LeaseConfig {
    /// How long a grantor keeps a promise after granting, on its own clock:
    /// long enough to outlast the holder's `lease_ms` whatever the drift.
    pub fn promise_ms(&self) -> u64 {
        self.drift.cover(self.lease_ms) + self.guard_ms
    }

    /// Whether a grant from this node covers a holder that reads for
    /// `lease_ms` after its request: this node's promise, and the recovery
    /// window it keeps after a restart, both last `promise_ms`, which
    /// outlasts any lease up to its own `lease_ms`. Zero is refused: no
    /// holder reads for no time, and a peer that sends no value is not to
    /// be trusted with one.
    pub fn covers(&self, lease_ms: u64) -> bool {
        lease_ms > 0 && lease_ms <= self.lease_ms
    }

    /// How long a proposer must wait, on its own clock, for a promise that
    /// a grantor said has `remaining_ms` left on the grantor's clock.
    ///
    /// The cover here is defence in depth, not needed for safety while
    /// promises carry theirs: with ρ the drift bound, a promise made at real
    /// time `g` and reported with `r` left was reported no earlier than
    /// `g + (P - r)/(1 + ρ)`, and the wait ends no earlier than `r/(1 + ρ)`
    /// after that, so the write commits no earlier than
    /// `g + P/(1 + ρ) = g + lease_ms/(1 - ρ)` (`P = promise_ms`), when the
    /// holder's lease, counted from its request before `g`, has ended. A
    /// mutant without it survives every check for this reason; it costs
    /// 0.1% of a wait at the default bound.
    pub fn wait_ms(&self, remaining_ms: u64) -> u64 {
        self.drift.cover(remaining_ms) + self.guard_ms
    }
}

impl Default for LeaseConfig {
    fn default() -> LeaseConfig {
        LeaseConfig {
            lease_ms: 2_000,
            renew_every_ms: 500,
            guard_ms: 10,
            // 500 ppm is the most NTP ever slews a clock; a free-running
            // quartz oscillator drifts a few tens of ppm.
            drift: Drift::new(500),
        }
    }
}

/// Proposer timing.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ProposerConfig {
    /// A round that has not reached a quorum after this long is abandoned
    /// and retried with a higher ballot.
    pub round_timeout_ms: u64,
    /// A request not committed after this long fails with `Unavailable`.
    pub request_timeout_ms: u64,
    /// Base of the randomised back-off between retries after preemption.
    pub backoff_ms: u64,
    /// Most changes one round carries.
    pub batch_max: usize,
}

impl Default for ProposerConfig {
    fn default() -> ProposerConfig {
        ProposerConfig {
            round_timeout_ms: 500,
            request_timeout_ms: 5_000,
            backoff_ms: 20,
            batch_max: 256,
        }
    }
}

/// A room's replica set as seen from one node.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct ReplicaConfig {
    /// This node.
    pub me: NodeId,
    /// Every acceptor, sorted, `me` among them.
    pub replicas: Vec<NodeId>,
    /// The map epoch of this acceptor set (the room's partition epoch):
    /// this node proposes, accepts and grants leases only in it (see
    /// [`Ballot`](crate::Ballot)).
    pub epoch: u64,
    /// The replicas that hold read leases (one per datacenter, or all of a
    /// single-datacenter set). Writes wait for every unexpired holder.
    pub holders: Vec<NodeId>,
    /// Lease timing.
    pub lease: LeaseConfig,
    /// Proposer timing.
    pub proposer: ProposerConfig,
}

/// What is wrong with a replica configuration.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    /// The replica list is empty, unsorted or repeats a node.
    #[error("replicas must be a non-empty sorted list of distinct node ids")]
    Replicas,
    /// This node is not one of the replicas.
    #[error("this node ({0}) is not one of the replicas")]
    NotAReplica(NodeId),
    /// A lease holder is not a replica.
    #[error("lease holder {0} is not a replica")]
    HolderNotReplica(NodeId),
    /// Lease timings are inconsistent.
    #[error("lease timing: renew_every_ms must be > 0 and < lease_ms / 2")]
    LeaseTiming,
}

impl ReplicaConfig {
    /// A replica set of one: the embedded single-node deployment.
    pub fn single(me: NodeId) -> ReplicaConfig {
        ReplicaConfig {
            me,
            replicas: vec![me],
            // The cluster map's first epoch (a single node's rooms never
            // move).
            epoch: 1,
            holders: vec![me],
            lease: LeaseConfig::default(),
            proposer: ProposerConfig::default(),
        }
    }

    /// Checks the configuration.
    ///
    /// # Errors
    /// The first [`ConfigError`] found.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.replicas.is_empty() || !self.replicas.windows(2).all(|w| w[0] < w[1]) {
            return Err(ConfigError::Replicas);
        }
        if !self.replicas.contains(&self.me) {
            return Err(ConfigError::NotAReplica(self.me));
        }
        if let Some(h) = self.holders.iter().find(|h| !self.replicas.contains(h)) {
            return Err(ConfigError::HolderNotReplica(*h));
        }
        if self.lease.renew_every_ms == 0 || self.lease.renew_every_ms >= self.lease.lease_ms / 2 {
            return Err(ConfigError::LeaseTiming);
        }
        Ok(())
    }

    /// Votes needed for a quorum.
    pub fn majority(&self) -> usize {
        self.replicas.len() / 2 + 1
    }

    /// Whether `node` may hold leases.
    pub fn is_holder(&self, node: NodeId) -> bool {
        self.holders.contains(&node)
    }

    /// Whether a restarted grantor must assume it promised someone: false
    /// only when the sole possible holder is this node itself, whose lease
    /// state died in the same restart.
    pub fn may_have_promised_others(&self) -> bool {
        self.holders.iter().any(|h| *h != self.me)
    }
}

#[cfg(test)]
impl ReplicaConfig {
    /// Three replicas, every one a lease holder, default timings, as seen
    /// from node `me` (for unit tests).
    pub(crate) fn three_holders(me: u64) -> ReplicaConfig {
        let all = vec![NodeId(1), NodeId(2), NodeId(3)];
        ReplicaConfig {
            me: NodeId(me),
            replicas: all.clone(),
            epoch: 0,
            holders: all,
            lease: LeaseConfig::default(),
            proposer: ProposerConfig::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn three() -> ReplicaConfig {
        ReplicaConfig::three_holders(2)
    }

    #[test]
    fn validates() {
        assert_eq!(three().validate(), Ok(()));
        assert_eq!(ReplicaConfig::single(NodeId(7)).validate(), Ok(()));
        assert_eq!(
            ReplicaConfig {
                me: NodeId(9),
                ..three()
            }
            .validate(),
            Err(ConfigError::NotAReplica(NodeId(9)))
        );
        assert_eq!(
            ReplicaConfig {
                replicas: vec![NodeId(2), NodeId(1)],
                ..three()
            }
            .validate(),
            Err(ConfigError::Replicas)
        );
        assert_eq!(
            ReplicaConfig {
                holders: vec![NodeId(4)],
                ..three()
            }
            .validate(),
            Err(ConfigError::HolderNotReplica(NodeId(4)))
        );
        let mut bad = three();
        bad.lease.renew_every_ms = bad.lease.lease_ms;
        assert_eq!(bad.validate(), Err(ConfigError::LeaseTiming));
    }

    #[test]
    fn majorities() {
        assert_eq!(ReplicaConfig::single(NodeId(1)).majority(), 1);
        assert_eq!(three().majority(), 2);
    }

    #[test]
    fn grants_cover_leases_up_to_the_grantors_own() {
        let lease = LeaseConfig::default();
        assert!(lease.covers(lease.lease_ms));
        assert!(lease.covers(1));
        assert!(!lease.covers(lease.lease_ms + 1));
        assert!(!lease.covers(0));
    }

    #[test]
    fn promises_outlast_leases() {
        let lease = LeaseConfig::default();
        assert!(lease.promise_ms() > lease.lease_ms);
        assert!(!ReplicaConfig::single(NodeId(1)).may_have_promised_others());
        assert!(three().may_have_promised_others());
    }

    #[test]
    fn replica_lists_must_be_non_empty_and_strictly_sorted() {
        assert_eq!(
            ReplicaConfig {
                replicas: vec![],
                holders: vec![],
                ..three()
            }
            .validate(),
            Err(ConfigError::Replicas)
        );
        assert_eq!(
            ReplicaConfig {
                replicas: vec![NodeId(1), NodeId(2), NodeId(2), NodeId(3)],
                ..three()
            }
            .validate(),
            Err(ConfigError::Replicas)
        );
    }

    #[test]
    fn renewals_must_come_before_half_a_lease() {
        let mut c = three();
        c.lease.renew_every_ms = 0;
        assert_eq!(c.validate(), Err(ConfigError::LeaseTiming));
        c.lease.renew_every_ms = c.lease.lease_ms / 2;
        assert_eq!(c.validate(), Err(ConfigError::LeaseTiming));
        c.lease.renew_every_ms = c.lease.lease_ms / 2 - 1;
        assert_eq!(c.validate(), Ok(()));
    }

    #[test]
    fn majorities_of_even_and_odd_sets() {
        let set = |n: u64| ReplicaConfig {
            me: NodeId(1),
            replicas: (1..=n).map(NodeId).collect(),
            holders: vec![NodeId(1)],
            ..ReplicaConfig::single(NodeId(1))
        };
        assert_eq!(set(2).majority(), 2);
        assert_eq!(set(4).majority(), 3);
        assert_eq!(set(5).majority(), 3);
    }

    #[test]
    fn only_configured_holders_hold() {
        let c = ReplicaConfig {
            holders: vec![NodeId(1)],
            ..three()
        };
        assert!(c.is_holder(NodeId(1)));
        assert!(!c.is_holder(NodeId(2)));
        assert!(three().is_holder(NodeId(3)));
    }

    #[test]
    fn promises_and_waits_are_covered_and_guarded() {
        // At the default 500 ppm: cover(2000) = ceil(2000 * 1.0005 /
        // 0.9995) = 2003, cover(1000) = 1002; the guard adds 10.
        let lease = LeaseConfig::default();
        assert_eq!(lease.promise_ms(), 2_013);
        assert_eq!(lease.wait_ms(1_000), 1_012);
        assert_eq!(lease.wait_ms(0), 10);
    }
}
