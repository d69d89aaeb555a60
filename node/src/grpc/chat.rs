//! `server.grpc.chat.ChatRoom`: the member face.

use std::pin::Pin;
use std::sync::Arc;

use futures::Stream;
use saferchat_consensus::RoomId;
use saferchat_proto::chat::{self as pb, chat_room_server::ChatRoom};
use saferchat_proto::common as cpb;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use super::forward::{self, Forwarder};
use super::{frames, relay, session};
use crate::context::ChatContext;
use crate::convert;
use crate::error::NodeError;
use crate::message_id::MessageId;
use crate::storage::{self, Range};

/// Frames buffered towards one client before the session waits (a `Post`
/// stream's, or a browser's `Open` stream's).
pub(super) const OUT_FRAMES_MAX: usize = 8;
/// Messages a history call reads from the store at a time.
const HISTORY_CHUNK: usize = 32;
/// Pages a history call prepares ahead of its client. With the chunk this
/// bounds a call's memory to tens of envelopes, however many it returns
/// (a page of 1,000 envelopes of 512 KiB, loaded whole, was 500 MB).
const HISTORY_PAGES_AHEAD: usize = 2;
/// How long a node reading history from its own copy waits for that copy
/// to reach the asked `min_seq` before it forwards the call to the room's
/// owner instead. Longer than the replication lag under normal load
/// (tens of milliseconds at 50 ms between datacenters), short enough that
/// a copy which fell far behind costs a client little.
const LOCAL_READ_WAIT_MS: u64 = 1_000;

/// The chat service.
#[derive(Debug, Clone)]
pub struct ChatService {
    ctx: Arc<ChatContext>,
    /// History and relayed sessions for rooms other nodes serve go
    /// through this.
    forwarder: Arc<Forwarder>,
}

impl ChatService {
    /// Wraps the node context.
    pub fn new(ctx: Arc<ChatContext>) -> ChatService {
        ChatService {
            ctx,
            forwarder: Arc::new(Forwarder::new()),
        }
    }

    /// Whether this node's copy of `room` holds the message numbered
    /// `min_seq` (0: any copy will do), waiting up to
    /// [`LOCAL_READ_WAIT_MS`] for it to be applied here.
    async fn local_copy_reaches(&self, room: &RoomId, min_seq: u64) -> Result<bool, NodeError> {
        if min_seq == 0 {
            return Ok(true);
        }
        let Some(timeline) = self.ctx.routing.timeline() else {
            return Ok(false);
        };
        // Subscribe before reading the store, so that a post applied in
        // between is seen by one or the other.
        let mut applied = timeline.subscribe(room);
        let newest = storage::history(&*self.ctx.store, room, Range::Before(None), 1).await?;
        if newest.first().is_some_and(|m| m.seq >= min_seq) {
            return Ok(true);
        }
        let deadline =
            tokio::time::Instant::now() + std::time::Duration::from_millis(LOCAL_READ_WAIT_MS);
        loop {
            match tokio::time::timeout_at(deadline, applied.recv()).await {
                Ok(Some(post)) if post.seq >= min_seq => return Ok(true),
                Ok(Some(_)) => {}
                Ok(None) | Err(_) => return Ok(false),
            }
        }
    }

    /// Checks a session token for `room` and that its member still is one.
    async fn member(
        &self,
        chat: &str,
        token: &str,
    ) -> Result<
        (
            RoomId,
            saferchat_consensus::Handle,
            Arc<saferchat_consensus::RoomState>,
        ),
        NodeError,
    > {
        let room = RoomId::new(chat).map_err(|e| NodeError::InvalidArgument(e.to_string()))?;
        let user = self
            .ctx
            .sessions
            .verify(token, &room, self.ctx.clock.unix_ms())?;
        self.ctx.filter.check_room_may_exist(&room)?;
        let state = self.ctx.membership.read(&room).await?;
        if !state.created {
            return Err(NodeError::NotFound(format!("room {chat:?} does not exist")));
        }
        if !state.is_member(&user) {
            return Err(NodeError::PermissionDenied(format!(
                "you are no longer a member of room {chat:?}"
            )));
        }
        Ok((room, user, state))
    }
}

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

#[tonic::async_trait]
impl ChatRoom for ChatService {
    type PostStream = ReceiverStream<Result<pb::ServerFrame, Status>>;
    type HistoryStream = BoxStream<pb::HistoryPage>;

