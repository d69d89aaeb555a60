//! Relaying a `Post` stream to the node that serves its room.
//!
//! A room's sessions are served by the room's node (its partition's
//! leader): one order of posts, and the membership read locally under the
//! leader's lease. A client connected to another node either follows that
//! node's redirect (our client library asks for it with
//! [`FOLLOWS_REDIRECTS_METADATA`], and then talks to the room's node
//! directly: one hop, the cheapest path) or, if it cannot follow redirects
//! (grpcurl, a generated stub, a browser behind one address), its node
//! relays the stream: it opens a `Post` stream of its own to the room's
//! node, sends the client's join there, and copies frames both ways
//! unchanged until either side ends. The handshake's challenge is the
//! room's node's, so the proof the client signs is checked there, and the
//! session token it is issued is valid on every node.
//!
//! The relay keeps the session's guarantees:
//! - Bounded: each direction holds at most [`RELAY_FRAMES_MAX`] frames;
//!   beyond that the relay stops reading, and HTTP/2 flow control pushes
//!   back to the sender. A client that reads too slowly therefore fills the
//!   room's session queue on the room's node, which closes the session
//!   with RESOURCE_EXHAUSTED exactly as for a direct client; the relay
//!   passes that status on.
//! - The two directions are copied independently, so a full queue one way
//!   never stops the other (no deadlock between a client that posts while
//!   the room's node delivers).
//! - Whatever ends the session on the room's node (a removed member, a
//!   slow reader, leadership moving away, shutdown) ends it here with the
//!   same status; if the room's node cannot be reached or dies, the client
//!   gets UNAVAILABLE naming it and joins again (with its last id), as it
//!   would after losing a direct session.
//! - A relayed stream carries the forwarded mark: a node that receives one
//!   for a room it does not serve answers with its redirect, which the
//!   relay follows before anything reached the client (at most
//!   [`HOPS_MAX`] times), so a stream never loops between nodes.

use std::time::Duration;

use saferchat_consensus::RoomId;
use saferchat_proto::chat::{self as pb, chat_room_client::ChatRoomClient, client_frame::Frame};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::metadata::{MetadataMap, MetadataValue};
use tonic::{Request, Status, Streaming};

use super::forward::{self, FORWARDED_METADATA, Forwarder};
use crate::error::NodeError;

pub use saferchat_proto::redirect::FOLLOWS_REDIRECTS_METADATA;
/// Frames queued in each direction before the relay stops reading.
pub const RELAY_FRAMES_MAX: usize = 8;
/// Redirects the relay follows while opening the stream (ownership moving
/// during the join), before the client is told.
pub const HOPS_MAX: usize = 2;
/// How long the room's node may take to send its first frame (the
/// challenge, or an error), counted from the join; it reads the room's
/// membership first, which may wait for a lease or an election.
pub const FIRST_FRAME_TIMEOUT: Duration = Duration::from_secs(15);
/// Largest frame accepted from the room's node: what a direct client
/// accepts.
const FRAME_BYTES_MAX: usize = 2 * saferchat_envelope::ENVELOPE_BYTES_MAX;

/// Frames towards the client.
pub type Out = mpsc::Sender<Result<pb::ServerFrame, Status>>;

/// How a relayed session ended.
#[derive(Debug)]
pub enum Ended {
    /// The client went away, or the room's node ended the stream cleanly.
    Quietly,
    /// The status for the client: the room's node's own, or UNAVAILABLE
    /// naming it when it could not be reached.
    Status(Status),
    /// The client sent a frame the relay refused to read.
    Client(NodeError),
}

/// Whether the client asked to be redirected rather than relayed.
pub fn follows_redirects(metadata: &MetadataMap) -> bool {
    metadata.contains_key(FOLLOWS_REDIRECTS_METADATA)
}

