//! `saferchat-bench`: a load generator that drives a live saferchat node
//! over gRPC with real envelopes, on the workload the peer chat servers
//! (ejabberd, prosody, Synapse) were measured on, and writes a JSON result
//! per run and a Markdown report.
//!
//! # Layout
//!
//! - `main.rs`: flags, placement (this process re-executes itself under
//!   `taskset`/`chrt`), the loop over M and repetitions, output files;
//! - `run.rs`: one run: fresh node, (d) rooms, one room of M members, the
//!   phases;
//! - `load.rs`: the engine: envelope pools, senders, receivers, one phase;
//! - `idle.rs`: memory per idle joined session;
//! - `saferchat-bench cluster`: many rooms on a cluster of N nodes
//!   (`cluster.rs` starts the node processes, `rooms.rs` is the workload
//!   and its checks, `failover.rs` kills leaders, `cluster_report.rs`
//!   writes the report);
//! - `handshake.rs`: a join timed step by step;
//! - `node.rs`: starting and stopping the node under test;
//! - `users.rs`: cached RSA identities; `report.rs`: the Markdown report;
//! - from the harness library (`saferchat_tests`), shared with the tests
//!   and the other bench binaries: `procfs` (CPU time, memory and machine
//!   facts from `/proc`) and `stats` (percentiles).
//!
//! Everything runs on one thread (a current-thread runtime) pinned to one
//! CPU; the server is pinned to another. Every loop is bounded in count
//! and time, and traffic goes only to the loopback address.

mod cluster;
mod cluster_report;
mod failover;
mod handshake;
mod idle;
mod load;
mod node;
mod report;
mod rooms;
mod run;
mod users;

use std::os::unix::process::CommandExt as _;
use std::path::PathBuf;
use std::process::{Command, ExitCode};

use anyhow::Context as _;
use clap::Parser;
use saferchat_tests::{procfs, stats};

use crate::node::{NodeSpec, Server};

/// Set in the environment of the re-executed, pinned process.
const PINNED_ENV: &str = "SAFERCHAT_BENCH_PINNED";
/// Most repetitions per M.
const REPS_MAX: usize = 20;

