//! The load engine: pre-sealed envelope pools, senders (closed loop or
//! open loop at a fixed rate) and receivers, on one thread.
//!
//! # How a delivery is recognised without decrypting it
//!
//! Before the phases, every sender seals a pool of envelopes (real
//! AES-GCM bodies, real RSA-OAEP wrapped keys, real RSA-PSS signatures) and
//! reuses them cyclically. Each envelope has its own random nonce, so a
//! receiver decodes only the nonce field of the `Sealed` it received (no
//! crypto) and looks up which (sender, slot) it is. The sender stamps a
//! slot with the instant the post was due (its tick in the open loop, so a
//! sender that falls behind its schedule shows it in the latency instead
//! of hiding it: no coordinated omission; the echo that freed it in the
//! closed loop); latency is receive instant minus that stamp, both from
//! this process's monotonic clock. A slot is posted again only after
//! every member (its sender included) has received its previous post, so a
//! stamp is never overwritten while a copy is still on its way. A sample
//! of deliveries (the first of each sender at one receiver, per phase) is
//! verified and decrypted after the phase to prove the envelopes are real.

use std::cell::RefCell;
use std::collections::{HashMap, VecDeque};
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use prost::Message as _;
use saferchat_client::Identity;
use saferchat_client::crypto::{self, Recipient};
use saferchat_consensus::{Handle, Revision, RoomId};
use saferchat_envelope::NONCE_BYTES;
use saferchat_proto::chat::{self as pb, client_frame, server_frame};
use serde::Serialize;
use tokio::sync::{Notify, mpsc};
use tokio::task::JoinHandle;
use tonic::Streaming;

use crate::procfs;
use crate::stats::{Lateness, percentile};

/// Largest envelope pool per sender.
pub const POOL_MAX: usize = 4096;
/// Most latency samples kept per phase (beyond: counted, not stored).
const LATENCY_SAMPLES_MAX: usize = 20_000_000;
/// How often server memory is sampled during a phase.
const RSS_SAMPLE_MS: u64 = 200;
/// How often the drain wait checks the counters.
const DRAIN_POLL_MS: u64 = 50;

/// Only the nonce of an `saferchat.envelope.v1.Sealed`: prost skips the
/// other fields without copying them.
#[derive(Clone, PartialEq, prost::Message)]
struct SealedNonce {
    #[prost(bytes = "bytes", tag = "5")]
    nonce: Bytes,
}

/// The plaintext of pool slot `slot` of sender `sender`: a readable marker,
/// then filler up to `body_bytes`.
pub fn body(sender: usize, slot: usize, body_bytes: usize) -> Vec<u8> {
    let mut body = format!("BENCH|{sender}|{slot}|").into_bytes();
    let filler = b"abcdefghijklmnopqrstuvwxyz0123456789";
    let mut i = 0;
    while body.len() < body_bytes {
        body.push(filler[i % filler.len()]);
        i += 1;
    }
    body.truncate(body_bytes.max(1));
    body
}

#[derive(Clone, Copy, Debug)]
struct Slot {
    sent_at: Instant,
    /// Members (the sender included) that have not yet received the last
    /// post of this slot.
    outstanding: u32,
}

struct SenderState {
    member: usize,
    out: mpsc::Sender<pb::ClientFrame>,
    pool: Vec<Bytes>,
    bodies: Vec<Vec<u8>>,
    slots: Vec<Slot>,
    next_slot: usize,
    next_seq: u64,
    /// Posts owed, each with the instant it was due: granted by an echo
    /// (closed loop) or a tick (open loop) and not yet sent.
    credits: VecDeque<Instant>,
    stalled: bool,
    wake: Rc<Notify>,
}

struct Sample {
    receiver: usize,
    sender: usize,
    slot: usize,
    sealed: Bytes,
}

