//! Forwarding `History` to the node that serves the room, and the channels
//! to other nodes' client ports that forwarding and relaying share.
//!
//! A node that does not serve a room answers its chat calls with
//! UNAVAILABLE and `saferchat-redirect` metadata naming the node that does
//! (`placement.rs::serve_here`). The client library follows that, but
//! clients that cannot follow redirects — grpcurl, a one-off script, any
//! generated stub — would see an error for a read that any node can
//! satisfy by asking the owner. So `History`, a single request whose
//! answer is a few pages, is forwarded: the node sends the same request
//! (the caller's session token is valid on every node, which share the
//! session secret) to the owner's client port and streams the owner's
//! pages back unchanged. The live `Post` stream is relayed the same way
//! for clients that do not follow redirects ([`super::relay`]).
//!
//! Bounds: connecting and each answer (the first response, then every
//! page) have a timeout, and a request is forwarded at most once. A
//! forwarded request carries [`FORWARDED_METADATA`]; a node that receives
//! one and does not serve the room either (ownership moved meanwhile)
//! answers with its redirect status instead of forwarding again, so no
//! request ever loops between nodes.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::Mutex;
use std::time::Duration;

use futures::Stream;
use saferchat_consensus::RoomId;
use saferchat_proto::chat::{self as pb, chat_room_client::ChatRoomClient};
use tonic::metadata::{MetadataMap, MetadataValue};
use tonic::transport::{Channel, Endpoint};
use tonic::{Request, Status, Streaming};

use super::GRPC_MESSAGE_BYTES_MAX;
use super::frames::FRAME_BYTES_MAX;
use crate::placement::REDIRECT_METADATA;

/// Request metadata marking a request one node forwarded to another.
pub const FORWARDED_METADATA: &str = "saferchat-forwarded";
/// How long connecting to the owner may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// How long the owner may take to answer, and then to send each page (a
/// page is read from storage before the answer starts: up to 1000
/// messages).
pub const ANSWER_TIMEOUT: Duration = Duration::from_secs(10);
/// Channels kept; the addresses are the configured nodes', so this is
/// only a backstop.
const CHANNELS_MAX: usize = 64;
/// Largest page accepted from the owner: a frame's budget plus the one
/// item that may exceed it.
const PAGE_BYTES_MAX: usize = FRAME_BYTES_MAX + GRPC_MESSAGE_BYTES_MAX;

/// A stream of pages towards the caller.
pub type Pages = Pin<Box<dyn Stream<Item = Result<pb::HistoryPage, Status>> + Send>>;

/// Whether a request was already forwarded by another node.
pub fn is_forwarded(metadata: &MetadataMap) -> bool {
    metadata.contains_key(FORWARDED_METADATA)
}

/// Channels to other nodes' client ports, one per address (a tonic
/// channel multiplexes every call on one connection and reconnects by
/// itself).
#[derive(Debug, Default)]
pub struct Forwarder {
    channels: Mutex<HashMap<String, Channel>>,
}

impl Forwarder {
    /// No channels yet; they are opened on first use.
    pub fn new() -> Forwarder {
        Forwarder::default()
    }

    pub(super) fn channel(&self, address: &str) -> Result<Channel, Status> {
        let mut channels = self.channels.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(channel) = channels.get(address) {
            return Ok(channel.clone());
        }
        let channel = Endpoint::from_shared(format!("http://{address}"))
            .map_err(|e| {
                Status::internal(format!(
                    "the redirect names {address:?}, not an address: {e}"
                ))
            })?
            .connect_timeout(CONNECT_TIMEOUT)
            .timeout(ANSWER_TIMEOUT)
            .tcp_nodelay(true)
            .connect_lazy();
        if channels.len() >= CHANNELS_MAX {
            channels.clear();
        }
        channels.insert(address.to_owned(), channel.clone());
        Ok(channel)
    }

    fn forget(&self, address: &str) {
        self.channels
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(address);
    }

    /// Sends `request` for `room` to the node at `owner` and streams its
    /// pages back.
    ///
    /// # Errors
    /// The owner's status (code, message and any redirect of its own), or
    /// UNAVAILABLE naming `owner` when it cannot be reached or does not
    /// answer in time.
    pub async fn history(
        &self,
        room: &RoomId,
        owner: &str,
        request: pb::HistoryRequest,
    ) -> Result<Pages, Status> {
        metrics::counter!("saferchat_history_forwarded_total").increment(1);
        tracing::debug!(room = %room, %owner, "forwarding history to the room's node");
        let mut client =
            ChatRoomClient::new(self.channel(owner)?).max_decoding_message_size(PAGE_BYTES_MAX);
        let mut request = Request::new(request);
        request
            .metadata_mut()
            .insert(FORWARDED_METADATA, MetadataValue::from_static("1"));
        let pages = match client.history(request).await {
            Ok(response) => response.into_inner(),
            Err(status) => return Err(self.failure(room, owner, status)),
        };
        Ok(Box::pin(relay(room.clone(), owner.to_owned(), pages)))
    }

