//! `server.grpc.admin.Admin`: rooms and membership, for the bearer of the
//! admin token (checked by the interceptor in [`super`]).

use std::sync::Arc;

use saferchat_consensus::{Change, Handle, Revision, RoomId};
use saferchat_proto::admin::{self as pb, admin_server::Admin};
use tonic::{Request, Response, Status};

use crate::context::AdminContext;
use crate::convert;
use crate::error::{NodeError, shown};

/// Most rooms per ListChats page.
const LIST_PAGE_MAX: u32 = super::room_list::PAGE_MAX;
/// Rooms per page when the request does not say.
const LIST_PAGE_DEFAULT: u32 = 100;

/// The admin service.
#[derive(Debug, Clone)]
pub struct AdminService {
    ctx: Arc<AdminContext>,
}

impl AdminService {
    /// Wraps the node context.
    pub fn new(ctx: Arc<AdminContext>) -> AdminService {
        AdminService { ctx }
    }

    async fn change(
        &self,
        chat: &str,
        change: Change,
        expected: Option<u64>,
    ) -> Result<Response<pb::ChatReply>, Status> {
        let room = room(chat)?;
        let kind = change_kind(&change);
        let (applied, state) = self
            .ctx
            .membership
            .change(&room, change, expected.map(Revision))
            .await?;
        tracing::info!(room = %room, change = kind, revision = %state.revision, changed = applied.changed, "membership change committed");
        Ok(Response::new(pb::ChatReply {
            chat: room.to_string(),
            revision: applied.revision.0,
            changed: applied.changed,
        }))
    }
}

fn change_kind(change: &Change) -> &'static str {
    match change {
        Change::Create => "create",
        Change::Add(_) => "add",
        Change::Remove(_) => "remove",
        Change::RegisterKey(..) => "register-key",
        Change::Read => "read",
    }
}

fn room(chat: &str) -> Result<RoomId, NodeError> {
    RoomId::new(chat).map_err(|e| NodeError::InvalidArgument(format!("chat {}: {e}", shown(chat))))
}

fn user(text: &str) -> Result<Handle, NodeError> {
    text.parse()
        .map_err(|e| NodeError::InvalidArgument(format!("user {}: {e}", shown(text))))
}

#[tonic::async_trait]
impl Admin for AdminService {
    async fn add_chat(
        &self,
        request: Request<pb::AddChatRequest>,
    ) -> Result<Response<pb::ChatReply>, Status> {
        let req = request.into_inner();
        match req.op() {
            pb::ChatOp::Create => self.change(&req.chat, Change::Create, None).await,
            pb::ChatOp::Unspecified => Err(Status::invalid_argument("op must be CREATE")),
        }
    }

    async fn add_user(
        &self,
        request: Request<pb::AddUserRequest>,
    ) -> Result<Response<pb::ChatReply>, Status> {
        let req = request.into_inner();
        let handle = user(&req.user)?;
        let change = match req.op() {
            pb::UserOp::Add => Change::Add(handle),
            pb::UserOp::Remove => Change::Remove(handle),
            pb::UserOp::Unspecified => {
                return Err(Status::invalid_argument("op must be ADD or REMOVE"));
            }
        };
        self.change(&req.chat, change, req.expected_revision).await
    }

    async fn rm_user(
        &self,
        request: Request<pb::RmUserRequest>,
    ) -> Result<Response<pb::ChatReply>, Status> {
        let req = request.into_inner();
        let handle = user(&req.user)?;
        self.change(&req.chat, Change::Remove(handle), req.expected_revision)
            .await
    }

    async fn list_chats(
        &self,
        request: Request<pb::ListChatsRequest>,
    ) -> Result<Response<pb::ListChatsReply>, Status> {
        let req = request.into_inner();
        let limit = match req.limit {
            0 => LIST_PAGE_DEFAULT,
            n if n > LIST_PAGE_MAX => {
                return Err(Status::invalid_argument(format!(
                    "limit must be at most {LIST_PAGE_MAX}"
                )));
            }
            n => n,
        };
        let after = if req.after.is_empty() {
            None
        } else {
            Some(room(&req.after)?)
        };
        let rooms = match &self.ctx.cluster_list {
            None => {
                self.ctx
                    .store
                    .list_rooms(after.as_ref(), limit as usize)
                    .await?
            }
            Some(cluster) => {
                cluster
                    .list(&self.ctx.store, after.as_ref(), limit as usize)
                    .await?
            }
        };
        let next_after = if rooms.len() == limit as usize {
            rooms.last().map(|r| r.room.to_string()).unwrap_or_default()
        } else {
            String::new()
        };
        Ok(Response::new(pb::ListChatsReply {
            chats: rooms
                .into_iter()
                .map(|r| pb::ChatSummary {
                    chat: r.room.to_string(),
                    revision: r.revision,
                    members: r.members,
                })
                .collect(),
            next_after,
        }))
    }

