//! The timeline driver: one task that runs the partition log of every
//! partition this node replicates.
//!
//! Each input (an append, a batch of peer messages, a tick) is fed to the
//! partitions it concerns; then the driver does what their `LogReady`s
//! ask, in the order the core's contract requires:
//!
//! 1. write every changed promise and entry to the partition-log file and
//!    `fdatasync` it (one sync for the whole input);
//! 2. send the messages;
//! 3. apply committed slots, in slot order, to the timeline store
//!    (synced later, see below), then answer the appenders and hand the
//!    posts to the rooms' actors.
//!
//! # Leaders and elections
//!
//! A partition's replicas are ranked by placement (the preferred owner
//! first). A partition nobody has used since this node started has no
//! leader; the first client that needs one makes its replicas campaign,
//! the preferred owner at once and the others only if no leader appeared
//! after [`RANK_STAGGER_MS`] times their rank. A leader sends every
//! [`HEARTBEAT_MS`] (an empty Accept that carries the commit point); a
//! follower that hears nothing from the leader for [`ELECTION_TIMEOUT_MS`]
//! (plus its rank's stagger) runs itself. That bounds failover: a killed
//! leader is replaced after at most the timeout and the stagger of the
//! surviving best-ranked replica, plus one round trip to a quorum and the
//! recovery of the uncommitted tail.
//!
//! # Followers apply in batches
//!
//! A post is acknowledged once a quorum has its log entry on disk; the
//! timeline store of a replica is a copy derived from the log, read only
//! where the partition is led (clients are routed to the leader). So the
//! leader applies committed posts at once (it acknowledges and delivers
//! them), while a follower collects them and applies up to
//! [`FOLLOWER_APPLY_POSTS_MAX`] at a time, at least every
//! [`FOLLOWER_APPLY_DELAY_MS`]: one store append and one sync for many
//! posts instead of one per pass, which is most of what a follower spends
//! per post. Nothing is lost by waiting: a batch's applied mark is written
//! only after the batch is in the store, so after a crash the log's
//! entries above the mark are applied again (and recognised, not stored
//! twice). A follower that becomes leader applies what it collected before
//! anything else of the partition, and only then is it named leader to
//! the node's routing, so no client reads its timeline before it is
//! complete. A node that stops cleanly applies what it collected.
//!
//! # Applying without a sync per pass
//!
//! A committed post is already durable where it matters: a quorum of the
//! partition's replicas synced its log entry before it committed. The
//! timeline store is derived from the log, so applying to it needs no sync
//! of its own before the post is acknowledged or delivered; what needs one
//! is the applied mark, which says "the log entries up to here need not be
//! applied again". So the driver stores applied posts unsynced
//! ([`ChatStore::append_unsynced`]: reads see them at once), syncs the
//! store once [`UNSYNCED_POSTS_MAX`] posts or [`FOLLOWER_APPLY_DELAY_MS`]
//! have gathered, and only then queues the marks and compacts up to them.
//! A crash in between loses at most unsynced copies whose log entries are
//! still above the mark, and they are applied again (and recognised where
//! the store kept them). On one core shared by three replicas this took
//! a sync per driver pass off every leader, about a quarter of the syncs
//! a post cost.
//!
//! # When the timeline store fails
//!
//! A shared store (Cassandra) can be down or stalled for seconds or
//! minutes while the nodes and their logs are fine. Committed posts are
//! safe in the log meanwhile, so a failed apply is not fatal: the batch
//! goes back to the collected posts, the room tails it moved are dropped
//! (reloaded from the store, so the retry places every post exactly as
//! before), and the driver tries again after a backoff of
//! [`STORE_RETRY_MIN_MS`] doubling to [`STORE_RETRY_MAX_MS`], never
//! sleeping in its loop (heartbeats and elections go on). Until a retry
//! succeeds, new posts are refused with UNAVAILABLE (nothing is taken that
//! cannot be stored), posts already committed are answered once stored,
//! and this node is not named leader of partitions whose commits wait, so
//! no client reads a timeline that lacks acknowledged posts. Posts stored
//! by a failed attempt are recognised on the retry and still delivered
//! once. Only if [`STALLED_POSTS_MAX`] commits (or [`STALLED_BYTES_MAX`])
//! pile up does the node stop.
//!
//! # Compaction
//!
//! Applied entries stay in the log until a partition retains more than
//! the configured bytes (`partition_log_retained_bytes`, at most
//! [`RETAINED_BYTES_MAX`]) of them, then the oldest are compacted away: a
//! replica that comes back less than that far behind catches up from the
//! leader's log. One further behind is told so by the leader
//! (`LogMessage::Compacted`; or finds out running for leader), copies the
//! partition's timeline from a replica ([`super::copy`], in a task of its
//! own: the driver goes on meanwhile) and installs it: its log counts the
//! copied slots as released and applied, then catches up from the
//! leader's log as usual. A copy starts only when the partition has no
//! collected or unsynced posts of its own (they would be placed by a tail
//! that does not know the copy); at most [`COPIES_AT_ONCE`] run at a time
//! (a node back from a long outage may lag in every partition it holds);
//! after a failed copy the next waits [`COPY_RETRY_MS`], doubling up to
//! [`COPY_RETRY_MAX_MS`].
//!
//! # Home failover
//!
//! Where a partition's home can fail over to another datacenter (its
//! replicas outside the home are a majority of all), its log has a home
//! lease: a leader releases slots only under grants from a majority of
//! all the replicas (`LogConfig::home_lease`, `specs/HomeFailover.tla`).
//! The driver gives the log a fresh reading of the lease clock before
//! every input (`Part::tick`) and on its timer when a renewal or a
//! held-back Prepare is due. A leader that held no lease for
//! [`HOME_LEASE_GRACE_MS`] is cut off from the other datacenters: the
//! posts that waited that long are answered UNAVAILABLE, saying so. While
//! the cluster map says the partition's home moved and no leader
//! established the new epoch, the log's elections also read every
//! datacenter but the lost home (`LogConfig::failover`); `follow` lifts
//! that once the map recorded `Establish`.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use saferchat_consensus::partition_log::{
    Committed, Failover, LogAcceptor, LogConfig, LogMessage, LogReplica, Slot, Term, Value,
};
use saferchat_consensus::{LeaseConfig, Millis, NodeId, RoomId};
use saferchat_envelope::Envelope;
use saferchat_placement::{ClusterMap, Placement};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::tail::{RoomTail, Sequenced};
use super::{AppliedPost, Command, Durability, Leaders, LogPost, Subscribers, Timeline};
use crate::clock::Clock;
use crate::convert;
use crate::error::NodeError;
use crate::membership::PeerSender;
use crate::storage::log_store::{LogChange, LogStore, PartitionLogState, PreparedFile, Rewind};
use crate::storage::{ChatStore, StoredMessage};

/// A leader's heartbeat period.
pub const HEARTBEAT_MS: u64 = 250;
/// A follower that hears nothing from its leader this long runs itself.
pub const ELECTION_TIMEOUT_MS: u64 = 1_500;
/// Extra wait per rank below the preferred owner, so replicas rarely
/// compete.
pub const RANK_STAGGER_MS: u64 = 500;
/// Applied entries a partition keeps for replicas that fall behind.
pub const RETAINED_BYTES_MAX: usize = 16 * 1024 * 1024;
/// Most values one Accept carries: with envelopes of up to 512 KiB an
/// Accept stays below 4 MiB.
pub const ACCEPT_VALUES_MAX: usize = 8;
/// How often timers are looked at.
const TICK_MS: u64 = 50;
/// Peer batches queued for the driver.
pub const LOG_INBOUND_MAX: usize = 1024;
/// Appends queued for the driver.
const COMMAND_QUEUE_MAX: usize = 4096;
/// First wait before applying again after the timeline store failed (see
/// "When the timeline store fails").
pub const STORE_RETRY_MIN_MS: u64 = 200;
/// Longest wait between two attempts.
pub const STORE_RETRY_MAX_MS: u64 = 5_000;
/// Committed posts waiting for a failing store, at most; beyond this the
/// node stops rather than hold more in memory.
pub const STALLED_POSTS_MAX: usize = 65_536;
/// ...and their bytes (envelopes are up to 512 KiB each).
pub const STALLED_BYTES_MAX: usize = 256 * 1024 * 1024;
/// A follower applies committed posts to its timeline store at most this
/// long after they commit (see "Followers apply in batches").
pub const FOLLOWER_APPLY_DELAY_MS: u64 = 250;
/// ...or as soon as this many wait. Below the 256 recent posts per room
/// that [`RoomTail`] recognises, so that re-applying a batch whose applied
/// mark a crash lost stores nothing twice.
pub const FOLLOWER_APPLY_POSTS_MAX: usize = 128;
/// Posts stored in the timeline but not synced there, at most (see
/// "Applying without a sync per pass"); below the 256 recent posts per
/// room that [`RoomTail`] recognises, for the same reason as
/// [`FOLLOWER_APPLY_POSTS_MAX`].
pub const UNSYNCED_POSTS_MAX: usize = 128;
/// Room tails kept in memory; beyond this the least recently used one is
/// dropped (it is reloaded from the store, which holds everything applied,
/// when the room is next applied to).
const TAILS_MAX: usize = 4096;
/// How often subscriptions of stopped room actors are swept.
const SWEEP_MS: u64 = 10_000;
/// After a failed copy of a partition, the next waits this long...
pub const COPY_RETRY_MS: u64 = 1_000;
/// ...doubling with every failure up to this.
pub const COPY_RETRY_MAX_MS: u64 = 60_000;
/// Partition copies running at once, at most.
pub const COPIES_AT_ONCE: usize = 4;
/// A leader that has held no home lease this long (since it took the lead,
/// or since its lease ran out) is cut off from the partition's other
/// datacenters: its posts that waited this long are answered UNAVAILABLE
/// (see "Home failover"; a post appended meanwhile still waits, as the
/// lease may be back at the next renewal).
pub const HOME_LEASE_GRACE_MS: u64 = ELECTION_TIMEOUT_MS;

/// A copy of a partition's timeline that ended.
#[derive(Debug)]
struct CopyDone {
    partition: u32,
    /// What the copy was for.
    kind: CopyKind,
    /// The newest term the replica knew as the copy began
    /// (`LogReplica::install_copy`, `LogReplica::checked_against`).
    term: saferchat_consensus::partition_log::Term,
    result: Result<(super::copy::Copied, super::copy::Cut), NodeError>,
}

/// The metrics of a copy installed: its bytes, and the partition's
/// applied slot.
fn copied_metrics(partition: u32, copied: &super::copy::Copied) {
    metrics::counter!("saferchat_partition_copied_bytes_total").increment(copied.bytes);
    #[allow(clippy::cast_precision_loss)]
    metrics::gauge!("saferchat_partition_applied_slot", "partition" => partition.to_string())
        .set(copied.applied.0 as f64);
}

/// Why a replica copies its partition's timeline.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum CopyKind {
    /// Its log is behind what the others compacted (see "Compaction").
    Behind,
    /// The divergence check of this failover epoch (see "Home failover").
    Check(u64),
    /// Held, it made its whole timeline its leader's
    /// (`LogReplica::realigned`).
    Realign,
}

/// The copies that first cut the timeline back ([`Driver::spawn_cut_and_copy`]).
#[derive(Clone, Copy, Debug)]
enum Cut {
    /// [`CopyKind::Check`] of this failover epoch.
    Check(u64),
    /// [`CopyKind::Realign`], copying up to at least this slot.
    Realign(Slot),
}

/// The timeline store failing: since when, and when to try again.
#[derive(Debug)]
struct Outage {
    since: Millis,
    retry_at: Millis,
    backoff_ms: u64,
    error: String,
}

