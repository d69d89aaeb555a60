//! Node configuration: a struct with defaults, read from an optional TOML
//! file, then overridden by `SAFERCHAT_*` environment variables, then
//! validated. `main.rs` is the only place that parses command-line flags.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use saferchat_consensus::{Drift, LeaseConfig, NodeId, ProposerConfig, ReplicaConfig};
use serde::{Deserialize, Serialize};

use crate::error::NodeError;

/// The smallest `partition_log_retained_bytes`: a few posts, so a replica
/// that misses a moment's traffic still catches up from the log.
pub const PARTITION_LOG_RETAINED_MIN: usize = 64 * 1024;

/// Everything a node needs to start.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NodeConfig {
    /// Client-facing gRPC address: chat, health and reflection, and the
    /// admin service too unless `admin_on_client_port` says otherwise.
    pub listen: SocketAddr,
    /// A listener of its own for the admin service (with health and
    /// reflection), so the chat port can face the internet without it.
    pub admin_listen: Option<SocketAddr>,
    /// The web listener for browsers (grpc-web: `BrowserChat`, and
    /// `ChatRoom`'s `Members` and `History`). Off by default: a node
    /// exposes no HTTP/1.1 surface unless asked. Beyond loopback it needs
    /// `tls`, whatever `insecure_plaintext` says: browsers give a page
    /// WebCrypto only in a secure context (HTTPS, or localhost).
    pub web_listen: Option<SocketAddr>,
    /// Whether `listen` serves the admin service too. Default: only when
    /// `listen` is a loopback address.
    pub admin_on_client_port: Option<bool>,
    /// Serve `listen` and `admin_listen` in plaintext even on addresses
    /// other than loopback. Without `tls`, any other address needs this
    /// said explicitly.
    pub insecure_plaintext: bool,
    /// TLS on `listen` and `admin_listen`; absent: plaintext.
    pub tls: Option<ListenerTlsConfig>,
    /// Where sled data, the admin token and the session key live.
    pub data_dir: PathBuf,
    /// The admin bearer token. When absent, one is generated on first
    /// start into `data_dir/admin.token` (mode 0600).
    pub admin_token: Option<String>,
    /// Key for session tokens (any string of 32+ bytes). When absent, one
    /// is generated into `data_dir/session.key`. Nodes of one cluster that
    /// should accept each other's session tokens share it.
    pub session_secret: Option<String>,
    /// Prometheus metrics endpoint; none when absent.
    pub metrics_listen: Option<SocketAddr>,
    /// Log output format.
    pub log_format: LogFormat,
    /// This node's id within the cluster.
    pub node_id: u64,
    /// This node's datacenter.
    pub datacenter: String,
    /// Node-to-node gRPC address; required when `peers` is not empty.
    pub peer_listen: Option<SocketAddr>,
    /// Where other nodes reach this node's peer face, when that is not
    /// `peer_listen` (a proxy, NAT, or `peer_listen` on `0.0.0.0`). The
    /// cluster map records it when this node creates the map, and nodes
    /// that join dial it; absent: `peer_listen` as bound.
    pub advertise_peer_address: Option<SocketAddr>,
    /// Where other nodes (forwarding) and clients (redirected) reach this
    /// node's client face, when that is not `listen`; absent: `listen`
    /// as bound.
    pub advertise_client_address: Option<SocketAddr>,
    /// The other nodes of the replica set. Empty: a single node (unless
    /// `join`).
    pub peers: Vec<PeerConfig>,
    /// Join a running cluster instead of starting one: the node waits
    /// until an operator adds it to the cluster map (`saferchat cluster
    /// add-node`) and takes the other nodes from the map, so `peers` stays
    /// empty. A node that joined holds no replica slot in this version: it
    /// serves clients by redirecting and forwarding to the rooms' owners.
    pub join: bool,
    /// Mutual TLS on the peer face; required when `peers` is not empty.
    pub peer_tls: Option<PeerTlsConfig>,
    /// Partitions of the room-hash space; fixed when the cluster is created
    /// (recorded in `data_dir/cluster.toml`).
    pub partitions: u32,
    /// Replicas of each partition in each datacenter.
    pub replicas_per_datacenter: usize,
    /// Applied entries each partition's log keeps for replicas that fall
    /// behind; a replica further behind copies the partition's timeline
    /// instead. At most 16 MiB: a Promise carries them, and peer frames
    /// are bounded for that size.
    pub partition_log_retained_bytes: usize,
    /// Lease timing.
    pub lease: LeaseSettings,
    /// Where rooms and messages are stored.
    pub storage: StorageConfig,
    /// Resource limits.
    pub limits: Limits,
}

/// Where the client and admin listeners' TLS certificate comes from:
/// files (`cert` and `key`), or a self-signed certificate the node makes
/// once in its data folder (`self_signed`; clients pin its fingerprint).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ListenerTlsConfig {
    /// The certificate chain (PEM), leaf first.
    pub cert: Option<PathBuf>,
    /// Its private key (PEM).
    pub key: Option<PathBuf>,
    /// Make (once) and use a self-signed certificate in
    /// `data_dir/tls/`, for development.
    pub self_signed: bool,
    /// Extra DNS names or addresses the self-signed certificate names,
    /// besides `localhost`, 127.0.0.1, ::1 and the listen addresses.
    pub names: Vec<String>,
}

