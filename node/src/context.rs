//! What the request handlers share, split by service: the chat face
//! (sessions, posts, history) gets a [`ChatContext`], the admin face an
//! [`AdminContext`]; neither sees what only the other needs (the admin
//! face never touches rooms' hubs or session keys, the chat face never the
//! admin credential).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use saferchat_consensus::{Handle, RoomId};
use tokio_util::sync::CancellationToken;

use crate::auth::SessionKeys;
use crate::clock::Clock;
use crate::config::NodeConfig;
use crate::error::NodeError;
use crate::known_rooms::KnownRooms;
use crate::membership::Membership;
use crate::placement::Routing;
use crate::room::Rooms;
use crate::storage::ChatStore;

/// Which rooms may exist: on a single node every creation passed through
/// this node's filter, so a miss is certain; in a cluster a room created
/// elsewhere may not have reached it yet, and the membership read decides.
#[derive(Debug, Clone)]
pub struct RoomFilter {
    known: Arc<KnownRooms>,
    single_node: bool,
}

impl RoomFilter {
    /// The filter of this node.
    pub fn new(known: Arc<KnownRooms>, single_node: bool) -> RoomFilter {
        RoomFilter { known, single_node }
    }

    /// `NotFound` for rooms this node is certain do not exist.
    ///
    /// # Errors
    /// `NotFound`.
    pub fn check_room_may_exist(&self, room: &RoomId) -> Result<(), NodeError> {
        if self.single_node && !self.known.may_exist(room) {
            metrics::counter!("saferchat_unknown_room_lookups_total").increment(1);
            return Err(NodeError::NotFound(format!(
                "room {:?} does not exist",
                room.as_str()
            )));
        }
        Ok(())
    }
}

/// What the admin face needs.
#[derive(Debug)]
pub struct AdminContext {
    /// This node (named among a room's lease holders).
    pub me: saferchat_consensus::NodeId,
    /// Membership consensus.
    pub membership: Membership,
    /// The room list.
    pub store: Arc<dyn ChatStore>,
    /// Room existence filter.
    pub rooms: RoomFilter,
    /// The cluster map group (`ClusterStatus`).
    pub maps: crate::cluster_map::ClusterMaps,
    /// Listing rooms across the cluster, where this node's store does not
    /// hold every room (see `grpc/room_list.rs`).
    pub cluster_list: Option<crate::grpc::room_list::ClusterList>,
}

/// What the chat face needs, one per process.
#[derive(Debug)]
pub struct ChatContext {
    /// Configuration (limits).
    pub config: NodeConfig,
    /// Membership consensus.
    pub membership: Membership,
    /// Room hubs.
    pub rooms: Rooms,
    /// Rooms and timelines.
    pub store: Arc<dyn ChatStore>,
    /// Room existence filter.
    pub filter: RoomFilter,
    /// Session token keys.
    pub sessions: SessionKeys,
    /// Time.
    pub clock: Arc<dyn Clock>,
    /// Node shutdown.
    pub shutdown: CancellationToken,
    /// Which node serves which room.
    pub routing: Routing,
    /// How fast one member may post.
    pub post_rate: crate::post_rate::PostRate,
    next_session: AtomicU64,
    open_sessions: AtomicUsize,
    pending_joins: AtomicUsize,
    member_sessions: Mutex<HashMap<Handle, usize>>,
}

/// Counts a `Post` stream that has not proven its key yet, for as long as
/// it lives or until [`JoinSlot::into_session`]. Pending joins have their
/// own limit, so streams that never prove anything cannot take the slots
/// of members' sessions.
#[derive(Debug)]
pub struct JoinSlot {
    ctx: Arc<ChatContext>,
    /// This session's id.
    pub id: u64,
}

impl Drop for JoinSlot {
    fn drop(&mut self) {
        self.ctx.pending_joins.fetch_sub(1, Ordering::SeqCst);
    }
}

