//! `server.grpc.peer.Peer`: consensus traffic between nodes, in and out.
//!
//! Each node keeps one outgoing `Exchange` stream per peer and pushes
//! batches of room messages into it; answers come back on the stream the
//! peer keeps towards us. A broken connection loses what was queued — the
//! protocol tolerates loss — and is re-established with back-off.
//!
//! Both directions run over mutual TLS ([`crate::peer_tls`]). The sender of
//! a frame is the node named by the client certificate of the connection it
//! came on; the frame's own `from` field must agree or be 0. Frames are
//! decoded here, at the edge: a frame with a malformed or absurd message
//! (a ballot round past `Ballot::ROUND_MAX`, say) ends the stream with
//! `INVALID_ARGUMENT` and none of it reaches the consensus core.
//!
//! A message too large for a frame (a handover of a partition with many
//! rooms) travels in parts, each in a frame of its own, and is joined
//! before it is decoded ([`crate::grpc::message_parts`]).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use prost::Message as _;
use saferchat_consensus::room::{PUBLIC_KEY_BYTES_MAX, RECENT_CHANGES_MAX, ROOM_MEMBERS_MAX};
use saferchat_consensus::{NodeId, RoomId};
use saferchat_proto::peer::{self as pb, peer_client::PeerClient, peer_server::Peer};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status, Streaming};

use crate::convert;
use crate::error::NodeError;
use crate::grpc::message_parts;
use crate::membership::{Inbound, PeerSender, TooLarge};
use crate::peer_tls::{self, PeerTls};
use crate::timeline::LogPost;
use crate::timeline::driver::{ACCEPT_VALUES_MAX, LogInbound, RETAINED_BYTES_MAX};

/// Messages queued for one peer before new ones are dropped.
const PEER_QUEUE_MAX: usize = 16_384;
/// Messages packed into one frame.
const FRAME_MESSAGES_MAX: usize = 512;
/// A sender closes a frame once its messages reach this size.
const FRAME_BYTES_SOFT_MAX: usize = 1024 * 1024;
/// The largest encoded room message: a room state of `ROOM_MEMBERS_MAX`
/// members, each with a handle and the largest public key, plus the recent
/// change ids, ballots and field tags (generously).
pub const ROOM_MESSAGE_BYTES_MAX: usize =
    ROOM_MEMBERS_MAX * (32 + PUBLIC_KEY_BYTES_MAX + 16) + RECENT_CHANGES_MAX * 40 + 1024;
/// The largest frame the peer listener decodes: a frame closes at
/// `FRAME_BYTES_SOFT_MAX`, so it holds at most that plus one message.
/// (It was 64 MiB: room for one peer to make another buffer a lot.)
/// The largest partition-log message: a Promise carries a partition's
/// retained applied entries plus its uncommitted tail (bounded by the
/// room actors' appends in flight), an Accept at most
/// [`ACCEPT_VALUES_MAX`] envelopes.
pub const LOG_MESSAGE_BYTES_MAX: usize =
    2 * RETAINED_BYTES_MAX + ACCEPT_VALUES_MAX * (saferchat_envelope::ENVELOPE_BYTES_MAX + 1024);
/// The largest single message a frame is sure to carry whatever precedes
/// it: a larger one would make its whole frame too large for the peer,
/// which refuses the frame, so it is sent in parts instead (see
/// [`GrpcPeers::enqueue`]). About 36 MiB; only a partition handover can
/// come near it (every room of a partition in one message).
pub const PEER_MESSAGE_BYTES_MAX: usize = PEER_FRAME_BYTES_MAX - FRAME_BYTES_SOFT_MAX;
/// Bytes of messages in parts queued on one link at most: a resend of a
/// large transfer while the last one still waits is dropped (the mover
/// sends it again later) rather than piling copies up in memory.
const SPLIT_QUEUED_BYTES_MAX: usize = message_parts::SPLIT_FRAME_BYTES_MAX;

/// A frame closes at its soft size, so the largest is the soft size plus
/// one largest message.
pub const PEER_FRAME_BYTES_MAX: usize = FRAME_BYTES_SOFT_MAX
    + if ROOM_MESSAGE_BYTES_MAX > LOG_MESSAGE_BYTES_MAX {
        ROOM_MESSAGE_BYTES_MAX
    } else {
        LOG_MESSAGE_BYTES_MAX
    }
    + 1024;
/// Reconnect back-off bounds.
const BACKOFF_MS_MIN: u64 = 50;
const BACKOFF_MS_MAX: u64 = 2_000;

/// Another node of the cluster, as configured.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KnownPeer {
    /// Its id.
    pub id: NodeId,
    /// Its datacenter (part of the name its certificate must carry).
    pub datacenter: String,
    /// Its peer listener.
    pub address: SocketAddr,
}

/// A lazy channel (connected on first use) to `peer`'s peer listener for
/// unary calls that may take up to `timeout_ms`, over mutual TLS.
///
/// # Errors
/// [`NodeError::Config`] for an unusable address or TLS setting.
pub fn channel(
    tls: &PeerTls,
    peer: &KnownPeer,
    timeout_ms: u64,
) -> Result<tonic::transport::Channel, NodeError> {
    let endpoint = tonic::transport::Endpoint::from_shared(format!("https://{}", peer.address))
        .map_err(|e| NodeError::Config(format!("peer {}: {e}", peer.id)))?
        .tls_config(tls.client_for(peer.id, &peer.datacenter))
        .map_err(|e| NodeError::Config(format!("peer {} TLS: {e}", peer.id)))?
        .connect_timeout(Duration::from_millis(1_000))
        .timeout(Duration::from_millis(timeout_ms))
        .tcp_nodelay(true);
    Ok(endpoint.connect_lazy())
}

