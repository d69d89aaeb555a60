//! `dcbench`: what a second datacenter costs and gives. Five
//! `saferchat-node` processes (the build this binary belongs to: use a
//! release build), three in `dc1` and two in `dc2`, every link between
//! the datacenters delayed by D ms one way (the harness's proxies). A room
//! homed in `dc1`; its member posts through a `dc1` node, one post at a
//! time. Per delay (a fresh cluster each), the Markdown report gives:
//!
//! - post latency (post to acknowledgement, p50 / p99 / largest) at the
//!   local level (a majority of the home's replicas) and at the
//!   cross-datacenter level (a majority of `dc2`'s too);
//! - the replication lag of the cross-datacenter posts as the leader
//!   measured it: from the post's commit at home to a majority of `dc2`
//!   having stored it (`saferchat_cross_datacenter_wait_seconds`, the
//!   node's summary quantiles, scraped right after that phase);
//! - per N of `--catch-up`: every `dc2` node stopped, N posts made at
//!   home (16 at a time), `dc2` restarted, and the time from its restart
//!   until every `dc2` node applied as much of the room's partition as the
//!   leader (`saferchat_partition_applied_slot`, polled every 100 ms), and
//!   whether it caught up from the log or by copying the partition (more
//!   than the 16 MiB the log retains).
//!
//! Why three and two: rooms' membership is voted on by the replicas in
//! every datacenter, so with three and three a datacenter down leaves no
//! majority for it, and posting stops everywhere once the leases run out;
//! with three and two, `dc1` alone is a majority.
//!
//! The proxies run in this process, which therefore spends CPU beside the
//! nodes. Every loop is bounded in count and time; everything binds
//! 127.0.0.1.
//!
//! # Running
//!
//! ```text
//! cargo build --release -p saferchat-node -p saferchat-tests --bin dcbench
//! target/release/dcbench --delays 10,50 --posts 300 --catch-up 2000,20000 --out target/dcbench/report.md
//! ```

use std::fmt::Write as _;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use clap::Parser;
use saferchat_client::session::{Event, JoinOptions, Session};
use saferchat_consensus::RoomId;
use saferchat_placement::PartitionCount;
use saferchat_proto::chat::Durability;
use saferchat_tests::cluster::{Cluster, Options, room_homed};
use saferchat_tests::stats::Latency;
use saferchat_tests::{load, process, procfs};

/// How long one post may take before the run is given up.
const POST_MAX: Duration = Duration::from_secs(30);
/// How long a returning datacenter may take to catch up.
const CATCH_UP_MAX: Duration = Duration::from_secs(900);
const DC1: [usize; 3] = [0, 1, 2];
const DC2: [usize; 2] = [3, 4];

#[derive(Debug, Parser)]
#[command(
    name = "dcbench",
    about = "Post latency per durability level, replication lag and catch-up time across two datacenters"
)]
struct Args {
    /// One-way delays between the datacenters, in ms, one run each.
    #[arg(long, value_delimiter = ',', default_value = "10,50")]
    delays: Vec<u64>,
    /// Posts per durability level.
    #[arg(long, default_value_t = 300)]
    posts: usize,
    /// Messages posted while dc2 is down, one catch-up each.
    #[arg(long, value_delimiter = ',', default_value = "2000,20000")]
    catch_up: Vec<usize>,
    /// Bytes of each message's text.
    #[arg(long, default_value_t = 1024)]
    body_bytes: usize,
    /// Where the Markdown report goes.
    #[arg(long, default_value = "target/dcbench/report.md")]
    out: PathBuf,
}

/// A returning datacenter's catch-up.
#[derive(Debug)]
struct CatchUp {
    messages: usize,
    seconds: f64,
    copied: bool,
}

/// One delay's figures.
#[derive(Debug)]
struct Row {
    delay_ms: u64,
    local: Latency,
    cross: Latency,
    lag_p50_ms: Option<f64>,
    lag_p99_ms: Option<f64>,
    catch_ups: Vec<CatchUp>,
}

