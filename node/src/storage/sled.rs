//! The embedded store: one sled database in the node's data folder.
//!
//! Trees and keys (big-endian, so byte order is the order we read in):
//!
//! | tree | key | value |
//! |---|---|---|
//! | `acceptor` | room | `AcceptorRecord` |
//! | `chat_details` | room | `CommittedRecord` |
//! | `timeline` | `len(room) ‖ room ‖ "yyyy-MM" ‖ id (16)` | [`Pointer`] into the envelope log |
//! | `timeline_buckets` | `len(room) ‖ room ‖ "yyyy-MM"` | empty |
//!
//! | `meta` | `timeline_checkpoint` | log position up to which the index is durable |
//!
//! Envelopes themselves live in an append-only log next to the database
//! (`envelopes/`, see [`super::envelope_log`] for why not in sled). The log
//! is the source of truth for messages: each record names its room and id.
//!
//! Durability: every call that must be durable when it returns waits for a
//! sync that *started* after its writes, run by a group-commit task once for
//! all writers that queued up meanwhile — a thousand concurrent posts cost
//! one fsync, not a thousand. An `append` waits only for the envelope log's
//! fsync; acceptor and membership writes wait for sled's flush. The timeline
//! index is flushed every few seconds in the background, and each flush
//! records a checkpoint; [`SledStore::open`] re-indexes whatever the log
//! holds past the last durable checkpoint, so a crash loses no acknowledged
//! message from the index.
//!
//! A truncation ([`ChatStore::truncate_room`]) removes index entries only:
//! the envelopes stay in the log, unreferenced. It is durable once a
//! checkpoint past their log records is: before that, a restart would
//! re-index them from the log. So it runs a checkpoint before returning,
//! and checkpoints never move back.

use std::path::Path;

use async_trait::async_trait;
use prost::Message as _;
use saferchat_consensus::handover::{PartitionSeal, TransferRecord};
use saferchat_consensus::{AcceptorState, RoomId};
use saferchat_proto::peer as ppb;
use std::ops::Bound;
use std::sync::{Arc, Mutex};

use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

use super::durable::SledFiles;
use super::envelope_log::{Entry, EnvelopeLog, Pointer, Position};
use super::{AcceptorStore, ChatStore, CommittedRoom, Range, RoomSummary, StoredMessage};
use crate::convert;
use crate::error::NodeError;
use crate::message_id::{Bucket, MessageId};

/// Flush requests waiting for the group-commit task, at most.
const FLUSH_QUEUE_MAX: usize = 4096;
/// How often the timeline index is flushed and checkpointed.
const CHECKPOINT_MS: u64 = 5_000;
/// Key of the checkpoint in the `meta` tree.
const CHECKPOINT_KEY: &[u8] = b"timeline_checkpoint";

/// What a caller needs durable.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Durable {
    /// Messages: the envelope log.
    Log,
    /// Everything, sled included.
    All,
}

type FlushRequest = (Durable, oneshot::Sender<Result<(), String>>);

/// What the index lock guards besides the index: truncations that changed
/// it, and how many of them a completed checkpoint covers. A truncation is
/// durable once a checkpoint that began after it completed (see the module
/// docs).
#[derive(Debug, Default)]
struct Indexing {
    /// Bumped by each truncation that changed the index.
    truncations: u64,
    /// The highest `truncations` a completed checkpoint read (before it
    /// flushed).
    durable_truncations: u64,
}

/// The sled-backed store; cheap to clone.
#[derive(Clone, Debug)]
pub struct SledStore {
    db: sled::Db,
    acceptor: sled::Tree,
    /// Each partition's handover state (`PartitionSealRecord`), by the
    /// partition's number in big-endian bytes.
    partition_seals: sled::Tree,
    /// The mover's transfer record (`HandoverRecord`) per partition.
    transfers: sled::Tree,
    rooms: sled::Tree,
    timeline: sled::Tree,
    buckets: sled::Tree,
    meta: sled::Tree,
    log: Arc<EnvelopeLog>,
    /// sled's own files, synced after each of its flushes.
    files: Arc<Mutex<SledFiles>>,
    /// Held while appending to the log and indexing, and while reading the
    /// log's end for a checkpoint: a checkpoint never passes a record whose
    /// index entry is not in sled yet. Also held while truncating.
    index_lock: Arc<Mutex<Indexing>>,
    flush: mpsc::Sender<FlushRequest>,
    /// The group-commit and checkpoint tasks, for [`SledStore::close`].
    tasks: Arc<Mutex<Vec<JoinHandle<()>>>>,
    stop: tokio_util::sync::CancellationToken,
}

