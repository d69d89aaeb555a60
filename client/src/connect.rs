//! Connecting to a node, and following its redirects.

use std::time::Duration;

use tonic::transport::{Channel, Endpoint};

use crate::error::ClientError;

/// Metadata key a node uses to say which node serves a room.
pub const REDIRECT_METADATA: &str = "saferchat-redirect";
/// Request metadata by which this library tells a node that it follows
/// redirects: the node then redirects a session to the room's node instead
/// of relaying it there (one hop instead of two).
pub const FOLLOWS_REDIRECTS_METADATA: &str = "saferchat-follows-redirects";
/// How many redirects a call follows before giving up.
pub const REDIRECTS_MAX: usize = 3;

/// `host:port` or a URL, as a URL.
pub fn url(address: &str) -> String {
    if address.starts_with("http://") || address.starts_with("https://") {
        address.to_owned()
    } else {
        format!("http://{address}")
    }
}

/// Opens a channel to a node.
///
/// # Errors
/// [`ClientError::Connect`] when the address is invalid or nobody answers.
pub async fn connect(address: &str) -> Result<Channel, ClientError> {
    let fail = |reason: String| ClientError::Connect {
        address: address.to_owned(),
        reason,
    };
    Endpoint::from_shared(url(address))
        .map_err(|e| fail(e.to_string()))?
        .connect_timeout(Duration::from_secs(5))
        .tcp_nodelay(true)
        .connect()
        .await
        .map_err(|e| fail(format!("{e} (is a node running there?)")))
}

/// The address a status redirects to, if it is a redirect.
pub fn redirect_of(status: &tonic::Status) -> Option<String> {
    if status.code() != tonic::Code::Unavailable {
        return None;
    }
    status
        .metadata()
        .get(REDIRECT_METADATA)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
}
