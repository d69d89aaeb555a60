//! Copying a partition's timeline to a replica whose log is behind what the
//! others compacted away (see the driver's "Compaction").
//!
//! A replica that was down while its partition's leader retained more than
//! [`super::driver::RETAINED_BYTES_MAX`] of newer entries cannot catch up
//! from the log: the leader tells it so (`LogMessage::Compacted`), or it
//! finds out itself when it runs for leader. It then copies the timeline of
//! the partition's rooms from another replica, in pages:
//!
//! - The source answers every page with its *applied mark* `A`, read
//!   before the page's messages: every slot up to `A` was stored in its
//!   timeline by then, and stores only grow, so the pages read from the
//!   first one on hold every post of those slots (and perhaps later ones).
//! - The copier takes `A` from the first page (it may grow during the
//!   copy; what the first page said is what the pages are sure to cover),
//!   appends every page to its own store durably (a message already stored
//!   is stored once: the store's contract), and only then lets the driver
//!   install `A`: the log counts the slots up to `A` as released and
//!   applied, and catches the replica up from there. A post the copy
//!   brought beyond `A` is applied again from the log and recognised by the
//!   room's tail (`RoomTail::load_since`), as after a crash.
//!
//! Ids and sequence numbers are copied as stored: every replica computes
//! the same ones from the same log, so a copied post and one this replica
//! placed itself are one row.
//!
//! Pages are stateless on the source (a cursor of room and message id), so
//! a source that restarts or a copy that moves to another source loses
//! nothing but the pages in flight.

use std::fmt;

use async_trait::async_trait;
use saferchat_consensus::partition_log::Slot;
use saferchat_consensus::{NodeId, RoomId};

use crate::error::NodeError;
use crate::message_id::MessageId;
use crate::storage::{self, ChatStore, Range, StoredMessage};

/// Envelope bytes per page, at most (plus one envelope of up to 512 KiB).
pub const PAGE_BYTES_MAX: usize = 4 << 20;
/// Messages per page, at most.
pub const PAGE_MESSAGES_MAX: usize = 2_000;
/// Messages read from the store at a time.
const READ_CHUNK: usize = 500;
/// Rooms listed from the store at a time while looking for the next room of
/// the partition.
const LIST_CHUNK: usize = 1_000;

/// Where a page starts: a room, after a message of it (its first message
/// when `None`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Cursor {
    /// The room.
    pub room: RoomId,
    /// The last message already copied.
    pub after: Option<MessageId>,
}

/// One page of a partition's timeline.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Page {
    /// The source's applied mark, read before the page.
    pub applied: Slot,
    /// Messages, room by room in name order, each room's in id order.
    pub messages: Vec<StoredMessage>,
    /// Where the next page starts; `None` after the last.
    pub next: Option<Cursor>,
}

/// Where pages come from: another replica, over the peer link.
#[async_trait]
pub trait CopySource: Send + Sync + fmt::Debug + 'static {
    /// One page of `partition` from `node`.
    async fn page(
        &self,
        node: NodeId,
        partition: u32,
        cursor: Option<&Cursor>,
    ) -> Result<Page, NodeError>;
}

/// Reads one page of the rooms `in_partition` selects from `store`,
/// starting at `cursor` (the partition's first room when `None`).
///
/// # Errors
/// Whatever the store reports.
pub async fn read_page(
    store: &dyn ChatStore,
    in_partition: &(dyn Fn(&RoomId) -> bool + Send + Sync),
    applied: Slot,
    cursor: Option<Cursor>,
) -> Result<Page, NodeError> {
    let mut messages = Vec::new();
    let mut bytes = 0;
    let (mut room, mut after) = match cursor {
        Some(c) => (Some(c.room), c.after),
        None => (next_room(store, None, in_partition).await?, None),
    };
    while let Some(r) = room {
        loop {
            let want = READ_CHUNK.min(PAGE_MESSAGES_MAX - messages.len());
            let chunk = storage::history(store, &r, Range::After(after), want).await?;
            let short = chunk.len() < want;
            for m in chunk {
                bytes += m.envelope.len();
                after = Some(m.id);
                messages.push(m);
            }
            if messages.len() >= PAGE_MESSAGES_MAX || bytes >= PAGE_BYTES_MAX {
                return Ok(Page {
                    applied,
                    messages,
                    next: Some(Cursor { room: r, after }),
                });
            }
            if short {
                break;
            }
        }
        room = next_room(store, Some(&r), in_partition).await?;
        after = None;
    }
    Ok(Page {
        applied,
        messages,
        next: None,
    })
}

