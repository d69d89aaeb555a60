//! Memory per idle joined session: many sessions that joined and then do
//! nothing, spread over rooms whose members all registered their keys
//! beforehand (so no membership change happens while they are open).

use std::cell::Cell;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use saferchat_client::admin::Admin;
use saferchat_client::connect::connect;
use saferchat_client::{Identity, JoinOptions, Session};
use saferchat_consensus::RoomId;
use serde::Serialize;
use tokio::sync::Semaphore;
use tonic::transport::Channel;

use crate::procfs;

/// Most idle sessions one run may open.
pub const IDLE_SESSIONS_MAX: usize = 50_000;
/// How long the server gets to settle before and after memory is read.
const SETTLE_MS: u64 = 2_000;

/// What to open.
#[derive(Clone, Debug, Serialize)]
pub struct IdlePlan {
    /// Sessions to open.
    pub sessions: usize,
    /// Rooms they are spread over.
    pub rooms: usize,
    /// Sessions sharing one HTTP/2 connection (1: each its own TCP
    /// connection, as separate clients would).
    pub sessions_per_connection: usize,
    /// Joins in progress at once.
    pub join_concurrency: usize,
    /// Give up opening sessions after this long, s.
    pub time_max_s: f64,
}

/// What idle sessions cost the server.
#[derive(Clone, Debug, Serialize)]
pub struct IdleResult {
    /// The plan.
    pub plan: IdlePlan,
    /// Users (each a member of every room).
    pub users: usize,
    /// Seconds to create the rooms, add the members and register every
    /// member's key (one join per member and room).
    pub setup_s: f64,
    /// Sessions opened and joined.
    pub sessions_open: usize,
    /// Joins that failed.
    pub failed_joins: usize,
    /// The first failures.
    pub errors: Vec<String>,
    /// Seconds to open them all.
    pub join_s: f64,
    /// This process's CPU seconds while opening them (mostly the RSA
    /// signature of each join).
    pub client_join_cpu_s: f64,
    /// Server CPU seconds while opening them.
    pub server_join_cpu_s: f64,
    /// Server VmRSS before opening, MiB.
    pub rss_before_mb: f64,
    /// Server VmRSS with every session open and idle, MiB.
    pub rss_after_mb: f64,
    /// Server VmRSS after closing them again, MiB.
    pub rss_after_close_mb: f64,
    /// Server VmHWM at the end, MiB.
    pub vmhwm_mb: f64,
    /// (after − before) / sessions, KiB.
    pub kib_per_session: f64,
    /// Frames received on idle sessions after joining (the membership a
    /// node sends a new session, later membership changes). Every key is
    /// registered before the sessions open, so no change happens during
    /// the measurement.
    pub frames_after_join: u64,
}

/// Opens a session on `channel` (or a new connection) and keeps reading it
/// so that nothing piles up on the server.
async fn open_one(
    address: &str,
    channel: Option<Channel>,
    room: &RoomId,
    me: Arc<Identity>,
    frames: Rc<Cell<u64>>,
) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    let options = JoinOptions {
        no_history: true,
        ..JoinOptions::default()
    };
    let session = match channel {
        Some(c) => Session::join_on(c, address, room, me, &options).await?,
        None => Session::join(address, room, me, &options).await?,
    };
    let mut raw = session.into_raw();
    Ok(tokio::task::spawn_local(async move {
        let _keep = (raw.out, raw.channel);
        while let Ok(Some(_)) = raw.inbound.message().await {
            frames.set(frames.get() + 1);
        }
    }))
}

