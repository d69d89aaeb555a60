//! The cluster map: which nodes form the cluster, how many partitions it
//! has, and an epoch that counts every change.
//!
//! The map is a replicated state machine (the node runs it in an
//! `openraft` group): every node applies the same [`MapCommand`]s in the
//! same order to a [`ClusterMap`], so this type must be deterministic — no
//! clocks, no randomness, no hash-map iteration order. A command that does
//! not apply leaves the map unchanged and says why; the epoch grows by one
//! with every command that applies, so "my map is at epoch E" names one
//! exact map on every node.
//!
//! [`MapCommand::Create`] is proposed from the static configuration when a
//! cluster first starts; the nodes then check their own configuration
//! against the map the cluster agreed on. [`MapCommand::AddNode`] adds a
//! node as *joining*: a member that serves clients (it forwards to the
//! rooms' owners) and follows the map, but holds no replica slot, so adding
//! it moves nothing. Giving a joining node partitions (and taking them from
//! a draining one) moves partitions one replica slot at a time
//! ([`crate::moves`]); a node can be removed only while it holds no replica
//! slot.

use std::collections::BTreeMap;
use std::sync::Mutex;

use saferchat_consensus::NodeId;
use serde::{Deserialize, Serialize};

use crate::moves::{MoveError, Pinned};
use crate::partition::PartitionCount;
use crate::ring::{ClusterNode, Placement, PlacementError};

/// A ring placement's inputs: the active nodes, the partition count and
/// the replicas per datacenter.
type RingKey = (Vec<ClusterNode>, u32, usize, Vec<String>);

/// Ring placements recently built, by their inputs, least recently used
/// first. Building one walks the whole ring once per partition (`hashring`
/// clones and rotates its ring on every `get_with_replicas`): 8 ms for 4
/// nodes and 256 partitions in a debug build, 0.7 ms in release. Every
/// node needs it several times per map command (the map's own apply, the
/// membership and timeline drivers, routing, the mover), and a rebalance
/// from 3 nodes to 4 is 1,260 commands that leave the active nodes, which
/// is all the ring depends on, as they are: rebuilt each time, the nodes
/// fell seconds behind the map. It is a pure function's results, so
/// sharing them across the process changes nothing but time.
static RING_CACHE: Mutex<Vec<(RingKey, Placement)>> = Mutex::new(Vec::new());

/// Ring placements kept: the current shape, the target of a move and a
/// few more.
const RING_CACHE_MAX: usize = 4;

/// The most nodes that vote in the map's group. Five voters survive two
/// failures; more would only slow every map change down.
pub const MAP_VOTERS_MAX: usize = 5;

/// A node as the map records it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MapNode {
    /// Its datacenter.
    pub datacenter: String,
    /// Where other nodes reach its peer listener (`host:port`); empty when
    /// the node that recorded it did not know.
    pub peer_address: String,
    /// Where clients reach it (`host:port`), for redirects; empty when not
    /// recorded.
    #[serde(default)]
    pub client_address: String,
    /// Whether it holds replica slots.
    #[serde(default)]
    pub state: NodeState,
}

/// A node's part in placement.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum NodeState {
    /// Holds replica slots: the ring places partitions on it.
    #[default]
    Active,
    /// A member that holds no replica slot yet.
    Joining,
    /// Leaving: the ring places nothing on it, and its slots move to the
    /// others; removable once it holds none.
    Draining,
}