/// What the peer service hands room and partition traffic to, which
/// exists only once the node knows its cluster: at once for a configured
/// node, after it was added to the cluster map for a node that joins. The
/// service (and its map group calls) runs before that.
#[derive(Debug)]
pub struct Serving {
    /// Answers other nodes' membership calls from this node's replicas
    /// (must not forward: see [`crate::membership::Membership::local`]).
    pub membership: crate::membership::Membership,
    /// Partition-log traffic, and the partition count that bounds it.
    pub log: (mpsc::Sender<LogInbound>, u32),
    /// This node's store (`ListRooms`, the partition copy).
    pub store: Arc<dyn crate::storage::ChatStore>,
    /// Which nodes replicate which partitions (the partition copy),
    /// following the cluster map's moves.
    pub placement: Arc<crate::placement::FollowedPlacement>,
    /// The partition logs' applied marks (the partition copy); `None` on a
    /// node without them.
    pub timeline: Option<crate::timeline::Timeline>,
}

/// Receives other nodes' traffic.
#[derive(Debug, Clone)]
pub struct PeerService {
    inbound: mpsc::Sender<Inbound>,
    serving: Arc<std::sync::OnceLock<Serving>>,
    /// The cluster map group, for `MapRaft` calls.
    map: Option<crate::cluster_map::ClusterMaps>,
    /// Datacenter of every configured node allowed to call.
    cluster: Arc<HashMap<NodeId, String>>,
}

impl PeerService {
    /// Forwards frames from the configured peers (and the map's nodes) to
    /// the membership driver, once [`PeerService::serve`] said where.
    pub fn new(inbound: mpsc::Sender<Inbound>, cluster: Vec<KnownPeer>) -> PeerService {
        PeerService {
            inbound,
            serving: Arc::default(),
            map: None,
            cluster: Arc::new(cluster.into_iter().map(|p| (p.id, p.datacenter)).collect()),
        }
    }

    /// Serves membership calls and partition-log frames from now on (once;
    /// a second call is ignored). Clones of this service share it.
    pub fn serve(&self, serving: Serving) {
        let _ = self.serving.set(serving);
    }

    fn serving(&self) -> Result<&Serving, Status> {
        self.serving.get().ok_or_else(|| {
            Status::unavailable("this node is still starting (or joining the cluster)")
        })
    }

    /// What a partition copy's pages are served from, for `caller`.
    fn copying(&self, caller: NodeId) -> Result<crate::grpc::partition_copy::Serve<'_>, Status> {
        let serving = self.serving()?;
        Ok(crate::grpc::partition_copy::Serve {
            caller,
            placement: serving.placement.current(),
            timeline: serving.timeline.as_ref(),
            store: &*serving.store,
        })
    }

    fn maps(&self) -> Result<&crate::cluster_map::ClusterMaps, Status> {
        self.map
            .as_ref()
            .ok_or_else(|| Status::unavailable("the cluster map is not served here"))
    }

    /// Serves the cluster map group's calls with `maps`.
    #[must_use]
    pub fn with_map(mut self, maps: crate::cluster_map::ClusterMaps) -> PeerService {
        self.map = Some(maps);
        self
    }

    fn identity<T>(request: &Request<T>) -> Result<peer_tls::PeerIdentity, Status> {
        let certs = request.peer_certs().ok_or_else(|| {
            Status::unauthenticated("peer calls need a cluster client certificate")
        })?;
        let leaf = certs
            .first()
            .ok_or_else(|| Status::unauthenticated("no client certificate"))?;
        peer_tls::identity_of(leaf).map_err(Status::from)
    }

    /// The calling node, from its verified client certificate: a node of
    /// the configuration, or of the cluster map (a node that joined).
    fn caller<T>(&self, request: &Request<T>) -> Result<NodeId, Status> {
        let who = Self::identity(request)?;
        self.known(&who, false)
    }

    /// The caller of a map group call: as [`Self::caller`], and any node
    /// with a cluster certificate while this node has no map yet (a node
    /// that joins learns the cluster from these calls; they can only
    /// bring it the map, which the group's quorum decided).
    fn map_caller<T>(&self, request: &Request<T>) -> Result<NodeId, Status> {
        let who = Self::identity(request)?;
        self.known(&who, true)
    }

    fn known(&self, who: &peer_tls::PeerIdentity, pristine_ok: bool) -> Result<NodeId, Status> {
        let mismatch = |dc: &str| {
            Status::permission_denied(format!(
                "certificate names {} in {}, but {} is configured in {dc}",
                who.node, who.datacenter, who.node
            ))
        };
        if let Some(dc) = self.cluster.get(&who.node) {
            return if *dc == who.datacenter {
                Ok(who.node)
            } else {
                Err(mismatch(dc))
            };
        }
        if let Some(maps) = &self.map {
            let map = maps.current();
            match map.nodes.get(&who.node.0) {
                Some(n) if n.datacenter == who.datacenter => return Ok(who.node),
                Some(n) => return Err(mismatch(&n.datacenter)),
                None if pristine_ok && !map.is_created() => return Ok(who.node),
                None => {}
            }
        }
        Err(Status::permission_denied(format!(
            "{} is not a peer of this node",
            who.node
        )))
    }
}

