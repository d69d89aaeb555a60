//! The storage contract.
//!
//! Two traits, because they have different owners:
//!
//! - [`AcceptorStore`]: this node's Paxos votes. Always local (sled, or
//!   memory in tests): a vote is only worth something if it survives this
//!   node's crash, and sharing it through a database would make two nodes'
//!   votes one failure domain.
//! - [`ChatStore`]: the committed membership of rooms (`chat_details`) and
//!   the message timeline (`timeline`), shaped after the Cassandra schema in
//!   MISSION.md: rows keyed by room, time bucket (`yyyy-MM`) and a
//!   time-ordered id. sled mirrors it for the single-node deployment.
//!
//! What correctness requires of every implementation is written on each
//! method and checked by the suite in [`conformance`] (feature
//! `conformance`), which every store runs unchanged.

pub mod cassandra;
pub mod durable;
pub mod envelope_log;
pub mod log_store;
pub mod memory;
pub mod sled;

#[cfg(any(test, feature = "conformance"))]
pub mod conformance;

use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use saferchat_consensus::handover::{PartitionSeal, TransferRecord};
use saferchat_consensus::{AcceptorState, Ballot, RoomId, RoomState};

use crate::error::NodeError;
use crate::message_id::{Bucket, MessageId};

/// One stored message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredMessage {
    /// The room.
    pub room: RoomId,
    /// Server-assigned, time-ordered id; its time picks the bucket.
    pub id: MessageId,
    /// The room's gapless sequence number: 1 for its first message, one
    /// more for each next (0 for messages stored before sequence numbers
    /// existed).
    pub seq: u64,
    /// The envelope exactly as posted (ciphertext only).
    pub envelope: Bytes,
}

/// Which part of one bucket to read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Range {
    /// Newest first, ids strictly below the given one (all when `None`).
    Before(Option<MessageId>),
    /// Oldest first, ids strictly above the given one (all when `None`).
    After(Option<MessageId>),
}

/// A committed room state and the ballot of the round that committed it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CommittedRoom {
    /// The committing ballot.
    pub ballot: Ballot,
    /// The membership.
    pub state: Arc<RoomState>,
}

/// A line of the room list.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RoomSummary {
    /// The room.
    pub room: RoomId,
    /// Its committed revision.
    pub revision: u64,
    /// How many members it has.
    pub members: u32,
}

/// This node's durable Paxos acceptor state, per room.
#[async_trait]
pub trait AcceptorStore: Send + Sync + std::fmt::Debug + 'static {
    /// The last saved state of `room`, `None` if never saved.
    async fn load_acceptor(&self, room: &RoomId) -> Result<Option<AcceptorState>, NodeError>;

    /// Saves states. When this returns `Ok`, every state in the batch is
    /// durable (survives a crash of this process and of the machine); a
    /// later load returns the last state saved for a room.
    async fn save_acceptors(&self, batch: &[(RoomId, AcceptorState)]) -> Result<(), NodeError>;

    /// Saved states in room-name order, starting after `after`, at most
    /// `limit`: a handover's seal reports every room of a partition this
    /// node holds a vote for, and names cannot be listed per partition
    /// (the partition is a hash of the name), so the seal walks them all.
    async fn list_acceptors(
        &self,
        after: Option<&RoomId>,
        limit: usize,
    ) -> Result<Vec<(RoomId, AcceptorState)>, NodeError>;

    /// This node's handover state of `partition` (never sealed: the
    /// default).
    async fn load_partition_seal(&self, partition: u32) -> Result<PartitionSeal, NodeError>;

    /// Saves a partition's handover state and the room states the same
    /// seal or transfer changed. Durable when this returns `Ok`.
    async fn save_partition_seal(
        &self,
        partition: u32,
        seal: &PartitionSeal,
        rooms: &[(RoomId, AcceptorState)],
    ) -> Result<(), NodeError>;

    /// The values this node, as a mover, transfers for `partition`, once
    /// recorded.
    async fn load_transfer(&self, partition: u32) -> Result<Option<TransferRecord>, NodeError>;

    /// Records them, durably, before the first transfer leaves the node
    /// (a later step's record replaces an earlier one).
    async fn save_transfer(&self, partition: u32, record: &TransferRecord)
    -> Result<(), NodeError>;
}

