//! Copying a partition's timeline to a replica whose log is behind what the
//! others compacted away (see the driver's "Compaction").
//!
//! A replica that was down while its partition's leader retained more than
//! `partition_log_retained_bytes` of newer entries cannot catch up from the
//! log: the leader tells it so (`LogMessage::Compacted`, with its floor),
//! or it finds out itself when it runs for leader. It then copies the
//! timeline of the partition's rooms from another replica:
//!
//! - The source lists the partition's rooms that have messages
//!   ([`ChatStore::rooms_with_messages`]: not the saved memberships, which a
//!   replica may lack for a room whose posts it has), in pages, each with
//!   its *applied mark* `A` read before the page: every slot up to `A` was
//!   in its timeline by then, and stores only grow, so every read from the
//!   first page on holds every post of those slots (and perhaps later
//!   ones). A source whose mark is below what the copier needs (the
//!   leader's floor) is skipped.
//! - For each room, the copier asks for the messages after the newest one
//!   it has itself, and appends them durably (a message already stored is
//!   stored once: the store's contract). A replica's store holds, per room,
//!   a prefix of the room's timeline (it applies in slot order, and copies
//!   append a prefix of the source's, in id order), so the copy brings only
//!   what is missing: a second copy after the leader compacted further
//!   costs what was posted since, and a copy that fails part-way and starts
//!   again skips what it already brought.
//! - Then the driver installs `A`: the log counts the slots up to `A` as
//!   released and applied, and catches the replica up from there. A post
//!   the copy brought beyond `A` is applied again from the log and
//!   recognised by the room's tail (`RoomTail::load_since`), as after a
//!   crash.
//!
//! Ids and sequence numbers are copied as stored: every replica computes
//! the same ones from the same log.
//!
//! On a store the nodes share (Cassandra) a source *of the same
//! datacenter* writes the same copy of the store as the copier (each
//! node writes and reads its datacenter's replicas): nothing is copied
//! from it, its mark is installed at once. A source in another
//! datacenter is copied from like any other, because the copier's
//! datacenter may lack what the source applied: Cassandra brings it over
//! only through hints, which it keeps for a few hours (and not at all
//! when they are off), or a repair. Such a copy compares each room from
//! its first message and writes what is missing: rows reach a datacenter
//! through Cassandra's replication in no particular order, so the copy is
//! not a prefix, and "after the newest message" would skip holes.
//!
//! # After a home failover: cutting a divergent tail
//!
//! A replica that applied the partition's log before a failover of its
//! home may hold posts the old home released and the new home replaced
//! (the local level's loss window): from some message on, its copy of a
//! room is not a prefix of the room's timeline any more. [`check`] finds a
//! source whose own timeline is checked against that failover epoch (the
//! leader that established the epoch is, by definition, once the map
//! names it), compares each of this replica's
//! rooms with the source's from the first message on, in pages on both
//! sides ([`cut_divergent`]), truncates a room after the last message both
//! hold in the same place, and then copies the rest as above. The whole
//! room is compared: the same message in the same place on both sides does
//! not prove the messages before it equal (an id is drawn from the post's
//! time and randomness, not from the message before it, and a failover
//! leader may recover a later slot of the old home's log after an earlier
//! one it filled differently), so nothing short of the whole prefix does.
//! It costs a read of the partition's timeline from the source, once per
//! failover a replica missed; only what differs is written.

use std::fmt;

use async_trait::async_trait;
use saferchat_consensus::partition_log::Slot;
use saferchat_consensus::{NodeId, RoomId};

use crate::error::NodeError;
use crate::message_id::MessageId;
use crate::storage::{self, ChatStore, Range, StoredMessage};

/// Envelope bytes per page of a room, at most (a single larger message,
/// which cannot exist, would go alone).
pub const PAGE_BYTES_MAX: usize = 4 << 20;
/// Messages per page of a room, at most.
pub const PAGE_MESSAGES_MAX: usize = 2_000;
/// Rooms per page of the room list.
pub const ROOMS_PAGE_MAX: usize = 1_000;
/// Messages read from the store at a time while filling a page.
const READ_CHUNK: usize = 64;

/// One page of a partition's room list.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RoomsPage {
    /// The source's applied mark, read before the page.
    pub applied: Slot,
    /// The latest home failover epoch the source's timeline of the
    /// partition is checked against (see "After a home failover").
    pub checked: u64,
    /// Rooms of the partition with messages, in the source's store order.
    pub rooms: Vec<RoomId>,
    /// Whether this was the last page.
    pub done: bool,
}

/// One page of a room's messages.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RoomPage {
    /// Messages in id order.
    pub messages: Vec<StoredMessage>,
    /// Whether the room has no more.
    pub done: bool,
}

