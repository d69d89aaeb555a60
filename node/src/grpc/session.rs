//! One `Post` stream: join handshake, history, then live traffic both ways.
//!
//! ```text
//! client                         node
//!   Join{chat,user}      ──▶   member? (linearizable read)
//!                        ◀──   Challenge{nonce}
//!   Proof{key,sig}       ──▶   key hashes to handle? signature? register key
//!                        ◀──   Joined{revision, session token}  (members: Members call)
//!                        ◀──   Deliveries{history}   (stored up to the attach point)
//!   Post{seq,envelope}   ──▶   room actor: check, id, store, then…
//!                        ◀──   PostResult{seq, accepted|rejected}
//!                        ◀──   Deliveries{live}      (everyone's posts, own included)
//! ```
//!
//! The session forwards what its room sends from a bounded queue. A client
//! that reads too slowly fills that queue; the room then closes the session
//! with RESOURCE_EXHAUSTED instead of waiting for it, and the client resumes
//! from its last id. Nothing is lost: every acknowledged post is stored.

use std::sync::Arc;
use std::time::Duration;

use futures::{Stream, StreamExt as _};
use saferchat_consensus::{Change, Handle, RoomId, RoomState};
use saferchat_envelope::Envelope;
use saferchat_proto::chat::{self as pb, client_frame::Frame, server_frame};
use tokio::sync::{mpsc, oneshot};
use tonic::Status;

use crate::auth;
use crate::context::{ChatContext, JoinSlot};
use crate::convert;
use crate::error::{NodeError, shown};
use crate::grpc::forward::Forwarder;
use crate::grpc::{frames, relay};
use crate::message_id::MessageId;
use crate::room::{Live, PostOutcome, Posted, RoomCommand};
use crate::storage::{self, Range, StoredMessage};
use crate::timeline::Durability;

/// Stored messages per frame when replaying history.
const HISTORY_PAGE_MAX: usize = 100;

/// Frames towards the client (the relay writes the same kind).
use relay::Out;

/// What a session reads from its client: the inbound half of a `Post`
/// stream, or the frames a browser sends into its link (`web.rs`). One
/// session code path serves both, so both get the same checks.
pub type ClientFrames =
    std::pin::Pin<Box<dyn Stream<Item = Result<pb::ClientFrame, Status>> + Send>>;

/// The client's next frame; `Ok(None)` once it closed its side. Cancel
/// safe (a `select!` may drop it).
pub(super) async fn message(inbound: &mut ClientFrames) -> Result<Option<pb::ClientFrame>, Status> {
    inbound.next().await.transpose()
}

fn frame(f: server_frame::Frame) -> pb::ServerFrame {
    pb::ServerFrame { frame: Some(f) }
}

async fn send(out: &Out, f: server_frame::Frame) -> Result<(), Gone> {
    out.send(Ok(frame(f))).await.map_err(|_| Gone)
}

/// The client went away; nothing more to say to it.
#[derive(Debug)]
struct Gone;

pub(super) enum End {
    Gone,
    Error(NodeError),
    /// A status to pass on as it is: a redirect naming the node that
    /// serves the room, or what that node said to a relayed session.
    Redirect(Status),
}

impl From<Gone> for End {
    fn from(_: Gone) -> End {
        End::Gone
    }
}

impl From<NodeError> for End {
    fn from(e: NodeError) -> End {
        End::Error(e)
    }
}

