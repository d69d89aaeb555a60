//! Many rooms on a cluster: R rooms of M members, every member its own
//! joined session on its own connection, the first S members of each room
//! sending; posts spread over the rooms. One run starts a fresh cluster of
//! N nodes (N = 1: a single node), sets the rooms up, seals the envelopes,
//! runs the load phases and then checks that no acknowledged post is
//! missing anywhere.
//!
//! # Topology
//!
//! Member `i` of room `r` joins *through* node `(r + i) mod N` and follows
//! the node's redirect, so in a cluster about a third of the sessions
//! connect straight to the node that serves the room (the leader of the
//! room's partition log) and the rest are redirected there. Every session
//! of a room therefore ends on one node: a post and all its deliveries
//! pass through that node only; the other replicas see the post as
//! partition-log traffic. The tool records, per session, the node it went
//! through and the node it ended on, and per room the node serving it.
//!
//! # Envelopes
//!
//! Real envelope v1, sealed before the phases. A node recognises a post
//! whose sender and nonce equal one of the room's last 256 as a retry
//! (same id and sequence number back, nothing stored or delivered), so a
//! pooled envelope can never be posted twice here: every room gets a pool
//! of distinct envelopes, each posted at most once per run, and a sender
//! whose pool runs out stops (counted as `pool_exhausted`). Sealed pools
//! are cached on disk by room, revision, members and sender, so a second
//! run (or the other cluster size) reuses them.
//!
//! # What is checked after the phases
//!
//! For every room: the sequence numbers of the acknowledged posts are
//! exactly 1..N (N = posts acknowledged), every session of the room
//! received exactly the sequence numbers 1..N in order (its own posts
//! included), and the room's History on the serving node holds exactly N
//! messages, numbered 1..N, with the acknowledged ids.

use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use bytes::Bytes;
use futures::{StreamExt as _, TryStreamExt as _};
use prost::Message as _;
use saferchat_client::admin::Admin;
use saferchat_client::crypto::{self, Recipient};
use saferchat_client::{Identity, JoinOptions, Session};
use saferchat_consensus::{Revision, RoomId};
use saferchat_envelope::NONCE_BYTES;
use saferchat_proto::chat::{
    self as pb, chat_room_client::ChatRoomClient, client_frame, server_frame,
};
use serde::Serialize;
use sha2::{Digest as _, Sha256};
use tokio::sync::{Notify, mpsc};
use tokio::task::JoinHandle;
use tonic::Streaming;
use tonic::transport::Channel;

use crate::cluster::{self, Cluster};
use crate::stats::{Lateness, median, percentile};

/// Most rooms.
pub const ROOMS_MAX: usize = 10_000;
/// Most members per room.
pub const MEMBERS_MAX: usize = 100;
/// Most envelopes per room: a History page (1000) must hold a room.
pub const POOL_MAX: usize = 1000;
/// Most sessions of one run.
const SESSIONS_MAX: usize = 20_000;
/// Rooms whose first delivery per phase is verified and decrypted.
const VERIFY_ROOMS: usize = 8;
/// Most latency samples kept per phase.
const LATENCY_SAMPLES_MAX: usize = 20_000_000;
/// How often the open-loop ticker hands out posts.
const TICK_MS: u64 = 1;
/// How often the drain wait looks at the counters.
const DRAIN_POLL_MS: u64 = 50;
/// Most error strings kept per phase.
const ERRORS_MAX: usize = 20;
/// Format of the envelope cache files.
const CACHE_VERSION: &[u8] = b"saferchat-bench envelope pool v1";

/// Latency class bit: sender and receiver joined through the same node.
const SAME_THROUGH: u8 = 1;
/// Latency class bit: the receiver joined through the node it ended on
/// (it was not redirected).
const RECEIVER_DIRECT: u8 = 2;

/// What a many-rooms run does.
#[derive(Clone, Debug, Serialize)]
pub struct RoomsPlan {
    /// Nodes in the cluster (1 = a single node).
    pub nodes: usize,
    /// Rooms (R).
    pub rooms: usize,
    /// Members per room (M).
    pub members: usize,
    /// Senders per room (the first S members).
    pub senders_per_room: usize,
    /// Plaintext bytes per message.
    pub body_bytes: usize,
    /// Distinct envelopes per room, each posted at most once.
    pub pool: usize,
    /// Phases in order: rate, sat.
    pub phases: Vec<String>,
    /// Fixed-rate phase: messages/s over all rooms.
    pub rate_msgs_per_s: f64,
    /// Saturation: posts in flight per sender (until its own post comes
    /// back to it).
    pub window: u64,
    /// Fixed-rate phase: warm-up, s.
    pub rate_warmup_s: f64,
    /// Fixed-rate phase: measured, s.
    pub rate_duration_s: f64,
    /// Saturation: warm-up, s.
    pub sat_warmup_s: f64,
    /// Saturation: measured, s.
    pub sat_duration_s: f64,
    /// After each window, s.
    pub drain_s: f64,
    /// Longest wait for the last deliveries after the drain, s.
    pub drain_max_s: f64,
    /// Rooms set up (created, filled, joined) at once.
    pub setup_concurrency: usize,
    /// Threads sealing envelopes.
    pub seal_threads: usize,
}

/// Sessions by the node they joined through and the node they ended on.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Topology {
    /// `[through][ended]` session counts (node indexes, 0-based).
    pub sessions: Vec<Vec<usize>>,
    /// Rooms served by each node.
    pub rooms_per_node: Vec<usize>,
    /// Sessions that did not end on their room's serving node (must be 0).
    pub split_rooms: usize,
    /// Sessions that connected straight to the serving node.
    pub direct_sessions: usize,
    /// Sessions that were redirected.
    pub redirected_sessions: usize,
}

/// Setting the rooms up.
#[derive(Clone, Debug, Default, Serialize)]
pub struct RoomsSetup {
    /// Creating the rooms and adding every member, s.
    pub create_s: f64,
    /// Every member's first join (key registration included), s.
    pub join_s: f64,
    /// Median join, ms.
    pub join_ms_median: Option<f64>,
    /// 99th percentile join, ms.
    pub join_ms_p99: Option<f64>,
    /// Sealing (or loading from the cache) every pool, s.
    pub seal_s: f64,
    /// Envelopes sealed now.
    pub sealed: usize,
    /// Envelopes loaded from the cache.
    pub cached: usize,
    /// Where sessions went.
    pub topology: Topology,
}

/// Quantiles of one latency class.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Quantiles {
    /// Samples.
    pub samples: usize,
    /// Median, ms.
    pub p50_ms: Option<f64>,
    /// 99th percentile, ms.
    pub p99_ms: Option<f64>,
    /// Maximum, ms.
    pub max_ms: Option<f64>,
}

impl Quantiles {
    fn of(mut ns: Vec<u64>) -> Quantiles {
        ns.sort_unstable();
        let ms = |v: u64| v as f64 / 1e6;
        Quantiles {
            samples: ns.len(),
            p50_ms: percentile(&ns, 50.0).map(ms),
            p99_ms: percentile(&ns, 99.0).map(ms),
            max_ms: ns.last().copied().map(ms),
        }
    }
}

