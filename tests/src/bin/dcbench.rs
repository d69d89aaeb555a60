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
//! - with `--throughput-seconds S` (0: skipped), the same workload on a
//!   fresh cluster of each shape: one datacenter of three nodes, and two
//!   datacenters of three, once per `--delays` value between them. In
//!   `--throughput-rooms` rooms (in two datacenters, homed in each in
//!   turn), one member per room posts through a node of the room's home
//!   datacenter with `--in-flight` posts outstanding, for S seconds:
//!   acknowledged posts per second, post latency, the CPU seconds the
//!   node processes and this process (client and proxies) used, and the
//!   replication lag under that load (every 250 ms, the largest
//!   `saferchat_replication_lag_ms` any leader exports). All of it
//!   shares the machine's cores, so the second shape's extra replicas
//!   compete with the first shape's work for the same CPU: the figure is
//!   what one machine's cores give, not what six machines would.
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
//! target/release/dcbench --only-throughput --throughput-seconds 30 --delays 10 --out target/dcbench/throughput.md
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
    /// Seconds of the throughput comparison per shape (0: skipped).
    #[arg(long, default_value_t = 0)]
    throughput_seconds: u64,
    /// Rooms the throughput comparison posts to.
    #[arg(long, default_value_t = 16)]
    throughput_rooms: usize,
    /// Messages sealed beforehand per room for the comparison: a room
    /// whose pool runs out stops posting before the time is up.
    #[arg(long, default_value_t = 1_500)]
    pool_per_room: usize,
    /// Posts each room's member keeps outstanding in the comparison.
    #[arg(long, default_value_t = 4)]
    in_flight: usize,
    /// Only the throughput comparison: no latency, lag or catch-up runs.
    #[arg(long)]
    only_throughput: bool,
    /// Where each throughput run leaves every node's log and its metrics
    /// as scraped when the load ended (`saferchat_timeline_step_seconds`
    /// says which of the timeline driver's steps held it up); none when
    /// absent.
    #[arg(long)]
    node_output: Option<PathBuf>,
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

/// One shape's throughput.
#[derive(Debug)]
struct Throughput {
    shape: String,
    posts: usize,
    seconds: f64,
    latency: Latency,
    nodes_cpu_s: f64,
    bench_cpu_s: f64,
    /// Times a room's load joined again after an UNAVAILABLE answer (a
    /// leader change under load).
    reconnects: usize,
    /// Every 250 ms under load, the largest `saferchat_replication_lag_ms`
    /// any leader reported (empty in one datacenter).
    lag_ms: Vec<f64>,
}

/// Until `until`, every 250 ms: the largest replication lag in ms that any
/// node's leaders export (`saferchat_replication_lag_ms`, every partition
/// and datacenter pair), or nothing when none exports one.
async fn sample_lag(metrics: Vec<std::net::SocketAddr>, until: Instant) -> Vec<f64> {
    let mut samples = Vec::new();
    while Instant::now() < until {
        let mut largest: Option<f64> = None;
        for addr in &metrics {
            let Some(text) = process::scrape(*addr).await else {
                continue;
            };
            for line in text
                .lines()
                .filter(|l| l.starts_with("saferchat_replication_lag_ms{"))
            {
                if let Some(v) = line.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok()) {
                    largest = Some(largest.map_or(v, |l: f64| l.max(v)));
                }
            }
        }
        samples.extend(largest);
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    samples
}

/// Where a pipelined load joins its room again after an UNAVAILABLE.
struct Rejoin {
    server: String,
    room: RoomId,
}

/// Reconnects a pipelined load may make before it gives up.
const RECONNECTS_MAX: usize = 20;