/// Decodes one frame's messages; the first bad one refuses the frame.
fn decode_log(
    frame: &pb::PeerFrame,
    partitions: u32,
) -> Result<Vec<(u32, saferchat_consensus::partition_log::LogMessage<LogPost>)>, Status> {
    frame
        .log
        .iter()
        .map(|wire| {
            if wire.partition >= partitions {
                return Err(Status::invalid_argument(format!(
                    "partition-log message for partition {}, but the cluster has {partitions}",
                    wire.partition
                )));
            }
            let message = convert::log::message_from_pb(wire).map_err(|e| {
                Status::invalid_argument(format!("partition {}: {e}", wire.partition))
            })?;
            Ok((wire.partition, message))
        })
        .collect()
}

/// Decodes one frame's handover messages; the first bad one refuses the
/// frame.
fn decode_handover(
    frame: &pb::PeerFrame,
    partitions: u32,
) -> Result<Vec<(u32, saferchat_consensus::handover::HandoverMessage)>, Status> {
    frame
        .handover
        .iter()
        .map(|wire| {
            if wire.partition >= partitions {
                return Err(Status::invalid_argument(format!(
                    "handover message for partition {}, but the cluster has {partitions}",
                    wire.partition
                )));
            }
            convert::handover::message_from_pb(wire)
                .map_err(|e| Status::invalid_argument(format!("partition {}: {e}", wire.partition)))
        })
        .collect()
}

fn decode(frame: &pb::PeerFrame) -> Result<Vec<(RoomId, saferchat_consensus::Message)>, Status> {
    frame
        .messages
        .iter()
        .map(|wire| {
            let room = RoomId::new(&wire.room)
                .map_err(|e| Status::invalid_argument(format!("peer message: room name: {e}")))?;
            let message = convert::message_from_pb(wire)
                .map_err(|e| Status::invalid_argument(format!("peer message for {room}: {e}")))?;
            Ok((room, message))
        })
        .collect()
}

#[tonic::async_trait]
impl Peer for PeerService {
    async fn membership(
        &self,
        request: Request<pb::MembershipCall>,
    ) -> Result<Response<pb::MembershipAnswer>, Status> {
        let from = self.caller(&request)?;
        let membership = &self.serving()?.membership;
        let call = request.into_inner();
        let room = RoomId::new(&call.room)
            .map_err(|e| Status::invalid_argument(format!("room name: {e}")))?;
        let handle = || {
            <[u8; 32]>::try_from(call.handle.as_ref())
                .map(saferchat_consensus::Handle::from_bytes)
                .map_err(|_| Status::invalid_argument("a handle is 32 bytes"))
        };
        let id = <[u8; 16]>::try_from(call.change_id.as_ref())
            .map(|b| saferchat_consensus::ChangeId(u128::from_be_bytes(b)));
        use saferchat_consensus::Change;
        let change = match pb::MembershipOp::try_from(call.op) {
            Ok(pb::MembershipOp::Read) => {
                let state = membership.read(&room).await?;
                return Ok(Response::new(pb::MembershipAnswer {
                    state: Some(convert::state_to_pb(&state)),
                    read_path: "forwarded".into(),
                    ..pb::MembershipAnswer::default()
                }));
            }
            Ok(pb::MembershipOp::Status) => {
                let status = membership.status(&room).await?;
                return Ok(Response::new(pb::MembershipAnswer {
                    state: Some(convert::state_to_pb(&status.state)),
                    read_path: status.read_path.to_owned(),
                    local_read: status.lease.local_read,
                    promised_to: status.lease.promised_to.iter().map(|n| n.0).collect(),
                    ..pb::MembershipAnswer::default()
                }));
            }
            Ok(pb::MembershipOp::Create) => Change::Create,
            Ok(pb::MembershipOp::Add) => Change::Add(handle()?),
            Ok(pb::MembershipOp::Remove) => Change::Remove(handle()?),
            Ok(pb::MembershipOp::RegisterKey) => {
                if call.public_key.is_empty()
                    || call.public_key.len() > saferchat_consensus::room::PUBLIC_KEY_BYTES_MAX
                {
                    return Err(Status::invalid_argument("public key size"));
                }
                Change::RegisterKey(
                    handle()?,
                    saferchat_consensus::PublicKey::new(call.public_key.clone()),
                )
            }
            _ => return Err(Status::invalid_argument("unknown membership operation")),
        };
        let id = id.map_err(|_| Status::invalid_argument("a change id is 16 bytes"))?;
        tracing::debug!(%from, %room, "membership change forwarded by a peer");
        let expected = call.expected.map(saferchat_consensus::Revision);
        let (applied, state) = membership
            .change_with_id(&room, change, expected, id)
            .await?;
        Ok(Response::new(pb::MembershipAnswer {
            state: Some(convert::state_to_pb(&state)),
            changed: applied.changed,
            ..pb::MembershipAnswer::default()
        }))
    }

    async fn list_rooms(
        &self,
        request: Request<pb::ListRoomsCall>,
    ) -> Result<Response<pb::ListRoomsAnswer>, Status> {
        self.caller(&request)?;
        let serving = self.serving()?;
        let call = request.into_inner();
        if call.limit == 0 || call.limit > crate::grpc::room_list::PAGE_MAX {
            return Err(Status::invalid_argument(format!(
                "limit must be 1 to {}",
                crate::grpc::room_list::PAGE_MAX
            )));
        }
        let after = if call.after.is_empty() {
            None
        } else {
            Some(
                RoomId::new(&call.after)
                    .map_err(|e| Status::invalid_argument(format!("room name: {e}")))?,
            )
        };
        let rooms = serving
            .store
            .list_rooms(after.as_ref(), call.limit as usize)
            .await?;
        Ok(Response::new(pb::ListRoomsAnswer {
            rooms: rooms
                .into_iter()
                .map(|r| pb::RoomSummaryRecord {
                    room: r.room.to_string(),
                    revision: r.revision,
                    members: r.members,
                })
                .collect(),
        }))
    }

