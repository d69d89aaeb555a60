//! Message envelope v1: the bytes a sender posts and a recipient receives.
//!
//! # Layout
//!
//! - this file: the [`Envelope`] a sender posts, its limits, decoding with
//!   validation, the [`signing_input`], and [`check_membership`], the
//!   checks a server can make without any key;
//! - [`merkle`]: the tree over wrapped keys whose root the sender signs;
//! - [`challenge`]: what a joining member signs;
//! - [`sealed`]: what one recipient receives ([`sealed::Fanout`] builds it
//!   on the server, [`sealed::open`] checks its structure on the client).
//!
//! # The construction (normative)
//!
//! 1. A fresh 256-bit content key and a 96-bit nonce encrypt the body once
//!    with AES-256-GCM; the associated data is [`associated_data`] (room,
//!    sender, revision), so a ciphertext cannot be replayed under another
//!    header.
//! 2. The content key is wrapped for every member that has a registered key
//!    at `revision` with RSA-OAEP (SHA-256, MGF1-SHA-256, empty label);
//!    keys are listed in handle order.
//! 3. Leaves `SHA-256(0x00 ‖ handle ‖ wrapped)` form an RFC 6962 tree.
//! 4. The sender signs [`signing_input`] with RSA-PSS (SHA-256, salt 32).
//!
//! A recipient verifies the audit path and the signature against the
//! sender's key from the room's membership (the key must hash to the
//! sender's handle) before it decrypts or shows anything.
//!
//! # What this crate never does
//!
//! It holds no keys and links no RSA or AES: the node uses it to validate
//! and fan out envelopes, and must never be able to decrypt. Nor does it
//! depend on the consensus crate: rooms, handles, revisions and their
//! limits come from `saferchat-vocabulary`, and [`check_membership`] reads
//! a membership through that crate's [`Membership`] view.

pub mod challenge;
pub mod merkle;
pub mod sealed;

use bytes::Bytes;
use prost::Message as _;
use saferchat_proto::envelope as pb;
use saferchat_vocabulary::{Handle, Membership, Revision, RoomId};
use sha2::{Digest, Sha256};

/// The only envelope version this crate speaks.
pub const VERSION: u32 = 1;
/// Largest plaintext body.
pub const PLAINTEXT_BYTES_MAX: usize = 64 * 1024;
/// AES-GCM authentication tag length.
pub const TAG_BYTES: usize = 16;
/// AES-GCM nonce length.
pub const NONCE_BYTES: usize = 12;
/// Largest ciphertext: the largest body plus the tag.
pub const CIPHERTEXT_BYTES_MAX: usize = PLAINTEXT_BYTES_MAX + TAG_BYTES;
/// Largest wrapped key or signature (RSA-4096); RSA-2048 gives 256 bytes.
pub const RSA_OUTPUT_BYTES_MAX: usize = 512;
/// Largest encoded envelope: a full body wrapped for a full room.
pub const ENVELOPE_BYTES_MAX: usize = 512 * 1024;

/// Domain separation for signatures over envelopes.
const SIGNING_DOMAIN: &[u8] = b"saferchat/envelope/v1\0";
/// Domain separation for AES-GCM associated data.
const AAD_DOMAIN: &[u8] = b"saferchat/body/v1\0";

/// Why bytes are not a valid v1 envelope.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum EnvelopeError {
    /// Larger than [`ENVELOPE_BYTES_MAX`].
    #[error("envelope is {0} bytes; the limit is {ENVELOPE_BYTES_MAX}")]
    TooLarge(usize),
    /// Not a protobuf `saferchat.envelope.v1.Envelope`.
    #[error("envelope does not decode: {0}")]
    Decode(String),
    /// A version this build does not speak.
    #[error("unsupported envelope version {0} (this server speaks {VERSION})")]
    Version(u32),
    /// The room name is invalid.
    #[error("envelope room: {0}")]
    Room(saferchat_vocabulary::ParseError),
    /// The sender or a recipient handle is invalid.
    #[error("envelope {field}: {source}")]
    Handle {
        /// Which field.
        field: &'static str,
        /// Why.
        source: saferchat_vocabulary::ParseError,
    },
    /// The nonce is not 12 bytes.
    #[error("nonce must be {NONCE_BYTES} bytes")]
    Nonce,
    /// The body is empty (the ciphertext is only a tag, or shorter).
    #[error("message is empty")]
    Empty,
    /// The body is larger than [`PLAINTEXT_BYTES_MAX`].
    #[error("message body is larger than {PLAINTEXT_BYTES_MAX} bytes")]
    BodyTooLarge,
    /// No wrapped keys.
    #[error("envelope wraps the content key for nobody")]
    NoKeys,
    /// More wrapped keys than a room can have members.
    #[error(
        "envelope wraps the key for more than {} members",
        saferchat_vocabulary::ROOM_MEMBERS_MAX
    )]
    TooManyKeys,
    /// Recipients are not in strictly increasing handle order.
    #[error("wrapped keys must be sorted by recipient handle without duplicates")]
    KeysOrder,
    /// A wrapped key or the signature has an impossible length.
    #[error("{0} must be 1 to {RSA_OUTPUT_BYTES_MAX} bytes")]
    RsaLength(&'static str),
    /// The Merkle audit path does not fit the tree (sealed envelopes).
    #[error("the key's Merkle audit path is invalid")]
    Path,
}

