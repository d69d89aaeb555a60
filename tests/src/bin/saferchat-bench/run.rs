//! One run: a fresh node, the room micro-benchmark, one room of M joined
//! members, then the load phases in order (rate, sat, half).

use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap};
use std::rc::Rc;
use std::sync::Arc;
use std::time::Instant;

use anyhow::Context as _;
use saferchat_client::admin::Admin;
use saferchat_client::{Identity, JoinOptions, Session};
use saferchat_consensus::{Handle, RoomId};
use serde::Serialize;

use crate::load::{self, Engine, Load, PhasePlan, PhaseResult, SealReport, Verifier};
use crate::stats::median;

/// Most room create/add cycles.
pub const ROOM_CYCLES_MAX: usize = 1000;

/// What a run does.
#[derive(Clone, Debug, Serialize)]
pub struct RunPlan {
    /// Members of the room (M).
    pub members: usize,
    /// Senders (S), the first S members.
    pub senders: usize,
    /// Plaintext bytes per message.
    pub body_bytes: usize,
    /// Pre-sealed envelopes per sender.
    pub pool: usize,
    /// Phases in order: any of rooms, rate, sat, half.
    pub phases: Vec<String>,
    /// (d): create/add cycles.
    pub room_cycles: usize,
    /// Fixed-rate phase: messages/s in total.
    pub rate_msgs_per_s: f64,
    /// Closed loop: posts in flight per sender.
    pub window: u64,
    /// Fixed-rate and half phases: warm-up, s.
    pub rate_warmup_s: f64,
    /// Fixed-rate and half phases: measured, s.
    pub rate_duration_s: f64,
    /// Saturation: warm-up, s.
    pub sat_warmup_s: f64,
    /// Saturation: measured, s.
    pub sat_duration_s: f64,
    /// After each window, s.
    pub drain_s: f64,
    /// Longest wait for stragglers after the drain, s.
    pub drain_max_s: f64,
}

/// (d): rooms and members.
#[derive(Clone, Debug, Default, Serialize)]
pub struct RoomsResult {
    /// AddChat CREATE round trips, ms.
    pub create_ms: Vec<f64>,
    /// AddUser ADD round trips into a fresh room, ms.
    pub add_user_ms: Vec<f64>,
    /// The added member's first join (handshake: challenge, client RSA
    /// signature, key registration through consensus, joined), ms.
    pub first_join_ms: Vec<f64>,
    /// The same member joining again (key already registered: challenge,
    /// client RSA signature, joined), ms.
    pub rejoin_ms: Vec<f64>,
    /// Where the time of a join goes: one hand-driven join per cycle
    /// (key already registered).
    pub join_steps: Vec<crate::handshake::JoinSteps>,
    /// Median of `create_ms`.
    pub create_ms_median: Option<f64>,
    /// Median of `add_user_ms`.
    pub add_user_ms_median: Option<f64>,
    /// Median of `first_join_ms`.
    pub first_join_ms_median: Option<f64>,
    /// Median of `rejoin_ms`.
    pub rejoin_ms_median: Option<f64>,
    /// The client's RSA-PSS signature alone (part of every join), ms.
    pub client_sign_ms_median: Option<f64>,
    /// Filling the benchmark room: AddUser of member i, ms.
    pub fill_add_user_ms: Vec<f64>,
    /// Filling the benchmark room: first join of member i, ms.
    pub fill_join_ms: Vec<f64>,
    /// Median of the last 10% of `fill_join_ms` (joining an almost full
    /// room).
    pub fill_last10pct_join_ms_median: Option<f64>,
}

/// Setup costs.
#[derive(Clone, Debug, Default, Serialize)]
pub struct SetupResult {
    /// Filling the room (adds and joins), s.
    pub fill_s: f64,
    /// Sealing the envelope pools.
    pub seal: Option<SealReport>,
}

/// Everything one run measured.
#[derive(Clone, Debug, Serialize)]
pub struct RunResult {
    /// Repetition number.
    pub rep: usize,
    /// The plan.
    pub plan: RunPlan,
    /// Setup.
    pub setup: SetupResult,
    /// (d).
    pub rooms: RoomsResult,
    /// Load phases by name.
    pub phases: BTreeMap<String, PhaseResult>,
    /// Membership frames received during the run (one per key
    /// registration while filling the room).
    pub membership_frames: u64,
    /// Deliveries whose nonce was not from the pool (must be 0).
    pub unknown_deliveries: u64,
    /// Server utime+stime over the run, s.
    pub server_cpu_total_s: f64,
    /// Server VmHWM at the end, MiB.
    pub server_vmhwm_mb: f64,
    /// Server VmRSS at the end, MiB.
    pub server_rss_end_mb: f64,
}

fn ms_since(t: Instant) -> f64 {
    t.elapsed().as_secs_f64() * 1e3
}

