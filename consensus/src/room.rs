//! A room's replicated membership and the changes that move it forward.
//!
//! This is the value of the per-room Paxos register: each committed change is
//! a pure function of the previous [`RoomState`], applied by whichever node
//! proposes it (CASPaxos style). Nothing here knows about ballots or time.

use std::collections::{BTreeMap, VecDeque};
use std::fmt;
use std::str::FromStr;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use bytes::Bytes;
use sha2::{Digest, Sha256};

use crate::ids::{ChangeId, Revision};

/// Longest room name, in bytes.
pub const ROOM_NAME_BYTES_MAX: usize = 64;
/// Most members one room may have. Every post wraps its content key once
/// per member, so this bounds envelope size and sender work too.
pub const ROOM_MEMBERS_MAX: usize = 1000;
/// Largest public key (SubjectPublicKeyInfo DER) a member may register. An
/// RSA-2048 key is 294 bytes; 4096-bit keys would still fit.
pub const PUBLIC_KEY_BYTES_MAX: usize = 1024;
/// How many applied changes a room remembers for deduplicating retries.
pub const RECENT_CHANGES_MAX: usize = 64;
/// Length of a handle in its textual form.
pub const HANDLE_CHARS: usize = 43;

/// Why a name or handle could not be parsed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    /// Room names are 1 to 64 bytes of `A-Z a-z 0-9 . _ -`, not starting
    /// with `.` or `-`.
    #[error(
        "room name must be 1-{ROOM_NAME_BYTES_MAX} characters of A-Z a-z 0-9 . _ - and not start with . or -"
    )]
    RoomName,
    /// A handle is 43 characters of unpadded base64url encoding 32 bytes.
    #[error(
        "a user handle is {HANDLE_CHARS} characters of unpadded base64url (SHA-256 of the RSA modulus)"
    )]
    Handle,
}

/// The name of a room, validated.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RoomId(String);

impl RoomId {
    /// Validates a room name.
    ///
    /// # Errors
    /// [`ParseError::RoomName`] when the name is empty, too long, or uses
    /// other characters.
    pub fn new(name: &str) -> Result<RoomId, ParseError> {
        let ok = !name.is_empty()
            && name.len() <= ROOM_NAME_BYTES_MAX
            && !name.starts_with(['.', '-'])
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
        if ok {
            Ok(RoomId(name.to_owned()))
        } else {
            Err(ParseError::RoomName)
        }
    }

    /// The name as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for RoomId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Quoted, so that messages reading `room {room:?}` show `room "aaa"`.
impl fmt::Debug for RoomId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.0)
    }
}

/// A user's handle: SHA-256 over the big-endian bytes of their RSA modulus.
///
/// Written as 43 characters of unpadded base64url. Because it is a hash of
/// the key, a server cannot substitute another key for a handle without the
/// client noticing.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Handle([u8; 32]);

impl Handle {
    /// The handle of an RSA modulus given as big-endian bytes without
    /// leading zeros.
    pub fn of_modulus(modulus_be: &[u8]) -> Handle {
        let start = modulus_be
            .iter()
            .position(|b| *b != 0)
            .unwrap_or(modulus_be.len());
        Handle(Sha256::digest(&modulus_be[start..]).into())
    }

    /// The raw 32 bytes.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// Builds a handle from its raw bytes.
    pub fn from_bytes(bytes: [u8; 32]) -> Handle {
        Handle(bytes)
    }
}

impl FromStr for Handle {
    type Err = ParseError;

    fn from_str(s: &str) -> Result<Handle, ParseError> {
        if s.len() != HANDLE_CHARS {
            return Err(ParseError::Handle);
        }
        let raw = URL_SAFE_NO_PAD.decode(s).map_err(|_| ParseError::Handle)?;
        let bytes: [u8; 32] = raw.try_into().map_err(|_| ParseError::Handle)?;
        // Reject non-canonical spellings (stray low bits in the last
        // character) so that one handle has exactly one textual form.
        if URL_SAFE_NO_PAD.encode(bytes) != s {
            return Err(ParseError::Handle);
        }
        Ok(Handle(bytes))
    }
}

impl fmt::Display for Handle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&URL_SAFE_NO_PAD.encode(self.0))
    }
}

impl fmt::Debug for Handle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Handle({self})")
    }
}

/// A member's public key as SubjectPublicKeyInfo DER. Opaque here: the node
/// checks that it parses and hashes to the member's handle before it
/// proposes a [`Change::RegisterKey`].
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct PublicKey(Bytes);