/// Rooms and their timelines.
#[async_trait]
pub trait ChatStore: Send + Sync + std::fmt::Debug + 'static {
    /// The committed membership of `room`, if stored.
    async fn load_room(&self, room: &RoomId) -> Result<Option<CommittedRoom>, NodeError>;

    /// Stores a committed membership if its revision is higher than the
    /// stored one (or none is stored): compare-and-set on the revision, so
    /// that a late writer never moves a room back. Returns whether it wrote.
    async fn save_room(&self, room: &RoomId, committed: &CommittedRoom) -> Result<bool, NodeError>;

    /// Rooms in name order, starting after `after`, at most `limit`.
    async fn list_rooms(
        &self,
        after: Option<&RoomId>,
        limit: usize,
    ) -> Result<Vec<RoomSummary>, NodeError>;

    /// Appends messages. When this returns `Ok`, all are durable. Appending
    /// a message whose `(room, id)` is already stored stores it once.
    async fn append(&self, batch: &[StoredMessage]) -> Result<(), NodeError>;

    /// Appends like [`ChatStore::append`], but may return before the
    /// messages are durable: reads see them at once, and they are durable
    /// once a later [`ChatStore::sync_appended`] returns. For a writer
    /// whose messages are already durable elsewhere (a partition's
    /// replicas apply committed log entries, which a quorum synced before
    /// anyone was answered): it pays one sync for many batches, and says
    /// what it applied only after that sync. Stores without a cheaper path
    /// append durably.
    async fn append_unsynced(&self, batch: &[StoredMessage]) -> Result<(), NodeError> {
        self.append(batch).await
    }

    /// Makes every earlier [`ChatStore::append_unsynced`] durable.
    async fn sync_appended(&self) -> Result<(), NodeError> {
        Ok(())
    }

    /// The buckets `room` has messages in, oldest first.
    async fn buckets(&self, room: &RoomId) -> Result<Vec<Bucket>, NodeError>;

    /// Rooms that have messages stored, at most `limit`, in an order the
    /// store keeps (not necessarily name order), starting after `after` in
    /// that order. Every room with a message is listed once over the pages,
    /// including rooms [`ChatStore::list_rooms`] does not know (it lists
    /// saved memberships, which a replica may lack while it has the room's
    /// posts): copying a partition's timeline walks this.
    async fn rooms_with_messages(
        &self,
        after: Option<&RoomId>,
        limit: usize,
    ) -> Result<Vec<RoomId>, NodeError>;

    /// Deletes every message of `room` with an id above `after` (every
    /// message when `None`), durably: when this returns `Ok`, a restart
    /// does not bring them back. Returns how many it deleted. Messages
    /// appended later are stored and read as if the deleted ones had never
    /// been, under any id, a deleted one's included.
    ///
    /// Why: a replica of a partition whose home datacenter failed over may
    /// hold posts its old home released that the new home replaced (a
    /// divergent tail). It cuts its copy back to the last message it shares
    /// with the new home before copying the rest (see `timeline/copy.rs`),
    /// since a copy only ever appends after the newest message it has.
    ///
    /// Afterwards [`ChatStore::buckets`] and
    /// [`ChatStore::rooms_with_messages`] no longer list a bucket or a room
    /// left without messages, except in a [shared](ChatStore::shared)
    /// store: there other nodes remember which buckets they indexed and
    /// would not index one again, so its index keeps them (a listed bucket
    /// without messages reads as empty). A message appended while this
    /// runs may or may not be deleted. A call that fails may have deleted
    /// some of the messages, newest first: the room keeps a prefix of its
    /// timeline.
    async fn truncate_room(
        &self,
        room: &RoomId,
        after: Option<MessageId>,
    ) -> Result<u64, NodeError>;

    /// Whether the nodes of the cluster share this store (one Cassandra
    /// keyspace, each node reading and writing its datacenter's replicas):
    /// a replica behind its partition's log then needs no copy from a
    /// replica of its own datacenter, only the mark of what is in it (see
    /// `timeline/copy.rs`).
    fn shared(&self) -> bool {
        false
    }

    /// Up to `limit` messages of one bucket of `room`, in the order
    /// `range` asks for.
    async fn read_bucket(
        &self,
        room: &RoomId,
        bucket: Bucket,
        range: Range,
        limit: usize,
    ) -> Result<Vec<StoredMessage>, NodeError>;
}

/// Reads up to `limit` messages of `room` across buckets: newest first for
/// [`Range::Before`], oldest first for [`Range::After`]. Buckets are walked
/// from the one the bound falls in, so a page never touches partitions it
/// does not need.
///
/// # Errors
/// Whatever the store reports.
pub async fn history(
    store: &dyn ChatStore,
    room: &RoomId,
    range: Range,
    limit: usize,
) -> Result<Vec<StoredMessage>, NodeError> {
    if limit == 0 {
        return Ok(Vec::new());
    }
    let buckets = store.buckets(room).await?;
    history_in(store, room, &buckets, range, limit).await
}

/// [`history`] over `buckets`, the room's buckets as the caller listed them
/// (a caller reading one range in several calls lists them once).
///
/// # Errors
/// Whatever the store reports.
pub async fn history_in(
    store: &dyn ChatStore,
    room: &RoomId,
    buckets: &[Bucket],
    range: Range,
    limit: usize,
) -> Result<Vec<StoredMessage>, NodeError> {
    let mut out = Vec::new();
    if limit == 0 {
        return Ok(out);
    }
    match range {
        Range::Before(bound) => {
            let start = bound.map(MessageId::bucket);
            for bucket in buckets
                .iter()
                .rev()
                .filter(|b| start.is_none_or(|s| **b <= s))
            {
                let within = if Some(*bucket) == start { bound } else { None };
                let page = store
                    .read_bucket(room, *bucket, Range::Before(within), limit - out.len())
                    .await?;
                out.extend(page);
                if out.len() >= limit {
                    break;
                }
            }
        }
        Range::After(bound) => {
            let start = bound.map(MessageId::bucket);
            for bucket in buckets.iter().filter(|b| start.is_none_or(|s| **b >= s)) {
                let within = if Some(*bucket) == start { bound } else { None };
                let page = store
                    .read_bucket(room, *bucket, Range::After(within), limit - out.len())
                    .await?;
                out.extend(page);
                if out.len() >= limit {
                    break;
                }
            }
        }
    }
    out.truncate(limit);
    Ok(out)
}

