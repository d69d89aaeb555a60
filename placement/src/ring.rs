//! Partitions to replica sets: one consistent-hash ring per datacenter,
//! with [`VNODES_PER_NODE`] virtual nodes per node.
//!
//! A partition's replicas in a datacenter are the first
//! `replicas_per_datacenter` distinct nodes met walking that datacenter's
//! ring clockwise from the partition's position (all of the datacenter's
//! nodes if it has fewer). Positions are [`crate::stable_hash`] values of
//! fixed byte strings: `"saferchat-vnode" ‖ node id (u64 BE) ‖ index (u32
//! BE)` for a virtual node, `"saferchat-partition" ‖ partition (u32 BE)`
//! for a partition.
//!
//! Why this shape: adding a node to a datacenter inserts its virtual nodes
//! into that ring only; a partition's walk then meets the new node at most
//! once, so at most one of its replica slots changes, and only to the new
//! node. With `n` nodes and `r` replicas going to `n + 1`, about
//! `r/(n+1)` of the partitions gain the new node, i.e. `1/(n+1)` of all
//! slots move (a quarter from 3 to 4) — the minimum for the new node to
//! carry its share. `ring_tests` checks exactly that property and the
//! balance, and prints the numbers.
//!
//! The walk uses `hashring::HashRing::get_with_replicas`, asking for the
//! whole ring in order from the partition's position and keeping the first
//! distinct nodes (the crate returns virtual nodes and may repeat a
//! physical one).

use std::collections::{BTreeMap, BTreeSet};
use std::hash::{Hash, Hasher};

use hashring::HashRing;
use saferchat_consensus::NodeId;

use crate::partition::{PartitionCount, PartitionId};
use crate::stable_hash::StableHash;

/// Virtual nodes per node: with 256, 4 to 10 nodes each carry within 10 %
/// of an even share of 256 partitions' slots (64 gave up to 20 %;
/// `ring_tests` measures it). Building a placement walks the ring once per
/// partition, a few milliseconds, done only when the node list changes.
pub const VNODES_PER_NODE: u32 = 256;
/// Replicas of each partition in each datacenter, unless configured.
pub const REPLICAS_PER_DATACENTER_DEFAULT: usize = 3;

/// A node as placement sees it.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ClusterNode {
    /// Its id.
    pub id: NodeId,
    /// Its datacenter.
    pub datacenter: String,
}

/// Why a placement cannot be built.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PlacementError {
    /// The node list is empty.
    #[error("a cluster needs at least one node")]
    NoNodes,
    /// A node id appears twice.
    #[error("node {0} is listed twice")]
    DuplicateNode(NodeId),
    /// Zero replicas per datacenter.
    #[error("replicas per datacenter must be at least 1")]
    NoReplicas,
    /// A partition count outside what [`PartitionCount::new`] accepts.
    #[error("{0} is not a usable partition count")]
    PartitionCount(u32),
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct VNode {
    node: NodeId,
    index: u32,
}

impl Hash for VNode {
    fn hash<H: Hasher>(&self, state: &mut H) {
        state.write(b"saferchat-vnode");
        state.write(&self.node.0.to_be_bytes());
        state.write(&self.index.to_be_bytes());
    }
}

struct PartitionKey(PartitionId);

impl Hash for PartitionKey {
    fn hash<H: Hasher>(&self, state: &mut H) {
        state.write(b"saferchat-partition");
        state.write(&self.0.0.to_be_bytes());
    }
}

/// The replica sets of every partition of a cluster.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Placement {
    partitions: PartitionCount,
    replicas_per_datacenter: usize,
    nodes: Vec<ClusterNode>,
    /// Per partition: its replicas, datacenters in name order, each
    /// datacenter's nodes in ring order.
    table: Vec<Vec<NodeId>>,
    /// The datacenters partitions take turns to call home, in name order
    /// (see [`Placement::home`]).
    homes: Vec<String>,
    /// Partitions whose home an operator moved to another datacenter
    /// (`MapCommand::MoveHome`), and where to.
    moved_homes: BTreeMap<u32, String>,
}