#[derive(Debug, Parser)]
#[command(
    name = "saferchat-bench",
    version,
    about = "Load generator for a saferchat node: the peer chat-server workload (one room, M members, S senders), real envelopes",
    args_conflicts_with_subcommands = true
)]
struct Args {
    /// Another workload instead of the single-room one.
    #[command(subcommand)]
    mode: Option<Mode>,
    /// Room sizes M to run, comma separated.
    #[arg(long, value_delimiter = ',', default_value = "10,100")]
    members: Vec<usize>,
    /// Senders S (default min(10, M/2)).
    #[arg(long)]
    senders: Option<usize>,
    /// Repetitions per M (each on a fresh node when this tool starts it).
    #[arg(long, default_value_t = 1)]
    reps: usize,
    /// Number of the first repetition (names of result files).
    #[arg(long, default_value_t = 1)]
    first_rep: usize,
    /// Phases in order: rooms, rate, sat, half (needs sat), idle.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "rooms,rate,sat,half,idle"
    )]
    phases: Vec<String>,
    /// Measure a node that already runs at this address instead of
    /// starting one (needs --server-pid and the admin token).
    #[arg(long, requires = "server_pid")]
    server: Option<String>,
    /// Pid of that node (its CPU time and memory are read from /proc).
    #[arg(long)]
    server_pid: Option<String>,
    /// Admin token of an external node.
    #[arg(long, env = "SAFERCHAT_ADMIN_TOKEN", hide_env_values = true)]
    admin_token: Option<String>,
    /// The node binary to start (default: saferchat-node next to this
    /// binary, i.e. the same build profile).
    #[arg(long)]
    node_bin: Option<PathBuf>,
    /// CPUs for the node (taskset -c).
    #[arg(long, default_value = "0")]
    server_cpus: String,
    /// The CPU this tool pins itself to ("" = no pinning).
    #[arg(long, default_value = "1")]
    client_cpu: String,
    /// Real-time round-robin priority for node and client (chrt -r); 0 =
    /// normal scheduling. Default 10, or 0 when BENCH_RT=0.
    #[arg(long)]
    rt: Option<u32>,
    /// Where cached keys live (PKCS#8 PEM, mode 0600).
    #[arg(long, default_value = "target/bench-keys")]
    keys_dir: PathBuf,
    /// Where result files go.
    #[arg(long, default_value = "target/bench-results")]
    out: PathBuf,
    /// Where node data folders and logs go (deleted after each run).
    #[arg(long, default_value = "target/bench-run")]
    work_dir: PathBuf,
    /// Keep node data folders.
    #[arg(long)]
    keep_data: bool,
    /// Plaintext bytes per message.
    #[arg(long, default_value_t = 200)]
    body_bytes: usize,
    /// Pre-sealed envelopes per sender.
    #[arg(long, default_value_t = 64)]
    pool: usize,
    /// Fixed-rate phase: messages/s in total (default 50/M).
    #[arg(long)]
    rate: Option<f64>,
    /// Saturation: posts in flight per sender.
    #[arg(long, default_value_t = 4)]
    window: u64,
    /// Fixed-rate and half phases: warm-up, s.
    #[arg(long, default_value_t = 2.0)]
    rate_warmup: f64,
    /// Fixed-rate and half phases: measured, s.
    #[arg(long, default_value_t = 30.0)]
    rate_duration: f64,
    /// Saturation: warm-up, s.
    #[arg(long, default_value_t = 3.0)]
    sat_warmup: f64,
    /// Saturation: measured, s.
    #[arg(long, default_value_t = 15.0)]
    sat_duration: f64,
    /// After each window, s.
    #[arg(long, default_value_t = 3.0)]
    drain: f64,
    /// Longest wait for the last deliveries after the drain, s.
    #[arg(long, default_value_t = 30.0)]
    drain_max: f64,
    /// (d): room create/add cycles.
    #[arg(long, default_value_t = 20)]
    room_cycles: usize,
    /// Idle phase: sessions to open.
    #[arg(long, default_value_t = 10_000)]
    idle_sessions: usize,
    /// Idle phase: rooms to spread them over (every cached user is a
    /// member of every room).
    #[arg(long, default_value_t = 10)]
    idle_rooms: usize,
    /// Idle phase: users (members of each room).
    #[arg(long, default_value_t = 100)]
    idle_users: usize,
    /// Idle phase: sessions sharing one connection (1 = a connection each).
    #[arg(long, default_value_t = 1)]
    idle_per_connection: usize,
    /// Idle phase: joins in progress at once.
    #[arg(long, default_value_t = 32)]
    idle_concurrency: usize,
    /// Idle phase: stop opening sessions after this long, s.
    #[arg(long, default_value_t = 600.0)]
    idle_time_max: f64,
    /// Tag in result file names.
    #[arg(long, default_value = "saferchat")]
    tag: String,
}

#[derive(Debug, clap::Subcommand)]
enum Mode {
    /// Many rooms on a cluster: R rooms of M members spread over the
    /// nodes of a fresh 1-node and 3-node cluster (each its own run),
    /// fixed-rate and saturation phases, no-loss checks, then leader
    /// failover trials on a 3-node cluster.
    Cluster(ClusterArgs),
}

