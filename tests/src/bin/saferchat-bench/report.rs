//! The Markdown report of one invocation: machine facts, the exact
//! command, the workload, and per M the median [min – max] over the
//! repetitions of every metric (the layout of the peer harness's tables).

use std::fmt::Write as _;

use serde::Serialize;

use crate::idle::IdleResult;
use crate::load::PhaseResult;
use crate::procfs::MachineFacts;
use crate::run::RunResult;
use crate::stats::spread;

/// Everything an invocation measured, as written to `summary.json`.
#[derive(Clone, Debug, Serialize)]
pub struct Invocation {
    /// Tool and version.
    pub tool: String,
    /// When it started, UTC.
    pub started_utc: String,
    /// When it ended, UTC.
    pub ended_utc: String,
    /// The command line.
    pub command: String,
    /// The machine.
    pub machine: MachineFacts,
    /// How the server was started.
    pub server_command: String,
    /// Server CPUs and scheduling, as the kernel reports them.
    pub server_placement: String,
    /// Client CPUs and scheduling.
    pub client_placement: String,
    /// The runs, in order.
    pub runs: Vec<RunResult>,
    /// The idle-session measurement.
    pub idle: Option<IdleResult>,
}

pub fn cell(values: &[f64], digits: usize) -> String {
    match spread(values) {
        None => "–".into(),
        Some((m, lo, hi)) if values.len() == 1 || lo == hi => fmt(m, digits),
        Some((m, lo, hi)) => format!(
            "{} [{} – {}]",
            fmt(m, digits),
            fmt(lo, digits),
            fmt(hi, digits)
        ),
    }
}

pub fn fmt(v: f64, digits: usize) -> String {
    if !v.is_finite() {
        return "–".into();
    }
    let s = format!("{v:.digits$}");
    // Thousands separators on the integer part.
    let (int, frac) = s
        .split_once('.')
        .map_or((s.as_str(), None), |(i, f)| (i, Some(f)));
    let (sign, digits_only) = int.strip_prefix('-').map_or(("", int), |d| ("-", d));
    let mut grouped = String::new();
    for (i, c) in digits_only.chars().enumerate() {
        if i > 0 && (digits_only.len() - i) % 3 == 0 {
            grouped.push(',');
        }
        grouped.push(c);
    }
    match frac {
        Some(f) => format!("{sign}{grouped}.{f}"),
        None => format!("{sign}{grouped}"),
    }
}

type Getter = fn(&PhaseResult) -> Option<f64>;

const PHASE_ROWS: &[(&str, &str, Getter, usize)] = &[
    (
        "sat",
        "**(a) saturation**: deliveries/s (messages × other members)",
        |p| Some(p.deliveries_per_s),
        0,
    ),
    (
        "sat",
        "saturation: messages/s into the room",
        |p| Some(p.msgs_per_s),
        1,
    ),
    (
        "sat",
        "saturation: latency p50 ms (closed loop)",
        |p| p.lat_p50_ms,
        2,
    ),
    (
        "sat",
        "saturation: latency p99 ms (closed loop)",
        |p| p.lat_p99_ms,
        2,
    ),
    (
        "sat",
        "saturation: server CPU, cores busy",
        |p| Some(p.server_cpu_util),
        2,
    ),
    (
        "sat",
        "saturation: server CPU µs per delivery",
        |p| p.server_cpu_us_per_delivery,
        2,
    ),
    (
        "sat",
        "saturation: server peak RSS MB (sampled VmRSS)",
        |p| Some(p.server_rss_peak_mb),
        1,
    ),
    (
        "sat",
        "saturation: client CPU, share of its core",
        |p| Some(p.client_cpu_util),
        2,
    ),
    (
        "sat",
        "saturation: CPU used by other processes, cores",
        |p| Some(p.other_cpu_cores),
        2,
    ),
    (
        "rate",
        "**(b) fixed rate**: messages/s sent",
        |p| p.achieved_msgs_per_s,
        2,
    ),
    ("rate", "fixed rate: latency p50 ms", |p| p.lat_p50_ms, 2),
    ("rate", "fixed rate: latency p99 ms", |p| p.lat_p99_ms, 2),
    ("rate", "fixed rate: latency max ms", |p| p.lat_max_ms, 2),
    (
        "rate",
        "fixed rate: server CPU, cores busy",
        |p| Some(p.server_cpu_util),
        3,
    ),
    (
        "half",
        "**half of saturation**: messages/s sent",
        |p| p.achieved_msgs_per_s,
        1,
    ),
    (
        "half",
        "half: deliveries/s",
        |p| Some(p.deliveries_per_s),
        0,
    ),
    ("half", "half: latency p50 ms", |p| p.lat_p50_ms, 2),
    ("half", "half: latency p99 ms", |p| p.lat_p99_ms, 2),
    ("half", "half: latency max ms", |p| p.lat_max_ms, 2),
    (
        "half",
        "half: server CPU, cores busy",
        |p| Some(p.server_cpu_util),
        2,
    ),
    (
        "half",
        "half: client CPU, share of its core",
        |p| Some(p.client_cpu_util),
        2,
    ),
];

