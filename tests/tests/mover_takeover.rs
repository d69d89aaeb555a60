//! A node that moves partitions dies for good in the middle of a
//! rebalance, on real node processes under a steady chat load.
//!
//! Node 1 is the lowest id of every partition's replica set, so it is the
//! mover of every step a rebalance onto a fourth node starts (the node
//! that seals the old set and transfers the rooms' membership to the new
//! one). It is SIGKILLed as soon as steps are under way and never comes
//! back: those steps cannot finish. The operator drains it; the map then
//! names the next node of both sets as each step's mover, which takes the
//! step over at its higher ballot (`saferchat_consensus::handover`,
//! "Takeover"), and the planner moves node 1's slots to the others. Every
//! partition reaches its target, node 1 is removed, and then, per room:
//! every acknowledged post is in the history exactly once, in one order,
//! the same through the three nodes left, and in each one's own store.

use std::time::{Duration, Instant};

use saferchat_consensus::RoomId;
use saferchat_tests::cluster::{Cluster, Options};
use saferchat_tests::load::{self, RoomRecord, RoomsLoad};

const ROOMS: [&str; 4] = ["t1", "t2", "t3", "t4"];
/// Posts in each room before anything moves.
const FILL: usize = 30;
const ALICE: usize = 0;
const BOB: usize = 1;
/// How long the moves may take on a loaded machine.
const PHASE_S: u64 = 300;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mover_that_dies_for_good_is_drained_and_its_steps_are_taken_over() {
    let mut cluster = Cluster::start(Options {
        metrics: true,
        ..Options::single_dc(3)
    })
    .await;
    cluster.map_created(0).await;
    let rooms: Vec<RoomId> = ROOMS.iter().map(|r| RoomId::new(r).unwrap()).collect();
    let mut admin = cluster.admin(1).await;
    for room in ROOMS {
        admin.create_chat(room).await.expect("create");
        for member in [ALICE, BOB] {
            let handle = load::identity(member).handle().to_string();
            admin.add_user(room, &handle, None).await.expect("add");
        }
    }
    // Nodes 2 and 3 serve the clients throughout; node 1 will die.
    let survivors: Vec<String> = [1, 2].iter().map(|i| cluster.server(*i)).collect();
    let records: Vec<RoomRecord> = ROOMS.iter().map(|_| RoomRecord::default()).collect();
    for (room, record) in rooms.iter().zip(&records) {
        let deadline = Instant::now() + Duration::from_secs(PHASE_S);
        load::join_any(&survivors, room, 0, &load::identity(BOB), deadline)
            .await
            .expect("bob joins");
        let posts = load::fill(&survivors, room, ALICE, "fill", FILL, 256)
            .await
            .unwrap_or_else(|e| panic!("{room}: fill: {e}"));
        record.posts.lock().unwrap().extend(posts);
    }
    let until = Instant::now() + Duration::from_secs(2 * PHASE_S);
    let chat = RoomsLoad::start(&survivors, &rooms, (ALICE, BOB), "moves", &records, until);

    let four = cluster.start_joining(4, "dc1", 1).await;
    cluster
        .status_until(four, 60, "the map naming node 4", |s| {
            s.nodes.iter().any(|n| n.id == 4)
        })
        .await;
    let rebalanced = cluster.admin(1).await.rebalance().await.expect("rebalance");
    let under_way = cluster
        .status_until(1, PHASE_S, "steps under way", |s| {
            s.epoch > rebalanced.epoch && s.unestablished_partitions > 0
        })
        .await;
    cluster.kill(0);
    println!(
        "node 1 killed for good at epoch {} with {} partitions moving, {} steps under way",
        under_way.epoch, under_way.moving_partitions, under_way.unestablished_partitions
    );

    // The drain goes through whichever node leads the map's group (node 1
    // may have; the others elect a new leader first).
    let deadline = Instant::now() + Duration::from_secs(PHASE_S);
    let drained = loop {
        match cluster.admin(1).await.drain(1).await {
            Ok(reply) => break reply,
            Err(e) => {
                assert!(Instant::now() < deadline, "drain never accepted: {e}");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    };
    let at_drain = cluster
        .status_until(1, 60, "the drain applied", |s| s.epoch >= drained.epoch)
        .await;
    println!(
        "node 1 drained at epoch {} with {} steps under way",
        drained.epoch, at_drain.unestablished_partitions
    );
    let done = cluster
        .status_until(1, PHASE_S, "every partition moved", |s| {
            s.epoch > drained.epoch && s.moving_partitions == 0 && s.unestablished_partitions == 0
        })
        .await;
    println!("every partition at its target at epoch {}", done.epoch);
    let mut in_place = 0.0;
    for i in [1, 2] {
        in_place += saferchat_tests::process::scrape_value(
            cluster.metrics[i],
            "saferchat_handover_steps_for_draining_total",
        )
        .await
        .unwrap_or(0.0);
    }
    // Without the takeover the steps node 1 had under way never finish,
    // and the wait above fails.
    println!("steps moved in place of node 1: {in_place}");
    cluster
        .admin(2)
        .await
        .remove_node(1)
        .await
        .expect("node 1 holds no replica slot any more");
    let stall = chat.stop().await;
    println!("the longest alice went without an acknowledged post: {stall:?}");
    // Clients of rooms whose steps wait for the drain retry through the
    // others; a room does not stop for minutes.
    assert!(
        stall < Duration::from_secs(60),
        "a room stalled for {stall:?}"
    );

    let stay: Vec<String> = [1, 2, four].iter().map(|i| cluster.server(*i)).collect();
    let deadline = Instant::now() + Duration::from_secs(PHASE_S);
    let reads = load::agreed_histories(&stay, &rooms, BOB, &records, deadline).await;
    // Nodes 2, 3 and 4 replicate every partition now.
    let stores = cluster
        .stopped_stores(&[1, 2, four], &rooms, BOB, ALICE..BOB)
        .await;
    load::judge_rooms(
        &rooms,
        &records,
        reads,
        stores,
        &[2, 3, 4],
        (FILL, &[2, 3, 4]),
    );
}
