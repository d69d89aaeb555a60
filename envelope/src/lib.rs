//! Message envelopes v1 and v1.1: the bytes a sender posts and a recipient
//! receives.
//!
//! # Layout
//!
//! - this file: the [`Envelope`] a sender posts, its limits, decoding with
//!   validation, the [`signing_input`], and [`check_membership`], the
//!   checks a server can make without any key;
//! - [`merkle`]: the tree over wrapped keys whose root the sender signs;
//! - [`chain`]: what v1.1 adds (the sender's device stream, the
//!   membership hash, the key commitment, the OAEP label);
//! - [`challenge`]: what a joining member signs;
//! - [`sealed`]: what one recipient receives ([`sealed::Fanout`] builds it
//!   on the server, [`sealed::open`] checks its structure on the client).
//!
//! # The construction (normative)
//!
//! 1. A fresh 256-bit content key and a 96-bit nonce encrypt the body once
//!    with AES-256-GCM; the associated data is [`associated_data`] (room,
//!    sender, revision; in v1.1 also the device and its sequence number),
//!    so a ciphertext cannot be replayed under another header.
//! 2. The content key is wrapped for every member that has a registered key
//!    at `revision` with RSA-OAEP (SHA-256, MGF1-SHA-256; the label is
//!    empty in v1 and [`chain::oaep_label`] in v1.1); keys are listed in
//!    handle order.
//! 3. Leaves `SHA-256(0x00 ‖ handle ‖ wrapped)` form an RFC 6962 tree.
//! 4. The sender signs [`signing_input`] with RSA-PSS (SHA-256, salt 32);
//!    in v1.1 it also covers the [`chain::Chain`].
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

pub mod chain;
pub mod challenge;
pub mod merkle;
pub mod sealed;

use bytes::Bytes;
use prost::Message as _;
use saferchat_proto::envelope as pb;
use saferchat_vocabulary::{Handle, Membership, Revision, RoomId};
use sha2::{Digest, Sha256};

pub use chain::Chain;

/// The wire version of envelope v1.
pub const VERSION: u32 = 1;
/// The wire version of envelope v1.1.
pub const VERSION_1_1: u32 = 2;
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
/// The same, for v1.1.
const SIGNING_DOMAIN_1_1: &[u8] = b"saferchat/envelope/v1.1\0";
/// The same, for v1.1.
const AAD_DOMAIN_1_1: &[u8] = b"saferchat/body/v1.1\0";

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
    #[error("unsupported envelope version {0} (this build speaks {VERSION} and {VERSION_1_1})")]
    Version(u32),
    /// A v1.1 field is malformed, or a v1 envelope carries one.
    #[error("envelope {0}")]
    Chain(&'static str),
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
    /// v1.1: the sender's stream, membership hash and key commitment;
    /// `None` for v1.
    pub chain: Option<Chain>,
}

/// The v1.1 fields as they arrive, before [`parse_chain`].
pub(crate) struct WireChain<'a> {
    pub(crate) device: &'a [u8],
    pub(crate) seq: u64,
    pub(crate) prev: &'a [u8],
    pub(crate) sent_at_ms: u64,
    pub(crate) membership: &'a [u8],
    pub(crate) key_commitment: &'a [u8],
}

/// The v1.1 fields of a `pb::Envelope` or `pb::Sealed` (the same names in
/// both messages) as a [`WireChain`].
macro_rules! wire_chain {
    ($wire:expr) => {
        $crate::WireChain {
            device: &$wire.device,
            seq: $wire.device_seq,
            prev: &$wire.prev_hash,
            sent_at_ms: $wire.sent_at_ms,
            membership: &$wire.membership_hash,
            key_commitment: &$wire.key_commitment,
        }
    };
}
pub(crate) use wire_chain;

