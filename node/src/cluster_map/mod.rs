//! The cluster map, replicated by a Raft group (`openraft`) and cached on
//! every node.
//!
//! The map ([`saferchat_placement::ClusterMap`]) names the cluster's nodes,
//! its partition count and replicas per datacenter, with an epoch that
//! counts every change. Up to five nodes vote in its group
//! ([`ClusterMap::voters_of`], spread over datacenters); the others follow
//! it as learners. Every node keeps its own copy of the group's log and
//! applies it, so each node's map is a prefix of the same sequence of maps.
//!
//! # Starting a cluster
//!
//! A static configuration (`peers`) still describes a fixed cluster. On its
//! first start every voter starts the group with the same voter set, which
//! it computes from the configuration (openraft allows this as long as the
//! sets agree); whoever is elected first proposes [`MapCommand::Create`]
//! with its configured shape, which applies once (a second `Create` is
//! refused by the state machine). The leader then adds every other node
//! of the map as a learner. A node whose configuration describes a
//! different cluster from the map the group agreed on stops with both
//! shapes in its error: before the map, nodes configured differently
//! would have served with different placements without noticing.
//!
//! # Durability
//!
//! The group's vote and log reach the disk before openraft may answer
//! anyone (see [`store`]). Membership and timeline traffic do not depend on
//! the map yet: placement still comes from the configuration, which must
//! equal the map; moving partitions to follow map changes is the next step
//! of the elastic cluster.

pub mod network;
pub mod store;

use std::collections::{BTreeMap, BTreeSet};
use std::io::Cursor;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use openraft::{BasicNode, Raft, ServerState};
use saferchat_placement::{ClusterMap, MapCommand, MapError, MapNode, NodeState};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::error::NodeError;
use crate::grpc::peer::KnownPeer;
use crate::peer_tls::PeerTls;

/// The folder, in the data folder, of the map group's log and snapshot.
pub const MAP_DIR: &str = "cluster-map";

/// Log entries between snapshots (then the log before it is dropped).
pub const SNAPSHOT_EVERY: u64 = 64;

/// How often a leader is heard from; a follower that hears nothing for an
/// election timeout (a random time between the two below) campaigns.
const HEARTBEAT_MS: u64 = 300;
const ELECTION_TIMEOUT_MIN_MS: u64 = 1_500;
const ELECTION_TIMEOUT_MAX_MS: u64 = 3_000;

/// Retries of a leader's own duties (creating the map, adding learners)
/// that failed, e.g. because leadership moved meanwhile.
const STEWARD_RETRY_MS: u64 = 500;

/// How long a map change asked of this node keeps trying while the
/// group's leadership settles.
const PROPOSE_WAIT_MS: u64 = 10_000;

/// What applying a map command gave.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum MapReply {
    /// Applied (or a Raft-internal entry): the map's epoch after it.
    Applied(u64),
    /// Not applied, and why.
    Refused(MapError),
}

openraft::declare_raft_types!(
    /// The map group's types.
    pub TypeConfig:
        D = MapCommand,
        R = MapReply,
);

/// A node's view of the map group, for `saferchat cluster status`.
#[derive(Clone, Debug)]
pub struct MapStatus {
    /// This node's map.
    pub map: ClusterMap,
    /// The group's leader as this node knows it.
    pub leader: Option<u64>,
    /// The Raft term this node is in.
    pub term: u64,
    /// Voters and learners of the group.
    pub voters: Vec<u64>,
    /// Nodes that follow the group without voting.
    pub learners: Vec<u64>,
    /// This node's role in the group.
    pub role: &'static str,
    /// The index of the last log entry this node applied.
    pub applied_index: Option<u64>,
}

/// The map group on this node and its cached map.
#[derive(Clone)]
pub struct ClusterMaps {
    me: u64,
    raft: Raft<TypeConfig>,
    map: watch::Receiver<ClusterMap>,
    dialer: network::Dialer,
}