impl Placement {
    /// Computes the replica sets of every partition.
    ///
    /// # Errors
    /// An empty or duplicated node list, or zero replicas.
    pub fn build(
        nodes: &[ClusterNode],
        partitions: PartitionCount,
        replicas_per_datacenter: usize,
    ) -> Result<Placement, PlacementError> {
        if nodes.is_empty() {
            return Err(PlacementError::NoNodes);
        }
        if replicas_per_datacenter == 0 {
            return Err(PlacementError::NoReplicas);
        }
        let mut sorted = nodes.to_vec();
        sorted.sort();
        if let Some(w) = sorted.windows(2).find(|w| w[0].id == w[1].id) {
            return Err(PlacementError::DuplicateNode(w[0].id));
        }
        let mut by_dc: BTreeMap<&str, Vec<NodeId>> = BTreeMap::new();
        for n in &sorted {
            by_dc.entry(n.datacenter.as_str()).or_default().push(n.id);
        }
        let rings: Vec<HashRing<VNode, StableHash>> = by_dc
            .values()
            .map(|ids| {
                let mut ring = HashRing::with_hasher(StableHash);
                ring.batch_add(
                    ids.iter()
                        .flat_map(|id| (0..VNODES_PER_NODE).map(|index| VNode { node: *id, index }))
                        .collect(),
                );
                ring
            })
            .collect();
        let table = partitions
            .all()
            .map(|p| {
                let mut replicas = Vec::new();
                for ring in &rings {
                    let walk = ring
                        .get_with_replicas(&PartitionKey(p), ring.len())
                        .expect("a datacenter has nodes");
                    let mut seen = BTreeSet::new();
                    replicas.extend(
                        walk.into_iter()
                            .map(|v| v.node)
                            .filter(|n| seen.insert(*n))
                            .take(replicas_per_datacenter),
                    );
                }
                replicas
            })
            .collect();
        let homes = by_dc.keys().map(|d| (*d).to_owned()).collect();
        Ok(Placement {
            partitions,
            replicas_per_datacenter,
            nodes: sorted,
            table,
            homes,
            moved_homes: BTreeMap::new(),
        })
    }

    /// The same placement with partitions homed in `datacenters` (sorted
    /// here) rather than in the datacenters of the nodes it was built
    /// from: the cluster map homes partitions in the datacenters the
    /// cluster was created with, so a datacenter that joins later moves
    /// no partition's home (a home that changed without a move step
    /// would change who votes on its log). An empty list keeps the
    /// homes as built.
    #[must_use]
    pub fn with_homes(mut self, mut datacenters: Vec<String>) -> Placement {
        datacenters.sort_unstable();
        datacenters.dedup();
        if !datacenters.is_empty() {
            self.homes = datacenters;
        }
        self
    }

    /// The datacenter partition `p` calls home: the `p mod D`-th of the
    /// cluster's `D` datacenters in name order, so partitions (and with
    /// them rooms) are homed evenly across datacenters. Its log's voters
    /// are its replicas there ([`Placement::voters`]); its replicas in
    /// every other datacenter follow the log without voting
    /// ([`Placement::learners`]).
    ///
    /// A home moved by the cluster map ([`Placement::move_home`]) wins.
    pub fn home(&self, p: PartitionId) -> &str {
        self.moved_homes
            .get(&p.0)
            .map_or_else(|| self.turn_home(p), String::as_str)
    }

    /// The datacenter whose turn it is to home `p`, moved or not.
    pub fn turn_home(&self, p: PartitionId) -> &str {
        &self.homes[p.0 as usize % self.homes.len()]
    }

    /// Homes partition `p` in `datacenter` from now on (its turn's
    /// datacenter again: the move is undone).
    pub fn move_home(&mut self, p: PartitionId, datacenter: &str) {
        if self.turn_home(p) == datacenter {
            self.moved_homes.remove(&p.0);
        } else {
            self.moved_homes.insert(p.0, datacenter.to_owned());
        }
    }

    /// Whether partition `p`'s home can fail over to another datacenter
    /// (`MapCommand::MoveHome` with its home lost): its replicas outside
    /// the home are a majority of all its replicas, so that they can elect
    /// a new home's leader by the majority of all that every home lease
    /// needs too. Not so with two datacenters of equal size (half is no
    /// majority), nor with one.
    pub fn can_fail_over(&self, p: PartitionId) -> bool {
        let all = self.replicas(p).len();
        let outside = self.learners(p).len();
        2 * outside > all
    }

    /// The datacenter of `node`, if it is placed.
    pub fn datacenter_of(&self, node: NodeId) -> Option<&str> {
        self.nodes
            .iter()
            .find(|n| n.id == node)
            .map(|n| n.datacenter.as_str())
    }

    /// The replicas of partition `p` in its home datacenter, in placement
    /// order: its log's voters. When none is there (only a map whose home
    /// datacenter lost every node could say so), every replica votes.
    pub fn voters(&self, p: PartitionId) -> Vec<NodeId> {
        let home = self.home(p);
        let voters: Vec<NodeId> = self
            .replicas(p)
            .iter()
            .copied()
            .filter(|n| self.datacenter_of(*n) == Some(home))
            .collect();
        if voters.is_empty() {
            self.replicas(p).to_vec()
        } else {
            voters
        }
    }