/// What a post is told on a leader cut off from the partition's other
/// datacenters.
const CUT_OFF: &str = "this node's datacenter is cut off from the other datacenters of the room's partition (it holds no home lease), so it cannot acknowledge posts; the post may still be kept: retry the same post once the datacenters are connected again or the partition's home was moved (a retry is recognised)";

/// A committed post as placed: who to answer, its room and place, and the
/// envelope to deliver.
type Placed = ((NodeId, u64), RoomId, Sequenced, Envelope, Slot);

/// Why placing and storing a batch failed.
enum StoreFailed {
    /// The timeline store failed: the batch waits for the next attempt.
    Store(NodeError),
    /// Syncing the store failed: the node stops (after a failed sync the
    /// page cache no longer says what the disk holds).
    Fatal(NodeError),
}

/// Partition-log messages from one peer.
#[derive(Debug)]
pub struct LogInbound {
    /// The sending node (from its certificate).
    pub from: NodeId,
    /// The messages, by partition.
    pub messages: Vec<(u32, LogMessage<LogPost>)>,
}

type Reply = oneshot::Sender<Result<Sequenced, NodeError>>;

struct Part {
    replica: LogReplica<LogPost>,
    /// Voters ranked, the preferred owner first (a learner ranks after
    /// every voter).
    rank: u64,
    /// The term whose leader this node last heard from (or leads).
    leader: Option<Term>,
    /// When this node last heard from a leader (or started to wait).
    heard: Millis,
    /// Whether a client or a leader made this partition live here.
    active: bool,
    /// The map moved the partition off this node: it keeps the log (the
    /// map may move the partition back, and peers may still copy from
    /// its timeline) but no longer runs for leader, leads, or nudges the
    /// voters. Its configuration is of the epoch it left, whose other
    /// replicas moved on: a campaign there can win nothing, and a node
    /// that kept running, as it did for every partition a rebalance took
    /// off it, sent a Prepare round per partition every half second to
    /// peers busy with the moves.
    retired: bool,
    last_heartbeat: Millis,
    /// A learner: when a client last needed a leader here, and when it
    /// last nudged the voters for one (`LogReplica::nudge`).
    wanted: Option<Millis>,
    nudged: Option<Millis>,
    /// When each other replica last answered this node's Accepts in the
    /// term it leads.
    acks: HashMap<NodeId, Millis>,
    /// When another replica last ran for leader.
    candidate_seen: Option<Millis>,
    /// When this node last took the lead.
    led_since: Millis,
    /// Slots up to here are applied to the timeline store and synced
    /// there (the applied mark written, or queued for the next write).
    applied: Slot,
    /// Applied entries still in the log: slot and size.
    retained: VecDeque<(Slot, usize)>,
    retained_bytes: usize,
    /// A copy of the partition's timeline is under way.
    copying: bool,
    /// No copy starts before this (after a failed one).
    copy_after: Millis,
    /// The wait after the next failed copy.
    copy_backoff_ms: u64,
    /// The latest later map epoch a replica was seen running in (0:
    /// none), so that it is reported once.
    newer_epoch: u64,
    /// On a leader, when its last [`COMMIT_TIMES_MAX`] slots committed:
    /// the replication lag to other datacenters in milliseconds.
    commit_times: VecDeque<(Slot, Millis)>,
    /// On a leader whose log has a home lease: since when it has held
    /// none (from when it took the lead until the first grants).
    lease_lapsed: Option<Millis>,
    /// Whether the lapse was reported (logged and counted) once it became
    /// a cut-off ([`Part::cut_off`]).
    cut_off_said: bool,
    /// The latest home failover epoch this replica checked its timeline
    /// against (or never needed to), as written to the log file.
    checked: u64,
    /// A failover epoch whose check this replica still owes: its log is
    /// held ([`LogReplica::hold`]) until then (see "Home failover").
    unchecked: Option<u64>,
    /// Whether the node said that this replica may not run in its
    /// failover epoch ([`LogReplica::is_barred`]).
    barred_told: bool,
}

/// Commit times a leader keeps per partition; a datacenter further behind
/// reads as behind since the oldest of them.
const COMMIT_TIMES_MAX: usize = 4_096;

/// Whom `me` copies a partition from, in order: the leader it knows
/// first (it tells replicas to copy, and its applied mark is at least its
/// compaction floor), then the partition's `replicas` (datacenters in
/// name order). On a held replica (`held_voters`: the voters of its home)
/// the home's voters come first, the leader among them first, and a
/// leader outside them last: what a held replica copies from one of its
/// home's voters counts as shared with it (`LogReplica::install_copy`),
/// which a new home of two voters needs to establish when its candidate
/// must copy before it leads.
fn copy_order(
    me: NodeId,
    hint: Option<NodeId>,
    held_voters: Option<&[NodeId]>,
    replicas: Vec<NodeId>,
) -> Vec<NodeId> {
    let hint = hint.filter(|l| *l != me);
    let (mut nodes, last): (Vec<NodeId>, Option<NodeId>) = match held_voters {
        Some(voters) => (
            hint.filter(|h| voters.contains(h))
                .into_iter()
                .chain(voters.iter().copied())
                .collect(),
            hint.filter(|h| !voters.contains(h)),
        ),
        None => (hint.into_iter().collect(), None),
    };
    nodes.extend(replicas.into_iter().filter(|n| Some(*n) != last));
    nodes.extend(last);
    let mut order = Vec::new();
    for n in nodes {
        if n != me && !order.contains(&n) {
            order.push(n);
        }
    }
    order
}

impl Part {
    /// This replica checked failover `epoch`: held again if it owes a
    /// later one.
    fn mark_checked(&mut self, map: &ClusterMap, partition: u32, epoch: u64) {
        self.barred_told = false;
        self.checked = epoch;
        self.unchecked = map.owed_check(partition, epoch);
        self.replica.hold(self.unchecked);
    }

    /// The timeline now holds every post up to `applied` (a copy, a
    /// check or a realignment installed), and the log nothing retained
    /// before it.
    fn installed(&mut self, applied: Slot) {
        self.applied = applied;
        self.retained.clear();
        self.retained_bytes = 0;
    }

    /// After [`LogReplica::rewind`] to `applied` for failover `epoch`:
    /// this replica checked that epoch, its timeline holds every post up
    /// to `applied` and its log nothing up to there. Returns the change
    /// that records it in the log file.
    fn rewound(
        &mut self,
        map: &ClusterMap,
        partition: u32,
        epoch: u64,
        applied: Slot,
    ) -> LogChange {
        self.mark_checked(map, partition, epoch);
        self.installed(applied);
        LogChange {
            partition,
            rewind: Some(Rewind { epoch, applied }),
            ..LogChange::default()
        }
    }

    /// On a learner that knows no leader while a client waited for one in
    /// the last [`crate::placement::ROUTE_WAIT_MS`]: tells the voters,
    /// at most once per [`RANK_STAGGER_MS`] (a nudge may be lost, and a
    /// voter that was down may be back). Whether it did.
    fn nudge_voters(&mut self, now: Millis) -> bool {
        let waiting = self
            .wanted
            .is_some_and(|t| now.since(t) < crate::placement::ROUTE_WAIT_MS);
        if self.leader.is_some()
            || !waiting
            || self.nudged.is_some_and(|t| now.since(t) < RANK_STAGGER_MS)
        {
            return false;
        }
        self.replica.nudge();
        self.nudged = Some(now);
        true
    }

    /// On a leader whose log has a home lease: whether it has held none for
    /// [`HOME_LEASE_GRACE_MS`] or more, so that what it commits is not
    /// released. Its posts that waited as long are answered then.
    fn cut_off(&self, now: Millis) -> bool {
        self.lease_lapsed
            .is_some_and(|since| now.since(since) >= HOME_LEASE_GRACE_MS)
    }

    /// Feeds the replica a reading of the lease clock (the home lease's
    /// grants and releases are timed by it) and keeps
    /// [`Part::lease_lapsed`] true.
    fn tick(&mut self, partition: u32, now: Millis) {
        self.replica.tick(now);
        let leads_without_lease = self.replica.leading().is_some()
            && self.replica.config().home_lease.is_some()
            && self.replica.home_lease_until().is_none();
        match (leads_without_lease, self.lease_lapsed) {
            (true, None) => self.lease_lapsed = Some(now),
            (false, Some(since)) => {
                if self.replica.leading().is_some() && now.since(since) >= HOME_LEASE_GRACE_MS {
                    tracing::info!(partition, "the partition's home lease is held again");
                }
                self.lease_lapsed = None;
                self.cut_off_said = false;
            }
            _ => {}
        }
    }

    /// See [`Part::retired`]: it steps down if it led or ran, and forgets
    /// its leader, so that its clients are sent to the partition's
    /// replicas now.
    fn retire(&mut self) {
        self.retired = true;
        self.active = false;
        self.leader = None;
        self.wanted = None;
        self.replica.step_down();
    }

    /// Whether this replica may run for leader: never once retired
    /// ([`Part::retired`]); otherwise always, unless it owes a
    /// failover check (see "Home failover"). Then only in the failover
    /// epoch it owes, while the map has not established it (the new
    /// home's voters all owe it, and one of them must lead it; the log
    /// of the one that establishes it defines the epoch, and the map
    /// names it), and not while a check or copy runs. A
    /// replica that owes an earlier epoch than its log runs in must not
    /// lead on a prefix it has not checked.
    fn may_campaign(&self, map: &ClusterMap, partition: u32) -> bool {
        if self.retired || self.replica.is_barred() {
            return false;
        }
        match self.unchecked {
            None => true,
            Some(owed) => {
                !self.copying
                    && owed == self.replica.config().epoch
                    && map.failing_over.contains_key(&partition)
            }
        }
    }

    /// Whether a quorum of the replicas (this node among them) answered
    /// within [`ELECTION_TIMEOUT_MS`] (counting from when it took the lead,
    /// for replicas that have not answered yet): a leader that does not
    /// hear a quorum steps down, so its clients are sent elsewhere rather
    /// than wait on posts that cannot commit. The others elect a new
    /// leader after the same timeout.
    fn hears_a_quorum(&self, now: Millis) -> bool {
        let voters = &self.replica.config().replicas;
        let replicas = voters.len();
        let recent = self
            .acks
            .iter()
            .filter(|(n, t)| voters.contains(n) && now.since(**t) < ELECTION_TIMEOUT_MS)
            .count()
            + 1;
        recent > replicas / 2 || now.since(self.led_since) < ELECTION_TIMEOUT_MS
    }
}

/// Everything the driver needs.
pub struct DriverParts {
    /// This node.
    pub me: NodeId,
    /// Partitions and their replicas.
    pub placement: Arc<Placement>,
    /// The cluster map as read at start, for each partition's epoch
    /// ([`ClusterMap::partition_epoch`]), which its terms carry.
    pub map: Arc<ClusterMap>,
    /// The cluster map as it changes (`None`: it never does): a partition
    /// whose epoch moves gets its new replica set from it.
    pub maps: Option<tokio::sync::watch::Receiver<ClusterMap>>,
    /// The durable log file and what it held at start.
    pub store: Arc<LogStore>,
    /// The states read from it.
    pub states: HashMap<u32, PartitionLogState>,
    /// The timeline store applied to.
    pub chat: Arc<dyn ChatStore>,
    /// Outgoing peer traffic.
    pub peers: Arc<dyn PeerSender>,
    /// Incoming partition-log traffic.
    pub inbound: mpsc::Receiver<LogInbound>,
    /// Time.
    pub clock: Arc<dyn Clock>,
    /// Stops the driver.
    pub shutdown: CancellationToken,
    /// Where a partition's timeline is copied from when this node's log
    /// is behind what the others compacted; `None`: it is never copied
    /// (the lag is only reported).
    pub copier: Option<Arc<dyn super::copy::CopySource>>,
    /// Applied bytes each partition's log retains (at most
    /// [`RETAINED_BYTES_MAX`]).
    pub retained_max: usize,
    /// The timing of home leases (the rooms' lease timing), for the
    /// partitions whose home can fail over (see "Home failover").
    pub home_lease: LeaseConfig,
}