/// One wrapped content key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WrappedKey {
    /// Who can unwrap it.
    pub recipient: Handle,
    /// RSA-OAEP ciphertext of the content key.
    pub wrapped: Bytes,
}

/// A decoded, structurally valid v1 envelope.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Envelope {
    /// The room posted to.
    pub room: RoomId,
    /// Who posted.
    pub sender: Handle,
    /// The membership revision the keys were wrapped for.
    pub revision: Revision,
    /// AES-GCM nonce.
    pub nonce: [u8; NONCE_BYTES],
    /// AES-GCM ciphertext with tag.
    pub ciphertext: Bytes,
    /// Wrapped content keys in strictly increasing recipient order.
    pub keys: Vec<WrappedKey>,
    /// RSA-PSS signature over [`signing_input`].
    pub signature: Bytes,
}

fn check_rsa_len(bytes: &[u8], what: &'static str) -> Result<(), EnvelopeError> {
    if bytes.is_empty() || bytes.len() > RSA_OUTPUT_BYTES_MAX {
        return Err(EnvelopeError::RsaLength(what));
    }
    Ok(())
}

fn parse_handle(text: &str, field: &'static str) -> Result<Handle, EnvelopeError> {
    text.parse()
        .map_err(|source| EnvelopeError::Handle { field, source })
}

/// Checks what every envelope-like message shares: version, room, sender,
/// nonce, ciphertext size, signature size.
pub(crate) fn check_header(
    version: u32,
    room: &str,
    sender: &str,
    nonce: &[u8],
    ciphertext: &[u8],
    signature: &[u8],
) -> Result<(RoomId, Handle, [u8; NONCE_BYTES]), EnvelopeError> {
    if version != VERSION {
        return Err(EnvelopeError::Version(version));
    }
    let room = RoomId::new(room).map_err(EnvelopeError::Room)?;
    let sender = parse_handle(sender, "sender")?;
    let nonce: [u8; NONCE_BYTES] = nonce.try_into().map_err(|_| EnvelopeError::Nonce)?;
    if ciphertext.len() <= TAG_BYTES {
        return Err(EnvelopeError::Empty);
    }
    if ciphertext.len() > CIPHERTEXT_BYTES_MAX {
        return Err(EnvelopeError::BodyTooLarge);
    }
    check_rsa_len(signature, "signature")?;
    Ok((room, sender, nonce))
}

impl Envelope {
    /// Decodes and validates the structure of an envelope. Says nothing
    /// about membership or the signature.
    ///
    /// # Errors
    /// The first [`EnvelopeError`] found.
    pub fn decode(bytes: Bytes) -> Result<Envelope, EnvelopeError> {
        if bytes.len() > ENVELOPE_BYTES_MAX {
            return Err(EnvelopeError::TooLarge(bytes.len()));
        }
        let wire = pb::Envelope::decode(bytes).map_err(|e| EnvelopeError::Decode(e.to_string()))?;
        let (room, sender, nonce) = check_header(
            wire.version,
            &wire.room,
            &wire.sender,
            &wire.nonce,
            &wire.ciphertext,
            &wire.signature,
        )?;
        if wire.keys.is_empty() {
            return Err(EnvelopeError::NoKeys);
        }
        if wire.keys.len() > saferchat_vocabulary::ROOM_MEMBERS_MAX {
            return Err(EnvelopeError::TooManyKeys);
        }
        let mut keys = Vec::with_capacity(wire.keys.len());
        for key in wire.keys {
            let recipient = parse_handle(&key.recipient, "recipient")?;
            check_rsa_len(&key.wrapped, "wrapped key")?;
            if keys
                .last()
                .is_some_and(|prev: &WrappedKey| prev.recipient >= recipient)
            {
                return Err(EnvelopeError::KeysOrder);
            }
            keys.push(WrappedKey {
                recipient,
                wrapped: key.wrapped,
            });
        }
        Ok(Envelope {
            room,
            sender,
            revision: Revision(wire.revision),
            nonce,
            ciphertext: wire.ciphertext,
            keys,
            signature: wire.signature,
        })
    }

