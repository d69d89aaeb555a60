//! The test vectors of `docs/PROTOCOL.md`, in `docs/protocol-vectors.json`:
//! every byte a third-party client must reproduce, checked against this
//! implementation.
//!
//! Deterministic values (handles, signing inputs, associated data, the
//! ciphertext under a given key and nonce, Merkle trees, hashes, labels,
//! protobuf encodings) are recomputed and compared; randomized RSA outputs
//! (OAEP wraps, PSS signatures) are checked the way a recipient checks
//! them: signatures verify, wrapped keys unwrap (with their labels) to the
//! stated content key, and the sealed delivery opens to the plaintext.
//!
//! `SAFERCHAT_WRITE_VECTORS=1 cargo test -p saferchat-tests --test
//! protocol_vectors` rewrites the file first (new RSA outputs, the same
//! deterministic values), then checks it like any run.

use std::path::PathBuf;

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Key, Nonce};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use bytes::Bytes;
use saferchat_client::Identity;
use saferchat_client::crypto::{self, Recipient};
use saferchat_consensus::{Handle, Revision, RoomId};
use saferchat_envelope::chain::{self, Chain};
use saferchat_envelope::sealed::Fanout;
use saferchat_envelope::{Envelope, WrappedKey, associated_data, merkle};
use serde_json::{Value, json};
use sha2::Sha256;

fn path() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../docs/protocol-vectors.json")
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(text: &str) -> Vec<u8> {
    assert!(text.len().is_multiple_of(2), "odd hex {text}");
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&text[i..i + 2], 16).expect("hex"))
        .collect()
}

fn s<'a>(v: &'a Value, key: &str) -> &'a str {
    v[key]
        .as_str()
        .unwrap_or_else(|| panic!("{key} is a string"))
}

fn u(v: &Value, key: &str) -> u64 {
    v[key]
        .as_u64()
        .unwrap_or_else(|| panic!("{key} is a number"))
}

fn b<const N: usize>(v: &Value, key: &str) -> [u8; N] {
    unhex(s(v, key)).try_into().expect("length")
}

const ROOM: &str = "team";
const PLAINTEXT: &str = "Hello, Bob! (saferchat test vector)";

/// The fixed inputs of the v1.1 envelope vector.
fn v1_1_inputs() -> (Revision, [u8; 32], [u8; 12], Chain) {
    let mut device = [0u8; 16];
    device
        .iter_mut()
        .enumerate()
        .for_each(|(i, b)| *b = u8::try_from(i).unwrap() + 1);
    let chain = Chain {
        device,
        seq: 2,
        prev: [0xab; 32],
        sent_at_ms: 1_767_225_600_000,
        membership: [0; 32],
        key_commitment: [0; 32],
    };
    (Revision(5), [0x42; 32], [0x24; 12], chain)
}

