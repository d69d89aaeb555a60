//! Partition moves on real node processes: a fourth node joins three,
//! a rebalance moves partitions to it one replica slot at a time (grow,
//! rooms handed over, log established, shrink, …), then a drain moves
//! every slot off node 3, which is removed; rooms keep their posts and
//! members throughout, each post once and in order, and every node shows
//! the same history.

use saferchat_tests::cluster::{Cluster, Options};
use saferchat_tests::process::{self, fixture_key};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fourth_node_takes_its_partitions_and_every_post_stays() {
    let mut cluster = Cluster::start(Options::single_dc(3)).await;
    cluster
        .status_until(0, 60, "a created map", |s| {
            s.epoch == 1 && s.map_leader != 0
        })
        .await;
    let dir = tempfile::tempdir().unwrap();
    let (alice_key, alice) = fixture_key(dir.path(), "alice", 0);
    let mut admin = cluster.admin(0).await;
    for room in ["r1", "r2", "r3", "r4"] {
        admin.create_chat(room).await.expect("create");
        admin.add_user(room, &alice, None).await.expect("add");
    }
    let servers: Vec<String> = (0..3).map(|i| cluster.server(i)).collect();
    let key = alice_key.clone();
    let first = servers.clone();
    tokio::task::spawn_blocking(move || {
        for room in ["r1", "r2", "r3", "r4"] {
            for (i, server) in first.iter().enumerate() {
                process::send(server, &key, room, &format!("before {room} {i}"));
            }
        }
    })
    .await
    .unwrap();

    let four = cluster.start_joining(4, "dc1", 1).await;
    cluster
        .status_until(four, 60, "the map naming node 4", |s| {
            s.nodes.iter().any(|n| n.id == 4)
        })
        .await;
    let rebalanced = cluster.admin(0).await.rebalance().await.expect("rebalance");
    let done = cluster
        .status_until(0, 300, "every partition moved", |s| {
            s.epoch > rebalanced.epoch
                && s.moving_partitions == 0
                && s.unestablished_partitions == 0
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

    let mut every: Vec<String> = (0..3).map(|i| cluster.server(i)).collect();
    every.push(cluster.server(four));
    let key = alice_key.clone();
    let histories = tokio::task::spawn_blocking(move || {
        for room in ["r1", "r2", "r3", "r4"] {
            process::send(&every[3], &key, room, &format!("after {room} via 4"));
            process::send(&every[1], &key, room, &format!("after {room} via 2"));
        }
        let mut out = Vec::new();
        for room in ["r1", "r2", "r3", "r4"] {
            let seen: Vec<String> = every
                .iter()
                .map(|s| process::history(s, &key, room))
                .collect();
            out.push((room, seen));
        }
        out
    })
    .await
    .unwrap();
    for (room, seen) in histories {
        for (i, h) in seen.iter().enumerate() {
            assert_eq!(*h, seen[0], "{room}: node {} shows another history", i + 1);
        }
        let h = &seen[0];
        for line in (0..3)
            .map(|i| format!("before {room} {i}"))
            .chain([format!("after {room} via 4"), format!("after {room} via 2")])
        {
            assert_eq!(
                h.matches(line.as_str()).count(),
                1,
                "{room}: {line} once in {h}"
            );
        }
        let last_before = h.find(&format!("before {room} 2")).unwrap();
        let first_after = h.find(&format!("after {room} via 4")).unwrap();
        assert!(last_before < first_after, "{room}: in order: {h}");
    }

    // Drain node 3: its slots move to the others; then it can go.
    let drained = cluster.admin(0).await.drain(3).await.expect("drain");
    cluster
        .status_until(0, 300, "node 3 drained", |s| {
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
    let rest: Vec<String> = [0, 1, four].iter().map(|i| cluster.server(*i)).collect();
    let key = alice_key.clone();
    let histories = tokio::task::spawn_blocking(move || {
        for room in ["r1", "r2", "r3", "r4"] {
            process::send(&rest[0], &key, room, &format!("drained {room}"));
        }
        ["r1", "r2", "r3", "r4"]
            .iter()
            .map(|room| {
                let seen: Vec<String> = rest
                    .iter()
                    .map(|s| process::history(s, &key, room))
                    .collect();
                (*room, seen)
            })
            .collect::<Vec<_>>()
    })
    .await
    .unwrap();
    for (room, seen) in histories {
        for h in &seen {
            assert_eq!(*h, seen[0], "{room}: one history on the three nodes left");
        }
        for line in (0..3).map(|i| format!("before {room} {i}")).chain([
            format!("after {room} via 4"),
            format!("after {room} via 2"),
            format!("drained {room}"),
        ]) {
            assert_eq!(
                seen[0].matches(line.as_str()).count(),
                1,
                "{room}: {line} once"
            );
        }
    }
}
