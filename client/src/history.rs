//! Reading stored messages with the History call.

use bytes::Bytes;
use saferchat_proto::chat::{self as pb, chat_room_client::ChatRoomClient};
use tonic::transport::Channel;

use crate::connect::{REDIRECTS_MAX, connect, redirect_of, redirected};
use crate::crypto;
use crate::error::ClientError;
use crate::session::{Message, Session};

/// Which messages to read.
#[derive(Clone, Debug, Default)]
pub struct Query {
    /// Newest first, before this id.
    pub before_id: Option<Bytes>,
    /// Oldest first, after this id.
    pub after_id: Option<Bytes>,
    /// The sequence number of the message `after_id` names, when this
    /// client was sent it (0: `after_id` is only a bound): the node then
    /// refuses, with FAILED_PRECONDITION, to read on after a message the
    /// room no longer holds (cut after a home failover).
    pub after_seq: u64,
    /// At most this many (0: the server's default).
    pub limit: u32,
}

/// Reads stored messages of the session's room, verified and decrypted,
/// in the order the server sends them, through the node the session was
/// opened on ([`Session::dialed`], before any redirect); when that node
/// cannot be reached or answers UNAVAILABLE, through the session's own
/// node (the room's owner when the session was opened).
///
/// The node answers from its own copy when it keeps one outside the
/// room's home datacenter, else forwards the call to the room's owner; a
/// node that answers with a redirect instead (an older node, or the room
/// moved) is followed, up to [`REDIRECTS_MAX`] times. Either way the
/// answer holds every message up to the highest sequence number the
/// session has seen ([`Session::seen_seq`]): read your writes.
///
/// # Errors
/// The server's status, e.g. UNAUTHENTICATED for an expired token.
pub async fn read(session: &Session, query: &Query) -> Result<Vec<Message>, ClientError> {
    if session.dialed() != session.address()
        && let Ok(channel) = session.dialed_channel().await
    {
        match read_following(channel, session.dialed(), session, query).await {
            Err(ClientError::Status(s)) if s.code() == tonic::Code::Unavailable => {}
            Err(ClientError::Connect { .. }) => {}
            other => return other,
        }
    }
    read_following(session.channel(), session.address(), session, query).await
}

/// As [`read`], through the node at `address` (any node of the cluster)
/// rather than the session's.
///
/// # Errors
/// As [`read`], or a connection failure.
pub async fn read_via(
    address: &str,
    session: &Session,
    query: &Query,
) -> Result<Vec<Message>, ClientError> {
    read_following(connect(address).await?, address, session, query).await
}

async fn read_following(
    mut channel: Channel,
    address: &str,
    session: &Session,
    query: &Query,
) -> Result<Vec<Message>, ClientError> {
    let mut address = address.to_owned();
    for _ in 0..=REDIRECTS_MAX {
        match read_on(channel, session, query).await {
            Err(ClientError::Status(status)) => match redirect_of(&status) {
                Some(next) => {
                    address = redirected(&address, &next);
                    channel = connect(&address).await?;
                }
                None => return Err(ClientError::Status(status)),
            },
            other => return other,
        }
    }
    Err(ClientError::Protocol("too many redirects".into()))
}

/// One History call over `channel`. Only the call's answer can be a
/// redirect: a status after pages arrived is an error, never followed
/// (following it would read those pages again).
async fn read_on(
    channel: Channel,
    session: &Session,
    query: &Query,
) -> Result<Vec<Message>, ClientError> {
    let mut client = ChatRoomClient::new(channel).max_decoding_message_size(64 * 1024 * 1024);
    let request = pb::HistoryRequest {
        chat: session.room().to_string(),
        session: session.token().to_owned(),
        before_id: query.before_id.clone().unwrap_or_default(),
        after_id: query.after_id.clone().unwrap_or_default(),
        limit: query.limit,
        min_seq: session.seen_seq(),
        after_seq: query.after_seq,
    };
    let mut pages = client.history(request).await?.into_inner();
    let mut out = Vec::new();
    while let Some(page) = pages.message().await.map_err(not_a_redirect)? {
        for item in page.items {
            let content = crypto::open(session.identity(), session.room(), item.sealed, |h| {
                session.key_of(h)
            });
            out.push(Message {
                id: item.id,
                time_ms: item.time_ms,
                seq: item.seq,
                history: true,
                content,
                warnings: Vec::new(),
            });
        }
    }
    Ok(out)
}

/// A status that ends a stream midway, with any redirect metadata
/// dropped so that it is reported, not followed.
fn not_a_redirect(status: tonic::Status) -> ClientError {
    ClientError::Status(tonic::Status::new(status.code(), status.message()))
}
