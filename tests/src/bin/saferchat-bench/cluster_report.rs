//! The Markdown report of `saferchat-bench cluster`: machine facts, the
//! exact command, the workload, per cluster size the median [min – max]
//! over the repetitions of every metric, the ratio the cluster issue asks
//! about, the no-loss checks and the failover trials.

use std::fmt::Write as _;

use serde::Serialize;

use crate::failover::FailoverResult;
use crate::procfs::MachineFacts;
use crate::report::{cell, fmt};
use crate::rooms::{RoomsPhase, RoomsRun};
use crate::stats::median;

/// Everything one invocation measured, as written to `summary.json`.
#[derive(Clone, Debug, Serialize)]
pub struct ClusterInvocation {
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
    /// Where this process ran.
    pub client_placement: String,
    /// 1-minute load average at the start.
    pub loadavg_start: f64,
    /// The many-rooms runs.
    pub runs: Vec<RoomsRun>,
    /// The failover trials.
    pub failover: Option<FailoverResult>,
}

type Getter = fn(&RoomsPhase) -> Option<f64>;

const PHASE_ROWS: &[(&str, Getter, usize)] = &[
    ("posts acknowledged per s", |p| Some(p.acked_msgs_per_s), 0),
    (
        "**deliveries/s** (to members other than the sender)",
        |p| Some(p.deliveries_per_s),
        0,
    ),
    (
        "**node CPU µs per delivery** (all nodes, user + system)",
        |p| p.server_cpu_us_per_delivery,
        2,
    ),
    (
        "node CPU, cores busy (all nodes)",
        |p| Some(p.server_cores),
        2,
    ),
    ("post → delivery p50 ms", |p| p.latency.p50_ms, 2),
    ("post → delivery p99 ms", |p| p.latency.p99_ms, 2),
    (
        "… sender and receiver joined through the same node: p50 ms",
        |p| p.latency_same_node.p50_ms,
        2,
    ),
    ("… same node: p99 ms", |p| p.latency_same_node.p99_ms, 2),
    (
        "… through different nodes: p50 ms",
        |p| p.latency_cross_node.p50_ms,
        2,
    ),
    (
        "… different nodes: p99 ms",
        |p| p.latency_cross_node.p99_ms,
        2,
    ),
    (
        "… receiver connected straight to the serving node: p99 ms",
        |p| p.latency_receiver_direct.p99_ms,
        2,
    ),
    (
        "… receiver redirected to it: p99 ms",
        |p| p.latency_receiver_redirected.p99_ms,
        2,
    ),
    (
        "**post → Accepted (acknowledgement) p50 ms**",
        |p| p.ack_latency.p50_ms,
        2,
    ),
    ("post → Accepted p99 ms", |p| p.ack_latency.p99_ms, 2),
    (
        "load generator CPU, share of its core",
        |p| Some(p.client_cpu_util),
        2,
    ),
    (
        "other processes' CPU, cores",
        |p| Some(p.other_cpu_cores),
        2,
    ),
    (
        "load average (1 min) at window start",
        |p| Some(p.loadavg_1m.0),
        1,
    ),
    (
        "load average (1 min) at window end",
        |p| Some(p.loadavg_1m.1),
        1,
    ),
    (
        "delivered fraction (must be 1)",
        |p| p.delivered_fraction,
        4,
    ),
    (
        "senders whose pool ran out (must be 0)",
        |p| Some(p.pool_exhausted as f64),
        0,
    ),
    (
        "posts sent > 5 ms after their scheduled time (generator behind)",
        |p| Some(p.late_posts as f64),
        0,
    ),
    (
        "longest send lag behind the schedule, ms",
        |p| Some(p.send_lag_max_ms),
        1,
    ),
];

type RunGetter = fn(&RoomsRun) -> Option<f64>;

