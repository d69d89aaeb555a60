//! `server.grpc.peer.Peer`: consensus traffic between nodes, in and out.
//!
//! Each node keeps one outgoing `Exchange` stream per peer and pushes
//! batches of room messages into it; answers come back on the stream the
//! peer keeps towards us. A broken connection loses what was queued — the
//! protocol tolerates loss — and is re-established with back-off.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;

use saferchat_consensus::NodeId;
use saferchat_proto::peer::{self as pb, peer_client::PeerClient, peer_server::Peer};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status, Streaming};

use crate::membership::{Inbound, PeerSender};

/// Messages queued for one peer before new ones are dropped.
const PEER_QUEUE_MAX: usize = 16_384;
/// Messages packed into one frame.
const FRAME_MESSAGES_MAX: usize = 512;
/// Reconnect back-off bounds.
const BACKOFF_MS_MIN: u64 = 50;
const BACKOFF_MS_MAX: u64 = 2_000;

/// Receives other nodes' traffic.
#[derive(Debug, Clone)]
pub struct PeerService {
    inbound: mpsc::Sender<Inbound>,
    replicas: Vec<NodeId>,
}

impl PeerService {
    /// Forwards frames from known replicas to the membership driver.
    pub fn new(inbound: mpsc::Sender<Inbound>, replicas: Vec<NodeId>) -> PeerService {
        PeerService { inbound, replicas }
    }
}

#[tonic::async_trait]
impl Peer for PeerService {
    async fn exchange(
        &self,
        request: Request<Streaming<pb::PeerFrame>>,
    ) -> Result<Response<pb::ExchangeSummary>, Status> {
        let mut stream = request.into_inner();
        let mut frames = 0;
        while let Some(frame) = stream.message().await? {
            let from = NodeId(frame.from);
            if !self.replicas.contains(&from) {
                return Err(Status::permission_denied(format!(
                    "{from} is not a replica of this cluster"
                )));
            }
            frames += 1;
            self.inbound
                .send(Inbound {
                    from,
                    messages: frame.messages,
                })
                .await
                .map_err(|_| Status::unavailable("node is shutting down"))?;
        }
        Ok(Response::new(pb::ExchangeSummary { frames }))
    }
}

/// Sends to peers over their `Exchange` service.
#[derive(Debug)]
pub struct GrpcPeers {
    queues: HashMap<NodeId, mpsc::Sender<pb::RoomMessage>>,
}

impl GrpcPeers {
    /// Starts one sender task per peer.
    pub fn start(
        me: NodeId,
        peers: &[(NodeId, SocketAddr)],
        shutdown: &CancellationToken,
    ) -> GrpcPeers {
        let mut queues = HashMap::new();
        for (id, addr) in peers {
            let (tx, rx) = mpsc::channel(PEER_QUEUE_MAX);
            tokio::spawn(sender(me, *id, *addr, rx, shutdown.clone()));
            queues.insert(*id, tx);
        }
        GrpcPeers { queues }
    }
}

impl PeerSender for GrpcPeers {
    fn send(&self, to: NodeId, message: pb::RoomMessage) {
        let Some(queue) = self.queues.get(&to) else {
            tracing::warn!(%to, "no such peer");
            return;
        };
        if queue.try_send(message).is_err() {
            metrics::counter!("saferchat_peer_messages_dropped_total").increment(1);
        }
    }
}

async fn sender(
    me: NodeId,
    peer: NodeId,
    addr: SocketAddr,
    mut queue: mpsc::Receiver<pb::RoomMessage>,
    shutdown: CancellationToken,
) {
    let mut backoff = BACKOFF_MS_MIN;
    loop {
        if shutdown.is_cancelled() {
            return;
        }
        let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
            .expect("a socket address is a valid URI")
            .connect_timeout(Duration::from_millis(1_000))
            .tcp_nodelay(true);
        let connected = tokio::select! {
            c = endpoint.connect() => c,
            () = shutdown.cancelled() => return,
        };
        let channel = match connected {
            Ok(channel) => channel,
            Err(e) => {
                tracing::debug!(%peer, %addr, error = %e, "peer unreachable");
                // Drop what queued up while unreachable: stale consensus
                // messages only cause retries.
                while queue.try_recv().is_ok() {}
                tokio::select! {
                    () = tokio::time::sleep(Duration::from_millis(backoff)) => {}
                    () = shutdown.cancelled() => return,
                }
                backoff = (backoff * 2).min(BACKOFF_MS_MAX);
                continue;
            }
        };
        tracing::info!(%peer, %addr, "connected to peer");
        backoff = BACKOFF_MS_MIN;
        let (frames, frames_rx) = mpsc::channel::<pb::PeerFrame>(64);
        let mut client = PeerClient::new(channel);
        let call =
            tokio::spawn(async move { client.exchange(ReceiverStream::new(frames_rx)).await });
        loop {
            let first = tokio::select! {
                m = queue.recv() => m,
                () = shutdown.cancelled() => return,
            };
            let Some(first) = first else { return };
            let mut messages = vec![first];
            while messages.len() < FRAME_MESSAGES_MAX {
                match queue.try_recv() {
                    Ok(m) => messages.push(m),
                    Err(_) => break,
                }
            }
            if frames
                .send(pb::PeerFrame {
                    from: me.0,
                    messages,
                })
                .await
                .is_err()
                || call.is_finished()
            {
                tracing::info!(%peer, "peer stream broke; reconnecting");
                break;
            }
        }
        call.abort();
    }
}