/// Where a command proposed on this node went.
enum Written {
    /// Applied (or refused by the state machine: the error).
    Epoch(u64),
    /// This node does not lead the group; the leader, if known.
    NotLeader(Option<u64>),
}

impl std::fmt::Debug for ClusterMaps {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClusterMaps")
            .field("map", &*self.map.borrow())
            .finish_non_exhaustive()
    }
}

/// What starting the group needs.
#[derive(Debug)]
pub struct MapParts<'a> {
    /// This node.
    pub me: u64,
    /// The data folder.
    pub data_dir: &'a Path,
    /// The shape the configuration describes, as the `Create` it proposes;
    /// `None` for a node that joins (it waits to be added to the map).
    pub configured: Option<MapCommand>,
    /// The other nodes and how to reach them.
    pub peers: &'a [KnownPeer],
    /// Peer mutual TLS (absent for a single node).
    pub tls: Option<&'a PeerTls>,
    /// Ends the steward.
    pub shutdown: CancellationToken,
}

impl ClusterMaps {
    /// The map as this node last applied it.
    pub fn current(&self) -> ClusterMap {
        self.map.borrow().clone()
    }

    /// A receiver that sees every map this node applies.
    pub fn watch(&self) -> watch::Receiver<ClusterMap> {
        self.map.clone()
    }

    /// The group as this node sees it.
    pub fn status(&self) -> MapStatus {
        let metrics = self.raft.metrics().borrow().clone();
        let membership = metrics.membership_config.membership();
        let voters: Vec<u64> = membership.voter_ids().collect();
        let learners: Vec<u64> = membership.learner_ids().collect();
        MapStatus {
            map: self.current(),
            leader: metrics.current_leader,
            term: metrics.current_term,
            voters,
            learners,
            role: match metrics.state {
                ServerState::Leader => "leader",
                ServerState::Follower => "follower",
                ServerState::Candidate => "candidate",
                ServerState::Learner => "learner",
                ServerState::Shutdown => "stopped",
            },
            applied_index: metrics.last_applied.map(|l| l.index),
        }
    }

    /// The Raft handle, for the peer service.
    pub fn raft(&self) -> &Raft<TypeConfig> {
        &self.raft
    }

    /// This node's id.
    pub fn me(&self) -> u64 {
        self.me
    }

    /// A channel to `node`'s peer listener (configured, or from the map).
    pub fn channel(&self, node: u64) -> Option<tonic::transport::Channel> {
        self.dialer.channel(node)
    }

    async fn write_here(&self, command: MapCommand) -> Result<Written, NodeError> {
        use openraft::error::{ClientWriteError, RaftError};
        match self.raft.client_write(command).await {
            Ok(r) => match r.data {
                MapReply::Applied(epoch) => Ok(Written::Epoch(epoch)),
                MapReply::Refused(e) => Err(NodeError::FailedPrecondition(e.to_string())),
            },
            Err(RaftError::APIError(ClientWriteError::ForwardToLeader(f))) => {
                Ok(Written::NotLeader(f.leader_id))
            }
            Err(e) => Err(NodeError::Unavailable(format!("cluster map: {e}"))),
        }
    }

    /// Applies `command` to the cluster map through the group's leader
    /// (this node, or the leader it knows, asked over the peer link): the
    /// map's epoch after it.
    ///
    /// # Errors
    /// FAILED_PRECONDITION with the reason when the map refuses the
    /// command; UNAVAILABLE when the group has no reachable leader.
    pub async fn propose(&self, command: MapCommand) -> Result<u64, NodeError> {
        // Leadership may be settling (a cluster that just started, a leader
        // that just died): try again as the group's state changes, for a
        // bounded time.
        let deadline = tokio::time::Instant::now() + Duration::from_millis(PROPOSE_WAIT_MS);
        let mut metrics = self.raft.metrics();
        loop {
            let outcome = match self.write_here(command.clone()).await? {
                Written::Epoch(epoch) => return Ok(epoch),
                Written::NotLeader(None) => Err(NodeError::Unavailable(
                    "the cluster map group has no leader right now; try again".into(),
                )),
                Written::NotLeader(Some(leader)) => self.forward(leader, &command).await,
            };
            match outcome {
                Err(NodeError::Unavailable(why)) if tokio::time::Instant::now() < deadline => {
                    tracing::debug!(%why, "cluster map change: trying again");
                    let _ = tokio::time::timeout_at(
                        deadline.min(
                            tokio::time::Instant::now() + Duration::from_millis(STEWARD_RETRY_MS),
                        ),
                        metrics.changed(),
                    )
                    .await;
                }
                other => return other,
            }
        }
    }