/// Counters of one phase, as the receivers and senders update them.
#[derive(Default)]
struct PhaseState {
    closed_loop: bool,
    t0: Option<Instant>,
    t1: Option<Instant>,
    t_stop: Option<Instant>,
    number: usize,
    sent: u64,
    sent_in_window: u64,
    echoes: u64,
    others_total: u64,
    deliveries_in_window: u64,
    latency_ns: Vec<u64>,
    stalls: u64,
    /// How far the generator fell behind its schedule.
    lateness: Lateness,
    accepted: u64,
    rejected: u64,
    duplicates: u64,
    samples: Vec<Option<Sample>>,
    errors: Vec<String>,
}

/// Every sender and receiver of one room.
pub struct Engine {
    members: usize,
    ids: HashMap<[u8; NONCE_BYTES], (u32, u32)>,
    senders: Vec<SenderState>,
    phase: PhaseState,
    unknown: u64,
    membership_frames: u64,
    stream_errors: Vec<String>,
}

/// What sealing the pools cost.
#[derive(Clone, Debug, Serialize)]
pub struct SealReport {
    /// Envelopes sealed.
    pub envelopes: usize,
    /// Wall seconds.
    pub seconds: f64,
    /// Mean milliseconds per envelope (sign + wrap for every member).
    pub ms_per_envelope: f64,
}

/// Seals `pool` envelopes for each of the first `senders` members.
///
/// Yields to the runtime between envelopes so that connections keep
/// answering the node's keep-alive pings while this runs.
///
/// # Errors
/// When sealing fails or two envelopes share a nonce.
#[allow(clippy::type_complexity)]
pub async fn seal_pools(
    users: &[Arc<Identity>],
    senders: usize,
    room: &RoomId,
    revision: Revision,
    recipients: &[Recipient],
    pool: usize,
    body_bytes: usize,
) -> anyhow::Result<(
    Vec<(Vec<Bytes>, Vec<Vec<u8>>)>,
    HashMap<[u8; NONCE_BYTES], (u32, u32)>,
    SealReport,
)> {
    anyhow::ensure!(
        (1..=POOL_MAX).contains(&pool),
        "pool must be 1..={POOL_MAX}"
    );
    let started = Instant::now();
    let mut ids = HashMap::new();
    let mut pools = Vec::with_capacity(senders);
    for (s, user) in users.iter().take(senders).enumerate() {
        let mut envelopes = Vec::with_capacity(pool);
        let mut bodies = Vec::with_capacity(pool);
        for k in 0..pool {
            let plain = body(s, k, body_bytes);
            let envelope = crypto::seal(user, room, revision, recipients, &plain)?;
            anyhow::ensure!(
                ids.insert(envelope.nonce, (s as u32, k as u32)).is_none(),
                "two pooled envelopes share a nonce"
            );
            envelopes.push(envelope.encode());
            bodies.push(plain);
            tokio::task::yield_now().await;
        }
        pools.push((envelopes, bodies));
    }
    let seconds = started.elapsed().as_secs_f64();
    let envelopes = senders * pool;
    Ok((
        pools,
        ids,
        SealReport {
            envelopes,
            seconds,
            ms_per_envelope: seconds * 1e3 / envelopes.max(1) as f64,
        },
    ))
}

impl Engine {
    /// Builds the engine; the first `pools.len()` members are the senders.
    pub fn new(
        members: usize,
        outs: Vec<mpsc::Sender<pb::ClientFrame>>,
        pools: Vec<(Vec<Bytes>, Vec<Vec<u8>>)>,
        ids: HashMap<[u8; NONCE_BYTES], (u32, u32)>,
    ) -> Engine {
        let now = Instant::now();
        let senders = pools
            .into_iter()
            .enumerate()
            .map(|(s, (pool, bodies))| SenderState {
                member: s,
                out: outs[s].clone(),
                slots: vec![
                    Slot {
                        sent_at: now,
                        outstanding: 0
                    };
                    pool.len()
                ],
                pool,
                bodies,
                next_slot: 0,
                next_seq: 1,
                credits: VecDeque::new(),
                stalled: false,
                wake: Rc::new(Notify::new()),
            })
            .collect();
        Engine {
            members,
            ids,
            senders,
            phase: PhaseState::default(),
            unknown: 0,
            membership_frames: 0,
            stream_errors: Vec::new(),
        }
    }

