//! A chaos campaign: many seeded fault schedules, one after another, each
//! checked like `tests/tests/chaos.rs`, and a report of what was injected,
//! done and found.
//!
//! ```text
//! cargo build --workspace --all-targets
//! target/debug/chaos-campaign --first 1 --schedules 1000 --seconds 20 --report chaos-report.md
//! ```
//!
//! Each schedule takes its fault window plus about half a minute of setup
//! and checking on a 2-core machine. Anomalies are listed with the seed
//! that replays them: `SEED=n cargo test -p saferchat-tests --test chaos`
//! (with `CLOCKS=beyond` for the schedules `--beyond-every` puts beyond the
//! drift bound, and `STORE=cassandra` plus `SAFERCHAT_CASSANDRA` for those
//! `--cassandra-every` runs on Cassandra).
//!
//! Schedules on Cassandra start a Cassandra node of their own from
//! `deploy/cassandra` (fetch its jars first: `bash
//! deploy/cassandra/cassandra.sh fetch`), about a minute more each.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::{Duration, Instant};

use clap::Parser;
use saferchat_tests::chaos::history::Outcome;
use saferchat_tests::chaos::run::{Plan, judge, run};
use saferchat_tests::chaos::schedule::{Clocks, Fault, Store};
use saferchat_tests::netns;

#[derive(Debug, Parser)]
#[command(about = "Runs seeded chaos schedules against 3-node clusters and reports")]
struct Args {
    /// First seed.
    #[arg(long, default_value_t = 1)]
    first: u64,
    /// How many schedules (seeds first, first + 1, …).
    #[arg(long, default_value_t = 10)]
    schedules: u64,
    /// Fault window of each schedule, seconds.
    #[arg(long, default_value_t = 20)]
    seconds: u64,
    /// Every Nth schedule puts the clocks beyond the drift bound (0 =
    /// none): stale membership reads are then expected and reported apart.
    #[arg(long, default_value_t = 5)]
    beyond_every: u64,
    /// Every Nth schedule keeps the timeline in a Cassandra node of its
    /// own, which the schedule also stops, starts and pauses (0 = none).
    #[arg(long, default_value_t = 0)]
    cassandra_every: u64,
    /// Every Nth schedule puts each node's data folder on a small tmpfs
    /// and fills it now and then (root only; 0 = none).
    #[arg(long, default_value_t = 0)]
    disk_every: u64,
    /// Where to write the report (Markdown).
    #[arg(long, default_value = "chaos-report.md")]
    report: std::path::PathBuf,
}

fn kind(f: Fault) -> &'static str {
    match f {
        Fault::Kill(_) => "kill + restart",
        Fault::Pause(_) => "pause (SIGSTOP) + resume",
        Fault::Isolate(_) => "isolate + heal",
        Fault::Cut { .. } => "one-way cut + mend",
        Fault::Delay { .. } => "slow link + mend",
        Fault::Drift { ppm: 0, .. } => "undo",
        Fault::Drift { ppm, .. } if ppm.abs() <= 500 => "clock drift within the bound + undo",
        Fault::Drift { .. } => "clock drift beyond the bound + undo",
        Fault::Jump { .. } => "clock jump (beyond the bound) + undo",
        Fault::Loss { percent: 0, .. } => "undo",
        Fault::Loss { .. } => "packet loss on a link + undo",
        Fault::CassandraStop => "Cassandra stopped + started",
        Fault::CassandraPause => "Cassandra paused (SIGSTOP) + resumed",
        Fault::FillDisk(_) => "full disk + freed",
        Fault::Restart(_)
        | Fault::Resume(_)
        | Fault::Heal(_)
        | Fault::Mend { .. }
        | Fault::CassandraStart
        | Fault::CassandraResume
        | Fault::FreeDisk(_) => "undo",
    }
}

#[derive(Default)]
struct Totals {
    faults: BTreeMap<&'static str, u64>,
    posts: u64,
    acked: u64,
    unknown: u64,
    refused: u64,
    stored: u64,
    sessions: u64,
    membership_ops: u64,
    beyond: u64,
    cassandra: u64,
    loss_skipped: u64,
    anomalies: Vec<String>,
    expected: Vec<String>,
}

fn main() {
    let args = Args::parse();
    // Loss faults need a network namespace of our own: run again inside one
    // when we can (root, unshare, nft).
    if !netns::inside() && netns::unavailable().is_none() {
        let passed = netns::reexec_in_netns(&std::env::args().skip(1).collect::<Vec<_>>());
        std::process::exit(i32::from(!passed));
    }
    if let Some(why) = netns::unavailable().filter(|_| !netns::inside()) {
        eprintln!("chaos-campaign: packet-loss faults are skipped: {why}");
    }
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .enable_all()
        .build()
        .expect("a runtime")
        .block_on(campaign(args));
}