/// Posts the sealed envelopes of `pool` through `session` until `until`
/// or until they run out, keeping `in_flight` outstanding; the latency of
/// each acknowledged post, from when it was first sent, and how many
/// times the load reconnected. Sealing signs with RSA and opening a
/// delivery decrypts with it, milliseconds each: the pool is sealed
/// beforehand and the session taken raw, its deliveries (the member's own
/// posts coming back) read and dropped unopened, so that this process's
/// CPU goes to sending and receiving and the nodes are what is measured.
///
/// A post answered UNAVAILABLE (the node stopped leading the room's
/// partition while it was in flight, which a leader change during a long
/// run does) is what the protocol asks clients to retry: the load joins
/// the room again through the same node and sends every outstanding
/// envelope again, which the room recognises by its id.
async fn pipelined(
    session: Session,
    rejoin: Rejoin,
    in_flight: usize,
    pool: Vec<bytes::Bytes>,
    until: Instant,
) -> anyhow::Result<(Vec<f64>, usize)> {
    use saferchat_proto::chat::{self as pb, client_frame, post_result, server_frame};
    let raw = session.into_raw();
    let (mut out, mut inbound) = (raw.out, raw.inbound);
    let mut sent: std::collections::HashMap<u64, (Instant, bytes::Bytes)> =
        std::collections::HashMap::new();
    let mut ms = Vec::new();
    let mut reconnects = 0;
    let mut pool = pool.into_iter();
    // Above the numbers `Session::post` used for the warm-up.
    let mut seq = 1_000_000u64;
    let frame = |client_seq: u64, envelope: bytes::Bytes| pb::ClientFrame {
        frame: Some(client_frame::Frame::Post(pb::Post {
            client_seq,
            envelope,
            durability: pb::Durability::Local as i32,
        })),
    };
    loop {
        while Instant::now() < until && sent.len() < in_flight {
            let Some(envelope) = pool.next() else { break };
            out.send(frame(seq, envelope.clone()))
                .await
                .map_err(|_| anyhow::anyhow!("the session ended"))?;
            sent.insert(seq, (Instant::now(), envelope));
            seq += 1;
        }
        if sent.is_empty() {
            return Ok((ms, reconnects));
        }
        let frame_in = tokio::time::timeout(POST_MAX, inbound.message())
            .await
            .context("a post went unanswered")??
            .context("the session ended")?;
        let Some(server_frame::Frame::Result(result)) = frame_in.frame else {
            continue;
        };
        match result.outcome {
            Some(post_result::Outcome::Accepted(_)) => {
                if let Some((at, _)) = sent.remove(&result.client_seq) {
                    ms.push(at.elapsed().as_secs_f64() * 1e3);
                }
            }
            Some(post_result::Outcome::Rejected(r))
                if r.code == tonic::Code::Unavailable as i32 && reconnects < RECONNECTS_MAX =>
            {
                reconnects += 1;
                eprintln!(
                    "dcbench: {}: {} (reconnecting, {reconnects} of at most {RECONNECTS_MAX})",
                    rejoin.room, r.message
                );
                let options = JoinOptions {
                    no_history: true,
                    ..JoinOptions::default()
                };
                let session =
                    Session::join(&rejoin.server, &rejoin.room, load::identity(0), &options)
                        .await
                        .context("join again")?;
                let raw = session.into_raw();
                (out, inbound) = (raw.out, raw.inbound);
                for (client_seq, (_, envelope)) in &sent {
                    out.send(frame(*client_seq, envelope.clone()))
                        .await
                        .map_err(|_| anyhow::anyhow!("the session ended"))?;
                }
            }
            Some(post_result::Outcome::Rejected(r)) => {
                anyhow::bail!("post refused: {}", r.message)
            }
            None => anyhow::bail!("an empty post result"),
        }
    }
}