/// Where pages come from: another replica, over the peer link.
#[async_trait]
pub trait CopySource: Send + Sync + fmt::Debug + 'static {
    /// A page of `partition`'s rooms from `node`, after `after`.
    async fn rooms(
        &self,
        node: NodeId,
        partition: u32,
        after: Option<&RoomId>,
    ) -> Result<RoomsPage, NodeError>;

    /// A page of `room`'s messages from `node`, after `after`.
    async fn room(
        &self,
        node: NodeId,
        partition: u32,
        room: &RoomId,
        after: Option<MessageId>,
    ) -> Result<RoomPage, NodeError>;
}

/// Reads one page of the room list: the rooms with messages that
/// `in_partition` selects, after `after`.
///
/// # Errors
/// Whatever the store reports.
pub async fn read_rooms(
    store: &dyn ChatStore,
    in_partition: &(dyn Fn(&RoomId) -> bool + Send + Sync),
    (applied, checked): (Slot, u64),
    after: Option<RoomId>,
) -> Result<RoomsPage, NodeError> {
    let mut rooms = Vec::new();
    let mut after = after;
    loop {
        let listed = store
            .rooms_with_messages(after.as_ref(), ROOMS_PAGE_MAX)
            .await?;
        let last_listed = listed.len() < ROOMS_PAGE_MAX;
        for room in listed {
            after = Some(room.clone());
            if in_partition(&room) {
                rooms.push(room);
                if rooms.len() == ROOMS_PAGE_MAX {
                    // More may follow; the caller asks from this room on.
                    return Ok(RoomsPage {
                        applied,
                        checked,
                        rooms,
                        done: false,
                    });
                }
            }
        }
        if last_listed {
            return Ok(RoomsPage {
                applied,
                checked,
                rooms,
                done: true,
            });
        }
    }
}

/// Reads one page of `room`'s messages after `after`: whole messages up to
/// [`PAGE_BYTES_MAX`] of envelopes and [`PAGE_MESSAGES_MAX`] messages.
///
/// # Errors
/// Whatever the store reports.
pub async fn read_room(
    store: &dyn ChatStore,
    room: &RoomId,
    after: Option<MessageId>,
) -> Result<RoomPage, NodeError> {
    let mut messages: Vec<StoredMessage> = Vec::new();
    let mut bytes = 0;
    let mut after = after;
    loop {
        let chunk = storage::history(store, room, Range::After(after), READ_CHUNK).await?;
        let short = chunk.len() < READ_CHUNK;
        for m in chunk {
            let full = messages.len() >= PAGE_MESSAGES_MAX
                || (!messages.is_empty() && bytes + m.envelope.len() > PAGE_BYTES_MAX);
            if full {
                return Ok(RoomPage {
                    messages,
                    done: false,
                });
            }
            bytes += m.envelope.len();
            after = Some(m.id);
            messages.push(m);
        }
        if short {
            return Ok(RoomPage {
                messages,
                done: true,
            });
        }
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
    sources: &Sources,
    need: Slot,
) -> Result<Copied, NodeError> {
    first_source(
        partition,
        &sources.nodes,
        format!("no replica to copy partition {partition} from"),
        |source| copy_from(from, store, partition, (sources, source), need),
    )
    .await
}

/// The replicas a copy or a check may read from, in the order to try
/// them, and which of them write the same copy of the store as this node
/// (on a store the nodes share, those of this node's datacenter: see the
/// module's documentation).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Sources {
    /// The replicas, in order.
    pub nodes: Vec<NodeId>,
    /// Those among them whose applied posts are in this node's copy.
    pub same_copy: std::collections::BTreeSet<NodeId>,
    /// The latest home failover epoch a source's timeline must be checked
    /// against ([`RoomsPage::checked`]) for a copy: the copier's own. A
    /// source that owes a check its copier made may hold posts of the old
    /// home's loss window that the epoch replaced; copied into a timeline
    /// checked already, nothing would ever cut them (the seeded
    /// simulation of `consensus/tests/home_failover.rs` found a checked
    /// replica, behind its leader's floor while running for leader,
    /// copying from a held voter of the new home so).
    pub checked: u64,
}

impl Sources {
    /// The replicas `nodes` in the order given, except that on a `shared`
    /// store those `in_my_datacenter` come first and write this node's
    /// copy (what they applied is in it already, so copying from them is
    /// free).
    pub fn new(
        mut nodes: Vec<NodeId>,
        shared: bool,
        in_my_datacenter: impl Fn(NodeId) -> bool,
    ) -> Sources {
        let same_copy: std::collections::BTreeSet<NodeId> = if shared {
            nodes
                .iter()
                .copied()
                .filter(|n| in_my_datacenter(*n))
                .collect()
        } else {
            std::collections::BTreeSet::new()
        };
        nodes.sort_by_key(|n| !same_copy.contains(n));
        Sources {
            nodes,
            same_copy,
            checked: 0,
        }
    }

