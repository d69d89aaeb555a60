//! The map group's messages over the peer links.
//!
//! Each openraft request travels as JSON in one unary `Peer/MapRaft` call
//! over the same mutual-TLS peer links as consensus traffic. The receiving
//! side takes the caller's id from its certificate and refuses a request
//! that speaks for another node: an append or a snapshot must come from the
//! leader its vote names, a vote request from the candidate it names. So a
//! node cannot campaign or replicate in another node's name, as no peer
//! frame can (see `grpc/peer.rs`).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use openraft::error::{
    InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError, Unreachable,
};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use openraft::{BasicNode, Raft};
use saferchat_placement::ClusterMap;
use saferchat_proto::peer::{self as pb, peer_client::PeerClient};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::sync::watch;
use tonic::Status;
use tonic::transport::Channel;

use super::TypeConfig;
use crate::error::NodeError;
use crate::grpc::peer::KnownPeer;
use crate::peer_tls::PeerTls;

type NodeId = u64;

/// How long one map call may take at most (openraft passes shorter
/// deadlines per call).
const CALL_TIMEOUT_MS: u64 = 10_000;

/// Channels to the other nodes' peer listeners: the configured ones, and
/// nodes the map names (a node that joined), dialled on first use.
#[derive(Debug, Clone)]
pub struct Dialer {
    tls: Option<PeerTls>,
    configured: HashMap<NodeId, Channel>,
    map: watch::Receiver<ClusterMap>,
    dialled: Arc<Mutex<HashMap<NodeId, (String, Channel)>>>,
}

impl Dialer {
    /// Lazy channels to `peers`, and to the map's nodes when asked (none
    /// for a node without peer TLS: a single node has no one to call).
    ///
    /// # Errors
    /// [`NodeError::Config`] for an unusable configured address.
    pub fn new(
        tls: Option<&PeerTls>,
        peers: &[KnownPeer],
        map: watch::Receiver<ClusterMap>,
    ) -> Result<Dialer, NodeError> {
        let mut configured = HashMap::new();
        if let Some(tls) = tls {
            for p in peers {
                configured.insert(p.id.0, crate::grpc::peer::channel(tls, p, CALL_TIMEOUT_MS)?);
            }
        }
        Ok(Dialer {
            tls: tls.cloned(),
            configured,
            map,
            dialled: Arc::default(),
        })
    }

    /// A channel to `node`, from the configuration or else from the map.
    pub fn channel(&self, node: NodeId) -> Option<Channel> {
        if let Some(c) = self.configured.get(&node) {
            return Some(c.clone());
        }
        let tls = self.tls.as_ref()?;
        let (datacenter, address) = {
            let map = self.map.borrow();
            let n = map.nodes.get(&node)?;
            (n.datacenter.clone(), n.peer_address.clone())
        };
        let mut dialled = self.dialled.lock().expect("dialled lock");
        if let Some((a, c)) = dialled.get(&node)
            && *a == address
        {
            return Some(c.clone());
        }
        let peer = KnownPeer {
            id: saferchat_consensus::NodeId(node),
            datacenter,
            address: address.parse().ok()?,
        };
        let channel = crate::grpc::peer::channel(tls, &peer, CALL_TIMEOUT_MS).ok()?;
        dialled.insert(node, (address, channel.clone()));
        Some(channel)
    }
}

/// The map group's network: links through the [`Dialer`].
#[derive(Debug, Clone)]
pub struct MapNetwork {
    dialer: Dialer,
}

impl MapNetwork {
    /// Links through `dialer`.
    pub fn new(dialer: Dialer) -> MapNetwork {
        MapNetwork { dialer }
    }
}

impl RaftNetworkFactory<TypeConfig> for MapNetwork {
    type Network = MapLink;

    async fn new_client(&mut self, target: NodeId, _node: &BasicNode) -> MapLink {
        MapLink {
            target,
            channel: self.dialer.channel(target),
        }
    }
}

/// The link to one node.
#[derive(Debug)]
pub struct MapLink {
    target: NodeId,
    channel: Option<Channel>,
}

