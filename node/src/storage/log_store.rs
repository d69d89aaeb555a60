//! This node's durable partition-log state: for every partition it
//! replicates, the term it promised, the entries it accepted, the slot up
//! to which it applied them to the timeline, and the compaction floor.
//!
//! Like the envelope log, a file of checksummed records, appended and
//! `fdatasync`ed before anything that depends on them leaves the node (a
//! promise before the Promise, an entry before the Accepted). Each record
//! says what changed in one partition ([`LogRecord`]); replaying the
//! records in order rebuilds the state. Every open, and every time the
//! records appended to a file exceed both [`LOG_FILE_BYTES_MAX`] and the
//! checkpoint it began with, starts a new file that begins with a
//! checkpoint of the whole state, made durable (file and folder) before
//! the older files are deleted, so the files never hold more than twice
//! the live state plus one file of changes, and rewriting the state costs
//! at most as much as was appended since the last time
//! ([`LogStore::wants_rotation`]).
//!
//! Why not sled: entries carry envelopes of up to 512 KiB, and sled
//! rewrites whole leaves (see `envelope_log.rs`); why not the envelope log
//! itself: an entry is a vote, and may be overwritten by a later term,
//! while the envelope log holds only applied messages.
//!
//! # Format
//!
//! `partition-log-NNNNNNNN.bin` files of records
//! `len: u32 ‖ crc32(payload): u32 ‖ payload` (big-endian), the payload an
//! encoded `server.grpc.peer.LogRecord`. A torn record ends the replay of
//! its file (only the last file can have one: older files were complete
//! and synced before a newer one was created).
//!
//! Files are extended [`PREALLOCATE_BYTES`] at a time with zeros, and
//! records overwrite that zeroed space: an `fdatasync` of a write that
//! grows a file must also write the inode (its size), a second device
//! request on every sync (a third of the requests on this path, measured
//! on ext4 and virtio; each request is a costly exit on a VM), while one
//! that overwrites allocated blocks writes only the data. So a length of
//! zero ends the records (no record is empty).

use std::collections::{BTreeMap, HashMap};
use std::fs::{self, File, OpenOptions};
use std::os::unix::fs::FileExt as _;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use prost::Message as _;
use saferchat_consensus::NodeId;
use saferchat_consensus::partition_log::{Entry, HeldCopies, Slot, Term};
use saferchat_proto::peer as pb;

use super::durable::sync_dir;
use crate::convert::log as conv;
use crate::error::NodeError;
use crate::timeline::LogPost;

/// A new file (starting with a checkpoint) is begun beyond this size.
pub const LOG_FILE_BYTES_MAX: u64 = 64 * 1024 * 1024;
const HEADER_BYTES: usize = 8;
const RECORD_BYTES_MAX: u32 = 256 * 1024 * 1024;
/// How much zeroed space a file is extended by when a write needs more.
pub const PREALLOCATE_BYTES: u64 = 4 * 1024 * 1024;

/// The durable state of one partition's acceptor.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PartitionLogState {
    /// The promised term.
    pub promised: Term,
    /// Accepted entries above the floor.
    pub entries: BTreeMap<Slot, Entry<LogPost>>,
    /// Slots up to here are compacted away.
    pub floor: Slot,
    /// Slots up to here are applied to the timeline.
    pub applied: Slot,
    /// The latest home failover epoch whose divergence check this replica
    /// finished, or never needed (0: none).
    pub checked: u64,
    /// While it owes a check: the first slot a copy it installed brought
    /// (`LogReplica::installed_held`).
    pub installed_held: Option<Slot>,
    /// While it owes a check: whose timelines the copies it installed
    /// hold (`LogReplica::held_copies`).
    pub held_copies: HeldCopies,
}

/// A replica's timeline cut back after a home failover and copied up to a
/// slot, or vouched for as it was by the leader that established the
/// failover epoch ([`LogChange::rewind`]); with epoch 0, a held replica's
/// timeline made its leader's (`LogReplica::realigned`), which checks
/// nothing and drops no entry after the slot.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rewind {
    /// The failover epoch checked (0: none).
    pub epoch: u64,
    /// The slot the timeline now holds every post of, and no later one.
    pub applied: Slot,
}

/// One change to one partition's state.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LogChange {
    /// The partition.
    pub partition: u32,
    /// A new promise.
    pub promised: Option<Term>,
    /// Entries written.
    pub entries: Vec<(Slot, Entry<LogPost>)>,
    /// A new compaction floor.
    pub floor: Option<Slot>,
    /// A new applied mark.
    pub applied: Option<Slot>,
    /// A failover epoch checked.
    pub checked: Option<u64>,
    /// A rewind, applied before everything else of the change: the
    /// applied mark and floor become its slot (even lower), entries up to
    /// it and of earlier epochs than its own are dropped, and its epoch is
    /// checked.
    pub rewind: Option<Rewind>,
    /// A copy installed while the replica owed a check, from this slot
    /// (kept as the lowest such slot until a rewind or a later checked
    /// epoch clears it).
    pub installed_held: Option<Slot>,
    /// Whose timelines the copies installed while it owed a check hold,
    /// replacing what was kept (cleared like `installed_held`).
    pub held_copies: Option<HeldCopies>,
}

