//! A lost home datacenter, and its partitions' homes moved elsewhere.
//!
//! Six nodes, two in each of `dc1` (nodes 1-2), `dc2` (3-4) and `dc3`
//! (5-6), on the sled store; every node replicates every partition, so a
//! partition's two replicas at home vote on its log and its four others
//! follow it, a majority of its replicas outside any one datacenter: its
//! home can fail over, and its leaders release posts only under a home
//! lease. Room `X` is homed in `dc1`. Then:
//!
//! - posts to `X` through `dc2`, at the local level and then at the
//!   cross-datacenter level, are acknowledged;
//! - every node of `dc1` is killed at once, right after the last
//!   acknowledgement: `X` is refused (its voters are gone, and its home
//!   does not move by itself);
//! - `saferchat cluster move-homes --from dc1 --to dc2` (the admin API's
//!   `MoveHomes`): `X` serves again through `dc2` and `dc3` once a leader
//!   in `dc2` was elected by every survivor (each waits out the grants it
//!   gave `dc1`'s leader first), and the map records the move established;
//!   the time from the command to the first acknowledged post is printed;
//!   the leader vouched for the three other survivors' timelines (they
//!   had all promised it, untouched), so none of them checks its own
//!   (when two survivors campaigned at once and the first wrote before
//!   it was deposed, the second vouches for no one, and the others check
//!   by reading: the test says which happened);
//! - both nodes of the new home restart (from a map snapshot that holds
//!   the moves) and serve `X` again;
//! - `dc1` comes back on its data; its nodes learn the moves from the
//!   map, check their copies of `X`'s partition against the new home's
//!   and follow it;
//! - every post acknowledged before the loss is kept at its number (the
//!   cross-datacenter posts came last, and one of them holds every slot
//!   before it on a majority of another datacenter); every node's store
//!   holds the same history of `X`, numbered 1..N, no id twice.
//!
//! And with `dc1` alive behind a cut rather than dead, its homes moved
//! the moment the cut comes, while clients post on both sides: `dc1` goes
//! on acknowledging under the leases it held, then refuses with a status
//! that says why; the new home acknowledges only after that (the fence:
//! every survivor waits out the grants it gave `dc1`'s leader before it
//! promises the new home), and `dc1`'s leader reports its home lease
//! lapsed. What `dc1` acknowledged at the local level
//! after the cut is the level's loss window: the test counts it, and
//! checks that every post acknowledged at the cross-datacenter level, and
//! every post the new home acknowledged, is kept. Then the cut heals:
//! `dc1`'s nodes, whose timelines hold posts the new home replaced (a
//! divergent tail), check them against the new home's, cut them back,
//! copy the rest and follow the new home; in the end all six nodes hold
//! the same history, and `dc1`'s leader cut at least the posts it had
//! acknowledged that were lost.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use saferchat_client::history::{self, Query};
use saferchat_client::{ClientError, JoinOptions, Session, test_keys};
use saferchat_consensus::RoomId;
use saferchat_node::storage::sled::SledStore;
use saferchat_node::storage::{self, Range};
use saferchat_proto::chat::Durability;
use saferchat_tests::cluster::{Cluster, Options, room_homed};
use saferchat_tests::load;
use saferchat_tests::process::{self, fixture_key};

const DEADLINE: Duration = Duration::from_secs(120);
const DC1: [usize; 2] = [0, 1];
const SURVIVORS: [usize; 4] = [2, 3, 4, 5];
const ALL: [usize; 6] = [0, 1, 2, 3, 4, 5];

/// Posts tried on the cut-off side before the test gives up waiting for
/// a refusal.
const CUT_OFF_POSTS_MAX: usize = 2_000;

