//! The sled store's write-ahead log of messages: append-only segment files
//! that hold every stored envelope with its room and id. sled keeps only an
//! index (a 16-byte pointer per message), which can always be rebuilt from
//! the log.
//!
//! Why not put envelopes in sled itself: sled splits a leaf node by its
//! number of entries (16), not its size, and writes any node larger than a
//! quarter segment (128 KiB) as a separate blob file. A leaf of 16 envelopes
//! wrapped for a 100-member room is ~500 KiB, so every rewrite of such a
//! leaf became a blob file: several times the data written, one file per
//! rewrite, and a page cache full of huge nodes. Here each envelope is
//! written once, sequentially.
//!
//! Why the log is the source of truth: an acknowledged post must be
//! durable, and every fsync is milliseconds on a real disk. With the log
//! self-describing, acknowledging a batch needs one fsync of the log; the
//! index is flushed in the background and replayed from the log after a
//! crash (see `SledStore::open`).
//!
//! # Format
//!
//! `segment-NNNNNNNN.log` files, each a sequence of records
//! `len: u32 ‖ crc32(payload): u32 ‖ payload`, with the payload
//! `0x00 ‖ 0x01 ‖ seq: u64 ‖ room_len: u8 ‖ room ‖ id: 16 bytes ‖ envelope`;
//! integers big-endian. `seq` is the message's per-room sequence number.
//! Records written before sequence numbers existed have the payload
//! `room_len ‖ room ‖ id ‖ envelope` (a room name is never empty, so the
//! leading zero tells the two apart) and read with sequence number 0.
//!
//! # Crashes
//!
//! A crash can leave a torn record at the end of the segment being written,
//! and the index (flushed on its own schedule) can hold entries for records
//! that never became durable — never acknowledged ones. Both are harmless:
//! every process start appends to a *new* segment, so no offset is ever
//! written twice and a stale pointer can only meet missing or torn bytes;
//! [`EnvelopeLog::read`] checks the checksum and that the record is the room
//! and id asked for, and reports anything else as missing (`Ok(None)`).

use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::io::Write as _;
use std::os::unix::fs::FileExt as _;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use saferchat_consensus::RoomId;

use crate::error::NodeError;
use crate::message_id::MessageId;

/// A segment is closed and a new one started beyond this size.
pub const SEGMENT_BYTES_MAX: u64 = 256 * 1024 * 1024;
/// Record header: length and checksum.
const HEADER_BYTES: usize = 8;
/// Largest payload accepted when reading (guards against garbage lengths).
const PAYLOAD_BYTES_MAX: u32 = 64 * 1024 * 1024;

/// One message to append.
#[derive(Clone, Copy, Debug)]
pub struct Entry<'a> {
    /// Its room.
    pub room: &'a RoomId,
    /// Its id.
    pub id: MessageId,
    /// Its per-room sequence number.
    pub seq: u64,
    /// The envelope bytes.
    pub envelope: &'a [u8],
}

/// Where one record is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Pointer {
    /// Segment number.
    pub segment: u32,
    /// Offset of the record (its header) in the segment.
    pub offset: u64,
    /// Payload length.
    pub len: u32,
}

impl Pointer {
    /// Encoded size.
    pub const BYTES: usize = 16;

    /// Big-endian encoding, the sled index value.
    pub fn to_bytes(self) -> [u8; Pointer::BYTES] {
        let mut out = [0u8; Pointer::BYTES];
        out[..4].copy_from_slice(&self.segment.to_be_bytes());
        out[4..12].copy_from_slice(&self.offset.to_be_bytes());
        out[12..].copy_from_slice(&self.len.to_be_bytes());
        out
    }

    /// Decodes an index value.
    ///
    /// # Errors
    /// [`NodeError::Storage`] for a value of the wrong size.
    pub fn from_bytes(raw: &[u8]) -> Result<Pointer, NodeError> {
        let raw: [u8; Pointer::BYTES] = raw
            .try_into()
            .map_err(|_| NodeError::Storage("timeline index entry has the wrong size".into()))?;
        Ok(Pointer {
            segment: u32::from_be_bytes(raw[..4].try_into().expect("4 bytes")),
            offset: u64::from_be_bytes(raw[4..12].try_into().expect("8 bytes")),
            len: u32::from_be_bytes(raw[12..].try_into().expect("4 bytes")),
        })
    }
}