/// What one phase measured.
#[derive(Clone, Debug, Default, Serialize)]
pub struct RoomsPhase {
    /// "rate" (open loop) or "sat" (closed loop).
    pub mode: String,
    /// Measured window, s.
    pub window_s: f64,
    /// Open loop: target messages/s.
    pub target_msgs_per_s: Option<f64>,
    /// Closed loop: posts in flight per sender.
    pub inflight_per_sender: Option<u64>,
    /// Posts sent in the phase (warm-up and window).
    pub posts_sent: u64,
    /// Posts acknowledged inside the window, per second.
    pub acked_msgs_per_s: f64,
    /// Deliveries to members other than the sender inside the window.
    pub deliveries_in_window: u64,
    /// The same per second.
    pub deliveries_per_s: f64,
    /// Deliveries received (any time) over posts acknowledged × (M−1).
    pub delivered_fraction: Option<f64>,
    /// Post → delivery, every delivery to another member in the window.
    pub latency: Quantiles,
    /// Sender and receiver joined through the same node.
    pub latency_same_node: Quantiles,
    /// Sender and receiver joined through different nodes.
    pub latency_cross_node: Quantiles,
    /// Receivers that connected straight to the serving node.
    pub latency_receiver_direct: Quantiles,
    /// Receivers that were redirected to it.
    pub latency_receiver_redirected: Quantiles,
    /// Post → Accepted (the acknowledgement), inside the window.
    pub ack_latency: Quantiles,
    /// User + system CPU of every node in the window, s.
    pub server_cpu_s: f64,
    /// The same per node.
    pub server_cpu_s_per_node: Vec<f64>,
    /// Cores busy (all nodes).
    pub server_cores: f64,
    /// Node CPU µs per delivery.
    pub server_cpu_us_per_delivery: Option<f64>,
    /// This process's share of its core.
    pub client_cpu_util: f64,
    /// CPU of every other process in the window, cores.
    pub other_cpu_cores: f64,
    /// Load average (1 min) when the window started and ended.
    pub loadavg_1m: (f64, f64),
    /// Posts rejected (must be 0).
    pub rejected: u64,
    /// Senders whose pool ran out in this phase (0 for a valid phase).
    pub pool_exhausted: u64,
    /// Posts the generator sent more than 5 ms after they were due (it
    /// fell behind its schedule), and the longest lag, ms.
    pub late_posts: u64,
    pub send_lag_max_ms: f64,
    /// Deliveries of a post to a session that already had it (must be 0).
    pub duplicates: u64,
    /// Sampled deliveries verified and decrypted.
    pub verified_samples: usize,
    /// Samples that did not verify (must be 0).
    pub verify_failures: usize,
    /// Seconds waited after the drain.
    pub extra_drain_s: f64,
    /// What went wrong.
    pub errors: Vec<String>,
}

/// The no-loss checks after the phases.
#[derive(Clone, Debug, Default, Serialize)]
pub struct LossCheck {
    /// Posts sent over the whole run.
    pub posts_sent: u64,
    /// Posts acknowledged.
    pub posts_acked: u64,
    /// Posts neither acknowledged nor rejected at the end (must be 0).
    pub posts_unanswered: u64,
    /// Rooms whose acknowledged sequence numbers are not exactly 1..N.
    pub rooms_bad_acked_seqs: usize,
    /// Posts acknowledged twice with a different id or number.
    pub conflicting_acks: u64,
    /// Sessions that did not receive exactly 1..N of their room in order.
    pub sessions_bad_deliveries: usize,
    /// Rooms whose History was read.
    pub rooms_history_read: usize,
    /// Rooms whose History is not exactly the acknowledged posts.
    pub rooms_bad_history: usize,
    /// Acknowledged posts missing from History (over all rooms).
    pub acked_missing_from_history: u64,
    /// Messages in History that were never acknowledged.
    pub history_extra: u64,
    /// The first problems found.
    pub problems: Vec<String>,
}

impl LossCheck {
    /// Whether every check passed.
    pub fn clean(&self) -> bool {
        self.posts_unanswered == 0
            && self.rooms_bad_acked_seqs == 0
            && self.conflicting_acks == 0
            && self.sessions_bad_deliveries == 0
            && self.rooms_bad_history == 0
            && self.rooms_history_read > 0
    }
}

/// Everything one run measured.
#[derive(Clone, Debug, Serialize)]
pub struct RoomsRun {
    /// Repetition.
    pub rep: usize,
    /// The plan.
    pub plan: RoomsPlan,
    /// Node command line (node 1).
    pub node_command: String,
    /// CPUs and scheduling of the nodes, as the kernel reports them.
    pub node_placement: Vec<String>,
    /// Setup.
    pub setup: RoomsSetup,
    /// Phases by name.
    pub phases: BTreeMap<String, RoomsPhase>,
    /// The checks.
    pub loss: LossCheck,
    /// Deliveries whose nonce was not from the pools (must be 0).
    pub unknown_deliveries: u64,
    /// Sessions the node ended (must be empty).
    pub stream_errors: Vec<String>,
    /// Node CPU over the whole run (setup included), s.
    pub server_cpu_total_s: f64,
    /// Highest VmHWM of a node, MiB.
    pub server_vmhwm_mb_max: f64,
}

// ---------------------------------------------------------------------------
// Setup.

fn room_name(r: usize) -> String {
    format!("cb{r:05}")
}

fn user_of(r: usize, i: usize, m: usize, users: usize) -> usize {
    (r * m + i) % users
}

fn ms_since(t: Instant) -> f64 {
    t.elapsed().as_secs_f64() * 1e3
}

/// One joined session, before it is taken apart.
struct Joined {
    through: usize,
    ended: usize,
    session: Session,
    join_ms: f64,
}

async fn setup_room(
    r: usize,
    plan: &RoomsPlan,
    admin: &mut Admin,
    users: &[Arc<Identity>],
) -> anyhow::Result<()> {
    let name = room_name(r);
    admin
        .create_chat(&name)
        .await
        .with_context(|| format!("creating {name}"))?;
    for i in 0..plan.members {
        let user = &users[user_of(r, i, plan.members, users.len())];
        admin
            .add_user(&name, &user.handle().to_string(), None)
            .await
            .with_context(|| format!("adding member {i} to {name}"))?;
    }
    Ok(())
}

/// Joins every member of room `r`, one after the other (so every room
/// ends at the same revision in every run and the envelope cache hits).
async fn join_room(
    r: usize,
    plan: &RoomsPlan,
    addresses: &[String],
    users: &[Arc<Identity>],
) -> anyhow::Result<Vec<Joined>> {
    let room = RoomId::new(&room_name(r))?;
    let n = addresses.len();
    let options = JoinOptions {
        no_history: true,
        ..JoinOptions::default()
    };
    let mut joined = Vec::with_capacity(plan.members);
    for i in 0..plan.members {
        let through = (r + i) % n;
        let user = Arc::clone(&users[user_of(r, i, plan.members, users.len())]);
        let t = Instant::now();
        let session = Session::join(&addresses[through], &room, user, &options)
            .await
            .with_context(|| format!("member {i} joining {room} through node {}", through + 1))?;
        let join_ms = ms_since(t);
        let ended = addresses
            .iter()
            .position(|a| a == session.address())
            .with_context(|| format!("joined on an unknown node {}", session.address()))?;
        joined.push(Joined {
            through,
            ended,
            session,
            join_ms,
        });
    }
    Ok(joined)
}