/// The chain of a `version` envelope: none in v1 (where every v1.1 field
/// must be absent), checked in v1.1.
pub(crate) fn parse_chain(version: u32, w: &WireChain<'_>) -> Result<Option<Chain>, EnvelopeError> {
    if version != VERSION && version != VERSION_1_1 {
        return Err(EnvelopeError::Version(version));
    }
    if version == VERSION {
        let absent = w.device.is_empty()
            && w.seq == 0
            && w.prev.is_empty()
            && w.sent_at_ms == 0
            && w.membership.is_empty()
            && w.key_commitment.is_empty();
        return if absent {
            Ok(None)
        } else {
            Err(EnvelopeError::Chain("v1 carries v1.1 fields"))
        };
    }
    let device = w
        .device
        .try_into()
        .map_err(|_| EnvelopeError::Chain("device must be 16 bytes"))?;
    let hash = |bytes: &[u8], what| -> Result<chain::Hash, EnvelopeError> {
        bytes.try_into().map_err(|_| EnvelopeError::Chain(what))
    };
    let prev = hash(w.prev, "prev_hash must be 32 bytes")?;
    if w.seq == 0 {
        return Err(EnvelopeError::Chain("device_seq starts at 1"));
    }
    if (w.seq == 1) != (prev == chain::NO_PREVIOUS) {
        return Err(EnvelopeError::Chain(
            "prev_hash is 32 zero bytes exactly when device_seq is 1",
        ));
    }
    Ok(Some(Chain {
        device,
        seq: w.seq,
        prev,
        sent_at_ms: w.sent_at_ms,
        membership: hash(w.membership, "membership_hash must be 32 bytes")?,
        key_commitment: hash(w.key_commitment, "key_commitment must be 32 bytes")?,
    }))
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
    if version != VERSION && version != VERSION_1_1 {
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
        let chain = parse_chain(wire.version, &wire_chain!(wire))?;
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
            chain,
        })
    }

    /// The wire version: [`VERSION`] or [`VERSION_1_1`].
    pub fn version(&self) -> u32 {
        if self.chain.is_some() {
            VERSION_1_1
        } else {
            VERSION
        }
    }

    /// Encodes the envelope.
    pub fn encode(&self) -> Bytes {
        let chain = self.chain.unwrap_or(Chain {
            device: [0; chain::DEVICE_BYTES],
            seq: 0,
            prev: [0; 32],
            sent_at_ms: 0,
            membership: [0; 32],
            key_commitment: [0; 32],
        });
        let v1_1 = self.chain.is_some();
        let bytes = |b: &[u8]| {
            if v1_1 {
                Bytes::copy_from_slice(b)
            } else {
                Bytes::new()
            }
        };
        let wire = pb::Envelope {
            version: self.version(),
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
            device: bytes(&chain.device),
            device_seq: chain.seq,
            prev_hash: bytes(&chain.prev),
            sent_at_ms: chain.sent_at_ms,
            membership_hash: bytes(&chain.membership),
            key_commitment: bytes(&chain.key_commitment),
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
            self.chain.as_ref(),
        )
    }
}

/// The bytes an envelope's RSA-PSS signature covers:
///
/// ```text
/// "saferchat/envelope/v1\0"   (v1.1: "saferchat/envelope/v1.1\0")
/// ‖ u16 len ‖ room ‖ sender handle (32 bytes) ‖ u64 revision
/// ‖ nonce (12) ‖ SHA-256(ciphertext) ‖ u32 key count ‖ Merkle root (32)
/// v1.1 only:
/// ‖ device (16) ‖ u64 device_seq ‖ prev_hash (32) ‖ u64 sent_at_ms
/// ‖ membership_hash (32) ‖ key_commitment (32)
/// ```
///
/// Integers are big-endian. Everything that identifies the message is
/// covered; the wrapped keys through the root.
#[allow(clippy::too_many_arguments)] // each is one field of the layout above
pub fn signing_input(
    room: &RoomId,
    sender: &Handle,
    revision: Revision,
    nonce: &[u8; NONCE_BYTES],
    ciphertext: &[u8],
    key_count: usize,
    root: &merkle::Hash,
    chain: Option<&Chain>,
) -> Vec<u8> {
    let mut out =
        Vec::with_capacity(SIGNING_DOMAIN_1_1.len() + 2 + 64 + 32 + 8 + 12 + 32 + 4 + 32 + 160);
    out.extend_from_slice(if chain.is_some() {
        SIGNING_DOMAIN_1_1
    } else {
        SIGNING_DOMAIN
    });
    chain::put_room(&mut out, room);
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
    if let Some(c) = chain {
        out.extend_from_slice(&c.device);
        out.extend_from_slice(&c.seq.to_be_bytes());
        out.extend_from_slice(&c.prev);
        out.extend_from_slice(&c.sent_at_ms.to_be_bytes());
        out.extend_from_slice(&c.membership);
        out.extend_from_slice(&c.key_commitment);
    }
    out
}

