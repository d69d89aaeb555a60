//! Partition moves in the cluster map: how the map takes replica slots from
//! one node to another without any quorum of an old replica set and one of
//! a new set ever acting apart (`specs/PartitionMove.tla`).
//!
//! The *target* of every partition is what the ring places on the map's
//! active nodes. Until a rebalance, the current replica sets are the
//! target. [`MapCommand::Rebalance`] (make every joining node active) and
//! [`MapCommand::Drain`] (make a node draining: the ring leaves it out)
//! change the target; before they do, every partition whose target changes
//! is *pinned* to its current set ([`ClusterMap::moving`]), so nothing moves
//! by itself. Each pinned partition then reaches its target one slot at a
//! time:
//!
//! 1. [`MapCommand::Grow`]: the set gains a node of the target (a quorum of
//!    the grown set meets every quorum of the set before);
//! 2. [`MapCommand::HandedOver`]: the step's mover handed the rooms'
//!    acceptors over to the grown set (`saferchat_consensus::handover`),
//!    then [`MapCommand::Establish`]: a leader of the partition's log
//!    elected in the grown set's epoch says it committed, in that epoch,
//!    everything it recovered (so the set before is fenced and all it
//!    chose is on a quorum of the grown set);
//! 3. [`MapCommand::Shrink`]: only then the set loses a node the target does
//!    not have (a quorum of the shrunk set meets every quorum of the grown
//!    set, though not necessarily one of the set before the grow);
//! 4. [`MapCommand::HandedOver`] and [`MapCommand::Establish`] again, in
//!    the shrunk set's epoch.
//!
//! Grow and shrink each give the partition a new epoch, and each waits
//! until the epoch it leaves was established: two sets a step apart always
//! share a quorum, two sets two steps apart need not, so the set two steps
//! back must be fenced before the next step (`specs/PartitionMove.tla`
//! checks the grow-then-shrink of one slot; waiting before a grow too is
//! what makes slot after slot the same step again). A partition that never
//! moved is in its first epoch, which has no set before it.
//!
//! A partition whose set equals its target is no longer pinned. Every
//! command names the partition epoch its proposer saw and is refused when
//! the partition moved on since, so a retried or duplicated step applies
//! once. [`ClusterMap::next_moves`] says which step each pinned partition
//! takes next (an `Establish` is the partition leader's to propose).

use std::collections::{BTreeMap, BTreeSet};

use saferchat_consensus::NodeId;
use serde::{Deserialize, Serialize};

use crate::map::{ClusterMap, FailoverLeader, MapCommand, MapError, NodeState};
use crate::partition::PartitionId;
use crate::ring::Placement;

/// The map epoch of a partition that never moved: the cluster's creation.
pub const CREATED_EPOCH: u64 = 1;

/// How many partitions a rebalance or a drain moves at once
/// ([`ClusterMap::next_moves`]). Each step pauses its partition's rooms
/// for a while (the handover seals them on the old set and installs them
/// on the new one, and a leader of the new epoch is elected), and every
/// step under way slows the others: a fourth node joining three, with
/// every one of the 210 partitions it took moved at once, paused rooms
/// for 20-47 s on a loaded 2-core machine. A bound keeps each room's
/// pause close to that of one step, at the price of a longer rebalance.
pub const MOVES_AT_ONCE: usize = 32;

/// A partition pinned to a replica set while it moves to its target.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Pinned {
    /// Its replicas now, in order (the first is the preferred owner).
    pub replicas: Vec<u64>,
}

/// A partition's grow or shrink while its epoch is not established.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MoveStep {
    /// The partition's epoch after the step.
    pub epoch: u64,
    /// Its replicas before the step, sorted.
    pub before: Vec<u64>,
    /// Its replicas after it, sorted.
    pub after: Vec<u64>,
    /// The node that hands the partition's rooms over: the lowest id in
    /// both sets that is not draining (for a home move, whose sets are the
    /// same, the lowest of the new home's).
    pub mover: u64,
}

impl MoveStep {
    /// The node of both sets that the map passed over for a draining one
    /// when it named the mover (the mover of a step taken over), if any.
    /// `None` for a home move (the same set before and after), whose
    /// mover is chosen in the new home rather than passed over to.
    pub fn passed_over(&self) -> Option<u64> {
        if self.before == self.after {
            return None;
        }
        in_both(&self.before, &self.after)
            .next()
            .filter(|first| *first != self.mover)
    }
}

/// The ids in both of two sorted sets, lowest first.
fn in_both<'a>(before: &'a [u64], after: &'a [u64]) -> impl DoubleEndedIterator<Item = u64> + 'a {
    before.iter().copied().filter(|n| after.contains(n))
}

/// Why a move step did not apply.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum MoveError {
    /// No such partition.
    #[error("partition {0} does not exist")]
    NoPartition(u32),
    /// The partition is at its target.
    #[error("partition {0} is not moving")]
    NotMoving(u32),
    /// The step names an epoch the partition has left.
    #[error("partition {partition} is at epoch {current}, not {named}")]
    StaleEpoch {
        /// The partition.
        partition: u32,
        /// The epoch the step named.
        named: u64,
        /// The partition's epoch.
        current: u64,
    },
    /// A step that does not fit where the partition is.
    #[error("partition {partition}: {reason}")]
    Refused {
        /// The partition.
        partition: u32,
        /// Why.
        reason: String,
    },
}

impl ClusterMap {
    /// The epoch of `partition`'s current replica set: the map epoch of its
    /// last grow or shrink. Partition-log terms and room ballots of the
    /// partition carry it.
    pub fn partition_epoch(&self, partition: u32) -> u64 {
        self.partition_epochs
            .get(&partition)
            .copied()
            .unwrap_or(CREATED_EPOCH)
    }

    /// The epoch of `partition`'s last home move (0: its home never moved):
    /// see [`ClusterMap::failover_epochs`].
    pub fn failover_epoch(&self, partition: u32) -> u64 {
        self.failover_epochs
            .get(&partition)
            .and_then(|epochs| epochs.last().copied())
            .unwrap_or(0)
    }

    /// The oldest failover epoch of `partition` above `checked`: the check
    /// a replica that checked up to `checked` owes next.
    pub fn owed_check(&self, partition: u32, checked: u64) -> Option<u64> {
        self.failover_epochs
            .get(&partition)?
            .range(checked + 1..)
            .next()
            .copied()
    }

