//! End to end with real processes: the node binary, the CLI for an admin
//! and three users, and a restart. Then searches the node's data folder
//! and log for every plaintext sent (none may be there), and finally plays
//! a compromised server: one stored envelope is altered on disk, and the
//! recipients must refuse to show it while still showing the others.

use std::path::Path;

use bytes::Bytes;
use saferchat_envelope::Envelope;

use saferchat_tests::process::{
    NodeProcess, cli, cli_with_env, contains, fails, files, fixture_key, history, ok, send,
};

/// Alters the body of the first envelope in the node's envelope log, as an
/// attacker with the server's disk would: flips one ciphertext bit and
/// rewrites the record's checksum, so the node itself serves the altered
/// envelope. Record format (`node/src/storage/envelope_log.rs`):
/// `len: u32 ‖ crc32(payload): u32 ‖ room_len: u8 ‖ room ‖ id: 16 ‖ envelope`.
fn tamper_with_first_envelope(data_dir: &Path) {
    let mut segments: Vec<_> = files(&data_dir.join("db").join("envelopes"))
        .into_iter()
        .filter(|p| p.extension().is_some_and(|e| e == "log"))
        .collect();
    segments.sort();
    let path = segments.first().expect("an envelope log segment");
    let mut bytes = std::fs::read(path).expect("read segment");
    let len = u32::from_be_bytes(bytes[0..4].try_into().expect("4 bytes")) as usize;
    let payload = &bytes[8..8 + len];
    // Format 1: 0x00 0x01 ‖ seq (8) ‖ room_len ‖ room ‖ id (16) ‖ envelope.
    assert_eq!(&payload[..2], &[0, 1], "a sequenced record");
    let envelope_at = 2 + 8 + 1 + usize::from(payload[10]) + 16;
    let mut envelope =
        Envelope::decode(Bytes::copy_from_slice(&payload[envelope_at..])).expect("an envelope");
    let mut ciphertext = envelope.ciphertext.to_vec();
    ciphertext[0] ^= 1;
    envelope.ciphertext = Bytes::from(ciphertext);
    let altered = envelope.encode();
    assert_eq!(altered.len(), len - envelope_at, "same encoded length");
    bytes[8 + envelope_at..8 + len].copy_from_slice(&altered);
    let crc = crc32fast::hash(&bytes[8..8 + len]);
    bytes[4..8].copy_from_slice(&crc.to_be_bytes());
    std::fs::write(path, bytes).expect("write segment");
}

#[test]
fn two_people_chat_through_a_real_node_and_the_server_sees_no_plaintext() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (alice, alice_handle) = fixture_key(dir.path(), "alice", 0);
    let (bob, bob_handle) = fixture_key(dir.path(), "bob", 1);
    let (carol, carol_handle) = fixture_key(dir.path(), "carol", 2);
    let mut node = NodeProcess::start(&dir.path().join("node"), &[]);
    let server = node.server();
    let mut sent: Vec<&str> = Vec::new();

    // The admin sets up the room.
    let out = ok(&cli(&server, None, &["admin", "create-chat", "team"], None));
    assert!(out.contains("created room team (revision 1)"), "{out}");
    ok(&cli(
        &server,
        None,
        &["admin", "add-user", "team", &alice_handle],
        None,
    ));
    ok(&cli(
        &server,
        None,
        &["admin", "add-user", "team", &bob_handle],
        None,
    ));
    let err = fails(&cli(&server, None, &["admin", "create-chat", "team"], None));
    assert!(
        err.contains("AlreadyExists") || err.contains("already exists"),
        "{err}"
    );

    // Both join once (registering their keys), then talk.
    ok(&cli(&server, Some(&alice), &["members", "team"], None));
    ok(&cli(&server, Some(&bob), &["members", "team"], None));
    send(&server, &alice, "team", "the eagle lands at dawn");
    sent.push("the eagle lands at dawn");
    send(&server, &bob, "team", "copy that, bring snacks");
    sent.push("copy that, bring snacks");
    for key in [&alice, &bob] {
        let h = history(&server, key, "team");
        assert!(h.contains(": the eagle lands at dawn"), "{h}");
        assert!(h.contains(": copy that, bring snacks"), "{h}");
        assert!(!h.contains("!!"), "every message verifies: {h}");
    }
    // Interactive chat: stdin lines become posts.
    let out = ok(&cli(
        &server,
        Some(&alice),
        &["chat", "team", "--recent", "0"],
        Some("typed in the chat\n"),
    ));
    assert!(out.contains("(you): typed in the chat"), "{out}");
    sent.push("typed in the chat");

    // Carol is not a member.
    let err = fails(&cli(
        &server,
        Some(&carol),
        &["send", "team", "let me in"],
        None,
    ));
    assert!(
        err.contains("PermissionDenied") || err.contains("not a member"),
        "{err}"
    );

    // Bob is removed; what is posted afterwards never reaches him.
    ok(&cli(
        &server,
        None,
        &["admin", "remove-user", "team", &bob_handle],
        None,
    ));
    send(&server, &alice, "team", "bob is gone now");
    sent.push("bob is gone now");
    let err = fails(&cli(&server, Some(&bob), &["history", "team"], None));
    assert!(err.contains("not a member"), "{err}");
    // Re-added later, he still cannot read what was posted in between:
    // it was never wrapped for him.
    ok(&cli(
        &server,
        None,
        &["admin", "add-user", "team", &bob_handle],
        None,
    ));
    let h = history(&server, &bob, "team");
    assert!(!h.contains("bob is gone now"), "{h}");
    assert!(h.contains("copy that, bring snacks"), "{h}");

    // A restart keeps rooms, members, keys and history.
    assert!(node.stop(), "clean shutdown");
    node.restart();
    let server = node.server();
    let h = history(&server, &alice, "team");
    for text in [
        "the eagle lands at dawn",
        "copy that, bring snacks",
        "typed in the chat",
        "bob is gone now",
    ] {
        assert!(h.contains(text), "after restart: {h}");
    }
    let members = ok(&cli(&server, None, &["admin", "members", "team"], None));
    assert!(
        members.contains(&alice_handle) && members.contains(&bob_handle),
        "{members}"
    );
    assert!(!members.contains(&carol_handle));
    send(&server, &bob, "team", "back after the restart");
    sent.push("back after the restart");
    assert!(history(&server, &alice, "team").contains("back after the restart"));
    assert!(node.stop());

    // The server never had the plaintext: not on disk, not in its log.
    let mut searched = files(&node.data_dir);
    searched.push(node.log.clone());
    assert!(searched.len() > 3, "{searched:?}");
    for path in &searched {
        let bytes = std::fs::read(path).expect("read");
        for text in &sent {
            assert!(
                !contains(&bytes, text.as_bytes()),
                "{text:?} found in {}",
                path.display()
            );
        }
    }
    assert!(
        !node.log_text().contains(saferchat_tests::ADMIN_TOKEN),
        "the admin token is never logged"
    );

    // A compromised server alters the first message; its recipients see
    // that it does not verify and do not display it.
    tamper_with_first_envelope(&node.data_dir);
    node.restart();
    let server = node.server();
    for key in [&alice, &bob] {
        let h = history(&server, key, "team");
        assert!(!h.contains("the eagle lands at dawn"), "{h}");
        assert_eq!(h.matches("!!").count(), 1, "one message refused: {h}");
        assert!(h.contains("copy that, bring snacks"), "{h}");
    }
    assert!(node.stop());
}