impl PartitionLogState {
    fn apply(&mut self, change: LogChange) {
        if let Some(r) = change.rewind {
            self.applied = r.applied;
            self.floor = r.applied;
            self.entries
                .retain(|s, e| *s > r.applied && e.term.epoch >= r.epoch);
            self.checked = self.checked.max(r.epoch);
            self.installed_held = None;
            self.held_copies = HeldCopies::default();
        }
        if let Some(c) = change.checked
            && c > self.checked
        {
            self.checked = c;
            self.installed_held = None;
            self.held_copies = HeldCopies::default();
        }
        if let Some(h) = change.held_copies {
            self.held_copies = h;
        }
        if let Some(i) = change.installed_held {
            self.installed_held = Some(self.installed_held.map_or(i, |s| s.min(i)));
        }
        if let Some(t) = change.promised {
            self.promised = self.promised.max(t);
        }
        for (slot, entry) in change.entries {
            if slot > self.floor {
                self.entries.insert(slot, entry);
            }
        }
        if let Some(f) = change.floor
            && f > self.floor
        {
            self.floor = f;
            self.entries.retain(|s, _| *s > f);
        }
        if let Some(a) = change.applied {
            self.applied = self.applied.max(a);
        }
    }

    fn checkpoint(&self, partition: u32) -> LogChange {
        LogChange {
            partition,
            promised: Some(self.promised),
            entries: self.entries.iter().map(|(s, e)| (*s, e.clone())).collect(),
            floor: Some(self.floor),
            applied: Some(self.applied),
            checked: Some(self.checked),
            rewind: None,
            installed_held: self.installed_held,
            held_copies: (self.held_copies != HeldCopies::default()).then_some(self.held_copies),
        }
    }
}

struct Writer {
    file: File,
    number: u32,
    /// Where the next record goes.
    len: u64,
    /// The file's size: zeros from `len` to here.
    allocated: u64,
    /// Bytes of the checkpoint the file starts with.
    checkpoint: u64,
}

impl Writer {
    /// Writes `buf` at the end of the records, first extending the file
    /// with zeros if it is too short.
    fn append(&mut self, buf: &[u8]) -> std::io::Result<()> {
        let end = self.len + buf.len() as u64;
        self.reserve(end)?;
        self.file.write_all_at(buf, self.len)?;
        self.len = end;
        Ok(())
    }

    /// Extends the file with zeros, whole chunks at a time, to at least
    /// `end` bytes.
    fn reserve(&mut self, end: u64) -> std::io::Result<()> {
        if end > self.allocated {
            let target = end.next_multiple_of(PREALLOCATE_BYTES);
            // Not a fresh buffer per extension: that is a page-faulted,
            // zeroed allocation each time.
            static ZEROS: [u8; 64 * 1024] = [0; 64 * 1024];
            let mut at = self.allocated;
            while at < target {
                let n = usize::try_from((target - at).min(ZEROS.len() as u64)).expect("small");
                self.file.write_all_at(&ZEROS[..n], at)?;
                at += n as u64;
            }
            self.allocated = target;
        }
        Ok(())
    }
}

/// The node's partition-log file.
pub struct LogStore {
    dir: PathBuf,
    writer: Mutex<Writer>,
    /// [`LOG_FILE_BYTES_MAX`], or less in tests.
    rotate_after: u64,
    /// Set by the first failed sync: the kernel may have dropped the dirty
    /// pages, so no later sync may be trusted.
    failed: std::sync::atomic::AtomicBool,
}

impl std::fmt::Debug for LogStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LogStore").field("dir", &self.dir).finish()
    }
}

fn io(what: &str, path: &Path, e: std::io::Error) -> NodeError {
    NodeError::Storage(format!("partition log: {what} {}: {e}", path.display()))
}

fn file_path(dir: &Path, n: u32) -> PathBuf {
    dir.join(format!("partition-log-{n:08}.bin"))
}

/// The numbers of the partition-log files in `dir`, in order.
pub(crate) fn files(dir: &Path) -> Result<Vec<u32>, NodeError> {
    let mut out = Vec::new();
    for item in fs::read_dir(dir).map_err(|e| io("listing", dir, e))? {
        let name = item.map_err(|e| io("listing", dir, e))?.file_name();
        if let Some(n) = name
            .to_str()
            .and_then(|n| n.strip_prefix("partition-log-"))
            .and_then(|n| n.strip_suffix(".bin"))
            .and_then(|n| n.parse::<u32>().ok())
        {
            out.push(n);
        }
    }
    out.sort_unstable();
    Ok(out)
}