    async fn copy_partition_rooms(
        &self,
        request: Request<pb::CopyRoomsCall>,
    ) -> Result<Response<pb::CopyRoomsPage>, Status> {
        let caller = self.caller(&request)?;
        let page = self.copying(caller)?.rooms(request.into_inner()).await?;
        Ok(Response::new(page))
    }

    async fn copy_room(
        &self,
        request: Request<pb::CopyRoomCall>,
    ) -> Result<Response<pb::CopyRoomPage>, Status> {
        let caller = self.caller(&request)?;
        let page = self.copying(caller)?.room(request.into_inner()).await?;
        Ok(Response::new(page))
    }

    async fn map_propose(
        &self,
        request: Request<pb::MapProposeCall>,
    ) -> Result<Response<pb::MapProposeAnswer>, Status> {
        let from = self.caller(&request)?;
        let maps = self.maps()?;
        let command: saferchat_placement::MapCommand =
            serde_json::from_slice(&request.into_inner().command)
                .map_err(|e| Status::invalid_argument(format!("map command: {e}")))?;
        tracing::debug!(%from, "cluster map change forwarded by a peer");
        let epoch = maps.propose_from_peer(command).await?;
        Ok(Response::new(pb::MapProposeAnswer { epoch }))
    }

    async fn map_raft(
        &self,
        request: Request<pb::MapRaftCall>,
    ) -> Result<Response<pb::MapRaftAnswer>, Status> {
        let from = self.map_caller(&request)?;
        let maps = self.maps()?;
        crate::cluster_map::network::serve(maps.raft(), from.0, request.into_inner())
            .await
            .map(Response::new)
    }

    async fn exchange(
        &self,
        request: Request<Streaming<pb::PeerFrame>>,
    ) -> Result<Response<pb::ExchangeSummary>, Status> {
        let from = self.caller(&request)?;
        let serving = self.serving()?;
        let mut stream = request.into_inner();
        let mut frames = 0;
        let mut reader = FrameReader::new(from);
        while let Some(frame) = stream.message().await? {
            frames += 1;
            if let Some(whole) = reader.read(frame)? {
                self.take_frame(from, serving, whole).await?;
            }
        }
        Ok(Response::new(pb::ExchangeSummary { frames }))
    }
}

/// Refuses a malformed frame (the stream ends with it), loudly.
fn refuse(from: NodeId, why: String) -> Status {
    tracing::warn!(%from, error = %why, "refusing a peer frame");
    metrics::counter!("saferchat_peer_frames_refused_total", "why" => "malformed").increment(1);
    Status::invalid_argument(why)
}

/// A frame's `from` must be the connection's node, or 0.
fn check_from(from: NodeId, claimed: u64) -> Result<(), Status> {
    if claimed != 0 && claimed != from.0 {
        tracing::warn!(%from, claimed, "peer frame with a forged sender");
        metrics::counter!("saferchat_peer_frames_refused_total", "why" => "forged_from")
            .increment(1);
        return Err(Status::permission_denied(format!(
            "frame claims to come from n{claimed}, but the connection is {from}'s"
        )));
    }
    Ok(())
}

/// The frames of one `Exchange` stream, whole: a frame received whole is
/// passed on, the parts of a message are joined first.
#[derive(Debug)]
struct FrameReader {
    from: NodeId,
    joining: message_parts::Joining,
}

impl FrameReader {
    fn new(from: NodeId) -> FrameReader {
        FrameReader {
            from,
            joining: message_parts::Joining::default(),
        }
    }

    /// The next frame received; a whole frame once there is one.
    ///
    /// # Errors
    /// The status that ends the stream: a forged sender, a part out of
    /// order or with company, parts that make no frame.
    fn read(&mut self, mut frame: pb::PeerFrame) -> Result<Option<pb::PeerFrame>, Status> {
        let from = self.from;
        check_from(from, frame.from)?;
        let Some(part) = frame.part.take() else {
            if self.joining.is_joining() {
                return Err(refuse(
                    from,
                    "a frame between the parts of a message".into(),
                ));
            }
            return Ok(Some(frame));
        };
        let bare = pb::PeerFrame {
            from: frame.from,
            ..pb::PeerFrame::default()
        };
        if frame != bare {
            return Err(refuse(
                from,
                "a frame with a part carries nothing else".into(),
            ));
        }
        let whole = self.joining.push(part).map_err(|e| refuse(from, e))?;
        if let Some(whole) = &whole {
            check_from(from, whole.from)?;
            metrics::counter!("saferchat_peer_messages_joined_total").increment(1);
        }
        Ok(whole)
    }
}

impl PeerService {
    /// Decodes a whole frame (received whole, or joined from parts) and
    /// hands its messages to the drivers.
    async fn take_frame(
        &self,
        from: NodeId,
        serving: &Serving,
        frame: pb::PeerFrame,
    ) -> Result<(), Status> {
        let malformed = |e: Status| refuse(from, e.message().to_owned());
        let messages = decode(&frame).map_err(malformed)?;
        let log = decode_log(&frame, serving.log.1).map_err(malformed)?;
        let handover = decode_handover(&frame, serving.log.1).map_err(malformed)?;
        if !messages.is_empty() || !handover.is_empty() {
            self.inbound
                .send(Inbound {
                    from,
                    messages,
                    handover,
                })
                .await
                .map_err(|_| Status::unavailable("node is shutting down"))?;
        }
        if !log.is_empty() {
            serving
                .log
                .0
                .send(LogInbound {
                    from,
                    messages: log,
                })
                .await
                .map_err(|_| Status::unavailable("node is shutting down"))?;
        }
        Ok(())
    }
}