/// Serves one `Post` stream until either side ends it. With `relay`, a
/// session for a room another node serves is relayed there; without, the
/// client is redirected (it follows redirects, or it was relayed here
/// already).
pub async fn run(
    ctx: Arc<ChatContext>,
    join: JoinSlot,
    mut inbound: ClientFrames,
    out: Out,
    relay: Option<Arc<Forwarder>>,
) {
    let end = tokio::select! {
        end = serve(&ctx, join, &mut inbound, &out, relay.as_deref()) => end,
        // The client is gone (its stream reset or its connection closed):
        // end the session now, not at the next delivery, so its slots
        // come back at once.
        () = out.closed() => Err(End::Gone),
        () = ctx.shutdown.cancelled() => Err(End::Error(NodeError::Unavailable("node is shutting down".into()))),
    };
    match end {
        Err(End::Error(e)) => {
            let _ = out.send(Err(e.into())).await;
        }
        Err(End::Redirect(status)) => {
            let _ = out.send(Err(status)).await;
        }
        _ => {}
    }
}

async fn next_frame(inbound: &mut ClientFrames, timeout_ms: u64) -> Result<Frame, End> {
    let next = tokio::time::timeout(Duration::from_millis(timeout_ms), message(inbound))
        .await
        .map_err(|_| {
            NodeError::InvalidArgument(format!("no answer within {timeout_ms} ms; join again"))
        })?;
    match next {
        Ok(Some(pb::ClientFrame { frame: Some(f) })) => Ok(f),
        Ok(Some(pb::ClientFrame { frame: None })) => {
            Err(NodeError::InvalidArgument("empty client frame".into()).into())
        }
        Ok(None) => Err(End::Gone),
        Err(status) => Err(inbound_error(&status)),
    }
}

/// What a broken client stream means: a frame we refused to decode (too
/// large, malformed) is the client's error and it is told so; anything else
/// means the client is gone.
pub(super) fn inbound_error(status: &Status) -> End {
    match status.code() {
        tonic::Code::OutOfRange | tonic::Code::ResourceExhausted => {
            End::Error(NodeError::ResourceExhausted(format!(
                "frame refused: {} (the limit is {} bytes)",
                status.message(),
                crate::grpc::GRPC_MESSAGE_BYTES_MAX
            )))
        }
        tonic::Code::Internal | tonic::Code::InvalidArgument => End::Error(
            NodeError::InvalidArgument(format!("frame refused: {}", status.message())),
        ),
        _ => End::Gone,
    }
}

fn invalid(e: impl std::fmt::Display) -> NodeError {
    NodeError::InvalidArgument(e.to_string())
}