    async fn members(
        &self,
        request: Request<pb::MembersRequest>,
    ) -> Result<Response<pb::MembersReply>, Status> {
        let req = request.into_inner();
        let room = room(&req.chat)?;
        self.ctx.rooms.check_room_may_exist(&room)?;
        let status = self.ctx.membership.status(&room).await?;
        if !status.state.created {
            return Err(
                NodeError::NotFound(format!("room {} does not exist", shown(&req.chat))).into(),
            );
        }
        let me = self.ctx.me;
        let mut holders = status.lease.promised_to;
        if status.lease.local_read && !holders.contains(&me) {
            holders.push(me);
        }
        holders.sort();
        Ok(Response::new(pb::MembersReply {
            membership: Some(convert::membership_to_pb(room.as_str(), &status.state)),
            lease_holders: holders.iter().map(ToString::to_string).collect(),
            read_path: status.read_path.to_owned(),
        }))
    }

    async fn cluster_status(
        &self,
        _request: Request<pb::ClusterStatusRequest>,
    ) -> Result<Response<pb::ClusterStatusReply>, Status> {
        let status = self.ctx.maps.status();
        let role_of = |id: u64| {
            if status.voters.contains(&id) {
                "voter"
            } else if status.learners.contains(&id) {
                "learner"
            } else {
                ""
            }
        };
        Ok(Response::new(pb::ClusterStatusReply {
            node: self.ctx.me.0,
            epoch: status.map.epoch,
            partitions: status.map.partitions,
            replicas_per_datacenter: u32::try_from(status.map.replicas_per_datacenter)
                .unwrap_or(u32::MAX),
            nodes: status
                .map
                .nodes
                .iter()
                .map(|(id, n)| pb::ClusterNodeInfo {
                    id: *id,
                    datacenter: n.datacenter.clone(),
                    peer_address: n.peer_address.clone(),
                    map_role: role_of(*id).to_owned(),
                    state: match n.state {
                        saferchat_placement::NodeState::Active => "active",
                        saferchat_placement::NodeState::Joining => "joining",
                        saferchat_placement::NodeState::Draining => "draining",
                    }
                    .to_owned(),
                    client_address: n.client_address.clone(),
                })
                .collect(),
            map_leader: status.leader.unwrap_or(0),
            map_term: status.term,
            role: status.role.to_owned(),
            moving_partitions: u32::try_from(status.map.moving.len()).unwrap_or(u32::MAX),
            unestablished_partitions: u32::try_from(status.map.unestablished.len())
                .unwrap_or(u32::MAX),
            failing_over_partitions: u32::try_from(status.map.failing_over.len())
                .unwrap_or(u32::MAX),
            moved_homes: u32::try_from(status.map.moved_homes.len()).unwrap_or(u32::MAX),
            applied_index: status.applied_index.unwrap_or(0),
        }))
    }

    async fn add_node(
        &self,
        request: Request<pb::AddNodeRequest>,
    ) -> Result<Response<pb::MapChangeReply>, Status> {
        let req = request.into_inner();
        if req.id == 0 {
            return Err(Status::invalid_argument("a node id is 1 or more"));
        }
        if !crate::peer_tls::is_valid_datacenter(&req.datacenter) {
            return Err(Status::invalid_argument(format!(
                "datacenter {}: 1-63 lowercase letters, digits and '-'",
                shown(&req.datacenter)
            )));
        }
        for (what, address) in [
            ("peer_address", &req.peer_address),
            ("client_address", &req.client_address),
        ] {
            let parsed: std::net::SocketAddr = address.parse().map_err(|_| {
                Status::invalid_argument(format!("{what} {}: not host:port", shown(address)))
            })?;
            if parsed.ip().is_unspecified() || parsed.port() == 0 {
                return Err(Status::invalid_argument(format!(
                    "{what} {}: other nodes and clients must be able to reach it",
                    shown(address)
                )));
            }
        }
        let epoch = self
            .ctx
            .maps
            .propose(saferchat_placement::MapCommand::AddNode {
                id: req.id,
                node: saferchat_placement::MapNode {
                    datacenter: req.datacenter,
                    peer_address: req.peer_address,
                    client_address: req.client_address,
                    state: saferchat_placement::NodeState::Joining,
                },
            })
            .await?;
        tracing::info!(node = req.id, epoch, "node added to the cluster map");
        Ok(Response::new(pb::MapChangeReply { epoch }))
    }