/// Key files are encrypted with a passphrase unless the owner says not to;
/// the CLI asks for it only when it has a terminal, otherwise it takes
/// SAFERCHAT_KEY_PASSPHRASE, and plain files keep working with a warning.
#[test]
fn key_files_are_encrypted_unless_asked_not_to() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = "127.0.0.1:9"; // never contacted: these commands are local
    let key = dir.path().join("alice.pem");
    let key_arg = Some(key.as_path());
    let pass = [("SAFERCHAT_KEY_PASSPHRASE", "a long passphrase")];

    // No terminal and no passphrase given: refused, nothing written.
    let err = fails(&cli(server, key_arg, &["keygen"], None));
    assert!(err.contains("--no-passphrase"), "{err}");
    assert!(!key.exists());

    let out = ok(&cli_with_env(server, key_arg, &["keygen"], None, &pass));
    let handle = out
        .lines()
        .find_map(|l| l.strip_prefix("handle:"))
        .expect("a handle")
        .trim()
        .to_owned();
    let text = std::fs::read_to_string(&key).expect("key file");
    assert!(
        text.starts_with("-----BEGIN ENCRYPTED PRIVATE KEY-----"),
        "{text}"
    );
    let whoami = cli_with_env(server, key_arg, &["whoami"], None, &pass);
    assert!(ok(&whoami).contains(&handle));
    assert!(
        String::from_utf8_lossy(&whoami.stderr).is_empty(),
        "no warning"
    );
    let err = fails(&cli(server, key_arg, &["whoami"], None));
    assert!(
        err.contains("is encrypted: set SAFERCHAT_KEY_PASSPHRASE"),
        "{err}"
    );
    let wrong = [("SAFERCHAT_KEY_PASSPHRASE", "a long passphrasE")];
    let err = fails(&cli_with_env(server, key_arg, &["whoami"], None, &wrong));
    assert!(err.contains("wrong passphrase"), "{err}");
    assert!(
        !err.contains("a long passphras"),
        "the passphrase is never printed: {err}"
    );

    // A new passphrase, then none: same key throughout.
    let renew = [
        pass[0],
        ("SAFERCHAT_NEW_KEY_PASSPHRASE", "another long passphrase"),
    ];
    ok(&cli_with_env(
        server,
        key_arg,
        &["set-passphrase"],
        None,
        &renew,
    ));
    let again = [("SAFERCHAT_KEY_PASSPHRASE", "another long passphrase")];
    assert!(ok(&cli_with_env(server, key_arg, &["whoami"], None, &again)).contains(&handle));
    ok(&cli_with_env(
        server,
        key_arg,
        &["set-passphrase", "--no-passphrase"],
        None,
        &again,
    ));
    let plain = cli(server, key_arg, &["whoami"], None);
    assert!(ok(&plain).contains(&handle));
    let warning = String::from_utf8_lossy(&plain.stderr);
    assert!(warning.contains("is not encrypted"), "{warning}");

    // An empty passphrase protects nothing and is refused.
    let empty = [("SAFERCHAT_KEY_PASSPHRASE", "")];
    let other = dir.path().join("bob.pem");
    let err = fails(&cli_with_env(
        server,
        Some(&other),
        &["keygen"],
        None,
        &empty,
    ));
    assert!(err.contains("empty passphrase"), "{err}");
    ok(&cli(
        server,
        Some(&other),
        &["keygen", "--no-passphrase"],
        None,
    ));
    assert!(
        std::fs::read_to_string(&other)
            .expect("key file")
            .starts_with("-----BEGIN PRIVATE KEY-----")
    );
}