/// A committed post whose client asked for another datacenter's copy
/// before the acknowledgement.
struct RemoteWaiter {
    partition: u32,
    slot: Slot,
    placed: Sequenced,
    since: Millis,
    reply: Reply,
}

/// How long a post of [`Durability::CrossDatacenter`] waits for another
/// datacenter before it is answered UNAVAILABLE (it stays committed).
pub const CROSS_DATACENTER_WAIT_MS: u64 = 10_000;

struct Driver {
    me: NodeId,
    placement: Arc<Placement>,
    map: Arc<ClusterMap>,
    store: Arc<LogStore>,
    chat: Arc<dyn ChatStore>,
    peers: Arc<dyn PeerSender>,
    clock: Arc<dyn Clock>,
    parts: HashMap<u32, Part>,
    /// Each room's tail and when it was last used (a counter).
    tails: HashMap<RoomId, (RoomTail, u64)>,
    uses: u64,
    last_sweep: Millis,
    /// Posts appended here and not answered yet, by token: partition,
    /// answer, level, and when they were appended.
    waiters: HashMap<u64, (u32, Reply, Durability, Millis)>,
    /// Posts of [`Durability::CrossDatacenter`] committed and applied
    /// here, waiting for another datacenter to confirm them.
    remote_waiters: Vec<RemoteWaiter>,
    next_token: u64,
    leaders: Arc<Leaders>,
    subscribers: Subscribers,
    /// Applied marks and compaction floors to write with the next batch.
    marks: Vec<LogChange>,
    /// Committed posts of partitions this node follows, not applied yet,
    /// in slot order per partition.
    deferred: HashMap<u32, Vec<Committed<LogPost>>>,
    deferred_posts: usize,
    /// When the oldest deferred post committed.
    deferred_since: Option<Millis>,
    /// Per partition, the last slot applied to the timeline store but not
    /// synced there yet (see "Applying without a sync per pass").
    unsynced: HashMap<u32, Slot>,
    unsynced_posts: usize,
    /// When the oldest unsynced post committed.
    unsynced_since: Option<Millis>,
    /// Set while the timeline store fails.
    outage: Option<Outage>,
    /// Posts placed by an apply that failed: a retry that finds one stored
    /// (so not fresh) still delivers it, once.
    undelivered: std::collections::HashSet<crate::message_id::MessageId>,
    copier: Option<Arc<dyn super::copy::CopySource>>,
    /// Copies running.
    copying: usize,
    copies: (
        mpsc::UnboundedSender<CopyDone>,
        Option<mpsc::UnboundedReceiver<CopyDone>>,
    ),
    retained_max: usize,
    home_lease: LeaseConfig,
    /// A rotation of the partition-log file whose new checkpoint is being
    /// written off this loop (see [`Driver::rotate`]).
    rotation: Option<JoinHandle<Result<PreparedFile, NodeError>>>,
}

/// Starts the driver; its task ends with `Err(Fatal)` if the node can no
/// longer keep its promises or store what committed.
pub fn spawn(parts: DriverParts) -> (Timeline, JoinHandle<Result<(), NodeError>>) {
    let (tx, rx) = mpsc::channel(COMMAND_QUEUE_MAX);
    let leaders = Arc::new(Leaders::default());
    let subscribers: Subscribers = Arc::default();
    let now = parts.clock.monotonic();
    let mut driver = Driver {
        me: parts.me,
        placement: parts.placement,
        map: parts.map,
        store: parts.store,
        chat: parts.chat,
        peers: parts.peers,
        clock: parts.clock,
        parts: HashMap::new(),
        tails: HashMap::new(),
        uses: 0,
        last_sweep: now,
        waiters: HashMap::new(),
        remote_waiters: Vec::new(),
        // Tokens from a fresh random base: an answer for a post of an
        // earlier incarnation is never taken for one of this one.
        next_token: rand::random::<u64>() >> 1,
        leaders: Arc::clone(&leaders),
        subscribers: Arc::clone(&subscribers),
        marks: Vec::new(),
        deferred: HashMap::new(),
        deferred_posts: 0,
        deferred_since: None,
        unsynced: HashMap::new(),
        unsynced_posts: 0,
        unsynced_since: None,
        outage: None,
        undelivered: std::collections::HashSet::new(),
        copier: parts.copier,
        copying: 0,
        copies: {
            let (tx, rx) = mpsc::unbounded_channel();
            (tx, Some(rx))
        },
        retained_max: parts.retained_max.min(RETAINED_BYTES_MAX),
        home_lease: parts.home_lease,
        rotation: None,
    };
    for (partition, state) in parts.states {
        if driver.replicas(partition).contains(&driver.me) {
            driver.load(partition, state, now);
        }
    }
    let timeline = Timeline {
        me: parts.me,
        tx,
        leaders,
        subscribers,
    };
    let task = tokio::spawn(driver.run(rx, parts.inbound, parts.maps, parts.shutdown));
    (timeline, task)
}

/// A replica's rank among the voters (the preferred owner first); a
/// learner ranks after every voter and never campaigns.
fn rank_of(config: &LogConfig) -> u64 {
    config
        .replicas
        .iter()
        .position(|n| *n == config.me)
        .unwrap_or(config.replicas.len()) as u64
}

fn fatal(e: &NodeError) -> NodeError {
    NodeError::Fatal(format!("partition log: {e}"))
}

impl Driver {
    fn replicas(&self, partition: u32) -> Vec<NodeId> {
        if partition >= self.placement.partitions().get() {
            return Vec::new();
        }
        self.placement
            .replicas(saferchat_placement::PartitionId(partition))
            .to_vec()
    }

    /// The partition's log configuration on this node: its replicas in
    /// its home datacenter vote, the others learn (`Placement::voters`).
    /// Where the home can fail over, releases need a home lease; while the
    /// map says the partition's home moved and no leader established the
    /// new epoch, elections also read every datacenter but the lost home
    /// (see "Home failover").
    fn log_config(&self, partition: u32, epoch: u64) -> LogConfig {
        let p = saferchat_placement::PartitionId(partition);
        let mut config = LogConfig::with_learners(
            self.me,
            self.placement.voters(p),
            self.placement.learners(p),
        )
        .in_epoch(epoch);
        config.batch_max = ACCEPT_VALUES_MAX;
        // A failover epoch always has the lease: its promisers wait out
        // the grants they gave the old home only where it is set (the map
        // refuses a new home that could not fail over in turn, so this is
        // a second guard).
        if self.placement.can_fail_over(p) || self.map.failing_over.contains_key(&partition) {
            config.home_lease = Some(self.home_lease);
        }
        if let Some(lost) = self.map.failing_over.get(&partition)
            && self.map.partition_epoch(partition) == epoch
        {
            let mut groups: std::collections::BTreeMap<&str, Vec<NodeId>> =
                std::collections::BTreeMap::new();
            for n in self.placement.replicas(p) {
                match self.placement.datacenter_of(*n) {
                    Some(dc) if dc != lost => groups.entry(dc).or_default().push(*n),
                    _ => {}
                }
            }
            config.failover = Some(Failover {
                groups: groups.into_values().collect(),
            });
        }
        config
    }

    fn load(&mut self, partition: u32, state: PartitionLogState, now: Millis) {
        let config = self.log_config(partition, self.map.partition_epoch(partition));
        let rank = rank_of(&config);
        let acceptor = LogAcceptor::restore(state.promised, state.entries, state.floor);
        let retained: VecDeque<(Slot, usize)> = acceptor
            .entries_from(Slot(0))
            .into_iter()
            .take_while(|(s, _)| *s <= state.applied)
            .map(|(s, e)| (s, value_bytes(&e.value)))
            .collect();
        let retained_bytes = retained.iter().map(|(_, b)| b).sum();
        // A replica that has not checked every failover of the partition
        // is held until it has (see "Home failover"). Even one whose log
        // state is empty: its timeline store may hold the partition's
        // rooms from an earlier membership.
        let checked = state.checked;
        let unchecked = self.map.owed_check(partition, checked);
        let mut replica = LogReplica::new(config, acceptor, state.applied);
        replica.hold(unchecked);
        replica.held_copy_restored(state.installed_held);
        replica.held_copies_restored(state.held_copies);
        self.parts.insert(
            partition,
            Part {
                replica,
                rank,
                leader: None,
                heard: now,
                active: false,
                retired: false,
                last_heartbeat: now,
                acks: HashMap::new(),
                candidate_seen: None,
                led_since: now,
                applied: state.applied,
                retained,
                retained_bytes,
                copying: false,
                copy_after: now,
                copy_backoff_ms: COPY_RETRY_MS,
                newer_epoch: 0,
                commit_times: VecDeque::new(),
                lease_lapsed: None,
                cut_off_said: false,
                checked,
                unchecked,
                barred_told: false,
                wanted: None,
                nudged: None,
            },
        );
    }

    /// Takes the replica sets and epochs of `map` for every partition whose
    /// epoch it moved (a grow or a shrink). A loaded partition this node
    /// still replicates moves its log to the new epoch
    /// (`LogReplica::reconfigure`: a leader of the old one steps down, and
    /// its waiting posts are told to retry); one it left keeps its old
    /// configuration, which answers only the old epoch, where the new
    /// set's leader fences it. A partition placed elsewhere at the same
    /// epoch is logged and not followed: a set changes only with its epoch.
    fn follow(&mut self, map: ClusterMap, touched: &mut Vec<u32>) {
        let Some((placement, moved)) =
            crate::placement::follow_map(&self.placement, &self.map, &map)
        else {
            return;
        };
        self.map = Arc::new(map);
        self.placement = Arc::new(placement);
        // A home move's epoch established: its elections read the voters
        // alone from now on (the same epoch, so not among `moved`).
        // Only where this node is still a replica in that same epoch: a map
        // that also moved the partition on (or away from this node) since
        // is the loop below's.
        let established: Vec<u32> = self
            .parts
            .iter()
            .filter(|(p, part)| {
                let config = part.replica.config();
                config.failover.is_some()
                    && !self.map.failing_over.contains_key(p)
                    && self.map.partition_epoch(**p) == config.epoch
                    && !moved.contains(*p)
            })
            .map(|(p, _)| *p)
            .filter(|p| self.replicas(*p).contains(&self.me))
            .collect();
        for partition in established {
            let epoch = self.parts[&partition].replica.config().epoch;
            let config = self.log_config(partition, epoch);
            let part = self.parts.get_mut(&partition).expect("loaded");
            if part.replica.reconfigure(config) {
                tracing::info!(partition, epoch, "the partition's new home is established");
                touched.push(partition);
            }
        }
        for partition in moved {
            let replicas = self.replicas(partition);
            let epoch = self.map.partition_epoch(partition);
            tracing::info!(partition, epoch, replicas = ?replicas, "the partition's log has a new replica set");
            if !replicas.contains(&self.me) {
                if let Some(part) = self.parts.get_mut(&partition)
                    && !part.retired
                {
                    tracing::info!(
                        partition,
                        epoch,
                        "the partition moved off this node: its log here stops running for leader"
                    );
                    part.retire();
                    touched.push(partition);
                }
                continue;
            }
            if !self.parts.contains_key(&partition) {
                continue;
            }
            let config = self.log_config(partition, epoch);
            let rank = rank_of(&config);
            let part = self.parts.get_mut(&partition).expect("loaded");
            part.retired = false;
            if part.replica.reconfigure(config) {
                part.rank = rank;
                part.acks.clear();
                part.leader = None;
                touched.push(partition);
            }
        }
        // A home moved: every replica that applied the partition before
        // holds its log until it checked its timeline against the new
        // home's (the leader that defines it excepted: see `settle`). One
        // that still owes an older check keeps owing that one first.
        for (partition, part) in &mut self.parts {
            if part.unchecked.is_some() {
                continue;
            }
            if let Some(owed) = self.map.owed_check(*partition, part.checked) {
                tracing::info!(
                    partition,
                    epoch = owed,
                    "the partition's home moved: this replica applies nothing more until it checked its timeline against the new home's"
                );
                part.unchecked = Some(owed);
                part.replica.hold(Some(owed));
            }
        }
    }