/// The newest stored id of `room`.
///
/// # Errors
/// Whatever the store reports.
pub async fn last_id(store: &dyn ChatStore, room: &RoomId) -> Result<Option<MessageId>, NodeError> {
    Ok(history(store, room, Range::Before(None), 1)
        .await?
        .first()
        .map(|m| m.id))
}

/// Whether `after`, the message numbered `after_seq` where a client asks
/// to read on from (`Join.after_id`, `HistoryRequest.after_id`, with the
/// sequence number it was sent the message with), is one `room` no longer
/// holds: `store` lacks it although it holds that number or a later one.
///
/// Then another message took the number: the client's was cut with a
/// divergent tail after a home failover (a post the old home acknowledged
/// at the local level and the new home never had), or it never was the
/// room's. Reading on after it in id order would skip, without a word,
/// what the new home placed from that number on, so callers refuse. A
/// copy not yet at that number may simply not have applied it (a new
/// owner, a replica behind): not a refusal. Neither is an `after_seq` of
/// 0 (the id is only a bound: "after the smallest id" reads from the
/// start), nor a store the nodes share (Cassandra): nothing is cut there,
/// and a row may land in one datacenter's copy before an earlier one.
///
/// # Errors
/// Whatever the store reports.
pub async fn lost_position(
    store: &dyn ChatStore,
    room: &RoomId,
    after: MessageId,
    after_seq: u64,
) -> Result<bool, NodeError> {
    if after_seq == 0 || store.shared() {
        return Ok(false);
    }
    let buckets = store.buckets(room).await?;
    let at_or_before =
        history_in(store, room, &buckets, Range::Before(after.successor()), 1).await?;
    if at_or_before.first().is_some_and(|m| m.id == after) {
        return Ok(false);
    }
    let newest = history_in(store, room, &buckets, Range::Before(None), 1).await?;
    Ok(newest.first().is_some_and(|m| m.seq >= after_seq))
}

#[cfg(test)]
mod tests {
    use super::memory::MemoryChat;
    use super::*;
    use crate::message_id::IdGenerator;

    fn stored(room: &RoomId, id: MessageId, seq: u64) -> StoredMessage {
        StoredMessage {
            room: room.clone(),
            id,
            seq,
            envelope: Bytes::from_static(b"ciphertext"),
        }
    }

    #[tokio::test]
    async fn a_position_is_lost_only_when_its_number_is_held_without_it() {
        let room = RoomId::new("lost").unwrap();
        let mut ids = IdGenerator::default();
        let old_home: Vec<MessageId> = (0..4)
            .map(|i| ids.next(1_795_000_000_000 + 10 * i, 7))
            .collect();
        // The new home's posts: one of an earlier millisecond than the old
        // home's lost ones (its clock behind), one of the next month.
        let behind = IdGenerator::after(Some(old_home[1])).next(0, 0);
        let next_month = IdGenerator::after(Some(old_home[3])).next(1_797_700_000_000, 7);
        for shared in [false, true] {
            let store = if shared {
                MemoryChat::new_shared()
            } else {
                MemoryChat::default()
            };
            // Numbers 1 and 2 kept; the old home's #3 and #4 were cut.
            store
                .append(&[stored(&room, old_home[0], 1), stored(&room, old_home[1], 2)])
                .await
                .unwrap();
            let lost = |at: MessageId, seq: u64| {
                let (store, room) = (&store, &room);
                async move { lost_position(store, room, at, seq).await.unwrap() }
            };
            assert!(!lost(old_home[1], 2).await, "a held message");
            assert!(
                !lost(old_home[2], 3).await,
                "number 3 not held yet: perhaps not applied"
            );
            store.append(&[stored(&room, behind, 3)]).await.unwrap();
            assert_eq!(
                lost(old_home[2], 3).await,
                !shared,
                "number 3 held, as another message"
            );
            assert!(!lost(old_home[3], 4).await, "number 4 not held yet");
            assert!(
                !lost(old_home[2], 0).await,
                "an id without a number is a bound"
            );
            store.append(&[stored(&room, next_month, 4)]).await.unwrap();
            assert_eq!(lost(old_home[3], 4).await, !shared, "a later bucket");
            assert_eq!(lost(old_home[2], 3).await, !shared);
            assert!(!lost(next_month, 4).await && !lost(behind, 3).await);
            let other = RoomId::new("other").unwrap();
            assert!(
                !lost_position(&store, &other, old_home[0], 1).await.unwrap(),
                "a room without messages"
            );
        }
    }
}