#[derive(Debug, clap::Args)]
struct ClusterArgs {
    /// Cluster sizes, in order (1 = a single node without peers).
    #[arg(long, value_delimiter = ',', default_value = "1,3")]
    nodes: Vec<usize>,
    /// Rooms (R).
    #[arg(long, default_value_t = 1000)]
    rooms: usize,
    /// Members per room (M).
    #[arg(long, default_value_t = 10)]
    members: usize,
    /// Senders per room (the first S members of each room).
    #[arg(long, default_value_t = 1)]
    senders_per_room: usize,
    /// Users the members are drawn from (member i of room r is user
    /// (r·M + i) mod U); at most 1000, at least M.
    #[arg(long, default_value_t = 1000)]
    users: usize,
    /// Repetitions (each size once per repetition, interleaved).
    #[arg(long, default_value_t = 1)]
    reps: usize,
    /// Load phases in order: rate, sat ("" = none).
    #[arg(long, value_delimiter = ',', default_value = "rate,sat")]
    phases: Vec<String>,
    /// Fixed-rate phase: messages/s over all rooms (below what 3 nodes
    /// sharing one core saturate at, about 800-1000 here).
    #[arg(long, default_value_t = 400.0)]
    rate: f64,
    /// Saturation: posts in flight per sender.
    #[arg(long, default_value_t = 1)]
    window: u64,
    /// Fixed-rate phase: warm-up, s.
    #[arg(long, default_value_t = 2.0)]
    rate_warmup: f64,
    /// Fixed-rate phase: measured, s.
    #[arg(long, default_value_t = 15.0)]
    rate_duration: f64,
    /// Saturation: warm-up, s.
    #[arg(long, default_value_t = 2.0)]
    sat_warmup: f64,
    /// Saturation: measured, s.
    #[arg(long, default_value_t = 8.0)]
    sat_duration: f64,
    /// After each window, s.
    #[arg(long, default_value_t = 2.0)]
    drain: f64,
    /// Longest wait for the last deliveries after the drain, s.
    #[arg(long, default_value_t = 30.0)]
    drain_max: f64,
    /// Distinct envelopes per room, each posted at most once per run.
    #[arg(long, default_value_t = 150)]
    pool: usize,
    /// Rooms set up at once.
    #[arg(long, default_value_t = 32)]
    setup_concurrency: usize,
    /// Threads sealing envelopes.
    #[arg(long, default_value_t = 2)]
    seal_threads: usize,
    /// Where sealed pools are cached ("" = no cache).
    #[arg(long, default_value = "target/bench-envelopes")]
    seal_cache: PathBuf,
    /// Failover trials on a 3-node cluster (0 = none).
    #[arg(long, default_value_t = 10)]
    failover_trials: usize,
    /// Failover: posts per second of the stream.
    #[arg(long, default_value_t = 50.0)]
    failover_rate: f64,
    /// Failover: posting before the kill, s.
    #[arg(long, default_value_t = 1.0)]
    failover_before: f64,
    /// Failover: posting after the first post the new leader accepted, s.
    #[arg(long, default_value_t = 1.0)]
    failover_after: f64,
    /// Failover: pause between rejoin attempts, ms.
    #[arg(long, default_value_t = 10)]
    failover_retry_ms: u64,
    /// Failover: longest a trial may take after the kill, s.
    #[arg(long, default_value_t = 30.0)]
    failover_time_max: f64,
    /// Failover: longest wait for the restarted node to catch up, s.
    #[arg(long, default_value_t = 30.0)]
    catchup_max: f64,
    /// Plaintext bytes per message.
    #[arg(long, default_value_t = 200)]
    body_bytes: usize,
    /// The node binary (default: saferchat-node next to this binary).
    #[arg(long)]
    node_bin: Option<PathBuf>,
    /// CPUs of every node (taskset -c; "" = not pinned).
    #[arg(long, default_value = "0")]
    server_cpus: String,
    /// The CPU this tool pins itself to ("" = not pinned).
    #[arg(long, default_value = "1")]
    client_cpu: String,
    /// chrt -r priority of the nodes and this tool (0 = normal
    /// scheduling, the default: the machine is shared).
    #[arg(long, default_value_t = 0)]
    rt: u32,
    /// Where cached keys live.
    #[arg(long, default_value = "target/bench-keys")]
    keys_dir: PathBuf,
    /// Where result files go.
    #[arg(long, default_value = "target/bench-results")]
    out: PathBuf,
    /// Where cluster folders go (data deleted after each run, logs kept).
    #[arg(long, default_value = "target/bench-run")]
    work_dir: PathBuf,
    /// Keep the nodes' data folders.
    #[arg(long)]
    keep_data: bool,
    /// RUST_LOG of the nodes in the load runs (the failover cluster logs
    /// at info: the tool reads the new leader's rank from its log).
    #[arg(long, default_value = "warn")]
    node_log: String,
    /// Tag in result file names.
    #[arg(long, default_value = "cluster")]
    tag: String,
}

/// Re-executes this program under `taskset -c CPU [chrt -r PRIO]` once, so
/// the whole process (every thread) runs on the client CPU.
fn pin_self(client_cpu: &str, rt: u32) -> anyhow::Result<()> {
    if client_cpu.is_empty() || std::env::var_os(PINNED_ENV).is_some() {
        return Ok(());
    }
    let exe = std::env::current_exe()?;
    let mut command = Command::new("taskset");
    command.args(["-c", client_cpu]);
    if rt > 0 {
        command.args(["chrt", "-r", &rt.to_string()]);
    }
    command
        .arg(exe)
        .args(std::env::args_os().skip(1))
        .env(PINNED_ENV, "1");
    let err = command.exec();
    Err(anyhow::anyhow!("re-executing under taskset: {err}"))
}

fn now_utc() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