impl PublicKey {
    /// Wraps DER bytes.
    ///
    /// # Panics
    /// If the key is empty or longer than [`PUBLIC_KEY_BYTES_MAX`]; callers
    /// validate input before building one.
    pub fn new(der: Bytes) -> PublicKey {
        assert!(!der.is_empty() && der.len() <= PUBLIC_KEY_BYTES_MAX);
        PublicKey(der)
    }

    /// The DER bytes.
    pub fn der(&self) -> &Bytes {
        &self.0
    }

    /// A short, human-comparable fingerprint: the first 16 bytes of
    /// SHA-256 over the DER, as eight groups of four hex digits.
    pub fn fingerprint(&self) -> String {
        fingerprint_of(&self.0)
    }
}

/// The display fingerprint of SubjectPublicKeyInfo DER bytes.
pub fn fingerprint_of(der: &[u8]) -> String {
    let digest = Sha256::digest(der);
    digest[..16]
        .chunks(2)
        .map(|pair| format!("{:02x}{:02x}", pair[0], pair[1]))
        .collect::<Vec<_>>()
        .join(" ")
}

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PublicKey({})", self.fingerprint())
    }
}

/// The replicated membership of one room.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct RoomState {
    /// Number of committed changes; 0 for a room that was never created.
    pub revision: Revision,
    /// False until a `Create` is committed.
    pub created: bool,
    /// Members by handle, with their key once they have joined.
    pub members: BTreeMap<Handle, Option<PublicKey>>,
    /// The last applied changes and the revision each produced, oldest
    /// first, at most [`RECENT_CHANGES_MAX`].
    pub recent: VecDeque<(ChangeId, Revision)>,
}

impl RoomState {
    /// The state of a room nobody has created: what a proposer starts from
    /// when no acceptor has accepted anything.
    pub fn absent() -> RoomState {
        RoomState::default()
    }

    /// Members that have registered a key, in handle order: the recipients
    /// every post at this revision must wrap its content key for.
    pub fn recipients(&self) -> impl Iterator<Item = (&Handle, &PublicKey)> {
        self.members
            .iter()
            .filter_map(|(handle, key)| key.as_ref().map(|key| (handle, key)))
    }

    /// Whether `handle` is a member (with or without a key).
    pub fn is_member(&self, handle: &Handle) -> bool {
        self.members.contains_key(handle)
    }
}

/// One requested change to a room.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Change {
    /// Create the room (revision 1, no members).
    Create,
    /// Add a member; adding a member twice changes nothing.
    Add(Handle),
    /// Remove a member; removing a non-member is an error.
    Remove(Handle),
    /// Register a member's public key on their first join. The caller has
    /// checked that the key hashes to the handle.
    RegisterKey(Handle, PublicKey),
    /// Change nothing: a consensus read of the current state.
    Read,
}

/// A change with its identity and an optional compare-and-set guard.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Proposal {
    /// Unique id, for applying a retried change once.
    pub id: ChangeId,
    /// What to change.
    pub change: Change,
    /// Apply only if the room is at exactly this revision.
    pub expected: Option<Revision>,
}

impl Proposal {
    /// A consensus read.
    pub fn read(id: ChangeId) -> Proposal {
        Proposal {
            id,
            change: Change::Read,
            expected: None,
        }
    }
}

/// The result of applying a change that did not fail.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Applied {
    /// Whether the membership changed (false for idempotent repeats and
    /// reads).
    pub changed: bool,
    /// The room's revision after the change.
    pub revision: Revision,
}

/// Why a change was refused. The state is left as it was.
#[derive(Clone, Debug, PartialEq, Eq, Hash, thiserror::Error)]
pub enum ChangeError {
    /// The room has not been created.
    #[error("room does not exist")]
    RoomNotFound,
    /// `Create` on a room that exists.
    #[error("room already exists")]
    RoomExists,
    /// `Remove` or `RegisterKey` for a handle that is not a member.
    #[error("user is not a member of the room")]
    NotMember,
    /// The room is full.
    #[error("room already has the maximum of {ROOM_MEMBERS_MAX} members")]
    RoomFull,
    /// A different key is already registered for this handle.
    #[error("a different public key is already registered for this user")]
    KeyConflict,
    /// The room reached [`Revision::MAX`]; no further change fits.
    #[error("room has reached its last revision")]
    RevisionsExhausted,
    /// The compare-and-set guard did not hold.
    #[error("room is at revision {current}, not the expected revision")]
    RevisionMismatch {
        /// The revision the room is at.
        current: Revision,
    },
}