    /// The leader that established `partition`'s failover epoch `epoch`
    /// (`MapCommand::Establish::leader`), if the map knows it.
    pub fn failover_leader(&self, partition: u32, epoch: u64) -> Option<&FailoverLeader> {
        self.failover_leaders.get(&partition)?.get(&epoch)
    }

    /// The prefix of `partition`'s log that `node` had released when the
    /// leader that established failover epoch `epoch` recovered it
    /// (`MapCommand::Establish::vouched`): a replica that still has
    /// released exactly that much needs no check against that epoch.
    pub fn vouched_prefix(&self, partition: u32, epoch: u64, node: u64) -> Option<u64> {
        self.failover_leader(partition, epoch)?
            .vouched
            .get(&node)
            .copied()
    }

    /// Whether `id` holds a replica slot of any partition now.
    ///
    /// # Errors
    /// A map without a valid placement.
    pub fn holds_slots(&self, id: u64) -> Result<bool, crate::PlacementError> {
        let placement = self.placement()?;
        Ok(placement
            .partitions()
            .all()
            .any(|p| placement.replicas(p).contains(&NodeId(id))))
    }

    /// Whether `partition`'s current epoch was established (always, for a
    /// partition that never moved).
    pub fn is_established(&self, partition: u32) -> bool {
        !self.unestablished.contains(&partition)
    }

    /// The mover of a step from `before` to `after` (both sorted): the
    /// lowest id in both sets that is not draining. Draining a mover that
    /// died hands its step to the next node of both sets, whose ballot
    /// `<<epoch, 0, mover>>` is higher (`saferchat_consensus::handover`,
    /// "Takeover"). A draining node never becomes active again, so the
    /// mover only ever moves up; with every node of both sets draining it
    /// is the highest of them, for the same reason.
    fn mover_of(&self, before: &[u64], after: &[u64]) -> Option<u64> {
        let both = || in_both(before, after);
        let draining = |n: &u64| {
            self.nodes
                .get(n)
                .is_some_and(|node| node.state == NodeState::Draining)
        };
        both().find(|n| !draining(n)).or_else(|| both().next_back())
    }

    /// The node whose catch-up the `Establish` of `step` waits for: the
    /// node a grow added, so that the shrink the map takes next never
    /// leaves the partition's earlier posts on fewer replicas than before
    /// the move (`LogReplica::has_caught_up`). `None` for a shrink, and
    /// for an added node that is draining or gone: a node that never
    /// catches up would otherwise hold the move for good, and the
    /// operator's drain or removal of it is what lets the move go on.
    pub fn establish_waits_for(&self, step: &MoveStep) -> Option<u64> {
        if step.after.len() <= step.before.len() {
            return None;
        }
        let added = step
            .after
            .iter()
            .copied()
            .find(|n| !step.before.contains(n))?;
        match self.nodes.get(&added) {
            Some(node) if node.state != NodeState::Draining => Some(added),
            _ => None,
        }
    }

    /// The next steps of the moving partitions whose epoch is
    /// established, in partition order: a shrink for each that grew past
    /// its target (it ends that slot's move), then a grow for those whose
    /// set is not larger than their target, as long as fewer than
    /// [`MOVES_AT_ONCE`] partitions are in a move (a step not established
    /// yet, or grown and not shrunk). A partition waiting to be
    /// established has none (its leader proposes the `Establish`).
    ///
    /// # Errors
    /// A map without a valid placement.
    pub fn next_moves(&self) -> Result<Vec<MapCommand>, crate::PlacementError> {
        let target = self.target()?;
        let mut steps = Vec::new();
        let mut grows = Vec::new();
        let mut in_a_move = self.unestablished.len();
        for (partition, pinned) in &self.moving {
            if !self.is_established(*partition) {
                continue;
            }
            let want = ids(target.replicas(PartitionId(*partition)));
            let epoch = self.partition_epoch(*partition);
            if let Some(node) = self.grow_candidate(&pinned.replicas, &want) {
                grows.push(MapCommand::Grow {
                    partition: *partition,
                    node,
                    epoch,
                });
            } else if let Some(node) = self.shrink_candidate(&pinned.replicas, &want) {
                in_a_move += 1;
                steps.push(MapCommand::Shrink {
                    partition: *partition,
                    node,
                    epoch,
                });
            }
        }
        steps.extend(
            grows
                .into_iter()
                .take(MOVES_AT_ONCE.saturating_sub(in_a_move)),
        );
        Ok(steps)
    }

    /// The step `partition` is in while its epoch is not established:
    /// its epoch, its replica set before the step and after it (sorted),
    /// and the step's mover, the lowest node id in both sets that is not
    /// draining (a grow or a shrink moves one slot, so the sets share all
    /// but one node). `None`
    /// for a partition whose epoch is established.
    ///
    /// # Errors
    /// A map without a valid placement.
    pub fn step_of(&self, partition: u32) -> Result<Option<MoveStep>, crate::PlacementError> {
        if self.is_established(partition) {
            return Ok(None);
        }
        Ok(self.steps()?.remove(&partition))
    }

    /// [`ClusterMap::step_of`] for every partition whose epoch is not
    /// established, by partition, with the placement built once (a ring
    /// is built per call, which a caller looking at every moving partition
    /// should not pay per partition).
    ///
    /// # Errors
    /// A map without a valid placement.
    pub fn steps(&self) -> Result<BTreeMap<u32, MoveStep>, crate::PlacementError> {
        let mut steps = BTreeMap::new();
        if self.unestablished.is_empty() {
            return Ok(steps);
        }
        let placement = self.placement()?;
        for partition in &self.unestablished {
            let Some(before) = self.previous_sets.get(partition) else {
                continue;
            };
            let mut after = ids(placement.replicas(PartitionId(*partition)));
            after.sort_unstable();
            let mut before = before.clone();
            before.sort_unstable();
            let mover = match self.failing_over.get(partition) {
                // A home move's set is the same before and after; its
                // lowest node in the new home moves it, since the old
                // home may be the datacenter that was lost.
                Some(_) => {
                    let home = placement.home(PartitionId(*partition));
                    let in_home: Vec<u64> = after
                        .iter()
                        .copied()
                        .filter(|n| self.nodes.get(n).is_some_and(|m| m.datacenter == home))
                        .collect();
                    self.mover_of(&in_home, &in_home)
                }
                None => self.mover_of(&before, &after),
            };
            let Some(mover) = mover else {
                continue;
            };
            steps.insert(
                *partition,
                MoveStep {
                    epoch: self.partition_epoch(*partition),
                    before,
                    after,
                    mover,
                },
            );
        }
        Ok(steps)
    }

