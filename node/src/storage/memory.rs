//! In-memory stores, for tests. Nothing survives the process.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Mutex;

use async_trait::async_trait;
use saferchat_consensus::handover::{PartitionSeal, TransferRecord};
use saferchat_consensus::{AcceptorState, RoomId};

use super::{AcceptorStore, ChatStore, CommittedRoom, Range, RoomSummary, StoredMessage};
use crate::error::NodeError;
use crate::message_id::{Bucket, MessageId};

/// Acceptor states in a map.
#[derive(Debug, Default)]
pub struct MemoryAcceptors {
    states: Mutex<BTreeMap<RoomId, AcceptorState>>,
    seals: Mutex<HashMap<u32, PartitionSeal>>,
    transfers: Mutex<HashMap<u32, TransferRecord>>,
}

#[async_trait]
impl AcceptorStore for MemoryAcceptors {
    async fn load_acceptor(&self, room: &RoomId) -> Result<Option<AcceptorState>, NodeError> {
        Ok(self.states.lock().expect("lock").get(room).cloned())
    }

    async fn save_acceptors(&self, batch: &[(RoomId, AcceptorState)]) -> Result<(), NodeError> {
        let mut states = self.states.lock().expect("lock");
        for (room, state) in batch {
            states.insert(room.clone(), state.clone());
        }
        Ok(())
    }

    async fn list_acceptors(
        &self,
        after: Option<&RoomId>,
        limit: usize,
    ) -> Result<Vec<(RoomId, AcceptorState)>, NodeError> {
        let states = self.states.lock().expect("lock");
        Ok(states
            .iter()
            .filter(|(room, _)| after.is_none_or(|after| *room > after))
            .take(limit)
            .map(|(room, state)| (room.clone(), state.clone()))
            .collect())
    }

    async fn load_partition_seal(&self, partition: u32) -> Result<PartitionSeal, NodeError> {
        Ok(self
            .seals
            .lock()
            .expect("lock")
            .get(&partition)
            .copied()
            .unwrap_or_default())
    }

    async fn save_partition_seal(
        &self,
        partition: u32,
        seal: &PartitionSeal,
        rooms: &[(RoomId, AcceptorState)],
    ) -> Result<(), NodeError> {
        self.seals.lock().expect("lock").insert(partition, *seal);
        self.save_acceptors(rooms).await
    }

    async fn load_transfer(&self, partition: u32) -> Result<Option<TransferRecord>, NodeError> {
        Ok(self
            .transfers
            .lock()
            .expect("lock")
            .get(&partition)
            .cloned())
    }

    async fn save_transfer(
        &self,
        partition: u32,
        record: &TransferRecord,
    ) -> Result<(), NodeError> {
        self.transfers
            .lock()
            .expect("lock")
            .insert(partition, record.clone());
        Ok(())
    }
}

/// Rooms and timelines in maps.
#[derive(Debug, Default)]
pub struct MemoryChat {
    rooms: Mutex<BTreeMap<RoomId, CommittedRoom>>,
    timeline: Mutex<BTreeMap<(RoomId, Bucket, MessageId), StoredMessage>>,
    buckets: Mutex<BTreeSet<(RoomId, Bucket)>>,
    /// Says it is [shared](ChatStore::shared) (tests of what nodes do on
    /// Cassandra, with one instance standing for one datacenter's copy).
    shared: bool,
}

impl MemoryChat {
    /// An empty store that says it is [shared](ChatStore::shared).
    #[cfg(test)]
    pub fn new_shared() -> MemoryChat {
        MemoryChat {
            shared: true,
            ..MemoryChat::default()
        }
    }
}

#[async_trait]
impl ChatStore for MemoryChat {
    fn shared(&self) -> bool {
        self.shared
    }

    async fn load_room(&self, room: &RoomId) -> Result<Option<CommittedRoom>, NodeError> {
        Ok(self.rooms.lock().expect("lock").get(room).cloned())
    }

    async fn save_room(&self, room: &RoomId, committed: &CommittedRoom) -> Result<bool, NodeError> {
        let mut rooms = self.rooms.lock().expect("lock");
        let newer = rooms
            .get(room)
            .is_none_or(|old| committed.state.revision > old.state.revision);
        if newer {
            rooms.insert(room.clone(), committed.clone());
        }
        Ok(newer)
    }