    async fn forward(&self, leader: u64, command: &MapCommand) -> Result<u64, NodeError> {
        let channel = self.dialer.channel(leader).ok_or_else(|| {
            NodeError::Unavailable(format!(
                "the cluster map's leader, node {leader}, cannot be dialled"
            ))
        })?;
        let body = serde_json::to_vec(command)
            .map_err(|e| NodeError::Fatal(format!("encoding a map command: {e}")))?;
        let answer = saferchat_proto::peer::peer_client::PeerClient::new(channel)
            .map_propose(saferchat_proto::peer::MapProposeCall {
                command: body.into(),
            })
            .await
            .map_err(|status| match status.code() {
                tonic::Code::FailedPrecondition => {
                    NodeError::FailedPrecondition(status.message().to_owned())
                }
                _ => NodeError::Unavailable(format!(
                    "the cluster map's leader, node {leader}: {}",
                    status.message()
                )),
            })?;
        Ok(answer.into_inner().epoch)
    }

    /// A command another node forwarded: applied only if this node leads
    /// the group (never forwarded again, so no call goes round in circles).
    ///
    /// # Errors
    /// As [`ClusterMaps::propose`]; UNAVAILABLE when this node does not lead.
    pub async fn propose_from_peer(&self, command: MapCommand) -> Result<u64, NodeError> {
        match self.write_here(command).await? {
            Written::Epoch(epoch) => Ok(epoch),
            Written::NotLeader(_) => Err(NodeError::Unavailable(
                "leadership of the cluster map moved; try again".into(),
            )),
        }
    }

    /// Waits until the map names this node (a node that joins), or
    /// `shutdown`.
    pub async fn wait_until_added(&self, shutdown: &CancellationToken) -> Option<ClusterMap> {
        let mut map = self.watch();
        let me = self.me;
        tokio::select! {
            () = shutdown.cancelled() => None,
            found = map.wait_for(|m| m.nodes.contains_key(&me)) => found.ok().map(|m| m.clone()),
        }
    }

    /// Stops the group on this node.
    pub async fn shutdown(&self) {
        if let Err(e) = self.raft.shutdown().await {
            tracing::warn!(error = %e, "stopping the cluster map group");
        }
    }
}

/// The `Create` command a configuration describes; this node's own
/// addresses are the advertised ones when configured, else the ones its
/// listeners were bound to (`bound`: client, peer), which say the real
/// port where the configuration says 0.
pub fn configured_shape(
    config: &crate::config::NodeConfig,
    bound: (Option<std::net::SocketAddr>, Option<std::net::SocketAddr>),
) -> MapCommand {
    // Unspecified (0.0.0.0) is how this node listens, not where others
    // reach it: left empty rather than recorded wrong (a node that joins
    // then cannot reach this one directly; see ARCHITECTURE.md).
    let reachable = |a: Option<std::net::SocketAddr>| {
        a.filter(|a| !a.ip().is_unspecified() && a.port() != 0)
            .map(|a| a.to_string())
            .unwrap_or_default()
    };
    let mut nodes: BTreeMap<u64, MapNode> = config
        .peers
        .iter()
        .map(|p| {
            (
                p.id,
                MapNode {
                    datacenter: p.datacenter.clone(),
                    peer_address: p.peer_address.to_string(),
                    client_address: p.client_address.to_string(),
                    state: NodeState::Active,
                },
            )
        })
        .collect();
    nodes.insert(
        config.node_id,
        MapNode {
            datacenter: config.datacenter.clone(),
            peer_address: reachable(
                config
                    .advertise_peer_address
                    .or(bound.1)
                    .or(config.peer_listen),
            ),
            client_address: reachable(
                config
                    .advertise_client_address
                    .or(bound.0)
                    .or(Some(config.listen)),
            ),
            state: NodeState::Active,
        },
    );
    MapCommand::Create {
        partitions: config.partitions,
        replicas_per_datacenter: config.replicas_per_datacenter,
        nodes,
    }
}

