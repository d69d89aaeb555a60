//! The cluster map on three node processes: every node applies the same
//! map, the map's Raft group survives the loss of its leader and takes the
//! node back when it returns, and its messages cannot be sent in another
//! node's name.

use std::time::Duration;

use saferchat_proto::admin::ClusterStatusReply;
use saferchat_proto::peer::{self as pb, peer_client::PeerClient};
use saferchat_tests::cluster::{Cluster, Options};
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};

fn node_ids(s: &ClusterStatusReply) -> Vec<u64> {
    s.nodes.iter().map(|n| n.id).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_node_applies_one_map_and_the_group_outlives_its_leader() {
    let mut cluster = Cluster::start(Options::single_dc(3)).await;
    let first = cluster.map_created(0).await;
    assert_eq!(first.partitions, 256);
    assert_eq!(first.replicas_per_datacenter, 3);
    assert_eq!(node_ids(&first), vec![1, 2, 3]);
    assert!(first.nodes.iter().all(|n| n.map_role == "voter"));
    for i in 1..3 {
        let s = cluster
            .status_until(i, 60, "the same map", |s| s.epoch == 1 && s.map_leader != 0)
            .await;
        assert_eq!(node_ids(&s), node_ids(&first));
        assert_eq!(s.partitions, first.partitions);
    }

    // Kill the map's leader: the two others elect one of themselves and
    // keep the same map.
    let leader = cluster
        .status_until(0, 60, "agreement on the leader", |s| {
            s.map_leader != 0 && s.role != "candidate"
        })
        .await
        .map_leader;
    let old = usize::try_from(leader - 1).unwrap();
    cluster.kill(old);
    let survivors: Vec<usize> = (0..3).filter(|i| *i != old).collect();
    let mut new_leader = 0;
    for &i in &survivors {
        let s = cluster
            .status_until(i, 60, "a new map leader", |s| {
                s.map_leader != 0 && s.map_leader != leader && s.map_term > first.map_term
            })
            .await;
        assert_eq!(s.epoch, 1, "the map outlives its leader");
        if new_leader == 0 {
            new_leader = s.map_leader;
        }
    }

    // The old leader comes back as a follower of the group and still has the
    // map it applied before (from its own disk, then the group).
    cluster.restart(old);
    let back = cluster
        .status_until(old, 60, "following the new leader", |s| {
            s.map_leader != 0 && s.map_leader != leader && s.role == "follower"
        })
        .await;
    assert_eq!(back.epoch, 1);
    assert_eq!(node_ids(&back), vec![1, 2, 3]);
}

fn tls(dir: &std::path::Path, node: u64, target: u64) -> ClientTlsConfig {
    let ca = std::fs::read(dir.join("ca.pem")).expect("ca");
    let cert = std::fs::read(dir.join(format!("node-{node}.pem"))).expect("cert");
    let key = std::fs::read(dir.join(format!("node-{node}.key"))).expect("key");
    ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(ca))
        .domain_name(format!("n{target}.dc1.saferchat"))
        .identity(Identity::from_pem(cert, key))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_map_message_in_another_nodes_name_is_refused() {
    let cluster = Cluster::start(Options::single_dc(3)).await;
    let before = cluster.map_created(1).await;

    // Node 3's own certificate, a vote request naming node 1 as the
    // candidate at a far higher term: granted, it would depose the leader.
    let channel = Endpoint::from_shared(format!("https://{}", cluster.peer_addresses[1]))
        .unwrap()
        .tls_config(tls(&cluster.tls_dir, 3, 2))
        .unwrap()
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(10))
        .connect()
        .await
        .expect("connect to node 2");
    let mut client = PeerClient::new(channel);
    let forged = openraft::raft::VoteRequest::<u64>::new(
        openraft::Vote::new(before.map_term + 1_000, 1),
        None,
    );
    let refused = client
        .map_raft(pb::MapRaftCall {
            kind: pb::MapRaftKind::Vote.into(),
            body: serde_json::to_vec(&forged).unwrap().into(),
        })
        .await
        .expect_err("a vote request in node 1's name from node 3");
    assert_eq!(refused.code(), tonic::Code::PermissionDenied, "{refused:?}");
    assert!(refused.message().contains("node 3"), "{refused:?}");

    let garbage = client
        .map_raft(pb::MapRaftCall {
            kind: pb::MapRaftKind::AppendEntries.into(),
            body: b"{\"vote\":".to_vec().into(),
        })
        .await
        .expect_err("an append that does not decode");
    assert_eq!(garbage.code(), tonic::Code::InvalidArgument, "{garbage:?}");

    // The group never saw the forged term.
    let after = cluster
        .admin(1)
        .await
        .cluster_status()
        .await
        .expect("status");
    assert!(
        after.map_term < before.map_term + 1_000,
        "the forged term reached the group: {after:?}"
    );
}

