//! The map group's Raft log, vote and snapshot on disk, and its state
//! machine (the [`ClusterMap`]).
//!
//! The map changes a handful of times in a cluster's life, and its log is
//! compacted into a snapshot every [`super::SNAPSHOT_EVERY`] entries, so
//! the whole log state is a few kilobytes. It is kept in memory and every
//! change rewrites one file ([`replace_file`]): written to a temporary
//! file, synced, renamed over the old one, and the folder `fsync`ed. A rename is atomic,
//! so a crash leaves the old state or the new one, never a torn record; and
//! nothing (a vote, an appended entry) is reported to `openraft` — which
//! then answers a peer — before that sequence returned. A record log with
//! per-entry checksums would cost less per write; at this size, rewriting
//! is simpler to get right, and a sled tree would need the same syncs
//! around it (`storage/durable.rs`).
//!
//! The state machine is not written per entry: on a restart `openraft`
//! applies the log again from the last snapshot, and applying a map
//! command is deterministic.

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::io::Cursor;
use std::ops::RangeBounds;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use openraft::storage::{LogFlushed, LogState, RaftLogStorage, RaftStateMachine, Snapshot};
use openraft::{
    Entry, EntryPayload, LogId, OptionalSend, RaftLogReader, RaftSnapshotBuilder, SnapshotMeta,
    StorageError, StorageIOError, StoredMembership, Vote,
};
use saferchat_placement::ClusterMap;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use super::{MapReply, TypeConfig};
use crate::storage::durable::replace_file;

type NodeId = u64;
type Node = openraft::BasicNode;

/// The log file's name in the map folder.
const LOG_FILE: &str = "log.json";
/// The snapshot file's name in the map folder.
const SNAPSHOT_FILE: &str = "snapshot.json";

