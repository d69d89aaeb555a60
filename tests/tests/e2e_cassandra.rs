//! End to end on Cassandra: a real node process configured only through
//! `SAFERCHAT_*` variables keeps its timeline and rooms in the shared test
//! Cassandra; alice and bob talk through the CLI; the node restarts and
//! history is intact; then every text and blob in every table of the
//! keyspace is searched for the plaintexts: only ciphertext is there.

use saferchat_tests::cassandra;
use saferchat_tests::process::{NodeProcess, cli, contains, fixture_key, history, ok, send};

const KEYSPACE: &str = "saferchat_e2e";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs Cassandra: run scripts/test.sh or set SAFERCHAT_CASSANDRA"]
async fn alice_and_bob_chat_on_cassandra_across_a_restart_and_it_stores_only_ciphertext() {
    let address = cassandra::address();
    let dir = tempfile::tempdir().expect("tempdir");
    let (alice, alice_handle) = fixture_key(dir.path(), "alice", 0);
    let (bob, bob_handle) = fixture_key(dir.path(), "bob", 1);
    // The keyspace outlives runs; the room is new every run.
    let room = saferchat_node::storage::conformance::unique_room("e2e")
        .as_str()
        .to_owned();
    let env = [
        ("SAFERCHAT_STORAGE", "cassandra"),
        ("SAFERCHAT_CASSANDRA_CONTACT_POINTS", address.as_str()),
        ("SAFERCHAT_CASSANDRA_DATACENTER", cassandra::DATACENTER),
        ("SAFERCHAT_CASSANDRA_KEYSPACE", KEYSPACE),
        (
            "SAFERCHAT_CASSANDRA_REPLICATION",
            "{'class': 'SimpleStrategy', 'replication_factor': 1}",
        ),
    ];
    let mut node = NodeProcess::start(&dir.path().join("node"), &env);
    assert!(
        node.log_text().contains("cassandra store ready"),
        "the node uses Cassandra: {}",
        node.log_text()
    );
    let server = node.server();
    let mut sent = Vec::new();

    ok(&cli(&server, None, &["admin", "create-chat", &room], None));
    for handle in [&alice_handle, &bob_handle] {
        ok(&cli(
            &server,
            None,
            &["admin", "add-user", &room, handle],
            None,
        ));
    }
    ok(&cli(&server, Some(&alice), &["members", &room], None));
    ok(&cli(&server, Some(&bob), &["members", &room], None));
    for (key, text) in [
        (&alice, "meet me by the old oak at nine"),
        (&bob, "only if you bring the blueprints"),
        (&alice, "blueprints are in the red folder"),
    ] {
        send(&server, key, &room, text);
        sent.push(text);
    }
    for key in [&alice, &bob] {
        let h = history(&server, key, &room);
        for text in &sent {
            assert!(h.contains(text), "{text:?} in {h}");
        }
        assert!(!h.contains("!!"), "every message verifies: {h}");
    }

    // A restart: rooms, members and history come back from Cassandra.
    assert!(node.stop(), "clean shutdown");
    node.restart();
    let server = node.server();
    let h = history(&server, &bob, &room);
    for text in &sent {
        assert!(h.contains(text), "after restart, {text:?} in {h}");
    }
    let members = ok(&cli(&server, None, &["admin", "members", &room], None));
    assert!(
        members.contains(&alice_handle) && members.contains(&bob_handle),
        "{members}"
    );
    send(&server, &bob, &room, "back online after the restart");
    sent.push("back online after the restart");
    let h = history(&server, &alice, &room);
    for text in &sent {
        assert_eq!(h.matches(text).count(), 1, "{text:?} exactly once in {h}");
    }
    assert!(node.stop());

    // What an operator with cqlsh sees: the rows are there, ciphertext only.
    let store = cassandra::store(KEYSPACE).await;
    let room_id = saferchat_consensus::RoomId::new(&room).expect("room name");
    let rows = saferchat_node::storage::history(
        &*store,
        &room_id,
        saferchat_node::storage::Range::After(None),
        1000,
    )
    .await
    .expect("read the timeline");
    assert_eq!(rows.len(), sent.len(), "one timeline row per message");
    let values = cassandra::every_value(store.session(), KEYSPACE).await;
    let tables: std::collections::BTreeSet<&str> = values.iter().map(|(t, _)| t.as_str()).collect();
    for table in ["chat_details", "chat_names", "timeline", "timeline_buckets"] {
        assert!(tables.contains(table), "{table} has values: {tables:?}");
    }
    assert!(
        values.iter().any(|(_, v)| contains(v, room.as_bytes())),
        "the search sees this run's rows"
    );
    for (table, value) in &values {
        for text in &sent {
            assert!(
                !contains(value, text.as_bytes()),
                "{text:?} found in table {table}"
            );
        }
    }
    // Nor on the node's own disk (acceptor state, keys) or in its log.
    let mut files = vec![node.log.clone()];
    let mut stack = vec![node.data_dir.clone()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).expect("read dir").flatten() {
            let p = entry.path();
            if p.is_dir() {
                stack.push(p);
            } else {
                files.push(p);
            }
        }
    }
    for path in &files {
        let bytes = std::fs::read(path).expect("read");
        for text in &sent {
            assert!(
                !contains(&bytes, text.as_bytes()),
                "{text:?} in {}",
                path.display()
            );
        }
    }
}