impl SledStore {
    /// Opens (or creates) the database under `dir` and starts its
    /// group-commit task. Must be called inside a tokio runtime.
    ///
    /// # Errors
    /// [`NodeError::Storage`] when sled cannot open the folder (e.g. it is
    /// in use by another node process).
    pub fn open(dir: &Path) -> Result<SledStore, NodeError> {
        let db = sled::Config::new()
            .path(dir)
            // The default 1 GiB page cache is sized for a dedicated machine.
            .cache_capacity(256 * 1024 * 1024)
            // No background flushes: what must be durable is flushed when
            // asked, and the timeline index by the checkpoint task.
            .flush_every_ms(None)
            .open()
            .map_err(|e| NodeError::Storage(format!("opening sled at {}: {e}", dir.display())))?;
        let tree = |name: &str| db.open_tree(name).map_err(NodeError::storage);
        let mut files = SledFiles::open(dir)?;
        let log = Arc::new(EnvelopeLog::open(&dir.join("envelopes"))?);
        let (timeline, buckets, meta) =
            (tree("timeline")?, tree("timeline_buckets")?, tree("meta")?);
        recover_index(&db, &mut files, &log, &timeline, &buckets, &meta)?;
        let files = Arc::new(Mutex::new(files));
        let index_lock = Arc::new(Mutex::new(Indexing::default()));
        let (flush, requests) = mpsc::channel(FLUSH_QUEUE_MAX);
        let task = group_commit(db.clone(), Arc::clone(&files), Arc::clone(&log), requests);
        let stop = tokio_util::sync::CancellationToken::new();
        let checkpointer = tokio::spawn(checkpoints(
            db.clone(),
            Arc::clone(&files),
            Arc::clone(&log),
            meta.clone(),
            Arc::clone(&index_lock),
            flush.downgrade(),
            stop.clone(),
        ));
        Ok(SledStore {
            acceptor: tree("acceptor")?,
            partition_seals: tree("partition_seal")?,
            transfers: tree("handover_transfer")?,
            rooms: tree("chat_details")?,
            timeline,
            buckets,
            meta,
            tasks: Arc::new(Mutex::new(vec![tokio::spawn(task), checkpointer])),
            stop,
            log,
            files,
            index_lock,
            db,
            flush,
        })
    }

    /// Waits until everything written before the call is durable.
    async fn sync(&self) -> Result<(), NodeError> {
        self.sync_for(Durable::All).await
    }

    async fn sync_for(&self, needs: Durable) -> Result<(), NodeError> {
        let (tx, rx) = oneshot::channel();
        self.flush
            .send((needs, tx))
            .await
            .map_err(|_| NodeError::Storage("sled flusher stopped".into()))?;
        rx.await
            .map_err(|_| NodeError::Storage("sled flusher stopped".into()))?
            .map_err(NodeError::Storage)
    }

    /// Flushes, then releases the database (and its folder lock) once the
    /// group-commit task has ended. Call on the last handle: other clones
    /// keep the task alive.
    ///
    /// # Errors
    /// [`NodeError::Storage`] when the final flush fails.
    pub async fn close(self) -> Result<(), NodeError> {
        self.flush().await?;
        self.stop.cancel();
        let tasks = std::mem::take(&mut *self.tasks.lock().expect("lock"));
        drop(self);
        for task in tasks {
            task.await.map_err(NodeError::storage)?;
        }
        Ok(())
    }

    /// Flushes everything now (used at shutdown).
    ///
    /// # Errors
    /// [`NodeError::Storage`] when the flush fails.
    pub async fn flush(&self) -> Result<(), NodeError> {
        checkpoint(
            &self.db,
            &self.files,
            &self.log,
            &self.meta,
            &self.index_lock,
        )
        .await
        .map_err(NodeError::Storage)
    }
}

