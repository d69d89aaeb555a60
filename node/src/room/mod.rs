//! Room hubs: one task per active room.
//!
//! The [`actor`] of a room checks each post against the membership it may
//! read under its lease. On a single node it is the only writer of the
//! room's timeline: it gives each post its id and sequence number, appends
//! a batch to storage, and only after storage says the batch is durable
//! acknowledges the posts and fans them out to the room's sessions. In a
//! cluster it runs on the leader of the room's partition and hands posts
//! to the replicated timeline ([`crate::timeline`]), acknowledges each once
//! a quorum has it and it is applied here, and fans out every post the
//! timeline applies to the room, in order. [`Rooms`] finds or starts the
//! actor of a room; an actor with no sessions stops after a while.

pub mod actor;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use saferchat_consensus::{Handle, RoomId, RoomState};
use saferchat_envelope::Envelope;
use saferchat_envelope::sealed::Fanout;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use crate::clock::Clock;
use crate::config::Limits;
use crate::error::NodeError;
use crate::membership::Membership;
use crate::message_id::MessageId;
use crate::storage::ChatStore;

/// Identifies one chat session on this node.
pub type SessionId = u64;

/// A stored post on its way to recipients. Shared by every session that
/// receives it; each builds only its own sealed envelope.
#[derive(Debug)]
pub struct Posted {
    /// The server-assigned id.
    pub id: MessageId,
    /// The room's sequence number.
    pub seq: u64,
    /// The per-recipient builder.
    pub fanout: Fanout,
}

/// What a room sends to one session, in order.
#[derive(Debug)]
pub enum Live {
    /// A message to deliver (if the session's member is a recipient).
    Deliver(Arc<Posted>),
    /// The outcome of one of this session's posts.
    Result(PostOutcome),
    /// The membership changed.
    Membership(Arc<RoomState>),
    /// The session ends with this error (sent last).
    Close(NodeError),
}

/// The outcome of one post.
#[derive(Debug)]
pub enum PostOutcome {
    /// Durably stored; on its way to every recipient.
    Accepted {
        /// Echo of the client's sequence number.
        client_seq: u64,
        /// The id.
        id: MessageId,
        /// The room's sequence number.
        seq: u64,
    },
    /// Refused; stored nowhere.
    Rejected {
        /// Echo of the client's sequence number.
        client_seq: u64,
        /// Why.
        error: NodeError,
        /// The current membership, when the refusal is about it.
        state: Option<Arc<RoomState>>,
    },
}

/// A request to a room actor.
// Posts are nearly all of a room's commands: boxing the decoded envelope
// to shrink the rare ones would add an allocation to every post.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
pub enum RoomCommand {
    /// Start delivering to a session. Replies with the newest message
    /// delivered so far, its id and sequence number (0: none): history up
    /// to it, live messages after it.
    Attach {
        /// The session.
        session: SessionId,
        /// Its member.
        user: Handle,
        /// Where to send.
        live: mpsc::Sender<Live>,
        /// The answer.
        reply: oneshot::Sender<Result<(Option<MessageId>, u64), NodeError>>,
    },
    /// Stop delivering to a session.
    Detach {
        /// The session.
        session: SessionId,
    },
    /// Post an envelope.
    Post {
        /// The posting session.
        session: SessionId,
        /// Its member.
        user: Handle,
        /// The client's sequence number.
        client_seq: u64,
        /// The decoded envelope.
        envelope: Envelope,
        /// The envelope as received, stored verbatim.
        raw: Bytes,
        /// When to acknowledge it.
        durability: crate::timeline::Durability,
    },
}

/// What every room actor shares.
#[derive(Clone, Debug)]
pub struct RoomDeps {
    /// Timeline store.
    pub store: Arc<dyn ChatStore>,
    /// Membership reads.
    pub membership: Membership,
    /// Time.
    pub clock: Arc<dyn Clock>,
    /// Limits.
    pub limits: Limits,
    /// Node shutdown.
    pub shutdown: CancellationToken,
    /// The replicated timeline, in a cluster; `None` on a single node,
    /// whose actors place and store posts themselves.
    pub timeline: Option<crate::timeline::Timeline>,
    /// Which partition a room is in.
    pub placement: Arc<saferchat_placement::Placement>,
}

/// Finds or starts room actors.
#[derive(Clone, Debug)]
pub struct Rooms {
    deps: RoomDeps,
    actors: Arc<Mutex<HashMap<RoomId, mpsc::Sender<RoomCommand>>>>,
}

impl Rooms {
    /// An empty registry.
    pub fn new(deps: RoomDeps) -> Rooms {
        Rooms {
            deps,
            actors: Arc::new(Mutex::new(HashMap::new())),
        }
    }

    fn sender(&self, room: &RoomId) -> mpsc::Sender<RoomCommand> {
        let mut actors = self.actors.lock().expect("lock");
        if let Some(tx) = actors.get(room)
            && !tx.is_closed()
        {
            return tx.clone();
        }
        let (tx, rx) = mpsc::channel(self.deps.limits.room_queue_max);
        actors.insert(room.clone(), tx.clone());
        tokio::spawn(actor::run(
            room.clone(),
            rx,
            tx.downgrade(),
            self.deps.clone(),
            Arc::clone(&self.actors),
        ));
        tx
    }

    /// Sends a command to the room's actor, starting one if needed. Waits
    /// while the room's queue is full (back-pressure on the sender).
    ///
    /// # Errors
    /// `Unavailable` if the actor keeps stopping under our feet.
    pub async fn send(&self, room: &RoomId, mut command: RoomCommand) -> Result<(), NodeError> {
        // An actor may stop (idle) between lookup and send; then the send
        // fails and a fresh actor is started. Twice is plenty.
        for _ in 0..3 {
            match self.sender(room).send(command).await {
                Ok(()) => return Ok(()),
                Err(mpsc::error::SendError(back)) => command = back,
            }
        }
        Err(NodeError::Unavailable(format!(
            "room {room:?} is restarting; try again"
        )))
    }

    /// Number of running room actors.
    pub fn active(&self) -> usize {
        self.actors.lock().expect("lock").len()
    }
}