/// Log output format.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// Another node of the replica set.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PeerConfig {
    /// Its node id.
    pub id: u64,
    /// Its node-to-node address (`peer_listen` over there).
    pub peer_address: SocketAddr,
    /// Its client-facing address, for redirecting clients.
    pub client_address: SocketAddr,
    /// Its datacenter.
    pub datacenter: String,
    /// It joined through the cluster map and holds no replica slot (set
    /// from the map on a node that joined; never configured).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub joining: bool,
}

/// The files of this node's peer TLS (see `saferchat-node certs`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PeerTlsConfig {
    /// The cluster CA certificate (PEM): peers must present a certificate
    /// it signed.
    pub ca: PathBuf,
    /// This node's certificate (PEM), naming `n<ID>.<DC>.saferchat`.
    pub cert: PathBuf,
    /// This node's private key (PEM).
    pub key: PathBuf,
}

impl ListenerTlsConfig {
    /// Either both files, or `self_signed`.
    ///
    /// # Errors
    /// [`NodeError::Config`] saying what is missing or contradictory.
    pub fn validate(&self) -> Result<(), NodeError> {
        match (&self.cert, &self.key, self.self_signed) {
            (Some(_), Some(_), false) | (None, None, true) => Ok(()),
            (Some(_), Some(_), true) => Err(invalid("tls: cert and key, or self_signed, not both")),
            (None, None, false) => Err(invalid(
                "tls: set cert and key (PEM files), or self_signed = true",
            )),
            _ => Err(invalid("tls: cert and key go together")),
        }
    }
}

impl PeerTlsConfig {
    /// The files `saferchat-node certs` writes for `node` into `dir`.
    pub fn in_dir(dir: &Path, node: u64) -> PeerTlsConfig {
        PeerTlsConfig {
            ca: dir.join("ca.pem"),
            cert: dir.join(format!("node-{node}.pem")),
            key: dir.join(format!("node-{node}.key")),
        }
    }
}

/// Lease timing, as configured. See `saferchat_consensus::LeaseConfig`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LeaseSettings {
    /// How long a holder may read locally after asking.
    pub lease_ms: u64,
    /// How often holders renew.
    pub renew_every_ms: u64,
    /// Slack added to promises and waits.
    pub guard_ms: u64,
    /// The assumed bound on clock rate drift, in parts per million.
    pub drift_ppm_max: u64,
}

impl Default for LeaseSettings {
    fn default() -> LeaseSettings {
        let d = LeaseConfig::default();
        LeaseSettings {
            lease_ms: d.lease_ms,
            renew_every_ms: d.renew_every_ms,
            guard_ms: d.guard_ms,
            drift_ppm_max: d.drift.ppm_max,
        }
    }
}

/// Storage backend selection.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StorageConfig {
    /// Which store keeps the timeline and committed membership.
    pub backend: Backend,
    /// Cassandra settings, used when `backend = "cassandra"`.
    pub cassandra: CassandraConfig,
}

/// Which store keeps rooms and messages. Acceptor state always lives in
/// the node's own sled database: it is this node's vote.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    /// Embedded sled in `data_dir`: no other software needed.
    #[default]
    Sled,
    /// Apache Cassandra or ScyllaDB.
    Cassandra,
}

/// Cassandra connection settings.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CassandraConfig {
    /// `host:port` of one or more nodes.
    pub contact_points: Vec<String>,
    /// The local datacenter (for routing and LOCAL_* consistency).
    pub datacenter: String,
    /// Keyspace name.
    pub keyspace: String,
    /// Replication, e.g. `{'class': 'SimpleStrategy', 'replication_factor': 1}`
    /// or `{'class': 'NetworkTopologyStrategy', 'dc1': 3, 'dc2': 3}`.
    pub replication: String,
    /// How long a starting node keeps trying to reach Cassandra before it
    /// gives up, in seconds: nodes and Cassandra may start in any order
    /// (a restart during a Cassandra outage waits it out). 0 = one try.
    pub connect_wait_s: u64,
}

impl Default for CassandraConfig {
    fn default() -> CassandraConfig {
        CassandraConfig {
            contact_points: vec!["127.0.0.1:9042".to_owned()],
            datacenter: "datacenter1".to_owned(),
            keyspace: "saferchat".to_owned(),
            replication: "{'class': 'SimpleStrategy', 'replication_factor': 1}".to_owned(),
            connect_wait_s: 120,
        }
    }
}

/// Resource limits. Every queue and every page has one.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Limits {
    /// Deliveries queued for one session before it is closed as too slow.
    pub session_queue_max: usize,
    /// Concurrent chat sessions on this node (counted once a join is
    /// proven, or relayed to the node that serves the room).
    pub sessions_max: usize,
    /// Sessions of one member (handle) on this node, over all rooms.
    pub sessions_per_member_max: usize,
    /// `Post` streams that have not proven their key yet (each gets at most
    /// `join_timeout_ms` per step).
    pub joins_pending_max: usize,
    /// Commands queued for one room.
    pub room_queue_max: usize,
    /// Posts written to storage in one batch.
    pub room_batch_max: usize,
    /// Messages sent on join when the client does not say.
    pub history_on_join: u32,
    /// Most messages one history call or join returns.
    pub history_max: u32,
    /// How long a session token stays valid.
    pub session_token_ms: u64,
    /// How long a joining client has to answer the challenge.
    pub join_timeout_ms: u64,
    /// Posts one member may make per second through this node (0: no
    /// limit), and how many at once above that rate.
    pub posts_per_second: u32,
    /// See `posts_per_second`.
    pub posts_burst: u32,
    /// Concurrent HTTP/2 streams (sessions and calls) on one client
    /// connection.
    pub streams_per_connection_max: u32,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            session_queue_max: 1024,
            sessions_max: 100_000,
            joins_pending_max: 4_096,
            sessions_per_member_max: 256,
            room_queue_max: 4096,
            room_batch_max: 512,
            history_on_join: 50,
            history_max: 1000,
            session_token_ms: 12 * 60 * 60 * 1000,
            join_timeout_ms: 30_000,
            // A person types far slower; a bot relaying a feed fits too.
            posts_per_second: 20,
            posts_burst: 40,
            streams_per_connection_max: 256,
        }
    }
}

