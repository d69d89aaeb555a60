//! A node whose disk fills up: posts are refused with a clear reason while
//! it is full, none is acknowledged without being stored, and once space
//! is back the node stores and serves every post again, also after a
//! restart. The data folder is a small tmpfs this test mounts (it runs as
//! root, as CI does).
//!
//! This found a bug: a write cut short by the full disk left a partial
//! record in the envelope log, and posts acknowledged after space came
//! back were stored behind it, where nothing could read them.

use std::sync::Arc;

use saferchat_client::session::{Event, JoinOptions, Session};
use saferchat_client::{ClientError, history};
use saferchat_consensus::RoomId;
use saferchat_tests::process::NodeProcess;
use saferchat_tests::tmpfs::{Tmpfs, fill};

async fn post(session: &mut Session, text: &str) -> Result<(), String> {
    let seq = session
        .post(text.as_bytes())
        .await
        .map_err(|e| e.to_string())?;
    loop {
        match session.next().await.map_err(|e| e.to_string())? {
            Some(Event::Accepted { seq: s, .. }) if s == seq => return Ok(()),
            Some(Event::Rejected {
                seq: s, message, ..
            }) if s == seq => return Err(message),
            Some(_) => {}
            None => return Err("session closed".into()),
        }
    }
}

async fn texts(session: &Session) -> Vec<String> {
    let query = history::Query {
        limit: 1000,
        ..history::Query::default()
    };
    let mut read = history::read(session, &query).await.expect("history");
    read.reverse();
    read.into_iter()
        .map(|m| String::from_utf8(m.content.expect("readable").body).unwrap())
        .collect()
}

async fn join(node: &NodeProcess) -> Result<Session, ClientError> {
    let options = JoinOptions {
        no_history: true,
        ..JoinOptions::default()
    };
    let alice = Arc::new(saferchat_client::test_keys::identity(0));
    Session::join(
        &node.server(),
        &RoomId::new("team").unwrap(),
        alice,
        &options,
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_refuses_posts_and_loses_none_that_were_acknowledged() {
    let dir = tempfile::tempdir().expect("tempdir");
    let disk = Tmpfs::mount(&dir.path().join("disk"), "8m")
        .unwrap_or_else(|e| panic!("{e}: this test needs root (CI runs as root)"));
    let mut node = NodeProcess::start(&disk.at.join("node"), &[]);
    let mut admin =
        saferchat_client::admin::Admin::connect(&node.server(), saferchat_tests::ADMIN_TOKEN)
            .await
            .expect("admin");
    admin.create_chat("team").await.expect("create");
    let alice = saferchat_client::test_keys::identity(0);
    admin
        .add_user("team", &alice.handle().to_string(), None)
        .await
        .expect("add");
    let mut session = join(&node).await.expect("join");
    let mut acked = vec!["before the disk filled".to_owned()];
    post(&mut session, &acked[0]).await.expect("stored");

    let filler = disk.at.join("filler");
    fill(&filler);
    let big = "x".repeat(3_000);
    let mut refused = Vec::new();
    for i in 0..20 {
        let text = format!("while full {i} {big}");
        match post(&mut session, &text).await {
            Ok(()) => acked.push(text),
            Err(reason) => refused.push(reason),
        }
    }
    assert!(
        refused.iter().any(|r| r.contains("No space left")),
        "a full disk is named: {refused:?}"
    );

    std::fs::remove_file(&filler).expect("free the space");
    for i in 0..5 {
        let text = format!("after space came back {i}");
        post(&mut session, &text).await.expect("stored again");
        acked.push(text);
    }
    let shown = texts(&session).await;
    for text in &acked {
        assert!(
            shown.contains(text),
            "acknowledged but not readable: {text:.40}"
        );
    }

    drop(session);
    node.stop();
    node.restart();
    let session = join(&node).await.expect("join after the restart");
    let shown = texts(&session).await;
    for text in &acked {
        assert!(shown.contains(text), "lost over the restart: {text:.40}");
    }
    assert_eq!(shown.len(), acked.len(), "nothing refused was stored");
}
