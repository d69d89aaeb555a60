//! Partition moves on real node processes, under a steady chat load.
//!
//! Each of four rooms first gets 120 posts, more than the 64 KiB each
//! partition log keeps here, so a node that joins a partition copies its
//! rooms' timelines from a replica. Then alice posts one message at a time
//! and bob listens, through whichever node answers, for the whole test.
//! Meanwhile:
//!
//! 1. a fourth node joins three and a rebalance moves partitions to it one
//!    replica slot at a time (grow, rooms handed over, log established,
//!    shrink, …); part-way through, the node leading the map's Raft group
//!    is killed, the others elect a new leader, and the killed node comes
//!    back: the moves complete;
//! 2. a drain moves every slot off node 3, which is then removed.
//!
//! The handover messages of the moves travel in parts (a test build's
//! `SAFERCHAT_TEST_SPLIT_BYTES`), as a partition with many rooms' would.
//!
//! Then, per room (`chaos::history::check`): every acknowledged post is in
//! the history exactly once, with the id and number its acknowledgement
//! gave, numbered 1, 2, 3, … in one order; nothing refused is stored;
//! nothing is delivered twice or out of order to a listener; every node
//! left shows the same history; and each one's own store, read after it
//! stopped, is that history or a prefix of it, node 4's from the first
//! post on. The longest time alice could not get a post acknowledged is
//! printed, and bounded. After the rebalance the admin room list through
//! every node names every room, although no node holds every partition
//! any more.

use std::time::{Duration, Instant};

use saferchat_consensus::RoomId;
use saferchat_tests::cluster::{Cluster, Options};
use saferchat_tests::load::{self, RoomRecord, RoomsLoad};

const ROOMS: [&str; 4] = ["r1", "r2", "r3", "r4"];
/// Posts in each room before anything moves: beyond the 64 KiB each
/// partition log keeps.
const FILL: usize = 120;
/// Rooms without posts, listed at the end.
const QUIET_ROOMS: usize = 16;
const ALICE: usize = 0;
const BOB: usize = 1;
/// How long a whole phase (its moves) may take on a loaded machine.
const PHASE_S: u64 = 300;
/// The longest alice may go without an acknowledged post. Each step of a
/// move pauses a room for about a lease period (the handover waits out
/// the old set's leases) and its log's election, and ends its sessions,
/// which join again; the kill adds a failover. Runs here went 3-9 s;
/// the bound leaves room for a loaded CI machine, not for minutes.
const STALL_MAX: Duration = Duration::from_secs(30);