/// The AES-GCM associated data of a body: binds the ciphertext to its
/// room, sender and revision, and in v1.1 to its place in the sender's
/// stream:
///
/// ```text
/// "saferchat/body/v1\0" ‖ u16 len ‖ room ‖ sender (32) ‖ u64 revision
/// v1.1: "saferchat/body/v1.1\0" ‖ … the same … ‖ device (16) ‖ u64 device_seq
/// ```
pub fn associated_data(
    room: &RoomId,
    sender: &Handle,
    revision: Revision,
    chain: Option<&Chain>,
) -> Vec<u8> {
    let mut out = Vec::with_capacity(AAD_DOMAIN_1_1.len() + 2 + 64 + 32 + 8 + 24);
    out.extend_from_slice(if chain.is_some() {
        AAD_DOMAIN_1_1
    } else {
        AAD_DOMAIN
    });
    chain::put_room(&mut out, room);
    out.extend_from_slice(sender.as_bytes());
    out.extend_from_slice(&revision.0.to_be_bytes());
    if let Some(c) = chain {
        out.extend_from_slice(&c.device);
        out.extend_from_slice(&c.seq.to_be_bytes());
    }
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
            chain: Some(Chain {
                device: [4; chain::DEVICE_BYTES],
                seq: 5,
                prev: [6; 32],
                sent_at_ms: 1_700_000_000_000,
                membership: [7; 32],
                key_commitment: [8; 32],
            }),
        }
    }

    pub(crate) fn sample_v1(recipients: &[Handle]) -> Envelope {
        Envelope {
            chain: None,
            ..sample(recipients)
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
        assert_eq!(e.version(), VERSION_1_1);
        assert_eq!(Envelope::decode(e.encode()), Ok(e));
        let v1 = sample_v1(&[handle(1), handle(2), handle(3)]);
        assert_eq!(v1.version(), VERSION);
        assert_eq!(Envelope::decode(v1.encode()), Ok(v1));
    }

    #[test]
    fn v1_1_fields_are_checked_and_v1_carries_none() {
        let good = sample(&[handle(1), handle(2)]);
        let wire = pb::Envelope::decode(good.encode()).unwrap();
        let check = |w: &pb::Envelope| Envelope::decode(Bytes::from(w.encode_to_vec()));
        let refused = |w: &pb::Envelope| matches!(check(w), Err(EnvelopeError::Chain(_)));
        let mut w = wire.clone();
        w.device = Bytes::from_static(b"short");
        assert!(refused(&w));
        let mut w = wire.clone();
        w.device_seq = 0;
        assert!(refused(&w));
        let mut w = wire.clone();
        w.device_seq = 1;
        assert!(refused(&w), "seq 1 names no previous message");
        w.prev_hash = Bytes::from(vec![0; 32]);
        assert!(check(&w).is_ok());
        w.device_seq = 2;
        assert!(refused(&w), "only seq 1 has no previous message");
        let mut w = wire.clone();
        w.membership_hash = Bytes::new();
        assert!(refused(&w));
        let mut w = wire.clone();
        w.key_commitment = Bytes::from(vec![1; 31]);
        assert!(refused(&w));
        let mut w = wire.clone();
        w.version = VERSION;
        assert!(refused(&w), "a v1 envelope with v1.1 fields");
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
        w.version = 3;
        assert_eq!(check(&w), Err(EnvelopeError::Version(3)));
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
        let chained = |f: fn(&mut Chain)| {
            let mut v = e.clone();
            f(v.chain.as_mut().unwrap());
            v
        };
        variants.push(chained(|c| c.device[0] ^= 1));
        variants.push(chained(|c| c.seq += 1));
        variants.push(chained(|c| c.prev[0] ^= 1));
        variants.push(chained(|c| c.sent_at_ms += 1));
        variants.push(chained(|c| c.membership[0] ^= 1));
        variants.push(chained(|c| c.key_commitment[0] ^= 1));
        variants.push(Envelope {
            chain: None,
            ..e.clone()
        });
        for v in variants {
            assert_ne!(v.signing_input(), base);
        }
        let chain = e.chain.as_ref();
        assert_ne!(
            associated_data(&e.room, &e.sender, e.revision, chain),
            associated_data(&e.room, &e.sender, e.revision, None)
        );
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
