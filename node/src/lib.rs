//! The saferchat node: one process that serves end-to-end encrypted rooms.
//!
//! # Layout
//!
//! - [`run`]: the entry point; takes the configuration, bound listeners
//!   and a shutdown token (tests bind `127.0.0.1:0`).
//! - [`grpc`]: the edge — chat, admin, health and reflection on the client
//!   listener; the peer face on its own listener.
//! - [`room`]: one actor per active room: check, id, store, ack, fan out.
//! - [`membership`]: the driver that runs the consensus core of every room
//!   and publishes lease-protected views of membership.
//! - [`storage`]: the storage contract, its stores and conformance suite.
//! - [`mover`]: carries out the partition moves the cluster map plans.
//! - [`auth`], [`config`], [`clock`], [`convert`], [`message_id`],
//!   [`known_rooms`], [`context`], [`error`]: the supporting cast.
//!
//! # What the node never does
//!
//! It never decrypts: it links no AES and uses RSA only to verify join
//! signatures. It never acknowledges a post before storage says it is
//! durable, and never sends a consensus vote before it is durable.

pub mod auth;
pub mod clock;
pub mod cluster_map;
pub mod config;
pub mod context;
pub mod convert;
pub mod error;
pub mod grpc;
pub mod known_rooms;
pub mod listener_tls;
pub mod membership;
pub mod message_id;
pub mod mover;
pub mod peer_tls;
pub mod placement;
pub mod post_rate;
pub mod room;
pub mod storage;
pub mod timeline;

use std::sync::Arc;
use std::time::Duration;

use saferchat_consensus::NodeId;
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::auth::{AdminToken, SessionKeys};
use crate::clock::Clock;
use crate::config::{Backend, NodeConfig};
use crate::context::{AdminContext, ChatContext, RoomFilter};
use crate::error::NodeError;
use crate::known_rooms::KnownRooms;
use crate::listener_tls::ListenerTls;
use crate::membership::driver::{self, DriverParts};
use crate::membership::{NoPeers, PeerSender};
use crate::peer_tls::PeerTls;
use crate::room::{RoomDeps, Rooms};
use crate::storage::ChatStore;
use crate::storage::cassandra::CassandraStore;
use crate::storage::sled::SledStore;

/// Peer batches queued for the membership driver.
const INBOUND_QUEUE_MAX: usize = 1024;
/// How long shutdown waits for streams to end before giving up on them.
const SHUTDOWN_GRACE_MS: u64 = 10_000;

/// Pending connections a listener queues before the node accepts them.
/// tokio's `TcpListener::bind` asks for 1,024; a node meant for tens of
/// thousands of sessions sees that many clients reconnect at once after a
/// restart, and a full queue makes the kernel drop or reset the overflow
/// (a thousand clients joining at once on a loaded machine got "connection
/// reset"). The kernel caps it at `net.core.somaxconn` (4,096 by default).
pub const LISTEN_BACKLOG: u32 = 4_096;

/// Binds a TCP listener on `addr` with [`LISTEN_BACKLOG`].
///
/// # Errors
/// The socket errors (address in use, permission).
pub fn bind(addr: std::net::SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(LISTEN_BACKLOG)
}

/// The listeners a node serves on, bound by the caller.
#[derive(Debug)]
pub struct Listeners {
    /// Chat (and admin where configured), health and reflection.
    pub client: TcpListener,
    /// Node-to-node traffic; required when peers are configured.
    pub peer: Option<TcpListener>,
    /// The admin face on a listener of its own (`admin_listen`).
    pub admin: Option<TcpListener>,
    /// The browser face, grpc-web (`web_listen`).
    pub web: Option<TcpListener>,
}

fn create_private_dir(path: &std::path::Path) -> Result<(), NodeError> {
    let mut builder = std::fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::DirBuilderExt;
        builder.mode(0o700);
    }
    builder
        .create(path)
        .map_err(|e| NodeError::Config(format!("creating data folder {}: {e}", path.display())))
}