/// Sends to peers over their `Exchange` service.
#[derive(Debug)]
pub struct GrpcPeers {
    me: NodeId,
    tls: PeerTls,
    shutdown: CancellationToken,
    queues: std::sync::Mutex<HashMap<NodeId, LinkQueue>>,
    /// Numbers messages sent in parts.
    split_messages: std::sync::atomic::AtomicU64,
    /// Handover messages larger than `split_above` go in parts of
    /// `part_bytes`: [`PEER_MESSAGE_BYTES_MAX`] and
    /// [`message_parts::PART_BYTES`], as for every other message, unless a
    /// test build says otherwise ([`test_split`]).
    split_above: usize,
    part_bytes: usize,
    /// Where nodes that joined after the start are found: a link to one
    /// opens on the first message for it.
    maps: Option<crate::cluster_map::ClusterMaps>,
}

/// The queue of one link, and the bytes of messages in parts on it.
#[derive(Clone, Debug)]
struct LinkQueue {
    tx: mpsc::Sender<Outgoing>,
    split_queued: Arc<std::sync::atomic::AtomicUsize>,
}

/// One message queued for a peer.
#[derive(Debug)]
enum Outgoing {
    Room(pb::RoomMessage),
    Log(pb::PartitionMessage),
    Handover(pb::HandoverMessage),
    /// A message too large for a frame, in parts that leave together.
    Parts(Split),
}

/// The parts of one message, holding their share of the link's
/// [`SPLIT_QUEUED_BYTES_MAX`] until sent or dropped.
#[derive(Debug)]
struct Split {
    parts: Vec<pb::MessagePart>,
    bytes: usize,
    queued: Arc<std::sync::atomic::AtomicUsize>,
}

impl Drop for Split {
    fn drop(&mut self) {
        self.queued
            .fetch_sub(self.bytes, std::sync::atomic::Ordering::AcqRel);
    }
}

impl Outgoing {
    fn encoded_len(&self) -> usize {
        match self {
            Outgoing::Room(m) => m.encoded_len(),
            Outgoing::Log(m) => m.encoded_len(),
            Outgoing::Handover(m) => m.encoded_len(),
            Outgoing::Parts(split) => split.bytes,
        }
    }

    /// Adds this message to `frame`.
    fn push_into(self, frame: &mut pb::PeerFrame) {
        match self {
            Outgoing::Room(m) => frame.messages.push(m),
            Outgoing::Log(m) => frame.log.push(m),
            Outgoing::Handover(m) => frame.handover.push(m),
            Outgoing::Parts(_) => unreachable!("parts are frames of their own"),
        }
    }

    /// A frame of this message alone.
    fn alone(self) -> pb::PeerFrame {
        let mut frame = pb::PeerFrame::default();
        self.push_into(&mut frame);
        frame
    }
}

impl GrpcPeers {
    /// Starts one sender task per peer.
    pub fn start(
        me: NodeId,
        tls: &PeerTls,
        peers: &[KnownPeer],
        shutdown: &CancellationToken,
    ) -> GrpcPeers {
        let (split_above, part_bytes) = test_split().map_or(
            (PEER_MESSAGE_BYTES_MAX, message_parts::PART_BYTES),
            |bytes| (bytes, bytes),
        );
        let peers_out = GrpcPeers {
            me,
            tls: tls.clone(),
            shutdown: shutdown.clone(),
            queues: std::sync::Mutex::new(HashMap::new()),
            split_messages: std::sync::atomic::AtomicU64::new(0),
            split_above,
            part_bytes,
            maps: None,
        };
        for peer in peers {
            peers_out.open(peer);
        }
        peers_out
    }

    /// The same, opening links on demand to nodes the cluster map names.
    #[must_use]
    pub fn with_map(mut self, maps: crate::cluster_map::ClusterMaps) -> GrpcPeers {
        self.maps = Some(maps);
        self
    }

    /// Starts the sender task of a link to `peer`.
    fn open(&self, peer: &KnownPeer) -> LinkQueue {
        let (tx, rx) = mpsc::channel(PEER_QUEUE_MAX);
        let queue = LinkQueue {
            tx,
            split_queued: Arc::default(),
        };
        let link = Link {
            me: self.me,
            peer: peer.id,
            addr: peer.address,
            tls: self.tls.client_for(peer.id, &peer.datacenter),
        };
        tokio::spawn(sender(link, rx, self.shutdown.clone()));
        self.queues
            .lock()
            .expect("peer queues lock")
            .insert(peer.id, queue.clone());
        queue
    }

    /// The queue of the link to `to`; a node the map names but no link
    /// was opened to yet (it joined after this node started) gets one.
    fn queue(&self, to: NodeId) -> Option<LinkQueue> {
        if let Some(queue) = self.queues.lock().expect("peer queues lock").get(&to) {
            return Some(queue.clone());
        }
        let map = self.maps.as_ref()?.current();
        let node = map.nodes.get(&to.0)?;
        let Ok(address) = node.peer_address.parse() else {
            tracing::warn!(%to, address = %node.peer_address, "the cluster map has no usable peer address for this node");
            return None;
        };
        tracing::info!(%to, %address, "opening a peer link to a node of the cluster map");
        Some(self.open(&KnownPeer {
            id: to,
            datacenter: node.datacenter.clone(),
            address,
        }))
    }

