//! Cassandra for tests: the shared instance the README's test command
//! starts (its address in `SAFERCHAT_CASSANDRA`), stores on it, reading
//! its tables directly, and private instances that a fault test starts and
//! stops by itself so it never disturbs the shared one.
//!
//! Tests that need Cassandra are `#[ignore = "needs Cassandra: …"]`, so a
//! plain `cargo test` lists them as ignored; `scripts/test.sh` runs them
//! with `--include-ignored`. Run by hand without `SAFERCHAT_CASSANDRA` they
//! panic with what to do, never pass silently.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Arc;

use futures::StreamExt as _;
use saferchat_node::config::CassandraConfig;
use saferchat_node::storage::cassandra::CassandraStore;
use scylla::client::session::Session;
use scylla::value::{CqlValue, Row};

/// The variable holding the shared instance's `host:port`.
pub const ADDRESS_ENV: &str = "SAFERCHAT_CASSANDRA";
/// The datacenter of a `deploy/cassandra` node (SimpleSnitch).
pub const DATACENTER: &str = "datacenter1";
/// Rows read from one table when searching it, at most.
const TABLE_ROWS_MAX: usize = 200_000;
/// Seconds `cassandra.sh wait` may take (first boot on a busy machine).
const START_WAIT_S: u32 = 240;

/// The shared instance's address.
///
/// # Panics
/// When `SAFERCHAT_CASSANDRA` is not set: the test needs a server.
pub fn address() -> String {
    std::env::var(ADDRESS_ENV).unwrap_or_else(|_| {
        panic!(
            "{ADDRESS_ENV} is not set: this test needs a running Cassandra. Run scripts/test.sh, \
             or start one (bash deploy/cassandra/cassandra.sh fetch, then start, then wait) and \
             export {ADDRESS_ENV}=127.0.0.1:9042"
        )
    })
}

/// The variable holding the two-datacenter pair's CQL addresses,
/// `dc1_host:port,dc2_host:port` (`cassandra.sh pair`).
pub const PAIR_ENV: &str = "SAFERCHAT_CASSANDRA_PAIR";
/// The datacenters of the pair, in the order of [`PAIR_ENV`].
pub const PAIR_DATACENTERS: [&str; 2] = ["dc1", "dc2"];
/// A keyspace replication with one replica in each datacenter of the pair.
pub const PAIR_REPLICATION: &str = "{'class': 'NetworkTopologyStrategy', 'dc1': 1, 'dc2': 1}";

/// The pair's addresses, dc1's first.
///
/// # Panics
/// When `SAFERCHAT_CASSANDRA_PAIR` is not set (or not two addresses).
pub fn pair() -> [String; 2] {
    let value = std::env::var(PAIR_ENV).unwrap_or_else(|_| {
        panic!(
            "{PAIR_ENV} is not set: this test needs the two-datacenter Cassandra pair. Run \
             scripts/test.sh, or start it (bash deploy/cassandra/cassandra.sh fetch, then \
             pair start, then pair wait) and export {PAIR_ENV}=127.0.0.2:9042,127.0.0.3:9042"
        )
    });
    let addresses: Vec<String> = value.split(',').map(str::to_owned).collect();
    addresses
        .try_into()
        .unwrap_or_else(|_| panic!("{PAIR_ENV}={value}: expected two addresses, dc1's first"))
}

/// Runs the nodes of `options` on the pair: their timelines in
/// `keyspace`, one replica in each datacenter ([`PAIR_REPLICATION`]), and
/// each node pinned to its own datacenter's Cassandra node (so
/// `options.datacenters` must name only [`PAIR_DATACENTERS`]).
///
/// # Panics
/// As [`pair`].
pub fn on_pair(options: &mut crate::cluster::Options, keyspace: &str) {
    let pair = pair();
    options.env.extend([
        ("SAFERCHAT_STORAGE".into(), "cassandra".into()),
        ("SAFERCHAT_CASSANDRA_KEYSPACE".into(), keyspace.into()),
        (
            "SAFERCHAT_CASSANDRA_REPLICATION".into(),
            PAIR_REPLICATION.into(),
        ),
    ]);
    for (i, dc) in PAIR_DATACENTERS.iter().enumerate() {
        for (name, value) in [
            ("SAFERCHAT_CASSANDRA_CONTACT_POINTS", pair[i].as_str()),
            ("SAFERCHAT_CASSANDRA_DATACENTER", dc),
        ] {
            options
                .datacenter_env
                .push(((*dc).into(), name.into(), value.into()));
        }
    }
}