/// The first room after `after` (in name order) that `in_partition`
/// selects.
async fn next_room(
    store: &dyn ChatStore,
    after: Option<&RoomId>,
    in_partition: &(dyn Fn(&RoomId) -> bool + Send + Sync),
) -> Result<Option<RoomId>, NodeError> {
    let mut after = after.cloned();
    loop {
        let rooms = store.list_rooms(after.as_ref(), LIST_CHUNK).await?;
        if let Some(found) = rooms.iter().find(|r| in_partition(&r.room)) {
            return Ok(Some(found.room.clone()));
        }
        if rooms.len() < LIST_CHUNK {
            return Ok(None);
        }
        after = rooms.last().map(|r| r.room.clone());
    }
}

/// What a finished copy brought.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Copied {
    /// The replica copied from.
    pub source: NodeId,
    /// Its applied mark at the first page: what to install.
    pub applied: Slot,
    /// Messages appended.
    pub messages: u64,
    /// Their envelope bytes.
    pub bytes: u64,
}

/// Copies `partition` into `store` from the first of `sources` whose
/// applied mark reaches `need`, trying the next one when a source fails or
/// is behind too.
///
/// # Errors
/// The last source's error (UNAVAILABLE when none could serve the copy);
/// the local store's error.
pub async fn copy(
    from: &dyn CopySource,
    store: &dyn ChatStore,
    partition: u32,
    sources: &[NodeId],
    need: Slot,
) -> Result<Copied, NodeError> {
    let mut last = NodeError::Unavailable(format!("no replica to copy partition {partition} from"));
    for source in sources {
        match copy_from(from, store, partition, *source, need).await {
            Ok(copied) => return Ok(copied),
            Err(NodeError::Storage(e)) => return Err(NodeError::Storage(e)),
            Err(e) => {
                tracing::info!(partition, %source, error = %e, "copying the partition from this replica failed; trying the next");
                last = e;
            }
        }
    }
    Err(last)
}