    /// The partition's state here, loaded empty on first use; `None` when
    /// this node does not replicate it.
    fn part(&mut self, partition: u32) -> Option<&mut Part> {
        if !self.parts.contains_key(&partition) {
            if !self.replicas(partition).contains(&self.me) {
                return None;
            }
            let now = self.clock.monotonic();
            self.load(partition, PartitionLogState::default(), now);
        }
        self.parts.get_mut(&partition)
    }

    async fn run(
        mut self,
        mut commands: mpsc::Receiver<Command>,
        mut inbound: mpsc::Receiver<LogInbound>,
        mut maps: Option<tokio::sync::watch::Receiver<ClusterMap>>,
        shutdown: CancellationToken,
    ) -> Result<(), NodeError> {
        let mut tick = tokio::time::interval(Duration::from_millis(TICK_MS));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut copies = self.copies.1.take().expect("run once");
        if let Some(maps) = &mut maps {
            let current = maps.borrow_and_update().clone();
            let mut touched = Vec::new();
            self.follow(current, &mut touched);
            self.settle(touched).await?;
        }
        loop {
            let mut touched = Vec::new();
            let map_changed = async {
                match &mut maps {
                    Some(maps) => maps.changed().await.is_ok(),
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                biased;
                () = shutdown.cancelled() => break,
                changed = map_changed => match maps.as_mut() {
                    Some(watch) if changed => {
                        let current = watch.borrow_and_update().clone();
                        self.follow(current, &mut touched);
                    }
                    _ => maps = None,
                },
                command = commands.recv() => match command {
                    Some(c) => {
                        self.on_command(c, &mut touched);
                        while let Ok(c) = commands.try_recv() {
                            self.on_command(c, &mut touched);
                        }
                    }
                    None => break,
                },
                Some(batch) = inbound.recv() => {
                    self.on_inbound(batch, &mut touched);
                    while let Ok(batch) = inbound.try_recv() {
                        self.on_inbound(batch, &mut touched);
                    }
                }
                Some(done) = copies.recv() => self.on_copied(done, &mut touched),
                _ = tick.tick() => self.on_tick(&mut touched),
            }
            touched.sort_unstable();
            touched.dedup();
            self.settle(touched).await?;
        }
        if self.deferred_posts > 0 || !self.unsynced.is_empty() {
            let deferred = self.take_deferred(|_| true);
            let applied = if deferred.is_empty() {
                Ok(())
            } else {
                self.apply(deferred).await
            };
            if let Err(e) = match applied {
                Ok(()) => self.sync_applied().await,
                Err(e) => Err(e),
            } {
                tracing::warn!(error = %e, "applying collected posts at shutdown failed; they are applied from the log at the next start");
            } else {
                let changes = std::mem::take(&mut self.marks);
                let store = Arc::clone(&self.store);
                if let Ok(Err(e)) = tokio::task::spawn_blocking(move || store.write(&changes)).await
                {
                    tracing::warn!(error = %e, "writing applied marks at shutdown failed; the posts are applied again (and recognised) at the next start");
                }
            }
        }
        for (_, (_, reply, _, _)) in self.waiters.drain() {
            let _ = reply.send(Err(NodeError::Unavailable("node is shutting down".into())));
        }
        for waiter in self.remote_waiters.drain(..) {
            let _ = waiter.reply.send(Err(NodeError::Unavailable(
                "node is shutting down; the post committed in its home datacenter, but no other datacenter confirmed it yet: retry the same post (a retry is recognised)".into(),
            )));
        }
        Ok(())
    }

    fn on_command(&mut self, command: Command, touched: &mut Vec<u32>) {
        match command {
            Command::Touch { partition } => {
                let now = self.clock.monotonic();
                let me = self.me;
                let map = Arc::clone(&self.map);
                let Some(part) = self.part(partition).filter(|p| !p.retired) else {
                    return;
                };
                if !part.active {
                    part.active = true;
                    part.heard = now;
                }
                if part.replica.config().is_learner() {
                    // It cannot run: it wakes the voters instead, now and
                    // on the ticks while clients wait (`nudge_voters`).
                    part.wanted = Some(now);
                    if part.nudge_voters(now) {
                        touched.push(partition);
                    }
                    return;
                }
                let contested = part
                    .candidate_seen
                    .is_some_and(|t| now.since(t) < ELECTION_TIMEOUT_MS);
                if part.leader.is_none()
                    && part.rank == 0
                    && part.replica.leading().is_none()
                    && !contested
                    && part.may_campaign(&map, partition)
                {
                    tracing::debug!(partition, %me, "campaigning: a client needs the partition");
                    part.tick(partition, now);
                    part.replica.campaign();
                    part.heard = now;
                    touched.push(partition);
                }
            }
            Command::Applied { partition, reply } => {
                let _ = reply.send(self.part(partition).map(|p| (p.applied, p.checked)));
            }
            Command::ReadsLocally { partition, reply } => {
                // Never loads the partition: one that is not loaded has
                // heard from no leader since the node started.
                let local = self.parts.get(&partition).is_some_and(|p| {
                    p.replica.config().is_learner()
                        && !p.copying
                        && p.unchecked.is_none()
                        && p.replica.caught_up_with_heard()
                        && p.applied >= p.replica.released()
                });
                let _ = reply.send(local);
            }
            Command::Established {
                partition,
                with,
                reply,
            } => {
                let established = self.parts.get(&partition).and_then(|p| {
                    p.replica
                        .established()
                        .filter(|term| term.epoch == p.replica.config().epoch)
                        .filter(|_| with.is_none_or(|node| p.replica.has_caught_up(node)))
                        .map(|term| super::Established {
                            epoch: term.epoch,
                            failover: p.replica.config().failover.is_some(),
                            vouched: p
                                .replica
                                .vouched()
                                .iter()
                                .map(|(n, s)| (n.0, s.0))
                                .collect(),
                        })
                });
                let _ = reply.send(established);
            }
            Command::Append {
                partition,
                mut posts,
                mut durability,
                mut replies,
            } => {
                if durability.contains(&Durability::CrossDatacenter)
                    && self.cross_datacenter_groups(partition).is_empty()
                {
                    // Refused before anything is appended: the others of
                    // the batch go on.
                    let mut kept = (Vec::new(), Vec::new(), Vec::new());
                    for ((post, reply), level) in posts.into_iter().zip(replies).zip(durability) {
                        if level == Durability::CrossDatacenter {
                            let _ = reply.send(Err(NodeError::FailedPrecondition(
                                "the room's partition has no replica outside its home datacenter (the cluster has one datacenter): a post cannot be durable in another; post it at the local level".into(),
                            )));
                        } else {
                            kept.0.push(post);
                            kept.1.push(reply);
                            kept.2.push(level);
                        }
                    }
                    (posts, replies, durability) = kept;
                    if posts.is_empty() {
                        return;
                    }
                }
                let me = self.me;
                let first_token = self.next_token;
                self.next_token += posts.len() as u64;
                for (i, p) in posts.iter_mut().enumerate() {
                    p.origin = (me, first_token + i as u64);
                }
                if let Some(outage) = &self.outage {
                    let why = format!(
                        "the timeline store is unavailable ({}); the post was not taken: retry later",
                        outage.error
                    );
                    for reply in replies {
                        let _ = reply.send(Err(NodeError::Unavailable(why.clone())));
                    }
                    return;
                }
                // A fresh reading of the lease clock before the append;
                // whatever it released or sent is settled, even when the
                // post is refused. A leader that holds no home lease still
                // appends: the lease may be back within a renewal (a cut
                // just healed), and a post it does not release within
                // [`HOME_LEASE_GRACE_MS`] is answered then (`on_tick`).
                let now = self.clock.monotonic();
                let leading = self.part(partition).is_some_and(|p| {
                    p.tick(partition, now);
                    p.replica.leading().is_some()
                });
                touched.push(partition);
                if !leading {
                    for reply in replies {
                        let _ = reply.send(Err(NodeError::Unavailable(
                            "this node no longer leads the room's partition; reconnect (a retried post is recognised)".into(),
                        )));
                    }
                    return;
                }
                for (i, (reply, level)) in replies.into_iter().zip(durability).enumerate() {
                    self.waiters
                        .insert(first_token + i as u64, (partition, reply, level, now));
                }
                let part = self.parts.get_mut(&partition).expect("loaded above");
                let values = posts.into_iter().map(Value::Post).collect();
                part.replica
                    .append(values)
                    .expect("a leading replica appends");
            }
        }
    }

    fn on_inbound(&mut self, batch: LogInbound, touched: &mut Vec<u32>) {
        let now = self.clock.monotonic();
        for (partition, message) in batch.messages {
            let Some(part) = self.part(partition) else {
                continue;
            };
            let term = message.term();
            match &message {
                // A leader's write: it leads, and is alive.
                LogMessage::Accept { .. }
                    if term.node == batch.from && part.leader.is_none_or(|l| l <= term) =>
                {
                    part.leader = Some(term);
                    part.heard = now;
                    part.active = true;
                }
                // A candidate: give it time before running.
                LogMessage::Prepare { .. }
                    if term.node == batch.from && part.leader.is_none_or(|l| l < term) =>
                {
                    part.leader = None;
                    part.heard = now;
                    part.active = true;
                    part.candidate_seen = Some(now);
                }
                _ => {}
            }
            if matches!(message, LogMessage::Accepted { .. })
                && part.replica.leading() == Some(term)
            {
                part.acks.insert(batch.from, now);
            }
            // A learner's report to a voter that does not lead it: a
            // client waits there for a leader (`LogReplica::nudge`).
            if !part.active
                && matches!(message, LogMessage::Accepted { .. })
                && part.replica.config().learners.contains(&batch.from)
            {
                part.active = true;
                part.heard = now;
            }
            part.tick(partition, now);
            part.replica.step(batch.from, message);
            touched.push(partition);
        }
    }

    fn on_tick(&mut self, touched: &mut Vec<u32>) {
        let now = self.clock.monotonic();
        let mut lagging = Vec::new();
        if now.since(self.last_sweep) >= SWEEP_MS {
            self.last_sweep = now;
            self.subscribers.lock().expect("lock").retain(|_, list| {
                list.retain(|tx| !tx.is_closed());
                !list.is_empty()
            });
        }
        // Partitions whose replica here still owes a failover's check (it
        // applies nothing until then): an operator, or a test, waits for
        // 0 after a home moved.
        #[allow(clippy::cast_precision_loss)]
        metrics::gauge!("saferchat_partitions_unchecked").set(
            self.parts
                .values()
                .filter(|p| p.unchecked.is_some())
                .count() as f64,
        );
        let mut cut_off = Vec::new();
        for (partition, part) in &mut self.parts {
            // Without a home lease nothing is ever due, and no lapse.
            if part.replica.next_tick().is_some_and(|t| t <= now) {
                touched.push(*partition);
            }
            part.tick(*partition, now);
            if part.cut_off(now) {
                if !part.cut_off_said {
                    part.cut_off_said = true;
                    tracing::warn!(
                        partition,
                        "no majority of the partition's replicas, every datacenter counted, renewed this leader's home lease; its posts are refused until they do"
                    );
                    metrics::counter!("saferchat_partition_home_lease_lapses_total").increment(1);
                }
                // Its posts that waited the grace out are answered.
                cut_off.push(*partition);
            }
            if part.retired {
                // In case a campaign under way when it retired won.
                if !part.replica.is_follower() {
                    part.retire();
                    touched.push(*partition);
                }
                continue;
            }
            if part.replica.leading().is_some() {
                if !part.hears_a_quorum(now) {
                    tracing::warn!(
                        partition,
                        "no quorum of the partition's replicas answered for a while; stepping down"
                    );
                    metrics::counter!("saferchat_partition_step_downs_total").increment(1);
                    part.replica.step_down();
                    part.heard = now;
                    touched.push(*partition);
                    continue;
                }
                if now.since(part.last_heartbeat) >= HEARTBEAT_MS {
                    part.replica.resend();
                    part.last_heartbeat = now;
                    touched.push(*partition);
                    lagging.push(*partition);
                }
                continue;
            }
            if part.replica.config().is_learner() {
                // A learner waits for the voters' leader; it never runs.
                // It forgets a leader it stopped hearing from, so that
                // clients are sent to the voters rather than to it.
                if part.leader.is_some() && now.since(part.heard) >= ELECTION_TIMEOUT_MS {
                    part.leader = None;
                    touched.push(*partition);
                }
                if part.nudge_voters(now) {
                    touched.push(*partition);
                }
                continue;
            }
            if part.replica.is_barred() && !part.barred_told {
                part.barred_told = true;
                metrics::counter!("saferchat_partition_failover_candidates_barred_total")
                    .increment(1);
                tracing::warn!(
                    partition,
                    epoch = part.replica.config().epoch,
                    "a leader of the failover epoch wrote, within what this replica released, something its log does not hold the same: it does not run for leader until it checked its timeline against the new home's"
                );
            }
            if !part.active || !part.may_campaign(&self.map, *partition) {
                continue;
            }
            let wait = if part.leader.is_some() {
                ELECTION_TIMEOUT_MS + part.rank * RANK_STAGGER_MS
            } else {
                // No leader known: the preferred owner runs when touched;
                // the others after their stagger.
                RANK_STAGGER_MS * part.rank.max(1)
            };
            if now.since(part.heard) >= wait {
                tracing::info!(
                    partition,
                    rank = part.rank,
                    "no leader heard from; campaigning"
                );
                metrics::counter!("saferchat_partition_campaigns_total").increment(1);
                part.leader = None;
                part.replica.campaign();
                part.heard = now;
                touched.push(*partition);
            }
        }
        for partition in lagging {
            self.report_lag(partition, now);
        }
        // The leader that established a failover epoch owed here defines
        // its log: checked (whatever its role now).
        let me = self.me.0;
        for (partition, part) in &mut self.parts {
            let Some(epoch) = part.unchecked else {
                continue;
            };
            if let Some(leader) = self
                .map
                .failover_leader(*partition, epoch)
                .filter(|l| l.node == me)
            {
                // How many replicas skip their check on this leader's
                // word: the rest read a checked replica's timeline.
                metrics::gauge!("saferchat_partition_failover_vouched_replicas", "partition" => partition.to_string())
                    .set(leader.vouched.len() as f64);
                part.mark_checked(&self.map, *partition, epoch);
                self.marks.push(LogChange {
                    partition: *partition,
                    checked: Some(epoch),
                    ..LogChange::default()
                });
                tracing::info!(
                    partition,
                    epoch,
                    vouched = leader.vouched.len(),
                    "this node established the partition's new home: its timeline defines it"
                );
                touched.push(*partition);
            }
        }
        // A check starts once the map established the epoch owed (its
        // leader released everything it recovered), on a follower only:
        // the check may cut the store under it.
        let checks: Vec<(u32, u64)> = self
            .parts
            .iter()
            .filter_map(|(partition, part)| {
                let epoch = part.unchecked?;
                let established = self.map.partition_epoch(*partition) > epoch
                    || !self.map.failing_over.contains_key(partition);
                (established && !part.copying && part.replica.is_follower())
                    .then_some((*partition, epoch))
            })
            .collect();
        for (partition, epoch) in checks {
            if !self.skip_vouched_check(partition, epoch, touched) {
                self.start_check(partition, epoch);
            }
        }
        if !cut_off.is_empty() {
            let refused = self.fail_waiters_with(&cut_off, CUT_OFF, |since| {
                now.since(since) >= HOME_LEASE_GRACE_MS
            });
            metrics::counter!("saferchat_partition_posts_refused_cut_off_total")
                .increment(refused as u64);
        }
    }

    /// Executes what the touched partitions asked for (see the module
    /// docs for the order).
    async fn settle(&mut self, touched: Vec<u32>) -> Result<(), NodeError> {
        let mut changes = std::mem::take(&mut self.marks);
        let mut sends = Vec::new();
        let mut committed: Vec<(u32, Vec<Committed<LogPost>>)> = Vec::new();
        let mut lost = Vec::new();
        let mut led = Vec::new();
        let mut leaders = Vec::new();
        let mut copy_needed = Vec::new();
        let mut realign_needed = Vec::new();
        for partition in touched {
            let me = self.me;
            let Some(part) = self.parts.get_mut(&partition) else {
                continue;
            };
            let ready = part.replica.take_ready();
            if let Some(w) = ready.write {
                changes.push(LogChange {
                    partition,
                    promised: Some(w.promised),
                    entries: w.entries,
                    ..LogChange::default()
                });
            }
            for (to, m) in ready.messages {
                sends.push((to, convert::log::message_to_pb(partition, &m)));
            }
            if !ready.committed.is_empty() {
                committed.push((partition, ready.committed));
            }
            for (node, from) in ready.lagging {
                if node == me {
                    copy_needed.push((partition, from));
                } else {
                    // Said again with every acknowledgement until the
                    // replica copied the partition: not worth a line each.
                    tracing::debug!(partition, %node, need = from.0, "a replica is behind the retained log; told to copy the partition");
                    metrics::counter!("saferchat_partition_lagging_total").increment(1);
                }
            }
            if let Some((leader, need)) = ready.realign {
                realign_needed.push((partition, leader, need));
            }
            if let Some(epoch) = ready.newer_epoch
                && epoch > part.newer_epoch
            {
                // A replica runs in a later epoch than the map this node
                // read at start: the partition moved on, and this node
                // neither answers nor campaigns in it until restarted on
                // the newer map. Said once per epoch.
                part.newer_epoch = epoch;
                tracing::warn!(
                    partition,
                    epoch,
                    known = part.replica.config().epoch,
                    "a replica of the partition runs in a later map epoch than this node knows"
                );
                metrics::counter!("saferchat_partition_newer_epoch_total").increment(1);
            }
            if let Some(term) = ready.leading {
                tracing::info!(partition, %term, "leading the partition");
                // A leader of the failover epoch it owes stays unchecked
                // (a leader releases all the same) until the map records
                // that it established the epoch: a later leader of the
                // epoch may replace a slot of its released prefix (a post
                // of the old home's loss window it had released as a
                // learner, which that leader's promisers lack).
                part.leader = Some(term);
                let now = self.clock.monotonic();
                part.led_since = now;
                part.acks.clear();
                part.commit_times.clear();
                // Tell the others at once (an empty Accept when nothing
                // was recovered), so none of them runs for want of news.
                part.replica.resend();
                part.last_heartbeat = now;
                for (to, m) in part.replica.take_ready().messages {
                    sends.push((to, convert::log::message_to_pb(partition, &m)));
                }
            }
            let leading = part.replica.leading();
            if leading.is_none() && part.leader.is_some_and(|l| l.node == me) {
                part.leader = None;
            }
            if leading.is_none() {
                lost.push(partition);
            } else {
                led.push(partition);
            }
            leaders.push((partition, part.leader.map(|t| t.node)));
        }
        if !lost.is_empty() {
            self.fail_waiters(&lost);
        }
        if !changes.is_empty() {
            let store = Arc::clone(&self.store);
            let started = std::time::Instant::now();
            tokio::task::spawn_blocking(move || store.write(&changes))
                .await
                .map_err(|e| fatal(&NodeError::Storage(e.to_string())))?
                .map_err(|e| fatal(&e))?;
            step_took("log_write", started);
        }
        for (to, m) in sends {
            self.peers.send_log(to, m);
        }
        let committed = self.batch_followers(committed, &led);
        if !committed.is_empty() {
            // Name the leaders of what was applied too: a partition whose
            // commits waited for a failing store is named once they are in.
            for (partition, _) in &committed {
                if !leaders.iter().any(|(p, _)| p == partition)
                    && let Some(part) = self.parts.get(partition)
                {
                    leaders.push((*partition, part.leader.map(|t| t.node)));
                }
            }
            let started = std::time::Instant::now();
            self.apply(committed).await?;
            step_took("apply", started);
        }
        let now = self.clock.monotonic();
        if self.unsynced_posts >= UNSYNCED_POSTS_MAX
            || self
                .unsynced_since
                .is_some_and(|t| now.since(t) >= FOLLOWER_APPLY_DELAY_MS)
        {
            self.sync_applied().await?;
        }
        // Named leader only now that its timeline holds every committed
        // post (see "Followers apply in batches"); not while some wait
        // for a failing store.
        for (partition, leader) in leaders {
            let waiting = leader == Some(self.me) && self.deferred.contains_key(&partition);
            self.leaders
                .set(partition, if waiting { None } else { leader });
        }
        for (partition, need) in copy_needed {
            self.start_copy(partition, need);
        }
        for (partition, leader, need) in realign_needed {
            self.start_realign(partition, leader, need);
        }
        self.rotate().await?;
        self.release_remote_waiters();
        Ok(())
    }

    /// Marks a copy (or a check) of `partition` as running and returns the
    /// replicas to take it from ([`copy_order`]: the leader first, on a
    /// held replica the home's voters), and
    /// on a shared store the replicas of this datacenter before the rest;
    /// `None` when one runs, one failed a moment ago, [`COPIES_AT_ONCE`]
    /// run, or the partition has posts of its own collected or unsynced.
    fn begin_copy(&mut self, partition: u32) -> Option<super::copy::Sources> {
        let now = self.clock.monotonic();
        if self.has_unsettled_posts(partition) {
            return None;
        }
        let me = self.me;
        let replicas = self.replicas(partition);
        let part = self.parts.get_mut(&partition)?;
        if part.copying || now < part.copy_after || self.copying >= COPIES_AT_ONCE {
            return None;
        }
        part.copying = true;
        self.copying += 1;
        let held_voters = part
            .replica
            .is_held()
            .then(|| part.replica.config().replicas.clone());
        let checked = part.checked;
        let nodes = copy_order(
            me,
            part.replica.leader_hint(),
            held_voters.as_deref(),
            replicas,
        );
        let mine = self.placement.datacenter_of(me);
        Some(
            super::copy::Sources::new(nodes, self.chat.shared(), |n| {
                mine.is_some() && self.placement.datacenter_of(n) == mine
            })
            .checked_against(checked),
        )
    }

    /// Copies the partition's timeline from another replica in a task of
    /// its own, unless one runs, one failed a moment ago, or the partition
    /// has posts of its own collected or unsynced (see "Compaction"; the
    /// leader says it again with its next heartbeat).
    fn start_copy(&mut self, partition: u32, need: Slot) {
        let Some(copier) = self.copier.clone() else {
            tracing::warn!(
                partition,
                need = need.0,
                "this node's log is behind what its peers compacted, and it copies no timelines"
            );
            return;
        };
        // (A held replica copies too: a voter of a new home that fell
        // behind the leader's compacted log holds what it copied, and the
        // new home may need it to establish; its check later cuts
        // whatever of its old tail the copy landed after.)
        let Some(sources) = self.begin_copy(partition) else {
            return;
        };
        let term = self
            .parts
            .get(&partition)
            .map(|p| p.replica.newest_term())
            .unwrap_or(saferchat_consensus::partition_log::Term::ZERO);
        tracing::info!(
            partition,
            need = need.0,
            ?sources,
            "this node's log is behind what its peers compacted; copying the partition's timeline"
        );
        let chat = Arc::clone(&self.chat);
        let done = self.copies.0.clone();
        tokio::spawn(async move {
            let result = super::copy::copy(&*copier, &*chat, partition, &sources, need)
                .await
                .map(|copied| (copied, super::copy::Cut::default()));
            let _ = done.send(CopyDone {
                partition,
                kind: CopyKind::Behind,
                term,
                result,
            });
        });
    }

    /// Whether posts of `partition` wait to be applied or synced: no copy,
    /// check or rewind may move its applied mark meanwhile.
    fn has_unsettled_posts(&self, partition: u32) -> bool {
        self.deferred.contains_key(&partition) || self.unsynced.contains_key(&partition)
    }

    /// Ends this replica's check of failover epoch `epoch` without
    /// reading anyone's timeline, where the leader that established the
    /// epoch vouched for it (`ClusterMap::vouched_prefix`) and it still
    /// has released exactly the prefix it promised with, all of it
    /// applied and synced: its timeline is a prefix of the epoch's log
    /// (`LogReplica::untouched` says why), so there is nothing to cut.
    /// The log rewinds to that prefix (which drops the entries of earlier
    /// epochs that no later election may find) and releases on from
    /// there. Whether it did.
    ///
    /// Vouching spares the check's read of the partition's timeline, and
    /// it keeps the new home going when the epoch's leader is lost before
    /// any other replica checked against it: a check needs a replica
    /// checked already, and none may lead unchecked.
    fn skip_vouched_check(&mut self, partition: u32, epoch: u64, touched: &mut Vec<u32>) -> bool {
        if self.has_unsettled_posts(partition) {
            return false;
        }
        let me = self.me.0;
        let Some(part) = self.parts.get_mut(&partition) else {
            return false;
        };
        let released = part.replica.released();
        // Never an empty prefix (a leader of an earlier version may have
        // named one): see `LogReplica::untouched`.
        if released == Slot(0)
            || self.map.vouched_prefix(partition, epoch, me) != Some(released.0)
            || part.applied != released
            || !part.replica.rewind(released, epoch)
        {
            return false;
        }
        let change = part.rewound(&self.map, partition, epoch, released);
        self.marks.push(change);
        metrics::counter!("saferchat_partition_failover_checks_vouched_total", "partition" => partition.to_string())
            .increment(1);
        tracing::info!(
            partition,
            epoch,
            applied = released.0,
            "the leader that established the partition's new home vouched for this replica's timeline: no check needed"
        );
        touched.push(partition);
        true
    }

    /// Makes the timeline of a held partition its leader's, in a task of
    /// its own (`LogReady::realign`: the replica reports less than the
    /// leader's compaction floor or its own, and no resend can fill
    /// that): cuts every room back to the last message it holds in the
    /// same place as `leader` and copies the rest up to at least `need`
    /// (`copy::realign`), then [`Driver::on_realigned`]. Unless a copy
    /// runs, one failed a moment ago, or posts of the partition wait to
    /// be applied or synced.
    fn start_realign(&mut self, partition: u32, leader: NodeId, need: Slot) {
        let Some(copier) = self.copier.clone() else {
            tracing::warn!(
                partition,
                %leader,
                "this held replica reports less than its leader can resend, and it copies no timelines: the new home may not establish"
            );
            return;
        };
        if self.begin_copy(partition).is_none() {
            return;
        }
        let Some(part) = self.parts.get(&partition) else {
            return;
        };
        let term = part.replica.newest_term();
        let mine = self.placement.datacenter_of(self.me);
        let sources = super::copy::Sources::new(vec![leader], self.chat.shared(), |n| {
            mine.is_some() && self.placement.datacenter_of(n) == mine
        })
        .checked_against(part.checked);
        tracing::info!(
            partition,
            %leader,
            need = need.0,
            "this held replica reports less than its leader can resend; making its timeline the leader's"
        );
        self.spawn_cut_and_copy(copier, partition, Cut::Realign(need), term, sources);
    }

    /// Runs a check (`copy::check`) or a realignment (`copy::realign`)
    /// of `partition` from `sources` in a task of its own; `term` is the
    /// newest the replica knew as it began. [`Driver::on_copied`] takes
    /// the result.
    fn spawn_cut_and_copy(
        &self,
        copier: Arc<dyn super::copy::CopySource>,
        partition: u32,
        cut: Cut,
        term: saferchat_consensus::partition_log::Term,
        sources: super::copy::Sources,
    ) {
        let chat = Arc::clone(&self.chat);
        let placement = Arc::clone(&self.placement);
        let done = self.copies.0.clone();
        tokio::spawn(async move {
            let in_partition =
                move |r: &RoomId| placement.partitions().of_room(r.as_str()).0 == partition;
            let (from, chat) = (&*copier, &*chat);
            let (result, kind) = match cut {
                Cut::Check(epoch) => (
                    super::copy::check(from, chat, &in_partition, partition, &sources, epoch).await,
                    CopyKind::Check(epoch),
                ),
                Cut::Realign(need) => (
                    super::copy::realign(from, chat, &in_partition, partition, &sources, need)
                        .await,
                    CopyKind::Realign,
                ),
            };
            let _ = done.send(CopyDone {
                partition,
                kind,
                term,
                result,
            });
        });
    }

    /// Installs a finished realignment (`LogReplica::realigned`): the
    /// store was cut and copied, so the room tails are reloaded from it;
    /// the log file records the new applied mark and floor (a rewind of
    /// epoch 0, which checks nothing) and the copy's provenance.
    fn on_realigned(
        &mut self,
        partition: u32,
        copied: super::copy::Copied,
        term: saferchat_consensus::partition_log::Term,
        cut: &super::copy::Cut,
    ) {
        let placement = Arc::clone(&self.placement);
        self.tails
            .retain(|room, _| placement.partitions().of_room(room.as_str()).0 != partition);
        let Some(part) = self.parts.get_mut(&partition) else {
            return;
        };
        if !part.replica.realigned(copied.applied, copied.source, term) {
            tracing::warn!(
                partition,
                "the finished realignment no longer applies (the term moved on, or the replica runs or checked)"
            );
            return;
        }
        part.installed(copied.applied);
        self.marks.push(LogChange {
            partition,
            rewind: Some(Rewind {
                epoch: 0,
                applied: copied.applied,
            }),
            installed_held: part.replica.installed_held(),
            held_copies: Some(part.replica.held_copies()),
            ..LogChange::default()
        });
        metrics::counter!("saferchat_partition_realigns_total").increment(1);
        metrics::counter!("saferchat_partition_divergent_posts_cut_total").increment(cut.messages);
        copied_metrics(partition, &copied);
        tracing::info!(
            partition,
            source = %copied.source,
            cut_rooms = cut.cut_rooms,
            cut_posts = cut.messages,
            applied = copied.applied.0,
            copied = copied.messages,
            "made this held replica's timeline its leader's"
        );
    }

    /// Checks the timeline of a partition whose home failed over in
    /// `epoch` against a replica checked against that epoch itself (the
    /// leader first), in a task of its own: cuts every room back to the
    /// last message both hold and copies the rest (`copy::check`), then
    /// [`Driver::on_copied`] rewinds the log to the copy. Unless a copy
    /// runs, one failed a moment ago, or posts of the partition wait to be
    /// applied or synced (they were released before the log was held).
    fn start_check(&mut self, partition: u32, epoch: u64) {
        let Some(copier) = self.copier.clone() else {
            tracing::warn!(
                partition,
                epoch,
                "the partition's home failed over and this node copies no timelines, so it cannot check its own: it stays held"
            );
            return;
        };
        let Some(sources) = self.begin_copy(partition) else {
            return;
        };
        tracing::info!(
            partition,
            epoch,
            ?sources,
            "checking the partition's timeline against the new home's after a home failover"
        );
        let term = self
            .parts
            .get(&partition)
            .map(|p| p.replica.newest_term())
            .unwrap_or(saferchat_consensus::partition_log::Term::ZERO);
        self.spawn_cut_and_copy(copier, partition, Cut::Check(epoch), term, sources);
    }

    /// Installs a finished copy: the log counts its slots as released and
    /// applied, and the room tails of the partition are reloaded from the
    /// store (which now holds the copy) when next needed.
    fn on_copied(&mut self, done: CopyDone, touched: &mut Vec<u32>) {
        let now = self.clock.monotonic();
        let partition = done.partition;
        let placement = Arc::clone(&self.placement);
        self.copying -= 1;
        let Some(part) = self.parts.get_mut(&partition) else {
            return;
        };
        part.copying = false;
        let (copied, cut) = match done.result {
            Ok(done) => done,
            Err(e) => {
                tracing::warn!(partition, error = %e, retry_ms = part.copy_backoff_ms, "copying the partition's timeline failed");
                metrics::counter!("saferchat_partition_copy_failures_total").increment(1);
                part.copy_after = now.plus(part.copy_backoff_ms);
                part.copy_backoff_ms = (part.copy_backoff_ms * 2).min(COPY_RETRY_MAX_MS);
                return;
            }
        };
        part.copy_backoff_ms = COPY_RETRY_MS;
        if done.kind == CopyKind::Realign {
            self.on_realigned(partition, copied, done.term, &cut);
            touched.push(partition);
            return;
        }
        if let CopyKind::Check(epoch) = done.kind {
            // The store was cut and copied: the room tails are reloaded
            // from it, whatever comes next.
            self.tails
                .retain(|room, _| placement.partitions().of_room(room.as_str()).0 != partition);
            if part.unchecked != Some(epoch) || !part.replica.rewind(copied.applied, epoch) {
                // Not a follower any more: no check starts on a candidate
                // or a leader, and one whose check runs does not run.
                tracing::warn!(partition, epoch, "the finished check no longer applies");
                return;
            }
            let mut change = part.rewound(&self.map, partition, epoch, copied.applied);
            // Held again for a later failover (home moves in a row): the
            // whole timeline is now the source's, and counts as a copy
            // from it (`LogReplica::checked_against`).
            part.replica
                .checked_against(copied.applied, copied.source, done.term);
            if part.replica.is_held() {
                change.held_copies = Some(part.replica.held_copies());
            }
            self.marks.push(change);
            metrics::counter!("saferchat_partition_failover_checks_total", "partition" => partition.to_string())
                .increment(1);
            copied_metrics(partition, &copied);
            metrics::counter!("saferchat_partition_divergent_posts_cut_total")
                .increment(cut.messages);
            tracing::info!(
                partition,
                epoch,
                source = %copied.source,
                rooms = cut.rooms,
                cut_rooms = cut.cut_rooms,
                cut_posts = cut.messages,
                applied = copied.applied.0,
                copied = copied.messages,
                "checked the partition's timeline against the new home's and rewound its log to the copy"
            );
            touched.push(partition);
            return;
        }
        if !part
            .replica
            .install_copy(copied.applied, copied.source, done.term)
        {
            tracing::info!(
                partition,
                applied = copied.applied.0,
                "the copied timeline is not ahead of this node's log; nothing to install"
            );
            return;
        }
        part.installed(copied.applied);
        self.marks.push(LogChange {
            partition,
            floor: Some(copied.applied),
            applied: Some(copied.applied),
            installed_held: part.replica.installed_held(),
            held_copies: part.replica.is_held().then(|| part.replica.held_copies()),
            ..LogChange::default()
        });
        self.tails
            .retain(|room, _| placement.partitions().of_room(room.as_str()).0 != partition);
        metrics::counter!("saferchat_partition_copies_total").increment(1);
        copied_metrics(partition, &copied);
        tracing::info!(
            partition,
            source = %copied.source,
            applied = copied.applied.0,
            messages = copied.messages,
            bytes = copied.bytes,
            "installed the partition's timeline copied from a replica"
        );
        touched.push(partition);
    }

    /// What to apply now: led partitions' commits (after anything collected
    /// for them while following), and everything collected once enough
    /// waits or the oldest has waited long enough; followed partitions'
    /// other commits are collected.
    fn batch_followers(
        &mut self,
        committed: Vec<(u32, Vec<Committed<LogPost>>)>,
        led: &[u32],
    ) -> Vec<(u32, Vec<Committed<LogPost>>)> {
        let now = self.clock.monotonic();
        if let Some(outage) = &self.outage {
            // Everything waits for the next attempt, in slot order.
            let retry = now >= outage.retry_at;
            for (partition, slots) in committed {
                self.deferred_posts += slots.len();
                self.deferred_since.get_or_insert(now);
                self.deferred.entry(partition).or_default().extend(slots);
            }
            return if retry {
                self.take_deferred(|_| true)
            } else {
                Vec::new()
            };
        }
        let mut now_apply = self.take_deferred(|p| led.contains(&p));
        for (partition, slots) in committed {
            if led.contains(&partition) {
                match now_apply.iter_mut().find(|(p, _)| *p == partition) {
                    Some((_, earlier)) => earlier.extend(slots),
                    None => now_apply.push((partition, slots)),
                }
            } else {
                self.deferred_posts += slots.len();
                self.deferred_since.get_or_insert(now);
                self.deferred.entry(partition).or_default().extend(slots);
            }
        }
        let due = self.deferred_posts >= FOLLOWER_APPLY_POSTS_MAX
            || self
                .deferred_since
                .is_some_and(|t| now.since(t) >= FOLLOWER_APPLY_DELAY_MS);
        if due {
            now_apply.extend(self.take_deferred(|_| true));
        }
        #[allow(clippy::cast_precision_loss)]
        metrics::gauge!("saferchat_timeline_deferred_posts").set(self.deferred_posts as f64);
        now_apply
    }

    /// Removes the collected commits of the partitions `which` selects.
    fn take_deferred(
        &mut self,
        which: impl Fn(u32) -> bool,
    ) -> Vec<(u32, Vec<Committed<LogPost>>)> {
        let chosen: Vec<u32> = self
            .deferred
            .keys()
            .copied()
            .filter(|p| which(*p))
            .collect();
        let mut out = Vec::with_capacity(chosen.len());
        for partition in chosen {
            let slots = self.deferred.remove(&partition).expect("listed");
            self.deferred_posts -= slots.len();
            out.push((partition, slots));
        }
        if self.deferred.is_empty() {
            self.deferred_since = None;
        }
        out
    }

    /// Answers the posts waiting on `partitions`, whose leadership this
    /// node lost.
    fn fail_waiters(&mut self, partitions: &[u32]) {
        self.fail_waiters_with(
            partitions,
            "leadership of the room's partition moved before the post committed; it may still commit: reconnect and retry the same post (a retry is recognised)",
            |_| true,
        );
        let (gone, kept): (Vec<RemoteWaiter>, Vec<RemoteWaiter>) = self
            .remote_waiters
            .drain(..)
            .partition(|w| partitions.contains(&w.partition));
        self.remote_waiters = kept;
        for waiter in gone {
            let _ = waiter.reply.send(Err(NodeError::Unavailable(
                "leadership of the room's partition moved after the post committed in its home datacenter but before another datacenter confirmed it: reconnect and retry the same post (a retry is recognised)".into(),
            )));
        }
    }

    /// Answers the posts of `partitions` waiting to commit that were
    /// appended at a time `due` accepts with UNAVAILABLE and `why` (those
    /// committed and waiting for another datacenter keep waiting); how
    /// many.
    fn fail_waiters_with(
        &mut self,
        partitions: &[u32],
        why: &str,
        due: impl Fn(Millis) -> bool,
    ) -> usize {
        let gone: Vec<u64> = self
            .waiters
            .iter()
            .filter(|(_, (p, _, _, since))| partitions.contains(p) && due(*since))
            .map(|(t, _)| *t)
            .collect();
        for token in &gone {
            if let Some((_, reply, _, _)) = self.waiters.remove(token) {
                let _ = reply.send(Err(NodeError::Unavailable(why.into())));
            }
        }
        gone.len()
    }

    /// The partition's replicas outside its home datacenter (its
    /// learners), grouped by datacenter; empty when it has none.
    fn cross_datacenter_groups(&self, partition: u32) -> Vec<(String, Vec<NodeId>)> {
        if partition >= self.placement.partitions().get() {
            return Vec::new();
        }
        let p = saferchat_placement::PartitionId(partition);
        let mut groups: std::collections::BTreeMap<String, Vec<NodeId>> =
            std::collections::BTreeMap::new();
        for n in self.placement.learners(p) {
            let dc = self
                .placement
                .datacenter_of(n)
                .unwrap_or_default()
                .to_owned();
            groups.entry(dc).or_default().push(n);
        }
        groups.into_iter().collect()
    }

    /// The highest slot of `partition` a majority of some other
    /// datacenter's replicas stored (on its leader; 0 elsewhere).
    fn cross_datacenter_mark(&self, partition: u32) -> Slot {
        let Some(part) = self.parts.get(&partition) else {
            return Slot::default();
        };
        self.cross_datacenter_groups(partition)
            .iter()
            .map(|(_, nodes)| part.replica.stored_by(nodes, nodes.len() / 2 + 1))
            .max()
            .unwrap_or_default()
    }

    /// Sets the replication lag gauges of a partition this node leads:
    /// for each other datacenter, how many committed slots a majority of
    /// its replicas has not stored yet, and for how long the oldest of
    /// them has been committed.
    fn report_lag(&self, partition: u32, now: Millis) {
        let Some(part) = self.parts.get(&partition) else {
            return;
        };
        let released = part.replica.released();
        let from = self
            .placement
            .datacenter_of(self.me)
            .unwrap_or_default()
            .to_owned();
        for (dc, nodes) in self.cross_datacenter_groups(partition) {
            let mark = part.replica.stored_by(&nodes, nodes.len() / 2 + 1);
            let slots = released.0.saturating_sub(mark.0);
            let ms = if slots == 0 {
                0
            } else {
                part.commit_times
                    .iter()
                    .find(|(s, _)| *s > mark)
                    .or(part.commit_times.front())
                    .map_or(0, |(_, t)| now.since(*t))
            };
            let labels = [
                ("partition", partition.to_string()),
                ("from", from.clone()),
                ("to", dc),
            ];
            #[allow(clippy::cast_precision_loss)]
            {
                metrics::gauge!("saferchat_replication_lag_slots", &labels).set(slots as f64);
                metrics::gauge!("saferchat_replication_lag_ms", &labels).set(ms as f64);
            }
        }
    }

    /// Answers the posts of [`Durability::CrossDatacenter`] that another
    /// datacenter now holds, and those that waited for one too long.
    fn release_remote_waiters(&mut self) {
        if self.remote_waiters.is_empty() {
            return;
        }
        let now = self.clock.monotonic();
        let mut marks: HashMap<u32, Slot> = HashMap::new();
        for w in &self.remote_waiters {
            marks
                .entry(w.partition)
                .or_insert_with(|| self.cross_datacenter_mark(w.partition));
        }
        let waiting = std::mem::take(&mut self.remote_waiters);
        for w in waiting {
            if marks[&w.partition] >= w.slot {
                metrics::histogram!("saferchat_cross_datacenter_wait_seconds")
                    .record(now.since(w.since) as f64 / 1000.0);
                let _ = w.reply.send(Ok(w.placed));
            } else if now.since(w.since) >= CROSS_DATACENTER_WAIT_MS {
                metrics::counter!("saferchat_cross_datacenter_timeouts_total").increment(1);
                let _ = w.reply.send(Err(NodeError::Unavailable(format!(
                    "the post committed in its room's home datacenter (message #{} of the room), but no other datacenter confirmed it within {} s; it is kept and delivered: retry the same post to learn when another datacenter holds it (a retry is recognised)",
                    w.placed.seq,
                    CROSS_DATACENTER_WAIT_MS / 1000
                ))));
            } else {
                self.remote_waiters.push(w);
            }
        }
    }

    /// Applies committed slots of every partition to the timeline store in
    /// one append (one sync however many partitions committed: the driver
    /// must not spend its turn on a sync per partition, or its heartbeats
    /// would stall under load), then answers and delivers. When the store
    /// fails, the slots wait for the next attempt (see "When the timeline
    /// store fails").
    async fn apply(
        &mut self,
        committed: Vec<(u32, Vec<Committed<LogPost>>)>,
    ) -> Result<(), NodeError> {
        let commit_time = self.clock.monotonic();
        let (outcomes, refused) = match self.store_batch(&committed, commit_time).await {
            Ok(done) => done,
            Err(StoreFailed::Store(e)) => return self.store_failed(committed, &e),
            Err(StoreFailed::Fatal(e)) => return Err(e),
        };
        if let Some(outage) = self.outage.take() {
            tracing::info!(
                down_ms = self.clock.monotonic().since(outage.since),
                "the timeline store answers again; applying resumed"
            );
            metrics::gauge!("saferchat_timeline_store_available").set(1.0);
        }
        for origin in refused {
            metrics::counter!("saferchat_stale_posts_refused_total").increment(1);
            if origin.0 == self.me
                && let Some((_, reply, _, _)) = self.waiters.remove(&origin.1)
            {
                let _ = reply.send(Err(NodeError::FailedPrecondition(
                    "the post is wrapped for an earlier membership revision and is no retry of a stored post: wrap it again for the current membership".into(),
                )));
            }
        }
        for (origin, room, placed, envelope, slot) in outcomes {
            if origin.0 == self.me
                && let Some((partition, reply, level, _)) = self.waiters.remove(&origin.1)
            {
                if level == Durability::CrossDatacenter {
                    self.remote_waiters.push(RemoteWaiter {
                        partition,
                        slot,
                        placed,
                        since: commit_time,
                        reply,
                    });
                } else {
                    let _ = reply.send(Ok(placed));
                }
            }
            let stored_by_a_failed_attempt = self.undelivered.remove(&placed.id);
            if placed.fresh || stored_by_a_failed_attempt {
                self.deliver(&room, placed, envelope);
            }
        }
        for (partition, slots) in committed {
            let last = slots.last().map(|c| c.slot).expect("not empty");
            if let Some(part) = self.parts.get_mut(&partition)
                && part.replica.leading().is_some()
                && !part.replica.config().learners.is_empty()
            {
                part.commit_times.push_back((last, commit_time));
                while part.commit_times.len() > COMMIT_TIMES_MAX {
                    part.commit_times.pop_front();
                }
            }
            self.unsynced.insert(partition, last);
            #[allow(clippy::cast_precision_loss)]
            metrics::gauge!("saferchat_partition_applied_slot", "partition" => partition.to_string())
                .set(last.0 as f64);
            self.unsynced_since.get_or_insert(commit_time);
            self.retain(partition, &slots);
        }
        Ok(())
    }

    /// Places the committed posts in their rooms and stores the fresh
    /// ones; returns where each landed, and the origins of the posts
    /// refused as no retry ([`LogPost::retry_only`]). On a store error
    /// the room tails are dropped (they moved past what the store holds)
    /// and the placed ids remembered, so a retry places every post the
    /// same way and delivers each once.
    async fn store_batch(
        &mut self,
        committed: &[(u32, Vec<Committed<LogPost>>)],
        commit_time: Millis,
    ) -> Result<(Vec<Placed>, Vec<(NodeId, u64)>), StoreFailed> {
        let batch_start = self.uses;
        let mut batch = Vec::new();
        let mut outcomes = Vec::new();
        let mut refused = Vec::new();
        let mut failed = None;
        // Per room, the earliest proposal in the batch: a tail loaded now
        // recognises every post stored since (`RoomTail::load_since`).
        let mut earliest: HashMap<&RoomId, i64> = HashMap::new();
        for (_, slots) in committed {
            for c in slots {
                if let Value::Post(post) = &c.value {
                    let e = earliest.entry(&post.room).or_insert(post.proposed_ms);
                    *e = (*e).min(post.proposed_ms);
                }
            }
        }
        'place: for (partition, slots) in committed {
            for c in slots {
                let Value::Post(post) = &c.value else {
                    continue;
                };
                let envelope = match Envelope::decode(post.envelope.clone()) {
                    Ok(e) => e,
                    Err(e) => {
                        // The leader checked it; every replica skips it alike.
                        tracing::error!(partition, slot = c.slot.0, error = %e, "a committed post does not decode; skipped");
                        continue;
                    }
                };
                if !self.tails.contains_key(&post.room) {
                    let since = earliest[&post.room];
                    let tail = match RoomTail::load_since(&*self.chat, &post.room, since).await {
                        Ok(tail) => {
                            // Rare (a room's first post since start, after a
                            // failed write, or eviction) and worth a line.
                            tracing::info!(
                                room = post.room.as_str(),
                                partition,
                                slot = c.slot.0,
                                last_seq = tail.last_seq(),
                                since_ms = since,
                                "room tail loaded"
                            );
                            tail
                        }
                        Err(e) => {
                            failed = Some(e);
                            break 'place;
                        }
                    };
                    // Never a room placed in this batch: its tail is ahead
                    // of the store until the batch is stored.
                    if self.tails.len() >= TAILS_MAX
                        && let Some(oldest) = self
                            .tails
                            .iter()
                            .filter(|(_, (_, used))| *used <= batch_start)
                            .min_by_key(|(_, (_, used))| *used)
                            .map(|(r, _)| r.clone())
                    {
                        self.tails.remove(&oldest);
                    }
                    self.tails.insert(post.room.clone(), (tail, 0));
                }
                self.uses += 1;
                let (tail, used) = self.tails.get_mut(&post.room).expect("loaded");
                *used = self.uses;
                let key = (envelope.sender, envelope.nonce);
                let placed = if post.retry_only {
                    // Decided by the tail every replica holds alike at
                    // this slot: the original's place, or nothing.
                    let Some(placed) = tail.recall(&key) else {
                        refused.push(post.origin);
                        continue;
                    };
                    placed
                } else {
                    tail.place(key, post.proposed_ms, post.seed)
                };
                if placed.fresh {
                    batch.push(StoredMessage {
                        room: post.room.clone(),
                        id: placed.id,
                        seq: placed.seq,
                        envelope: post.envelope.clone(),
                    });
                }
                outcomes.push((post.origin, post.room.clone(), placed, envelope, c.slot));
            }
        }
        if failed.is_none() {
            for chunk in batch.chunks(UNSYNCED_POSTS_MAX) {
                if self.unsynced_posts + chunk.len() > UNSYNCED_POSTS_MAX {
                    // A failed sync is fatal (see `sync_applied`).
                    self.sync_applied().await.map_err(StoreFailed::Fatal)?;
                }
                if let Err(e) = self.chat.append_unsynced(chunk).await {
                    failed = Some(e);
                    break;
                }
                self.unsynced_posts += chunk.len();
                self.unsynced_since.get_or_insert(commit_time);
            }
        }
        if let Some(e) = failed {
            self.tails.clear();
            self.undelivered
                .extend(outcomes.iter().map(|(_, _, placed, _, _)| placed.id));
            return Err(StoreFailed::Store(e));
        }
        metrics::counter!("saferchat_posts_stored_total").increment(batch.len() as u64);
        Ok((outcomes, refused))
    }

