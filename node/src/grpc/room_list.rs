//! Admin `ListChats` across a cluster whose nodes do not each hold every
//! room.
//!
//! Each node's store holds the rooms of the partitions it replicates. On a
//! single node, on a node that replicates every partition (in the
//! placement as the cluster map moved it), and on Cassandra
//! (one keyspace shared by every node) that store is the whole list; a node
//! that replicates only some partitions (a cluster larger than the replica
//! count, or a node that joined through the cluster map and holds none)
//! asks every node that holds replicas for the same page (`Peer/ListRooms`)
//! and merges the answers. The merge is exact: each node answers with its
//! first `limit` rooms after `after`, so every room among the cluster's
//! first `limit` is in the answer of each node that holds it. A room
//! answered by several replicas is listed once, at the highest revision
//! any of them reported (a replica may lag). When, for some partition, no
//! replica answered, the list could miss rooms, so the call fails with
//! UNAVAILABLE instead of answering short.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use saferchat_consensus::{NodeId, RoomId};
use saferchat_proto::peer::{self as pb, peer_client::PeerClient};

use crate::cluster_map::ClusterMaps;
use crate::error::NodeError;
use crate::placement::FollowedPlacement;
use crate::storage::{ChatStore, RoomSummary};

/// Most rooms per page.
pub const PAGE_MAX: u32 = 1000;

/// How long one node may take to answer.
const ASK_TIMEOUT_MS: u64 = 5_000;

/// What listing across the cluster needs.
#[derive(Debug, Clone)]
pub struct ClusterList {
    /// This node.
    pub me: NodeId,
    /// Which nodes hold which partitions, following the cluster map's
    /// moves: after a rebalance a node may hold fewer partitions (or,
    /// joined, some) than it started with.
    pub placement: Arc<FollowedPlacement>,
    /// Channels to the other nodes.
    pub maps: ClusterMaps,
}

impl ClusterList {
    /// The cluster's rooms after `after`, at most `limit`, in name order.
    ///
    /// # Errors
    /// UNAVAILABLE when no replica of some partition answered; the local
    /// store's error.
    pub async fn list(
        &self,
        store: &Arc<dyn ChatStore>,
        after: Option<&RoomId>,
        limit: usize,
    ) -> Result<Vec<RoomSummary>, NodeError> {
        let placement = self.placement.current();
        if placement.partitions_of(self.me).len() == placement.partitions().get() as usize {
            // This node replicates every partition: its store is the list.
            return store.list_rooms(after, limit).await;
        }
        let holders: Vec<NodeId> = placement.nodes().iter().map(|n| n.id).collect();
        let asks = holders.iter().map(|node| async move {
            let answer = if *node == self.me {
                store.list_rooms(after, limit).await
            } else {
                self.ask(*node, after, limit).await
            };
            (*node, answer)
        });
        let mut answered = BTreeSet::new();
        let mut rooms: BTreeMap<String, RoomSummary> = BTreeMap::new();
        for (node, answer) in futures::future::join_all(asks).await {
            match answer {
                Ok(list) => {
                    answered.insert(node);
                    for r in list {
                        let keep = rooms
                            .get(r.room.as_str())
                            .is_none_or(|seen| seen.revision < r.revision);
                        if keep {
                            rooms.insert(r.room.to_string(), r);
                        }
                    }
                }
                Err(e) => tracing::debug!(%node, error = %e, "listing rooms"),
            }
        }
        let uncovered = placement
            .partitions()
            .all()
            .filter(|p| !placement.replicas(*p).iter().any(|n| answered.contains(n)))
            .count();
        if uncovered > 0 {
            return Err(NodeError::Unavailable(format!(
                "{uncovered} partitions have no replica that answered; the list would be incomplete, try again"
            )));
        }
        Ok(rooms.into_values().take(limit).collect())
    }

    async fn ask(
        &self,
        node: NodeId,
        after: Option<&RoomId>,
        limit: usize,
    ) -> Result<Vec<RoomSummary>, NodeError> {
        let channel = self
            .maps
            .channel(node.0)
            .ok_or_else(|| NodeError::Unavailable(format!("{node} cannot be dialled")))?;
        let mut call = tonic::Request::new(pb::ListRoomsCall {
            after: after.map(ToString::to_string).unwrap_or_default(),
            limit: u32::try_from(limit).unwrap_or(PAGE_MAX),
        });
        call.set_timeout(Duration::from_millis(ASK_TIMEOUT_MS));
        let answer = PeerClient::new(channel)
            .list_rooms(call)
            .await
            .map_err(|s| NodeError::Unavailable(format!("{node}: {}", s.message())))?;
        answer
            .into_inner()
            .rooms
            .into_iter()
            .map(|r| {
                Ok(RoomSummary {
                    room: RoomId::new(&r.room)
                        .map_err(|e| NodeError::Unavailable(format!("{node}: room name: {e}")))?,
                    revision: r.revision,
                    members: r.members,
                })
            })
            .collect()
    }
}