    /// These sources, of which a copy takes only one whose timeline is
    /// checked against failover epoch `checked` or a later one.
    #[must_use]
    pub fn checked_against(mut self, checked: u64) -> Sources {
        self.checked = checked;
        self
    }

    /// Whether `source`'s applied posts are in this node's copy of the
    /// store already.
    pub fn same_copy(&self, source: NodeId) -> bool {
        self.same_copy.contains(&source)
    }
}

/// The first of `sources` that `attempt` succeeds with: a source that
/// fails is logged and the next one tried; the local store's error ends
/// the attempts. `none` is the error when there is no source.
///
/// # Errors
/// The local store's error, or the last source's (`none` without any).
async fn first_source<T, F, Fut>(
    partition: u32,
    sources: &[NodeId],
    none: String,
    mut attempt: F,
) -> Result<T, NodeError>
where
    F: FnMut(NodeId) -> Fut,
    Fut: std::future::Future<Output = Result<T, NodeError>>,
{
    let mut last = NodeError::Unavailable(none);
    for source in sources {
        match attempt(*source).await {
            Ok(done) => return Ok(done),
            Err(NodeError::Storage(e)) => return Err(NodeError::Storage(e)),
            Err(e) => {
                tracing::info!(partition, %source, error = %e, "this replica could not serve the copy or check; trying the next");
                last = e;
            }
        }
    }
    Err(last)
}

/// Copies from `source`, one of `sources`; from one that writes this
/// node's copy of the store, only its mark is taken.
async fn copy_from(
    from: &dyn CopySource,
    store: &dyn ChatStore,
    partition: u32,
    (sources, source): (&Sources, NodeId),
    need: Slot,
) -> Result<Copied, NodeError> {
    let mut page = from.rooms(source, partition, None).await?;
    if page.applied < need {
        return Err(NodeError::Unavailable(format!(
            "{source} applied partition {partition} only up to {}, and {need} is needed",
            page.applied
        )));
    }
    if page.checked < sources.checked {
        return Err(NodeError::Unavailable(format!(
            "{source} has not checked partition {partition} against failover epoch {} (only {}), which this replica did",
            sources.checked, page.checked
        )));
    }
    let mut copied = Copied {
        source,
        applied: page.applied,
        messages: 0,
        bytes: 0,
    };
    if sources.same_copy(source) {
        return Ok(copied);
    }
    loop {
        for room in &page.rooms {
            copy_room(from, store, partition, source, room, &mut copied).await?;
        }
        if page.done {
            return Ok(copied);
        }
        let Some(last) = page.rooms.last().cloned() else {
            return Err(NodeError::Unavailable(format!(
                "{source} sent an empty room page that is not the last"
            )));
        };
        page = from.rooms(source, partition, Some(&last)).await?;
    }
}

/// Refuses a page with a message of another room, or not after `after`.
fn in_order(
    page: &RoomPage,
    source: NodeId,
    room: &RoomId,
    after: Option<MessageId>,
) -> Result<(), NodeError> {
    match page
        .messages
        .iter()
        .find(|m| m.room != *room || after.is_some_and(|a| m.id <= a))
    {
        Some(bad) => Err(NodeError::Unavailable(format!(
            "{source} sent message {} of {} out of order for room {room}",
            bad.id, bad.room
        ))),
        None => Ok(()),
    }
}

/// Brings `room` up to the source, from the newest message this store has.
async fn copy_room(
    from: &dyn CopySource,
    store: &dyn ChatStore,
    partition: u32,
    source: NodeId,
    room: &RoomId,
    copied: &mut Copied,
) -> Result<(), NodeError> {
    let local = |e: NodeError| NodeError::Storage(e.to_string());
    // A store of this node's own holds a prefix of the room: the copy
    // starts after its newest message. A shared one may have holes.
    let from_start = store.shared();
    let mut after = if from_start {
        None
    } else {
        storage::last_id(store, room).await.map_err(local)?
    };
    loop {
        let page = from.room(source, partition, room, after).await?;
        in_order(&page, source, room, after)?;
        let RoomPage { messages, done } = page;
        if let Some(last) = messages.last().map(|m| m.id) {
            let missing = if from_start {
                lacking(store, room, after, messages).await.map_err(local)?
            } else {
                messages
            };
            after = Some(last);
            if !missing.is_empty() {
                store.append(&missing).await.map_err(local)?;
            }
            copied.messages += missing.len() as u64;
            copied.bytes += missing.iter().map(|m| m.envelope.len() as u64).sum::<u64>();
        } else if !done {
            return Err(NodeError::Unavailable(format!(
                "{source} sent an empty page of room {room} that is not the last"
            )));
        }
        if done {
            return Ok(());
        }
    }
}