async fn copy_from(
    from: &dyn CopySource,
    store: &dyn ChatStore,
    partition: u32,
    source: NodeId,
    need: Slot,
) -> Result<Copied, NodeError> {
    let first = from.page(source, partition, None).await?;
    if first.applied < need {
        return Err(NodeError::Unavailable(format!(
            "{source} applied partition {partition} only up to {}, and {need} is needed",
            first.applied
        )));
    }
    let applied = first.applied;
    let (mut messages, mut bytes) = (0u64, 0u64);
    let mut page = first;
    loop {
        if let Some(bad) = page
            .messages
            .iter()
            .find(|m| page.next.is_some() && m.room > page.next.as_ref().expect("some").room)
        {
            return Err(NodeError::Unavailable(format!(
                "{source} sent room {} beyond its own cursor",
                bad.room
            )));
        }
        if !page.messages.is_empty() {
            store
                .append(&page.messages)
                .await
                .map_err(|e| NodeError::Storage(e.to_string()))?;
            messages += page.messages.len() as u64;
            bytes += page
                .messages
                .iter()
                .map(|m| m.envelope.len() as u64)
                .sum::<u64>();
        }
        let Some(cursor) = page.next else {
            break;
        };
        page = from.page(source, partition, Some(&cursor)).await?;
    }
    Ok(Copied {
        source,
        applied,
        messages,
        bytes,
    })
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::sync::{Arc, Mutex};

    use bytes::Bytes;

    use super::*;
    use crate::storage::memory::MemoryChat as MemoryStore;
    use crate::timeline::test_envelope;

    /// Serves pages from a store, as the peer service does, counting calls.
    #[derive(Debug)]
    struct FromStore {
        stores: HashMap<NodeId, (Arc<MemoryStore>, Slot)>,
        calls: Mutex<u64>,
    }

    #[async_trait]
    impl CopySource for FromStore {
        async fn page(
            &self,
            node: NodeId,
            _partition: u32,
            cursor: Option<&Cursor>,
        ) -> Result<Page, NodeError> {
            *self.calls.lock().unwrap() += 1;
            let (store, applied) = self
                .stores
                .get(&node)
                .ok_or_else(|| NodeError::Unavailable(format!("{node} is down")))?;
            read_page(
                &**store,
                &|r: &RoomId| r.as_str() != "other",
                *applied,
                cursor.cloned(),
            )
            .await
        }
    }

    /// A store with `count` messages of `bytes` (a test envelope when 0)
    /// in each room.
    async fn filled(rooms: &[(&str, u32, usize)]) -> Arc<MemoryStore> {
        let store = Arc::new(MemoryStore::default());
        for (name, count, envelope_bytes) in rooms {
            let room = RoomId::new(name).unwrap();
            let committed = crate::storage::CommittedRoom {
                ballot: saferchat_consensus::Ballot::ZERO,
                state: crate::storage::conformance::state_at(3),
            };
            store.save_room(&room, &committed).await.unwrap();
            let mut ids = crate::message_id::IdGenerator::after(None);
            let batch: Vec<StoredMessage> = (1..=*count)
                .map(|n| StoredMessage {
                    room: room.clone(),
                    id: ids.next(1_700_000_000_000 + i64::from(n), u64::from(n)),
                    seq: u64::from(n),
                    envelope: if *envelope_bytes == 0 {
                        test_envelope(&room, n)
                    } else {
                        Bytes::from(vec![n as u8; *envelope_bytes])
                    },
                })
                .collect();
            store.append(&batch).await.unwrap();
        }
        store
    }

    async fn everything(store: &dyn ChatStore, room: &str) -> Vec<StoredMessage> {
        storage::history(
            store,
            &RoomId::new(room).unwrap(),
            Range::After(None),
            100_000,
        )
        .await
        .unwrap()
    }

    #[tokio::test]
    async fn a_copy_brings_every_room_of_the_partition_in_pages_and_nothing_else() {
        // 4,500 small messages in "alpha": three pages by count; 20 of
        // 300 KiB in "beta": two pages by bytes; "other" is in another
        // partition. The target has alpha's first 7 already.
        let source = filled(&[
            ("alpha", 4_500, 0),
            ("beta", 20, 300 * 1024),
            ("other", 5, 0),
        ])
        .await;
        let from = FromStore {
            stores: HashMap::from([
                (NodeId(1), (Arc::clone(&source), Slot(10))),
                (NodeId(2), (Arc::clone(&source), Slot(99))),
            ]),
            calls: Mutex::new(0),
        };
        let target = filled(&[("alpha", 7, 0)]).await;
        // Node 3 is down, node 1 is behind what is needed: node 2 serves.
        let copied = copy(
            &from,
            &*target,
            0,
            &[NodeId(3), NodeId(1), NodeId(2)],
            Slot(50),
        )
        .await
        .unwrap();
        assert_eq!(copied.source, NodeId(2));
        assert_eq!(copied.applied, Slot(99));
        for room in ["alpha", "beta"] {
            assert_eq!(
                everything(&*target, room).await,
                everything(&*source, room).await,
                "{room} copied exactly, once (alpha's first 7 were there already)"
            );
        }
        assert!(everything(&*target, "other").await.is_empty());
        let pages = *from.calls.lock().unwrap() - 1;
        assert!(
            (5..=7).contains(&pages),
            "bounded pages: {pages} calls to node 2"
        );
        assert_eq!(copied.messages, 4_500 + 20);
    }

    #[tokio::test]
    async fn no_source_reaching_the_mark_is_an_error() {
        let source = filled(&[("alpha", 3, 0)]).await;
        let from = FromStore {
            stores: HashMap::from([(NodeId(1), (source, Slot(4)))]),
            calls: Mutex::new(0),
        };
        let target = Arc::new(MemoryStore::default());
        let e = copy(&from, &*target, 0, &[NodeId(1)], Slot(5))
            .await
            .unwrap_err();
        assert!(e.to_string().contains("only up to"), "{e}");
    }
}
