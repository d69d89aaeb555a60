//! Room membership: the shell around the consensus core.
//!
//! [`Membership`] is a cheap handle; the [`driver`] task owns every room's
//! `RoomReplica`, feeds it requests, peer messages and ticks, and executes
//! its `Ready`: persist (durably), then send, reply and publish. A node
//! with no peers is a replica set of one and runs the same code.

pub mod driver;
pub mod view;

use std::sync::Arc;

use saferchat_consensus::{
    Applied, Change, ChangeError, ChangeId, LeaseStatus, Outcome, Proposal, Revision, RoomId,
    RoomState,
};
use saferchat_proto::peer as ppb;
use tokio::sync::{mpsc, oneshot, watch};

use crate::error::NodeError;
pub use view::View;

/// Commands queued for the driver, at most.
pub const COMMAND_QUEUE_MAX: usize = 8192;

/// Messages from one peer, as received.
#[derive(Debug)]
pub struct Inbound {
    /// The sending node.
    pub from: saferchat_consensus::NodeId,
    /// Its messages, decoded and checked at the edge.
    pub messages: Vec<(saferchat_consensus::RoomId, saferchat_consensus::Message)>,
}

/// Sends consensus messages to other nodes. Sending never blocks and may
/// lose messages (a full queue, a broken connection): the protocol
/// tolerates loss.
pub trait PeerSender: Send + Sync + 'static {
    /// Queues `message` for `to`.
    fn send(&self, to: saferchat_consensus::NodeId, message: ppb::RoomMessage);

    /// Queues one partition-log message for `to`; may drop it (the
    /// partition log tolerates loss).
    fn send_log(&self, to: saferchat_consensus::NodeId, message: ppb::PartitionMessage);
}

/// A node with no peers.
#[derive(Debug, Default)]
pub struct NoPeers;

impl PeerSender for NoPeers {
    fn send(&self, to: saferchat_consensus::NodeId, _message: ppb::RoomMessage) {
        tracing::warn!(%to, "dropping a consensus message for a node that is not configured");
    }

    fn send_log(&self, to: saferchat_consensus::NodeId, _message: ppb::PartitionMessage) {
        tracing::warn!(%to, "dropping a partition-log message for a node that is not configured");
    }
}

/// A room's membership with its lease facts, for operators.
#[derive(Clone, Debug)]
pub struct Status {
    /// The state read.
    pub state: Arc<RoomState>,
    /// Whether it was read locally under a lease ("lease") or by a
    /// consensus round ("quorum").
    pub read_path: &'static str,
    /// Lease facts from this node.
    pub lease: LeaseStatus,
}

#[derive(Debug)]
pub(crate) enum Command {
    Propose {
        room: RoomId,
        proposal: Proposal,
        reply: oneshot::Sender<Outcome>,
    },
    Read {
        room: RoomId,
        reply: oneshot::Sender<Result<(Arc<RoomState>, &'static str), NodeError>>,
    },
    Watch {
        room: RoomId,
        reply: oneshot::Sender<watch::Receiver<View>>,
    },
    Status {
        room: RoomId,
        reply: oneshot::Sender<Result<Status, NodeError>>,
    },
}

/// Handle to the membership driver.
#[derive(Clone, Debug)]
pub struct Membership {
    tx: mpsc::Sender<Command>,
}

fn stopped() -> NodeError {
    NodeError::Unavailable("membership service is shutting down".into())
}

/// A fresh change id: random, so retries by different callers never
/// collide.
fn change_id() -> ChangeId {
    ChangeId(rand::random())
}

/// Maps a refused change to the error a client sees.
pub fn change_error(room: &RoomId, e: ChangeError) -> NodeError {
    match e {
        ChangeError::RoomNotFound => NodeError::NotFound(format!("room {room:?} does not exist")),
        ChangeError::RoomExists => {
            NodeError::AlreadyExists(format!("room {room:?} already exists"))
        }
        ChangeError::NotMember => {
            NodeError::NotFound(format!("user is not a member of room {room:?}"))
        }
        ChangeError::RoomFull | ChangeError::RevisionsExhausted => {
            NodeError::ResourceExhausted(format!("room {room:?}: {e}"))
        }
        ChangeError::KeyConflict => NodeError::FailedPrecondition(format!("room {room:?}: {e}")),
        ChangeError::RevisionMismatch { current } => NodeError::FailedPrecondition(format!(
            "room {room:?} is at revision {current}, not the expected one"
        )),
    }
}

impl Membership {
    pub(crate) fn new(tx: mpsc::Sender<Command>) -> Membership {
        Membership { tx }
    }