    fn sample_receiver(&self, sender: usize) -> usize {
        let m = self.members;
        let member = self.senders[sender].member;
        let r = (member + 1 + self.phase.number) % m;
        if r == member { (r + 1) % m } else { r }
    }

    fn on_delivery(&mut self, receiver: usize, sealed: Bytes, now: Instant) {
        let Ok(wire) = SealedNonce::decode(sealed.clone()) else {
            self.unknown += 1;
            return;
        };
        let Ok(nonce) = <[u8; NONCE_BYTES]>::try_from(wire.nonce.as_ref()) else {
            self.unknown += 1;
            return;
        };
        let Some(&(s, k)) = self.ids.get(&nonce) else {
            self.unknown += 1;
            return;
        };
        let (s, k) = (s as usize, k as usize);
        let sample_receiver = self.sample_receiver(s);
        let phase = &mut self.phase;
        let sender = &mut self.senders[s];
        let slot = &mut sender.slots[k];
        if slot.outstanding == 0 {
            phase.duplicates += 1;
            return;
        }
        slot.outstanding -= 1;
        let sent_at = slot.sent_at;
        let freed = slot.outstanding == 0;
        let echo = receiver == sender.member;
        if echo {
            phase.echoes += 1;
            if phase.closed_loop && phase.t_stop.is_some_and(|t| now < t) {
                sender.credits.push_back(now);
            }
        } else {
            phase.others_total += 1;
            if phase.t0.is_some_and(|t| now >= t) && phase.t1.is_some_and(|t| now < t) {
                phase.deliveries_in_window += 1;
                if phase.latency_ns.len() < LATENCY_SAMPLES_MAX {
                    let ns = now.saturating_duration_since(sent_at).as_nanos();
                    phase.latency_ns.push(u64::try_from(ns).unwrap_or(u64::MAX));
                }
            }
            if receiver == sample_receiver && phase.samples[s].is_none() {
                phase.samples[s] = Some(Sample {
                    receiver,
                    sender: s,
                    slot: k,
                    sealed,
                });
            }
        }
        if freed || echo {
            self.pump(s);
        }
    }

    fn on_result(&mut self, member: usize, result: pb::PostResult) {
        match result.outcome {
            Some(pb::post_result::Outcome::Accepted(_)) => self.phase.accepted += 1,
            Some(pb::post_result::Outcome::Rejected(r)) => {
                self.phase.rejected += 1;
                if self.phase.errors.len() < 10 {
                    self.phase.errors.push(format!(
                        "member {member}: post {} rejected: code {} {}",
                        result.client_seq, r.code, r.message
                    ));
                }
                // Nobody will receive it: free its slot.
                if let Some(s) = self.senders.iter().position(|s| s.member == member) {
                    let sender = &mut self.senders[s];
                    let k =
                        (result.client_seq.saturating_sub(1) % sender.pool.len() as u64) as usize;
                    sender.slots[k].outstanding = 0;
                    self.pump(s);
                }
            }
            None => self.unknown += 1,
        }
    }

    /// Sends what sender `s` owes, as long as its next slot is free and its
    /// stream takes frames.
    fn pump(&mut self, s: usize) {
        let members = u32::try_from(self.members).expect("bounded members");
        let phase = &mut self.phase;
        let sender = &mut self.senders[s];
        while let Some(&due) = sender.credits.front() {
            let k = sender.next_slot;
            if sender.slots[k].outstanding > 0 {
                if !sender.stalled {
                    phase.stalls += 1;
                    sender.stalled = true;
                }
                return;
            }
            let permit = match sender.out.try_reserve() {
                Ok(p) => p,
                Err(mpsc::error::TrySendError::Full(())) => {
                    sender.wake.notify_one();
                    return;
                }
                Err(mpsc::error::TrySendError::Closed(())) => {
                    phase
                        .errors
                        .push(format!("sender {s}: the session's stream is closed"));
                    sender.credits.clear();
                    return;
                }
            };
            let seq = sender.next_seq;
            phase.lateness.record(due, Instant::now());
            sender.slots[k] = Slot {
                sent_at: due,
                outstanding: members,
            };
            permit.send(pb::ClientFrame {
                frame: Some(client_frame::Frame::Post(pb::Post {
                    client_seq: seq,
                    envelope: sender.pool[k].clone(),
                    ..pb::Post::default()
                })),
            });
            sender.next_seq += 1;
            sender.next_slot = (k + 1) % sender.pool.len();
            sender.credits.pop_front();
            sender.stalled = false;
            phase.sent += 1;
        }
    }
}

