//! End-to-end encryption of one message (envelope v1.1; v1 is still
//! opened) and its opening.
//!
//! See `saferchat_envelope` for the normative construction. This module
//! adds the keys: AES-256-GCM for the body, RSA-OAEP-SHA256 to wrap the
//! content key for every recipient (labelled with room, revision and
//! recipient), RSA-PSS-SHA256 to sign.

use aes_gcm::aead::{Aead, Generate, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Key, Nonce};
use bytes::Bytes;
use rsa::pkcs8::DecodePublicKey;
use rsa::traits::PublicKeyParts;
use saferchat_consensus::{Handle, Revision, RoomId};
use saferchat_envelope::chain::{self, Chain, DEVICE_BYTES, Hash, NO_PREVIOUS};
use saferchat_envelope::sealed::Opened;
use saferchat_envelope::{Envelope, NONCE_BYTES, PLAINTEXT_BYTES_MAX, WrappedKey, associated_data};
use sha2::Sha256;

use crate::error::ClientError;
use crate::keys::Identity;

/// A recipient: a member's handle and the key that hashes to it.
#[derive(Clone, Debug)]
pub struct Recipient {
    /// The member.
    pub handle: Handle,
    /// Their public key.
    pub key: rsa::PublicKey,
    /// The key's bytes as the room registered them (SubjectPublicKeyInfo
    /// DER): what the membership hash covers.
    pub der: Bytes,
}

impl Recipient {
    /// `id` as a recipient.
    pub fn of(id: &Identity) -> Recipient {
        Recipient {
            handle: id.handle(),
            key: id.public_key(),
            der: id.public_der().clone(),
        }
    }
}

/// Where a message goes in its sender's stream (envelope v1.1).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Position {
    /// The sending device.
    pub device: [u8; DEVICE_BYTES],
    /// Its number among the device's messages in the room, from 1.
    pub seq: u64,
    /// The message hash of the device's previous message in the room.
    pub prev: Hash,
}

impl Position {
    /// The first message of a device made for this message alone: for
    /// one-off senders (tools, benchmarks) that keep no device state.
    pub fn one_off() -> Position {
        Position {
            device: rand::random(),
            seq: 1,
            prev: NO_PREVIOUS,
        }
    }
}

/// The membership hash of `recipients` (any order) at `revision`.
pub fn membership_hash(room: &RoomId, revision: Revision, recipients: &[Recipient]) -> Hash {
    let mut sorted: Vec<&Recipient> = recipients.iter().collect();
    sorted.sort_by_key(|r| r.handle);
    sorted.dedup_by_key(|r| r.handle);
    chain::membership_hash(
        room,
        revision,
        sorted.iter().map(|r| (&r.handle, r.der.as_ref())),
    )
}

/// The wall clock, Unix milliseconds (the sender's signed time).
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// Parses a member's SubjectPublicKeyInfo DER and checks that it hashes to
/// the member's handle: a server cannot slip in a key of its own.
///
/// # Errors
/// [`ClientError::Verify`] when the key does not parse or belongs to
/// another handle.
pub fn member_key(handle: &Handle, der: &[u8]) -> Result<rsa::PublicKey, ClientError> {
    let key = rsa::PublicKey::from_public_key_der(der)
        .map_err(|e| ClientError::Verify(format!("member key does not parse: {e}")))?;
    if Handle::of_modulus(&key.n_bytes()) != *handle {
        return Err(ClientError::Verify(format!(
            "the server gave a key for {handle} that does not hash to that handle"
        )));
    }
    Ok(key)
}

/// [`seal_at`] as the one message of a one-off device, sent now.
///
/// # Errors
/// As [`seal_at`].
pub fn seal(
    me: &Identity,
    room: &RoomId,
    revision: Revision,
    recipients: &[Recipient],
    plaintext: &[u8],
) -> Result<Envelope, ClientError> {
    seal_at(
        me,
        room,
        revision,
        recipients,
        plaintext,
        &Position::one_off(),
        now_ms(),
    )
}