    /// Encodes the envelope.
    pub fn encode(&self) -> Bytes {
        let wire = pb::Envelope {
            version: VERSION,
            room: self.room.to_string(),
            sender: self.sender.to_string(),
            revision: self.revision.0,
            nonce: Bytes::copy_from_slice(&self.nonce),
            ciphertext: self.ciphertext.clone(),
            keys: self
                .keys
                .iter()
                .map(|k| pb::WrappedKey {
                    recipient: k.recipient.to_string(),
                    wrapped: k.wrapped.clone(),
                })
                .collect(),
            signature: self.signature.clone(),
        };
        Bytes::from(wire.encode_to_vec())
    }

    /// The Merkle tree over the wrapped keys.
    pub fn key_tree(&self) -> merkle::Tree {
        let leaves: Vec<_> = self
            .keys
            .iter()
            .map(|k| merkle::leaf_hash(k.recipient.as_bytes(), &k.wrapped))
            .collect();
        merkle::Tree::new(&leaves)
    }

    /// What the sender signed.
    pub fn signing_input(&self) -> Vec<u8> {
        signing_input(
            &self.room,
            &self.sender,
            self.revision,
            &self.nonce,
            &self.ciphertext,
            self.keys.len(),
            &self.key_tree().root(),
        )
    }
}

/// The bytes an envelope's RSA-PSS signature covers:
///
/// ```text
/// "saferchat/envelope/v1\0"
/// ‖ u16 len ‖ room ‖ sender handle (32 bytes) ‖ u64 revision
/// ‖ nonce (12) ‖ SHA-256(ciphertext) ‖ u32 key count ‖ Merkle root (32)
/// ```
///
/// Integers are big-endian. Everything that identifies the message is
/// covered; the wrapped keys through the root.
pub fn signing_input(
    room: &RoomId,
    sender: &Handle,
    revision: Revision,
    nonce: &[u8; NONCE_BYTES],
    ciphertext: &[u8],
    key_count: usize,
    root: &merkle::Hash,
) -> Vec<u8> {
    let room = room.as_str().as_bytes();
    let mut out =
        Vec::with_capacity(SIGNING_DOMAIN.len() + 2 + room.len() + 32 + 8 + 12 + 32 + 4 + 32);
    out.extend_from_slice(SIGNING_DOMAIN);
    out.extend_from_slice(
        &u16::try_from(room.len())
            .expect("room names are short")
            .to_be_bytes(),
    );
    out.extend_from_slice(room);
    out.extend_from_slice(sender.as_bytes());
    out.extend_from_slice(&revision.0.to_be_bytes());
    out.extend_from_slice(nonce);
    out.extend_from_slice(&Sha256::digest(ciphertext));
    out.extend_from_slice(
        &u32::try_from(key_count)
            .expect("key count fits u32")
            .to_be_bytes(),
    );
    out.extend_from_slice(root);
    out
}

/// The AES-GCM associated data of a body: binds the ciphertext to its
/// room, sender and revision.
pub fn associated_data(room: &RoomId, sender: &Handle, revision: Revision) -> Vec<u8> {
    let room = room.as_str().as_bytes();
    let mut out = Vec::with_capacity(AAD_DOMAIN.len() + 2 + room.len() + 32 + 8);
    out.extend_from_slice(AAD_DOMAIN);
    out.extend_from_slice(
        &u16::try_from(room.len())
            .expect("room names are short")
            .to_be_bytes(),
    );
    out.extend_from_slice(room);
    out.extend_from_slice(sender.as_bytes());
    out.extend_from_slice(&revision.0.to_be_bytes());
    out
}

/// Why a structurally valid envelope may not be posted.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// The envelope names another room than the session's.
    #[error("envelope is for room {envelope}, not {session}")]
    WrongRoom {
        /// The room in the envelope.
        envelope: RoomId,
        /// The session's room.
        session: RoomId,
    },
    /// The envelope's sender is not the session's member.
    #[error("envelope sender is not the session's user")]
    WrongSender,
    /// The sender is no longer a member (or has no key).
    #[error("sender is not a member of the room")]
    NotMember,
    /// Wrapped for another revision than the current one.
    #[error("membership is at revision {current}, the envelope was wrapped for {envelope}")]
    StaleRevision {
        /// The envelope's revision.
        envelope: Revision,
        /// The room's revision.
        current: Revision,
    },
    /// The recipients are not exactly the members with keys.
    #[error(
        "wrapped keys must name exactly the {expected} members with registered keys at revision {current}"
    )]
    Recipients {
        /// How many recipients were expected.
        expected: usize,
        /// The room's revision.
        current: Revision,
    },
}

