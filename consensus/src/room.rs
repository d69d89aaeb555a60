//! A room's replicated membership and the changes that move it forward.
//!
//! This is the value of the per-room Paxos register: each committed change is
//! a pure function of the previous [`RoomState`], applied by whichever node
//! proposes it (CASPaxos style). Nothing here knows about ballots or time.

use std::collections::{BTreeMap, VecDeque};

use crate::ids::{ChangeId, Revision};

// The vocabulary lives in its own crate so that the envelope crate can use
// it without depending on Paxos; re-exported here at the paths it had when
// it was defined in this module.
pub use saferchat_vocabulary::{
    HANDLE_CHARS, Handle, Membership, PUBLIC_KEY_BYTES_MAX, ParseError, PublicKey,
    ROOM_MEMBERS_MAX, ROOM_NAME_BYTES_MAX, RoomId, fingerprint_of,
};

/// How many applied changes a room remembers for deduplicating retries.
pub const RECENT_CHANGES_MAX: usize = 64;

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

/// The read-only view the envelope checks take, so that they need not
/// depend on this crate.
impl Membership for RoomState {
    fn revision(&self) -> Revision {
        self.revision
    }

    fn key_of(&self, handle: &Handle) -> Option<&PublicKey> {
        self.members.get(handle)?.as_ref()
    }

    fn recipients(&self) -> impl Iterator<Item = (&Handle, &PublicKey)> {
        RoomState::recipients(self)
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
    use bytes::Bytes;

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

        // The read-only view the envelope checks use says the same.
        let viewed: Vec<_> = Membership::recipients(&s).map(|(h, _)| *h).collect();
        assert_eq!(viewed, recipients);
        assert_eq!(Membership::revision(&s), s.revision);
        assert_eq!(s.key_of(&handle(2)), Some(&key(2)));
        assert_eq!(s.key_of(&handle(1)), None, "a member without a key");
        assert_eq!(s.key_of(&handle(3)), None, "not a member");
    }
}