    /// What the caller gets for a failed forward: the owner's own status,
    /// or UNAVAILABLE naming the owner when it was never reached.
    pub(super) fn failure(&self, room: &RoomId, owner: &str, status: Status) -> Status {
        if reached(&status) {
            return passed_on(status);
        }
        self.forget(owner);
        tracing::warn!(room = %room, %owner, error = %status.message(), "could not forward history");
        unreachable_owner(room, owner, &status)
    }
}

/// Whether a status came from the owner (decoded from its answer) rather
/// than from this side of the connection: the transport's own errors
/// (connecting, a timeout, a broken connection) carry their cause.
pub(super) fn reached(status: &Status) -> bool {
    std::error::Error::source(status).is_none()
}

/// The owner's status for the caller: its code and message, and its
/// redirect if it has one (the room moved on), but none of its other
/// response headers.
pub(super) fn passed_on(status: Status) -> Status {
    let mut out = Status::new(status.code(), status.message());
    if let Some(redirect) = status.metadata().get(REDIRECT_METADATA) {
        out.metadata_mut()
            .insert(REDIRECT_METADATA, redirect.clone());
    }
    out
}

fn unreachable_owner(room: &RoomId, owner: &str, cause: &Status) -> Status {
    Status::unavailable(format!(
        "room {:?} is served by the node at {owner}, which this node could not reach to \
         forward the request: {}",
        room.as_str(),
        cause.message()
    ))
}

/// The owner's pages as they come, each within [`ANSWER_TIMEOUT`]; the
/// first error ends the stream.
fn relay(
    room: RoomId,
    owner: String,
    pages: Streaming<pb::HistoryPage>,
) -> impl Stream<Item = Result<pb::HistoryPage, Status>> + Send {
    futures::stream::unfold(Some(pages), move |state| {
        let room = room.clone();
        let owner = owner.clone();
        async move {
            let mut pages = state?;
            match tokio::time::timeout(ANSWER_TIMEOUT, pages.message()).await {
                Ok(Ok(Some(page))) => Some((Ok(page), Some(pages))),
                Ok(Ok(None)) => None,
                Ok(Err(status)) if reached(&status) => Some((Err(passed_on(status)), None)),
                Ok(Err(status)) => Some((Err(unreachable_owner(&room, &owner, &status)), None)),
                Err(_) => Some((
                    Err(Status::unavailable(format!(
                        "room {:?} is served by the node at {owner}, which sent no page of \
                         history within {ANSWER_TIMEOUT:?}",
                        room.as_str()
                    ))),
                    None,
                )),
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use saferchat_proto::redirect::redirect_of;

    use super::*;

    fn redirect(to: &str) -> Status {
        let mut s = Status::unavailable("served elsewhere");
        s.metadata_mut()
            .insert(REDIRECT_METADATA, to.parse().unwrap());
        s
    }

    #[test]
    fn only_unavailable_with_the_metadata_is_a_redirect() {
        assert_eq!(
            redirect_of(&redirect("127.0.0.1:8102")).as_deref(),
            Some("127.0.0.1:8102")
        );
        assert_eq!(redirect_of(&Status::unavailable("down")), None);
        let mut other = Status::not_found("no room");
        other
            .metadata_mut()
            .insert(REDIRECT_METADATA, "127.0.0.1:8102".parse().unwrap());
        assert_eq!(redirect_of(&other), None);
    }

    #[test]
    fn the_mark_is_recognised() {
        let mut request = Request::new(());
        assert!(!is_forwarded(request.metadata()));
        request
            .metadata_mut()
            .insert(FORWARDED_METADATA, MetadataValue::from_static("1"));
        assert!(is_forwarded(request.metadata()));
    }

    #[test]
    fn the_owners_status_passes_with_its_redirect_and_nothing_else() {
        let mut owner = redirect("127.0.0.1:8103");
        owner
            .metadata_mut()
            .insert("content-type", "application/grpc".parse().unwrap());
        let out = passed_on(owner);
        assert_eq!(out.code(), tonic::Code::Unavailable);
        assert_eq!(out.message(), "served elsewhere");
        assert_eq!(redirect_of(&out).as_deref(), Some("127.0.0.1:8103"));
        assert!(out.metadata().get("content-type").is_none());

        let denied = passed_on(Status::permission_denied("not a member"));
        assert_eq!(denied.code(), tonic::Code::PermissionDenied);
        assert_eq!(denied.message(), "not a member");
    }

    #[tokio::test]
    async fn an_owner_nobody_answers_for_is_unavailable_naming_it() {
        // A port that was free a moment ago: nothing listens there.
        let address = {
            let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            listener.local_addr().unwrap().to_string()
        };
        let forwarder = Forwarder::new();
        let room = RoomId::new("team").unwrap();
        let request = pb::HistoryRequest {
            chat: "team".into(),
            session: "secret-token".into(),
            ..pb::HistoryRequest::default()
        };
        let Err(status) = forwarder.history(&room, &address, request).await else {
            panic!("nothing listens there");
        };
        assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
        assert!(status.message().contains(&address), "{status:?}");
        assert!(redirect_of(&status).is_none());
        assert!(!status.message().contains("secret-token"));
        // The broken channel is not kept.
        assert!(forwarder.channels.lock().unwrap().is_empty());
    }
}