/// Store settings for `keyspace` on the pair's node of datacenter `i`
/// (in the order of [`PAIR_DATACENTERS`]), pinned to it.
///
/// # Panics
/// As [`pair`].
pub fn pair_config(i: usize, keyspace: &str) -> CassandraConfig {
    CassandraConfig {
        datacenter: PAIR_DATACENTERS[i].to_owned(),
        replication: PAIR_REPLICATION.to_owned(),
        ..config(&pair()[i], keyspace)
    }
}

/// Store settings for `keyspace` on the Cassandra at `address` (RF 1).
pub fn config(address: &str, keyspace: &str) -> CassandraConfig {
    CassandraConfig {
        contact_points: vec![address.to_owned()],
        datacenter: DATACENTER.to_owned(),
        keyspace: keyspace.to_owned(),
        ..CassandraConfig::default()
    }
}

/// A store on the shared instance, schema migrated.
///
/// # Panics
/// Without `SAFERCHAT_CASSANDRA`, or when connecting fails.
pub async fn store(keyspace: &str) -> Arc<CassandraStore> {
    let address = address();
    Arc::new(
        CassandraStore::connect(&config(&address, keyspace))
            .await
            .unwrap_or_else(|e| panic!("connecting to Cassandra at {address}: {e}")),
    )
}

fn collect_values(value: &CqlValue, out: &mut Vec<Vec<u8>>) {
    match value {
        CqlValue::Ascii(s) | CqlValue::Text(s) => out.push(s.as_bytes().to_vec()),
        CqlValue::Blob(b) => out.push(b.clone()),
        CqlValue::List(items) | CqlValue::Set(items) | CqlValue::Vector(items) => {
            for v in items {
                collect_values(v, out);
            }
        }
        CqlValue::Map(pairs) => {
            for (k, v) in pairs {
                collect_values(k, out);
                collect_values(v, out);
            }
        }
        CqlValue::Tuple(items) => {
            for v in items.iter().flatten() {
                collect_values(v, out);
            }
        }
        CqlValue::UserDefinedType { fields, .. } => {
            for (_, v) in fields {
                if let Some(v) = v {
                    collect_values(v, out);
                }
            }
        }
        _ => {}
    }
}

/// Every text and blob value (also inside collections) of every table of
/// `keyspace`, as `(table, bytes)`: what `SELECT *` on each table shows.
///
/// # Panics
/// When a query fails or a table has more than 200,000 rows.
pub async fn every_value(session: &Session, keyspace: &str) -> Vec<(String, Vec<u8>)> {
    let tables: Vec<(String,)> = session
        .query_unpaged(
            "SELECT table_name FROM system_schema.tables WHERE keyspace_name = ?",
            (keyspace,),
        )
        .await
        .expect("list tables")
        .into_rows_result()
        .expect("rows")
        .rows::<(String,)>()
        .expect("typed rows")
        .collect::<Result<_, _>>()
        .expect("table names");
    assert!(!tables.is_empty(), "keyspace {keyspace} has no tables");
    let mut out = Vec::new();
    for (table,) in tables {
        let mut rows = session
            .query_iter(format!("SELECT * FROM {keyspace}.{table}"), ())
            .await
            .expect("select")
            .rows_stream::<Row>()
            .expect("untyped rows");
        let mut count = 0;
        while let Some(row) = rows.next().await {
            let row = row.expect("row");
            count += 1;
            assert!(
                count <= TABLE_ROWS_MAX,
                "{keyspace}.{table} is too big to search"
            );
            let mut values = Vec::new();
            for v in row.columns.iter().flatten() {
                collect_values(v, &mut values);
            }
            out.extend(values.into_iter().map(|v| (table.clone(), v)));
        }
    }
    out
}

/// How many times [`PrivateCassandra::start`] tries fresh ports.
const START_TRIES: u32 = 3;

/// A port nobody listens on right now.
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

