//! A chaos campaign: many seeded fault schedules, one after another, each
//! checked like `tests/tests/chaos.rs`, and a report of what was injected,
//! done and found.
//!
//! ```text
//! cargo build --workspace --all-targets
//! target/debug/chaos-campaign --first 1 --schedules 1000 --seconds 20 --report chaos-report.md \
//!     --state chaos-state.json --build "$(git rev-parse --short HEAD)"
//! ```
//!
//! Each schedule takes its fault window plus about half a minute of setup
//! and checking on a 2-core machine. Anomalies are listed with the seed
//! that replays them: `SEED=n cargo test -p saferchat-tests --test chaos`
//! (with `CLOCKS=beyond` for the schedules `--beyond-every` puts beyond the
//! drift bound, and `STORE=cassandra` plus `SAFERCHAT_CASSANDRA` for those
//! `--cassandra-every` runs on Cassandra).
//!
//! A campaign of a thousand schedules runs for many hours; with `--state
//! FILE` it records where it stands after every schedule (the totals so
//! far and the next seed), and the same command run again goes on from
//! there: an interrupted campaign (a reboot, a session that ended) loses
//! at most the schedule under way. The report is rewritten after every
//! schedule.
//!
//! With `CHAOS_LOGS=dir` in its environment, the campaign keeps the
//! nodes' logs of the schedules that found an anomaly there (as
//! `SEED-node-N.log`), and only those: a long campaign's logs would
//! fill the disk.
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
#[command(
    about = "Runs seeded chaos schedules against 3-node clusters (or 6 nodes in three datacenters) and reports"
)]
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
    /// Every Nth schedule runs six nodes in three datacenters of two and
    /// also kills or cuts off whole datacenters (0 = none).
    #[arg(long, default_value_t = 0)]
    datacenters_every: u64,
    /// Every Nth schedule run in three datacenters also cuts the room's
    /// home off and moves it to another datacenter now and then (0 =
    /// none); posts the local level lost there are counted, not anomalies.
    #[arg(long, default_value_t = 0)]
    moves_every: u64,
    /// Where to write the report (Markdown).
    #[arg(long, default_value = "chaos-report.md")]
    report: std::path::PathBuf,
    /// Where the campaign records its progress; when the file exists, the
    /// campaign goes on from it (it must be the same campaign: the same
    /// seeds, window and mix).
    #[arg(long)]
    state: Option<std::path::PathBuf>,
    /// What the nodes were built from (a commit, say), for the report: a
    /// campaign resumed on another build lists which seeds ran on which.
    #[arg(long, default_value = "unnamed")]
    build: String,
}

impl Args {
    /// What makes two runs the same campaign.
    fn campaign(&self) -> Campaign {
        Campaign {
            first: self.first,
            schedules: self.schedules,
            seconds: self.seconds,
            beyond_every: self.beyond_every,
            cassandra_every: self.cassandra_every,
            disk_every: self.disk_every,
            datacenters_every: self.datacenters_every,
            moves_every: self.moves_every,
        }
    }
}

/// The arguments that define a campaign.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
struct Campaign {
    first: u64,
    schedules: u64,
    seconds: u64,
    beyond_every: u64,
    cassandra_every: u64,
    disk_every: u64,
    /// Absent in the state of campaigns from before it existed (none).
    #[serde(default)]
    datacenters_every: u64,
    /// Absent in the state of campaigns from before it existed (none).
    #[serde(default)]
    moves_every: u64,
}

/// Where a campaign stands, as `--state` keeps it.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
struct Progress {
    campaign: Campaign,
    /// The next seed to run.
    next: u64,
    /// Time spent on the schedules run so far, over every run of the
    /// campaign.
    seconds_spent: f64,
    totals: Totals,
    /// Which seeds ran on which build, in order.
    #[serde(default)]
    builds: Vec<BuildRun>,
}

/// Seeds `first..=last` ran on `build`.
#[derive(Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
struct BuildRun {
    build: String,
    first: u64,
    last: u64,
}

impl Progress {
    /// Counts `seed` as run on `build`.
    fn ran(&mut self, seed: u64, build: &str) {
        match self.builds.last_mut() {
            Some(run) if run.build == build && run.last + 1 == seed => run.last = seed,
            _ => self.builds.push(BuildRun {
                build: build.to_owned(),
                first: seed,
                last: seed,
            }),
        }
        self.next = seed + 1;
    }
}

