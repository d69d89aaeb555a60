//! The replicated timeline of a cluster: every partition's posts go
//! through its partition log (`saferchat_consensus::partition_log`), whose
//! leader is the owner of the partition's rooms.
//!
//! - A room actor on the leader checks posts and hands them to
//!   [`Timeline::append`]; the [`driver`] appends them to the log. Once a
//!   quorum of the partition's replicas has them durably (each replica
//!   `fdatasync`s its partition-log file before it answers), the slot
//!   commits.
//! - Every replica applies committed slots in slot order to its own
//!   timeline store: [`tail::RoomTail`] gives each post its id and the
//!   room's next sequence number, the same on every replica, and
//!   recognises retries. The leader acknowledges a post once it is applied
//!   there, and every applied post is handed to the room's actor on that
//!   node ([`Timeline::subscribe`]) for live delivery.
//! - [`Leaders`] says which node leads each partition, as far as this node
//!   knows; routing sends clients there.
//!
//! A node with no peers does not use any of this: a cluster of one needs
//! no quorum, its timeline store is its durable log, and its room actors
//! place posts with [`tail::RoomTail`] themselves.

pub mod copy;
pub mod driver;
pub mod tail;

/// A structurally valid envelope of `room` from one fixed sender, distinct
/// per `n` (its nonce): what the driver and tail tests post.
#[cfg(test)]
pub(crate) fn test_envelope(room: &RoomId, n: u32) -> bytes::Bytes {
    use saferchat_consensus::{Handle, Revision};
    use saferchat_envelope::{Envelope, WrappedKey};
    let member = Handle::of_modulus(&[7; 256]);
    let mut nonce = [0u8; 12];
    nonce[..4].copy_from_slice(&n.to_be_bytes());
    Envelope {
        room: room.clone(),
        sender: member,
        revision: Revision(2),
        nonce,
        ciphertext: bytes::Bytes::from(vec![9u8; 64]),
        keys: vec![WrappedKey {
            recipient: member,
            wrapped: bytes::Bytes::from(vec![1u8; 256]),
        }],
        signature: bytes::Bytes::from(vec![5u8; 256]),
        chain: None,
    }
    .encode()
}

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use saferchat_consensus::{NodeId, RoomId};
use saferchat_envelope::Envelope;
use tokio::sync::{mpsc, oneshot, watch};

use crate::error::NodeError;
use crate::message_id::MessageId;
use tail::Sequenced;

/// A post as the partition log carries it.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct LogPost {
    /// Its room.
    pub room: RoomId,
    /// The leader's clock when appended: the id's time, unless the room's
    /// last id is later.
    pub proposed_ms: i64,
    /// The id's randomness.
    pub seed: u64,
    /// The node whose client posted it and that node's token for it.
    pub origin: (NodeId, u64),
    /// The envelope as posted.
    pub envelope: Bytes,
    /// Placed only as a retry of a post its room already holds (the same
    /// sender and nonce), and refused otherwise: the leader found it
    /// wrapped for an earlier membership revision, as the retry of a post
    /// first appended under that revision is, whose first attempt may
    /// still be in the log (recovered by a new leader after the one it
    /// was sent to lost the lead). Every replica decides alike, at apply;
    /// refused before, the retry made the client wrap the message again
    /// and the room held it twice.
    pub retry_only: bool,
}

/// When a post is acknowledged (the chat protocol's `Durability`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Durability {
    /// Durable on a majority of the partition's voters (its replicas in
    /// its home datacenter).
    #[default]
    Local,
    /// Also durable on a majority of the partition's replicas in at least
    /// one other datacenter (`LogReplica::stored_by`).
    CrossDatacenter,
}

/// A post applied to this node's timeline, for live delivery.
#[derive(Debug)]
pub struct AppliedPost {
    /// Its id.
    pub id: MessageId,
    /// Its sequence number.
    pub seq: u64,
    /// The envelope.
    pub envelope: Envelope,
}

/// Which node leads each partition, as far as this node knows.
#[derive(Debug)]
pub struct Leaders {
    map: Mutex<HashMap<u32, NodeId>>,
    changed: watch::Sender<u64>,
}

impl Default for Leaders {
    fn default() -> Self {
        Leaders {
            map: Mutex::new(HashMap::new()),
            changed: watch::channel(0).0,
        }
    }
}

impl Leaders {
    /// The leader of `partition`, if known.
    pub fn get(&self, partition: u32) -> Option<NodeId> {
        self.map.lock().expect("lock").get(&partition).copied()
    }

    /// Notified on every change.
    pub fn watch(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }

    fn set(&self, partition: u32, leader: Option<NodeId>) {
        let mut map = self.map.lock().expect("lock");
        let old = match leader {
            Some(l) => map.insert(partition, l),
            None => map.remove(&partition),
        };
        drop(map);
        if old != leader {
            self.changed.send_modify(|n| *n += 1);
        }
    }
}

/// What room actors may ask of the driver.
#[derive(Debug)]
pub(crate) enum Command {
    Append {
        partition: u32,
        posts: Vec<LogPost>,
        durability: Vec<Durability>,
        replies: Vec<oneshot::Sender<Result<Sequenced, NodeError>>>,
    },
    Touch {
        partition: u32,
    },
    /// The partition's applied (and synced) mark and the failover epoch
    /// its timeline is checked against; `None` when this node does not
    /// replicate it.
    Applied {
        partition: u32,
        reply: oneshot::Sender<Option<(saferchat_consensus::partition_log::Slot, u64)>>,
    },
    /// Whether this node may answer reads of the partition from its own
    /// copy (see [`Timeline::reads_locally`]).
    ReadsLocally {
        partition: u32,
        reply: oneshot::Sender<bool>,
    },
    /// The epoch this node leads the partition's log in, if it
    /// established it (`LogReplica::established`) and `with` caught up
    /// (`LogReplica::has_caught_up`).
    Established {
        partition: u32,
        with: Option<NodeId>,
        reply: oneshot::Sender<Option<Established>>,
    },
}

