//! Connecting to a node, and following its redirects.

use std::time::Duration;

use tonic::transport::{Channel, Endpoint};

use crate::error::ClientError;

pub use saferchat_proto::redirect::{FOLLOWS_REDIRECTS_METADATA, REDIRECT_METADATA, redirect_of};
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
