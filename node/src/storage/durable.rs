//! What it takes to make sled's writes durable, since its flush does not.
//!
//! sled 0.34.7's `flush`/`flush_async` writes its log with `pwrite` and then
//! calls `sync_file_range(WAIT_BEFORE | WRITE | WAIT_AFTER)` on Linux. That
//! starts and waits for writeback of the page range, but flushes no disk
//! write cache and commits no metadata (the file's size, the extents of
//! newly allocated blocks): after a power cut the "flushed" bytes may be
//! gone. Values too big for a log segment go to separate files under
//! `blobs/`, written with no sync at all and in a folder nobody syncs. The
//! periodic `sync_all` that would paper over this is off in this node
//! (`flush_every_ms(None)`), because it would sync on sled's schedule, not
//! before our acknowledgements.
//!
//! So after every sled flush whose outcome we promise to someone (a Paxos
//! vote, a committed membership, a timeline checkpoint), the store calls
//! [`SledFiles::sync`]: `fdatasync` of sled's log file (`db`), which works
//! on the inode whichever descriptor issues it; `fdatasync` of every blob
//! file not synced yet; and `fsync` of the `blobs/` folder when it gained
//! files. [`SledFiles::open`] syncs the database folder and its parent once,
//! so the files sled created at first start are reachable after a crash.
//!
//! Writing our own log instead of using sled would avoid the detour; the
//! storage trait keeps that option open, and this keeps sled (the user's
//! choice) honest meanwhile.

use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use crate::error::NodeError;

/// `fsync` of a folder, so that entries created in it survive a crash.
///
/// # Errors
/// [`NodeError::Storage`] when the folder cannot be opened or synced.
pub fn sync_dir(dir: &Path) -> Result<(), NodeError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| NodeError::Storage(format!("syncing folder {}: {e}", dir.display())))
}

/// Replaces the file `dir/name` with `bytes` so that after a crash it holds
/// either its old content or `bytes`: written to `name.tmp`, synced, renamed
/// over the old file (atomic), and the folder synced so the rename lasts.
///
/// # Errors
/// The first I/O error; the old file is then untouched.
pub fn replace_file(dir: &Path, name: &str, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write as _;
    let tmp = dir.join(format!("{name}.tmp"));
    {
        let mut f = File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, dir.join(name))?;
    File::open(dir)?.sync_all()
}

/// sled's files in one database folder, and which blobs are already synced.
#[derive(Debug)]
pub struct SledFiles {
    log: File,
    blobs: PathBuf,
    /// Blob files synced so far, with the length they had then: sled may
    /// still be writing a blob while we list the folder, so a blob whose
    /// length changed is synced again.
    synced_blobs: BTreeMap<std::ffi::OsString, u64>,
    /// A sync failed: every later one fails too (see [`SledFiles::sync`]).
    failed: bool,
}

impl SledFiles {
    /// Opens the files of the sled database in `dir` (after sled opened
    /// it) and syncs the folders sled may just have created.
    ///
    /// # Errors
    /// [`NodeError::Storage`] when a file or folder cannot be opened or
    /// synced.
    pub fn open(dir: &Path) -> Result<SledFiles, NodeError> {
        let log_path = dir.join("db");
        let log = File::open(&log_path)
            .map_err(|e| NodeError::Storage(format!("opening {}: {e}", log_path.display())))?;
        let mut files = SledFiles {
            log,
            blobs: dir.join("blobs"),
            synced_blobs: BTreeMap::new(),
            failed: false,
        };
        files.sync()?;
        // sled writes its `conf` at creation without syncing it, and will
        // not open a folder whose `conf` is empty.
        let conf = dir.join("conf");
        if conf.exists() {
            File::open(&conf)
                .and_then(|f| f.sync_all())
                .map_err(|e| NodeError::Storage(format!("syncing {}: {e}", conf.display())))?;
        }
        sync_dir(dir)?;
        if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
            sync_dir(parent)?;
        }
        Ok(files)
    }

    /// Makes everything sled has flushed durable. Call after `flush` or
    /// `flush_async` returned, before anything depending on it leaves the
    /// node.
    ///
    /// # Errors
    /// [`NodeError::Storage`] when a sync fails; the caller must then not
    /// acknowledge (and the node treats a failed vote sync as fatal). A
    /// failure is permanent: after a failed fdatasync the kernel may have
    /// dropped the dirty pages, and a retry could succeed without them.
    pub fn sync(&mut self) -> Result<(), NodeError> {
        if self.failed {
            return Err(NodeError::Storage(
                "an earlier sync of sled's files failed; restart the node".into(),
            ));
        }
        let result = self.sync_once();
        self.failed = result.is_err();
        result
    }

    fn sync_once(&mut self) -> Result<(), NodeError> {
        self.log
            .sync_data()
            .map_err(|e| NodeError::Storage(format!("syncing sled's log: {e}")))?;
        let listing = match std::fs::read_dir(&self.blobs) {
            Ok(listing) => listing,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => {
                return Err(NodeError::Storage(format!(
                    "listing {}: {e}",
                    self.blobs.display()
                )));
            }
        };
        let mut present = BTreeMap::new();
        let mut added = false;
        for entry in listing {
            let entry = entry.map_err(|e| NodeError::Storage(format!("listing blobs: {e}")))?;
            let name = entry.file_name();
            let synced = |f: File| -> std::io::Result<u64> {
                f.sync_data()?;
                Ok(f.metadata()?.len())
            };
            let len = entry.metadata().map(|m| m.len()).ok();
            if len.is_none() || self.synced_blobs.get(&name).copied() != len {
                match File::open(entry.path()).and_then(synced) {
                    Ok(len) => {
                        added = true;
                        present.insert(name, len);
                        continue;
                    }
                    // Collected by sled between the listing and the open.
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                    Err(e) => {
                        return Err(NodeError::Storage(format!(
                            "syncing blob {}: {e}",
                            entry.path().display()
                        )));
                    }
                }
            }
            if let Some(len) = len {
                present.insert(name, len);
            }
        }
        if added {
            sync_dir(&self.blobs)?;
        }
        self.synced_blobs = present;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn syncs_a_database_with_blobs_and_remembers_them() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db");
        let db = sled::Config::new()
            .path(&path)
            .flush_every_ms(None)
            .open()
            .unwrap();
        let mut files = SledFiles::open(&path).unwrap();
        // Far above sled's inline limit (a quarter of a 512 KiB segment).
        db.insert(b"big", vec![7u8; 600 * 1024]).unwrap();
        db.flush().unwrap();
        files.sync().unwrap();
        assert!(
            !files.synced_blobs.is_empty(),
            "a value this large is a blob"
        );
        let before = files.synced_blobs.clone();
        files.sync().unwrap();
        assert_eq!(files.synced_blobs, before);
    }
}
