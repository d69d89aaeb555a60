//! End to end with real processes: the node binary, the CLI for an admin
//! and three users, and a restart. Ends by searching the node's data folder
//! and log for every plaintext sent: none may be there.

use std::path::Path;

use saferchat_tests::process::{NodeProcess, cli, fails, fixture_key, ok};

fn send(server: &str, key: &Path, room: &str, text: &str) {
    let out = ok(&cli(server, Some(key), &["send", room, text], None));
    assert!(out.starts_with("sent "), "{out}");
}

fn history(server: &str, key: &Path, room: &str) -> String {
    ok(&cli(
        server,
        Some(key),
        &["history", room, "--limit", "100"],
        None,
    ))
}

/// Every file under `dir`, recursively.
fn files(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).expect("read dir").flatten() {
        let path = entry.path();
        if path.is_dir() {
            out.extend(files(&path));
        } else {
            out.push(path);
        }
    }
    out
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
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
}
