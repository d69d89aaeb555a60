//! What the kernel says about processes and the machine: CPU time, memory,
//! and the facts a benchmark report must carry (the numbers mean little
//! without them). Linux only (`/proc`). The one reader of `/proc` for the
//! tests and every bench binary.

use std::path::Path;
use std::process::Command;
use std::sync::OnceLock;

use serde::Serialize;

/// Clock ticks per second of `/proc/*/stat` times (USER_HZ). 100 on every
/// Linux this runs on; read once from `getconf` in case it is not.
pub fn clock_ticks_per_s() -> f64 {
    static TICKS: OnceLock<f64> = OnceLock::new();
    *TICKS.get_or_init(|| {
        stdout_of("getconf", &["CLK_TCK"])
            .parse::<f64>()
            .ok()
            .filter(|t| *t > 0.0)
            .unwrap_or(100.0)
    })
}

/// A command's standard output, trimmed; `?` when it cannot run.
pub fn stdout_of(program: &str, args: &[&str]) -> String {
    Command::new(program)
        .args(args)
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_else(|| "?".into())
}

/// The 1, 5 and 15 minute load averages.
pub fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

/// CPU seconds (user + system, all threads) a process has used (`pid`
/// may be `self`); `None` when it is gone.
pub fn cpu_seconds(pid: &str) -> Option<f64> {
    process_cpu_s(pid, clock_ticks_per_s())
}

/// utime + stime of a process (all its threads), in seconds, or `None`
/// when it is gone.
pub fn process_cpu_s(pid: &str, ticks_per_s: f64) -> Option<f64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may contain spaces: fields start after the last ')'.
    let rest = &text[text.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // Field 3 (state) is fields[0]; utime and stime are fields 14 and 15.
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime) / ticks_per_s)
}

/// A `Vm*` line of `/proc/PID/status`, in bytes.
pub fn process_vm_bytes(pid: &str, field: &str) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    text.lines()
        .find(|l| l.starts_with(field) && l[field.len()..].starts_with(':'))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|kb| kb.parse::<u64>().ok())
        .map(|kb| kb * 1024)
}

/// Resident set size now.
pub fn rss_bytes(pid: &str) -> Option<u64> {
    process_vm_bytes(pid, "VmRSS")
}

/// Peak resident set size since the process started.
pub fn hwm_bytes(pid: &str) -> Option<u64> {
    process_vm_bytes(pid, "VmHWM")
}

/// Busy CPU seconds of the whole machine (every CPU, not idle or iowait).
pub fn machine_busy_s(ticks_per_s: f64) -> f64 {
    let text = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let v: Vec<f64> = text
        .lines()
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .skip(1)
        .take(8)
        .filter_map(|x| x.parse().ok())
        .collect();
    if v.len() < 8 {
        return 0.0;
    }
    let idle = v[3] + v[4];
    (v.iter().sum::<f64>() - idle) / ticks_per_s
}

/// The CPUs a process may run on, as the kernel lists them (e.g. "1").
pub fn cpus_allowed(pid: &str) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
        .map(|s| s.trim().to_owned())
        .unwrap_or_default()
}

/// The scheduling policy and priority of a process, as `chrt -p` says.
pub fn scheduling(pid: &str) -> String {
    Command::new("chrt")
        .args(["-p", pid])
        .output()
        .ok()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .map(|l| l.split_once(": ").map_or(l, |(_, v)| v).trim().to_owned())
                .collect::<Vec<_>>()
                .join(", ")
        })
        .unwrap_or_default()
}

/// The machine and build a result was measured on.
#[derive(Clone, Debug, Serialize)]
pub struct MachineFacts {
    /// CPUs of the machine (not of this process's affinity).
    pub nproc: usize,
    /// `model name` of /proc/cpuinfo.
    pub cpu_model: String,
    /// MemTotal in GiB.
    pub mem_total_gib: f64,
    /// Kernel release.
    pub kernel: String,
    /// /etc/debian_version.
    pub debian: String,
    /// `rustc --version`.
    pub rustc: String,
    /// `git rev-parse HEAD` of the checkout, plus how many files differ.
    pub git_commit: String,
    /// Files changed against HEAD when measured.
    pub git_dirty_files: usize,
}

fn command_line(program: &str, args: &[&str], dir: Option<&Path>) -> String {
    let mut command = Command::new(program);
    command.args(args);
    if let Some(dir) = dir {
        command.current_dir(dir);
    }
    command
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default()
}

/// CPU model, core count, memory, kernel and compiler, as report rows
/// (from the same readings as [`machine_facts`]).
pub fn common_facts() -> Vec<(String, String)> {
    let f = machine_facts(Path::new("."));
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    vec![
        ("CPU".into(), f.cpu_model),
        ("cores (nproc)".into(), cores.to_string()),
        ("memory".into(), format!("{} GiB", f.mem_total_gib)),
        ("kernel".into(), f.kernel),
        ("rustc".into(), f.rustc),
    ]
}

/// Collects [`MachineFacts`]; `repo` is the git checkout the binaries come
/// from.
pub fn machine_facts(repo: &Path) -> MachineFacts {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let mem_kb: f64 = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0);
    let status = command_line("git", &["status", "--porcelain"], Some(repo));
    MachineFacts {
        nproc: cpuinfo
            .lines()
            .filter(|l| l.starts_with("processor"))
            .count(),
        cpu_model: cpuinfo
            .lines()
            .find_map(|l| l.strip_prefix("model name"))
            .map(|v| v.trim_start_matches([' ', '\t', ':']).to_owned())
            .unwrap_or_default(),
        mem_total_gib: (mem_kb / (1024.0 * 1024.0) * 10.0).round() / 10.0,
        kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .unwrap_or_default()
            .trim()
            .to_owned(),
        debian: std::fs::read_to_string("/etc/debian_version")
            .unwrap_or_default()
            .trim()
            .to_owned(),
        rustc: command_line("rustc", &["--version"], None),
        git_commit: command_line("git", &["rev-parse", "HEAD"], Some(repo)),
        git_dirty_files: status.lines().count(),
    }
}

/// CPU time and memory of one process, plus the machine's busy time, at
/// one instant.
#[derive(Clone, Copy, Debug)]
pub struct Snapshot {
    /// The server's utime + stime, seconds.
    pub server_cpu_s: f64,
    /// This process's utime + stime, seconds.
    pub client_cpu_s: f64,
    /// The whole machine's busy time, seconds.
    pub machine_busy_s: f64,
    /// When.
    pub at: std::time::Instant,
}

/// Reads a [`Snapshot`].
pub fn snapshot(server_pid: &str, ticks_per_s: f64) -> Snapshot {
    Snapshot {
        server_cpu_s: process_cpu_s(server_pid, ticks_per_s).unwrap_or(f64::NAN),
        client_cpu_s: process_cpu_s("self", ticks_per_s).unwrap_or(f64::NAN),
        machine_busy_s: machine_busy_s(ticks_per_s),
        at: std::time::Instant::now(),
    }
}
