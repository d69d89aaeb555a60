//! The grantor side of quorum leases.

use std::collections::BTreeMap;

use crate::config::ReplicaConfig;
use crate::ids::NodeId;
use crate::time::Millis;

/// Promises this node has made to lease holders for one room. Volatile:
/// after a restart the node assumes it promised every replica (see
/// [`Grantor::restarted`]).
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct Grantor {
    /// Holder → end of the promise, on this node's clock.
    promises: BTreeMap<NodeId, Millis>,
    /// Until then, act as if every holder had an unexpired promise: the
    /// promises made before a crash were lost with memory.
    recovering_until: Millis,
}

impl Grantor {
    /// A grantor that may have made promises before a restart which it no
    /// longer remembers; it honours them until `recovering_until`, as if
    /// it had promised every replica of the room: not only the configured
    /// holders, since the node that made those promises may have taken
    /// other nodes for holders (a version that chose them differently, or
    /// the configuration of an earlier map epoch). A replica that answers
    /// the accept costs nothing; one that is down delays a commit to the
    /// end of the window, as a holder would.
    pub fn restarted(recovering_until: Millis) -> Grantor {
        Grantor {
            promises: BTreeMap::new(),
            recovering_until,
        }
    }

    /// Promises `holder` a lease from `now`.
    pub fn grant(&mut self, config: &ReplicaConfig, now: Millis, holder: NodeId) {
        let until = now.plus(config.lease.promise_ms());
        let entry = self.promises.entry(holder).or_default();
        *entry = (*entry).max(until);
    }

    /// The holders this node must report on an accept at `now`, with the
    /// milliseconds each promise has left on this clock.
    pub fn unexpired(&mut self, config: &ReplicaConfig, now: Millis) -> Vec<(NodeId, u64)> {
        self.promises.retain(|_, until| *until > now);
        let mut out: BTreeMap<NodeId, u64> = self
            .promises
            .iter()
            .map(|(holder, until)| (*holder, until.since(now)))
            .collect();
        if now < self.recovering_until {
            let left = self.recovering_until.since(now);
            for holder in &config.replicas {
                let entry = out.entry(*holder).or_default();
                *entry = (*entry).max(left);
            }
        }
        out.into_iter().collect()
    }

    /// The holders with an unexpired promise from this node.
    pub fn promised(&self, now: Millis) -> Vec<NodeId> {
        self.promises
            .iter()
            .filter(|(_, until)| **until > now)
            .map(|(holder, _)| *holder)
            .collect()
    }

    /// When the earliest promise runs out (for scheduling the next tick).
    pub fn next_expiry(&self, now: Millis) -> Option<Millis> {
        let promises = self.promises.values().copied().filter(|t| *t > now);
        let recovery = (self.recovering_until > now).then_some(self.recovering_until);
        promises.chain(recovery).min()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> ReplicaConfig {
        ReplicaConfig::three_holders(1)
    }

    #[test]
    fn promises_expire() {
        let c = config();
        let mut g = Grantor::default();
        g.grant(&c, Millis(100), NodeId(2));
        let left = c.lease.promise_ms();
        assert_eq!(g.unexpired(&c, Millis(100)), vec![(NodeId(2), left)]);
        assert_eq!(
            g.unexpired(&c, Millis(100 + left - 1)),
            vec![(NodeId(2), 1)]
        );
        assert_eq!(g.unexpired(&c, Millis(100 + left)), vec![]);
    }

    #[test]
    fn a_restarted_grantor_reports_every_holder() {
        let c = config();
        let mut g = Grantor::restarted(Millis(5_000));
        assert_eq!(
            g.unexpired(&c, Millis(1_000)),
            vec![(NodeId(1), 4_000), (NodeId(2), 4_000), (NodeId(3), 4_000)]
        );
        assert_eq!(g.unexpired(&c, Millis(5_000)), vec![]);
    }

    #[test]
    fn a_restarted_grantor_reports_every_replica_not_only_todays_holders() {
        // One holder configured now; before the restart this node may have
        // promised replicas that another version took for holders.
        let mut c = config();
        c.holders = vec![NodeId(1)];
        let mut g = Grantor::restarted(Millis(5_000));
        assert_eq!(
            g.unexpired(&c, Millis(1_000)),
            vec![(NodeId(1), 4_000), (NodeId(2), 4_000), (NodeId(3), 4_000)]
        );
    }

    #[test]
    fn promised_lists_the_holders_until_their_promise_ends() {
        let c = config();
        let mut g = Grantor::default();
        assert_eq!(g.promised(Millis(100)), vec![]);
        g.grant(&c, Millis(100), NodeId(2));
        let left = c.lease.promise_ms();
        assert_eq!(g.promised(Millis(100)), vec![NodeId(2)]);
        assert_eq!(g.promised(Millis(100 + left - 1)), vec![NodeId(2)]);
        assert_eq!(g.promised(Millis(100 + left)), vec![]);
    }

    #[test]
    fn next_expiry_is_the_earliest_unexpired_promise_or_recovery_end() {
        let c = config();
        let left = c.lease.promise_ms();
        let mut g = Grantor::default();
        assert_eq!(g.next_expiry(Millis(100)), None);
        g.grant(&c, Millis(100), NodeId(2));
        assert_eq!(g.next_expiry(Millis(100)), Some(Millis(100 + left)));
        assert_eq!(
            g.next_expiry(Millis(100 + left - 1)),
            Some(Millis(100 + left))
        );
        assert_eq!(g.next_expiry(Millis(100 + left)), None);

        let mut g = Grantor::restarted(Millis(5_000));
        assert_eq!(g.next_expiry(Millis(1_000)), Some(Millis(5_000)));
        assert_eq!(g.next_expiry(Millis(4_999)), Some(Millis(5_000)));
        assert_eq!(g.next_expiry(Millis(5_000)), None);
        g.grant(&c, Millis(100), NodeId(3));
        assert_eq!(g.next_expiry(Millis(100)), Some(Millis(100 + left)));
        assert_eq!(g.next_expiry(Millis(100 + left)), Some(Millis(5_000)));
    }
}