/// Re-indexes the log records past the last durable checkpoint (their
/// index entries may not have reached the disk before a crash), then makes
/// the index durable and moves the checkpoint to the end of the log.
fn recover_index(
    db: &sled::Db,
    files: &mut SledFiles,
    log: &EnvelopeLog,
    timeline: &sled::Tree,
    buckets: &sled::Tree,
    meta: &sled::Tree,
) -> Result<(), NodeError> {
    let from = meta
        .get(CHECKPOINT_KEY)
        .map_err(NodeError::storage)?
        .and_then(|raw| Position::from_bytes(&raw))
        .unwrap_or_default();
    let mut reindexed = 0u64;
    let visited = log.replay(from, |room, id, pointer| {
        let key = message_key(&room, id);
        if !timeline.contains_key(&key).map_err(NodeError::storage)? {
            timeline
                .insert(key, &pointer.to_bytes()[..])
                .map_err(NodeError::storage)?;
            buckets
                .insert(bucket_prefix(&room, id.bucket()), &[] as &[u8])
                .map_err(NodeError::storage)?;
            reindexed += 1;
        }
        Ok(())
    })?;
    db.flush().map_err(NodeError::storage)?;
    files.sync()?;
    meta.insert(CHECKPOINT_KEY, &log.end().to_bytes()[..])
        .map_err(NodeError::storage)?;
    db.flush().map_err(NodeError::storage)?;
    files.sync()?;
    if reindexed > 0 {
        tracing::info!(
            visited,
            reindexed,
            "re-indexed messages from the envelope log after a crash"
        );
    }
    Ok(())
}

/// sled's flush, then the syncs that make it durable ([`SledFiles`]).
async fn flush_durably(db: &sled::Db, files: &Arc<Mutex<SledFiles>>) -> Result<(), String> {
    db.flush_async().await.map_err(|e| e.to_string())?;
    let files = Arc::clone(files);
    tokio::task::spawn_blocking(move || files.lock().expect("lock").sync())
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| e.to_string())
}

/// Flushes the timeline index and records the log position it covers.
/// The recorded position never moves back (two checkpoints may overlap):
/// a truncation relies on replay never reaching what it deleted again.
async fn checkpoint(
    db: &sled::Db,
    files: &Arc<Mutex<SledFiles>>,
    log: &Arc<EnvelopeLog>,
    meta: &sled::Tree,
    index_lock: &Mutex<Indexing>,
) -> Result<(), String> {
    let (covered, truncated) = {
        let indexing = index_lock.lock().expect("lock");
        (log.end(), indexing.truncations)
    };
    let syncing = Arc::clone(log);
    tokio::task::spawn_blocking(move || syncing.sync())
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| e.to_string())?;
    flush_durably(db, files).await?;
    meta.fetch_and_update(CHECKPOINT_KEY, |old| {
        let newest = old
            .and_then(Position::from_bytes)
            .map_or(covered, |old| old.max(covered));
        Some(newest.to_bytes().to_vec())
    })
    .map_err(|e| e.to_string())?;
    flush_durably(db, files).await?;
    let mut indexing = index_lock.lock().expect("lock");
    indexing.durable_truncations = indexing.durable_truncations.max(truncated);
    Ok(())
}

/// Flushes and checkpoints the timeline index every few seconds, on its own
/// task so that posts never wait behind it; ends with the store.
async fn checkpoints(
    db: sled::Db,
    files: Arc<Mutex<SledFiles>>,
    log: Arc<EnvelopeLog>,
    meta: sled::Tree,
    index_lock: Arc<Mutex<Indexing>>,
    store_alive: mpsc::WeakSender<FlushRequest>,
    stop: tokio_util::sync::CancellationToken,
) {
    let mut every = tokio::time::interval(std::time::Duration::from_millis(CHECKPOINT_MS));
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    every.tick().await;
    loop {
        tokio::select! {
            _ = every.tick() => {}
            () = stop.cancelled() => return,
        }
        if store_alive.upgrade().is_none() {
            return;
        }
        if let Err(e) = checkpoint(&db, &files, &log, &meta, &index_lock).await {
            tracing::warn!(error = %e, "timeline index checkpoint failed (will retry)");
        }
    }
}