/// A Cassandra node of this test's own: its own folder under `target/`,
/// its own CQL and storage ports. Stopped when dropped.
#[derive(Debug)]
pub struct PrivateCassandra {
    node_dir: PathBuf,
    cql_port: u16,
    storage_port: u16,
}

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/cassandra/cassandra.sh")
}

impl PrivateCassandra {
    /// Starts a fresh node in `target/cassandra-<name>` (its old data is
    /// deleted first) and waits until it answers CQL. A port found free
    /// may be taken by another process before the JVM binds it (tests run
    /// side by side, and nodes bind port 0 too): a start that fails to
    /// bind is tried again on fresh ports, up to [`START_TRIES`] times.
    ///
    /// # Panics
    /// When the script fails otherwise (its output is in the message).
    pub fn start(name: &str) -> PrivateCassandra {
        let target = crate::bin::dir()
            .parent()
            .expect("target folder")
            .to_path_buf();
        for attempt in 1..=START_TRIES {
            let node = PrivateCassandra {
                node_dir: target.join(format!("cassandra-{name}")),
                cql_port: free_port(),
                storage_port: free_port(),
            };
            node.run(&["fetch"]);
            node.run(&["reset"]);
            node.launch();
            let output = node.try_run(&["wait", &START_WAIT_S.to_string()]);
            if output.status.success() {
                return node;
            }
            let said = format!(
                "{}{}",
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            );
            assert!(
                said.contains("Failed to bind port") && attempt < START_TRIES,
                "cassandra.sh wait failed ({}):\n{said}",
                output.status
            );
            eprintln!(
                "cassandra-{name}: a port was taken before Cassandra bound it; trying again on others"
            );
        }
        unreachable!("the last try returns or panics")
    }

    fn run(&self, args: &[&str]) -> Output {
        let output = self.try_run(args);
        assert!(
            output.status.success(),
            "cassandra.sh {args:?} failed ({}):\n{}{}",
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        output
    }

    fn try_run(&self, args: &[&str]) -> Output {
        Command::new("bash")
            .arg(script())
            .args(args)
            .env("CASSANDRA_NODE_DIR", &self.node_dir)
            .env("CASSANDRA_PORT", self.cql_port.to_string())
            .env("CASSANDRA_STORAGE_PORT", self.storage_port.to_string())
            .env("CASSANDRA_HEAP", "512M")
            .env_remove("CASSANDRA_JMX_PORT")
            .output()
            .expect("run cassandra.sh")
    }

    /// `host:port` for CQL.
    pub fn address(&self) -> String {
        format!("127.0.0.1:{}", self.cql_port)
    }

    /// Starts the node (keeping its data) and waits for CQL.
    pub fn start_again(&self) {
        self.launch();
        self.wait();
    }

    /// Starts the JVM (keeping its data) without waiting for it to answer.
    pub fn launch(&self) {
        self.run(&["start"]);
    }

    /// Waits until the node answers CQL.
    pub fn wait(&self) {
        self.run(&["wait", &START_WAIT_S.to_string()]);
    }

    /// The node's folder: data, commit log and logs.
    pub fn dir(&self) -> &Path {
        &self.node_dir
    }

    /// Stops the node: SIGTERM, so it drains (flushes memtables, syncs the
    /// commit log); SIGKILL after 60 s.
    pub fn stop(&self) {
        self.run(&["stop"]);
    }

    /// Stops the node and deletes its folder.
    pub fn remove(self) {
        self.run(&["reset"]);
    }

    /// The JVM's pid while it runs.
    pub fn pid(&self) -> Option<u32> {
        std::fs::read_to_string(self.node_dir.join("cassandra.pid"))
            .ok()
            .and_then(|s| s.trim().parse().ok())
    }
}

impl Drop for PrivateCassandra {
    fn drop(&mut self) {
        // Never leave a JVM behind, also when the test panicked.
        let _ = Command::new("bash")
            .arg(script())
            .arg("stop")
            .env("CASSANDRA_NODE_DIR", &self.node_dir)
            .env("CASSANDRA_PORT", self.cql_port.to_string())
            .env("CASSANDRA_STORAGE_PORT", self.storage_port.to_string())
            .output();
    }
}