// ---------------------------------------------------------------------------
// Envelope pools.

/// A sealed (or loaded) pool and how many of it came from the cache.
type SealedPool = anyhow::Result<(Vec<Bytes>, usize)>;

/// A room's History as (sequence number, id) pairs.
type HistoryRead = Result<Vec<(u64, Bytes)>, tonic::Status>;

/// One sender's pool to seal or load.
struct SealJob {
    room: RoomId,
    revision: Revision,
    recipients: Vec<Recipient>,
    sender: Arc<Identity>,
    /// Global sender number (bodies name it).
    sender_no: usize,
    count: usize,
    body_bytes: usize,
    cache: Option<PathBuf>,
}

impl SealJob {
    fn cache_key(&self) -> String {
        // Not the count: a cache file holds the first k envelopes of the
        // pool (slot k's body is fixed), and a longer pool extends it.
        let mut h = Sha256::new();
        h.update(CACHE_VERSION);
        h.update(self.room.as_str().as_bytes());
        h.update(self.revision.0.to_be_bytes());
        for r in &self.recipients {
            h.update(r.handle.to_string().as_bytes());
        }
        h.update(self.sender.handle().to_string().as_bytes());
        h.update((self.sender_no as u64).to_be_bytes());
        h.update((self.body_bytes as u64).to_be_bytes());
        h.finalize()
            .iter()
            .take(12)
            .map(|b| format!("{b:02x}"))
            .collect()
    }

    fn cache_file(&self, dir: &Path) -> PathBuf {
        dir.join(format!(
            "{}-s{}-{}.bin",
            self.room.as_str(),
            self.sender_no,
            self.cache_key()
        ))
    }

    /// The envelopes a cache file holds (none when it is missing or
    /// damaged).
    fn load(path: &Path) -> Vec<Bytes> {
        let Ok(all) = std::fs::read(path) else {
            return Vec::new();
        };
        let mut out = Vec::new();
        let mut at = 0usize;
        while at + 4 <= all.len() {
            let len = u32::from_be_bytes([all[at], all[at + 1], all[at + 2], all[at + 3]]) as usize;
            at += 4;
            let Some(bytes) = all.get(at..at + len) else {
                return Vec::new();
            };
            out.push(Bytes::copy_from_slice(bytes));
            at += len;
        }
        if at == all.len() { out } else { Vec::new() }
    }

    /// The pool, and how many of its envelopes came from the cache.
    fn run(&self) -> anyhow::Result<(Vec<Bytes>, usize)> {
        let mut pool = self.cache.as_deref().map(SealJob::load).unwrap_or_default();
        pool.truncate(self.count);
        let cached = pool.len();
        if cached == self.count {
            return Ok((pool, cached));
        }
        for k in cached..self.count {
            let plain = crate::load::body(self.sender_no, k, self.body_bytes);
            let envelope = crypto::seal(
                &self.sender,
                &self.room,
                self.revision,
                &self.recipients,
                &plain,
            )?;
            pool.push(envelope.encode());
        }
        if let Some(path) = &self.cache {
            let tmp = path.with_extension("tmp");
            let mut file = std::fs::File::create(&tmp)?;
            for e in &pool {
                file.write_all(&u32::try_from(e.len())?.to_be_bytes())?;
                file.write_all(e)?;
            }
            file.sync_all()?;
            std::fs::rename(&tmp, path)?;
        }
        Ok((pool, cached))
    }
}

/// Seals (or loads) every job on `threads` threads, off the runtime's
/// thread so that sessions keep answering while it runs.
async fn seal_all(jobs: Vec<SealJob>, threads: usize) -> anyhow::Result<Vec<(Vec<Bytes>, usize)>> {
    let jobs = Arc::new(jobs);
    tokio::task::spawn_blocking(move || {
        let next = AtomicUsize::new(0);
        let results: Vec<std::sync::Mutex<Option<SealedPool>>> = (0..jobs.len())
            .map(|_| std::sync::Mutex::new(None))
            .collect();
        std::thread::scope(|scope| {
            for _ in 0..threads.max(1) {
                scope.spawn(|| {
                    loop {
                        let k = next.fetch_add(1, Ordering::Relaxed);
                        let Some(job) = jobs.get(k) else { break };
                        let result = job.run();
                        *results[k].lock().expect("lock") = Some(result);
                    }
                });
            }
        });
        results
            .into_iter()
            .map(|m| {
                m.into_inner()
                    .expect("lock")
                    .unwrap_or_else(|| Err(anyhow::anyhow!("a pool was not sealed")))
            })
            .collect()
    })
    .await?
}

// ---------------------------------------------------------------------------
// The engine.

struct SenderState {
    room: usize,
    session: usize,
    /// Global sender number (bodies name it).
    sender_no: usize,
    out: mpsc::Sender<pb::ClientFrame>,
    pool: Vec<Bytes>,
    next: usize,
    /// Posts owed, each with the instant it was due: its tick in the open
    /// loop, the echo or rejection that freed it in the closed loop.
    credits: VecDeque<Instant>,
    /// When each slot was due (the latency's start: in the open loop the
    /// scheduled time, not when the post actually left).
    sent_at: Vec<Instant>,
    /// Deliveries to other members still owed, per slot.
    owed: Vec<u16>,
    echoed: Vec<bool>,
    /// Room sequence number and id of each acknowledged slot.
    acked: Vec<Option<(u64, Bytes)>>,
    rejected: Vec<bool>,
    exhausted: bool,
    wake: Rc<Notify>,
}

struct SessionState {
    room: usize,
    through: usize,
    ended: usize,
    sender: Option<usize>,
    last_seq: u64,
    seq_errors: u64,
}

struct Sample {
    receiver: usize,
    sender: usize,
    slot: usize,
    sealed: Bytes,
}

#[derive(Default)]
struct PhaseState {
    closed_loop: bool,
    t0: Option<Instant>,
    t1: Option<Instant>,
    t_stop: Option<Instant>,
    sent: u64,
    answered: u64,
    rejected: u64,
    echoes: u64,
    others: u64,
    acked_in_window: u64,
    deliveries_in_window: u64,
    latency: Vec<(u64, u8)>,
    ack_latency: Vec<u64>,
    exhausted: u64,
    duplicates: u64,
    /// How far the generator fell behind its schedule.
    lateness: Lateness,
    samples: HashMap<usize, Sample>,
    errors: Vec<String>,
}

impl PhaseState {
    fn in_window(&self, now: Instant) -> bool {
        self.t0.is_some_and(|t| now >= t) && self.t1.is_some_and(|t| now < t)
    }

    fn error(&mut self, e: String) {
        if self.errors.len() < ERRORS_MAX {
            self.errors.push(e);
        }
    }
}

