//! A cluster of `saferchat-node` processes on loopback, started by this
//! tool: certificates (`saferchat-node certs`), one shared admin token and
//! session secret, every node given the others as peers, each pinned with
//! `taskset` (and `chrt` when asked). A cluster of one is a plain node
//! without peers, started the same way, so both sizes are measured with
//! the same code.
//!
//! Every peer link goes straight from node to node (no proxy in this
//! process), so what the nodes spend is all in their own CPU time.

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use saferchat_tests::process::terminate;

/// How long a node may take to accept connections after starting.
const START_MS_MAX: u64 = 30_000;
/// How long a node may take to exit after SIGTERM before SIGKILL.
const STOP_MS_MAX: u64 = 30_000;

/// How to start a cluster.
#[derive(Clone, Debug)]
pub struct ClusterSpec {
    /// The `saferchat-node` binary.
    pub binary: PathBuf,
    /// Nodes (1 = a single node without peers).
    pub nodes: usize,
    /// CPU list for `taskset -c` of every node ("" = not pinned).
    pub cpus: String,
    /// `chrt -r` priority of every node (0 = normal scheduling).
    pub rt_priority: u32,
    /// Where the cluster's folder goes.
    pub work_dir: PathBuf,
    /// The admin token every node accepts.
    pub admin_token: String,
    /// Give every node a Prometheus endpoint.
    pub metrics: bool,
    /// `RUST_LOG` of the nodes.
    pub log_level: String,
    /// Keep the data folders after stopping.
    pub keep_data: bool,
}

/// One node process.
#[derive(Debug)]
pub struct ClusterNode {
    /// Its id (1-based).
    pub id: u64,
    /// `host:port` of its client listener.
    pub client: String,
    /// Its metrics endpoint, if any.
    pub metrics: Option<SocketAddr>,
    /// Its log file (JSON lines).
    pub log: PathBuf,
    env: Vec<(String, String)>,
    child: Option<Child>,
    pid: String,
}

/// A running cluster.
#[derive(Debug)]
pub struct Cluster {
    /// The nodes; node `i` has id `i + 1`.
    pub nodes: Vec<ClusterNode>,
    /// The command line of node 1, secrets elided, for the report.
    pub command: String,
    dir: PathBuf,
    spec: ClusterSpec,
}

fn free_ports(count: usize) -> anyhow::Result<Vec<u16>> {
    // All bound at once, so no two are the same; released for the nodes.
    let listeners = (0..count)
        .map(|_| TcpListener::bind("127.0.0.1:0"))
        .collect::<Result<Vec<_>, _>>()
        .context("finding free ports")?;
    listeners
        .iter()
        .map(|l| Ok(l.local_addr()?.port()))
        .collect()
}