    /// Puts `committed` back before whatever was collected since, and
    /// schedules the next attempt; stops the node only when too much
    /// waits.
    fn store_failed(
        &mut self,
        committed: Vec<(u32, Vec<Committed<LogPost>>)>,
        error: &NodeError,
    ) -> Result<(), NodeError> {
        let now = self.clock.monotonic();
        for (partition, mut slots) in committed {
            self.deferred_posts += slots.len();
            if let Some(later) = self.deferred.remove(&partition) {
                slots.extend(later);
            }
            self.deferred.insert(partition, slots);
        }
        self.deferred_since.get_or_insert(now);
        metrics::counter!("saferchat_timeline_store_failures_total").increment(1);
        metrics::gauge!("saferchat_timeline_store_available").set(0.0);
        let bytes: usize = self
            .deferred
            .values()
            .flatten()
            .map(|c| value_bytes(&c.value))
            .sum();
        if self.deferred_posts > STALLED_POSTS_MAX || bytes > STALLED_BYTES_MAX {
            return Err(fatal(&NodeError::Unavailable(format!(
                "{} committed posts ({bytes} bytes) wait for a timeline store that keeps failing: {error}",
                self.deferred_posts
            ))));
        }
        let backoff_ms = self.outage.as_ref().map_or(STORE_RETRY_MIN_MS, |o| {
            (o.backoff_ms * 2).min(STORE_RETRY_MAX_MS)
        });
        match &mut self.outage {
            Some(o) => {
                tracing::debug!(error = %error, backoff_ms, "the timeline store still fails");
                o.retry_at = now.plus(backoff_ms);
                o.backoff_ms = backoff_ms;
                o.error = error.to_string();
            }
            None => {
                tracing::warn!(error = %error, "the timeline store fails: committed posts wait in the partition log, new posts are refused until it answers");
                self.outage = Some(Outage {
                    since: now,
                    retry_at: now.plus(backoff_ms),
                    backoff_ms,
                    error: error.to_string(),
                });
            }
        }
        Ok(())
    }

