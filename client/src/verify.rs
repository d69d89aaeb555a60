//! Numbers two people compare out of band (in person, by phone) to know
//! the server showed them the same keys and members.
//!
//! - A **safety number** for two members: 60 digits, the same on both
//!   sides, from both handles and keys. If it matches, each has the other's
//!   real key (a server cannot substitute keys: a handle is the hash of its
//!   key; this makes sure the *handle* is the person's).
//! - A **room fingerprint**: 30 digits from the membership hash of the
//!   room's recipients at a revision (docs/PROTOCOL.md §5.3). Two members
//!   at the same revision who see the same digits were shown the same
//!   members with the same keys.
//!
//! Layouts are in docs/PROTOCOL.md §9.

use saferchat_consensus::{Handle, Revision, RoomId};
use sha2::{Digest, Sha256};

use crate::crypto::{self, Recipient};

const PERSON_DOMAIN: &[u8] = b"saferchat/safety-number/v1\0";
const ROOM_DOMAIN: &[u8] = b"saferchat/room-fingerprint/v1\0";

/// 30 digits from the first 30 bytes of `hash`: six 5-byte big-endian
/// numbers, each modulo 100,000, as groups of five.
fn digits30(hash: &[u8; 32]) -> [String; 6] {
    std::array::from_fn(|i| {
        let n = hash[i * 5..i * 5 + 5]
            .iter()
            .fold(0u64, |n, b| (n << 8) | u64::from(*b));
        format!("{:05}", n % 100_000)
    })
}

/// One person's half of a safety number.
fn person_code(handle: &Handle, key_der: &[u8]) -> [String; 6] {
    let mut h = Sha256::new();
    h.update(PERSON_DOMAIN);
    h.update(handle.as_bytes());
    h.update(
        u16::try_from(key_der.len())
            .expect("bounded key")
            .to_be_bytes(),
    );
    h.update(key_der);
    digits30(&h.finalize().into())
}

/// The safety number of two members (the same whichever side asks): both
/// halves, the smaller first, as twelve groups of five digits.
pub fn safety_number(a: (&Handle, &[u8]), b: (&Handle, &[u8])) -> String {
    let mut halves = [person_code(a.0, a.1), person_code(b.0, b.1)];
    halves.sort();
    halves.concat().join(" ")
}

/// The room fingerprint at `revision`: six groups of five digits.
pub fn room_fingerprint(room: &RoomId, revision: Revision, recipients: &[Recipient]) -> String {
    let membership = crypto::membership_hash(room, revision, recipients);
    let mut h = Sha256::new();
    h.update(ROOM_DOMAIN);
    h.update(membership);
    digits30(&h.finalize().into()).join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_keys;

    #[test]
    fn a_safety_number_is_the_same_from_both_sides_and_changes_with_a_key() {
        let (alice, bob, carol) = (
            test_keys::identity(0),
            test_keys::identity(1),
            test_keys::identity(2),
        );
        let a = (&alice.handle(), alice.public_der().as_ref());
        let b = (&bob.handle(), bob.public_der().as_ref());
        let number = safety_number(a, b);
        assert_eq!(number, safety_number(b, a));
        assert_eq!(number.len(), 12 * 5 + 11);
        assert!(
            number
                .split(' ')
                .all(|g| g.len() == 5 && g.bytes().all(|c| c.is_ascii_digit()))
        );
        // Bob's handle with Carol's key: another number.
        let forged = (&bob.handle(), carol.public_der().as_ref());
        assert_ne!(safety_number(a, forged), number);
    }

    #[test]
    fn the_room_fingerprint_follows_members_keys_and_revision() {
        let (alice, bob, carol) = (
            test_keys::identity(0),
            test_keys::identity(1),
            test_keys::identity(2),
        );
        let room = RoomId::new("team").unwrap();
        let two = [Recipient::of(&alice), Recipient::of(&bob)];
        let base = room_fingerprint(&room, Revision(5), &two);
        assert_eq!(base.len(), 6 * 5 + 5);
        let reversed = [Recipient::of(&bob), Recipient::of(&alice)];
        assert_eq!(room_fingerprint(&room, Revision(5), &reversed), base);
        assert_ne!(room_fingerprint(&room, Revision(6), &two), base);
        let three = [
            Recipient::of(&alice),
            Recipient::of(&bob),
            Recipient::of(&carol),
        ];
        assert_ne!(room_fingerprint(&room, Revision(5), &three), base);
    }
}