fn random_hex() -> String {
    let bytes: [u8; 32] = rand::random();
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

impl Cluster {
    /// Starts `spec.nodes` nodes with fresh data in `spec.work_dir/name`
    /// and waits until every one accepts connections.
    ///
    /// # Errors
    /// When certificates cannot be made or a node does not start.
    pub fn start(spec: &ClusterSpec, name: &str) -> anyhow::Result<Cluster> {
        anyhow::ensure!((1..=9).contains(&spec.nodes), "1 to 9 nodes");
        let dir = spec.work_dir.join(name);
        if dir.exists() {
            std::fs::remove_dir_all(&dir)
                .with_context(|| format!("removing old {}", dir.display()))?;
        }
        std::fs::create_dir_all(&dir)?;
        let dir = dir.canonicalize()?;
        let n = spec.nodes;
        let ports = free_ports(3 * n)?;
        let (client, peer, metrics) = (&ports[..n], &ports[n..2 * n], &ports[2 * n..]);
        let tls = dir.join("tls");
        if n > 1 {
            let mut certs = Command::new(&spec.binary);
            certs.arg("certs").arg("--dir").arg(&tls);
            for i in 1..=n {
                certs.arg("--node").arg(format!("{i}:dc1"));
            }
            let out = certs
                .stdout(Stdio::null())
                .output()
                .context("saferchat-node certs")?;
            anyhow::ensure!(
                out.status.success(),
                "saferchat-node certs failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let secret = random_hex();
        let mut nodes = Vec::with_capacity(n);
        for i in 0..n {
            let id = i as u64 + 1;
            let mut env: Vec<(String, String)> = vec![
                ("SAFERCHAT_NODE_ID".into(), id.to_string()),
                ("SAFERCHAT_DATACENTER".into(), "dc1".into()),
                (
                    "SAFERCHAT_LISTEN".into(),
                    format!("127.0.0.1:{}", client[i]),
                ),
                (
                    "SAFERCHAT_DATA_DIR".into(),
                    dir.join(format!("n{id}")).display().to_string(),
                ),
                ("SAFERCHAT_ADMIN_TOKEN".into(), spec.admin_token.clone()),
                ("SAFERCHAT_SESSION_SECRET".into(), secret.clone()),
                ("SAFERCHAT_LOG_FORMAT".into(), "json".into()),
                // Throughput, not the abuse limit, is measured.
                ("SAFERCHAT_POSTS_PER_SECOND".into(), "0".into()),
                ("RUST_LOG".into(), spec.log_level.clone()),
            ];
            if n > 1 {
                let peers: Vec<String> = (0..n)
                    .filter(|j| *j != i)
                    .map(|j| {
                        format!(
                            "{}=127.0.0.1:{}/127.0.0.1:{}@dc1",
                            j + 1,
                            peer[j],
                            client[j]
                        )
                    })
                    .collect();
                env.extend([
                    (
                        "SAFERCHAT_PEER_LISTEN".into(),
                        format!("127.0.0.1:{}", peer[i]),
                    ),
                    ("SAFERCHAT_PEERS".into(), peers.join(",")),
                    ("SAFERCHAT_PEER_TLS_DIR".into(), tls.display().to_string()),
                ]);
            }
            let metrics_addr = spec
                .metrics
                .then(|| SocketAddr::from(([127, 0, 0, 1], metrics[i])));
            if let Some(m) = metrics_addr {
                env.push(("SAFERCHAT_METRICS_LISTEN".into(), m.to_string()));
            }
            nodes.push(ClusterNode {
                id,
                client: format!("127.0.0.1:{}", client[i]),
                metrics: metrics_addr,
                log: dir.join(format!("n{id}.log")),
                env,
                child: None,
                pid: String::new(),
            });
        }
        let mut cluster = Cluster {
            command: String::new(),
            nodes,
            dir,
            spec: spec.clone(),
        };
        for i in 0..n {
            if let Err(e) = cluster.spawn(i) {
                cluster.stop();
                return Err(e);
            }
        }
        for i in 0..n {
            if let Err(e) = cluster.wait_listening(i) {
                cluster.stop();
                return Err(e);
            }
        }
        cluster.command = cluster.argv(0).join(" ");
        Ok(cluster)
    }

    fn argv(&self, i: usize) -> Vec<String> {
        let mut argv: Vec<String> = Vec::new();
        for (k, v) in &self.nodes[i].env {
            let shown = if k.contains("TOKEN") || k.contains("SECRET") {
                "…"
            } else {
                v.as_str()
            };
            argv.push(format!("{k}={shown}"));
        }
        if !self.spec.cpus.is_empty() {
            argv.extend(["taskset".into(), "-c".into(), self.spec.cpus.clone()]);
        }
        if self.spec.rt_priority > 0 {
            argv.extend([
                "chrt".into(),
                "-r".into(),
                self.spec.rt_priority.to_string(),
            ]);
        }
        argv.push(self.spec.binary.display().to_string());
        argv
    }

    fn spawn(&mut self, i: usize) -> anyhow::Result<()> {
        let mut program: Vec<String> = Vec::new();
        if !self.spec.cpus.is_empty() {
            program.extend(["taskset".into(), "-c".into(), self.spec.cpus.clone()]);
        }
        if self.spec.rt_priority > 0 {
            program.extend([
                "chrt".into(),
                "-r".into(),
                self.spec.rt_priority.to_string(),
            ]);
        }
        program.push(self.spec.binary.display().to_string());
        let node = &mut self.nodes[i];
        // The cluster's folder is fresh; a restarted node appends to its log.
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&node.log)?;
        let child = Command::new(&program[0])
            .args(&program[1..])
            .envs(node.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {}", program.join(" ")))?;
        // taskset and chrt exec the node: the child's pid is the node's.
        node.pid = child.id().to_string();
        node.child = Some(child);
        Ok(())
    }

    fn wait_listening(&mut self, i: usize) -> anyhow::Result<()> {
        let addr: SocketAddr = self.nodes[i].client.parse()?;
        let started = Instant::now();
        loop {
            let node = &mut self.nodes[i];
            if let Some(child) = node.child.as_mut()
                && let Some(status) = child.try_wait()?
            {
                node.child = None;
                bail!(
                    "node {} exited at start ({status}); its log:\n{}",
                    node.id,
                    std::fs::read_to_string(&node.log).unwrap_or_default()
                );
            }
            if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
                break;
            }
            if started.elapsed() > Duration::from_millis(START_MS_MAX) {
                bail!(
                    "node {} did not listen on {addr} within {START_MS_MAX} ms",
                    node.id
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let node = &self.nodes[i];
        let comm = std::fs::read_to_string(format!("/proc/{}/comm", node.pid))?;
        let name = self
            .spec
            .binary
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        anyhow::ensure!(
            comm.trim() == name.get(..15).unwrap_or(&name),
            "pid {} is {comm:?}, not {name}",
            node.pid
        );
        Ok(())
    }

    /// Client addresses, by node index.
    pub fn addresses(&self) -> Vec<String> {
        self.nodes.iter().map(|n| n.client.clone()).collect()
    }

    /// Pids of the nodes that run.
    pub fn pids(&self) -> Vec<String> {
        self.nodes
            .iter()
            .filter(|n| n.child.is_some())
            .map(|n| n.pid.clone())
            .collect()
    }

    /// The index of the node whose client address is `address`.
    pub fn index_of(&self, address: &str) -> Option<usize> {
        self.nodes.iter().position(|n| n.client == address)
    }

    /// SIGKILL node `i`; returns the instant just before the signal.
    pub fn kill(&mut self, i: usize) -> Option<Instant> {
        let child = self.nodes[i].child.as_mut()?;
        let at = Instant::now();
        let _ = child.kill();
        let _ = child.wait();
        self.nodes[i].child = None;
        Some(at)
    }

    /// Starts node `i` again with its data, ports and environment.
    ///
    /// # Errors
    /// When it does not start listening.
    pub fn restart(&mut self, i: usize) -> anyhow::Result<()> {
        anyhow::ensure!(self.nodes[i].child.is_none(), "node {i} still runs");
        self.spawn(i)?;
        self.wait_listening(i)
    }

    /// SIGTERM every node, wait (bounded), SIGKILL stragglers; removes the
    /// data folders unless asked to keep them (the logs stay).
    pub fn stop(&mut self) {
        let mut children: Vec<Child> = self
            .nodes
            .iter_mut()
            .filter_map(|n| n.child.take())
            .collect();
        terminate(
            &mut children.iter_mut().collect::<Vec<_>>(),
            Duration::from_millis(STOP_MS_MAX),
        );
        if !self.spec.keep_data {
            for node in &self.nodes {
                let _ = std::fs::remove_dir_all(self.dir.join(format!("n{}", node.id)));
            }
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.stop();
    }
}

/// CPU seconds (user + system) of each pid, `None` for one that is gone.
pub fn cpu_of(pids: &[String], ticks_per_s: f64) -> Vec<Option<f64>> {
    pids.iter()
        .map(|p| crate::procfs::process_cpu_s(p, ticks_per_s))
        .collect()
}

pub use saferchat_tests::process::scrape_value;
