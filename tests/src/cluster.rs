//! Several node processes forming one replica set on loopback, every
//! directed peer link through its own [`Proxy`], so a test can partition a
//! node or delay traffic between datacenters.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;

use saferchat_client::admin::Admin;
use saferchat_client::session::{JoinOptions, Session};

use crate::ADMIN_TOKEN;
use crate::netproxy::{Link, Proxy, Tap};
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
    /// Extra environment for the nodes of one datacenter: `(datacenter,
    /// name, value)` (its Cassandra contact point, say).
    pub datacenter_env: Vec<(String, String, String)>,
    /// Whether every node serves Prometheus metrics on its own port
    /// ([`Cluster::metrics`]).
    pub metrics: bool,
    /// Whether every node's clocks follow a control file the test writes
    /// ([`Cluster::set_clock`]; test builds of the node only).
    pub test_clocks: bool,
    /// Scans every byte between the nodes and between clients and nodes
    /// (every proxy), from the first connection on.
    pub wire_tap: Option<Arc<Tap>>,
    /// Each node's data folder on a tmpfs of this size (`mount -o size=`,
    /// root only), so that [`Cluster::fill_disk`] can fill it.
    pub data_tmpfs: Option<String>,
}

impl Options {
    /// `n` nodes in one datacenter.
    pub fn single_dc(n: usize) -> Options {
        Options {
            datacenters: vec!["dc1".to_owned(); n],
            lease_ms: 1_000,
            renew_ms: 250,
            env: Vec::new(),
            datacenter_env: Vec::new(),
            metrics: false,
            test_clocks: false,
            wire_tap: None,
            data_tmpfs: None,
        }
    }
}

impl Options {
    /// Five nodes: three in `dc1` (nodes 1-3) and two in `dc2` (4-5).
    /// Rooms' membership is voted on in every datacenter, so `dc1` alone
    /// keeps a majority of it when `dc2` is down (with three and three,
    /// neither would).
    pub fn three_and_two() -> Options {
        Options {
            datacenters: ["dc1", "dc1", "dc1", "dc2", "dc2"]
                .iter()
                .map(|d| (*d).to_owned())
                .collect(),
            ..Options::single_dc(5)
        }
    }

    /// Six nodes, two in each of `dc1` (nodes 1-2), `dc2` (3-4) and `dc3`
    /// (5-6): any two datacenters hold a majority of every room's
    /// membership acceptors, one alone does not.
    pub fn two_in_each_of_three() -> Options {
        Options {
            datacenters: ["dc1", "dc1", "dc2", "dc2", "dc3", "dc3"]
                .iter()
                .map(|d| (*d).to_owned())
                .collect(),
            ..Options::single_dc(6)
        }
    }
}

/// The first room name `{stem}-<k>` whose partition is homed in the
/// `home`-th of `datacenters` datacenters (partitions take turns,
/// `Placement::home`).
pub fn room_homed(stem: &str, home: u32, datacenters: u32) -> String {
    (0..)
        .map(|k| format!("{stem}-{k}"))
        .find(|r| saferchat_placement::PartitionCount::DEFAULT.of_room(r).0 % datacenters == home)
        .expect("a name")
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
    /// Node `i`'s client address as everyone knows it: a proxy in front of
    /// the port the node bound, which stays the same across restarts.
    fronts: Vec<Proxy>,
    /// Node `i`'s peer address for nodes that join through the map (the
    /// configured nodes reach it through `links`): a proxy it advertises,
    /// so the address the map records stays right across restarts. `None`
    /// for a node that joined (its peer port is fixed).
    ingress: Vec<Option<Proxy>>,
    datacenters: Vec<String>,
    /// Node `i`'s peer listener (behind no proxy).
    pub peer_addresses: Vec<SocketAddr>,
    /// The cluster CA and node certificates (`saferchat-node certs` layout).
    pub tls_dir: std::path::PathBuf,
    /// The data folders' tmpfs mounts, when asked for (unmounted after the
    /// nodes stopped, before the folder goes).
    tmpfs: Vec<crate::tmpfs::Tmpfs>,
    _dir: tempfile::TempDir,
}