/// One round of syncing serves every request that arrived before it
/// started.
async fn group_commit(
    db: sled::Db,
    files: Arc<Mutex<SledFiles>>,
    log: Arc<EnvelopeLog>,
    mut requests: mpsc::Receiver<FlushRequest>,
) {
    let mut waiting: Vec<FlushRequest> = Vec::new();
    while let Some(first) = requests.recv().await {
        waiting.push(first);
        while let Ok(more) = requests.try_recv() {
            waiting.push(more);
        }
        let needs_sled = waiting.iter().any(|(needs, _)| *needs == Durable::All);
        let syncing = Arc::clone(&log);
        let synced = tokio::task::spawn_blocking(move || syncing.sync())
            .await
            .map_err(|e| e.to_string())
            .and_then(|r| r.map_err(|e| e.to_string()));
        let result = match synced {
            Ok(()) if needs_sled => flush_durably(&db, &files).await,
            other => other,
        };
        metrics::counter!("saferchat_sled_flushes_total").increment(1);
        metrics::histogram!("saferchat_sled_flush_batch").record(waiting.len() as f64);
        for (_, waiter) in waiting.drain(..) {
            // A waiter that gave up is fine to skip.
            let _ = waiter.send(result.clone());
        }
    }
}

fn room_prefix(room: &RoomId) -> Vec<u8> {
    let name = room.as_str().as_bytes();
    let mut key = Vec::with_capacity(1 + name.len() + 7 + 16);
    key.push(u8::try_from(name.len()).expect("room names are at most 64 bytes"));
    key.extend_from_slice(name);
    key
}

fn bucket_prefix(room: &RoomId, bucket: Bucket) -> Vec<u8> {
    let mut key = room_prefix(room);
    let text = bucket.to_string();
    assert_eq!(text.len(), 7, "buckets are yyyy-MM");
    key.extend_from_slice(text.as_bytes());
    key
}

fn message_key(room: &RoomId, id: MessageId) -> Vec<u8> {
    let mut key = bucket_prefix(room, id.bucket());
    key.extend_from_slice(&id.to_bytes());
    key
}

impl SledStore {
    /// The message an index entry points at; `None` when the log does not
    /// have it (an append that crashed before it was acknowledged).
    fn load_message(
        &self,
        room: &RoomId,
        key: &[u8],
        value: &sled::IVec,
    ) -> Result<Option<StoredMessage>, NodeError> {
        let id = MessageId::from_bytes(&key[key.len() - 16..]).map_err(NodeError::storage)?;
        let Some((seq, envelope)) = self.log.read(Pointer::from_bytes(value)?, room, id)? else {
            tracing::warn!(%room, %id, "timeline entry without its envelope (an unacknowledged append cut by a crash); skipped");
            return Ok(None);
        };
        Ok(Some(StoredMessage {
            room: room.clone(),
            id,
            seq,
            envelope,
        }))
    }

    /// The buckets `room` has index entries in, oldest first.
    fn room_buckets(&self, room: &RoomId) -> Result<Vec<Bucket>, NodeError> {
        let prefix = room_prefix(room);
        self.buckets
            .scan_prefix(&prefix)
            .map(|item| {
                let (key, _) = item.map_err(NodeError::storage)?;
                let text = std::str::from_utf8(&key[prefix.len()..]).map_err(NodeError::storage)?;
                Bucket::parse(text)
                    .ok_or_else(|| NodeError::Storage(format!("bad bucket key {text:?}")))
            })
            .collect()
    }

