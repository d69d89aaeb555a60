//! The client crate's one error type.

/// What can go wrong on the client side.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// A key file could not be read, written or parsed.
    #[error("key file {path}: {reason}")]
    KeyFile {
        /// The file.
        path: String,
        /// Why.
        reason: String,
    },
    /// A cryptographic operation failed.
    #[error("crypto: {0}")]
    Crypto(String),
    /// A received message failed verification; it must not be shown.
    #[error("message rejected: {0}")]
    Verify(String),
    /// Input that cannot be sent (empty or oversized message, bad name).
    #[error("{0}")]
    Input(String),
    /// The server answered with an error status.
    #[error("{}: {}", .0.code(), .0.message())]
    Status(#[from] tonic::Status),
    /// The connection failed.
    #[error("cannot connect to {address}: {reason}")]
    Connect {
        /// Where.
        address: String,
        /// Why.
        reason: String,
    },
    /// The server broke the protocol.
    #[error("protocol: {0}")]
    Protocol(String),
}