/// The cluster map.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterMap {
    /// How many commands have applied; 0 before the cluster was created.
    pub epoch: u64,
    /// Partitions of the room-hash space (0 before creation).
    pub partitions: u32,
    /// Replicas of each partition per datacenter.
    pub replicas_per_datacenter: usize,
    /// Every node, by id.
    pub nodes: BTreeMap<u64, MapNode>,
    /// Ids of removed nodes: never given again, so that a certificate
    /// issued for a removed node cannot come back as a new one.
    #[serde(default)]
    pub retired: std::collections::BTreeSet<u64>,
    /// Partitions pinned to a replica set other than the ring's while
    /// they move ([`crate::moves`]).
    #[serde(default)]
    pub moving: BTreeMap<u32, Pinned>,
    /// Each moved partition's epoch: the map epoch of its last grow or
    /// shrink (absent: [`crate::moves::CREATED_EPOCH`]).
    #[serde(default)]
    pub partition_epochs: BTreeMap<u32, u64>,
    /// Partitions whose epoch no leader of their log has established yet
    /// (each grow or shrink puts its partition here, `Establish` takes it
    /// out).
    #[serde(default)]
    pub unestablished: std::collections::BTreeSet<u32>,
    /// Each moved partition's replica set before its last grow or shrink:
    /// the set the step's handover seals (`ClusterMap::step_of`).
    #[serde(default)]
    pub previous_sets: BTreeMap<u32, Vec<u64>>,
    /// Unestablished partitions whose rooms were handed over to their
    /// current set (`MapCommand::HandedOver`).
    #[serde(default)]
    pub handed_over: std::collections::BTreeSet<u32>,
    /// The nodes the cluster was created with, and their datacenters: what
    /// a node's static configuration must still describe once nodes have
    /// joined, drained and left (empty in maps from before it was kept).
    #[serde(default)]
    pub created_with: BTreeMap<u64, String>,
    /// Partitions an operator homed in another datacenter than their
    /// turn's ([`MapCommand::MoveHome`]), and where.
    #[serde(default)]
    pub moved_homes: BTreeMap<u32, String>,
    /// Partitions whose home moved and whose new epoch no leader has
    /// established yet, with the home they left: until then their log's
    /// elections also read the replicas outside the new home
    /// (`saferchat_consensus::partition_log::Failover`).
    #[serde(default)]
    pub failing_over: BTreeMap<u32, String>,
    /// Each partition's failover epochs (the epochs of its
    /// [`MapCommand::MoveHome`]s), kept for good: a replica that had
    /// applied the partition's log before one of them may hold posts the
    /// old home released and the new home replaced (a divergent tail), and
    /// checks its timeline against that epoch's before it applies again,
    /// the oldest it missed first.
    #[serde(default)]
    pub failover_epochs: BTreeMap<u32, std::collections::BTreeSet<u64>>,
    /// For each partition and failover epoch, the leader that
    /// established it and the replicas that leader vouched for
    /// ([`MapCommand::Establish`]). Left out when empty, so that a map
    /// without any reads as before to a binary that does not know it.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub failover_leaders: BTreeMap<u32, BTreeMap<u64, FailoverLeader>>,
}

/// The leader that established a failover epoch, as the map records it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FailoverLeader {
    /// The leader: its log defines the epoch, so its timeline is checked
    /// by definition. (A leader of the epoch that did not establish it
    /// is not: a later one may have replaced a slot of its released
    /// prefix.)
    pub node: u64,
    /// The other replicas whose timelines its election showed to be a
    /// prefix of its log, with the prefix each had released.
    #[serde(default)]
    pub vouched: BTreeMap<u64, u64>,
}

impl MapCommand {
    /// An `Establish` of `partition`'s `epoch` that vouches for no
    /// replica.
    pub fn establish(partition: u32, epoch: u64) -> MapCommand {
        MapCommand::Establish {
            partition,
            epoch,
            leader: None,
            vouched: BTreeMap::new(),
        }
    }
}