/// Removes what rotations that did not finish left
/// ([`LogStore::prepare_rotation`]): never in use, never replayed.
fn remove_temp_files(dir: &Path) -> Result<(), NodeError> {
    for item in fs::read_dir(dir).map_err(|e| io("listing", dir, e))? {
        let path = item.map_err(|e| io("listing", dir, e))?.path();
        let leftover = path
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.starts_with("partition-log-") && n.ends_with(".bin.tmp"));
        if leftover {
            fs::remove_file(&path).map_err(|e| io("removing", &path, e))?;
        }
    }
    Ok(())
}

fn encode(change: &LogChange) -> Vec<u8> {
    let record = pb::LogRecord {
        partition: change.partition,
        promised: change.promised.map(conv::term_to_pb),
        entries: change
            .entries
            .iter()
            .map(|(s, e)| conv::entry_to_pb(*s, e))
            .collect(),
        floor: change.floor.map_or(0, |s| s.0),
        applied: change.applied.map_or(0, |s| s.0),
        checked: change.checked.unwrap_or(0),
        rewind: change.rewind.map(|r| pb::LogRewind {
            epoch: r.epoch,
            applied: r.applied.0,
        }),
        installed_held: change.installed_held.map_or(0, |s| s.0),
        held_copies: change.held_copies.map(|h| pb::LogHeldCopies {
            from_leader: h.from_leader.map(|(term, first, last)| pb::LogCopiedRun {
                term: Some(conv::term_to_pb(term)),
                node: 0,
                first: first.0,
                last: last.0,
            }),
            from: h.from.map(|(node, first, last)| pb::LogCopiedRun {
                term: None,
                node: node.0,
                first: first.0,
                last: last.0,
            }),
        }),
    };
    let payload = record.encode_to_vec();
    // An empty record changes nothing, and a zero length ends the replay.
    if payload.is_empty() {
        return Vec::new();
    }
    let mut out = Vec::with_capacity(HEADER_BYTES + payload.len());
    out.extend_from_slice(
        &u32::try_from(payload.len())
            .expect("a record is far below 4 GiB")
            .to_be_bytes(),
    );
    out.extend_from_slice(&crc32fast::hash(&payload).to_be_bytes());
    out.extend_from_slice(&payload);
    out
}

fn decode(payload: &[u8]) -> Option<LogChange> {
    let r = pb::LogRecord::decode(payload).ok()?;
    let entries = r
        .entries
        .iter()
        .map(conv::entry_from_pb)
        .collect::<Result<Vec<_>, _>>()
        .ok()?;
    Some(LogChange {
        partition: r.partition,
        promised: match r.promised {
            Some(t) => Some(conv::term_from_pb(&t).ok()?),
            None => None,
        },
        entries,
        floor: (r.floor > 0).then_some(Slot(r.floor)),
        applied: (r.applied > 0).then_some(Slot(r.applied)),
        checked: (r.checked > 0).then_some(r.checked),
        rewind: r.rewind.map(|w| Rewind {
            epoch: w.epoch,
            applied: Slot(w.applied),
        }),
        installed_held: (r.installed_held > 0).then_some(Slot(r.installed_held)),
        held_copies: match r.held_copies {
            None => None,
            Some(h) => Some(HeldCopies {
                from_leader: match h.from_leader {
                    None => None,
                    Some(run) => Some((
                        conv::term_from_pb(run.term.as_ref()?).ok()?,
                        Slot(run.first),
                        Slot(run.last),
                    )),
                },
                from: h
                    .from
                    .map(|run| (NodeId(run.node), Slot(run.first), Slot(run.last))),
            }),
        },
    })
}

/// Replays one file into `states`; returns where its records end.
fn replay(path: &Path, states: &mut HashMap<u32, PartitionLogState>) -> Result<u64, NodeError> {
    let file = File::open(path).map_err(|e| io("opening", path, e))?;
    let mut offset = 0u64;
    loop {
        let mut header = [0u8; HEADER_BYTES];
        match file.read_exact_at(&mut header, offset) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => break,
            Err(e) => return Err(io("reading", path, e)),
        }
        let len = u32::from_be_bytes(header[..4].try_into().expect("4 bytes"));
        let crc = u32::from_be_bytes(header[4..].try_into().expect("4 bytes"));
        // Zeroed space ahead of the next record, or a torn header.
        if len == 0 || len > RECORD_BYTES_MAX {
            break;
        }
        let mut payload = vec![0u8; len as usize];
        match file.read_exact_at(&mut payload, offset + HEADER_BYTES as u64) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => break,
            Err(e) => return Err(io("reading", path, e)),
        }
        if crc32fast::hash(&payload) != crc {
            break;
        }
        let Some(change) = decode(&payload) else {
            break;
        };
        states.entry(change.partition).or_default().apply(change);
        offset += (HEADER_BYTES + payload.len()) as u64;
    }
    Ok(offset)
}

impl LogStore {
    /// Opens the files in `dir` (created if needed), rebuilds every
    /// partition's state, and starts a new file with a checkpoint of it.
    ///
    /// # Errors
    /// [`NodeError::Storage`] when the folder or a file cannot be used.
    pub fn open(dir: &Path) -> Result<(LogStore, HashMap<u32, PartitionLogState>), NodeError> {
        LogStore::open_with(dir, LOG_FILE_BYTES_MAX)
    }

