//! What one recipient receives: the envelope with only its own wrapped key
//! and the Merkle audit path that ties that key to the signed root.

use bytes::{Bytes, BytesMut};
use prost::Message as _;
use saferchat_proto::envelope as pb;
use saferchat_vocabulary::{Handle, Revision, RoomId};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;

use crate::merkle::{self, Hash, PATH_HASHES_MAX};
use crate::{
    Chain, Envelope, EnvelopeError, NONCE_BYTES, WrappedKey, check_header, parse_chain,
    signing_input, wire_chain,
};

/// Precomputed per-message state for delivering one envelope to many
/// recipients cheaply.
///
/// Protobuf lets two encodings be concatenated into the encoding of one
/// message with the fields of both, so the part every recipient shares
/// (header, ciphertext, signature, key count) is encoded once and each
/// delivery appends only its key index, wrapped key and audit path.
#[derive(Clone, Debug)]
pub struct Fanout {
    shared: Bytes,
    tree: merkle::Tree,
    keys: Vec<WrappedKey>,
}

impl Fanout {
    /// Prepares the fan-out of a validated envelope.
    pub fn new(envelope: &Envelope) -> Fanout {
        let chain = envelope.chain;
        let field = |f: fn(&crate::Chain) -> &[u8]| {
            chain
                .as_ref()
                .map(|c| Bytes::copy_from_slice(f(c)))
                .unwrap_or_default()
        };
        let shared = pb::Sealed {
            version: envelope.version(),
            room: envelope.room.to_string(),
            sender: envelope.sender.to_string(),
            revision: envelope.revision.0,
            nonce: Bytes::copy_from_slice(&envelope.nonce),
            ciphertext: envelope.ciphertext.clone(),
            signature: envelope.signature.clone(),
            key_count: u32::try_from(envelope.keys.len()).expect("bounded key count"),
            device: field(|c| &c.device),
            device_seq: chain.map_or(0, |c| c.seq),
            prev_hash: field(|c| &c.prev),
            sent_at_ms: chain.map_or(0, |c| c.sent_at_ms),
            membership_hash: field(|c| &c.membership),
            key_commitment: field(|c| &c.key_commitment),
            ..pb::Sealed::default()
        };
        Fanout {
            shared: Bytes::from(shared.encode_to_vec()),
            tree: envelope.key_tree(),
            keys: envelope.keys.clone(),
        }
    }

    /// The position of `recipient` among the wrapped keys.
    pub fn index_of(&self, recipient: &Handle) -> Option<usize> {
        self.keys
            .binary_search_by(|k| k.recipient.cmp(recipient))
            .ok()
    }

    /// The encoded `Sealed` for the recipient at `index`.
    ///
    /// # Panics
    /// If `index` is out of range.
    pub fn sealed_for(&self, index: usize) -> Bytes {
        use prost::encoding::{WireType, encode_key, encode_varint, encoded_len_varint, key_len};
        // The tail is encoded by hand (fields 10-12 of `Sealed`) into one
        // exactly sized buffer: this runs once per delivery, and building
        // a `Sealed` value cost nine allocations. `tail_matches_prost`
        // below checks the bytes against prost's own encoding.
        let key = &self.keys[index];
        let mut handle = [0u8; saferchat_vocabulary::HANDLE_CHARS];
        let written = URL_SAFE_NO_PAD
            .encode_slice(key.recipient.as_bytes(), &mut handle)
            .expect("a handle is 43 characters");
        debug_assert_eq!(written, handle.len());
        let mut path = [&[0u8; 32]; PATH_HASHES_MAX];
        let depth = self.tree.path_into(index, &mut path);
        let key_index = u64::try_from(index).expect("bounded key count");

        let wrapped_len = key.wrapped.len() as u64;
        let key_message_len = key_len(1)
            + encoded_len_varint(handle.len() as u64)
            + handle.len()
            + key_len(2)
            + encoded_len_varint(wrapped_len)
            + key.wrapped.len();
        let tail_len = key_len(10)
            + encoded_len_varint(key_index)
            + key_len(11)
            + encoded_len_varint(key_message_len as u64)
            + key_message_len
            + depth * (key_len(12) + encoded_len_varint(32) + 32);

        let mut out = BytesMut::with_capacity(self.shared.len() + tail_len);
        out.extend_from_slice(&self.shared);
        encode_key(10, WireType::Varint, &mut out);
        encode_varint(key_index, &mut out);
        encode_key(11, WireType::LengthDelimited, &mut out);
        encode_varint(key_message_len as u64, &mut out);
        encode_key(1, WireType::LengthDelimited, &mut out);
        encode_varint(handle.len() as u64, &mut out);
        out.extend_from_slice(&handle);
        encode_key(2, WireType::LengthDelimited, &mut out);
        encode_varint(wrapped_len, &mut out);
        out.extend_from_slice(&key.wrapped);
        for hash in &path[..depth] {
            encode_key(12, WireType::LengthDelimited, &mut out);
            encode_varint(32, &mut out);
            out.extend_from_slice(*hash);
        }
        debug_assert_eq!(out.len(), self.shared.len() + tail_len);
        out.freeze()
    }