fn quote(arg: &str) -> String {
    if !arg.is_empty()
        && arg
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_=./:,@".contains(c))
    {
        arg.to_owned()
    } else {
        format!("'{}'", arg.replace('\'', r"'\''"))
    }
}

fn random_token() -> String {
    let bytes: [u8; 24] = rand::random();
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn write_json(path: &std::path::Path, value: &impl serde::Serialize) -> anyhow::Result<()> {
    let text = serde_json::to_string_pretty(value)?;
    std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))
}

async fn main_async(args: Args, rt: u32) -> anyhow::Result<()> {
    let started_utc = now_utc();
    let ticks = procfs::clock_ticks_per_s();
    anyhow::ensure!(
        (1..=REPS_MAX).contains(&args.reps),
        "reps must be 1..={REPS_MAX}"
    );
    let repo = std::env::current_dir()?;
    let machine = procfs::machine_facts(&repo);
    let command = std::env::args()
        .map(|a| quote(&a))
        .collect::<Vec<_>>()
        .join(" ");
    std::fs::create_dir_all(&args.out)?;
    let load_phases: Vec<String> = args
        .phases
        .iter()
        .filter(|p| p.as_str() != "idle")
        .cloned()
        .collect();
    let want_idle = args.phases.iter().any(|p| p == "idle");
    let m_max = args.members.iter().copied().max().unwrap_or(0);
    let user_count = (m_max + 2).max(if want_idle { args.idle_users } else { 0 });
    let (users, _) = users::load_or_generate(&args.keys_dir, user_count)?;

    let node_bin = match &args.node_bin {
        Some(p) => p.clone(),
        None => std::env::current_exe()?
            .parent()
            .context("binary folder")?
            .join("saferchat-node"),
    };
    let spec = NodeSpec {
        binary: node_bin,
        cpus: args.server_cpus.clone(),
        rt_priority: rt,
        work_dir: args.work_dir.clone(),
        admin_token: random_token(),
        keep_data: args.keep_data,
    };
    let start_server = |name: &str| -> anyhow::Result<Server> {
        match (&args.server, &args.server_pid) {
            (Some(address), Some(pid)) => Ok(Server::external(
                address.clone(),
                pid.clone(),
                args.admin_token
                    .clone()
                    .context("an external node needs --admin-token or SAFERCHAT_ADMIN_TOKEN")?,
            )),
            _ => Server::start(&spec, name),
        }
    };
    let client_placement = format!(
        "this process on CPUs {} ({}), one thread (tokio current-thread runtime)",
        procfs::cpus_allowed("self"),
        procfs::scheduling(&std::process::id().to_string())
    );
    let mut invocation = report::Invocation {
        tool: format!("saferchat-bench {}", env!("CARGO_PKG_VERSION")),
        started_utc,
        ended_utc: String::new(),
        command,
        machine,
        server_command: String::new(),
        server_placement: String::new(),
        client_placement,
        runs: Vec::new(),
        idle: None,
    };
    let write_report = |inv: &mut report::Invocation| -> anyhow::Result<()> {
        inv.ended_utc = now_utc();
        write_json(&args.out.join(format!("{}-summary.json", args.tag)), inv)?;
        let md = args.out.join(format!("{}-report.md", args.tag));
        std::fs::write(&md, report::markdown(inv))?;
        Ok(())
    };

    if !load_phases.is_empty() {
        for rep in args.first_rep..args.first_rep + args.reps {
            for &m in &args.members {
                let senders = args.senders.unwrap_or_else(|| (m / 2).clamp(1, 10));
                eprintln!("== saferchat M={m} S={senders} rep {rep}");
                let mut server = start_server(&format!("M{m}-rep{rep}"))?;
                invocation.server_command.clone_from(&server.command);
                invocation.server_placement = format!(
                    "pid {} on CPUs {}, {}",
                    server.pid,
                    procfs::cpus_allowed(&server.pid),
                    procfs::scheduling(&server.pid)
                );
                let plan = run::RunPlan {
                    members: m,
                    senders,
                    body_bytes: args.body_bytes,
                    pool: args.pool,
                    phases: load_phases.clone(),
                    room_cycles: args.room_cycles,
                    rate_msgs_per_s: args.rate.unwrap_or(50.0 / m as f64),
                    window: args.window,
                    rate_warmup_s: args.rate_warmup,
                    rate_duration_s: args.rate_duration,
                    sat_warmup_s: args.sat_warmup,
                    sat_duration_s: args.sat_duration,
                    drain_s: args.drain,
                    drain_max_s: args.drain_max,
                };
                let local = tokio::task::LocalSet::new();
                let result = local
                    .run_until(run::run(
                        &server.address,
                        &server.admin_token,
                        &server.pid,
                        ticks,
                        &users,
                        plan,
                        rep,
                    ))
                    .await;
                drop(local);
                server.stop();
                let result = result.with_context(|| format!("run M={m} rep {rep}"))?;
                write_json(
                    &args.out.join(format!("{}-M{m}-rep{rep}.json", args.tag)),
                    &result,
                )?;
                invocation.runs.push(result);
                write_report(&mut invocation)?;
            }
        }
    }
    if want_idle {
        eprintln!(
            "== saferchat idle sessions: {} over {} rooms of {} users",
            args.idle_sessions, args.idle_rooms, args.idle_users
        );
        let mut server = start_server("idle")?;
        if invocation.server_command.is_empty() {
            invocation.server_command.clone_from(&server.command);
        }
        let plan = idle::IdlePlan {
            sessions: args.idle_sessions,
            rooms: args.idle_rooms,
            sessions_per_connection: args.idle_per_connection,
            join_concurrency: args.idle_concurrency,
            time_max_s: args.idle_time_max,
        };
        let local = tokio::task::LocalSet::new();
        let result = local
            .run_until(idle::run(
                &server.address,
                &server.admin_token,
                &server.pid,
                ticks,
                &users[..args.idle_users.min(users.len())],
                plan,
            ))
            .await;
        drop(local);
        server.stop();
        let result = result.context("idle sessions")?;
        eprintln!(
            "  idle: {} sessions, {:.1} KiB each (RSS {:.1} → {:.1} MiB), opened in {:.1} s",
            result.sessions_open,
            result.kib_per_session,
            result.rss_before_mb,
            result.rss_after_mb,
            result.join_s
        );
        write_json(&args.out.join(format!("{}-idle.json", args.tag)), &result)?;
        invocation.idle = Some(result);
    }
    write_report(&mut invocation)?;
    eprintln!(
        "report: {}",
        args.out.join(format!("{}-report.md", args.tag)).display()
    );
    Ok(())
}

