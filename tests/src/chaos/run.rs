//! Plays a [`schedule`](super::schedule) against node processes while
//! members post and listen, then records what everyone ended with.
//!
//! Members `0..MEMBERS` each post through one node (moving to the next
//! when it fails) and listen through another. A post ends acknowledged,
//! refused, or unknown (no answer within [`POST_TIMEOUT`]); unknown posts
//! are not retried, so each text is posted once. After the schedule every
//! fault is undone, the room's history is read through the cluster, the
//! nodes stop cleanly and each node's own store is read from disk.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use saferchat_consensus::RoomId;
use saferchat_envelope::Envelope;
use saferchat_node::storage::cassandra::CassandraStore;
use saferchat_node::storage::sled::SledStore;
use saferchat_node::storage::{self, Range};

use super::history::{History, Outcome, Seen, Window};
use super::linear::Operation;
use super::membership::{MemberOp, State};
use super::schedule::{
    Clocks, Fault, Kinds, Step, Store, datacenter_name, datacenter_of, schedule_with,
};
use crate::cassandra::PrivateCassandra;
use crate::cluster::{Cluster, Options};
use crate::load::{self, identity, join_any};
use crate::netns::Loss;
use crate::netproxy::{Link, Tap};

/// Members posting and listening.
pub const MEMBERS: usize = 3;
/// A member who listens and is removed part-way through the faults (the
/// fixture key after the posters').
pub const REMOVED: usize = MEMBERS;
pub use crate::load::POST_TIMEOUT;
/// How long the cluster may take to serve again once every fault is
/// undone.
pub const RECOVERY_MAX: Duration = Duration::from_secs(120);
const ROOM: &str = "chaos";
/// Messages read per history page at the end.
const PAGE: u32 = 1000;

/// One chaos run.
#[derive(Clone, Copy, Debug)]
pub struct Plan {
    /// The schedule's seed.
    pub seed: u64,
    /// Nodes in the cluster.
    pub nodes: usize,
    /// How long faults are injected.
    pub duration: Duration,
    /// Clock faults within the drift bound or beyond it.
    pub clocks: Clocks,
    /// The nodes' timeline store, and with it the store faults.
    pub store: Store,
    /// Full disks: every node's data folder on a small tmpfs (root only).
    pub disk: bool,
    /// Three datacenters (`dc1` to `dc3`, the nodes spread evenly in
    /// order), whole ones killed and cut off.
    pub datacenters: bool,
    /// With `datacenters`: the room's home cut off and moved now and then
    /// ([`Fault::MoveHome`]).
    pub moves: bool,
}

/// How long before the room's home is cut off a post its old home
/// acknowledged at the local level may still be missing from every other
/// datacenter: the start of a loss window. Generous: the learners in the
/// other datacenters normally hold a post milliseconds after it, but a
/// loaded machine under the schedule's earlier faults (slow links, a
/// paused node just resumed) may leave them seconds behind.
pub const LOSS_LAG: Duration = Duration::from_secs(10);

/// How long after the cut the old home's leader may still release a post:
/// its home lease lasts [`crate::cluster::Options`]' `lease_ms` (1 s)
/// from the last grant it got, plus what its clock may drift within the
/// bound (negligible), plus a margin for a grant in flight through the
/// proxies as the cut came. A post sent later cannot be released by it.
const LEASE_RUNS_OUT: Duration = Duration::from_millis(1_500);

/// How long a home move may take to be accepted by the cluster map (the
/// map's own leader may be in the datacenter just cut off).
const MOVE_MAX: Duration = Duration::from_secs(10);

/// One [`Fault::MoveHome`].
#[derive(Clone, Debug)]
pub struct HomeMove {
    /// From which datacenter (0-based) to which.
    pub from: usize,
    /// To which.
    pub to: usize,
    /// How long after the cut the map accepted the move; `None` when it
    /// did not within [`MOVE_MAX`] (the home then stayed).
    pub accepted_after: Option<Duration>,
    /// Why, when it did not.
    pub refused: Vec<String>,
    /// When the home was cut off.
    pub cut: Instant,
    /// When it was reconnected.
    pub rejoined: Option<Instant>,
}

/// What a run did and saw.
#[derive(Debug)]
pub struct Outcomes {
    /// The schedule played.
    pub steps: Vec<Step>,
    /// What the clients saw.
    pub history: History,
    /// Messages clients could not verify or decrypt (there must be none).
    pub unreadable: Vec<String>,
    /// Files under the data folders or logs that hold a posted text.
    pub plaintext_in: Vec<PathBuf>,
    /// What the wire capture saw: bytes between the processes, and posted
    /// texts among them (there must be none).
    pub wire: Wire,
    /// The room's membership before the faults.
    pub initial: State,
    /// Membership changes and reads during the run (times in µs from the
    /// start).
    pub membership: Vec<Operation<MemberOp>>,
    /// The removal of member [`REMOVED`], when it was acknowledged.
    pub removal: Option<Removal>,
    /// The plan's clock faults.
    pub clocks: Clocks,
    /// Whether loss faults dropped packets (inside the test's own network
    /// namespace) or were skipped.
    pub loss_applied: bool,
    /// Packets the loss faults dropped.
    pub packets_dropped: u64,
    /// The home moves played.
    pub moves: Vec<HomeMove>,
    /// When the fault window started: the clock of [`HomeMove`] and of
    /// the posts' answers.
    pub started: Instant,
    /// The same moment in Unix milliseconds: the clock of the nodes' logs.
    pub started_unix_ms: u128,
    /// Nodes that still owed a failover's check when the run ended
    /// (after [`RECOVERY_MAX`]), with how many partitions.
    pub unsettled: Vec<String>,
}

