//! Membership of rooms this node does not replicate.
//!
//! A room's Paxos acceptors and lease holders are its partition's
//! replicas. In a cluster larger than the replica count, a node that is
//! not one of them still answers admin calls and checks sessions for the
//! room: it asks a replica, over the peer link (mutual TLS), to change or
//! read the membership for it, and passes the replica's answer (or error)
//! on unchanged. Replicas are tried in placement order; one that cannot be
//! reached (or answers UNAVAILABLE) is followed by the next. A change
//! carries the id this node gave it, so a replica that proposes it after
//! another one already did recognises it (the room remembers its recent
//! change ids) instead of applying it twice.

use std::collections::HashMap;
use std::sync::Arc;

use saferchat_consensus::{NodeId, RoomId};
use saferchat_placement::Placement;
use saferchat_proto::peer::{self as pb, peer_client::PeerClient};
use tonic::Code;
use tonic::transport::Channel;

use crate::error::NodeError;
use crate::grpc::peer::KnownPeer;
use crate::peer_tls::PeerTls;

/// How long one forwarded call may take: a change waits for a quorum and
/// for the lease holders.
const CALL_TIMEOUT_MS: u64 = 15_000;

/// Channels to every other node's peer listener, for membership calls.
#[derive(Debug)]
pub struct Remote {
    me: NodeId,
    placement: crate::placement::FollowedPlacement,
    tls: PeerTls,
    channels: std::sync::Mutex<HashMap<NodeId, Channel>>,
}

/// A replica's status back as the error its own clients would get.
fn error_of(status: &tonic::Status, replica: NodeId) -> NodeError {
    let message = status.message().to_owned();
    match status.code() {
        Code::InvalidArgument => NodeError::InvalidArgument(message),
        Code::NotFound => NodeError::NotFound(message),
        Code::AlreadyExists => NodeError::AlreadyExists(message),
        Code::PermissionDenied => NodeError::PermissionDenied(message),
        Code::FailedPrecondition => NodeError::FailedPrecondition(message),
        Code::ResourceExhausted => NodeError::ResourceExhausted(message),
        _ => NodeError::Unavailable(format!(
            "membership replica {replica}: {}: {message}",
            status.code()
        )),
    }
}

impl Remote {
    /// Lazy channels to `peers` (connected on first use).
    ///
    /// # Errors
    /// [`NodeError::Config`] for an unusable address.
    pub fn new(
        me: NodeId,
        placement: Arc<Placement>,
        tls: &PeerTls,
        peers: &[KnownPeer],
    ) -> Result<Remote, NodeError> {
        let mut channels = HashMap::new();
        for p in peers {
            channels.insert(p.id, crate::grpc::peer::channel(tls, p, CALL_TIMEOUT_MS)?);
        }
        Ok(Remote {
            me,
            placement: crate::placement::FollowedPlacement::new(placement, None),
            tls: tls.clone(),
            channels: std::sync::Mutex::new(channels),
        })
    }

    /// The same, following the cluster map's partition moves and reaching
    /// nodes that joined through it.
    #[must_use]
    pub fn with_map(
        mut self,
        maps: tokio::sync::watch::Receiver<saferchat_placement::ClusterMap>,
    ) -> Remote {
        self.placement =
            crate::placement::FollowedPlacement::new(self.placement.current(), Some(maps));
        self
    }

    /// The replicas to ask about `room`, `None` when this node is one.
    pub fn replicas_of(&self, room: &RoomId) -> Option<Vec<NodeId>> {
        let placement = self.placement.current();
        let (_, replicas) = placement.room(room.as_str());
        (!replicas.contains(&self.me)).then(|| replicas.to_vec())
    }

    /// The channel to `node`: configured, or opened to the address the
    /// cluster map gives a node that joined.
    fn channel(&self, node: NodeId) -> Option<Channel> {
        if let Some(channel) = self.channels.lock().expect("channels lock").get(&node) {
            return Some(channel.clone());
        }
        let entry = self.placement.map_node(node)?;
        let peer = KnownPeer {
            id: node,
            datacenter: entry.datacenter,
            address: entry.peer_address.parse().ok()?,
        };
        let channel = crate::grpc::peer::channel(&self.tls, &peer, CALL_TIMEOUT_MS).ok()?;
        self.channels
            .lock()
            .expect("channels lock")
            .insert(node, channel.clone());
        Some(channel)
    }

    /// Asks the replicas in turn; returns the first answer and who gave it.
    ///
    /// # Errors
    /// The replica's error, or `Unavailable` when none could be reached.
    pub async fn call(
        &self,
        replicas: &[NodeId],
        call: pb::MembershipCall,
    ) -> Result<(pb::MembershipAnswer, NodeId), NodeError> {
        let mut last = NodeError::Unavailable("the room has no membership replicas".into());
        for replica in replicas {
            let Some(channel) = self.channel(*replica) else {
                continue;
            };
            let mut client = PeerClient::new(channel.clone());
            match client.membership(call.clone()).await {
                Ok(answer) => return Ok((answer.into_inner(), *replica)),
                Err(status) => {
                    let error = error_of(&status, *replica);
                    if !matches!(error, NodeError::Unavailable(_)) {
                        return Err(error);
                    }
                    last = error;
                }
            }
        }
        Err(last)
    }
}
