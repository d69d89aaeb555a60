//! `saferchat-node`: runs one saferchat node.
//!
//! Configuration: defaults, then `--config FILE` (TOML), then `SAFERCHAT_*`
//! environment variables, then the flags below.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use saferchat_node::clock::SystemClock;
use saferchat_node::config::{LogFormat, NodeConfig, PeerTlsConfig};
use saferchat_node::{Listeners, run};
use tokio_util::sync::CancellationToken;

/// mimalloc: the node allocates and frees a buffer per delivery, and the
/// system allocator was a seventh of its CPU time at saturation.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Debug, Parser)]
#[command(
    name = "saferchat-node",
    version,
    about = "An end-to-end encrypted group chat node"
)]
struct Args {
    /// TOML configuration file.
    #[arg(long, short)]
    config: Option<PathBuf>,
    /// Client-facing address (default 127.0.0.1:8080).
    #[arg(long)]
    listen: Option<SocketAddr>,
    /// Data folder (default ./saferchat-data).
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Admin service on its own address (by default it shares the client
    /// address, on loopback only).
    #[arg(long)]
    admin_listen: Option<SocketAddr>,
    /// The web listener for browsers (grpc-web); off unless given.
    #[arg(long)]
    web_listen: Option<SocketAddr>,
    /// Serve the client (and admin) addresses in plaintext even when they
    /// are not loopback addresses and no TLS is configured.
    #[arg(long)]
    insecure_plaintext: bool,
    /// TLS on the client and admin listeners: certificate chain (PEM).
    #[arg(long, requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// TLS: the certificate's private key (PEM).
    #[arg(long, requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// TLS with a self-signed certificate made once in DATA_DIR/tls/ (for
    /// development); its fingerprint is logged at start, for
    /// `saferchat --tls-pin`.
    #[arg(long, conflicts_with = "tls_cert")]
    tls_self_signed: bool,
    /// Prometheus metrics address, e.g. 127.0.0.1:9090.
    #[arg(long)]
    metrics_listen: Option<SocketAddr>,
    /// Node-to-node address (cluster mode).
    #[arg(long)]
    peer_listen: Option<SocketAddr>,
    /// This node's id (cluster mode).
    #[arg(long)]
    node_id: Option<u64>,
    /// Join a running cluster: wait to be added to its map (`saferchat
    /// cluster add-node`), then learn the other nodes from it.
    #[arg(long)]
    join: bool,
    /// Print the effective configuration (without secrets) and exit.
    #[arg(long)]
    print_config: bool,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Create certificates for mutual TLS between nodes: a cluster CA
    /// (`ca.pem`, `ca.key`; reused when the folder has one) and, per node,
    /// `node-ID.pem` and `node-ID.key`. Keep `ca.key` offline.
    Certs {
        /// Folder to write into (created if missing).
        #[arg(long)]
        dir: PathBuf,
        /// A node as ID:DATACENTER, e.g. 1:dc1; repeat for each node.
        #[arg(long = "node", required = true, value_parser = parse_node)]
        nodes: Vec<(u64, String)>,
    },
}

fn parse_node(value: &str) -> Result<(u64, String), String> {
    let (id, dc) = value
        .split_once(':')
        .ok_or_else(|| format!("{value:?}: expected ID:DATACENTER, e.g. 1:dc1"))?;
    let id: u64 = id
        .parse()
        .map_err(|_| format!("{value:?}: the node id must be a number"))?;
    if id == 0 {
        return Err(format!("{value:?}: node ids start at 1"));
    }
    if !saferchat_node::peer_tls::is_valid_datacenter(dc) {
        return Err(format!(
            "{value:?}: a datacenter is 1-63 lowercase letters, digits and '-'"
        ));
    }
    Ok((id, dc.to_owned()))
}

fn certs(dir: &std::path::Path, nodes: &[(u64, String)]) -> ExitCode {
    let nodes: Vec<_> = nodes
        .iter()
        .map(|(id, dc)| (saferchat_consensus::NodeId(*id), dc.clone()))
        .collect();
    match saferchat_node::peer_tls::generate(dir, &nodes) {
        Ok(files) => {
            println!("cluster CA: {}", dir.join("ca.pem").display());
            for f in files {
                println!(
                    "node {}: {} {}",
                    f.node.0,
                    f.cert.display(),
                    f.key.display()
                );
            }
            println!(
                "start each node with SAFERCHAT_PEER_TLS_DIR={} (or [peer_tls] in its config)",
                dir.display()
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("saferchat-node: {e}");
            ExitCode::FAILURE
        }
    }
}

fn load(args: &Args) -> anyhow::Result<NodeConfig> {
    let mut config = match &args.config {
        Some(path) => NodeConfig::from_file(path)?,
        None => NodeConfig::default(),
    };
    config.apply_env(|name| std::env::var(name).ok())?;
    if let Some(v) = args.listen {
        config.listen = v;
    }
    if let Some(v) = &args.data_dir {
        config.data_dir.clone_from(v);
    }
    if let Some(v) = args.admin_listen {
        config.admin_listen = Some(v);
    }
    if let Some(v) = args.web_listen {
        config.web_listen = Some(v);
    }
    if args.insecure_plaintext {
        config.insecure_plaintext = true;
    }
    if let (Some(cert), Some(key)) = (&args.tls_cert, &args.tls_key) {
        let tls = config.tls.get_or_insert_default();
        tls.cert = Some(cert.clone());
        tls.key = Some(key.clone());
        tls.self_signed = false;
    }
    if args.tls_self_signed {
        let tls = config.tls.get_or_insert_default();
        tls.self_signed = true;
        tls.cert = None;
        tls.key = None;
    }
    if let Some(v) = args.metrics_listen {
        config.metrics_listen = Some(v);
    }
    if let Some(v) = args.peer_listen {
        config.peer_listen = Some(v);
    }
    if args.join {
        config.join = true;
    }
    if let Some(v) = args.node_id {
        config.node_id = v;
        // The TLS folder names files by node id: follow the flag.
        if let Ok(dir) = std::env::var("SAFERCHAT_PEER_TLS_DIR") {
            config.peer_tls = Some(PeerTlsConfig::in_dir(std::path::Path::new(&dir), v));
        }
    }
    config.validate()?;
    Ok(config)
}

fn init_tracing(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // Logs go to stderr; stdout stays free for what a user asked for
    // (e.g. --print-config).
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(false)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

async fn shutdown_on_signal(token: CancellationToken) {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot listen for SIGTERM");
                    let _ = ctrl_c.await;
                    token.cancel();
                    return;
                }
            };
        tokio::select! {
            _ = ctrl_c => tracing::info!("SIGINT: shutting down"),
            _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
    token.cancel();
}

/// Upper bounds of the membership read histogram, seconds: 1 µs to 1 s,
/// fine where lease reads land (microseconds), coarse where quorum reads
/// land (a network round trip).
const MEMBERSHIP_READ_BUCKETS_S: [f64; 26] = [
    1e-6, 2e-6, 3e-6, 5e-6, 7.5e-6, 10e-6, 15e-6, 20e-6, 30e-6, 40e-6, 50e-6, 75e-6, 100e-6,
    200e-6, 500e-6, 1e-3, 2e-3, 5e-3, 10e-3, 20e-3, 30e-3, 50e-3, 75e-3, 100e-3, 300e-3, 1.0,
];

async fn main_async(config: NodeConfig) -> anyhow::Result<()> {
    if let Some(addr) = config.metrics_listen {
        metrics_exporter_prometheus::PrometheusBuilder::new()
            .with_http_listener(addr)
            // Membership reads as a true histogram: cumulative buckets can
            // be diffed between two scrapes, which gives exact quantiles of
            // an interval (a summary only covers a rolling window).
            .set_buckets_for_metric(
                metrics_exporter_prometheus::Matcher::Full(
                    "saferchat_membership_read_seconds".into(),
                ),
                &MEMBERSHIP_READ_BUCKETS_S,
            )
            .context("membership read buckets")?
            .install()
            .with_context(|| format!("starting the metrics endpoint on {addr}"))?;
        tracing::info!(%addr, "metrics on /metrics");
    }
    let client = saferchat_node::bind(config.listen)
        .with_context(|| format!("cannot listen on {}", config.listen))?;
    let peer = match config.peer_listen {
        Some(addr) => Some(
            saferchat_node::bind(addr)
                .with_context(|| format!("cannot listen for peers on {addr}"))?,
        ),
        None => None,
    };
    let admin = match config.admin_listen {
        Some(addr) => Some(
            saferchat_node::bind(addr)
                .with_context(|| format!("cannot listen for admin calls on {addr}"))?,
        ),
        None => None,
    };
    let web = match config.web_listen {
        Some(addr) => Some(
            saferchat_node::bind(addr)
                .with_context(|| format!("cannot listen for browsers on {addr}"))?,
        ),
        None => None,
    };
    let token = CancellationToken::new();
    tokio::spawn(shutdown_on_signal(token.clone()));
    run(
        config,
        Listeners {
            client,
            peer,
            admin,
            web,
        },
        clock()?,
        token,
    )
    .await?;
    Ok(())
}

/// The machine's clocks, or in a test build with SAFERCHAT_TEST_CLOCK_FILE
/// set, clocks that drift and jump as that file says.
fn clock() -> anyhow::Result<std::sync::Arc<dyn saferchat_node::clock::Clock>> {
    match std::env::var_os("SAFERCHAT_TEST_CLOCK_FILE") {
        None => Ok(SystemClock::new()),
        #[cfg(feature = "test-clock")]
        Some(path) => {
            tracing::warn!(path = ?path, "test clock: lease time follows a control file");
            Ok(saferchat_node::clock::SkewedClock::new(path.into()))
        }
        #[cfg(not(feature = "test-clock"))]
        Some(_) => anyhow::bail!(
            "SAFERCHAT_TEST_CLOCK_FILE is set, but this build has no test clock (feature test-clock)"
        ),
    }
}

fn main() -> ExitCode {
    let args = Args::parse();
    if let Some(Command::Certs { dir, nodes }) = &args.command {
        return certs(dir, nodes);
    }
    let config = match load(&args) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("saferchat-node: {e:#}");
            return ExitCode::from(2);
        }
    };
    if args.print_config {
        let mut shown = config.clone();
        shown.admin_token = shown.admin_token.map(|_| "<redacted>".into());
        shown.session_secret = shown.session_secret.map(|_| "<redacted>".into());
        match toml::to_string_pretty(&shown) {
            Ok(text) => {
                print!("{text}");
                return ExitCode::SUCCESS;
            }
            Err(e) => {
                eprintln!("saferchat-node: {e}");
                return ExitCode::FAILURE;
            }
        }
    }
    init_tracing(config.log_format);
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("saferchat-node: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(main_async(config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("saferchat-node: {e:#}");
            ExitCode::FAILURE
        }
    }
}