/// When a test fails, what each node said last about its partitions and
/// its troubles: the failure's output then shows why a session ended or
/// a post was refused, where the nodes' folders are gone (CI).
impl Drop for Cluster {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            return;
        }
        const LINES: usize = 12;
        for (i, node) in self.nodes.iter().enumerate() {
            let log = node.log_text();
            let telling: Vec<&str> = log
                .lines()
                .filter(|l| {
                    // The map group's Raft chatter (votes, replication
                    // retries) says little about a test's failure.
                    let raft = ["vote", "replication", "RPCError", "update progress"]
                        .iter()
                        .any(|m| l.contains(m));
                    l.contains("\"partition\":")
                        || ((l.contains("\"WARN\"") || l.contains("\"ERROR\"")) && !raft)
                })
                .collect();
            println!("node {} said last:", i + 1);
            for line in &telling[telling.len().saturating_sub(LINES)..] {
                println!("  {}", line.chars().take(400).collect::<String>());
            }
        }
    }
}

/// Attempts at starting one node when the metrics port picked for it was
/// taken in the meantime.
const START_ATTEMPTS: usize = 5;

/// A free loopback port, released for a node to take. Only the metrics
/// endpoint needs one (its exporter binds the address it is given and does
/// not say which port it got); a start that loses the port to someone else
/// is retried with another ([`START_ATTEMPTS`]).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("bind")
        .port()
}

const METRICS_LISTEN: &str = "SAFERCHAT_METRICS_LISTEN";

/// Whether a node that did not start lost a port race (and is worth
/// starting again on another port).
fn lost_a_port(log: &str) -> bool {
    log.contains("Address already in use") || log.contains("address in use")
}