/// Only the nonce of a `Sealed`.
#[derive(Clone, PartialEq, prost::Message)]
struct SealedNonce {
    #[prost(bytes = "bytes", tag = "5")]
    nonce: Bytes,
}

struct Engine {
    members: usize,
    ids: HashMap<[u8; NONCE_BYTES], (u32, u32)>,
    senders: Vec<SenderState>,
    sessions: Vec<SessionState>,
    phase: PhaseState,
    unknown: u64,
    stream_errors: Vec<String>,
}

impl Engine {
    fn on_delivery(&mut self, s: usize, d: pb::Delivery, now: Instant) {
        let session = &mut self.sessions[s];
        if d.seq != session.last_seq + 1 {
            session.seq_errors += 1;
            let e = format!(
                "room {} session {s}: delivery #{} after #{}",
                room_name(session.room),
                d.seq,
                session.last_seq
            );
            self.phase.error(e);
        }
        let session = &mut self.sessions[s];
        session.last_seq = session.last_seq.max(d.seq);
        let (through, direct) = (session.through, session.through == session.ended);
        let Some((sender, slot)) = SealedNonce::decode(d.sealed.clone())
            .ok()
            .and_then(|w| <[u8; NONCE_BYTES]>::try_from(w.nonce.as_ref()).ok())
            .and_then(|n| self.ids.get(&n).copied())
        else {
            self.unknown += 1;
            return;
        };
        let (sender, slot) = (sender as usize, slot as usize);
        let phase = &mut self.phase;
        let st = &mut self.senders[sender];
        if st.session == s {
            if st.echoed[slot] {
                phase.duplicates += 1;
                return;
            }
            st.echoed[slot] = true;
            phase.echoes += 1;
            if phase.closed_loop && phase.t_stop.is_some_and(|t| now < t) {
                st.credits.push_back(now);
                self.pump(sender);
            }
            return;
        }
        if st.owed[slot] == 0 {
            phase.duplicates += 1;
            return;
        }
        st.owed[slot] -= 1;
        phase.others += 1;
        if phase.in_window(now) {
            phase.deliveries_in_window += 1;
            if phase.latency.len() < LATENCY_SAMPLES_MAX {
                let ns = u64::try_from(now.saturating_duration_since(st.sent_at[slot]).as_nanos())
                    .unwrap_or(u64::MAX);
                let sender_through = self.sessions[st.session].through;
                let mut class = 0;
                if sender_through == through {
                    class |= SAME_THROUGH;
                }
                if direct {
                    class |= RECEIVER_DIRECT;
                }
                phase.latency.push((ns, class));
            }
        }
        if st.room < VERIFY_ROOMS && !phase.samples.contains_key(&st.room) {
            phase.samples.insert(
                st.room,
                Sample {
                    receiver: s,
                    sender,
                    slot,
                    sealed: d.sealed,
                },
            );
        }
    }

    fn on_result(&mut self, s: usize, result: pb::PostResult, now: Instant) {
        let Some(sender) = self.sessions[s].sender else {
            self.phase
                .error(format!("session {s}: a post result for a non-sender"));
            return;
        };
        let st = &mut self.senders[sender];
        let slot = usize::try_from(result.client_seq.saturating_sub(1)).unwrap_or(usize::MAX);
        if slot >= st.next {
            let e = format!(
                "sender {sender}: result for unsent post {}",
                result.client_seq
            );
            self.phase.error(e);
            return;
        }
        match result.outcome {
            Some(pb::post_result::Outcome::Accepted(a)) => {
                if let Some((seq, id)) = &st.acked[slot] {
                    if *seq != a.seq || *id != a.id {
                        let e = format!(
                            "room {}: post {} acknowledged twice, as #{seq} and #{}",
                            room_name(st.room),
                            result.client_seq,
                            a.seq
                        );
                        self.phase.error(e);
                    }
                    return;
                }
                st.acked[slot] = Some((a.seq, a.id));
                self.phase.answered += 1;
                if self.phase.in_window(now) {
                    self.phase.acked_in_window += 1;
                    let ns =
                        u64::try_from(now.saturating_duration_since(st.sent_at[slot]).as_nanos())
                            .unwrap_or(u64::MAX);
                    self.phase.ack_latency.push(ns);
                }
            }
            Some(pb::post_result::Outcome::Rejected(r)) => {
                st.rejected[slot] = true;
                st.owed[slot] = 0;
                st.echoed[slot] = true;
                self.phase.answered += 1;
                self.phase.rejected += 1;
                let e = format!(
                    "room {}: post {} rejected: code {} {}",
                    room_name(st.room),
                    result.client_seq,
                    r.code,
                    r.message
                );
                self.phase.error(e);
                if self.phase.closed_loop {
                    self.senders[sender].credits.push_back(Instant::now());
                    self.pump(sender);
                }
            }
            None => self.unknown += 1,
        }
    }

    fn pump(&mut self, sender: usize) {
        let members = u16::try_from(self.members - 1).expect("bounded members");
        let phase = &mut self.phase;
        let st = &mut self.senders[sender];
        while let Some(&due) = st.credits.front() {
            if st.next >= st.pool.len() {
                if !st.exhausted {
                    st.exhausted = true;
                    phase.exhausted += 1;
                }
                st.credits.clear();
                return;
            }
            let permit = match st.out.try_reserve() {
                Ok(p) => p,
                Err(mpsc::error::TrySendError::Full(())) => {
                    st.wake.notify_one();
                    return;
                }
                Err(mpsc::error::TrySendError::Closed(())) => {
                    st.credits.clear();
                    phase.error(format!("sender {sender}: the session's stream is closed"));
                    return;
                }
            };
            let k = st.next;
            phase.lateness.record(due, Instant::now());
            st.sent_at[k] = due;
            st.owed[k] = members;
            permit.send(pb::ClientFrame {
                frame: Some(client_frame::Frame::Post(pb::Post {
                    client_seq: k as u64 + 1,
                    envelope: st.pool[k].clone(),
                    ..pb::Post::default()
                })),
            });
            st.next += 1;
            st.credits.pop_front();
            phase.sent += 1;
        }
    }
}

async fn receive(engine: Rc<RefCell<Engine>>, s: usize, mut inbound: Streaming<pb::ServerFrame>) {
    loop {
        let frame = inbound.message().await;
        let now = Instant::now();
        let mut e = engine.borrow_mut();
        match frame {
            Ok(Some(pb::ServerFrame { frame: Some(f) })) => match f {
                server_frame::Frame::Deliveries(d) => {
                    for item in d.items {
                        e.on_delivery(s, item, now);
                    }
                }
                server_frame::Frame::Result(r) => e.on_result(s, r, now),
                server_frame::Frame::MembershipChanged(_) => {}
                server_frame::Frame::Challenge(_) | server_frame::Frame::Joined(_) => {
                    e.stream_errors
                        .push(format!("session {s}: handshake frame after joining"));
                }
            },
            Ok(Some(_)) => {}
            Ok(None) => {
                e.stream_errors
                    .push(format!("session {s}: the node ended the session"));
                return;
            }
            Err(status) => {
                e.stream_errors.push(format!(
                    "session {s}: {:?} {}",
                    status.code(),
                    status.message()
                ));
                return;
            }
        }
    }
}