/// Encrypts `plaintext` for `recipients` (every member with a key at
/// `revision`, the sender included) as envelope v1.1 at `position` in the
/// sender's stream, and signs it.
///
/// # Errors
/// [`ClientError::Input`] for an empty or oversized body or no
/// recipients; [`ClientError::Crypto`] if a primitive fails.
pub fn seal_at(
    me: &Identity,
    room: &RoomId,
    revision: Revision,
    recipients: &[Recipient],
    plaintext: &[u8],
    position: &Position,
    sent_at_ms: u64,
) -> Result<Envelope, ClientError> {
    if plaintext.is_empty() {
        return Err(ClientError::Input("message is empty".into()));
    }
    if plaintext.len() > PLAINTEXT_BYTES_MAX {
        return Err(ClientError::Input(format!(
            "message is {} bytes; the limit is {PLAINTEXT_BYTES_MAX}",
            plaintext.len()
        )));
    }
    if recipients.is_empty() {
        return Err(ClientError::Input(
            "nobody to send to: no member has joined yet".into(),
        ));
    }
    let content_key = Key::<Aes256Gcm>::generate();
    let nonce = Nonce::generate();
    let chain = Chain {
        device: position.device,
        seq: position.seq,
        prev: position.prev,
        sent_at_ms,
        membership: membership_hash(room, revision, recipients),
        key_commitment: chain::key_commitment(content_key.as_slice()),
    };
    let aad = associated_data(room, &me.handle(), revision, Some(&chain));
    let ciphertext = Aes256Gcm::new(&content_key)
        .encrypt(
            &nonce,
            Payload {
                msg: plaintext,
                aad: &aad,
            },
        )
        .map_err(|_| ClientError::Crypto("AES-GCM encryption failed".into()))?;
    let mut sorted: Vec<&Recipient> = recipients.iter().collect();
    sorted.sort_by_key(|r| r.handle);
    sorted.dedup_by_key(|r| r.handle);
    let mut keys = Vec::with_capacity(sorted.len());
    for r in sorted {
        let label = chain::oaep_label(room, revision, &r.handle);
        let wrapped = r
            .key
            .encrypt(
                &mut rand::rng(),
                rsa::Oaep::<Sha256>::new_with_label(label),
                content_key.as_slice(),
            )
            .map_err(|e| ClientError::Crypto(format!("wrapping the content key: {e}")))?;
        keys.push(WrappedKey {
            recipient: r.handle,
            wrapped: Bytes::from(wrapped),
        });
    }
    let mut envelope = Envelope {
        room: room.clone(),
        sender: me.handle(),
        revision,
        nonce: nonce.as_slice().try_into().expect("96-bit nonce"),
        ciphertext: Bytes::from(ciphertext),
        keys,
        signature: Bytes::new(),
        chain: Some(chain),
    };
    envelope.signature = Bytes::from(me.sign(&envelope.signing_input())?);
    Ok(envelope)
}

/// A verified, decrypted message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Plain {
    /// Who sent it (verified by signature).
    pub sender: Handle,
    /// The body.
    pub body: Vec<u8>,
    /// The membership revision it was sent under.
    pub revision: Revision,
    /// v1.1: its place in the sender's stream, the membership hash the
    /// sender signed, and the sender's own (signed) time; `None` for v1.
    pub chain: Option<Chain>,
    /// Its message hash (SHA-256 of what the sender signed): how the
    /// sender's next message names it.
    pub hash: Hash,
}

