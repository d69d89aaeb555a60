//! The node's one error type, split the way callers must react: a request
//! failed (map it to a gRPC status and keep serving) or the node must stop
//! ([`NodeError::Fatal`]).

use tonic::{Code, Status};

/// Everything that can go wrong in the node.
#[derive(Clone, Debug, thiserror::Error)]
pub enum NodeError {
    /// The request is malformed; retrying it unchanged cannot succeed.
    #[error("{0}")]
    InvalidArgument(String),
    /// The room or member does not exist.
    #[error("{0}")]
    NotFound(String),
    /// The room already exists.
    #[error("{0}")]
    AlreadyExists(String),
    /// No (valid) credentials.
    #[error("{0}")]
    Unauthenticated(String),
    /// Valid credentials, but not allowed (e.g. not a member).
    #[error("{0}")]
    PermissionDenied(String),
    /// The request is valid but the state moved on (stale revision, key
    /// conflict); the message says what to do.
    #[error("{0}")]
    FailedPrecondition(String),
    /// A limit was reached (queue full, too many sessions, too slow a
    /// reader).
    #[error("{0}")]
    ResourceExhausted(String),
    /// A dependency (storage, a quorum of peers) is not answering; retry
    /// later. Nothing was acknowledged.
    #[error("{0}")]
    Unavailable(String),
    /// The configuration is invalid.
    #[error("configuration: {0}")]
    Config(String),
    /// Storage failed in a way that fails the request but not the node.
    #[error("storage: {0}")]
    Storage(String),
    /// The node can no longer keep its promises (e.g. a consensus record
    /// could not be made durable) and must stop.
    #[error("fatal: {0}")]
    Fatal(String),
}

/// Most characters of client input an error message repeats.
pub const SHOWN_CHARS_MAX: usize = 64;
/// Longest status message the node sends. gRPC carries it percent-encoded
/// in the `grpc-message` header (up to three bytes per byte), and clients
/// refuse headers beyond 8 KiB by default, reporting RESOURCE_EXHAUSTED
/// instead of the real error.
pub const STATUS_MESSAGE_BYTES_MAX: usize = 1_024;

/// Client input as an error message shows it: quoted, and cut to
/// [`SHOWN_CHARS_MAX`] characters with its length when longer, so an error
/// never echoes an unbounded value.
pub fn shown(input: &str) -> String {
    let mut chars = input.char_indices();
    match chars.nth(SHOWN_CHARS_MAX) {
        None => format!("{input:?}"),
        Some((cut, _)) => format!("{:?}… ({} bytes)", &input[..cut], input.len()),
    }
}

/// `message` cut to [`STATUS_MESSAGE_BYTES_MAX`] bytes at a character
/// boundary (a last guard: messages are built from [`shown`] input).
fn bounded(mut message: String) -> String {
    if message.len() > STATUS_MESSAGE_BYTES_MAX {
        let mut cut = STATUS_MESSAGE_BYTES_MAX - '…'.len_utf8();
        while !message.is_char_boundary(cut) {
            cut -= 1;
        }
        message.truncate(cut);
        message.push('…');
    }
    message
}

impl NodeError {
    /// Shorthand for a storage failure.
    pub fn storage(e: impl std::fmt::Display) -> NodeError {
        NodeError::Storage(e.to_string())
    }
}

impl From<NodeError> for Status {
    fn from(e: NodeError) -> Status {
        let code = match &e {
            NodeError::InvalidArgument(_) => Code::InvalidArgument,
            NodeError::NotFound(_) => Code::NotFound,
            NodeError::AlreadyExists(_) => Code::AlreadyExists,
            NodeError::Unauthenticated(_) => Code::Unauthenticated,
            NodeError::PermissionDenied(_) => Code::PermissionDenied,
            NodeError::FailedPrecondition(_) => Code::FailedPrecondition,
            NodeError::ResourceExhausted(_) => Code::ResourceExhausted,
            NodeError::Unavailable(_) | NodeError::Storage(_) => Code::Unavailable,
            NodeError::Config(_) | NodeError::Fatal(_) => Code::Internal,
        };
        Status::new(code, bounded(e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_input_is_shown_cut() {
        assert_eq!(shown("team"), "\"team\"");
        let long = "é".repeat(5_000);
        let s = shown(&long);
        assert!(
            s.starts_with(&format!("\"{}\"…", "é".repeat(SHOWN_CHARS_MAX))),
            "{s}"
        );
        assert!(s.ends_with("(10000 bytes)"), "{s}");
        assert_eq!(
            shown(&"a".repeat(SHOWN_CHARS_MAX)).len(),
            SHOWN_CHARS_MAX + 2
        );
    }

    #[test]
    fn status_messages_are_bounded() {
        let status = Status::from(NodeError::InvalidArgument("ü".repeat(10_000)));
        assert!(status.message().len() <= STATUS_MESSAGE_BYTES_MAX);
        assert!(status.message().ends_with('…'));
        let short = Status::from(NodeError::NotFound("room \"team\" does not exist".into()));
        assert_eq!(short.message(), "room \"team\" does not exist");
    }
}
