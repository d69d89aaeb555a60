//! Node and CLI processes.

use std::io::{BufRead as _, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use crate::ADMIN_TOKEN;

/// How long a node may take to start.
const START_TIMEOUT: Duration = Duration::from_secs(20);
/// How long a node may take to stop after SIGTERM.
const STOP_TIMEOUT: Duration = Duration::from_secs(30);

/// Stops processes the way an operator would: SIGTERM to all, then waits
/// up to `within` (shared) for each to exit, and SIGKILLs those still
/// running. Returns each one's exit status, `None` for a killed one. Every
/// node launcher (tests, `saferchat-bench`) stops its nodes with this.
pub fn terminate(children: &mut [&mut Child], within: Duration) -> Vec<Option<ExitStatus>> {
    for child in children.iter() {
        let _ = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .stderr(Stdio::null())
            .status();
    }
    let deadline = Instant::now() + within;
    children
        .iter_mut()
        .map(|child| {
            loop {
                match child.try_wait() {
                    Ok(Some(status)) => break Some(status),
                    Err(_) => break None,
                    Ok(None) if Instant::now() >= deadline => {
                        eprintln!("pid {} did not stop within {within:?}: SIGKILL", child.id());
                        let _ = child.kill();
                        let _ = child.wait();
                        break None;
                    }
                    // std has no wait with a timeout; a process exit is
                    // polled, bounded by the deadline.
                    Ok(None) => std::thread::sleep(Duration::from_millis(20)),
                }
            }
        })
        .collect()
}

/// Sends signal `which` (`kill`'s spelling: `-STOP`, `-CONT`) to `pid`;
/// a process that is gone is not an error.
pub fn signal(pid: u32, which: &str) {
    let _ = Command::new("kill")
        .args([which, &pid.to_string()])
        .status();
}

/// A running `saferchat-node` process.
#[derive(Debug)]
pub struct NodeProcess {
    child: Option<Child>,
    /// Its data folder.
    pub data_dir: PathBuf,
    /// Where its log goes (JSON lines).
    pub log: PathBuf,
    /// The client address it reported.
    pub addr: SocketAddr,
    /// The peer address it reported, when it has a peer listener.
    pub peer_addr: Option<SocketAddr>,
    env: Vec<(String, String)>,
    /// Bounds the test holding this node ([`crate::watchdog`]).
    _watchdog: crate::watchdog::Watchdog,
}

/// What a starting node reported before serving.
#[derive(Debug, Default)]
struct Reported {
    client: Option<SocketAddr>,
    peer: Option<SocketAddr>,
}

/// Follows the child's log until it serves; `Err` carries the log when it
/// exited first or took too long.
fn wait_until_serving(
    log: &Path,
    child: &mut Child,
    timeout: Duration,
) -> Result<Reported, String> {
    // The log is written by the child; follow it line by line.
    let (tx, rx) = mpsc::channel();
    let stderr = child.stderr.take().expect("piped stderr");
    let log_path = log.to_path_buf();
    let log = log.to_path_buf();
    std::thread::spawn(move || {
        let mut file = std::fs::OpenOptions::new()
            .append(true)
            .create(true)
            .open(&log)
            .expect("log file");
        let mut reported = Some(Reported::default());
        for line in BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            use std::io::Write as _;
            let _ = writeln!(file, "{line}");
            let Some(so_far) = reported.as_mut() else {
                continue;
            };
            let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) else {
                continue;
            };
            let addr = || {
                v["fields"]["addr"]
                    .as_str()
                    .map(|a| a.parse::<SocketAddr>().expect("address"))
            };
            match v["fields"]["message"].as_str() {
                Some("peer listener") => so_far.peer = addr(),
                Some("saferchat node serving") => {
                    so_far.client = addr();
                    let _ = tx.send(reported.take().expect("reported once"));
                }
                _ => {}
            }
        }
        // Dropping `tx` without sending tells the waiter the node exited.
    });
    let log_text = || std::fs::read_to_string(&log_path).unwrap_or_default();
    match rx.recv_timeout(timeout) {
        Ok(reported) => Ok(reported),
        Err(mpsc::RecvTimeoutError::Disconnected) => {
            let _ = child.wait();
            Err(format!(
                "node exited before serving; its log:\n{}",
                log_text()
            ))
        }
        Err(mpsc::RecvTimeoutError::Timeout) => {
            let _ = child.kill();
            let _ = child.wait();
            Err(format!(
                "node did not report its address within {timeout:?}; its log:\n{}",
                log_text()
            ))
        }
    }
}