/// The throughput workload on a fresh cluster of `datacenters` (one entry
/// per node), `delay_ms` between datacenters.
async fn throughput(
    args: &Args,
    shape: &str,
    datacenters: &[&str],
    delay_ms: u64,
) -> anyhow::Result<Throughput> {
    let mut options = Options::single_dc(datacenters.len());
    options.datacenters = datacenters.iter().map(|d| (*d).to_owned()).collect();
    options.metrics = true;
    options.env = vec![("SAFERCHAT_POSTS_PER_SECOND".into(), "0".into())];
    let mut cluster = Cluster::start(options).await;
    cluster.delay_between_datacenters(delay_ms);
    cluster.map_created(0).await;
    let dcs: Vec<&str> = {
        let mut d = datacenters.to_vec();
        d.sort_unstable();
        d.dedup();
        d
    };
    let mut admin = cluster.admin(0).await;
    let alice = load::identity(0).handle().to_string();
    let body = "x".repeat(args.body_bytes.saturating_sub(16));
    let options = JoinOptions {
        no_history: true,
        ..JoinOptions::default()
    };
    let mut sessions = Vec::new();
    let mut rejoins = Vec::new();
    for r in 0..args.throughput_rooms {
        let home = r % dcs.len();
        let name = room_homed(&format!("load{r}"), home as u32, dcs.len() as u32);
        admin.create_chat(&name).await.context("create")?;
        admin.add_user(&name, &alice, None).await.context("add")?;
        let through = datacenters
            .iter()
            .enumerate()
            .filter(|(_, d)| **d == dcs[home])
            .map(|(i, _)| i)
            .nth(r / dcs.len() % 3)
            .context("a node at home")?;
        let mut session = Session::join(
            &cluster.server(through),
            &RoomId::new(&name)?,
            load::identity(0),
            &options,
        )
        .await
        .context("join")?;
        closed_loop(&mut session, 5, &body).await?;
        sessions.push(session);
        rejoins.push(Rejoin {
            server: cluster.server(through),
            room: RoomId::new(&name)?,
        });
    }
    // Seal every room's pool, the rooms in parallel on the runtime's
    // workers.
    let per_room = args.pool_per_room;
    let sealing: Vec<_> = sessions
        .into_iter()
        .map(|session| {
            let body = body.clone();
            tokio::spawn(async move {
                tokio::task::block_in_place(|| {
                    let pool: Result<Vec<bytes::Bytes>, _> = (0..per_room)
                        .map(|n| session.seal(format!("{n} {body}").as_bytes()))
                        .collect();
                    pool.map(|pool| (session, pool))
                })
            })
        })
        .collect();
    let mut pools = Vec::new();
    for s in sealing {
        pools.push(s.await??);
    }
    let ticks = procfs::clock_ticks_per_s();
    let pids: Vec<String> = cluster
        .nodes
        .iter()
        .filter_map(|n| n.pid().map(|p| p.to_string()))
        .collect();
    let cpu = |pids: &[String]| -> f64 {
        pids.iter()
            .filter_map(|p| procfs::process_cpu_s(p, ticks))
            .sum()
    };
    let me = [std::process::id().to_string()];
    let (nodes_before, me_before) = (cpu(&pids), cpu(&me));
    let started = Instant::now();
    let until = started + Duration::from_secs(args.throughput_seconds);
    let sampler = tokio::spawn(sample_lag(cluster.metrics.clone(), until));
    let tasks: Vec<_> = pools
        .into_iter()
        .zip(rejoins)
        .map(|((s, pool), rejoin)| tokio::spawn(pipelined(s, rejoin, args.in_flight, pool, until)))
        .collect();
    let mut ms = Vec::new();
    let mut reconnects = 0;
    for t in tasks {
        let (latencies, again) = t.await??;
        ms.extend(latencies);
        reconnects += again;
    }
    let seconds = started.elapsed().as_secs_f64();
    let lag_ms = sampler.await?;
    let (nodes_cpu_s, bench_cpu_s) = (cpu(&pids) - nodes_before, cpu(&me) - me_before);
    if let Some(dir) = &args.node_output {
        std::fs::create_dir_all(dir)?;
        let shape_name: String = shape
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
            .collect();
        for (i, node) in cluster.nodes.iter().enumerate() {
            let stem = dir.join(format!("{shape_name}-n{}", i + 1));
            std::fs::write(stem.with_extension("log"), node.log_text())?;
            let metrics = process::scrape(cluster.metrics[i])
                .await
                .unwrap_or_default();
            std::fs::write(stem.with_extension("metrics"), metrics)?;
        }
    }
    for node in &mut cluster.nodes {
        node.stop();
    }
    let posts = ms.len();
    eprintln!(
        "dcbench: {shape}: {posts} posts in {seconds:.1} s, {:.0}/s",
        posts as f64 / seconds
    );
    Ok(Throughput {
        shape: shape.to_owned(),
        posts,
        seconds,
        latency: Latency::of(ms),
        nodes_cpu_s,
        bench_cpu_s,
        reconnects,
        lag_ms,
    })
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

/// Median and largest of lag samples, or a dash without any.
fn lag_cell(samples: &[f64]) -> String {
    let mut sorted = samples.to_vec();
    sorted.sort_by(f64::total_cmp);
    match (saferchat_tests::stats::median(&sorted), sorted.last()) {
        (Some(median), Some(max)) => format!("{median:.0} / {max:.0} ({} samples)", sorted.len()),
        _ => "—".to_owned(),
    }
}

/// The latency, lag and catch-up tables.
fn latency_tables(r: &mut String, args: &Args, rows: &[Row]) {
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
}

fn report(args: &Args, rows: &[Row], throughputs: &[Throughput]) -> String {
    let mut r = String::new();
    let _ = writeln!(r, "# dcbench\n");
    let _ = writeln!(r, "`{}`\n", std::env::args().collect::<Vec<_>>().join(" "));
    for (k, v) in procfs::common_facts() {
        let _ = writeln!(r, "- {k}: {v}");
    }
    if !rows.is_empty() {
        latency_tables(&mut r, args, rows);
    }
    if !throughputs.is_empty() {
        let _ = writeln!(
            r,
            "\n{} rooms, homed in each datacenter in turn, one member each posting through a node of the home with {} posts outstanding, {} s per shape (or until the {} messages sealed beforehand per room ran out), {} bytes of text:\n",
            args.throughput_rooms,
            args.in_flight,
            args.throughput_seconds,
            args.pool_per_room,
            args.body_bytes
        );
        let _ = writeln!(
            r,
            "| shape | posts acknowledged | posts/s | latency p50 / p99 / max (ms) | CPU s: node processes / this process (client and proxies) | replication lag under this load, largest over partitions every 250 ms: median / max (ms) | reconnects after UNAVAILABLE |"
        );
        let _ = writeln!(r, "|---|---|---|---|---|---|---|");
        for t in throughputs {
            let _ = writeln!(
                r,
                "| {} | {} | {:.0} | {:.1} / {:.1} / {:.1} | {:.1} / {:.1} | {} | {} |",
                t.shape,
                t.posts,
                t.posts as f64 / t.seconds,
                t.latency.p50_ms,
                t.latency.p99_ms,
                t.latency.max_ms,
                t.nodes_cpu_s,
                t.bench_cpu_s,
                lag_cell(&t.lag_ms),
                t.reconnects,
            );
        }
    }
    r
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    anyhow::ensure!(args.posts > 0, "--posts must be at least 1");
    anyhow::ensure!(args.in_flight > 0, "--in-flight must be at least 1");
    let mut throughputs = Vec::new();
    if args.throughput_seconds > 0 {
        throughputs.push(throughput(&args, "1 x 3 (dc1)", &["dc1"; 3], 0).await?);
        for &delay in &args.delays {
            throughputs.push(
                throughput(
                    &args,
                    &format!("2 x 3 (dc1, dc2; {delay} ms one way)"),
                    &["dc1", "dc1", "dc1", "dc2", "dc2", "dc2"],
                    delay,
                )
                .await?,
            );
        }
    }
    let mut rows = Vec::new();
    if !args.only_throughput {
        for &delay in &args.delays {
            rows.push(run_one(&args, delay).await?);
        }
    }
    let text = report(&args, &rows, &throughputs);
    if let Some(dir) = args.out.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(&args.out, &text)?;
    print!("{text}");
    Ok(())
}