    /// Removes the index entries of `room` above `after` (all when `None`)
    /// and the bucket entries left without any; returns how many index
    /// entries it removed and whether it changed anything. Call under the
    /// index lock.
    fn remove_after(
        &self,
        room: &RoomId,
        after: Option<MessageId>,
    ) -> Result<(u64, bool), NodeError> {
        let from = after.map(MessageId::bucket);
        let mut removed = 0u64;
        let mut changed = false;
        // Newest bucket first: one that fails part-way leaves a prefix of
        // the timeline, as the copy expects of a replica's store.
        for bucket in self.room_buckets(room)?.into_iter().rev() {
            if from.is_some_and(|f| bucket < f) {
                break;
            }
            let prefix = bucket_prefix(room, bucket);
            let start = match after {
                Some(a) if a.bucket() == bucket => {
                    let mut k = message_key(room, a);
                    k.push(0); // the first key strictly after `a`
                    k
                }
                _ => prefix.clone(),
            };
            let mut writes = sled::Batch::default();
            for item in self
                .timeline
                .range(start..)
                .take_while(|item| item.as_ref().map_or(true, |(k, _)| k.starts_with(&prefix)))
            {
                let (key, _) = item.map_err(NodeError::storage)?;
                writes.remove(key);
                removed += 1;
            }
            self.timeline
                .apply_batch(writes)
                .map_err(NodeError::storage)?;
            if self
                .timeline
                .scan_prefix(&prefix)
                .next()
                .transpose()
                .map_err(NodeError::storage)?
                .is_none()
            {
                self.buckets.remove(&prefix).map_err(NodeError::storage)?;
                changed = true;
            }
        }
        Ok((removed, changed || removed > 0))
    }

    /// Collects up to `limit` messages from index entries.
    fn collect(
        &self,
        room: &RoomId,
        entries: impl Iterator<Item = sled::Result<(sled::IVec, sled::IVec)>>,
        limit: usize,
    ) -> Result<Vec<StoredMessage>, NodeError> {
        let mut out = Vec::new();
        for item in entries {
            if out.len() == limit {
                break;
            }
            let (key, value) = item.map_err(NodeError::storage)?;
            if let Some(m) = self.load_message(room, &key, &value)? {
                out.push(m);
            }
        }
        Ok(out)
    }
}

#[async_trait]
impl AcceptorStore for SledStore {
    async fn load_acceptor(&self, room: &RoomId) -> Result<Option<AcceptorState>, NodeError> {
        let Some(raw) = self
            .acceptor
            .get(room.as_str())
            .map_err(NodeError::storage)?
        else {
            return Ok(None);
        };
        let record = ppb::AcceptorRecord::decode(raw.as_ref()).map_err(NodeError::storage)?;
        convert::acceptor_from_pb(&record).map(Some)
    }

    async fn save_acceptors(&self, batch: &[(RoomId, AcceptorState)]) -> Result<(), NodeError> {
        for (room, state) in batch {
            let bytes = convert::acceptor_to_pb(state).encode_to_vec();
            self.acceptor
                .insert(room.as_str(), bytes)
                .map_err(NodeError::storage)?;
        }
        self.sync().await
    }

    async fn list_acceptors(
        &self,
        after: Option<&RoomId>,
        limit: usize,
    ) -> Result<Vec<(RoomId, AcceptorState)>, NodeError> {
        let range = match after {
            Some(after) => self
                .acceptor
                .range::<&[u8], _>((Bound::Excluded(after.as_str().as_bytes()), Bound::Unbounded)),
            None => self.acceptor.iter(),
        };
        let mut out = Vec::new();
        for item in range.take(limit) {
            let (key, raw) = item.map_err(NodeError::storage)?;
            let name = std::str::from_utf8(&key).map_err(NodeError::storage)?;
            let room = RoomId::new(name).map_err(NodeError::storage)?;
            let record = ppb::AcceptorRecord::decode(raw.as_ref()).map_err(NodeError::storage)?;
            out.push((room, convert::acceptor_from_pb(&record)?));
        }
        Ok(out)
    }

    async fn load_partition_seal(&self, partition: u32) -> Result<PartitionSeal, NodeError> {
        let Some(raw) = self
            .partition_seals
            .get(partition.to_be_bytes())
            .map_err(NodeError::storage)?
        else {
            return Ok(PartitionSeal::default());
        };
        let record = ppb::PartitionSealRecord::decode(raw.as_ref()).map_err(NodeError::storage)?;
        convert::handover::seal_from_pb(&record)
    }

    async fn save_partition_seal(
        &self,
        partition: u32,
        seal: &PartitionSeal,
        rooms: &[(RoomId, AcceptorState)],
    ) -> Result<(), NodeError> {
        self.partition_seals
            .insert(
                partition.to_be_bytes(),
                convert::handover::seal_to_pb(seal).encode_to_vec(),
            )
            .map_err(NodeError::storage)?;
        // save_acceptors syncs both trees: one durable batch.
        self.save_acceptors(rooms).await
    }