async fn unblock(engine: Rc<RefCell<Engine>>, sender: usize) {
    let (wake, out) = {
        let e = engine.borrow();
        (
            Rc::clone(&e.senders[sender].wake),
            e.senders[sender].out.clone(),
        )
    };
    loop {
        wake.notified().await;
        match out.reserve().await {
            Ok(permit) => drop(permit),
            Err(_) => return,
        }
        engine.borrow_mut().pump(sender);
    }
}

/// Open loop: hands out `rate` posts per second over the senders in
/// turn (so consecutive posts go to different rooms) until `t1`.
async fn ticker(engine: Rc<RefCell<Engine>>, rate: f64, start: Instant, t1: Instant) {
    let senders = engine.borrow().senders.len();
    let mut issued: u64 = 0;
    let mut tick = tokio::time::interval_at(start.into(), Duration::from_millis(TICK_MS));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    loop {
        tick.tick().await;
        let now = Instant::now();
        let until = now.min(t1);
        let due = (until.saturating_duration_since(start).as_secs_f64() * rate) as u64;
        let mut e = engine.borrow_mut();
        while issued < due {
            let s = (issued % senders as u64) as usize;
            // The post's own time on the schedule, not this tick's: post
            // n is due once n + 1 posts are owed.
            let scheduled = start + Duration::from_secs_f64((issued + 1) as f64 / rate);
            e.senders[s].credits.push_back(scheduled);
            e.pump(s);
            issued += 1;
        }
        if now >= t1 {
            return;
        }
    }
}

/// The 1-minute load average.
pub fn loadavg_1m() -> f64 {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(f64::NAN)
}

struct CpuSnap {
    nodes: Vec<f64>,
    client: f64,
    machine: f64,
    at: Instant,
    load: f64,
}

fn cpu_snap(pids: &[String], ticks: f64) -> CpuSnap {
    CpuSnap {
        nodes: cluster::cpu_of(pids, ticks)
            .into_iter()
            .map(|c| c.unwrap_or(f64::NAN))
            .collect(),
        client: crate::procfs::process_cpu_s("self", ticks).unwrap_or(f64::NAN),
        machine: crate::procfs::machine_busy_s(ticks),
        at: Instant::now(),
        load: loadavg_1m(),
    }
}

/// Timing of one phase.
struct PhaseTiming {
    closed_loop: bool,
    rate: f64,
    window: u64,
    warmup_s: f64,
    duration_s: f64,
    drain_s: f64,
    drain_max_s: f64,
}

async fn run_phase(
    engine: &Rc<RefCell<Engine>>,
    timing: PhaseTiming,
    pids: &[String],
    ticks: f64,
    verify: &Verify<'_>,
) -> RoomsPhase {
    let t_start = Instant::now() + Duration::from_millis(200);
    let t0 = t_start + Duration::from_secs_f64(timing.warmup_s);
    let t1 = t0 + Duration::from_secs_f64(timing.duration_s);
    let t_end = t1 + Duration::from_secs_f64(timing.drain_s);
    let members = {
        let mut e = engine.borrow_mut();
        e.phase = PhaseState {
            closed_loop: timing.closed_loop,
            t0: Some(t0),
            t1: Some(t1),
            t_stop: Some(t1),
            ..PhaseState::default()
        };
        for s in &mut e.senders {
            s.credits.clear();
            s.exhausted = s.next >= s.pool.len();
        }
        e.members
    };
    let ticker_task = (!timing.closed_loop)
        .then(|| tokio::task::spawn_local(ticker(Rc::clone(engine), timing.rate, t_start, t1)));
    tokio::time::sleep_until(t_start.into()).await;
    if timing.closed_loop {
        let mut e = engine.borrow_mut();
        let now = Instant::now();
        for s in 0..e.senders.len() {
            e.senders[s].credits = std::iter::repeat_n(now, timing.window as usize).collect();
            e.pump(s);
        }
    }
    tokio::time::sleep_until(t0.into()).await;
    let a0 = cpu_snap(pids, ticks);
    tokio::time::sleep_until(t1.into()).await;
    let a1 = cpu_snap(pids, ticks);
    tokio::time::sleep_until(t_end.into()).await;
    if let Some(t) = ticker_task {
        t.abort();
    }
    let drain_started = Instant::now();
    loop {
        let done = {
            let e = engine.borrow();
            let p = &e.phase;
            let fine = p.sent - p.rejected;
            p.answered >= p.sent && p.echoes >= fine && p.others >= fine * (members as u64 - 1)
        };
        if done || drain_started.elapsed().as_secs_f64() > timing.drain_max_s {
            break;
        }
        tokio::time::sleep(Duration::from_millis(DRAIN_POLL_MS)).await;
    }
    let extra_drain_s = drain_started.elapsed().as_secs_f64();
    let window_s = (a1.at - a0.at).as_secs_f64();
    let per_node: Vec<f64> = a1.nodes.iter().zip(&a0.nodes).map(|(b, a)| b - a).collect();
    let server_cpu_s: f64 = per_node.iter().sum();
    let client_cpu_s = a1.client - a0.client;
    let machine_s = a1.machine - a0.machine;
    let (mut result, samples) = {
        let mut e = engine.borrow_mut();
        let p = &mut e.phase;
        let latency = std::mem::take(&mut p.latency);
        let pick = |want: fn(u8) -> bool| -> Vec<u64> {
            latency
                .iter()
                .filter(|(_, c)| want(*c))
                .map(|(ns, _)| *ns)
                .collect()
        };
        let fine = p.sent - p.rejected;
        let result = RoomsPhase {
            mode: if timing.closed_loop { "sat" } else { "rate" }.into(),
            window_s,
            target_msgs_per_s: (!timing.closed_loop).then_some(timing.rate),
            inflight_per_sender: timing.closed_loop.then_some(timing.window),
            posts_sent: p.sent,
            acked_msgs_per_s: p.acked_in_window as f64 / window_s,
            deliveries_in_window: p.deliveries_in_window,
            deliveries_per_s: p.deliveries_in_window as f64 / window_s,
            delivered_fraction: (fine > 0)
                .then(|| p.others as f64 / (fine as f64 * (members as f64 - 1.0))),
            latency_same_node: Quantiles::of(pick(|c| c & SAME_THROUGH != 0)),
            latency_cross_node: Quantiles::of(pick(|c| c & SAME_THROUGH == 0)),
            latency_receiver_direct: Quantiles::of(pick(|c| c & RECEIVER_DIRECT != 0)),
            latency_receiver_redirected: Quantiles::of(pick(|c| c & RECEIVER_DIRECT == 0)),
            latency: Quantiles::of(latency.iter().map(|(ns, _)| *ns).collect()),
            ack_latency: Quantiles::of(std::mem::take(&mut p.ack_latency)),
            server_cpu_s,
            server_cpu_s_per_node: per_node,
            server_cores: server_cpu_s / window_s,
            server_cpu_us_per_delivery: (p.deliveries_in_window > 0)
                .then(|| server_cpu_s * 1e6 / p.deliveries_in_window as f64),
            client_cpu_util: client_cpu_s / window_s,
            other_cpu_cores: ((machine_s - client_cpu_s - server_cpu_s) / window_s).max(0.0),
            loadavg_1m: (a0.load, a1.load),
            rejected: p.rejected,
            pool_exhausted: p.exhausted,
            late_posts: p.lateness.late,
            send_lag_max_ms: p.lateness.max_ms(),
            duplicates: p.duplicates,
            extra_drain_s,
            errors: std::mem::take(&mut p.errors),
            ..RoomsPhase::default()
        };
        let samples: Vec<Sample> = p.samples.drain().map(|(_, s)| s).collect();
        let samples: Vec<(Sample, usize)> = samples
            .into_iter()
            .map(|s| {
                let no = e.senders[s.sender].sender_no;
                (s, no)
            })
            .collect();
        (result, samples)
    };
    for (sample, sender_no) in samples {
        let (room, receiver_user, sender_user) = verify.who(&sample);
        let opened = crypto::open(receiver_user, &room, sample.sealed.clone(), |h| {
            verify.key(h)
        });
        let body = crate::load::body(sender_no, sample.slot, verify.body_bytes);
        match opened {
            Ok(p) if p.sender == sender_user.handle() && p.body == body => {
                result.verified_samples += 1;
            }
            Ok(_) => {
                result.verify_failures += 1;
                result
                    .errors
                    .push("a sampled delivery opened to the wrong sender or body".into());
            }
            Err(err) => {
                result.verify_failures += 1;
                result
                    .errors
                    .push(format!("a sampled delivery does not open: {err}"));
            }
        }
        tokio::task::yield_now().await;
    }
    result
}