/// A place in the log: everything before it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord)]
pub struct Position {
    /// Segment number.
    pub segment: u32,
    /// Offset within it.
    pub offset: u64,
}

impl Position {
    /// Encoded size.
    pub const BYTES: usize = 12;

    /// Big-endian encoding.
    pub fn to_bytes(self) -> [u8; Position::BYTES] {
        let mut out = [0u8; Position::BYTES];
        out[..4].copy_from_slice(&self.segment.to_be_bytes());
        out[4..].copy_from_slice(&self.offset.to_be_bytes());
        out
    }

    /// Decodes [`Position::to_bytes`]; `None` for anything else.
    pub fn from_bytes(raw: &[u8]) -> Option<Position> {
        let raw: [u8; Position::BYTES] = raw.try_into().ok()?;
        Some(Position {
            segment: u32::from_be_bytes(raw[..4].try_into().ok()?),
            offset: u64::from_be_bytes(raw[4..].try_into().ok()?),
        })
    }
}

struct Writer {
    segment: u32,
    file: Arc<File>,
    len: u64,
    /// Segments written to since the last sync.
    unsynced: Vec<Arc<File>>,
    /// A segment was created since the last sync: the folder's entry for
    /// it must be synced too, or a crash can lose the whole file.
    dir_unsynced: bool,
}

/// The log; share it behind an `Arc`.
pub struct EnvelopeLog {
    dir: PathBuf,
    segment_bytes_max: u64,
    writer: Mutex<Writer>,
    readers: Mutex<HashMap<u32, Arc<File>>>,
    /// Held for a whole sync, so that a second caller waits for the sync
    /// in progress instead of finding nothing left to sync and returning
    /// before the first one's data is durable.
    syncing: Mutex<()>,
    /// Set by the first failed sync: after a failed fdatasync the kernel
    /// may have dropped the dirty pages and a retry can succeed without
    /// them, so the log refuses every later sync (the node must restart
    /// and recover from what is on disk).
    failed: std::sync::atomic::AtomicBool,
}

impl std::fmt::Debug for EnvelopeLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "EnvelopeLog({})", self.dir.display())
    }
}

fn io(what: &str, path: &Path, e: std::io::Error) -> NodeError {
    NodeError::Storage(format!("{what} {}: {e}", path.display()))
}

fn segment_path(dir: &Path, segment: u32) -> PathBuf {
    dir.join(format!("segment-{segment:08}.log"))
}

fn create_segment(dir: &Path, segment: u32) -> Result<Arc<File>, NodeError> {
    let path = segment_path(dir, segment);
    let file = OpenOptions::new()
        .create_new(true)
        .append(true)
        .read(true)
        .open(&path)
        .map_err(|e| io("creating", &path, e))?;
    Ok(Arc::new(file))
}

/// Existing segment numbers, ascending.
fn segments(dir: &Path) -> Result<Vec<u32>, NodeError> {
    let mut out = Vec::new();
    for entry in fs::read_dir(dir).map_err(|e| io("listing", dir, e))? {
        let name = entry.map_err(|e| io("listing", dir, e))?.file_name();
        let name = name.to_string_lossy();
        if let Some(n) = name
            .strip_prefix("segment-")
            .and_then(|rest| rest.strip_suffix(".log"))
            .and_then(|n| n.parse::<u32>().ok())
        {
            out.push(n);
        }
    }
    out.sort_unstable();
    Ok(out)
}

/// A decoded record payload.
struct Record<'a> {
    room: &'a str,
    id: [u8; 16],
    seq: u64,
    envelope: &'a [u8],
}

/// Marks a payload with a sequence number (format 1).
const FORMAT_SEQUENCED: [u8; 2] = [0x00, 0x01];
/// The bytes a payload spends besides the room name and the envelope.
const PAYLOAD_OVERHEAD: usize = FORMAT_SEQUENCED.len() + 8 + 1 + 16;

fn parse_payload(payload: &[u8]) -> Option<Record<'_>> {
    let (seq, payload) = match payload.strip_prefix(&FORMAT_SEQUENCED[..]) {
        Some(rest) if rest.len() >= 8 => (
            u64::from_be_bytes(rest[..8].try_into().expect("8 bytes")),
            &rest[8..],
        ),
        Some(_) => return None,
        None if payload.first() == Some(&0) => return None,
        None => (0, payload),
    };
    let (&room_len, rest) = payload.split_first()?;
    let room_len = usize::from(room_len);
    if rest.len() < room_len + 16 {
        return None;
    }
    let room = std::str::from_utf8(&rest[..room_len]).ok()?;
    let id = rest[room_len..room_len + 16].try_into().ok()?;
    Some(Record {
        room,
        id,
        seq,
        envelope: &rest[room_len + 16..],
    })
}