/// Posts `n` messages one at a time; the latency of each.
async fn closed_loop(session: &mut Session, n: usize, body: &str) -> anyhow::Result<Vec<f64>> {
    let mut ms = Vec::with_capacity(n);
    for i in 0..n {
        let started = Instant::now();
        let seq = session.post(format!("{i} {body}").as_bytes()).await?;
        loop {
            let event = tokio::time::timeout(POST_MAX, session.next())
                .await
                .context("a post went unanswered")??;
            match event {
                Some(Event::Accepted { seq: s, .. }) if s == seq => break,
                Some(Event::Rejected {
                    seq: s, message, ..
                }) if s == seq => anyhow::bail!("post refused: {message}"),
                Some(_) => {}
                None => anyhow::bail!("the session ended"),
            }
        }
        ms.push(started.elapsed().as_secs_f64() * 1e3);
    }
    Ok(ms)
}

/// Waits until every `dc2` node applied as much of `partition` as the
/// most advanced `dc1` node.
async fn caught_up(cluster: &Cluster, partition: u32) -> anyhow::Result<()> {
    let series = format!("saferchat_partition_applied_slot{{partition=\"{partition}\"}}");
    let deadline = Instant::now() + CATCH_UP_MAX;
    while Instant::now() < deadline {
        let mut want = 0.0_f64;
        for i in DC1 {
            want = want.max(
                process::scrape_value(cluster.metrics[i], &series)
                    .await
                    .unwrap_or(0.0),
            );
        }
        let mut behind = false;
        for i in DC2 {
            let have = process::scrape_value(cluster.metrics[i], &series)
                .await
                .unwrap_or(0.0);
            behind |= have < want;
        }
        if want > 0.0 && !behind {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    anyhow::bail!("dc2 did not catch up within {CATCH_UP_MAX:?}")
}

async fn run_one(args: &Args, delay_ms: u64) -> anyhow::Result<Row> {
    let mut options = Options::three_and_two();
    options.metrics = true;
    options.env = vec![("SAFERCHAT_POSTS_PER_SECOND".into(), "0".into())];
    let mut cluster = Cluster::start(options).await;
    cluster.delay_between_datacenters(delay_ms);
    cluster.map_created(0).await;
    let room_name = room_homed("home", 0, 2);
    let partition = PartitionCount::DEFAULT.of_room(&room_name).0;
    let mut admin = cluster.admin(0).await;
    let alice = load::identity(0).handle().to_string();
    admin.create_chat(&room_name).await.context("create")?;
    admin
        .add_user(&room_name, &alice, None)
        .await
        .context("add")?;
    let room = RoomId::new(&room_name)?;
    let options = JoinOptions {
        no_history: true,
        ..JoinOptions::default()
    };
    let mut session = Session::join(&cluster.server(0), &room, load::identity(0), &options)
        .await
        .context("join")?;
    let body = "x".repeat(args.body_bytes.saturating_sub(16));
    // Warm up: the leader's lease, the connections.
    closed_loop(&mut session, 20, &body).await?;
    let local = Latency::of(closed_loop(&mut session, args.posts, &body).await?);
    session.set_durability(Durability::CrossDatacenter);
    let cross = Latency::of(closed_loop(&mut session, args.posts, &body).await?);
    let leader = (0..5)
        .find(|i| cluster.server(*i) == session.address())
        .context("the session's node")?;
    let quantile = |q: &str| format!("saferchat_cross_datacenter_wait_seconds{{quantile=\"{q}\"}}");
    let lag_p50_ms = process::scrape_value(cluster.metrics[leader], &quantile("0.5"))
        .await
        .map(|s| s * 1e3);
    let lag_p99_ms = process::scrape_value(cluster.metrics[leader], &quantile("0.99"))
        .await
        .map(|s| s * 1e3);
    drop(session);
    eprintln!(
        "dcbench: {delay_ms} ms: local p50 {:.1} ms, cross-datacenter p50 {:.1} ms",
        local.p50_ms, cross.p50_ms
    );

    let servers: Vec<String> = DC1.iter().map(|i| cluster.server(*i)).collect();
    let mut catch_ups = Vec::new();
    for &messages in &args.catch_up {
        for i in DC2 {
            cluster.kill(i);
        }
        load::fill(
            &servers,
            &room,
            0,
            "while dc2 is down",
            messages,
            args.body_bytes.saturating_sub(16),
        )
        .await
        .map_err(|e| anyhow::anyhow!("posting while dc2 is down: {e}"))?;
        let copies_before: Vec<usize> = DC2
            .iter()
            .map(|i| copies_in(&cluster.nodes[*i].log_text()))
            .collect();
        let started = Instant::now();
        for i in DC2 {
            cluster.restart(i);
        }
        caught_up(&cluster, partition).await?;
        let seconds = started.elapsed().as_secs_f64();
        let copied = DC2
            .iter()
            .zip(&copies_before)
            .any(|(i, before)| copies_in(&cluster.nodes[*i].log_text()) > *before);
        eprintln!("dcbench: {delay_ms} ms: dc2 caught up on {messages} messages in {seconds:.1} s");
        catch_ups.push(CatchUp {
            messages,
            seconds,
            copied,
        });
    }
    for node in &mut cluster.nodes {
        node.stop();
    }
    Ok(Row {
        delay_ms,
        local,
        cross,
        lag_p50_ms,
        lag_p99_ms,
        catch_ups,
    })
}

/// How many partition copies a node's log reports installed.
fn copies_in(log: &str) -> usize {
    log.matches("installed the partition's timeline copied from a replica")
        .count()
}

fn report(args: &Args, rows: &[Row]) -> String {
    let mut r = String::new();
    let _ = writeln!(r, "# dcbench\n");
    let _ = writeln!(r, "`{}`\n", std::env::args().collect::<Vec<_>>().join(" "));
    for (k, v) in procfs::common_facts() {
        let _ = writeln!(r, "- {k}: {v}");
    }
    let _ = writeln!(
        r,
        "- five nodes, dc1 = nodes 1-3, dc2 = nodes 4-5; a room homed in dc1, posts through node 1, one at a time, {} bytes of text\n",
        args.body_bytes
    );
    let _ = writeln!(
        r,
        "| one-way delay (ms) | local: posts, p50 / p99 / max (ms) | cross-datacenter: posts, p50 / p99 / max (ms) | replication lag, commit to a majority of dc2 stored: p50 / p99 (ms) |"
    );
    let _ = writeln!(r, "|---|---|---|---|");
    let opt = |v: Option<f64>| v.map_or_else(|| "—".to_owned(), |v| format!("{v:.1}"));
    for row in rows {
        let _ = writeln!(
            r,
            "| {} | {}: {:.1} / {:.1} / {:.1} | {}: {:.1} / {:.1} / {:.1} | {} / {} |",
            row.delay_ms,
            row.local.posts,
            row.local.p50_ms,
            row.local.p99_ms,
            row.local.max_ms,
            row.cross.posts,
            row.cross.p50_ms,
            row.cross.p99_ms,
            row.cross.max_ms,
            opt(row.lag_p50_ms),
            opt(row.lag_p99_ms),
        );
    }
    let _ = writeln!(
        r,
        "\n| one-way delay (ms) | messages posted while dc2 was down | dc2 caught up after its restart (s) | how |"
    );
    let _ = writeln!(r, "|---|---|---|---|");
    for row in rows {
        for c in &row.catch_ups {
            let _ = writeln!(
                r,
                "| {} | {} | {:.1} | {} |",
                row.delay_ms,
                c.messages,
                c.seconds,
                if c.copied {
                    "copied the partition, then the log"
                } else {
                    "from the leader's log"
                }
            );
        }
    }
    r
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    anyhow::ensure!(args.posts > 0, "--posts must be at least 1");
    let mut rows = Vec::new();
    for &delay in &args.delays {
        rows.push(run_one(&args, delay).await?);
    }
    let text = report(&args, &rows);
    if let Some(dir) = args.out.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(&args.out, &text)?;
    print!("{text}");
    Ok(())
}