    /// [`LogStore::open`] with files rotated after `bytes` rather than
    /// [`LOG_FILE_BYTES_MAX`], so that a test sees rotations without
    /// writing hundreds of MiB.
    ///
    /// # Errors
    /// As [`LogStore::open`].
    #[cfg(test)]
    pub fn open_rotating_after(
        dir: &Path,
        bytes: u64,
    ) -> Result<(LogStore, HashMap<u32, PartitionLogState>), NodeError> {
        LogStore::open_with(dir, bytes)
    }

    fn open_with(
        dir: &Path,
        rotate_after: u64,
    ) -> Result<(LogStore, HashMap<u32, PartitionLogState>), NodeError> {
        fs::create_dir_all(dir).map_err(|e| io("creating", dir, e))?;
        remove_temp_files(dir)?;
        let existing = files(dir)?;
        let mut states = HashMap::new();
        for n in &existing {
            replay(&file_path(dir, *n), &mut states)?;
        }
        let number = existing.last().map_or(0, |n| n + 1);
        let writer = start_file(dir, number, &states)?;
        for n in existing {
            let path = file_path(dir, n);
            fs::remove_file(&path).map_err(|e| io("removing", &path, e))?;
        }
        sync_dir(dir)?;
        Ok((
            LogStore {
                dir: dir.to_owned(),
                writer: Mutex::new(writer),
                rotate_after,
                failed: std::sync::atomic::AtomicBool::new(false),
            },
            states,
        ))
    }

    /// Appends changes and makes them durable (one `fdatasync`). Blocking:
    /// call it off the async executor.
    ///
    /// # Errors
    /// [`NodeError::Storage`] when writing or syncing fails, and for good
    /// after a failed sync.
    pub fn write(&self, changes: &[LogChange]) -> Result<(), NodeError> {
        use std::sync::atomic::Ordering;
        if self.failed.load(Ordering::SeqCst) {
            return Err(NodeError::Storage(
                "partition log: an earlier sync failed; restart the node".into(),
            ));
        }
        if changes.is_empty() {
            return Ok(());
        }
        let mut buf = Vec::new();
        for c in changes {
            buf.extend_from_slice(&encode(c));
        }
        if buf.is_empty() {
            return Ok(());
        }
        let mut w = self.writer.lock().expect("lock");
        let path = file_path(&self.dir, w.number);
        let result = w
            .append(&buf)
            .and_then(|()| w.file.sync_data())
            .map_err(|e| io("writing", &path, e));
        if result.is_err() {
            self.failed.store(true, Ordering::SeqCst);
        }
        result
    }

    /// Whether it is time for [`LogStore::rotate`]: the records written
    /// after the current file's checkpoint exceed [`LOG_FILE_BYTES_MAX`]
    /// and the checkpoint itself. Not the file's size alone: a checkpoint
    /// holds every entry not compacted yet (a leader keeps up to 16 MiB
    /// per partition for followers and learners that fall behind), and
    /// one larger than the limit made every driver pass rotate again,
    /// rewriting the whole retained log each time while every partition
    /// of the node waited: 69 rotations in 20 s of a throughput run on
    /// three nodes, 0.19 s each at the median, up to 0.98 s, the cause of
    /// that run's near-second post latencies. So rewriting costs at most
    /// as much as was appended since the last rotation, and the files
    /// take at most twice the live state plus the limit.
    pub fn wants_rotation(&self) -> bool {
        let w = self.writer.lock().expect("lock");
        rotation_due(w.len, w.checkpoint, self.rotate_after)
    }

    /// Starts a new file with a checkpoint of `states` (the whole live
    /// state), durable before the older file is deleted. Blocking: the
    /// steps below in one call, for tests (the driver runs them apart).
    ///
    /// # Errors
    /// [`NodeError::Storage`] when the new file cannot be written.
    #[cfg(test)]
    pub fn rotate(&self, states: &HashMap<u32, PartitionLogState>) -> Result<(), NodeError> {
        let prepared = self.prepare_rotation(states, self.rotation_point())?;
        self.finish_rotation(prepared)
    }

    /// Where the current file stands: take it together with the states
    /// given to [`LogStore::prepare_rotation`], with no write in between,
    /// so that the states are what the file's records up to here replay
    /// to.
    pub fn rotation_point(&self) -> RotationPoint {
        let w = self.writer.lock().expect("lock");
        RotationPoint {
            file: w.number,
            len: w.len,
        }
    }

