//! The owner of a room dies in the middle of a burst of posts.
//!
//! Alice posts 60 messages into a room served by node L (the leader of
//! the room's partition log). After 20 acknowledgements L is SIGKILLed.
//! Her client rejoins through a surviving node (which sends her to the new
//! leader) and posts again, byte for byte, every post it has no
//! acknowledgement for. Then:
//!
//! - every post is acknowledged exactly once in effect: a post that had
//!   committed before the kill gets its original id and sequence number
//!   back, one that had not is stored now; the sequence numbers are 1..60
//!   in posting order, with no gap and no duplicate;
//! - the killed node restarts and catches up from the log;
//! - every node's own store (read directly after the nodes stop) holds
//!   the same 60 messages, in the same order, numbered 1..60.
//!
//! It also prints the failover time (SIGKILL to the first post accepted by
//! the new leader); `BENCHMARKS.md` says how it was measured.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use saferchat_client::session::{Event, JoinOptions, Session};
use saferchat_consensus::RoomId;
use saferchat_node::storage::sled::SledStore;
use saferchat_node::storage::{self, Range};
use saferchat_tests::cluster::{Cluster, Options};
use saferchat_tests::load;
use saferchat_tests::process::fixture_key;

const ROOM: &str = "burst";
const POSTS: usize = 60;
const KILL_AFTER: usize = 20;
const DEADLINE: Duration = Duration::from_secs(120);

/// Joins through node `through` (following redirects), retrying while the
/// partition elects a new leader.
async fn join(cluster: &Cluster, through: usize, who: usize) -> Session {
    let room = RoomId::new(ROOM).unwrap();
    let me = Arc::new(saferchat_client::test_keys::identity(who));
    let options = JoinOptions {
        no_history: true,
        ..JoinOptions::default()
    };
    let started = Instant::now();
    loop {
        match Session::join(&cluster.server(through), &room, Arc::clone(&me), &options).await {
            Ok(s) => return s,
            Err(e) => {
                assert!(started.elapsed() < DEADLINE, "could not rejoin: {e}");
                tokio::task::yield_now().await;
            }
        }
    }
}

