//! Append-only segment files holding envelope bytes, for the sled store.
//!
//! Why not put envelopes in sled itself: sled splits a leaf node by its
//! number of entries (16), not its size, and writes any node larger than a
//! quarter segment (128 KiB) as a separate blob file. A leaf of 16 envelopes
//! wrapped for a 100-member room is ~500 KiB, so every rewrite of such a
//! leaf became a blob file: several times the data written, one file per
//! rewrite, and a page cache full of huge nodes. Here each envelope is
//! written once, sequentially; sled keeps a 16-byte pointer per message.
//!
//! # Format
//!
//! `segment-NNNNNNNN.log` files, each a sequence of records
//! `len: u32 ‖ crc32(payload): u32 ‖ payload`, big-endian. A pointer names
//! the segment, the payload's offset and its length.
//!
//! # Durability and crashes
//!
//! [`EnvelopeLog::sync`] makes every appended record durable; the sled
//! store calls it *before* flushing the index, so an index entry made
//! durable by an acknowledged append always points at durable bytes. sled
//! may also flush on its own, so after a crash an index entry of an
//! *unacknowledged* append can point past the end of a segment or at a torn
//! record: [`EnvelopeLog::read`] reports those as missing (`Ok(None)`), and
//! they were never promised to anyone.

use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::io::Write as _;
use std::os::unix::fs::FileExt as _;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use bytes::Bytes;

use crate::error::NodeError;

/// A segment is closed and a new one started beyond this size.
pub const SEGMENT_BYTES_MAX: u64 = 256 * 1024 * 1024;
/// Record header: length and checksum.
const HEADER_BYTES: usize = 8;

/// Where one envelope is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Pointer {
    /// Segment number.
    pub segment: u32,
    /// Offset of the payload in the segment.
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

struct Writer {
    segment: u32,
    file: Arc<File>,
    len: u64,
    /// Segments written to since the last sync (the current one included
    /// when dirty).
    unsynced: Vec<Arc<File>>,
}

/// The log; cheap to share behind an `Arc`.
pub struct EnvelopeLog {
    dir: PathBuf,
    segment_bytes_max: u64,
    writer: Mutex<Writer>,
    readers: Mutex<HashMap<u32, Arc<File>>>,
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

fn open_for_append(dir: &Path, segment: u32) -> Result<(Arc<File>, u64), NodeError> {
    let path = segment_path(dir, segment);
    let file = OpenOptions::new()
        .create(true)
        .append(true)
        .read(true)
        .open(&path)
        .map_err(|e| io("opening", &path, e))?;
    let len = file
        .metadata()
        .map_err(|e| io("reading the size of", &path, e))?
        .len();
    Ok((Arc::new(file), len))
}

impl EnvelopeLog {
    /// Opens the log in `dir`, appending to its newest segment.
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
        let mut newest = 0;
        for entry in fs::read_dir(dir).map_err(|e| io("listing", dir, e))? {
            let name = entry.map_err(|e| io("listing", dir, e))?.file_name();
            let name = name.to_string_lossy();
            if let Some(n) = name
                .strip_prefix("segment-")
                .and_then(|rest| rest.strip_suffix(".log"))
                .and_then(|n| n.parse::<u32>().ok())
            {
                newest = newest.max(n);
            }
        }
        let (file, len) = open_for_append(dir, newest)?;
        Ok(EnvelopeLog {
            dir: dir.to_path_buf(),
            segment_bytes_max,
            writer: Mutex::new(Writer {
                segment: newest,
                file,
                len,
                unsynced: Vec::new(),
            }),
            readers: Mutex::new(HashMap::new()),
        })
    }

    /// Appends payloads (one write per call); returns where each went. Not
    /// durable until [`EnvelopeLog::sync`].
    ///
    /// # Errors
    /// [`NodeError::Storage`] when writing fails.
    pub fn append(&self, payloads: &[&[u8]]) -> Result<Vec<Pointer>, NodeError> {
        let mut w = self.writer.lock().expect("lock");
        let mut pointers = Vec::with_capacity(payloads.len());
        let mut buf = Vec::with_capacity(payloads.iter().map(|p| p.len() + HEADER_BYTES).sum());
        for payload in payloads {
            let len = u32::try_from(payload.len())
                .map_err(|_| NodeError::Storage("envelope too large for the log".into()))?;
            let record = (HEADER_BYTES + payload.len()) as u64;
            if w.len + buf.len() as u64 + record > self.segment_bytes_max
                && w.len + buf.len() as u64 > 0
            {
                self.write(&mut w, &buf)?;
                buf.clear();
                let next = w.segment + 1;
                let (file, len) = open_for_append(&self.dir, next)?;
                let old = std::mem::replace(&mut w.file, file);
                w.unsynced.push(old);
                w.segment = next;
                w.len = len;
            }
            pointers.push(Pointer {
                segment: w.segment,
                offset: w.len + buf.len() as u64 + HEADER_BYTES as u64,
                len,
            });
            buf.extend_from_slice(&len.to_be_bytes());
            buf.extend_from_slice(&crc32fast::hash(payload).to_be_bytes());
            buf.extend_from_slice(payload);
        }
        self.write(&mut w, &buf)?;
        Ok(pointers)
    }

