//! The gRPC edge: services, their wiring, and the two listeners.
//!
//! The client listener serves the chat face (and the admin face on
//! loopback, or when configured), health and reflection; an admin listener,
//! when configured, the admin face; the peer listener only the peer face.
//! Clients never reach consensus RPCs, and peers never need client
//! credentials.

pub mod admin;
pub mod chat;
pub mod forward;
pub mod frames;
pub mod message_parts;
pub mod partition_copy;
pub mod peer;
pub mod relay;
pub mod room_list;
pub mod session;
pub mod web;

use std::sync::Arc;

use saferchat_proto::admin::admin_server::AdminServer;
use saferchat_proto::chat::chat_room_server::ChatRoomServer;
use saferchat_proto::peer::peer_server::PeerServer;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Server;
use tonic::transport::server::TcpIncoming;

use crate::auth::AdminToken;
use crate::context::{AdminContext, ChatContext};
use crate::error::NodeError;
use crate::peer_tls::PeerTls;

/// Largest gRPC message accepted: one envelope plus framing.
pub const GRPC_MESSAGE_BYTES_MAX: usize = saferchat_envelope::ENVELOPE_BYTES_MAX + 64 * 1024;

/// Accepted connections with TCP_NODELAY: the builder's `tcp_nodelay`
/// applies only to listeners tonic binds itself, and without it small
/// frames (a join challenge, an acknowledgement) wait for the peer's
/// delayed ACK — about 40 ms.
fn incoming(listener: TcpListener) -> TcpIncoming {
    TcpIncoming::from(listener).with_nodelay(Some(true))
}

/// Reflection over the services one listener serves (the peer face is
/// described in the same descriptor set but is never served there).
fn reflection(itself: &str, services: &[&str]) -> tonic_reflection::server::Builder<'static> {
    let mut builder = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(saferchat_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .with_service_name(itself)
        .with_service_name("grpc.health.v1.Health");
    for name in services {
        builder = builder.with_service_name(*name);
    }
    builder
}

/// A server builder, with TLS when given (`what` names the listener in
/// the error).
fn server_builder(
    tls: Option<tonic::transport::ServerTlsConfig>,
    what: &str,
) -> Result<Server, NodeError> {
    let server = Server::builder();
    match tls {
        Some(tls) => server
            .tls_config(tls)
            .map_err(|e| NodeError::Config(format!("{what} TLS: {e}"))),
        None => Ok(server),
    }
}

/// The admin face, behind its bearer token.
pub struct AdminFace {
    /// What the service needs.
    pub ctx: Arc<AdminContext>,
    /// The token every call must carry.
    pub token: AdminToken,
}

/// Serves, on one client-side listener until `shutdown`, the chat face
/// and/or the admin face (each when given), with health and reflection.
/// The client listener serves chat (and admin on loopback, or when told);
/// an admin listener serves admin alone.
///
/// # Errors
/// When the server fails (not when it shuts down).
pub async fn serve_clients(
    chat: Option<Arc<ChatContext>>,
    admin: Option<AdminFace>,
    tls: Option<tonic::transport::ServerTlsConfig>,
    streams_per_connection: u32,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> Result<(), NodeError> {
    let (health, health_service) = tonic_health::server::health_reporter();
    let mut services = Vec::new();
    if admin.is_some() {
        health
            .set_serving::<AdminServer<admin::AdminService>>()
            .await;
        services.push("server.grpc.admin.Admin");
    }
    if chat.is_some() {
        health
            .set_serving::<ChatRoomServer<chat::ChatService>>()
            .await;
        services.push("server.grpc.chat.ChatRoom");
    }

    let reflection_v1 = reflection("grpc.reflection.v1.ServerReflection", &services)
        .build_v1()
        .map_err(|e| NodeError::Config(format!("reflection: {e}")))?;
    // grpcurl 1.8 still asks the v1alpha service.
    let reflection_v1alpha = reflection("grpc.reflection.v1alpha.ServerReflection", &services)
        .build_v1alpha()
        .map_err(|e| NodeError::Config(format!("reflection: {e}")))?;

    let admin = admin.map(|AdminFace { ctx, token }| {
        InterceptedService::new(
            AdminServer::new(admin::AdminService::new(ctx))
                .max_decoding_message_size(GRPC_MESSAGE_BYTES_MAX),
            move |request: tonic::Request<()>| {
                token.check(request.metadata())?;
                Ok(request)
            },
        )
    });
    let chat = chat.map(|ctx| {
        ChatRoomServer::new(chat::ChatService::new(ctx))
            .max_decoding_message_size(GRPC_MESSAGE_BYTES_MAX)
    });

    let stopping = shutdown.clone();
    let health_on_stop = health.clone();
    let server = server_builder(tls, "client")?;
    server
        .tcp_nodelay(true)
        .max_concurrent_streams(Some(streams_per_connection))
        .http2_keepalive_interval(Some(std::time::Duration::from_secs(30)))
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_optional_service(admin)
        .add_optional_service(chat)
        .serve_with_incoming_shutdown(incoming(listener), async move {
            stopping.cancelled().await;
            health_on_stop
                .set_not_serving::<ChatRoomServer<chat::ChatService>>()
                .await;
        })
        .await
        .map_err(|e| NodeError::Unavailable(format!("client listener failed: {e}")))
}

/// Serves the peer face on `listener` until `shutdown`, over mutual TLS:
/// a caller without a certificate from the cluster CA never gets past the
/// handshake.
///
/// # Errors
/// When the TLS material is unusable or the server fails.
pub async fn serve_peers(
    service: peer::PeerService,
    tls: PeerTls,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> Result<(), NodeError> {
    Server::builder()
        .tls_config(tls.server())
        .map_err(|e| NodeError::Config(format!("peer TLS: {e}")))?
        .tcp_nodelay(true)
        .add_service(
            PeerServer::new(service)
                .max_decoding_message_size(peer::PEER_FRAME_BYTES_MAX)
                .max_encoding_message_size(peer::PEER_FRAME_BYTES_MAX),
        )
        .serve_with_incoming_shutdown(incoming(listener), shutdown.cancelled_owned())
        .await
        .map_err(|e| NodeError::Unavailable(format!("peer listener failed: {e}")))
}