    async fn load_transfer(&self, partition: u32) -> Result<Option<TransferRecord>, NodeError> {
        let Some(raw) = self
            .transfers
            .get(partition.to_be_bytes())
            .map_err(NodeError::storage)?
        else {
            return Ok(None);
        };
        let record = ppb::HandoverRecord::decode(raw.as_ref()).map_err(NodeError::storage)?;
        convert::handover::record_from_pb(&record).map(Some)
    }

    async fn save_transfer(
        &self,
        partition: u32,
        record: &TransferRecord,
    ) -> Result<(), NodeError> {
        self.transfers
            .insert(
                partition.to_be_bytes(),
                convert::handover::record_to_pb(record).encode_to_vec(),
            )
            .map_err(NodeError::storage)?;
        self.sync().await
    }
}

#[async_trait]
impl ChatStore for SledStore {
    async fn load_room(&self, room: &RoomId) -> Result<Option<CommittedRoom>, NodeError> {
        let Some(raw) = self.rooms.get(room.as_str()).map_err(NodeError::storage)? else {
            return Ok(None);
        };
        let record = ppb::CommittedRecord::decode(raw.as_ref()).map_err(NodeError::storage)?;
        convert::committed_from_pb(&record).map(Some)
    }

    async fn save_room(&self, room: &RoomId, committed: &CommittedRoom) -> Result<bool, NodeError> {
        let new = convert::committed_to_pb(committed).encode_to_vec();
        let revision = committed.state.revision.0;
        let mut wrote = false;
        // sled's fetch_and_update retries the closure on contention, which
        // is exactly compare-and-set on the stored revision.
        self.rooms
            .fetch_and_update(room.as_str(), |old| {
                let older = old.is_none_or(|old| {
                    ppb::CommittedRecord::decode(old)
                        .ok()
                        .and_then(|r| r.state)
                        .is_none_or(|s| s.revision < revision)
                });
                wrote = older;
                if older {
                    Some(new.clone())
                } else {
                    old.map(<[u8]>::to_vec)
                }
            })
            .map_err(NodeError::storage)?;
        self.sync().await?;
        Ok(wrote)
    }

    async fn list_rooms(
        &self,
        after: Option<&RoomId>,
        limit: usize,
    ) -> Result<Vec<RoomSummary>, NodeError> {
        let start: Vec<u8> = after.map_or_else(Vec::new, |a| {
            let mut k = a.as_str().as_bytes().to_vec();
            k.push(0); // the first key strictly after `a`
            k
        });
        let mut out = Vec::new();
        for item in self.rooms.range(start..).take(limit) {
            let (key, raw) = item.map_err(NodeError::storage)?;
            let name = std::str::from_utf8(&key).map_err(NodeError::storage)?;
            let room = RoomId::new(name).map_err(NodeError::storage)?;
            let record = ppb::CommittedRecord::decode(raw.as_ref()).map_err(NodeError::storage)?;
            let state = record.state.unwrap_or_default();
            out.push(RoomSummary {
                room,
                revision: state.revision,
                members: u32::try_from(state.members.len()).expect("bounded"),
            });
        }
        Ok(out)
    }

    async fn append(&self, batch: &[StoredMessage]) -> Result<(), NodeError> {
        self.append_unsynced(batch).await?;
        self.sync_appended().await
    }

    async fn append_unsynced(&self, batch: &[StoredMessage]) -> Result<(), NodeError> {
        let indexing = self.index_lock.lock().expect("lock");
        // Stored once: messages already indexed are not written again.
        let mut fresh = Vec::with_capacity(batch.len());
        for m in batch {
            let key = message_key(&m.room, m.id);
            if !self
                .timeline
                .contains_key(&key)
                .map_err(NodeError::storage)?
            {
                fresh.push((key, m));
            }
        }
        let entries: Vec<Entry<'_>> = fresh
            .iter()
            .map(|(_, m)| Entry {
                room: &m.room,
                id: m.id,
                seq: m.seq,
                envelope: &m.envelope,
            })
            .collect();
        let pointers = self.log.append(&entries)?;
        let mut writes = sled::Batch::default();
        for ((key, m), pointer) in fresh.into_iter().zip(pointers) {
            writes.insert(key, &pointer.to_bytes()[..]);
            let bucket = bucket_prefix(&m.room, m.id.bucket());
            if !self
                .buckets
                .contains_key(&bucket)
                .map_err(NodeError::storage)?
            {
                self.buckets
                    .insert(bucket, &[] as &[u8])
                    .map_err(NodeError::storage)?;
            }
        }
        self.timeline
            .apply_batch(writes)
            .map_err(NodeError::storage)?;
        drop(indexing);
        Ok(())
    }