    /// Syncs what [`Driver::apply`] stored, then queues the applied marks
    /// (written with the next log write) and compacts up to them: a mark
    /// never runs ahead of the store, so after a crash the log's entries
    /// above it are applied again.
    async fn sync_applied(&mut self) -> Result<(), NodeError> {
        if self.unsynced.is_empty() {
            return Ok(());
        }
        let started = std::time::Instant::now();
        self.chat.sync_appended().await.map_err(|e| fatal(&e))?;
        step_took("store_sync", started);
        metrics::counter!("saferchat_timeline_syncs_total").increment(1);
        let synced: Vec<(u32, Slot)> = self.unsynced.drain().collect();
        self.unsynced_posts = 0;
        self.unsynced_since = None;
        for (partition, last) in synced {
            self.marks.push(LogChange {
                partition,
                applied: Some(last),
                ..LogChange::default()
            });
            if let Some(part) = self.parts.get_mut(&partition) {
                part.applied = part.applied.max(last);
            }
            self.compact(partition);
        }
        Ok(())
    }

    fn deliver(&self, room: &RoomId, placed: Sequenced, envelope: Envelope) {
        let mut subscribers = self.subscribers.lock().expect("lock");
        let Some(list) = subscribers.get_mut(room) else {
            return;
        };
        let post = Arc::new(AppliedPost {
            id: placed.id,
            seq: placed.seq,
            envelope,
        });
        list.retain(|tx| tx.send(Arc::clone(&post)).is_ok());
        if list.is_empty() {
            subscribers.remove(room);
        }
    }