    async fn remove_node(
        &self,
        request: Request<pb::RemoveNodeRequest>,
    ) -> Result<Response<pb::MapChangeReply>, Status> {
        let id = request.into_inner().id;
        let epoch = self
            .ctx
            .maps
            .propose(saferchat_placement::MapCommand::RemoveNode { id })
            .await?;
        tracing::info!(node = id, epoch, "node removed from the cluster map");
        Ok(Response::new(pb::MapChangeReply { epoch }))
    }

    async fn rebalance(
        &self,
        _request: Request<pb::RebalanceRequest>,
    ) -> Result<Response<pb::MapChangeReply>, Status> {
        let epoch = self
            .ctx
            .maps
            .propose(saferchat_placement::MapCommand::Rebalance)
            .await?;
        tracing::info!(
            epoch,
            "rebalancing: joining nodes are active, partitions move to them"
        );
        Ok(Response::new(pb::MapChangeReply { epoch }))
    }

    async fn drain(
        &self,
        request: Request<pb::DrainRequest>,
    ) -> Result<Response<pb::MapChangeReply>, Status> {
        let id = request.into_inner().id;
        let epoch = self
            .ctx
            .maps
            .propose(saferchat_placement::MapCommand::Drain { id })
            .await?;
        tracing::info!(
            node = id,
            epoch,
            "draining: the node's partitions move to the others"
        );
        Ok(Response::new(pb::MapChangeReply { epoch }))
    }

    async fn move_homes(
        &self,
        request: Request<pb::MoveHomesRequest>,
    ) -> Result<Response<pb::MoveHomesReply>, Status> {
        let request = request.into_inner();
        let map = self.ctx.maps.current();
        if !map.is_created() {
            return Err(Status::failed_precondition(
                "the cluster map was not created yet",
            ));
        }
        if request.to.is_empty() || (request.from.is_empty() && request.partitions.is_empty()) {
            return Err(Status::invalid_argument(
                "name the new home (`to`) and the datacenter whose partitions move (`from`) or the partitions",
            ));
        }
        let datacenters = map.created_datacenters();
        if !datacenters.contains(&request.to) {
            return Err(Status::invalid_argument(format!(
                "datacenter {:?} is not one of the cluster's ({})",
                request.to,
                datacenters.join(", ")
            )));
        }
        if request.from == request.to {
            return Err(Status::invalid_argument(
                "`from` and `to` name the same datacenter",
            ));
        }
        let placement = map
            .placement()
            .map_err(|e| Status::failed_precondition(e.to_string()))?;
        let count = placement.partitions().get();
        let partitions: Vec<u32> = if request.partitions.is_empty() {
            placement
                .partitions()
                .all()
                .filter(|p| placement.home(*p) == request.from)
                .map(|p| p.0)
                .collect()
        } else {
            if let Some(bad) = request.partitions.iter().find(|p| **p >= count) {
                return Err(Status::invalid_argument(format!(
                    "partition {bad} does not exist (the cluster has {count})"
                )));
            }
            request.partitions.clone()
        };
        if partitions.is_empty() {
            return Err(Status::failed_precondition(format!(
                "no partition is homed in datacenter {:?}",
                request.from
            )));
        }
        let mut reply = pb::MoveHomesReply {
            epoch: map.epoch,
            ..pb::MoveHomesReply::default()
        };
        for partition in partitions {
            let command = saferchat_placement::MapCommand::MoveHome {
                partition,
                datacenter: request.to.clone(),
                epoch: map.partition_epoch(partition),
            };
            match self.ctx.maps.propose(command).await {
                Ok(epoch) => {
                    reply.epoch = epoch;
                    reply.moved.push(partition);
                }
                Err(e) => reply.refused.push(format!("partition {partition}: {e}")),
            }
        }
        tracing::info!(
            to = %request.to,
            moved = reply.moved.len(),
            refused = reply.refused.len(),
            epoch = reply.epoch,
            "partition homes moved"
        );
        if reply.moved.is_empty() {
            return Err(Status::failed_precondition(format!(
                "no partition's home moved: {}",
                reply.refused.join("; ")
            )));
        }
        Ok(Response::new(reply))
    }
}
