//! What every request handler shares.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use saferchat_consensus::RoomId;
use tokio_util::sync::CancellationToken;

use crate::auth::{AdminToken, SessionKeys};
use crate::clock::Clock;
use crate::config::NodeConfig;
use crate::error::NodeError;
use crate::known_rooms::KnownRooms;
use crate::membership::Membership;
use crate::placement::Routing;
use crate::room::Rooms;
use crate::storage::ChatStore;

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
    /// Which node serves which room.
    pub routing: Routing,
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
        routing: Routing,
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
            routing,
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
}