/// A change to the map, as replicated in the map's log.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub enum MapCommand {
    /// Creates the cluster: its first shape.
    Create {
        /// Partition count (fixed for the cluster's life).
        partitions: u32,
        /// Replicas per datacenter.
        replicas_per_datacenter: usize,
        /// Every node.
        nodes: BTreeMap<u64, MapNode>,
    },
    /// Adds a node as [`NodeState::Joining`].
    AddNode {
        /// Its id (never used before in this cluster).
        id: u64,
        /// Its datacenter and addresses (its state is ignored: joining).
        node: MapNode,
    },
    /// Removes a node that holds no replica slot.
    RemoveNode {
        /// Its id.
        id: u64,
    },
    /// Makes every joining node active, pinning first the partitions whose
    /// replica sets that changes ([`crate::moves`]).
    Rebalance,
    /// Makes an active node draining, pinning first the partitions whose
    /// replica sets that changes.
    Drain {
        /// Its id.
        id: u64,
    },
    /// A moving partition whose epoch is established gains a node of its
    /// target.
    Grow {
        /// The partition.
        partition: u32,
        /// The node.
        node: u64,
        /// The partition's epoch the proposer saw.
        epoch: u64,
    },
    /// A leader of the partition's log, elected in the partition's current
    /// epoch, committed in that epoch everything it recovered.
    Establish {
        /// The partition.
        partition: u32,
        /// The partition's epoch the leader was elected in.
        epoch: u64,
        /// In a failover epoch, the leader: it needs no check against the
        /// new home, and no other leader of the epoch is spared one.
        /// `leader` and `vouched` are left out when unset, so that such
        /// a command reads as before to a binary that does not know them
        /// (one that does not cannot read a command that has them:
        /// upgrade every node before failing a home over).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        leader: Option<u64>,
        /// In a failover epoch, the other replicas whose timelines the
        /// leader's election showed to be a prefix of its log, and the
        /// prefix each had released
        /// (`saferchat_consensus::partition_log::LogReplica::vouched`):
        /// they need no check against the new home either.
        #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
        vouched: BTreeMap<u64, u64>,
    },
    /// The mover of a partition's step handed its rooms' acceptors over to
    /// the step's set (`saferchat_consensus::handover`): a majority of it
    /// holds every room's value. `Establish` waits for it too.
    HandedOver {
        /// The partition.
        partition: u32,
        /// The partition's epoch the mover handed over to.
        epoch: u64,
    },
    /// Homes a partition in another datacenter, in a new partition epoch
    /// whose log the new home's replicas vote on. The operator's answer to
    /// a lost (or leaving) home datacenter: the old home may still be
    /// alive behind a cut, which the home lease fences
    /// (`specs/HomeFailover.tla`). Refused while the partition's epoch is
    /// not established, and where its replicas outside the old or the new
    /// home are no majority of all (two datacenters); a partition pinned
    /// while it moves between replica sets may move its home.
    MoveHome {
        /// The partition.
        partition: u32,
        /// The datacenter that becomes its home.
        datacenter: String,
        /// The partition's epoch the proposer saw.
        epoch: u64,
    },
    /// A moving partition whose epoch is established loses a node its
    /// target does not have.
    Shrink {
        /// The partition.
        partition: u32,
        /// The node.
        node: u64,
        /// The partition's epoch the proposer saw.
        epoch: u64,
    },
}

/// Why a command did not apply.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum MapError {
    /// `Create` on a map that was already created.
    #[error("the cluster was already created (epoch {epoch})")]
    AlreadyCreated {
        /// The map's epoch.
        epoch: u64,
    },
    /// The shape a `Create` names cannot be placed.
    #[error("invalid cluster shape: {0}")]
    Shape(String),
    /// A command other than `Create` on a map not created yet.
    #[error("the cluster map was not created yet")]
    NotCreated,
    /// `AddNode` with an id in use or used before.
    #[error("node id {0} is taken (in the cluster now or removed from it before)")]
    IdTaken(u64),
    /// `AddNode` without a datacenter or an address.
    #[error("a node needs a datacenter, a peer address and a client address")]
    Incomplete,
    /// `RemoveNode` for a node not in the map.
    #[error("node {0} is not in the cluster")]
    UnknownNode(u64),
    /// `RemoveNode` for a node that holds replica slots.
    #[error("node {0} holds replica slots; its partitions must move off it first")]
    HoldsReplicas(u64),
    /// `Drain` of a node that is not active.
    #[error("node {0} is not active")]
    NotActive(u64),
    /// A partition move step that does not apply.
    #[error(transparent)]
    Move(#[from] MoveError),
}

impl ClusterMap {
    /// Whether the cluster was created.
    pub fn is_created(&self) -> bool {
        self.epoch > 0
    }