impl JoinSlot {
    /// The join of `member` was proven: it becomes a session, counted
    /// against `limits.sessions_max` and `limits.sessions_per_member_max`.
    ///
    /// # Errors
    /// `ResourceExhausted` at either limit.
    pub fn into_session(self, member: Handle) -> Result<SessionSlot, NodeError> {
        let mut slot = self.into_relayed_session()?;
        let limit = slot.ctx.config.limits.sessions_per_member_max;
        let mut counts = slot.ctx.member_sessions.lock().expect("lock");
        let count = counts.entry(member).or_insert(0);
        if *count >= limit {
            return Err(NodeError::ResourceExhausted(format!(
                "you have {limit} sessions on this node, the most one member may have; close one first"
            )));
        }
        *count += 1;
        drop(counts);
        slot.member = Some(member);
        Ok(slot)
    }

    /// A stream relayed to the node that serves its room (which checks the
    /// proof): a session here, counted against `limits.sessions_max` only.
    ///
    /// # Errors
    /// `ResourceExhausted` at `limits.sessions_max`.
    pub fn into_relayed_session(self) -> Result<SessionSlot, NodeError> {
        let ctx = Arc::clone(&self.ctx);
        let open = ctx.open_sessions.fetch_add(1, Ordering::SeqCst);
        let slot = SessionSlot {
            ctx,
            id: self.id,
            member: None,
        };
        if open >= slot.ctx.config.limits.sessions_max {
            return Err(NodeError::ResourceExhausted(format!(
                "this node serves at most {} sessions; try another node or later",
                slot.ctx.config.limits.sessions_max
            )));
        }
        Ok(slot)
    }
}

/// Counts an open session for as long as it lives.
#[derive(Debug)]
pub struct SessionSlot {
    ctx: Arc<ChatContext>,
    /// This session's id.
    pub id: u64,
    /// The member it counts for (none for a relayed stream).
    member: Option<Handle>,
}

impl Drop for SessionSlot {
    fn drop(&mut self) {
        self.ctx.open_sessions.fetch_sub(1, Ordering::SeqCst);
        if let Some(member) = self.member {
            let mut counts = self.ctx.member_sessions.lock().expect("lock");
            if let Some(count) = counts.get_mut(&member) {
                *count -= 1;
                if *count == 0 {
                    counts.remove(&member);
                }
            }
        }
    }
}

impl ChatContext {
    /// Assembles the context.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        config: NodeConfig,
        membership: Membership,
        rooms: Rooms,
        store: Arc<dyn ChatStore>,
        filter: RoomFilter,
        sessions: SessionKeys,
        clock: Arc<dyn Clock>,
        shutdown: CancellationToken,
        routing: Routing,
    ) -> ChatContext {
        let post_rate = crate::post_rate::PostRate::new(
            config.limits.posts_per_second,
            config.limits.posts_burst,
        );
        ChatContext {
            post_rate,
            config,
            membership,
            rooms,
            store,
            filter,
            sessions,
            clock,
            shutdown,
            routing,
            next_session: AtomicU64::new(1),
            open_sessions: AtomicUsize::new(0),
            pending_joins: AtomicUsize::new(0),
            member_sessions: Mutex::new(HashMap::new()),
        }
    }

    /// Takes a slot for a stream that has yet to prove its key, or refuses
    /// when too many are pending.
    ///
    /// # Errors
    /// `ResourceExhausted` at `limits.joins_pending_max`.
    pub fn open_join(self: &Arc<Self>) -> Result<JoinSlot, NodeError> {
        let pending = self.pending_joins.fetch_add(1, Ordering::SeqCst);
        let slot = JoinSlot {
            ctx: Arc::clone(self),
            id: self.next_session.fetch_add(1, Ordering::Relaxed),
        };
        if pending >= self.config.limits.joins_pending_max {
            return Err(NodeError::ResourceExhausted(format!(
                "this node has {} joins waiting for their proof; try another node or later",
                self.config.limits.joins_pending_max
            )));
        }
        Ok(slot)
    }

    /// Joins waiting for their proof right now.
    pub fn pending_joins(&self) -> usize {
        self.pending_joins.load(Ordering::SeqCst)
    }

    /// Sessions open right now.
    pub fn open_sessions(&self) -> usize {
        self.open_sessions.load(Ordering::SeqCst)
    }
}