/// Reads the record at `offset`: `None` when short, torn or implausible.
fn read_record(file: &File, offset: u64) -> Result<Option<Vec<u8>>, std::io::Error> {
    let mut header = [0u8; HEADER_BYTES];
    match file.read_exact_at(&mut header, offset) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    let len = u32::from_be_bytes(header[..4].try_into().expect("4 bytes"));
    let crc = u32::from_be_bytes(header[4..].try_into().expect("4 bytes"));
    if len > PAYLOAD_BYTES_MAX {
        return Ok(None);
    }
    let mut payload = vec![0u8; len as usize];
    match file.read_exact_at(&mut payload, offset + HEADER_BYTES as u64) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    if crc32fast::hash(&payload) != crc {
        return Ok(None);
    }
    Ok(Some(payload))
}

impl EnvelopeLog {
    /// Opens the log in `dir` and starts a new segment to append to.
    ///
    /// # Errors
    /// [`NodeError::Storage`] when the folder or a segment cannot be used.
    pub fn open(dir: &Path) -> Result<EnvelopeLog, NodeError> {
        EnvelopeLog::open_with_segment_max(dir, SEGMENT_BYTES_MAX)
    }

    /// As [`EnvelopeLog::open`], rolling segments at `segment_bytes_max`.
    ///
    /// # Errors
    /// As [`EnvelopeLog::open`].
    pub fn open_with_segment_max(
        dir: &Path,
        segment_bytes_max: u64,
    ) -> Result<EnvelopeLog, NodeError> {
        fs::create_dir_all(dir).map_err(|e| io("creating", dir, e))?;
        let next = segments(dir)?.last().map_or(1, |n| n + 1);
        let file = create_segment(dir, next)?;
        super::durable::sync_dir(dir)?;
        if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
            super::durable::sync_dir(parent)?;
        }
        Ok(EnvelopeLog {
            dir: dir.to_path_buf(),
            segment_bytes_max,
            writer: Mutex::new(Writer {
                segment: next,
                file,
                len: 0,
                unsynced: Vec::new(),
                dir_unsynced: false,
            }),
            readers: Mutex::new(HashMap::new()),
            syncing: Mutex::new(()),
            failed: std::sync::atomic::AtomicBool::new(false),
        })
    }

    /// Where the next record will go.
    pub fn end(&self) -> Position {
        let w = self.writer.lock().expect("lock");
        Position {
            segment: w.segment,
            offset: w.len,
        }
    }

    /// Appends messages (one write per segment touched); returns where each
    /// went. Not durable until [`EnvelopeLog::sync`].
    ///
    /// # Errors
    /// [`NodeError::Storage`] when writing fails.
    pub fn append(&self, entries: &[Entry<'_>]) -> Result<Vec<Pointer>, NodeError> {
        let mut w = self.writer.lock().expect("lock");
        let mut pointers = Vec::with_capacity(entries.len());
        let mut buf = Vec::with_capacity(
            entries
                .iter()
                .map(|e| HEADER_BYTES + PAYLOAD_OVERHEAD + e.room.as_str().len() + e.envelope.len())
                .sum(),
        );
        for entry in entries {
            let room = entry.room.as_str().as_bytes();
            let payload_len = PAYLOAD_OVERHEAD + room.len() + entry.envelope.len();
            let len = u32::try_from(payload_len)
                .ok()
                .filter(|l| *l <= PAYLOAD_BYTES_MAX)
                .ok_or_else(|| NodeError::Storage("envelope too large for the log".into()))?;
            let record = (HEADER_BYTES + payload_len) as u64;
            let pending = buf.len() as u64;
            if w.len + pending + record > self.segment_bytes_max && w.len + pending > 0 {
                self.write(&mut w, &buf)?;
                buf.clear();
                let next = w.segment + 1;
                let file = create_segment(&self.dir, next)?;
                let old = std::mem::replace(&mut w.file, file);
                w.unsynced.push(old);
                w.dir_unsynced = true;
                w.segment = next;
                w.len = 0;
            }
            pointers.push(Pointer {
                segment: w.segment,
                offset: w.len + buf.len() as u64,
                len,
            });
            let start = buf.len();
            buf.extend_from_slice(&len.to_be_bytes());
            buf.extend_from_slice(&[0; 4]);
            buf.extend_from_slice(&FORMAT_SEQUENCED);
            buf.extend_from_slice(&entry.seq.to_be_bytes());
            buf.push(u8::try_from(room.len()).expect("room names are at most 64 bytes"));
            buf.extend_from_slice(room);
            buf.extend_from_slice(&entry.id.to_bytes());
            buf.extend_from_slice(entry.envelope);
            let crc = crc32fast::hash(&buf[start + HEADER_BYTES..]);
            buf[start + 4..start + HEADER_BYTES].copy_from_slice(&crc.to_be_bytes());
        }
        self.write(&mut w, &buf)?;
        Ok(pointers)
    }

    fn write(&self, w: &mut Writer, buf: &[u8]) -> Result<(), NodeError> {
        if buf.is_empty() {
            return Ok(());
        }
        let path = segment_path(&self.dir, w.segment);
        if let Err(e) = (&*w.file).write_all(buf) {
            // Part of the buffer may be in the file (a full disk takes what
            // fits). It must not stay: the file is in append mode, so the
            // next records would land after those bytes while their
            // pointers count from `w.len`, and be unreadable. Cut the file
            // back to its last whole record.
            if let Err(cut) = w.file.set_len(w.len) {
                self.failed.store(true, std::sync::atomic::Ordering::SeqCst);
                return Err(io(
                    &format!("appending failed ({e}), and so did cutting back"),
                    &path,
                    cut,
                ));
            }
            return Err(io("appending to", &path, e));
        }
        w.len += buf.len() as u64;
        if !w.unsynced.iter().any(|f| Arc::ptr_eq(f, &w.file)) {
            let current = Arc::clone(&w.file);
            w.unsynced.push(current);
        }
        Ok(())
    }

    /// Makes everything appended so far durable (blocking: call it off the
    /// async workers).
    ///
    /// # Errors
    /// [`NodeError::Storage`] when the disk refuses.
    pub fn sync(&self) -> Result<(), NodeError> {
        use std::sync::atomic::Ordering;
        let _one_at_a_time = self.syncing.lock().expect("lock");
        let refuse = || {
            NodeError::Storage(
                "an earlier sync of the envelope log failed; restart the node".into(),
            )
        };
        if self.failed.load(Ordering::SeqCst) {
            return Err(refuse());
        }
        let (files, dir_unsynced) = {
            let mut w = self.writer.lock().expect("lock");
            (
                std::mem::take(&mut w.unsynced),
                std::mem::take(&mut w.dir_unsynced),
            )
        };
        let result = files
            .iter()
            .try_for_each(|file| {
                file.sync_data()
                    .map_err(|e| NodeError::Storage(format!("syncing the envelope log: {e}")))
            })
            .and_then(|()| {
                if dir_unsynced {
                    super::durable::sync_dir(&self.dir)
                } else {
                    Ok(())
                }
            });
        if result.is_err() {
            self.failed.store(true, Ordering::SeqCst);
        }
        result
    }

    fn reader(&self, segment: u32) -> Result<Option<Arc<File>>, NodeError> {
        let mut readers = self.readers.lock().expect("lock");
        if let Some(f) = readers.get(&segment) {
            return Ok(Some(Arc::clone(f)));
        }
        let path = segment_path(&self.dir, segment);
        match File::open(&path) {
            Ok(f) => {
                let f = Arc::new(f);
                readers.insert(segment, Arc::clone(&f));
                Ok(Some(f))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io("opening", &path, e)),
        }
    }

    /// Reads the sequence number and envelope of `room`/`id` at `pointer`; `Ok(None)` when the
    /// record is missing, torn, or another message's (only possible for
    /// appends that were never acknowledged).
    ///
    /// # Errors
    /// [`NodeError::Storage`] when the file cannot be read.
    pub fn read(
        &self,
        pointer: Pointer,
        room: &RoomId,
        id: MessageId,
    ) -> Result<Option<(u64, Bytes)>, NodeError> {
        let Some(file) = self.reader(pointer.segment)? else {
            return Ok(None);
        };
        let payload = read_record(&file, pointer.offset)
            .map_err(|e| io("reading", &segment_path(&self.dir, pointer.segment), e))?;
        let Some(payload) = payload.filter(|p| p.len() == pointer.len as usize) else {
            return Ok(None);
        };
        let Some(record) = parse_payload(&payload) else {
            return Ok(None);
        };
        if record.room != room.as_str() || record.id != id.to_bytes() {
            return Ok(None);
        }
        Ok(Some((record.seq, Bytes::copy_from_slice(record.envelope))))
    }

    /// Calls `index` for every intact record from `from` to the end of the
    /// log, in order; stops reading a segment at its first torn record.
    /// Returns how many records it visited.
    ///
    /// # Errors
    /// [`NodeError::Storage`] when a segment cannot be read, or whatever
    /// `index` returns.
    pub fn replay(
        &self,
        from: Position,
        mut index: impl FnMut(RoomId, MessageId, Pointer) -> Result<(), NodeError>,
    ) -> Result<u64, NodeError> {
        let mut visited = 0;
        for segment in segments(&self.dir)?
            .into_iter()
            .filter(|s| *s >= from.segment)
        {
            let Some(file) = self.reader(segment)? else {
                continue;
            };
            let mut offset = if segment == from.segment {
                from.offset
            } else {
                0
            };
            loop {
                let payload = read_record(&file, offset)
                    .map_err(|e| io("replaying", &segment_path(&self.dir, segment), e))?;
                let Some(payload) = payload else { break };
                let len = u32::try_from(payload.len()).expect("bounded by PAYLOAD_BYTES_MAX");
                let parsed = parse_payload(&payload).and_then(|r| {
                    Some((
                        RoomId::new(r.room).ok()?,
                        MessageId::from_bytes(&r.id).ok()?,
                    ))
                });
                let Some((room, id)) = parsed else { break };
                index(
                    room,
                    id,
                    Pointer {
                        segment,
                        offset,
                        len,
                    },
                )?;
                visited += 1;
                offset += (HEADER_BYTES + payload.len()) as u64;
            }
        }
        Ok(visited)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message_id::IdGenerator;

    fn entries(n: usize) -> Vec<(MessageId, Vec<u8>)> {
        let mut ids = IdGenerator::default();
        (0..n)
            .map(|i| {
                (
                    ids.next(1_795_000_000_000 + i as i64, 0),
                    vec![u8::try_from(i).unwrap(); 10 + i],
                )
            })
            .collect()
    }

    fn append(log: &EnvelopeLog, room: &RoomId, items: &[(MessageId, Vec<u8>)]) -> Vec<Pointer> {
        let entries: Vec<Entry<'_>> = items
            .iter()
            .enumerate()
            .map(|(i, (id, e))| Entry {
                room,
                id: *id,
                seq: i as u64 + 1,
                envelope: e,
            })
            .collect();
        log.append(&entries).unwrap()
    }

    #[test]
    fn records_round_trip_and_replay_across_restarts() {
        let dir = tempfile::tempdir().unwrap();
        let room = RoomId::new("aaa").unwrap();
        let items = entries(5);
        let log = EnvelopeLog::open(dir.path()).unwrap();
        let pointers = append(&log, &room, &items[..3]);
        log.sync().unwrap();
        for (p, (id, e)) in pointers.iter().zip(&items) {
            assert_eq!(
                log.read(*p, &room, *id).unwrap().map(|(_, e)| e).as_deref(),
                Some(e.as_slice())
            );
        }
        // Asking for another message at a valid pointer: missing.
        assert_eq!(log.read(pointers[0], &room, items[1].0).unwrap(), None);
        assert_eq!(
            log.read(pointers[0], &RoomId::new("bbb").unwrap(), items[0].0)
                .unwrap(),
            None
        );
        drop(log);

        // A restart writes to a new segment; old pointers still read.
        let log = EnvelopeLog::open(dir.path()).unwrap();
        let later = append(&log, &room, &items[3..]);
        assert!(
            later[0].segment > pointers[0].segment,
            "a new segment after a restart"
        );
        assert_eq!(
            log.read(pointers[2], &room, items[2].0)
                .unwrap()
                .map(|(seq, e)| (seq, e.to_vec())),
            Some((3, items[2].1.clone()))
        );
        let mut seen = Vec::new();
        let visited = log
            .replay(Position::default(), |r, id, p| {
                seen.push((r, id, p));
                Ok(())
            })
            .unwrap();
        assert_eq!(visited, 5);
        let ids: Vec<_> = seen.iter().map(|(_, id, _)| *id).collect();
        assert_eq!(ids, items.iter().map(|(id, _)| *id).collect::<Vec<_>>());
        // Replay from a position skips what is before it.
        let from = Position {
            segment: later[0].segment,
            offset: later[1].offset,
        };
        assert_eq!(log.replay(from, |_, _, _| Ok(())).unwrap(), 1);
        assert_eq!(Position::from_bytes(&from.to_bytes()), Some(from));
        assert_eq!(Pointer::from_bytes(&later[0].to_bytes()).unwrap(), later[0]);
    }

    #[test]
    fn torn_records_read_as_missing_and_end_a_replay() {
        let dir = tempfile::tempdir().unwrap();
        let room = RoomId::new("aaa").unwrap();
        let items = entries(3);
        let log = EnvelopeLog::open(dir.path()).unwrap();
        let pointers = append(&log, &room, &items);
        log.sync().unwrap();
        let segment = pointers[0].segment;
        drop(log);
        // Flip a byte of the second record, and cut the third in half.
        let path = segment_path(dir.path(), segment);
        let mut raw = fs::read(&path).unwrap();
        let second = usize::try_from(pointers[1].offset).unwrap() + HEADER_BYTES + 3;
        raw[second] ^= 0xff;
        let third = usize::try_from(pointers[2].offset).unwrap();
        raw.truncate(third + 10);
        fs::write(&path, raw).unwrap();
        let log = EnvelopeLog::open(dir.path()).unwrap();
        assert_eq!(
            log.read(pointers[0], &room, items[0].0)
                .unwrap()
                .map(|(_, e)| e)
                .as_deref(),
            Some(items[0].1.as_slice())
        );
        assert_eq!(log.read(pointers[1], &room, items[1].0).unwrap(), None);
        assert_eq!(log.read(pointers[2], &room, items[2].0).unwrap(), None);
        assert_eq!(
            log.replay(Position::default(), |_, _, _| Ok(())).unwrap(),
            1
        );
    }

    #[test]
    fn segments_roll_over_and_stay_readable() {
        let dir = tempfile::tempdir().unwrap();
        let room = RoomId::new("aaa").unwrap();
        let items = entries(20);
        let log = EnvelopeLog::open_with_segment_max(dir.path(), 100).unwrap();
        let mut pointers = append(&log, &room, &items[..5]);
        pointers.extend(append(&log, &room, &items[5..]));
        log.sync().unwrap();
        assert!(
            pointers.last().unwrap().segment >= pointers[0].segment + 5,
            "{pointers:?}"
        );
        for (p, (id, e)) in pointers.iter().zip(&items) {
            assert_eq!(
                log.read(*p, &room, *id).unwrap().map(|(_, e)| e).as_deref(),
                Some(e.as_slice())
            );
        }
        assert_eq!(
            log.replay(Position::default(), |_, _, _| Ok(())).unwrap(),
            20
        );
    }

    #[test]
    fn records_from_before_sequence_numbers_read_with_sequence_zero() {
        let dir = tempfile::tempdir().unwrap();
        let room = RoomId::new("aaa").unwrap();
        let (id, envelope) = entries(1).remove(0);
        // The payload of format 0: room_len ‖ room ‖ id ‖ envelope.
        let mut payload = vec![3u8];
        payload.extend_from_slice(b"aaa");
        payload.extend_from_slice(&id.to_bytes());
        payload.extend_from_slice(&envelope);
        let mut record = u32::try_from(payload.len()).unwrap().to_be_bytes().to_vec();
        record.extend_from_slice(&crc32fast::hash(&payload).to_be_bytes());
        record.extend_from_slice(&payload);
        std::fs::write(segment_path(dir.path(), 0), &record).unwrap();

        let log = EnvelopeLog::open(dir.path()).unwrap();
        let pointer = Pointer {
            segment: 0,
            offset: 0,
            len: u32::try_from(payload.len()).unwrap(),
        };
        assert_eq!(
            log.read(pointer, &room, id).unwrap(),
            Some((0, Bytes::from(envelope)))
        );
        assert_eq!(
            log.replay(Position::default(), |_, _, _| Ok(())).unwrap(),
            1
        );
        // A payload that starts with zero but is not format 1 is torn.
        assert!(parse_payload(&[0, 2, 0, 0]).is_none());
        assert!(parse_payload(&[0, 1, 0]).is_none());
    }
}