async fn serve(
    ctx: &Arc<ChatContext>,
    join_slot: JoinSlot,
    inbound: &mut ClientFrames,
    out: &Out,
    relay: Option<&Forwarder>,
) -> Result<(), End> {
    let limits = ctx.config.limits;
    let Frame::Join(join) = next_frame(inbound, limits.join_timeout_ms).await? else {
        return Err(
            NodeError::InvalidArgument("the first frame of a session must be join".into()).into(),
        );
    };
    let room = RoomId::new(&join.chat).map_err(invalid)?;
    let user: Handle = join.user.parse().map_err(invalid)?;
    let after = MessageId::from_optional(&join.after_id).map_err(invalid)?;
    // A room's sessions all live on the node that serves it: one order of
    // posts, one timeline, and every post reaches every session. Clients
    // elsewhere are redirected there, or relayed.
    if let Err(redirect) = ctx.routing.route(&room).await {
        let owner = saferchat_proto::redirect::redirect_of(&redirect);
        return match (relay, owner) {
            (Some(forwarder), Some(owner)) => {
                // A relayed stream counts as a session here for as long as
                // it lasts; the node it is relayed to checks the proof (and
                // ends the stream if none comes in time).
                let _session = join_slot.into_relayed_session()?;
                match relay::run(forwarder, &room, owner, join, inbound, out).await {
                    relay::Ended::Quietly => Ok(()),
                    relay::Ended::Status(status) => Err(End::Redirect(status)),
                    relay::Ended::Client(e) => Err(End::Error(e)),
                }
            }
            _ => Err(End::Redirect(redirect)),
        };
    }
    // Whether the room exists and has this member is told only to the
    // owner of the member's key, after the proof: anyone else gets the
    // same challenge and the same answer for a missing room, a room
    // without that member and a bad proof, so nobody can probe who is in
    // which room.
    let member = if ctx.filter.check_room_may_exist(&room).is_ok() {
        let state = ctx.membership.read(&room).await?;
        (state.created && state.is_member(&user)).then_some(state)
    } else {
        None
    };

    let nonce: [u8; saferchat_envelope::challenge::NONCE_BYTES] = rand::random();
    send(
        out,
        server_frame::Frame::Challenge(pb::Challenge {
            nonce: bytes::Bytes::copy_from_slice(&nonce),
        }),
    )
    .await?;
    let Frame::Proof(proof) = next_frame(inbound, limits.join_timeout_ms).await? else {
        return Err(NodeError::InvalidArgument(
            "expected a proof frame after the challenge".into(),
        )
        .into());
    };
    let key = auth::verify_join(&room, &user, &nonce, &proof.public_key, &proof.signature)?;
    let Some(state) = member else {
        return Err(not_a_member(&room).into());
    };
    let session_slot = join_slot.into_session(user)?;
    let session = session_slot.id;
    let state = register(ctx, &room, &user, key, state).await?;

    let (live, mut live_rx) = mpsc::channel(limits.session_queue_max);
    let (reply, attached) = oneshot::channel();
    ctx.rooms
        .send(
            &room,
            RoomCommand::Attach {
                session,
                user,
                live,
                reply,
            },
        )
        .await?;
    let (last, last_seq) = attached
        .await
        .map_err(|_| NodeError::Unavailable("room stopped while joining".into()))??;
    tracing::debug!(room = %room, %user, session, "joined");

    let result = async {
        if let Some(after) = after {
            refuse_lost_position(&*ctx.store, &room, after, join.after_seq).await?;
        }
        let expires =
            ctx.clock.unix_ms() + i64::try_from(limits.session_token_ms).unwrap_or(i64::MAX);
        send(
            out,
            server_frame::Frame::Joined(pb::Joined {
                revision: state.revision.0,
                session: ctx.sessions.issue(&room, &user, expires),
                session_expires_ms: expires,
                last_seq,
            }),
        )
        .await?;
        if !join.no_history {
            let recent = match join.recent {
                0 => limits.history_on_join,
                n => n.min(limits.history_max),
            } as usize;
            replay(ctx, out, &room, &user, after, recent, last).await?;
        }
        live_loop(ctx, session, inbound, out, &room, &user, &mut live_rx).await
    }
    .await;
    let _ = ctx.rooms.send(&room, RoomCommand::Detach { session }).await;
    result
}

/// Refuses to read on after `after` when the room no longer holds it
/// ([`storage::lost_position`]): the client would otherwise be sent what
/// follows it in id order, and never what the room's new home placed
/// from its number on.
pub(super) async fn refuse_lost_position(
    store: &dyn storage::ChatStore,
    room: &RoomId,
    after: MessageId,
    after_seq: u64,
) -> Result<(), NodeError> {
    if storage::lost_position(store, room, after, after_seq).await? {
        metrics::counter!("saferchat_lost_positions_refused_total").increment(1);
        return Err(NodeError::FailedPrecondition(format!(
            "message {after} (#{after_seq}) is not in room {}, which gave its number to another message: it was cut when the room's home datacenter failed over (a post the old home acknowledged that the new home never had), or it is not of this room; read the room again without after_id (recent history, or History from the start) and compare sequence numbers",
            shown(room.as_str())
        )));
    }
    Ok(())
}

/// The one answer to a proven join of a room that does not exist or does
/// not have the user as a member.
fn not_a_member(room: &RoomId) -> NodeError {
    NodeError::PermissionDenied(format!(
        "room {} does not exist or you are not a member of it",
        shown(room.as_str())
    ))
}