/// Starts a phase's chat load in every room through `servers`, at most
/// 2 × `PHASE_S` long.
fn load_phase(servers: &[String], phase: &str, seen: &[RoomRecord]) -> RoomsLoad {
    let rooms: Vec<RoomId> = ROOMS.iter().map(|r| RoomId::new(r).unwrap()).collect();
    let until = Instant::now() + Duration::from_secs(2 * PHASE_S);
    RoomsLoad::start(servers, &rooms, (ALICE, BOB), phase, seen, until)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partitions_move_under_chat_load_and_every_post_stays() {
    // Each partition log keeps 64 KiB: the fill below is more than that,
    // so the joining node, behind what its peers compacted, copies the
    // rooms' timelines from them.
    // And the handovers of the rooms' partitions travel in parts, as a
    // partition of many rooms' would (every handover message of more than
    // 256 bytes, in 256-byte parts).
    let mut cluster = Cluster::start(Options {
        env: vec![
            (
                "SAFERCHAT_PARTITION_LOG_RETAINED_BYTES".into(),
                "65536".into(),
            ),
            ("SAFERCHAT_TEST_SPLIT_BYTES".into(), "256".into()),
        ],
        metrics: true,
        ..Options::single_dc(3)
    })
    .await;
    cluster.map_created(0).await;
    let mut admin = cluster.admin(0).await;
    for room in ROOMS {
        admin.create_chat(room).await.expect("create");
        for member in [ALICE, BOB] {
            let handle = load::identity(member).handle().to_string();
            admin.add_user(room, &handle, None).await.expect("add");
        }
    }
    // Rooms without posts, for the admin room list: spread over more
    // partitions than any one node of four holds.
    let mut quiet: Vec<String> = (0..QUIET_ROOMS).map(|i| format!("quiet-{i}")).collect();
    for room in &quiet {
        admin.create_chat(room).await.expect("create");
    }
    let seen: Vec<RoomRecord> = ROOMS.iter().map(|_| RoomRecord::default()).collect();

    // 1. Node 4 joins; a rebalance moves slots to it; the map leader dies
    // part-way and comes back.
    let first: Vec<String> = (0..3).map(|i| cluster.server(i)).collect();
    for (room, seen) in ROOMS.iter().zip(&seen) {
        // Bob joins once first: his key is registered, so every post is
        // wrapped for him too.
        let deadline = Instant::now() + Duration::from_secs(PHASE_S);
        let room_id = RoomId::new(room).unwrap();
        load::join_any(&first, &room_id, 1, &load::identity(BOB), deadline)
            .await
            .expect("bob joins");
        let posts = load::fill(
            &first,
            &RoomId::new(room).unwrap(),
            ALICE,
            "fill",
            FILL,
            512,
        )
        .await
        .unwrap_or_else(|e| panic!("{room}: fill: {e}"));
        seen.posts.lock().unwrap().extend(posts);
    }
    let load = load_phase(&first, "grow", &seen);
    let four = cluster.start_joining(4, "dc1", 1).await;
    cluster
        .status_until(four, 60, "the map naming node 4", |s| {
            s.nodes.iter().any(|n| n.id == 4)
        })
        .await;
    let rebalanced = cluster.admin(0).await.rebalance().await.expect("rebalance");
    let moving = cluster
        .status_until(1, PHASE_S, "a move under way", |s| {
            s.epoch > rebalanced.epoch && s.moving_partitions > 0 && s.map_leader != 0
        })
        .await;
    let leader = usize::try_from(moving.map_leader - 1).unwrap();
    let witness = if leader == 1 { 0 } else { 1 };
    println!(
        "killing node {} (the map leader) at epoch {} with {} partitions moving",
        leader + 1,
        moving.epoch,
        moving.moving_partitions
    );
    cluster.kill(leader);
    let after = cluster
        .status_until(witness, PHASE_S, "a new map leader", |s| {
            s.map_leader != 0 && s.map_leader != moving.map_leader
        })
        .await;
    println!(
        "node {} leads the map (term {}) at epoch {}",
        after.map_leader, after.map_term, after.epoch
    );
    cluster.restart(leader);
    let done = cluster
        .status_until(0, PHASE_S, "every partition moved", |s| {
            s.epoch > moving.epoch && s.moving_partitions == 0 && s.unestablished_partitions == 0
        })
        .await;
    assert_eq!(
        done.nodes
            .iter()
            .find(|n| n.id == 4)
            .map(|n| n.state.as_str()),
        Some("active")
    );
    // Six map commands per slot moved: at least one slot moved.
    assert!(done.epoch >= rebalanced.epoch + 6, "{done:?}");
    // Every node now holds about three quarters of the partitions; the
    // room list through each is still the whole list, rooms created since
    // included (a node keeps what it stored before a partition moved away).
    let mut admin = cluster.admin(1).await;
    for i in 0..QUIET_ROOMS {
        let room = format!("late-{i}");
        admin.create_chat(&room).await.expect("create");
        quiet.push(room);
    }
    for i in [0, 1, 2, four] {
        let listed = cluster.admin(i).await.list_chats().await.expect("list");
        let names: Vec<&str> = listed.iter().map(|c| c.chat.as_str()).collect();
        for room in ROOMS
            .iter()
            .copied()
            .chain(quiet.iter().map(String::as_str))
        {
            assert!(names.contains(&room), "node {}: {room} in {names:?}", i + 1);
        }
    }
    let stall = load.stop().await;
    println!("grow: the longest alice went without an acknowledged post: {stall:?}");
    assert!(stall < STALL_MAX, "grow: a room stalled for {stall:?}");

    // 2. Drain node 3 under load, through the nodes that stay; remove it.
    let stay: Vec<String> = [0, 1, four].iter().map(|i| cluster.server(*i)).collect();
    let load = load_phase(&stay, "drain", &seen);
    let drained = cluster.admin(0).await.drain(3).await.expect("drain");
    cluster
        .status_until(0, PHASE_S, "node 3 drained", |s| {
            s.epoch > drained.epoch && s.moving_partitions == 0 && s.unestablished_partitions == 0
        })
        .await;
    cluster.kill(2);
    cluster
        .admin(0)
        .await
        .remove_node(3)
        .await
        .expect("a drained node holds no slot");
    let stall = load.stop().await;
    println!("drain: the longest alice went without an acknowledged post: {stall:?}");
    assert!(stall < STALL_MAX, "drain: a room stalled for {stall:?}");

    // Node 4 took its rooms' partitions from transfers sent in parts.
    let joined = saferchat_tests::process::scrape_value(
        cluster.metrics[four],
        "saferchat_peer_messages_joined_total",
    )
    .await
    .unwrap_or(0.0);
    println!("node 4 joined {joined} handover messages sent in parts");
    assert!(joined >= 1.0, "node 4 joined no message sent in parts");

    // Every room: one history through the three nodes left.
    let rooms: Vec<RoomId> = ROOMS.iter().map(|r| RoomId::new(r).unwrap()).collect();
    let deadline = Instant::now() + Duration::from_secs(PHASE_S);
    let reads = load::agreed_histories(&stay, &rooms, BOB, &seen, deadline).await;

    // Each node's own store, read after it stopped, then the checks. Node
    // 4 holds every partition now (three nodes, three replicas): its store
    // has every room from its first post, copied from the others.
    let stores = cluster
        .stopped_stores(&[0, 1, four], &rooms, BOB, ALICE..BOB)
        .await;
    load::judge_rooms(&rooms, &seen, reads, stores, &[1, 2, 4], (FILL, &[4]));
}