impl Progress {
    /// The progress recorded in `path`, or a fresh start.
    ///
    /// # Errors
    /// A file that does not parse, or records another campaign.
    fn load(path: Option<&std::path::Path>, campaign: &Campaign) -> Result<Progress, String> {
        let fresh = Progress {
            campaign: campaign.clone(),
            next: campaign.first,
            seconds_spent: 0.0,
            totals: Totals::default(),
            builds: Vec::new(),
        };
        let Some(path) = path else { return Ok(fresh) };
        let bytes = match std::fs::read(path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(fresh),
            Err(e) => return Err(format!("{}: {e}", path.display())),
        };
        let progress: Progress = serde_json::from_slice(&bytes)
            .map_err(|e| format!("{}: not a campaign's state: {e}", path.display()))?;
        if progress.campaign != *campaign {
            return Err(format!(
                "{} records another campaign ({:?}); this one is {campaign:?}",
                path.display(),
                progress.campaign
            ));
        }
        Ok(progress)
    }

    /// Records the progress in `path` (a whole file or the one before it:
    /// written aside, synced, renamed).
    fn save(&self, path: &std::path::Path) -> std::io::Result<()> {
        use std::io::Write as _;
        let aside = path.with_extension("tmp");
        let mut file = std::fs::File::create(&aside)?;
        file.write_all(&serde_json::to_vec_pretty(self).expect("progress serializes"))?;
        file.sync_all()?;
        std::fs::rename(&aside, path)?;
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::File::open(dir)?.sync_all()?;
        }
        Ok(())
    }
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
        Fault::KillDatacenter(_) => "whole datacenter killed + restarted",
        Fault::CutDatacenter(_) => "whole datacenter cut off + reconnected",
        Fault::MoveHome => "room's home cut off and moved + reconnected",
        Fault::RestartDatacenter(_) | Fault::ReconnectDatacenter(_) | Fault::RejoinHome => "undo",
        Fault::Restart(_)
        | Fault::Resume(_)
        | Fault::Heal(_)
        | Fault::Mend { .. }
        | Fault::CassandraStart
        | Fault::CassandraResume
        | Fault::FreeDisk(_) => "undo",
    }
}