impl Cluster {
    /// Starts the proxies, then the nodes.
    ///
    /// Every port a node binds is chosen by the kernel when the node binds
    /// it (port 0); what the other nodes and the clients dial are proxies
    /// this process holds, pointed at the node once it reported its
    /// ports. So a node never loses a port picked for it to a parallel
    /// test, and a restarted node keeps its addresses.
    ///
    /// # Panics
    /// When a node does not start.
    pub async fn start(options: Options) -> Cluster {
        let n = options.datacenters.len();
        let mut dir = tempfile::tempdir().expect("tempdir");
        if std::env::var_os("SAFERCHAT_KEEP_TEST_DIRS").is_some() {
            // For debugging a failure or a hang: the nodes' logs and data stay.
            dir.disable_cleanup(true);
            eprintln!("cluster folder (kept): {}", dir.path().display());
        }
        let mut links = HashMap::new();
        let proxy = || async {
            let p = Proxy::start().await;
            if let Some(tap) = &options.wire_tap {
                p.set_tap(Arc::clone(tap));
            }
            p
        };
        for from in 0..n {
            for to in (0..n).filter(|to| *to != from) {
                links.insert((from, to), proxy().await);
            }
        }
        let mut fronts = Vec::new();
        let mut ingress = Vec::new();
        for _ in 0..n {
            fronts.push(proxy().await);
            ingress.push(Some(proxy().await));
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
        let mut cluster = Cluster {
            nodes: Vec::new(),
            metrics: Vec::new(),
            links,
            fronts,
            ingress,
            datacenters: options.datacenters.clone(),
            peer_addresses: Vec::new(),
            tls_dir,
            tmpfs: Vec::new(),
            _dir: dir,
        };
        for i in 0..n {
            let peers: Vec<String> = (0..n)
                .filter(|j| *j != i)
                .map(|j| {
                    format!(
                        "{}={}/{}@{}",
                        j + 1,
                        cluster.links[&(i, j)].addr,
                        cluster.fronts[j].addr,
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
                ("SAFERCHAT_PEER_LISTEN".into(), "127.0.0.1:0".into()),
                ("SAFERCHAT_PEERS".into(), peers.join(",")),
                (
                    "SAFERCHAT_ADVERTISE".into(),
                    format!(
                        "{}/{}",
                        cluster.ingress[i].as_ref().expect("a configured node").addr,
                        cluster.fronts[i].addr
                    ),
                ),
                (
                    "SAFERCHAT_PEER_TLS_DIR".into(),
                    cluster.tls_dir.display().to_string(),
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
            env.extend(options.env.iter().cloned());
            env.extend(
                options
                    .datacenter_env
                    .iter()
                    .filter(|(dc, _, _)| *dc == options.datacenters[i])
                    .map(|(_, k, v)| (k.clone(), v.clone())),
            );
            if options.test_clocks {
                env.push((
                    "SAFERCHAT_TEST_CLOCK_FILE".into(),
                    cluster.clock_file(i).display().to_string(),
                ));
            }
            let data_dir = cluster._dir.path().join(format!("node{}", i + 1));
            if let Some(size) = &options.data_tmpfs {
                let mount = crate::tmpfs::Tmpfs::mount(&data_dir, size)
                    .unwrap_or_else(|e| panic!("node {}: {e}", i + 1));
                cluster.tmpfs.push(mount);
            }
            let mut attempt = 0;
            let node = loop {
                attempt += 1;
                let mut env = env.clone();
                if options.metrics {
                    env.push((METRICS_LISTEN.into(), format!("127.0.0.1:{}", free_port())));
                }
                let env: Vec<(&str, &str)> =
                    env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
                match NodeProcess::try_start(&data_dir, &env) {
                    Ok(node) => break node,
                    Err(log) if attempt < START_ATTEMPTS && lost_a_port(&log) => {}
                    Err(log) => panic!("node {} did not start: {log}", i + 1),
                }
            };
            if options.metrics {
                cluster.metrics.push(metrics_address(&node));
            }
            cluster
                .peer_addresses
                .push(node.peer_addr.expect("peer listener"));
            cluster.nodes.push(node);
            cluster.point_at(i);
        }
        cluster
    }

    /// Adds node `id` to the cluster map through node `via` (`saferchat
    /// cluster add-node`) and starts it with `--join`, with a certificate
    /// from the cluster's CA; its index. It reaches the others directly
    /// (no link proxies: they are made for the configured nodes), and its
    /// clients through a front proxy like every node's.
    pub async fn start_joining(&mut self, id: u64, datacenter: &str, via: usize) -> usize {
        saferchat_node::peer_tls::generate(
            &self.tls_dir,
            &[(saferchat_consensus::NodeId(id), datacenter.to_owned())],
        )
        .expect("a certificate from the cluster CA");
        let front = Proxy::start().await;
        let data_dir = self._dir.path().join(format!("node{id}"));
        // The map names the peer port before the node binds it: if another
        // test took it meanwhile, the node fails to start and so does this.
        let peer = format!("127.0.0.1:{}", free_port());
        self.admin(via)
            .await
            .add_node(saferchat_proto::admin::AddNodeRequest {
                id,
                datacenter: datacenter.to_owned(),
                peer_address: peer.clone(),
                client_address: front.addr.to_string(),
            })
            .await
            .expect("add-node");
        let env = [
            ("SAFERCHAT_NODE_ID", id.to_string()),
            ("SAFERCHAT_DATACENTER", datacenter.to_owned()),
            ("SAFERCHAT_PEER_LISTEN", peer),
            ("SAFERCHAT_PEER_TLS_DIR", self.tls_dir.display().to_string()),
            ("SAFERCHAT_JOIN", "true".to_owned()),
            (
                "SAFERCHAT_SESSION_SECRET",
                "cluster-test-session-secret-0123456789abcdef".to_owned(),
            ),
        ];
        let mut env: Vec<(&str, String)> = env.to_vec();
        // Metrics like the others', when the cluster has them.
        let metrics = (!self.metrics.is_empty()).then(|| format!("127.0.0.1:{}", free_port()));
        if let Some(m) = &metrics {
            env.push((METRICS_LISTEN, m.clone()));
        }
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let node = NodeProcess::try_start(&data_dir, &env)
            .unwrap_or_else(|log| panic!("node {id} did not join: {log}"));
        if metrics.is_some() {
            self.metrics.push(metrics_address(&node));
        }
        front.set_target(node.addr);
        self.peer_addresses
            .push(node.peer_addr.expect("peer listener"));
        self.nodes.push(node);
        self.fronts.push(front);
        self.ingress.push(None);
        self.datacenters.push(datacenter.to_owned());
        self.nodes.len() - 1
    }

    fn clock_file(&self, i: usize) -> std::path::PathBuf {
        self._dir.path().join(format!("node{}.clock", i + 1))
    }

    /// Makes node `i`'s clocks run at `1 + rate_ppm / 10⁶` of real time,
    /// `offset_ms` ahead (an offset only ever grows). Needs
    /// [`Options::test_clocks`]; the node reads the file within
    /// milliseconds.
    ///
    /// # Panics
    /// When the file cannot be written.
    pub fn set_clock(&self, i: usize, rate_ppm: i64, offset_ms: u64) {
        let path = self.clock_file(i);
        let temporary = path.with_extension("clock.tmp");
        std::fs::write(&temporary, format!("{rate_ppm} {offset_ms}\n")).expect("write clock");
        std::fs::rename(&temporary, &path).expect("install clock");
    }

    /// Points the proxies in front of node `i` at the ports it bound.
    fn point_at(&self, i: usize) {
        let node = &self.nodes[i];
        self.fronts[i].set_target(node.addr);
        let peer = node.peer_addr.expect("peer listener");
        if let Some(ingress) = &self.ingress[i] {
            ingress.set_target(peer);
        }
        for ((_, to), proxy) in &self.links {
            if *to == i {
                proxy.set_target(peer);
            }
        }
    }

    /// Datacenter of each node.
    pub fn datacenters(&self) -> &[String] {
        &self.datacenters
    }

    /// Client address of node `i` (the same across restarts).
    pub fn server(&self, i: usize) -> String {
        self.fronts[i].addr.to_string()
    }

    /// An admin client on node `i`.
    pub async fn admin(&self, i: usize) -> Admin {
        Admin::connect(&self.server(i), ADMIN_TOKEN)
            .await
            .expect("admin connect")
    }

    /// Asks node `i` for its cluster map status until `done` holds, for
    /// up to `secs` seconds.
    ///
    /// # Panics
    /// When it never does, with the last answer.
    pub async fn status_until(
        &self,
        i: usize,
        secs: u64,
        what: &str,
        done: impl Fn(&saferchat_proto::admin::ClusterStatusReply) -> bool,
    ) -> saferchat_proto::admin::ClusterStatusReply {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(secs);
        let mut last = None;
        loop {
            if let Ok(reply) = self.admin(i).await.cluster_status().await {
                if done(&reply) {
                    return reply;
                }
                last = Some(reply);
            }
            assert!(
                std::time::Instant::now() < deadline,
                "node {} never reached: {what}; last answer {last:?}",
                i + 1
            );
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    }

    /// Waits (up to 60 s) until node `i` has the created cluster map
    /// (epoch 1) and knows the map group's leader; its answer.
    ///
    /// # Panics
    /// When it never does.
    pub async fn map_created(&self, i: usize) -> saferchat_proto::admin::ClusterStatusReply {
        self.status_until(i, 60, "a created map with a leader", |s| {
            s.epoch == 1 && s.map_leader != 0
        })
        .await
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

    /// The loopback port of the proxy node `from` dials to reach node
    /// `to`: every packet of that link goes to or comes from it.
    pub fn link_port(&self, from: usize, to: usize) -> u16 {
        self.links[&(from, to)].addr.port()
    }

    /// Sets the link node `from` dials node `to` on.
    pub fn set_link(&self, from: usize, to: usize, link: Link) {
        self.links[&(from, to)].set(link);
    }

    /// The node a session ended on (after redirects).
    ///
    /// # Panics
    /// When it is none of the cluster's.
    pub fn node_of(&self, session: &Session) -> usize {
        (0..self.nodes.len())
            .find(|i| self.server(*i) == session.address())
            .expect("a node of the cluster")
    }

    /// Joins `room` through node `through` as fixture user `who` (no
    /// history), following redirects.
    ///
    /// # Errors
    /// The join's.
    pub async fn try_join(
        &self,
        room: &str,
        through: usize,
        who: usize,
    ) -> Result<Session, saferchat_client::ClientError> {
        let me = Arc::new(saferchat_client::test_keys::identity(who));
        self.try_join_as(room, through, me).await
    }

    async fn try_join_as(
        &self,
        room: &str,
        through: usize,
        me: Arc<saferchat_client::Identity>,
    ) -> Result<Session, saferchat_client::ClientError> {
        let room = saferchat_consensus::RoomId::new(room)
            .map_err(|e| saferchat_client::ClientError::Protocol(e.to_string()))?;
        let options = JoinOptions {
            no_history: true,
            ..JoinOptions::default()
        };
        Session::join(&self.server(through), &room, me, &options).await
    }

    /// [`Cluster::try_join`], retried every 200 ms until `deadline` passes.
    ///
    /// # Panics
    /// When no join succeeded by then.
    pub async fn join(
        &self,
        room: &str,
        through: usize,
        who: usize,
        deadline: std::time::Duration,
    ) -> Session {
        let me = Arc::new(saferchat_client::test_keys::identity(who));
        self.join_as(room, through, me, deadline).await
    }

    async fn join_as(
        &self,
        room: &str,
        through: usize,
        me: Arc<saferchat_client::Identity>,
        deadline: std::time::Duration,
    ) -> Session {
        let started = std::time::Instant::now();
        loop {
            match self.try_join_as(room, through, Arc::clone(&me)).await {
                Ok(s) => return s,
                Err(e) => {
                    assert!(started.elapsed() < deadline, "could not join {room}: {e}");
                    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
                }
            }
        }
    }

    /// Posts `n` messages `"{label} {i}"` to `room` on `session` and
    /// waits for every acknowledgement: (id, room sequence number) in
    /// posting order. When the node ends the session (the room moved:
    /// on a loaded machine a follower may miss the leader's heartbeats
    /// and take over), it joins again through node `through` as the
    /// same user, at the same durability level, and posts the
    /// unacknowledged envelopes again: the node recognises a retry and
    /// answers it with the original number, so nothing is stored twice.
    ///
    /// # Panics
    /// On a refusal, or when an acknowledgement or a join does not come
    /// within `deadline`.
    pub async fn post_acked_rejoining(
        &self,
        session: &mut Session,
        room: &str,
        through: usize,
        label: &str,
        n: usize,
        deadline: std::time::Duration,
    ) -> Vec<(bytes::Bytes, u64)> {
        // Far above the numbers `Session::post` gives, so the two never
        // meet on one session.
        const FIRST_SEQ: u64 = 1 << 40;
        let envelopes: Vec<bytes::Bytes> = (0..n)
            .map(|i| {
                session
                    .seal(format!("{label} {i}").as_bytes())
                    .expect("seal")
            })
            .collect();
        let mut acked: Vec<Option<(bytes::Bytes, u64)>> = vec![None; n];
        loop {
            // Whether the session still takes posts and answers them.
            let mut open = true;
            for (i, envelope) in envelopes.iter().enumerate() {
                if acked[i].is_none() {
                    open &= session
                        .send_raw(FIRST_SEQ + i as u64, envelope.clone())
                        .await
                        .is_ok();
                }
            }
            while open && acked.iter().any(Option::is_none) {
                match tokio::time::timeout(deadline, session.next()).await {
                    Ok(Ok(Some(saferchat_client::session::Event::Accepted {
                        seq,
                        id,
                        room_seq,
                        ..
                    }))) => {
                        if let Some(slot) = seq
                            .checked_sub(FIRST_SEQ)
                            .and_then(|i| acked.get_mut(usize::try_from(i).ok()?))
                        {
                            *slot = Some((id, room_seq));
                        }
                    }
                    Ok(Ok(Some(saferchat_client::session::Event::Rejected {
                        message, ..
                    }))) => panic!("{label}: refused: {message}"),
                    Ok(Ok(Some(_))) => {}
                    // Ended cleanly, or because the room moved.
                    Ok(Ok(None)) => open = false,
                    Ok(Err(saferchat_client::ClientError::Status(status)))
                        if status.code() == tonic::Code::Unavailable =>
                    {
                        open = false;
                    }
                    Ok(Err(e)) => panic!("{label}: session ended: {e}"),
                    Err(_) => panic!("{label}: no acknowledgement within {deadline:?}"),
                }
            }
            if open {
                return acked
                    .into_iter()
                    .map(|a| a.expect("acknowledged"))
                    .collect();
            }
            let durability = session.durability();
            eprintln!(
                "{label}: the session on node {} ended; joining {room} again",
                self.node_of(session) + 1
            );
            *session = self
                .join_as(room, through, Arc::clone(session.identity()), deadline)
                .await;
            session.set_durability(durability);
        }
    }

    /// Waits (polling every 100 ms, up to `deadline`) until node `i`
    /// applied as much of `room`'s partition as node `leader` did
    /// (`saferchat_partition_applied_slot`; needs [`Options::metrics`]).
    ///
    /// # Panics
    /// When it did not by then.
    pub async fn wait_caught_up(
        &self,
        room: &str,
        i: usize,
        leader: usize,
        deadline: std::time::Duration,
    ) {
        let partition = saferchat_placement::PartitionCount::DEFAULT.of_room(room).0;
        let series = format!("saferchat_partition_applied_slot{{partition=\"{partition}\"}}");
        let started = std::time::Instant::now();
        loop {
            let want = crate::process::scrape_value(self.metrics[leader], &series).await;
            let have = crate::process::scrape_value(self.metrics[i], &series).await;
            if let (Some(want), Some(have)) = (want, have)
                && want > 0.0
                && have == want
            {
                return;
            }
            assert!(
                started.elapsed() < deadline,
                "node {} never caught up on {room} ({have:?} of {want:?})",
                i + 1
            );
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
    }

    /// Cuts datacenter `dc` off from every other one, both ways: its nodes
    /// still reach each other, and clients still reach every node.
    pub fn cut_off_datacenter(&self, dc: &str) {
        self.set_links_across(dc, Link::Blocked);
    }

    /// Reconnects datacenter `dc` to the others.
    pub fn reconnect_datacenter(&self, dc: &str) {
        self.set_links_across(dc, Link::Open { delay_ms: 0 });
    }

    fn set_links_across(&self, dc: &str, link: Link) {
        for ((from, to), proxy) in &self.links {
            if (self.datacenters[*from] == dc) != (self.datacenters[*to] == dc) {
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

    /// Fills node `i`'s disk (needs [`Options::data_tmpfs`]).
    pub fn fill_disk(&self, i: usize) {
        crate::tmpfs::fill(&self.tmpfs[i].at.join("ballast"));
    }

    /// Frees node `i`'s disk; when the node stopped meanwhile (a full disk
    /// may stop it), starts it again, as a supervisor would.
    ///
    /// # Panics
    /// When the ballast cannot be removed or the node does not restart.
    pub fn free_disk(&mut self, i: usize) {
        std::fs::remove_file(self.tmpfs[i].at.join("ballast")).expect("remove the ballast");
        // A node that decided to stop (its last "stopping" line after its
        // last "serving" one) may still be shutting down: wait for its exit
        // (polled, bounded) so that it is started again too.
        let log = self.nodes[i].log_text();
        if log.rfind("\"message\":\"stopping\"")
            > log.rfind("\"message\":\"saferchat node serving\"")
        {
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
            while self.nodes[i].exit_status().is_none() && std::time::Instant::now() < deadline {
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
        }
        if let Some(status) = self.nodes[i].exit_status() {
            eprintln!(
                "node {} stopped while its disk was full ({status}); restarting it",
                i + 1
            );
            self.nodes[i].kill();
            self.restart(i);
        }
    }

    /// SIGKILL node `i`.
    pub fn kill(&mut self, i: usize) {
        self.nodes[i].kill();
    }

    /// Stops each of nodes `which` cleanly and reads its own store of
    /// `rooms` as fixture member `reader` (senders: members `senders`):
    /// per node, per room, oldest first ([`crate::load::stored`]).
    ///
    /// # Panics
    /// When a node does not stop cleanly or its store cannot be read.
    pub async fn stopped_stores(
        &mut self,
        which: &[usize],
        rooms: &[saferchat_consensus::RoomId],
        reader: usize,
        senders: std::ops::Range<usize>,
    ) -> Vec<Vec<Vec<crate::chaos::history::Seen>>> {
        let reader = crate::load::identity(reader);
        let mut stores = Vec::new();
        for &i in which {
            assert!(self.nodes[i].stop(), "node {} stops cleanly", i + 1);
            stores.push(
                crate::load::stored(&self.nodes[i].data_dir, rooms, &reader, senders.clone()).await,
            );
        }
        stores
    }

    /// Restarts node `i` with its data; its addresses stay the same for
    /// clients and peers.
    ///
    /// # Panics
    /// When it does not start.
    pub fn restart(&mut self, i: usize) {
        let mut attempt = 0;
        loop {
            attempt += 1;
            match self.nodes[i].try_restart() {
                Ok(()) => break,
                Err(log) if attempt < START_ATTEMPTS && lost_a_port(&log) => {
                    if !self.metrics.is_empty() {
                        let port = free_port();
                        self.nodes[i].set_env(METRICS_LISTEN, &format!("127.0.0.1:{port}"));
                    }
                }
                Err(log) => panic!("node {} did not restart: {log}", i + 1),
            }
        }
        if !self.metrics.is_empty() {
            self.metrics[i] = metrics_address(&self.nodes[i]);
        }
        self.peer_addresses[i] = self.nodes[i].peer_addr.expect("peer listener");
        self.point_at(i);
    }
}

/// The metrics address a node was started with.
fn metrics_address(node: &NodeProcess) -> SocketAddr {
    node.env(METRICS_LISTEN)
        .expect("metrics asked for")
        .parse()
        .expect("metrics address")
}