/// A fourth node joins a running cluster of three through the map: it
/// holds no replica slot, yet serves admin calls, posts and history by
/// handing them to the nodes that do; removed again, its id is retired.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_joins_through_the_map_serves_clients_and_leaves_again() {
    use saferchat_tests::process::{self, fixture_key};

    let mut cluster = Cluster::start(Options::single_dc(3)).await;
    cluster.map_created(0).await;
    let four = cluster.start_joining(4, "dc1", 1).await;

    let joined = cluster
        .status_until(four, 60, "the map naming node 4", |s| {
            s.epoch == 2 && s.role == "learner"
        })
        .await;
    assert_eq!(node_ids(&joined), vec![1, 2, 3, 4]);
    // Every node's addresses are known, the creating node's own included
    // (from its bound listeners, where its configuration said port 0).
    for n in &joined.nodes {
        assert!(
            !n.peer_address.is_empty()
                && !n.client_address.is_empty()
                && !n.peer_address.ends_with(":0")
                && !n.client_address.ends_with(":0"),
            "{n:?}"
        );
    }
    let four_info = joined.nodes.iter().find(|n| n.id == 4).unwrap();
    assert_eq!(four_info.state, "joining");
    assert_eq!(four_info.map_role, "learner");
    for n in joined.nodes.iter().filter(|n| n.id != 4) {
        assert_eq!(n.state, "active");
    }
    for i in 0..3 {
        cluster
            .status_until(i, 60, "epoch 2", |s| s.epoch == 2)
            .await;
    }

    // Admin, posts and history through the node that holds nothing.
    let dir = tempfile::tempdir().unwrap();
    let (alice_key, alice) = fixture_key(dir.path(), "alice", 0);
    let mut admin = cluster.admin(four).await;
    admin
        .create_chat("team")
        .await
        .expect("create through node 4");
    admin
        .add_user("team", &alice, None)
        .await
        .expect("add through node 4");
    let members = admin.members("team").await.expect("members through node 4");
    assert_eq!(members.read_path, "forwarded to a replica");
    let through_four = cluster.server(four);
    let through_one = cluster.server(0);
    let key = alice_key.clone();
    let (h4, h1) = tokio::task::spawn_blocking(move || {
        process::send(
            &through_four,
            &key,
            "team",
            "posted through the joined node",
        );
        (
            process::history(&through_four, &key, "team"),
            process::history(&through_one, &key, "team"),
        )
    })
    .await
    .unwrap();
    assert!(h4.contains("posted through the joined node"), "{h4}");
    assert_eq!(h4, h1, "one history, whichever node is asked");

    // Its own store holds no room: the list is gathered from the nodes
    // that hold replicas, and refused when no replica of some partition
    // answers (it would be short).
    let mut admin = cluster.admin(four).await;
    let listed = admin.list_chats().await.expect("list through node 4");
    let names: Vec<&str> = listed.iter().map(|c| c.chat.as_str()).collect();
    assert_eq!(names, ["team"]);
    assert_eq!(listed[0].members, 1);
    for i in 0..3 {
        cluster.kill(i);
    }
    let short = admin
        .list_chats()
        .await
        .expect_err("a list with every replica down");
    assert!(
        short.to_string().contains("no replica that answered"),
        "{short}"
    );
    for i in 0..3 {
        cluster.restart(i);
    }

    // A node holding replica slots cannot be removed; the joined one can,
    // once stopped, and its id is never given out again.
    let refused = cluster
        .admin(0)
        .await
        .remove_node(2)
        .await
        .expect_err("removing a node with replica slots");
    assert!(
        refused.to_string().contains("holds replica slots"),
        "{refused}"
    );
    cluster.kill(four);
    let removed = cluster
        .admin(0)
        .await
        .remove_node(4)
        .await
        .expect("remove 4");
    assert_eq!(removed.epoch, 3);
    let after = cluster
        .status_until(2, 60, "epoch 3", |s| s.epoch == 3)
        .await;
    assert_eq!(node_ids(&after), vec![1, 2, 3]);
    let again = cluster
        .admin(2)
        .await
        .add_node(saferchat_proto::admin::AddNodeRequest {
            id: 4,
            datacenter: "dc1".into(),
            peer_address: "127.0.0.1:1".into(),
            client_address: "127.0.0.1:2".into(),
        })
        .await
        .expect_err("a retired id");
    assert!(again.to_string().contains("taken"), "{again}");
}

/// A node that was down while the map changed twice catches up when it
/// returns: from the group's log, through its learner or follower link.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_down_during_two_map_changes_catches_up() {
    let mut cluster = Cluster::start(Options::single_dc(3)).await;
    cluster
        .status_until(0, 60, "a created map with a leader", |s| {
            s.epoch == 1 && s.map_leader != 0 && s.role != "candidate"
        })
        .await;
    cluster.kill(2);
    let add = |id: u64| saferchat_proto::admin::AddNodeRequest {
        id,
        datacenter: "dc1".into(),
        peer_address: format!("127.0.0.1:{}", 9000 + id),
        client_address: format!("127.0.0.1:{}", 8000 + id),
    };
    // Two changes while node 3 is down (nodes 5 and 6 never run: the map
    // only records them).
    let mut admin = cluster.admin(0).await;
    assert_eq!(admin.add_node(add(5)).await.expect("add 5").epoch, 2);
    assert_eq!(admin.remove_node(5).await.expect("remove 5").epoch, 3);
    cluster.restart(2);
    let back = cluster
        .status_until(2, 60, "the map at epoch 3", |s| s.epoch == 3)
        .await;
    assert_eq!(node_ids(&back), vec![1, 2, 3]);
    // And it applies what comes next like the others.
    assert_eq!(admin.add_node(add(6)).await.expect("add 6").epoch, 4);
    for i in 0..3 {
        let s = cluster
            .status_until(i, 60, "epoch 4", |s| s.epoch == 4)
            .await;
        assert_eq!(node_ids(&s), vec![1, 2, 3, 6]);
    }
}