async fn campaign(args: Args) {
    let mut totals = Totals::default();
    let started = Instant::now();
    for seed in args.first..args.first + args.schedules {
        eprintln!("chaos-campaign: SEED={seed}");
        let clocks = if args.beyond_every > 0 && seed % args.beyond_every == 0 {
            totals.beyond += 1;
            Clocks::Beyond
        } else {
            Clocks::Within
        };
        let store = if args.cassandra_every > 0 && seed % args.cassandra_every == 0 {
            totals.cassandra += 1;
            Store::Cassandra
        } else {
            Store::Sled
        };
        let out = run(Plan {
            seed,
            nodes: 3,
            duration: Duration::from_secs(args.seconds),
            clocks,
            store,
            disk: args.disk_every > 0 && seed % args.disk_every == 0,
        })
        .await;
        for step in &out.steps {
            let k = kind(step.fault);
            if k != "undo" {
                *totals.faults.entry(k).or_default() += 1;
            }
        }
        let h = &out.history;
        totals.posts += h.posts.len() as u64;
        for p in &h.posts {
            match p.outcome {
                Outcome::Acked { .. } => totals.acked += 1,
                Outcome::Unknown => totals.unknown += 1,
                Outcome::Refused(_) => totals.refused += 1,
            }
        }
        totals.stored += h.fin.len() as u64;
        totals.sessions += h.sessions.len() as u64;
        totals.membership_ops += out.membership.len() as u64;
        if !out.loss_applied
            && out
                .steps
                .iter()
                .any(|s| matches!(s.fault, Fault::Loss { percent, .. } if percent > 0))
        {
            totals.loss_skipped += 1;
        }
        let verdict = judge(&out);
        for a in verdict.anomalies {
            let store = if store == Store::Cassandra {
                " (STORE=cassandra)"
            } else {
                ""
            };
            totals.anomalies.push(format!("SEED={seed}{store}: {a}"));
        }
        for e in verdict.expected {
            totals
                .expected
                .push(format!("SEED={seed} (CLOCKS=beyond): {e}"));
        }
        eprintln!(
            "chaos-campaign: SEED={seed}: {} posts, {} anomalies so far",
            h.posts.len(),
            totals.anomalies.len()
        );
    }
    let mut report = String::new();
    let _ = writeln!(report, "# Chaos campaign\n");
    let _ = writeln!(
        report,
        "Seeds {}..{} ({} schedules of {} s of faults on 3 nodes, {} of them with clocks beyond the drift bound, {} on Cassandra), {:.0} minutes in all.\n",
        args.first,
        args.first + args.schedules - 1,
        args.schedules,
        args.seconds,
        totals.beyond,
        totals.cassandra,
        started.elapsed().as_secs_f64() / 60.0
    );
    if totals.loss_skipped > 0 {
        let _ = writeln!(
            report,
            "Packet-loss faults were skipped in {} schedules (no network namespace of its own: run as root with unshare and nft).\n",
            totals.loss_skipped
        );
    }
    let _ = writeln!(report, "| faults injected | count |\n|---|---|");
    for (k, n) in &totals.faults {
        let _ = writeln!(report, "| {k} | {n} |");
    }
    let _ = writeln!(
        report,
        "\n| operations | count |\n|---|---|\n| posts | {} |\n| acknowledged | {} |\n| unknown outcome | {} |\n| refused | {} |\n| stored (final histories) | {} |\n| listening sessions | {} |\n| membership operations | {} |\n",
        totals.posts,
        totals.acked,
        totals.unknown,
        totals.refused,
        totals.stored,
        totals.sessions,
        totals.membership_ops
    );
    let _ = writeln!(report, "Anomalies: {}\n", totals.anomalies.len());
    for a in &totals.anomalies {
        let _ = writeln!(report, "- {a}");
    }
    let _ = writeln!(
        report,
        "\nExpected with clocks beyond the drift bound (stale lease reads, flagged): {}\n",
        totals.expected.len()
    );
    for e in &totals.expected {
        let _ = writeln!(report, "- {e}");
    }
    std::fs::write(&args.report, &report).expect("write the report");
    print!("{report}");
    if !totals.anomalies.is_empty() {
        std::process::exit(1);
    }
}