    /// Writes the next file's checkpoint of `states` under a temporary
    /// name and syncs it, while writes go on to the current file: the slow
    /// part of a rotation (the checkpoint holds every retained entry, tens
    /// of MiB), done off the driver's loop. Blocking.
    ///
    /// # Errors
    /// [`NodeError::Storage`] when the file cannot be written.
    pub fn prepare_rotation(
        &self,
        states: &HashMap<u32, PartitionLogState>,
        point: RotationPoint,
    ) -> Result<PreparedFile, NodeError> {
        let path = temp_path(&self.dir, point.file + 1);
        // A leftover of a rotation that did not finish.
        match fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io("removing", &path, e)),
        }
        let writer = start_file_at(&path, point.file + 1, states)?;
        Ok(PreparedFile {
            writer,
            from: point,
        })
    }

    /// Ends a rotation: copies what was written to the current file since
    /// the rotation point to the new file, syncs it, gives it its name
    /// (the folder synced), writes go to it from now on, and the old file
    /// is deleted. Writes wait meanwhile, for a copy of what they added
    /// during the preparation only. A crash before the rename leaves the
    /// old file alone in use (and the temporary one is ignored and
    /// removed); after it, both files replay in order to the same state.
    /// Blocking.
    ///
    /// # Errors
    /// [`NodeError::Storage`] when a file cannot be read, written or
    /// renamed, or the current file is not the one the rotation started
    /// from.
    pub fn finish_rotation(&self, prepared: PreparedFile) -> Result<(), NodeError> {
        let PreparedFile {
            writer: mut next,
            from,
        } = prepared;
        let mut w = self.writer.lock().expect("lock");
        let old_path = file_path(&self.dir, w.number);
        if w.number != from.file || w.len < from.len {
            return Err(NodeError::Storage(format!(
                "partition log: a rotation from file {} at {} cannot finish on file {} at {}",
                from.file, from.len, w.number, w.len
            )));
        }
        let temp = temp_path(&self.dir, next.number);
        let mut tail = vec![0u8; usize::try_from(w.len - from.len).expect("fits in memory")];
        w.file
            .read_exact_at(&mut tail, from.len)
            .map_err(|e| io("reading", &old_path, e))?;
        next.append(&tail)
            .and_then(|()| next.reserve(next.len + 1))
            .and_then(|()| next.file.sync_data())
            .map_err(|e| io("writing", &temp, e))?;
        let path = file_path(&self.dir, next.number);
        fs::rename(&temp, &path).map_err(|e| io("renaming", &temp, e))?;
        sync_dir(&self.dir)?;
        *w = next;
        drop(w);
        fs::remove_file(&old_path).map_err(|e| io("removing", &old_path, e))?;
        sync_dir(&self.dir)
    }
}

/// A file and how far its records went, for [`LogStore::prepare_rotation`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RotationPoint {
    file: u32,
    len: u64,
}

/// The next file, its checkpoint written and synced under a temporary name
/// ([`LogStore::prepare_rotation`]).
pub struct PreparedFile {
    writer: Writer,
    from: RotationPoint,
}

impl std::fmt::Debug for PreparedFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PreparedFile")
            .field("number", &self.writer.number)
            .field("from", &self.from)
            .finish()
    }
}

fn temp_path(dir: &Path, n: u32) -> PathBuf {
    dir.join(format!("partition-log-{n:08}.bin.tmp"))
}

/// [`LogStore::wants_rotation`]'s rule, for a file of `len` bytes of
/// records that starts with a checkpoint of `checkpoint` bytes, with
/// `limit` bytes as [`LOG_FILE_BYTES_MAX`].
fn rotation_due(len: u64, checkpoint: u64, limit: u64) -> bool {
    len.saturating_sub(checkpoint) > limit.max(checkpoint)
}

/// Creates file `number` holding a checkpoint of `states`, synced with
/// its folder entry.
fn start_file(
    dir: &Path,
    number: u32,
    states: &HashMap<u32, PartitionLogState>,
) -> Result<Writer, NodeError> {
    let writer = start_file_at(&file_path(dir, number), number, states)?;
    sync_dir(dir)?;
    Ok(writer)
}

/// Creates the file at `path` holding a checkpoint of `states`, synced
/// (not its folder entry).
fn start_file_at(
    path: &Path,
    number: u32,
    states: &HashMap<u32, PartitionLogState>,
) -> Result<Writer, NodeError> {
    let file = OpenOptions::new()
        .create_new(true)
        .write(true)
        .read(true)
        .open(path)
        .map_err(|e| io("creating", path, e))?;
    let mut buf = Vec::new();
    let mut partitions: Vec<_> = states.keys().copied().collect();
    partitions.sort_unstable();
    for p in partitions {
        buf.extend_from_slice(&encode(&states[&p].checkpoint(p)));
    }
    let mut writer = Writer {
        file,
        number,
        len: 0,
        allocated: 0,
        checkpoint: buf.len() as u64,
    };
    writer
        .append(&buf)
        .and_then(|()| writer.reserve(writer.len + 1))
        .map_err(|e| io("writing", path, e))?;
    writer.file.sync_all().map_err(|e| io("syncing", path, e))?;
    Ok(writer)
}