/// The checkers' verdict on one run.
#[derive(Debug, Default)]
pub struct Verdict {
    /// What must not happen, and did.
    pub anomalies: Vec<String>,
    /// What clocks beyond the drift bound may cause, and did: stale lease
    /// reads of the membership and what follows from them (a client
    /// wrapping keys for a membership already changed).
    pub expected: Vec<String>,
    /// Posts the local level lost in a loss window (the room's home cut
    /// off and moved): allowed, and counted.
    pub lost_in_windows: Vec<String>,
    /// For each of them, when it was acknowledged, in milliseconds from
    /// the cut (negative: before it): how far back the loss window reached.
    pub lost_from_cut_ms: Vec<i64>,
}

/// Runs every checker over `out`. With clocks within the bound every
/// finding is an anomaly; beyond it, the membership checkers' findings
/// are expected (the test says so) and everything else still must hold.
pub fn judge(out: &Outcomes) -> Verdict {
    let mut v = Verdict::default();
    for a in super::history::check(&out.history) {
        v.anomalies.push(format!("{a:?}"));
    }
    v.lost_in_windows = super::history::lost_in_windows(&out.history);
    for text in &v.lost_in_windows {
        let Some(p) = out.history.posts.iter().find(|p| p.text == *text) else {
            continue;
        };
        // Windows may overlap: the cut is the last one before the
        // acknowledgement, or else the first after it.
        let cuts: Vec<Instant> = out
            .history
            .lossy
            .iter()
            .filter(|w| p.answered >= w.from && p.answered <= w.to)
            .map(|w| w.from + LOSS_LAG)
            .collect();
        let Some(cut) = cuts
            .iter()
            .filter(|c| **c <= p.answered)
            .max()
            .or_else(|| cuts.iter().min())
            .copied()
        else {
            continue;
        };
        let ms = |d: Duration| i64::try_from(d.as_millis()).unwrap_or(i64::MAX);
        v.lost_from_cut_ms.push(if p.answered >= cut {
            ms(p.answered - cut)
        } else {
            -ms(cut - p.answered)
        });
    }
    for u in &out.unsettled {
        v.anomalies.push(format!("still held after the run: {u}"));
    }
    for u in &out.unreadable {
        v.anomalies.push(format!("unreadable message: {u}"));
    }
    for p in &out.plaintext_in {
        v.anomalies.push(format!("plaintext in {}", p.display()));
    }
    if out.wire.hits > 0 {
        v.anomalies.push(format!(
            "{} posted texts on the wire: {:?}",
            out.wire.hits, out.wire.excerpts
        ));
    }
    if out.wire.bytes == 0 {
        v.anomalies.push("the wire capture saw nothing".into());
    }
    if !out
        .history
        .posts
        .iter()
        .any(|p| matches!(p.outcome, Outcome::Acked { .. }))
    {
        v.anomalies.push("nothing was acknowledged at all".into());
    }
    let mut membership = Vec::new();
    match &out.removal {
        None => v.anomalies.push("the member was never removed".into()),
        Some(r) => {
            if !r.delivered_after.is_empty() || r.keyed_after > 0 {
                const SHOWN: usize = 5;
                membership.push(format!(
                    "the member removed at revision {} got {} posts it must not have (the first: {:?}), and {} stored envelopes since carry its key (the stores hold {:?} posts, the final history {})",
                    r.revision,
                    r.delivered_after.len(),
                    &r.delivered_after[..r.delivered_after.len().min(SHOWN)],
                    r.keyed_after,
                    out.history.stores.iter().map(Vec::len).collect::<Vec<_>>(),
                    out.history.fin.len()
                ));
            }
        }
    }
    let room = super::membership::Room {
        initial: out.initial.clone(),
    };
    if !super::linear::linearizable(&room, &out.membership) {
        membership.push("membership operations are not linearizable".into());
    }
    match out.clocks {
        Clocks::Within => v.anomalies.extend(membership),
        Clocks::Beyond => v.expected.extend(membership),
    }
    v
}

/// The capture of every byte between clients and nodes and between nodes
/// (the harness's proxies, [`crate::netproxy::Tap`]).
#[derive(Debug)]
pub struct Wire {
    /// Bytes captured.
    pub bytes: u64,
    /// Posted texts found in them.
    pub hits: u64,
    /// The first few, with what followed each.
    pub excerpts: Vec<String>,
}

/// What a removed member got after its removal (both must be empty).
#[derive(Debug)]
pub struct Removal {
    /// The revision that removed it.
    pub revision: u64,
    /// Texts it was delivered that were posted at or after that revision.
    pub delivered_after: Vec<String>,
    /// Stored envelopes at or after that revision with a key for it.
    pub keyed_after: usize,
}

/// The files among `paths` that hold `marker`.
pub fn holding(paths: impl IntoIterator<Item = PathBuf>, marker: &[u8]) -> Vec<PathBuf> {
    paths
        .into_iter()
        .filter(|path| std::fs::read(path).is_ok_and(|b| crate::process::contains(&b, marker)))
        .collect()
}