const RUN_ROWS: &[(&str, RunGetter, usize)] = &[
    (
        "setup: create rooms + add members, s",
        |r| Some(r.setup.create_s),
        1,
    ),
    (
        "setup: every member's first join, s",
        |r| Some(r.setup.join_s),
        1,
    ),
    ("setup: join median ms", |r| r.setup.join_ms_median, 1),
    (
        "setup: seal or load the pools, s",
        |r| Some(r.setup.seal_s),
        1,
    ),
    (
        "node CPU over the whole run, s",
        |r| Some(r.server_cpu_total_s),
        1,
    ),
    (
        "highest node VmHWM, MiB",
        |r| Some(r.server_vmhwm_mb_max),
        0,
    ),
    (
        "sessions redirected (of all)",
        |r| Some(r.setup.topology.redirected_sessions as f64),
        0,
    ),
    (
        "**checks**: every check passed (1 = yes)",
        |r| Some(f64::from(u8::from(r.loss.clean()))),
        0,
    ),
    ("posts sent", |r| Some(r.loss.posts_sent as f64), 0),
    ("posts acknowledged", |r| Some(r.loss.posts_acked as f64), 0),
    (
        "posts never answered (must be 0)",
        |r| Some(r.loss.posts_unanswered as f64),
        0,
    ),
    (
        "rooms whose acknowledged numbers are not 1..N (must be 0)",
        |r| Some(r.loss.rooms_bad_acked_seqs as f64),
        0,
    ),
    (
        "sessions that did not receive exactly 1..N in order (must be 0)",
        |r| Some(r.loss.sessions_bad_deliveries as f64),
        0,
    ),
    (
        "rooms whose History was read",
        |r| Some(r.loss.rooms_history_read as f64),
        0,
    ),
    (
        "rooms whose History is not exactly the acknowledged posts (must be 0)",
        |r| Some(r.loss.rooms_bad_history as f64),
        0,
    ),
    (
        "rejected + duplicate + unknown deliveries (must be 0)",
        |r| {
            Some(
                r.phases
                    .values()
                    .map(|p| (p.rejected + p.duplicates) as f64)
                    .sum::<f64>()
                    + r.unknown_deliveries as f64,
            )
        },
        0,
    ),
    (
        "sampled deliveries verified + decrypted / failures",
        |r| Some(r.phases.values().map(|p| p.verified_samples as f64).sum()),
        0,
    ),
    (
        "verification failures (must be 0)",
        |r| Some(r.phases.values().map(|p| p.verify_failures as f64).sum()),
        0,
    ),
    (
        "sessions the node ended (must be 0)",
        |r| Some(r.stream_errors.len() as f64),
        0,
    ),
];

fn sizes(inv: &ClusterInvocation) -> Vec<usize> {
    let mut n: Vec<usize> = inv.runs.iter().map(|r| r.plan.nodes).collect();
    n.sort_unstable();
    n.dedup();
    n
}

fn phase_median(runs: &[&RoomsRun], phase: &str, get: Getter) -> Option<f64> {
    median(
        &runs
            .iter()
            .filter_map(|r| r.phases.get(phase))
            .filter_map(get)
            .collect::<Vec<_>>(),
    )
}