/// Makes the vectors from the primitives (RSA outputs are random).
fn generate() -> Value {
    let alice = saferchat_client::test_keys::identity(0);
    let bob = saferchat_client::test_keys::identity(1);
    let room = RoomId::new(ROOM).unwrap();
    let key_vector = |name: &str, id: &Identity| {
        use rsa::traits::PublicKeyParts as _;
        json!({
            "name": name,
            "private_pkcs8_pem": id.to_pem().unwrap(),
            "public_spki_der_b64": B64.encode(id.public_der()),
            "modulus_hex": hex(&id.public_key().n_bytes()),
            "handle": id.handle().to_string(),
            "handle_hex": hex(id.handle().as_bytes()),
            "fingerprint": id.fingerprint(),
        })
    };

    let nonce: [u8; 32] = std::array::from_fn(|i| u8::try_from(i).unwrap());
    let join_input =
        saferchat_envelope::challenge::join_signing_input(&room, &alice.handle(), &nonce);
    let join = json!({
        "room": ROOM,
        "user": alice.handle().to_string(),
        "nonce_hex": hex(&nonce),
        "signing_input_hex": hex(&join_input),
        "signature_hex": hex(&alice.sign(&join_input).unwrap()),
    });

    let trees: Vec<Value> = (1..=5u8)
        .map(|n| {
            let leaves: Vec<(Vec<u8>, Vec<u8>)> =
                (1..=n).map(|i| (vec![i; 32], vec![100 + i; 4])).collect();
            let hashes: Vec<merkle::Hash> = leaves
                .iter()
                .map(|(r, w)| merkle::leaf_hash(&r.clone().try_into().unwrap(), w))
                .collect();
            let tree = merkle::Tree::new(&hashes);
            json!({
                "leaves": leaves.iter().zip(&hashes).map(|((r, w), h)| json!({
                    "recipient_hex": hex(r), "wrapped_hex": hex(w), "leaf_hash_hex": hex(h),
                })).collect::<Vec<_>>(),
                "root_hex": hex(&tree.root()),
                "paths_hex": (0..usize::from(n))
                    .map(|i| tree.path(i).iter().map(|h| hex(h)).collect::<Vec<_>>())
                    .collect::<Vec<_>>(),
            })
        })
        .collect();

    // Envelope v1.1 from the primitives, alice to alice and bob.
    let (revision, content_key, body_nonce, mut chain) = v1_1_inputs();
    let recipients = [Recipient::of(&alice), Recipient::of(&bob)];
    chain.membership = crypto::membership_hash(&room, revision, &recipients);
    chain.key_commitment = chain::key_commitment(&content_key);
    let aad = associated_data(&room, &alice.handle(), revision, Some(&chain));
    let ciphertext = Aes256Gcm::new(&Key::<Aes256Gcm>::from(content_key))
        .encrypt(
            &Nonce::from(body_nonce),
            Payload {
                msg: PLAINTEXT.as_bytes(),
                aad: &aad,
            },
        )
        .unwrap();
    let mut sorted: Vec<&Recipient> = recipients.iter().collect();
    sorted.sort_by_key(|r| r.handle);
    let keys: Vec<WrappedKey> = sorted
        .iter()
        .map(|r| WrappedKey {
            recipient: r.handle,
            wrapped: Bytes::from(
                r.key
                    .encrypt(
                        &mut rand::rng(),
                        rsa::Oaep::<Sha256>::new_with_label(chain::oaep_label(
                            &room, revision, &r.handle,
                        )),
                        &content_key,
                    )
                    .unwrap(),
            ),
        })
        .collect();
    let mut envelope = Envelope {
        room: room.clone(),
        sender: alice.handle(),
        revision,
        nonce: body_nonce,
        ciphertext: Bytes::from(ciphertext),
        keys,
        signature: Bytes::new(),
        chain: Some(chain),
    };
    let signing_input = envelope.signing_input();
    envelope.signature = Bytes::from(alice.sign(&signing_input).unwrap());
    let sealed_for_bob = Fanout::new(&envelope)
        .sealed_for_recipient(&bob.handle())
        .unwrap();
    let v1_1 = json!({
        "room": ROOM,
        "revision": revision.0,
        "sender": alice.handle().to_string(),
        "plaintext_utf8": PLAINTEXT,
        "content_key_hex": hex(&content_key),
        "nonce_hex": hex(&body_nonce),
        "device_hex": hex(&chain.device),
        "device_seq": chain.seq,
        "prev_hash_hex": hex(&chain.prev),
        "sent_at_ms": chain.sent_at_ms,
        "membership_hash_hex": hex(&chain.membership),
        "key_commitment_hex": hex(&chain.key_commitment),
        "associated_data_hex": hex(&aad),
        "ciphertext_hex": hex(&envelope.ciphertext),
        "wrapped_keys": envelope.keys.iter().map(|k| json!({
            "recipient": k.recipient.to_string(),
            "oaep_label_hex": hex(&chain::oaep_label(&room, revision, &k.recipient)),
            "wrapped_hex": hex(&k.wrapped),
        })).collect::<Vec<_>>(),
        "merkle_root_hex": hex(&envelope.key_tree().root()),
        "signing_input_hex": hex(&signing_input),
        "message_hash_hex": hex(&chain::message_hash(&signing_input)),
        "signature_hex": hex(&envelope.signature),
        "envelope_b64": B64.encode(envelope.encode()),
        "sealed_for_bob_b64": B64.encode(&sealed_for_bob),
    });
    let verification = json!({
        "safety_number_alice_bob": saferchat_client::verify::safety_number(
            (&alice.handle(), alice.public_der().as_ref()),
            (&bob.handle(), bob.public_der().as_ref()),
        ),
        "room_fingerprint_team_revision_5": saferchat_client::verify::room_fingerprint(
            &room, revision, &recipients,
        ),
    });
    json!({
        "verification": verification,
        "about": "saferchat protocol test vectors: see docs/PROTOCOL.md. Hex is lowercase; base64 is standard with padding. The private keys are published test keys: never use them.",
        "keys": [key_vector("alice", &alice), key_vector("bob", &bob)],
        "join": join,
        "merkle": trees,
        "envelope_v1_1": v1_1,
    })
}