/// Whether the created `map` describes the cluster `configured` does (node
/// ids, datacenters, partitions, replicas; addresses may differ).
fn agrees(map: &ClusterMap, configured: &MapCommand) -> bool {
    let MapCommand::Create {
        partitions,
        replicas_per_datacenter,
        nodes,
    } = configured
    else {
        return false;
    };
    let configured: Vec<(u64, String)> = nodes
        .iter()
        .map(|(id, m)| (*id, m.datacenter.clone()))
        .collect();
    // The configuration describes the cluster as it was created; nodes
    // that joined, drained or left since are in no configuration. (A map
    // from before the creation was recorded: its active nodes, which no
    // move changed then.)
    let created: Vec<(u64, String)> = if map.created_with.is_empty() {
        map.active()
            .map(|(id, m)| (id, m.datacenter.clone()))
            .collect()
    } else {
        map.created_with
            .iter()
            .map(|(id, dc)| (*id, dc.clone()))
            .collect()
    };
    map.partitions == *partitions
        && map.replicas_per_datacenter == *replicas_per_datacenter
        && created == configured
}

fn describe(partitions: u32, replicas: usize, nodes: &BTreeMap<u64, MapNode>) -> String {
    let list: Vec<String> = nodes
        .iter()
        .map(|(id, n)| format!("n{id}@{}", n.datacenter))
        .collect();
    format!(
        "{partitions} partitions, {replicas} replicas per datacenter, nodes {}",
        list.join(" ")
    )
}

/// Starts the map group on this node; the returned task ends with an error
/// when the cluster's map disagrees with this node's configuration.
///
/// # Errors
/// An unreadable map folder or a group that cannot start.
pub async fn start(
    parts: MapParts<'_>,
) -> Result<(ClusterMaps, tokio::task::JoinHandle<Result<(), NodeError>>), NodeError> {
    let dir = parts.data_dir.join(MAP_DIR);
    let storage = |e: std::io::Error| NodeError::Storage(format!("{}: {e}", dir.display()));
    let log = store::LogStore::open(&dir).map_err(storage)?;
    let (published, map) = watch::channel(ClusterMap::default());
    let machine = store::StateMachine::open(&dir, published).map_err(storage)?;
    let dialer = network::Dialer::new(parts.tls, parts.peers, map.clone())?;
    let network = network::MapNetwork::new(dialer.clone());
    let config = openraft::Config {
        cluster_name: "saferchat-cluster-map".into(),
        heartbeat_interval: HEARTBEAT_MS,
        election_timeout_min: ELECTION_TIMEOUT_MIN_MS,
        election_timeout_max: ELECTION_TIMEOUT_MAX_MS,
        snapshot_policy: openraft::SnapshotPolicy::LogsSinceLast(SNAPSHOT_EVERY),
        max_in_snapshot_log_to_keep: 0,
        ..openraft::Config::default()
    }
    .validate()
    .map_err(|e| NodeError::Config(format!("cluster map group: {e}")))?;
    let raft = Raft::new(parts.me, Arc::new(config), network, log, machine)
        .await
        .map_err(|e| NodeError::Fatal(format!("starting the cluster map group: {e}")))?;
    let maps = ClusterMaps {
        me: parts.me,
        raft,
        map,
        dialer,
    };

    let initialized = maps
        .raft
        .is_initialized()
        .await
        .map_err(|e| NodeError::Fatal(format!("cluster map group: {e}")))?;
    // A node that joins starts nothing: the leader adds it as a learner.
    if let Some(MapCommand::Create { nodes, .. }) = &parts.configured
        && !initialized
        && let voters = ClusterMap::voters_of(nodes)
        && voters.contains(&parts.me)
    {
        let members: BTreeMap<u64, BasicNode> = voters
            .iter()
            .map(|id| (*id, BasicNode::new(&nodes[id].peer_address)))
            .collect();
        match maps.raft.initialize(members).await {
            Ok(()) => tracing::info!(?voters, "started the cluster map group"),
            // Another voter's entries reached this node first.
            Err(e) => tracing::debug!(error = %e, "cluster map group already started"),
        }
    }
    let task = tokio::spawn(steward(maps.clone(), parts.configured, parts.shutdown));
    Ok((maps, task))
}

