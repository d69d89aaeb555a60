//! `clusterbench`: room membership — the per-room CASPaxos register with
//! quorum leases — measured on three real node processes on loopback, and
//! a Markdown report with the machine facts, the exact command, the
//! workload and the numbers.
//!
//! # What it measures, per network shape
//!
//! Three `saferchat-node` release processes form one replica set; every
//! directed peer link goes through the harness's [`Proxy`], which can hold
//! bytes for a fixed one-way delay between datacenters. Shapes:
//! `loopback` (one datacenter, every node a lease holder), `dc3` (three
//! datacenters of one node each: every node a holder, every quorum spans
//! a delayed link) and `dc21` (nodes 1, 2 in one datacenter, node 3 in
//! another: holders are nodes 1 and 3, a majority is local to node 1).
//!
//! - Change latency and changes/s, client-observed (admin gRPC call to
//!   answer), for: one room, one change in flight, with and without lease
//!   holders; one room with `--room-in-flight` changes in flight through
//!   one node (they batch into rounds); one room changed through all three
//!   nodes at once (competing proposers); creating `--rooms` rooms, then
//!   changing them with `--rooms-in-flight` changes in flight, each room
//!   always through the same node.
//! - Round trips per change, from the nodes' own counters: prepares plus
//!   accepts sent to peers, divided by (replicas − 1) and by the changes
//!   committed. Phase-1 rounds per change are reported separately.
//! - Lease read latency on a holder: `saferchat_membership_read_seconds`
//!   quantiles from the node's metrics after many admin `Members` reads,
//!   plus the client-observed latency of those calls for context; where a
//!   node holds no lease (dc21: n2), the same for its quorum reads.
//! - Write stall when a lease holder dies (first shape only): node 3 takes
//!   a lease, is killed with SIGKILL at a chosen point of its renewal
//!   cycle, the next change through node 1 is timed, and node 3 restarts
//!   for the next trial.
//! - The floor under every change: one durable acceptor write (sled
//!   insert plus flush) on this disk, measured in-process.
//!
//! Alongside: user+system CPU and run-queue wait of the node processes
//! and of this process per phase (from `/proc`), the load average, and
//! the real-time priority processes of the shared machine. The nodes'
//! logs are kept next to the report.
//!
//! Every load loop is bounded in count and time; all traffic goes to
//! 127.0.0.1 (nodes, proxies and metrics endpoints all bind loopback).
//!
//! # Running
//!
//! ```text
//! cargo build --release -p saferchat-node -p saferchat-tests --bin clusterbench
//! target/release/clusterbench --out target/clusterbench/report.md
//! ```

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use clap::Parser;
use saferchat_client::ClientError;
use saferchat_client::admin::Admin;
use saferchat_consensus::{AcceptorState, Ballot, Handle, LeaseConfig, NodeId, RoomId, RoomState};
use saferchat_node::storage::AcceptorStore as _;
use saferchat_node::storage::sled::SledStore;
use saferchat_tests::ADMIN_TOKEN;
use saferchat_tests::cluster::{Cluster, Options};
use saferchat_tests::procfs;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

/// Replicas in every cluster.
const REPLICAS: usize = 3;
/// Longest any single admin call may take before it counts as an error.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest a setup step (a room becoming writable, a lease being taken)
/// may take.
const SETUP_TIMEOUT: Duration = Duration::from_secs(30);
/// Unmeasured changes before a measured phase, to settle the proposer's
/// fast path after setup reads.
const WARMUP_CHANGES: usize = 20;
/// A membership read keeps this node's lease wanted for 30 s
/// (`READ_INTEREST_MS` in the node's driver); a lease-held phase must end
/// well within that.
const LEASE_PHASE_SECONDS_MAX: u64 = 25;
/// Durable acceptor writes timed for the persistence floor.
const PERSISTS: usize = 300;
/// Time for one stall trial's change, at most.
const STALL_CALL_TIMEOUT: Duration = Duration::from_secs(15);

#[derive(Debug, Parser)]
#[command(
    name = "clusterbench",
    about = "Membership benchmark: per-room Paxos with quorum leases on three node processes"
)]
struct Args {
    /// Network shapes, comma separated: loopback, dc3, dc21.
    #[arg(long, value_delimiter = ',', default_value = "loopback,dc3,dc21")]
    shapes: Vec<String>,
    /// One-way delay between datacenters in ms (dc3, dc21).
    #[arg(long, default_value_t = 10)]
    delay_ms: u64,
    /// Lease duration in ms; defaults to the node's default.
    #[arg(long)]
    lease_ms: Option<u64>,
    /// Lease renewal period in ms; defaults to the node's default.
    #[arg(long)]
    renew_ms: Option<u64>,
    /// Seconds per measured phase, at most (at most 25).
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// Changes per measured phase, at most.
    #[arg(long, default_value_t = 20_000)]
    changes_max: usize,
    /// Changes in flight on one room through one node.
    #[arg(long, default_value_t = 16)]
    room_in_flight: usize,
    /// Rooms for the many-rooms phases.
    #[arg(long, default_value_t = 1000)]
    rooms: usize,
    /// Changes in flight across those rooms.
    #[arg(long, default_value_t = 64)]
    rooms_in_flight: usize,
    /// Membership reads per read phase, at most.
    #[arg(long, default_value_t = 20_000)]
    reads_max: usize,
    /// Concurrent readers, each on its own connection.
    #[arg(long, default_value_t = 16)]
    readers: usize,
    /// Lease-holder kill trials (first shape only; 0 to skip).
    #[arg(long, default_value_t = 6)]
    stall_trials: usize,
    /// Where the Markdown report goes; the nodes' logs go next to it, in
    /// `logs/<shape>/`.
    #[arg(long, default_value = "target/clusterbench/report.md")]
    out: PathBuf,
}

// ---------------------------------------------------------------------------
// Where the node binary is.

/// Re-runs this program from cargo's `deps/` folder when it was started
/// from the profile folder.
///
/// The harness ([`saferchat_tests::bin::dir`]) looks for `saferchat-node`
/// in the parent of the running executable's folder: right for test
/// binaries (`target/<profile>/deps/…`), one level too high for a bin,
/// which cargo hard-links into `target/<profile>/` itself. The `deps/`
/// copy is the same file (same inode), so running it changes nothing but
/// that lookup.
fn exec_from_deps() -> anyhow::Result<()> {
    use std::os::unix::fs::MetadataExt as _;
    use std::os::unix::process::CommandExt as _;
    let exe = std::env::current_exe().context("current exe")?;
    let dir = exe.parent().context("exe folder")?;
    if dir.file_name().is_some_and(|n| n == "deps") {
        return Ok(());
    }
    let me = std::fs::metadata(&exe)?;
    let stem = exe
        .file_name()
        .and_then(|n| n.to_str())
        .context("exe name")?
        .to_owned();
    let mut candidates: Vec<(bool, std::time::SystemTime, PathBuf)> = Vec::new();
    for entry in std::fs::read_dir(dir.join("deps")).context("deps folder")? {
        let path = entry?.path();
        let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
            continue;
        };
        if !name.starts_with(&format!("{stem}-")) || name.contains('.') {
            continue;
        }
        let meta = std::fs::metadata(&path)?;
        let same = meta.ino() == me.ino() && meta.dev() == me.dev();
        candidates.push((same, meta.modified()?, path));
    }
    // The same file if cargo hard-linked it, else the newest build.
    candidates.sort();
    let Some((_, _, path)) = candidates.pop() else {
        bail!("no {stem}-<hash> in {}/deps", dir.display());
    };
    let argv0 = std::env::args_os().next().unwrap_or_default();
    let err = std::process::Command::new(path)
        .arg0(argv0)
        .args(std::env::args_os().skip(1))
        .exec();
    Err(err).context("re-running from deps/")
}