    /// The ring's placement on the active nodes: where every partition
    /// goes once no partition is pinned.
    fn target(&self) -> Result<Placement, crate::PlacementError> {
        self.ring_placement()
    }

    /// A node of the target to add: only while the set is not larger than
    /// the target (one slot moves at a time).
    fn grow_candidate(&self, now: &[u64], want: &[u64]) -> Option<u64> {
        if now.len() > want.len() {
            return None;
        }
        want.iter().copied().find(|n| !now.contains(n))
    }

    /// A node the target does not have, from a datacenter that has more
    /// replicas now than the target gives it.
    fn shrink_candidate(&self, now: &[u64], want: &[u64]) -> Option<u64> {
        let dc = |id: &u64| self.nodes.get(id).map(|n| n.datacenter.as_str());
        let count = |set: &[u64], d: Option<&str>| set.iter().filter(|n| dc(n) == d).count();
        now.iter()
            .copied()
            .find(|n| !want.contains(n) && count(now, dc(n)) > count(want, dc(n)))
    }

    /// Changes the target with `change` (node states), pinning first every
    /// partition whose replica set the change would move.
    pub(crate) fn retarget(
        &mut self,
        change: impl FnOnce(&mut ClusterMap),
    ) -> Result<usize, MapError> {
        let before = self
            .placement()
            .map_err(|e| MapError::Shape(e.to_string()))?;
        let mut after = self.clone();
        change(&mut after);
        let target = after.target().map_err(|e| MapError::Shape(e.to_string()))?;
        let mut pinned = 0;
        for p in before.partitions().all() {
            let now = ids(before.replicas(p));
            if now != ids(target.replicas(p)) && !after.moving.contains_key(&p.0) {
                after.moving.insert(p.0, Pinned { replicas: now });
                pinned += 1;
            }
        }
        // A partition the new target puts back where it is moves no more.
        after.moving.retain(|p, pinned| {
            sorted(&pinned.replicas) != sorted(&ids(target.replicas(PartitionId(*p))))
        });
        after.epoch += 1;
        *self = after;
        Ok(pinned)
    }

    /// Applies a grow, establish or shrink of `partition`.
    pub(crate) fn step(&mut self, command: &MapCommand) -> Result<(), MapError> {
        let (partition, named) = match command {
            MapCommand::Grow {
                partition, epoch, ..
            }
            | MapCommand::Establish {
                partition, epoch, ..
            }
            | MapCommand::HandedOver { partition, epoch }
            | MapCommand::MoveHome {
                partition, epoch, ..
            }
            | MapCommand::Shrink {
                partition, epoch, ..
            } => (*partition, *epoch),
            _ => unreachable!("only move steps come here"),
        };
        if partition >= self.partitions {
            return Err(MoveError::NoPartition(partition).into());
        }
        let current = self.partition_epoch(partition);
        if named != current {
            return Err(MoveError::StaleEpoch {
                partition,
                named,
                current,
            }
            .into());
        }
        let refused =
            |reason: String| -> MapError { MoveError::Refused { partition, reason }.into() };
        if let MapCommand::HandedOver { .. } = command {
            if self.is_established(partition) || self.handed_over.contains(&partition) {
                return Err(refused(format!(
                    "the rooms of epoch {current} were handed over already"
                )));
            }
            self.handed_over.insert(partition);
            self.epoch += 1;
            return Ok(());
        }
        if let MapCommand::Establish { .. } = command {
            if self.is_established(partition) {
                return Err(refused(format!("epoch {current} is established already")));
            }
            if !self.handed_over.contains(&partition) {
                return Err(refused(format!(
                    "the rooms of epoch {current} are not handed over to its set yet"
                )));
            }
            if let MapCommand::Establish {
                leader: Some(node),
                vouched,
                ..
            } = command
                && self.failing_over.contains_key(&partition)
            {
                self.failover_leaders.entry(partition).or_default().insert(
                    current,
                    FailoverLeader {
                        node: *node,
                        vouched: vouched.clone(),
                    },
                );
            }
            self.unestablished.remove(&partition);
            self.handed_over.remove(&partition);
            self.failing_over.remove(&partition);
            self.epoch += 1;
            return Ok(());
        }
        if !self.is_established(partition) {
            return Err(refused(format!(
                "epoch {current} is not established yet: a leader of its set must commit what it recovered first"
            )));
        }
        if let MapCommand::MoveHome { datacenter, .. } = command {
            return self.move_home(partition, datacenter);
        }
        let Some(pinned) = self.moving.get(&partition).cloned() else {
            return Err(MoveError::NotMoving(partition).into());
        };
        // Only a grow or shrink needs the target (a ring built afresh).
        let target = self.target().map_err(|e| MapError::Shape(e.to_string()))?;
        let want = ids(target.replicas(PartitionId(partition)));
        let epoch = self.epoch + 1;
        let mut next = pinned.clone();
        match command {
            MapCommand::Grow { node, .. } => {
                if pinned.replicas.len() > want.len()
                    || !want.contains(node)
                    || pinned.replicas.contains(node)
                {
                    return Err(refused(format!(
                        "node {node} is not a replica it lacks, or it is grown already"
                    )));
                }
                next.replicas.push(*node);
            }
            MapCommand::Shrink { node, .. } => {
                if self.shrink_candidate(&pinned.replicas, &want).is_none()
                    || !pinned.replicas.contains(node)
                    || want.contains(node)
                {
                    return Err(refused(format!("node {node} is not a replica to drop")));
                }
                next.replicas.retain(|n| n != node);
            }
            _ => unreachable!("only move steps come here"),
        }
        self.unestablished.insert(partition);
        self.partition_epochs.insert(partition, epoch);
        self.previous_sets
            .insert(partition, pinned.replicas.clone());
        if sorted(&next.replicas) == sorted(&want) {
            self.moving.remove(&partition);
        } else {
            self.moving.insert(partition, next);
        }
        self.epoch = epoch;
        Ok(())
    }

