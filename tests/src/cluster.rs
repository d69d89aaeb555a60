//! Several node processes forming one replica set on loopback, every
//! directed peer link through its own [`Proxy`], so a test can partition a
//! node or delay traffic between datacenters.

use std::collections::HashMap;
use std::net::SocketAddr;

use saferchat_client::admin::Admin;

use crate::ADMIN_TOKEN;
use crate::netproxy::{Link, Proxy};
use crate::process::NodeProcess;

/// How to build the cluster.
#[derive(Clone, Debug)]
pub struct Options {
    /// Datacenter of each node; the cluster has as many nodes.
    pub datacenters: Vec<String>,
    /// Lease duration.
    pub lease_ms: u64,
    /// Lease renewal period.
    pub renew_ms: u64,
    /// Extra environment for every node.
    pub env: Vec<(String, String)>,
    /// Whether every node serves Prometheus metrics on its own port
    /// ([`Cluster::metrics`]).
    pub metrics: bool,
}

impl Options {
    /// `n` nodes in one datacenter.
    pub fn single_dc(n: usize) -> Options {
        Options {
            datacenters: vec!["dc1".to_owned(); n],
            lease_ms: 1_000,
            renew_ms: 250,
            env: Vec::new(),
            metrics: false,
        }
    }
}

/// A running cluster.
#[derive(Debug)]
pub struct Cluster {
    /// The nodes; node `i` has id `i + 1`.
    pub nodes: Vec<NodeProcess>,
    /// Node `i`'s metrics endpoint, when [`Options::metrics`] asked for them.
    pub metrics: Vec<SocketAddr>,
    /// `(from, to)` → the proxy `from` uses to reach `to`.
    links: HashMap<(usize, usize), Proxy>,
    datacenters: Vec<String>,
    /// Node `i`'s peer listener (behind no proxy).
    pub peer_addresses: Vec<SocketAddr>,
    /// The cluster CA and node certificates (`saferchat-node certs` layout).
    pub tls_dir: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

/// `count` distinct free loopback ports: all bound at the same time, so no
/// two can be the same, then released for the nodes to take.
fn free_ports(count: usize) -> Vec<u16> {
    let listeners: Vec<_> = (0..count)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0").expect("bind"))
        .collect();
    listeners
        .iter()
        .map(|l| l.local_addr().expect("address").port())
        .collect()
}

impl Cluster {
    /// Starts the proxies, then the nodes.
    ///
    /// # Panics
    /// When a node does not start (a port picked free can, rarely, be taken
    /// by someone else before the node binds it).
    pub async fn start(options: Options) -> Cluster {
        let n = options.datacenters.len();
        let dir = tempfile::tempdir().expect("tempdir");
        // Proxies first (they keep their ports), then every node port at
        // once, so that no two of them can be handed the same port.
        let mut links = HashMap::new();
        for from in 0..n {
            for to in (0..n).filter(|to| *to != from) {
                links.insert((from, to), Proxy::start().await);
            }
        }
        let ports = free_ports(3 * n);
        let (client_ports, peer_ports) = (&ports[..n], &ports[n..2 * n]);
        let metrics: Vec<SocketAddr> = if options.metrics {
            ports[2 * n..]
                .iter()
                .map(|p| SocketAddr::from(([127, 0, 0, 1], *p)))
                .collect()
        } else {
            Vec::new()
        };
        for ((_, to), proxy) in &links {
            proxy.set_target(SocketAddr::from(([127, 0, 0, 1], peer_ports[*to])));
        }
        let tls_dir = dir.path().join("tls");
        let certified: Vec<_> = (0..n)
            .map(|i| {
                (
                    saferchat_consensus::NodeId(i as u64 + 1),
                    options.datacenters[i].clone(),
                )
            })
            .collect();
        saferchat_node::peer_tls::generate(&tls_dir, &certified).expect("cluster certificates");
        let mut nodes = Vec::new();
        for i in 0..n {
            let peers: Vec<String> = (0..n)
                .filter(|j| *j != i)
                .map(|j| {
                    format!(
                        "{}={}/127.0.0.1:{}@{}",
                        j + 1,
                        links[&(i, j)].addr,
                        client_ports[j],
                        options.datacenters[j]
                    )
                })
                .collect();
            let mut env: Vec<(String, String)> = vec![
                ("SAFERCHAT_NODE_ID".into(), (i + 1).to_string()),
                (
                    "SAFERCHAT_DATACENTER".into(),
                    options.datacenters[i].clone(),
                ),
                (
                    "SAFERCHAT_PEER_LISTEN".into(),
                    format!("127.0.0.1:{}", peer_ports[i]),
                ),
                ("SAFERCHAT_PEERS".into(), peers.join(",")),
                (
                    "SAFERCHAT_PEER_TLS_DIR".into(),
                    tls_dir.display().to_string(),
                ),
                ("SAFERCHAT_LEASE_MS".into(), options.lease_ms.to_string()),
                (
                    "SAFERCHAT_LEASE_RENEW_MS".into(),
                    options.renew_ms.to_string(),
                ),
                (
                    "SAFERCHAT_SESSION_SECRET".into(),
                    "cluster-test-session-secret-0123456789abcdef".into(),
                ),
            ];
            if let Some(addr) = metrics.get(i) {
                env.push(("SAFERCHAT_METRICS_LISTEN".into(), addr.to_string()));
            }
            env.extend(options.env.iter().cloned());
            let env: Vec<(&str, &str)> =
                env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
            nodes.push(NodeProcess::start_on(
                &format!("127.0.0.1:{}", client_ports[i]),
                &dir.path().join(format!("node{}", i + 1)),
                &env,
            ));
        }
        Cluster {
            nodes,
            metrics,
            links,
            datacenters: options.datacenters,
            peer_addresses: peer_ports
                .iter()
                .map(|p| SocketAddr::from(([127, 0, 0, 1], *p)))
                .collect(),
            tls_dir,
            _dir: dir,
        }
    }