    /// Counts applied slots as retained in the log.
    fn retain(&mut self, partition: u32, slots: &[Committed<LogPost>]) {
        let Some(part) = self.parts.get_mut(&partition) else {
            return;
        };
        for c in slots {
            let bytes = value_bytes(&c.value);
            part.retained.push_back((c.slot, bytes));
            part.retained_bytes += bytes;
        }
    }

    /// Drops the oldest applied (and synced) entries beyond
    /// [`RETAINED_BYTES_MAX`] from the log.
    fn compact(&mut self, partition: u32) {
        let Some(part) = self.parts.get_mut(&partition) else {
            return;
        };
        if part.unchecked.is_some() {
            // A held log keeps what it would have released (it reports it
            // so: `LogReplica::hold`) until the check rewinds it.
            return;
        }
        let mut floor = None;
        while part.retained_bytes > self.retained_max {
            let Some(&(slot, bytes)) = part.retained.front() else {
                break;
            };
            if slot > part.applied {
                break;
            }
            part.retained.pop_front();
            part.retained_bytes -= bytes;
            floor = Some(slot);
        }
        if let Some(floor) = floor {
            part.replica.compact(floor);
            self.marks.push(LogChange {
                partition,
                floor: Some(floor),
                ..LogChange::default()
            });
        }
    }