impl NodeProcess {
    /// Starts a node with `data_dir` on 127.0.0.1:0 and extra environment.
    ///
    /// # Panics
    /// When it does not start, with its log.
    pub fn start(data_dir: &Path, env: &[(&str, &str)]) -> NodeProcess {
        NodeProcess::try_start(data_dir, env).unwrap_or_else(|log| panic!("{log}"))
    }

    /// [`NodeProcess::start`], or the node's log when it did not start.
    pub fn try_start(data_dir: &Path, env: &[(&str, &str)]) -> Result<NodeProcess, String> {
        let env: Vec<(String, String)> = env
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        let mut node = NodeProcess {
            child: None,
            data_dir: data_dir.to_path_buf(),
            log: data_dir.with_extension("log"),
            addr: "127.0.0.1:0".parse().expect("address"),
            peer_addr: None,
            env,
            _watchdog: crate::watchdog::Watchdog::arm(
                format!("the test holding node {}", data_dir.display()),
                crate::watchdog::limit(),
            ),
        };
        node.spawn()?;
        Ok(node)
    }

    /// Binds every listener the node opens on port 0 (the client one
    /// always; the peer one when its environment says 127.0.0.1:0), so no
    /// port is picked ahead of time and then lost to another test.
    fn spawn(&mut self) -> Result<(), String> {
        let mut command = Command::new(crate::bin::path("saferchat-node"));
        command
            .arg("--data-dir")
            .arg(&self.data_dir)
            .arg("--listen")
            .arg("127.0.0.1:0")
            .env("SAFERCHAT_LOG_FORMAT", "json")
            .env("SAFERCHAT_ADMIN_TOKEN", ADMIN_TOKEN)
            .env("RUST_LOG", "info")
            // Tests post in bursts; a test of the limit sets its own.
            .env("SAFERCHAT_POSTS_PER_SECOND", "0")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        for (k, v) in &self.env {
            command.env(k, v);
        }
        let mut child = command.spawn().expect("start saferchat-node");
        crate::watchdog::started(child.id());
        let reported = wait_until_serving(&self.log, &mut child, self.start_timeout())
            .inspect_err(|_| crate::watchdog::ended(child.id()))?;
        self.addr = reported.client.expect("the serving line names the address");
        self.peer_addr = reported.peer;
        self.child = Some(child);
        Ok(())
    }

    /// How long the node may take to serve: longer on Cassandra, which a
    /// starting node waits for (`connect_wait_s`, 120 s unless set).
    fn start_timeout(&self) -> Duration {
        if self.env("SAFERCHAT_STORAGE") != Some("cassandra") {
            return START_TIMEOUT;
        }
        let wait_s = self
            .env("SAFERCHAT_CASSANDRA_CONNECT_WAIT_S")
            .map_or(120, |v| v.parse().expect("a number of seconds"));
        START_TIMEOUT + Duration::from_secs(wait_s)
    }

    /// The value of an environment variable the node was given.
    pub fn env(&self, key: &str) -> Option<&str> {
        self.env
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    /// Sets (or replaces) an environment variable for the next restart.
    pub fn set_env(&mut self, key: &str, value: &str) {
        self.env.retain(|(k, _)| k != key);
        self.env.push((key.to_owned(), value.to_owned()));
    }

    /// The process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// The address as the CLI wants it.
    pub fn server(&self) -> String {
        self.addr.to_string()
    }

    /// SIGTERM and wait for a clean exit; returns whether it exited 0.
    pub fn stop(&mut self) -> bool {
        let Some(mut child) = self.child.take() else {
            return true;
        };
        let stopped = terminate(&mut [&mut child], STOP_TIMEOUT)[0].is_some_and(|s| s.success());
        crate::watchdog::ended(child.id());
        stopped
    }

    /// SIGSTOP: the process stalls (as in a long pause) until
    /// [`NodeProcess::resume`].
    pub fn pause(&self) {
        self.signal("-STOP");
    }

    /// SIGCONT.
    pub fn resume(&self) {
        self.signal("-CONT");
    }

    fn signal(&self, which: &str) {
        if let Some(pid) = self.pid() {
            signal(pid, which);
        }
    }

    /// SIGKILL: a crash.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
            crate::watchdog::ended(child.id());
        }
    }

    /// Starts the node again on its data, on fresh ports ([`NodeProcess::addr`]
    /// and [`NodeProcess::peer_addr`] change).
    ///
    /// # Panics
    /// When it does not start, with its log.
    pub fn restart(&mut self) {
        self.try_restart().unwrap_or_else(|log| panic!("{log}"));
    }

    /// [`NodeProcess::restart`], or the node's log when it did not start.
    pub fn try_restart(&mut self) -> Result<(), String> {
        assert!(self.child.is_none(), "stop or kill the node first");
        self.spawn()
    }

    /// How the process ended, if it did (`None` while it runs, or when
    /// the harness stopped or killed it).
    pub fn exit_status(&mut self) -> Option<ExitStatus> {
        let child = self.child.as_mut()?;
        let status = child.try_wait().ok().flatten();
        if status.is_some() {
            crate::watchdog::ended(child.id());
        }
        status
    }

    /// The node's log so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for NodeProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Runs the `saferchat` CLI with `args` against `server`, as the user whose
