//! Cassandra in two datacenters: one Cassandra node per datacenter
//! (`cassandra.sh pair`), a keyspace with one replica in each
//! (`NetworkTopologyStrategy`), and a saferchat node in each datacenter
//! pinned to its own (routing and `LOCAL_QUORUM`, `LOCAL_*` meaning that
//! datacenter's replicas). Users on both sides chat; both nodes answer the
//! same history; each datacenter's Cassandra holds every message (each
//! node writes its own datacenter's copy) and the room's membership; a row
//! written in one datacenter alone is read in the other (Cassandra's own
//! replication). A node pinned to a datacenter the cluster does not have
//! refuses to start.

use std::time::{Duration, Instant};

use bytes::Bytes;
use saferchat_node::config::CassandraConfig;
use saferchat_node::message_id::IdGenerator;
use saferchat_node::storage::cassandra::CassandraStore;
use saferchat_node::storage::{ChatStore as _, Range, StoredMessage};
use saferchat_tests::cassandra::{self, PAIR_DATACENTERS, PAIR_REPLICATION};
use saferchat_tests::cluster::{Cluster, Options};
use saferchat_tests::process::{self, NodeProcess, fixture_key};

const KEYSPACE: &str = "saferchat_datacenters";
/// How long Cassandra may take to copy a row to the other datacenter on
/// a loaded machine (it is sent at once; this only bounds the wait).
const DEADLINE: Duration = Duration::from_secs(60);