impl MapLink {
    async fn call<Q, A, E>(
        &mut self,
        kind: pb::MapRaftKind,
        request: &Q,
        option: &RPCOption,
    ) -> Result<A, RPCError<NodeId, BasicNode, RaftError<NodeId, E>>>
    where
        Q: Serialize,
        A: DeserializeOwned,
        E: std::error::Error + DeserializeOwned,
    {
        let channel = self.channel.clone().ok_or_else(|| {
            Unreachable::new(&std::io::Error::other(format!(
                "node {} is neither configured nor in the cluster map",
                self.target
            )))
        })?;
        let body = serde_json::to_vec(request).map_err(|e| NetworkError::new(&e))?;
        let mut call = tonic::Request::new(pb::MapRaftCall {
            kind: kind.into(),
            body: body.into(),
        });
        call.set_timeout(option.hard_ttl());
        let answer = PeerClient::new(channel)
            .map_raft(call)
            .await
            .map_err(
                |status| -> RPCError<NodeId, BasicNode, RaftError<NodeId, E>> {
                    match status.code() {
                        tonic::Code::Unavailable | tonic::Code::DeadlineExceeded => {
                            Unreachable::new(&status).into()
                        }
                        _ => NetworkError::new(&status).into(),
                    }
                },
            )?
            .into_inner();
        let result: Result<A, RaftError<NodeId, E>> =
            serde_json::from_slice(&answer.body).map_err(|e| NetworkError::new(&e))?;
        result.map_err(|e| RemoteError::new(self.target, e).into())
    }
}

impl RaftNetwork<TypeConfig> for MapLink {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<NodeId>, RPCError<NodeId, BasicNode, RaftError<NodeId>>> {
        self.call(pb::MapRaftKind::AppendEntries, &rpc, &option)
            .await
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<
        InstallSnapshotResponse<NodeId>,
        RPCError<NodeId, BasicNode, RaftError<NodeId, InstallSnapshotError>>,
    > {
        self.call(pb::MapRaftKind::InstallSnapshot, &rpc, &option)
            .await
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<NodeId>,
        option: RPCOption,
    ) -> Result<VoteResponse<NodeId>, RPCError<NodeId, BasicNode, RaftError<NodeId>>> {
        self.call(pb::MapRaftKind::Vote, &rpc, &option).await
    }
}

fn decode<T: DeserializeOwned>(body: &[u8]) -> Result<T, Status> {
    serde_json::from_slice(body)
        .map_err(|e| Status::invalid_argument(format!("map raft request: {e}")))
}

fn encode<T: Serialize>(answer: &T) -> Result<pb::MapRaftAnswer, Status> {
    serde_json::to_vec(answer)
        .map(|body| pb::MapRaftAnswer { body: body.into() })
        .map_err(|e| Status::internal(format!("map raft answer: {e}")))
}

/// Refuses a request whose vote speaks for a node other than the caller.
fn speaks_for(caller: NodeId, named: Option<NodeId>, what: &str) -> Result<(), Status> {
    if named == Some(caller) {
        Ok(())
    } else {
        Err(Status::permission_denied(format!(
            "a map {what} from node {caller} must name node {caller}, not {}",
            named.map_or_else(|| "no node".to_owned(), |n| n.to_string())
        )))
    }
}

/// Serves one map call from `caller` (the id its certificate proved).
///
/// # Errors
/// INVALID_ARGUMENT for a request that does not decode, PERMISSION_DENIED
/// for one in another node's name.
pub async fn serve(
    raft: &Raft<TypeConfig>,
    caller: NodeId,
    call: pb::MapRaftCall,
) -> Result<pb::MapRaftAnswer, Status> {
    match pb::MapRaftKind::try_from(call.kind) {
        Ok(pb::MapRaftKind::AppendEntries) => {
            let rpc: AppendEntriesRequest<TypeConfig> = decode(&call.body)?;
            speaks_for(caller, rpc.vote.leader_id().voted_for(), "append")?;
            encode(&raft.append_entries(rpc).await)
        }
        Ok(pb::MapRaftKind::Vote) => {
            let rpc: VoteRequest<NodeId> = decode(&call.body)?;
            speaks_for(caller, rpc.vote.leader_id().voted_for(), "vote request")?;
            encode(&raft.vote(rpc).await)
        }
        Ok(pb::MapRaftKind::InstallSnapshot) => {
            let rpc: InstallSnapshotRequest<TypeConfig> = decode(&call.body)?;
            speaks_for(caller, rpc.vote.leader_id().voted_for(), "snapshot")?;
            encode(&raft.install_snapshot(rpc).await)
        }
        _ => Err(Status::invalid_argument("unknown map raft request kind")),
    }
}