    /// Applies `command`: the new epoch, or why it did not apply (the map
    /// is then unchanged).
    ///
    /// # Errors
    /// [`MapError`] for a command that does not fit this map.
    pub fn apply(&mut self, command: &MapCommand) -> Result<u64, MapError> {
        match command {
            MapCommand::Create {
                partitions,
                replicas_per_datacenter,
                nodes,
            } => {
                if self.is_created() {
                    return Err(MapError::AlreadyCreated { epoch: self.epoch });
                }
                let candidate = ClusterMap {
                    epoch: self.epoch + 1,
                    partitions: *partitions,
                    replicas_per_datacenter: *replicas_per_datacenter,
                    nodes: nodes.clone(),
                    created_with: nodes
                        .iter()
                        .map(|(id, n)| (*id, n.datacenter.clone()))
                        .collect(),
                    ..ClusterMap::default()
                };
                candidate
                    .placement()
                    .map_err(|e| MapError::Shape(e.to_string()))?;
                *self = candidate;
            }
            MapCommand::AddNode { id, node } => {
                if !self.is_created() {
                    return Err(MapError::NotCreated);
                }
                if self.nodes.contains_key(id) || self.retired.contains(id) || *id == 0 {
                    return Err(MapError::IdTaken(*id));
                }
                if node.datacenter.is_empty()
                    || node.peer_address.is_empty()
                    || node.client_address.is_empty()
                {
                    return Err(MapError::Incomplete);
                }
                self.nodes.insert(
                    *id,
                    MapNode {
                        state: NodeState::Joining,
                        ..node.clone()
                    },
                );
                self.epoch += 1;
            }
            MapCommand::RemoveNode { id } => {
                if !self.is_created() {
                    return Err(MapError::NotCreated);
                }
                if !self.nodes.contains_key(id) {
                    return Err(MapError::UnknownNode(*id));
                }
                if self
                    .holds_slots(*id)
                    .map_err(|e| MapError::Shape(e.to_string()))?
                {
                    return Err(MapError::HoldsReplicas(*id));
                }
                let mut after = self.clone();
                after.nodes.remove(id);
                after.retired.insert(*id);
                // A node without slots can leave the ring without moving
                // anything; should the ring still move a slot (an active
                // node that held none), that would be a move without its
                // steps, so it is refused.
                let (before, then) = (self.placement(), after.placement());
                match (before, then) {
                    (Ok(b), Ok(a)) if b.slots_moved(&a) == 0 => {}
                    _ => return Err(MapError::HoldsReplicas(*id)),
                }
                after.epoch += 1;
                *self = after;
            }
            MapCommand::Rebalance => {
                if !self.is_created() {
                    return Err(MapError::NotCreated);
                }
                self.retarget(|map| {
                    for n in map.nodes.values_mut() {
                        if n.state == NodeState::Joining {
                            n.state = NodeState::Active;
                        }
                    }
                })?;
            }
            MapCommand::Drain { id } => {
                if !self.is_created() {
                    return Err(MapError::NotCreated);
                }
                match self.nodes.get(id) {
                    None => return Err(MapError::UnknownNode(*id)),
                    Some(n) if n.state != NodeState::Active => {
                        return Err(MapError::NotActive(*id));
                    }
                    Some(_) => {}
                }
                let id = *id;
                self.retarget(|map| {
                    if let Some(n) = map.nodes.get_mut(&id) {
                        n.state = NodeState::Draining;
                    }
                })?;
            }
            MapCommand::Grow { .. }
            | MapCommand::Establish { .. }
            | MapCommand::HandedOver { .. }
            | MapCommand::MoveHome { .. }
            | MapCommand::Shrink { .. } => {
                if !self.is_created() {
                    return Err(MapError::NotCreated);
                }
                self.step(command)?;
            }
        }
        Ok(self.epoch)
    }

