//! Chat across a three-node cluster, as the cluster issue's report tried
//! it: bob listens through one node, alice posts through the other two.
//! Every session of a room is redirected to the node that serves the room
//! (its partition log's leader), so bob receives both posts live; every
//! replica applies the committed posts, and every node's history is the
//! same.

use std::sync::Arc;
use std::time::Duration;

use saferchat_client::session::{Event, JoinOptions, Session};
use saferchat_consensus::{NodeId, RoomId};
use saferchat_placement::{ClusterNode, PartitionCount, Placement};
use saferchat_tests::cluster::{Cluster, Options};
use saferchat_tests::process::{self, fixture_key};

const ROOM: &str = "team";

/// The placement of a one-datacenter cluster of `n`, as the nodes
/// compute it.
fn placement(n: u64) -> Placement {
    let nodes: Vec<ClusterNode> = (1..=n)
        .map(|id| ClusterNode {
            id: NodeId(id),
            datacenter: "dc1".into(),
        })
        .collect();
    Placement::build(&nodes, PartitionCount::DEFAULT, 3).unwrap()
}

/// Which node prefers to serve `ROOM` in a cluster of `n`.
fn owner(n: u64) -> usize {
    let placement = placement(n);
    let (p, _) = placement.room(ROOM);
    placement.preferred_owner(p).0 as usize - 1
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn users_on_different_nodes_of_three_chat_and_read_one_history() {
    chat_across(3).await;
}

/// Five nodes: each partition has three replicas, so two nodes of five
/// replicate nothing of the room and send its clients on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn users_on_different_nodes_of_five_chat_and_read_one_history() {
    chat_across(5).await;
}

async fn chat_across(n: usize) {
    let cluster = Cluster::start(Options::single_dc(n)).await;
    let dir = tempfile::tempdir().unwrap();
    let (alice_key, alice) = fixture_key(dir.path(), "alice", 0);
    let (_, bob) = fixture_key(dir.path(), "bob", 1);
    let owner = owner(n as u64);
    let others: Vec<usize> = (0..n).filter(|i| *i != owner).collect();

    // Admin calls work on any node.
    let mut admin = cluster.admin(others[0]).await;
    admin.create_chat(ROOM).await.expect("create");
    admin.add_user(ROOM, &alice, None).await.expect("add alice");
    cluster
        .admin(others[1])
        .await
        .add_user(ROOM, &bob, None)
        .await
        .expect("add bob");

    // Bob listens through a node that does not serve the room.
    let room = RoomId::new(ROOM).unwrap();
    let bob_id = Arc::new(saferchat_client::test_keys::identity(1));
    let options = JoinOptions {
        no_history: true,
        ..JoinOptions::default()
    };
    let mut listening = Session::join(&cluster.server(others[0]), &room, bob_id.clone(), &options)
        .await
        .expect("bob joins");
    // The room is served by its partition's leader: whichever replica won
    // the election (usually the preferred owner). Joins through every node
    // end there.
    let leader = listening.address().to_owned();
    for i in 0..n {
        let again = Session::join(&cluster.server(i), &room, bob_id.clone(), &options)
            .await
            .expect("bob joins again");
        assert_eq!(
            again.address(),
            leader,
            "joins through node {i} end at the leader"
        );
    }
    let _ = owner;

    // Alice posts through two other nodes (in a cluster of five, the last
    // ones, which may not replicate the room at all).
    let server_a = cluster.server(others[others.len() - 1]);
    let server_b = cluster.server(others[0]);
    let key = alice_key.clone();
    tokio::task::spawn_blocking(move || {
        process::send(&server_a, &key, ROOM, "through one node");
        process::send(&server_b, &key, ROOM, "through another");
    })
    .await
    .unwrap();

    let mut seen = Vec::new();
    while seen.len() < 2 {
        let event = tokio::time::timeout(Duration::from_secs(60), listening.next())
            .await
            .expect("a live message within a minute")
            .expect("session")
            .expect("not ended");
        if let Event::Message(m) = event {
            let plain = m.content.expect("verified");
            seen.push(String::from_utf8(plain.body).unwrap());
        }
    }
    assert_eq!(seen, ["through one node", "through another"]);

    // Membership lives on the room's partition's replicas; the other nodes
    // (two of five) ask a replica and say so.
    let shape = placement(n as u64);
    let (_, replicas) = shape.room(ROOM);
    for i in 0..n {
        let reply = cluster.admin(i).await.members(ROOM).await.expect("members");
        assert_eq!(reply.membership.expect("membership").members.len(), 2);
        let replica = replicas.contains(&NodeId(i as u64 + 1));
        assert_eq!(
            reply.read_path == "forwarded to a replica",
            !replica,
            "node {} ({}a replica): {}",
            i + 1,
            if replica { "" } else { "not " },
            reply.read_path
        );
    }

    // Every node answers history with the same two messages, in order.
    let histories = tokio::task::spawn_blocking(move || {
        (0..n)
            .map(|i| process::history(&cluster.server(i), &alice_key, ROOM))
            .collect::<Vec<_>>()
    })
    .await
    .unwrap();
    for h in &histories {
        let one = h.find("through one node").expect(h);
        let another = h.find("through another").expect(h);
        assert!(one < another, "{h}");
        assert_eq!(h, &histories[0]);
    }
}