    /// The encoded `Sealed` for `recipient`, if the envelope wraps for it.
    pub fn sealed_for_recipient(&self, recipient: &Handle) -> Option<Bytes> {
        self.index_of(recipient).map(|i| self.sealed_for(i))
    }
}

/// A structurally valid sealed envelope, with the signing input it claims.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Opened {
    /// The room.
    pub room: RoomId,
    /// Who posted.
    pub sender: Handle,
    /// The revision the keys were wrapped for.
    pub revision: Revision,
    /// AES-GCM nonce.
    pub nonce: [u8; NONCE_BYTES],
    /// AES-GCM ciphertext with tag.
    pub ciphertext: Bytes,
    /// This recipient's wrapped content key.
    pub wrapped: Bytes,
    /// The sender's signature.
    pub signature: Bytes,
    /// What the signature must verify over, with the root recomputed from
    /// this recipient's leaf and audit path.
    pub signing_input: Vec<u8>,
    /// v1.1: the sender's stream, membership hash and key commitment.
    pub chain: Option<Chain>,
}

/// Decodes a sealed envelope meant for `me` and recomputes what its
/// signature must cover. The caller still has to verify the signature
/// (with the sender's key from the membership) and decrypt.
///
/// # Errors
/// [`EnvelopeError`] when the bytes do not decode, a field is invalid, the
/// key is for someone else, or the audit path does not fit.
pub fn open(bytes: Bytes, me: &Handle) -> Result<Opened, EnvelopeError> {
    let wire = pb::Sealed::decode(bytes).map_err(|e| EnvelopeError::Decode(e.to_string()))?;
    let chain = parse_chain(wire.version, &wire_chain!(wire))?;
    let (room, sender, nonce) = check_header(
        wire.version,
        &wire.room,
        &wire.sender,
        &wire.nonce,
        &wire.ciphertext,
        &wire.signature,
    )?;
    let key = wire.key.ok_or(EnvelopeError::NoKeys)?;
    let recipient: Handle = key
        .recipient
        .parse()
        .map_err(|source| EnvelopeError::Handle {
            field: "recipient",
            source,
        })?;
    if recipient != *me {
        return Err(EnvelopeError::Handle {
            field: "recipient",
            source: saferchat_vocabulary::ParseError::Handle,
        });
    }
    if key.wrapped.is_empty() || key.wrapped.len() > crate::RSA_OUTPUT_BYTES_MAX {
        return Err(EnvelopeError::RsaLength("wrapped key"));
    }
    let count = wire.key_count as usize;
    if count == 0 || count > saferchat_vocabulary::ROOM_MEMBERS_MAX {
        return Err(EnvelopeError::Path);
    }
    if wire.proof.len() > PATH_HASHES_MAX {
        return Err(EnvelopeError::Path);
    }
    let path: Vec<Hash> = wire
        .proof
        .iter()
        .map(|h| <Hash>::try_from(h.as_ref()).map_err(|_| EnvelopeError::Path))
        .collect::<Result<_, _>>()?;
    let leaf = merkle::leaf_hash(recipient.as_bytes(), &key.wrapped);
    let root = merkle::root_from_path(leaf, wire.key_index as usize, count, &path)
        .ok_or(EnvelopeError::Path)?;
    let revision = Revision(wire.revision);
    let signing_input = signing_input(
        &room,
        &sender,
        revision,
        &nonce,
        &wire.ciphertext,
        count,
        &root,
        chain.as_ref(),
    );
    Ok(Opened {
        room,
        sender,
        revision,
        nonce,
        ciphertext: wire.ciphertext,
        wrapped: key.wrapped,
        signature: wire.signature,
        signing_input,
        chain,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tests::{handle, sample, sample_v1};

    #[test]
    fn every_recipient_recomputes_the_signed_input() {
        let recipients: Vec<_> = (1..=13).map(handle).collect();
        for envelope in [sample(&recipients), sample_v1(&recipients)] {
            every_recipient_recomputes(&recipients, &envelope);
        }
    }

    fn every_recipient_recomputes(recipients: &[Handle], envelope: &Envelope) {
        let expected = envelope.signing_input();
        let fanout = Fanout::new(envelope);
        for r in recipients {
            let sealed = fanout.sealed_for_recipient(r).unwrap();
            let opened = open(sealed, r).unwrap();
            assert_eq!(opened.signing_input, expected);
            assert_eq!(opened.chain, envelope.chain);
            assert_eq!(opened.sender, envelope.sender);
            assert_eq!(opened.ciphertext, envelope.ciphertext);
            let i = fanout.index_of(r).unwrap();
            assert_eq!(opened.wrapped, envelope.keys[i].wrapped);
        }
        assert_eq!(fanout.sealed_for_recipient(&handle(99)), None);
    }

    #[test]
    fn tail_matches_prost() {
        // The hand-written encoding must equal prost's, for every position
        // (including key index 0, which prost leaves out: both decode the
        // same, and we compare decoded values).
        for n in [1u8, 2, 3, 7, 100] {
            let recipients: Vec<_> = (1..=n).map(handle).collect();
            let envelope = sample(&recipients);
            let fanout = Fanout::new(&envelope);
            for (i, k) in envelope.keys.iter().enumerate() {
                let ours = pb::Sealed::decode(fanout.sealed_for(i)).unwrap();
                let chain = envelope.chain.unwrap();
                let expected = pb::Sealed {
                    version: crate::VERSION_1_1,
                    room: envelope.room.to_string(),
                    sender: envelope.sender.to_string(),
                    revision: envelope.revision.0,
                    nonce: Bytes::copy_from_slice(&envelope.nonce),
                    ciphertext: envelope.ciphertext.clone(),
                    signature: envelope.signature.clone(),
                    key_count: u32::from(n),
                    key_index: u32::try_from(i).unwrap(),
                    key: Some(pb::WrappedKey {
                        recipient: k.recipient.to_string(),
                        wrapped: k.wrapped.clone(),
                    }),
                    proof: fanout
                        .tree
                        .path(i)
                        .into_iter()
                        .map(|h| Bytes::copy_from_slice(&h))
                        .collect(),
                    device: Bytes::copy_from_slice(&chain.device),
                    device_seq: chain.seq,
                    prev_hash: Bytes::copy_from_slice(&chain.prev),
                    sent_at_ms: chain.sent_at_ms,
                    membership_hash: Bytes::copy_from_slice(&chain.membership),
                    key_commitment: Bytes::copy_from_slice(&chain.key_commitment),
                };
                assert_eq!(ours, expected, "n={n} i={i}");
            }
        }
    }

    #[test]
    fn a_tampered_delivery_changes_the_signed_input() {
        let recipients: Vec<_> = (1..=5).map(handle).collect();
        let envelope = sample(&recipients);
        let expected = envelope.signing_input();
        let fanout = Fanout::new(&envelope);
        let me = recipients[2];
        let mut wire = pb::Sealed::decode(fanout.sealed_for_recipient(&me).unwrap()).unwrap();
        wire.key.as_mut().unwrap().wrapped = Bytes::from(vec![1u8; 256]);
        let opened = open(Bytes::from(wire.encode_to_vec()), &me).unwrap();
        assert_ne!(
            opened.signing_input, expected,
            "a swapped wrapped key must break the signature"
        );

        let mut wire = pb::Sealed::decode(fanout.sealed_for_recipient(&me).unwrap()).unwrap();
        wire.key_count = 4;
        assert!(
            open(Bytes::from(wire.encode_to_vec()), &me)
                .map(|o| o.signing_input != expected)
                .unwrap_or(true)
        );

        let sealed = fanout.sealed_for_recipient(&me).unwrap();
        assert!(
            open(sealed, &recipients[0]).is_err(),
            "a key for someone else is refused"
        );
        assert!(open(Bytes::from_static(b"\x08\x01garbage"), &me).is_err());
    }
}