/// Checks every map this node applies against its configuration, and on
/// the leader creates the map and adds the other nodes as learners.
async fn steward(
    maps: ClusterMaps,
    configured: Option<MapCommand>,
    shutdown: CancellationToken,
) -> Result<(), NodeError> {
    let me = maps.me;
    let mut metrics = maps.raft.metrics();
    let mut map = maps.watch();
    let mut announced = 0;
    let mut named = false;
    loop {
        let current = map.borrow_and_update().clone();
        if current.nodes.contains_key(&me) {
            named = true;
        } else if named {
            return Err(NodeError::Config(format!(
                "this node was removed from the cluster map (epoch {}); its id is retired",
                current.epoch
            )));
        }
        if current.is_created() {
            if let Some(
                configured @ MapCommand::Create {
                    partitions,
                    replicas_per_datacenter,
                    nodes,
                },
            ) = &configured
                && !agrees(&current, configured)
            {
                return Err(NodeError::Config(format!(
                    "the cluster map (epoch {}) describes {}, but this node's configuration \
                     describes {}: restore the configuration",
                    current.epoch,
                    describe(
                        current.partitions,
                        current.replicas_per_datacenter,
                        &current.nodes
                    ),
                    describe(*partitions, *replicas_per_datacenter, nodes)
                )));
            }
            if current.epoch != announced {
                announced = current.epoch;
                tracing::info!(
                    epoch = current.epoch,
                    nodes = current.nodes.len(),
                    "cluster map"
                );
            }
        }
        let leading = {
            let m = metrics.borrow_and_update();
            m.current_leader == Some(me) && m.state == ServerState::Leader
        };
        let mut retry = false;
        if leading {
            retry = !lead(&maps, &current, configured.as_ref()).await;
        }
        let wait = async {
            if retry {
                tokio::time::sleep(Duration::from_millis(STEWARD_RETRY_MS)).await;
            } else {
                std::future::pending::<()>().await;
            }
        };
        tokio::select! {
            () = shutdown.cancelled() => return Ok(()),
            changed = metrics.changed() => if changed.is_err() { return Ok(()) },
            changed = map.changed() => if changed.is_err() { return Ok(()) },
            () = wait => {}
        }
    }
}