/// Checks and decrypts a sealed envelope meant for `me`. `sender_key`
/// returns the key a member registered (keys hash to handles, so any key
/// ever seen for a handle is the right one).
///
/// Nothing is decrypted before the signature verifies.
///
/// # Errors
/// [`ClientError::Verify`] when the structure, the signature, the key
/// unwrap or the authenticated decryption fails, or the sender is unknown.
pub fn open(
    me: &Identity,
    room: &RoomId,
    sealed: Bytes,
    sender_key: impl Fn(&Handle) -> Option<rsa::PublicKey>,
) -> Result<Plain, ClientError> {
    let opened: Opened = saferchat_envelope::sealed::open(sealed, &me.handle())
        .map_err(|e| ClientError::Verify(e.to_string()))?;
    if opened.room != *room {
        return Err(ClientError::Verify(format!(
            "message is for room {}, not {room}",
            opened.room
        )));
    }
    let key = sender_key(&opened.sender)
        .ok_or_else(|| ClientError::Verify(format!("no key known for sender {}", opened.sender)))?;
    key.pss_verify::<Sha256>(&opened.signing_input, &opened.signature)
        .map_err(|_| ClientError::Verify("signature does not verify".into()))?;
    let label = opened
        .chain
        .map(|_| chain::oaep_label(&opened.room, opened.revision, &me.handle()));
    let content_key = me.unwrap_key_labelled(&opened.wrapped, label.as_deref())?;
    if let Some(c) = &opened.chain
        && chain::key_commitment(&content_key) != c.key_commitment
    {
        return Err(ClientError::Verify(
            "the content key does not match the key the sender committed to (a forged wrapped key?)"
                .into(),
        ));
    }
    let nonce: [u8; NONCE_BYTES] = opened.nonce;
    let aad = associated_data(
        &opened.room,
        &opened.sender,
        opened.revision,
        opened.chain.as_ref(),
    );
    let body = Aes256Gcm::new(&Key::<Aes256Gcm>::from(content_key))
        .decrypt(
            &Nonce::from(nonce),
            Payload {
                msg: &opened.ciphertext,
                aad: &aad,
            },
        )
        .map_err(|_| ClientError::Verify("body does not decrypt (tampered?)".into()))?;
    Ok(Plain {
        sender: opened.sender,
        body,
        revision: opened.revision,
        chain: opened.chain,
        hash: chain::message_hash(&opened.signing_input),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_keys;
    use saferchat_envelope::sealed::Fanout;

    fn recipient(id: &Identity) -> Recipient {
        Recipient::of(id)
    }

    #[test]
    fn every_recipient_opens_what_was_sealed() {
        let (alice, bob, carol) = (
            test_keys::identity(0),
            test_keys::identity(1),
            test_keys::identity(2),
        );
        let room = RoomId::new("aaa").unwrap();
        let envelope = seal(
            &alice,
            &room,
            Revision(4),
            &[recipient(&alice), recipient(&bob)],
            b"hello bob",
        )
        .unwrap();
        // Through the wire format, as the server relays it.
        let envelope = Envelope::decode(envelope.encode()).unwrap();
        let fanout = Fanout::new(&envelope);
        let keys = |h: &Handle| (*h == alice.handle()).then(|| alice.public_key());
        for me in [&alice, &bob] {
            let sealed = fanout.sealed_for_recipient(&me.handle()).unwrap();
            let plain = open(me, &room, sealed, keys).unwrap();
            assert_eq!(plain.body, b"hello bob");
            assert_eq!(plain.sender, alice.handle());
            assert_eq!(plain.revision, Revision(4));
        }
        assert!(
            fanout.sealed_for_recipient(&carol.handle()).is_none(),
            "carol was not a recipient"
        );
    }

    #[test]
    fn tampering_is_detected_before_display() {
        let (alice, bob) = (test_keys::identity(0), test_keys::identity(1));
        let room = RoomId::new("aaa").unwrap();
        let keys = |h: &Handle| (*h == alice.handle()).then(|| alice.public_key());
        let envelope = seal(
            &alice,
            &room,
            Revision(1),
            &[recipient(&alice), recipient(&bob)],
            b"pay 10",
        )
        .unwrap();

        let mut tampered = envelope.clone();
        let mut ct = tampered.ciphertext.to_vec();
        ct[0] ^= 1;
        tampered.ciphertext = Bytes::from(ct);
        let sealed = Fanout::new(&tampered)
            .sealed_for_recipient(&bob.handle())
            .unwrap();
        assert!(matches!(
            open(&bob, &room, sealed, keys),
            Err(ClientError::Verify(_))
        ));

        let mut forged = envelope.clone();
        forged.revision = Revision(2);
        let sealed = Fanout::new(&forged)
            .sealed_for_recipient(&bob.handle())
            .unwrap();
        assert!(
            open(&bob, &room, sealed, keys)
                .unwrap_err()
                .to_string()
                .contains("signature")
        );

        // Signed by bob but claiming to be alice.
        let mut impostor = envelope.clone();
        impostor.signature = Bytes::from(bob.sign(&impostor.signing_input()).unwrap());
        let sealed = Fanout::new(&impostor)
            .sealed_for_recipient(&bob.handle())
            .unwrap();
        assert!(open(&bob, &room, sealed, keys).is_err());

        // Wrong room.
        let sealed = Fanout::new(&envelope)
            .sealed_for_recipient(&bob.handle())
            .unwrap();
        assert!(open(&bob, &RoomId::new("bbb").unwrap(), sealed, keys).is_err());
    }

    #[test]
    fn one_signed_envelope_cannot_show_two_plaintexts() {
        // A malicious sender wraps a second content key for bob, encrypting
        // nothing bob could tell apart: the commitment names the first key.
        let (alice, bob) = (test_keys::identity(0), test_keys::identity(1));
        let room = RoomId::new("aaa").unwrap();
        let keys = |h: &Handle| (*h == alice.handle()).then(|| alice.public_key());
        let mut envelope = seal(
            &alice,
            &room,
            Revision(3),
            &[recipient(&alice), recipient(&bob)],
            b"the real text",
        )
        .unwrap();
        let other_key = [9u8; 32];
        let label = chain::oaep_label(&room, Revision(3), &bob.handle());
        let forged = bob
            .public_key()
            .encrypt(
                &mut rand::rng(),
                rsa::Oaep::<Sha256>::new_with_label(label),
                &other_key,
            )
            .unwrap();
        let i = envelope
            .keys
            .iter()
            .position(|k| k.recipient == bob.handle())
            .unwrap();
        envelope.keys[i].wrapped = Bytes::from(forged);
        envelope.signature = Bytes::from(alice.sign(&envelope.signing_input()).unwrap());
        let sealed = Fanout::new(&envelope)
            .sealed_for_recipient(&bob.handle())
            .unwrap();
        let e = open(&bob, &room, sealed, keys).unwrap_err().to_string();
        assert!(e.contains("committed"), "{e}");
    }

    #[test]
    fn a_wrapped_key_is_bound_to_its_room_revision_and_recipient() {
        let (alice, bob) = (test_keys::identity(0), test_keys::identity(1));
        let room = RoomId::new("aaa").unwrap();
        let envelope = seal(&alice, &room, Revision(3), &[recipient(&bob)], b"x").unwrap();
        let wrapped = &envelope.keys[0].wrapped;
        let right = chain::oaep_label(&room, Revision(3), &bob.handle());
        assert!(bob.unwrap_key_labelled(wrapped, Some(&right)).is_ok());
        for wrong in [
            chain::oaep_label(&room, Revision(4), &bob.handle()),
            chain::oaep_label(&RoomId::new("aab").unwrap(), Revision(3), &bob.handle()),
            chain::oaep_label(&room, Revision(3), &alice.handle()),
        ] {
            assert!(bob.unwrap_key_labelled(wrapped, Some(&wrong)).is_err());
        }
        assert!(bob.unwrap_key(wrapped).is_err(), "no label");
    }

    #[test]
    fn the_signed_chain_arrives_and_v1_still_opens() {
        let (alice, bob) = (test_keys::identity(0), test_keys::identity(1));
        let room = RoomId::new("aaa").unwrap();
        let keys = |h: &Handle| (*h == alice.handle()).then(|| alice.public_key());
        let members = [recipient(&alice), recipient(&bob)];
        let position = Position {
            device: [5; DEVICE_BYTES],
            seq: 2,
            prev: [6; 32],
        };
        let envelope = seal_at(&alice, &room, Revision(3), &members, b"hi", &position, 77).unwrap();
        let sealed = Fanout::new(&envelope)
            .sealed_for_recipient(&bob.handle())
            .unwrap();
        let plain = open(&bob, &room, sealed, keys).unwrap();
        let chain = plain.chain.unwrap();
        assert_eq!((chain.device, chain.seq, chain.prev), ([5; 16], 2, [6; 32]));
        assert_eq!(chain.sent_at_ms, 77);
        assert_eq!(
            chain.membership,
            membership_hash(&room, Revision(3), &members)
        );
        assert_eq!(plain.hash, chain::message_hash(&envelope.signing_input()));

        // A v1 envelope, as stored before v1.1: empty label, v1 AAD.
        let content_key = Key::<Aes256Gcm>::generate();
        let nonce = Nonce::generate();
        let aad = associated_data(&room, &alice.handle(), Revision(3), None);
        let ciphertext = Aes256Gcm::new(&content_key)
            .encrypt(
                &nonce,
                Payload {
                    msg: b"old",
                    aad: &aad,
                },
            )
            .unwrap();
        let wrapped = bob
            .public_key()
            .oaep_encrypt::<Sha256>(content_key.as_slice())
            .unwrap();
        let mut v1 = Envelope {
            room: room.clone(),
            sender: alice.handle(),
            revision: Revision(3),
            nonce: nonce.as_slice().try_into().unwrap(),
            ciphertext: Bytes::from(ciphertext),
            keys: vec![WrappedKey {
                recipient: bob.handle(),
                wrapped: Bytes::from(wrapped),
            }],
            signature: Bytes::new(),
            chain: None,
        };
        v1.signature = Bytes::from(alice.sign(&v1.signing_input()).unwrap());
        let sealed = Fanout::new(&v1)
            .sealed_for_recipient(&bob.handle())
            .unwrap();
        let plain = open(&bob, &room, sealed, keys).unwrap();
        assert_eq!((plain.body.as_slice(), plain.chain), (&b"old"[..], None));
    }

    #[test]
    fn keys_must_hash_to_their_handle() {
        let (alice, bob) = (test_keys::identity(0), test_keys::identity(1));
        assert!(member_key(&alice.handle(), alice.public_der()).is_ok());
        assert!(
            member_key(&alice.handle(), bob.public_der())
                .unwrap_err()
                .to_string()
                .contains("does not hash")
        );
        assert!(member_key(&alice.handle(), b"junk").is_err());
    }

    #[test]
    fn empty_and_oversized_bodies_are_refused() {
        let alice = test_keys::identity(0);
        let room = RoomId::new("aaa").unwrap();
        assert!(seal(&alice, &room, Revision(1), &[recipient(&alice)], b"").is_err());
        let big = vec![b'x'; PLAINTEXT_BYTES_MAX + 1];
        assert!(seal(&alice, &room, Revision(1), &[recipient(&alice)], &big).is_err());
        assert!(seal(&alice, &room, Revision(1), &[], b"hi").is_err());
    }
}
