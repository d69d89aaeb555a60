//! The one place that answers "which nodes replicate partition P", "who
//! serves room R" and "where do I send this client".
//!
//! The placement itself is computed by `saferchat-placement` (pure) from
//! the configured node list, partition count and replicas per datacenter.
//! This module adds what needs the node: the cluster's shape persisted in
//! the data folder, so that a node never starts with a different shape
//! than the one its data was written under, and the redirect status.
//!
//! # The persisted shape and upgrades
//!
//! The first start of a data folder writes `cluster.toml` (partition count,
//! replicas per datacenter, every node's id and datacenter), synced to
//! disk. Every later start compares the configuration with it and refuses
//! to start on any difference. The node list decides which nodes are Paxos
//! acceptors of a room's membership; starting node 1 of a single-node
//! deployment as one of three, say, would make {2, 3} a quorum that has
//! never seen what node 1 chose, and could choose differently. Changing the
//! shape is a reconfiguration of acceptor sets, which belongs to the
//! replicated cluster map, not to a configuration file.
//!
//! A data folder from before this file existed has none; its first start
//! with this version records the configuration it is started with, which
//! is the one it ran with (the shape could not change before either:
//! membership was replicated on every configured node).
//!
//! Membership acceptors are still every configured node (for the three-node
//! clusters of today these are exactly each partition's replicas); timeline
//! ownership already follows the partitions.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use saferchat_consensus::{NodeId, RoomId};
use saferchat_placement::{ClusterNode, PartitionCount, PartitionId, Placement};
use serde::{Deserialize, Serialize};
use tonic::Status;

use crate::config::NodeConfig;
use crate::error::NodeError;
use crate::timeline::Timeline;

pub use saferchat_proto::redirect::REDIRECT_METADATA;
/// The file in the data folder that records the cluster's shape.
pub const SHAPE_FILE: &str = "cluster.toml";

/// The cluster's shape, as persisted.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Shape {
    /// Partitions of the room-hash space.
    pub partitions: u32,
    /// Replicas of each partition per datacenter.
    pub replicas_per_datacenter: usize,
    /// Every node, by id.
    pub nodes: Vec<ShapeNode>,
    /// Where rooms' membership (Paxos acceptors, lease holders) lives:
    /// [`MEMBERSHIP_ON_PARTITION_REPLICAS`]; files written before this
    /// field existed read as [`MEMBERSHIP_ON_EVERY_NODE`].
    #[serde(default = "every_node")]
    pub membership: String,
    /// Who votes on a partition's log: [`TIMELINE_HOME_DATACENTER`];
    /// files written before this field existed read as
    /// [`TIMELINE_EVERY_DATACENTER`].
    #[serde(default = "every_datacenter")]
    pub timeline: String,
}

/// Every replica of a partition, in every datacenter, votes on its log
/// (before home datacenters).
pub const TIMELINE_EVERY_DATACENTER: &str = "every-datacenter";
/// A partition's replicas in its home datacenter vote on its log; the
/// others follow it (`Placement::home`).
pub const TIMELINE_HOME_DATACENTER: &str = "home-datacenter";

fn every_datacenter() -> String {
    TIMELINE_EVERY_DATACENTER.to_owned()
}

/// Rooms' membership replicated on every node (before partitions).
pub const MEMBERSHIP_ON_EVERY_NODE: &str = "every-node";
/// Rooms' membership replicated on their partition's replicas.
pub const MEMBERSHIP_ON_PARTITION_REPLICAS: &str = "partition-replicas";

fn every_node() -> String {
    MEMBERSHIP_ON_EVERY_NODE.to_owned()
}

/// A node of the persisted shape.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShapeNode {
    /// Its id.
    pub id: u64,
    /// Its datacenter.
    pub datacenter: String,
}

impl Shape {
    /// The shape a configuration describes.
    pub fn of(config: &NodeConfig) -> Shape {
        let nodes: Vec<ShapeNode> = config
            .placement_members()
            .into_iter()
            .map(|(id, dc)| ShapeNode {
                id,
                datacenter: dc.to_owned(),
            })
            .collect();
        Shape {
            partitions: config.partitions,
            replicas_per_datacenter: config.replicas_per_datacenter,
            nodes,
            membership: MEMBERSHIP_ON_PARTITION_REPLICAS.to_owned(),
            timeline: TIMELINE_HOME_DATACENTER.to_owned(),
        }
    }