impl Default for NodeConfig {
    fn default() -> NodeConfig {
        NodeConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            data_dir: PathBuf::from("saferchat-data"),
            admin_token: None,
            session_secret: None,
            metrics_listen: None,
            admin_listen: None,
            web_listen: None,
            admin_on_client_port: None,
            insecure_plaintext: false,
            tls: None,
            log_format: LogFormat::Text,
            node_id: 1,
            datacenter: "dc1".to_owned(),
            peer_listen: None,
            advertise_peer_address: None,
            advertise_client_address: None,
            peers: Vec::new(),
            join: false,
            peer_tls: None,
            partitions: saferchat_placement::PartitionCount::DEFAULT.get(),
            replicas_per_datacenter: saferchat_placement::ring::REPLICAS_PER_DATACENTER_DEFAULT,
            partition_log_retained_bytes: crate::timeline::driver::RETAINED_BYTES_MAX,
            lease: LeaseSettings::default(),
            storage: StorageConfig::default(),
            limits: Limits::default(),
        }
    }
}

/// Secrets that were published in saferchat's example files (the compose
/// file and the Kubernetes manifest once shipped these values). Anyone who
/// has read the repository knows them, so a node refuses them, and any
/// value that still carries a "change-me" marker.
const PUBLISHED_SECRETS: &[&str] = &[
    "change-me-admin-token-0123456789",
    "change-me-session-secret-0123456789abcdef",
];

fn is_published_secret(value: &str) -> bool {
    PUBLISHED_SECRETS.contains(&value) || value.to_ascii_lowercase().contains("change-me")
}

/// A configured secret must be long enough and not one the repository
/// published.
fn check_secret(name: &str, value: &str, min_len: usize, unit: &str) -> Result<(), NodeError> {
    if value.len() < min_len {
        return Err(invalid(format!("{name} must be at least {min_len} {unit}")));
    }
    if is_published_secret(value) {
        return Err(invalid(format!(
            "{name} is an example value published with saferchat: generate one (e.g. openssl rand -base64 32)"
        )));
    }
    Ok(())
}

fn invalid(message: impl Into<String>) -> NodeError {
    NodeError::Config(message.into())
}

fn parse_env<T: std::str::FromStr>(name: &str, value: &str) -> Result<T, NodeError>
where
    T::Err: std::fmt::Display,
{
    value
        .parse()
        .map_err(|e| invalid(format!("{name}={value:?}: {e}")))
}

/// Parses `SAFERCHAT_PEERS`: `id=peer_addr/client_addr@dc`, comma separated.
fn parse_peers(value: &str) -> Result<Vec<PeerConfig>, NodeError> {
    let shape = "expected id=peer_host:port/client_host:port@datacenter, comma separated";
    value
        .split(',')
        .filter(|s| !s.trim().is_empty())
        .map(|entry| {
            let entry = entry.trim();
            let (id, rest) = entry
                .split_once('=')
                .ok_or_else(|| invalid(format!("SAFERCHAT_PEERS entry {entry:?}: {shape}")))?;
            let (addrs, dc) = rest
                .split_once('@')
                .ok_or_else(|| invalid(format!("SAFERCHAT_PEERS entry {entry:?}: {shape}")))?;
            let (peer, client) = addrs
                .split_once('/')
                .ok_or_else(|| invalid(format!("SAFERCHAT_PEERS entry {entry:?}: {shape}")))?;
            Ok(PeerConfig {
                id: parse_env("SAFERCHAT_PEERS id", id)?,
                peer_address: parse_env("SAFERCHAT_PEERS peer address", peer)?,
                client_address: parse_env("SAFERCHAT_PEERS client address", client)?,
                datacenter: dc.to_owned(),
                joining: false,
            })
        })
        .collect()
}