/// Applies `proposal` to `state` in place.
///
/// On success the state is at `Applied::revision`; when it changed, the
/// revision went up by exactly one and the change id was recorded. On error
/// the state is untouched.
///
/// # Errors
/// The [`ChangeError`] that explains why the change does not apply.
pub fn apply(state: &mut RoomState, proposal: &Proposal) -> Result<Applied, ChangeError> {
    if let Some((_, revision)) = state.recent.iter().find(|(id, _)| *id == proposal.id) {
        // Already applied in an earlier round whose outcome the proposer
        // did not learn: report the first outcome, change nothing.
        return Ok(Applied {
            changed: true,
            revision: *revision,
        });
    }
    if let Some(expected) = proposal.expected
        && expected != state.revision
    {
        return Err(ChangeError::RevisionMismatch {
            current: state.revision,
        });
    }
    let unchanged = Applied {
        changed: false,
        revision: state.revision,
    };
    if proposal.change != Change::Read && state.revision >= Revision::MAX {
        return Err(ChangeError::RevisionsExhausted);
    }
    match &proposal.change {
        Change::Read => return Ok(unchanged),
        Change::Create if state.created => return Err(ChangeError::RoomExists),
        Change::Create => state.created = true,
        _ if !state.created => return Err(ChangeError::RoomNotFound),
        Change::Add(handle) => {
            if state.members.contains_key(handle) {
                return Ok(unchanged);
            }
            if state.members.len() >= ROOM_MEMBERS_MAX {
                return Err(ChangeError::RoomFull);
            }
            state.members.insert(*handle, None);
        }
        Change::Remove(handle) => {
            if state.members.remove(handle).is_none() {
                return Err(ChangeError::NotMember);
            }
        }
        Change::RegisterKey(handle, key) => match state.members.get_mut(handle) {
            None => return Err(ChangeError::NotMember),
            Some(Some(existing)) if existing == key => return Ok(unchanged),
            Some(Some(_)) => return Err(ChangeError::KeyConflict),
            Some(slot) => *slot = Some(key.clone()),
        },
    }
    state.revision = state.revision.next();
    if state.recent.len() == RECENT_CHANGES_MAX {
        state.recent.pop_front();
    }
    state.recent.push_back((proposal.id, state.revision));
    Ok(Applied {
        changed: true,
        revision: state.revision,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn handle(n: u8) -> Handle {
        Handle::of_modulus(&[n, 1, 2, 3])
    }

    fn prop(id: u128, change: Change) -> Proposal {
        Proposal {
            id: ChangeId(id),
            change,
            expected: None,
        }
    }

    fn key(n: u8) -> PublicKey {
        PublicKey::new(Bytes::from(vec![n; 294]))
    }

    #[test]
    fn room_names_are_validated() {
        assert!(RoomId::new("aaa").is_ok());
        assert!(RoomId::new("team-1.ops_x").is_ok());
        assert!(RoomId::new(&"a".repeat(64)).is_ok());
        for bad in ["", ".x", "-x", "a b", "é", "a/b", &"a".repeat(65)] {
            assert_eq!(RoomId::new(bad), Err(ParseError::RoomName), "{bad:?}");
        }
    }

    #[test]
    fn handles_round_trip_and_reject_bad_text() {
        let h = handle(7);
        let text = h.to_string();
        assert_eq!(text.len(), HANDLE_CHARS);
        assert_eq!(text.parse::<Handle>(), Ok(h));
        assert_eq!(
            "BpB1m-4nZG6rMyPRVO8m7AbPvpjU7YUZIFy4ab1ve4M"
                .parse::<Handle>()
                .map(|h| h.to_string())
                .as_deref(),
            Ok("BpB1m-4nZG6rMyPRVO8m7AbPvpjU7YUZIFy4ab1ve4M")
        );
        for bad in [
            "",
            "short",
            "BpB1m-4nZG6rMyPRVO8m7AbPvpjU7YUZIFy4ab1ve4", // 42
            "BpB1m-4nZG6rMyPRVO8m7AbPvpjU7YUZIFy4ab1ve4M=",
            "BpB1m+4nZG6rMyPRVO8m7AbPvpjU7YUZIFy4ab1ve4M", // not url-safe
            "BpB1m-4nZG6rMyPRVO8m7AbPvpjU7YUZIFy4ab1ve4N", // stray low bits
        ] {
            assert_eq!(bad.parse::<Handle>(), Err(ParseError::Handle), "{bad:?}");
        }
    }

    #[test]
    fn leading_zero_bytes_do_not_change_the_handle() {
        assert_eq!(
            Handle::of_modulus(&[0, 0, 9, 8]),
            Handle::of_modulus(&[9, 8])
        );
    }

    #[test]
    fn changes_move_the_revision_by_one() {
        let mut s = RoomState::absent();
        assert_eq!(
            apply(&mut s, &prop(1, Change::Add(handle(1)))),
            Err(ChangeError::RoomNotFound)
        );
        assert_eq!(
            apply(&mut s, &prop(2, Change::Create)).unwrap().revision,
            Revision(1)
        );
        assert_eq!(
            apply(&mut s, &prop(3, Change::Create)),
            Err(ChangeError::RoomExists)
        );
        let added = apply(&mut s, &prop(4, Change::Add(handle(1)))).unwrap();
        assert_eq!(
            added,
            Applied {
                changed: true,
                revision: Revision(2)
            }
        );
        let again = apply(&mut s, &prop(5, Change::Add(handle(1)))).unwrap();
        assert_eq!(
            again,
            Applied {
                changed: false,
                revision: Revision(2)
            }
        );
        assert_eq!(
            apply(&mut s, &prop(6, Change::Remove(handle(2)))),
            Err(ChangeError::NotMember)
        );
        assert_eq!(
            apply(&mut s, &prop(7, Change::RegisterKey(handle(1), key(1))))
                .unwrap()
                .revision,
            Revision(3)
        );
        assert!(
            !apply(&mut s, &prop(8, Change::RegisterKey(handle(1), key(1))))
                .unwrap()
                .changed
        );
        assert_eq!(
            apply(&mut s, &prop(9, Change::RegisterKey(handle(1), key(2)))),
            Err(ChangeError::KeyConflict)
        );
        assert_eq!(
            apply(&mut s, &prop(10, Change::Remove(handle(1))))
                .unwrap()
                .revision,
            Revision(4)
        );
        assert!(s.members.is_empty());
    }

    #[test]
    fn compare_and_set_guards_the_revision() {
        let mut s = RoomState::absent();
        apply(&mut s, &prop(1, Change::Create)).unwrap();
        let stale = Proposal {
            id: ChangeId(2),
            change: Change::Add(handle(1)),
            expected: Some(Revision(0)),
        };
        assert_eq!(
            apply(&mut s, &stale),
            Err(ChangeError::RevisionMismatch {
                current: Revision(1)
            })
        );
        let fresh = Proposal {
            expected: Some(Revision(1)),
            ..stale
        };
        assert!(apply(&mut s, &fresh).unwrap().changed);
    }

    #[test]
    fn a_retried_change_applies_once() {
        let mut s = RoomState::absent();
        apply(&mut s, &prop(1, Change::Create)).unwrap();
        apply(&mut s, &prop(2, Change::Add(handle(1)))).unwrap();
        let remove = prop(3, Change::Remove(handle(1)));
        let first = apply(&mut s, &remove).unwrap();
        let retry = apply(&mut s, &remove).unwrap();
        assert_eq!(first, retry);
        assert_eq!(s.revision, Revision(3));
    }

    #[test]
    fn recent_changes_are_bounded() {
        let mut s = RoomState::absent();
        apply(&mut s, &prop(0, Change::Create)).unwrap();
        for n in 1..=200u128 {
            let h = Handle::of_modulus(&n.to_be_bytes());
            apply(&mut s, &prop(n, Change::Add(h))).unwrap();
        }
        assert_eq!(s.recent.len(), RECENT_CHANGES_MAX);
        assert_eq!(s.recent.back().unwrap().1, Revision(201));
    }

    #[test]
    fn rooms_fill_up() {
        let mut s = RoomState::absent();
        apply(&mut s, &prop(0, Change::Create)).unwrap();
        for n in 0..ROOM_MEMBERS_MAX as u128 {
            let h = Handle::of_modulus(&(n + 1).to_be_bytes());
            apply(&mut s, &prop(n + 1, Change::Add(h))).unwrap();
        }
        let one_more = Handle::of_modulus(b"one more");
        assert_eq!(
            apply(&mut s, &prop(99_999, Change::Add(one_more))),
            Err(ChangeError::RoomFull)
        );
    }

    #[test]
    fn recipients_are_members_with_keys() {
        let mut s = RoomState::absent();
        apply(&mut s, &prop(0, Change::Create)).unwrap();
        apply(&mut s, &prop(1, Change::Add(handle(1)))).unwrap();
        apply(&mut s, &prop(2, Change::Add(handle(2)))).unwrap();
        apply(&mut s, &prop(3, Change::RegisterKey(handle(2), key(2)))).unwrap();
        let recipients: Vec<_> = s.recipients().map(|(h, _)| *h).collect();
        assert_eq!(recipients, vec![handle(2)]);
    }
}