    fn write(&self, w: &mut Writer, buf: &[u8]) -> Result<(), NodeError> {
        if buf.is_empty() {
            return Ok(());
        }
        let path = segment_path(&self.dir, w.segment);
        (&*w.file)
            .write_all(buf)
            .map_err(|e| io("appending to", &path, e))?;
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
        let files = std::mem::take(&mut self.writer.lock().expect("lock").unsynced);
        for file in files {
            file.sync_data()
                .map_err(|e| NodeError::Storage(format!("syncing the envelope log: {e}")))?;
        }
        Ok(())
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

    /// Reads one envelope; `Ok(None)` when the record is missing or torn
    /// (only possible for appends that were never acknowledged).
    ///
    /// # Errors
    /// [`NodeError::Storage`] when the file cannot be read.
    pub fn read(&self, pointer: Pointer) -> Result<Option<Bytes>, NodeError> {
        let Some(file) = self.reader(pointer.segment)? else {
            return Ok(None);
        };
        let Some(start) = pointer.offset.checked_sub(HEADER_BYTES as u64) else {
            return Ok(None);
        };
        let mut record = vec![0u8; HEADER_BYTES + pointer.len as usize];
        match file.read_exact_at(&mut record, start) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
            Err(e) => return Err(io("reading", &segment_path(&self.dir, pointer.segment), e)),
        }
        let len = u32::from_be_bytes(record[..4].try_into().expect("4 bytes"));
        let crc = u32::from_be_bytes(record[4..8].try_into().expect("4 bytes"));
        let payload = &record[HEADER_BYTES..];
        if len != pointer.len || crc32fast::hash(payload) != crc {
            return Ok(None);
        }
        Ok(Some(Bytes::copy_from_slice(payload)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip_across_reopen_and_torn_ones_read_as_missing() {
        let dir = tempfile::tempdir().unwrap();
        let log = EnvelopeLog::open(dir.path()).unwrap();
        let first = log.append(&[b"alpha", b"", b"gamma"]).unwrap();
        log.sync().unwrap();
        assert_eq!(log.read(first[0]).unwrap().as_deref(), Some(&b"alpha"[..]));
        assert_eq!(log.read(first[1]).unwrap().as_deref(), Some(&b""[..]));
        assert_eq!(log.read(first[2]).unwrap().as_deref(), Some(&b"gamma"[..]));
        drop(log);
        let log = EnvelopeLog::open(dir.path()).unwrap();
        let second = log.append(&[b"delta"]).unwrap();
        assert!(
            second[0].offset > first[2].offset,
            "appends after reopening go at the end"
        );
        assert_eq!(log.read(first[2]).unwrap().as_deref(), Some(&b"gamma"[..]));
        assert_eq!(log.read(second[0]).unwrap().as_deref(), Some(&b"delta"[..]));
        // Past the end, in a missing segment, or with a wrong length: missing.
        assert_eq!(
            log.read(Pointer {
                offset: second[0].offset + 100,
                ..second[0]
            })
            .unwrap(),
            None
        );
        assert_eq!(
            log.read(Pointer {
                segment: 9,
                ..second[0]
            })
            .unwrap(),
            None
        );
        assert_eq!(
            log.read(Pointer {
                len: 3,
                ..second[0]
            })
            .unwrap(),
            None
        );
        // A torn record (bytes flipped on disk): missing, not garbage.
        let path = segment_path(dir.path(), 0);
        let mut raw = fs::read(&path).unwrap();
        let at = usize::try_from(first[0].offset).unwrap();
        raw[at] ^= 0xff;
        fs::write(&path, raw).unwrap();
        let log = EnvelopeLog::open(dir.path()).unwrap();
        assert_eq!(log.read(first[0]).unwrap(), None);
        assert_eq!(
            Pointer::from_bytes(&second[0].to_bytes()).unwrap(),
            second[0]
        );
    }

    #[test]
    fn segments_roll_over_and_stay_readable() {
        let dir = tempfile::tempdir().unwrap();
        let log = EnvelopeLog::open_with_segment_max(dir.path(), 100).unwrap();
        let payloads: Vec<Vec<u8>> = (0..20u8).map(|i| vec![i; 30]).collect();
        let refs: Vec<&[u8]> = payloads.iter().map(Vec::as_slice).collect();
        let mut pointers = log.append(&refs[..5]).unwrap();
        pointers.extend(log.append(&refs[5..]).unwrap());
        log.sync().unwrap();
        assert!(pointers.last().unwrap().segment >= 5, "{pointers:?}");
        drop(log);
        let log = EnvelopeLog::open_with_segment_max(dir.path(), 100).unwrap();
        for (p, payload) in pointers.iter().zip(&payloads) {
            assert_eq!(log.read(*p).unwrap().as_deref(), Some(payload.as_slice()));
        }
        let next = log.append(&[b"after"]).unwrap();
        assert!(next[0].segment >= pointers.last().unwrap().segment);
    }
}
