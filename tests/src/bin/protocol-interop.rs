//! `protocol-interop`: the Rust side of the browser client's
//! interoperability tests (`web/test/interop.test.ts`). It seals and opens
//! envelopes, and checks join proofs, with the very code the CLI and the
//! node run, so that the TypeScript implementation is held to the Rust one
//! with fresh randomness on every run (the fixed vectors in
//! `docs/protocol-vectors.json` cover the deterministic parts).
//!
//! One JSON request on stdin, one JSON answer on stdout; a refusal exits
//! with status 1 and says why on stderr. Requests (bytes in standard
//! base64, hashes in hex):
//!
//! - `{"op":"seal","sender_pem","room","revision","recipients_spki":[…],
//!   "plaintext","device_hex","device_seq","prev_hash_hex","sent_at_ms"}`
//!   → `{"envelope","message_hash_hex","sealed":{handle: Sealed}}`: an
//!   envelope v1.1 as the CLI seals it, and the `Sealed` the node would
//!   deliver to each recipient. With `"version":1` (and no device
//!   fields), an envelope v1 as older clients sealed it, still found in
//!   stored history.
//! - `{"op":"open","recipient_pem","room","envelope","sender_spki"}` →
//!   `{"plaintext","sender","device_seq","message_hash_hex"}`: the
//!   envelope passes the node's structural check, is fanned out as the
//!   node does, and is opened as the CLI opens a delivery.
//! - `{"op":"verify_join","room","user","nonce_hex","public_key","signature"}`
//!   → `{"ok":true}`: the node's check of a join proof.

use std::io::Read as _;
use std::process::ExitCode;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use bytes::Bytes;
use rsa::pkcs8::DecodePublicKey as _;
use rsa::traits::PublicKeyParts as _;
use saferchat_client::Identity;
use saferchat_client::crypto::{self, Position, Recipient};
use saferchat_consensus::{Handle, Revision, RoomId};
use saferchat_envelope::Envelope;
use saferchat_envelope::chain;
use saferchat_envelope::sealed::Fanout;
use serde_json::{Value, json};

fn main() -> ExitCode {
    let mut input = String::new();
    if let Err(e) = std::io::stdin().read_to_string(&mut input) {
        eprintln!("protocol-interop: reading stdin: {e}");
        return ExitCode::FAILURE;
    }
    match serde_json::from_str::<Value>(&input)
        .map_err(|e| format!("request is not JSON: {e}"))
        .and_then(|request| answer(&request))
    {
        Ok(reply) => {
            println!("{reply}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("protocol-interop: {e}");
            ExitCode::FAILURE
        }
    }
}

fn answer(request: &Value) -> Result<Value, String> {
    match text(request, "op")? {
        "seal" => seal(request),
        "open" => open(request),
        "verify_join" => verify_join(request),
        other => Err(format!("unknown op {other:?}")),
    }
}

fn text<'a>(v: &'a Value, key: &str) -> Result<&'a str, String> {
    v[key]
        .as_str()
        .ok_or_else(|| format!("{key} must be a string"))
}

fn number(v: &Value, key: &str) -> Result<u64, String> {
    v[key]
        .as_u64()
        .ok_or_else(|| format!("{key} must be a number"))
}