/// Reads one member's stream until it ends, feeding the engine.
async fn receive(
    engine: Rc<RefCell<Engine>>,
    member: usize,
    mut inbound: Streaming<pb::ServerFrame>,
) {
    loop {
        let frame = inbound.message().await;
        let now = Instant::now();
        let mut e = engine.borrow_mut();
        match frame {
            Ok(Some(pb::ServerFrame { frame: Some(f) })) => match f {
                server_frame::Frame::Deliveries(d) => {
                    for item in d.items {
                        e.on_delivery(member, item.sealed, now);
                    }
                }
                server_frame::Frame::Result(r) => e.on_result(member, r),
                server_frame::Frame::MembershipChanged(_) => e.membership_frames += 1,
                server_frame::Frame::Challenge(_) | server_frame::Frame::Joined(_) => {
                    e.stream_errors
                        .push(format!("member {member}: handshake frame after joining"));
                }
            },
            Ok(Some(_)) => {}
            Ok(None) => {
                e.stream_errors
                    .push(format!("member {member}: the node ended the session"));
                return;
            }
            Err(status) => {
                e.stream_errors.push(format!(
                    "member {member}: session ended: {:?} {}",
                    status.code(),
                    status.message()
                ));
                return;
            }
        }
    }
}

/// Waits for a full stream and sends again (rarely needed: a sender keeps
/// at most a few posts in flight).
async fn unblock(engine: Rc<RefCell<Engine>>, s: usize) {
    let (wake, out) = {
        let e = engine.borrow();
        (Rc::clone(&e.senders[s].wake), e.senders[s].out.clone())
    };
    loop {
        wake.notified().await;
        match out.reserve().await {
            Ok(permit) => drop(permit),
            Err(_) => return,
        }
        engine.borrow_mut().pump(s);
    }
}

/// Starts the receiver of every member and the unblocker of every sender.
pub fn spawn_tasks(
    engine: &Rc<RefCell<Engine>>,
    streams: Vec<Streaming<pb::ServerFrame>>,
) -> Vec<JoinHandle<()>> {
    let mut tasks = Vec::new();
    for (member, inbound) in streams.into_iter().enumerate() {
        tasks.push(tokio::task::spawn_local(receive(
            Rc::clone(engine),
            member,
            inbound,
        )));
    }
    let senders = engine.borrow().senders.len();
    for s in 0..senders {
        tasks.push(tokio::task::spawn_local(unblock(Rc::clone(engine), s)));
    }
    tasks
}

/// How one phase loads the room.
#[derive(Clone, Copy, Debug)]
pub enum Load {
    /// Open loop: this many messages per second in total, spread evenly
    /// over the senders.
    Rate(f64),
    /// Closed loop: each sender keeps this many posts in flight (until it
    /// receives its own post back).
    Window(u64),
}

/// One phase's timing.
#[derive(Clone, Copy, Debug)]
pub struct PhasePlan {
    /// The load.
    pub load: Load,
    /// Seconds before the measured window.
    pub warmup_s: f64,
    /// Seconds measured.
    pub duration_s: f64,
    /// Seconds after the window before waiting for stragglers.
    pub drain_s: f64,
    /// Most seconds to wait for every message to reach every member.
    pub drain_max_s: f64,
}

