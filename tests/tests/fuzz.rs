//! Property-based fuzzing of every parser of untrusted bytes: envelope
//! and sealed-envelope decoding, the protobuf messages each service
//! accepts (chat, admin, peer) and the node's conversions of peer frames,
//! room names, handles, certificate fingerprints, and the configuration
//! file. Each target must never panic, on random bytes and on mutations
//! of valid inputs (the seed corpus: the protocol test vectors), and what
//! parses must round-trip.
//!
//! Deterministic: a fixed seed per target and a bounded number of cases
//! (`FUZZ_CASES` raises it for a longer campaign). Coverage-guided fuzzing
//! (libFuzzer, AFL) needs a nightly toolchain or a separate LLVM build on
//! this stable toolchain; these are property tests instead.

use base64::Engine as _;
use bytes::Bytes;
use proptest::prelude::*;
use proptest::test_runner::{Config, RngSeed, TestRunner};
use prost::Message as _;
use saferchat_consensus::{Handle, RoomId};
use saferchat_envelope::Envelope;
use saferchat_proto::{admin as apb, chat as cpb, peer as ppb};
use saferchat_vocabulary::CertificateFingerprint;

fn cases() -> u32 {
    std::env::var("FUZZ_CASES")
        .ok()
        .and_then(|c| c.parse().ok())
        .unwrap_or(20_000)
}

fn runner(seed: u64) -> TestRunner {
    TestRunner::new(Config {
        cases: cases(),
        rng_seed: RngSeed::Fixed(seed),
        failure_persistence: None,
        ..Config::default()
    })
}

/// The valid inputs mutations start from: the v1.1 envelope and its
/// sealed delivery from the protocol test vectors.
fn corpus() -> Vec<Vec<u8>> {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/protocol-vectors.json");
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).expect("vectors")).expect("JSON");
    ["envelope_b64", "sealed_for_bob_b64"]
        .iter()
        .map(|k| {
            base64::engine::general_purpose::STANDARD
                .decode(v["envelope_v1_1"][k].as_str().expect("a vector"))
                .expect("base64")
        })
        .collect()
}

/// Random bytes, or a valid input with bytes flipped, cut or inserted.
fn inputs() -> impl Strategy<Value = Vec<u8>> {
    let corpus = corpus();
    let mutated = (
        0..corpus.len(),
        prop::collection::vec((any::<prop::sample::Index>(), any::<u8>(), 0u8..3), 1..8),
    )
        .prop_map(move |(which, edits)| {
            let mut bytes = corpus[which].clone();
            for (at, value, kind) in edits {
                if bytes.is_empty() {
                    bytes.push(value);
                    continue;
                }
                let i = at.index(bytes.len());
                match kind {
                    0 => bytes[i] ^= value.max(1),
                    1 => {
                        bytes.truncate(i);
                    }
                    _ => bytes.insert(i, value),
                }
            }
            bytes
        });
    prop_oneof![prop::collection::vec(any::<u8>(), 0..2048), mutated]
}

#[test]
fn envelope_decoding_never_panics_and_round_trips() {
    runner(1)
        .run(&inputs(), |bytes| {
            if let Ok(envelope) = Envelope::decode(Bytes::from(bytes)) {
                let again = Envelope::decode(envelope.encode()).expect("re-decodes");
                prop_assert_eq!(again, envelope);
            }
            Ok(())
        })
        .unwrap();
}

#[test]
fn sealed_envelope_opening_never_panics() {
    let bob: Handle = saferchat_client::test_keys::identity(1).handle();
    runner(2)
        .run(&inputs(), |bytes| {
            let _ = saferchat_envelope::sealed::open(Bytes::from(bytes), &bob);
            Ok(())
        })
        .unwrap();
}

#[test]
fn service_messages_and_peer_frames_never_panic() {
    runner(3)
        .run(&prop::collection::vec(any::<u8>(), 0..1024), |bytes| {
            let b = || Bytes::from(bytes.clone());
            let _ = cpb::ClientFrame::decode(b());
            let _ = cpb::HistoryRequest::decode(b());
            let _ = cpb::MembersRequest::decode(b());
            let _ = apb::AddUserRequest::decode(b());
            let _ = apb::ListChatsRequest::decode(b());
            if let Ok(m) = ppb::RoomMessage::decode(b()) {
                let _ = saferchat_node::convert::message_from_pb(&m);
            }
            if let Ok(m) = ppb::PartitionMessage::decode(b()) {
                let _ = saferchat_node::convert::log::message_from_pb(&m);
            }
            if let Ok(r) = ppb::RoomStateRecord::decode(b()) {
                let _ = saferchat_node::convert::state_from_pb(&r);
            }
            if let Ok(r) = ppb::AcceptorRecord::decode(b()) {
                let _ = saferchat_node::convert::acceptor_from_pb(&r);
            }
            let mut stream = b();
            let mut joining = saferchat_node::grpc::message_parts::Joining::default();
            while let Ok(frame) = ppb::PeerFrame::decode_length_delimited(&mut stream) {
                if let Some(part) = frame.part
                    && joining.push(part).is_err()
                {
                    break;
                }
            }
            Ok(())
        })
        .unwrap();
}

#[test]
fn names_handles_and_fingerprints_parse_or_refuse_and_round_trip() {
    runner(4)
        .run(&"\\PC{0,80}", |text| {
            if let Ok(room) = RoomId::new(&text) {
                prop_assert_eq!(room.as_str(), text.as_str());
            }
            if let Ok(handle) = text.parse::<Handle>() {
                prop_assert_eq!(handle.to_string().parse::<Handle>().ok(), Some(handle));
            }
            if let Ok(f) = text.parse::<CertificateFingerprint>() {
                prop_assert_eq!(
                    f.to_string().parse::<CertificateFingerprint>().ok(),
                    Some(f)
                );
            }
            Ok(())
        })
        .unwrap();
}

#[test]
fn configuration_files_parse_or_refuse_without_panicking() {
    let keys = prop::sample::select(vec![
        "listen",
        "admin_listen",
        "data_dir",
        "node_id",
        "datacenter",
        "peers",
        "partitions",
        "replicas_per_datacenter",
        "insecure_plaintext",
        "[tls]",
        "[lease]",
        "lease_ms",
        "[limits]",
        "posts_per_second",
        "[storage]",
        "backend",
    ]);
    let values = prop::sample::select(vec![
        "1",
        "0",
        "-1",
        "18446744073709551616",
        "\"127.0.0.1:1\"",
        "\"x\"",
        "true",
        "[]",
        "[{ id = 2 }]",
        "{}",
        "\"\"",
        "1.5",
    ]);
    let lines = prop::collection::vec((keys, values), 0..8).prop_map(|lines| {
        lines
            .into_iter()
            .map(|(k, v)| {
                if k.starts_with('[') {
                    format!("{k}\n")
                } else {
                    format!("{k} = {v}\n")
                }
            })
            .collect::<String>()
    });
    runner(5)
        .run(&prop_oneof![lines, "\\PC{0,200}"], |text| {
            if let Ok(config) = toml::from_str::<saferchat_node::config::NodeConfig>(&text) {
                let _ = config.validate();
            }
            Ok(())
        })
        .unwrap();
}