/// Runs the idle-session measurement against a fresh node.
///
/// # Errors
/// When the rooms cannot be set up.
pub async fn run(
    address: &str,
    admin_token: &str,
    server_pid: &str,
    ticks_per_s: f64,
    users: &[Arc<Identity>],
    plan: IdlePlan,
) -> anyhow::Result<IdleResult> {
    anyhow::ensure!(
        (1..=IDLE_SESSIONS_MAX).contains(&plan.sessions),
        "idle sessions must be 1..={IDLE_SESSIONS_MAX}"
    );
    anyhow::ensure!(plan.rooms >= 1 && plan.sessions_per_connection >= 1);
    let setup_started = Instant::now();
    let mut admin = Admin::connect(address, admin_token).await?;
    let rooms: Vec<RoomId> = (0..plan.rooms)
        .map(|r| RoomId::new(&format!("idle{r}")))
        .collect::<Result<_, _>>()?;
    for room in &rooms {
        admin.create_chat(room.as_str()).await?;
        for user in users {
            admin
                .add_user(room.as_str(), &user.handle().to_string(), None)
                .await?;
        }
        // Register every member's key now (first join), so that no
        // membership change reaches the idle sessions later.
        for user in users {
            let options = JoinOptions {
                no_history: true,
                ..JoinOptions::default()
            };
            drop(Session::join(address, room, Arc::clone(user), &options).await?);
        }
    }
    let setup_s = setup_started.elapsed().as_secs_f64();
    tokio::time::sleep(Duration::from_millis(SETTLE_MS)).await;
    let rss_before = procfs::rss_bytes(server_pid).unwrap_or(0);
    let before = procfs::snapshot(server_pid, ticks_per_s);

    let frames = Rc::new(Cell::new(0u64));
    let gate = Arc::new(Semaphore::new(plan.join_concurrency.max(1)));
    let deadline = Instant::now() + Duration::from_secs_f64(plan.time_max_s);
    let mut joins = Vec::with_capacity(plan.sessions);
    let mut channel: Option<Channel> = None;
    for n in 0..plan.sessions {
        let room = rooms[n % rooms.len()].clone();
        let user = Arc::clone(&users[(n / rooms.len()) % users.len()]);
        let shared = if plan.sessions_per_connection > 1 {
            if n % plan.sessions_per_connection == 0 || channel.is_none() {
                channel = Some(connect(address).await?);
            }
            channel.clone()
        } else {
            None
        };
        let permit = Arc::clone(&gate).acquire_owned().await?;
        if Instant::now() > deadline {
            break;
        }
        let frames = Rc::clone(&frames);
        let address = address.to_owned();
        joins.push(tokio::task::spawn_local(async move {
            let opened = open_one(&address, shared, &room, user, frames).await;
            drop(permit);
            opened
        }));
    }
    let mut readers = Vec::with_capacity(joins.len());
    let mut errors = Vec::new();
    let mut failed = 0;
    for j in joins {
        match j.await {
            Ok(Ok(reader)) => readers.push(reader),
            Ok(Err(e)) => {
                failed += 1;
                if errors.len() < 5 {
                    errors.push(e.to_string());
                }
            }
            Err(e) => {
                failed += 1;
                if errors.len() < 5 {
                    errors.push(e.to_string());
                }
            }
        }
    }
    let after_joins = procfs::snapshot(server_pid, ticks_per_s);
    let join_s = (after_joins.at - before.at).as_secs_f64();
    let frames_at_join = frames.get();
    tokio::time::sleep(Duration::from_millis(SETTLE_MS)).await;
    let rss_after = procfs::rss_bytes(server_pid).unwrap_or(0);
    let sessions_open = readers.len();
    for r in &readers {
        r.abort();
    }
    drop(readers);
    tokio::time::sleep(Duration::from_millis(SETTLE_MS)).await;
    let rss_after_close = procfs::rss_bytes(server_pid).unwrap_or(0);
    let mib = |b: u64| b as f64 / 1048576.0;
    Ok(IdleResult {
        users: users.len(),
        setup_s,
        sessions_open,
        failed_joins: failed,
        errors,
        join_s,
        client_join_cpu_s: after_joins.client_cpu_s - before.client_cpu_s,
        server_join_cpu_s: after_joins.server_cpu_s - before.server_cpu_s,
        rss_before_mb: mib(rss_before),
        rss_after_mb: mib(rss_after),
        rss_after_close_mb: mib(rss_after_close),
        vmhwm_mb: mib(procfs::hwm_bytes(server_pid).unwrap_or(0)),
        kib_per_session: if sessions_open > 0 {
            (rss_after as f64 - rss_before as f64) / 1024.0 / sessions_open as f64
        } else {
            0.0
        },
        frames_after_join: frames.get().max(frames_at_join),
        plan,
    })
}