/// Renders the report.
#[allow(clippy::too_many_lines)]
pub fn markdown(inv: &ClusterInvocation) -> String {
    let mut out = String::new();
    let m = &inv.machine;
    let _ = writeln!(out, "# saferchat cluster benchmark: many rooms\n");
    let _ = writeln!(
        out,
        "Runs from {} to {} (UTC). Tool: {}. Load average (1 min) at the start: {:.2}.\n",
        inv.started_utc, inv.ended_utc, inv.tool, inv.loadavg_start
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
    let _ = writeln!(out, "Load generator: {}.\n", inv.client_placement);
    let ns = sizes(inv);
    if let Some(first) = inv.runs.first() {
        let p = &first.plan;
        for &n in &ns {
            if let Some(r) = inv.runs.iter().find(|r| r.plan.nodes == n) {
                let _ = writeln!(
                    out,
                    "Nodes, N={n}: `{}`; {}.\n",
                    r.node_command,
                    r.node_placement.join("; ")
                );
            }
        }
        let _ = writeln!(
            out,
            "Workload: {} rooms of {} members; member i of room r is user (r·M + i) mod U and joins through node (r + i) mod N, following the redirect; every session on its own TCP connection. The first {} member(s) of each room send {}-byte bodies as real envelope v1, pre-sealed: {} distinct envelopes per room, each posted at most once per run (the node takes a repeated sender+nonce among a room's last 256 posts for a retry). Fixed rate: {} messages/s over all rooms, handed to the senders in turn (so to consecutive rooms), {} s warm-up, {} s measured. Saturation: closed loop, {} post(s) in flight per sender (until the sender receives its own post back), {} s warm-up, {} s measured. Deliveries and latency: deliveries to members other than the sender received inside the window; latency = receive instant − the post's due instant in this process (its scheduled time in the fixed-rate phase, so a generator that falls behind shows it in the latency and in the count of late posts; when its predecessor's echo freed it at saturation). Node CPU: user + system time of every node process from /proc over the window.\n",
            p.rooms,
            p.members,
            p.senders_per_room,
            p.body_bytes,
            p.pool,
            p.rate_msgs_per_s,
            p.rate_warmup_s,
            p.rate_duration_s,
            p.window,
            p.sat_warmup_s,
            p.sat_duration_s,
        );
        let by_n: Vec<Vec<&RoomsRun>> = ns
            .iter()
            .map(|n| inv.runs.iter().filter(|r| r.plan.nodes == *n).collect())
            .collect();
        let _ = writeln!(out, "Cells: median [min – max] over the repetitions.\n");
        let header: Vec<String> = ns
            .iter()
            .zip(&by_n)
            .map(|(n, runs)| format!("N={n} ({} reps)", runs.len()))
            .collect();
        let _ = writeln!(out, "| phase | metric | {} |", header.join(" | "));
        let _ = writeln!(out, "|---|---|{}", "---|".repeat(ns.len()));
        for phase in &p.phases {
            for (label, get, digits) in PHASE_ROWS {
                let cells: Vec<String> = by_n
                    .iter()
                    .map(|runs| {
                        cell(
                            &runs
                                .iter()
                                .filter_map(|r| r.phases.get(phase))
                                .filter_map(get)
                                .collect::<Vec<_>>(),
                            *digits,
                        )
                    })
                    .collect();
                let _ = writeln!(out, "| {phase} | {label} | {} |", cells.join(" | "));
            }
        }
        for (label, get, digits) in RUN_ROWS {
            let cells: Vec<String> = by_n
                .iter()
                .map(|runs| {
                    cell(
                        &runs.iter().filter_map(|r| get(r)).collect::<Vec<_>>(),
                        *digits,
                    )
                })
                .collect();
            let _ = writeln!(out, "| run | {label} | {} |", cells.join(" | "));
        }
        let _ = writeln!(out);
        // The ratio the issue asks about.
        if let (Some(one), Some(k)) = (
            ns.iter().position(|n| *n == 1),
            ns.iter().position(|n| *n > 1),
        ) {
            for phase in &p.phases {
                let get: Getter = |p| p.server_cpu_us_per_delivery;
                if let (Some(a), Some(b)) = (
                    phase_median(&by_n[one], phase, get),
                    phase_median(&by_n[k], phase, get),
                ) {
                    let ratio = b / a;
                    let _ = writeln!(
                        out,
                        "- {phase}: node CPU per delivery, N={} / N=1 = {} / {} µs = **{}×** (goal ≤ 1.5×: {})",
                        ns[k],
                        fmt(b, 2),
                        fmt(a, 2),
                        fmt(ratio, 2),
                        if ratio <= 1.5 { "met" } else { "missed" }
                    );
                }
            }
            let _ = writeln!(out);
        }
        for (n, runs) in ns.iter().zip(&by_n) {
            for r in runs.iter().filter(|_| *n > 1) {
                let t = &r.setup.topology;
                let _ = writeln!(
                    out,
                    "Topology, N={n} rep {}: rooms served per node {:?}; sessions [joined through][ended on] {:?}; {} connected straight to the serving node, {} redirected, {} not on their room's serving node.\n",
                    r.rep,
                    t.rooms_per_node,
                    t.sessions,
                    t.direct_sessions,
                    t.redirected_sessions,
                    t.split_rooms
                );
                for (name, ph) in &r.phases {
                    let per_node: Vec<String> = ph
                        .server_cpu_s_per_node
                        .iter()
                        .map(|c| fmt(c / ph.window_s, 2))
                        .collect();
                    let _ = writeln!(
                        out,
                        "- N={n} rep {} {name}: cores busy per node {}",
                        r.rep,
                        per_node.join(" / ")
                    );
                }
                let _ = writeln!(out);
            }
        }
        let problems: Vec<String> = inv
            .runs
            .iter()
            .flat_map(|r| {
                let head = format!("N={} rep {}", r.plan.nodes, r.rep);
                r.phases
                    .iter()
                    .flat_map(|(name, p)| p.errors.iter().map(move |e| format!("{name}: {e}")))
                    .chain(r.loss.problems.iter().cloned())
                    .chain(r.stream_errors.iter().cloned())
                    .map(move |e| format!("{head} {e}"))
            })
            .collect();
        if !problems.is_empty() {
            let _ = writeln!(out, "Problems:\n");
            for e in problems.iter().take(30) {
                let _ = writeln!(out, "- {e}");
            }
            let _ = writeln!(out);
        }
    }
    if let Some(f) = &inv.failover {
        let p = &f.plan;
        let _ = writeln!(
            out,
            "## Failover\n\nNodes: `{}`. {} trials on one 3-node cluster; each a fresh room, a member posting {} posts/s; SIGKILL of the room's leader after {} s; the client rejoins through a surviving node (a new attempt every {} ms while it fails), re-sends every unacknowledged envelope byte for byte and goes on posting for {} s after the first post the new leader accepted; then the killed node restarts and the tool waits (≤ {} s) until it applied the partition as far as the leader.\n",
            f.node_command,
            p.trials,
            p.rate_per_s,
            p.before_kill_s,
            p.retry_ms,
            p.after_s,
            p.catchup_max_s
        );
        if let Some((lo, mid, hi)) = f.failover_ms_min_p50_max {
            let _ = writeln!(
                out,
                "**SIGKILL → first Accepted from the new leader: min {} ms, p50 {} ms, max {} ms.** Every trial clean (all posts acknowledged once, numbers 1..N, History exact): {}.\n",
                fmt(lo, 0),
                fmt(mid, 0),
                fmt(hi, 0),
                if f.all_clean { "yes" } else { "**no**" }
            );
        }
        let _ = writeln!(
            out,
            "| trial | partition | killed → new leader (rank) | stream ended ms | rejoined ms (attempts) | **first Accepted ms** | posts | re-sent (recovered) | numbers 1..N | in posting order | History exact | restart ms | caught up ms | load |"
        );
        let _ = writeln!(
            out,
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"
        );
        for t in &f.trials {
            let _ = writeln!(
                out,
                "| {} | {} | n{} → n{} ({}) | {} | {} ({}) | {} | {} | {} ({}) | {} | {} | {} | {} | {} | {} |",
                t.trial,
                t.partition,
                t.killed,
                t.new_leader,
                t.new_leader_rank.map_or("?".into(), |r| r.to_string()),
                fmt(t.detect_ms, 0),
                fmt(t.rejoin_ms, 0),
                t.join_attempts,
                fmt(t.failover_ms, 0),
                t.posts,
                t.resent,
                t.resent_recovered,
                if t.seqs_gapless { "yes" } else { "**no**" },
                if t.seqs_in_posting_order { "yes" } else { "no" },
                if t.history_ok { "yes" } else { "**no**" },
                fmt(t.restart_ms, 0),
                t.catchup_ms.map_or("–".into(), |c| fmt(c, 0)),
                fmt(t.loadavg_1m, 1),
            );
        }
        let errors: Vec<String> = f
            .trials
            .iter()
            .flat_map(|t| {
                t.errors
                    .iter()
                    .map(move |e| format!("trial {}: {e}", t.trial))
            })
            .collect();
        if !errors.is_empty() {
            let _ = writeln!(out, "\nProblems:\n");
            for e in errors.iter().take(30) {
                let _ = writeln!(out, "- {e}");
            }
        }
        let _ = writeln!(out);
    }
    out
}
