//! `storebench`: the timeline stores (sled, Cassandra) measured on this
//! machine with the writes a room actor makes and the read a join makes,
//! and a Markdown report with the machine facts, the exact command and the
//! numbers.
//!
//! # Workload
//!
//! - Envelopes are real: a 200-byte body sealed with envelope v1 by the
//!   client crate for M members (fixture keys; past 16 members the keys
//!   repeat under distinct handles, which changes no size), a small pool
//!   per M reused for every message — a store sees only bytes.
//! - Appends: `writers` concurrent rooms, each a loop of
//!   `ChatStore::append` with `batch` messages and fresh UUIDv7 ids, one
//!   append in flight per room, exactly as a room actor does (it writes
//!   the posts queued since its last write, acks them when `append`
//!   returns, then writes the next batch). Latency is one `append` call;
//!   throughput is messages per second over all rooms.
//! - History: the last 50 messages of a room (`storage::history`, newest
//!   first), read one at a time on an idle store.
//! - CPU: user+system time of this process (sled runs in it) and of the
//!   Cassandra JVM (pid from its pid file) from `/proc`, as cores used
//!   during each cell and as a share of all cores.
//!
//! Every loop is bounded in time and count; traffic goes only to the
//! Cassandra address given (loopback in the examples).

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use bytes::Bytes;
use clap::Parser;
use saferchat_client::crypto::{Recipient, seal};
use saferchat_client::test_keys;
use saferchat_consensus::{Handle, Revision, RoomId};
use saferchat_node::message_id::IdGenerator;
use saferchat_node::storage::cassandra::CassandraStore;
use saferchat_node::storage::sled::SledStore;
use saferchat_node::storage::{ChatStore, Range, StoredMessage, history};
use saferchat_tests::procfs;

/// Envelopes sealed per room size (reused round robin).
const POOL: usize = 8;
/// Appends one room makes in one cell, at most.
const APPENDS_PER_WRITER_MAX: usize = 200_000;
/// Messages a history read asks for.
const HISTORY_LIMIT: usize = 50;

#[derive(Debug, Parser)]
#[command(
    name = "storebench",
    about = "Timeline store benchmark: sled vs Cassandra, append and history latency"
)]
struct Args {
    /// Stores to measure, comma separated: sled, cassandra.
    #[arg(long, value_delimiter = ',', default_value = "sled,cassandra")]
    stores: Vec<String>,
    /// Cassandra `host:port`.
    #[arg(long, env = "SAFERCHAT_CASSANDRA", default_value = "127.0.0.1:9042")]
    cassandra: String,
    /// Cassandra's local datacenter.
    #[arg(long, default_value = "datacenter1")]
    datacenter: String,
    /// The Cassandra node folder (`CASSANDRA_NODE_DIR`), for its pid file.
    #[arg(long)]
    cassandra_node_dir: Option<PathBuf>,
    /// Keyspace (dropped and recreated at start).
    #[arg(long, default_value = "saferchat_storebench")]
    keyspace: String,
    /// Room sizes M (envelopes wrapped for M members).
    #[arg(long, value_delimiter = ',', default_value = "10,100")]
    members: Vec<usize>,
    /// Messages per append.
    #[arg(long, value_delimiter = ',', default_value = "1,32")]
    batch: Vec<usize>,
    /// Concurrent rooms writing.
    #[arg(long, default_value_t = 8)]
    writers: usize,
    /// Seconds per append cell.
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// History reads per room size.
    #[arg(long, default_value_t = 500)]
    history_reads: usize,
    /// Where the Markdown report goes.
    #[arg(long, default_value = "target/storebench/report.md")]
    out: PathBuf,
}

fn machine_facts() -> Vec<(String, String)> {
    let mut facts = procfs::common_facts();
    facts.extend([
        (
            "build".into(),
            if cfg!(debug_assertions) {
                "dev profile (dependencies — sled, scylla, RSA — at opt-level 2, saferchat code unoptimised)".into()
            } else {
                "release profile".into()
            },
        ),
        (
            "commit".into(),
            procfs::stdout_of("git", &["rev-parse", "--short", "HEAD"]),
        ),
        ("load average at start".into(), procfs::loadavg()),
    ]);
    facts
}