    fn datacenters(&self) -> usize {
        let mut dcs: Vec<&str> = self.nodes.iter().map(|n| n.datacenter.as_str()).collect();
        dcs.sort_unstable();
        dcs.dedup();
        dcs.len()
    }

    /// Whether every node replicates every partition (no datacenter has
    /// more nodes than replicas per datacenter): then "every node" and
    /// "the partition's replicas" are the same acceptor sets.
    fn every_node_replicates_everything(&self) -> bool {
        let mut per_dc: std::collections::BTreeMap<&str, usize> = std::collections::BTreeMap::new();
        for n in &self.nodes {
            *per_dc.entry(n.datacenter.as_str()).or_default() += 1;
        }
        per_dc.values().all(|n| *n <= self.replicas_per_datacenter)
    }

    fn describe(&self) -> String {
        let nodes: Vec<String> = self
            .nodes
            .iter()
            .map(|n| format!("n{}@{}", n.id, n.datacenter))
            .collect();
        format!(
            "{} partitions, {} replicas per datacenter, nodes {}",
            self.partitions,
            self.replicas_per_datacenter,
            nodes.join(" ")
        )
    }
}

/// Checks the configured shape against the one persisted in `data_dir`,
/// or persists it on a first start.
///
/// # Errors
/// [`NodeError::Config`] when they differ (naming both) or the file is
/// unreadable; [`NodeError::Storage`] when it cannot be written durably.
pub fn check_or_record(data_dir: &Path, configured: &Shape) -> Result<(), NodeError> {
    let path = data_dir.join(SHAPE_FILE);
    match std::fs::read_to_string(&path) {
        Ok(text) => {
            let mut recorded: Shape = toml::from_str(&text)
                .map_err(|e| NodeError::Config(format!("{}: {e}", path.display())))?;
            if recorded.timeline == TIMELINE_EVERY_DATACENTER {
                // Recorded before partitions had a home datacenter. In one
                // datacenter every replica is in the home, so the voters
                // are the same and the upgrade only records that. Across
                // datacenters the voters would shrink to the home's: a
                // quorum of those need not meet a quorum of the old set,
                // so a chosen slot could be overwritten. That is a
                // reconfiguration this version does not do.
                if recorded.datacenters() > 1 {
                    return Err(NodeError::Config(format!(
                        "this data folder ({}) belongs to a cluster whose partition logs are voted on in every datacenter; this version has each partition's replicas in its home datacenter vote and the others follow, and moving a running cluster's logs to that is a reconfiguration this version cannot do: run the previous version",
                        path.display()
                    )));
                }
                recorded.timeline = TIMELINE_HOME_DATACENTER.to_owned();
                let upgraded = recorded.clone();
                if upgraded == *configured {
                    write_shape(&path, configured)?;
                }
            }
            let upgraded = Shape {
                membership: MEMBERSHIP_ON_PARTITION_REPLICAS.to_owned(),
                ..recorded.clone()
            };
            if recorded.membership == MEMBERSHIP_ON_EVERY_NODE && upgraded == *configured {
                // Recorded before membership followed partitions. Where every
                // node replicates every partition the acceptor sets are the
                // same, so the upgrade only records that; elsewhere moving
                // rooms' acceptors is a reconfiguration (not built).
                if recorded.every_node_replicates_everything() {
                    return write_shape(&path, configured);
                }
                return Err(NodeError::Config(format!(
                    "this data folder ({}) belongs to a cluster whose rooms' membership is replicated on every node; this version keeps it on each partition's {} replicas per datacenter, and moving it for a cluster with more nodes than that per datacenter is a reconfiguration this version cannot do: run the previous version",
                    path.display(),
                    recorded.replicas_per_datacenter
                )));
            }
            if recorded != *configured {
                return Err(NodeError::Config(format!(
                    "this data folder belongs to a cluster of {} ({}), but the configuration \
                     describes {}; a cluster's shape cannot change by configuration (it would \
                     change who votes on membership): restore the configuration",
                    recorded.describe(),
                    path.display(),
                    configured.describe()
                )));
            }
            Ok(())
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => write_shape(&path, configured),
        Err(e) => Err(NodeError::Config(format!(
            "reading {}: {e}",
            path.display()
        ))),
    }
}

fn write_shape(path: &Path, shape: &Shape) -> Result<(), NodeError> {
    let text = format!(
        "# The shape of the cluster this data folder belongs to, recorded at its\n\
         # first start. The node refuses to start with a configuration that differs.\n{}",
        toml::to_string(shape).map_err(|e| NodeError::Config(e.to_string()))?
    );
    crate::storage::durable::replace_file(
        path.parent().unwrap_or(Path::new(".")),
        SHAPE_FILE,
        text.as_bytes(),
    )
    .map_err(|e| NodeError::Storage(format!("writing {}: {e}", path.display())))
}

/// The replica configuration of the rooms of `partition`: their Paxos
/// acceptors are the partition's replicas; the lease holders are all of
/// them in one datacenter, else every replica in the partition's home
/// datacenter (its log's voters) and the first replica of each other
/// datacenter in placement order; their ballots carry `epoch`, the
/// partition's map epoch. `None` when this node is not a replica.
///
/// Every voter holds a lease because whichever of them leads the
/// partition's log owns its rooms and checks every post against the
/// membership: as a holder it reads it locally, where any other node
/// would need a quorum read across datacenters for each batch of posts.
/// A change waits for every unexpired holder's acknowledgement; the
/// voters are in the proposer's datacenter or one round trip away, like
/// the one holder of each other datacenter.
///
/// The holders were once the lowest-numbered replica of each datacenter.
/// Changing them is safe while nodes disagree (a rolling upgrade): a
/// grantor reports every holder it promised, whatever it now takes the
/// holders to be, and a restarted grantor reports every replica while it
/// recovers (`Grantor::restarted`), so no commit skips a holder that may
/// still read under a lease.
pub fn room_replicas(
    all: &saferchat_consensus::ReplicaConfig,
    placement: &Placement,
    partition: saferchat_placement::PartitionId,
    epoch: u64,
) -> Option<saferchat_consensus::ReplicaConfig> {
    let mut replicas = placement.replicas(partition).to_vec();
    replicas.sort_unstable();
    if !replicas.contains(&all.me) {
        return None;
    }
    let dc = |n: NodeId| {
        placement
            .nodes()
            .iter()
            .find(|c| c.id == n)
            .map(|c| c.datacenter.clone())
            .unwrap_or_default()
    };
    let mut datacenters: Vec<String> = replicas.iter().map(|n| dc(*n)).collect();
    datacenters.sort_unstable();
    datacenters.dedup();
    let holders = if datacenters.len() == 1 {
        replicas.clone()
    } else {
        let ordered = placement.replicas(partition);
        let home = placement.voters(partition);
        let mut holders: Vec<NodeId> = datacenters
            .iter()
            .filter_map(|d| ordered.iter().copied().find(|n| dc(*n) == *d))
            .chain(home.iter().copied())
            .filter(|n| replicas.contains(n))
            .collect();
        holders.sort_unstable();
        holders.dedup();
        holders
    };
    Some(saferchat_consensus::ReplicaConfig {
        me: all.me,
        replicas,
        epoch,
        holders,
        lease: all.lease,
        proposer: all.proposer,
    })
}

/// A driver's placement after the cluster map went from `before` to
/// `after`: every partition whose epoch moved (a grow or a shrink) takes
/// the map's new replica set; the partitions that moved come with it.
/// `None` when there is nothing to follow: the map is not created, not
/// newer, or has no placement of the same partition count. A partition
/// the map places elsewhere at the same epoch is logged and kept where it
/// is: a replica set changes only with its epoch, so that difference is a
/// node configured with another view of the cluster, not a move.
pub fn follow_map(
    placement: &Placement,
    before: &saferchat_placement::ClusterMap,
    after: &saferchat_placement::ClusterMap,
) -> Option<(Placement, Vec<u32>)> {
    if !after.is_created() || after.epoch <= before.epoch {
        return None;
    }
    let mapped = match after.placement() {
        Ok(mapped) if mapped.partitions() == placement.partitions() => mapped,
        Ok(_) => {
            tracing::warn!(
                epoch = after.epoch,
                "the cluster map has another partition count; not followed"
            );
            return None;
        }
        Err(e) => {
            tracing::warn!(epoch = after.epoch, error = %e, "the cluster map has no placement; not followed");
            return None;
        }
    };
    let mut ours = placement.clone();
    let mut moved = Vec::new();
    for p in mapped.partitions().all() {
        if after.partition_epoch(p.0) == before.partition_epoch(p.0) {
            if mapped.replicas(p) != placement.replicas(p) {
                tracing::warn!(
                    partition = p.0,
                    "the cluster map places the partition elsewhere at the same epoch; not followed"
                );
            }
            continue;
        }
        let nodes: Vec<saferchat_placement::ClusterNode> = mapped
            .replicas(p)
            .iter()
            .filter_map(|n| mapped.nodes().iter().find(|c| c.id == *n).cloned())
            .collect();
        ours.pin(p, &nodes);
        // A home move (`MapCommand::MoveHome`) changes the voters with the
        // epoch, not the replicas.
        ours.move_home(p, mapped.home(p));
        moved.push(p.0);
    }
    Some((ours, moved))
}

/// The configured `placement` with every partition move and home move of
/// `map` in it: where the drivers start from. The map a node starts with
/// is its last snapshot's, which may hold hundreds of moves (a snapshot is
/// taken every 64 map commands); the drivers follow only maps newer than
/// the one they start with, so they must start from the placement that
/// map describes, or a restarted node would run a moved partition with its
/// configured replicas in the moved epoch, and leave unloaded the state of
/// a partition it gained.
pub fn at_map(placement: &Placement, map: &saferchat_placement::ClusterMap) -> Placement {
    follow_map(placement, &saferchat_placement::ClusterMap::default(), map)
        .map_or_else(|| placement.clone(), |(at, _)| at)
}

/// A placement that follows the cluster map's partition moves (see
/// [`follow_map`]), read on each use: for the parts of the node that
/// route and forward rather than run a driver.
#[derive(Debug)]
pub struct FollowedPlacement {
    cached: std::sync::RwLock<(Arc<saferchat_placement::ClusterMap>, Arc<Placement>)>,
    maps: Option<tokio::sync::watch::Receiver<saferchat_placement::ClusterMap>>,
}

impl FollowedPlacement {
    /// `placement`, following `maps` when given.
    pub fn new(
        placement: Arc<Placement>,
        maps: Option<tokio::sync::watch::Receiver<saferchat_placement::ClusterMap>>,
    ) -> FollowedPlacement {
        FollowedPlacement {
            cached: std::sync::RwLock::new((Arc::default(), placement)),
            maps,
        }
    }

    /// The placement now.
    pub fn current(&self) -> Arc<Placement> {
        if let Some(maps) = &self.maps {
            let latest = maps.borrow();
            let stale = self.cached.read().expect("placement lock").0.epoch < latest.epoch;
            if stale {
                let map = latest.clone();
                drop(latest);
                let mut cached = self.cached.write().expect("placement lock");
                if cached.0.epoch < map.epoch {
                    if let Some((placement, _)) = follow_map(&cached.1, &cached.0, &map) {
                        cached.1 = Arc::new(placement);
                    }
                    cached.0 = Arc::new(map);
                }
            }
        }
        Arc::clone(&self.cached.read().expect("placement lock").1)
    }

    /// A node's entry in the cluster map, when it follows one.
    pub fn map_node(&self, id: NodeId) -> Option<saferchat_placement::MapNode> {
        self.maps.as_ref()?.borrow().nodes.get(&id.0).cloned()
    }
}

/// How long a client's call waits for its room's partition to elect a
/// leader before it is told to retry.
pub const ROUTE_WAIT_MS: u64 = 8_000;

/// Placement plus the addresses needed to route clients.
#[derive(Debug)]
pub struct Routing {
    me: NodeId,
    /// The placement, following the cluster map's moves (the client
    /// addresses of nodes that joined come from the map too).
    placement: FollowedPlacement,
    /// Client address of every other node, as configured.
    clients: Vec<(NodeId, std::net::SocketAddr)>,
    /// The partition logs' leaders (none on a single node).
    timeline: Option<Timeline>,
}

/// The placement of the configured cluster.
///
/// # Errors
/// [`NodeError::Config`] when the shape is invalid.
pub fn build(config: &NodeConfig) -> Result<Placement, NodeError> {
    let shape = Shape::of(config);
    let partitions = PartitionCount::new(shape.partitions).ok_or_else(|| {
        NodeError::Config(format!("partitions must be 1 to {}", PartitionCount::MAX))
    })?;
    let nodes: Vec<ClusterNode> = shape
        .nodes
        .iter()
        .map(|n| ClusterNode {
            id: NodeId(n.id),
            datacenter: n.datacenter.clone(),
        })
        .collect();
    Placement::build(&nodes, partitions, shape.replicas_per_datacenter)
        .map_err(|e| NodeError::Config(format!("placement: {e}")))
}

impl Routing {
    /// Routing by `placement`, and by the leaders `timeline` knows of (a
    /// single node has no timeline: it serves every room).
    pub fn new(
        config: &NodeConfig,
        placement: Arc<Placement>,
        timeline: Option<Timeline>,
    ) -> Routing {
        Routing {
            me: NodeId(config.node_id),
            placement: FollowedPlacement::new(placement, None),
            clients: config
                .peers
                .iter()
                .map(|p| (NodeId(p.id), p.client_address))
                .collect(),
            timeline,
        }
    }

    /// The same, following the cluster map's partition moves and learning
    /// the client addresses of nodes that joined from it.
    #[must_use]
    pub fn with_map(
        mut self,
        maps: tokio::sync::watch::Receiver<saferchat_placement::ClusterMap>,
    ) -> Routing {
        self.placement = FollowedPlacement::new(self.placement.current(), Some(maps));
        self
    }

    /// The placement now.
    pub fn placement(&self) -> Arc<Placement> {
        self.placement.current()
    }

    /// The partition a room belongs to.
    pub fn partition(&self, room: &RoomId) -> PartitionId {
        self.placement().partitions().of_room(room.as_str())
    }

    /// The node that serves a room's messages while nothing is wrong: its
    /// partition's preferred owner, which every node computes alike.
    pub fn preferred_owner(&self, room: &RoomId) -> NodeId {
        self.placement().preferred_owner(self.partition(room))
    }

    /// The replicated timeline, on a node of a cluster.
    pub fn timeline(&self) -> Option<&Timeline> {
        self.timeline.as_ref()
    }

    /// Whether this node may answer a read of `room`'s history from its
    /// own copy rather than ask the room's owner: it is a learner of the
    /// room's partition whose copy holds every slot it heard committed
    /// ([`Timeline::reads_locally`]). False on a single node, whose own
    /// copy is the only one and which [`Routing::route`] already admits.
    pub async fn reads_locally(&self, room: &RoomId) -> bool {
        let Some(timeline) = &self.timeline else {
            return false;
        };
        // Only a learner can: every other node (all of them in one
        // datacenter) answers here, without a round trip to the driver
        // task that carries every partition's log traffic.
        let placement = self.placement();
        let partition = placement.partitions().of_room(room.as_str());
        if !placement.learners(partition).contains(&self.me) {
            return false;
        }
        timeline.reads_locally(partition.0).await.unwrap_or(false)
    }

    /// `Ok` if this node serves the room's messages now (a single node, or
    /// the leader of the room's partition log), else a status that
    /// redirects the client to the node that does. Waits up to
    /// [`ROUTE_WAIT_MS`] for a partition with no leader to elect one.
    ///
    /// # Errors
    /// `UNAVAILABLE` with the `saferchat-redirect` metadata naming the
    /// leader (or, from a node that does not replicate the partition, the
    /// preferred owner); `UNAVAILABLE` without it when no leader was
    /// elected in time.
    pub async fn route(&self, room: &RoomId) -> Result<(), Status> {
        let Some(timeline) = &self.timeline else {
            return Ok(());
        };
        let placement = self.placement();
        let partition = placement.partitions().of_room(room.as_str());
        if !placement.replicas(partition).contains(&self.me) {
            return Err(self.redirect(room, placement.preferred_owner(partition)));
        }
        let mut changed = timeline.leaders().watch();
        let deadline = tokio::time::Instant::now() + Duration::from_millis(ROUTE_WAIT_MS);
        loop {
            changed.borrow_and_update();
            match timeline.leaders().get(partition.0) {
                Some(leader) if leader == self.me => return Ok(()),
                Some(leader) => return Err(self.redirect(room, leader)),
                None => {
                    timeline.touch(partition.0);
                    let waited = tokio::time::timeout_at(deadline, changed.changed()).await;
                    if !matches!(waited, Ok(Ok(()))) {
                        return Err(Status::unavailable(format!(
                            "room {:?}: its partition has no leader yet (fewer than a quorum of its voting replicas {:?}, in its home datacenter, {}, may be up); retry shortly",
                            room.as_str(),
                            placement.voters(partition),
                            placement.home(partition)
                        )));
                    }
                }
            }
        }
    }

    fn redirect(&self, room: &RoomId, to: NodeId) -> Status {
        let from_map = || self.placement.map_node(to)?.client_address.parse().ok();
        let Some(address) = self
            .clients
            .iter()
            .find(|(id, _)| *id == to)
            .map(|(_, a)| *a)
            .or_else(from_map)
        else {
            return Status::unavailable(format!(
                "room {:?} is served by node {to}, whose address this node does not know",
                room.as_str()
            ));
        };
        let mut status = Status::unavailable(format!(
            "room {:?} is served by node {to} at {address}; reconnect there",
            room.as_str()
        ));
        if let Ok(value) = address.to_string().parse() {
            status.metadata_mut().insert(REDIRECT_METADATA, value);
        }
        status
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::PeerConfig;

    #[test]
    fn every_home_replica_and_one_replica_of_each_other_datacenter_hold_leases() {
        let nodes: Vec<ClusterNode> = (1..=6)
            .map(|id| ClusterNode {
                id: NodeId(id),
                datacenter: if id <= 3 { "dc1" } else { "dc2" }.into(),
            })
            .collect();
        let placement = Placement::build(&nodes, PartitionCount::new(16).unwrap(), 3).unwrap();
        let mut all = saferchat_consensus::ReplicaConfig::single(NodeId(1));
        all.replicas = (1..=6).map(NodeId).collect();
        for p in placement.partitions().all() {
            let config = room_replicas(&all, &placement, p, 1).expect("node 1 replicates all");
            let voters = placement.voters(p);
            let mut want: Vec<NodeId> = voters.clone();
            let other = placement
                .replicas(p)
                .iter()
                .copied()
                .find(|n| !voters.contains(n))
                .expect("a replica in the other datacenter");
            want.push(other);
            want.sort_unstable();
            assert_eq!(config.holders, want, "partition {p:?}");
            assert!(
                config.holders.contains(&placement.preferred_owner(p)),
                "the preferred owner reads under a lease"
            );
            assert_eq!(config.replicas.len(), 6);
        }
        // One datacenter: every replica.
        let one: Vec<ClusterNode> = (1..=3)
            .map(|id| ClusterNode {
                id: NodeId(id),
                datacenter: "dc1".into(),
            })
            .collect();
        let placement = Placement::build(&one, PartitionCount::new(16).unwrap(), 3).unwrap();
        all.replicas = (1..=3).map(NodeId).collect();
        let config = room_replicas(&all, &placement, PartitionId(0), 1).unwrap();
        assert_eq!(config.holders, all.replicas);
    }

    fn map_of(epoch: u64, moved: Option<(u32, Vec<u64>, u64)>) -> saferchat_placement::ClusterMap {
        let mut map = saferchat_placement::ClusterMap {
            epoch,
            partitions: 4,
            replicas_per_datacenter: 3,
            ..saferchat_placement::ClusterMap::default()
        };
        for id in 1..=4 {
            map.nodes.insert(
                id,
                saferchat_placement::MapNode {
                    datacenter: "dc1".into(),
                    peer_address: String::new(),
                    client_address: String::new(),
                    state: if id == 4 {
                        saferchat_placement::NodeState::Joining
                    } else {
                        saferchat_placement::NodeState::Active
                    },
                },
            );
        }
        if let Some((p, replicas, at)) = moved {
            map.moving
                .insert(p, saferchat_placement::Pinned { replicas });
            map.partition_epochs.insert(p, at);
        }
        map
    }

    #[test]
    fn a_driver_starts_from_every_move_of_the_map_it_starts_with() {
        let configured = map_of(1, None).placement().unwrap();
        assert_eq!(
            at_map(&configured, &saferchat_placement::ClusterMap::default()),
            configured
        );
        let grown = map_of(9, Some((2, vec![1, 2, 3, 4], 7)));
        let started = at_map(&configured, &grown);
        assert_eq!(
            started.replicas(PartitionId(2)),
            (1..=4).map(NodeId).collect::<Vec<_>>()
        );
        assert_eq!(
            started.replicas(PartitionId(1)),
            configured.replicas(PartitionId(1))
        );
        // A home moved: three datacenters of two, partition 0 homed in dc2.
        let mut map = saferchat_placement::ClusterMap::default();
        map.apply(&saferchat_placement::MapCommand::Create {
            partitions: 4,
            replicas_per_datacenter: 2,
            nodes: (1..=6)
                .map(|id: u64| {
                    (
                        id,
                        saferchat_placement::MapNode {
                            datacenter: format!("dc{}", id.div_ceil(2)),
                            peer_address: format!("127.0.0.1:{}", 7000 + id),
                            client_address: format!("127.0.0.1:{}", 8000 + id),
                            state: saferchat_placement::NodeState::Active,
                        },
                    )
                })
                .collect(),
        })
        .unwrap();
        let configured = map.placement().unwrap();
        assert_eq!(configured.home(PartitionId(0)), "dc1");
        map.apply(&saferchat_placement::MapCommand::MoveHome {
            partition: 0,
            datacenter: "dc2".into(),
            epoch: 1,
        })
        .unwrap();
        let started = at_map(&configured, &map);
        assert_eq!(started.home(PartitionId(0)), "dc2");
        let mut voters = started.voters(PartitionId(0));
        voters.sort_unstable();
        assert_eq!(voters, [NodeId(3), NodeId(4)]);
        assert_eq!(
            started.home(PartitionId(1)),
            configured.home(PartitionId(1))
        );
    }

    #[test]
    fn a_driver_follows_only_partitions_whose_epoch_moved() {
        let before = map_of(1, None);
        let placement = before.placement().unwrap();
        assert_eq!(
            follow_map(
                &placement,
                &before,
                &saferchat_placement::ClusterMap::default()
            ),
            None,
            "a map not created"
        );
        assert_eq!(follow_map(&placement, &before, &before), None, "not newer");
        // A node joined: nothing moves.
        let (same, moved) = follow_map(&placement, &before, &map_of(2, None)).unwrap();
        assert!(moved.is_empty());
        assert_eq!(same, placement);
        // Partition 2 grows to node 4 in epoch 3.
        let grown = map_of(3, Some((2, vec![1, 2, 3, 4], 3)));
        let (after, moved) = follow_map(&placement, &before, &grown).unwrap();
        assert_eq!(moved, vec![2]);
        assert_eq!(
            after.replicas(PartitionId(2)),
            (1..=4).map(NodeId).collect::<Vec<_>>()
        );
        assert_eq!(
            after.replicas(PartitionId(1)),
            placement.replicas(PartitionId(1))
        );
        // Pinned elsewhere without a new epoch: not followed.
        let mut odd = map_of(3, Some((1, vec![4], 1)));
        odd.partition_epochs.remove(&1);
        let (kept, moved) = follow_map(&placement, &before, &odd).unwrap();
        assert!(moved.is_empty());
        assert_eq!(
            kept.replicas(PartitionId(1)),
            placement.replicas(PartitionId(1))
        );
        // Another partition count: not followed.
        let mut other = map_of(3, None);
        other.partitions = 8;
        assert_eq!(follow_map(&placement, &before, &other), None);
    }

    fn three(node_id: u64) -> NodeConfig {
        let mut c = NodeConfig {
            node_id,
            peer_listen: Some("127.0.0.1:9000".parse().unwrap()),
            ..NodeConfig::default()
        };
        c.peers = (1..=3)
            .filter(|id| *id != node_id)
            .map(|id| PeerConfig {
                id,
                peer_address: format!("127.0.0.1:{}", 9100 + id).parse().unwrap(),
                client_address: format!("127.0.0.1:{}", 8100 + id).parse().unwrap(),
                datacenter: "dc1".into(),
                joining: false,
            })
            .collect();
        c
    }

    #[tokio::test]
    async fn every_node_agrees_on_preferred_owners_and_a_single_node_serves_all() {
        let routes: Vec<Routing> = (1..=3)
            .map(|id| Routing::new(&three(id), Arc::new(build(&three(id)).unwrap()), None))
            .collect();
        let room = RoomId::new("team").unwrap();
        let owner = routes[0].preferred_owner(&room);
        for r in &routes {
            assert_eq!(r.preferred_owner(&room), owner);
            let status = r.redirect(&room, owner);
            if r.me != owner {
                assert_eq!(
                    status.metadata().get(REDIRECT_METADATA).unwrap(),
                    &format!("127.0.0.1:{}", 8100 + owner.0)
                );
            }
        }
        let single = NodeConfig::default();
        let single = Routing::new(&single, Arc::new(build(&single).unwrap()), None);
        assert!(single.route(&room).await.is_ok());
    }

    #[test]
    fn the_shape_is_recorded_once_and_enforced() {
        let dir = tempfile::tempdir().unwrap();
        let config = three(1);
        check_or_record(dir.path(), &Shape::of(&config)).unwrap();
        check_or_record(dir.path(), &Shape::of(&config)).unwrap();
        // The same cluster seen from node 2 has the same shape.
        check_or_record(dir.path(), &Shape::of(&three(2))).unwrap();

        let mut grown = config.clone();
        grown.peers.push(PeerConfig {
            id: 4,
            peer_address: "127.0.0.1:9104".parse().unwrap(),
            client_address: "127.0.0.1:8104".parse().unwrap(),
            datacenter: "dc1".into(),
            joining: false,
        });
        let e = check_or_record(dir.path(), &Shape::of(&grown)).unwrap_err();
        assert!(e.to_string().contains("n4@dc1"), "{e}");
        let mut repartitioned = config.clone();
        repartitioned.partitions = 1024;
        assert!(check_or_record(dir.path(), &Shape::of(&repartitioned)).is_err());
        let single = NodeConfig::default();
        assert!(check_or_record(dir.path(), &Shape::of(&single)).is_err());
    }

    #[test]
    fn shapes_from_before_partition_membership_upgrade_only_when_nothing_moves() {
        let old = |nodes: u64| {
            let mut text = String::from("partitions = 256\nreplicas_per_datacenter = 3\n");
            for id in 1..=nodes {
                text.push_str(&format!("[[nodes]]\nid = {id}\ndatacenter = \"dc1\"\n"));
            }
            text
        };
        let config = |nodes: u64| {
            let mut c = three(1);
            c.peers = (2..=nodes)
                .map(|id| PeerConfig {
                    id,
                    peer_address: format!("127.0.0.1:{}", 9100 + id).parse().unwrap(),
                    client_address: format!("127.0.0.1:{}", 8100 + id).parse().unwrap(),
                    datacenter: "dc1".into(),
                    joining: false,
                })
                .collect();
            c
        };
        // Three nodes: every node replicates everything; the file is
        // upgraded in place.
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(SHAPE_FILE), old(3)).unwrap();
        check_or_record(dir.path(), &Shape::of(&config(3))).unwrap();
        let text = std::fs::read_to_string(dir.path().join(SHAPE_FILE)).unwrap();
        assert!(text.contains(MEMBERSHIP_ON_PARTITION_REPLICAS), "{text}");
        check_or_record(dir.path(), &Shape::of(&config(3))).unwrap();
        // Five nodes: acceptor sets would shrink; refused.
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(SHAPE_FILE), old(5)).unwrap();
        let e = check_or_record(dir.path(), &Shape::of(&config(5))).unwrap_err();
        assert!(e.to_string().contains("reconfiguration"), "{e}");
    }
}