/// What verifying samples needs.
struct Verify<'a> {
    users: &'a [Arc<Identity>],
    session_user: Vec<usize>,
    sender_session: Vec<usize>,
    session_room: Vec<usize>,
    body_bytes: usize,
}

impl Verify<'_> {
    fn who(&self, s: &Sample) -> (RoomId, &Identity, &Identity) {
        let room = RoomId::new(&room_name(self.session_room[s.receiver])).expect("room name");
        let receiver = &self.users[self.session_user[s.receiver]];
        let sender = &self.users[self.session_user[self.sender_session[s.sender]]];
        (room, receiver, sender)
    }

    fn key(&self, h: &saferchat_consensus::Handle) -> Option<rsa::PublicKey> {
        self.users
            .iter()
            .find(|u| u.handle() == *h)
            .map(|u| u.public_key())
    }
}

// ---------------------------------------------------------------------------
// The run.

/// Runs one many-rooms measurement on a started cluster.
///
/// # Errors
/// When setting the rooms up fails; problems during the phases and the
/// checks are recorded in the result.
#[allow(clippy::too_many_lines)]
pub async fn run(
    cluster: &Cluster,
    admin_token: &str,
    ticks: f64,
    users: &[Arc<Identity>],
    plan: RoomsPlan,
    seal_cache: Option<&Path>,
    rep: usize,
) -> anyhow::Result<RoomsRun> {
    let (r_count, m) = (plan.rooms, plan.members);
    anyhow::ensure!((1..=ROOMS_MAX).contains(&r_count), "rooms: 1..={ROOMS_MAX}");
    anyhow::ensure!((2..=MEMBERS_MAX).contains(&m), "members: 2..={MEMBERS_MAX}");
    anyhow::ensure!(m <= users.len(), "need at least M users");
    anyhow::ensure!(
        r_count * m <= SESSIONS_MAX,
        "at most {SESSIONS_MAX} sessions"
    );
    anyhow::ensure!(
        (1..=m).contains(&plan.senders_per_room),
        "senders per room: 1..=M"
    );
    anyhow::ensure!(
        (plan.senders_per_room..=POOL_MAX).contains(&plan.pool),
        "pool: S..={POOL_MAX} envelopes per room"
    );
    let addresses = cluster.addresses();
    let n = addresses.len();
    let pids = cluster.pids();
    let cpu_start: f64 = cluster::cpu_of(&pids, ticks).into_iter().flatten().sum();

    // Rooms and members.
    let t = Instant::now();
    let mut admins = Vec::with_capacity(n);
    for a in &addresses {
        admins.push(Admin::connect(a, admin_token).await?);
    }
    futures::stream::iter(0..r_count)
        .map(|r| {
            let mut admin = admins[r % n].clone();
            let plan = &plan;
            async move { setup_room(r, plan, &mut admin, users).await }
        })
        .buffer_unordered(plan.setup_concurrency.max(1))
        .try_collect::<Vec<()>>()
        .await?;
    let create_s = t.elapsed().as_secs_f64();
    eprintln!("  {r_count} rooms of {m} created in {create_s:.1} s; joining…");

    // Every member joins.
    let t = Instant::now();
    let mut rooms_joined: Vec<(usize, Vec<Joined>)> = futures::stream::iter(0..r_count)
        .map(|r| {
            let (plan, addresses) = (&plan, &addresses);
            async move { join_room(r, plan, addresses, users).await.map(|j| (r, j)) }
        })
        .buffer_unordered(plan.setup_concurrency.max(1))
        .try_collect()
        .await?;
    rooms_joined.sort_by_key(|(r, _)| *r);
    let join_s = t.elapsed().as_secs_f64();
    let joins: Vec<f64> = rooms_joined
        .iter()
        .flat_map(|(_, j)| j.iter().map(|x| x.join_ms))
        .collect();
    let mut sorted_joins: Vec<u64> = joins.iter().map(|ms| (ms * 1e3) as u64).collect();
    sorted_joins.sort_unstable();
    eprintln!(
        "  {} sessions joined in {join_s:.1} s (median {:.1} ms)",
        joins.len(),
        median(&joins).unwrap_or(f64::NAN)
    );

    // Topology, memberships, pools to seal.
    let mut topology = Topology {
        sessions: vec![vec![0; n]; n],
        rooms_per_node: vec![0; n],
        ..Topology::default()
    };
    let mut jobs = Vec::new();
    let mut sessions = Vec::with_capacity(r_count * m);
    let mut raw = Vec::with_capacity(r_count * m);
    let mut session_user = Vec::with_capacity(r_count * m);
    let mut history_access: Vec<(Channel, String)> = Vec::with_capacity(r_count);
    let s_per_room = plan.senders_per_room;
    for (r, joined) in rooms_joined {
        let room = RoomId::new(&room_name(r))?;
        let members = joined.last().expect("M ≥ 2").session.members().clone();
        anyhow::ensure!(
            members.recipients.len() == m,
            "room {room} has {} members with keys, expected {m}",
            members.recipients.len()
        );
        let serving = joined[0].ended;
        topology.rooms_per_node[serving] += 1;
        history_access.push((
            joined[0].session.channel(),
            joined[0].session.token().into(),
        ));
        for (i, j) in joined.into_iter().enumerate() {
            topology.sessions[j.through][j.ended] += 1;
            if j.ended != serving {
                topology.split_rooms += 1;
            }
            if j.through == j.ended {
                topology.direct_sessions += 1;
            } else {
                topology.redirected_sessions += 1;
            }
            let sender = (i < s_per_room).then(|| r * s_per_room + i);
            sessions.push(SessionState {
                room: r,
                through: j.through,
                ended: j.ended,
                sender,
                last_seq: 0,
                seq_errors: 0,
            });
            session_user.push(user_of(r, i, m, users.len()));
            if i < s_per_room {
                let count = plan.pool / s_per_room;
                let mut job = SealJob {
                    room: room.clone(),
                    revision: members.revision,
                    recipients: members.recipients.clone(),
                    sender: Arc::clone(j.session.identity()),
                    sender_no: r * s_per_room + i,
                    count,
                    body_bytes: plan.body_bytes,
                    cache: None,
                };
                job.cache = seal_cache.map(|d| job.cache_file(d));
                jobs.push(job);
            }
            raw.push(j.session.into_raw());
        }
    }
    if let Some(d) = seal_cache {
        std::fs::create_dir_all(d)?;
    }

    // Read every stream from now on.
    let (outs, streams, channels): (Vec<_>, Vec<_>, Vec<_>) = raw
        .into_iter()
        .map(|r| (r.out, r.inbound, r.channel))
        .fold((Vec::new(), Vec::new(), Vec::new()), |mut acc, r| {
            acc.0.push(r.0);
            acc.1.push(r.1);
            acc.2.push(r.2);
            acc
        });
    let sender_sessions: Vec<usize> = sessions
        .iter()
        .enumerate()
        .filter(|(_, s)| s.sender.is_some())
        .map(|(k, _)| k)
        .collect();
    let engine = Rc::new(RefCell::new(Engine {
        members: m,
        ids: HashMap::new(),
        senders: sender_sessions
            .iter()
            .map(|&k| SenderState {
                room: sessions[k].room,
                session: k,
                sender_no: sessions[k].sender.expect("a sender"),
                out: outs[k].clone(),
                pool: Vec::new(),
                next: 0,
                credits: VecDeque::new(),
                sent_at: Vec::new(),
                owed: Vec::new(),
                echoed: Vec::new(),
                acked: Vec::new(),
                rejected: Vec::new(),
                exhausted: false,
                wake: Rc::new(Notify::new()),
            })
            .collect(),
        sessions,
        phase: PhaseState::default(),
        unknown: 0,
        stream_errors: Vec::new(),
    }));
    let mut tasks: Vec<JoinHandle<()>> = streams
        .into_iter()
        .enumerate()
        .map(|(s, inbound)| tokio::task::spawn_local(receive(Rc::clone(&engine), s, inbound)))
        .collect();
    let sender_count = engine.borrow().senders.len();
    for s in 0..sender_count {
        tasks.push(tokio::task::spawn_local(unblock(Rc::clone(&engine), s)));
    }

    // Seal (or load) the pools.
    let t = Instant::now();
    let job_count = jobs.len();
    eprintln!(
        "  sealing {} pools of {} envelopes ({} threads, cache {})…",
        job_count,
        plan.pool / s_per_room,
        plan.seal_threads,
        seal_cache.map_or("off".into(), |d| d.display().to_string())
    );
    let pools = seal_all(jobs, plan.seal_threads).await?;
    let seal_s = t.elapsed().as_secs_f64();
    let (mut sealed, mut cached) = (0, 0);
    {
        let mut e = engine.borrow_mut();
        let now = Instant::now();
        for (s, (pool, from_cache)) in pools.into_iter().enumerate() {
            cached += from_cache;
            sealed += pool.len() - from_cache;
            for (k, bytes) in pool.iter().enumerate() {
                let envelope = saferchat_envelope::Envelope::decode(bytes.clone())
                    .context("a pooled envelope does not decode")?;
                anyhow::ensure!(
                    e.ids.insert(envelope.nonce, (s as u32, k as u32)).is_none(),
                    "two pooled envelopes share a nonce"
                );
            }
            let st = &mut e.senders[s];
            st.sent_at = vec![now; pool.len()];
            st.owed = vec![0; pool.len()];
            st.echoed = vec![false; pool.len()];
            st.acked = vec![None; pool.len()];
            st.rejected = vec![false; pool.len()];
            st.pool = pool;
        }
    }
    eprintln!("  pools ready in {seal_s:.1} s ({sealed} sealed, {cached} from the cache)");

    let verify = Verify {
        users,
        session_user,
        sender_session: sender_sessions.clone(),
        session_room: engine.borrow().sessions.iter().map(|s| s.room).collect(),
        body_bytes: plan.body_bytes,
    };
    let mut phases = BTreeMap::new();
    for name in &plan.phases {
        let timing = match name.as_str() {
            "rate" => PhaseTiming {
                closed_loop: false,
                rate: plan.rate_msgs_per_s,
                window: 0,
                warmup_s: plan.rate_warmup_s,
                duration_s: plan.rate_duration_s,
                drain_s: plan.drain_s,
                drain_max_s: plan.drain_max_s,
            },
            "sat" => PhaseTiming {
                closed_loop: true,
                rate: 0.0,
                window: plan.window,
                warmup_s: plan.sat_warmup_s,
                duration_s: plan.sat_duration_s,
                drain_s: plan.drain_s,
                drain_max_s: plan.drain_max_s,
            },
            other => anyhow::bail!("unknown phase {other:?} (rate, sat)"),
        };
        let p = run_phase(&engine, timing, &pids, ticks, &verify).await;
        eprintln!(
            "  N={n} rep {rep} {name}: {:.0} deliveries/s ({:.0} msgs/s acked), delivery p50 {:.2} / p99 {:.2} ms, ack p50 {:.2} / p99 {:.2} ms, nodes {:.2} cores ({:.2} µs/delivery), client {:.2}, others {:.2}, load {:.1}→{:.1}, delivered {:.4}, exhausted {}, late {} (lag max {:.1} ms), rejected {}{}",
            p.deliveries_per_s,
            p.acked_msgs_per_s,
            p.latency.p50_ms.unwrap_or(f64::NAN),
            p.latency.p99_ms.unwrap_or(f64::NAN),
            p.ack_latency.p50_ms.unwrap_or(f64::NAN),
            p.ack_latency.p99_ms.unwrap_or(f64::NAN),
            p.server_cores,
            p.server_cpu_us_per_delivery.unwrap_or(f64::NAN),
            p.client_cpu_util,
            p.other_cpu_cores,
            p.loadavg_1m.0,
            p.loadavg_1m.1,
            p.delivered_fraction.unwrap_or(f64::NAN),
            p.pool_exhausted,
            p.late_posts,
            p.send_lag_max_ms,
            p.rejected,
            if p.errors.is_empty() {
                String::new()
            } else {
                format!(", errors: {:?}", &p.errors[..p.errors.len().min(3)])
            }
        );
        phases.insert(name.clone(), p);
    }

    // No acknowledged post lost.
    let loss = check_losses(&engine, &history_access).await;
    eprintln!(
        "  checks: {} posts sent, {} acked, {} unanswered; rooms with bad acked numbers {}, sessions with bad deliveries {}, rooms with bad history {} of {} read ({} acked missing, {} extra){}",
        loss.posts_sent,
        loss.posts_acked,
        loss.posts_unanswered,
        loss.rooms_bad_acked_seqs,
        loss.sessions_bad_deliveries,
        loss.rooms_bad_history,
        loss.rooms_history_read,
        loss.acked_missing_from_history,
        loss.history_extra,
        if loss.problems.is_empty() {
            String::new()
        } else {
            format!(": {:?}", &loss.problems[..loss.problems.len().min(5)])
        }
    );
    for t in tasks {
        t.abort();
    }
    let (unknown, stream_errors) = {
        let e = engine.borrow();
        (e.unknown, e.stream_errors.clone())
    };
    drop(outs);
    drop(channels);
    drop(history_access);
    let cpu_end: f64 = cluster::cpu_of(&pids, ticks).into_iter().flatten().sum();
    let vmhwm = pids
        .iter()
        .filter_map(|p| crate::procfs::hwm_bytes(p))
        .max()
        .unwrap_or(0);
    Ok(RoomsRun {
        rep,
        plan,
        node_command: cluster.command.clone(),
        node_placement: pids
            .iter()
            .map(|p| {
                format!(
                    "pid {p} on CPUs {}, {}",
                    crate::procfs::cpus_allowed(p),
                    crate::procfs::scheduling(p)
                )
            })
            .collect(),
        setup: RoomsSetup {
            create_s,
            join_s,
            join_ms_median: median(&joins),
            join_ms_p99: percentile(&sorted_joins, 99.0).map(|us| us as f64 / 1e3),
            seal_s,
            sealed,
            cached,
            topology,
        },
        phases,
        loss,
        unknown_deliveries: unknown,
        stream_errors: stream_errors.into_iter().take(ERRORS_MAX).collect(),
        server_cpu_total_s: cpu_end - cpu_start,
        server_vmhwm_mb_max: vmhwm as f64 / 1048576.0,
    })
}