async fn first_join(address: &str, room: &RoomId, me: &Arc<Identity>) -> anyhow::Result<Session> {
    let options = JoinOptions {
        no_history: true,
        ..JoinOptions::default()
    };
    Ok(Session::join(address, room, Arc::clone(me), &options).await?)
}

/// (d): `cycles` times, create a fresh room, add member b, b joins.
async fn rooms_micro(
    address: &str,
    admin: &mut Admin,
    a: &Arc<Identity>,
    b: &Arc<Identity>,
    cycles: usize,
    prefix: &str,
) -> anyhow::Result<RoomsResult> {
    let mut r = RoomsResult::default();
    for k in 0..cycles.min(ROOM_CYCLES_MAX) {
        let name = format!("{prefix}{k}");
        let room = RoomId::new(&name)?;
        let t = Instant::now();
        admin.create_chat(&name).await?;
        r.create_ms.push(ms_since(t));
        admin.add_user(&name, &a.handle().to_string(), None).await?;
        let t = Instant::now();
        admin.add_user(&name, &b.handle().to_string(), None).await?;
        r.add_user_ms.push(ms_since(t));
        let t = Instant::now();
        let session = first_join(address, &room, b).await?;
        r.first_join_ms.push(ms_since(t));
        drop(session);
        let t = Instant::now();
        let session = first_join(address, &room, b).await?;
        r.rejoin_ms.push(ms_since(t));
        drop(session);
        r.join_steps
            .push(crate::handshake::timed_join(address, &room, b).await?);
    }
    let mut sign = Vec::new();
    for _ in 0..5 {
        let t = Instant::now();
        b.sign(b"saferchat-bench signature timing")?;
        sign.push(ms_since(t));
    }
    r.create_ms_median = median(&r.create_ms);
    r.add_user_ms_median = median(&r.add_user_ms);
    r.first_join_ms_median = median(&r.first_join_ms);
    r.rejoin_ms_median = median(&r.rejoin_ms);
    let step = |f: fn(&crate::handshake::JoinSteps) -> f64| {
        median(&r.join_steps.iter().map(f).collect::<Vec<_>>()).unwrap_or(f64::NAN)
    };
    eprintln!(
        "  join steps (medians): connect {:.2} ms, join→challenge {:.2} ms, sign {:.2} ms, proof→joined {:.2} ms",
        step(|s| s.connect_ms),
        step(|s| s.challenge_ms),
        step(|s| s.sign_ms),
        step(|s| s.joined_ms)
    );
    r.client_sign_ms_median = median(&sign);
    Ok(r)
}