// ---------------------------------------------------------------------------
// Machine facts.

fn machine_facts(node_binary: &Path) -> Vec<(String, String)> {
    // Porcelain lines are "XY path"; not trimmed, the status columns matter.
    let dirty = std::process::Command::new("git")
        .args(["status", "--porcelain", "--untracked-files=no"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    let dirty_files: Vec<&str> = dirty
        .lines()
        .filter_map(|l| l.get(3..))
        .map(str::trim)
        .collect();
    let diff_id = procfs::stdout_of(
        "sh",
        &["-c", "git diff HEAD | git hash-object --stdin | cut -c1-12"],
    );
    let head = procfs::stdout_of("git", &["rev-parse", "--short", "HEAD"]);
    let commit = if head.is_empty() || head == "?" {
        "unknown: not run from a git checkout".to_owned()
    } else if dirty_files.is_empty() {
        head
    } else {
        format!(
            "{head} plus uncommitted changes to {} (diff blob {diff_id})",
            dirty_files.join(", ")
        )
    };
    let built = std::fs::metadata(node_binary)
        .and_then(|m| m.modified())
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map_or_else(
            || "?".to_owned(),
            |d| procfs::stdout_of("date", &["-u", "-d", &format!("@{}", d.as_secs())]),
        );
    let mut facts = procfs::common_facts();
    facts.extend([
        (
            "build".into(),
            if cfg!(debug_assertions) {
                "dev profile (not representative: build with --release)".into()
            } else {
                "release profile (node and bench)".into()
            },
        ),
        ("commit".into(), commit),
        (
            "node binary".into(),
            format!("{} (built {built})", node_binary.display()),
        ),
        ("load average at start".into(), procfs::loadavg()),
        (
            "busiest processes at start (%CPU over their lifetime)".into(),
            busiest(),
        ),
        (
            "real-time priority processes at start".into(),
            realtime_processes(),
        ),
    ]);
    facts
}

/// The five busiest other processes, as `ps` sees them: the machine is
/// shared, and they take CPU from the nodes.
fn busiest() -> String {
    procfs::stdout_of("ps", &["-eo", "pcpu=,comm=", "--sort=-pcpu"])
        .lines()
        .take(5)
        .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
        .collect::<Vec<_>>()
        .join("; ")
}

/// User processes running at a real-time priority (they preempt every
/// normal process on their CPU, so they explain outliers), as
/// `name(rtprio)`.
fn realtime_processes() -> String {
    let list: Vec<String> = procfs::stdout_of("ps", &["-eo", "rtprio=,pid=,ppid=,comm="])
        .lines()
        .filter_map(|l| {
            let fields: Vec<&str> = l.split_whitespace().collect();
            let [prio, pid, ppid, name, ..] = fields[..] else {
                return None;
            };
            // Kernel threads (kthreadd, pid 2, and its children) are
            // always there.
            let kernel = pid == "2" || ppid == "2";
            let prio = prio.parse::<u32>().ok()?;
            (!kernel).then(|| format!("{name}({prio})"))
        })
        .collect();
    if list.is_empty() {
        "none".into()
    } else {
        list.join(", ")
    }
}

/// Seconds the threads of a process have spent runnable but waiting for a
/// CPU, from `/proc/<pid>/task/*/schedstat` (second field, ns). Threads
/// that exited are not counted.
fn run_queue_wait_seconds(pid: &str) -> f64 {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return 0.0;
    };
    let mut ns: u64 = 0;
    for task in tasks.flatten() {
        if let Ok(stat) = std::fs::read_to_string(task.path().join("schedstat")) {
            ns += stat
                .split_whitespace()
                .nth(1)
                .and_then(|f| f.parse::<u64>().ok())
                .unwrap_or(0);
        }
    }
    ns as f64 / 1e9
}

/// The pid of the node process whose command line names `data_dir` (the
/// harness does not expose it).
fn pid_of(data_dir: &Path) -> Option<String> {
    let wanted = data_dir.as_os_str().as_encoded_bytes();
    for entry in std::fs::read_dir("/proc").ok()? {
        let Ok(entry) = entry else { continue };
        let name = entry.file_name();
        let Some(pid) = name
            .to_str()
            .filter(|s| s.bytes().all(|b| b.is_ascii_digit()))
        else {
            continue;
        };
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        if cmdline.split(|b| *b == 0).any(|arg| arg == wanted)
            && cmdline
                .split(|b| *b == 0)
                .any(|arg| arg.ends_with(b"saferchat-node"))
        {
            return Some(pid.to_owned());
        }
    }
    None
}

// ---------------------------------------------------------------------------
// Prometheus text.

/// One scrape of a node's `/metrics`.
#[derive(Debug, Default)]
struct Metrics {
    samples: Vec<(String, BTreeMap<String, String>, f64)>,
}

impl Metrics {
    fn parse(text: &str) -> Metrics {
        let mut samples = Vec::new();
        for line in text.lines() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let Some((series, value)) = line.rsplit_once(' ') else {
                continue;
            };
            let Ok(value) = value.parse::<f64>() else {
                continue;
            };
            let (name, labels) = match series.split_once('{') {
                Some((name, rest)) => {
                    let inner = rest.trim_end_matches('}');
                    let labels = inner
                        .split(',')
                        .filter_map(|kv| kv.split_once('='))
                        .map(|(k, v)| (k.trim().to_owned(), v.trim_matches('"').to_owned()))
                        .collect();
                    (name.to_owned(), labels)
                }
                None => (series.to_owned(), BTreeMap::new()),
            };
            samples.push((name, labels, value));
        }
        Metrics { samples }
    }

    /// The sample of `name` with at least `labels`, 0 when absent.
    fn get(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.samples
            .iter()
            .find(|(n, l, _)| {
                n == name
                    && labels
                        .iter()
                        .all(|(k, v)| l.get(*k).map(String::as_str) == Some(*v))
                    && (l.contains_key("quantile") == labels.iter().any(|(k, _)| *k == "quantile"))
            })
            .map_or(0.0, |(_, _, v)| *v)
    }

    /// The cumulative buckets of histogram `name` with at least `labels`,
    /// as (upper bound in seconds, count), in bound order.
    fn buckets(&self, name: &str, labels: &[(&str, &str)]) -> Vec<(f64, f64)> {
        let bucket = format!("{name}_bucket");
        let mut out: Vec<(f64, f64)> = self
            .samples
            .iter()
            .filter(|(n, l, _)| {
                *n == bucket
                    && labels
                        .iter()
                        .all(|(k, v)| l.get(*k).map(String::as_str) == Some(*v))
            })
            .filter_map(|(_, l, v)| {
                let le = l.get("le")?;
                let bound = if le == "+Inf" {
                    f64::INFINITY
                } else {
                    le.parse().ok()?
                };
                Some((bound, *v))
            })
            .collect();
        out.sort_by(|a, b| a.0.total_cmp(&b.0));
        out
    }
}