/// The leader's duties; false when one failed and should be retried.
async fn lead(maps: &ClusterMaps, current: &ClusterMap, configured: Option<&MapCommand>) -> bool {
    if !current.is_created() {
        let Some(configured) = configured else {
            return true;
        };
        return match maps.raft.client_write(configured.clone()).await {
            Ok(r) => {
                match r.data {
                    MapReply::Applied(epoch) => tracing::info!(epoch, "created the cluster map"),
                    MapReply::Refused(e) => tracing::debug!(error = %e, "cluster map not created"),
                }
                true
            }
            Err(e) => {
                tracing::debug!(error = %e, "creating the cluster map");
                false
            }
        };
    }
    let (members, learners): (BTreeSet<u64>, BTreeSet<u64>) = {
        let metrics = maps.raft.metrics().borrow().clone();
        let membership = metrics.membership_config.membership();
        (
            membership.nodes().map(|(id, _)| *id).collect(),
            membership.learner_ids().collect(),
        )
    };
    let mut ok = true;
    for (id, node) in &current.nodes {
        if members.contains(id) {
            continue;
        }
        // Not blocking: a learner that is down catches up when it is back.
        match maps
            .raft
            .add_learner(*id, BasicNode::new(&node.peer_address), false)
            .await
        {
            Ok(_) => tracing::info!(node = id, "added to the cluster map group as a learner"),
            Err(e) => {
                tracing::debug!(node = id, error = %e, "adding a learner");
                ok = false;
            }
        }
    }
    // Learners the map no longer names: removed nodes.
    let gone: BTreeSet<u64> = learners
        .into_iter()
        .filter(|id| !current.nodes.contains_key(id))
        .collect();
    if !gone.is_empty() {
        match maps
            .raft
            .change_membership(openraft::ChangeMembers::RemoveNodes(gone.clone()), false)
            .await
        {
            Ok(_) => tracing::info!(nodes = ?gone, "removed from the cluster map group"),
            Err(e) => {
                tracing::debug!(nodes = ?gone, error = %e, "removing learners");
                ok = false;
            }
        }
    }
    ok
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{NodeConfig, PeerConfig};

    /// Node 1's configuration: `partitions`, listening for peers on
    /// `peer_listen`, with `peers` (ids) at 127.0.0.1:7000+id.
    fn configured(
        partitions: u32,
        peer_listen: Option<std::net::SocketAddr>,
        peers: &[u64],
    ) -> MapCommand {
        let config = NodeConfig {
            partitions,
            peer_listen,
            peers: peers
                .iter()
                .map(|id| PeerConfig {
                    id: *id,
                    peer_address: ([127, 0, 0, 1], 7000 + u16::try_from(*id).unwrap()).into(),
                    client_address: ([127, 0, 0, 1], 8000 + u16::try_from(*id).unwrap()).into(),
                    datacenter: "dc1".into(),
                    joining: false,
                })
                .collect(),
            ..NodeConfig::default()
        };
        configured_shape(&config, (None, None))
    }

    #[test]
    fn the_configured_shape_names_every_node_and_not_an_unspecified_address() {
        let shape = configured(256, Some(([0, 0, 0, 0], 7001).into()), &[2, 3]);
        let MapCommand::Create { nodes, .. } = &shape else {
            unreachable!()
        };
        assert_eq!(nodes.keys().copied().collect::<Vec<_>>(), vec![1, 2, 3]);
        assert_eq!(nodes[&1].peer_address, "");
        assert_eq!(nodes[&2].peer_address, "127.0.0.1:7002");
        assert_eq!(nodes[&2].client_address, "127.0.0.1:8002");
        assert_eq!(nodes[&1].client_address, "127.0.0.1:8080");
        // The bound addresses win over the configured ones (port 0).
        let config = NodeConfig {
            listen: ([127, 0, 0, 1], 0).into(),
            peer_listen: Some(([127, 0, 0, 1], 0).into()),
            ..NodeConfig::default()
        };
        let MapCommand::Create { nodes, .. } = configured_shape(&config, (None, None)) else {
            unreachable!()
        };
        assert_eq!(
            (
                nodes[&1].client_address.as_str(),
                nodes[&1].peer_address.as_str()
            ),
            ("", "")
        );
        let bound = (
            Some(([127, 0, 0, 1], 8123).into()),
            Some(([127, 0, 0, 1], 9123).into()),
        );
        let MapCommand::Create { nodes, .. } = configured_shape(&config, bound) else {
            unreachable!()
        };
        assert_eq!(nodes[&1].client_address, "127.0.0.1:8123");
        assert_eq!(nodes[&1].peer_address, "127.0.0.1:9123");
        // Advertised addresses win over both (a proxy or NAT in front).
        let advertised = NodeConfig {
            advertise_peer_address: Some(([10, 0, 0, 1], 7001).into()),
            advertise_client_address: Some(([10, 0, 0, 1], 8001).into()),
            ..config.clone()
        };
        let MapCommand::Create { nodes, .. } = configured_shape(&advertised, bound) else {
            unreachable!()
        };
        assert_eq!(nodes[&1].client_address, "10.0.0.1:8001");
        assert_eq!(nodes[&1].peer_address, "10.0.0.1:7001");
        let mut map = ClusterMap::default();
        map.apply(&shape).unwrap();
        assert!(agrees(&map, &shape));
        let other = configured(256, None, &[2]);
        assert!(!agrees(&map, &other), "a node list that differs");
        let fewer_partitions = configured(128, None, &[2, 3]);
        assert!(!agrees(&map, &fewer_partitions));
        // A node that joined through the map is in no configuration.
        map.apply(&MapCommand::AddNode {
            id: 4,
            node: MapNode {
                datacenter: "dc1".into(),
                peer_address: "127.0.0.1:7004".into(),
                client_address: "127.0.0.1:8004".into(),
                state: NodeState::Joining,
            },
        })
        .unwrap();
        assert!(agrees(&map, &shape));
        // Nor does the map that made it active and drained node 3.
        map.apply(&MapCommand::Rebalance).unwrap();
        map.apply(&MapCommand::Drain { id: 3 }).unwrap();
        assert!(
            agrees(&map, &shape),
            "moves do not change the configuration"
        );
        assert!(!agrees(&map, &other));
        // A map kept before its creation was recorded: its active nodes.
        let mut old = ClusterMap::default();
        old.apply(&shape).unwrap();
        old.created_with.clear();
        assert!(agrees(&old, &shape));
        assert!(!agrees(&old, &other));
    }

    #[tokio::test]
    async fn a_single_node_creates_its_map_and_keeps_it_across_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let shape = configured(64, None, &[]);
        for round in 0..2 {
            let shutdown = CancellationToken::new();
            let (maps, task) = start(MapParts {
                me: 1,
                data_dir: dir.path(),
                configured: Some(shape.clone()),
                peers: &[],
                tls: None,
                shutdown: shutdown.clone(),
            })
            .await
            .unwrap();
            let mut watch = maps.watch();
            let map = tokio::time::timeout(
                Duration::from_secs(60),
                watch.wait_for(ClusterMap::is_created),
            )
            .await
            .expect("the map is created")
            .unwrap()
            .clone();
            assert_eq!(map.epoch, 1, "round {round}: created once, never again");
            assert_eq!(map.partitions, 64);
            let status = maps.status();
            assert_eq!(status.voters, vec![1]);
            shutdown.cancel();
            assert!(task.await.unwrap().is_ok());
            maps.shutdown().await;
        }
    }

    #[tokio::test]
    async fn a_node_configured_unlike_the_map_stops_naming_both() {
        let dir = tempfile::tempdir().unwrap();
        let first = configured(64, None, &[]);
        let shutdown = CancellationToken::new();
        let (maps, _task) = start(MapParts {
            me: 1,
            data_dir: dir.path(),
            configured: Some(first),
            peers: &[],
            tls: None,
            shutdown: shutdown.clone(),
        })
        .await
        .unwrap();
        tokio::time::timeout(
            Duration::from_secs(60),
            maps.watch().wait_for(ClusterMap::is_created),
        )
        .await
        .expect("the map is created")
        .unwrap();
        maps.shutdown().await;
        shutdown.cancel();

        let changed = configured(128, None, &[]);
        let (maps, task) = start(MapParts {
            me: 1,
            data_dir: dir.path(),
            configured: Some(changed),
            peers: &[],
            tls: None,
            shutdown: CancellationToken::new(),
        })
        .await
        .unwrap();
        let error = tokio::time::timeout(Duration::from_secs(60), task)
            .await
            .expect("the steward stops")
            .unwrap()
            .unwrap_err();
        let text = error.to_string();
        assert!(
            text.contains("64 partitions") && text.contains("128 partitions"),
            "{text}"
        );
        maps.shutdown().await;
    }
}