    /// The nodes that hold replica slots.
    pub fn active(&self) -> impl Iterator<Item = (u64, &MapNode)> {
        self.nodes
            .iter()
            .filter(|(_, n)| n.state == NodeState::Active)
            .map(|(id, n)| (*id, n))
    }

    /// The ring's placement on the active nodes, without pinned
    /// partitions (see [`ClusterMap::placement`]).
    /// The datacenters the cluster was created with, in name order (those
    /// of every node in a map from before `created_with` was kept):
    /// partitions are homed in them (`Placement::home`).
    pub fn created_datacenters(&self) -> Vec<String> {
        let mut dcs: Vec<String> = if self.created_with.is_empty() {
            self.nodes.values().map(|n| n.datacenter.clone()).collect()
        } else {
            self.created_with.values().cloned().collect()
        };
        dcs.sort_unstable();
        dcs.dedup();
        dcs
    }

    pub(crate) fn ring_placement(&self) -> Result<Placement, PlacementError> {
        let partitions = PartitionCount::new(self.partitions)
            .ok_or(PlacementError::PartitionCount(self.partitions))?;
        let nodes: Vec<ClusterNode> = self
            .active()
            .map(|(id, n)| ClusterNode {
                id: NodeId(id),
                datacenter: n.datacenter.clone(),
            })
            .collect();
        let key = (
            nodes,
            self.partitions,
            self.replicas_per_datacenter,
            self.created_datacenters(),
        );
        let mut cache = RING_CACHE.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(i) = cache.iter().position(|(k, _)| *k == key) {
            let hit = cache.remove(i);
            let placement = hit.1.clone();
            cache.push(hit);
            return Ok(placement);
        }
        let built = Placement::build(&key.0, partitions, self.replicas_per_datacenter)?
            .with_homes(self.created_datacenters());
        if cache.len() >= RING_CACHE_MAX {
            cache.remove(0);
        }
        cache.push((key, built.clone()));
        Ok(built)
    }