/// A leader's establishment of its partition's epoch
/// ([`Timeline::established`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Established {
    /// The epoch it was elected and established in.
    pub epoch: u64,
    /// Whether that epoch is a home failover's (its elections still read
    /// the replicas outside the new home).
    pub failover: bool,
    /// In a failover epoch, the other replicas whose timelines its
    /// election showed to be a prefix of its log, by node id, with the
    /// prefix each had released
    /// (`saferchat_consensus::partition_log::LogReplica::vouched`).
    pub vouched: std::collections::BTreeMap<u64, u64>,
}

type Subscribers = Arc<Mutex<HashMap<RoomId, Vec<mpsc::UnboundedSender<Arc<AppliedPost>>>>>>;

/// A cheap handle on the timeline driver.
#[derive(Clone, Debug)]
pub struct Timeline {
    me: NodeId,
    tx: mpsc::Sender<Command>,
    leaders: Arc<Leaders>,
    subscribers: Subscribers,
}

fn stopped() -> NodeError {
    NodeError::Unavailable("the timeline service is shutting down".into())
}

impl Timeline {
    /// This node.
    pub fn me(&self) -> NodeId {
        self.me
    }

    /// Who leads what.
    pub fn leaders(&self) -> &Arc<Leaders> {
        &self.leaders
    }

    /// Whether this node leads `partition`.
    pub fn leads(&self, partition: u32) -> bool {
        self.leaders.get(partition) == Some(self.me)
    }

    /// Appends posts to `partition`'s log; each answer comes once the post
    /// is committed and applied here, and for a post of
    /// [`Durability::CrossDatacenter`] once another datacenter holds it
    /// too (or with the error that stopped it: then it may still commit
    /// under another leader, and a retry of the same envelope is
    /// recognised). `durability` is each post's level, in order (a post
    /// without one is [`Durability::Local`]).
    ///
    /// # Errors
    /// `Unavailable` when the driver has stopped.
    pub async fn append(
        &self,
        partition: u32,
        posts: Vec<LogPost>,
        mut durability: Vec<Durability>,
    ) -> Result<Vec<oneshot::Receiver<Result<Sequenced, NodeError>>>, NodeError> {
        durability.resize(posts.len(), Durability::Local);
        let (replies, receivers): (Vec<_>, Vec<_>) =
            posts.iter().map(|_| oneshot::channel()).unzip();
        self.tx
            .send(Command::Append {
                partition,
                posts,
                durability,
                replies,
            })
            .await
            .map_err(|_| stopped())?;
        Ok(receivers)
    }

    /// What a copy from this node starts from: the partition's applied
    /// mark and the latest home failover epoch its timeline is checked
    /// against (`copy::RoomsPage`); `None` when this node does not
    /// replicate it.
    ///
    /// # Errors
    /// `Unavailable` when the driver has stopped.
    pub async fn copy_mark(
        &self,
        partition: u32,
    ) -> Result<Option<(saferchat_consensus::partition_log::Slot, u64)>, NodeError> {
        let (reply, answer) = oneshot::channel();
        self.tx
            .send(Command::Applied { partition, reply })
            .await
            .map_err(|_| stopped())?;
        answer.await.map_err(|_| stopped())
    }

    /// Whether this node may answer history reads of `partition` from its
    /// own timeline store: it is one of the partition's learners (a
    /// replica outside its home datacenter), has heard from a leader
    /// since it started, and has applied every slot it heard committed
    /// (`LogReplica::caught_up_with_heard`), so its copy trails the home
    /// only by what is in flight. False on voters (they are next to the
    /// leader, which reads fresher), on a node that does not replicate
    /// the partition or has not loaded it, and while a copy is under way.
    ///
    /// # Errors
    /// `Unavailable` when the driver has stopped.
    pub async fn reads_locally(&self, partition: u32) -> Result<bool, NodeError> {
        let (reply, answer) = oneshot::channel();
        self.tx
            .send(Command::ReadsLocally { partition, reply })
            .await
            .map_err(|_| stopped())?;
        answer.await.map_err(|_| stopped())
    }

    /// The epoch in which this node leads `partition`'s log and has
    /// established it: it committed, in that epoch, everything it
    /// recovered (what the cluster map's `Establish` stands for), and
    /// `with`, if named, holds all of that too (the node a grow added);
    /// with the replicas its election vouched for in a failover epoch.
    /// `None` when it does not lead, or not yet.
    ///
    /// # Errors
    /// `Unavailable` when the driver has stopped.
    pub async fn established(
        &self,
        partition: u32,
        with: Option<NodeId>,
    ) -> Result<Option<Established>, NodeError> {
        let (reply, answer) = oneshot::channel();
        self.tx
            .send(Command::Established {
                partition,
                with,
                reply,
            })
            .await
            .map_err(|_| stopped())?;
        answer.await.map_err(|_| stopped())
    }

    /// A client wants `partition`: elect a leader if it has none.
    pub fn touch(&self, partition: u32) {
        let _ = self.tx.try_send(Command::Touch { partition });
    }

    /// Every post applied to `room` on this node from now on, in order.
    pub fn subscribe(&self, room: &RoomId) -> mpsc::UnboundedReceiver<Arc<AppliedPost>> {
        let (tx, rx) = mpsc::unbounded_channel();
        self.subscribers
            .lock()
            .expect("lock")
            .entry(room.clone())
            .or_default()
            .push(tx);
        rx
    }
}