/// GET `/metrics` over HTTP/1.0 (no chunking; the server closes).
async fn scrape(addr: SocketAddr) -> anyhow::Result<Metrics> {
    let fetch = async {
        let mut stream = tokio::net::TcpStream::connect(addr).await?;
        stream
            .write_all(b"GET /metrics HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
            .await?;
        let mut raw = Vec::new();
        stream.read_to_end(&mut raw).await?;
        anyhow::Ok(raw)
    };
    let raw = tokio::time::timeout(Duration::from_secs(5), fetch)
        .await
        .context("metrics scrape timed out")??;
    let text = String::from_utf8_lossy(&raw);
    let Some((head, body)) = text.split_once("\r\n\r\n") else {
        bail!("malformed metrics response from {addr}");
    };
    if !head.starts_with("HTTP/1.") || !head.contains(" 200 ") {
        bail!(
            "metrics endpoint {addr}: {}",
            head.lines().next().unwrap_or("")
        );
    }
    Ok(Metrics::parse(body))
}

// ---------------------------------------------------------------------------
// The cluster.

/// A network shape.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Shape {
    Loopback,
    Dc3,
    Dc21,
}

impl Shape {
    fn parse(s: &str) -> anyhow::Result<Shape> {
        match s {
            "loopback" => Ok(Shape::Loopback),
            "dc3" => Ok(Shape::Dc3),
            "dc21" => Ok(Shape::Dc21),
            other => bail!("unknown shape {other:?} (loopback, dc3, dc21)"),
        }
    }

    fn datacenters(self) -> Vec<String> {
        let dcs: [&str; REPLICAS] = match self {
            Shape::Loopback => ["dc1", "dc1", "dc1"],
            Shape::Dc3 => ["dc1", "dc2", "dc3"],
            Shape::Dc21 => ["dc1", "dc1", "dc2"],
        };
        dcs.iter().map(|s| (*s).to_owned()).collect()
    }

    fn describe(self, delay_ms: u64) -> String {
        match self {
            Shape::Loopback => "loopback: one datacenter, no added delay".into(),
            Shape::Dc3 => format!("dc3: n1 | n2 | n3, {delay_ms} ms one way between datacenters"),
            Shape::Dc21 => format!("dc21: n1 n2 | n3, {delay_ms} ms one way between datacenters"),
        }
    }
}

/// The harness's [`Cluster`] with each node's metrics endpoint, and an
/// admin client per node.
struct BenchCluster {
    cluster: Cluster,
    admins: Vec<Admin>,
}

impl BenchCluster {
    async fn start(shape: Shape, lease: &LeaseConfig) -> anyhow::Result<BenchCluster> {
        let cluster = Cluster::start(Options {
            datacenters: shape.datacenters(),
            lease_ms: lease.lease_ms,
            renew_ms: lease.renew_every_ms,
            metrics: true,
            ..Options::single_dc(0)
        })
        .await;
        let mut admins = Vec::new();
        for node in &cluster.nodes {
            admins.push(
                Admin::connect(&node.server(), ADMIN_TOKEN)
                    .await
                    .context("admin connect")?,
            );
        }
        Ok(BenchCluster { cluster, admins })
    }

    /// [`BenchCluster::start`], tried up to three times: a port picked
    /// free can still be taken (as the local end of some connection on
    /// this shared machine) before the node binds it, and the harness
    /// then panics; the panic stays inside the spawned task.
    async fn start_retrying(shape: Shape, lease: LeaseConfig) -> anyhow::Result<BenchCluster> {
        const ATTEMPTS: usize = 3;
        for attempt in 1..=ATTEMPTS {
            match tokio::spawn(async move { BenchCluster::start(shape, &lease).await }).await {
                Ok(started) => return started,
                Err(e) if attempt < ATTEMPTS => {
                    eprintln!("  cluster start failed ({e}); retrying");
                }
                Err(e) => bail!("cluster start failed {ATTEMPTS} times: {e}"),
            }
        }
        unreachable!("the loop returns")
    }

    fn admin(&self, i: usize) -> Admin {
        self.admins[i].clone()
    }

    /// The lease holders: every node of a single-datacenter set, else the
    /// lowest id of each datacenter (the node's rule, `config.rs`).
    fn holders(&self) -> Vec<usize> {
        let datacenters = self.cluster.datacenters();
        let mut dcs: Vec<&String> = datacenters.iter().collect();
        dcs.sort();
        dcs.dedup();
        if dcs.len() == 1 {
            return (0..datacenters.len()).collect();
        }
        let mut holders: Vec<usize> = dcs
            .iter()
            .filter_map(|dc| datacenters.iter().position(|d| d == *dc))
            .collect();
        holders.sort_unstable();
        holders
    }

    async fn scrape_all(&self) -> anyhow::Result<Vec<Metrics>> {
        let mut all = Vec::new();
        for addr in &self.cluster.metrics {
            all.push(scrape(*addr).await?);
        }
        Ok(all)
    }

    /// CPU seconds used so far by the node processes, and seconds their
    /// threads waited for a CPU, summed over nodes.
    fn nodes_cpu(&self) -> (f64, f64) {
        self.cluster
            .nodes
            .iter()
            .filter_map(|n| pid_of(&n.data_dir))
            .map(|pid| {
                (
                    procfs::cpu_seconds(&pid).unwrap_or(0.0),
                    run_queue_wait_seconds(&pid),
                )
            })
            .fold((0.0, 0.0), |(c, w), (c1, w1)| (c + c1, w + w1))
    }
}

// ---------------------------------------------------------------------------
// Workloads.

