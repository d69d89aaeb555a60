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
        Status::new(code, e.to_string())
    }
}
