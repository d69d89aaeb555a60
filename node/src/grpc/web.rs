//! `server.grpc.web.BrowserChat` and the web listener: the chat face for
//! browsers, over grpc-web.
//!
//! A browser cannot open a bidirectional stream, so a session is split in
//! two calls joined by a link (`proto/web.proto`):
//!
//! ```text
//! browser                              node
//!   Open(Join)                 ──▶   link = 32 random bytes; session::run
//!                              ◀──   LinkFrame{link}
//!                              ◀──   LinkFrame{Challenge}
//!   Send(link, Proof)          ──▶   into the session's inbound queue
//!                              ◀──   LinkFrame{Joined}, {Deliveries}, …
//!   Send(link, Post)           ──▶   …
//!                              ◀──   LinkFrame{PostResult}, {Deliveries}
//! ```
//!
//! Behind the link runs [`session::run`], the very code a `Post` stream
//! runs: the same handshake, checks, rate limits, slow-reader rule and
//! relaying to the room's node, so the two paths cannot drift apart. The
//! link is a bearer capability like the stream itself: only the `Open`
//! caller learns it, it is never logged, and it dies with the stream.
//!
//! The same listener serves the page that uses it (`web/`), so the page
//! and its calls share one origin and need no CORS.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::{Stream, StreamExt as _};
use saferchat_proto::chat::{self as pb, chat_room_server::ChatRoomServer};
use saferchat_proto::web::browser_chat_server::{BrowserChat, BrowserChatServer};
use saferchat_proto::web::{LinkFrame, LinkSend, LinkSent};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};

use super::forward::Forwarder;
use super::{GRPC_MESSAGE_BYTES_MAX, chat, session};
use crate::context::ChatContext;
use crate::error::NodeError;

/// Bytes of a link.
pub const LINK_BYTES: usize = 32;
/// Client frames queued towards a session before `Send` waits: as many as
/// a `Post` stream's HTTP/2 window typically holds of small frames.
const LINK_FRAMES_MAX: usize = 8;
/// How long `Send` waits for a session that does not take its frame.
const SEND_TIMEOUT: Duration = Duration::from_secs(30);

type Link = [u8; LINK_BYTES];
type ToSession = mpsc::Sender<Result<pb::ClientFrame, Status>>;

/// The open links of this node. An entry lives exactly as long as its
/// session: bounded by the node's join and session limits.
#[derive(Debug, Default)]
struct Links {
    open: Mutex<HashMap<Link, ToSession>>,
}

impl Links {
    fn insert(&self, link: Link, to: ToSession) {
        self.open.lock().expect("links lock").insert(link, to);
    }

    fn get(&self, link: &Link) -> Option<ToSession> {
        self.open.lock().expect("links lock").get(link).cloned()
    }

    fn remove(&self, link: &Link) {
        self.open.lock().expect("links lock").remove(link);
    }
}

/// The browser chat service.
#[derive(Debug, Clone)]
pub struct WebService {
    ctx: Arc<ChatContext>,
    links: Arc<Links>,
    /// Sessions for rooms other nodes serve are relayed (a page cannot
    /// follow a redirect to another origin).
    forwarder: Arc<Forwarder>,
}

impl WebService {
    /// Wraps the node context.
    pub fn new(ctx: Arc<ChatContext>) -> WebService {
        WebService {
            ctx,
            links: Arc::default(),
            forwarder: Arc::new(Forwarder::new()),
        }
    }
}

fn link_frame(frame: pb::ServerFrame) -> LinkFrame {
    LinkFrame {
        link: bytes::Bytes::new(),
        frame: Some(frame),
    }
}

#[tonic::async_trait]
impl BrowserChat for WebService {
    type OpenStream = Pin<Box<dyn Stream<Item = Result<LinkFrame, Status>> + Send>>;

    async fn open(&self, request: Request<pb::Join>) -> Result<Response<Self::OpenStream>, Status> {
        let slot = self.ctx.open_join()?;
        let link: Link = rand::random();
        let (to_session, from_client) = mpsc::channel(LINK_FRAMES_MAX);
        let join = pb::ClientFrame {
            frame: Some(pb::client_frame::Frame::Join(request.into_inner())),
        };
        to_session.try_send(Ok(join)).expect("a new queue has room");
        self.links.insert(link, to_session);
        let (out, said) = mpsc::channel(chat::OUT_FRAMES_MAX);
        let ctx = Arc::clone(&self.ctx);
        let links = Arc::clone(&self.links);
        let forwarder = Arc::clone(&self.forwarder);
        tokio::spawn(async move {
            session::run(
                ctx,
                slot,
                Box::pin(ReceiverStream::new(from_client)),
                out,
                Some(forwarder),
            )
            .await;
            links.remove(&link);
        });
        // The link first, then what the session says. When the browser
        // goes away this stream is dropped with `said`, which tells the
        // session at once.
        let first = LinkFrame {
            link: bytes::Bytes::copy_from_slice(&link),
            frame: None,
        };
        let frames = futures::stream::once(async move { Ok(first) })
            .chain(ReceiverStream::new(said).map(|item| item.map(link_frame)));
        Ok(Response::new(Box::pin(frames)))
    }