/// Opens the configured chat store: the node's own sled database (the
/// default), or Cassandra, whose schema migrations run here. Acceptor
/// state stays in sled either way: it is this node's vote.
async fn open_chat_store(
    config: &NodeConfig,
    sled: &SledStore,
) -> Result<Arc<dyn ChatStore>, NodeError> {
    match config.storage.backend {
        Backend::Sled => Ok(Arc::new(sled.clone())),
        Backend::Cassandra => Ok(Arc::new(
            connect_cassandra(&config.storage.cassandra).await?,
        )),
    }
}

/// Connects to Cassandra, trying again while it is unreachable for up to
/// `connect_wait_s` (doubling the pause up to 5 s). Configuration errors
/// (a wrong datacenter, a bad replication string) fail at once.
async fn connect_cassandra(config: &config::CassandraConfig) -> Result<CassandraStore, NodeError> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(config.connect_wait_s);
    let mut pause = Duration::from_millis(250);
    loop {
        match CassandraStore::connect(config).await {
            Err(NodeError::Unavailable(why)) if tokio::time::Instant::now() + pause < deadline => {
                tracing::warn!(error = %why, retry_in_ms = pause.as_millis() as u64, "Cassandra is not reachable yet");
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_secs(5));
            }
            other => return other,
        }
    }
}

/// Reads every room name into the existence filter.
async fn load_known_rooms(store: &dyn ChatStore, known: &KnownRooms) -> Result<usize, NodeError> {
    let mut after = None;
    let mut count = 0;
    loop {
        let page = store.list_rooms(after.as_ref(), 1000).await?;
        let Some(last) = page.last() else { break };
        after = Some(last.room.clone());
        count += page.len();
        for summary in &page {
            known.insert(&summary.room);
        }
    }
    Ok(count)
}

/// Whether this node's store may lack rooms of the cluster: it is in a
/// cluster (partition moves may leave it some partitions only, whatever it
/// started with) and its store is its own (Cassandra's keyspace is shared
/// by every node).
fn lists_across_the_cluster(config: &NodeConfig) -> bool {
    !config.is_single_node() && config.storage.backend != Backend::Cassandra
}

/// How a node task ended, as the node's outcome (`what` names it if it
/// panicked).
fn task_outcome(
    result: Result<Result<(), NodeError>, tokio::task::JoinError>,
    what: &str,
) -> Result<(), NodeError> {
    match result {
        Ok(outcome) => outcome,
        Err(e) => Err(NodeError::Fatal(format!("{what} panicked: {e}"))),
    }
}

/// The other nodes as the peer links know them.
fn known_peers(config: &NodeConfig) -> Vec<grpc::peer::KnownPeer> {
    config
        .peers
        .iter()
        .map(|p| grpc::peer::KnownPeer {
            id: NodeId(p.id),
            datacenter: p.datacenter.clone(),
            address: p.peer_address,
        })
        .collect()
}

/// A node that joins: waits until the cluster map names it, then the
/// configuration it runs with — the map's partitions and nodes as its
/// peers (those that joined marked so: they hold no replica slot, nor
/// does this node). `None` when `shutdown` came first.
async fn joined(
    mut config: NodeConfig,
    maps: &cluster_map::ClusterMaps,
    shutdown: &CancellationToken,
) -> Result<Option<NodeConfig>, NodeError> {
    if !maps.current().nodes.contains_key(&config.node_id) {
        tracing::info!(
            node = config.node_id,
            datacenter = %config.datacenter,
            "waiting to be added to the cluster map: run `saferchat cluster add-node {} --datacenter {} \
             --peer-address PEER_HOST:PORT --client-address CLIENT_HOST:PORT` against any member",
            config.node_id,
            config.datacenter
        );
    }
    let Some(map) = maps.wait_until_added(shutdown).await else {
        return Ok(None);
    };
    let me = &map.nodes[&config.node_id];
    if me.datacenter != config.datacenter {
        return Err(NodeError::Config(format!(
            "the cluster map places node {} in datacenter {}, but it is configured in {}",
            config.node_id, me.datacenter, config.datacenter
        )));
    }
    config.partitions = map.partitions;
    config.replicas_per_datacenter = map.replicas_per_datacenter;
    config.peers = map
        .nodes
        .iter()
        .filter(|(id, _)| **id != config.node_id)
        .filter_map(
            |(id, n)| match (n.peer_address.parse(), n.client_address.parse()) {
                (Ok(peer_address), Ok(client_address)) => Some(config::PeerConfig {
                    id: *id,
                    peer_address,
                    client_address,
                    datacenter: n.datacenter.clone(),
                    joining: n.state == saferchat_placement::NodeState::Joining,
                }),
                _ => {
                    tracing::warn!(
                        node = id,
                        "the cluster map has no usable addresses for this node; it is left out"
                    );
                    None
                }
            },
        )
        .collect();
    tracing::info!(
        epoch = map.epoch,
        peers = config.peers.len(),
        "joined the cluster"
    );
    Ok(Some(config))
}

