//! Reading stored messages with the History call.

use bytes::Bytes;
use saferchat_proto::chat::{self as pb, chat_room_client::ChatRoomClient};

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
    /// At most this many (0: the server's default).
    pub limit: u32,
}

/// Reads stored messages of the session's room, verified and decrypted,
/// in the order the server sends them.
///
/// # Errors
/// The server's status, e.g. UNAUTHENTICATED for an expired token.
pub async fn read(session: &Session, query: &Query) -> Result<Vec<Message>, ClientError> {
    let mut client =
        ChatRoomClient::new(session.channel()).max_decoding_message_size(64 * 1024 * 1024);
    let request = pb::HistoryRequest {
        chat: session.room().to_string(),
        session: session.token().to_owned(),
        before_id: query.before_id.clone().unwrap_or_default(),
        after_id: query.after_id.clone().unwrap_or_default(),
        limit: query.limit,
    };
    let mut pages = client.history(request).await?.into_inner();
    let mut out = Vec::new();
    while let Some(page) = pages.message().await? {
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
            });
        }
    }
    Ok(out)
}