/// Applies changes to in-memory states the way a replay would.
pub fn fold(states: &mut HashMap<u32, PartitionLogState>, changes: Vec<LogChange>) {
    for c in changes {
        states.entry(c.partition).or_default().apply(c);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use saferchat_consensus::NodeId;
    use saferchat_consensus::partition_log::Value;

    fn term(round: u64) -> Term {
        // An epoch other than 0, so that a round trip that dropped it
        // would show.
        Term {
            epoch: 2,
            round,
            node: NodeId(2),
        }
    }

    fn post(n: u8) -> Entry<LogPost> {
        Entry {
            term: term(1),
            value: Value::Post(LogPost {
                room: saferchat_consensus::RoomId::new("r").unwrap(),
                proposed_ms: i64::from(n),
                seed: u64::from(n),
                origin: (NodeId(1), u64::from(n)),
                envelope: Bytes::from(vec![n; 10]),
                retry_only: n.is_multiple_of(2),
            }),
        }
    }

    #[test]
    fn changes_survive_reopening_and_compaction_drops_entries() {
        let dir = tempfile::tempdir().unwrap();
        let (store, states) = LogStore::open(dir.path()).unwrap();
        assert!(states.is_empty());
        let changes = vec![
            LogChange {
                partition: 7,
                promised: Some(term(1)),
                entries: vec![(Slot(1), post(1)), (Slot(2), post(2))],
                ..LogChange::default()
            },
            LogChange {
                partition: 7,
                entries: vec![(
                    Slot(2),
                    Entry {
                        term: term(2),
                        value: Value::Noop,
                    },
                )],
                promised: Some(term(2)),
                ..LogChange::default()
            },
            LogChange {
                partition: 9,
                promised: Some(term(5)),
                applied: Some(Slot(3)),
                ..LogChange::default()
            },
        ];
        store.write(&changes).unwrap();
        let mut expected = HashMap::new();
        fold(&mut expected, changes);
        drop(store);

        let (store, states) = LogStore::open(dir.path()).unwrap();
        assert_eq!(states, expected);
        assert_eq!(states[&7].entries[&Slot(2)].value, Value::Noop);
        assert_eq!(states[&9].applied, Slot(3));
        // Compaction.
        let compact = vec![LogChange {
            partition: 7,
            floor: Some(Slot(1)),
            applied: Some(Slot(1)),
            ..LogChange::default()
        }];
        store.write(&compact).unwrap();
        let mut expected = states;
        fold(&mut expected, compact);
        store.rotate(&expected).unwrap();
        drop(store);
        let (_store, states) = LogStore::open(dir.path()).unwrap();
        assert_eq!(states, expected);
        assert_eq!(
            states[&7].entries.keys().copied().collect::<Vec<_>>(),
            [Slot(2)]
        );
        assert_eq!(files(dir.path()).unwrap().len(), 1, "older files deleted");
    }

    /// A rewind lowers the applied mark and the floor, drops the entries up
    /// to it and those of earlier epochs, and the checked epoch survives
    /// reopening and a rotation's checkpoint.
    #[test]
    fn a_rewind_lowers_the_marks_and_drops_old_epochs_entries_for_good() {
        let dir = tempfile::tempdir().unwrap();
        let (store, _) = LogStore::open(dir.path()).unwrap();
        let old = |n: u8| Entry {
            term: Term {
                epoch: 1,
                ..term(1)
            },
            ..post(n)
        };
        let changes = vec![
            LogChange {
                partition: 3,
                promised: Some(term(1)),
                entries: vec![(Slot(5), old(5)), (Slot(6), post(6)), (Slot(7), old(7))],
                floor: Some(Slot(4)),
                applied: Some(Slot(7)),
                ..LogChange::default()
            },
            LogChange {
                partition: 3,
                rewind: Some(Rewind {
                    epoch: 2,
                    applied: Slot(2),
                }),
                ..LogChange::default()
            },
        ];
        store.write(&changes).unwrap();
        drop(store);
        let (store, states) = LogStore::open(dir.path()).unwrap();
        let state = &states[&3];
        assert_eq!(
            (state.applied, state.floor, state.checked),
            (Slot(2), Slot(2), 2)
        );
        assert_eq!(
            state.entries.keys().copied().collect::<Vec<_>>(),
            [Slot(6)],
            "epoch 1's entries dropped"
        );
        store.rotate(&states).unwrap();
        drop(store);
        let (_store, again) = LogStore::open(dir.path()).unwrap();
        assert_eq!(again, states, "the checkpoint keeps it");
    }

    /// What a held replica keeps about its copies on partition 4, through
    /// the changes `installed(n)` records: after `installed(first)` and
    /// `installed(second)` (and a check of epoch 0, which is no news), it
    /// is what `kept` reads, across reopening and a rotation's checkpoint;
    /// once a later epoch is checked it is what `forgotten` reads, and
    /// again after `installed(third)` and a rewind.
    fn kept_until_a_check<K: PartialEq + std::fmt::Debug>(
        installed: impl Fn(u64) -> LogChange,
        [first, second, third]: [u64; 3],
        read: impl Fn(&PartitionLogState) -> K,
        kept: K,
        forgotten: K,
    ) {
        let dir = tempfile::tempdir().unwrap();
        let reopen = |store: LogStore| {
            drop(store);
            LogStore::open(dir.path()).unwrap()
        };
        let change = |checked, rewind| LogChange {
            partition: 4,
            checked,
            rewind,
            ..LogChange::default()
        };
        let (store, _) = LogStore::open(dir.path()).unwrap();
        store.write(&[installed(first), installed(second)]).unwrap();
        store.write(&[change(Some(0), None)]).unwrap();
        let (store, states) = reopen(store);
        assert_eq!(read(&states[&4]), kept, "reopened");
        store.rotate(&states).unwrap();
        let (store, again) = reopen(store);
        assert_eq!(again, states, "the checkpoint keeps it");
        store.write(&[change(Some(2), None)]).unwrap();
        let (store, checked) = reopen(store);
        assert_eq!(read(&checked[&4]), forgotten, "checked: forgotten");
        store.write(&[installed(third)]).unwrap();
        let rewind = Rewind {
            epoch: 3,
            applied: Slot(12),
        };
        store.write(&[change(None, Some(rewind))]).unwrap();
        let (_store, rewound) = reopen(store);
        assert_eq!(read(&rewound[&4]), forgotten, "rewound: forgotten");
    }

    /// A copy installed while the replica owed a check is remembered from
    /// its lowest slot until a check.
    #[test]
    fn a_copy_installed_while_held_is_remembered_until_a_check() {
        let installed = |from: u64| LogChange {
            partition: 4,
            floor: Some(Slot(from + 3)),
            applied: Some(Slot(from + 3)),
            installed_held: Some(Slot(from)),
            ..LogChange::default()
        };
        kept_until_a_check(
            installed,
            [9, 5, 20],
            |s| s.installed_held,
            Some(Slot(5)),
            None,
        );
    }

    /// Whose timelines a held replica's copies hold is kept as the last
    /// record said until a check.
    #[test]
    fn whose_copies_a_held_replica_holds_is_kept_until_a_check() {
        let term = Term {
            epoch: 2,
            round: 3,
            node: NodeId(5),
        };
        let copies = |last: u64| HeldCopies {
            from_leader: Some((term, Slot(4), Slot(last))),
            from: Some((NodeId(5), Slot(4), Slot(last))),
        };
        let installed = |last: u64| LogChange {
            partition: 4,
            floor: Some(Slot(last)),
            applied: Some(Slot(last)),
            installed_held: Some(Slot(4)),
            held_copies: Some(copies(last)),
            ..LogChange::default()
        };
        kept_until_a_check(
            installed,
            [6, 9, 12],
            |s| s.held_copies,
            copies(9),
            HeldCopies::default(),
        );
    }

    #[test]
    fn a_torn_tail_ends_the_replay() {
        let dir = tempfile::tempdir().unwrap();
        let (store, _) = LogStore::open(dir.path()).unwrap();
        let good = LogChange {
            partition: 1,
            promised: Some(term(3)),
            ..LogChange::default()
        };
        store.write(std::slice::from_ref(&good)).unwrap();
        drop(store);
        let path = file_path(dir.path(), *files(dir.path()).unwrap().last().unwrap());
        let end = replay(&path, &mut HashMap::new()).unwrap();
        let mut torn = encode(&LogChange {
            partition: 1,
            promised: Some(term(9)),
            ..LogChange::default()
        });
        torn.truncate(torn.len() - 1);
        OpenOptions::new()
            .write(true)
            .open(&path)
            .unwrap()
            .write_all_at(&torn, end)
            .unwrap();
        let (_store, states) = LogStore::open(dir.path()).unwrap();
        assert_eq!(states[&1].promised, term(3));
    }

    #[test]
    fn records_overwrite_zeroed_space_and_the_file_grows_a_chunk_at_a_time() {
        let dir = tempfile::tempdir().unwrap();
        let (store, _) = LogStore::open(dir.path()).unwrap();
        let path = file_path(dir.path(), *files(dir.path()).unwrap().last().unwrap());
        let size = || fs::metadata(&path).unwrap().len();
        assert_eq!(size(), PREALLOCATE_BYTES);
        let mut expected = HashMap::new();
        // Small writes: the size (and so the inode) does not change.
        for n in 1..=20u8 {
            let change = vec![LogChange {
                partition: u32::from(n % 3),
                promised: Some(term(u64::from(n))),
                entries: vec![(Slot(u64::from(n)), post(n))],
                ..LogChange::default()
            }];
            store.write(&change).unwrap();
            fold(&mut expected, change);
            assert_eq!(size(), PREALLOCATE_BYTES);
        }
        // A write larger than a chunk (12 envelopes of 400 KiB) extends
        // the file past it, in whole chunks.
        let big = |n: u64| Entry {
            term: term(30),
            value: Value::Post(LogPost {
                room: saferchat_consensus::RoomId::new("r").unwrap(),
                proposed_ms: 1,
                seed: n,
                origin: (NodeId(1), n),
                envelope: Bytes::from(vec![7u8; 400 * 1024]),
                retry_only: false,
            }),
        };
        let change = vec![LogChange {
            partition: 1,
            entries: (30..42).map(|n| (Slot(n), big(n))).collect(),
            ..LogChange::default()
        }];
        store.write(&change).unwrap();
        fold(&mut expected, change);
        assert_eq!(size(), 2 * PREALLOCATE_BYTES);
        drop(store);
        let (_store, states) = LogStore::open(dir.path()).unwrap();
        assert_eq!(states[&1].entries.len(), expected[&1].entries.len());
        assert!(states == expected, "the replay gives back every write");
    }

    #[test]
    fn a_file_is_rotated_once_its_records_outgrow_its_checkpoint_and_the_limit() {
        const MIB: u64 = 1024 * 1024;
        let limit = LOG_FILE_BYTES_MAX;
        assert!(!rotation_due(limit, 0, limit));
        assert!(
            rotation_due(limit + 1, 0, limit),
            "a small checkpoint: the limit"
        );
        assert!(!rotation_due(100 * MIB + limit, 100 * MIB, limit));
        assert!(
            rotation_due(200 * MIB + 1, 100 * MIB, limit),
            "a large checkpoint: as much again"
        );
        assert!(!rotation_due(200 * MIB, 100 * MIB, limit));

        // A checkpoint above the limit (170 uncompacted posts of 400 KiB):
        // the new file must not ask to be rotated again at once.
        let dir = tempfile::tempdir().unwrap();
        let (store, _) = LogStore::open(dir.path()).unwrap();
        let mut state = PartitionLogState::default();
        for n in 1..=170u64 {
            let mut entry = post(1);
            if let Value::Post(p) = &mut entry.value {
                p.envelope = Bytes::from(vec![7u8; 400 * 1024]);
                p.seed = n;
            }
            state.entries.insert(Slot(n), entry);
        }
        let states = HashMap::from([(3, state)]);
        store.rotate(&states).unwrap();
        let path = file_path(dir.path(), *files(dir.path()).unwrap().last().unwrap());
        assert!(fs::metadata(&path).unwrap().len() > limit);
        assert!(
            !store.wants_rotation(),
            "a fresh file whose checkpoint exceeds the limit asked to be rotated again"
        );
        drop(store);
        let (_store, reopened) = LogStore::open(dir.path()).unwrap();
        assert!(reopened == states, "the checkpoint holds the whole state");
    }

    #[test]
    fn a_rotation_prepared_while_writes_go_on_keeps_every_write() {
        let change = |partition: u32, n: u8, t: u64| LogChange {
            partition,
            promised: Some(term(t)),
            entries: vec![(Slot(u64::from(n)), {
                let mut e = post(n);
                e.term = term(t);
                e
            })],
            ..LogChange::default()
        };
        let dir = tempfile::tempdir().unwrap();
        let (store, _) = LogStore::open(dir.path()).unwrap();
        let mut expected = HashMap::new();
        for n in 1..=3 {
            let c = vec![change(1, n, 1), change(2, n, 1)];
            store.write(&c).unwrap();
            fold(&mut expected, c);
        }
        let point = store.rotation_point();
        let prepared = store.prepare_rotation(&expected, point).unwrap();
        // Written while the checkpoint was prepared: a new term overwrites
        // slot 3, a new slot, compaction and an applied mark.
        let during = vec![
            change(1, 3, 2),
            change(1, 4, 2),
            LogChange {
                partition: 2,
                floor: Some(Slot(2)),
                applied: Some(Slot(3)),
                ..LogChange::default()
            },
        ];
        store.write(&during).unwrap();
        fold(&mut expected, during);
        store.finish_rotation(prepared).unwrap();
        let after = vec![change(2, 4, 3)];
        store.write(&after).unwrap();
        fold(&mut expected, after);
        let names: Vec<String> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(names.len(), 1, "one file once rotated: {names:?}");
        assert!(
            store
                .finish_rotation(store.prepare_rotation(&expected, point).unwrap())
                .is_err(),
            "a rotation from a file no longer in use must not finish"
        );
        drop(store);
        let (store, states) = LogStore::open(dir.path()).unwrap();
        assert!(states == expected, "the new file replays to every write");
        assert_eq!(states[&1].entries[&Slot(3)].term, term(2));

        // A rotation that never finished (a crash): its temporary file is
        // ignored and removed, the old file still holds everything.
        let prepared = store
            .prepare_rotation(&expected, store.rotation_point())
            .unwrap();
        let late = vec![change(1, 5, 3)];
        store.write(&late).unwrap();
        fold(&mut expected, late);
        drop((prepared, store));
        let (_store, states) = LogStore::open(dir.path()).unwrap();
        assert!(states == expected, "the old file replays to every write");
        assert!(
            fs::read_dir(dir.path()).unwrap().all(|e| !e
                .unwrap()
                .file_name()
                .to_string_lossy()
                .ends_with(".tmp")),
            "the unfinished rotation's file is removed"
        );
    }
}