    /// Rotates the partition-log file in two steps, so that the driver
    /// does not wait for a checkpoint of every retained entry (tens of MiB
    /// with many busy partitions; a run measured rotations of 0.5 and
    /// 0.9 s while every partition of the node waited): once the file asks
    /// for it, the live state (what the file's records replay to, all of
    /// them written by now) is written and synced to the next file in a
    /// blocking task while the driver goes on; a later pass that finds it
    /// done has the store copy what was written meanwhile and switch
    /// files ([`LogStore::finish_rotation`]).
    async fn rotate(&mut self) -> Result<(), NodeError> {
        if let Some(task) = self.rotation.take_if(|t| t.is_finished()) {
            let prepared = task
                .await
                .map_err(|e| fatal(&NodeError::Storage(e.to_string())))?
                .map_err(|e| fatal(&e))?;
            let store = Arc::clone(&self.store);
            let started = std::time::Instant::now();
            tokio::task::spawn_blocking(move || store.finish_rotation(prepared))
                .await
                .map_err(|e| fatal(&NodeError::Storage(e.to_string())))?
                .map_err(|e| fatal(&e))?;
            step_took("rotate", started);
            return Ok(());
        }
        if self.rotation.is_some() || !self.store.wants_rotation() {
            return Ok(());
        }
        let states: HashMap<u32, PartitionLogState> = self
            .parts
            .iter()
            .map(|(p, part)| {
                let a = part.replica.acceptor();
                (
                    *p,
                    PartitionLogState {
                        promised: a.promised(),
                        entries: a.entries_from(Slot(0)).into_iter().collect(),
                        floor: a.floor(),
                        // Not `released()`: posts released but not yet
                        // synced to the store must be applied again after
                        // a crash.
                        applied: part.applied,
                        checked: part.checked,
                        installed_held: part.replica.installed_held(),
                        held_copies: part.replica.held_copies(),
                    },
                )
            })
            .collect();
        let point = self.store.rotation_point();
        let store = Arc::clone(&self.store);
        self.rotation = Some(tokio::task::spawn_blocking(move || {
            let started = std::time::Instant::now();
            let prepared = store.prepare_rotation(&states, point);
            metrics::histogram!("saferchat_partition_log_checkpoint_seconds")
                .record(started.elapsed().as_secs_f64());
            prepared
        }));
        Ok(())
    }
}

/// Records how long one of the driver's awaited steps took: while it runs,
/// every partition of this node waits (no heartbeat, no commit), so a
/// slow step shows up as a pause in every room the node leads.
fn step_took(step: &'static str, started: std::time::Instant) {
    metrics::histogram!("saferchat_timeline_step_seconds", "step" => step)
        .record(started.elapsed().as_secs_f64());
}

fn value_bytes(v: &Value<LogPost>) -> usize {
    match v {
        Value::Post(p) => p.envelope.len() + p.room.as_str().len() + 64,
        Value::Noop => 16,
    }
}

#[cfg(test)]
#[path = "driver_tests.rs"]
mod tests;
