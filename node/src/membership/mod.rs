//! Room membership: the shell around the consensus core.
//!
//! [`Membership`] is a cheap handle; the [`driver`] task owns every room's
//! `RoomReplica`, feeds it requests, peer messages and ticks, and executes
//! its `Ready`: persist (durably), then send, reply and publish. A node
//! with no peers is a replica set of one and runs the same code.

pub mod driver;
pub mod remote;
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
    /// Its handover messages, by partition (see
    /// [`saferchat_consensus::handover`]).
    pub handover: Vec<(u32, saferchat_consensus::handover::HandoverMessage)>,
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

    /// Queues one handover message for `to`; may drop it (the mover
    /// resends until answered).
    ///
    /// # Errors
    /// [`TooLarge`] when no link could ever carry the message (a partition
    /// with more membership state than a split message holds).
    fn send_handover(
        &self,
        to: saferchat_consensus::NodeId,
        message: ppb::HandoverMessage,
    ) -> Result<(), TooLarge>;
}

/// A message larger than any peer link carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TooLarge {
    /// Its encoded size.
    pub bytes: usize,
    /// The most a link carries.
    pub max: usize,
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

    fn send_handover(
        &self,
        to: saferchat_consensus::NodeId,
        _message: ppb::HandoverMessage,
    ) -> Result<(), TooLarge> {
        tracing::warn!(%to, "dropping a handover message for a node that is not configured");
        Ok(())
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
    HandOver {
        step: HandoverStep,
        reply: oneshot::Sender<Result<(), NodeError>>,
    },
}

/// One step of a partition's move, as the mover runs it: the partition's
/// rooms go from the acceptor set `old` to `new` in map epoch `epoch`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HandoverStep {
    /// The partition.
    pub partition: u32,
    /// Its epoch after the step.
    pub epoch: u64,
    /// Its replicas before the step.
    pub old: Vec<saferchat_consensus::NodeId>,
    /// Its replicas after it.
    pub new: Vec<saferchat_consensus::NodeId>,
}

/// Handle to the membership driver.
#[derive(Clone, Debug)]
pub struct Membership {
    tx: mpsc::Sender<Command>,
    /// How to reach the replicas of rooms this node does not replicate
    /// (in a cluster larger than a partition's replica set).
    remote: Option<Arc<remote::Remote>>,
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
        Membership { tx, remote: None }
    }

    /// The same, asking `remote` replicas about rooms this node does not
    /// replicate.
    #[must_use]
    pub fn with_remote(mut self, remote: remote::Remote) -> Membership {
        self.remote = Some(Arc::new(remote));
        self
    }

    /// The same, answering only from this node's replicas (what the peer
    /// service serves other nodes with: it never forwards again).
    #[must_use]
    pub fn local(&self) -> Membership {
        Membership {
            tx: self.tx.clone(),
            remote: None,
        }
    }

    fn remote_for(
        &self,
        room: &RoomId,
    ) -> Option<(&remote::Remote, Vec<saferchat_consensus::NodeId>)> {
        let remote = self.remote.as_deref()?;
        remote.replicas_of(room).map(|r| (remote, r))
    }

    async fn ask_remote(
        remote: &remote::Remote,
        replicas: &[saferchat_consensus::NodeId],
        room: &RoomId,
        op: ppb::MembershipOp,
        fill: impl FnOnce(&mut ppb::MembershipCall),
    ) -> Result<(ppb::MembershipAnswer, Arc<RoomState>), NodeError> {
        let mut call = ppb::MembershipCall {
            room: room.as_str().to_owned(),
            op: op as i32,
            ..ppb::MembershipCall::default()
        };
        fill(&mut call);
        let (answer, replica) = remote.call(replicas, call).await?;
        let state = answer
            .state
            .as_ref()
            .ok_or_else(|| {
                NodeError::Unavailable(format!("replica {replica} answered without a state"))
            })
            .and_then(crate::convert::state_from_pb)?;
        metrics::counter!("saferchat_membership_forwarded_total").increment(1);
        Ok((answer, Arc::new(state)))
    }

    async fn ask<T>(
        &self,
        make: impl FnOnce(oneshot::Sender<T>) -> Command,
    ) -> Result<T, NodeError> {
        let (reply, rx) = oneshot::channel();
        self.tx.send(make(reply)).await.map_err(|_| stopped())?;
        rx.await.map_err(|_| stopped())
    }

    /// Runs one step of a partition's move with this node as the mover
    /// (see [`saferchat_consensus::handover`]); returns once a majority of
    /// the new set is installed (the driver goes on sending to the rest).
    ///
    /// # Errors
    /// [`NodeError::Unavailable`] when a later step sealed the partition
    /// first, another step of the partition replaced this one here, or the
    /// node is shutting down; [`NodeError::Fatal`] when the transfer record
    /// cannot be made durable.
    pub async fn hand_over(&self, step: HandoverStep) -> Result<(), NodeError> {
        self.ask(|reply| Command::HandOver { step, reply }).await?
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
        self.change_with_id(room, change, expected, change_id())
            .await
    }

    /// [`Membership::change`] with the change's id chosen by the caller
    /// (a retry with the same id is applied once).
    ///
    /// # Errors
    /// As [`Membership::change`].
    pub async fn change_with_id(
        &self,
        room: &RoomId,
        change: Change,
        expected: Option<Revision>,
        id: ChangeId,
    ) -> Result<(Applied, Arc<RoomState>), NodeError> {
        if let Some((remote, replicas)) = self.remote_for(room) {
            let (op, handle, key) = match &change {
                Change::Create => (ppb::MembershipOp::Create, None, None),
                Change::Add(h) => (ppb::MembershipOp::Add, Some(*h), None),
                Change::Remove(h) => (ppb::MembershipOp::Remove, Some(*h), None),
                Change::RegisterKey(h, k) => (
                    ppb::MembershipOp::RegisterKey,
                    Some(*h),
                    Some(k.der().clone()),
                ),
                Change::Read => (ppb::MembershipOp::Read, None, None),
            };
            let (answer, state) = Self::ask_remote(remote, &replicas, room, op, |c| {
                c.handle = handle
                    .map(|h| bytes::Bytes::copy_from_slice(h.as_bytes()))
                    .unwrap_or_default();
                c.public_key = key.unwrap_or_default();
                c.expected = expected.map(|r| r.0);
                c.change_id = bytes::Bytes::copy_from_slice(&id.0.to_be_bytes());
            })
            .await?;
            let applied = Applied {
                changed: answer.changed,
                revision: state.revision,
            };
            return Ok((applied, state));
        }
        let proposal = Proposal {
            id,
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
        if let Some((remote, replicas)) = self.remote_for(room) {
            let op = ppb::MembershipOp::Read;
            return Ok(Self::ask_remote(remote, &replicas, room, op, |_| {})
                .await?
                .1);
        }
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
        if self.remote_for(room).is_some() {
            return Err(NodeError::FailedPrecondition(format!(
                "this node does not replicate room {:?}: it cannot hold a lease on it",
                room.as_str()
            )));
        }
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
        if let Some((remote, replicas)) = self.remote_for(room) {
            let op = ppb::MembershipOp::Status;
            let (answer, state) = Self::ask_remote(remote, &replicas, room, op, |_| {}).await?;
            return Ok(Status {
                state,
                read_path: "forwarded to a replica",
                lease: LeaseStatus {
                    local_read: false,
                    promised_to: answer
                        .promised_to
                        .iter()
                        .map(|n| saferchat_consensus::NodeId(*n))
                        .collect(),
                },
            });
        }
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