    async fn ask<T>(
        &self,
        make: impl FnOnce(oneshot::Sender<T>) -> Command,
    ) -> Result<T, NodeError> {
        let (reply, rx) = oneshot::channel();
        self.tx.send(make(reply)).await.map_err(|_| stopped())?;
        rx.await.map_err(|_| stopped())
    }

    /// Commits a change through consensus.
    ///
    /// # Errors
    /// The change's own refusal (mapped by [`change_error`]), or
    /// `Unavailable` when no quorum committed it in time — in which case
    /// it may still have been applied.
    pub async fn change(
        &self,
        room: &RoomId,
        change: Change,
        expected: Option<Revision>,
    ) -> Result<(Applied, Arc<RoomState>), NodeError> {
        let proposal = Proposal {
            id: change_id(),
            change,
            expected,
        };
        let started = std::time::Instant::now();
        let outcome = self
            .ask(|reply| Command::Propose {
                room: room.clone(),
                proposal,
                reply,
            })
            .await?;
        metrics::histogram!("saferchat_membership_change_seconds")
            .record(started.elapsed().as_secs_f64());
        match outcome {
            Outcome::Decided {
                result: Ok(applied),
                state,
            } => Ok((applied, state)),
            Outcome::Decided { result: Err(e), .. } => Err(change_error(room, e)),
            Outcome::Unavailable => Err(NodeError::Unavailable(format!(
                "membership of room {:?} could not reach a quorum in time; the change may or may not have been applied",
                room.as_str()
            ))),
        }
    }

    /// A linearizable read of the room's membership: local under a valid
    /// lease, otherwise a consensus round. A room that was never created
    /// reads as a state with `created == false`.
    ///
    /// # Errors
    /// `Unavailable` when neither is possible in time.
    pub async fn read(&self, room: &RoomId) -> Result<Arc<RoomState>, NodeError> {
        let started = std::time::Instant::now();
        let (state, path) = self
            .ask(|reply| Command::Read {
                room: room.clone(),
                reply,
            })
            .await??;
        metrics::histogram!("saferchat_membership_read_seconds", "path" => path)
            .record(started.elapsed().as_secs_f64());
        Ok(state)
    }

    /// Subscribes to the room's [`View`]. While any subscription is alive
    /// this node (if it is a lease holder) keeps a lease on the room.
    ///
    /// # Errors
    /// `Unavailable` when the driver has stopped.
    pub async fn watch(&self, room: &RoomId) -> Result<watch::Receiver<View>, NodeError> {
        self.ask(|reply| Command::Watch {
            room: room.clone(),
            reply,
        })
        .await
    }

    /// Membership plus lease facts, for the admin face.
    ///
    /// # Errors
    /// As [`Membership::read`].
    pub async fn status(&self, room: &RoomId) -> Result<Status, NodeError> {
        let started = std::time::Instant::now();
        let status = self
            .ask(|reply| Command::Status {
                room: room.clone(),
                reply,
            })
            .await??;
        metrics::histogram!("saferchat_membership_read_seconds", "path" => status.read_path)
            .record(started.elapsed().as_secs_f64());
        Ok(status)
    }
}
