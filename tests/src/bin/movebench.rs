//! `movebench`: what moving partitions costs. Three `saferchat-node`
//! processes (the build this binary belongs to: use a release build) hold
//! a room, `big`, filled with N messages; a fourth node joins and
//! `saferchat cluster rebalance` moves about 210 of the 768 replica slots
//! to it, all partitions at once, while a member keeps posting one
//! message at a time in another room, `probe`. Per N (a fresh cluster
//! each), the Markdown report gives:
//!
//! - the time to move `big`'s partition: from the first map command that
//!   names it (its grow) to its last `Establish` (after its shrink), from
//!   the nodes' logs ("partition move step applied", with their
//!   timestamps); and, for comparison, the median and the largest of the
//!   same time over every partition that moved (they hold no messages);
//! - when node 4 has applied as much of `big`'s partition log as any
//!   other node (its `saferchat_partition_applied_slot`, polled every
//!   100 ms), counted from the rebalance call: the map's steps need only a
//!   quorum, so the new replica may still be catching up after them;
//! - the whole rebalance: from the admin call to the map with nothing
//!   moving and every partition established, and the slots moved;
//! - the probe's post latency (post to acknowledgement) before the
//!   rebalance and during it: median, p99, largest, and how many posts;
//!   how many probe posts were refused or left unanswered (8 s, or the
//!   session ended), how many sessions the probe joined, and the longest
//!   it went without an acknowledgement.
//!
//! The room names are chosen so that both rooms' partitions move (the ring
//! is computed here for 3 and 4 nodes). The links between the nodes go
//! through this process's proxies (the test harness's `Cluster`), which
//! therefore spends CPU beside the nodes. Every loop is bounded in count
//! and time; everything binds 127.0.0.1.
//!
//! # Running
//!
//! ```text
//! cargo build --release -p saferchat-node -p saferchat-tests --bin movebench
//! target/release/movebench --messages 0,2000,8000 --out target/movebench/report.md
//! ```

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use clap::Parser;
use saferchat_consensus::{NodeId, RoomId};
use saferchat_placement::{ClusterNode, PartitionCount, PartitionId, Placement};
use saferchat_tests::chaos::history::Outcome;
use saferchat_tests::cluster::{Cluster, Options};
use saferchat_tests::load::{self, Poster};
use saferchat_tests::stats::Latency;
use saferchat_tests::{process, procfs, stats};
use tokio_util::sync::CancellationToken;

/// How long the rebalance may take before the run is given up.
const MOVE_MAX_S: u64 = 900;

#[derive(Debug, Parser)]
#[command(
    name = "movebench",
    about = "Time to move partitions as a function of a partition's timeline, and chat latency during the move"
)]
struct Args {
    /// Messages in the big room before the move, one run each.
    #[arg(long, value_delimiter = ',', default_value = "0,2000,8000")]
    messages: Vec<usize>,
    /// Bytes of each message's text.
    #[arg(long, default_value_t = 1024)]
    body_bytes: usize,
    /// Seconds of probe posts before the rebalance.
    #[arg(long, default_value_t = 20)]
    baseline_s: u64,
    /// Milliseconds between one probe post's answer and the next.
    #[arg(long, default_value_t = 50)]
    probe_gap_ms: u64,
    /// Where the Markdown report goes (the nodes' logs beside it).
    #[arg(long, default_value = "target/movebench/report.md")]
    out: PathBuf,
}

/// One run's figures.
#[derive(Debug)]
struct Row {
    messages: usize,
    fill_s: f64,
    big_partition: u32,
    big_move_s: Option<f64>,
    caught_up_s: Option<f64>,
    moved_partitions: usize,
    median_move_s: f64,
    max_move_s: f64,
    rebalance_s: f64,
    slots_moved: usize,
    before: Latency,
    during: Latency,
    /// Probe posts of the whole run refused, and left without an answer.
    probe_refused: usize,
    probe_unknown: usize,
    /// Sessions the probe joined, and the longest it went without an
    /// acknowledgement.
    probe_sessions: usize,
    probe_longest_gap: Duration,
}