/// Registers the member's key on first join (a membership change through
/// consensus), or checks it against the registered one.
async fn register(
    ctx: &ChatContext,
    room: &RoomId,
    user: &Handle,
    key: saferchat_consensus::PublicKey,
    state: Arc<RoomState>,
) -> Result<Arc<RoomState>, NodeError> {
    match state.members.get(user) {
        Some(Some(registered)) if *registered == key => Ok(state),
        Some(Some(_)) => Err(NodeError::FailedPrecondition(
            "a different public key is registered for this user in this room".into(),
        )),
        _ => match ctx
            .membership
            .change(room, Change::RegisterKey(*user, key), None)
            .await
        {
            Ok((_, state)) => Ok(state),
            Err(NodeError::NotFound(_)) => Err(not_a_member(room)),
            Err(e) => Err(e),
        },
    }
}

/// Sends stored messages up to `last` (the attach point; later ones come
/// live): everything after `after` when resuming, else the `recent` newest.
async fn replay(
    ctx: &ChatContext,
    out: &Out,
    room: &RoomId,
    user: &Handle,
    after: Option<MessageId>,
    recent: usize,
    last: Option<MessageId>,
) -> Result<(), End> {
    let Some(last) = last else { return Ok(()) };
    let mut pending: Vec<StoredMessage> = Vec::new();
    if let Some(mut cursor) = after {
        // Resume: everything between the client's last id and the attach
        // point, page by page, however much that is.
        loop {
            let page = storage::history(
                &*ctx.store,
                room,
                Range::After(Some(cursor)),
                HISTORY_PAGE_MAX,
            )
            .await?;
            let Some(tail) = page.last() else { break };
            cursor = tail.id;
            let done = page.len() < HISTORY_PAGE_MAX || cursor >= last;
            let items = page
                .iter()
                .filter(|m| m.id <= last)
                .filter_map(|m| frames::seal_stored(m, user));
            send_deliveries(out, items, true).await?;
            if done {
                break;
            }
        }
        return Ok(());
    }
    let mut cursor = None;
    while pending.len() < recent {
        let page = storage::history(
            &*ctx.store,
            room,
            Range::Before(cursor),
            recent - pending.len(),
        )
        .await?;
        let Some(tail) = page.last() else { break };
        cursor = Some(tail.id);
        pending.extend(page.into_iter().filter(|m| m.id <= last));
    }
    pending.reverse(); // oldest first, like live traffic
    send_deliveries(
        out,
        pending.iter().filter_map(|m| frames::seal_stored(m, user)),
        true,
    )
    .await?;
    Ok(())
}

/// Sends deliveries as frames bounded in count and bytes.
async fn send_deliveries(
    out: &Out,
    items: impl IntoIterator<Item = pb::Delivery>,
    history: bool,
) -> Result<(), Gone> {
    for items in frames::pack(items) {
        send(
            out,
            server_frame::Frame::Deliveries(pb::Deliveries { items, history }),
        )
        .await?;
    }
    Ok(())
}

fn delivery(posted: &Posted, user: &Handle) -> Option<pb::Delivery> {
    Some(pb::Delivery {
        id: bytes::Bytes::copy_from_slice(&posted.id.to_bytes()),
        time_ms: posted.id.time_ms(),
        sealed: posted.fanout.sealed_for_recipient(user)?,
        seq: posted.seq,
    })
}

fn result_frame(outcome: PostOutcome, room: &RoomId) -> server_frame::Frame {
    let result = match outcome {
        PostOutcome::Accepted {
            client_seq,
            id,
            seq,
        } => pb::PostResult {
            client_seq,
            outcome: Some(pb::post_result::Outcome::Accepted(pb::Accepted {
                id: bytes::Bytes::copy_from_slice(&id.to_bytes()),
                time_ms: id.time_ms(),
                seq,
            })),
        },
        PostOutcome::Rejected {
            client_seq,
            error,
            state,
        } => {
            let status = Status::from(error);
            pb::PostResult {
                client_seq,
                outcome: Some(pb::post_result::Outcome::Rejected(pb::Rejected {
                    code: status.code() as i32,
                    message: status.message().to_owned(),
                    membership: state.map(|s| convert::membership_to_pb(room.as_str(), &s)),
                })),
            }
        }
    };
    server_frame::Frame::Result(result)
}

