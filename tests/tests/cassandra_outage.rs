//! Fault: Cassandra stops under a node that is taking posts. Posts then
//! fail with UNAVAILABLE and are not acknowledged; when Cassandra is back,
//! posting resumes by itself, and every acknowledged message is stored
//! exactly once.
//!
//! The test runs its own Cassandra (own folder under `target/`, own
//! ports), so stopping it never disturbs the shared test instance.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use saferchat_client::history::{self, Query};
use saferchat_client::session::{Event, JoinOptions, Session};
use saferchat_consensus::RoomId;
use saferchat_node::message_id::MessageId;
use saferchat_node::storage::cassandra::CassandraStore;
use saferchat_node::storage::{Range, history as stored_history};
use saferchat_tests::ADMIN_TOKEN;
use saferchat_tests::cassandra::{self, PrivateCassandra};
use saferchat_tests::process::NodeProcess;
use tonic::Code;

const KEYSPACE: &str = "saferchat_outage";
/// How long one post may wait for its outcome.
const OUTCOME_TIMEOUT: Duration = Duration::from_secs(40);
/// Posts while Cassandra is stopping, at most.
const POSTS_WHILE_STOPPING_MAX: usize = 5_000;
/// How long posting may take to resume once Cassandra answers again.
const RESUME_TIMEOUT: Duration = Duration::from_secs(120);
/// Pause between two posts while waiting for posting to resume.
const RESUME_POLL: Duration = Duration::from_millis(250);

#[derive(Debug)]
enum Outcome {
    Acked(Bytes),
    Refused(Code, String),
}

