//! This installation's device state, kept beside the key file in
//! `KEY.state/`: the device id (16 random bytes, made once) and, per room,
//! the last message this device sent and the senders' streams it has seen
//! (`streams.rs`).
//!
//! Beside the key because that is what a device is here: the same key
//! file copied elsewhere starts a new `KEY.state/`, hence a new device,
//! and its messages form a stream of their own instead of looking like
//! gaps. Two processes using one key file (a `chat` and a `send`) share
//! the device: every read-modify-write of a room's file holds an
//! exclusive lock on `KEY.state/lock`, and seen streams are merged, never
//! overwritten with older knowledge.
//!
//! A [`Device::ephemeral`] device keeps all of this in memory (tools,
//! benchmarks and tests that keep no state).

use std::collections::HashMap;
use std::fs;
use std::io::Write as _;
use std::path::{Path, PathBuf};

use saferchat_consensus::{Handle, RoomId};
use saferchat_envelope::Envelope;
use saferchat_envelope::chain::{self, DEVICE_BYTES, NO_PREVIOUS};
use serde::{Deserialize, Serialize};

use crate::crypto::Position;
use crate::error::ClientError;
use crate::streams::{Saved, Seen, Streams};

/// A room's file.
#[derive(Debug, Default, Serialize, Deserialize)]
struct RoomFile {
    /// The last message this device sealed in the room.
    sent: Option<Seen>,
    /// The streams seen in the room.
    streams: Saved,
}

/// A device: its id, and where its state lives (nowhere if ephemeral).
#[derive(Debug)]
pub struct Device {
    id: [u8; DEVICE_BYTES],
    dir: Option<PathBuf>,
    sent: HashMap<RoomId, Seen>,
    /// Keys seen, for an ephemeral device.
    contacts: HashMap<String, String>,
}

fn state_error(path: &Path, e: impl std::fmt::Display) -> ClientError {
    ClientError::Input(format!("device state {}: {e}", path.display()))
}

/// Writes `bytes` to `path` through a file beside it renamed over it,
/// synced (file and folder), so a crash leaves the old or the new state.
fn replace(path: &Path, bytes: &[u8]) -> Result<(), ClientError> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let temporary = dir.join(format!(".{}.tmp", std::process::id()));
    let written = fs::File::create(&temporary)
        .and_then(|mut f| {
            f.write_all(bytes)?;
            f.sync_all()
        })
        .and_then(|()| fs::rename(&temporary, path))
        .and_then(|()| fs::File::open(dir)?.sync_all());
    if let Err(e) = written {
        let _ = fs::remove_file(&temporary);
        return Err(state_error(path, e));
    }
    Ok(())
}

/// Room names are `A-Z a-z 0-9 . _ -` and never start with `.`: a safe
/// file name as they are.
fn room_file(dir: &Path, room: &RoomId) -> PathBuf {
    dir.join("rooms").join(format!("{}.json", room.as_str()))
}

impl Device {
    /// A device that lives in memory only: a new id, no saved state.
    pub fn ephemeral() -> Device {
        Device {
            id: rand::random(),
            dir: None,
            sent: HashMap::new(),
            contacts: HashMap::new(),
        }
    }