/// The messages of `page` (a source's page of `room`, ids above `after`,
/// in order) that `store` lacks: those whose ids it does not hold between
/// `after` and the page's last.
async fn lacking(
    store: &dyn ChatStore,
    room: &RoomId,
    after: Option<MessageId>,
    page: Vec<StoredMessage>,
) -> Result<Vec<StoredMessage>, NodeError> {
    let Some(last) = page.last().map(|m| m.id) else {
        return Ok(page);
    };
    let mut held = std::collections::HashSet::new();
    let mut cursor = after;
    'read: loop {
        let chunk = storage::history(store, room, Range::After(cursor), READ_CHUNK).await?;
        let short = chunk.len() < READ_CHUNK;
        for m in &chunk {
            if m.id > last {
                break 'read;
            }
            held.insert(m.id);
        }
        match chunk.last() {
            Some(m) if !short => cursor = Some(m.id),
            _ => break,
        }
    }
    Ok(page.into_iter().filter(|m| !held.contains(&m.id)).collect())
}

/// What [`cut_divergent`] cut.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Cut {
    /// Rooms looked at.
    pub rooms: u64,
    /// Rooms truncated.
    pub cut_rooms: u64,
    /// Messages deleted.
    pub messages: u64,
}

/// Checks `partition` in `store` against the first of `sources` whose own
/// timeline is checked against failover epoch `owed` (see the module's
/// "After a home failover"): cuts what differs, then copies the rest from
/// the same source.
///
/// # Errors
/// The last source's error (UNAVAILABLE when none could serve the check);
/// the local store's error.
pub async fn check(
    from: &dyn CopySource,
    store: &dyn ChatStore,
    in_partition: &(dyn Fn(&RoomId) -> bool + Send + Sync),
    partition: u32,
    sources: &Sources,
    owed: u64,
) -> Result<(Copied, Cut), NodeError> {
    first_source(
        partition,
        &sources.nodes,
        format!("no replica to check partition {partition} against failover epoch {owed}"),
        |source| async move {
            let page = from.rooms(source, partition, None).await?;
            if page.checked < owed {
                return Err(NodeError::Unavailable(format!(
                    "{source} has not checked partition {partition} against failover epoch {owed} itself (only {})",
                    page.checked
                )));
            }
            let cut = cut_divergent(from, store, in_partition, partition, source).await?;
            let copied = copy_from(from, store, partition, (sources, source), Slot(0)).await?;
            Ok((copied, cut))
        },
    )
    .await
}

/// Makes this held replica's timeline of `partition` its leader's (the
/// one of `sources`): cuts every room back to the last message it holds
/// in the same place as the leader ([`cut_divergent`]), then copies the
/// rest from it, up to at least `need` (see `LogReplica::realigned`).
///
/// # Errors
/// As [`check`].
pub async fn realign(
    from: &dyn CopySource,
    store: &dyn ChatStore,
    in_partition: &(dyn Fn(&RoomId) -> bool + Send + Sync),
    partition: u32,
    sources: &Sources,
    need: Slot,
) -> Result<(Copied, Cut), NodeError> {
    first_source(
        partition,
        &sources.nodes,
        format!("no leader to realign partition {partition} with"),
        |source| async move {
            let cut = cut_divergent(from, store, in_partition, partition, source).await?;
            let copied = copy_from(from, store, partition, (sources, source), need).await?;
            Ok((copied, cut))
        },
    )
    .await
}

/// Truncates every room of `partition` in `store` after the last message
/// it holds in the same place as `source` (see the module's "After a home
/// failover"). Nothing is cut on a store the nodes share (not done yet):
/// Cassandra's replication brings the old home's divergent rows into the
/// other datacenters' copies too, so comparing copies finds nothing, and
/// a truncation after a message would delete the new home's posts whose
/// ids fall among the divergent ones. Such rows stay in the shared
/// keyspace.
///
/// # Errors
/// The source's error (UNAVAILABLE when it cannot serve), or a page out of
/// order; the local store's error as `Storage`.
pub async fn cut_divergent(
    from: &dyn CopySource,
    store: &dyn ChatStore,
    in_partition: &(dyn Fn(&RoomId) -> bool + Send + Sync),
    partition: u32,
    source: NodeId,
) -> Result<Cut, NodeError> {
    let local = |e: NodeError| NodeError::Storage(e.to_string());
    let mut cut = Cut::default();
    if store.shared() {
        return Ok(cut);
    }
    let mut after = None;
    loop {
        let page = read_rooms(store, in_partition, (Slot(0), 0), after)
            .await
            .map_err(local)?;
        for room in &page.rooms {
            cut.rooms += 1;
            if let Some(keep) = divergence(from, store, partition, source, room).await? {
                let deleted = store.truncate_room(room, keep).await.map_err(local)?;
                tracing::info!(partition, %room, deleted, "cut a room's divergent tail after a home failover");
                cut.cut_rooms += 1;
                cut.messages += deleted;
            }
        }
        if page.done {
            return Ok(cut);
        }
        after = page.rooms.last().cloned();
    }
}

