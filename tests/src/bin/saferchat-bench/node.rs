//! The server under test: a `saferchat-node` this tool starts (fresh data
//! folder, pinned to its CPU) or one that already runs.

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

/// How to start a node.
#[derive(Clone, Debug)]
pub struct NodeSpec {
    /// The `saferchat-node` binary.
    pub binary: PathBuf,
    /// CPU list for `taskset -c`.
    pub cpus: String,
    /// Real-time round-robin priority for `chrt -r` (0: normal).
    pub rt_priority: u32,
    /// Where data folders and logs go (a fresh folder per start).
    pub work_dir: PathBuf,
    /// The admin token to give it.
    pub admin_token: String,
    /// Keep the data folder after stopping.
    pub keep_data: bool,
}

/// The node being measured.
#[derive(Debug)]
pub struct Server {
    /// `host:port` of its client listener.
    pub address: String,
    /// Its pid (for /proc).
    pub pid: String,
    /// The admin token.
    pub admin_token: String,
    /// The command line, for the report.
    pub command: String,
    child: Option<Child>,
    data_dir: Option<PathBuf>,
    keep_data: bool,
}

fn free_port() -> anyhow::Result<u16> {
    let listener = TcpListener::bind("127.0.0.1:0").context("finding a free port")?;
    Ok(listener.local_addr()?.port())
}

impl Server {
    /// A node started elsewhere.
    pub fn external(address: String, pid: String, admin_token: String) -> Server {
        Server {
            command: format!("(external, pid {pid})"),
            address,
            pid,
            admin_token,
            child: None,
            data_dir: None,
            keep_data: true,
        }
    }

    /// Starts a fresh node: new data folder under `spec.work_dir/name`,
    /// `taskset -c CPUS [chrt -r PRIO] saferchat-node`, on a free loopback
    /// port; waits until it accepts connections.
    ///
    /// # Errors
    /// When it does not start, or does not listen within 30 s.
    pub fn start(spec: &NodeSpec, name: &str) -> anyhow::Result<Server> {
        let data_dir = spec.work_dir.join(name);
        if data_dir.exists() {
            std::fs::remove_dir_all(&data_dir)
                .with_context(|| format!("removing old {}", data_dir.display()))?;
        }
        std::fs::create_dir_all(&spec.work_dir)?;
        let log_path = spec.work_dir.join(format!("{name}.log"));
        let log = std::fs::File::create(&log_path)?;
        let port = free_port()?;
        let address = format!("127.0.0.1:{port}");
        let mut argv: Vec<String> = vec!["taskset".into(), "-c".into(), spec.cpus.clone()];
        if spec.rt_priority > 0 {
            argv.extend(["chrt".into(), "-r".into(), spec.rt_priority.to_string()]);
        }
        argv.push(spec.binary.display().to_string());
        argv.extend([
            "--data-dir".into(),
            data_dir.display().to_string(),
            "--listen".into(),
            address.clone(),
        ]);
        let child = Command::new(&argv[0])
            .args(&argv[1..])
            .env("SAFERCHAT_ADMIN_TOKEN", &spec.admin_token)
            .env("RUST_LOG", "warn")
            // The benchmark measures throughput, not the abuse limit: a few
            // senders post far faster than any person.
            .env("SAFERCHAT_POSTS_PER_SECOND", "0")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {}", argv.join(" ")))?;
        let pid = child.id().to_string();
        let mut server = Server {
            command: format!(
                "SAFERCHAT_ADMIN_TOKEN=… RUST_LOG=warn SAFERCHAT_POSTS_PER_SECOND=0 {}",
                argv.join(" ")
            ),
            address: address.clone(),
            pid,
            admin_token: spec.admin_token.clone(),
            child: Some(child),
            data_dir: Some(data_dir),
            keep_data: spec.keep_data,
        };
        let addr: SocketAddr = address.parse()?;
        let started = Instant::now();
        loop {
            if let Some(child) = server.child.as_mut()
                && let Some(status) = child.try_wait()?
            {
                bail!(
                    "saferchat-node exited at start ({status}); its log:\n{}",
                    std::fs::read_to_string(&log_path).unwrap_or_default()
                );
            }
            if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
                break;
            }
            if started.elapsed() > Duration::from_millis(START_MS_MAX) {
                server.stop();
                bail!("saferchat-node did not listen on {address} within {START_MS_MAX} ms");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        // taskset and chrt exec the node: the child's pid is the node's
        // (the kernel keeps 15 bytes of the program name).
        let comm = std::fs::read_to_string(format!("/proc/{}/comm", server.pid))?;
        let name = spec
            .binary
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        if comm.trim() != name.get(..15).unwrap_or(&name) {
            server.stop();
            bail!("pid {} is {comm:?}, not {name}", server.pid);
        }
        Ok(server)
    }

    /// SIGTERM, wait (bounded), SIGKILL if needed; removes the data folder
    /// unless asked to keep it. Does nothing to an external node.
    pub fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        terminate(&mut [&mut child], Duration::from_millis(STOP_MS_MAX));
        if !self.keep_data
            && let Some(dir) = self.data_dir.take()
        {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop();
    }
}