    /// The device of the key file at `key`: `KEY.state/`, made on first use.
    ///
    /// # Errors
    /// [`ClientError::Input`] when the folder or its device file cannot be
    /// read or made.
    pub fn beside(key: &Path) -> Result<Device, ClientError> {
        let mut name = key.as_os_str().to_owned();
        name.push(".state");
        let dir = PathBuf::from(name);
        fs::create_dir_all(dir.join("rooms")).map_err(|e| state_error(&dir, e))?;
        let id_path = dir.join("device");
        let id = match fs::read(&id_path) {
            Ok(bytes) => bytes
                .try_into()
                .map_err(|_| state_error(&id_path, "not a 16-byte device id"))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let id: [u8; DEVICE_BYTES] = rand::random();
                let _lock = Self::lock_dir(&dir)?;
                // Another process may have made it first: keep theirs.
                match fs::read(&id_path) {
                    Ok(bytes) => bytes
                        .try_into()
                        .map_err(|_| state_error(&id_path, "not a 16-byte device id"))?,
                    Err(_) => {
                        replace(&id_path, &id)?;
                        id
                    }
                }
            }
            Err(e) => return Err(state_error(&id_path, e)),
        };
        Ok(Device {
            id,
            dir: Some(dir),
            sent: HashMap::new(),
            contacts: HashMap::new(),
        })
    }

    /// This device's id.
    pub fn id(&self) -> [u8; DEVICE_BYTES] {
        self.id
    }

    fn lock_dir(dir: &Path) -> Result<fs::File, ClientError> {
        let path = dir.join("lock");
        let file = fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(|e| state_error(&path, e))?;
        file.lock().map_err(|e| state_error(&path, e))?;
        Ok(file)
    }

    fn read_room(dir: &Path, room: &RoomId) -> Result<RoomFile, ClientError> {
        let path = room_file(dir, room);
        match fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| state_error(&path, e)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(RoomFile::default()),
            Err(e) => Err(state_error(&path, e)),
        }
    }

    fn write_room(dir: &Path, room: &RoomId, file: &RoomFile) -> Result<(), ClientError> {
        let bytes = serde_json::to_vec_pretty(file).expect("state serializes");
        replace(&room_file(dir, room), &bytes)
    }

    /// Seals the device's next message in `room` with `seal`, which is
    /// given its position, and records it as the last one sent.
    ///
    /// # Errors
    /// What `seal` returns, or a state file that cannot be read or written.
    pub fn seal_next(
        &mut self,
        room: &RoomId,
        seal: impl FnOnce(&Position) -> Result<Envelope, ClientError>,
    ) -> Result<(Envelope, Position), ClientError> {
        let next = |last: Option<Seen>| Position {
            device: self.id,
            seq: last.map_or(1, |l| l.seq + 1),
            prev: last.map_or(NO_PREVIOUS, |l| l.hash),
        };
        let Some(dir) = self.dir.clone() else {
            let position = next(self.sent.get(room).copied());
            let envelope = seal(&position)?;
            self.record(room, &position, &envelope);
            return Ok((envelope, position));
        };
        let _lock = Self::lock_dir(&dir)?;
        let mut file = Self::read_room(&dir, room)?;
        let position = next(file.sent);
        let envelope = seal(&position)?;
        file.sent = Some(Seen {
            seq: position.seq,
            hash: chain::message_hash(&envelope.signing_input()),
        });
        Self::write_room(&dir, room, &file)?;
        Ok((envelope, position))
    }

    /// Records `envelope`, re-sealed at `position` (a post re-wrapped for
    /// a newer membership), as the last one sent, unless the device has
    /// sent more since.
    ///
    /// # Errors
    /// A state file that cannot be read or written.
    pub fn resealed(
        &mut self,
        room: &RoomId,
        position: &Position,
        envelope: &Envelope,
    ) -> Result<(), ClientError> {
        let Some(dir) = self.dir.clone() else {
            self.record(room, position, envelope);
            return Ok(());
        };
        let _lock = Self::lock_dir(&dir)?;
        let mut file = Self::read_room(&dir, room)?;
        if file.sent.is_none_or(|s| s.seq == position.seq) {
            file.sent = Some(Seen {
                seq: position.seq,
                hash: chain::message_hash(&envelope.signing_input()),
            });
            Self::write_room(&dir, room, &file)?;
        }
        Ok(())
    }

    fn record(&mut self, room: &RoomId, position: &Position, envelope: &Envelope) {
        let last = self.sent.get(room).map_or(0, |s| s.seq);
        if position.seq >= last {
            self.sent.insert(
                room.clone(),
                Seen {
                    seq: position.seq,
                    hash: chain::message_hash(&envelope.signing_input()),
                },
            );
        }
    }

    /// Of `keys` (handle and key fingerprint), those this device never saw
    /// before in any room; remembers them (`KEY.state/contacts.json`).
    ///
    /// # Errors
    /// A state file that cannot be read or written.
    pub fn first_seen(
        &mut self,
        keys: &[(Handle, String)],
    ) -> Result<Vec<(Handle, String)>, ClientError> {
        let Some(dir) = self.dir.clone() else {
            return Ok(Self::add_contacts(&mut self.contacts, keys));
        };
        let path = dir.join("contacts.json");
        let _lock = Self::lock_dir(&dir)?;
        let mut known: HashMap<String, String> = match fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| state_error(&path, e))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => HashMap::new(),
            Err(e) => return Err(state_error(&path, e)),
        };
        let new = Self::add_contacts(&mut known, keys);
        if !new.is_empty() {
            let bytes = serde_json::to_vec_pretty(&known).expect("contacts serialize");
            replace(&path, &bytes)?;
        }
        Ok(new)
    }

    fn add_contacts(
        known: &mut HashMap<String, String>,
        keys: &[(Handle, String)],
    ) -> Vec<(Handle, String)> {
        keys.iter()
            .filter(|(handle, fingerprint)| {
                known
                    .insert(handle.to_string(), fingerprint.clone())
                    .is_none()
            })
            .cloned()
            .collect()
    }

    /// The streams of `room` as saved (empty for an ephemeral device).
    ///
    /// # Errors
    /// A state file that cannot be read.
    pub fn streams(&self, room: &RoomId) -> Result<Streams, ClientError> {
        match &self.dir {
            None => Ok(Streams::default()),
            Some(dir) => Ok(Streams::restore(Self::read_room(dir, room)?.streams)),
        }
    }

    /// Saves `streams` of `room`, merged with what another process may
    /// have saved meanwhile (the further stream position wins).
    ///
    /// # Errors
    /// A state file that cannot be read or written.
    pub fn save_streams(&self, room: &RoomId, streams: &Streams) -> Result<(), ClientError> {
        let Some(dir) = &self.dir else {
            return Ok(());
        };
        let _lock = Self::lock_dir(dir)?;
        let mut file = Self::read_room(dir, room)?;
        let mut merged = Streams::restore(std::mem::take(&mut file.streams));
        merged.merge(streams);
        file.streams = merged.save();
        Self::write_room(dir, room, &file)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::{Recipient, seal_at};
    use crate::test_keys;
    use saferchat_consensus::Revision;

    fn seal_with(position: &Position) -> Result<Envelope, ClientError> {
        let alice = test_keys::identity(0);
        seal_at(
            &alice,
            &RoomId::new("aaa").unwrap(),
            Revision(1),
            &[Recipient::of(&alice)],
            b"hi",
            position,
            1,
        )
    }

    #[test]
    fn a_device_numbers_its_messages_per_room_across_processes() {
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("alice.pem");
        let room = RoomId::new("aaa").unwrap();
        let mut first = Device::beside(&key).unwrap();
        let (e1, p1) = first.seal_next(&room, seal_with).unwrap();
        assert_eq!((p1.seq, p1.prev), (1, NO_PREVIOUS));
        // Another process with the same key file: the same device, next number.
        let mut second = Device::beside(&key).unwrap();
        assert_eq!(second.id(), first.id());
        let (_, p2) = second.seal_next(&room, seal_with).unwrap();
        assert_eq!(
            (p2.seq, p2.prev),
            (2, chain::message_hash(&e1.signing_input()))
        );
        let other_room = RoomId::new("bbb").unwrap();
        assert_eq!(first.seal_next(&other_room, seal_with).unwrap().1.seq, 1);
        assert_eq!(first.seal_next(&room, seal_with).unwrap().1.seq, 3);
        // A copy of the key elsewhere is another device.
        let copy = Device::beside(&dir.path().join("copy.pem")).unwrap();
        assert_ne!(copy.id(), first.id());
    }

    #[test]
    fn a_reseal_replaces_the_last_hash_only_while_it_is_the_last() {
        let dir = tempfile::tempdir().unwrap();
        let room = RoomId::new("aaa").unwrap();
        let mut device = Device::beside(&dir.path().join("k.pem")).unwrap();
        let (_, p1) = device.seal_next(&room, seal_with).unwrap();
        let again = seal_with(&p1).unwrap();
        device.resealed(&room, &p1, &again).unwrap();
        let (_, p2) = device.seal_next(&room, seal_with).unwrap();
        assert_eq!(p2.prev, chain::message_hash(&again.signing_input()));
        device
            .resealed(&room, &p1, &seal_with(&p1).unwrap())
            .unwrap();
        assert_eq!(device.seal_next(&room, seal_with).unwrap().1.seq, 3);

        let mut memory = Device::ephemeral();
        assert_eq!(memory.seal_next(&room, seal_with).unwrap().1.seq, 1);
        assert_eq!(memory.seal_next(&room, seal_with).unwrap().1.seq, 2);
    }
}