    /// Applies [`MapCommand::MoveHome`] of an established partition: a
    /// new partition epoch with the same replicas, homed in `datacenter`.
    /// Like a grow or shrink, the step hands the rooms over (their
    /// acceptors are the same nodes, but their ballots carry the new
    /// epoch) before a leader of the new home establishes it.
    fn move_home(&mut self, partition: u32, datacenter: &str) -> Result<(), MapError> {
        let refused =
            |reason: String| -> MapError { MoveError::Refused { partition, reason }.into() };
        // A partition pinned while it moves between replica sets may move
        // its home too (its set stays as it is): a datacenter lost in the
        // middle of a rebalance or a drain must not strand the partitions
        // homed there, whose next step would need their dead voters.
        let placement = self
            .placement()
            .map_err(|e| MapError::Shape(e.to_string()))?;
        let p = PartitionId(partition);
        let home = placement.home(p).to_owned();
        if home == datacenter {
            return Err(refused(format!("its home is {datacenter} already")));
        }
        let replicas = ids(placement.replicas(p));
        if !placement
            .replicas(p)
            .iter()
            .any(|n| placement.datacenter_of(*n) == Some(datacenter))
        {
            return Err(refused(format!(
                "it has no replica in datacenter {datacenter:?}"
            )));
        }
        if !placement.can_fail_over(p) {
            return Err(refused(format!(
                "its replicas outside {home} are no majority of its {} replicas, so no other datacenter can take over its log without {home}",
                replicas.len()
            )));
        }
        let mut moved = placement;
        moved.move_home(p, datacenter);
        if !moved.can_fail_over(p) {
            // The new epoch's promisers must wait out the grants they gave
            // the old home, which only a log with a home lease does; and a
            // home that could not fail over in turn would hold no lease.
            return Err(refused(format!(
                "its replicas outside {datacenter} would be no majority of its {} replicas, so {datacenter} could not hold a home lease",
                replicas.len()
            )));
        }
        let epoch = self.epoch + 1;
        self.unestablished.insert(partition);
        self.partition_epochs.insert(partition, epoch);
        self.previous_sets.insert(partition, replicas);
        self.failing_over.insert(partition, home);
        self.failover_epochs
            .entry(partition)
            .or_default()
            .insert(epoch);
        if moved.home(p) == moved.turn_home(p) {
            self.moved_homes.remove(&partition);
        } else {
            self.moved_homes.insert(partition, datacenter.to_owned());
        }
        self.epoch = epoch;
        Ok(())
    }

    /// The ring's placement on the active nodes, with the pinned
    /// partitions' sets put in: where every partition is now.
    ///
    /// # Errors
    /// A map that was not created, or has an invalid shape.
    pub fn placement(&self) -> Result<Placement, crate::PlacementError> {
        let mut placement = self.ring_placement()?;
        for (p, pinned) in &self.moving {
            let nodes: Vec<crate::ClusterNode> = pinned
                .replicas
                .iter()
                .map(|n| crate::ClusterNode {
                    id: NodeId(*n),
                    datacenter: self
                        .nodes
                        .get(n)
                        .map(|m| m.datacenter.clone())
                        .unwrap_or_default(),
                })
                .collect();
            placement.pin(PartitionId(*p), &nodes);
        }
        for (p, datacenter) in &self.moved_homes {
            placement.move_home(PartitionId(*p), datacenter);
        }
        Ok(placement)
    }
}

fn ids(nodes: &[NodeId]) -> Vec<u64> {
    nodes.iter().map(|n| n.0).collect()
}