    /// The replicas of partition `p` outside its home datacenter, in
    /// placement order: they follow its log without voting.
    pub fn learners(&self, p: PartitionId) -> Vec<NodeId> {
        let voters = self.voters(p);
        self.replicas(p)
            .iter()
            .copied()
            .filter(|n| !voters.contains(n))
            .collect()
    }

    /// The partition count.
    pub fn partitions(&self) -> PartitionCount {
        self.partitions
    }

    /// Replicas per datacenter, as configured.
    pub fn replicas_per_datacenter(&self) -> usize {
        self.replicas_per_datacenter
    }

    /// The nodes, by id.
    pub fn nodes(&self) -> &[ClusterNode] {
        &self.nodes
    }

    /// The replicas of partition `p`: datacenters in name order, each one's
    /// nodes in ring order.
    ///
    /// # Panics
    /// When `p` is not a partition of this placement.
    pub fn replicas(&self, p: PartitionId) -> &[NodeId] {
        &self.table[p.0 as usize]
    }

    /// The node that serves partition `p` while nothing is wrong: its first
    /// replica in its home datacenter. (Which node actually leads is the
    /// partition log's business; this is the one it prefers.)
    pub fn preferred_owner(&self, p: PartitionId) -> NodeId {
        self.voters(p)[0]
    }

    /// The partition of a room and its replicas.
    pub fn room(&self, room: &str) -> (PartitionId, &[NodeId]) {
        let p = self.partitions.of_room(room);
        (p, self.replicas(p))
    }

    /// The partitions `node` replicates.
    pub fn partitions_of(&self, node: NodeId) -> Vec<PartitionId> {
        self.partitions
            .all()
            .filter(|p| self.replicas(*p).contains(&node))
            .collect()
    }

    /// How many replica slots differ between two placements of the same
    /// partition count: for each partition, the replicas of `self` that
    /// `other` does not have.
    ///
    /// # Panics
    /// When the partition counts differ.
    pub fn slots_moved(&self, other: &Placement) -> usize {
        assert_eq!(self.partitions, other.partitions, "same partitions");
        self.partitions
            .all()
            .map(|p| {
                let theirs = other.replicas(p);
                self.replicas(p)
                    .iter()
                    .filter(|n| !theirs.contains(n))
                    .count()
            })
            .sum()
    }

    /// Puts `replicas` in place of partition `p`'s set (a partition the
    /// cluster map pinned while it moves), adding any node the ring does
    /// not place.
    ///
    /// # Panics
    /// When `p` is not a partition of this placement.
    pub fn pin(&mut self, p: PartitionId, replicas: &[ClusterNode]) {
        for n in replicas {
            if !self.nodes.iter().any(|m| m.id == n.id) {
                self.nodes.push(n.clone());
                self.nodes.sort();
            }
        }
        self.table[p.0 as usize] = replicas.iter().map(|n| n.id).collect();
    }

    /// Total replica slots.
    pub fn slots(&self) -> usize {
        self.table.iter().map(Vec::len).sum()
    }
}

#[cfg(test)]
mod ring_tests {
    use super::*;

    fn dc1(ids: impl IntoIterator<Item = u64>) -> Vec<ClusterNode> {
        ids.into_iter()
            .map(|id| ClusterNode {
                id: NodeId(id),
                datacenter: "dc1".into(),
            })
            .collect()
    }

    #[test]
    fn small_clusters_replicate_everything_everywhere() {
        for n in 1..=3 {
            let p = Placement::build(&dc1(1..=n), PartitionCount::DEFAULT, 3).unwrap();
            for part in PartitionCount::DEFAULT.all() {
                let mut r = p.replicas(part).to_vec();
                r.sort();
                assert_eq!(r, (1..=n).map(NodeId).collect::<Vec<_>>());
            }
        }
    }

    #[test]
    fn the_input_order_does_not_matter() {
        let a = Placement::build(&dc1([1, 2, 3, 4, 5]), PartitionCount::DEFAULT, 3).unwrap();
        let b = Placement::build(&dc1([5, 3, 1, 4, 2]), PartitionCount::DEFAULT, 3).unwrap();
        assert_eq!(a, b);
    }

    #[test]
    fn bad_node_lists_are_refused() {
        let c = PartitionCount::DEFAULT;
        assert_eq!(Placement::build(&[], c, 3), Err(PlacementError::NoNodes));
        assert_eq!(
            Placement::build(&dc1([1, 2, 2]), c, 3),
            Err(PlacementError::DuplicateNode(NodeId(2)))
        );
        assert_eq!(
            Placement::build(&dc1([1]), c, 0),
            Err(PlacementError::NoReplicas)
        );
    }

