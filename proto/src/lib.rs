//! Generated protobuf and gRPC code for saferchat.
//!
//! # Layout
//!
//! - [`common`]: `Member` and `Membership`, shared by the two client faces.
//! - [`admin`]: the admin face, `server.grpc.admin.Admin`.
//! - [`chat`]: the chat face, `server.grpc.chat.ChatRoom`.
//! - [`envelope`]: the versioned message envelope (`saferchat.envelope.v1`).
//! - [`peer`]: the node-to-node face (consensus and leases), never exposed
//!   to clients.
//! - [`codec`]: the codec the generated services use (prost with small
//!   per-stream buffers).
//! - [`redirect`]: the redirect status both sides speak.
//!
//! This crate holds generated code, and the codec it is generated with.
//! Domain types live in the crates that own them and convert at the gRPC
//! edge.

#![allow(missing_docs, clippy::all, clippy::pedantic)]

pub mod codec;
pub mod redirect;

/// `server.grpc.common`
pub mod common {
    tonic::include_proto!("server.grpc.common");
}

/// `server.grpc.admin`
pub mod admin {
    tonic::include_proto!("server.grpc.admin");
}

/// `server.grpc.chat`
pub mod chat {
    tonic::include_proto!("server.grpc.chat");
}

/// `saferchat.envelope.v1`
pub mod envelope {
    tonic::include_proto!("saferchat.envelope.v1");
}

/// `server.grpc.peer`
pub mod peer {
    tonic::include_proto!("server.grpc.peer");
}

/// `server.grpc.web`: the chat face for browsers (grpc-web), a `Post`
/// session split in a server stream and unary sends.
pub mod web {
    tonic::include_proto!("server.grpc.web");
}

/// Encoded `FileDescriptorSet` of every saferchat service, for server
/// reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/saferchat_descriptor.bin"));
