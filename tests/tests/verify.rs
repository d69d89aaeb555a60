//! Out-of-band verification with the CLI: two members compare the room
//! fingerprint and their safety number, and a device says when it sees a
//! key for the first time.

use saferchat_tests::process::{NodeProcess, cli, fixture_key, ok};

/// The line after `marker`'s first occurrence that starts with spaces and
/// digits: a safety number.
fn number_after<'a>(out: &'a str, marker: &str) -> &'a str {
    let mut lines = out.lines().skip_while(|l| !l.contains(marker));
    lines.next().expect("the member's line");
    lines.next().expect("the safety number").trim()
}

fn room_fingerprint(out: &str) -> &str {
    out.lines()
        .find_map(|l| l.strip_prefix("room fingerprint: "))
        .expect("a room fingerprint")
}

#[test]
fn two_members_get_the_same_numbers_and_first_seen_keys_are_flagged() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (alice, alice_handle) = fixture_key(dir.path(), "alice", 0);
    let (bob, bob_handle) = fixture_key(dir.path(), "bob", 1);
    let node = NodeProcess::start(&dir.path().join("node"), &[]);
    let server = node.server();
    ok(&cli(&server, None, &["admin", "create-chat", "team"], None));
    for handle in [&alice_handle, &bob_handle] {
        ok(&cli(
            &server,
            None,
            &["admin", "add-user", "team", handle],
            None,
        ));
    }

    // Alice first: Bob has not joined, so there is no key to verify.
    let first = ok(&cli(&server, Some(&alice), &["verify", "team"], None));
    assert!(
        first.contains(&format!("{bob_handle}  (has not joined yet")),
        "{first}"
    );
    // Bob's first look: Alice's key is new to his device.
    let bob_run = cli(&server, Some(&bob), &["verify", "team"], None);
    let bob_out = ok(&bob_run);
    let bob_err = String::from_utf8_lossy(&bob_run.stderr);
    assert!(
        bob_err.contains(&format!("!! new key: {alice_handle}")),
        "{bob_err}"
    );
    // Alice again: Bob's key is new to her device, and now verifiable.
    let alice_run = cli(&server, Some(&alice), &["verify", "team"], None);
    let alice_out = ok(&alice_run);
    let alice_err = String::from_utf8_lossy(&alice_run.stderr);
    assert!(
        alice_err.contains(&format!("!! new key: {bob_handle}"))
            && !alice_err.contains(&format!("!! new key: {alice_handle}")),
        "{alice_err}"
    );
    // A third look: nothing is new any more.
    let again = cli(&server, Some(&alice), &["verify", "team"], None);
    assert!(
        !String::from_utf8_lossy(&again.stderr).contains("new key"),
        "{}",
        String::from_utf8_lossy(&again.stderr)
    );

    // The same revision on both sides (no change since Bob's join).
    assert_eq!(room_fingerprint(&alice_out), room_fingerprint(&bob_out));
    let alice_sees = number_after(&alice_out, &bob_handle);
    let bob_sees = number_after(&bob_out, &alice_handle);
    assert_eq!(alice_sees, bob_sees, "one safety number for the pair");
    assert_eq!(alice_sees.split(' ').count(), 12, "{alice_sees}");
}