/// The checks after the phases: acknowledged numbers, deliveries per
/// session, and History on the serving node.
async fn check_losses(engine: &Rc<RefCell<Engine>>, history: &[(Channel, String)]) -> LossCheck {
    let mut check = LossCheck::default();
    // room → (seq → id) of every acknowledged post.
    let mut acked: Vec<BTreeMap<u64, Bytes>> = vec![BTreeMap::new(); history.len()];
    {
        let e = engine.borrow();
        for st in &e.senders {
            for k in 0..st.next {
                check.posts_sent += 1;
                match &st.acked[k] {
                    Some((seq, id)) => {
                        check.posts_acked += 1;
                        if let Some(other) = acked[st.room].insert(*seq, id.clone())
                            && other != *id
                        {
                            check.conflicting_acks += 1;
                            if check.problems.len() < ERRORS_MAX {
                                check.problems.push(format!(
                                    "room {}: #{seq} acknowledged for two different posts",
                                    room_name(st.room)
                                ));
                            }
                        }
                    }
                    None if st.rejected[k] => {}
                    None => check.posts_unanswered += 1,
                }
            }
        }
        let acked_count: Vec<u64> = e.senders.iter().fold(vec![0; history.len()], |mut v, st| {
            v[st.room] += st.acked[..st.next].iter().filter(|a| a.is_some()).count() as u64;
            v
        });
        for (r, seqs) in acked.iter().enumerate() {
            let n = acked_count[r];
            let gapless = seqs.len() as u64 == n
                && seqs.keys().next().is_none_or(|f| *f == 1)
                && seqs.keys().last().is_none_or(|l| *l == n);
            if !gapless {
                check.rooms_bad_acked_seqs += 1;
                if check.problems.len() < ERRORS_MAX {
                    check.problems.push(format!(
                        "room {}: {n} posts acknowledged, numbers {:?}…",
                        room_name(r),
                        seqs.keys().take(5).collect::<Vec<_>>()
                    ));
                }
            }
        }
        for (s, session) in e.sessions.iter().enumerate() {
            let n = acked[session.room].len() as u64;
            if session.last_seq != n || session.seq_errors > 0 {
                check.sessions_bad_deliveries += 1;
                if check.problems.len() < ERRORS_MAX {
                    check.problems.push(format!(
                        "room {} session {s}: received up to #{} with {} out of order, {n} acknowledged",
                        room_name(session.room),
                        session.last_seq,
                        session.seq_errors
                    ));
                }
            }
        }
    }
    // History on the serving node, every room (following one redirect:
    // leadership may have moved since the session joined).
    let results: Vec<(usize, HistoryRead)> = futures::stream::iter(history.iter().enumerate())
        .map(|(r, (channel, token))| async move {
            let request = pb::HistoryRequest {
                chat: room_name(r),
                session: token.clone(),
                before_id: Bytes::new(),
                after_id: Bytes::new(),
                limit: POOL_MAX as u32,
                min_seq: 0,
                after_seq: 0,
            };
            let read = |channel: Channel, request: pb::HistoryRequest| async move {
                let mut client =
                    ChatRoomClient::new(channel).max_decoding_message_size(256 * 1024 * 1024);
                let mut pages = client.history(request).await?.into_inner();
                let mut items = Vec::new();
                while let Some(page) = pages.message().await? {
                    items.extend(page.items.into_iter().map(|i| (i.seq, i.id)));
                }
                Ok(items)
            };
            let mut result = read(channel.clone(), request.clone()).await;
            if let Err(status) = &result
                && let Some(next) = saferchat_client::connect::redirect_of(status)
            {
                result = match saferchat_client::connect::connect(&next).await {
                    Ok(channel) => read(channel, request).await,
                    Err(e) => Err(tonic::Status::unavailable(format!(
                        "following the redirect: {e}"
                    ))),
                };
            }
            (r, result)
        })
        .buffer_unordered(16)
        .collect()
        .await;
    for (r, result) in results {
        match result {
            Ok(items) => {
                check.rooms_history_read += 1;
                let stored: BTreeMap<u64, Bytes> = items.iter().cloned().collect();
                let missing = acked[r]
                    .iter()
                    .filter(|(seq, id)| stored.get(seq) != Some(id))
                    .count() as u64;
                let extra = stored
                    .keys()
                    .filter(|seq| !acked[r].contains_key(seq))
                    .count() as u64;
                let duplicated = items.len() != stored.len();
                if missing > 0 || extra > 0 || duplicated {
                    check.rooms_bad_history += 1;
                    check.acked_missing_from_history += missing;
                    check.history_extra += extra;
                    if check.problems.len() < ERRORS_MAX {
                        check.problems.push(format!(
                            "room {}: history holds {} messages ({} distinct numbers), {} acknowledged; {missing} acknowledged missing, {extra} extra",
                            room_name(r),
                            items.len(),
                            stored.len(),
                            acked[r].len()
                        ));
                    }
                }
            }
            Err(status) => {
                check.rooms_bad_history += 1;
                if check.problems.len() < ERRORS_MAX {
                    check.problems.push(format!(
                        "room {}: History failed: {:?} {}",
                        room_name(r),
                        status.code(),
                        status.message()
                    ));
                }
            }
        }
    }
    check
}