/// The store settings of a node in datacenter `i` of the pair.
fn config(i: usize) -> CassandraConfig {
    cassandra::pair_config(i, KEYSPACE)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs the Cassandra pair: run scripts/test.sh or set SAFERCHAT_CASSANDRA_PAIR"]
async fn a_node_in_each_datacenter_chats_and_each_datacenters_cassandra_holds_everything() {
    let pair = cassandra::pair();
    let room = saferchat_node::storage::conformance::unique_room("dcs");
    let mut options = Options {
        datacenters: PAIR_DATACENTERS.iter().map(|d| (*d).to_owned()).collect(),
        ..Options::single_dc(0)
    };
    cassandra::on_pair(&mut options, KEYSPACE);
    let cluster = Cluster::start(options).await;
    for (i, dc) in PAIR_DATACENTERS.iter().enumerate() {
        let log = cluster.nodes[i].log_text();
        let ready = log
            .lines()
            .find(|l| l.contains("cassandra store ready"))
            .unwrap_or_else(|| panic!("node {} uses Cassandra: {log}", i + 1));
        assert!(
            ready.contains(&format!("\"datacenter\":\"{dc}\"")) && ready.contains(&pair[i]),
            "node {} is pinned to {dc} at {}: {ready}",
            i + 1,
            pair[i]
        );
    }

    // Members on both sides; each posts through the node of their own
    // datacenter.
    let dir = tempfile::tempdir().unwrap();
    let (alice, alice_handle) = fixture_key(dir.path(), "alice", 0);
    let (bob, bob_handle) = fixture_key(dir.path(), "bob", 1);
    let mut admin = cluster.admin(1).await;
    admin.create_chat(room.as_str()).await.expect("create");
    for handle in [&alice_handle, &bob_handle] {
        admin
            .add_user(room.as_str(), handle, None)
            .await
            .expect("add");
    }
    let sent = [
        (0, &alice, "the shipment left the dc1 dock"),
        (1, &bob, "received at the dc2 warehouse"),
        (0, &alice, "invoice follows from dc1"),
    ];
    let servers = [cluster.server(0), cluster.server(1)];
    let histories = {
        let (servers, name) = (servers.clone(), room.as_str().to_owned());
        let sent: Vec<(usize, std::path::PathBuf, &'static str)> = sent
            .iter()
            .map(|(i, k, t)| (*i, (*k).clone(), *t))
            .collect();
        let bob = bob.clone();
        let alice = alice.clone();
        tokio::task::spawn_blocking(move || {
            // Each registers their key through their own datacenter's
            // node, so the other's posts are sealed for them too.
            for (i, key) in [(0, &alice), (1, &bob)] {
                process::ok(&process::cli(
                    &servers[i],
                    Some(key),
                    &["members", &name],
                    None,
                ));
            }
            for (i, key, text) in &sent {
                process::send(&servers[*i], key, &name, text);
            }
            servers
                .iter()
                .map(|s| process::history(s, &bob, &name))
                .collect::<Vec<_>>()
        })
        .await
        .unwrap()
    };
    for h in &histories {
        let at: Vec<usize> = sent
            .iter()
            .map(|(_, _, text)| h.find(text).unwrap_or_else(|| panic!("{text:?} in {h}")))
            .collect();
        assert!(at.windows(2).all(|w| w[0] < w[1]), "in order: {h}");
        assert_eq!(h, &histories[0], "both nodes answer one history");
    }

    // Each datacenter's own Cassandra, read at LOCAL_QUORUM there (its one
    // replica): every message and the membership, once replicated.
    let mut timelines = Vec::new();
    for i in 0..2 {
        let store = CassandraStore::connect(&config(i))
            .await
            .unwrap_or_else(|e| panic!("connecting to {}: {e}", pair[i]));
        let deadline = Instant::now() + DEADLINE;
        let (rows, committed) = loop {
            let rows = saferchat_node::storage::history(&store, &room, Range::After(None), 100)
                .await
                .expect("read the timeline");
            let committed = store.load_room(&room).await.expect("read the room");
            let revision = committed.as_ref().map_or(0, |c| c.state.revision.0);
            if (rows.len() == sent.len() && revision == 5) || Instant::now() > deadline {
                break (rows, committed);
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        };
        assert_eq!(
            rows.len(),
            sent.len(),
            "{}'s Cassandra",
            PAIR_DATACENTERS[i]
        );
        let committed = committed.expect("the room's membership");
        assert_eq!(
            committed.state.revision.0, 5,
            "created, two members added, two keys"
        );
        assert_eq!(committed.state.members.len(), 2);
        assert!(
            committed.state.members.values().all(Option::is_some),
            "both keys"
        );
        timelines.push(
            rows.iter()
                .map(|m| (m.id, m.seq, m.envelope.clone()))
                .collect::<Vec<_>>(),
        );
        if i == 0 {
            let replication: std::collections::HashMap<String, String> = store
                .session()
                .query_unpaged(
                    "SELECT replication FROM system_schema.keyspaces WHERE keyspace_name = ?",
                    (KEYSPACE,),
                )
                .await
                .expect("keyspace")
                .into_rows_result()
                .expect("rows")
                .single_row::<(std::collections::HashMap<String, String>,)>()
                .expect("one keyspace")
                .0;
            assert!(
                replication["class"].ends_with("NetworkTopologyStrategy"),
                "{replication:?}"
            );
            assert_eq!(
                (replication.get("dc1"), replication.get("dc2")),
                (Some(&"1".to_owned()), Some(&"1".to_owned())),
                "{replication:?}"
            );
        }
    }
    assert_eq!(
        timelines[0], timelines[1],
        "the same rows in both datacenters"
    );
    let seqs: Vec<u64> = timelines[0].iter().map(|(_, seq, _)| *seq).collect();
    assert_eq!(seqs, [1, 2, 3], "numbered once, in order");

    // Both nodes write their own datacenter's copy of a post; what
    // Cassandra itself copies shows with a row written in one datacenter
    // alone, read back in the other.
    let stores = [
        CassandraStore::connect(&config(0)).await.expect("dc1"),
        CassandraStore::connect(&config(1)).await.expect("dc2"),
    ];
    let now_ms = i64::try_from(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis(),
    )
    .unwrap();
    for (from, to) in [(0, 1), (1, 0)] {
        let lone = saferchat_node::storage::conformance::unique_room("dcs-lone");
        let written = StoredMessage {
            room: lone.clone(),
            id: IdGenerator::default().next(now_ms, from as u64),
            seq: 1,
            envelope: Bytes::from(format!("written in {} only", PAIR_DATACENTERS[from])),
        };
        stores[from]
            .append(std::slice::from_ref(&written))
            .await
            .expect("append");
        let deadline = Instant::now() + DEADLINE;
        let read = loop {
            let read = saferchat_node::storage::history(&stores[to], &lone, Range::After(None), 10)
                .await
                .expect("read");
            if !read.is_empty() || Instant::now() > deadline {
                break read;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        assert_eq!(
            read,
            [written],
            "written in {}, read in {}",
            PAIR_DATACENTERS[from],
            PAIR_DATACENTERS[to]
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs the Cassandra pair: run scripts/test.sh or set SAFERCHAT_CASSANDRA_PAIR"]
async fn a_node_pinned_to_a_datacenter_the_cluster_lacks_refuses_to_start() {
    let pair = cassandra::pair();
    let dir = tempfile::tempdir().unwrap();
    let refused = NodeProcess::try_start(
        &dir.path().join("node"),
        &[
            ("SAFERCHAT_STORAGE", "cassandra"),
            ("SAFERCHAT_CASSANDRA_CONTACT_POINTS", pair[0].as_str()),
            ("SAFERCHAT_CASSANDRA_DATACENTER", "dc3"),
            ("SAFERCHAT_CASSANDRA_KEYSPACE", KEYSPACE),
            ("SAFERCHAT_CASSANDRA_REPLICATION", PAIR_REPLICATION),
            ("SAFERCHAT_CASSANDRA_CONNECT_WAIT_S", "5"),
        ],
    )
    .map(|_| ())
    .expect_err("a node pinned to dc3 started");
    assert!(
        refused.contains("dc3") && refused.contains("dc1") && refused.contains("dc2"),
        "the refusal names the datacenters: {refused}"
    );
}