#[derive(Debug, Default, serde::Serialize, serde::Deserialize)]
struct Totals {
    faults: BTreeMap<String, u64>,
    posts: u64,
    acked: u64,
    unknown: u64,
    refused: u64,
    stored: u64,
    sessions: u64,
    membership_ops: u64,
    beyond: u64,
    cassandra: u64,
    /// Schedules run in three datacenters.
    #[serde(default)]
    datacenters: u64,
    /// Home moves the cluster map accepted, and ones it did not within
    /// the run's limit.
    #[serde(default)]
    homes_moved: u64,
    #[serde(default)]
    moves_not_accepted: u64,
    /// Acknowledged posts the local level lost in loss windows, and the
    /// earliest and latest of their acknowledgements from the cut, ms.
    #[serde(default)]
    lost_in_windows: u64,
    #[serde(default)]
    lost_from_cut_ms: Option<(i64, i64)>,
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
    let mut progress = match Progress::load(args.state.as_deref(), &args.campaign()) {
        Ok(progress) => progress,
        Err(e) => {
            eprintln!("chaos-campaign: {e}");
            std::process::exit(2);
        }
    };
    if progress.next > args.first {
        eprintln!(
            "chaos-campaign: going on from SEED={} ({} schedules done)",
            progress.next,
            progress.next - args.first
        );
    }
    for seed in progress.next..args.first + args.schedules {
        let started = Instant::now();
        let totals = &mut progress.totals;
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
        let datacenters = args.datacenters_every > 0 && seed % args.datacenters_every == 0;
        if datacenters {
            totals.datacenters += 1;
        }
        let moves = datacenters
            && args.moves_every > 0
            && (seed / args.datacenters_every).is_multiple_of(args.moves_every);
        let out = run(Plan {
            seed,
            nodes: if datacenters { 6 } else { 3 },
            duration: Duration::from_secs(args.seconds),
            clocks,
            store,
            disk: args.disk_every > 0 && seed % args.disk_every == 0,
            datacenters,
            moves,
        })
        .await;
        for step in &out.steps {
            let k = kind(step.fault);
            if k != "undo" {
                *totals.faults.entry(k.to_owned()).or_default() += 1;
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
        for m in &out.moves {
            if m.accepted_after.is_some() {
                totals.homes_moved += 1;
            } else {
                totals.moves_not_accepted += 1;
            }
        }
        let verdict = judge(&out);
        totals.lost_in_windows += verdict.lost_in_windows.len() as u64;
        for ms in &verdict.lost_from_cut_ms {
            let (lo, hi) = totals.lost_from_cut_ms.get_or_insert((*ms, *ms));
            *lo = (*lo).min(*ms);
            *hi = (*hi).max(*ms);
        }
        if verdict.anomalies.is_empty() {
            forget_logs(seed);
        }
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
        progress.ran(seed, &args.build);
        progress.seconds_spent += started.elapsed().as_secs_f64();
        if let Some(path) = &args.state
            && let Err(e) = progress.save(path)
        {
            eprintln!(
                "chaos-campaign: recording progress in {}: {e}",
                path.display()
            );
            std::process::exit(2);
        }
        write_report(&args, &progress);
    }
    let report = write_report(&args, &progress);
    print!("{report}");
    if !progress.totals.anomalies.is_empty() {
        std::process::exit(1);
    }
}

/// Writes the report of what ran so far; returns it.
fn write_report(args: &Args, progress: &Progress) -> String {
    let totals = &progress.totals;
    let done = progress.next - args.first;
    let mut report = String::new();
    let _ = writeln!(report, "# Chaos campaign\n");
    if done < args.schedules {
        let _ = writeln!(
            report,
            "Under way: {done} of {} schedules run.\n",
            args.schedules
        );
    }
    let _ = writeln!(
        report,
        "Seeds {}..{} ({} schedules of {} s of faults on 3 nodes, or 6 in three datacenters, {} of them with clocks beyond the drift bound, {} on Cassandra, {} in three datacenters), {:.0} minutes in all.\n",
        args.first,
        args.first + done.max(1) - 1,
        done,
        args.seconds,
        totals.beyond,
        totals.cassandra,
        totals.datacenters,
        progress.seconds_spent / 60.0
    );
    for run in &progress.builds {
        let _ = writeln!(
            report,
            "- seeds {}..{} on build {}",
            run.first, run.last, run.build
        );
    }
    if !progress.builds.is_empty() {
        let _ = writeln!(report);
    }
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
    if totals.homes_moved + totals.moves_not_accepted > 0 {
        let _ = writeln!(
            report,
            "Home moves: {} accepted by the cluster map, {} not within the run's limit; {} acknowledged posts lost in their loss windows (the local level's, allowed){}.\n",
            totals.homes_moved,
            totals.moves_not_accepted,
            totals.lost_in_windows,
            totals
                .lost_from_cut_ms
                .map(|(lo, hi)| format!(", acknowledged from {lo} ms to {hi} ms after the cut"))
                .unwrap_or_default()
        );
    }
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
    report
}

/// Removes the nodes' logs a clean schedule left under `CHAOS_LOGS`.
fn forget_logs(seed: u64) {
    let Some(dir) = std::env::var_os("CHAOS_LOGS") else {
        return;
    };
    let prefix = format!("{seed}-node-");
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return;
    };
    for entry in entries.flatten() {
        if entry.file_name().to_string_lossy().starts_with(&prefix) {
            // A log left behind only costs disk space.
            let _ = std::fs::remove_file(entry.path());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn campaign() -> Campaign {
        Campaign {
            first: 11,
            schedules: 1000,
            seconds: 20,
            beyond_every: 5,
            cassandra_every: 0,
            disk_every: 0,
            datacenters_every: 0,
            moves_every: 0,
        }
    }

    #[test]
    fn a_campaign_goes_on_from_its_recorded_progress_and_only_its_own() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.json");
        let fresh = Progress::load(Some(&path), &campaign()).unwrap();
        assert_eq!((fresh.next, fresh.totals.posts), (11, 0));

        let mut progress = fresh;
        for seed in 11..14 {
            progress.ran(seed, if seed < 13 { "a" } else { "b" });
        }
        assert_eq!(progress.next, 14);
        progress.seconds_spent = 165.0;
        progress.totals.posts = 4_321;
        progress.totals.faults.insert("kill + restart".into(), 3);
        progress.totals.anomalies.push("SEED=12: lost".into());
        progress.save(&path).unwrap();
        assert!(!path.with_extension("tmp").exists());

        let again = Progress::load(Some(&path), &campaign()).unwrap();
        assert_eq!((again.next, again.seconds_spent), (14, 165.0));
        assert_eq!(again.totals.posts, 4_321);
        assert_eq!(again.totals.faults["kill + restart"], 3);
        assert_eq!(again.totals.anomalies, ["SEED=12: lost"]);
        let runs: Vec<_> = again
            .builds
            .iter()
            .map(|r| (r.build.as_str(), r.first, r.last))
            .collect();
        assert_eq!(runs, [("a", 11, 12), ("b", 13, 13)]);

        let other = Campaign {
            seconds: 30,
            ..campaign()
        };
        let refused = Progress::load(Some(&path), &other).unwrap_err();
        assert!(refused.contains("another campaign"), "{refused}");
        std::fs::write(&path, b"{").unwrap();
        assert!(
            Progress::load(Some(&path), &campaign())
                .unwrap_err()
                .contains("not a campaign's state")
        );
    }
}