fn identity(v: &Value, name: &str) -> Identity {
    let key = v["keys"]
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["name"] == name)
        .unwrap_or_else(|| panic!("key {name}"));
    let id = Identity::from_pem(s(key, "private_pkcs8_pem")).expect("a PKCS#8 key");
    use rsa::traits::PublicKeyParts as _;
    assert_eq!(s(key, "modulus_hex"), hex(&id.public_key().n_bytes()));
    assert_eq!(
        s(key, "public_spki_der_b64"),
        B64.encode(id.public_der()),
        "{name}: public key"
    );
    let handle = Handle::of_modulus(&unhex(s(key, "modulus_hex")));
    assert_eq!(
        s(key, "handle_hex"),
        hex(handle.as_bytes()),
        "{name}: handle"
    );
    assert_eq!(s(key, "handle"), handle.to_string(), "{name}: handle text");
    assert_eq!(s(key, "handle"), id.handle().to_string());
    assert_eq!(
        s(key, "fingerprint"),
        id.fingerprint(),
        "{name}: fingerprint"
    );
    id
}

fn verifies(id: &Identity, input: &[u8], signature: &[u8]) -> bool {
    id.public_key()
        .pss_verify::<Sha256>(input, signature)
        .is_ok()
}

#[test]
fn the_published_vectors_match_this_implementation() {
    if std::env::var_os("SAFERCHAT_WRITE_VECTORS").is_some() {
        let text = serde_json::to_string_pretty(&generate()).unwrap() + "\n";
        std::fs::write(path(), text).expect("write the vectors");
    }
    let text = std::fs::read_to_string(path()).expect("docs/protocol-vectors.json");
    let v: Value = serde_json::from_str(&text).expect("JSON");
    let (alice, bob) = (identity(&v, "alice"), identity(&v, "bob"));
    let room = RoomId::new(ROOM).unwrap();

    let join = &v["join"];
    let input = saferchat_envelope::challenge::join_signing_input(
        &RoomId::new(s(join, "room")).unwrap(),
        &s(join, "user").parse().unwrap(),
        &b::<32>(join, "nonce_hex"),
    );
    assert_eq!(
        s(join, "signing_input_hex"),
        hex(&input),
        "join signing input"
    );
    assert!(
        verifies(&alice, &input, &unhex(s(join, "signature_hex"))),
        "join signature"
    );

    for tree in v["merkle"].as_array().unwrap() {
        let leaves: Vec<merkle::Hash> = tree["leaves"]
            .as_array()
            .unwrap()
            .iter()
            .map(|l| {
                let h =
                    merkle::leaf_hash(&b::<32>(l, "recipient_hex"), &unhex(s(l, "wrapped_hex")));
                assert_eq!(s(l, "leaf_hash_hex"), hex(&h), "leaf hash");
                h
            })
            .collect();
        let built = merkle::Tree::new(&leaves);
        assert_eq!(
            s(tree, "root_hex"),
            hex(&built.root()),
            "root of {}",
            leaves.len()
        );
        for (i, path) in tree["paths_hex"].as_array().unwrap().iter().enumerate() {
            let path: Vec<merkle::Hash> = path
                .as_array()
                .unwrap()
                .iter()
                .map(|h| unhex(h.as_str().unwrap()).try_into().unwrap())
                .collect();
            assert_eq!(path, built.path(i), "path {i} of {}", leaves.len());
            assert_eq!(
                merkle::root_from_path(leaves[i], i, leaves.len(), &path),
                Some(built.root())
            );
        }
    }

    let e = &v["envelope_v1_1"];
    let revision = Revision(u(e, "revision"));
    let (fixed_revision, content_key, nonce, fixed) = v1_1_inputs();
    assert_eq!(revision, fixed_revision);
    assert_eq!(b::<32>(e, "content_key_hex"), content_key);
    assert_eq!(b::<12>(e, "nonce_hex"), nonce);
    let recipients = [Recipient::of(&alice), Recipient::of(&bob)];
    let chain = Chain {
        device: b(e, "device_hex"),
        seq: u(e, "device_seq"),
        prev: b(e, "prev_hash_hex"),
        sent_at_ms: u(e, "sent_at_ms"),
        membership: crypto::membership_hash(&room, revision, &recipients),
        key_commitment: chain::key_commitment(&content_key),
    };
    assert_eq!(
        (chain.device, chain.seq, chain.prev, chain.sent_at_ms),
        (fixed.device, fixed.seq, fixed.prev, fixed.sent_at_ms)
    );
    assert_eq!(
        s(e, "membership_hash_hex"),
        hex(&chain.membership),
        "membership hash"
    );
    assert_eq!(
        s(e, "key_commitment_hex"),
        hex(&chain.key_commitment),
        "key commitment"
    );
    let aad = associated_data(&room, &alice.handle(), revision, Some(&chain));
    assert_eq!(s(e, "associated_data_hex"), hex(&aad), "associated data");
    let ciphertext = Aes256Gcm::new(&Key::<Aes256Gcm>::from(content_key))
        .encrypt(
            &Nonce::from(nonce),
            Payload {
                msg: s(e, "plaintext_utf8").as_bytes(),
                aad: &aad,
            },
        )
        .unwrap();
    assert_eq!(s(e, "ciphertext_hex"), hex(&ciphertext), "ciphertext");
    let mut keys = Vec::new();
    for k in e["wrapped_keys"].as_array().unwrap() {
        let recipient: Handle = s(k, "recipient").parse().unwrap();
        let label = chain::oaep_label(&room, revision, &recipient);
        assert_eq!(s(k, "oaep_label_hex"), hex(&label), "OAEP label");
        let wrapped = unhex(s(k, "wrapped_hex"));
        let owner = [&alice, &bob]
            .into_iter()
            .find(|id| id.handle() == recipient)
            .expect("a known recipient");
        assert_eq!(
            owner.unwrap_key_labelled(&wrapped, Some(&label)).unwrap(),
            content_key,
            "the wrapped key unwraps to the content key"
        );
        keys.push(WrappedKey {
            recipient,
            wrapped: Bytes::from(wrapped),
        });
    }
    let envelope = Envelope {
        room: room.clone(),
        sender: s(e, "sender").parse().unwrap(),
        revision,
        nonce,
        ciphertext: Bytes::from(ciphertext),
        keys,
        signature: Bytes::from(unhex(s(e, "signature_hex"))),
        chain: Some(chain),
    };
    assert_eq!(
        s(e, "merkle_root_hex"),
        hex(&envelope.key_tree().root()),
        "key tree"
    );
    let signing_input = envelope.signing_input();
    assert_eq!(
        s(e, "signing_input_hex"),
        hex(&signing_input),
        "signing input"
    );
    assert_eq!(
        s(e, "message_hash_hex"),
        hex(&chain::message_hash(&signing_input)),
        "message hash"
    );
    assert!(
        verifies(&alice, &signing_input, &envelope.signature),
        "signature"
    );
    let encoded = B64.decode(s(e, "envelope_b64")).unwrap();
    assert_eq!(encoded, envelope.encode(), "the Envelope encoding");
    assert_eq!(Envelope::decode(Bytes::from(encoded)).unwrap(), envelope);
    let sealed = Bytes::from(B64.decode(s(e, "sealed_for_bob_b64")).unwrap());
    assert_eq!(
        sealed,
        Fanout::new(&envelope)
            .sealed_for_recipient(&bob.handle())
            .unwrap(),
        "the Sealed encoding"
    );
    let plain = crypto::open(&bob, &room, sealed, |h| {
        (*h == alice.handle()).then(|| alice.public_key())
    })
    .expect("bob opens it");
    assert_eq!(plain.body, s(e, "plaintext_utf8").as_bytes());
    assert_eq!(plain.chain, Some(chain));

    let checks = &v["verification"];
    assert_eq!(
        s(checks, "safety_number_alice_bob"),
        saferchat_client::verify::safety_number(
            (&bob.handle(), bob.public_der().as_ref()),
            (&alice.handle(), alice.public_der().as_ref()),
        ),
        "safety number"
    );
    assert_eq!(
        s(checks, "room_fingerprint_team_revision_5"),
        saferchat_client::verify::room_fingerprint(&room, revision, &recipients),
        "room fingerprint"
    );
}