    /// Adding a node moves only slots it takes, about 1/(n+1) of them.
    #[test]
    fn adding_a_node_moves_only_the_slots_it_takes() {
        let c = PartitionCount::DEFAULT;
        for n in [3u64, 4, 5, 9] {
            let before = Placement::build(&dc1(1..=n), c, 3).unwrap();
            let after = Placement::build(&dc1(1..=n + 1), c, 3).unwrap();
            for p in c.all() {
                let (old, new) = (before.replicas(p), after.replicas(p));
                let gone: Vec<_> = old.iter().filter(|x| !new.contains(x)).collect();
                let came: Vec<_> = new.iter().filter(|x| !old.contains(x)).collect();
                assert!(gone.len() <= 1, "{p}: {old:?} -> {new:?}");
                assert_eq!(gone.len(), came.len());
                assert!(came.iter().all(|x| **x == NodeId(n + 1)), "{p}");
            }
            let moved = before.slots_moved(&after);
            let fraction = moved as f64 / before.slots() as f64;
            let ideal = 1.0 / (n + 1) as f64;
            println!(
                "{n} -> {} nodes: {moved} of {} slots moved ({:.1} %, ideal {:.1} %)",
                n + 1,
                before.slots(),
                100.0 * fraction,
                100.0 * ideal
            );
            assert!(
                (fraction - ideal).abs() < 0.35 * ideal,
                "{fraction} vs {ideal}"
            );
        }
    }

    /// Every node carries close to its share of slots.
    #[test]
    fn slots_are_spread_evenly() {
        let c = PartitionCount::DEFAULT;
        for n in [4u64, 5, 10] {
            let p = Placement::build(&dc1(1..=n), c, 3).unwrap();
            let share = p.slots() as f64 / n as f64;
            let loads: Vec<usize> = (1..=n)
                .map(|id| p.partitions_of(NodeId(id)).len())
                .collect();
            println!("{n} nodes: slots per node {loads:?} (even: {share:.1})");
            for load in loads {
                assert!(
                    (load as f64 - share).abs() < 0.15 * share,
                    "{load} vs {share}"
                );
            }
        }
    }

    #[test]
    fn every_datacenter_gets_its_replicas() {
        let mut nodes = dc1(1..=4);
        nodes.extend((5..=6).map(|id| ClusterNode {
            id: NodeId(id),
            datacenter: "dc2".into(),
        }));
        let p = Placement::build(&nodes, PartitionCount::DEFAULT, 3).unwrap();
        for part in PartitionCount::DEFAULT.all() {
            let r = p.replicas(part);
            assert_eq!(r.len(), 5, "3 in dc1, both of dc2");
            assert!(r[..3].iter().all(|n| n.0 <= 4));
            assert!(r[3..].iter().all(|n| n.0 >= 5));
        }
    }

    #[test]
    fn partitions_take_turns_to_call_a_datacenter_home() {
        let node = |id, dc: &str| ClusterNode {
            id: NodeId(id),
            datacenter: dc.into(),
        };
        let nodes: Vec<ClusterNode> = (1..=6)
            .map(|id| node(id, if id <= 3 { "east" } else { "west" }))
            .collect();
        let p = Placement::build(&nodes, PartitionCount::DEFAULT, 3).unwrap();
        let mut homed = BTreeMap::new();
        for part in PartitionCount::DEFAULT.all() {
            let home = if part.0 % 2 == 0 { "east" } else { "west" };
            assert_eq!(p.home(part), home);
            *homed.entry(home).or_insert(0) += 1;
            let voters = p.voters(part);
            assert_eq!(voters.len(), 3);
            assert!(voters.iter().all(|n| p.datacenter_of(*n) == Some(home)));
            let learners = p.learners(part);
            assert_eq!(learners.len(), 3);
            assert!(learners.iter().all(|n| p.datacenter_of(*n) != Some(home)));
            assert_eq!(p.preferred_owner(part), voters[0]);
        }
        assert_eq!(homed, BTreeMap::from([("east", 128), ("west", 128)]));
        // A datacenter that joins later homes nothing when the homes are
        // the created ones.
        let mut grown = nodes.clone();
        grown.push(node(7, "central"));
        let q = Placement::build(&grown, PartitionCount::DEFAULT, 3)
            .unwrap()
            .with_homes(vec!["west".into(), "east".into()]);
        for part in PartitionCount::DEFAULT.all() {
            assert_eq!(q.home(part), p.home(part));
            assert_eq!(q.voters(part), p.voters(part));
            assert_eq!(q.learners(part).len(), 4, "west's three and central's one");
        }
        // One datacenter: every replica votes.
        let one = Placement::build(&dc1(1..=3), PartitionCount::DEFAULT, 3).unwrap();
        for part in PartitionCount::DEFAULT.all() {
            assert_eq!(one.voters(part), one.replicas(part));
            assert!(one.learners(part).is_empty());
        }
    }
}