/// What one phase measured.
#[derive(Clone, Debug, Default, Serialize)]
pub struct PhaseResult {
    /// "rate" (open loop) or "sat" (closed loop).
    pub mode: String,
    /// Measured window, seconds.
    pub window_s: f64,
    /// Warm-up, seconds.
    pub warmup_s: f64,
    /// Members of the room.
    pub members: usize,
    /// Senders.
    pub senders: usize,
    /// Open loop: target messages per second.
    pub target_msgs_per_s: Option<f64>,
    /// Closed loop: posts in flight per sender.
    pub inflight_per_sender: Option<u64>,
    /// Posts sent in the phase (warm-up and window).
    pub msgs_sent_total: u64,
    /// Open loop: posts scheduled inside the window.
    pub msgs_sent_in_window: Option<u64>,
    /// Open loop: posts per second scheduled inside the window.
    pub achieved_msgs_per_s: Option<f64>,
    /// Deliveries to members other than the sender, received inside the
    /// window.
    pub deliveries_in_window: u64,
    /// The same per second.
    pub deliveries_per_s: f64,
    /// Messages per second into the room (deliveries/s over M−1).
    pub msgs_per_s: f64,
    /// Deliveries received (any time) over posts sent × (M−1); 1.0 means
    /// every message reached every other member.
    pub delivered_fraction: Option<f64>,
    /// Own posts received back over posts sent.
    pub echo_fraction: Option<f64>,
    /// Seconds waited after the drain for the last deliveries.
    pub extra_drain_s: f64,
    /// Latency samples (deliveries inside the window).
    pub lat_samples: usize,
    /// Post-to-delivery latency, median, ms.
    pub lat_p50_ms: Option<f64>,
    /// 99th percentile, ms.
    pub lat_p99_ms: Option<f64>,
    /// Maximum, ms.
    pub lat_max_ms: Option<f64>,
    /// Server utime+stime in the window, s.
    pub server_cpu_s: f64,
    /// The same over the window: cores busy.
    pub server_cpu_util: f64,
    /// Server CPU microseconds per delivery in the window.
    pub server_cpu_us_per_delivery: Option<f64>,
    /// Highest sampled VmRSS of the server during the phase, MiB.
    pub server_rss_peak_mb: f64,
    /// VmHWM of the server at the end of the phase, MiB.
    pub server_vmhwm_mb: f64,
    /// This process's CPU in the window, s.
    pub client_cpu_s: f64,
    /// The same over the window (share of its one core).
    pub client_cpu_util: f64,
    /// CPU used by every other process in the window, cores.
    pub other_cpu_cores: f64,
    /// Times a sender's next slot was still in flight when it was due.
    pub pool_stalls: u64,
    /// Posts sent more than 5 ms after they were due (the generator fell
    /// behind its schedule), and the longest lag, ms.
    pub late_posts: u64,
    pub send_lag_max_ms: f64,
    /// Posts acknowledged.
    pub posts_accepted: u64,
    /// Posts rejected (must be 0).
    pub posts_rejected: u64,
    /// Deliveries of a slot nobody was waiting for (must be 0).
    pub duplicates: u64,
    /// Sampled deliveries verified and decrypted after the phase.
    pub verified_samples: usize,
    /// Sampled deliveries that did not verify or decrypt (must be 0).
    pub verify_failures: usize,
    /// What went wrong, if anything.
    pub errors: Vec<String>,
}

/// The room and keys needed to verify samples.
pub struct Verifier<'a> {
    /// The room.
    pub room: &'a RoomId,
    /// Every member's identity, by member index.
    pub users: &'a [Arc<Identity>],
    /// Every member's public key.
    pub keys: &'a HashMap<Handle, rsa::PublicKey>,
}