/// key is `key`, with `stdin` as input.
pub fn cli(server: &str, key: Option<&Path>, args: &[&str], stdin: Option<&str>) -> Output {
    cli_with_env(server, key, args, stdin, &[])
}

/// [`cli`] with extra environment variables (the key passphrase ones are
/// otherwise removed, so a developer's own never leaks into a test).
///
/// # Panics
/// When the CLI cannot be started.
pub fn cli_with_env(
    server: &str,
    key: Option<&Path>,
    args: &[&str],
    stdin: Option<&str>,
    env: &[(&str, &str)],
) -> Output {
    let mut command = Command::new(crate::bin::path("saferchat"));
    command.arg("--server").arg(server);
    if let Some(key) = key {
        command.arg("--key").arg(key);
    }
    command
        .args(args)
        .env("SAFERCHAT_ADMIN_TOKEN", ADMIN_TOKEN)
        .env_remove("SAFERCHAT_KEY")
        .env_remove("SAFERCHAT_KEY_PASSPHRASE")
        .env_remove("SAFERCHAT_NEW_KEY_PASSPHRASE")
        .envs(env.iter().copied())
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = command.spawn().expect("run saferchat");
    if let Some(input) = stdin {
        use std::io::Write as _;
        let mut pipe = child.stdin.take().expect("stdin");
        pipe.write_all(input.as_bytes()).expect("write stdin");
    }
    child.wait_with_output().expect("saferchat output")
}

/// Stdout of a CLI run that must succeed.
///
/// # Panics
/// With both output streams when it failed.
pub fn ok(output: &Output) -> String {
    assert!(
        output.status.success(),
        "saferchat failed ({}):\nstdout: {}\nstderr: {}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// Stderr of a CLI run that must fail.
///
/// # Panics
/// When it succeeded.
pub fn fails(output: &Output) -> String {
    assert!(
        !output.status.success(),
        "saferchat should have failed:\nstdout: {}",
        String::from_utf8_lossy(&output.stdout)
    );
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// Posts `text` to `room` with the CLI's `send`, as the owner of `key`.
///
/// # Panics
/// When the CLI fails or does not report the post as sent.
pub fn send(server: &str, key: &Path, room: &str, text: &str) {
    let out = ok(&cli(server, Some(key), &["send", room, text], None));
    assert!(out.starts_with("sent "), "{out}");
}

/// The CLI's `history` of `room` (up to 100 messages) as the owner of `key`.
///
/// # Panics
/// When the CLI fails.
pub fn history(server: &str, key: &Path, room: &str) -> String {
    ok(&cli(
        server,
        Some(key),
        &["history", room, "--limit", "100"],
        None,
    ))
}

/// Whether `needle` occurs in `haystack`: searching stored bytes for a
/// plaintext.
pub fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// Writes fixture key `n` to `dir/name.pem` (mode 0600) and returns its
/// path and handle.
pub fn fixture_key(dir: &Path, name: &str, n: usize) -> (PathBuf, String) {
    let path = dir.join(format!("{name}.pem"));
    let id = saferchat_client::test_keys::identity(n);
    id.save(&path, true).expect("write key");
    (path, id.handle().to_string())
}

/// Every file under `dir`, recursively.
pub fn files(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).expect("read dir").flatten() {
        let path = entry.path();
        if path.is_dir() {
            out.extend(files(&path));
        } else {
            out.push(path);
        }
    }
    out
}

/// A node's Prometheus text, or `None` when it does not answer (within
/// 2 s to connect, 5 s to read).
pub async fn scrape(addr: std::net::SocketAddr) -> Option<String> {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut stream = tokio::time::timeout(
        std::time::Duration::from_secs(2),
        tokio::net::TcpStream::connect(addr),
    )
    .await
    .ok()?
    .ok()?;
    stream
        .write_all(b"GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n")
        .await
        .ok()?;
    let mut text = String::new();
    tokio::time::timeout(
        std::time::Duration::from_secs(5),
        stream.read_to_string(&mut text),
    )
    .await
    .ok()?
    .ok()?;
    Some(text)
}

/// One gauge or counter of a node's Prometheus text, by full series name
/// (name and labels as the exporter writes them).
pub async fn scrape_value(addr: std::net::SocketAddr, series: &str) -> Option<f64> {
    scrape(addr)
        .await?
        .lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
}