    /// Queues `message` for `to`, in parts when it is too large for a
    /// frame; drops it when the queue is full.
    ///
    /// # Errors
    /// [`TooLarge`] for a message no link carries even in parts.
    fn enqueue(&self, to: NodeId, message: Outgoing) -> Result<(), TooLarge> {
        let bytes = message.encoded_len();
        if bytes > message_parts::SPLIT_MESSAGE_BYTES_MAX {
            metrics::counter!("saferchat_peer_messages_too_large_total").increment(1);
            return Err(TooLarge {
                bytes,
                max: message_parts::SPLIT_MESSAGE_BYTES_MAX,
            });
        }
        let Some(queue) = self.queue(to) else {
            tracing::warn!(%to, "no such peer");
            return Ok(());
        };
        // (A test build's smaller split applies to handovers only.)
        let (split_above, part_bytes) = match message {
            Outgoing::Handover(_) => (self.split_above, self.part_bytes),
            _ => (PEER_MESSAGE_BYTES_MAX, message_parts::PART_BYTES),
        };
        let item = if bytes <= split_above {
            message
        } else {
            // Its frame would be refused whole: send it in parts, unless
            // earlier ones still wait on this link.
            use std::sync::atomic::Ordering;
            let before = queue.split_queued.fetch_add(bytes, Ordering::AcqRel);
            let mut split = Split {
                parts: Vec::new(),
                bytes,
                queued: Arc::clone(&queue.split_queued),
            };
            if before + bytes > SPLIT_QUEUED_BYTES_MAX {
                // (Dropping `split` gives the bytes back.)
                metrics::counter!("saferchat_peer_messages_dropped_total").increment(1);
                return Ok(());
            }
            let number = self.split_messages.fetch_add(1, Ordering::Relaxed);
            split.parts = message_parts::split_in(number, &message.alone(), part_bytes);
            Outgoing::Parts(split)
        };
        if queue.tx.try_send(item).is_err() {
            metrics::counter!("saferchat_peer_messages_dropped_total").increment(1);
        }
        Ok(())
    }
}

impl PeerSender for GrpcPeers {
    fn send(&self, to: NodeId, message: pb::RoomMessage) {
        if let Err(e) = self.enqueue(to, Outgoing::Room(message)) {
            tracing::error!(%to, bytes = e.bytes, max = e.max, "dropping a room message too large for any link");
        }
    }

    fn send_log(&self, to: NodeId, message: pb::PartitionMessage) {
        if let Err(e) = self.enqueue(to, Outgoing::Log(message)) {
            tracing::error!(%to, bytes = e.bytes, max = e.max, "dropping a partition-log message too large for any link");
        }
    }

    fn send_handover(&self, to: NodeId, message: pb::HandoverMessage) -> Result<(), TooLarge> {
        self.enqueue(to, Outgoing::Handover(message))
    }
}

/// In a test build (feature `test-split`), `SAFERCHAT_TEST_SPLIT_BYTES`:
/// handover messages larger than that go in parts of that size, so that
/// tests of small partitions move them in parts too. Never in a release
/// build.
fn test_split() -> Option<usize> {
    if !cfg!(feature = "test-split") {
        return None;
    }
    let bytes = std::env::var("SAFERCHAT_TEST_SPLIT_BYTES").ok()?;
    match bytes.parse::<usize>() {
        Ok(n) if n > 0 => Some(n.min(PEER_MESSAGE_BYTES_MAX)),
        _ => {
            tracing::warn!(%bytes, "SAFERCHAT_TEST_SPLIT_BYTES is not a positive number; ignored");
            None
        }
    }
}

/// One outgoing link.
struct Link {
    me: NodeId,
    peer: NodeId,
    addr: SocketAddr,
    tls: tonic::transport::ClientTlsConfig,
}

/// Takes queued messages into one frame: at most `FRAME_MESSAGES_MAX`
/// messages, closed once they reach `FRAME_BYTES_SOFT_MAX` bytes, or at a
/// message in parts, which is given back (its parts are frames of their
/// own).
fn fill_frame(
    first: Outgoing,
    queue: &mut mpsc::Receiver<Outgoing>,
) -> (pb::PeerFrame, Option<Outgoing>) {
    let mut bytes = first.encoded_len();
    let mut frame = first.alone();
    let mut count = 1;
    while count < FRAME_MESSAGES_MAX && bytes < FRAME_BYTES_SOFT_MAX {
        match queue.try_recv() {
            Ok(parts @ Outgoing::Parts(_)) => return (frame, Some(parts)),
            Ok(m) => {
                bytes += m.encoded_len();
                m.push_into(&mut frame);
                count += 1;
            }
            Err(_) => break,
        }
    }
    (frame, None)
}

/// The frames that carry `first` (and what follows it in `queue`, up to a
/// frame's limits): one frame of messages, or one frame per part of a
/// message in parts, with that message's hold on the link's budget. A
/// message in parts met while filling a frame is left in `next`.
fn frames_of(
    first: Outgoing,
    queue: &mut mpsc::Receiver<Outgoing>,
    next: &mut Option<Outgoing>,
) -> (Vec<pb::PeerFrame>, Option<Split>) {
    match first {
        Outgoing::Parts(mut split) => {
            let frames = std::mem::take(&mut split.parts)
                .into_iter()
                .map(|part| pb::PeerFrame {
                    part: Some(part),
                    ..pb::PeerFrame::default()
                })
                .collect();
            (frames, Some(split))
        }
        other => {
            let (frame, given_back) = fill_frame(other, queue);
            *next = given_back;
            (vec![frame], None)
        }
    }
}

