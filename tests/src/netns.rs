//! Packet loss on chosen loopback links, inside a network namespace the
//! test makes for itself.
//!
//! A TCP proxy cannot lose packets (it forwards a byte stream), and the
//! kernel here has no `netem` queueing discipline, so loss comes from
//! nftables: a rule on the `input` hook of the namespace's loopback drops
//! a random share of the packets to or from a proxy's port (the sender
//! does not know, so TCP retransmits, as on a lossy network). Rules live
//! only in the namespace: [`reexec_in_netns`] runs the test again inside a
//! fresh one (`unshare --net`, root only), so the machine's own loopback
//! and every parallel test are untouched, and the namespace dies with the
//! process.

use std::collections::BTreeMap;
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

/// Set in the environment of a test re-run inside its own namespace.
pub const IN_NETNS_ENV: &str = "SAFERCHAT_TEST_IN_NETNS";
const TABLE: &str = "saferchat_chaos";
const CHAIN: &str = "loss";

/// Why packet loss is not available here, or `None` when it is.
pub fn unavailable() -> Option<String> {
    if !is_root() {
        return Some("not root (a network namespace and nftables need it)".into());
    }
    for tool in ["unshare", "ip", "nft"] {
        let found = Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .stdout(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !found {
            return Some(format!("`{tool}` is not installed"));
        }
    }
    // Root in a container may still lack the right to make one.
    let works = Command::new("unshare")
        .args(["--net", "true"])
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !works {
        return Some("`unshare --net` is not permitted here".into());
    }
    None
}

/// Whether the effective user is root (`/proc/self/status`: no unsafe
/// code for `geteuid`).
fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Uid:"))
                .and_then(|ids| ids.split_whitespace().nth(1).map(|e| e == "0"))
        })
        .unwrap_or(false)
}

/// Whether this process runs inside the namespace [`reexec_in_netns`]
/// made.
pub fn inside() -> bool {
    std::env::var_os(IN_NETNS_ENV).is_some()
}

/// Runs this binary again with `args`, inside a fresh network namespace
/// (environment and output passed through), and returns whether it
/// succeeded. Call it only where [`unavailable`] is `None`.
pub fn reexec_in_netns(args: &[String]) -> bool {
    let exe = std::env::current_exe().expect("this binary");
    Command::new("unshare")
        .arg("--net")
        .arg("--")
        .arg(exe)
        .args(args)
        .env(IN_NETNS_ENV, "1")
        .status()
        .expect("run unshare")
        .success()
}

/// For a test that wants a namespace of its own: `true` when the caller
/// should go on and run the test here (inside its namespace, or where one
/// cannot be made: then it says why loss is skipped); otherwise runs test
/// `name` again inside a fresh namespace, panics if that run failed, and
/// returns `false`. Blocking.
///
/// # Panics
/// When the run inside the namespace failed.
pub fn run_here_or_inside(name: &str) -> bool {
    if inside() {
        return true;
    }
    if let Some(why) = unavailable() {
        eprintln!("{name}: packet loss is skipped: {why}");
        return true;
    }
    assert!(
        reexec_in_netns(&test_args(name)),
        "{name}: the run inside its own network namespace failed"
    );
    false
}

/// The arguments that run test `name` alone in a libtest binary.
pub fn test_args(name: &str) -> Vec<String> {
    // Ignored tests (those that need Cassandra) run too: the caller is
    // one of them only when it was asked for.
    [
        name,
        "--exact",
        "--include-ignored",
        "--nocapture",
        "--test-threads",
        "1",
    ]
    .map(str::to_owned)
    .to_vec()
}

/// Loss rules on the namespace's loopback, by proxy port.
#[derive(Debug)]
pub struct Loss {
    /// Percent of packets dropped, per port.
    ports: Mutex<BTreeMap<u16, u8>>,
    /// Packets the rules dropped before they were last rewritten.
    dropped_before: AtomicU64,
}

/// Runs `program` with `args` (no shell: `<` in a rule is nft's).
fn run(program: &str, args: &[&str]) -> Result<(), String> {
    let out = Command::new(program)
        .args(args)
        .output()
        .map_err(|e| format!("{program}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "`{program} {}`: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

impl Loss {
    /// Brings the namespace's loopback up and makes an empty rule chain.
    ///
    /// # Errors
    /// When not inside a namespace of our own (loss rules on the machine's
    /// loopback would hit every other process), or a command fails.
    pub fn set_up() -> Result<Loss, String> {
        if !inside() {
            return Err("packet loss only inside the test's own network namespace".into());
        }
        run("ip", &["link", "set", "lo", "up"])?;
        run("nft", &["add", "table", "inet", TABLE])?;
        run(
            "nft",
            &[
                "add",
                "chain",
                "inet",
                TABLE,
                CHAIN,
                "{ type filter hook input priority 0; policy accept; }",
            ],
        )?;
        Ok(Loss {
            ports: Mutex::new(BTreeMap::new()),
            dropped_before: AtomicU64::new(0),
        })
    }

    /// Drops `percent` % of the packets to and from `port` (0: none).
    ///
    /// # Panics
    /// When the rules cannot be written.
    pub fn set(&self, port: u16, percent: u8) {
        let mut ports = self.ports.lock().expect("lock");
        if percent == 0 {
            ports.remove(&port);
        } else {
            ports.insert(port, percent.min(100));
        }
        self.dropped_before.fetch_add(counted(), Ordering::SeqCst);
        let mut result = run("nft", &["flush", "chain", "inet", TABLE, CHAIN]);
        for (port, percent) in ports.iter() {
            for dir in ["dport", "sport"] {
                let (port, percent) = (port.to_string(), percent.to_string());
                result = result.and_then(|()| {
                    let mut rule = vec!["add", "rule", "inet", TABLE, CHAIN, "tcp", dir, &port];
                    // nft's random numbers are 0..99: everything is no test.
                    if percent != "100" {
                        rule.extend(["numgen", "random", "mod", "100", "<", &percent]);
                    }
                    rule.extend(["counter", "drop"]);
                    run("nft", &rule)
                });
            }
        }
        result.unwrap_or_else(|e| panic!("setting packet loss: {e}"));
    }

    /// Packets dropped so far (the rules count them).
    pub fn dropped(&self) -> u64 {
        self.dropped_before.load(Ordering::SeqCst) + counted()
    }

    /// Which ports lose what share now.
    pub fn active(&self) -> Vec<(u16, u8)> {
        self.ports
            .lock()
            .expect("lock")
            .iter()
            .map(|(p, l)| (*p, *l))
            .collect()
    }
}

/// Packets the chain's current rules have dropped (`counter` of each).
fn counted() -> u64 {
    let out = Command::new("nft")
        .args(["list", "chain", "inet", TABLE, CHAIN])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    out.split_whitespace()
        .collect::<Vec<_>>()
        .windows(3)
        .filter(|w| w[0] == "counter" && w[1] == "packets")
        .filter_map(|w| w[2].parse::<u64>().ok())
        .sum()
}
