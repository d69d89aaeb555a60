//! Three datacenters, one cut off from the other two, then healed.
//!
//! Six nodes, two in each of `dc1`, `dc2` and `dc3` (on the sled store;
//! every node replicates every partition). Room `X` is homed in `dc1`,
//! room `Z` in `dc3`. A listener in each room records what it is shown
//! live. Then `dc3` is cut off from the others (every peer link between
//! it and them blocked; clients still reach every node):
//!
//! - the majority side (`dc1` + `dc2`) keeps serving `X`: posts are
//!   acknowledged, and a membership change of `Z` goes through once the
//!   leases `dc3`'s replicas hold on `Z` have run out (the stall is
//!   printed);
//! - the cut-off side keeps serving `Z` (its home) while its membership
//!   lease lasts, then refuses posts with a status that says why;
//! - after healing, `Z` serves again, and every node's store holds the
//!   same history of each room: numbered 1..N without gaps or
//!   duplicates, every acknowledged post at its number, and everything a
//!   listener was shown live in the order and at the numbers it was shown.

use std::time::{Duration, Instant};

use bytes::Bytes;
use saferchat_client::session::{Event, Session};
use saferchat_consensus::RoomId;
use saferchat_node::storage::sled::SledStore;
use saferchat_node::storage::{self, Range};
use saferchat_tests::cluster::{Cluster, Options, room_homed};
use saferchat_tests::load;
use saferchat_tests::process::fixture_key;
use tokio::sync::oneshot;

const DEADLINE: Duration = Duration::from_secs(120);
/// Long enough that the cut-off side, on a loaded machine, still posts
/// under the lease it held when the cut came.
const LEASE_MS: u64 = 4_000;
/// Posts tried on the cut-off side before the test gives up waiting for a
/// refusal.
const CUT_OFF_POSTS_MAX: usize = 2_000;

fn options() -> Options {
    let mut options = Options::two_in_each_of_three();
    options.lease_ms = LEASE_MS;
    options.renew_ms = 1_000;
    options.metrics = true;
    options.env = vec![("SAFERCHAT_POSTS_PER_SECOND".into(), "0".into())];
    options
}