    async fn post(
        &self,
        request: Request<Streaming<pb::ClientFrame>>,
    ) -> Result<Response<Self::PostStream>, Status> {
        let slot = self.ctx.open_join()?;
        // Relay only for clients that cannot follow a redirect, and never
        // a stream another node relayed here.
        let relay = !forward::is_forwarded(request.metadata())
            && !relay::follows_redirects(request.metadata());
        let (out, rx) = mpsc::channel(OUT_FRAMES_MAX);
        tokio::spawn(session::run(
            Arc::clone(&self.ctx),
            slot,
            Box::pin(request.into_inner()),
            out,
            relay.then(|| Arc::clone(&self.forwarder)),
        ));
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn history(
        &self,
        request: Request<pb::HistoryRequest>,
    ) -> Result<Response<Self::HistoryStream>, Status> {
        let forwarded = forward::is_forwarded(request.metadata());
        let req = request.into_inner();
        let before = MessageId::from_optional(&req.before_id)
            .map_err(|e| Status::invalid_argument(format!("before_id: {e}")))?;
        let after = MessageId::from_optional(&req.after_id)
            .map_err(|e| Status::invalid_argument(format!("after_id: {e}")))?;
        let range = match (before, after) {
            (Some(_), Some(_)) => {
                return Err(Status::invalid_argument(
                    "set before_id or after_id, not both",
                ));
            }
            (_, Some(a)) => Range::After(Some(a)),
            (b, None) => Range::Before(b),
        };
        let max = self.ctx.config.limits.history_max;
        let limit = match req.limit {
            0 => 50,
            n if n > max => {
                return Err(Status::invalid_argument(format!(
                    "limit must be at most {max}"
                )));
            }
            n => n,
        } as usize;
        let (room, user, _) = self.member(&req.chat, &req.session).await?;
        let local = self.ctx.routing.reads_locally(&room).await
            && self.local_copy_reaches(&room, req.min_seq).await?;
        if local {
            metrics::counter!("saferchat_history_local_reads_total").increment(1);
        } else if let Err(redirect) = self.ctx.routing.route(&room).await {
            // Another node serves the room: ask it, once. A request that
            // was already forwarded gets the redirect (ownership moved
            // meanwhile), never a second hop.
            return match saferchat_proto::redirect::redirect_of(&redirect) {
                Some(owner) if !forwarded => self
                    .forwarder
                    .history(&room, &owner, req)
                    .await
                    .map(Response::new),
                _ => Err(redirect),
            };
        }
        if let Some(after) = after {
            session::refuse_lost_position(&*self.ctx.store, &room, after, req.after_seq).await?;
        }
        let store = Arc::clone(&self.ctx.store);
        let (pages, rx) = mpsc::channel(HISTORY_PAGES_AHEAD);
        tokio::spawn(async move {
            if let Err(e) = stream_history(&*store, &room, &user, range, limit, &pages).await {
                let _ = pages.send(Err(e.into())).await;
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn members(
        &self,
        request: Request<pb::MembersRequest>,
    ) -> Result<Response<cpb::Membership>, Status> {
        let req = request.into_inner();
        let (room, _, state) = self.member(&req.chat, &req.session).await?;
        Ok(Response::new(convert::membership_to_pb(
            room.as_str(),
            &state,
        )))
    }
}

/// Sends `limit` stored messages of `room` in `range`, sealed for `user`,
/// as history pages, reading [`HISTORY_CHUNK`] at a time and waiting for
/// the client to take pages (the channel holds [`HISTORY_PAGES_AHEAD`]).
/// Stops quietly when the client goes away.
async fn stream_history(
    store: &dyn storage::ChatStore,
    room: &RoomId,
    user: &saferchat_consensus::Handle,
    mut range: Range,
    limit: usize,
    pages: &mpsc::Sender<Result<pb::HistoryPage, Status>>,
) -> Result<(), NodeError> {
    let buckets = store.buckets(room).await?;
    let mut left = limit;
    while left > 0 {
        let wanted = left.min(HISTORY_CHUNK);
        let chunk = storage::history_in(store, room, &buckets, range, wanted).await?;
        let Some(last) = chunk.last() else {
            return Ok(());
        };
        range = match range {
            Range::Before(_) => Range::Before(Some(last.id)),
            Range::After(_) => Range::After(Some(last.id)),
        };
        left -= chunk.len();
        let items = chunk.iter().filter_map(|m| frames::seal_stored(m, user));
        for items in frames::pack(items) {
            if pages.send(Ok(pb::HistoryPage { items })).await.is_err() {
                return Ok(());
            }
        }
        if chunk.len() < wanted {
            return Ok(());
        }
    }
    Ok(())
}