/// The checks a server makes before accepting a post: the envelope is for
/// this room, from this session's member, who is a member with a key, at
/// the current revision, wrapped for exactly the current recipients.
///
/// `state` is any [`Membership`] (on the node, the consensus crate's
/// `RoomState`), so that this crate need not depend on Paxos.
///
/// # Errors
/// The [`Refusal`]; `StaleRevision` and `Recipients` mean "re-wrap for the
/// current membership and retry".
pub fn check_membership<M: Membership>(
    envelope: &Envelope,
    session_room: &RoomId,
    session_user: &Handle,
    state: &M,
) -> Result<(), Refusal> {
    if envelope.room != *session_room {
        return Err(Refusal::WrongRoom {
            envelope: envelope.room.clone(),
            session: session_room.clone(),
        });
    }
    if envelope.sender != *session_user {
        return Err(Refusal::WrongSender);
    }
    if state.key_of(session_user).is_none() {
        return Err(Refusal::NotMember);
    }
    let current = state.revision();
    if envelope.revision != current {
        return Err(Refusal::StaleRevision {
            envelope: envelope.revision,
            current,
        });
    }
    let expected = state.recipients().count();
    let exact = envelope.keys.len() == expected
        && envelope
            .keys
            .iter()
            .zip(state.recipients())
            .all(|(key, (member, _))| key.recipient == *member);
    if !exact {
        return Err(Refusal::Recipients { expected, current });
    }
    Ok(())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use saferchat_vocabulary::PublicKey;
    use std::collections::BTreeMap;

    pub(crate) fn handle(n: u8) -> Handle {
        Handle::of_modulus(&[n; 256])
    }

    pub(crate) fn sample(recipients: &[Handle]) -> Envelope {
        let mut recipients = recipients.to_vec();
        recipients.sort();
        Envelope {
            room: RoomId::new("aaa").unwrap(),
            sender: recipients[0],
            revision: Revision(7),
            nonce: [3; NONCE_BYTES],
            ciphertext: Bytes::from(vec![9u8; 200 + TAG_BYTES]),
            keys: recipients
                .iter()
                .map(|r| WrappedKey {
                    recipient: *r,
                    wrapped: Bytes::from(vec![r.as_bytes()[0]; 256]),
                })
                .collect(),
            signature: Bytes::from(vec![5u8; 256]),
        }
    }

    /// A membership as the node's `RoomState` holds it (members by
    /// handle, with their key once registered), without the consensus
    /// crate.
    struct Members {
        revision: Revision,
        members: BTreeMap<Handle, Option<PublicKey>>,
    }

    impl Membership for Members {
        fn revision(&self) -> Revision {
            self.revision
        }

        fn key_of(&self, handle: &Handle) -> Option<&PublicKey> {
            self.members.get(handle)?.as_ref()
        }

        fn recipients(&self) -> impl Iterator<Item = (&Handle, &PublicKey)> {
            self.members
                .iter()
                .filter_map(|(handle, key)| key.as_ref().map(|key| (handle, key)))
        }
    }

    fn state_with(recipients: &[Handle], revision: u64) -> Members {
        Members {
            revision: Revision(revision),
            members: recipients
                .iter()
                .map(|r| (*r, Some(PublicKey::new(Bytes::from_static(b"key")))))
                .collect(),
        }
    }

    #[test]
    fn encode_decode_round_trip() {
        let e = sample(&[handle(1), handle(2), handle(3)]);
        assert_eq!(Envelope::decode(e.encode()), Ok(e));
    }

    #[test]
    fn garbage_is_refused_clearly() {
        let garbage = Bytes::from_static(b"\xff\xff\xff\xffnot an envelope at all");
        assert!(matches!(
            Envelope::decode(garbage),
            Err(EnvelopeError::Decode(_))
        ));
        assert_eq!(
            Envelope::decode(Bytes::new()),
            Err(EnvelopeError::Version(0))
        );
    }

    #[test]
    fn structural_errors() {
        let good = sample(&[handle(1), handle(2)]);
        let mut wire = pb::Envelope::decode(good.encode()).unwrap();
        let check = |w: &pb::Envelope| Envelope::decode(Bytes::from(w.encode_to_vec()));

        let mut w = wire.clone();
        w.version = 2;
        assert_eq!(check(&w), Err(EnvelopeError::Version(2)));
        let mut w = wire.clone();
        w.room = "bad room".into();
        assert!(matches!(check(&w), Err(EnvelopeError::Room(_))));
        let mut w = wire.clone();
        w.sender = "nope".into();
        assert!(matches!(
            check(&w),
            Err(EnvelopeError::Handle {
                field: "sender",
                ..
            })
        ));
        let mut w = wire.clone();
        w.nonce = Bytes::from_static(b"short");
        assert_eq!(check(&w), Err(EnvelopeError::Nonce));
        let mut w = wire.clone();
        w.ciphertext = Bytes::from(vec![0; TAG_BYTES]);
        assert_eq!(check(&w), Err(EnvelopeError::Empty));
        let mut w = wire.clone();
        w.ciphertext = Bytes::from(vec![0; CIPHERTEXT_BYTES_MAX + 1]);
        assert_eq!(check(&w), Err(EnvelopeError::BodyTooLarge));
        let mut w = wire.clone();
        w.keys.clear();
        assert_eq!(check(&w), Err(EnvelopeError::NoKeys));
        let mut w = wire.clone();
        w.keys.reverse();
        assert_eq!(check(&w), Err(EnvelopeError::KeysOrder));
        let mut w = wire.clone();
        w.keys[1] = w.keys[0].clone();
        assert_eq!(check(&w), Err(EnvelopeError::KeysOrder));
        let mut w = wire.clone();
        w.keys[0].wrapped = Bytes::new();
        assert_eq!(check(&w), Err(EnvelopeError::RsaLength("wrapped key")));
        wire.signature = Bytes::from(vec![0; RSA_OUTPUT_BYTES_MAX + 1]);
        assert_eq!(check(&wire), Err(EnvelopeError::RsaLength("signature")));
        assert_eq!(
            Envelope::decode(Bytes::from(vec![0; ENVELOPE_BYTES_MAX + 1])),
            Err(EnvelopeError::TooLarge(ENVELOPE_BYTES_MAX + 1))
        );
    }

    #[test]
    fn the_signature_covers_every_field() {
        let e = sample(&[handle(1), handle(2)]);
        let base = e.signing_input();
        let mut variants = Vec::new();
        let mut v = e.clone();
        v.room = RoomId::new("aab").unwrap();
        variants.push(v);
        let mut v = e.clone();
        v.sender = handle(2);
        variants.push(v);
        let mut v = e.clone();
        v.revision = Revision(8);
        variants.push(v);
        let mut v = e.clone();
        v.nonce[0] ^= 1;
        variants.push(v);
        let mut v = e.clone();
        v.ciphertext = Bytes::from(vec![8u8; 216]);
        variants.push(v);
        let mut v = e.clone();
        v.keys[1].wrapped = Bytes::from(vec![0u8; 256]);
        variants.push(v);
        let mut v = e.clone();
        v.keys.pop();
        variants.push(v);
        for v in variants {
            assert_ne!(v.signing_input(), base);
        }
    }

    #[test]
    fn membership_checks() {
        let (a, b, c) = (handle(1), handle(2), handle(3));
        let e = sample(&[a, b]);
        let room = e.room.clone();
        let sender = e.sender;
        assert_eq!(
            check_membership(&e, &room, &sender, &state_with(&[a, b], 7)),
            Ok(())
        );
        assert_eq!(
            check_membership(
                &e,
                &RoomId::new("zzz").unwrap(),
                &sender,
                &state_with(&[a, b], 7)
            ),
            Err(Refusal::WrongRoom {
                envelope: room.clone(),
                session: RoomId::new("zzz").unwrap()
            })
        );
        let other = if sender == a { b } else { a };
        assert_eq!(
            check_membership(&e, &room, &other, &state_with(&[a, b], 7)),
            Err(Refusal::WrongSender)
        );
        let without_sender: Vec<_> = [a, b, c].into_iter().filter(|h| *h != sender).collect();
        assert_eq!(
            check_membership(&e, &room, &sender, &state_with(&without_sender, 7)),
            Err(Refusal::NotMember)
        );
        assert_eq!(
            check_membership(&e, &room, &sender, &state_with(&[a, b], 8)),
            Err(Refusal::StaleRevision {
                envelope: Revision(7),
                current: Revision(8)
            })
        );
        assert_eq!(
            check_membership(&e, &room, &sender, &state_with(&[a, b, c], 7)),
            Err(Refusal::Recipients {
                expected: 3,
                current: Revision(7)
            })
        );
        // A member without a key is not a recipient.
        let mut s = state_with(&[a, b], 7);
        s.members.insert(c, None);
        assert_eq!(check_membership(&e, &room, &sender, &s), Ok(()));
    }
}