    async fn send(&self, request: Request<LinkSend>) -> Result<Response<LinkSent>, Status> {
        let req = request.into_inner();
        let link: Link =
            req.link.as_ref().try_into().map_err(|_| {
                Status::invalid_argument(format!("link must be {LINK_BYTES} bytes"))
            })?;
        let frame = req
            .frame
            .ok_or_else(|| Status::invalid_argument("frame is required"))?;
        let gone = || {
            Status::not_found(
                "no open session has this link (it ended, or never was): open a new one",
            )
        };
        let to_session = self.links.get(&link).ok_or_else(gone)?;
        match tokio::time::timeout(SEND_TIMEOUT, to_session.send(Ok(frame))).await {
            Ok(Ok(())) => Ok(Response::new(LinkSent {})),
            Ok(Err(_)) => Err(gone()),
            Err(_) => Err(NodeError::ResourceExhausted(format!(
                "the session took nothing for {} s; open a new one",
                SEND_TIMEOUT.as_secs()
            ))
            .into()),
        }
    }
}

/// The page, built from `web/` (`npm run build:app`; the bundle is
/// committed so that building the node needs only Rust, and the test
/// command checks it is what a fresh build makes).
mod page {
    pub const INDEX: &[u8] = include_bytes!("../../../web/static/index.html");
    pub const CSS: &[u8] = include_bytes!("../../../web/static/app.css");
    pub const JS: &[u8] = include_bytes!("../../../web/dist/app.js");
}

/// What the page may load and reach: its own script, style and grpc-web
/// calls, nothing inline, nothing from elsewhere, never framed.
pub const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; script-src 'self'; \
     style-src 'self'; connect-src 'self'; img-src 'self'; base-uri 'none'; \
     form-action 'none'; frame-ancestors 'none'";

fn page_response(body: &'static [u8], content_type: &'static str) -> axum::response::Response {
    use axum::http::header;
    axum::response::Response::builder()
        .header(header::CONTENT_TYPE, content_type)
        .header(header::CONTENT_SECURITY_POLICY, CONTENT_SECURITY_POLICY)
        .header(header::X_CONTENT_TYPE_OPTIONS, "nosniff")
        .header(header::REFERRER_POLICY, "no-referrer")
        .header(header::CACHE_CONTROL, "no-cache")
        .header("cross-origin-opener-policy", "same-origin")
        .body(axum::body::Body::from(body))
        .expect("static headers are valid")
}

/// Serves the web listener until `shutdown`: the page (`/`, `/app.js`,
/// `/app.css`), and `BrowserChat` and `ChatRoom` (for `Members` and
/// `History`) over grpc-web, on HTTP/1.1 and HTTP/2. Same-origin only: no
/// CORS headers are sent, so no other site's page can call it from a
/// visitor's browser.
///
/// # Errors
/// When the server fails (not when it shuts down).
pub async fn serve(
    ctx: Arc<ChatContext>,
    tls: Option<tonic::transport::ServerTlsConfig>,
    streams_per_connection: u32,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> Result<(), NodeError> {
    let server = super::server_builder(tls, "web")?;
    use tower_layer::Layer as _;
    // grpc-web on the services only: the layer answers any other HTTP/1.1
    // request with 400, and the page's requests are such.
    let web = tonic_web::GrpcWebLayer::new();
    let services = tonic::service::Routes::new(
        web.layer(
            BrowserChatServer::new(WebService::new(Arc::clone(&ctx)))
                .max_decoding_message_size(GRPC_MESSAGE_BYTES_MAX),
        ),
    )
    .add_service(
        web.layer(
            ChatRoomServer::new(chat::ChatService::new(ctx))
                .max_decoding_message_size(GRPC_MESSAGE_BYTES_MAX),
        ),
    );
    use axum::routing::get;
    let routes = services
        .into_axum_router()
        .route(
            "/",
            get(|| async { page_response(page::INDEX, "text/html; charset=utf-8") }),
        )
        .route(
            "/app.js",
            get(|| async { page_response(page::JS, "text/javascript; charset=utf-8") }),
        )
        .route(
            "/app.css",
            get(|| async { page_response(page::CSS, "text/css; charset=utf-8") }),
        )
        // Anything else, a plain 404 (not a gRPC status a browser would
        // show as an empty page).
        .fallback(|| async { axum::http::StatusCode::NOT_FOUND });
    server
        .accept_http1(true)
        .tcp_nodelay(true)
        .max_concurrent_streams(Some(streams_per_connection))
        .add_routes(tonic::service::Routes::from(routes))
        .serve_with_incoming_shutdown(super::incoming(listener), shutdown.cancelled_owned())
        .await
        .map_err(|e| NodeError::Unavailable(format!("web listener failed: {e}")))
}