fn sorted(list: &[u64]) -> BTreeSet<u64> {
    list.iter().copied().collect()
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::map::MapNode;

    fn node(id: u64, dc: &str, state: NodeState) -> (u64, MapNode) {
        (
            id,
            MapNode {
                datacenter: dc.to_owned(),
                peer_address: format!("127.0.0.1:{}", 7000 + id),
                client_address: format!("127.0.0.1:{}", 8000 + id),
                state,
            },
        )
    }

    fn created(list: &[(u64, &str)], partitions: u32) -> ClusterMap {
        let mut map = ClusterMap::default();
        map.apply(&MapCommand::Create {
            partitions,
            replicas_per_datacenter: 3,
            nodes: list
                .iter()
                .map(|(id, dc)| node(*id, dc, NodeState::Active))
                .collect::<BTreeMap<_, _>>(),
        })
        .unwrap();
        map
    }

    fn join(map: &mut ClusterMap, id: u64, dc: &str) {
        map.apply(&MapCommand::AddNode {
            id,
            node: node(id, dc, NodeState::Joining).1,
        })
        .unwrap();
    }

    /// Runs every step the planner gives, establishing each grown set at
    /// once (as a leader of the grown set would), checking after each
    /// command that every set is its target's size or one more. Returns
    /// how many slots moved.
    fn run_moves(map: &mut ClusterMap) -> usize {
        let mut grows = 0;
        for _ in 0..10_000 {
            let steps = map.next_moves().unwrap();
            if steps.is_empty() {
                return grows;
            }
            for step in steps {
                let (MapCommand::Grow { partition, .. } | MapCommand::Shrink { partition, .. }) =
                    step
                else {
                    panic!("the plan grows and shrinks: {step:?}");
                };
                let mut set_before = ids(map.placement().unwrap().replicas(PartitionId(partition)));
                set_before.sort_unstable();
                assert_eq!(
                    map.step_of(partition).unwrap(),
                    None,
                    "established before the step"
                );
                map.apply(&step).unwrap();
                // The step names both sets and a mover in both, and they
                // differ by the one node the step added or dropped.
                let moving = map.step_of(partition).unwrap().expect("a step under way");
                let mut set_after = ids(map.placement().unwrap().replicas(PartitionId(partition)));
                set_after.sort_unstable();
                assert_eq!((&moving.before, &moving.after), (&set_before, &set_after));
                assert_eq!(moving.epoch, map.partition_epoch(partition));
                assert!(
                    moving.before.contains(&moving.mover) && moving.after.contains(&moving.mover)
                );
                assert!(
                    moving.before.iter().all(|n| *n >= moving.mover
                        || !moving.after.contains(n)
                        || map.nodes[n].state == NodeState::Draining),
                    "the lowest of both sets that is not draining"
                );
                let (old, new) = (sorted(&moving.before), sorted(&moving.after));
                assert_eq!(old.symmetric_difference(&new).count(), 1, "{moving:?}");
                match step {
                    MapCommand::Grow { node, .. } => {
                        grows += 1;
                        let draining = map.nodes[&node].state == NodeState::Draining;
                        assert_eq!(
                            map.establish_waits_for(&moving),
                            (!draining).then_some(node),
                            "a grow is established once the added node caught up"
                        );
                    }
                    _ => assert_eq!(map.establish_waits_for(&moving), None, "a shrink"),
                }
                let epoch = map.partition_epoch(partition);
                assert_eq!(epoch, map.epoch, "a step starts an epoch");
                assert!(
                    map.next_moves()
                        .unwrap()
                        .iter()
                        .all(|s| !matches!(s, MapCommand::Grow { partition: p, .. } | MapCommand::Shrink { partition: p, .. } if *p == partition)),
                    "no step before the epoch is established"
                );
                assert!(
                    map.apply(&MapCommand::establish(partition, epoch)).is_err(),
                    "no Establish before the rooms are handed over"
                );
                map.apply(&MapCommand::HandedOver { partition, epoch })
                    .unwrap();
                assert!(
                    map.apply(&MapCommand::HandedOver { partition, epoch })
                        .is_err(),
                    "handed over once"
                );
                map.apply(&MapCommand::establish(partition, epoch)).unwrap();
                assert_eq!(map.step_of(partition).unwrap(), None, "established");
                assert!(
                    map.apply(&MapCommand::HandedOver { partition, epoch })
                        .is_err(),
                    "nothing to hand over once established"
                );
                let placement = map.placement().unwrap();
                let target = map.target().unwrap();
                for p in placement.partitions().all() {
                    let have = placement.replicas(p).len();
                    let want = target.replicas(p).len();
                    assert!(have == want || have == want + 1, "{p:?}: {have} of {want}");
                }
            }
        }
        panic!("the moves never ended");
    }

    #[test]
    fn a_fourth_node_takes_a_quarter_of_the_slots_one_at_a_time() {
        let mut map = created(&[(1, "dc1"), (2, "dc1"), (3, "dc1")], 256);
        let before = map.placement().unwrap();
        join(&mut map, 4, "dc1");
        assert_eq!(map.placement().unwrap().slots_moved(&before), 0);
        map.apply(&MapCommand::Rebalance).unwrap();
        assert_eq!(map.nodes[&4].state, NodeState::Active);
        assert_eq!(
            map.placement().unwrap().slots_moved(&before),
            0,
            "rebalancing pins every partition where it is"
        );
        let target = map.target().unwrap();
        let pinned = map.moving.len();
        let epochs_before = map.epoch;
        let moved = run_moves(&mut map);
        assert!(map.moving.is_empty());
        assert_eq!(map.placement().unwrap().slots_moved(&target), 0);
        assert_eq!(moved, target.slots_moved(&before));
        assert_eq!(moved, pinned, "one slot per moving partition");
        // Grow, hand over, establish, shrink, hand over, establish per
        // slot.
        assert_eq!(map.epoch - epochs_before, 6 * moved as u64);
        let share = moved as f64 / before.slots() as f64;
        println!(
            "3 -> 4 nodes: {moved} of {} slots moved ({:.1} %, ideal 25 %)",
            before.slots(),
            share * 100.0
        );
        assert!((0.2..0.32).contains(&share), "{share}");
        for p in target.partitions().all() {
            let moved_here = !before
                .replicas(p)
                .iter()
                .all(|n| target.replicas(p).contains(n));
            let epoch = map.partition_epoch(p.0);
            assert_eq!(epoch > CREATED_EPOCH, moved_here, "{p:?}");
        }
    }

    /// A rebalance moves at most [`MOVES_AT_ONCE`] partitions at a time:
    /// a partition in a step, or grown and not shrunk, holds a place until
    /// its shrink is established; a grown partition's shrink is never
    /// held back; and every partition gets its turn.
    #[test]
    fn a_rebalance_moves_a_bounded_number_of_partitions_at_once() {
        let mut map = created(&[(1, "dc1"), (2, "dc1"), (3, "dc1")], 256);
        join(&mut map, 4, "dc1");
        map.apply(&MapCommand::Rebalance).unwrap();
        let pinned = map.moving.len();
        assert!(pinned > 2 * MOVES_AT_ONCE, "{pinned}");
        let finish = |map: &mut ClusterMap, partition: u32| {
            let epoch = map.partition_epoch(partition);
            map.apply(&MapCommand::HandedOver { partition, epoch })
                .unwrap();
            map.apply(&MapCommand::establish(partition, epoch)).unwrap();
        };
        let grows = |steps: &[MapCommand]| -> Vec<u32> {
            steps
                .iter()
                .filter_map(|s| match s {
                    MapCommand::Grow { partition, .. } => Some(*partition),
                    _ => None,
                })
                .collect()
        };
        let first = map.next_moves().unwrap();
        assert_eq!(first.len(), MOVES_AT_ONCE, "only grows, up to the bound");
        let started = grows(&first);
        assert_eq!(started.len(), MOVES_AT_ONCE);
        for step in &first {
            map.apply(step).unwrap();
        }
        assert!(
            map.next_moves().unwrap().is_empty(),
            "every place is taken by a step not established"
        );
        // The grows established: each partition now shrinks, and still
        // holds its place, so no grow starts.
        for p in &started {
            finish(&mut map, *p);
        }
        let shrinks = map.next_moves().unwrap();
        assert_eq!(shrinks.len(), MOVES_AT_ONCE);
        assert!(
            shrinks
                .iter()
                .all(|s| matches!(s, MapCommand::Shrink { .. }))
        );
        // One shrink applied and established: that partition's move is
        // over, and exactly one new partition grows, beside the other
        // shrinks.
        map.apply(&shrinks[0]).unwrap();
        let MapCommand::Shrink {
            partition: done, ..
        } = shrinks[0]
        else {
            unreachable!()
        };
        finish(&mut map, done);
        let next = map.next_moves().unwrap();
        let newly = grows(&next);
        assert_eq!(newly.len(), 1, "{next:?}");
        assert!(!started.contains(&newly[0]));
        assert_eq!(next.len(), MOVES_AT_ONCE, "{next:?}");
        // And the rest of the rebalance runs to the end.
        for step in &next {
            map.apply(step).unwrap();
        }
        for step in &next {
            let (MapCommand::Grow { partition, .. } | MapCommand::Shrink { partition, .. }) = step
            else {
                unreachable!()
            };
            finish(&mut map, *partition);
        }
        run_moves(&mut map);
        assert!(map.moving.is_empty());
    }

    #[test]
    fn draining_a_steps_mover_hands_the_step_to_the_next_node_of_both_sets() {
        let mut map = created(&[(1, "dc1"), (2, "dc1"), (3, "dc1")], 16);
        join(&mut map, 4, "dc1");
        map.apply(&MapCommand::Rebalance).unwrap();
        let step = map.next_moves().unwrap().remove(0);
        let MapCommand::Grow { partition, .. } = step else {
            panic!("a grow first: {step:?}")
        };
        map.apply(&step).unwrap();
        let first = map.step_of(partition).unwrap().expect("under way");
        let both: Vec<u64> = first
            .before
            .iter()
            .copied()
            .filter(|n| first.after.contains(n))
            .collect();
        assert_eq!(first.mover, both[0]);
        assert_eq!(first.passed_over(), None);
        // The mover dies for good; the operator drains it.
        map.apply(&MapCommand::Drain { id: first.mover }).unwrap();
        let taken = map.step_of(partition).unwrap().expect("still under way");
        assert_eq!(
            (taken.epoch, &taken.before, &taken.after),
            (first.epoch, &first.before, &first.after),
            "the same step"
        );
        assert_eq!(taken.mover, both[1], "the next node of both sets");
        assert_eq!(taken.passed_over(), Some(first.mover));
        // It goes on from there: handed over and established, the planner
        // moves the drained node's slots away.
        let epoch = taken.epoch;
        map.apply(&MapCommand::HandedOver { partition, epoch })
            .unwrap();
        map.apply(&MapCommand::establish(partition, epoch)).unwrap();
        run_moves(&mut map);
        assert!(!map.holds_slots(first.mover).unwrap());
    }

    #[test]
    fn a_grow_waits_for_its_node_to_catch_up_unless_that_node_is_draining() {
        let mut map = created(&[(1, "dc1"), (2, "dc1"), (3, "dc1")], 16);
        join(&mut map, 4, "dc1");
        map.apply(&MapCommand::Rebalance).unwrap();
        let step = map
            .next_moves()
            .unwrap()
            .into_iter()
            .find(|s| matches!(s, MapCommand::Grow { .. }))
            .expect("a grow onto node 4");
        let MapCommand::Grow {
            partition, node, ..
        } = step
        else {
            unreachable!()
        };
        assert_eq!(node, 4);
        map.apply(&step).unwrap();
        let moving = map.step_of(partition).unwrap().expect("under way");
        assert_eq!(map.establish_waits_for(&moving), Some(4));
        // Node 4 never catches up; the operator drains it.
        map.apply(&MapCommand::Drain { id: 4 }).unwrap();
        assert_eq!(
            map.establish_waits_for(&moving),
            None,
            "a draining node no longer holds the move"
        );
    }

    #[test]
    fn every_step_waits_for_the_last_one_established_and_stale_or_wrong_steps_are_refused() {
        let mut map = created(&[(1, "dc1"), (2, "dc1"), (3, "dc1")], 64);
        join(&mut map, 4, "dc1");
        map.apply(&MapCommand::Rebalance).unwrap();
        let Some(MapCommand::Grow {
            partition,
            node,
            epoch,
        }) = map.next_moves().unwrap().first().cloned()
        else {
            panic!("a grow first");
        };
        assert_eq!((node, epoch), (4, CREATED_EPOCH));
        let leaving = map.moving[&partition]
            .replicas
            .iter()
            .copied()
            .find(|n| {
                !map.target()
                    .unwrap()
                    .replicas(PartitionId(partition))
                    .contains(&NodeId(*n))
            })
            .unwrap();
        let before = map.clone();
        let refused = |map: &mut ClusterMap, command: MapCommand| {
            let snapshot = map.clone();
            let e = map.apply(&command).unwrap_err();
            assert_eq!(*map, snapshot, "a refused step changes nothing");
            e
        };
        // Shrinking first, establishing first, a node the target lacks.
        refused(
            &mut map,
            MapCommand::Shrink {
                partition,
                node: leaving,
                epoch,
            },
        );
        refused(&mut map, MapCommand::establish(partition, epoch));
        refused(
            &mut map,
            MapCommand::Grow {
                partition,
                node: leaving,
                epoch,
            },
        );
        assert_eq!(map, before);
        map.apply(&MapCommand::Grow {
            partition,
            node,
            epoch,
        })
        .unwrap();
        let grown = map.partition_epoch(partition);
        assert!(grown > epoch);
        // The same grow again (a retry) names an epoch the partition left.
        assert!(matches!(
            refused(
                &mut map,
                MapCommand::Grow {
                    partition,
                    node,
                    epoch
                }
            ),
            MapError::Move(MoveError::StaleEpoch { .. })
        ));
        // A second grow while grown (and before establishing): one slot at
        // a time.
        refused(
            &mut map,
            MapCommand::Grow {
                partition,
                node: 5,
                epoch: grown,
            },
        );
        // Not established: no shrink.
        let e = refused(
            &mut map,
            MapCommand::Shrink {
                partition,
                node: leaving,
                epoch: grown,
            },
        );
        assert!(e.to_string().contains("not established"), "{e}");
        // Not handed over: no Establish; a hand-over of another epoch is
        // stale.
        let e = refused(&mut map, MapCommand::establish(partition, grown));
        assert!(e.to_string().contains("not handed over"), "{e}");
        assert!(matches!(
            refused(&mut map, MapCommand::HandedOver { partition, epoch }),
            MapError::Move(MoveError::StaleEpoch { .. })
        ));
        map.apply(&MapCommand::HandedOver {
            partition,
            epoch: grown,
        })
        .unwrap();
        // Vouching means something after a home failover only.
        map.apply(&MapCommand::Establish {
            partition,
            epoch: grown,
            leader: Some(1),
            vouched: BTreeMap::from([(node, 5)]),
        })
        .unwrap();
        assert_eq!(map.vouched_prefix(partition, grown, node), None);
        assert!(map.failover_leaders.is_empty());
        assert_eq!(
            map.partition_epoch(partition),
            grown,
            "establishing is no new set"
        );
        // Dropping a node the target keeps is refused; the leaving one is not.
        let keeper = map.target().unwrap().replicas(PartitionId(partition))[0].0;
        refused(
            &mut map,
            MapCommand::Shrink {
                partition,
                node: keeper,
                epoch: grown,
            },
        );
        map.apply(&MapCommand::Shrink {
            partition,
            node: leaving,
            epoch: grown,
        })
        .unwrap();
        assert!(!map.moving.contains_key(&partition), "at its target");
        let done = map.partition_epoch(partition);
        assert!(done > grown);
        assert!(!map.is_established(partition));
        map.apply(&MapCommand::HandedOver {
            partition,
            epoch: done,
        })
        .unwrap();
        map.apply(&MapCommand::establish(partition, done)).unwrap();
        assert!(map.is_established(partition));
        assert!(matches!(
            refused(
                &mut map,
                MapCommand::Grow {
                    partition,
                    node,
                    epoch: done
                }
            ),
            MapError::Move(MoveError::NotMoving(_))
        ));
        refused(&mut map, MapCommand::establish(9_999, 1));
    }

    /// Draining the node a rebalance just made active, before any slot
    /// moved, puts every partition back at its target where it is.
    #[test]
    fn a_target_that_comes_back_unpins() {
        let mut map = created(&[(1, "dc1"), (2, "dc1"), (3, "dc1"), (4, "dc1")], 64);
        let before = map.placement().unwrap();
        join(&mut map, 5, "dc1");
        map.apply(&MapCommand::Rebalance).unwrap();
        assert!(!map.moving.is_empty());
        map.apply(&MapCommand::Drain { id: 5 }).unwrap();
        assert!(map.moving.is_empty(), "{:?}", map.moving.keys());
        assert_eq!(map.placement().unwrap().slots_moved(&before), 0);
        assert!(map.next_moves().unwrap().is_empty());
        map.apply(&MapCommand::RemoveNode { id: 5 }).unwrap();
    }

    #[test]
    fn a_drained_node_gives_up_every_slot_and_can_then_be_removed() {
        let mut map = created(&[(1, "dc1"), (2, "dc1"), (3, "dc1"), (4, "dc1")], 64);
        assert_eq!(
            map.apply(&MapCommand::RemoveNode { id: 2 }),
            Err(MapError::HoldsReplicas(2))
        );
        assert_eq!(
            map.apply(&MapCommand::Drain { id: 9 }),
            Err(MapError::UnknownNode(9))
        );
        map.apply(&MapCommand::Drain { id: 2 }).unwrap();
        assert_eq!(map.nodes[&2].state, NodeState::Draining);
        assert_eq!(
            map.apply(&MapCommand::Drain { id: 2 }),
            Err(MapError::NotActive(2))
        );
        assert!(map.holds_slots(2).unwrap(), "nothing moved by itself");
        assert_eq!(
            map.apply(&MapCommand::RemoveNode { id: 2 }),
            Err(MapError::HoldsReplicas(2))
        );
        run_moves(&mut map);
        assert!(!map.holds_slots(2).unwrap());
        map.apply(&MapCommand::RemoveNode { id: 2 }).unwrap();
        assert!(map.retired.contains(&2));
        let placement = map.placement().unwrap();
        assert_eq!(placement.slots(), 64 * 3);
    }

    #[test]
    fn in_two_datacenters_a_slot_moves_within_its_datacenter() {
        let list = [(1, "a"), (2, "a"), (3, "a"), (4, "b"), (5, "b"), (6, "b")];
        let mut map = created(&list, 64);
        join(&mut map, 7, "b");
        map.apply(&MapCommand::Rebalance).unwrap();
        for step in map.next_moves().unwrap() {
            if let MapCommand::Grow {
                partition, node, ..
            } = step
            {
                assert_eq!(node, 7);
                let target = map.target().unwrap();
                let in_a = |set: &[NodeId]| set.iter().filter(|n| n.0 <= 3).count();
                assert_eq!(in_a(target.replicas(PartitionId(partition))), 3);
            }
        }
        run_moves(&mut map);
        let placement = map.placement().unwrap();
        for p in placement.partitions().all() {
            let set = placement.replicas(p);
            assert_eq!(set.iter().filter(|n| n.0 <= 3).count(), 3, "{p:?}");
            assert_eq!(set.len(), 6, "{p:?}");
        }
    }

    #[test]
    fn a_map_from_before_moves_reads_with_none() {
        let old = r#"{"epoch":3,"partitions":64,"replicas_per_datacenter":3,
            "nodes":{"1":{"datacenter":"dc1","peer_address":"127.0.0.1:7001"}}}"#;
        let map: ClusterMap = serde_json::from_str(old).unwrap();
        assert!(map.moving.is_empty());
        assert_eq!(map.partition_epoch(5), CREATED_EPOCH);
        assert!(map.next_moves().unwrap().is_empty());
        let mut moving = created(&[(1, "dc1"), (2, "dc1"), (3, "dc1")], 64);
        join(&mut moving, 4, "dc1");
        moving.apply(&MapCommand::Rebalance).unwrap();
        let text = serde_json::to_string(&moving).unwrap();
        assert_eq!(serde_json::from_str::<ClusterMap>(&text).unwrap(), moving);
    }

    fn three_datacenters() -> ClusterMap {
        created(
            &[
                (1, "a"),
                (2, "a"),
                (3, "a"),
                (4, "b"),
                (5, "b"),
                (6, "b"),
                (7, "c"),
                (8, "c"),
                (9, "c"),
            ],
            16,
        )
    }

    #[test]
    fn a_home_moves_in_a_new_epoch_that_reads_every_other_datacenter_until_established() {
        let mut map = three_datacenters();
        let p = PartitionId(0);
        let before = map.placement().unwrap();
        assert_eq!(before.home(p), "a");
        let mut voters: Vec<u64> = before.voters(p).iter().map(|n| n.0).collect();
        voters.sort_unstable();
        assert_eq!(voters, [1, 2, 3]);
        assert!(before.can_fail_over(p));
        let epoch = map.partition_epoch(0);
        map.apply(&MapCommand::MoveHome {
            partition: 0,
            datacenter: "b".into(),
            epoch,
        })
        .unwrap();
        let after = map.placement().unwrap();
        assert_eq!(after.home(p), "b");
        let mut voters: Vec<u64> = after.voters(p).iter().map(|n| n.0).collect();
        voters.sort_unstable();
        assert_eq!(voters, [4, 5, 6]);
        assert_eq!(after.replicas(p), before.replicas(p), "the same replicas");
        // Every other partition stays where it was.
        for q in before.partitions().all().skip(1) {
            assert_eq!(after.home(q), before.home(q));
        }
        assert_eq!(map.partition_epoch(0), map.epoch);
        assert_eq!(map.failing_over.get(&0).map(String::as_str), Some("a"));
        // The step is moved by the new home's lowest node (the old home
        // may be gone) and hands the rooms over to the same set.
        let step = map.step_of(0).unwrap().expect("a step under way");
        assert_eq!(step.before, step.after);
        assert_eq!(step.mover, 4);
        assert_eq!(step.passed_over(), None, "no draining node passed over");
        assert_eq!(map.establish_waits_for(&step), None);
        // Nothing else moves the partition meanwhile.
        let stale = MapCommand::MoveHome {
            partition: 0,
            datacenter: "c".into(),
            epoch,
        };
        assert!(matches!(
            map.apply(&stale),
            Err(MapError::Move(MoveError::StaleEpoch { .. }))
        ));
        let again = MapCommand::MoveHome {
            partition: 0,
            datacenter: "c".into(),
            epoch: map.partition_epoch(0),
        };
        assert!(map.apply(&again).is_err(), "not established yet");
        let epoch = map.partition_epoch(0);
        map.apply(&MapCommand::HandedOver {
            partition: 0,
            epoch,
        })
        .unwrap();
        let vouched = BTreeMap::from([(5, 40), (7, 38)]);
        let establish = MapCommand::Establish {
            partition: 0,
            epoch,
            leader: Some(4),
            vouched: vouched.clone(),
        };
        // What the leader vouched for travels in the command.
        let text = serde_json::to_string(&establish).unwrap();
        assert_eq!(
            serde_json::from_str::<MapCommand>(&text).unwrap(),
            establish
        );
        map.apply(&establish).unwrap();
        assert!(map.failing_over.is_empty());
        assert_eq!(map.failover_epoch(0), epoch, "kept after Establish");
        assert_eq!(map.failover_leader(0, epoch).map(|l| l.node), Some(4));
        assert_eq!(map.vouched_prefix(0, epoch, 5), Some(40));
        assert_eq!(map.vouched_prefix(0, epoch, 7), Some(38));
        assert_eq!(map.vouched_prefix(0, epoch, 6), None, "not vouched for");
        assert_eq!(map.vouched_prefix(1, epoch, 5), None);
        assert_eq!(map.failover_epoch(1), 0);
        assert_eq!(map.placement().unwrap().home(p), "b");
        // Moving it back undoes the override.
        map.apply(&MapCommand::MoveHome {
            partition: 0,
            datacenter: "a".into(),
            epoch,
        })
        .unwrap();
        assert!(map.moved_homes.is_empty());
        assert_eq!(map.failing_over.get(&0).map(String::as_str), Some("b"));
        assert_eq!(map.failover_epoch(0), map.partition_epoch(0));
        assert_eq!(map.owed_check(0, 0), Some(epoch), "the first move first");
        assert_eq!(map.owed_check(0, epoch), Some(map.partition_epoch(0)));
        assert_eq!(map.owed_check(0, map.partition_epoch(0)), None);
        assert_eq!(map.owed_check(1, 0), None);
        let text = serde_json::to_string(&map).unwrap();
        assert_eq!(serde_json::from_str::<ClusterMap>(&text).unwrap(), map);
    }

    #[test]
    fn an_establish_that_vouches_for_no_replica_reads_as_before() {
        // A binary that does not know `vouched` refuses unknown fields:
        // an Establish without any, and a map that holds none, are
        // written as they were before it.
        let text = serde_json::to_string(&MapCommand::establish(3, 9)).unwrap();
        assert_eq!(text, r#"{"Establish":{"partition":3,"epoch":9}}"#);
        assert_eq!(
            serde_json::from_str::<MapCommand>(&text).unwrap(),
            MapCommand::establish(3, 9)
        );
        let map = created(&[(1, "dc1"), (2, "dc1"), (3, "dc1")], 16);
        let text = serde_json::to_string(&map).unwrap();
        assert!(!text.contains("failover_leaders"), "{text}");
    }

    #[test]
    fn a_home_move_is_refused_where_no_other_datacenter_can_take_over() {
        let refused = |map: &mut ClusterMap, partition: u32, dc: &str| {
            let epoch = map.partition_epoch(partition);
            let before = map.clone();
            let result = map.apply(&MapCommand::MoveHome {
                partition,
                datacenter: dc.into(),
                epoch,
            });
            assert!(
                matches!(result, Err(MapError::Move(MoveError::Refused { .. }))),
                "{result:?}"
            );
            assert_eq!(*map, before, "a refused command changes nothing");
        };
        // Two datacenters of three: the other holds half, no majority.
        let mut two = created(
            &[(1, "a"), (2, "a"), (3, "a"), (4, "b"), (5, "b"), (6, "b")],
            16,
        );
        refused(&mut two, 0, "b");
        // Its own home, or a datacenter it has no replica in.
        let mut three = three_datacenters();
        refused(&mut three, 0, "a");
        refused(&mut three, 0, "nowhere");
        // A new home whose replicas are half of all: it could hold no
        // home lease. Datacenters of 3, 2 and 1 nodes, 6 replicas each:
        // partition 2 is homed in `c` (5 of 6 outside); `a` would have 3
        // of 6 outside, `b` 4.
        let mut uneven = created(
            &[(1, "a"), (2, "a"), (3, "a"), (4, "b"), (5, "b"), (6, "c")],
            16,
        );
        assert_eq!(uneven.placement().unwrap().home(PartitionId(2)), "c");
        refused(&mut uneven, 2, "a");
        let epoch = uneven.partition_epoch(2);
        uneven
            .apply(&MapCommand::MoveHome {
                partition: 2,
                datacenter: "b".into(),
                epoch,
            })
            .unwrap();
    }

    #[test]
    fn a_partition_moving_between_sets_can_move_its_home_and_then_goes_on() {
        let mut map = three_datacenters();
        join(&mut map, 10, "b");
        map.apply(&MapCommand::Rebalance).unwrap();
        let (&moving, pinned) = map.moving.iter().next().expect("a partition moves");
        let pinned = pinned.clone();
        let home = map
            .placement()
            .unwrap()
            .home(PartitionId(moving))
            .to_owned();
        let to = if home == "a" { "c" } else { "a" };
        let epoch = map.partition_epoch(moving);
        map.apply(&MapCommand::MoveHome {
            partition: moving,
            datacenter: to.into(),
            epoch,
        })
        .unwrap();
        assert_eq!(map.moving[&moving], pinned, "its set stays as it was");
        let placement = map.placement().unwrap();
        assert_eq!(placement.home(PartitionId(moving)), to);
        assert!(
            !map.next_moves()
                .unwrap()
                .iter()
                .any(|c| matches!(c, MapCommand::Grow { partition, .. } | MapCommand::Shrink { partition, .. } if *partition == moving)),
            "no step before the home move is established"
        );
        let epoch = map.partition_epoch(moving);
        map.apply(&MapCommand::HandedOver {
            partition: moving,
            epoch,
        })
        .unwrap();
        map.apply(&MapCommand::establish(moving, epoch)).unwrap();
        assert!(
            map.next_moves()
                .unwrap()
                .iter()
                .any(|c| matches!(c, MapCommand::Grow { partition, .. } | MapCommand::Shrink { partition, .. } if *partition == moving)),
            "then it moves on towards its target"
        );
        assert_eq!(map.placement().unwrap().home(PartitionId(moving)), to);
    }
}