/// Runs everything in `plan` against the node at `address`.
///
/// # Errors
/// When setting up the room fails; phase problems are recorded in the
/// result instead.
#[allow(clippy::too_many_arguments)]
pub async fn run(
    address: &str,
    admin_token: &str,
    server_pid: &str,
    ticks_per_s: f64,
    users: &[Arc<Identity>],
    plan: RunPlan,
    rep: usize,
) -> anyhow::Result<RunResult> {
    let m = plan.members;
    anyhow::ensure!(m >= 2 && users.len() >= m + 2, "need M ≥ 2 and M + 2 users");
    anyhow::ensure!((1..=m).contains(&plan.senders), "need 1 ≤ S ≤ M");
    let cpu_start = crate::procfs::process_cpu_s(server_pid, ticks_per_s).unwrap_or(0.0);
    let mut admin = Admin::connect(address, admin_token)
        .await
        .context("connecting the admin client")?;
    let mut rooms = RoomsResult::default();
    if plan.phases.iter().any(|p| p == "rooms") {
        rooms = rooms_micro(
            address,
            &mut admin,
            &users[m],
            &users[m + 1],
            plan.room_cycles,
            &format!("mk{m}r{rep}x"),
        )
        .await
        .context("(d) room create/add cycles")?;
        eprintln!(
            "  rooms: create {:.2} ms, add member {:.2} ms, first join {:.2} ms, join again {:.2} ms (client signature {:.2} ms)",
            rooms.create_ms_median.unwrap_or(f64::NAN),
            rooms.add_user_ms_median.unwrap_or(f64::NAN),
            rooms.first_join_ms_median.unwrap_or(f64::NAN),
            rooms.rejoin_ms_median.unwrap_or(f64::NAN),
            rooms.client_sign_ms_median.unwrap_or(f64::NAN)
        );
    }

    // The benchmark room: every member added, then joined one by one.
    let room = RoomId::new(&format!("bench{m}r{rep}"))?;
    let fill_started = Instant::now();
    admin.create_chat(room.as_str()).await?;
    for user in &users[..m] {
        let t = Instant::now();
        admin
            .add_user(room.as_str(), &user.handle().to_string(), None)
            .await?;
        rooms.fill_add_user_ms.push(ms_since(t));
    }
    let mut sessions = Vec::with_capacity(m);
    for user in &users[..m] {
        let t = Instant::now();
        sessions.push(first_join(address, &room, user).await?);
        rooms.fill_join_ms.push(ms_since(t));
    }
    let tail = rooms.fill_join_ms.len().div_ceil(10).max(1);
    rooms.fill_last10pct_join_ms_median =
        median(&rooms.fill_join_ms[rooms.fill_join_ms.len() - tail..]);
    let fill_s = fill_started.elapsed().as_secs_f64();
    // The last member to join saw every key registered.
    let members = sessions.last().expect("M ≥ 2").members().clone();
    anyhow::ensure!(
        members.recipients.len() == m,
        "the room has {} members with keys, expected {m}",
        members.recipients.len()
    );
    let keys: HashMap<Handle, rsa::PublicKey> = members
        .recipients
        .iter()
        .map(|r| (r.handle, r.key.clone()))
        .collect();
    let mut outs = Vec::with_capacity(m);
    let mut streams = Vec::with_capacity(m);
    let mut channels = Vec::with_capacity(m);
    for session in sessions {
        let raw = session.into_raw();
        outs.push(raw.out);
        streams.push(raw.inbound);
        channels.push(raw.channel);
    }
    eprintln!("  room {room}: {m} members joined in {fill_s:.1} s; sealing pools…");

    let (pools, ids, seal) = load::seal_pools(
        users,
        plan.senders,
        &room,
        members.revision,
        &members.recipients,
        plan.pool,
        plan.body_bytes,
    )
    .await?;
    eprintln!(
        "  sealed {} envelopes in {:.1} s ({:.1} ms each)",
        seal.envelopes, seal.seconds, seal.ms_per_envelope
    );
    let engine = Rc::new(RefCell::new(Engine::new(m, outs, pools, ids)));
    let tasks = load::spawn_tasks(&engine, streams);
    // Let the receivers read what queued up while joining and sealing.
    tokio::time::sleep(std::time::Duration::from_millis(1000)).await;

    let verifier = Verifier {
        room: &room,
        users,
        keys: &keys,
    };
    let mut phases: BTreeMap<String, PhaseResult> = BTreeMap::new();
    for (number, name) in plan.phases.iter().enumerate() {
        let (load, warmup_s, duration_s) = match name.as_str() {
            "rooms" => continue,
            "rate" => (
                Load::Rate(plan.rate_msgs_per_s),
                plan.rate_warmup_s,
                plan.rate_duration_s,
            ),
            "sat" => (
                Load::Window(plan.window),
                plan.sat_warmup_s,
                plan.sat_duration_s,
            ),
            "half" => {
                let sat = phases
                    .get("sat")
                    .context("the half phase needs a sat phase before it")?;
                (
                    Load::Rate(0.5 * sat.msgs_per_s),
                    plan.rate_warmup_s,
                    plan.rate_duration_s,
                )
            }
            other => anyhow::bail!("unknown phase {other:?} (rooms, rate, sat, half, idle)"),
        };
        let phase_plan = PhasePlan {
            load,
            warmup_s,
            duration_s,
            drain_s: plan.drain_s,
            drain_max_s: plan.drain_max_s,
        };
        let result = load::run_phase(
            &engine,
            phase_plan,
            number,
            server_pid,
            ticks_per_s,
            &verifier,
        )
        .await;
        eprintln!(
            "  M={m} rep {rep} {name}: {:.0} deliveries/s, p50 {:.2} ms, p99 {:.2} ms, server cpu {:.2} ({:.2} µs/delivery), client cpu {:.2}, other cpu {:.2}, delivered {:.4}, verified {}/{}, late {} (lag max {:.1} ms){}",
            result.deliveries_per_s,
            result.lat_p50_ms.unwrap_or(f64::NAN),
            result.lat_p99_ms.unwrap_or(f64::NAN),
            result.server_cpu_util,
            result.server_cpu_us_per_delivery.unwrap_or(f64::NAN),
            result.client_cpu_util,
            result.other_cpu_cores,
            result.delivered_fraction.unwrap_or(f64::NAN),
            result.verified_samples,
            result.verified_samples + result.verify_failures,
            result.late_posts,
            result.send_lag_max_ms,
            if result.errors.is_empty() {
                String::new()
            } else {
                format!(", errors: {:?}", result.errors)
            }
        );
        phases.insert(name.clone(), result);
    }
    let (membership_frames, unknown_deliveries) = load::oddities(&engine);
    for t in tasks {
        t.abort();
    }
    drop(channels);
    Ok(RunResult {
        rep,
        plan,
        setup: SetupResult {
            fill_s,
            seal: Some(seal),
        },
        rooms,
        phases,
        membership_frames,
        unknown_deliveries,
        server_cpu_total_s: crate::procfs::process_cpu_s(server_pid, ticks_per_s)
            .unwrap_or(f64::NAN)
            - cpu_start,
        server_vmhwm_mb: crate::procfs::hwm_bytes(server_pid).unwrap_or(0) as f64 / 1048576.0,
        server_rss_end_mb: crate::procfs::rss_bytes(server_pid).unwrap_or(0) as f64 / 1048576.0,
    })
}