/// Where `room` in `store` stops being a prefix of the source's: `None`
/// when it is one, `Some(keep)` when everything after `keep` (everything,
/// for `None`) must go. Walks both from the first message, a chunk of the
/// store and a page of the source at a time.
async fn divergence(
    from: &dyn CopySource,
    store: &dyn ChatStore,
    partition: u32,
    source: NodeId,
    room: &RoomId,
) -> Result<Option<Option<MessageId>>, NodeError> {
    let local = |e: NodeError| NodeError::Storage(e.to_string());
    let mut common = None;
    let mut theirs: std::collections::VecDeque<StoredMessage> = std::collections::VecDeque::new();
    let (mut their_cursor, mut theirs_done) = (None, false);
    loop {
        let ours = storage::history(store, room, Range::After(common), READ_CHUNK)
            .await
            .map_err(local)?;
        let last_chunk = ours.len() < READ_CHUNK;
        for mine in ours {
            while theirs.is_empty() && !theirs_done {
                let page = from.room(source, partition, room, their_cursor).await?;
                in_order(&page, source, room, their_cursor)?;
                match page.messages.last() {
                    Some(last) => their_cursor = Some(last.id),
                    None if !page.done => {
                        return Err(NodeError::Unavailable(format!(
                            "{source} sent an empty page of room {room} that is not the last"
                        )));
                    }
                    None => {}
                }
                theirs_done = page.done;
                theirs.extend(page.messages);
            }
            if theirs.pop_front().as_ref() != Some(&mine) {
                return Ok(Some(common));
            }
            common = Some(mine.id);
        }
        if last_chunk {
            return Ok(None);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::sync::{Arc, Mutex};

    use bytes::Bytes;

    use super::*;
    use crate::storage::memory::MemoryChat as MemoryStore;
    use crate::timeline::test_envelope;

    /// The replicas `ids`, in order, none writing the target's copy.
    fn nodes(ids: &[u64]) -> Sources {
        Sources {
            nodes: ids.iter().map(|n| NodeId(*n)).collect(),
            ..Sources::default()
        }
    }

    /// Serves pages from stores, as the peer service does, recording the
    /// calls and the largest page.
    #[derive(Debug, Default)]
    struct FromStore {
        stores: HashMap<NodeId, (Arc<MemoryStore>, Slot)>,
        /// The failover epoch each node says it checked (0 when absent).
        checked: HashMap<NodeId, u64>,
        /// Room pages served, and the most envelope bytes in one.
        room_pages: Mutex<(u64, usize)>,
    }

    impl FromStore {
        fn get(&self, node: NodeId) -> Result<&(Arc<MemoryStore>, Slot), NodeError> {
            self.stores
                .get(&node)
                .ok_or_else(|| NodeError::Unavailable(format!("{node} is down")))
        }
    }

    #[async_trait]
    impl CopySource for FromStore {
        async fn rooms(
            &self,
            node: NodeId,
            _partition: u32,
            after: Option<&RoomId>,
        ) -> Result<RoomsPage, NodeError> {
            let (store, applied) = self.get(node)?;
            let in_partition = |r: &RoomId| r.as_str() != "other";
            let checked = self.checked.get(&node).copied().unwrap_or(0);
            read_rooms(&**store, &in_partition, (*applied, checked), after.cloned()).await
        }

        async fn room(
            &self,
            node: NodeId,
            _partition: u32,
            room: &RoomId,
            after: Option<MessageId>,
        ) -> Result<RoomPage, NodeError> {
            let (store, _) = self.get(node)?;
            let page = read_room(&**store, room, after).await?;
            let bytes = page.messages.iter().map(|m| m.envelope.len()).sum();
            let mut pages = self.room_pages.lock().unwrap();
            pages.0 += 1;
            pages.1 = pages.1.max(bytes);
            Ok(page)
        }
    }

    /// Appends `count` messages of `bytes` (a test envelope when 0) to
    /// `room`, numbered after `from`; saves the room's membership when
    /// `saved`.
    async fn post(
        store: &MemoryStore,
        name: &str,
        from: u32,
        count: u32,
        bytes: usize,
        saved: bool,
    ) {
        let room = RoomId::new(name).unwrap();
        if saved {
            let committed = crate::storage::CommittedRoom {
                ballot: saferchat_consensus::Ballot::ZERO,
                state: crate::storage::conformance::state_at(3),
            };
            store.save_room(&room, &committed).await.unwrap();
        }
        let last = storage::last_id(store, &room).await.unwrap();
        let mut ids = crate::message_id::IdGenerator::after(last);
        let batch: Vec<StoredMessage> = (from + 1..=from + count)
            .map(|n| StoredMessage {
                room: room.clone(),
                id: ids.next(1_700_000_000_000 + i64::from(n), u64::from(n)),
                seq: u64::from(n),
                envelope: if bytes == 0 {
                    test_envelope(&room, n)
                } else {
                    Bytes::from(vec![n as u8; bytes])
                },
            })
            .collect();
        store.append(&batch).await.unwrap();
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
    async fn a_copy_brings_every_room_of_the_partition_in_bounded_pages_and_nothing_else() {
        // 4,500 small messages in "alpha": pages by count; 30 of 300 KiB in
        // "beta", whose membership this source never saved: pages by bytes;
        // "other" is in another partition.
        let source = Arc::new(MemoryStore::default());
        post(&source, "alpha", 0, 4_500, 0, true).await;
        post(&source, "beta", 0, 30, 300 * 1024, false).await;
        post(&source, "other", 0, 5, 0, true).await;
        let from = FromStore {
            stores: HashMap::from([
                (NodeId(1), (Arc::clone(&source), Slot(10))),
                (NodeId(2), (Arc::clone(&source), Slot(99))),
            ]),
            ..FromStore::default()
        };
        // The target has alpha's first 7 already.
        let target = Arc::new(MemoryStore::default());
        post(&target, "alpha", 0, 7, 0, true).await;
        // Node 3 is down, node 1 is behind what is needed: node 2 serves.
        let copied = copy(&from, &*target, 0, &nodes(&[3, 1, 2]), Slot(50))
            .await
            .unwrap();
        assert_eq!(copied.source, NodeId(2));
        assert_eq!(copied.applied, Slot(99));
        for room in ["alpha", "beta"] {
            assert_eq!(
                everything(&*target, room).await,
                everything(&*source, room).await,
                "{room} copied exactly, once"
            );
        }
        assert!(everything(&*target, "other").await.is_empty());
        assert_eq!(copied.messages, 4_493 + 30, "only what the target lacked");
        let (pages, biggest) = *from.room_pages.lock().unwrap();
        assert!(biggest <= PAGE_BYTES_MAX, "{biggest} bytes in one page");
        // alpha: 3 pages by count; beta: 3 by bytes (13 of 300 KiB each).
        assert_eq!(pages, 6);

        // Copying again brings only what was posted since.
        post(&source, "alpha", 4_500, 3, 0, true).await;
        let again = copy(&from, &*target, 0, &nodes(&[2]), Slot(50))
            .await
            .unwrap();
        assert_eq!(again.messages, 3);
        assert_eq!(
            everything(&*target, "alpha").await,
            everything(&*source, "alpha").await
        );
    }

    /// Appends `count` messages to `name` numbered after `from`, drawn by a
    /// leader whose randomness is `seed` (two leaders draw different ids
    /// for the same place).
    async fn post_by(store: &MemoryStore, name: &str, from: u32, count: u32, seed: u64) {
        let room = RoomId::new(name).unwrap();
        let last = storage::last_id(store, &room).await.unwrap();
        let mut ids = crate::message_id::IdGenerator::after(last);
        let batch: Vec<StoredMessage> = (from + 1..=from + count)
            .map(|n| StoredMessage {
                room: room.clone(),
                id: ids.next(1_700_000_000_000 + i64::from(n), seed ^ u64::from(n)),
                seq: u64::from(n),
                envelope: test_envelope(&room, n ^ (seed as u32)),
            })
            .collect();
        store.append(&batch).await.unwrap();
    }

    #[tokio::test]
    async fn a_divergent_tail_is_cut_back_to_the_last_shared_message_and_the_copy_brings_the_rest()
    {
        let source = Arc::new(MemoryStore::default());
        let target = Arc::new(MemoryStore::default());
        // alpha: 40 shared, then 5 of the old home's, while the new home
        // went on with 300 of its own.
        // beta: nothing shared, 3 against 2.
        // gamma: the target is 30 behind, no divergence.
        // delta: 1,000 shared, then 100 divergent.
        // epsilon: only the target has it.
        // zeta: 5 shared, then see below.
        // other: another partition, never looked at.
        for store in [&source, &target] {
            post_by(store, "alpha", 0, 40, 1).await;
            post_by(store, "gamma", 0, 20, 1).await;
            post_by(store, "delta", 0, 1_000, 1).await;
            post_by(store, "zeta", 0, 5, 1).await;
            post_by(store, "other", 0, 3, 1).await;
        }
        post_by(&target, "alpha", 40, 5, 2).await;
        post_by(&source, "alpha", 40, 300, 3).await;
        post_by(&target, "beta", 0, 3, 2).await;
        post_by(&source, "beta", 0, 2, 3).await;
        post_by(&source, "gamma", 20, 30, 1).await;
        post_by(&target, "delta", 1_000, 100, 2).await;
        post_by(&source, "delta", 1_000, 7, 3).await;
        post_by(&target, "epsilon", 0, 4, 2).await;
        post_by(&target, "other", 3, 2, 2).await;
        // zeta: each its own sixth (the source's drawn earlier, so its id
        // is below the target's), then the same fifteen (ids do not chain:
        // the same id, number and envelope on both sides).
        let zeta = RoomId::new("zeta").unwrap();
        for (store, ms, seed) in [
            (&target, 1_750_000_000_000, 2),
            (&source, 1_749_999_999_999, 3),
        ] {
            let last = storage::last_id(&**store, &zeta).await.unwrap();
            let mut ids = crate::message_id::IdGenerator::after(last);
            let mut batch = vec![StoredMessage {
                room: zeta.clone(),
                id: ids.next(ms, seed),
                seq: 6,
                envelope: test_envelope(&zeta, 600 + u32::try_from(seed).unwrap()),
            }];
            for k in 0..15u32 {
                batch.push(StoredMessage {
                    room: zeta.clone(),
                    id: ids.next(1_800_000_000_000 + i64::from(k), 77 + u64::from(k)),
                    seq: 7 + u64::from(k),
                    envelope: test_envelope(&zeta, 7 + k),
                });
            }
            store.append(&batch).await.unwrap();
        }
        let (ours, theirs) = (
            everything(&*target, "zeta").await,
            everything(&*source, "zeta").await,
        );
        assert!(theirs[5].id < ours[5].id);
        assert_eq!(
            ours[6..],
            theirs[6..],
            "the same fifteen after different sixths"
        );
        let from = FromStore {
            stores: HashMap::from([
                (NodeId(1), (Arc::clone(&source), Slot(77))),
                (NodeId(2), (Arc::clone(&target), Slot(99))),
            ]),
            checked: HashMap::from([(NodeId(1), 3), (NodeId(2), 2)]),
            ..FromStore::default()
        };
        let in_partition = |r: &RoomId| r.as_str() != "other";
        // Node 3 is down and node 2 has not checked epoch 3 itself: node
        // 1 serves.
        let (copied, cut) = check(&from, &*target, &in_partition, 0, &nodes(&[3, 2, 1]), 3)
            .await
            .unwrap();
        assert_eq!(
            cut,
            Cut {
                rooms: 6,
                cut_rooms: 5,
                messages: 5 + 3 + 100 + 4 + 16
            }
        );
        assert_eq!((copied.source, copied.applied), (NodeId(1), Slot(77)));
        assert_eq!(copied.messages, 300 + 2 + 30 + 7 + 16);
        for room in ["alpha", "beta", "gamma", "delta", "epsilon", "zeta"] {
            assert_eq!(
                everything(&*target, room).await,
                everything(&*source, room).await,
                "{room} is the source's timeline"
            );
        }
        assert_eq!(everything(&*target, "other").await.len(), 5, "untouched");
        // Checking again cuts nothing and copies nothing.
        let (copied, cut) = check(&from, &*target, &in_partition, 0, &nodes(&[1]), 3)
            .await
            .unwrap();
        assert_eq!((cut.cut_rooms, cut.messages, copied.messages), (0, 0, 0));
        // No source checked epoch 4.
        let e = check(&from, &*target, &in_partition, 0, &nodes(&[1]), 4)
            .await
            .unwrap_err();
        assert!(e.to_string().contains("has not checked"), "{e}");
    }

    #[tokio::test]
    async fn a_source_that_cannot_serve_the_check_cuts_nothing() {
        let target = Arc::new(MemoryStore::default());
        post_by(&target, "alpha", 0, 4, 2).await;
        let from = FromStore::default();
        let in_partition = |_: &RoomId| true;
        let e = cut_divergent(&from, &*target, &in_partition, 0, NodeId(1))
            .await
            .unwrap_err();
        assert!(e.to_string().contains("down"), "{e}");
        assert_eq!(everything(&*target, "alpha").await.len(), 4);
    }

    #[tokio::test]
    async fn a_copy_skips_a_source_that_has_not_checked_what_the_copier_did() {
        // Node 1 owes the check of failover epoch 2 (it checked only 1):
        // its timeline may hold the old home's loss window. Node 2 checked
        // epoch 2.
        let held = Arc::new(MemoryStore::default());
        post_by(&held, "alpha", 0, 6, 9).await;
        let checked = Arc::new(MemoryStore::default());
        post_by(&checked, "alpha", 0, 6, 2).await;
        let from = FromStore {
            stores: HashMap::from([
                (NodeId(1), (Arc::clone(&held), Slot(6))),
                (NodeId(2), (Arc::clone(&checked), Slot(6))),
            ]),
            checked: HashMap::from([(NodeId(1), 1), (NodeId(2), 2)]),
            ..FromStore::default()
        };
        let target = Arc::new(MemoryStore::default());
        let copied = copy(
            &from,
            &*target,
            0,
            &nodes(&[1, 2]).checked_against(2),
            Slot(6),
        )
        .await
        .unwrap();
        assert_eq!(copied.source, NodeId(2));
        assert_eq!(
            everything(&*target, "alpha").await,
            everything(&*checked, "alpha").await
        );
        // With node 1 alone there is no source.
        let e = copy(&from, &*target, 0, &nodes(&[1]).checked_against(2), Slot(6))
            .await
            .unwrap_err();
        assert!(e.to_string().contains("has not checked"), "{e}");
        // A copier held for epoch 2 (it checked 1) takes node 1.
        let held_copier = Arc::new(MemoryStore::default());
        let copied = copy(
            &from,
            &*held_copier,
            0,
            &nodes(&[1]).checked_against(1),
            Slot(6),
        )
        .await
        .unwrap();
        assert_eq!(copied.source, NodeId(1));
    }

    #[tokio::test]
    async fn no_source_reaching_the_mark_is_an_error() {
        let source = Arc::new(MemoryStore::default());
        post(&source, "alpha", 0, 3, 0, true).await;
        let from = FromStore {
            stores: HashMap::from([(NodeId(1), (source, Slot(4)))]),
            ..FromStore::default()
        };
        let target = Arc::new(MemoryStore::default());
        let e = copy(&from, &*target, 0, &nodes(&[1]), Slot(5))
            .await
            .unwrap_err();
        assert!(e.to_string().contains("only up to"), "{e}");
    }

    #[test]
    fn on_a_shared_store_the_replicas_of_this_datacenter_come_first_and_write_its_copy() {
        let dc1 = |n: NodeId| n.0 <= 3;
        let order = vec![NodeId(5), NodeId(2), NodeId(4), NodeId(3)];
        let shared = Sources::new(order.clone(), true, dc1);
        assert_eq!(
            shared.nodes,
            [NodeId(2), NodeId(3), NodeId(5), NodeId(4)],
            "this datacenter first, each group in the order given"
        );
        assert!(shared.same_copy(NodeId(2)) && shared.same_copy(NodeId(3)));
        assert!(!shared.same_copy(NodeId(5)) && !shared.same_copy(NodeId(4)));
        let own = Sources::new(order.clone(), false, dc1);
        assert_eq!(own.nodes, order, "a store of its own: the order given");
        assert!(own.same_copy.is_empty(), "and every source is copied from");
    }

    #[tokio::test]
    async fn on_a_shared_store_a_copy_from_another_datacenter_fills_the_holes_and_one_from_its_own_copies_nothing()
     {
        // The other datacenter's copy of the shared store has alpha's 500
        // and beta's 40; this datacenter's copy got only some of them
        // through the store's own replication: alpha's first 100 and
        // 301-400 (a hole between, and nothing after), none of beta's.
        let theirs = Arc::new(MemoryStore::new_shared());
        post(&theirs, "alpha", 0, 500, 0, true).await;
        post(&theirs, "beta", 0, 40, 0, true).await;
        let ours = Arc::new(MemoryStore::new_shared());
        let alpha = everything(&*theirs, "alpha").await;
        ours.append(&alpha[..100]).await.unwrap();
        ours.append(&alpha[300..400]).await.unwrap();
        let from = FromStore {
            stores: HashMap::from([
                (NodeId(4), (Arc::clone(&theirs), Slot(60))),
                (NodeId(2), (Arc::clone(&ours), Slot(60))),
            ]),
            ..FromStore::default()
        };
        // Node 2 is in this datacenter: its mark is installed, nothing
        // is copied (what it applied is in this copy already).
        let same = Sources {
            nodes: vec![NodeId(2), NodeId(4)],
            same_copy: [NodeId(2)].into(),
            checked: 0,
        };
        let copied = copy(&from, &*ours, 0, &same, Slot(50)).await.unwrap();
        assert_eq!((copied.source, copied.messages), (NodeId(2), 0));
        assert_eq!(everything(&*ours, "alpha").await.len(), 200);
        // Node 4 is in the other datacenter: the holes are filled, and
        // only what was missing is written.
        let copied = copy(&from, &*ours, 0, &nodes(&[4]), Slot(50))
            .await
            .unwrap();
        assert_eq!((copied.source, copied.messages), (NodeId(4), 300 + 40));
        for room in ["alpha", "beta"] {
            assert_eq!(
                everything(&*ours, room).await,
                everything(&*theirs, room).await,
                "{room} is whole"
            );
        }
        // Again: nothing is missing, nothing is written.
        let copied = copy(&from, &*ours, 0, &nodes(&[4]), Slot(50))
            .await
            .unwrap();
        assert_eq!(copied.messages, 0);
    }
}