    /// The nodes that vote in the map's group, for a cluster of `nodes`:
    /// up to [`MAP_VOTERS_MAX`], taken from each datacenter in turn (lowest
    /// id first), so that the group spans datacenters as evenly as it can.
    /// Every node computes the same set from the same node list, which is
    /// what lets each of them start the group with the same voters.
    pub fn voters_of(nodes: &BTreeMap<u64, MapNode>) -> Vec<u64> {
        let mut by_dc: BTreeMap<&str, Vec<u64>> = BTreeMap::new();
        for (id, n) in nodes {
            by_dc.entry(n.datacenter.as_str()).or_default().push(*id);
        }
        let mut voters = Vec::new();
        let mut round = 0;
        while voters.len() < MAP_VOTERS_MAX {
            let taken: Vec<u64> = by_dc
                .values()
                .filter_map(|ids| ids.get(round).copied())
                .collect();
            if taken.is_empty() {
                break;
            }
            voters.extend(taken);
            round += 1;
        }
        voters.truncate(MAP_VOTERS_MAX);
        voters.sort_unstable();
        voters
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nodes(list: &[(u64, &str)]) -> BTreeMap<u64, MapNode> {
        list.iter()
            .map(|(id, dc)| {
                (
                    *id,
                    MapNode {
                        datacenter: (*dc).to_owned(),
                        peer_address: format!("127.0.0.1:{}", 7000 + id),
                        client_address: format!("127.0.0.1:{}", 8000 + id),
                        state: NodeState::Active,
                    },
                )
            })
            .collect()
    }

    fn create(list: &[(u64, &str)]) -> MapCommand {
        MapCommand::Create {
            partitions: 64,
            replicas_per_datacenter: 3,
            nodes: nodes(list),
        }
    }

    /// The ring placements kept for reuse are the ones `Placement::build`
    /// gives for the same inputs, also after more shapes than the cache
    /// holds came and went, and in any order.
    #[test]
    fn a_reused_ring_placement_is_the_one_built_for_the_same_nodes() {
        let shapes: Vec<Vec<(u64, &str)>> = vec![
            vec![(1, "dc1"), (2, "dc1"), (3, "dc1")],
            vec![(1, "dc1"), (2, "dc1"), (3, "dc1"), (4, "dc1")],
            vec![(1, "dc1"), (2, "dc1"), (4, "dc1")],
            vec![(1, "dc1"), (2, "dc2"), (3, "dc1"), (4, "dc2")],
            vec![(5, "dc1"), (6, "dc1"), (7, "dc1")],
            vec![(1, "dc1"), (2, "dc1"), (3, "dc1"), (4, "dc1"), (5, "dc1")],
        ];
        let mut maps = Vec::new();
        for shape in &shapes {
            let mut map = ClusterMap::default();
            map.apply(&create(shape)).expect("create");
            maps.push(map);
        }
        // More rounds over more shapes than the cache keeps, in an order
        // that makes it evict and build again.
        for round in 0..3 {
            for i in (0..maps.len()).map(|i| (i * (round + 1)) % maps.len()) {
                let map = &maps[i];
                let nodes: Vec<ClusterNode> = shapes[i]
                    .iter()
                    .map(|(id, dc)| ClusterNode {
                        id: NodeId(*id),
                        datacenter: (*dc).to_owned(),
                    })
                    .collect();
                let built = Placement::build(&nodes, PartitionCount::new(64).unwrap(), 3).unwrap();
                assert_eq!(
                    map.ring_placement().unwrap(),
                    built,
                    "shape {i}, round {round}"
                );
                assert_eq!(map.ring_placement().unwrap(), built, "shape {i} again");
            }
        }
    }

    #[test]
    fn create_applies_once_and_counts_an_epoch() {
        let mut map = ClusterMap::default();
        assert!(!map.is_created());
        assert_eq!(
            map.apply(&create(&[(1, "dc1"), (2, "dc1"), (3, "dc1")])),
            Ok(1)
        );
        assert!(map.is_created());
        assert_eq!(map.placement().unwrap().nodes().len(), 3);
        let before = map.clone();
        assert_eq!(
            map.apply(&create(&[(1, "dc1")])),
            Err(MapError::AlreadyCreated { epoch: 1 })
        );
        assert_eq!(map, before, "a refused command changes nothing");
    }

    #[test]
    fn a_shape_that_cannot_be_placed_is_refused() {
        let mut map = ClusterMap::default();
        let empty = MapCommand::Create {
            partitions: 64,
            replicas_per_datacenter: 3,
            nodes: BTreeMap::new(),
        };
        assert!(matches!(map.apply(&empty), Err(MapError::Shape(_))));
        let no_partitions = MapCommand::Create {
            partitions: 0,
            replicas_per_datacenter: 3,
            nodes: nodes(&[(1, "dc1")]),
        };
        assert!(matches!(map.apply(&no_partitions), Err(MapError::Shape(_))));
        assert_eq!(map, ClusterMap::default());
    }

    #[test]
    fn the_map_places_partitions_as_the_ring_does() {
        let list = [(1, "dc1"), (2, "dc1"), (3, "dc1"), (4, "dc1")];
        let mut map = ClusterMap::default();
        map.apply(&create(&list)).unwrap();
        let direct = Placement::build(
            &list
                .iter()
                .map(|(id, dc)| ClusterNode {
                    id: NodeId(*id),
                    datacenter: (*dc).to_owned(),
                })
                .collect::<Vec<_>>(),
            PartitionCount::new(64).unwrap(),
            3,
        )
        .unwrap();
        assert_eq!(map.placement().unwrap().slots_moved(&direct), 0);
    }

    #[test]
    fn voters_span_datacenters_and_stop_at_five() {
        assert_eq!(ClusterMap::voters_of(&nodes(&[(7, "dc1")])), vec![7]);
        assert_eq!(
            ClusterMap::voters_of(&nodes(&[(1, "a"), (2, "a"), (3, "a"), (4, "a")])),
            vec![1, 2, 3, 4]
        );
        let seven_in_one = nodes(&(1..=7).map(|i| (i, "a")).collect::<Vec<_>>());
        assert_eq!(ClusterMap::voters_of(&seven_in_one), vec![1, 2, 3, 4, 5]);
        // Three datacenters of three: the first round takes 1, 4 and 7, the
        // second 2 and 5, where the cut at five falls.
        let three_by_three = nodes(&[
            (1, "a"),
            (2, "a"),
            (3, "a"),
            (4, "b"),
            (5, "b"),
            (6, "b"),
            (7, "c"),
            (8, "c"),
            (9, "c"),
        ]);
        let voters = ClusterMap::voters_of(&three_by_three);
        assert_eq!(voters, vec![1, 2, 4, 5, 7]);
        for dc in [[1, 2, 3], [4, 5, 6], [7, 8, 9]] {
            assert!(
                voters.iter().filter(|v| dc.contains(v)).count() >= 1,
                "every datacenter votes: {voters:?}"
            );
        }
    }

    fn joining(id: u64) -> MapCommand {
        MapCommand::AddNode {
            id,
            node: nodes(&[(id, "dc1")]).remove(&id).unwrap(),
        }
    }

    #[test]
    fn a_node_added_joins_without_moving_a_replica_slot() {
        let mut map = ClusterMap::default();
        assert_eq!(map.apply(&joining(4)), Err(MapError::NotCreated));
        map.apply(&create(&[(1, "dc1"), (2, "dc1"), (3, "dc1")]))
            .unwrap();
        let before = map.placement().unwrap();
        assert_eq!(map.apply(&joining(4)), Ok(2));
        assert_eq!(map.nodes[&4].state, NodeState::Joining);
        assert_eq!(map.placement().unwrap().slots_moved(&before), 0);
        assert_eq!(map.placement().unwrap().nodes().len(), 3);
        assert_eq!(map.apply(&joining(4)), Err(MapError::IdTaken(4)));
        let mut incomplete = joining(5);
        if let MapCommand::AddNode { node, .. } = &mut incomplete {
            node.client_address.clear();
        }
        assert_eq!(map.apply(&incomplete), Err(MapError::Incomplete));
        assert_eq!(map.epoch, 2, "refused commands leave the epoch");
    }

    #[test]
    fn only_a_node_without_replica_slots_is_removed_and_its_id_is_never_reused() {
        let mut map = ClusterMap::default();
        map.apply(&create(&[(1, "dc1"), (2, "dc1"), (3, "dc1")]))
            .unwrap();
        assert_eq!(
            map.apply(&MapCommand::RemoveNode { id: 2 }),
            Err(MapError::HoldsReplicas(2))
        );
        assert_eq!(
            map.apply(&MapCommand::RemoveNode { id: 9 }),
            Err(MapError::UnknownNode(9))
        );
        map.apply(&joining(4)).unwrap();
        assert_eq!(map.apply(&MapCommand::RemoveNode { id: 4 }), Ok(3));
        assert!(!map.nodes.contains_key(&4));
        assert_eq!(map.apply(&joining(4)), Err(MapError::IdTaken(4)));
    }

    #[test]
    fn a_map_written_before_states_and_client_addresses_reads_as_active() {
        let old = r#"{"epoch":1,"partitions":64,"replicas_per_datacenter":3,
            "nodes":{"1":{"datacenter":"dc1","peer_address":"127.0.0.1:7001"}}}"#;
        let map: ClusterMap = serde_json::from_str(old).unwrap();
        assert_eq!(map.nodes[&1].state, NodeState::Active);
        assert!(map.retired.is_empty());
        assert_eq!(map.placement().unwrap().nodes().len(), 1);
    }

    #[test]
    fn commands_and_maps_survive_serialization() {
        let command = create(&[(1, "dc1"), (2, "dc2")]);
        let text = serde_json::to_string(&command).unwrap();
        assert_eq!(serde_json::from_str::<MapCommand>(&text).unwrap(), command);
        let mut map = ClusterMap::default();
        map.apply(&command).unwrap();
        let text = serde_json::to_string(&map).unwrap();
        assert_eq!(serde_json::from_str::<ClusterMap>(&text).unwrap(), map);
    }
}