    async fn list_rooms(
        &self,
        after: Option<&RoomId>,
        limit: usize,
    ) -> Result<Vec<RoomSummary>, NodeError> {
        let rooms = self.rooms.lock().expect("lock");
        Ok(rooms
            .iter()
            .filter(|(room, _)| after.is_none_or(|a| *room > a))
            .take(limit)
            .map(|(room, c)| RoomSummary {
                room: room.clone(),
                revision: c.state.revision.0,
                members: u32::try_from(c.state.members.len()).expect("bounded"),
            })
            .collect())
    }

    async fn append(&self, batch: &[StoredMessage]) -> Result<(), NodeError> {
        let mut timeline = self.timeline.lock().expect("lock");
        let mut buckets = self.buckets.lock().expect("lock");
        for m in batch {
            timeline.insert((m.room.clone(), m.id.bucket(), m.id), m.clone());
            buckets.insert((m.room.clone(), m.id.bucket()));
        }
        Ok(())
    }

    /// Removes the messages and every bucket left empty, so the bucket set
    /// (which `buckets` and `rooms_with_messages` read) lists exactly the
    /// buckets with messages.
    async fn truncate_room(
        &self,
        room: &RoomId,
        after: Option<MessageId>,
    ) -> Result<u64, NodeError> {
        let mut timeline = self.timeline.lock().expect("lock");
        let mut buckets = self.buckets.lock().expect("lock");
        let from = after.map(MessageId::bucket);
        let affected: Vec<Bucket> = buckets
            .iter()
            .filter(|(r, b)| r == room && from.is_none_or(|f| *b >= f))
            .map(|(_, b)| *b)
            .collect();
        let mut deleted = 0u64;
        for bucket in affected {
            let doomed: Vec<(RoomId, Bucket, MessageId)> = timeline
                .range((room.clone(), bucket, MessageId::floor_of_ms(0))..)
                .take_while(|((r, b, _), _)| r == room && *b == bucket)
                .filter(|((_, _, id), _)| after.is_none_or(|a| *id > a))
                .map(|(key, _)| key.clone())
                .collect();
            for key in &doomed {
                timeline.remove(key);
            }
            deleted += doomed.len() as u64;
            let left = timeline
                .range((room.clone(), bucket, MessageId::floor_of_ms(0))..)
                .next()
                .is_some_and(|((r, b, _), _)| r == room && *b == bucket);
            if !left {
                buckets.remove(&(room.clone(), bucket));
            }
        }
        Ok(deleted)
    }

    async fn rooms_with_messages(
        &self,
        after: Option<&RoomId>,
        limit: usize,
    ) -> Result<Vec<RoomId>, NodeError> {
        let buckets = self.buckets.lock().expect("lock");
        let mut rooms: Vec<RoomId> = Vec::new();
        for (room, _) in buckets.iter() {
            if after.is_some_and(|a| room <= a) || rooms.last() == Some(room) {
                continue;
            }
            if rooms.len() == limit {
                break;
            }
            rooms.push(room.clone());
        }
        Ok(rooms)
    }

    async fn buckets(&self, room: &RoomId) -> Result<Vec<Bucket>, NodeError> {
        let buckets = self.buckets.lock().expect("lock");
        Ok(buckets
            .iter()
            .filter(|(r, _)| r == room)
            .map(|(_, b)| *b)
            .collect())
    }

    async fn read_bucket(
        &self,
        room: &RoomId,
        bucket: Bucket,
        range: Range,
        limit: usize,
    ) -> Result<Vec<StoredMessage>, NodeError> {
        let timeline = self.timeline.lock().expect("lock");
        let in_bucket = timeline
            .range((room.clone(), bucket, MessageId::floor_of_ms(0))..)
            .take_while(|((r, b, _), _)| r == room && *b == bucket)
            .map(|(_, m)| m);
        Ok(match range {
            Range::Before(bound) => {
                let mut v: Vec<_> = in_bucket
                    .filter(|m| bound.is_none_or(|b| m.id < b))
                    .cloned()
                    .collect();
                v.reverse();
                v.truncate(limit);
                v
            }
            Range::After(bound) => in_bucket
                .filter(|m| bound.is_none_or(|b| m.id > b))
                .take(limit)
                .cloned()
                .collect(),
        })
    }
}