/// Real envelopes for a room of `members`.
fn envelopes(room: &RoomId, members: usize) -> anyhow::Result<Vec<Bytes>> {
    let me = test_keys::identity(0);
    let recipients: Vec<Recipient> = (0..members)
        .map(|i| {
            let id = test_keys::identity(i % test_keys::COUNT);
            let handle = if i < test_keys::COUNT {
                id.handle()
            } else {
                Handle::of_modulus(format!("bench member {i}").as_bytes())
            };
            Recipient {
                handle,
                key: id.public_key(),
                der: id.public_der().clone(),
            }
        })
        .collect();
    let body = [b'x'; 200];
    (0..POOL)
        .map(|_| {
            seal(&me, room, Revision(members as u64), &recipients, &body)
                .map(|e| e.encode())
                .map_err(|e| anyhow::anyhow!("sealing: {e}"))
        })
        .collect()
}

/// The reports' percentile ([`saferchat_tests::stats::percentile`]), NaN
/// for no values.
fn percentile(sorted: &[f64], p: f64) -> f64 {
    saferchat_tests::stats::percentile(sorted, p).unwrap_or(f64::NAN)
}

fn now_ms() -> i64 {
    let d = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

struct AppendCell {
    store: String,
    members: usize,
    envelope_bytes: usize,
    batch: usize,
    appends: usize,
    messages: usize,
    seconds: f64,
    p50_ms: f64,
    p99_ms: f64,
    max_ms: f64,
    bench_cores: f64,
    cassandra_cores: Option<f64>,
}

struct HistoryCell {
    store: String,
    members: usize,
    reads: usize,
    p50_ms: f64,
    p99_ms: f64,
    max_ms: f64,
}

struct Cpu {
    cassandra_pid: Option<String>,
}

impl Cpu {
    fn sample(&self) -> (Option<f64>, Option<f64>) {
        (
            procfs::cpu_seconds("self"),
            self.cassandra_pid.as_deref().and_then(procfs::cpu_seconds),
        )
    }
}

#[allow(clippy::too_many_arguments)]
async fn append_cell(
    name: &str,
    store: Arc<dyn ChatStore>,
    rooms: &[RoomId],
    pool: &[Bytes],
    members: usize,
    batch: usize,
    seconds: u64,
    cpu: &Cpu,
) -> anyhow::Result<AppendCell> {
    let (self_before, cass_before) = cpu.sample();
    let started = Instant::now();
    let deadline = started + Duration::from_secs(seconds);
    let mut tasks = Vec::new();
    for (w, room) in rooms.iter().enumerate() {
        let store = Arc::clone(&store);
        let room = room.clone();
        let pool = pool.to_vec();
        tasks.push(tokio::spawn(async move {
            let mut ids = IdGenerator::default();
            let mut latencies_us = Vec::new();
            let mut n = 0usize;
            for _ in 0..APPENDS_PER_WRITER_MAX {
                if Instant::now() >= deadline {
                    break;
                }
                let messages: Vec<StoredMessage> = (0..batch)
                    .map(|i| StoredMessage {
                        room: room.clone(),
                        id: ids.next(now_ms(), (w * 1_000_003 + n + i) as u64),
                        seq: (n + i + 1) as u64,
                        envelope: pool[(n + i) % pool.len()].clone(),
                    })
                    .collect();
                n += batch;
                let t = Instant::now();
                store.append(&messages).await?;
                latencies_us.push(t.elapsed().as_secs_f64() * 1e3);
            }
            Ok::<_, saferchat_node::error::NodeError>(latencies_us)
        }));
    }
    let mut latencies = Vec::new();
    for t in tasks {
        latencies.extend(t.await.context("writer task")?.context("append")?);
    }
    let elapsed = started.elapsed().as_secs_f64();
    let (self_after, cass_after) = cpu.sample();
    latencies.sort_by(f64::total_cmp);
    let appends = latencies.len();
    Ok(AppendCell {
        store: name.to_owned(),
        members,
        envelope_bytes: pool[0].len(),
        batch,
        appends,
        messages: appends * batch,
        seconds: elapsed,
        p50_ms: percentile(&latencies, 50.0),
        p99_ms: percentile(&latencies, 99.0),
        max_ms: latencies.last().copied().unwrap_or(f64::NAN),
        bench_cores: match (self_before, self_after) {
            (Some(a), Some(b)) => (b - a) / elapsed,
            _ => f64::NAN,
        },
        cassandra_cores: match (cass_before, cass_after) {
            (Some(a), Some(b)) => Some((b - a) / elapsed),
            _ => None,
        },
    })
}

async fn history_cell(
    name: &str,
    store: &dyn ChatStore,
    room: &RoomId,
    members: usize,
    reads: usize,
) -> anyhow::Result<HistoryCell> {
    let mut latencies = Vec::with_capacity(reads);
    for _ in 0..reads {
        let t = Instant::now();
        let page = history(store, room, Range::Before(None), HISTORY_LIMIT).await?;
        latencies.push(t.elapsed().as_secs_f64() * 1e3);
        if page.len() != HISTORY_LIMIT {
            bail!("{name}: history returned {} messages", page.len());
        }
    }
    latencies.sort_by(f64::total_cmp);
    Ok(HistoryCell {
        store: name.to_owned(),
        members,
        reads,
        p50_ms: percentile(&latencies, 50.0),
        p99_ms: percentile(&latencies, 99.0),
        max_ms: latencies.last().copied().unwrap_or(f64::NAN),
    })
}

async fn open(name: &str, args: &Args, scratch: &Path) -> anyhow::Result<Arc<dyn ChatStore>> {
    match name {
        "sled" => Ok(Arc::new(SledStore::open(&scratch.join("sled"))?)),
        "cassandra" => {
            let config = saferchat_node::config::CassandraConfig {
                contact_points: vec![args.cassandra.clone()],
                datacenter: args.datacenter.clone(),
                keyspace: args.keyspace.clone(),
                ..saferchat_node::config::CassandraConfig::default()
            };
            // A fresh keyspace: drop the last run's, then migrate.
            let store = CassandraStore::connect(&config).await?;
            store
                .session()
                .query_unpaged(format!("DROP KEYSPACE IF EXISTS {}", args.keyspace), ())
                .await
                .context("dropping the old keyspace")?;
            drop(store);
            Ok(Arc::new(CassandraStore::connect(&config).await?))
        }
        other => bail!("unknown store {other:?}: sled or cassandra"),
    }
}

fn report(
    args: &Args,
    facts: &[(String, String)],
    appends: &[AppendCell],
    histories: &[HistoryCell],
) -> String {
    let mut md = String::new();
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
    let _ = writeln!(md, "### Run\n");
    let command: Vec<String> = std::env::args().collect();
    let _ = writeln!(md, "Command: `{}`\n", command.join(" "));
    for (k, v) in facts {
        let _ = writeln!(md, "- {k}: {v}");
    }
    let _ = writeln!(
        md,
        "- workload: {} rooms appending concurrently, {} s per cell; real envelope v1 bytes (200-byte body sealed for M members); history = last {HISTORY_LIMIT} messages, {} sequential reads on an idle store",
        args.writers, args.seconds, args.history_reads
    );
    let _ = writeln!(md, "- load average at end: {}\n", procfs::loadavg());
    let _ = writeln!(
        md,
        "### Appends (one `append` call = one room-actor batch)\n"
    );
    let _ = writeln!(
        md,
        "| store | M | envelope bytes | batch | appends | messages/s | p50 ms | p99 ms | max ms | bench process CPU (cores) | Cassandra CPU (cores, share of {cores:.0}) |"
    );
    let _ = writeln!(md, "|---|---|---|---|---|---|---|---|---|---|---|");
    for c in appends {
        let cass = c.cassandra_cores.map_or_else(
            || "—".to_owned(),
            |x| format!("{x:.2} ({:.0} %)", 100.0 * x / cores),
        );
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} | {} | {:.0} | {:.2} | {:.2} | {:.1} | {:.2} | {} |",
            c.store,
            c.members,
            c.envelope_bytes,
            c.batch,
            c.appends,
            c.messages as f64 / c.seconds,
            c.p50_ms,
            c.p99_ms,
            c.max_ms,
            c.bench_cores,
            cass
        );
    }
    let _ = writeln!(
        md,
        "\n### History (last {HISTORY_LIMIT} messages of a room)\n"
    );
    let _ = writeln!(md, "| store | M | reads | p50 ms | p99 ms | max ms |");
    let _ = writeln!(md, "|---|---|---|---|---|---|");
    for h in histories {
        let _ = writeln!(
            md,
            "| {} | {} | {} | {:.2} | {:.2} | {:.1} |",
            h.store, h.members, h.reads, h.p50_ms, h.p99_ms, h.max_ms
        );
    }
    md
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    anyhow::ensure!(
        args.writers > 0 && args.writers <= 256,
        "--writers must be 1..=256"
    );
    anyhow::ensure!(
        args.seconds > 0 && args.seconds <= 600,
        "--seconds must be 1..=600"
    );
    anyhow::ensure!(
        args.batch.iter().all(|b| (1..=512).contains(b)),
        "--batch values must be 1..=512 (the room actor's batch limit)"
    );
    let facts = machine_facts();
    let cassandra_pid = args
        .cassandra_node_dir
        .as_ref()
        .and_then(|d| std::fs::read_to_string(d.join("cassandra.pid")).ok())
        .map(|s| s.trim().to_owned());
    if args.stores.iter().any(|s| s == "cassandra") && cassandra_pid.is_none() {
        eprintln!(
            "storebench: no --cassandra-node-dir with a pid file: Cassandra CPU is not measured"
        );
    }
    let cpu = Cpu { cassandra_pid };
    let scratch = tempfile::tempdir()?;
    let mut appends = Vec::new();
    let mut histories = Vec::new();
    for name in &args.stores {
        let store = open(name, &args, scratch.path()).await?;
        for &members in &args.members {
            let sample_room = RoomId::new(&format!("bench-m{members}"))?;
            let pool = envelopes(&sample_room, members)?;
            let mut history_room = None;
            for &batch in &args.batch {
                let rooms: Vec<RoomId> = (0..args.writers)
                    .map(|w| RoomId::new(&format!("bench-{name}-m{members}-b{batch}-w{w}")))
                    .collect::<Result<_, _>>()?;
                eprintln!("storebench: {name} M={members} batch={batch} ...");
                let cell = append_cell(
                    name,
                    Arc::clone(&store),
                    &rooms,
                    &pool,
                    members,
                    batch,
                    args.seconds,
                    &cpu,
                )
                .await?;
                eprintln!(
                    "  {:.0} messages/s, p50 {:.2} ms, p99 {:.2} ms",
                    cell.messages as f64 / cell.seconds,
                    cell.p50_ms,
                    cell.p99_ms
                );
                if cell.appends * batch / args.writers >= HISTORY_LIMIT {
                    history_room = Some(rooms[0].clone());
                }
                appends.push(cell);
            }
            if let Some(room) = history_room {
                let cell = history_cell(name, &*store, &room, members, args.history_reads).await?;
                eprintln!(
                    "  history p50 {:.2} ms, p99 {:.2} ms",
                    cell.p50_ms, cell.p99_ms
                );
                histories.push(cell);
            }
        }
        if name == "sled" {
            // Flush and release sled before the next store runs.
            drop(store);
        }
    }
    let text = report(&args, &facts, &appends, &histories);
    if let Some(dir) = args.out.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(&args.out, &text).with_context(|| format!("writing {}", args.out.display()))?;
    println!("{text}");
    eprintln!("storebench: report in {}", args.out.display());
    Ok(())
}