/// `saferchat-bench cluster`: the many-rooms runs, then the failover
/// trials, then the report.
async fn cluster_main(args: ClusterArgs) -> anyhow::Result<()> {
    let started_utc = now_utc();
    let ticks = procfs::clock_ticks_per_s();
    anyhow::ensure!(
        (1..=REPS_MAX).contains(&args.reps),
        "reps must be 1..={REPS_MAX}"
    );
    anyhow::ensure!(
        (1..=users::USERS_MAX).contains(&args.users) && args.users >= args.members.max(2),
        "users must be M..={}",
        users::USERS_MAX
    );
    let repo = std::env::current_dir()?;
    let machine = procfs::machine_facts(&repo);
    let command = std::env::args()
        .map(|a| quote(&a))
        .collect::<Vec<_>>()
        .join(" ");
    std::fs::create_dir_all(&args.out)?;
    let (users, _) = users::load_or_generate(&args.keys_dir, args.users)?;
    let node_bin = match &args.node_bin {
        Some(p) => p.clone(),
        None => std::env::current_exe()?
            .parent()
            .context("binary folder")?
            .join("saferchat-node"),
    };
    let phases: Vec<String> = args
        .phases
        .iter()
        .filter(|p| !p.is_empty())
        .cloned()
        .collect();
    let admin_token = random_token();
    let spec = |nodes: usize, metrics: bool, log_level: &str| cluster::ClusterSpec {
        binary: node_bin.clone(),
        nodes,
        cpus: args.server_cpus.clone(),
        rt_priority: args.rt,
        work_dir: args.work_dir.clone(),
        admin_token: admin_token.clone(),
        metrics,
        log_level: log_level.into(),
        keep_data: args.keep_data,
    };
    let seal_cache = (!args.seal_cache.as_os_str().is_empty()).then_some(args.seal_cache.as_path());
    let mut report = cluster_report::ClusterInvocation {
        tool: format!("saferchat-bench {}", env!("CARGO_PKG_VERSION")),
        started_utc,
        ended_utc: String::new(),
        command,
        machine,
        client_placement: format!(
            "this process on CPUs {} ({}), one thread (tokio current-thread runtime) plus sealing and signing threads",
            procfs::cpus_allowed("self"),
            procfs::scheduling(&std::process::id().to_string())
        ),
        loadavg_start: rooms::loadavg_1m(),
        runs: Vec::new(),
        failover: None,
    };
    let write = |r: &mut cluster_report::ClusterInvocation| -> anyhow::Result<()> {
        r.ended_utc = now_utc();
        write_json(&args.out.join(format!("{}-summary.json", args.tag)), r)?;
        std::fs::write(
            args.out.join(format!("{}-report.md", args.tag)),
            cluster_report::markdown(r),
        )?;
        Ok(())
    };
    if !phases.is_empty() {
        for rep in 1..=args.reps {
            for &n in &args.nodes {
                eprintln!(
                    "== cluster N={n}: {} rooms × {} members, rep {rep} (load {:.1})",
                    args.rooms,
                    args.members,
                    rooms::loadavg_1m()
                );
                let cluster = cluster::Cluster::start(
                    &spec(n, false, &args.node_log),
                    &format!("N{n}-rep{rep}"),
                )?;
                let plan = rooms::RoomsPlan {
                    nodes: n,
                    rooms: args.rooms,
                    members: args.members,
                    senders_per_room: args.senders_per_room,
                    body_bytes: args.body_bytes,
                    pool: args.pool,
                    phases: phases.clone(),
                    rate_msgs_per_s: args.rate,
                    window: args.window,
                    rate_warmup_s: args.rate_warmup,
                    rate_duration_s: args.rate_duration,
                    sat_warmup_s: args.sat_warmup,
                    sat_duration_s: args.sat_duration,
                    drain_s: args.drain,
                    drain_max_s: args.drain_max,
                    setup_concurrency: args.setup_concurrency,
                    seal_threads: args.seal_threads,
                };
                let local = tokio::task::LocalSet::new();
                let result = local
                    .run_until(rooms::run(
                        &cluster,
                        &admin_token,
                        ticks,
                        &users,
                        plan,
                        seal_cache,
                        rep,
                    ))
                    .await;
                drop(local);
                drop(cluster);
                let result = result.with_context(|| format!("N={n} rep {rep}"))?;
                write_json(
                    &args.out.join(format!("{}-N{n}-rep{rep}.json", args.tag)),
                    &result,
                )?;
                report.runs.push(result);
                write(&mut report)?;
            }
        }
    }
    if args.failover_trials > 0 {
        eprintln!(
            "== failover: {} trials on 3 nodes (load {:.1})",
            args.failover_trials,
            rooms::loadavg_1m()
        );
        let mut cluster = cluster::Cluster::start(&spec(3, true, "info"), "failover")?;
        let plan = failover::FailoverPlan {
            trials: args.failover_trials,
            rate_per_s: args.failover_rate,
            before_kill_s: args.failover_before,
            after_s: args.failover_after,
            retry_ms: args.failover_retry_ms,
            trial_time_max_s: args.failover_time_max,
            catchup_max_s: args.catchup_max,
        };
        let result = failover::run(&mut cluster, &admin_token, &users, plan).await;
        drop(cluster);
        let result = result.context("failover")?;
        write_json(
            &args.out.join(format!("{}-failover.json", args.tag)),
            &result,
        )?;
        report.failover = Some(result);
    }
    write(&mut report)?;
    eprintln!(
        "report: {}",
        args.out.join(format!("{}-report.md", args.tag)).display()
    );
    Ok(())
}

fn main() -> ExitCode {
    let args = Args::parse();
    let rt = match &args.mode {
        Some(Mode::Cluster(c)) => c.rt,
        None => args.rt.unwrap_or_else(|| {
            if std::env::var("BENCH_RT").as_deref() == Ok("0") {
                0
            } else {
                10
            }
        }),
    };
    let client_cpu = match &args.mode {
        Some(Mode::Cluster(c)) => c.client_cpu.clone(),
        None => args.client_cpu.clone(),
    };
    if let Err(e) = pin_self(&client_cpu, rt) {
        eprintln!("saferchat-bench: {e:#}");
        return ExitCode::FAILURE;
    }
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("saferchat-bench: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let work = async move {
        match args.mode {
            Some(Mode::Cluster(c)) => cluster_main(c).await,
            None => main_async(args, rt).await,
        }
    };
    match runtime.block_on(work) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("saferchat-bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}
