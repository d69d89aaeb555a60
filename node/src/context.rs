//! What every request handler shares.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use saferchat_consensus::{NodeId, RoomId};
use sha2::{Digest, Sha256};
use tokio_util::sync::CancellationToken;
use tonic::Status;

use crate::auth::{AdminToken, SessionKeys};
use crate::clock::Clock;
use crate::config::NodeConfig;
use crate::error::NodeError;
use crate::known_rooms::KnownRooms;
use crate::membership::Membership;
use crate::room::Rooms;
use crate::storage::ChatStore;

/// Metadata key naming the client address of the node that serves a room.
pub const REDIRECT_METADATA: &str = "saferchat-redirect";

/// The node's shared state, one per process.
#[derive(Debug)]
pub struct Context {
    /// Configuration.
    pub config: NodeConfig,
    /// Membership consensus.
    pub membership: Membership,
    /// Room hubs.
    pub rooms: Rooms,
    /// Rooms and timelines.
    pub store: Arc<dyn ChatStore>,
    /// Room existence filter.
    pub known: Arc<KnownRooms>,
    /// Admin credential.
    pub admin: AdminToken,
    /// Session token keys.
    pub sessions: SessionKeys,
    /// Time.
    pub clock: Arc<dyn Clock>,
    /// Node shutdown.
    pub shutdown: CancellationToken,
    next_session: AtomicU64,
    open_sessions: AtomicUsize,
}

/// Counts an open session for as long as it lives.
#[derive(Debug)]
pub struct SessionSlot {
    ctx: Arc<Context>,
    /// This session's id.
    pub id: u64,
}

impl Drop for SessionSlot {
    fn drop(&mut self) {
        self.ctx.open_sessions.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Context {
    /// Assembles the context.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        config: NodeConfig,
        membership: Membership,
        rooms: Rooms,
        store: Arc<dyn ChatStore>,
        known: Arc<KnownRooms>,
        admin: AdminToken,
        sessions: SessionKeys,
        clock: Arc<dyn Clock>,
        shutdown: CancellationToken,
    ) -> Context {
        Context {
            config,
            membership,
            rooms,
            store,
            known,
            admin,
            sessions,
            clock,
            shutdown,
            next_session: AtomicU64::new(1),
            open_sessions: AtomicUsize::new(0),
        }
    }

    /// Takes a session slot, or refuses when the node is full.
    ///
    /// # Errors
    /// `ResourceExhausted` at `limits.sessions_max`.
    pub fn open_session(self: &Arc<Self>) -> Result<SessionSlot, NodeError> {
        let open = self.open_sessions.fetch_add(1, Ordering::SeqCst);
        let slot = SessionSlot {
            ctx: Arc::clone(self),
            id: self.next_session.fetch_add(1, Ordering::Relaxed),
        };
        if open >= self.config.limits.sessions_max {
            return Err(NodeError::ResourceExhausted(format!(
                "this node serves at most {} sessions; try another node or later",
                self.config.limits.sessions_max
            )));
        }
        Ok(slot)
    }

    /// Sessions open right now.
    pub fn open_sessions(&self) -> usize {
        self.open_sessions.load(Ordering::SeqCst)
    }

    /// `NotFound` for rooms this node is certain do not exist. Certain only
    /// on a single node (every creation passed through it); with peers a
    /// room created elsewhere may not have reached this node's filter yet,
    /// so the membership read decides.
    ///
    /// # Errors
    /// `NotFound`.
    pub fn check_room_may_exist(&self, room: &RoomId) -> Result<(), NodeError> {
        if self.config.is_single_node() && !self.known.may_exist(room) {
            metrics::counter!("saferchat_unknown_room_lookups_total").increment(1);
            return Err(NodeError::NotFound(format!(
                "room {:?} does not exist",
                room.as_str()
            )));
        }
        Ok(())
    }

    /// The node that serves a room's messages: rendezvous hashing over the
    /// replica set, so every node agrees without coordination. (Membership
    /// is replicated on every node; the timeline of a room lives with one.)
    pub fn owner(&self, room: &RoomId) -> NodeId {
        let mut nodes: Vec<u64> = self.config.peers.iter().map(|p| p.id).collect();
        nodes.push(self.config.node_id);
        let score = |node: u64| {
            let mut h = Sha256::new();
            h.update(room.as_str().as_bytes());
            h.update(node.to_be_bytes());
            let d = h.finalize();
            u64::from_be_bytes(d[..8].try_into().expect("8 bytes"))
        };
        NodeId(
            nodes
                .into_iter()
                .max_by_key(|n| (score(*n), *n))
                .expect("at least this node"),
        )
    }

    /// `Ok` if this node serves the room's messages, else a status that
    /// redirects the client to the node that does.
    ///
    /// # Errors
    /// `UNAVAILABLE` with the `saferchat-redirect` metadata.
    pub fn serve_here(&self, room: &RoomId) -> Result<(), Status> {
        let owner = self.owner(room);
        if owner.0 == self.config.node_id {
            return Ok(());
        }
        let peer = self
            .config
            .peers
            .iter()
            .find(|p| p.id == owner.0)
            .expect("owner is a configured node");
        let mut status = Status::unavailable(format!(
            "room {:?} is served by node {} at {}; reconnect there",
            room.as_str(),
            owner,
            peer.client_address
        ));
        if let Ok(value) = peer.client_address.to_string().parse() {
            status.metadata_mut().insert(REDIRECT_METADATA, value);
        }
        Err(status)
    }
}