fn base64(v: &Value, key: &str) -> Result<Vec<u8>, String> {
    B64.decode(text(v, key)?)
        .map_err(|e| format!("{key} is not base64: {e}"))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex<const N: usize>(v: &Value, key: &str) -> Result<[u8; N], String> {
    let t = text(v, key)?;
    let bytes: Vec<u8> = (0..t.len())
        .step_by(2)
        .map(|i| t.get(i..i + 2).and_then(|d| u8::from_str_radix(d, 16).ok()))
        .collect::<Option<_>>()
        .ok_or_else(|| format!("{key} is not hex"))?;
    bytes
        .try_into()
        .map_err(|_| format!("{key} must be {N} bytes"))
}

fn room(v: &Value) -> Result<RoomId, String> {
    RoomId::new(text(v, "room")?).map_err(|e| e.to_string())
}

fn recipient(der: Vec<u8>) -> Result<Recipient, String> {
    let key = rsa::PublicKey::from_public_key_der(&der).map_err(|e| e.to_string())?;
    Ok(Recipient {
        handle: Handle::of_modulus(&key.n_bytes()),
        key,
        der: Bytes::from(der),
    })
}

/// Envelope v1 (docs/PROTOCOL.md §5: no device fields, unlabelled wraps),
/// which today's clients no longer send but still open.
fn seal_v1(
    me: &Identity,
    room: &RoomId,
    revision: Revision,
    recipients: &[Recipient],
    plaintext: &[u8],
) -> Result<Envelope, String> {
    use aes_gcm::aead::{Aead, Generate, KeyInit, Payload};
    use aes_gcm::{Aes256Gcm, Key, Nonce};
    let content_key = Key::<Aes256Gcm>::generate();
    let nonce = Nonce::generate();
    let aad = saferchat_envelope::associated_data(room, &me.handle(), revision, None);
    let ciphertext = Aes256Gcm::new(&content_key)
        .encrypt(
            &nonce,
            Payload {
                msg: plaintext,
                aad: &aad,
            },
        )
        .map_err(|_| "AES-GCM failed".to_owned())?;
    let mut sorted: Vec<&Recipient> = recipients.iter().collect();
    sorted.sort_by_key(|m| m.handle);
    let keys = sorted
        .iter()
        .map(|m| {
            let wrapped = m
                .key
                .encrypt(
                    &mut rand::rng(),
                    rsa::Oaep::<sha2::Sha256>::new(),
                    content_key.as_slice(),
                )
                .map_err(|e| e.to_string())?;
            Ok(saferchat_envelope::WrappedKey {
                recipient: m.handle,
                wrapped: Bytes::from(wrapped),
            })
        })
        .collect::<Result<Vec<_>, String>>()?;
    let mut envelope = Envelope {
        room: room.clone(),
        sender: me.handle(),
        revision,
        nonce: nonce.as_slice().try_into().expect("96-bit nonce"),
        ciphertext: Bytes::from(ciphertext),
        keys,
        signature: Bytes::new(),
        chain: None,
    };
    envelope.signature = Bytes::from(
        me.sign(&envelope.signing_input())
            .map_err(|e| e.to_string())?,
    );
    Ok(envelope)
}

fn seal(r: &Value) -> Result<Value, String> {
    let me = Identity::from_pem(text(r, "sender_pem")?).map_err(|e| e.to_string())?;
    let room = room(r)?;
    let revision = Revision(number(r, "revision")?);
    let recipients = r["recipients_spki"]
        .as_array()
        .ok_or("recipients_spki must be a list")?
        .iter()
        .map(|k| {
            let der = B64
                .decode(k.as_str().ok_or("a recipient key must be a string")?)
                .map_err(|e| e.to_string())?;
            recipient(der)
        })
        .collect::<Result<Vec<_>, String>>()?;
    let plaintext = text(r, "plaintext")?.as_bytes();
    let envelope = if r["version"].as_u64() == Some(1) {
        seal_v1(&me, &room, revision, &recipients, plaintext)?
    } else {
        let position = Position {
            device: unhex(r, "device_hex")?,
            seq: number(r, "device_seq")?,
            prev: unhex(r, "prev_hash_hex")?,
        };
        crypto::seal_at(
            &me,
            &room,
            revision,
            &recipients,
            plaintext,
            &position,
            number(r, "sent_at_ms")?,
        )
        .map_err(|e| e.to_string())?
    };
    let fanout = Fanout::new(&envelope);
    let sealed: serde_json::Map<String, Value> = recipients
        .iter()
        .filter_map(|m| {
            fanout
                .sealed_for_recipient(&m.handle)
                .map(|s| (m.handle.to_string(), json!(B64.encode(s))))
        })
        .collect();
    Ok(json!({
        "envelope": B64.encode(envelope.encode()),
        "message_hash_hex": hex(&chain::message_hash(&envelope.signing_input())),
        "sealed": sealed,
    }))
}

fn open(r: &Value) -> Result<Value, String> {
    let me = Identity::from_pem(text(r, "recipient_pem")?).map_err(|e| e.to_string())?;
    let room = room(r)?;
    let envelope = Envelope::decode(Bytes::from(base64(r, "envelope")?))
        .map_err(|e| format!("the node would refuse the envelope: {e}"))?;
    let sender = recipient(base64(r, "sender_spki")?)?;
    let sealed = Fanout::new(&envelope)
        .sealed_for_recipient(&me.handle())
        .ok_or("the envelope has no key for this recipient")?;
    let plain = crypto::open(&me, &room, sealed, |h| {
        (*h == sender.handle).then(|| sender.key.clone())
    })
    .map_err(|e| e.to_string())?;
    Ok(json!({
        "plaintext": String::from_utf8(plain.body).map_err(|e| e.to_string())?,
        "sender": plain.sender.to_string(),
        "device_seq": plain.chain.map(|c| c.seq),
        "message_hash_hex": hex(&plain.hash),
    }))
}

fn verify_join(r: &Value) -> Result<Value, String> {
    let room = room(r)?;
    let user: Handle = text(r, "user")?.parse().map_err(|e| format!("user: {e}"))?;
    let nonce = unhex(r, "nonce_hex")?;
    saferchat_node::auth::verify_join(
        &room,
        &user,
        &nonce,
        &Bytes::from(base64(r, "public_key")?),
        &base64(r, "signature")?,
    )
    .map_err(|e| e.to_string())?;
    Ok(json!({"ok": true}))
}