/// Runs one phase and measures it.
pub async fn run_phase(
    engine: &Rc<RefCell<Engine>>,
    plan: PhasePlan,
    number: usize,
    server_pid: &str,
    ticks_per_s: f64,
    verifier: &Verifier<'_>,
) -> PhaseResult {
    let (members, senders) = {
        let e = engine.borrow();
        (e.members, e.senders.len())
    };
    let t_start = Instant::now() + Duration::from_millis(500);
    let t0 = t_start + Duration::from_secs_f64(plan.warmup_s);
    let t1 = t0 + Duration::from_secs_f64(plan.duration_s);
    let t_end = t1 + Duration::from_secs_f64(plan.drain_s);
    {
        let mut e = engine.borrow_mut();
        e.phase = PhaseState {
            closed_loop: matches!(plan.load, Load::Window(_)),
            t0: Some(t0),
            t1: Some(t1),
            t_stop: Some(t1),
            number,
            samples: (0..senders).map(|_| None).collect(),
            ..PhaseState::default()
        };
        for s in &mut e.senders {
            s.credits.clear();
        }
    }
    let mut tickers = Vec::new();
    if let Load::Rate(rate) = plan.load {
        let interval = Duration::from_secs_f64(senders as f64 / rate.max(1e-3));
        for s in 0..senders {
            let offset = interval.mul_f64(s as f64 / senders as f64);
            tickers.push(tokio::task::spawn_local(tick(
                Rc::clone(engine),
                s,
                t_start + offset,
                interval,
                (t0, t1),
            )));
        }
    }
    let mut rss_peak = 0u64;
    let mut at0 = None;
    let mut at1 = None;
    let mut started = false;
    loop {
        let now = Instant::now();
        if !started && now >= t_start {
            started = true;
            if let Load::Window(w) = plan.load {
                let mut e = engine.borrow_mut();
                for s in 0..senders {
                    e.senders[s].credits = std::iter::repeat_n(now, w as usize).collect();
                    e.pump(s);
                }
            }
        }
        if at0.is_none() && now >= t0 {
            at0 = Some(procfs::snapshot(server_pid, ticks_per_s));
        }
        if at1.is_none() && now >= t1 {
            at1 = Some(procfs::snapshot(server_pid, ticks_per_s));
        }
        rss_peak = rss_peak.max(procfs::rss_bytes(server_pid).unwrap_or(0));
        if now >= t_end {
            break;
        }
        let mut next = now + Duration::from_millis(RSS_SAMPLE_MS);
        for t in [
            (!started).then_some(t_start),
            at0.is_none().then_some(t0),
            at1.is_none().then_some(t1),
            Some(t_end),
        ]
        .into_iter()
        .flatten()
        {
            next = next.min(t);
        }
        tokio::time::sleep_until(next.into()).await;
    }
    for t in tickers {
        t.abort();
    }
    // Wait (bounded) until every post reached every member.
    let drain_started = Instant::now();
    loop {
        let done = {
            let e = engine.borrow();
            let p = &e.phase;
            p.others_total >= p.sent * (members as u64 - 1) && p.echoes + p.rejected >= p.sent
        };
        if done || drain_started.elapsed().as_secs_f64() > plan.drain_max_s {
            break;
        }
        tokio::time::sleep(Duration::from_millis(DRAIN_POLL_MS)).await;
    }
    let extra_drain_s = drain_started.elapsed().as_secs_f64();
    let vmhwm = procfs::hwm_bytes(server_pid).unwrap_or(0);
    let (a0, a1) = (at0.expect("window start"), at1.expect("window end"));
    let (mut result, samples, bodies, sender_members) = {
        let mut e = engine.borrow_mut();
        let samples: Vec<Sample> = e
            .phase
            .samples
            .iter_mut()
            .filter_map(Option::take)
            .collect();
        let p = &mut e.phase;
        let window_s = (a1.at - a0.at).as_secs_f64();
        let server_cpu_s = a1.server_cpu_s - a0.server_cpu_s;
        let client_cpu_s = a1.client_cpu_s - a0.client_cpu_s;
        let machine_s = a1.machine_busy_s - a0.machine_busy_s;
        p.latency_ns.sort_unstable();
        let ms = |ns: u64| ns as f64 / 1e6;
        let mut result = PhaseResult {
            mode: match plan.load {
                Load::Rate(_) => "rate".into(),
                Load::Window(_) => "sat".into(),
            },
            window_s,
            warmup_s: plan.warmup_s,
            members,
            senders,
            target_msgs_per_s: match plan.load {
                Load::Rate(r) => Some(r),
                Load::Window(_) => None,
            },
            inflight_per_sender: match plan.load {
                Load::Rate(_) => None,
                Load::Window(w) => Some(w),
            },
            msgs_sent_total: p.sent,
            msgs_sent_in_window: matches!(plan.load, Load::Rate(_)).then_some(p.sent_in_window),
            achieved_msgs_per_s: matches!(plan.load, Load::Rate(_))
                .then(|| p.sent_in_window as f64 / plan.duration_s),
            deliveries_in_window: p.deliveries_in_window,
            deliveries_per_s: p.deliveries_in_window as f64 / window_s,
            msgs_per_s: p.deliveries_in_window as f64 / window_s / (members as f64 - 1.0),
            delivered_fraction: (p.sent > 0)
                .then(|| p.others_total as f64 / (p.sent as f64 * (members as f64 - 1.0))),
            echo_fraction: (p.sent > 0).then(|| p.echoes as f64 / p.sent as f64),
            extra_drain_s,
            lat_samples: p.latency_ns.len(),
            lat_p50_ms: percentile(&p.latency_ns, 50.0).map(ms),
            lat_p99_ms: percentile(&p.latency_ns, 99.0).map(ms),
            lat_max_ms: p.latency_ns.last().copied().map(ms),
            server_cpu_s,
            server_cpu_util: server_cpu_s / window_s,
            server_cpu_us_per_delivery: (p.deliveries_in_window > 0)
                .then(|| server_cpu_s * 1e6 / p.deliveries_in_window as f64),
            server_rss_peak_mb: rss_peak as f64 / 1048576.0,
            server_vmhwm_mb: vmhwm as f64 / 1048576.0,
            client_cpu_s,
            client_cpu_util: client_cpu_s / window_s,
            other_cpu_cores: ((machine_s - client_cpu_s - server_cpu_s) / window_s).max(0.0),
            pool_stalls: p.stalls,
            late_posts: p.lateness.late,
            send_lag_max_ms: p.lateness.max_ms(),
            posts_accepted: p.accepted,
            posts_rejected: p.rejected,
            duplicates: p.duplicates,
            errors: std::mem::take(&mut p.errors),
            ..PhaseResult::default()
        };
        p.latency_ns = Vec::new();
        result.errors.append(&mut e.stream_errors);
        let bodies: Vec<Vec<Vec<u8>>> = e.senders.iter().map(|s| s.bodies.clone()).collect();
        let sender_members: Vec<usize> = e.senders.iter().map(|s| s.member).collect();
        (result, samples, bodies, sender_members)
    };
    // Prove the envelopes are real: verify and decrypt the samples.
    for sample in samples {
        let me = &verifier.users[sample.receiver];
        let opened = crypto::open(me, verifier.room, sample.sealed, |h| {
            verifier.keys.get(h).cloned()
        });
        let expected_sender = verifier.users[sender_members[sample.sender]].handle();
        match opened {
            Ok(plain)
                if plain.sender == expected_sender
                    && plain.body == bodies[sample.sender][sample.slot] =>
            {
                result.verified_samples += 1;
            }
            Ok(_) => {
                result.verify_failures += 1;
                result
                    .errors
                    .push("a sampled delivery decrypted to the wrong body or sender".into());
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

/// Open loop for one sender: one post owed per tick from `first` on, until
/// the window ends. Counts the ticks that fall inside the window.
async fn tick(
    engine: Rc<RefCell<Engine>>,
    s: usize,
    first: Instant,
    interval: Duration,
    (t0, t1): (Instant, Instant),
) {
    let mut k: u32 = 0;
    loop {
        let t = first + interval * k;
        if t >= t1 {
            return;
        }
        tokio::time::sleep_until(t.into()).await;
        let mut e = engine.borrow_mut();
        e.senders[s].credits.push_back(t);
        if t >= t0 {
            e.phase.sent_in_window += 1;
        }
        e.pump(s);
        k = k.saturating_add(1);
    }
}

/// Frames that were not deliveries and deliveries nobody recognised.
pub fn oddities(engine: &Rc<RefCell<Engine>>) -> (u64, u64) {
    let e = engine.borrow();
    (e.membership_frames, e.unknown)
}