/// Runs a node until `shutdown` is cancelled (or a fatal error).
///
/// # Errors
/// Configuration or storage problems at start, a listener failure, or
/// [`NodeError::Fatal`] when consensus state could not be made durable.
pub async fn run(
    config: NodeConfig,
    listeners: Listeners,
    clock: Arc<dyn Clock>,
    shutdown: CancellationToken,
) -> Result<(), NodeError> {
    config.validate()?;
    if !config.is_single_node() && listeners.peer.is_none() {
        return Err(NodeError::Config(
            "a peer listener is required when peers are configured".into(),
        ));
    }
    create_private_dir(&config.data_dir)?;
    let tls = match &config.peer_tls {
        Some(files) if !config.is_single_node() => Some(PeerTls::load(
            files,
            NodeId(config.node_id),
            &config.datacenter,
        )?),
        _ => None,
    };
    let configured_peers = known_peers(&config);
    let (maps, map_task) = cluster_map::start(cluster_map::MapParts {
        me: config.node_id,
        data_dir: &config.data_dir,
        configured: (!config.join).then(|| {
            cluster_map::configured_shape(
                &config,
                (
                    listeners.client.local_addr().ok(),
                    listeners.peer.as_ref().and_then(|l| l.local_addr().ok()),
                ),
            )
        }),
        peers: &configured_peers,
        tls: tls.as_ref(),
        shutdown: shutdown.clone(),
    })
    .await?;
    // The peer listener serves the map group from the start: a node that
    // joins learns the map through it. Room and partition traffic is
    // refused as "still joining" until the drivers below exist.
    let (inbound_tx, inbound_rx) = mpsc::channel(INBOUND_QUEUE_MAX);
    let peer_service =
        grpc::peer::PeerService::new(inbound_tx, configured_peers).with_map(maps.clone());
    if let Some(addr) = listeners.peer.as_ref().and_then(|l| l.local_addr().ok()) {
        tracing::info!(%addr, "peer listener");
    }
    let peer_server = match (listeners.peer, &tls) {
        (Some(listener), Some(tls)) => Some(tokio::spawn(grpc::serve_peers(
            peer_service.clone(),
            tls.clone(),
            listener,
            shutdown.clone(),
        ))),
        _ => None,
    };
    let config = if config.join {
        match joined(config, &maps, &shutdown).await? {
            Some(config) => config,
            None => {
                maps.shutdown().await;
                return Ok(());
            }
        }
    } else {
        config
    };
    placement::check_or_record(&config.data_dir, &placement::Shape::of(&config))?;
    let placement = Arc::new(placement::build(&config)?);
    let sled = SledStore::open(&config.data_dir.join("db"))?;
    let chat = open_chat_store(&config, &sled).await?;

    let (admin, generated) = AdminToken::load(config.admin_token.as_deref(), &config.data_dir)?;
    if let Some(path) = generated {
        tracing::info!(path = %path.display(), "generated an admin token; read it from this file (mode 0600)");
    }
    let sessions = SessionKeys::load(config.session_secret.as_deref(), &config.data_dir)?;
    let known = Arc::new(KnownRooms::new());
    let rooms_known = load_known_rooms(&*chat, &known).await?;

    let replica = Arc::new(config.replica_config());
    tracing::info!(rooms = rooms_known, "{}", driver::describe(&replica));
    let cluster = known_peers(&config);
    let peers: Arc<dyn PeerSender> = match &tls {
        None => Arc::new(NoPeers),
        Some(tls) => Arc::new(
            grpc::peer::GrpcPeers::start(NodeId(config.node_id), tls, &cluster, &shutdown)
                .with_map(maps.clone()),
        ),
    };
    let map_at_start = Arc::new(maps.current());
    // The drivers start from the moves of the map they start with (its
    // snapshot's) and follow the newer ones.
    let placement_at_start = Arc::new(placement::at_map(&placement, &map_at_start));
    let (membership, driver_task) = driver::spawn(DriverParts {
        config: Arc::clone(&replica),
        placement: Arc::clone(&placement_at_start),
        map: Arc::clone(&map_at_start),
        maps: Some(maps.watch()),
        acceptors: Arc::new(sled.clone()),
        chat: Arc::clone(&chat),
        peers: Arc::clone(&peers),
        inbound: inbound_rx,
        clock: Arc::clone(&clock),
        known: Arc::clone(&known),
        chat_repair_after: driver::CHAT_DETAILS_REPAIR_AFTER,
        shutdown: shutdown.clone(),
    });
    // Rooms whose partition this node does not replicate: ask a replica.
    let membership = match &tls {
        Some(tls) => membership.with_remote(
            membership::remote::Remote::new(
                NodeId(config.node_id),
                Arc::clone(&placement),
                tls,
                &cluster,
            )?
            .with_map(maps.watch()),
        ),
        None => membership,
    };
    // A cluster replicates timelines through partition logs; a single
    // node's store is its log (see `timeline`).
    let (log_tx, log_rx) = mpsc::channel(timeline::driver::LOG_INBOUND_MAX);
    let (timeline, timeline_task) = if config.is_single_node() {
        (None, None)
    } else {
        let (store, states) =
            storage::log_store::LogStore::open(&config.data_dir.join("partition-log"))?;
        let (timeline, task) = timeline::driver::spawn(timeline::driver::DriverParts {
            me: NodeId(config.node_id),
            placement: Arc::clone(&placement_at_start),
            map: Arc::clone(&map_at_start),
            maps: Some(maps.watch()),
            store: Arc::new(store),
            states,
            chat: Arc::clone(&chat),
            peers: Arc::clone(&peers),
            inbound: log_rx,
            clock: Arc::clone(&clock),
            shutdown: shutdown.clone(),
            copier: Some(Arc::new(grpc::partition_copy::PeerCopySource {
                maps: maps.clone(),
                placement: Arc::clone(&placement),
            })),
            retained_max: config.partition_log_retained_bytes,
            home_lease: replica.lease,
        });
        (Some(timeline), Some(task))
    };
    let copy_timeline = timeline.clone();
    let mover_timeline = timeline.clone();
    let routing = placement::Routing::new(&config, Arc::clone(&placement), timeline.clone())
        .with_map(maps.watch());
    let rooms = Rooms::new(RoomDeps {
        store: Arc::clone(&chat),
        membership: membership.clone(),
        clock: Arc::clone(&clock),
        limits: config.limits,
        shutdown: shutdown.clone(),
        timeline,
        placement: Arc::clone(&placement),
    });
    let client_addr = listeners.client.local_addr().ok();
    // One placement following the map for the admin room list and the
    // partition copy's check (each follower rebuilds the ring per epoch).
    let followed = Arc::new(placement::FollowedPlacement::new(
        Arc::clone(&placement),
        Some(maps.watch()),
    ));
    let filter = RoomFilter::new(known, config.is_single_node());
    let admin_ctx = Arc::new(AdminContext {
        me: NodeId(config.node_id),
        membership: membership.clone(),
        store: Arc::clone(&chat),
        rooms: filter.clone(),
        maps: maps.clone(),
        cluster_list: lists_across_the_cluster(&config).then(|| grpc::room_list::ClusterList {
            me: NodeId(config.node_id),
            placement: Arc::clone(&followed),
            maps: maps.clone(),
        }),
    });
    let ctx = Arc::new(ChatContext::new(
        config.clone(),
        membership,
        rooms,
        Arc::clone(&chat),
        filter,
        sessions,
        clock,
        shutdown.clone(),
        routing,
    ));

    let listener_tls = match &config.tls {
        Some(files) => {
            let tls = ListenerTls::load(
                files,
                &config.data_dir,
                &[Some(config.listen), config.admin_listen, config.web_listen]
                    .into_iter()
                    .flatten()
                    .collect::<Vec<_>>(),
            )?;
            tracing::info!(
                fingerprint = %tls.fingerprint,
                cert = %tls.cert.display(),
                "client TLS certificate (clients can pin it: saferchat --tls-pin FINGERPRINT)"
            );
            Some(tls.server())
        }
        None => None,
    };
    let admin_listener = listeners.admin;
    if let Some(addr) = admin_listener.as_ref().and_then(|l| l.local_addr().ok()) {
        tracing::info!(%addr, "admin listener");
    }
    let on_client_port = config.serves_admin_on_client_port();
    if !on_client_port && admin_listener.is_none() {
        tracing::warn!(
            "the admin service is not served: set admin_listen (SAFERCHAT_ADMIN_LISTEN) to reach it"
        );
    }
    let admin_server = admin_listener.map(|listener| {
        tokio::spawn(grpc::serve_clients(
            None,
            Some(grpc::AdminFace {
                ctx: Arc::clone(&admin_ctx),
                token: admin.clone(),
            }),
            listener_tls.clone(),
            config.limits.streams_per_connection_max,
            listener,
            shutdown.clone(),
        ))
    });
    let web_server = listeners.web.map(|listener| {
        if let Ok(addr) = listener.local_addr() {
            tracing::info!(%addr, tls = listener_tls.is_some(), "web listener (grpc-web for browsers)");
        }
        tokio::spawn(grpc::web::serve(
            Arc::clone(&ctx),
            listener_tls.clone(),
            config.limits.streams_per_connection_max,
            listener,
            shutdown.clone(),
        ))
    });
    let client_server = tokio::spawn(grpc::serve_clients(
        Some(Arc::clone(&ctx)),
        on_client_port.then(|| grpc::AdminFace {
            ctx: admin_ctx,
            token: admin,
        }),
        listener_tls,
        config.limits.streams_per_connection_max,
        listeners.client,
        shutdown.clone(),
    ));
    // Partition moves: only a cluster has partition logs to move.
    if let Some(timeline) = mover_timeline {
        tokio::spawn(mover::run(mover::MoverParts {
            me: config.node_id,
            maps: maps.clone(),
            membership: ctx.membership.local(),
            timeline,
            shutdown: shutdown.clone(),
        }));
    }
    peer_service.serve(grpc::peer::Serving {
        membership: ctx.membership.local(),
        log: (log_tx, placement.partitions().get()),
        store: Arc::clone(&chat),
        placement: followed,
        timeline: copy_timeline,
    });
    if let Some(addr) = client_addr {
        tracing::info!(
            %addr,
            tls = config.tls.is_some(),
            data = %config.data_dir.display(),
            "saferchat node serving"
        );
    }

    let mut driver_task = driver_task;
    let timeline_done = async {
        match timeline_task {
            Some(task) => task_outcome(task.await, "timeline driver"),
            None => std::future::pending().await,
        }
    };
    let outcome = tokio::select! {
        () = shutdown.cancelled() => Ok(()),
        result = &mut driver_task => task_outcome(result, "membership driver"),
        result = timeline_done => result,
        result = map_task => task_outcome(result, "cluster map steward"),
    };
    if let Err(e) = &outcome {
        tracing::error!(error = %e, "stopping");
    }
    shutdown.cancel();
    maps.shutdown().await;
    let grace = Duration::from_millis(SHUTDOWN_GRACE_MS);
    match tokio::time::timeout(grace, client_server).await {
        Ok(Ok(Err(e))) => tracing::warn!(error = %e, "client listener"),
        Err(_) => tracing::warn!("client connections did not close in time"),
        _ => {}
    }
    if let Some(task) = admin_server {
        let _ = tokio::time::timeout(grace, task).await;
    }
    if let Some(task) = web_server {
        let _ = tokio::time::timeout(grace, task).await;
    }
    if let Some(task) = peer_server {
        let _ = tokio::time::timeout(grace, task).await;
    }
    if !driver_task.is_finished() {
        let _ = tokio::time::timeout(grace, &mut driver_task).await;
    }
    // Everything acknowledged was flushed already; this makes the rest of
    // sled's log durable too before the process exits.
    sled.flush().await?;
    tracing::info!(sessions = ctx.open_sessions(), "saferchat node stopped");
    outcome
}