fn user(n: usize) -> String {
    Handle::of_modulus(format!("clusterbench user {n}").as_bytes()).to_string()
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum RoomStep {
    /// The room does not exist yet: create it.
    Create,
    /// The user is not a member: add.
    Add,
    /// The user is a member: remove.
    Remove,
}

/// One (room, user) pair a worker changes, always through one node.
#[derive(Clone)]
struct Target {
    admin: Admin,
    room: String,
    user: String,
    next: RoomStep,
}

/// Latencies and counts of one measured phase.
#[derive(Debug, Default)]
struct Samples {
    latencies_us: Vec<u64>,
    ok: usize,
    errors: BTreeMap<String, usize>,
    seconds: f64,
}

impl Samples {
    fn error_count(&self) -> usize {
        self.errors.values().sum()
    }

    fn errors_text(&self) -> String {
        if self.errors.is_empty() {
            return "0".into();
        }
        self.errors
            .iter()
            .map(|(k, v)| format!("{v} {k}"))
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// Share of calls that took at least `ms`, in percent.
    fn share_at_least_ms(&self, ms: u64) -> f64 {
        let slow = self
            .latencies_us
            .iter()
            .filter(|us| **us >= ms * 1000)
            .count();
        100.0 * slow as f64 / self.latencies_us.len().max(1) as f64
    }

    fn percentile_ms(&mut self, p: f64) -> f64 {
        self.latencies_us.sort_unstable();
        percentile(&self.latencies_us, p) / 1000.0
    }
}

/// The reports' percentile ([`saferchat_tests::stats::percentile`]) as a
/// number, NaN for no values.
fn percentile(sorted: &[u64], p: f64) -> f64 {
    saferchat_tests::stats::percentile(sorted, p).map_or(f64::NAN, |v| v as f64)
}

fn code_of(e: &ClientError) -> String {
    match e {
        ClientError::Status(s) => format!("{:?}", s.code()),
        other => other.to_string(),
    }
}

/// Runs `workers` (each a list of targets it cycles through, one call in
/// flight) until `budget` calls were made in total or `limit` passed.
/// With `one_pass`, each worker visits each of its targets at most once.
/// Returns the samples and the targets with their state.
async fn run_changes(
    workers: Vec<Vec<Target>>,
    budget: usize,
    limit: Duration,
    one_pass: bool,
) -> (Samples, Vec<Vec<Target>>) {
    let tickets = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let deadline = started + limit;
    let tasks: Vec<_> = workers
        .into_iter()
        .map(|targets| {
            let tickets = Arc::clone(&tickets);
            tokio::spawn(worker(targets, tickets, budget, deadline, one_pass))
        })
        .collect();
    let mut samples = Samples::default();
    let mut back = Vec::new();
    for task in tasks {
        let (targets, part) = task.await.expect("worker task");
        samples.latencies_us.extend(part.latencies_us);
        samples.ok += part.ok;
        for (k, v) in part.errors {
            *samples.errors.entry(k).or_default() += v;
        }
        back.push(targets);
    }
    samples.seconds = started.elapsed().as_secs_f64();
    (samples, back)
}

async fn worker(
    mut targets: Vec<Target>,
    tickets: Arc<AtomicUsize>,
    budget: usize,
    deadline: Instant,
    one_pass: bool,
) -> (Vec<Target>, Samples) {
    let mut samples = Samples::default();
    let count = targets.len();
    for i in 0.. {
        if count == 0
            || (one_pass && i >= count)
            || Instant::now() >= deadline
            || tickets.fetch_add(1, Ordering::Relaxed) >= budget
        {
            break;
        }
        let target = &mut targets[i % count];
        let started = Instant::now();
        let step = target.next;
        let call = async {
            match step {
                RoomStep::Create => target.admin.create_chat(&target.room).await.map(|_| ()),
                RoomStep::Add => target
                    .admin
                    .add_user(&target.room, &target.user, None)
                    .await
                    .map(|_| ()),
                RoomStep::Remove => target
                    .admin
                    .remove_user(&target.room, &target.user, None)
                    .await
                    .map(|_| ()),
            }
        };
        let result = tokio::time::timeout(CALL_TIMEOUT, call).await;
        let elapsed = started.elapsed();
        match result {
            Ok(Ok(())) => {
                samples
                    .latencies_us
                    .push(u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX));
                samples.ok += 1;
                target.next = match step {
                    RoomStep::Create | RoomStep::Remove => RoomStep::Add,
                    RoomStep::Add => RoomStep::Remove,
                };
            }
            Ok(Err(e)) => {
                let code = code_of(&e);
                // An earlier call that timed out may have been applied
                // after all: resynchronise on the answers that say so.
                match (step, code.as_str()) {
                    (RoomStep::Create, "AlreadyExists") | (RoomStep::Remove, "NotFound") => {
                        target.next = RoomStep::Add;
                    }
                    _ => {}
                }
                *samples.errors.entry(code).or_default() += 1;
            }
            Err(_) => {
                *samples.errors.entry("client timeout".into()).or_default() += 1;
            }
        }
    }
    (targets, samples)
}

/// Retries `create` + a first add on `room` through node `via` until the
/// cluster answers (peers connect in the background after start).
async fn create_room(cluster: &BenchCluster, via: usize, room: &str) -> anyhow::Result<()> {
    let deadline = Instant::now() + SETUP_TIMEOUT;
    let mut admin = cluster.admin(via);
    loop {
        match tokio::time::timeout(CALL_TIMEOUT, admin.create_chat(room)).await {
            Ok(Ok(_)) => return Ok(()),
            Ok(Err(e)) if code_of(&e) == "AlreadyExists" => return Ok(()),
            Ok(Err(e)) if Instant::now() >= deadline => {
                bail!("creating {room} through n{}: {e}", via + 1)
            }
            Err(_) if Instant::now() >= deadline => bail!("creating {room}: timed out"),
            _ => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

/// Reads `room` on every node in `holders` until each answers from its
/// lease; returns the lease holders node `report` then lists.
async fn take_leases(
    cluster: &BenchCluster,
    room: &str,
    holders: &[usize],
    report: usize,
) -> anyhow::Result<Vec<String>> {
    for &i in holders {
        let deadline = Instant::now() + SETUP_TIMEOUT;
        let mut admin = cluster.admin(i);
        loop {
            let reply = tokio::time::timeout(CALL_TIMEOUT, admin.members(room)).await;
            if let Ok(Ok(r)) = &reply
                && r.read_path == "lease"
            {
                break;
            }
            if Instant::now() >= deadline {
                bail!("n{} never read {room} from a lease: {reply:?}", i + 1);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    let mut admin = cluster.admin(report);
    let reply = tokio::time::timeout(CALL_TIMEOUT, admin.members(room))
        .await
        .context("members timed out")??;
    Ok(reply.lease_holders)
}

/// Unmeasured changes through node `via` on `room`, so that its proposer
/// holds the fast path again after setup reads by other nodes.
async fn warm_up(cluster: &BenchCluster, via: usize, room: &str, user_no: usize) {
    let target = Target {
        admin: cluster.admin(via),
        room: room.to_owned(),
        user: user(user_no),
        next: RoomStep::Add,
    };
    let (_, back) = run_changes(
        vec![vec![target]],
        WARMUP_CHANGES,
        Duration::from_secs(10),
        false,
    )
    .await;
    // Leave the user out of the room, as found.
    if let Some(t) = back.into_iter().flatten().next()
        && t.next == RoomStep::Remove
    {
        let mut admin = t.admin;
        let _ = tokio::time::timeout(CALL_TIMEOUT, admin.remove_user(room, &t.user, None)).await;
    }
}

// ---------------------------------------------------------------------------
// Phase accounting.

/// Counters and CPU at one moment.
struct Snapshot {
    metrics: Vec<Metrics>,
    nodes_cpu: f64,
    nodes_wait: f64,
    bench_cpu: f64,
    bench_wait: f64,
    at: Instant,
    load: String,
}

async fn snapshot(cluster: &BenchCluster) -> anyhow::Result<Snapshot> {
    let (nodes_cpu, nodes_wait) = cluster.nodes_cpu();
    Ok(Snapshot {
        metrics: cluster.scrape_all().await?,
        nodes_cpu,
        nodes_wait,
        bench_cpu: procfs::cpu_seconds("self").unwrap_or(0.0),
        bench_wait: run_queue_wait_seconds("self"),
        at: Instant::now(),
        load: procfs::loadavg(),
    })
}

/// Sum over nodes of `after − before` for one counter.
fn delta(before: &Snapshot, after: &Snapshot, name: &str, labels: &[(&str, &str)]) -> f64 {
    before
        .metrics
        .iter()
        .zip(&after.metrics)
        .map(|(b, a)| a.get(name, labels) - b.get(name, labels))
        .sum()
}

/// One row of the change table.
struct ChangeRow {
    shape: String,
    workload: String,
    holders: String,
    in_flight: usize,
    samples: Samples,
    p50_ms: f64,
    p99_ms: f64,
    max_ms: f64,
    node_mean_ms: f64,
    phase1_per_change: f64,
    round_trips: f64,
    nacks: f64,
    /// Peer messages dropped (full queue, broken link), all nodes.
    dropped: f64,
    node_cpu_ms_per_change: f64,
    /// Run-queue wait of node and bench threads per change.
    wait_ms_per_change: f64,
    nodes_cores: f64,
    bench_cores: f64,
    load: String,
}

#[allow(clippy::too_many_arguments)]
async fn change_phase(
    cluster: &BenchCluster,
    shape: &str,
    workload: &str,
    holders: String,
    workers: Vec<Vec<Target>>,
    budget: usize,
    limit: Duration,
    one_pass: bool,
) -> anyhow::Result<(ChangeRow, Vec<Vec<Target>>)> {
    let in_flight = workers.len();
    let before = snapshot(cluster).await?;
    let (mut samples, back) = run_changes(workers, budget, limit, one_pass).await;
    let after = snapshot(cluster).await?;
    let wall = after.at.duration_since(before.at).as_secs_f64();
    let peers = (REPLICAS - 1) as f64;
    let ok = samples.ok.max(1) as f64;
    let sent = |kind: &str| {
        delta(
            &before,
            &after,
            "saferchat_peer_messages_sent_total",
            &[("kind", kind)],
        )
    };
    let (prepares, accepts, nacks) = (sent("prepare"), sent("accept"), sent("nack"));
    let change_sum = delta(
        &before,
        &after,
        "saferchat_membership_change_seconds_sum",
        &[],
    );
    let change_count = delta(
        &before,
        &after,
        "saferchat_membership_change_seconds_count",
        &[],
    );
    let nodes_cpu = after.nodes_cpu - before.nodes_cpu;
    let row = ChangeRow {
        shape: shape.to_owned(),
        workload: workload.to_owned(),
        holders,
        in_flight,
        p50_ms: samples.percentile_ms(50.0),
        p99_ms: samples.percentile_ms(99.0),
        max_ms: samples.percentile_ms(100.0),
        node_mean_ms: if change_count > 0.0 {
            change_sum / change_count * 1000.0
        } else {
            f64::NAN
        },
        phase1_per_change: prepares / peers / ok,
        round_trips: (prepares + accepts) / peers / ok,
        nacks,
        dropped: delta(
            &before,
            &after,
            "saferchat_peer_messages_dropped_total",
            &[],
        ),
        node_cpu_ms_per_change: nodes_cpu / ok * 1000.0,
        wait_ms_per_change: (after.nodes_wait - before.nodes_wait + after.bench_wait
            - before.bench_wait)
            / ok
            * 1000.0,
        nodes_cores: nodes_cpu / wall,
        bench_cores: (after.bench_cpu - before.bench_cpu) / wall,
        load: format!("{} → {}", before.load, after.load),
        samples,
    };
    eprintln!(
        "  {workload}: {} ok, {} errors, {:.0}/s, p50 {:.2} ms, p99 {:.2} ms, {:.3} round trips/change",
        row.samples.ok,
        row.samples.error_count(),
        row.samples.ok as f64 / row.samples.seconds,
        row.p50_ms,
        row.p99_ms,
        row.round_trips
    );
    Ok((row, back))
}

/// Membership reads on one node.
struct ReadRow {
    shape: String,
    node: usize,
    /// The read path measured node-side: "lease" or "quorum".
    path: &'static str,
    readers: usize,
    samples: Samples,
    /// Answers by the read path the node reported.
    paths: BTreeMap<String, usize>,
    client_p50_us: f64,
    client_p99_us: f64,
    client_max_us: f64,
    /// Node-side quantiles (µs) over the phase, as in [`READ_QUANTILES`]:
    /// upper bounds of histogram buckets.
    node_quantiles_us: Vec<Option<f64>>,
    node_mean_us: f64,
    node_count: f64,
    /// Run-queue wait of the read node's threads per read.
    node_wait_us_per_read: f64,
    load: String,
}

const READ_QUANTILES: [f64; 5] = [0.5, 0.9, 0.99, 0.999, 1.0];

/// Quantile `q` of the observations histogram `name` recorded between two
/// scrapes, as the upper bound of the bucket it falls in (seconds); `None`
/// when nothing was recorded or it fell beyond the last finite bound.
fn interval_quantile(
    before: &Metrics,
    after: &Metrics,
    name: &str,
    labels: &[(&str, &str)],
    q: f64,
) -> Option<f64> {
    let earlier = before.buckets(name, labels);
    let counts: Vec<(f64, f64)> = after
        .buckets(name, labels)
        .into_iter()
        .map(|(bound, n)| {
            let was = earlier
                .iter()
                .find(|(b, _)| *b == bound)
                .map_or(0.0, |(_, n)| *n);
            (bound, n - was)
        })
        .collect();
    let total = counts.last()?.1;
    if total <= 0.0 {
        return None;
    }
    counts
        .iter()
        .find(|(_, cumulative)| *cumulative >= q * total)
        .map(|(bound, _)| *bound)
        .filter(|bound| bound.is_finite())
}

/// `readers` clients, each on its own connection with one `Members` call
/// in flight, read `room` on `node` until `budget` reads or `limit`.
/// Separate connections rather than one: each call on a connection waits
/// for the node's delayed reply segment (see the report), so one reader
/// alone would make too few calls to fill the quantiles.
#[allow(clippy::too_many_arguments)]
async fn read_phase(
    cluster: &BenchCluster,
    shape: &str,
    node: usize,
    path: &'static str,
    room: &str,
    readers: usize,
    budget: usize,
    limit: Duration,
) -> anyhow::Result<ReadRow> {
    let mut admins = Vec::new();
    for _ in 0..readers {
        admins.push(Admin::connect(&cluster.cluster.nodes[node].server(), ADMIN_TOKEN).await?);
    }
    let pid = pid_of(&cluster.cluster.nodes[node].data_dir).unwrap_or_default();
    let wait_before = run_queue_wait_seconds(&pid);
    let before = snapshot(cluster).await?;
    let started = Instant::now();
    let deadline = started + limit;
    let tickets = Arc::new(AtomicUsize::new(0));
    let tasks: Vec<_> = admins
        .into_iter()
        .map(|mut admin| {
            let tickets = Arc::clone(&tickets);
            let room = room.to_owned();
            tokio::spawn(async move {
                let mut samples = Samples::default();
                let mut paths: BTreeMap<String, usize> = BTreeMap::new();
                while Instant::now() < deadline && tickets.fetch_add(1, Ordering::Relaxed) < budget
                {
                    let t = Instant::now();
                    match tokio::time::timeout(CALL_TIMEOUT, admin.members(&room)).await {
                        Ok(Ok(reply)) => {
                            samples
                                .latencies_us
                                .push(u64::try_from(t.elapsed().as_micros()).unwrap_or(u64::MAX));
                            samples.ok += 1;
                            *paths.entry(reply.read_path).or_default() += 1;
                        }
                        Ok(Err(e)) => *samples.errors.entry(code_of(&e)).or_default() += 1,
                        Err(_) => *samples.errors.entry("client timeout".into()).or_default() += 1,
                    }
                }
                (samples, paths)
            })
        })
        .collect();
    let mut samples = Samples::default();
    let mut paths: BTreeMap<String, usize> = BTreeMap::new();
    for task in tasks {
        let (part, part_paths) = task.await.expect("reader task");
        samples.latencies_us.extend(part.latencies_us);
        samples.ok += part.ok;
        for (k, v) in part.errors {
            *samples.errors.entry(k).or_default() += v;
        }
        for (k, v) in part_paths {
            *paths.entry(k).or_default() += v;
        }
    }
    samples.seconds = started.elapsed().as_secs_f64();
    let wait_after = run_queue_wait_seconds(&pid);
    let after = snapshot(cluster).await?;
    let name = "saferchat_membership_read_seconds";
    let m = &after.metrics[node];
    let b = &before.metrics[node];
    let labels = [("path", path)];
    let count = m.get(&format!("{name}_count"), &labels) - b.get(&format!("{name}_count"), &labels);
    let sum = m.get(&format!("{name}_sum"), &labels) - b.get(&format!("{name}_sum"), &labels);
    samples.latencies_us.sort_unstable();
    let row = ReadRow {
        shape: shape.to_owned(),
        node,
        path,
        readers,
        paths,
        client_p50_us: percentile(&samples.latencies_us, 50.0),
        client_p99_us: percentile(&samples.latencies_us, 99.0),
        client_max_us: percentile(&samples.latencies_us, 100.0),
        node_quantiles_us: READ_QUANTILES
            .iter()
            .map(|q| interval_quantile(b, m, name, &labels, *q).map(|s| s * 1e6))
            .collect(),
        node_mean_us: if count > 0.0 {
            sum / count * 1e6
        } else {
            f64::NAN
        },
        node_count: count,
        node_wait_us_per_read: (wait_after - wait_before) / samples.ok.max(1) as f64 * 1e6,
        load: format!("{} → {}", before.load, after.load),
        samples,
    };
    eprintln!(
        "  {path} reads on n{}: {} {:?}, client p50 {:.0} µs p99 {:.0} µs, node p50 {:?} p99 {:?} µs",
        node + 1,
        row.samples.ok,
        row.paths,
        row.client_p50_us,
        row.client_p99_us,
        row.node_quantiles_us[0],
        row.node_quantiles_us[2]
    );
    Ok(row)
}

/// One kill of a lease holder.
struct StallTrial {
    offset_ms: u64,
    holders_before: String,
    baseline_ms: f64,
    stall_ms: f64,
    next_ms: f64,
}

/// One add (or remove) through `admin`, in ms.
async fn timed_change(admin: &Admin, room: &str, user: &str, add: bool) -> anyhow::Result<f64> {
    let mut admin = admin.clone();
    let started = Instant::now();
    let call = async {
        if add {
            admin.add_user(room, user, None).await
        } else {
            admin.remove_user(room, user, None).await
        }
    };
    tokio::time::timeout(STALL_CALL_TIMEOUT, call)
        .await
        .context("change timed out")?
        .context("change failed")?;
    Ok(started.elapsed().as_secs_f64() * 1000.0)
}

/// Node 3 takes a lease on a fresh room, is killed `offset_ms` after its
/// lease was confirmed, and the next change through node 1 is timed; then
/// one more change (back to normal?) and node 3 is restarted.
async fn stall_trial(
    cluster: &mut BenchCluster,
    trial: usize,
    offset_ms: u64,
) -> anyhow::Result<StallTrial> {
    const VICTIM: usize = 2;
    const VIA: usize = 0;
    let room = format!("stall-{trial}");
    create_room(cluster, VIA, &room).await?;
    let admin = cluster.admin(VIA);
    // Settle the fast path of node 1 on this room.
    timed_change(&admin, &room, &user(0), true).await?;
    let holders_before = take_leases(cluster, &room, &[VICTIM], VIA).await?;
    if !holders_before.iter().any(|h| h == "n3") {
        bail!("n3 is not listed as a lease holder: {holders_before:?}");
    }
    // n3's reads went through a consensus round of its own, which took
    // n1's fast path; one change restores it, the next is the baseline.
    timed_change(&admin, &room, &user(0), false).await?;
    let baseline_ms = timed_change(&admin, &room, &user(0), true).await?;
    // The renewal cycle started before the confirmation; the offset picks
    // a point in it.
    tokio::time::sleep(Duration::from_millis(offset_ms)).await;
    cluster.cluster.nodes[VICTIM].kill();
    let killed = Instant::now();
    timed_change(&admin, &room, &user(1), true).await?;
    let stall_ms = killed.elapsed().as_secs_f64() * 1000.0;
    let next_ms = timed_change(&admin, &room, &user(1), false).await?;
    // The restarted node binds new ports: the cluster points the proxies
    // in front of it there, and the admin client follows.
    cluster.cluster.restart(VICTIM);
    cluster.admins[VICTIM] = Admin::connect(&cluster.cluster.nodes[VICTIM].server(), ADMIN_TOKEN)
        .await
        .context("admin connect after the restart")?;
    eprintln!(
        "  stall trial {trial}: offset {offset_ms} ms, baseline {baseline_ms:.1} ms, stall {stall_ms:.0} ms, next {next_ms:.1} ms"
    );
    Ok(StallTrial {
        offset_ms,
        holders_before: holders_before.join(","),
        baseline_ms,
        stall_ms,
        next_ms,
    })
}

/// The durable write under every vote: one acceptor state, insert plus
/// flush, through the node's sled store, `PERSISTS` times in a row.
async fn persist_floor() -> anyhow::Result<Samples> {
    let dir = tempfile::tempdir()?;
    let store = SledStore::open(dir.path()).map_err(|e| anyhow::anyhow!("{e}"))?;
    let room = RoomId::new("persist-floor").map_err(|e| anyhow::anyhow!("{e}"))?;
    let mut samples = Samples::default();
    let started = Instant::now();
    for n in 0..PERSISTS {
        let ballot = Ballot {
            epoch: 0,
            round: n as u64 + 1,
            node: NodeId(1),
        };
        let state = AcceptorState {
            promised: ballot,
            accepted: Some((ballot, Arc::new(RoomState::absent()))),
        };
        let t = Instant::now();
        store
            .save_acceptors(&[(room.clone(), state)])
            .await
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        samples
            .latencies_us
            .push(u64::try_from(t.elapsed().as_micros()).unwrap_or(u64::MAX));
        samples.ok += 1;
    }
    samples.seconds = started.elapsed().as_secs_f64();
    store.close().await.map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok(samples)
}

// ---------------------------------------------------------------------------
// One shape.

struct ShapeResult {
    describe: String,
    /// Load and real-time processes when the shape started and ended.
    environment: String,
    changes: Vec<ChangeRow>,
    reads: Vec<ReadRow>,
    stalls: Vec<StallTrial>,
    rooms_created: usize,
}

async fn run_shape(
    shape: Shape,
    args: &Args,
    lease: &LeaseConfig,
    stall_trials: usize,
) -> anyhow::Result<ShapeResult> {
    let name = match shape {
        Shape::Loopback => "loopback",
        Shape::Dc3 => "dc3",
        Shape::Dc21 => "dc21",
    };
    eprintln!("shape {}", shape.describe(args.delay_ms));
    let environment_start = format!(
        "load {} and real-time processes {} at start",
        procfs::loadavg(),
        realtime_processes()
    );
    let mut cluster = BenchCluster::start_retrying(shape, *lease).await?;
    if shape != Shape::Loopback {
        cluster.cluster.delay_between_datacenters(args.delay_ms);
    }
    let holders = cluster.holders();
    let limit = Duration::from_secs(args.seconds);
    let budget = args.changes_max;
    let mut changes = Vec::new();
    let mut reads = Vec::new();

    // One room, sequential, nobody holding a lease on it.
    create_room(&cluster, 0, "cold").await?;
    warm_up(&cluster, 0, "cold", 90).await;
    let one = |room: &str, via: usize, u: usize| Target {
        admin: cluster.admin(via),
        room: room.to_owned(),
        user: user(u),
        next: RoomStep::Add,
    };
    let (row, _) = change_phase(
        &cluster,
        name,
        "1 room, sequential, via n1",
        "none".into(),
        vec![vec![one("cold", 0, 0)]],
        budget,
        limit,
        false,
    )
    .await?;
    changes.push(row);

    // One room, sequential, every holder holding a lease.
    create_room(&cluster, 0, "hot").await?;
    let leased = take_leases(&cluster, "hot", &holders, 0).await?.join(",");
    warm_up(&cluster, 0, "hot", 90).await;
    let (row, _) = change_phase(
        &cluster,
        name,
        "1 room, sequential, via n1",
        leased,
        vec![vec![one("hot", 0, 0)]],
        budget,
        limit,
        false,
    )
    .await?;
    changes.push(row);

    // One room, many in flight through one node (they batch).
    let leased = take_leases(&cluster, "hot", &holders, 0).await?.join(",");
    warm_up(&cluster, 0, "hot", 90).await;
    let workers = (0..args.room_in_flight)
        .map(|k| vec![one("hot", 0, 100 + k)])
        .collect();
    let (row, _) = change_phase(
        &cluster,
        name,
        &format!("1 room, {} in flight, via n1", args.room_in_flight),
        leased,
        workers,
        budget,
        limit,
        false,
    )
    .await?;
    changes.push(row);

    // One room, one change in flight through each node: competing
    // proposers.
    let leased = take_leases(&cluster, "hot", &holders, 0).await?.join(",");
    let workers = (0..REPLICAS)
        .map(|i| vec![one("hot", i, 200 + i)])
        .collect();
    let (row, _) = change_phase(
        &cluster,
        name,
        "1 room, 1 in flight via each of n1,n2,n3",
        leased,
        workers,
        budget,
        limit,
        false,
    )
    .await?;
    changes.push(row);

    // Lease reads on node 1 (a holder in every shape).
    take_leases(&cluster, "hot", &[0], 0).await?;
    reads.push(
        read_phase(
            &cluster,
            name,
            0,
            "lease",
            "hot",
            args.readers,
            args.reads_max,
            limit,
        )
        .await?,
    );
    // A node that holds no lease (dc21: n2) reads through a consensus
    // round; for context.
    if let Some(other) = (0..REPLICAS).find(|i| !holders.contains(i)) {
        reads.push(
            read_phase(
                &cluster,
                name,
                other,
                "quorum",
                "hot",
                args.readers,
                args.reads_max,
                limit,
            )
            .await?,
        );
    }

    // Many rooms: create them (first change of each room: phase 1 too),
    // then change them. Room r is always changed through node r mod 3;
    // worker w owns the rooms r ≡ w (mod in-flight), so a room never has
    // two changes in flight.
    let in_flight = args.rooms_in_flight.min(args.rooms).max(1);
    let mut workers: Vec<Vec<Target>> = vec![Vec::new(); in_flight];
    for r in 0..args.rooms {
        workers[r % in_flight].push(Target {
            admin: cluster.admin(r % REPLICAS),
            room: format!("r{r:05}"),
            user: user(0),
            next: RoomStep::Create,
        });
    }
    let (row, workers) = change_phase(
        &cluster,
        name,
        &format!(
            "create {} rooms, {in_flight} in flight, via all",
            args.rooms
        ),
        "none".into(),
        workers,
        args.rooms,
        Duration::from_secs(120),
        true,
    )
    .await?;
    let rooms_created = row.samples.ok;
    changes.push(row);
    let workers: Vec<Vec<Target>> = workers
        .into_iter()
        .map(|ts| {
            ts.into_iter()
                .filter(|t| t.next != RoomStep::Create)
                .collect()
        })
        .collect();
    let (row, _) = change_phase(
        &cluster,
        name,
        &format!("{rooms_created} rooms, {in_flight} in flight, via all"),
        "none".into(),
        workers,
        budget,
        limit,
        false,
    )
    .await?;
    changes.push(row);

    let mut stalls = Vec::new();
    for trial in 0..stall_trials {
        // Spread the kills evenly over the renewal cycle.
        let offset_ms = lease.renew_every_ms * trial as u64 / stall_trials as u64;
        stalls.push(stall_trial(&mut cluster, trial, offset_ms).await?);
    }
    let logs = args
        .out
        .parent()
        .unwrap_or(Path::new("."))
        .join("logs")
        .join(name);
    std::fs::create_dir_all(&logs)?;
    for (i, node) in cluster.cluster.nodes.iter().enumerate() {
        let _ = std::fs::copy(&node.log, logs.join(format!("n{}.log", i + 1)));
    }
    drop(cluster);
    Ok(ShapeResult {
        environment: format!(
            "{environment_start}; load {} and real-time processes {} at end",
            procfs::loadavg(),
            realtime_processes()
        ),
        describe: shape.describe(args.delay_ms),
        changes,
        reads,
        stalls,
        rooms_created,
    })
}

// ---------------------------------------------------------------------------
// The report.

/// A Markdown table's header and separator rows.
fn table_header(md: &mut String, columns: &[&str]) {
    let _ = writeln!(md, "| {} |", columns.join(" | "));
    let _ = writeln!(md, "|{}", "---|".repeat(columns.len()));
}

fn fmt_opt_us(v: Option<f64>) -> String {
    v.map_or_else(|| "–".into(), |v| format!("{v:.1}"))
}

fn report(
    args: &Args,
    lease: &LeaseConfig,
    facts: &[(String, String)],
    persist: &mut Samples,
    shapes: &[ShapeResult],
    end_load: &str,
) -> String {
    let mut md = String::new();
    let command: Vec<String> = std::env::args().collect();
    let _ = writeln!(md, "#### Run\n");
    let _ = writeln!(md, "Command: `{}`\n", command.join(" "));
    for (k, v) in facts {
        let _ = writeln!(md, "- {k}: {v}");
    }
    let _ = writeln!(md, "- load average at end: {end_load}");
    let _ = writeln!(
        md,
        "- leases (node defaults unless overridden): lease_ms {}, renew_every_ms {}, guard_ms {}, drift {} ppm → promise {} ms, a proposer's longest wait for a silent holder {} ms",
        lease.lease_ms,
        lease.renew_every_ms,
        lease.guard_ms,
        lease.drift.ppm_max,
        lease.promise_ms(),
        lease.wait_ms(lease.promise_ms())
    );
    let _ = writeln!(
        md,
        "- workload: 3 replicas, node processes on loopback, every peer link through a proxy in the bench process; admin gRPC calls (one HTTP/2 connection per node); a change adds or removes one user (a room holds at most {} members, no registered keys, so an accepted value is a few hundred bytes to ~1 KB); phases bounded by {} s and {} changes; many-rooms phases: {} rooms, {} in flight; read phases: {} connections with one `Members` call in flight each, at most {} reads",
        args.room_in_flight + REPLICAS + 2,
        args.seconds,
        args.changes_max,
        args.rooms,
        args.rooms_in_flight,
        args.readers,
        args.reads_max
    );
    persist.latencies_us.sort_unstable();
    let _ = writeln!(
        md,
        "- persistence floor: {} durable acceptor writes (sled insert + flush) in a row: p50 {:.2} ms, p99 {:.2} ms",
        persist.ok,
        percentile(&persist.latencies_us, 50.0) / 1000.0,
        percentile(&persist.latencies_us, 99.0) / 1000.0
    );
    for s in shapes {
        let _ = writeln!(md, "- shape {} — {}", s.describe, s.environment);
    }

    let _ = writeln!(md, "\n#### Membership changes\n");
    let _ = writeln!(
        md,
        "Latency is client-observed (admin call to answer); ≥ 40 ms is the share of calls that took 40 ms or more (see the TCP_NODELAY finding); node mean is `saferchat_membership_change_seconds` (sum/count, proposing nodes); round trips = (prepares + accepts sent to peers, all nodes) / 2 / changes; node CPU is user+system time of the three node processes; run-queue wait is the time their threads and the bench's threads were runnable but had no CPU (`/proc/*/task/*/schedstat`), summed over threads.\n"
    );
    table_header(
        &mut md,
        &[
            "shape",
            "workload",
            "lease holders",
            "in flight",
            "changes",
            "errors",
            "changes/s",
            "p50 ms",
            "p99 ms",
            "max ms",
            "≥ 40 ms",
            "node mean ms",
            "round trips/change",
            "phase-1 rounds/change",
            "nacks",
            "dropped",
            "node CPU ms/change",
            "run-queue wait ms/change",
            "node cores",
            "bench cores",
            "load (start → end)",
        ],
    );
    for s in shapes {
        for r in &s.changes {
            let _ = writeln!(
                md,
                "| {} | {} | {} | {} | {} | {} | {:.0} | {:.2} | {:.2} | {:.1} | {:.1} % | {:.2} | {:.3} | {:.3} | {:.0} | {:.0} | {:.2} | {:.2} | {:.2} | {:.2} | {} |",
                r.shape,
                r.workload,
                r.holders,
                r.in_flight,
                r.samples.ok,
                r.samples.errors_text(),
                r.samples.ok as f64 / r.samples.seconds,
                r.p50_ms,
                r.p99_ms,
                r.max_ms,
                r.samples.share_at_least_ms(40),
                r.node_mean_ms,
                r.round_trips,
                r.phase1_per_change,
                r.nacks,
                r.dropped,
                r.node_cpu_ms_per_change,
                r.wait_ms_per_change,
                r.nodes_cores,
                r.bench_cores,
                r.load
            );
        }
    }

    let _ = writeln!(md, "\n#### Membership reads\n");
    let _ = writeln!(
        md,
        "Node-side: `saferchat_membership_read_seconds{{path=...}}` on the node read (from queuing the command to the membership driver to its answer, no network; quantiles over the phase from the difference of the histogram's cumulative buckets, each given as the upper bound of its bucket — bounds 1, 2, 3, 5, 7.5, 10, 15, 20, 30, 40, 50, 75, 100, 200, 500 µs, then 1, 2, 5, 10, 20, 30, 50, 75, 100, 300 ms, 1 s —; mean from sum/count over the phase). Client-side: admin `Members` over gRPC on loopback, `readers` connections with one call in flight each.\n"
    );
    table_header(
        &mut md,
        &[
            "shape",
            "node",
            "path",
            "readers",
            "reads",
            "answered via",
            "node p50 µs",
            "node p90 µs",
            "node p99 µs",
            "node p99.9 µs",
            "node max µs",
            "node mean µs",
            "node count",
            "node run-queue wait µs/read",
            "client p50 µs",
            "client p99 µs",
            "client max µs",
            "load (start → end)",
        ],
    );
    for s in shapes {
        for r in &s.reads {
            let q = &r.node_quantiles_us;
            let via = r
                .paths
                .iter()
                .map(|(k, v)| format!("{k} {v}"))
                .collect::<Vec<_>>()
                .join(", ");
            let _ = writeln!(
                md,
                "| {} | n{} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {:.1} | {:.0} | {:.1} | {:.0} | {:.0} | {:.0} | {} |",
                r.shape,
                r.node + 1,
                r.path,
                r.readers,
                r.samples.ok,
                via,
                fmt_opt_us(q[0]),
                fmt_opt_us(q[1]),
                fmt_opt_us(q[2]),
                fmt_opt_us(q[3]),
                fmt_opt_us(q[4]),
                r.node_mean_us,
                r.node_count,
                r.node_wait_us_per_read,
                r.client_p50_us,
                r.client_p99_us,
                r.client_max_us,
                r.load
            );
        }
    }

    let stalls: Vec<(&ShapeResult, &StallTrial)> = shapes
        .iter()
        .flat_map(|s| s.stalls.iter().map(move |t| (s, t)))
        .collect();
    if !stalls.is_empty() {
        let _ = writeln!(md, "\n#### Write stall when a lease holder dies\n");
        let _ = writeln!(
            md,
            "n3 reads a fresh room until it answers from its lease; a change through n1 (baseline, n3 alive); after the offset, SIGKILL n3; the next change through n1 is timed from the kill (stall); one more change (next). lease_ms {}, renew every {} ms, promise {} ms, longest wait {} ms.\n",
            lease.lease_ms,
            lease.renew_every_ms,
            lease.promise_ms(),
            lease.wait_ms(lease.promise_ms())
        );
        table_header(
            &mut md,
            &[
                "shape",
                "trial",
                "kill offset after lease confirmed, ms",
                "holders seen by n1",
                "baseline ms",
                "stall ms",
                "stall / lease_ms",
                "next change ms",
            ],
        );
        for (i, (s, t)) in stalls.iter().enumerate() {
            let _ = writeln!(
                md,
                "| {} | {} | {} | {} | {:.1} | {:.0} | {:.2} | {:.1} |",
                s.describe.split(':').next().unwrap_or(""),
                i,
                t.offset_ms,
                t.holders_before,
                t.baseline_ms,
                t.stall_ms,
                t.stall_ms / lease.lease_ms as f64,
                t.next_ms
            );
        }
        let mut st: Vec<u64> = stalls
            .iter()
            .map(|(_, t)| t.stall_ms.round() as u64)
            .collect();
        st.sort_unstable();
        let _ = writeln!(
            md,
            "\nStall over {} trials: min {} ms, median {} ms, max {} ms (lease_ms {}).",
            st.len(),
            st[0],
            percentile(&st, 50.0),
            st[st.len() - 1],
            lease.lease_ms
        );
    }
    let _ = writeln!(
        md,
        "\nRooms created in the many-rooms phase: {}.",
        shapes
            .iter()
            .map(|s| format!(
                "{} {}",
                s.describe.split(':').next().unwrap_or(""),
                s.rooms_created
            ))
            .collect::<Vec<_>>()
            .join(", ")
    );
    md
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    exec_from_deps()?;
    let args = Args::parse();
    if args.seconds == 0 || args.seconds > LEASE_PHASE_SECONDS_MAX {
        bail!("--seconds must be 1..={LEASE_PHASE_SECONDS_MAX} (read interest keeps a lease 30 s)");
    }
    if args.rooms == 0 || args.room_in_flight == 0 || args.rooms_in_flight == 0 {
        bail!("--rooms, --room-in-flight and --rooms-in-flight must be positive");
    }
    let shapes: Vec<Shape> = args
        .shapes
        .iter()
        .map(|s| Shape::parse(s))
        .collect::<anyhow::Result<_>>()?;
    let defaults = LeaseConfig::default();
    let lease = LeaseConfig {
        lease_ms: args.lease_ms.unwrap_or(defaults.lease_ms),
        renew_every_ms: args.renew_ms.unwrap_or(defaults.renew_every_ms),
        ..defaults
    };
    let node_binary = saferchat_tests::bin::path("saferchat-node");
    let facts = machine_facts(&node_binary);
    for (k, v) in &facts {
        eprintln!("{k}: {v}");
    }
    let mut persist = persist_floor().await?;
    let mut results = Vec::new();
    for (i, shape) in shapes.iter().enumerate() {
        let trials = if i == 0 { args.stall_trials } else { 0 };
        results.push(run_shape(*shape, &args, &lease, trials).await?);
    }
    let md = report(
        &args,
        &lease,
        &facts,
        &mut persist,
        &results,
        &procfs::loadavg(),
    );
    if let Some(parent) = args.out.parent() {
        std::fs::create_dir_all(parent)?;
    }
    std::fs::write(&args.out, &md).with_context(|| format!("writing {}", args.out.display()))?;
    println!("{md}");
    eprintln!("report written to {}", args.out.display());
    Ok(())
}