fn read_optional(path: &Path) -> std::io::Result<Option<Vec<u8>>> {
    match std::fs::read(path) {
        Ok(bytes) => Ok(Some(bytes)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

fn invalid(path: &Path, e: impl std::fmt::Display) -> std::io::Error {
    std::io::Error::new(
        std::io::ErrorKind::InvalidData,
        format!("{}: {e}", path.display()),
    )
}

/// Everything the log store keeps, as written to its file.
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
struct LogFile {
    vote: Option<Vote<NodeId>>,
    committed: Option<LogId<NodeId>>,
    last_purged: Option<LogId<NodeId>>,
    entries: BTreeMap<u64, Entry<TypeConfig>>,
}

/// The Raft log, vote and commit mark (shared with its readers).
#[derive(Debug, Clone)]
pub struct LogStore {
    dir: PathBuf,
    state: Arc<Mutex<LogFile>>,
}

impl LogStore {
    /// Opens (or creates) the log in `dir`.
    ///
    /// # Errors
    /// An unreadable or corrupt log file, or a folder that cannot be made.
    pub fn open(dir: &Path) -> std::io::Result<LogStore> {
        std::fs::create_dir_all(dir)?;
        let path = dir.join(LOG_FILE);
        let state = match read_optional(&path)? {
            Some(bytes) => serde_json::from_slice(&bytes).map_err(|e| invalid(&path, e))?,
            None => LogFile::default(),
        };
        Ok(LogStore {
            dir: dir.to_owned(),
            state: Arc::new(Mutex::new(state)),
        })
    }

    /// Applies `change` to a copy of the state, writes the copy durably,
    /// and only then makes it the state: a failed write changes nothing.
    fn update(&self, change: impl FnOnce(&mut LogFile)) -> std::io::Result<()> {
        let mut state = self.state.lock().expect("map log lock");
        let mut next = state.clone();
        change(&mut next);
        let bytes = serde_json::to_vec(&next).map_err(std::io::Error::other)?;
        replace_file(&self.dir, LOG_FILE, &bytes)?;
        *state = next;
        Ok(())
    }
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry<TypeConfig>>, StorageError<NodeId>> {
        let state = self.state.lock().expect("map log lock");
        Ok(state.entries.range(range).map(|(_, e)| e.clone()).collect())
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = LogStore;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, StorageError<NodeId>> {
        let state = self.state.lock().expect("map log lock");
        let last = state
            .entries
            .values()
            .next_back()
            .map(|e| e.log_id)
            .or(state.last_purged);
        Ok(LogState {
            last_purged_log_id: state.last_purged,
            last_log_id: last,
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<NodeId>) -> Result<(), StorageError<NodeId>> {
        let vote = *vote;
        self.update(|s| s.vote = Some(vote))
            .map_err(|e| StorageIOError::write_vote(&e).into())
    }

    async fn read_vote(&mut self) -> Result<Option<Vote<NodeId>>, StorageError<NodeId>> {
        Ok(self.state.lock().expect("map log lock").vote)
    }

    async fn save_committed(
        &mut self,
        committed: Option<LogId<NodeId>>,
    ) -> Result<(), StorageError<NodeId>> {
        self.update(|s| s.committed = committed)
            .map_err(|e| StorageIOError::write(&e).into())
    }

    async fn read_committed(&mut self) -> Result<Option<LogId<NodeId>>, StorageError<NodeId>> {
        Ok(self.state.lock().expect("map log lock").committed)
    }

    async fn append<I>(
        &mut self,
        entries: I,
        callback: LogFlushed<TypeConfig>,
    ) -> Result<(), StorageError<NodeId>>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let entries: Vec<Entry<TypeConfig>> = entries.into_iter().collect();
        // The callback reports the entries durable: it runs after the write
        // and its sync returned, never before.
        let written = self.update(|s| {
            for e in entries {
                s.entries.insert(e.log_id.index, e);
            }
        });
        match written {
            Ok(()) => {
                callback.log_io_completed(Ok(()));
                Ok(())
            }
            Err(e) => {
                let error = StorageIOError::write_logs(&e).into();
                callback.log_io_completed(Err(e));
                Err(error)
            }
        }
    }

    async fn truncate(&mut self, log_id: LogId<NodeId>) -> Result<(), StorageError<NodeId>> {
        self.update(|s| {
            s.entries.split_off(&log_id.index);
        })
        .map_err(|e| StorageIOError::write_logs(&e).into())
    }

    async fn purge(&mut self, log_id: LogId<NodeId>) -> Result<(), StorageError<NodeId>> {
        self.update(|s| {
            s.entries = s.entries.split_off(&(log_id.index + 1));
            s.last_purged = Some(log_id);
        })
        .map_err(|e| StorageIOError::write_logs(&e).into())
    }
}

/// A snapshot as written to its file.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct SnapshotFile {
    meta: SnapshotMeta<NodeId, Node>,
    map: ClusterMap,
}

#[derive(Debug)]
struct Machine {
    last_applied: Option<LogId<NodeId>>,
    membership: StoredMembership<NodeId, Node>,
    map: ClusterMap,
    snapshot: Option<SnapshotFile>,
}

/// The state machine: the map, published to the node on every change.
#[derive(Debug, Clone)]
pub struct StateMachine {
    dir: PathBuf,
    machine: Arc<Mutex<Machine>>,
    published: watch::Sender<ClusterMap>,
}

impl StateMachine {
    /// The state machine as its last snapshot in `dir` left it; `published`
    /// receives the map whenever it changes.
    ///
    /// # Errors
    /// An unreadable or corrupt snapshot file.
    pub fn open(dir: &Path, published: watch::Sender<ClusterMap>) -> std::io::Result<StateMachine> {
        std::fs::create_dir_all(dir)?;
        let path = dir.join(SNAPSHOT_FILE);
        let snapshot: Option<SnapshotFile> = match read_optional(&path)? {
            Some(bytes) => Some(serde_json::from_slice(&bytes).map_err(|e| invalid(&path, e))?),
            None => None,
        };
        let machine = match &snapshot {
            Some(s) => Machine {
                last_applied: s.meta.last_log_id,
                membership: s.meta.last_membership.clone(),
                map: s.map.clone(),
                snapshot: snapshot.clone(),
            },
            None => Machine {
                last_applied: None,
                membership: StoredMembership::default(),
                map: ClusterMap::default(),
                snapshot: None,
            },
        };
        published.send_replace(machine.map.clone());
        Ok(StateMachine {
            dir: dir.to_owned(),
            machine: Arc::new(Mutex::new(machine)),
            published,
        })
    }
}

impl RaftSnapshotBuilder<TypeConfig> for StateMachine {
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>, StorageError<NodeId>> {
        let file = {
            let machine = self.machine.lock().expect("map state lock");
            let id = match machine.last_applied {
                Some(l) => format!("{}-{}-{}", l.leader_id.term, l.index, machine.map.epoch),
                None => format!("empty-{}", machine.map.epoch),
            };
            SnapshotFile {
                meta: SnapshotMeta {
                    last_log_id: machine.last_applied,
                    last_membership: machine.membership.clone(),
                    snapshot_id: id,
                },
                map: machine.map.clone(),
            }
        };
        let bytes =
            serde_json::to_vec(&file).map_err(|e| StorageIOError::write_snapshot(None, &e))?;
        // Durable before openraft purges the log it replaces.
        replace_file(&self.dir, SNAPSHOT_FILE, &bytes)
            .map_err(|e| StorageIOError::write_snapshot(None, &e))?;
        let map_bytes =
            serde_json::to_vec(&file.map).map_err(|e| StorageIOError::write_snapshot(None, &e))?;
        let meta = file.meta.clone();
        self.machine.lock().expect("map state lock").snapshot = Some(file);
        Ok(Snapshot {
            meta,
            snapshot: Box::new(Cursor::new(map_bytes)),
        })
    }
}

impl RaftStateMachine<TypeConfig> for StateMachine {
    type SnapshotBuilder = StateMachine;

    async fn applied_state(
        &mut self,
    ) -> Result<(Option<LogId<NodeId>>, StoredMembership<NodeId, Node>), StorageError<NodeId>> {
        let machine = self.machine.lock().expect("map state lock");
        Ok((machine.last_applied, machine.membership.clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<MapReply>, StorageError<NodeId>>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut replies = Vec::new();
        let mut machine = self.machine.lock().expect("map state lock");
        let epoch_before = machine.map.epoch;
        for entry in entries {
            machine.last_applied = Some(entry.log_id);
            let reply = match entry.payload {
                EntryPayload::Blank => MapReply::Applied(machine.map.epoch),
                EntryPayload::Membership(m) => {
                    machine.membership = StoredMembership::new(Some(entry.log_id), m);
                    MapReply::Applied(machine.map.epoch)
                }
                EntryPayload::Normal(command) => match machine.map.apply(&command) {
                    Ok(epoch) => MapReply::Applied(epoch),
                    Err(e) => MapReply::Refused(e),
                },
            };
            replies.push(reply);
        }
        if machine.map.epoch != epoch_before {
            self.published.send_replace(machine.map.clone());
        }
        Ok(replies)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.clone()
    }

    async fn begin_receiving_snapshot(
        &mut self,
    ) -> Result<Box<Cursor<Vec<u8>>>, StorageError<NodeId>> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta<NodeId, Node>,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> Result<(), StorageError<NodeId>> {
        let signature = Some(meta.signature());
        let map: ClusterMap = serde_json::from_slice(snapshot.get_ref())
            .map_err(|e| StorageIOError::read_snapshot(signature.clone(), &e))?;
        let file = SnapshotFile {
            meta: meta.clone(),
            map,
        };
        let bytes = serde_json::to_vec(&file)
            .map_err(|e| StorageIOError::write_snapshot(signature.clone(), &e))?;
        replace_file(&self.dir, SNAPSHOT_FILE, &bytes)
            .map_err(|e| StorageIOError::write_snapshot(signature, &e))?;
        let mut machine = self.machine.lock().expect("map state lock");
        machine.last_applied = meta.last_log_id;
        machine.membership = meta.last_membership.clone();
        machine.map = file.map.clone();
        machine.snapshot = Some(file);
        self.published.send_replace(machine.map.clone());
        Ok(())
    }

    async fn get_current_snapshot(
        &mut self,
    ) -> Result<Option<Snapshot<TypeConfig>>, StorageError<NodeId>> {
        let machine = self.machine.lock().expect("map state lock");
        let Some(file) = &machine.snapshot else {
            return Ok(None);
        };
        let bytes = serde_json::to_vec(&file.map)
            .map_err(|e| StorageIOError::read_snapshot(Some(file.meta.signature()), &e))?;
        Ok(Some(Snapshot {
            meta: file.meta.clone(),
            snapshot: Box::new(Cursor::new(bytes)),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_log_and_vote_survive_a_reopen_and_purge_keeps_the_mark() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = LogStore::open(dir.path()).unwrap();
        let vote = Vote::new(3, 2);
        log.save_vote(&vote).await.unwrap();
        log.update(|s| {
            for i in 1..=4 {
                let id = LogId::new(openraft::CommittedLeaderId::new(3, 2), i);
                s.entries.insert(
                    i,
                    Entry {
                        log_id: id,
                        payload: EntryPayload::Blank,
                    },
                );
            }
        })
        .unwrap();
        let mut again = LogStore::open(dir.path()).unwrap();
        assert_eq!(again.read_vote().await.unwrap(), Some(vote));
        assert_eq!(again.try_get_log_entries(2..4).await.unwrap().len(), 2);

        let purge_to = LogId::new(openraft::CommittedLeaderId::new(3, 2), 2);
        again.purge(purge_to).await.unwrap();
        again
            .truncate(LogId::new(openraft::CommittedLeaderId::new(3, 2), 4))
            .await
            .unwrap();
        let mut third = LogStore::open(dir.path()).unwrap();
        let state = third.get_log_state().await.unwrap();
        assert_eq!(state.last_purged_log_id, Some(purge_to));
        assert_eq!(state.last_log_id.map(|l| l.index), Some(3));
        assert_eq!(third.try_get_log_entries(..).await.unwrap().len(), 1);
    }

    #[test]
    fn a_torn_temporary_file_leaves_the_log_as_it_was() {
        let dir = tempfile::tempdir().unwrap();
        let log = LogStore::open(dir.path()).unwrap();
        log.update(|s| s.vote = Some(Vote::new(1, 1))).unwrap();
        // A crash between writing the temporary file and renaming it.
        std::fs::write(dir.path().join(format!("{LOG_FILE}.tmp")), b"{\"vote\":").unwrap();
        let mut again = LogStore::open(dir.path()).unwrap();
        let vote = futures::executor::block_on(again.read_vote()).unwrap();
        assert_eq!(vote, Some(Vote::new(1, 1)));
    }
}