async fn sender(link: Link, mut queue: mpsc::Receiver<Outgoing>, shutdown: CancellationToken) {
    let Link {
        me,
        peer,
        addr,
        tls,
    } = link;
    let mut backoff = BACKOFF_MS_MIN;
    loop {
        if shutdown.is_cancelled() {
            return;
        }
        let endpoint = tonic::transport::Endpoint::from_shared(format!("https://{addr}"))
            .expect("a socket address is a valid URI")
            .tls_config(tls.clone())
            .expect("the TLS configuration was checked at start")
            .connect_timeout(Duration::from_millis(1_000))
            .tcp_nodelay(true);
        let connected = tokio::select! {
            c = endpoint.connect() => c,
            () = shutdown.cancelled() => return,
        };
        let channel = match connected {
            Ok(channel) => channel,
            Err(e) => {
                tracing::debug!(%peer, %addr, error = %e, "peer unreachable");
                // Drop what queued up while unreachable: stale consensus
                // messages only cause retries.
                while queue.try_recv().is_ok() {}
                tokio::select! {
                    () = tokio::time::sleep(Duration::from_millis(backoff)) => {}
                    () = shutdown.cancelled() => return,
                }
                backoff = (backoff * 2).min(BACKOFF_MS_MAX);
                continue;
            }
        };
        tracing::info!(%peer, %addr, "connected to peer");
        backoff = BACKOFF_MS_MIN;
        let (frames, frames_rx) = mpsc::channel::<pb::PeerFrame>(64);
        let mut client = PeerClient::new(channel).max_encoding_message_size(PEER_FRAME_BYTES_MAX);
        let call =
            tokio::spawn(async move { client.exchange(ReceiverStream::new(frames_rx)).await });
        let mut next = None;
        'stream: loop {
            let first = match next.take() {
                Some(m) => m,
                None => {
                    let first = tokio::select! {
                        m = queue.recv() => m,
                        () = shutdown.cancelled() => return,
                    };
                    let Some(first) = first else { return };
                    first
                }
            };
            // A message in parts keeps its share of the link's budget
            // until its last part left.
            let (out, _budget) = frames_of(first, &mut queue, &mut next);
            for mut frame in out {
                frame.from = me.0;
                if frames.send(frame).await.is_err() || call.is_finished() {
                    tracing::info!(%peer, "peer stream broke; reconnecting");
                    break 'stream;
                }
            }
        }
        call.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn biggest_state() -> pb::RoomStateRecord {
        pb::RoomStateRecord {
            revision: u64::MAX,
            created: true,
            members: (0..ROOM_MEMBERS_MAX)
                .map(|_| pb::MemberRecord {
                    handle: Bytes::from(vec![0xff; 32]),
                    public_key: Bytes::from(vec![0xff; PUBLIC_KEY_BYTES_MAX]),
                })
                .collect(),
            recent: (0..RECENT_CHANGES_MAX)
                .map(|_| pb::RecentChange {
                    id: Bytes::from(vec![0xff; 16]),
                    revision: u64::MAX,
                })
                .collect(),
        }
    }

    /// The frame limit is derived, not guessed: the largest message any
    /// node can send fits, and a full frame fits.
    #[test]
    fn the_largest_message_and_frame_fit_the_limit() {
        let ballot = Some(pb::Ballot {
            epoch: u64::MAX,
            round: u64::MAX,
            node: u64::MAX,
        });
        let message = pb::RoomMessage {
            room: "r".repeat(saferchat_consensus::room::ROOM_NAME_BYTES_MAX),
            body: Some(pb::room_message::Body::Promise(pb::Promise {
                ballot,
                accepted_ballot: ballot,
                accepted_value: Some(biggest_state()),
            })),
        };
        let len = message.encoded_len();
        assert!(len <= ROOM_MESSAGE_BYTES_MAX, "{len}");
        let (tx, mut rx) = mpsc::channel(FRAME_MESSAGES_MAX);
        for _ in 0..4 {
            tx.try_send(Outgoing::Room(message.clone())).unwrap();
        }
        let (mut frame, next) = fill_frame(Outgoing::Room(message), &mut rx);
        assert!(next.is_none());
        assert!(frame.messages.len() < 5, "a frame closes at its soft size");
        frame.from = u64::MAX;
        assert!(frame.encoded_len() <= PEER_FRAME_BYTES_MAX);
    }

    fn transfer(rooms: usize) -> pb::HandoverMessage {
        pb::HandoverMessage {
            partition: 1,
            body: Some(pb::handover_message::Body::Transfer(pb::HandoverTransfer {
                ballot: None,
                rooms: (0..rooms)
                    .map(|i| pb::TransferredRoom {
                        room: format!("room-{i}"),
                        value: Some(biggest_state()),
                    })
                    .collect(),
            })),
        }
    }

    fn room_message(room: &str) -> pb::RoomMessage {
        pb::RoomMessage {
            room: room.into(),
            body: Some(pb::room_message::Body::Prepare(pb::Prepare {
                ballot: Some(pb::Ballot {
                    epoch: 1,
                    round: 1,
                    node: 1,
                }),
            })),
        }
    }

    /// Senders to `n2` with no link task: what they queue stays in the
    /// returned receiver.
    fn unlinked() -> (GrpcPeers, mpsc::Receiver<Outgoing>, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        let files = peer_tls::generate(dir.path(), &[(NodeId(1), "dc1".into())]).unwrap();
        let tls = PeerTls::load(
            &crate::config::PeerTlsConfig {
                ca: dir.path().join("ca.pem"),
                cert: files[0].cert.clone(),
                key: files[0].key.clone(),
            },
            NodeId(1),
            "dc1",
        )
        .unwrap();
        let peers = GrpcPeers::start(NodeId(1), &tls, &[], &CancellationToken::new());
        let (tx, rx) = mpsc::channel(PEER_QUEUE_MAX);
        peers.queues.lock().unwrap().insert(
            NodeId(2),
            LinkQueue {
                tx,
                split_queued: Arc::default(),
            },
        );
        (peers, rx, dir)
    }

    /// What the link task would send for everything queued, read back
    /// as the receiving end of the stream reads it.
    fn through_the_link(
        queue: &mut mpsc::Receiver<Outgoing>,
    ) -> Result<Vec<pb::PeerFrame>, Status> {
        let mut sent = Vec::new();
        let mut next = None;
        while let Some(first) = next.take().or_else(|| queue.try_recv().ok()) {
            let (frames, _budget) = frames_of(first, queue, &mut next);
            sent.extend(frames.into_iter().map(|mut f| {
                f.from = 1;
                f
            }));
        }
        assert!(
            sent.iter().all(|f| f.encoded_len() <= PEER_FRAME_BYTES_MAX),
            "every frame fits the listener's limit"
        );
        let mut reader = FrameReader::new(NodeId(1));
        let mut whole = Vec::new();
        for frame in sent {
            whole.extend(reader.read(frame)?);
        }
        Ok(whole)
    }

    /// A transfer too large for a frame goes in parts, each frame within
    /// the listener's limit, and arrives whole, in its place among the
    /// messages queued around it.
    #[tokio::test]
    async fn a_message_too_large_for_a_frame_arrives_whole_in_its_place() {
        let (peers, mut queue, _dir) = unlinked();
        let one = transfer(1).encoded_len();
        let large = transfer(PEER_MESSAGE_BYTES_MAX / one + 2);
        assert!(large.encoded_len() > PEER_MESSAGE_BYTES_MAX);
        peers.send(NodeId(2), room_message("before"));
        peers.send_handover(NodeId(2), large.clone()).unwrap();
        peers.send(NodeId(2), room_message("after"));
        let fits = transfer(PEER_MESSAGE_BYTES_MAX / one - 1);
        peers.send_handover(NodeId(2), fits.clone()).unwrap();
        let whole = through_the_link(&mut queue).unwrap();
        let rooms: Vec<_> = whole
            .iter()
            .flat_map(|f| &f.messages)
            .map(|m| m.room.as_str())
            .collect();
        assert_eq!(rooms, ["before", "after"]);
        assert_eq!(
            whole.len(),
            3,
            "before | large, joined | after with the one that fits"
        );
        assert_eq!(whole[1].handover, vec![large]);
        assert_eq!(whole[2].handover, vec![fits]);
        assert_eq!(
            peers.queues.lock().unwrap()[&NodeId(2)]
                .split_queued
                .load(std::sync::atomic::Ordering::Acquire),
            0,
            "the budget is given back once sent"
        );
    }

    /// Resends of a large message while the last one still waits on the
    /// link are dropped rather than piled up; one past what any link
    /// carries is refused with its size.
    #[tokio::test]
    async fn large_messages_are_bounded_per_link_and_in_size() {
        let (peers, mut queue, _dir) = unlinked();
        let one = transfer(1).encoded_len();
        let large = transfer(PEER_MESSAGE_BYTES_MAX / one + 2);
        let fit = SPLIT_QUEUED_BYTES_MAX / large.encoded_len();
        for _ in 0..fit + 3 {
            peers.send_handover(NodeId(2), large.clone()).unwrap();
        }
        let mut queued = 0;
        while let Ok(item) = queue.try_recv() {
            assert!(matches!(item, Outgoing::Parts(_)));
            queued += 1;
        }
        assert_eq!(queued, fit);
        peers.send_handover(NodeId(2), large.clone()).unwrap();
        assert_eq!(
            through_the_link(&mut queue).unwrap().len(),
            1,
            "room again once sent"
        );
        let too_large = transfer(message_parts::SPLIT_FRAME_BYTES_MAX / one + 1);
        let refused = peers.send_handover(NodeId(2), too_large).unwrap_err();
        assert!(refused.bytes > refused.max);
        assert!(queue.try_recv().is_err());
    }

    /// The receiving end refuses parts mixed with other frames, and a
    /// forged sender inside the joined frame.
    #[test]
    fn parts_keep_to_themselves_and_to_their_sender() {
        let frame = |part, from| pb::PeerFrame {
            from,
            part,
            ..pb::PeerFrame::default()
        };
        let whole = pb::PeerFrame {
            handover: vec![transfer(40)],
            ..pb::PeerFrame::default()
        };
        let parts = message_parts::split(1, &whole);
        let mut reader = FrameReader::new(NodeId(1));
        assert_eq!(reader.read(frame(Some(parts[0].clone()), 1)).unwrap(), None);
        let between = reader.read(frame(None, 1)).unwrap_err();
        assert_eq!(between.code(), tonic::Code::InvalidArgument);

        let mut reader = FrameReader::new(NodeId(1));
        let mut crowded = frame(Some(parts[0].clone()), 1);
        crowded.messages.push(room_message("a"));
        assert!(
            reader
                .read(crowded)
                .unwrap_err()
                .message()
                .contains("nothing else")
        );

        let mut reader = FrameReader::new(NodeId(1));
        let forged = message_parts::split(
            2,
            &pb::PeerFrame {
                from: 7,
                ..whole.clone()
            },
        );
        let mut last = None;
        for part in forged {
            last = Some(reader.read(frame(Some(part), 1)));
        }
        assert_eq!(
            last.unwrap().unwrap_err().code(),
            tonic::Code::PermissionDenied
        );

        let mut reader = FrameReader::new(NodeId(1));
        let mut out = None;
        for part in parts {
            out = reader.read(frame(Some(part), 0)).unwrap();
        }
        assert_eq!(out, Some(whole));
    }
}