/// Deliveries a member removed at `revision` must not have had: posts
/// sealed at or after that revision (as delivered, or as the stores hold
/// the number it was delivered with), or of a number no store holds (a
/// post only the removed member saw is a breach too), unless it is a post
/// of a loss window that the room did not keep (`lost`: the old home of a
/// moved room showed it, then the new home gave its number to another)
/// sealed before that revision. Each as its text, the number it was
/// delivered with and the revision the stores hold at that number, so
/// that a report tells a late delivery from a numbering the stores do not
/// share.
pub fn delivered_after_removal<'a>(
    delivered: impl IntoIterator<Item = &'a Seen>,
    revision_of: &std::collections::HashMap<u64, u64>,
    revision: u64,
    lost: &std::collections::HashSet<String>,
) -> Vec<String> {
    delivered
        .into_iter()
        .filter_map(|m| {
            if m.revision >= revision {
                return Some(format!(
                    "{} (#{}, sealed at revision {})",
                    m.text, m.seq, m.revision
                ));
            }
            if lost.contains(&m.text) {
                return None;
            }
            match revision_of.get(&m.seq) {
                Some(r) if *r < revision => None,
                Some(r) => Some(format!("{} (#{}, revision {r})", m.text, m.seq)),
                None => Some(format!("{} (#{}, stored nowhere)", m.text, m.seq)),
            }
        })
        .collect()
}

/// Whether a stored envelope wraps a key for a member removed at
/// `revision` although it was sealed at or after that revision.
pub fn keyed_after_removal(
    envelope: &Envelope,
    removed: &saferchat_consensus::Handle,
    revision: u64,
) -> bool {
    envelope.revision.0 >= revision && envelope.keys.iter().any(|k| k.recipient == *removed)
}

/// Microseconds from `start` to `t`: the clock of recorded operations.
fn micros_since(start: Instant, t: Instant) -> u64 {
    u64::try_from(t.duration_since(start).as_micros()).unwrap_or(u64::MAX)
}