/// A gauge of node `i`'s Prometheus endpoint, by name and labels (-1
/// when the endpoint does not answer).
async fn gauge(cluster: &Cluster, i: usize, series: &str) -> f64 {
    saferchat_tests::process::scrape_value(cluster.metrics[i], series)
        .await
        .unwrap_or(-1.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_owner_killed_mid_burst_loses_and_duplicates_nothing() {
    let mut options = Options::single_dc(3);
    options.metrics = true;
    let (mut cluster, mut session, leader) = room_with_alice(options).await;
    let survivor = (leader + 1) % 3;
    let envelopes: Vec<Bytes> = (0..POSTS)
        .map(|i| session.seal(format!("post {i}").as_bytes()).unwrap())
        .collect();

    // Post the first two thirds, kill the leader after 20 acknowledgements.
    let mut acked: HashMap<u64, (Bytes, u64)> = HashMap::new();
    for (i, e) in envelopes.iter().enumerate().take(2 * POSTS / 3) {
        session.send_raw(i as u64 + 1, e.clone()).await.unwrap();
    }
    let mut killed_at = None;
    loop {
        let event = tokio::time::timeout(DEADLINE, session.next())
            .await
            .expect("events keep coming");
        match event {
            Ok(Some(Event::Accepted {
                seq, id, room_seq, ..
            })) => {
                assert!(acked.insert(seq, (id, room_seq)).is_none(), "acked once");
                if acked.len() == KILL_AFTER && killed_at.is_none() {
                    cluster.kill(leader);
                    killed_at = Some(Instant::now());
                }
            }
            Ok(Some(Event::Rejected { seq, message, .. })) => {
                assert!(
                    killed_at.is_some(),
                    "post {seq} refused before the kill: {message}"
                );
            }
            Ok(Some(_)) => {}
            Ok(None) | Err(_) => break,
        }
    }
    let killed_at = killed_at.expect("the leader was killed");

    // Rejoin and post again whatever has no acknowledgement.
    let mut first_after_kill = None;
    while acked.len() < POSTS {
        assert!(
            killed_at.elapsed() < DEADLINE,
            "posts never all acknowledged"
        );
        let mut session = join(&cluster, survivor, 0).await;
        assert_ne!(session.address(), cluster.server(leader));
        for (i, e) in envelopes.iter().enumerate() {
            let seq = i as u64 + 1;
            if !acked.contains_key(&seq) {
                session.send_raw(seq, e.clone()).await.unwrap();
            }
        }
        while acked.len() < POSTS {
            match tokio::time::timeout(DEADLINE, session.next()).await {
                Ok(Ok(Some(Event::Accepted {
                    seq, id, room_seq, ..
                }))) => {
                    first_after_kill.get_or_insert_with(|| killed_at.elapsed());
                    acked.entry(seq).or_insert((id, room_seq));
                }
                Ok(Ok(Some(_))) => {}
                _ => break,
            }
        }
    }
    let failover = first_after_kill.expect("a post accepted after the kill");
    println!("failover: SIGKILL of the leader to the first accepted post: {failover:?}");

    // One order: sequence numbers 1..60 in posting order, ids increasing.
    let mut ids = Vec::new();
    for seq in 1..=POSTS as u64 {
        let (id, room_seq) = &acked[&seq];
        assert_eq!(*room_seq, seq, "post {seq} is message #{seq} of the room");
        ids.push(id.clone());
    }
    assert!(ids.windows(2).all(|w| w[0] < w[1]), "ids increase");

    // The killed node comes back and catches up from the log.
    cluster.restart(leader);
    let new_leader = (0..3)
        .find(|i| *i != leader && cluster.server(*i) == join_address(&cluster, survivor))
        .expect("a leader");
    wait_caught_up(
        &cluster,
        leader,
        new_leader,
        killed_at,
        "the restarted node",
    )
    .await;

    // Every node's own store: the same 60 messages, in order, 1..60.
    stop_and_check_stores(&mut cluster, &ids).await;
}

/// A replica that was down while the leader compacted its log past what
/// the replica had cannot catch up from the log: the leader tells it so,
/// it copies the room's timeline from a replica (`Peer/CopyPartitionRooms`, `Peer/CopyRoom`),
/// installs it and catches up from the log after it. With 64 KiB retained
/// per partition, 200 posts made while it is down are far beyond that.
/// Every node's own store ends with the same messages, numbered 1..N,
/// with the acknowledged ids.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_behind_the_compacted_log_copies_the_timeline_and_catches_up() {
    const BEFORE: usize = 10;
    const WHILE_DOWN: usize = 200;
    const AFTER: usize = 10;
    let mut options = Options::single_dc(3);
    options.metrics = true;
    options.env = vec![
        (
            "SAFERCHAT_PARTITION_LOG_RETAINED_BYTES".into(),
            "65536".into(),
        ),
        ("SAFERCHAT_POSTS_PER_SECOND".into(), "0".into()),
    ];
    let (mut cluster, mut session, leader) = room_with_alice(options).await;
    let behind = (leader + 1) % 3;
    let started = Instant::now();
    let mut acked = load::post_acked(&mut session, "before", BEFORE, DEADLINE).await;
    wait_caught_up(&cluster, behind, leader, started, "the follower").await;

    cluster.kill(behind);
    acked.extend(load::post_acked(&mut session, "while down", WHILE_DOWN, DEADLINE).await);
    cluster.restart(behind);
    acked.extend(load::post_acked(&mut session, "after", AFTER, DEADLINE).await);
    wait_caught_up(&cluster, behind, leader, started, "the restarted follower").await;
    let log = cluster.nodes[behind].log_text();
    assert!(
        log.contains("installed the partition's timeline copied from a replica"),
        "the restarted follower caught up by a copy, not from the log"
    );

    let total = (BEFORE + WHILE_DOWN + AFTER) as u64;
    let ids: Vec<Bytes> = acked.iter().map(|(id, _)| id.clone()).collect();
    let seqs: Vec<u64> = acked.iter().map(|(_, seq)| *seq).collect();
    assert_eq!(
        seqs,
        (1..=total).collect::<Vec<_>>(),
        "acknowledged in order"
    );
    stop_and_check_stores(&mut cluster, &ids).await;
}

/// A cluster started with `options`, `ROOM` with alice and bob in it, and
/// alice's session on the room's leader, whose index comes last.
async fn room_with_alice(options: Options) -> (Cluster, Session, usize) {
    let cluster = Cluster::start(options).await;
    let dir = tempfile::tempdir().unwrap();
    let (_, alice) = fixture_key(dir.path(), "alice", 0);
    let (_, bob) = fixture_key(dir.path(), "bob", 1);
    let mut admin = cluster.admin(0).await;
    admin.create_chat(ROOM).await.expect("create");
    admin.add_user(ROOM, &alice, None).await.expect("add alice");
    admin.add_user(ROOM, &bob, None).await.expect("add bob");
    let session = join(&cluster, 0, 0).await;
    let leader = (0..3)
        .find(|i| cluster.server(*i) == session.address())
        .expect("the session is on a node of the cluster");
    (cluster, session, leader)
}

/// Stops every node cleanly, then reads each node's own store: the room
/// holds exactly the acknowledged `ids`, in order, numbered 1..N.
async fn stop_and_check_stores(cluster: &mut Cluster, ids: &[Bytes]) {
    for node in &mut cluster.nodes {
        assert!(node.stop(), "a clean stop");
    }
    let room = RoomId::new(ROOM).unwrap();
    for (i, node) in cluster.nodes.iter().enumerate() {
        let store = SledStore::open(&node.data_dir.join("db")).expect("open the store");
        let stored = storage::history(&store, &room, Range::After(None), 1000)
            .await
            .expect("read");
        let seqs: Vec<u64> = stored.iter().map(|m| m.seq).collect();
        assert_eq!(
            seqs,
            (1..=ids.len() as u64).collect::<Vec<_>>(),
            "node {}",
            i + 1
        );
        let stored_ids: Vec<Bytes> = stored
            .iter()
            .map(|m| Bytes::copy_from_slice(&m.id.to_bytes()))
            .collect();
        assert_eq!(
            stored_ids,
            ids,
            "node {} stores the acknowledged ids",
            i + 1
        );
    }
}

/// Where a join through node `through` ends (the current leader).
fn join_address(cluster: &Cluster, through: usize) -> String {
    let rt = tokio::runtime::Handle::current();
    tokio::task::block_in_place(|| {
        rt.block_on(async { join(cluster, through, 1).await.address().to_owned() })
    })
}

/// The leader of a room is cut off from the other nodes while its client
/// keeps posting to it. The others elect a new leader and the room goes
/// on there. When the old leader is reconnected, nothing it was given
/// while cut off exists anywhere: it could not commit without a quorum,
/// and after the new leader's election the others refuse its term
/// (fencing), so it cannot write after its successor.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cut_off_owner_cannot_write_after_its_successor() {
    let mut options = Options::single_dc(3);
    options.metrics = true;
    let mut cluster = Cluster::start(options).await;
    let dir = tempfile::tempdir().unwrap();
    let (_, alice) = fixture_key(dir.path(), "alice", 0);
    let mut admin = cluster.admin(0).await;
    admin.create_chat(ROOM).await.expect("create");
    admin.add_user(ROOM, &alice, None).await.expect("add alice");

    let mut old = join(&cluster, 0, 0).await;
    let leader = (0..3)
        .find(|i| cluster.server(*i) == old.address())
        .expect("a node of the cluster");
    let before = load::post_acked(&mut old, "before", 5, DEADLINE).await;

    cluster.isolate(leader);
    let started = Instant::now();
    for i in 0..3 {
        // Given to the old leader while it is cut off.
        let _ = old.post(format!("cut off {i}").as_bytes()).await;
    }
    // Until the others elect a new leader they send clients to the old
    // one (which steps down once no quorum answers it); rejoin until the
    // room is served elsewhere.
    let survivor = (leader + 1) % 3;
    let mut new = loop {
        let s = join(&cluster, survivor, 0).await;
        if s.address() != old.address() {
            break s;
        }
        assert!(started.elapsed() < DEADLINE, "no new leader was elected");
    };
    let after = load::post_acked(&mut new, "after", 5, DEADLINE).await;

    cluster.heal(leader);
    // Whatever the old session heard back, an acknowledgement of a post
    // given while cut off would be a write after the successor.
    let mut old_acks = Vec::new();
    while let Ok(Ok(Some(event))) = tokio::time::timeout(Duration::from_secs(30), old.next()).await
    {
        if let Event::Accepted { seq, .. } = event {
            old_acks.push(seq);
        }
    }
    assert!(
        old_acks.iter().all(|s| *s <= 5),
        "the cut-off leader acknowledged {old_acks:?}"
    );

    // The old leader catches up with the new one.
    let new_leader = (0..3)
        .find(|i| cluster.server(*i) == new.address())
        .expect("a node of the cluster");
    wait_caught_up(&cluster, leader, new_leader, started, "the old leader").await;
    drop((old, new));
    for node in &mut cluster.nodes {
        assert!(node.stop(), "a clean stop");
    }
    let expected: Vec<(Bytes, u64)> = before.into_iter().chain(after).collect();
    assert_eq!(
        expected.iter().map(|(_, s)| *s).collect::<Vec<_>>(),
        (1..=10).collect::<Vec<_>>(),
        "the new leader continued the room's numbering"
    );
    let room = RoomId::new(ROOM).unwrap();
    for (i, node) in cluster.nodes.iter().enumerate() {
        let store = SledStore::open(&node.data_dir.join("db")).expect("open the store");
        let stored: Vec<(Bytes, u64)> = storage::history(&store, &room, Range::After(None), 1000)
            .await
            .expect("read")
            .iter()
            .map(|m| (Bytes::copy_from_slice(&m.id.to_bytes()), m.seq))
            .collect();
        assert_eq!(stored, expected, "node {i}: exactly the acknowledged posts");
    }
}

/// Waits until node `behind` has applied `ROOM`'s partition as far as
/// `leader` has, within twice the deadline counted from `since`.
async fn wait_caught_up(
    cluster: &Cluster,
    behind: usize,
    leader: usize,
    since: Instant,
    who: &str,
) {
    let partition = saferchat_placement::PartitionCount::DEFAULT.of_room(ROOM).0;
    let series = format!("saferchat_partition_applied_slot{{partition=\"{partition}\"}}");
    loop {
        let want = gauge(cluster, leader, &series).await;
        let have = gauge(cluster, behind, &series).await;
        if want > 0.0 && have == want {
            return;
        }
        assert!(
            since.elapsed() < 2 * DEADLINE,
            "{who} never caught up ({have} of {want})"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