/// A room name, `{stem}-N` for the smallest N, whose partition's replica
/// set changes when node 4 joins nodes 1–3 (one datacenter, the default
/// partitions and replicas).
fn moving_room(stem: &str, avoid: Option<PartitionId>) -> anyhow::Result<String> {
    let node = |id| ClusterNode {
        id: NodeId(id),
        datacenter: "dc1".into(),
    };
    let replicas = saferchat_placement::ring::REPLICAS_PER_DATACENTER_DEFAULT;
    let three = Placement::build(
        &[node(1), node(2), node(3)],
        PartitionCount::DEFAULT,
        replicas,
    )?;
    let four = Placement::build(
        &[node(1), node(2), node(3), node(4)],
        PartitionCount::DEFAULT,
        replicas,
    )?;
    (0..10_000)
        .map(|i| format!("{stem}-{i}"))
        .find(|name| {
            let p = PartitionCount::DEFAULT.of_room(name);
            Some(p) != avoid && three.replicas(p) != four.replicas(p)
        })
        .context("no room name whose partition moves")
}

/// When the last node (the one that joined) has applied as much of
/// `partition`'s log as any other node, polled every 100 ms from the
/// nodes' `saferchat_partition_applied_slot`; `None` when `expect_posts`
/// is false (an empty log has nothing to catch up) or past
/// [`MOVE_MAX_S`].
async fn caught_up(
    metrics: &[std::net::SocketAddr],
    partition: PartitionId,
    expect_posts: bool,
) -> Option<Instant> {
    if !expect_posts {
        return None;
    }
    let series = format!(
        "saferchat_partition_applied_slot{{partition=\"{}\"}}",
        partition.0
    );
    let deadline = Instant::now() + Duration::from_secs(MOVE_MAX_S);
    let (joined, others) = metrics.split_last()?;
    while Instant::now() < deadline {
        let mut most = 0.0_f64;
        for m in others {
            let v = process::scrape_value(*m, &series).await.unwrap_or(0.0);
            most = most.max(v);
        }
        let have = process::scrape_value(*joined, &series).await.unwrap_or(0.0);
        if most > 0.0 && have >= most {
            return Some(Instant::now());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    None
}

/// Per partition, the seconds from the first applied map command naming
/// it to its last `Establish`, from every node's log.
fn move_times(logs: &[PathBuf]) -> anyhow::Result<BTreeMap<u32, f64>> {
    let mut spans: BTreeMap<u32, (f64, Option<f64>)> = BTreeMap::new();
    for log in logs {
        let text = std::fs::read_to_string(log).with_context(|| format!("{}", log.display()))?;
        for line in text.lines() {
            let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
                continue;
            };
            if v["fields"]["message"] != "partition move step applied" {
                continue;
            }
            let command = v["fields"]["command"].as_str().unwrap_or_default();
            let Some(partition) = command
                .split("partition: ")
                .nth(1)
                .and_then(|rest| rest.split(|c: char| !c.is_ascii_digit()).next())
                .and_then(|digits| digits.parse::<u32>().ok())
            else {
                continue;
            };
            let at = v["timestamp"]
                .as_str()
                .and_then(chrono_seconds)
                .context("a log line without a timestamp")?;
            let span = spans.entry(partition).or_insert((at, None));
            span.0 = span.0.min(at);
            if command.starts_with("Establish") {
                span.1 = Some(span.1.map_or(at, |e: f64| e.max(at)));
            }
        }
    }
    Ok(spans
        .into_iter()
        .filter_map(|(p, (start, end))| Some((p, end? - start)))
        .collect())
}

/// Seconds since the epoch of an RFC 3339 UTC timestamp as the node logs
/// it (`2026-12-05T08:15:43.669246Z`); written here rather than pulling a
/// date crate into the harness for one format.
fn chrono_seconds(t: &str) -> Option<f64> {
    let (date, time) = t.strip_suffix('Z')?.split_once('T')?;
    let mut d = date.split('-').map(|x| x.parse::<i64>().ok());
    let (y, m, day) = (d.next()??, d.next()??, d.next()??);
    let mut hms = time.split(':');
    let (h, min) = (
        hms.next()?.parse::<i64>().ok()?,
        hms.next()?.parse::<i64>().ok()?,
    );
    let s: f64 = hms.next()?.parse().ok()?;
    // Days from civil (Howard Hinnant's algorithm).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    #[allow(clippy::cast_precision_loss)]
    Some((days * 86_400 + h * 3600 + min * 60) as f64 + s)
}

async fn run_one(args: &Args, messages: usize, logs_to: &Path) -> anyhow::Result<Row> {
    let mut cluster = Cluster::start(Options {
        metrics: true,
        ..Options::single_dc(3)
    })
    .await;
    cluster.map_created(0).await;
    let big_name = moving_room("big", None)?;
    let big_partition = PartitionCount::DEFAULT.of_room(&big_name);
    let probe_name = moving_room("probe", Some(big_partition))?;
    let mut admin = cluster.admin(0).await;
    let alice = load::identity(0).handle().to_string();
    for room in [&big_name, &probe_name] {
        admin.create_chat(room).await.context("create")?;
        admin.add_user(room, &alice, None).await.context("add")?;
    }
    let servers: Vec<String> = (0..3).map(|i| cluster.server(i)).collect();
    let big = RoomId::new(&big_name)?;
    let filling = Instant::now();
    if messages > 0 {
        load::fill(
            &servers,
            &big,
            0,
            "fill",
            messages,
            args.body_bytes.saturating_sub(16),
        )
        .await
        .map_err(|e| anyhow::anyhow!("filling the big room: {e}"))?;
    }
    let fill_s = filling.elapsed().as_secs_f64();
    eprintln!("movebench: {messages} messages in {big_name} in {fill_s:.1} s");

    let stop = CancellationToken::new();
    let probe = Poster {
        servers: servers.clone(),
        room: RoomId::new(&probe_name)?,
        member: 0,
        prefix: "probe".into(),
        gap: Duration::from_millis(args.probe_gap_ms),
        until: Instant::now() + Duration::from_secs(args.baseline_s + MOVE_MAX_S + 60),
        stop: stop.clone(),
    };
    let posts = Arc::new(Mutex::new(Vec::new()));
    let probing = tokio::spawn(probe.run(Arc::clone(&posts)));
    // The baseline: the probe posts for this long before anything moves.
    tokio::time::sleep(Duration::from_secs(args.baseline_s)).await;

    let four = cluster.start_joining(4, "dc1", 1).await;
    cluster
        .status_until(four, 60, "the map naming node 4", |s| {
            s.nodes.iter().any(|n| n.id == 4)
        })
        .await;
    let started = Instant::now();
    let rebalanced = cluster
        .admin(0)
        .await
        .rebalance()
        .await
        .context("rebalance")?;
    let (done, caught_up) = tokio::join!(
        cluster.status_until(0, MOVE_MAX_S, "every partition moved", |s| {
            s.epoch > rebalanced.epoch
                && s.moving_partitions == 0
                && s.unestablished_partitions == 0
        }),
        caught_up(&cluster.metrics, big_partition, messages > 0),
    );
    let finished = Instant::now();
    let caught_up_s = caught_up.map(|at| (at - started).as_secs_f64());
    stop.cancel();
    let posted = probing.await.context("the probe")?;
    let window = |from: Instant, to: Instant| {
        Latency::of(
            posted
                .acks
                .iter()
                .filter(|(at, _)| *at >= from && *at < to)
                .map(|(_, d)| d.as_secs_f64() * 1e3)
                .collect(),
        )
    };
    let (probe_refused, probe_unknown) = {
        let posts = posts.lock().expect("lock");
        let count = |f: fn(&Outcome) -> bool| posts.iter().filter(|p| f(&p.outcome)).count();
        (
            count(|o| matches!(o, Outcome::Refused(_))),
            count(|o| *o == Outcome::Unknown),
        )
    };
    let before = window(started - Duration::from_secs(args.baseline_s), started);
    let during = window(started, finished);
    for node in &mut cluster.nodes {
        node.stop();
    }
    std::fs::create_dir_all(logs_to)?;
    let mut logs = Vec::new();
    for (i, node) in cluster.nodes.iter().enumerate() {
        let to = logs_to.join(format!("{messages}-node-{}.log", i + 1));
        std::fs::copy(&node.log, &to)?;
        logs.push(to);
    }
    let times = move_times(&logs)?;
    let mut all: Vec<f64> = times.values().copied().collect();
    all.sort_by(f64::total_cmp);
    // Six map commands per slot: grow, handed over, establish, shrink,
    // handed over, establish.
    let slots_moved = usize::try_from((done.epoch - rebalanced.epoch) / 6)?;
    Ok(Row {
        messages,
        fill_s,
        big_partition: big_partition.0,
        big_move_s: times.get(&big_partition.0).copied(),
        caught_up_s,
        moved_partitions: all.len(),
        median_move_s: stats::percentile(&all, 50.0).unwrap_or(0.0),
        max_move_s: all.last().copied().unwrap_or(0.0),
        rebalance_s: (finished - started).as_secs_f64(),
        slots_moved,
        before,
        during,
        probe_refused,
        probe_unknown,
        probe_sessions: posted.sessions,
        probe_longest_gap: posted.longest_without_ack,
    })
}

fn report(args: &Args, rows: &[Row]) -> String {
    let mut r = String::new();
    let _ = writeln!(r, "# movebench\n");
    let _ = writeln!(r, "`{}`\n", std::env::args().collect::<Vec<_>>().join(" "));
    for (k, v) in procfs::common_facts() {
        let _ = writeln!(r, "- {k}: {v}");
    }
    let _ = writeln!(
        r,
        "- messages of {} bytes of text; probe: one post at a time, {} ms apart; baseline {} s\n",
        args.body_bytes, args.probe_gap_ms, args.baseline_s
    );
    let _ = writeln!(
        r,
        "| messages in `big` | fill (s) | `big`'s partition moved in (s) | node 4 caught up with `big`'s log after (s) | partitions moved: median / largest (s) | rebalance (s) | slots moved | probe before: posts, p50 / p99 / max (ms) | probe during: posts, p50 / p99 / max (ms) | probe posts refused / unanswered, sessions, longest without an acknowledgement (whole run) |"
    );
    let _ = writeln!(r, "|---|---|---|---|---|---|---|---|---|---|");
    for row in rows {
        let _ = writeln!(
            r,
            "| {} | {:.1} | {} (partition {}) | {} | {} partitions: {:.1} / {:.1} | {:.1} | {} | {}: {:.1} / {:.1} / {:.1} | {}: {:.1} / {:.1} / {:.1} | {} / {}, {}, {:.2} s |",
            row.messages,
            row.fill_s,
            row.big_move_s
                .map_or_else(|| "did not move".to_owned(), |s| format!("{s:.1}")),
            row.big_partition,
            row.caught_up_s
                .map_or_else(|| "—".to_owned(), |s| format!("{s:.1}")),
            row.moved_partitions,
            row.median_move_s,
            row.max_move_s,
            row.rebalance_s,
            row.slots_moved,
            row.before.posts,
            row.before.p50_ms,
            row.before.p99_ms,
            row.before.max_ms,
            row.during.posts,
            row.during.p50_ms,
            row.during.p99_ms,
            row.during.max_ms,
            row.probe_refused,
            row.probe_unknown,
            row.probe_sessions,
            row.probe_longest_gap.as_secs_f64(),
        );
    }
    r
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let logs_to = args
        .out
        .parent()
        .map_or_else(|| PathBuf::from("."), Path::to_path_buf)
        .join("logs");
    let mut rows = Vec::new();
    for &messages in &args.messages {
        let row = runtime.block_on(run_one(&args, messages, &logs_to))?;
        eprintln!("movebench: {row:?}");
        rows.push(row);
    }
    let text = report(&args, &rows);
    if let Some(dir) = args.out.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(&args.out, &text)?;
    print!("{text}");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_timestamps_read_as_seconds() {
        assert_eq!(chrono_seconds("1970-01-01T00:00:00Z"), Some(0.0));
        assert_eq!(chrono_seconds("1970-01-02T00:00:01.5Z"), Some(86_401.5));
        // 2026-12-05T08:15:43Z is 1,796,458,543 s after the epoch.
        assert_eq!(
            chrono_seconds("2026-12-05T08:15:43Z"),
            Some(1_796_458_543.0)
        );
        assert_eq!(chrono_seconds("yesterday"), None);
    }

    #[test]
    fn the_chosen_rooms_move_and_differ() {
        let big = moving_room("big", None).unwrap();
        let p = PartitionCount::DEFAULT.of_room(&big);
        let probe = moving_room("probe", Some(p)).unwrap();
        assert_ne!(PartitionCount::DEFAULT.of_room(&probe), p);
    }
}