fn phase_values(runs: &[&RunResult], phase: &str, get: Getter) -> Vec<f64> {
    runs.iter()
        .filter_map(|r| r.phases.get(phase))
        .filter_map(get)
        .collect()
}

/// Renders the report.
pub fn markdown(inv: &Invocation) -> String {
    let mut out = String::new();
    let m = &inv.machine;
    let _ = writeln!(out, "# saferchat single-node benchmark\n");
    let _ = writeln!(
        out,
        "Runs from {} to {} (UTC). Tool: {}.\n",
        inv.started_utc, inv.ended_utc, inv.tool
    );
    let _ = writeln!(
        out,
        "Machine: {} CPUs (nproc), {} GiB RAM, {}, kernel {}, Debian {}; {}; commit {}{}.\n",
        m.nproc,
        m.mem_total_gib,
        m.cpu_model,
        m.kernel,
        m.debian,
        m.rustc,
        m.git_commit,
        if m.git_dirty_files > 0 {
            format!(" with {} changed files", m.git_dirty_files)
        } else {
            String::new()
        }
    );
    let _ = writeln!(out, "Command:\n\n```sh\n{}\n```\n", inv.command);
    let _ = writeln!(
        out,
        "Server: `{}` ({}). Load generator: {}.\n",
        inv.server_command, inv.server_placement, inv.client_placement
    );
    let mut ms: Vec<usize> = inv.runs.iter().map(|r| r.plan.members).collect();
    ms.sort_unstable();
    ms.dedup();
    if let Some(first) = inv.runs.first() {
        let p = &first.plan;
        let _ = writeln!(
            out,
            "Workload: one room of M members, each its own joined session on its own connection; the first S members send {}-byte bodies as real envelope v1 (AES-256-GCM body, RSA-OAEP key wrapped for every member, RSA-PSS signature), pre-sealed before the phases ({} envelopes per sender, reused cyclically, a slot never reused before every member received it). Fixed rate: 50/M messages/s, {} s warm-up, {} s measured. Saturation: closed loop, {} posts in flight per sender (until the sender receives its own post back), {} s warm-up, {} s measured. Half: open loop at half the saturation message rate. Latency = receive instant − the instant the post was due in this process (monotonic clock; in the open-loop phases its scheduled time, so a generator that falls behind shows it in the latency and in the count of late posts), over deliveries to members other than the sender received inside the window. After each phase the tool waits up to {} s until every message reached every member.\n",
            p.body_bytes,
            p.pool,
            p.rate_warmup_s,
            p.rate_duration_s,
            p.window,
            p.sat_warmup_s,
            p.sat_duration_s,
            p.drain_s + p.drain_max_s,
        );
    }
    if !inv.runs.is_empty() {
        let _ = writeln!(out, "Cells: median [min – max] over the repetitions.\n");
        let header: Vec<String> = ms
            .iter()
            .map(|m| {
                let runs: Vec<&RunResult> =
                    inv.runs.iter().filter(|r| r.plan.members == *m).collect();
                format!(
                    "M={m}, S={} senders ({} reps)",
                    runs[0].plan.senders,
                    runs.len()
                )
            })
            .collect();
        let _ = writeln!(out, "| metric | {} |", header.join(" | "));
        let _ = writeln!(out, "|---|{}", "---|".repeat(ms.len()));
        let by_m: Vec<Vec<&RunResult>> = ms
            .iter()
            .map(|m| inv.runs.iter().filter(|r| r.plan.members == *m).collect())
            .collect();
        for (phase, label, get, digits) in PHASE_ROWS {
            let cells: Vec<String> = by_m
                .iter()
                .map(|runs| cell(&phase_values(runs, phase, *get), *digits))
                .collect();
            let _ = writeln!(out, "| {label} | {} |", cells.join(" | "));
        }
        type RunGetter = fn(&RunResult) -> Option<f64>;
        let run_rows: &[(&str, RunGetter, usize)] = &[
            (
                "**(c) server**: CPU s, whole run (setup + phases)",
                |r| Some(r.server_cpu_total_s),
                1,
            ),
            (
                "peak RSS MB, whole run (VmHWM)",
                |r| Some(r.server_vmhwm_mb),
                1,
            ),
            (
                "**(d) rooms**: create room ms (AddChat, median of the cycles)",
                |r| r.rooms.create_ms_median,
                2,
            ),
            (
                "add member ms (AddUser into a 1-member room)",
                |r| r.rooms.add_user_ms_median,
                2,
            ),
            (
                "first join ms of the added member (handshake incl. client RSA signature + key registration)",
                |r| r.rooms.first_join_ms_median,
                2,
            ),
            (
                "join again ms (key already registered)",
                |r| r.rooms.rejoin_ms_median,
                2,
            ),
            (
                "of which the client's RSA-PSS signature ms",
                |r| r.rooms.client_sign_ms_median,
                2,
            ),
            (
                "first join ms, last 10% of joins filling the M room",
                |r| r.rooms.fill_last10pct_join_ms_median,
                2,
            ),
            (
                "setup: add + join all M members, s",
                |r| Some(r.setup.fill_s),
                2,
            ),
            (
                "setup: seal the envelope pools, s (not timed in any phase)",
                |r| r.setup.seal.as_ref().map(|s| s.seconds),
                1,
            ),
            (
                "**checks**: lowest delivered fraction over phases",
                |r| {
                    r.phases
                        .values()
                        .filter_map(|p| p.delivered_fraction)
                        .reduce(f64::min)
                },
                4,
            ),
            (
                "highest client CPU share over phases",
                |r| {
                    r.phases
                        .values()
                        .map(|p| p.client_cpu_util)
                        .reduce(f64::max)
                },
                2,
            ),
            (
                "sampled deliveries verified + decrypted (failures must be 0)",
                |r| Some(r.phases.values().map(|p| p.verified_samples as f64).sum()),
                0,
            ),
            (
                "verification failures",
                |r| Some(r.phases.values().map(|p| p.verify_failures as f64).sum()),
                0,
            ),
            (
                "posts rejected + duplicates + unknown deliveries (must be 0)",
                |r| {
                    Some(
                        r.phases
                            .values()
                            .map(|p| (p.posts_rejected + p.duplicates) as f64)
                            .sum::<f64>()
                            + r.unknown_deliveries as f64,
                    )
                },
                0,
            ),
            (
                "pool stalls (a slot still in flight when due)",
                |r| Some(r.phases.values().map(|p| p.pool_stalls as f64).sum()),
                0,
            ),
            (
                "posts sent > 5 ms after they were due (generator behind)",
                |r| Some(r.phases.values().map(|p| p.late_posts as f64).sum()),
                0,
            ),
        ];
        for (label, get, digits) in run_rows {
            let cells: Vec<String> = by_m
                .iter()
                .map(|runs| {
                    cell(
                        &runs.iter().filter_map(|r| get(r)).collect::<Vec<_>>(),
                        *digits,
                    )
                })
                .collect();
            let _ = writeln!(out, "| {label} | {} |", cells.join(" | "));
        }
        let errors: Vec<String> = inv
            .runs
            .iter()
            .flat_map(|r| {
                r.phases.iter().flat_map(move |(name, p)| {
                    p.errors
                        .iter()
                        .map(move |e| format!("M={} rep {} {name}: {e}", r.plan.members, r.rep))
                })
            })
            .collect();
        if !errors.is_empty() {
            let _ = writeln!(out, "\nErrors:\n");
            for e in errors.iter().take(20) {
                let _ = writeln!(out, "- {e}");
            }
        }
        let _ = writeln!(out);
    }
    if let Some(idle) = &inv.idle {
        let p = &idle.plan;
        let _ = writeln!(
            out,
            "Idle sessions: {} sessions opened ({} failed) over {} rooms of {} members (each member several sessions per room), {} session(s) per connection, {} joins at a time, on a fresh node whose rooms and keys were set up first ({:.1} s).\n",
            idle.sessions_open,
            idle.failed_joins,
            p.rooms,
            idle.users,
            p.sessions_per_connection,
            p.join_concurrency,
            idle.setup_s,
        );
        let _ = writeln!(out, "| metric | value |\n|---|---|");
        let rows = [
            ("server VmRSS before, MiB", fmt(idle.rss_before_mb, 1)),
            (
                "server VmRSS with all sessions open and idle, MiB",
                fmt(idle.rss_after_mb, 1),
            ),
            (
                "**RSS per idle joined session, KiB**",
                fmt(idle.kib_per_session, 1),
            ),
            (
                "server VmRSS after closing them, MiB",
                fmt(idle.rss_after_close_mb, 1),
            ),
            ("server VmHWM, MiB", fmt(idle.vmhwm_mb, 1)),
            ("time to open them all, s", fmt(idle.join_s, 1)),
            (
                "client CPU while opening (RSA signature per join), s",
                fmt(idle.client_join_cpu_s, 1),
            ),
            (
                "server CPU while opening, s",
                fmt(idle.server_join_cpu_s, 1),
            ),
            (
                "frames received on idle sessions after joining",
                idle.frames_after_join.to_string(),
            ),
        ];
        for (k, v) in rows {
            let _ = writeln!(out, "| {k} | {v} |");
        }
        if !idle.errors.is_empty() {
            let _ = writeln!(out, "\nJoin errors: {:?}", idle.errors);
        }
        let _ = writeln!(out);
    }
    out
}