#[allow(clippy::too_many_arguments)]
async fn live_loop(
    ctx: &ChatContext,
    session: u64,
    inbound: &mut ClientFrames,
    out: &Out,
    room: &RoomId,
    user: &Handle,
    live: &mut mpsc::Receiver<Live>,
) -> Result<(), End> {
    let mut inbound_open = true;
    loop {
        tokio::select! {
            next = message(inbound), if inbound_open => match next {
                Ok(Some(pb::ClientFrame { frame: Some(Frame::Post(post)) })) => {
                    if let Err(error) = ctx.post_rate.check(user) {
                        let rejected = PostOutcome::Rejected {
                            client_seq: post.client_seq,
                            error,
                            state: None,
                        };
                        send(out, result_frame(rejected, room)).await?;
                        continue;
                    }
                    let durability = match pb::Durability::try_from(post.durability) {
                        Ok(pb::Durability::Local) => Durability::Local,
                        Ok(pb::Durability::CrossDatacenter) => Durability::CrossDatacenter,
                        Err(_) => {
                            let rejected = PostOutcome::Rejected {
                                client_seq: post.client_seq,
                                error: NodeError::InvalidArgument(format!(
                                    "unknown durability level {} (0: local, 1: cross-datacenter)",
                                    post.durability
                                )),
                                state: None,
                            };
                            send(out, result_frame(rejected, room)).await?;
                            continue;
                        }
                    };
                    match Envelope::decode(post.envelope.clone()) {
                        Ok(envelope) => {
                            ctx.rooms.send(room, RoomCommand::Post {
                                session,
                                user: *user,
                                client_seq: post.client_seq,
                                envelope,
                                raw: post.envelope,
                                durability,
                            }).await?;
                        }
                        Err(e) => {
                            metrics::counter!("saferchat_posts_rejected_total").increment(1);
                            let rejected = PostOutcome::Rejected {
                                client_seq: post.client_seq,
                                error: NodeError::InvalidArgument(format!("not a valid envelope: {e}")),
                                state: None,
                            };
                            send(out, result_frame(rejected, room)).await?;
                        }
                    }
                }
                Ok(Some(_)) => {
                    return Err(NodeError::InvalidArgument("after joining, a session only sends post frames".into()).into());
                }
                // The client is done posting; keep delivering until it
                // drops the stream.
                Ok(None) => inbound_open = false,
                Err(status) => {
                    tracing::debug!(%room, session, code = ?status.code(), "client stream ended");
                    return Err(inbound_error(&status));
                }
            },
            item = live.recv() => {
                let Some(item) = item else {
                    return Err(NodeError::Unavailable("room stopped; join again".into()).into());
                };
                let mut items = vec![item];
                while items.len() < frames::FRAME_ITEMS_MAX {
                    match live.try_recv() {
                        Ok(more) => items.push(more),
                        Err(_) => break,
                    }
                }
                let mut batch = Vec::new();
                for item in items {
                    match item {
                        Live::Deliver(posted) => batch.extend(delivery(&posted, user)),
                        other => {
                            send_deliveries(out, batch.drain(..), false).await?;
                            match other {
                                Live::Result(outcome) => send(out, result_frame(outcome, room)).await?,
                                Live::Membership(state) => {
                                    send(out, server_frame::Frame::MembershipChanged(pb::MembershipChanged { revision: state.revision.0 })).await?;
                                }
                                Live::Close(e) => return Err(e.into()),
                                Live::Deliver(_) => unreachable!("handled above"),
                            }
                        }
                    }
                }
                send_deliveries(out, batch, false).await?;
            }
        }
    }
}