    async fn sync_appended(&self) -> Result<(), NodeError> {
        self.sync_for(Durable::Log).await
    }

    /// Removes index entries, and the bucket entries left empty (so
    /// `buckets` and `rooms_with_messages` list only buckets with
    /// messages, as before), then runs a checkpoint: it makes the removal
    /// durable in sled and moves the replay start past the log records of
    /// what was removed, which a restart would otherwise index again. A
    /// call that removes nothing still waits for a checkpoint if an earlier
    /// truncation's has not completed (it failed, or its caller gave up),
    /// so that its `Ok` means durable too.
    async fn truncate_room(
        &self,
        room: &RoomId,
        after: Option<MessageId>,
    ) -> Result<u64, NodeError> {
        let (result, pending) = {
            let mut indexing = self.index_lock.lock().expect("lock");
            let result = self.remove_after(room, after);
            // On an error too: some entries may be gone.
            if result.as_ref().map_or(true, |(_, changed)| *changed) {
                indexing.truncations += 1;
            }
            (result, indexing.durable_truncations < indexing.truncations)
        };
        if pending {
            self.flush().await?;
        }
        result.map(|(removed, _)| removed)
    }

    async fn rooms_with_messages(
        &self,
        after: Option<&RoomId>,
        limit: usize,
    ) -> Result<Vec<RoomId>, NodeError> {
        // Keys are `len(room) ‖ room ‖ bucket`: after every bucket of
        // `after` (bucket text is ASCII, below 0xff) in key order.
        let start = after.map_or_else(Vec::new, |a| {
            let mut k = room_prefix(a);
            k.push(0xff);
            k
        });
        let mut rooms: Vec<RoomId> = Vec::new();
        for item in self.buckets.range(start..) {
            let (key, _) = item.map_err(NodeError::storage)?;
            let len = usize::from(key[0]);
            let name = key
                .get(1..=len)
                .and_then(|b| std::str::from_utf8(b).ok())
                .ok_or_else(|| NodeError::Storage("bad bucket-index key".into()))?;
            if rooms.last().is_some_and(|r| r.as_str() == name) {
                continue;
            }
            if rooms.len() == limit {
                break;
            }
            rooms.push(RoomId::new(name).map_err(NodeError::storage)?);
        }
        Ok(rooms)
    }

    async fn buckets(&self, room: &RoomId) -> Result<Vec<Bucket>, NodeError> {
        self.room_buckets(room)
    }

    async fn read_bucket(
        &self,
        room: &RoomId,
        bucket: Bucket,
        range: Range,
        limit: usize,
    ) -> Result<Vec<StoredMessage>, NodeError> {
        let prefix = bucket_prefix(room, bucket);
        let key_of = |id: MessageId| {
            let mut k = prefix.clone();
            k.extend_from_slice(&id.to_bytes());
            k
        };
        match range {
            Range::Before(bound) => {
                let iter = match bound {
                    Some(b) => self.timeline.range(prefix.clone()..key_of(b)),
                    None => self.timeline.scan_prefix(&prefix),
                };
                self.collect(room, iter.rev(), limit)
            }
            Range::After(bound) => {
                let start = match bound {
                    Some(b) => {
                        let mut k = key_of(b);
                        k.push(0); // the first key strictly after `b`
                        k
                    }
                    None => prefix.clone(),
                };
                let iter = self
                    .timeline
                    .range(start..)
                    .take_while(|item| item.as_ref().map_or(true, |(k, _)| k.starts_with(&prefix)));
                self.collect(room, iter, limit)
            }
        }
    }
}