impl NodeConfig {
    /// Reads a TOML file.
    ///
    /// # Errors
    /// [`NodeError::Config`] when the file cannot be read or parsed.
    pub fn from_file(path: &Path) -> Result<NodeConfig, NodeError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| invalid(format!("reading {}: {e}", path.display())))?;
        toml::from_str(&text).map_err(|e| invalid(format!("{}: {e}", path.display())))
    }

    /// Applies `SAFERCHAT_*` overrides; `env` looks a variable up (so tests
    /// need not touch the process environment).
    ///
    /// # Errors
    /// [`NodeError::Config`] naming the variable that does not parse.
    pub fn apply_env(&mut self, env: impl Fn(&str) -> Option<String>) -> Result<(), NodeError> {
        if let Some(v) = env("SAFERCHAT_LISTEN") {
            self.listen = parse_env("SAFERCHAT_LISTEN", &v)?;
        }
        if let Some(v) = env("SAFERCHAT_ADMIN_LISTEN") {
            self.admin_listen = Some(parse_env("SAFERCHAT_ADMIN_LISTEN", &v)?);
        }
        if let Some(v) = env("SAFERCHAT_WEB_LISTEN") {
            self.web_listen = Some(parse_env("SAFERCHAT_WEB_LISTEN", &v)?);
        }
        if let Some(v) = env("SAFERCHAT_ADMIN_ON_CLIENT_PORT") {
            self.admin_on_client_port = Some(parse_env("SAFERCHAT_ADMIN_ON_CLIENT_PORT", &v)?);
        }
        if let Some(v) = env("SAFERCHAT_INSECURE_PLAINTEXT") {
            self.insecure_plaintext = parse_env("SAFERCHAT_INSECURE_PLAINTEXT", &v)?;
        }
        if let Some(v) = env("SAFERCHAT_TLS_CERT") {
            self.tls.get_or_insert_default().cert = Some(PathBuf::from(v));
        }
        if let Some(v) = env("SAFERCHAT_TLS_KEY") {
            self.tls.get_or_insert_default().key = Some(PathBuf::from(v));
        }
        if let Some(v) = env("SAFERCHAT_TLS_SELF_SIGNED") {
            if parse_env("SAFERCHAT_TLS_SELF_SIGNED", &v)? {
                self.tls.get_or_insert_default().self_signed = true;
            } else if let Some(tls) = &mut self.tls {
                tls.self_signed = false;
            }
        }
        if let Some(v) = env("SAFERCHAT_DATA_DIR") {
            self.data_dir = PathBuf::from(v);
        }
        if let Some(v) = env("SAFERCHAT_ADMIN_TOKEN") {
            self.admin_token = Some(v);
        }
        if let Some(v) = env("SAFERCHAT_SESSION_SECRET") {
            self.session_secret = Some(v);
        }
        if let Some(v) = env("SAFERCHAT_PARTITION_LOG_RETAINED_BYTES") {
            self.partition_log_retained_bytes =
                parse_env("SAFERCHAT_PARTITION_LOG_RETAINED_BYTES", &v)?;
        }
        if let Some(v) = env("SAFERCHAT_METRICS_LISTEN") {
            self.metrics_listen = Some(parse_env("SAFERCHAT_METRICS_LISTEN", &v)?);
        }
        if let Some(v) = env("SAFERCHAT_LOG_FORMAT") {
            self.log_format = match v.as_str() {
                "text" => LogFormat::Text,
                "json" => LogFormat::Json,
                _ => return Err(invalid(format!("SAFERCHAT_LOG_FORMAT={v:?}: text or json"))),
            };
        }
        if let Some(v) = env("SAFERCHAT_NODE_ID") {
            self.node_id = parse_env("SAFERCHAT_NODE_ID", &v)?;
        }
        if let Some(v) = env("SAFERCHAT_DATACENTER") {
            self.datacenter = v;
        }
        if let Some(v) = env("SAFERCHAT_PEER_LISTEN") {
            self.peer_listen = Some(parse_env("SAFERCHAT_PEER_LISTEN", &v)?);
        }
        if let Some(v) = env("SAFERCHAT_PEERS") {
            self.peers = parse_peers(&v)?;
        }
        if let Some(v) = env("SAFERCHAT_ADVERTISE") {
            let (peer, client) = v.split_once('/').ok_or_else(|| {
                invalid(format!(
                    "SAFERCHAT_ADVERTISE={v:?}: expected peer_host:port/client_host:port"
                ))
            })?;
            self.advertise_peer_address =
                Some(parse_env("SAFERCHAT_ADVERTISE peer address", peer)?);
            self.advertise_client_address =
                Some(parse_env("SAFERCHAT_ADVERTISE client address", client)?);
        }
        if let Some(v) = env("SAFERCHAT_JOIN") {
            self.join = parse_env("SAFERCHAT_JOIN", &v)?;
        }
        if let Some(v) = env("SAFERCHAT_PEER_TLS_DIR") {
            self.peer_tls = Some(PeerTlsConfig::in_dir(Path::new(&v), self.node_id));
        }
        if let Some(v) = env("SAFERCHAT_LEASE_MS") {
            self.lease.lease_ms = parse_env("SAFERCHAT_LEASE_MS", &v)?;
        }
        if let Some(v) = env("SAFERCHAT_LEASE_RENEW_MS") {
            self.lease.renew_every_ms = parse_env("SAFERCHAT_LEASE_RENEW_MS", &v)?;
        }
        if let Some(v) = env("SAFERCHAT_POSTS_PER_SECOND") {
            self.limits.posts_per_second = parse_env("SAFERCHAT_POSTS_PER_SECOND", &v)?;
        }
        if let Some(v) = env("SAFERCHAT_POSTS_BURST") {
            self.limits.posts_burst = parse_env("SAFERCHAT_POSTS_BURST", &v)?;
        }
        if let Some(v) = env("SAFERCHAT_SESSION_QUEUE_MAX") {
            self.limits.session_queue_max = parse_env("SAFERCHAT_SESSION_QUEUE_MAX", &v)?;
        }
        if let Some(v) = env("SAFERCHAT_STORAGE") {
            self.storage.backend = match v.as_str() {
                "sled" => Backend::Sled,
                "cassandra" => Backend::Cassandra,
                _ => {
                    return Err(invalid(format!(
                        "SAFERCHAT_STORAGE={v:?}: sled or cassandra"
                    )));
                }
            };
        }
        if let Some(v) = env("SAFERCHAT_CASSANDRA_CONTACT_POINTS") {
            self.storage.cassandra.contact_points = v
                .split(',')
                .map(|s| s.trim().to_owned())
                .filter(|s| !s.is_empty())
                .collect();
        }
        if let Some(v) = env("SAFERCHAT_CASSANDRA_DATACENTER") {
            self.storage.cassandra.datacenter = v;
        }
        if let Some(v) = env("SAFERCHAT_CASSANDRA_KEYSPACE") {
            self.storage.cassandra.keyspace = v;
        }
        if let Some(v) = env("SAFERCHAT_CASSANDRA_REPLICATION") {
            self.storage.cassandra.replication = v;
        }
        if let Some(v) = env("SAFERCHAT_CASSANDRA_CONNECT_WAIT_S") {
            self.storage.cassandra.connect_wait_s =
                parse_env("SAFERCHAT_CASSANDRA_CONNECT_WAIT_S", &v)?;
        }
        Ok(())
    }

    /// Checks the configuration as a whole.
    ///
    /// # Errors
    /// [`NodeError::Config`] describing the first problem found.
    pub fn validate(&self) -> Result<(), NodeError> {
        if self.node_id == 0 {
            return Err(invalid("node_id must be 1 or more"));
        }
        for dc in std::iter::once(&self.datacenter).chain(self.peers.iter().map(|p| &p.datacenter))
        {
            if !crate::peer_tls::is_valid_datacenter(dc) {
                return Err(invalid(format!(
                    "datacenter {dc:?}: 1-63 lowercase letters, digits and '-' (it is part of a certificate name)"
                )));
            }
        }
        if let Some(tls) = &self.tls {
            tls.validate()?;
        }
        for (name, addr) in [
            ("listen", Some(self.listen)),
            ("admin_listen", self.admin_listen),
        ] {
            if let Some(addr) = addr
                && !addr.ip().is_loopback()
                && self.tls.is_none()
                && !self.insecure_plaintext
            {
                return Err(invalid(format!(
                    "{name} = {addr} is not a loopback address and no TLS is configured: \
                     set [tls] (cert and key, or self_signed = true; --tls-cert/--tls-key or --tls-self-signed), \
                     or insecure_plaintext = true (--insecure-plaintext, SAFERCHAT_INSECURE_PLAINTEXT=true) \
                     to serve it in plaintext anyway"
                )));
            }
        }
        if let Some(addr) = self.web_listen
            && !addr.ip().is_loopback()
            && self.tls.is_none()
        {
            return Err(invalid(format!(
                "web_listen = {addr} is not a loopback address and no TLS is configured: \
                 browsers allow WebCrypto only on HTTPS pages (or localhost), so set [tls] \
                 (insecure_plaintext does not apply to the web listener)"
            )));
        }
        if let Some(token) = &self.admin_token {
            check_secret("admin_token", token, 16, "characters")?;
        }
        if let Some(secret) = &self.session_secret {
            check_secret("session_secret", secret, 32, "bytes")?;
        }
        if !(PARTITION_LOG_RETAINED_MIN..=crate::timeline::driver::RETAINED_BYTES_MAX)
            .contains(&self.partition_log_retained_bytes)
        {
            return Err(invalid(format!(
                "partition_log_retained_bytes = {}: {PARTITION_LOG_RETAINED_MIN} to {} (a Promise carries them, and peer frames are bounded for that)",
                self.partition_log_retained_bytes,
                crate::timeline::driver::RETAINED_BYTES_MAX
            )));
        }
        if self.join && self.peers.iter().any(|p| !p.joining) {
            return Err(invalid(
                "join and peers do not go together: a joining node learns the other nodes from the cluster map",
            ));
        }
        if !self.is_single_node() && self.peer_listen.is_none() {
            return Err(invalid("peer_listen is required when peers are configured"));
        }
        if !self.is_single_node() && self.peer_tls.is_none() {
            return Err(invalid(
                "peer_tls is required when peers are configured: nodes talk over mutual TLS \
                 (create certificates with `saferchat-node certs`, then set [peer_tls] or SAFERCHAT_PEER_TLS_DIR)",
            ));
        }
        let mut ids: Vec<u64> = self.peers.iter().map(|p| p.id).collect();
        ids.push(self.node_id);
        ids.sort_unstable();
        if ids.windows(2).any(|w| w[0] == w[1]) || ids.contains(&0) {
            return Err(invalid("node ids must be distinct and non-zero"));
        }
        if saferchat_placement::PartitionCount::new(self.partitions).is_none() {
            return Err(invalid(format!(
                "partitions must be 1 to {}",
                saferchat_placement::PartitionCount::MAX
            )));
        }
        if !(1..=9).contains(&self.replicas_per_datacenter) {
            return Err(invalid("replicas_per_datacenter must be 1 to 9"));
        }
        if self.limits.posts_per_second > 0 && self.limits.posts_burst == 0 {
            return Err(invalid(
                "limits.posts_burst must be 1 or more when posts_per_second limits posting",
            ));
        }
        if self.limits.streams_per_connection_max == 0 {
            return Err(invalid(
                "limits.streams_per_connection_max must be 1 or more",
            ));
        }
        let l = &self.limits;
        if l.session_queue_max < 16 || l.room_queue_max < 16 || l.room_batch_max == 0 {
            return Err(invalid(
                "limits: queues must hold at least 16 items, batches at least 1",
            ));
        }
        if l.history_max == 0 || l.history_on_join > l.history_max {
            return Err(invalid(
                "limits: history_on_join must not exceed history_max (> 0)",
            ));
        }
        if self.storage.backend == Backend::Cassandra {
            let c = &self.storage.cassandra;
            if c.contact_points.is_empty() {
                return Err(invalid("cassandra.contact_points must not be empty"));
            }
            let keyspace_ok = !c.keyspace.is_empty()
                && c.keyspace.len() <= 48
                && c.keyspace
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'_')
                && c.keyspace.as_bytes()[0].is_ascii_alphabetic();
            if !keyspace_ok {
                return Err(invalid(
                    "cassandra.keyspace must be 1-48 of A-Z a-z 0-9 _, starting with a letter",
                ));
            }
            if !c.replication.trim_start().starts_with('{') || c.replication.contains(';') {
                return Err(invalid("cassandra.replication must be a CQL map literal"));
            }
        }
        let mut replica = self.replica_config();
        if self.join {
            // A joining node holds no replica slot: it is in no replica
            // set, and only the timings are checked here.
            replica.replicas = vec![replica.me];
            replica.holders = vec![replica.me];
        }
        replica
            .validate()
            .map_err(|e| invalid(format!("replica set: {e}")))
    }

    /// The replica set of every room: this node and its peers. Lease holders
    /// are every replica in a single datacenter, otherwise the lowest node id
    /// of each datacenter.
    pub fn replica_config(&self) -> ReplicaConfig {
        let members = self.placement_members();
        let replicas: Vec<NodeId> = members.iter().map(|(id, _)| NodeId(*id)).collect();
        let mut datacenters: Vec<&str> = members.iter().map(|(_, dc)| *dc).collect();
        datacenters.sort_unstable();
        datacenters.dedup();
        let holders = if datacenters.len() == 1 {
            replicas.clone()
        } else {
            datacenters
                .iter()
                .filter_map(|dc| {
                    members
                        .iter()
                        .find(|(_, d)| d == dc)
                        .map(|(id, _)| NodeId(*id))
                })
                .collect::<Vec<_>>()
        };
        let mut holders = holders;
        holders.sort_unstable();
        ReplicaConfig {
            me: NodeId(self.node_id),
            replicas,
            // Every partition's set until it moves (a room's own set comes
            // from `placement::room_replicas`, with its partition's epoch).
            epoch: saferchat_placement::CREATED_EPOCH,
            holders,
            lease: LeaseConfig {
                lease_ms: self.lease.lease_ms,
                renew_every_ms: self.lease.renew_every_ms,
                guard_ms: self.lease.guard_ms,
                drift: Drift::new(self.lease.drift_ppm_max.min(499_999)),
            },
            proposer: ProposerConfig::default(),
        }
    }

    /// Whether the client listener serves the admin service too (see
    /// [`NodeConfig::admin_on_client_port`]).
    pub fn serves_admin_on_client_port(&self) -> bool {
        self.admin_on_client_port
            .unwrap_or_else(|| self.listen.ip().is_loopback())
    }

    /// Whether this node is alone (the embedded deployment).
    pub fn is_single_node(&self) -> bool {
        self.peers.is_empty() && !self.join
    }

    /// The nodes that hold replica slots, with their datacenters, by id:
    /// the configured ones, without nodes that joined through the map
    /// (this one included, when it did).
    pub fn placement_members(&self) -> Vec<(u64, &str)> {
        let mut members: Vec<(u64, &str)> = self
            .peers
            .iter()
            .filter(|p| !p.joining)
            .map(|p| (p.id, p.datacenter.as_str()))
            .collect();
        if !self.join {
            members.push((self.node_id, self.datacenter.as_str()));
        }
        members.sort_unstable();
        members
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env(vars: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |k| map.get(k).cloned()
    }

    #[test]
    fn defaults_are_a_valid_single_node() {
        let c = NodeConfig::default();
        c.validate().unwrap();
        assert_eq!(c.listen.to_string(), "127.0.0.1:8080");
        assert!(c.is_single_node());
        assert_eq!(c.replica_config().replicas, vec![NodeId(1)]);
    }

    #[test]
    fn environment_overrides_the_file() {
        let mut c: NodeConfig = toml::from_str("listen = \"127.0.0.1:9000\"\nnode_id = 4").unwrap();
        c.apply_env(env(&[
            ("SAFERCHAT_LISTEN", "127.0.0.1:9100"),
            ("SAFERCHAT_PEER_LISTEN", "127.0.0.1:9101"),
            (
                "SAFERCHAT_PEERS",
                "5=127.0.0.1:9201/127.0.0.1:9200@dc1, 6=127.0.0.1:9301/127.0.0.1:9300@dc2",
            ),
            ("SAFERCHAT_STORAGE", "cassandra"),
            ("SAFERCHAT_CASSANDRA_KEYSPACE", "chat_test"),
            ("SAFERCHAT_PEER_TLS_DIR", "/etc/saferchat/tls"),
        ]))
        .unwrap();
        assert_eq!(c.listen.to_string(), "127.0.0.1:9100");
        assert_eq!(c.node_id, 4);
        assert_eq!(c.peers.len(), 2);
        assert_eq!(c.storage.backend, Backend::Cassandra);
        assert_eq!(
            c.peer_tls.as_ref().unwrap().cert,
            Path::new("/etc/saferchat/tls/node-4.pem")
        );
        c.validate().unwrap();
        let r = c.replica_config();
        assert_eq!(r.replicas, vec![NodeId(4), NodeId(5), NodeId(6)]);
        // Two datacenters: one holder each, the lowest id.
        assert_eq!(r.holders, vec![NodeId(4), NodeId(6)]);
    }

    #[test]
    fn bad_values_are_named() {
        let mut c = NodeConfig::default();
        let e = c
            .apply_env(env(&[("SAFERCHAT_LISTEN", "nope")]))
            .unwrap_err();
        assert!(e.to_string().contains("SAFERCHAT_LISTEN"), "{e}");
        let e = c.apply_env(env(&[("SAFERCHAT_PEERS", "2=x")])).unwrap_err();
        assert!(e.to_string().contains("SAFERCHAT_PEERS"), "{e}");
        let e = c
            .apply_env(env(&[("SAFERCHAT_ADVERTISE", "127.0.0.1:1")]))
            .unwrap_err();
        assert!(e.to_string().contains("SAFERCHAT_ADVERTISE"), "{e}");
        c.apply_env(env(&[(
            "SAFERCHAT_ADVERTISE",
            "10.0.0.1:7001/10.0.0.1:8001",
        )]))
        .unwrap();
        assert_eq!(c.advertise_peer_address, Some(([10, 0, 0, 1], 7001).into()));
        assert_eq!(
            c.advertise_client_address,
            Some(([10, 0, 0, 1], 8001).into())
        );
        let e = c
            .apply_env(env(&[("SAFERCHAT_STORAGE", "mongo")]))
            .unwrap_err();
        assert!(e.to_string().contains("sled or cassandra"), "{e}");
        assert!(toml::from_str::<NodeConfig>("no_such_key = 1").is_err());
    }

    #[test]
    fn the_retained_log_is_bounded_both_ways() {
        let mut c = NodeConfig::default();
        c.apply_env(env(&[("SAFERCHAT_PARTITION_LOG_RETAINED_BYTES", "65536")]))
            .unwrap();
        assert_eq!(c.partition_log_retained_bytes, 65_536);
        c.validate().unwrap();
        for bad in [65_535, crate::timeline::driver::RETAINED_BYTES_MAX + 1] {
            c.partition_log_retained_bytes = bad;
            let e = c.validate().unwrap_err();
            assert!(
                e.to_string().contains("partition_log_retained_bytes"),
                "{e}"
            );
        }
    }

    #[test]
    fn tls_allows_any_address_and_its_settings_must_agree() {
        let mut c = NodeConfig {
            listen: "0.0.0.0:8443".parse().unwrap(),
            admin_listen: Some("10.0.0.5:8082".parse().unwrap()),
            ..NodeConfig::default()
        };
        assert!(c.validate().is_err(), "plaintext beyond loopback");
        c.apply_env(env(&[("SAFERCHAT_TLS_SELF_SIGNED", "true")]))
            .unwrap();
        c.validate().unwrap();
        c.apply_env(env(&[("SAFERCHAT_TLS_CERT", "/etc/s/cert.pem")]))
            .unwrap();
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("go together"), "{e}");
        c.apply_env(env(&[("SAFERCHAT_TLS_KEY", "/etc/s/key.pem")]))
            .unwrap();
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("not both"), "{e}");
        c.apply_env(env(&[("SAFERCHAT_TLS_SELF_SIGNED", "false")]))
            .unwrap();
        c.validate().unwrap();
        let file: NodeConfig =
            toml::from_str("[tls]\nself_signed = true\nnames = [\"chat.example\"]\n").unwrap();
        assert_eq!(file.tls.unwrap().names, vec!["chat.example".to_owned()]);
        let empty: NodeConfig = toml::from_str("[tls]\n").unwrap();
        let e = empty.validate().unwrap_err().to_string();
        assert!(e.contains("self_signed = true"), "{e}");
    }

    #[test]
    fn plaintext_beyond_loopback_must_be_asked_for_and_admin_stays_off_it() {
        let mut c = NodeConfig::default();
        assert!(
            c.serves_admin_on_client_port(),
            "loopback: admin beside chat"
        );
        c.validate().unwrap();
        c.listen = "0.0.0.0:8080".parse().unwrap();
        let e = c.validate().unwrap_err().to_string();
        assert!(
            e.contains("listen = 0.0.0.0:8080") && e.contains("insecure_plaintext"),
            "{e}"
        );
        assert!(
            !c.serves_admin_on_client_port(),
            "not on a public chat port"
        );
        c.insecure_plaintext = true;
        c.validate().unwrap();
        c.admin_on_client_port = Some(true);
        assert!(c.serves_admin_on_client_port());
        c.listen = "127.0.0.1:8080".parse().unwrap();
        c.insecure_plaintext = false;
        c.admin_on_client_port = Some(false);
        assert!(!c.serves_admin_on_client_port());
        c.admin_listen = Some("10.0.0.5:8082".parse().unwrap());
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("admin_listen = 10.0.0.5:8082"), "{e}");
        c.admin_listen = Some("[::1]:8082".parse().unwrap());
        c.validate().unwrap();
        c.apply_env(env(&[
            ("SAFERCHAT_ADMIN_LISTEN", "127.0.0.1:8082"),
            ("SAFERCHAT_ADMIN_ON_CLIENT_PORT", "true"),
            ("SAFERCHAT_INSECURE_PLAINTEXT", "true"),
        ]))
        .unwrap();
        assert_eq!(c.admin_listen, Some("127.0.0.1:8082".parse().unwrap()));
        assert_eq!(c.admin_on_client_port, Some(true));
        assert!(c.insecure_plaintext);
        let e = c
            .apply_env(env(&[("SAFERCHAT_INSECURE_PLAINTEXT", "yes")]))
            .unwrap_err();
        assert!(
            e.to_string().contains("SAFERCHAT_INSECURE_PLAINTEXT"),
            "{e}"
        );
    }

    #[test]
    fn a_web_listener_beyond_loopback_needs_tls_even_with_insecure_plaintext() {
        let mut c = NodeConfig::default();
        c.apply_env(env(&[("SAFERCHAT_WEB_LISTEN", "127.0.0.1:8443")]))
            .unwrap();
        assert_eq!(c.web_listen, Some("127.0.0.1:8443".parse().unwrap()));
        c.validate().unwrap();
        c.web_listen = Some("10.0.0.5:8443".parse().unwrap());
        c.insecure_plaintext = true;
        let e = c.validate().unwrap_err().to_string();
        assert!(
            e.contains("web_listen = 10.0.0.5:8443") && e.contains("WebCrypto"),
            "{e}"
        );
        c.tls = Some(ListenerTlsConfig {
            self_signed: true,
            ..ListenerTlsConfig::default()
        });
        c.validate().unwrap();
        let e = c
            .apply_env(env(&[("SAFERCHAT_WEB_LISTEN", "everywhere")]))
            .unwrap_err();
        assert!(e.to_string().contains("SAFERCHAT_WEB_LISTEN"), "{e}");
    }

    #[test]
    fn published_example_secrets_are_refused() {
        let strong = "q9Zt3v8mWf2KpL7xR4sN1bH6cJ0dY5eA";
        for published in PUBLISHED_SECRETS
            .iter()
            .copied()
            .chain(["CHANGE-ME-please-0123456789abcdef0123"])
        {
            let token = NodeConfig {
                admin_token: Some(published.into()),
                ..NodeConfig::default()
            };
            let e = token.validate().unwrap_err().to_string();
            assert!(e.contains("admin_token is an example value"), "{e}");
            let secret = NodeConfig {
                session_secret: Some(format!("{published:0<32}")),
                ..NodeConfig::default()
            };
            let e = secret.validate().unwrap_err().to_string();
            assert!(e.contains("session_secret is an example value"), "{e}");
        }
        let generated = NodeConfig {
            admin_token: Some(strong.into()),
            session_secret: Some(strong.into()),
            ..NodeConfig::default()
        };
        generated.validate().unwrap();
    }

    #[test]
    fn validation_catches_inconsistencies() {
        let mut c = NodeConfig {
            admin_token: Some("short".into()),
            ..NodeConfig::default()
        };
        assert!(c.validate().is_err());
        c.admin_token = None;
        c.peers.push(PeerConfig {
            id: 2,
            peer_address: "127.0.0.1:1".parse().unwrap(),
            client_address: "127.0.0.1:2".parse().unwrap(),
            datacenter: "dc1".into(),
            joining: false,
        });
        assert!(
            c.validate()
                .unwrap_err()
                .to_string()
                .contains("peer_listen")
        );
        c.peer_listen = Some("127.0.0.1:3".parse().unwrap());
        assert!(c.validate().unwrap_err().to_string().contains("peer_tls"));
        c.peer_tls = Some(PeerTlsConfig::in_dir(Path::new("/certs"), 1));
        c.validate().unwrap();
        c.peers[0].datacenter = "DC 1".into();
        assert!(c.validate().unwrap_err().to_string().contains("datacenter"));
        c.peers[0].datacenter = "dc1".into();
        c.peers[0].id = 1;
        assert!(c.validate().unwrap_err().to_string().contains("distinct"));
        let mut c = NodeConfig::default();
        c.storage.backend = Backend::Cassandra;
        c.storage.cassandra.keyspace = "bad-name".into();
        assert!(c.validate().is_err());
        let mut c = NodeConfig::default();
        c.lease.renew_every_ms = c.lease.lease_ms;
        assert!(c.validate().is_err());
    }

    #[test]
    fn a_joining_node_needs_peer_tls_and_no_configured_peers() {
        let mut c = NodeConfig {
            join: true,
            ..NodeConfig::default()
        };
        assert!(!c.is_single_node(), "it joins a cluster");
        assert!(
            c.validate()
                .unwrap_err()
                .to_string()
                .contains("peer_listen")
        );
        c.peer_listen = Some("127.0.0.1:3".parse().unwrap());
        assert!(c.validate().unwrap_err().to_string().contains("peer_tls"));
        c.peer_tls = Some(PeerTlsConfig::in_dir(Path::new("/certs"), 1));
        c.validate().unwrap();
        assert!(c.placement_members().is_empty(), "it holds no replica slot");
        c.peers.push(PeerConfig {
            id: 2,
            peer_address: "127.0.0.1:1".parse().unwrap(),
            client_address: "127.0.0.1:2".parse().unwrap(),
            datacenter: "dc1".into(),
            joining: false,
        });
        assert!(
            c.validate()
                .unwrap_err()
                .to_string()
                .contains("join and peers")
        );
        // Peers taken from the map: the joined ones hold no slot either.
        c.peers[0].joining = true;
        c.validate().unwrap();
        assert!(c.placement_members().is_empty());
    }
}