    /// Datacenter of each node.
    pub fn datacenters(&self) -> &[String] {
        &self.datacenters
    }

    /// Client address of node `i`.
    pub fn server(&self, i: usize) -> String {
        self.nodes[i].server()
    }

    /// An admin client on node `i`.
    pub async fn admin(&self, i: usize) -> Admin {
        Admin::connect(&self.server(i), ADMIN_TOKEN)
            .await
            .expect("admin connect")
    }

    /// The loopback ports of the proxies node `i` dials to reach its
    /// peers: every byte it sends to another node goes to one of them.
    pub fn outgoing_peer_ports(&self, i: usize) -> Vec<u16> {
        self.links
            .iter()
            .filter(|((from, _), _)| *from == i)
            .map(|(_, proxy)| proxy.addr.port())
            .collect()
    }

    /// Cuts node `i` off from every other node, both ways (clients can
    /// still reach it).
    pub fn isolate(&self, i: usize) {
        self.set_links_of(i, Link::Blocked);
    }

    /// Reconnects node `i`.
    pub fn heal(&self, i: usize) {
        self.set_links_of(i, Link::Open { delay_ms: 0 });
    }

    fn set_links_of(&self, i: usize, link: Link) {
        for ((from, to), proxy) in &self.links {
            if *from == i || *to == i {
                proxy.set(link);
            }
        }
    }

    /// Delays every link between different datacenters by `ms` one way.
    pub fn delay_between_datacenters(&self, ms: u64) {
        for ((from, to), proxy) in &self.links {
            if self.datacenters[*from] != self.datacenters[*to] {
                proxy.set(Link::Open { delay_ms: ms });
            }
        }
    }

    /// SIGKILL node `i`.
    pub fn kill(&mut self, i: usize) {
        self.nodes[i].kill();
    }

    /// Restarts node `i` with its data.
    pub fn restart(&mut self, i: usize) {
        self.nodes[i].restart();
    }
}
