//! How a node says "this room is served elsewhere", the same for the node
//! that answers and the client that follows (the wire contract is in
//! specs/README.md and ARCHITECTURE.md: an `UNAVAILABLE` status whose
//! metadata names the serving node's client address).

/// Response metadata naming the client address (`host:port`) of the node
/// that serves the room.
pub const REDIRECT_METADATA: &str = "saferchat-redirect";

/// Request metadata by which a client says it follows redirects: the node
/// then redirects a session to the room's node instead of relaying it
/// there (one hop instead of two).
pub const FOLLOWS_REDIRECTS_METADATA: &str = "saferchat-follows-redirects";

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