/// What a listener was shown live, `(room seq, id)` in order, until told
/// to stop or its session ended.
fn listen(
    mut session: Session,
) -> (
    oneshot::Sender<()>,
    tokio::task::JoinHandle<Vec<(u64, Bytes)>>,
) {
    let (stop, mut stopped) = oneshot::channel();
    let task = tokio::spawn(async move {
        let mut shown = Vec::new();
        loop {
            tokio::select! {
                _ = &mut stopped => return shown,
                event = session.next() => match event {
                    Ok(Some(Event::Message(m))) if !m.history => shown.push((m.seq, m.id)),
                    Ok(Some(_)) => {}
                    _ => return shown,
                },
            }
        }
    });
    (stop, task)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_datacenter_cut_off_serves_until_its_lease_ends_and_every_history_agrees() {
    let x = room_homed("cut", 0, 3);
    let z = room_homed("cut", 2, 3);
    let mut cluster = Cluster::start(options()).await;
    let (dc1, dc2, dc3) = ([0, 1], [2, 3], [4, 5]);
    let dir = tempfile::tempdir().unwrap();
    let (_, alice) = fixture_key(dir.path(), "alice", 0);
    let (_, bob) = fixture_key(dir.path(), "bob", 1);
    let (_, carol) = fixture_key(dir.path(), "carol", 2);
    let mut admin = cluster.admin(dc1[0]).await;
    for room in [&x, &z] {
        admin.create_chat(room).await.expect("create");
        admin.add_user(room, &alice, None).await.expect("add alice");
        admin.add_user(room, &bob, None).await.expect("add bob");
    }

    // Alice posts to X through dc2 and to Z through dc3; Bob listens to
    // X through dc2 and to Z through dc3.
    let mut in_x = cluster.join(&x, dc2[0], 0, DEADLINE).await;
    let mut in_z = cluster.join(&z, dc3[1], 0, DEADLINE).await;
    let x_leader = cluster.node_of(&in_x);
    let z_leader = cluster.node_of(&in_z);
    assert!(dc1.contains(&x_leader), "{x} is served at home, in dc1");
    assert!(dc3.contains(&z_leader), "{z} is served at home, in dc3");
    let (stop_x, shown_x) = listen(cluster.join(&x, dc2[1], 1, DEADLINE).await);
    let (stop_z, shown_z) = listen(cluster.join(&z, dc3[0], 1, DEADLINE).await);
    let mut acked_x = load::post_acked(&mut in_x, "x before", 20, DEADLINE).await;
    let mut acked_z = load::post_acked(&mut in_z, "z before", 20, DEADLINE).await;

    cluster.cut_off_datacenter("dc3");
    let cut = Instant::now();

    // The majority side, at once: a membership change of Z (by a majority
    // of its acceptors, in dc1 and dc2) waits until the leases dc3's
    // replicas hold on Z have run out, then goes through; X's posts go on.
    let mut admin = cluster.admin(dc1[0]).await;
    let majority = async {
        let change = Instant::now();
        loop {
            match admin.add_user(&z, &carol, None).await {
                Ok(_) => break,
                Err(e) => {
                    assert!(
                        change.elapsed() < DEADLINE,
                        "no membership change of {z}: {e}"
                    );
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
        let stalled = change.elapsed();
        let acked = load::post_acked(&mut in_x, "x while dc3 is cut off", 20, DEADLINE).await;
        (stalled, acked)
    };

    // The cut-off side: Z, homed there, goes on under the lease dc3 held,
    // then refuses.
    let cut_off = async {
        let mut acked = Vec::new();
        let mut refusal = None;
        let mut last_ack = cut;
        for i in 0..CUT_OFF_POSTS_MAX {
            let seq = in_z
                .post(format!("z cut off {i}").as_bytes())
                .await
                .unwrap();
            match load::outcome(&mut in_z, seq, DEADLINE).await {
                Ok(posted) => {
                    acked.push(posted);
                    last_ack = Instant::now();
                }
                Err(message) => {
                    refusal = Some(message);
                    break;
                }
            }
            assert!(
                cut.elapsed() < DEADLINE,
                "{z} was never refused while cut off"
            );
        }
        let refusal = refusal.expect("a refusal within the posts tried");
        (acked, last_ack - cut, refusal)
    };
    let ((stalled, more_x), (more_z, served_for, refusal)) = tokio::join!(majority, cut_off);
    acked_x.extend(more_x);
    let posted_while_cut = more_z.len();
    acked_z.extend(more_z);
    println!(
        "dc3 cut off: {z} acknowledged {posted_while_cut} posts in the first {:.1} s (lease {LEASE_MS} ms), then refused: {refusal}",
        served_for.as_secs_f64()
    );
    println!(
        "a membership change of {z} on the majority side, asked at the cut, took {:.1} s (once the leases dc3 held on it ran out)",
        stalled.as_secs_f64()
    );
    assert!(
        posted_while_cut > 0,
        "the cut-off side serves while its lease lasts"
    );
    assert!(
        refusal.contains("membership") || refusal.contains("quorum") || refusal.contains("lease"),
        "the refusal says why: {refusal}"
    );
    acked_x.extend(load::post_acked(&mut in_x, "x after the change", 10, DEADLINE).await);

    // Heal: Z serves again, everyone catches up.
    cluster.reconnect_datacenter("dc3");
    drop(in_z);
    let mut in_z = cluster.join(&z, dc3[1], 0, DEADLINE).await;
    acked_z.extend(load::post_acked(&mut in_z, "z after", 10, DEADLINE).await);
    acked_x.extend(load::post_acked(&mut in_x, "x after", 10, DEADLINE).await);
    let z_leader = cluster.node_of(&in_z);
    for i in 0..6 {
        cluster.wait_caught_up(&x, i, x_leader, 2 * DEADLINE).await;
        cluster.wait_caught_up(&z, i, z_leader, 2 * DEADLINE).await;
    }
    let _ = stop_x.send(());
    let _ = stop_z.send(());
    let shown_x = shown_x.await.unwrap();
    let shown_z = shown_z.await.unwrap();
    drop((in_x, in_z));

    for node in &mut cluster.nodes {
        assert!(node.stop(), "a clean stop");
    }
    // Every node's store, each room as (seq, id), oldest first.
    let mut stores: Vec<[Vec<(u64, Bytes)>; 2]> = Vec::new();
    for node in &cluster.nodes {
        let store = SledStore::open(&node.data_dir.join("db")).expect("open the store");
        let mut rooms = [Vec::new(), Vec::new()];
        for (k, room) in [&x, &z].into_iter().enumerate() {
            let room = RoomId::new(room).unwrap();
            rooms[k] = storage::history(&store, &room, Range::After(None), 10_000)
                .await
                .expect("read")
                .iter()
                .map(|m| (m.seq, Bytes::copy_from_slice(&m.id.to_bytes())))
                .collect();
        }
        stores.push(rooms);
    }
    let rooms = [(&x, &acked_x, &shown_x), (&z, &acked_z, &shown_z)];
    for (k, (room, acked, shown)) in rooms.into_iter().enumerate() {
        let history = &stores[0][k];
        for (i, node) in stores.iter().enumerate() {
            assert_eq!(
                &node[k],
                history,
                "node {} holds {room} as node 1 does",
                i + 1
            );
        }
        let seqs: Vec<u64> = history.iter().map(|(s, _)| *s).collect();
        assert_eq!(
            seqs,
            (1..=history.len() as u64).collect::<Vec<_>>(),
            "{room}: 1..N"
        );
        let mut ids: Vec<&Bytes> = history.iter().map(|(_, id)| id).collect();
        ids.sort();
        ids.dedup();
        assert_eq!(ids.len(), history.len(), "{room}: no id twice");
        for (id, seq) in acked {
            assert_eq!(
                &history[*seq as usize - 1].1,
                id,
                "{room}: acknowledged #{seq} kept"
            );
        }
        assert!(
            shown.windows(2).all(|w| w[0].0 < w[1].0),
            "{room}: shown live in order"
        );
        for (seq, id) in shown {
            assert_eq!(
                &history[*seq as usize - 1].1,
                id,
                "{room}: shown live as #{seq}, kept there"
            );
        }
        println!(
            "{room}: {} messages on every node, {} acknowledged, {} shown live",
            history.len(),
            acked.len(),
            shown.len()
        );
    }
}