/// Removes member [`REMOVED`] at `at`, through any node, until it is
/// removed; returns the revision that removed it. Each attempt (and each
/// read of the membership before it) is recorded for the
/// linearizability check.
///
/// An attempt may go unanswered and still commit (an answer lost in a
/// fault, a partition moving): a retry would then be refused (NOT_FOUND,
/// not a member) and the revision never learnt. So every attempt names
/// the revision it read just before (`expected_revision`): it can only
/// commit as the next one. When a later read, or a refusal, finds the
/// member gone, the last attempt left unanswered removed it: a fresh
/// read after any earlier one still showed the member (campaign
/// `SEED=7045`, where the remover gave up on a removal that had
/// happened).
async fn remover(
    servers: Vec<String>,
    start: Instant,
    at: Instant,
    until: Instant,
    ops: Arc<Mutex<Vec<Operation<MemberOp>>>>,
) -> Option<u64> {
    tokio::time::sleep_until(at.into()).await;
    let handle = identity(REMOVED).handle().to_string();
    let micros = |t: Instant| micros_since(start, t);
    let mut through = 0;
    // The revision the last unanswered attempt expected.
    let mut unanswered: Option<u64> = None;
    while Instant::now() < until {
        through = (through + 1) % servers.len();
        let Some(mut admin) = admin_at(&servers[through]).await else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        let call = Instant::now();
        let read = read_membership(&mut admin).await;
        ops.lock().expect("lock").push(Operation {
            call: micros(call),
            ret: read.as_ref().map(|_| micros(Instant::now())),
            op: MemberOp::Read { out: read.clone() },
        });
        let Some((revision, members)) = read else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        if !members.contains(&handle) {
            return unanswered.map(|r| r + 1);
        }
        let call = Instant::now();
        let attempt = tokio::time::timeout(
            POST_TIMEOUT,
            admin.remove_user(ROOM, &handle, Some(revision)),
        )
        .await;
        let out = match &attempt {
            Ok(Ok(reply)) => Some((reply.revision, reply.changed)),
            _ => None,
        };
        ops.lock().expect("lock").push(Operation {
            call: micros(call),
            ret: out.map(|_| micros(Instant::now())),
            op: MemberOp::Remove {
                handle: handle.clone(),
                out,
            },
        });
        match attempt {
            Ok(Ok(reply)) => return Some(reply.revision),
            // Refused: it did not commit (another change came first, or
            // the member is gone, which the next read shows).
            Ok(Err(saferchat_client::ClientError::Status(status)))
                if status.code() != tonic::Code::Unavailable => {}
            // No answer, or "outcome unknown".
            _ => unanswered = Some(revision),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    None
}

/// Changes and reads the room's membership until `until` through any node:
/// adds members who never join, removes some of them again, reads.
async fn administrator(
    servers: Vec<String>,
    seed: u64,
    start: Instant,
    until: Instant,
    ops: Arc<Mutex<Vec<Operation<MemberOp>>>>,
) {
    use rand::{RngExt as _, SeedableRng as _};
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed ^ 0xad41);
    let mut through = 0;
    let mut added: Vec<String> = Vec::new();
    let mut n = 0u32;
    let micros = |t: Instant| micros_since(start, t);
    while Instant::now() < until {
        let Some(mut admin) = admin_at(&servers[through]).await else {
            through = (through + 1) % servers.len();
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        while Instant::now() < until {
            let call = Instant::now();
            let choice = rng.random_range(0..4);
            let (op, answered) = if choice == 0 || (choice == 1 && added.is_empty()) {
                n += 1;
                let handle = saferchat_consensus::Handle::of_modulus(
                    format!("chaos member {seed} {n}").as_bytes(),
                )
                .to_string();
                let r =
                    tokio::time::timeout(POST_TIMEOUT, admin.add_user(ROOM, &handle, None)).await;
                let out = match r {
                    Ok(Ok(reply)) => {
                        added.push(handle.clone());
                        Some((reply.revision, reply.changed))
                    }
                    _ => None,
                };
                (MemberOp::Add { handle, out }, out.is_some())
            } else if choice == 1 {
                let handle = added.swap_remove(rng.random_range(0..added.len()));
                let r = tokio::time::timeout(POST_TIMEOUT, admin.remove_user(ROOM, &handle, None))
                    .await;
                let out = match r {
                    Ok(Ok(reply)) => Some((reply.revision, reply.changed)),
                    _ => None,
                };
                (MemberOp::Remove { handle, out }, out.is_some())
            } else {
                let out = read_membership(&mut admin).await;
                (MemberOp::Read { out: out.clone() }, out.is_some())
            };
            ops.lock().expect("lock").push(Operation {
                call: micros(call),
                ret: answered.then(|| micros(Instant::now())),
                op,
            });
            if !answered {
                through = (through + 1) % servers.len();
                break;
            }
            tokio::time::sleep(Duration::from_millis(rng.random_range(20..200))).await;
        }
    }
}

/// An admin connection to `server`, or `None` when none came within
/// [`POST_TIMEOUT`].
async fn admin_at(server: &str) -> Option<saferchat_client::admin::Admin> {
    tokio::time::timeout(
        POST_TIMEOUT,
        saferchat_client::admin::Admin::connect(server, crate::ADMIN_TOKEN),
    )
    .await
    .ok()?
    .ok()
}

/// The room's membership read through `admin`, or `None` when no answer
/// came within [`POST_TIMEOUT`].
async fn read_membership(admin: &mut saferchat_client::admin::Admin) -> Option<State> {
    tokio::time::timeout(POST_TIMEOUT, admin.members(ROOM))
        .await
        .ok()?
        .ok()?
        .membership
        .map(|m| state_of(&m))
}

fn state_of(m: &saferchat_proto::common::Membership) -> State {
    (
        m.revision,
        m.members.iter().map(|m| m.user.clone()).collect(),
    )
}

fn room() -> RoomId {
    RoomId::new(ROOM).expect("room name")
}

/// Each node's clock control: its rate error and how far it has jumped.
type ClockState = Vec<(i64, u64)>;

/// The room's home as the run moves it: where it is, and the datacenter
/// cut off by the move under way with when.
struct Home {
    /// Whether the old home's lease bounds what it may release after the
    /// cut: not with clocks beyond the drift bound.
    lease_bound: bool,
    partition: u32,
    at: usize,
    cut: Option<(usize, Instant)>,
    moves: Vec<HomeMove>,
    windows: Vec<Window>,
}

impl Home {
    fn new(lease_bound: bool) -> Home {
        let partition = saferchat_placement::PartitionCount::DEFAULT.of_room(ROOM).0;
        Home {
            lease_bound,
            partition,
            // Partitions take turns over the datacenters.
            at: usize::try_from(partition).expect("a partition") % super::schedule::DATACENTERS,
            cut: None,
            moves: Vec::new(),
            windows: Vec::new(),
        }
    }

    /// [`Fault::MoveHome`]: once the map says the last move settled (its
    /// new home established it; an operator moves a home again only then,
    /// and the map refuses a move before), or [`MOVE_MAX`] passed, cut the
    /// home off, then ask a node of the next datacenter to move the room's
    /// partition there, until the map takes it or [`MOVE_MAX`] passed.
    async fn cut_and_move(&mut self, cluster: &Cluster) {
        let from = self.at;
        let to = (from + 1) % super::schedule::DATACENTERS;
        let through: Vec<usize> = (0..cluster.nodes.len())
            .filter(|i| cluster.datacenters()[*i] == datacenter_name(to))
            .collect();
        let waiting = Instant::now();
        while waiting.elapsed() < MOVE_MAX {
            let settled = tokio::time::timeout(POST_TIMEOUT, async {
                let mut admin = saferchat_client::admin::Admin::connect(
                    &cluster.server(through[0]),
                    crate::ADMIN_TOKEN,
                )
                .await
                .ok()?;
                admin.cluster_status().await.ok()
            })
            .await
            .ok()
            .flatten()
            .is_some_and(|s| s.failing_over_partitions == 0);
            if settled {
                break;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        cluster.cut_off_datacenter(&datacenter_name(from));
        let cut = Instant::now();
        self.cut = Some((from, cut));
        let mut refused = Vec::new();
        let mut k = 0;
        while cut.elapsed() < MOVE_MAX {
            let i = through[k % through.len()];
            k += 1;
            let attempt = tokio::time::timeout(POST_TIMEOUT, async {
                let mut admin =
                    saferchat_client::admin::Admin::connect(&cluster.server(i), crate::ADMIN_TOKEN)
                        .await
                        .map_err(|e| e.to_string())?;
                admin
                    .move_homes(
                        &datacenter_name(from),
                        &datacenter_name(to),
                        vec![self.partition],
                    )
                    .await
                    .map_err(|e| e.to_string())
            })
            .await;
            match attempt {
                Ok(Ok(reply)) if reply.moved.contains(&self.partition) => {
                    self.at = to;
                    self.moves.push(HomeMove {
                        from,
                        to,
                        accepted_after: Some(cut.elapsed()),
                        refused,
                        cut,
                        rejoined: None,
                    });
                    return;
                }
                Ok(Ok(reply)) => refused.extend(reply.refused),
                Ok(Err(e)) => refused.push(e),
                Err(_) => refused.push("no answer".into()),
            }
            refused.dedup();
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        self.moves.push(HomeMove {
            from,
            to,
            accepted_after: None,
            refused,
            cut,
            rejoined: None,
        });
    }

    /// [`Fault::RejoinHome`]: reconnect the datacenter cut off; what its
    /// old home acknowledged from [`LOSS_LAG`] before the cut until an
    /// answer to a post sent now is due may be lost, when the home moved.
    fn rejoin(&mut self, cluster: &Cluster) {
        let Some((dc, cut)) = self.cut.take() else {
            return;
        };
        cluster.reconnect_datacenter(&datacenter_name(dc));
        if let Some(m) = self.moves.last_mut() {
            m.rejoined = Some(Instant::now());
        }
        if self.at != dc {
            let to = Instant::now() + POST_TIMEOUT;
            self.windows.push(Window {
                from: cut - LOSS_LAG,
                to,
                sent_by: if self.lease_bound {
                    cut + LEASE_RUNS_OUT
                } else {
                    to
                },
            });
        }
    }
}

/// Waits until no node holds a partition owing a failover's check (the
/// gauge `saferchat_partitions_unchecked`), up to [`RECOVERY_MAX`];
/// returns the nodes that still do.
async fn wait_settled(cluster: &Cluster) -> Vec<String> {
    let deadline = Instant::now() + RECOVERY_MAX;
    loop {
        let mut held = Vec::new();
        for (i, addr) in cluster.metrics.iter().enumerate() {
            let n = crate::process::scrape_value(*addr, "saferchat_partitions_unchecked").await;
            if n != Some(0.0) {
                held.push(format!("node {}: {n:?} partitions", i + 1));
            }
        }
        if held.is_empty() || Instant::now() >= deadline {
            return held;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Plays the store faults on the run's own Cassandra, in order, on a
/// thread of their own: stopping a Cassandra node takes seconds (it
/// drains), and the schedule's other faults must not wait for that.
struct StoreNemesis {
    cassandra: Arc<PrivateCassandra>,
    faults: std::sync::mpsc::Sender<Fault>,
    worker: std::thread::JoinHandle<()>,
}

impl StoreNemesis {
    fn start(cassandra: Arc<PrivateCassandra>) -> StoreNemesis {
        let (faults, rx) = std::sync::mpsc::channel::<Fault>();
        let c = Arc::clone(&cassandra);
        let worker = std::thread::spawn(move || {
            let signal = |which: &str| {
                if let Some(pid) = c.pid() {
                    crate::process::signal(pid, which);
                }
            };
            for fault in rx {
                match fault {
                    Fault::CassandraStop => c.stop(),
                    Fault::CassandraStart => c.launch(),
                    Fault::CassandraPause => signal("-STOP"),
                    Fault::CassandraResume => signal("-CONT"),
                    other => unreachable!("not a store fault: {other:?}"),
                }
            }
        });
        StoreNemesis {
            cassandra,
            faults,
            worker,
        }
    }

    fn apply(&self, fault: Fault) {
        self.faults.send(fault).expect("the store nemesis runs");
    }

    /// Waits until every store fault is played (all of them undone) and
    /// Cassandra answers again.
    fn finish(self) -> Arc<PrivateCassandra> {
        drop(self.faults);
        self.worker.join().expect("the store nemesis");
        self.cassandra.wait();
        self.cassandra
    }
}

fn apply(
    cluster: &mut Cluster,
    clocks: &mut ClockState,
    loss: Option<&Loss>,
    store: Option<&StoreNemesis>,
    fault: Fault,
) {
    match fault {
        Fault::Kill(n) => cluster.kill(n),
        Fault::Restart(n) => tokio::task::block_in_place(|| cluster.restart(n)),
        Fault::Pause(n) => cluster.nodes[n].pause(),
        Fault::Resume(n) => cluster.nodes[n].resume(),
        Fault::Isolate(n) => cluster.isolate(n),
        Fault::Heal(n) => cluster.heal(n),
        Fault::Cut { from, to } => cluster.set_link(from, to, Link::Blocked),
        Fault::Mend { from, to } => cluster.set_link(from, to, Link::Open { delay_ms: 0 }),
        Fault::Delay { from, to, ms } => cluster.set_link(from, to, Link::Open { delay_ms: ms }),
        Fault::Drift { node, ppm } => {
            clocks[node].0 = ppm;
            cluster.set_clock(node, ppm, clocks[node].1);
        }
        Fault::Jump { node, ms } => {
            clocks[node].1 += ms;
            cluster.set_clock(node, clocks[node].0, clocks[node].1);
        }
        Fault::Loss { from, to, percent } => {
            if let Some(loss) = loss {
                loss.set(cluster.link_port(from, to), percent);
            }
        }
        Fault::KillDatacenter(d) | Fault::RestartDatacenter(d) => {
            let name = datacenter_name(d);
            let nodes: Vec<usize> = (0..cluster.nodes.len())
                .filter(|i| cluster.datacenters()[*i] == name)
                .collect();
            for n in nodes {
                if matches!(fault, Fault::KillDatacenter(_)) {
                    cluster.kill(n);
                } else {
                    tokio::task::block_in_place(|| cluster.restart(n));
                }
            }
        }
        Fault::CutDatacenter(d) => cluster.cut_off_datacenter(&datacenter_name(d)),
        Fault::ReconnectDatacenter(d) => cluster.reconnect_datacenter(&datacenter_name(d)),
        Fault::FillDisk(n) => cluster.fill_disk(n),
        Fault::FreeDisk(n) => tokio::task::block_in_place(|| cluster.free_disk(n)),
        Fault::CassandraStop
        | Fault::CassandraStart
        | Fault::CassandraPause
        | Fault::CassandraResume => store
            .expect("store faults are scheduled only on Cassandra")
            .apply(fault),
        Fault::MoveHome | Fault::RejoinHome => {
            unreachable!("the run plays home moves itself (`Home`)")
        }
    }
}

/// The last lines each node logged about `partition`'s log (elections,
/// failover checks and copies, what the map established): why a moved
/// home did not settle, for a run whose folders are gone (a CI run).
fn failover_postmortem(cluster: &Cluster, partition: u32) -> String {
    const LINES: usize = 25;
    let tags = [
        format!("\"partition\":{partition},"),
        format!("\"partition\":{partition}}}"),
    ];
    let mut out = String::new();
    for (i, node) in cluster.nodes.iter().enumerate() {
        out.push_str(&format!("node {}:\n", i + 1));
        last_lines(&mut out, &node.log_text(), LINES, |l| {
            tags.iter().any(|t| l.contains(t.as_str()))
                && !l.contains("\"DEBUG\"")
                && !l.contains("\"TRACE\"")
        });
    }
    out
}

/// Appends to `out` the last `n` lines of `log` that `keep` takes,
/// indented.
fn last_lines(out: &mut String, log: &str, n: usize, keep: impl Fn(&str) -> bool) {
    let kept: Vec<&str> = log.lines().filter(|l| keep(l)).collect();
    for line in &kept[kept.len().saturating_sub(n)..] {
        out.push_str("  ");
        out.push_str(line);
        out.push('\n');
    }
}

/// Each node's state and the warnings and errors at the end of its log:
/// what a failed run needs to be understood after its folders are gone.
fn postmortem(cluster: &mut Cluster) -> String {
    const LINES: usize = 15;
    let mut out = String::new();
    for (i, node) in cluster.nodes.iter_mut().enumerate() {
        let state = node
            .exit_status()
            .map_or_else(|| "running".to_owned(), |s| format!("exited: {s}"));
        out.push_str(&format!(
            "node {} ({state}), last warnings and errors:\n",
            i + 1
        ));
        last_lines(&mut out, &node.log_text(), LINES, |l| {
            l.contains("\"WARN\"") || l.contains("\"ERROR\"")
        });
    }
    out
}

/// Runs `plan`.
///
/// # Panics
/// When the cluster cannot be set up, or does not serve again within
/// [`RECOVERY_MAX`] after every fault is undone.
pub async fn run(plan: Plan) -> Outcomes {
    let steps = schedule_with(
        plan.seed,
        plan.nodes,
        plan.duration.as_millis() as u64,
        Kinds {
            clocks: plan.clocks,
            store: plan.store,
            disk: plan.disk,
            datacenters: plan.datacenters,
            moves: plan.moves,
        },
    );
    // Inside the test's own network namespace, loss faults drop packets;
    // elsewhere they are skipped (and the outcome says so).
    let loss = crate::netns::inside()
        .then(|| Loss::set_up().unwrap_or_else(|e| panic!("packet loss: {e}")));
    let marker = format!("chaos-{}-", plan.seed);
    let tap = Tap::new(marker.as_bytes());
    // On Cassandra: one node of the run's own (stopping it must not
    // disturb other tests), one keyspace for the whole cluster.
    let keyspace = format!("saferchat_chaos_{}", plan.seed);
    let cassandra = (plan.store == Store::Cassandra).then(|| {
        Arc::new(tokio::task::block_in_place(|| {
            PrivateCassandra::start(&format!("chaos-{}", plan.seed))
        }))
    });
    let env = match &cassandra {
        None => Vec::new(),
        Some(c) => [
            ("SAFERCHAT_STORAGE", "cassandra"),
            ("SAFERCHAT_CASSANDRA_CONTACT_POINTS", c.address().as_str()),
            (
                "SAFERCHAT_CASSANDRA_DATACENTER",
                crate::cassandra::DATACENTER,
            ),
            ("SAFERCHAT_CASSANDRA_KEYSPACE", keyspace.as_str()),
            // A node restarted while Cassandra is down waits for it (a
            // Cassandra start may take minutes on a loaded machine).
            ("SAFERCHAT_CASSANDRA_CONNECT_WAIT_S", "300"),
        ]
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .to_vec(),
    };
    let mut cluster = Cluster::start(Options {
        test_clocks: true,
        wire_tap: Some(Arc::clone(&tap)),
        env,
        // Room for a run's data (some MiB) and little more: the ballast
        // that fills it stays small.
        data_tmpfs: plan.disk.then(|| "256m".to_owned()),
        // Home moves wait on a gauge at the end.
        metrics: plan.moves,
        datacenters: (0..plan.nodes)
            .map(|i| {
                if plan.datacenters {
                    datacenter_name(datacenter_of(i, plan.nodes))
                } else {
                    "dc1".to_owned()
                }
            })
            .collect(),
        ..Options::single_dc(plan.nodes)
    })
    .await;
    let store_nemesis = cassandra.map(StoreNemesis::start);
    let servers: Vec<String> = (0..plan.nodes).map(|i| cluster.server(i)).collect();
    let mut admin = cluster.admin(0).await;
    admin.create_chat(ROOM).await.expect("create the room");
    for member in 0..=REMOVED {
        admin
            .add_user(ROOM, &identity(member).handle().to_string(), None)
            .await
            .expect("add a member");
    }
    // Every member joins once before the faults: their keys are
    // registered, so posts are wrapped for all of them.
    let setup = Instant::now() + RECOVERY_MAX;
    for member in 0..=REMOVED {
        join_any(
            &servers,
            &room(),
            member % servers.len(),
            &identity(member),
            setup,
        )
        .await
        .expect("join before the faults");
    }

    let initial = state_of(
        &admin
            .members(ROOM)
            .await
            .expect("read the membership")
            .membership
            .expect("a membership"),
    );
    let membership = Arc::new(Mutex::new(Vec::new()));
    let posts = Arc::new(Mutex::new(Vec::new()));
    let sessions = Arc::new(Mutex::new(Vec::new()));
    let unreadable = Arc::new(Mutex::new(Vec::new()));
    let start = Instant::now();
    let started_unix_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis());
    let posting_until = start + plan.duration;
    let listening_until = posting_until + POST_TIMEOUT + Duration::from_secs(5);
    let removed_sessions = Arc::new(Mutex::new(Vec::new()));
    let removed_listener = tokio::spawn(load::listen(
        servers.clone(),
        room(),
        REMOVED,
        listening_until,
        Arc::clone(&removed_sessions),
        Arc::new(Mutex::new(Vec::new())),
    ));
    let removal = tokio::spawn(remover(
        servers.clone(),
        start,
        start + plan.duration * 3 / 5,
        posting_until + RECOVERY_MAX,
        Arc::clone(&membership),
    ));
    let mut tasks = vec![tokio::spawn(administrator(
        servers.clone(),
        plan.seed,
        start,
        posting_until,
        Arc::clone(&membership),
    ))];
    for member in 0..MEMBERS {
        let poster = load::Poster {
            servers: servers.clone(),
            room: room(),
            member,
            prefix: format!("chaos-{}", plan.seed),
            gap: Duration::ZERO,
            until: posting_until,
            stop: tokio_util::sync::CancellationToken::new(),
        };
        let posts = Arc::clone(&posts);
        tasks.push(tokio::spawn(async move {
            poster.run(posts).await;
        }));
        tasks.push(tokio::spawn(load::listen(
            servers.clone(),
            room(),
            member,
            listening_until,
            Arc::clone(&sessions),
            Arc::clone(&unreadable),
        )));
    }
    let mut clocks = vec![(0, 0); plan.nodes];
    let mut home = Home::new(plan.clocks == Clocks::Within);
    for step in &steps {
        tokio::time::sleep_until((start + Duration::from_millis(step.at_ms)).into()).await;
        match step.fault {
            Fault::MoveHome => {
                home.cut_and_move(&cluster).await;
                continue;
            }
            Fault::RejoinHome => {
                home.rejoin(&cluster);
                continue;
            }
            _ => {}
        }
        apply(
            &mut cluster,
            &mut clocks,
            loss.as_ref(),
            store_nemesis.as_ref(),
            step.fault,
        );
    }
    let cassandra = store_nemesis.map(|n| tokio::task::block_in_place(|| n.finish()));
    for task in tasks {
        task.await.expect("client task");
    }
    removed_listener
        .await
        .expect("the removed member's listener");
    let removed_at = removal.await.expect("the remover");
    // Every replica of a moved home checks its copy against the new
    // home's before its store is read.
    let unsettled = if home.moves.is_empty() {
        Vec::new()
    } else {
        wait_settled(&cluster).await
    };
    if !unsettled.is_empty() {
        eprintln!(
            "chaos: SEED={}: still held; the partition's failovers as each node logged them:\n{}",
            plan.seed,
            failover_postmortem(&cluster, home.partition)
        );
    }

    // Everything is undone: the room must serve again, through node 0.
    let reader = identity(0);
    let Some((session, _)) =
        join_any(&servers, &room(), 0, &reader, Instant::now() + RECOVERY_MAX).await
    else {
        panic!(
            "SEED={}: the cluster does not serve again after the faults\n{}",
            plan.seed,
            postmortem(&mut cluster)
        );
    };
    let fin = load::read_all(&session, None, &unreadable)
        .await
        .expect("read the final history");
    drop(session);

    for node in &mut cluster.nodes {
        node.stop();
    }
    let removed = identity(REMOVED).handle();
    let mut revision_of = std::collections::HashMap::new();
    let mut keyed_after = 0;
    let mut stores = Vec::new();
    // Each node's own store, or the one Cassandra keyspace they share.
    let chat_stores: Vec<Arc<dyn storage::ChatStore>> = match &cassandra {
        None => cluster
            .nodes
            .iter()
            .map(|node| {
                Arc::new(SledStore::open(&node.data_dir.join("db")).expect("open a node's store"))
                    as Arc<dyn storage::ChatStore>
            })
            .collect(),
        Some(c) => vec![Arc::new(
            CassandraStore::connect(&crate::cassandra::config(&c.address(), &keyspace))
                .await
                .expect("connect to the run's Cassandra"),
        )],
    };
    for store in &chat_stores {
        let mut mine = Vec::new();
        let mut after = None;
        loop {
            let page = storage::history(&**store, &room(), Range::After(after), PAGE as usize)
                .await
                .expect("read a node's store");
            let full = page.len() == PAGE as usize;
            for m in &page {
                after = Some(m.id);
                let mut revision = 0;
                if let Ok(e) = Envelope::decode(m.envelope.clone()) {
                    revision = e.revision.0;
                    revision_of.insert(m.seq, revision);
                    if removed_at.is_some_and(|r| keyed_after_removal(&e, &removed, r)) {
                        keyed_after += 1;
                    }
                }
                mine.push(Seen {
                    id: m.id.to_bytes().to_vec(),
                    seq: m.seq,
                    text: load::open_stored(&reader, &room(), &m.envelope, 0..MEMBERS)
                        .unwrap_or_else(|| "<unreadable>".into()),
                    revision,
                });
            }
            if !full {
                break;
            }
        }
        stores.push(mine);
    }

    drop(chat_stores);
    // `CHAOS_LOGS=dir` keeps every node's log (as `SEED-node-N.log`) for a
    // run worth reading after its folders are gone.
    if let Ok(dir) = std::env::var("CHAOS_LOGS") {
        let dir = PathBuf::from(dir);
        std::fs::create_dir_all(&dir).expect("create CHAOS_LOGS");
        for (i, node) in cluster.nodes.iter().enumerate() {
            let to = dir.join(format!("{}-node-{}.log", plan.seed, i + 1));
            std::fs::copy(&node.log, &to).expect("copy a node's log");
        }
    }
    if let Some(c) = &cassandra {
        // Drained: its memtables are in its data files, which are
        // searched too.
        tokio::task::block_in_place(|| c.stop());
    }
    let plaintext_in = holding(
        cluster
            .nodes
            .iter()
            .flat_map(|n| {
                crate::process::files(&n.data_dir)
                    .into_iter()
                    .chain([n.log.clone()])
            })
            .chain(
                cassandra
                    .iter()
                    .flat_map(|c| crate::process::files(c.dir())),
            ),
        marker.as_bytes(),
    );
    if let Some(c) = cassandra {
        Arc::into_inner(c).expect("one owner left").remove();
    }
    let posts = std::mem::take(&mut *posts.lock().expect("lock"));
    let sessions = std::mem::take(&mut *sessions.lock().expect("lock"));
    let unreadable = std::mem::take(&mut *unreadable.lock().expect("lock"));
    let membership = std::mem::take(&mut *membership.lock().expect("lock"));
    let history = History {
        posts,
        sessions,
        fin,
        stores,
        lossy: home.windows,
    };
    let lost: std::collections::HashSet<String> =
        super::history::vanished(&history).into_iter().collect();
    let removal = removed_at.map(|revision| Removal {
        revision,
        delivered_after: delivered_after_removal(
            removed_sessions.lock().expect("lock").iter().flatten(),
            &revision_of,
            revision,
            &lost,
        ),
        keyed_after,
    });
    Outcomes {
        removal,
        clocks: plan.clocks,
        loss_applied: loss.is_some(),
        packets_dropped: loss.as_ref().map_or(0, Loss::dropped),
        initial,
        membership,
        steps,
        history,
        moves: home.moves,
        started: start,
        started_unix_ms,
        unsettled,
        unreadable,
        plaintext_in,
        wire: Wire {
            bytes: tap.bytes(),
            hits: tap.hits(),
            excerpts: tap.found(),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use saferchat_consensus::{Handle, Revision};
    use saferchat_envelope::WrappedKey;

    /// The plaintext checker bites: a data folder with a posted text in
    /// one of its files (in a subfolder, amid other bytes) is reported.
    #[test]
    fn a_file_holding_a_posted_text_is_reported() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("db")).unwrap();
        std::fs::write(dir.path().join("db/clean"), b"ciphertext only").unwrap();
        std::fs::write(dir.path().join("db/leak"), b"\0\x01chaos-7-2-15\0").unwrap();
        std::fs::write(dir.path().join("other-seed"), b"chaos-8-2-15").unwrap();
        let found = holding(crate::process::files(dir.path()), b"chaos-7-");
        assert_eq!(found, [dir.path().join("db/leak")]);
    }

    fn seen(seq: u64) -> Seen {
        Seen {
            id: vec![seq as u8],
            seq,
            text: format!("post {seq}"),
            revision: 1,
        }
    }

    /// The removed-member checker bites on a doctored run: a delivery of a
    /// post sealed at the removing revision or later, or of a post no
    /// store holds, is reported; earlier ones are not.
    #[test]
    fn deliveries_after_a_removal_are_reported() {
        let revision_of = [(1, 5), (2, 6), (3, 7), (4, 8)].into_iter().collect();
        let delivered = [seen(1), seen(2), seen(3), seen(4), seen(9)];
        let none = std::collections::HashSet::new();
        assert_eq!(
            delivered_after_removal(&delivered, &revision_of, 7, &none),
            [
                "post 3 (#3, revision 7)",
                "post 4 (#4, revision 8)",
                "post 9 (#9, stored nowhere)"
            ]
        );
        assert!(delivered_after_removal(&delivered[..2], &revision_of, 7, &none).is_empty());
        // A post of a loss window stored nowhere, sealed before the
        // removal, is no breach; sealed at or after it, it is, and so is
        // any delivery sealed so, whatever the stores hold at its number.
        let lost = ["post 9".to_owned()].into_iter().collect();
        assert!(delivered_after_removal(&delivered[4..], &revision_of, 7, &lost).is_empty());
        let mut late = seen(9);
        late.revision = 7;
        let mut renumbered = seen(1);
        renumbered.revision = 8;
        assert_eq!(
            delivered_after_removal(&[late, renumbered], &revision_of, 7, &lost),
            [
                "post 9 (#9, sealed at revision 7)",
                "post 1 (#1, sealed at revision 8)"
            ]
        );
    }

    /// ...and an envelope that still wraps a key for the removed member
    /// at or after the removing revision is reported.
    #[test]
    fn keys_for_a_removed_member_after_its_removal_are_reported() {
        let removed = Handle::of_modulus(&[1; 256]);
        let other = Handle::of_modulus(&[2; 256]);
        let envelope = |revision: u64, recipients: &[Handle]| Envelope {
            room: saferchat_consensus::RoomId::new("r").unwrap(),
            sender: other,
            revision: Revision(revision),
            nonce: [0; 12],
            ciphertext: Bytes::from_static(&[0; 32]),
            keys: recipients
                .iter()
                .map(|r| WrappedKey {
                    recipient: *r,
                    wrapped: Bytes::from_static(&[0; 256]),
                })
                .collect(),
            signature: Bytes::from_static(&[0; 256]),
            chain: None,
        };
        assert!(keyed_after_removal(
            &envelope(7, &[removed, other]),
            &removed,
            7
        ));
        assert!(keyed_after_removal(&envelope(9, &[removed]), &removed, 7));
        assert!(!keyed_after_removal(
            &envelope(6, &[removed, other]),
            &removed,
            7
        ));
        assert!(!keyed_after_removal(&envelope(7, &[other]), &removed, 7));
    }
}