fn options() -> Options {
    let mut options = Options::two_in_each_of_three();
    options.metrics = true;
    options.env = vec![("SAFERCHAT_POSTS_PER_SECOND".into(), "0".into())];
    options
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_home_datacenter_fails_over_and_keeps_what_was_acknowledged() {
    let x = room_homed("failover", 0, 3);
    let mut cluster = Cluster::start(options()).await;
    let dir = tempfile::tempdir().unwrap();
    let (_, alice) = fixture_key(dir.path(), "alice", 0);
    let mut admin = cluster.admin(SURVIVORS[0]).await;
    admin.create_chat(&x).await.expect("create");
    admin.add_user(&x, &alice, None).await.expect("add alice");

    let mut in_x = cluster.join(&x, SURVIVORS[0], 0, DEADLINE).await;
    assert!(
        DC1.contains(&cluster.node_of(&in_x)),
        "{x} is served at home, in dc1"
    );
    let mut acked = load::post_acked(&mut in_x, "local", 20, DEADLINE).await;
    // Every survivor applied some of it (a learner far behind that
    // applied nothing is not vouched for: see `wait_vouched`); what the
    // next posts reach there before dc1 goes is left to chance.
    for i in SURVIVORS {
        wait_applied_some(&cluster, i, &x).await;
    }
    in_x.set_durability(Durability::CrossDatacenter);
    acked.extend(load::post_acked(&mut in_x, "cross", 10, DEADLINE).await);
    for i in DC1 {
        cluster.kill(i);
    }
    drop(in_x);

    // Its home is gone and does not move by itself.
    let refused = cluster.try_join(&x, SURVIVORS[0], 0).await;
    assert!(
        refused.is_err(),
        "{x} is not served while its home is lost and not moved"
    );

    let moved_at = Instant::now();
    let moved = admin
        .move_homes("dc1", "dc2", Vec::new())
        .await
        .expect("move the homes of dc1's partitions to dc2");
    assert!(!moved.moved.is_empty(), "partitions moved: {moved:?}");
    assert!(
        moved.refused.is_empty(),
        "no partition refused: {:?}",
        moved.refused
    );
    let partition = saferchat_placement::PartitionCount::DEFAULT.of_room(&x).0;
    assert!(moved.moved.contains(&partition), "{x}'s partition moved");

    // Served again, through the new home and through dc3.
    let mut in_x = cluster.join(&x, SURVIVORS[2], 0, DEADLINE).await;
    let first = load::post_acked(&mut in_x, "after the move", 1, DEADLINE).await;
    let took = moved_at.elapsed();
    acked.extend(first);
    let owner = cluster.node_of(&in_x);
    assert!(
        [2, 3].contains(&owner),
        "{x} is served by its new home, dc2 (node {})",
        owner + 1
    );
    acked.extend(load::post_acked(&mut in_x, "after the move", 20, DEADLINE).await);
    println!(
        "{} partitions moved from dc1 to dc2; the first post to {x} was acknowledged {:.1} s after the command",
        moved.moved.len(),
        took.as_secs_f64()
    );
    let established = cluster
        .status_until(SURVIVORS[1], 120, "every moved home established", |s| {
            s.epoch > moved.epoch && s.failing_over_partitions == 0
        })
        .await;
    assert_eq!(
        established.moved_homes as usize,
        moved.moved.len(),
        "the moved homes stay moved"
    );
    // The new home's leader was elected by all four survivors (a majority
    // of the six), each of which had applied the partition and owed only
    // this failover's check: it vouched for the three others, which need
    // no check against it (unless a rival leader of the epoch wrote
    // first).
    wait_vouched(&cluster, &x).await;

    // Both voters of the new home restart: they start from their last
    // map snapshot, which holds the moves, and must run the moved
    // partitions as voters of the new home (a node that took its
    // configured placement would see dc1's dead nodes as the voters).
    drop(in_x);
    for i in [2, 3] {
        cluster.kill(i);
    }
    for i in [2, 3] {
        tokio::task::block_in_place(|| cluster.restart(i));
    }
    let mut in_x = cluster.join(&x, SURVIVORS[3], 0, DEADLINE).await;
    acked.extend(load::post_acked(&mut in_x, "after the restart", 10, DEADLINE).await);
    let owner = cluster.node_of(&in_x);
    assert!(
        [2, 3].contains(&owner),
        "still served by dc2 (node {})",
        owner + 1
    );

    drop(in_x);

    // dc1 comes back on its data: its nodes learn the moves from the map,
    // check their copies against the new home's and follow it.
    for i in DC1 {
        cluster.restart(i);
    }
    let mut back = cluster.join(&x, DC1[1], 0, DEADLINE).await;
    acked.extend(load::post_acked(&mut back, "dc1 is back", 5, DEADLINE).await);
    let owner = cluster.node_of(&back);
    assert!(
        [2, 3].contains(&owner),
        "still served by dc2 (node {})",
        owner + 1
    );
    for i in DC1 {
        wait_checked(&cluster, i, &x).await;
    }
    for i in ALL {
        cluster.wait_caught_up(&x, i, owner, 2 * DEADLINE).await;
    }
    drop(back);
    let stores = stores_of(&mut cluster, &ALL, &x).await;
    let history = one_history(&stores, &ALL, &acked, &x);
    println!(
        "{x}: {} messages on every node, dc1's returned ones included; {} acknowledged, all kept",
        history.len(),
        acked.len()
    );
}

/// Waits until node `i` checked its copy of `room`'s partition against
/// the partition's new home.
async fn wait_checked(cluster: &Cluster, i: usize, room: &str) {
    wait_partition_counts(
        cluster,
        i,
        room,
        "saferchat_partition_failover_checks_total",
        2 * DEADLINE,
        "never checked its timeline against the new home's",
    )
    .await;
}

/// Waits until node `i` applied at least one slot of `room`'s partition.
async fn wait_applied_some(cluster: &Cluster, i: usize, room: &str) {
    wait_partition_counts(
        cluster,
        i,
        room,
        "saferchat_partition_applied_slot",
        DEADLINE,
        "applied nothing",
    )
    .await;
}

/// Waits (polling every 200 ms, up to `deadline`) until node `i`
/// reports `metric` of `room`'s partition at 1 or more; the panic says
/// the node `never` did what it counts.
async fn wait_partition_counts(
    cluster: &Cluster,
    i: usize,
    room: &str,
    metric: &str,
    deadline: Duration,
    never: &str,
) {
    let partition = saferchat_placement::PartitionCount::DEFAULT.of_room(room).0;
    let series = format!("{metric}{{partition=\"{partition}\"}}");
    let started = Instant::now();
    while !process::scrape_value(cluster.metrics[i], &series)
        .await
        .is_some_and(|n| n >= 1.0)
    {
        assert!(
            started.elapsed() < deadline,
            "node {} {never} ({room})",
            i + 1
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Waits until the leader that established `room`'s new home recorded
/// how many survivors it vouched for, and until each other survivor
/// either skipped its check on that word or checked by reading a checked
/// replica's timeline; checks that exactly the vouched ones skipped.
///
/// The leader was elected by all four survivors, each of which had
/// applied some of the partition and owed only this failover's check: it
/// vouches for the three others, unless an earlier leader of the epoch
/// wrote to some promiser's log first (two survivors campaigned at once).
/// Then it vouches for no one, by design, and the test says so and
/// asserts that more than one survivor led the epoch.
async fn wait_vouched(cluster: &Cluster, room: &str) {
    let partition = saferchat_placement::PartitionCount::DEFAULT.of_room(room).0;
    let gauge =
        format!("saferchat_partition_failover_vouched_replicas{{partition=\"{partition}\"}}");
    let vouched =
        format!("saferchat_partition_failover_checks_vouched_total{{partition=\"{partition}\"}}");
    let checks = format!("saferchat_partition_failover_checks_total{{partition=\"{partition}\"}}");
    let started = Instant::now();
    let (leader, promised) = loop {
        let mut found = None;
        for i in SURVIVORS {
            if let Some(n) = process::scrape_value(cluster.metrics[i], &gauge).await {
                found = Some((i, n as usize));
            }
        }
        if let Some(found) = found {
            break found;
        }
        assert!(
            started.elapsed() < DEADLINE,
            "no survivor reports that it established the new home of {room}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let others: Vec<usize> = SURVIVORS.into_iter().filter(|&i| i != leader).collect();
    loop {
        let mut skipped = Vec::new();
        let mut read = Vec::new();
        for &i in &others {
            let done = |n: Option<f64>| n.is_some_and(|n| n >= 1.0);
            if done(process::scrape_value(cluster.metrics[i], &vouched).await) {
                skipped.push(i);
            }
            if done(process::scrape_value(cluster.metrics[i], &checks).await) {
                read.push(i);
            }
        }
        if skipped.len() + read.len() >= others.len() {
            assert!(
                skipped.iter().all(|i| !read.contains(i)),
                "a vouched-for survivor also read a timeline: skipped {skipped:?}, read {read:?}"
            );
            assert_eq!(
                skipped.len(),
                promised,
                "node {} vouched for {promised} survivors, but {skipped:?} skipped their checks",
                leader + 1
            );
            break;
        }
        assert!(
            started.elapsed() < 2 * DEADLINE,
            "the survivors other than node {} neither skipped nor ran their checks: skipped {skipped:?}, read {read:?}",
            leader + 1
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    if promised < others.len() {
        let leaders: usize = SURVIVORS
            .into_iter()
            .map(|i| led(&cluster.nodes[i].log_text(), partition))
            .sum();
        println!(
            "node {} vouched for {promised} of the other survivors: {leaders} terms led the partition before it was established",
            leader + 1
        );
        assert!(
            leaders >= 2,
            "node {} vouched for {promised} of {} survivors though it was the only leader of the epoch",
            leader + 1,
            others.len()
        );
    }
}

/// How many terms of `partition` the node whose log is `log` led.
fn led(log: &str, partition: u32) -> usize {
    log.lines()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .filter(|line| {
            line["fields"]["message"] == "leading the partition"
                && line["fields"]["partition"] == u64::from(partition)
        })
        .count()
}

/// Each node's own store of `room` (surviving nodes `which`, stopped
/// cleanly first), as `(seq, id)`, oldest first.
async fn stores_of(cluster: &mut Cluster, which: &[usize], room: &str) -> Vec<Vec<(u64, Bytes)>> {
    for &i in which {
        assert!(cluster.nodes[i].stop(), "node {} stops cleanly", i + 1);
    }
    let room = RoomId::new(room).unwrap();
    let mut stores = Vec::new();
    for &i in which {
        let store = SledStore::open(&cluster.nodes[i].data_dir.join("db")).expect("open");
        stores.push(
            storage::history(&store, &room, Range::After(None), 10_000)
                .await
                .expect("read")
                .iter()
                .map(|m| (m.seq, Bytes::copy_from_slice(&m.id.to_bytes())))
                .collect(),
        );
    }
    stores
}

/// The history every store holds alike, checked: numbered 1..N, no id
/// twice, every post of `kept` at its number.
fn one_history<'a>(
    stores: &'a [Vec<(u64, Bytes)>],
    which: &[usize],
    kept: &[(Bytes, u64)],
    room: &str,
) -> &'a [(u64, Bytes)] {
    let history = &stores[0];
    for (k, store) in stores.iter().enumerate() {
        assert_eq!(
            store,
            history,
            "node {} holds {room} as node {} does",
            which[k] + 1,
            which[0] + 1
        );
    }
    let seqs: Vec<u64> = history.iter().map(|(s, _)| *s).collect();
    assert_eq!(seqs, (1..=history.len() as u64).collect::<Vec<_>>(), "1..N");
    let ids: HashSet<&Bytes> = history.iter().map(|(_, id)| id).collect();
    assert_eq!(ids.len(), history.len(), "no id twice");
    for (id, seq) in kept {
        assert_eq!(
            &history[*seq as usize - 1].1,
            id,
            "acknowledged #{seq} kept"
        );
    }
    history
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_home_cut_off_and_moved_is_fenced_before_the_new_home_acknowledges() {
    let x = room_homed("fenced", 0, 3);
    // Leases long enough that dc1, on a loaded machine, still posts under
    // the ones it held when the cut came.
    let mut options = options();
    options.lease_ms = 4_000;
    options.renew_ms = 1_000;
    let mut cluster = Cluster::start(options).await;
    let dir = tempfile::tempdir().unwrap();
    let (_, alice) = fixture_key(dir.path(), "alice", 0);
    let (_, bob) = fixture_key(dir.path(), "bob", 1);
    let mut admin = cluster.admin(SURVIVORS[0]).await;
    admin.create_chat(&x).await.expect("create");
    admin.add_user(&x, &alice, None).await.expect("add alice");
    admin.add_user(&x, &bob, None).await.expect("add bob");

    // Alice posts through dc1, where X is homed; the cross-datacenter
    // posts come last before the cut.
    let mut old_side = cluster.join(&x, DC1[1], 0, DEADLINE).await;
    assert!(
        DC1.contains(&cluster.node_of(&old_side)),
        "{x} is served in dc1"
    );
    let mut kept = load::post_acked(&mut old_side, "before", 10, DEADLINE).await;
    old_side.set_durability(Durability::CrossDatacenter);
    kept.extend(load::post_acked(&mut old_side, "before, across", 5, DEADLINE).await);
    old_side.set_durability(Durability::Local);

    cluster.cut_off_datacenter("dc1");
    let cut = Instant::now();
    let moved = admin
        .move_homes("dc1", "dc2", Vec::new())
        .await
        .expect("move the homes of dc1's partitions to dc2");
    assert!(moved.refused.is_empty(), "{:?}", moved.refused);

    // The old side posts until it is refused; the new side, Bob through
    // dc3, until its first post is acknowledged.
    let old = async {
        let mut acked = Vec::new();
        let mut last_ack = None;
        for i in 0..CUT_OFF_POSTS_MAX {
            let seq = old_side
                .post(format!("cut off {i}").as_bytes())
                .await
                .unwrap();
            match load::outcome(&mut old_side, seq, DEADLINE).await {
                Ok(posted) => {
                    acked.push(posted);
                    last_ack = Some(Instant::now());
                }
                Err(refusal) => return (acked, last_ack, refusal),
            }
            assert!(
                cut.elapsed() < DEADLINE,
                "dc1 was never refused while cut off"
            );
        }
        panic!("dc1 was never refused within {CUT_OFF_POSTS_MAX} posts");
    };
    let new = async {
        let mut session = cluster.join(&x, SURVIVORS[2], 1, DEADLINE).await;
        let first = load::post_acked(&mut session, "new home", 1, DEADLINE).await;
        (session, first, Instant::now())
    };
    let ((old_acked, old_last, refusal), (mut new_side, first, new_first)) = tokio::join!(old, new);
    println!(
        "dc1 cut off and moved: it acknowledged {} posts after the cut, the last {:.1} s after it, then refused: {refusal}; the new home's first acknowledgement came {:.1} s after the cut",
        old_acked.len(),
        old_last.map_or(0.0, |t| (t - cut).as_secs_f64()),
        (new_first - cut).as_secs_f64()
    );
    assert!(
        refusal.contains("lease") || refusal.contains("membership") || refusal.contains("quorum"),
        "the refusal says why: {refusal}"
    );
    if let Some(old_last) = old_last {
        assert!(
            old_last < new_first,
            "the old home acknowledged nothing after the new home did"
        );
    }
    // Whichever refusal the old side's client met first (its membership
    // lease has the same timing), dc1's leader of the room's partition
    // lost its home lease and said so.
    let series = "saferchat_partition_home_lease_lapses_total";
    let lapsed = Instant::now();
    loop {
        let mut lapses = 0.0;
        for i in DC1 {
            lapses += process::scrape_value(cluster.metrics[i], series)
                .await
                .unwrap_or(0.0);
        }
        if lapses >= 1.0 {
            break;
        }
        assert!(
            lapsed.elapsed() < DEADLINE,
            "no leader in dc1 reported its home lease lapsed"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let owner = cluster.node_of(&new_side);
    assert!(
        [2, 3].contains(&owner),
        "served by dc2 (node {})",
        owner + 1
    );
    kept.extend(first);
    kept.extend(load::post_acked(&mut new_side, "new home", 20, DEADLINE).await);
    new_side.set_durability(Durability::CrossDatacenter);
    kept.extend(load::post_acked(&mut new_side, "new home, across", 5, DEADLINE).await);
    cluster
        .status_until(SURVIVORS[1], 120, "every moved home established", |s| {
            s.epoch > moved.epoch && s.failing_over_partitions == 0
        })
        .await;
    for i in SURVIVORS {
        cluster.wait_caught_up(&x, i, owner, 2 * DEADLINE).await;
    }
    drop((old_side, new_side));

    // The cut heals. A post through dc1 goes to the new home, and dc1's
    // nodes, told of the leader, check their copies against its.
    cluster.reconnect_datacenter("dc1");
    let healed = Instant::now();
    let mut back = cluster.join(&x, DC1[0], 0, DEADLINE).await;
    kept.extend(load::post_acked(&mut back, "healed", 5, DEADLINE).await);
    let owner = cluster.node_of(&back);
    assert!(
        [2, 3].contains(&owner),
        "served by the new home (node {})",
        owner + 1
    );
    let mut cut_by_dc1 = Vec::new();
    for i in DC1 {
        wait_checked(&cluster, i, &x).await;
        cut_by_dc1.push(
            process::scrape_value(
                cluster.metrics[i],
                "saferchat_partition_divergent_posts_cut_total",
            )
            .await
            .unwrap_or(0.0),
        );
    }
    println!(
        "dc1 checked {x} {:.1} s after the heal, its nodes cut {cut_by_dc1:?} posts",
        healed.elapsed().as_secs_f64()
    );
    for i in ALL {
        cluster.wait_caught_up(&x, i, owner, 2 * DEADLINE).await;
    }
    resume_after_lost_posts(&cluster, &back, &x, &old_acked, &kept).await;
    drop(back);

    let stores = stores_of(&mut cluster, &ALL, &x).await;
    let history = one_history(&stores, &ALL, &kept, &x);
    let ids: HashSet<&Bytes> = history.iter().map(|(_, id)| id).collect();
    let lost = old_acked.iter().filter(|(id, _)| !ids.contains(id)).count();
    println!(
        "{x}: {} messages on every node; of {} local posts dc1 acknowledged after the cut, {lost} are lost (the local level's window); every other acknowledged post is kept",
        history.len(),
        old_acked.len()
    );
    assert!(
        cut_by_dc1.iter().any(|cut| *cut >= lost as f64),
        "dc1's leader cut the {lost} lost posts it had applied ({cut_by_dc1:?})"
    );
}

/// Alice's client was told its posts of the window were acknowledged (a
/// listener would have been shown them): reading on after one that was
/// lost, through `dc1`, by a join or by History, is refused (it would
/// otherwise be sent what follows the lost post in id order, and never
/// what the new home placed from its number on); after a kept post it
/// works.
async fn resume_after_lost_posts(
    cluster: &Cluster,
    session: &Session,
    room: &str,
    old_acked: &[(Bytes, u64)],
    kept: &[(Bytes, u64)],
) {
    let mut held = HashSet::new();
    let mut before = None;
    loop {
        let query = Query {
            before_id: before.clone(),
            limit: 1000,
            ..Query::default()
        };
        let page = history::read(session, &query).await.expect("history");
        let Some(last) = page.last() else { break };
        before = Some(last.id.clone());
        held.extend(page.into_iter().map(|m| m.id));
    }
    let id = RoomId::new(room).unwrap();
    let alice = Arc::new(test_keys::identity(0));
    let resume = |(after, seq): &(Bytes, u64)| {
        let options = JoinOptions {
            after_id: Some(after.clone()),
            after_seq: *seq,
            ..JoinOptions::default()
        };
        let (server, id, alice) = (cluster.server(DC1[0]), id.clone(), Arc::clone(&alice));
        async move { Session::join(&server, &id, alice, &options).await }
    };
    let refused = |what: &str, outcome: Result<(), ClientError>| match outcome {
        Err(ClientError::Status(s))
            if s.code() == tonic::Code::FailedPrecondition && s.message().contains("was cut") => {}
        other => panic!("{what} after a lost post is refused, not {other:?}"),
    };
    match old_acked.iter().find(|(id, _)| !held.contains(id)) {
        Some(lost) => {
            refused("a join", resume(lost).await.map(drop));
            let (id, seq) = lost;
            let query = Query {
                after_id: Some(id.clone()),
                after_seq: *seq,
                limit: 10,
                ..Query::default()
            };
            refused("History", history::read(session, &query).await.map(drop));
            println!(
                "reading on after the lost post #{seq} of dc1's window was refused (a join and History)"
            );
        }
        None => println!(
            "no acknowledged post was lost in this run: reading on after one was not tried"
        ),
    }
    resume(&kept[0])
        .await
        .expect("a join reading on after a kept post");
}