/// Relays the session whose first frame was `join` for `room` to the node
/// at `owner`, until either side ends it.
pub async fn run(
    forwarder: &Forwarder,
    room: &RoomId,
    mut owner: String,
    join: pb::Join,
    inbound: &mut super::session::ClientFrames,
    out: &Out,
) -> Ended {
    metrics::counter!("saferchat_sessions_relayed_total").increment(1);
    let mut hops = 0;
    let (to_owner, first, from_owner) = loop {
        match open(forwarder, room, &owner, join.clone()).await {
            Ok(opened) => break opened,
            Err(status) => match saferchat_proto::redirect::redirect_of(&status) {
                Some(next) if hops < HOPS_MAX && forward::reached(&status) => {
                    hops += 1;
                    owner = next;
                }
                _ => return Ended::Status(forwarder.failure(room, &owner, status)),
            },
        }
    };
    let relayed = metrics::gauge!("saferchat_sessions_relayed");
    relayed.increment(1.0);
    tracing::debug!(room = %room, %owner, "relaying a session to the room's node");
    let ended = copy_both_ways(
        forwarder, room, &owner, inbound, to_owner, first, from_owner, out,
    )
    .await;
    relayed.decrement(1.0);
    ended
}

/// Opens the stream, sends the join and waits for the first answer, so a
/// redirect or a refusal comes back as an error before anything reached
/// the client.
async fn open(
    forwarder: &Forwarder,
    room: &RoomId,
    owner: &str,
    join: pb::Join,
) -> Result<
    (
        mpsc::Sender<pb::ClientFrame>,
        pb::ServerFrame,
        Streaming<pb::ServerFrame>,
    ),
    Status,
> {
    let (to_owner, rx) = mpsc::channel(RELAY_FRAMES_MAX);
    to_owner
        .try_send(pb::ClientFrame {
            frame: Some(Frame::Join(join)),
        })
        .expect("an empty queue has room");
    let mut request = Request::new(ReceiverStream::new(rx));
    request
        .metadata_mut()
        .insert(FORWARDED_METADATA, MetadataValue::from_static("1"));
    let mut client =
        ChatRoomClient::new(forwarder.channel(owner)?).max_decoding_message_size(FRAME_BYTES_MAX);
    let timed_out = || {
        Status::unavailable(format!(
            "room {:?} is served by the node at {owner}, which did not answer the join within \
             {FIRST_FRAME_TIMEOUT:?}",
            room.as_str()
        ))
    };
    let first = tokio::time::timeout(FIRST_FRAME_TIMEOUT, async {
        let mut from_owner = client.post(request).await?.into_inner();
        match from_owner.message().await? {
            Some(frame) => Ok((frame, from_owner)),
            None => Err(Status::unavailable(format!(
                "room {:?} is served by the node at {owner}, which ended the session before \
                 answering the join",
                room.as_str()
            ))),
        }
    })
    .await
    .map_err(|_| timed_out())??;
    Ok((to_owner, first.0, first.1))
}

#[allow(clippy::too_many_arguments)]
async fn copy_both_ways(
    forwarder: &Forwarder,
    room: &RoomId,
    owner: &str,
    inbound: &mut super::session::ClientFrames,
    to_owner: mpsc::Sender<pb::ClientFrame>,
    first: pb::ServerFrame,
    mut from_owner: Streaming<pb::ServerFrame>,
    out: &Out,
) -> Ended {
    let upstream = async move {
        loop {
            match super::session::message(inbound).await {
                Ok(Some(frame)) => {
                    if to_owner.send(frame).await.is_err() {
                        // The room's node ended the stream; the other
                        // direction reports why.
                        return None;
                    }
                }
                // The client is done posting: the room's node sees its
                // half close too, and deliveries go on.
                Ok(None) => return None,
                Err(status) => return Some(status),
            }
        }
    };
    let downstream = async move {
        if out.send(Ok(first)).await.is_err() {
            return Ended::Quietly;
        }
        loop {
            match from_owner.message().await {
                Ok(Some(frame)) => {
                    if out.send(Ok(frame)).await.is_err() {
                        return Ended::Quietly;
                    }
                }
                Ok(None) => return Ended::Quietly,
                Err(status) if forward::reached(&status) => {
                    return Ended::Status(forward::passed_on(status));
                }
                Err(status) => return Ended::Status(forwarder.failure(room, owner, status)),
            }
        }
    };
    tokio::pin!(upstream);
    tokio::pin!(downstream);
    tokio::select! {
        ended = &mut downstream => ended,
        broken = &mut upstream => match broken {
            // The client stopped sending (or the room's node stopped
            // reading): keep delivering until the room's node ends.
            None => downstream.await,
            Some(status) => match super::session::inbound_error(&status) {
                super::session::End::Error(e) => Ended::Client(e),
                _ => Ended::Quietly,
            },
        },
    }
}
