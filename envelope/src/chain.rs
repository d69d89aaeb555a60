//! What envelope v1.1 adds: each message's place in its sender's stream,
//! the membership the sender saw, and a commitment to the content key.
//!
//! - A sender's *device* (16 random bytes, one per installation) numbers
//!   its messages in a room 1, 2, 3, … and names the previous one by its
//!   [`message_hash`], so a recipient notices a message dropped, replayed
//!   or reordered by the server. The device is part of the stream's name
//!   so that one key used on two devices makes two streams, not gaps.
//! - [`membership_hash`] of the recipients at the envelope's revision: a
//!   recipient compares it with its own view, and so notices a server
//!   that shows members different lists.
//! - [`key_commitment`]: AES-GCM is not key-committing, and each recipient
//!   unwraps its own copy of the content key; committing to the key in
//!   the signed input means one signed envelope cannot decrypt to
//!   different plaintexts for different recipients.
//! - [`oaep_label`]: each wrapped key is bound to its room, revision and
//!   recipient, so a wrapped key cannot be moved to another envelope.
//!
//! Everything here is a pure function of its inputs; byte layouts are in
//! `docs/PROTOCOL.md`, with test vectors.

use saferchat_vocabulary::{Handle, Revision, RoomId};
use sha2::{Digest, Sha256};

/// Bytes of a device id.
pub const DEVICE_BYTES: usize = 16;
/// A SHA-256 output.
pub type Hash = [u8; 32];
/// The `prev_hash` of a device's first message in a room.
pub const NO_PREVIOUS: Hash = [0; 32];

const MEMBERSHIP_DOMAIN: &[u8] = b"saferchat/membership/v1.1\0";
const COMMITMENT_DOMAIN: &[u8] = b"saferchat/key-commitment/v1.1\0";
const LABEL_DOMAIN: &[u8] = b"saferchat/wrap/v1.1\0";

/// A message's place in its sender's stream and what the sender vouches
/// for; all of it is signed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Chain {
    /// The sender's device.
    pub device: [u8; DEVICE_BYTES],
    /// 1-based number of the message among the device's in the room.
    pub seq: u64,
    /// [`message_hash`] of the device's previous message in the room, or
    /// [`NO_PREVIOUS`] when `seq` is 1.
    pub prev: Hash,
    /// The sender's clock when sealing, Unix milliseconds.
    pub sent_at_ms: u64,
    /// [`membership_hash`] of the recipients at the envelope's revision.
    pub membership: Hash,
    /// [`key_commitment`] of the content key.
    pub key_commitment: Hash,
}

/// Appends `u16 len ‖ room`.
pub(crate) fn put_room(out: &mut Vec<u8>, room: &RoomId) {
    let room = room.as_str().as_bytes();
    out.extend_from_slice(
        &u16::try_from(room.len())
            .expect("room names are short")
            .to_be_bytes(),
    );
    out.extend_from_slice(room);
}

/// SHA-256 over the recipients of `room` at `revision`, each with the key
/// bytes (SubjectPublicKeyInfo DER) the room registered for them:
///
/// ```text
/// SHA-256("saferchat/membership/v1.1\0" ‖ u16 len ‖ room ‖ u64 revision
///         ‖ u32 count ‖ for each, by handle bytes: handle (32) ‖ u16 len ‖ key)
/// ```
///
/// `recipients` must be sorted by handle without duplicates (as wrapped
/// keys are).
///
/// # Panics
/// If a key is longer than 65,535 bytes or there are more than 2³²
/// recipients (the vocabulary's limits are far below either).
pub fn membership_hash<'a>(
    room: &RoomId,
    revision: Revision,
    recipients: impl ExactSizeIterator<Item = (&'a Handle, &'a [u8])>,
) -> Hash {
    let mut hash = Sha256::new();
    let mut head = Vec::with_capacity(MEMBERSHIP_DOMAIN.len() + 80);
    head.extend_from_slice(MEMBERSHIP_DOMAIN);
    put_room(&mut head, room);
    head.extend_from_slice(&revision.0.to_be_bytes());
    head.extend_from_slice(
        &u32::try_from(recipients.len())
            .expect("bounded")
            .to_be_bytes(),
    );
    hash.update(&head);
    for (handle, key) in recipients {
        hash.update(handle.as_bytes());
        hash.update(u16::try_from(key.len()).expect("bounded key").to_be_bytes());
        hash.update(key);
    }
    hash.finalize().into()
}

/// `SHA-256("saferchat/key-commitment/v1.1\0" ‖ content key)`.
pub fn key_commitment(content_key: &[u8]) -> Hash {
    let mut hash = Sha256::new();
    hash.update(COMMITMENT_DOMAIN);
    hash.update(content_key);
    hash.finalize().into()
}

/// The RSA-OAEP label of a key wrapped for `recipient`:
/// `"saferchat/wrap/v1.1\0" ‖ u16 len ‖ room ‖ u64 revision ‖ recipient (32)`.
pub fn oaep_label(room: &RoomId, revision: Revision, recipient: &Handle) -> Vec<u8> {
    let mut out = Vec::with_capacity(LABEL_DOMAIN.len() + 2 + 64 + 8 + 32);
    out.extend_from_slice(LABEL_DOMAIN);
    put_room(&mut out, room);
    out.extend_from_slice(&revision.0.to_be_bytes());
    out.extend_from_slice(recipient.as_bytes());
    out
}

/// What names a message in its sender's stream: SHA-256 of its signing
/// input (which covers everything the sender signed).
pub fn message_hash(signing_input: &[u8]) -> Hash {
    Sha256::digest(signing_input).into()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn handle(n: u8) -> Handle {
        Handle::of_modulus(&[n; 256])
    }

    #[test]
    fn the_membership_hash_covers_room_revision_handles_and_keys() {
        let room = RoomId::new("aaa").unwrap();
        let (a, b) = (handle(1), handle(2));
        let (ka, kb): (&[u8], &[u8]) = (b"key a", b"key b");
        let base = membership_hash(&room, Revision(3), [(&a, ka), (&b, kb)].into_iter());
        for other in [
            membership_hash(
                &RoomId::new("aab").unwrap(),
                Revision(3),
                [(&a, ka), (&b, kb)].into_iter(),
            ),
            membership_hash(&room, Revision(4), [(&a, ka), (&b, kb)].into_iter()),
            membership_hash(&room, Revision(3), [(&a, ka)].into_iter()),
            membership_hash(
                &room,
                Revision(3),
                [(&a, ka), (&b, b"key c".as_slice())].into_iter(),
            ),
            // Lengths are framed: bytes cannot move between handle and key.
            membership_hash(
                &room,
                Revision(3),
                [(&a, b"key ak".as_slice()), (&b, b"ey b".as_slice())].into_iter(),
            ),
        ] {
            assert_ne!(other, base);
        }
    }

    #[test]
    fn labels_and_commitments_are_domain_separated() {
        let room = RoomId::new("aaa").unwrap();
        let label = oaep_label(&room, Revision(9), &handle(1));
        assert!(label.starts_with(LABEL_DOMAIN));
        assert_ne!(label, oaep_label(&room, Revision(9), &handle(2)));
        assert_ne!(label, oaep_label(&room, Revision(10), &handle(1)));
        assert_ne!(key_commitment(&[7; 32]), key_commitment(&[8; 32]));
        assert_ne!(key_commitment(&[7; 32]), message_hash(&[7; 32]));
    }
}