/// Posts `body` and waits for this post's outcome, skipping deliveries.
async fn post(session: &mut Session, body: &str) -> Outcome {
    let seq = session.post(body.as_bytes()).await.expect("post");
    let deadline = Instant::now() + OUTCOME_TIMEOUT;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let event = tokio::time::timeout(left, session.next())
            .await
            .unwrap_or_else(|_| panic!("no outcome for post {seq} within {OUTCOME_TIMEOUT:?}"))
            .expect("session stays open through the outage")
            .expect("session not ended");
        match event {
            Event::Accepted { seq: s, id, .. } if s == seq => return Outcome::Acked(id),
            Event::Rejected {
                seq: s,
                code,
                message,
            } if s == seq => return Outcome::Refused(code, message),
            _ => {}
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs Cassandra: run scripts/test.sh or set SAFERCHAT_CASSANDRA"]
async fn posts_fail_unavailable_while_cassandra_is_down_and_acked_ones_are_stored_once() {
    // Like every Cassandra test, only with the README's test command (or
    // when asked for); the instance itself is private.
    let _ = cassandra::address();
    let cassandra = Arc::new(PrivateCassandra::start("outage"));
    let address = cassandra.address();
    let dir = tempfile::tempdir().expect("tempdir");
    let env = [
        ("SAFERCHAT_STORAGE", "cassandra"),
        ("SAFERCHAT_CASSANDRA_CONTACT_POINTS", address.as_str()),
        ("SAFERCHAT_CASSANDRA_DATACENTER", cassandra::DATACENTER),
        ("SAFERCHAT_CASSANDRA_KEYSPACE", KEYSPACE),
    ];
    let mut node = NodeProcess::start(&dir.path().join("node"), &env);
    let server = node.server();
    let room = RoomId::new("outage").expect("room");
    let alice = Arc::new(saferchat_client::test_keys::identity(0));
    let mut admin = saferchat_client::admin::Admin::connect(&server, ADMIN_TOKEN)
        .await
        .expect("admin");
    admin.create_chat(room.as_str()).await.expect("create");
    admin
        .add_user(room.as_str(), &alice.handle().to_string(), None)
        .await
        .expect("add alice");
    let options = JoinOptions {
        no_history: true,
        ..JoinOptions::default()
    };
    let mut session = Session::join(&server, &room, Arc::clone(&alice), &options)
        .await
        .expect("join");
    let mut acked: BTreeMap<MessageId, String> = BTreeMap::new();
    let mut acked_in_order = Vec::new();
    let mut record = |id: Bytes, body: String, acked_in_order: &mut Vec<String>| {
        let id = MessageId::from_bytes(&id).expect("a message id");
        assert!(acked.insert(id, body.clone()).is_none(), "ids are unique");
        acked_in_order.push(body);
    };

    // Before: every post is acknowledged.
    for i in 0..5 {
        let body = format!("before-{i}");
        match post(&mut session, &body).await {
            Outcome::Acked(id) => record(id, body, &mut acked_in_order),
            other => panic!("{body}: {other:?}"),
        }
    }

    // Cassandra stops while alice keeps posting.
    let stopping = {
        let cassandra = Arc::clone(&cassandra);
        tokio::task::spawn_blocking(move || cassandra.stop())
    };
    let mut refused_while_stopping = 0;
    for i in 0..POSTS_WHILE_STOPPING_MAX {
        if stopping.is_finished() {
            break;
        }
        let body = format!("stopping-{i}");
        match post(&mut session, &body).await {
            Outcome::Acked(id) => record(id, body, &mut acked_in_order),
            Outcome::Refused(code, message) => {
                assert_eq!(code, Code::Unavailable, "{body}: {message}");
                refused_while_stopping += 1;
            }
        }
    }
    stopping.await.expect("stop task");

    // Down: nothing is acknowledged, every post is UNAVAILABLE and says so.
    for i in 0..5 {
        let body = format!("down-{i}");
        match post(&mut session, &body).await {
            Outcome::Refused(Code::Unavailable, message) => {
                assert!(message.contains("not acknowledged"), "{body}: {message}")
            }
            other => panic!("{body} while Cassandra is down: {other:?}"),
        }
    }
    assert!(
        node.log_text().contains("none acknowledged"),
        "the node logs the failed append"
    );

    // Back: posting resumes by itself (the driver reconnects).
    {
        let cassandra = Arc::clone(&cassandra);
        tokio::task::spawn_blocking(move || cassandra.start_again())
            .await
            .expect("start task");
    }
    let resume_deadline = Instant::now() + RESUME_TIMEOUT;
    let mut attempts = 0;
    loop {
        assert!(
            Instant::now() < resume_deadline,
            "posting did not resume within {RESUME_TIMEOUT:?} after Cassandra came back ({attempts} attempts)"
        );
        attempts += 1;
        let body = format!("resume-{attempts}");
        match post(&mut session, &body).await {
            Outcome::Acked(id) => {
                record(id, body, &mut acked_in_order);
                break;
            }
            Outcome::Refused(code, message) => {
                assert_eq!(code, Code::Unavailable, "{body}: {message}");
                // Polling an outside process for recovery: bounded above.
                tokio::time::sleep(RESUME_POLL).await;
            }
        }
    }
    for i in 0..5 {
        let body = format!("after-{i}");
        match post(&mut session, &body).await {
            Outcome::Acked(id) => record(id, body, &mut acked_in_order),
            other => panic!("{body} after recovery: {other:?}"),
        }
    }

    // Every acked message is there exactly once, with its body: as alice
    // reads it through the node...
    let messages = history::read(
        &session,
        &Query {
            limit: 1000,
            ..Query::default()
        },
    )
    .await
    .expect("history");
    let mut seen: BTreeMap<MessageId, usize> = BTreeMap::new();
    for m in &messages {
        let id = MessageId::from_bytes(&m.id).expect("id");
        *seen.entry(id).or_default() += 1;
        if let Some(body) = acked.get(&id) {
            let plain = m.content.as_ref().expect("verifies and decrypts");
            assert_eq!(plain.body, body.as_bytes(), "{id:?}");
        }
    }
    for id in acked.keys() {
        assert_eq!(
            seen.get(id),
            Some(&1),
            "acked {id:?} ({}) stored once",
            acked[id]
        );
    }
    assert!(seen.values().all(|n| *n == 1), "no id twice");

    // ...and straight from Cassandra.
    drop(session);
    assert!(node.stop(), "clean shutdown");
    let store = CassandraStore::connect(&cassandra::config(&address, KEYSPACE))
        .await
        .expect("connect");
    let stored = stored_history(&store, &room, Range::After(None), 100_000)
        .await
        .expect("read");
    let mut ids: Vec<MessageId> = stored.iter().map(|m| m.id).collect();
    let total = ids.len();
    ids.dedup();
    assert_eq!(ids.len(), total, "no id twice");
    for id in acked.keys() {
        assert!(
            ids.binary_search(id).is_ok(),
            "acked {id:?} is in the table"
        );
    }
    println!(
        "acked {}, refused while stopping {refused_while_stopping}, attempts to resume {attempts}, rows {total}",
        acked.len()
    );
    drop(store);
    match Arc::try_unwrap(cassandra) {
        Ok(c) => c.remove(),
        Err(_) => panic!("the Cassandra handle is still shared"),
    }
}
