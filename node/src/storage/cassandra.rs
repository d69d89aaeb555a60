//! The production store: Apache Cassandra (or ScyllaDB) through the
//! `scylla` driver.
//!
//! # Schema (keyspace from config, replication from config)
//!
//! | table | key | what |
//! |---|---|---|
//! | `chat_details` | `chat` | committed membership: `record` (the `CommittedRecord` protobuf, what [`ChatStore::load_room`] reads), plus readable `revision` and `participants` (handle → key fingerprint, `''` before joining) |
//! | `chat_names` | `(initial), chat` | room name index for [`ChatStore::list_rooms`]: one partition per first character of the name, rows in name order, with `revision` and `members` |
//! | `timeline` | `((chat, time_bucket), when)`, `when DESC` | one row per message: `when uuid` is our UUIDv7 [`MessageId`], `envelope blob` the ciphertext exactly as posted |
//! | `timeline_buckets` | `(chat), time_bucket` | which `yyyy-MM` partitions of `timeline` a room has, oldest first; what [`super::history`] walks |
//! | `schema_migrations` | `version` | applied migrations with a checksum of their statements |
//!
//! `time_bucket` bounds a timeline partition to one month of one room,
//! which is what keeps partitions from growing without bound. `chat_names`
//! exists because `chat_details` is partitioned by a hash of the name, so it
//! cannot be read in name order; its partitions are the 63 characters a
//! room name may start with, walked in byte order. Its rows are written
//! `USING TIMESTAMP revision`, so whatever order two saves of a room land
//! in, the highest revision wins without a read.
//!
//! # Message ids in a `uuid` column (measured, not assumed)
//!
//! Cassandra's `uuid` type (`UUIDType`) compares the version nibble first,
//! then — for any version other than 1 — the most significant 64 bits as
//! an unsigned number, then the least significant 64 bits unsigned. For
//! UUIDv7 that is plain big-endian byte order: the 48-bit millisecond
//! timestamp first, then the 12-bit `rand_a` and the 62 bits of `rand_b`
//! that carry our per-millisecond counter (the variant bits in between are
//! constant). So clustering order is exactly [`MessageId`] order, and
//! `when < ?` / `when > ?` ranges are id ranges. The test
//! `tests/tests/cassandra_store.rs::uuid_v7_clustering_order_is_id_order`
//! inserts ids out of order — different milliseconds, many ids in one
//! millisecond differing only in the counter, counters that carry from
//! `rand_b` into `rand_a`, and the millisecond/counter extremes — and reads
//! them back in clustering order both ways.
//!
//! Consequences: `timeuuid` is not an option (it accepts only version 1
//! and would reject our ids); a `uuid` column would order version-1 ids
//! *before* every v7 id regardless of time, so a timeline must never mix
//! versions (the node only ever writes v7: [`MessageId::from_bytes`] refuses
//! anything else); and since the order is the id's own byte order, the
//! embedded store (sled, big-endian keys) and Cassandra agree on order
//! without any translation. Ids are assigned by the room's owner, strictly
//! increasing even if the clock steps back, so "newest first" is "highest
//! id first" in both stores.
//!
//! # Consistency levels and why
//!
//! - Timeline and bucket-index writes: `LOCAL_QUORUM`. `append` returns
//!   `Ok` — and the room acknowledges a post — only after a quorum of the
//!   local datacenter's replicas acknowledged every row, so losing one
//!   replica (RF 3) loses no acked message, and no cross-datacenter round
//!   trip sits on the post path. Other datacenters receive the rows through
//!   Cassandra's replication.
//! - Timeline, bucket-index, room and name-index reads: `LOCAL_QUORUM`,
//!   which overlaps every `LOCAL_QUORUM` write in the same datacenter
//!   (R + W > RF): history read after an ack contains the acked message.
//! - The `chat_details` compare-and-set: a lightweight transaction with
//!   serial consistency `SERIAL` and commit consistency `LOCAL_QUORUM`.
//!   Committed memberships are saved by the proposer of the commit (or a
//!   replica repairing a write it missed: `ChatDetailsWriter`), which may
//!   be in any datacenter; `LOCAL_SERIAL` would run Paxos only among one
//!   datacenter's replicas, so two datacenters could each "win" and
//!   last-write-wins could then move a room back to an older revision.
//!   `SERIAL` costs a cross-datacenter round trip, paid once per membership
//!   change (rare), never per post. `chat_details` is a durable cache of
//!   what the consensus acceptors decided (they hold the truth), so a stale
//!   `LOCAL_QUORUM` read of it in a remote datacenter only delays a node
//!   learning a revision; it cannot make two nodes disagree.
//! - Every plain `INSERT` is marked idempotent (same key, same value), so
//!   the driver may retry it on timeouts; a retried message insert stores
//!   the message once. Lightweight transactions are not marked idempotent;
//!   [`CassandraStore::save_room`] retries them itself when the outcome is
//!   unknown and reports `true` if the row then holds exactly its revision.
//!
//! Routing is token aware and pinned to the configured local datacenter
//! (no failover to remote datacenters: `LOCAL_*` levels mean nothing
//! there). Connecting fails with a clear error if that datacenter does not
//! exist.
//!
//! # Durability of an ack
//!
//! Cassandra acknowledges a write once it is in the commit log and
//! memtable of each replica that answered. With the default
//! `commitlog_sync: periodic` (10 s) a replica's commit log reaches disk
//! within 10 s, so an acked message survives the crash of any minority of
//! replicas; to survive a simultaneous power loss of a whole quorum, run
//! Cassandra with `commitlog_sync: batch` or `group`. The single test node
//! (RF 1) is stopped with SIGTERM, which drains it.
//!
//! # Writes
//!
//! [`CassandraStore::append`] first records new `(room, bucket)` pairs in
//! `timeline_buckets` (remembered per process so a bucket costs one write,
//! and only after that write succeeded), then writes the messages as
//! unlogged batches, one partition per batch: a single-partition batch is
//! one mutation — applied atomically, one commit-log entry, no batch log —
//! and is split at [`BATCH_ROWS_MAX`] rows or [`BATCH_BYTES_MAX`] bytes so
//! a request stays far below Cassandra's frame and mutation limits. The
//! batches run concurrently and `append` returns `Ok` only if all of them
//! did. A failure returns an error, so nothing is acked. Rows of a failed
//! append that did land stay (their ids are never reused): like any post
//! whose ack was lost, such a post may show up in history although its
//! sender was told UNAVAILABLE and may post it again under a new id.
//!
//! # Truncating a room
//!
//! [`CassandraStore::truncate_room`] reads the ids it is about to delete
//! (to count them) with the newest write timestamp among them, then
//! deletes with one tombstone per partition, newest bucket first: a range
//! tombstone `when > after` in the bucket holding `after`, a partition
//! tombstone in each later one. The tombstone carries that newest write
//! timestamp (`USING TIMESTAMP`) rather than the coordinator's clock: it
//! still covers every row it read (a tombstone wins a tie), and a message
//! appended later under a deleted id, stamped by a coordinator's clock at
//! that later time, is hidden by it only if the coordinators' clocks
//! disagree by more than the age of the newest deleted row (with the
//! coordinator's clock, by more than the time between the delete and the
//! append, which may be milliseconds). The
//! deletes are `LOCAL_QUORUM`, like appends, so an acknowledged truncation
//! is as durable as an acknowledged post.
//!
//! `timeline_buckets` keeps its rows: every node remembers which buckets it
//! indexed (`known_buckets`) and would not index a deleted one again, so
//! its later posts there would be missing from history. A listed bucket
//! without messages reads as empty, and the index could already list one
//! (an append whose bucket row landed and whose messages did not).
//!
//! # Migrations
//!
//! [`CassandraStore::connect`] creates the keyspace (with the configured
//! replication) and applies the versioned [`MIGRATIONS`] not yet recorded
//! in `schema_migrations`, in order, each statement `IF NOT EXISTS`, then
//! records the version with a checksum of its statements. A recorded
//! version whose checksum differs (a released migration was edited), or a
//! version newer than this binary knows, stops the node with a clear
//! error. Nobody runs CQL by hand. An existing keyspace is used as it is:
//! changing its replication later is an operator's `ALTER KEYSPACE` plus
//! a repair, which the node never does by itself. Cassandra 5.0 does not
//! serialize schema changes made through different coordinators at the
//! same moment, so in a fresh multi-node deployment let one node start
//! first (the compose file and the Kubernetes StatefulSet in `deploy/` do).

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::fmt;
use std::ops::ControlFlow;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use futures::future::try_join_all;
use prost::Message as _;
use saferchat_consensus::RoomId;
use saferchat_proto::peer as ppb;
use scylla::client::execution_profile::ExecutionProfile;
use scylla::client::session::Session;
use scylla::client::session_builder::SessionBuilder;
use scylla::deserialize::row::DeserializeRow;
use scylla::errors::{DbError, ExecutionError, RequestAttemptError, WriteType};
use scylla::policies::load_balancing::DefaultPolicy;
use scylla::response::PagingState;
use scylla::response::query_result::QueryResult;
use scylla::serialize::row::SerializeRow;
use scylla::statement::batch::{Batch, BatchType};
use scylla::statement::prepared::PreparedStatement;
use scylla::statement::{Consistency, SerialConsistency};
use scylla::value::{CqlValue, Row};
use sha2::{Digest as _, Sha256};

use super::{ChatStore, CommittedRoom, Range, RoomSummary, StoredMessage};
use crate::config::CassandraConfig;
use crate::convert;
use crate::error::NodeError;
use crate::message_id::{Bucket, MessageId};

/// How long one request may take, client side, before it fails.
pub const REQUEST_TIMEOUT_MS: u64 = 15_000;
/// How long opening a connection may take.
pub const CONNECT_TIMEOUT_MS: u64 = 5_000;
/// Most rows in one timeline batch.
pub const BATCH_ROWS_MAX: usize = 256;
/// Most envelope bytes in one timeline batch (one larger envelope goes
/// alone). Cassandra refuses request frames over 16 MiB and mutations over
/// half a commit-log segment (16 MiB by default).
pub const BATCH_BYTES_MAX: usize = 4 * 1024 * 1024;
/// Rows per page when reading the timeline (envelopes may be 512 KiB).
pub const READ_PAGE_ROWS: i32 = 64;
/// Rows per page for small rows (bucket and name indexes).
pub const INDEX_PAGE_ROWS: i32 = 1000;
/// `(room, bucket)` pairs remembered as indexed, at most; the set is
/// cleared when full (re-indexing is an idempotent write).
pub const KNOWN_BUCKETS_MAX: usize = 65_536;
/// Buckets of one room read at most: a thousand years of months.
pub const BUCKETS_MAX: usize = 12_000;
/// Attempts of one compare-and-set whose outcome was unknown.
pub const CAS_ATTEMPTS_MAX: u32 = 5;

/// Characters a room name may start with, in byte order: the partitions of
/// `chat_names`, walked in this order.
const INITIALS: &[u8] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ_abcdefghijklmnopqrstuvwxyz";

/// One schema version: statements applied in order, each idempotent.
/// Never edit a released migration; add the next version.
#[derive(Debug)]
pub struct Migration {
    /// Its number, from 1, without gaps.
    pub version: i32,
    /// What it does.
    pub description: &'static str,
    /// CQL with `{ks}` for the keyspace; each must be safe to run twice.
    pub statements: &'static [&'static str],
}

/// The schema, version by version.
pub const MIGRATIONS: &[Migration] = &[
    Migration {
        version: 1,
        description: "chat_details, chat_names, timeline, timeline_buckets",
        statements: &[
            "CREATE TABLE IF NOT EXISTS {ks}.chat_details (\
            chat text PRIMARY KEY, \
            revision bigint, \
            participants map<text, text>, \
            record blob)",
            "CREATE TABLE IF NOT EXISTS {ks}.chat_names (\
            initial text, \
            chat text, \
            revision bigint, \
            members int, \
            PRIMARY KEY ((initial), chat)) \
            WITH CLUSTERING ORDER BY (chat ASC)",
            "CREATE TABLE IF NOT EXISTS {ks}.timeline (\
            chat text, \
            time_bucket text, \
            when uuid, \
            envelope blob, \
            PRIMARY KEY ((chat, time_bucket), when)) \
            WITH CLUSTERING ORDER BY (when DESC)",
            "CREATE TABLE IF NOT EXISTS {ks}.timeline_buckets (\
            chat text, \
            time_bucket text, \
            PRIMARY KEY ((chat), time_bucket)) \
            WITH CLUSTERING ORDER BY (time_bucket ASC)",
        ],
    },
    Migration {
        version: 2,
        description: "timeline.seq: the room's gapless sequence number",
        // Cassandra answers "column already exists" to a second ADD: the
        // migration runner treats that as done (see `apply_migrations`).
        statements: &["ALTER TABLE {ks}.timeline ADD seq bigint"],
    },
];

const SCHEMA_MIGRATIONS_TABLE: &str = "CREATE TABLE IF NOT EXISTS {ks}.schema_migrations (\
    version int PRIMARY KEY, \
    description text, \
    checksum text, \
    applied_at timestamp)";

/// The prepared statements, each with its consistency set.
struct Statements {
    insert_message: PreparedStatement,
    insert_bucket: PreparedStatement,
    select_buckets: PreparedStatement,
    newest: PreparedStatement,
    before: PreparedStatement,
    oldest: PreparedStatement,
    after: PreparedStatement,
    load_room: PreparedStatement,
    update_room: PreparedStatement,
    insert_room: PreparedStatement,
    upsert_name: PreparedStatement,
    names_from: PreparedStatement,
    rooms_first: PreparedStatement,
    rooms_after: PreparedStatement,
    names_after: PreparedStatement,
    truncation_scan: PreparedStatement,
    truncation_scan_after: PreparedStatement,
    delete_bucket: PreparedStatement,
    delete_after: PreparedStatement,
}

/// The Cassandra-backed chat store; cheap to clone.
#[derive(Clone)]
pub struct CassandraStore {
    session: Arc<Session>,
    keyspace: String,
    contact_points: Vec<String>,
    statements: Arc<Statements>,
    known_buckets: Arc<Mutex<HashSet<(RoomId, Bucket)>>>,
}

impl fmt::Debug for CassandraStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CassandraStore")
            .field("contact_points", &self.contact_points)
            .field("keyspace", &self.keyspace)
            .finish_non_exhaustive()
    }
}

/// A driver error as a node error: a Cassandra that does not answer (or
/// answers "unavailable", "timeout", "overloaded") is `Unavailable`, so
/// posts fail with UNAVAILABLE and clients retry; a statement the driver
/// could not even build is a `Storage` bug.
fn execution_error(what: &str, e: &ExecutionError) -> NodeError {
    match e {
        ExecutionError::BadQuery(_) => NodeError::Storage(format!("cassandra: {what}: {e}")),
        _ => NodeError::Unavailable(format!("cassandra: {what}: {e}")),
    }
}

/// Whether a compare-and-set may or may not have been applied.
fn outcome_unknown(e: &ExecutionError) -> bool {
    match e {
        ExecutionError::LastAttemptError(RequestAttemptError::DbError(db, _)) => matches!(
            db,
            DbError::WriteTimeout {
                write_type: WriteType::Cas,
                ..
            } | DbError::Other(0x1700) // CAS_WRITE_UNKNOWN
        ),
        _ => false,
    }
}

fn cql(template: &str, keyspace: &str) -> String {
    template.replace("{ks}", keyspace)
}

/// The checksum recorded with a migration: SHA-256 over its statements.
fn checksum(m: &Migration) -> String {
    let mut h = Sha256::new();
    for s in m.statements {
        h.update(s.as_bytes());
        h.update([0u8]);
    }
    h.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

/// The `chat_names` partition of a room.
fn initial_of(room: &RoomId) -> String {
    let first = room.as_str().as_bytes()[0];
    assert!(
        INITIALS.contains(&first),
        "room names start with a letter, digit or '_'"
    );
    char::from(first).to_string()
}

/// This machine's clock in microseconds since the epoch (Cassandra's
/// write-timestamp unit).
fn now_micros() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_micros()).unwrap_or(i64::MAX))
}

fn to_i64(v: u64, what: &str) -> Result<i64, NodeError> {
    i64::try_from(v).map_err(|_| NodeError::Storage(format!("{what} {v} does not fit a bigint")))
}

/// `limit` as a CQL `LIMIT` value.
fn cql_limit(limit: usize) -> i32 {
    i32::try_from(limit).unwrap_or(i32::MAX)
}

impl CassandraStore {
    /// Connects to the cluster, checks the local datacenter exists, applies
    /// pending schema migrations and prepares every statement.
    ///
    /// # Errors
    /// [`NodeError::Unavailable`] when no contact point answers or a schema
    /// statement fails; [`NodeError::Config`] when the datacenter is not
    /// one of the cluster's, or the keyspace's schema is newer than this
    /// binary or was changed under it.
    pub async fn connect(config: &CassandraConfig) -> Result<CassandraStore, NodeError> {
        if config.contact_points.is_empty() {
            return Err(NodeError::Config(
                "cassandra.contact_points must not be empty".into(),
            ));
        }
        let policy = DefaultPolicy::builder()
            .prefer_datacenter(config.datacenter.clone())
            .token_aware(true)
            .permit_dc_failover(false)
            .build();
        let profile = ExecutionProfile::builder()
            .load_balancing_policy(policy)
            .consistency(Consistency::LocalQuorum)
            .serial_consistency(Some(SerialConsistency::Serial))
            .request_timeout(Some(Duration::from_millis(REQUEST_TIMEOUT_MS)))
            .build();
        let session = SessionBuilder::new()
            .known_nodes(&config.contact_points)
            .connection_timeout(Duration::from_millis(CONNECT_TIMEOUT_MS))
            .default_execution_profile_handle(profile.into_handle())
            .build()
            .await
            .map_err(|e| {
                NodeError::Unavailable(format!(
                    "cannot connect to Cassandra at {}: {e}",
                    config.contact_points.join(", ")
                ))
            })?;
        let datacenters: BTreeSet<String> = session
            .get_cluster_state()
            .get_nodes_info()
            .iter()
            .filter_map(|n| n.datacenter.clone())
            .collect();
        if !datacenters.contains(&config.datacenter) {
            return Err(NodeError::Config(format!(
                "cassandra.datacenter is {:?}, but the cluster at {} has datacenters {:?}",
                config.datacenter,
                config.contact_points.join(", "),
                datacenters
            )));
        }
        migrate(&session, config).await?;
        let statements = Statements::prepare(&session, &config.keyspace).await?;
        tracing::info!(
            keyspace = %config.keyspace,
            datacenter = %config.datacenter,
            contact_points = %config.contact_points.join(","),
            "cassandra store ready"
        );
        Ok(CassandraStore {
            session: Arc::new(session),
            keyspace: config.keyspace.clone(),
            contact_points: config.contact_points.clone(),
            statements: Arc::new(statements),
            known_buckets: Arc::new(Mutex::new(HashSet::new())),
        })
    }

    /// The driver session (for tests and tools that read the tables).
    pub fn session(&self) -> &Session {
        &self.session
    }

    /// The keyspace.
    pub fn keyspace(&self) -> &str {
        &self.keyspace
    }

    /// Runs a paged `SELECT` and collects up to `limit` rows. Bounded: at
    /// most `4 * limit / page + 8` round trips (Cassandra may
    /// return short pages).
    async fn select<R>(
        &self,
        what: &str,
        statement: &PreparedStatement,
        values: impl SerializeRow,
        limit: usize,
    ) -> Result<Vec<R>, NodeError>
    where
        R: for<'f, 'm> DeserializeRow<'f, 'm>,
    {
        let mut out = Vec::new();
        let page_rows = usize::try_from(statement.get_page_size().max(1)).unwrap_or(1);
        let pages_max = limit / page_rows * 4 + 8;
        let mut state = PagingState::start();
        for _ in 0..pages_max {
            let (rows, next) = self.page::<R>(what, statement, &values, state).await?;
            for row in rows {
                out.push(row);
                if out.len() >= limit {
                    return Ok(out);
                }
            }
            match next {
                None => return Ok(out),
                Some(next) => state = next,
            }
        }
        Err(NodeError::Storage(format!(
            "cassandra: {what}: more pages than {limit} rows need"
        )))
    }

    /// One page of a `SELECT` from `state`: its rows, and where the next
    /// page starts (`None` after the last).
    async fn page<R>(
        &self,
        what: &str,
        statement: &PreparedStatement,
        values: &impl SerializeRow,
        state: PagingState,
    ) -> Result<(Vec<R>, Option<PagingState>), NodeError>
    where
        R: for<'f, 'm> DeserializeRow<'f, 'm>,
    {
        let failed = |e: &dyn fmt::Display| NodeError::Storage(format!("cassandra: {what}: {e}"));
        let (result, paging) = self
            .session
            .execute_single_page(statement, values, state)
            .await
            .map_err(|e| execution_error(what, &e))?;
        let rows = result.into_rows_result().map_err(|e| failed(&e))?;
        let rows = rows
            .rows::<R>()
            .map_err(|e| failed(&e))?
            .collect::<Result<Vec<R>, _>>()
            .map_err(|e| failed(&e))?;
        let next = match paging.into_paging_control_flow() {
            ControlFlow::Break(()) => None,
            ControlFlow::Continue(next) => Some(next),
        };
        Ok((rows, next))
    }

    /// Records `(room, bucket)` pairs in `timeline_buckets` unless this
    /// process already did.
    async fn index_buckets(&self, batch: &[StoredMessage]) -> Result<(), NodeError> {
        let missing: BTreeSet<(RoomId, Bucket)> = {
            let known = self.known_buckets.lock().expect("lock");
            batch
                .iter()
                .map(|m| (m.room.clone(), m.id.bucket()))
                .filter(|key| !known.contains(key))
                .collect()
        };
        if missing.is_empty() {
            return Ok(());
        }
        try_join_all(missing.iter().map(|(room, bucket)| async move {
            self.session
                .execute_unpaged(
                    &self.statements.insert_bucket,
                    (room.as_str(), bucket.to_string()),
                )
                .await
                .map_err(|e| {
                    execution_error(&format!("indexing bucket {bucket} of room {room:?}"), &e)
                })
        }))
        .await?;
        let mut known = self.known_buckets.lock().expect("lock");
        if known.len() + missing.len() > KNOWN_BUCKETS_MAX {
            known.clear();
        }
        known.extend(missing);
        Ok(())
    }

    /// Writes one chunk of one partition: a single insert, or an unlogged
    /// single-partition batch.
    async fn write_chunk(&self, chunk: &[&StoredMessage]) -> Result<(), NodeError> {
        let first = chunk.first().expect("chunks are not empty");
        let what = format!(
            "appending {} messages to room {:?}",
            chunk.len(),
            first.room
        );
        let values: Vec<(&str, String, uuid::Uuid, i64, &[u8])> = chunk
            .iter()
            .map(|m| {
                (
                    m.room.as_str(),
                    m.id.bucket().to_string(),
                    m.id.to_uuid(),
                    i64::try_from(m.seq).unwrap_or(i64::MAX),
                    m.envelope.as_ref(),
                )
            })
            .collect();
        let result = if let [one] = values.as_slice() {
            self.session
                .execute_unpaged(&self.statements.insert_message, one)
                .await
        } else {
            let mut batch = Batch::new(BatchType::Unlogged);
            for _ in chunk {
                batch.append_statement(self.statements.insert_message.clone());
            }
            batch.set_consistency(Consistency::LocalQuorum);
            batch.set_is_idempotent(true);
            self.session.batch(&batch, &values).await
        };
        result.map_err(|e| execution_error(&what, &e))?;
        Ok(())
    }

    /// How many rows a truncation scan finds and the newest write
    /// timestamp among them (microseconds), reading every page.
    async fn scan_for_truncation(
        &self,
        what: &str,
        statement: &PreparedStatement,
        values: impl SerializeRow,
    ) -> Result<(u64, Option<i64>), NodeError> {
        let (mut rows_seen, mut newest) = (0u64, None::<i64>);
        let mut state = PagingState::start();
        loop {
            let (rows, next) = self
                .page::<(uuid::Uuid, Option<i64>)>(what, statement, &values, state)
                .await?;
            for (_, written) in rows {
                // A row without an envelope (never written by this node):
                // the present covers it, as a coordinator's clock would.
                let written = written.unwrap_or_else(now_micros);
                newest = Some(newest.map_or(written, |n| n.max(written)));
                rows_seen += 1;
            }
            match next {
                None => return Ok((rows_seen, newest)),
                Some(next) => state = next,
            }
        }
    }

    /// One compare-and-set statement: `Ok((applied, stored revision))`.
    async fn cas(
        &self,
        statement: &PreparedStatement,
        values: impl SerializeRow,
        what: &str,
    ) -> Result<(bool, Option<i64>), CasError> {
        let result = self
            .session
            .execute_unpaged(statement, values)
            .await
            .map_err(|e| {
                if outcome_unknown(&e) {
                    CasError::Unknown(e.to_string())
                } else {
                    CasError::Failed(execution_error(what, &e))
                }
            })?;
        lwt_outcome(result).map_err(|e| {
            CasError::Failed(NodeError::Storage(format!(
                "cassandra: {what}: unreadable answer: {e}"
            )))
        })
    }
}

/// Why a compare-and-set did not answer.
enum CasError {
    /// It may or may not have been applied (contention, a replica late).
    Unknown(String),
    /// It failed.
    Failed(NodeError),
}

/// Splits messages into single-partition chunks of at most
/// [`BATCH_ROWS_MAX`] rows and [`BATCH_BYTES_MAX`] envelope bytes (a larger
/// envelope goes alone), each chunk in id order.
fn partition_chunks(batch: &[StoredMessage]) -> Vec<Vec<&StoredMessage>> {
    let mut partitions: BTreeMap<(&str, Bucket), Vec<&StoredMessage>> = BTreeMap::new();
    for m in batch {
        partitions
            .entry((m.room.as_str(), m.id.bucket()))
            .or_default()
            .push(m);
    }
    let mut chunks: Vec<Vec<&StoredMessage>> = Vec::new();
    for mut messages in partitions.into_values() {
        messages.sort_by_key(|m| m.id);
        let mut chunk: Vec<&StoredMessage> = Vec::new();
        let mut bytes = 0;
        for m in messages {
            if !chunk.is_empty()
                && (chunk.len() >= BATCH_ROWS_MAX || bytes + m.envelope.len() > BATCH_BYTES_MAX)
            {
                chunks.push(std::mem::take(&mut chunk));
                bytes = 0;
            }
            bytes += m.envelope.len();
            chunk.push(m);
        }
        chunks.push(chunk);
    }
    chunks
}

/// `[applied]` and the stored `revision` (present when not applied and
/// the row exists) of a lightweight transaction's answer.
fn lwt_outcome(result: QueryResult) -> Result<(bool, Option<i64>), String> {
    let rows = result.into_rows_result().map_err(|e| e.to_string())?;
    let revision_at = rows.column_specs().get_by_name("revision").map(|(i, _)| i);
    let row: Row = rows.single_row::<Row>().map_err(|e| e.to_string())?;
    let applied = matches!(row.columns.first(), Some(Some(CqlValue::Boolean(true))));
    let revision = revision_at
        .and_then(|i| row.columns.get(i))
        .and_then(|v| match v {
            Some(CqlValue::BigInt(r)) => Some(*r),
            _ => None,
        });
    Ok((applied, revision))
}

impl Statements {
    async fn prepare(session: &Session, ks: &str) -> Result<Statements, NodeError> {
        let prepare = |text: String, consistency: Consistency, idempotent: bool, page: i32| async move {
            let mut s = session.prepare(text.as_str()).await.map_err(|e| {
                NodeError::Unavailable(format!("cassandra: preparing {text:?}: {e}"))
            })?;
            s.set_consistency(consistency);
            s.set_is_idempotent(idempotent);
            s.set_page_size(page);
            Ok::<_, NodeError>(s)
        };
        let lq = Consistency::LocalQuorum;
        let select =
            "SELECT when, seq, envelope FROM {ks}.timeline WHERE chat = ? AND time_bucket = ?";
        let mut update_room = prepare(
            cql(
                "UPDATE {ks}.chat_details SET revision = ?, participants = ?, record = ? \
                 WHERE chat = ? IF revision < ?",
                ks,
            ),
            lq,
            false,
            1,
        )
        .await?;
        update_room.set_serial_consistency(Some(SerialConsistency::Serial));
        let mut insert_room = prepare(
            cql(
                "INSERT INTO {ks}.chat_details (chat, revision, participants, record) \
                 VALUES (?, ?, ?, ?) IF NOT EXISTS",
                ks,
            ),
            lq,
            false,
            1,
        )
        .await?;
        insert_room.set_serial_consistency(Some(SerialConsistency::Serial));
        Ok(Statements {
            insert_message: prepare(
                cql(
                    "INSERT INTO {ks}.timeline (chat, time_bucket, when, seq, envelope) VALUES (?, ?, ?, ?, ?)",
                    ks,
                ),
                lq,
                true,
                1,
            )
            .await?,
            insert_bucket: prepare(
                cql(
                    "INSERT INTO {ks}.timeline_buckets (chat, time_bucket) VALUES (?, ?)",
                    ks,
                ),
                lq,
                true,
                1,
            )
            .await?,
            select_buckets: prepare(
                cql(
                    "SELECT time_bucket FROM {ks}.timeline_buckets WHERE chat = ?",
                    ks,
                ),
                lq,
                true,
                INDEX_PAGE_ROWS,
            )
            .await?,
            newest: prepare(cql(&format!("{select} LIMIT ?"), ks), lq, true, READ_PAGE_ROWS).await?,
            before: prepare(
                cql(&format!("{select} AND when < ? LIMIT ?"), ks),
                lq,
                true,
                READ_PAGE_ROWS,
            )
            .await?,
            oldest: prepare(
                cql(&format!("{select} ORDER BY when ASC LIMIT ?"), ks),
                lq,
                true,
                READ_PAGE_ROWS,
            )
            .await?,
            after: prepare(
                cql(&format!("{select} AND when > ? ORDER BY when ASC LIMIT ?"), ks),
                lq,
                true,
                READ_PAGE_ROWS,
            )
            .await?,
            load_room: prepare(
                cql("SELECT record FROM {ks}.chat_details WHERE chat = ?", ks),
                lq,
                true,
                1,
            )
            .await?,
            update_room,
            insert_room,
            upsert_name: prepare(
                cql(
                    "INSERT INTO {ks}.chat_names (initial, chat, revision, members) \
                     VALUES (?, ?, ?, ?) USING TIMESTAMP ?",
                    ks,
                ),
                lq,
                true,
                1,
            )
            .await?,
            rooms_first: prepare(
                cql(
                    "SELECT DISTINCT chat FROM {ks}.timeline_buckets LIMIT ?",
                    ks,
                ),
                lq,
                true,
                INDEX_PAGE_ROWS,
            )
            .await?,
            rooms_after: prepare(
                cql(
                    "SELECT DISTINCT chat FROM {ks}.timeline_buckets WHERE token(chat) > token(?) LIMIT ?",
                    ks,
                ),
                lq,
                true,
                INDEX_PAGE_ROWS,
            )
            .await?,
            names_from: prepare(
                cql(
                    "SELECT chat, revision, members FROM {ks}.chat_names WHERE initial = ? LIMIT ?",
                    ks,
                ),
                lq,
                true,
                INDEX_PAGE_ROWS,
            )
            .await?,
            names_after: prepare(
                cql(
                    "SELECT chat, revision, members FROM {ks}.chat_names \
                     WHERE initial = ? AND chat > ? LIMIT ?",
                    ks,
                ),
                lq,
                true,
                INDEX_PAGE_ROWS,
            )
            .await?,
            truncation_scan: prepare(
                cql(
                    "SELECT when, WRITETIME(envelope) FROM {ks}.timeline \
                     WHERE chat = ? AND time_bucket = ?",
                    ks,
                ),
                lq,
                true,
                INDEX_PAGE_ROWS,
            )
            .await?,
            truncation_scan_after: prepare(
                cql(
                    "SELECT when, WRITETIME(envelope) FROM {ks}.timeline \
                     WHERE chat = ? AND time_bucket = ? AND when > ?",
                    ks,
                ),
                lq,
                true,
                INDEX_PAGE_ROWS,
            )
            .await?,
            // Idempotent: the timestamp is given, so a retry writes the
            // same tombstone.
            delete_bucket: prepare(
                cql(
                    "DELETE FROM {ks}.timeline USING TIMESTAMP ? \
                     WHERE chat = ? AND time_bucket = ?",
                    ks,
                ),
                lq,
                true,
                1,
            )
            .await?,
            delete_after: prepare(
                cql(
                    "DELETE FROM {ks}.timeline USING TIMESTAMP ? \
                     WHERE chat = ? AND time_bucket = ? AND when > ?",
                    ks,
                ),
                lq,
                true,
                1,
            )
            .await?,
        })
    }
}

/// Runs one schema statement (the driver waits for schema agreement).
async fn ddl(session: &Session, text: &str) -> Result<(), NodeError> {
    match session.query_unpaged(text, ()).await {
        Ok(_) => Ok(()),
        // `ALTER TABLE … ADD` has no `IF NOT EXISTS`; a node that added the
        // column and crashed before recording the migration runs it again.
        Err(e) if text.starts_with("ALTER TABLE") && e.to_string().contains("already exist") => {
            Ok(())
        }
        Err(e) => Err(NodeError::Unavailable(format!(
            "cassandra: schema statement {text:?}: {e}"
        ))),
    }
}

/// Creates the keyspace and applies pending migrations; see the module
/// docs.
async fn migrate(session: &Session, config: &CassandraConfig) -> Result<(), NodeError> {
    let ks = &config.keyspace;
    ddl(
        session,
        &format!(
            "CREATE KEYSPACE IF NOT EXISTS {ks} WITH replication = {} AND durable_writes = true",
            config.replication
        ),
    )
    .await?;
    ddl(session, &cql(SCHEMA_MIGRATIONS_TABLE, ks)).await?;
    let mut read = scylla::statement::Statement::new(cql(
        "SELECT version, checksum FROM {ks}.schema_migrations",
        ks,
    ));
    read.set_consistency(Consistency::LocalQuorum);
    let applied: BTreeMap<i32, String> = session
        .query_unpaged(read, ())
        .await
        .map_err(|e| execution_error("reading schema_migrations", &e))?
        .into_rows_result()
        .map_err(NodeError::storage)?
        .rows::<(i32, Option<String>)>()
        .map_err(NodeError::storage)?
        .map(|r| r.map(|(v, c)| (v, c.unwrap_or_default())))
        .collect::<Result<_, _>>()
        .map_err(NodeError::storage)?;
    let known = MIGRATIONS.last().map_or(0, |m| m.version);
    if let Some(newest) = applied.keys().max()
        && *newest > known
    {
        return Err(NodeError::Config(format!(
            "keyspace {ks} has schema version {newest}, but this node knows versions up to {known}: run a newer saferchat-node"
        )));
    }
    for m in MIGRATIONS {
        let sum = checksum(m);
        match applied.get(&m.version) {
            Some(recorded) if *recorded == sum => continue,
            Some(recorded) => {
                return Err(NodeError::Config(format!(
                    "keyspace {ks}: migration {} ({}) was applied with checksum {recorded}, but this node's is {sum}: a released migration must never change; add a new version",
                    m.version, m.description
                )));
            }
            None => {}
        }
        tracing::info!(keyspace = %ks, version = m.version, description = m.description, "applying cassandra schema migration");
        for statement in m.statements {
            ddl(session, &cql(statement, ks)).await?;
        }
        let mut record = scylla::statement::Statement::new(cql(
            "INSERT INTO {ks}.schema_migrations (version, description, checksum, applied_at) \
             VALUES (?, ?, ?, toTimestamp(now()))",
            ks,
        ));
        record.set_consistency(Consistency::LocalQuorum);
        session
            .query_unpaged(record, (m.version, m.description, sum))
            .await
            .map_err(|e| execution_error("recording a schema migration", &e))?;
    }
    Ok(())
}

#[async_trait]
impl ChatStore for CassandraStore {
    async fn load_room(&self, room: &RoomId) -> Result<Option<CommittedRoom>, NodeError> {
        let rows: Vec<(Option<Bytes>,)> = self
            .select(
                &format!("loading room {room:?}"),
                &self.statements.load_room,
                (room.as_str(),),
                1,
            )
            .await?;
        let Some((Some(raw),)) = rows.into_iter().next() else {
            return Ok(None);
        };
        let record = ppb::CommittedRecord::decode(raw.as_ref()).map_err(|e| {
            NodeError::Storage(format!("cassandra: room {room:?} has a bad record: {e}"))
        })?;
        convert::committed_from_pb(&record).map(Some)
    }

    async fn save_room(&self, room: &RoomId, committed: &CommittedRoom) -> Result<bool, NodeError> {
        let record = convert::committed_to_pb(committed).encode_to_vec();
        let revision = to_i64(committed.state.revision.0, "revision")?;
        let members = i32::try_from(committed.state.members.len())
            .map_err(|_| NodeError::Storage("too many members for an int".into()))?;
        let participants: BTreeMap<String, String> = committed
            .state
            .members
            .iter()
            .map(|(h, k)| {
                (
                    h.to_string(),
                    k.as_ref().map(|k| k.fingerprint()).unwrap_or_default(),
                )
            })
            .collect();
        // The name index first: a room that has a chat_details row is then
        // always listed (node start loads every name into its existence
        // filter). The highest revision wins by write timestamp.
        self.session
            .execute_unpaged(
                &self.statements.upsert_name,
                (initial_of(room), room.as_str(), revision, members, revision),
            )
            .await
            .map_err(|e| execution_error(&format!("indexing room {room:?}"), &e))?;
        let what = format!("saving room {room:?} at revision {revision}");
        let mut unknown = false;
        let mut last_error = String::new();
        for attempt in 0..CAS_ATTEMPTS_MAX {
            if attempt > 0 {
                // Contention: back off a little, randomly.
                let pause = 10 + rand::random::<u64>() % (20 * u64::from(attempt));
                tokio::time::sleep(Duration::from_millis(pause)).await;
            }
            let updated = self
                .cas(
                    &self.statements.update_room,
                    (revision, &participants, &record, room.as_str(), revision),
                    &what,
                )
                .await;
            match updated {
                Ok((true, _)) => return Ok(true),
                // A row at this revision after an attempt of ours with an
                // unknown outcome: that attempt wrote it (a committed
                // revision has one state, so the row is ours either way).
                Ok((false, Some(stored))) => return Ok(unknown && stored == revision),
                Ok((false, None)) => {}
                Err(CasError::Unknown(e)) => {
                    unknown = true;
                    last_error = e;
                    continue;
                }
                Err(CasError::Failed(e)) => return Err(e),
            }
            // No row yet: create it, unless someone else just did.
            let inserted = self
                .cas(
                    &self.statements.insert_room,
                    (room.as_str(), revision, &participants, &record),
                    &what,
                )
                .await;
            match inserted {
                Ok((true, _)) => return Ok(true),
                Ok((false, _)) => {}
                Err(CasError::Unknown(e)) => {
                    unknown = true;
                    last_error = e;
                }
                Err(CasError::Failed(e)) => return Err(e),
            }
        }
        Err(NodeError::Unavailable(format!(
            "cassandra: saving room {room:?} at revision {revision}: no definite answer after {CAS_ATTEMPTS_MAX} attempts ({last_error})"
        )))
    }

    async fn list_rooms(
        &self,
        after: Option<&RoomId>,
        limit: usize,
    ) -> Result<Vec<RoomSummary>, NodeError> {
        let mut out = Vec::new();
        let start = after.map(|a| a.as_str().as_bytes()[0]);
        for initial in INITIALS.iter().filter(|i| start.is_none_or(|s| **i >= s)) {
            let want = limit - out.len();
            if want == 0 {
                break;
            }
            let initial = char::from(*initial).to_string();
            let what = format!("listing rooms starting with {initial:?}");
            let rows: Vec<(String, Option<i64>, Option<i32>)> = match after {
                Some(a) if a.as_str().starts_with(initial.as_str()) => {
                    self.select(
                        &what,
                        &self.statements.names_after,
                        (initial.as_str(), a.as_str(), cql_limit(want)),
                        want,
                    )
                    .await?
                }
                _ => {
                    self.select(
                        &what,
                        &self.statements.names_from,
                        (initial.as_str(), cql_limit(want)),
                        want,
                    )
                    .await?
                }
            };
            for (name, revision, members) in rows {
                out.push(RoomSummary {
                    room: RoomId::new(&name).map_err(|e| {
                        NodeError::Storage(format!("cassandra: bad room name {name:?}: {e}"))
                    })?,
                    revision: u64::try_from(revision.unwrap_or(0)).unwrap_or(0),
                    members: u32::try_from(members.unwrap_or(0)).unwrap_or(0),
                });
            }
        }
        Ok(out)
    }

    async fn append(&self, batch: &[StoredMessage]) -> Result<(), NodeError> {
        if batch.is_empty() {
            return Ok(());
        }
        self.index_buckets(batch).await?;
        let chunks = partition_chunks(batch);
        metrics::histogram!("saferchat_cassandra_append_batches").record(chunks.len() as f64);
        try_join_all(chunks.iter().map(|chunk| self.write_chunk(chunk))).await?;
        Ok(())
    }

    /// See the module docs ("Truncating a room"): the bucket index keeps
    /// its rows, so `buckets` and `rooms_with_messages` may go on listing
    /// buckets and rooms left without messages.
    async fn truncate_room(
        &self,
        room: &RoomId,
        after: Option<MessageId>,
    ) -> Result<u64, NodeError> {
        let from = after.map(MessageId::bucket);
        let buckets = self.buckets(room).await?;
        let st = &self.statements;
        let mut deleted = 0u64;
        // Newest first: one that fails part-way leaves a prefix.
        for bucket in buckets.into_iter().rev() {
            if from.is_some_and(|f| bucket < f) {
                break;
            }
            let (chat, time_bucket) = (room.as_str(), bucket.to_string());
            let what = format!("truncating bucket {bucket} of room {room:?}");
            let within = after.filter(|a| a.bucket() == bucket);
            let (found, newest) = match within {
                Some(a) => {
                    self.scan_for_truncation(
                        &what,
                        &st.truncation_scan_after,
                        (chat, &time_bucket, a.to_uuid()),
                    )
                    .await?
                }
                None => {
                    self.scan_for_truncation(&what, &st.truncation_scan, (chat, &time_bucket))
                        .await?
                }
            };
            let Some(newest) = newest else {
                continue;
            };
            let done = match within {
                Some(a) => {
                    self.session
                        .execute_unpaged(
                            &st.delete_after,
                            (newest, chat, &time_bucket, a.to_uuid()),
                        )
                        .await
                }
                None => {
                    self.session
                        .execute_unpaged(&st.delete_bucket, (newest, chat, &time_bucket))
                        .await
                }
            };
            done.map_err(|e| execution_error(&what, &e))?;
            deleted += found;
        }
        Ok(deleted)
    }

    /// In token order of the bucket index's partition key.
    async fn rooms_with_messages(
        &self,
        after: Option<&RoomId>,
        limit: usize,
    ) -> Result<Vec<RoomId>, NodeError> {
        let what = "listing rooms with messages";
        let rows: Vec<(String,)> = match after {
            Some(a) => {
                self.select(
                    what,
                    &self.statements.rooms_after,
                    (a.as_str(), cql_limit(limit)),
                    limit,
                )
                .await?
            }
            None => {
                self.select(
                    what,
                    &self.statements.rooms_first,
                    (cql_limit(limit),),
                    limit,
                )
                .await?
            }
        };
        rows.into_iter()
            .map(|(name,)| {
                RoomId::new(&name).map_err(|e| {
                    NodeError::Storage(format!("cassandra: bad room name {name:?}: {e}"))
                })
            })
            .collect()
    }

    fn shared(&self) -> bool {
        true
    }

    async fn buckets(&self, room: &RoomId) -> Result<Vec<Bucket>, NodeError> {
        let rows: Vec<(String,)> = self
            .select(
                &format!("reading the buckets of room {room:?}"),
                &self.statements.select_buckets,
                (room.as_str(),),
                BUCKETS_MAX,
            )
            .await?;
        rows.into_iter()
            .map(|(text,)| {
                Bucket::parse(&text).ok_or_else(|| {
                    NodeError::Storage(format!(
                        "cassandra: room {room:?} has a bad bucket {text:?}"
                    ))
                })
            })
            .collect()
    }

    async fn read_bucket(
        &self,
        room: &RoomId,
        bucket: Bucket,
        range: Range,
        limit: usize,
    ) -> Result<Vec<StoredMessage>, NodeError> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        let what = format!("reading bucket {bucket} of room {room:?}");
        let (chat, time_bucket, n) = (room.as_str(), bucket.to_string(), cql_limit(limit));
        let st = &self.statements;
        let rows: Vec<(uuid::Uuid, Option<i64>, Option<Bytes>)> = match range {
            Range::Before(None) => {
                self.select(&what, &st.newest, (chat, &time_bucket, n), limit)
                    .await?
            }
            Range::Before(Some(b)) => {
                self.select(
                    &what,
                    &st.before,
                    (chat, &time_bucket, b.to_uuid(), n),
                    limit,
                )
                .await?
            }
            Range::After(None) => {
                self.select(&what, &st.oldest, (chat, &time_bucket, n), limit)
                    .await?
            }
            Range::After(Some(b)) => {
                self.select(
                    &what,
                    &st.after,
                    (chat, &time_bucket, b.to_uuid(), n),
                    limit,
                )
                .await?
            }
        };
        rows.into_iter()
            .map(|(when, seq, envelope)| {
                let id = MessageId::from_uuid(when).map_err(|e| {
                    NodeError::Storage(format!("cassandra: {what}: id {when}: {e}"))
                })?;
                Ok(StoredMessage {
                    room: room.clone(),
                    id,
                    seq: seq.and_then(|s: i64| u64::try_from(s).ok()).unwrap_or(0),
                    envelope: envelope.unwrap_or_default(),
                })
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn initials_are_every_first_character_in_byte_order() {
        assert!(INITIALS.windows(2).all(|w| w[0] < w[1]));
        for b in 0u8..=255 {
            let name = format!("{}x", char::from(b));
            let valid = b.is_ascii() && RoomId::new(&name).is_ok();
            assert_eq!(valid, INITIALS.contains(&b), "byte {b}");
        }
    }

    #[test]
    fn chunks_are_single_partition_and_bounded() {
        use crate::message_id::IdGenerator;
        let a = RoomId::new("a").unwrap();
        let b = RoomId::new("b").unwrap();
        let end_of_november = 1_796_083_199_000;
        let mut ids = IdGenerator::default();
        let mut batch = Vec::new();
        for i in 0..600u64 {
            let room = if i % 3 == 0 { &b } else { &a };
            let ms = end_of_november + i as i64 * 4; // crosses into December
            let size = if i == 7 { BATCH_BYTES_MAX + 1 } else { 100 };
            batch.push(StoredMessage {
                room: room.clone(),
                id: ids.next(ms, i),
                seq: i + 1,
                envelope: Bytes::from(vec![0u8; size]),
            });
        }
        batch.reverse();
        let chunks = partition_chunks(&batch);
        assert_eq!(chunks.iter().map(Vec::len).sum::<usize>(), batch.len());
        for chunk in &chunks {
            let first = chunk[0];
            assert!(
                chunk
                    .iter()
                    .all(|m| m.room == first.room && m.id.bucket() == first.id.bucket())
            );
            assert!(chunk.len() <= BATCH_ROWS_MAX);
            let bytes: usize = chunk.iter().map(|m| m.envelope.len()).sum();
            assert!(bytes <= BATCH_BYTES_MAX || chunk.len() == 1, "{bytes}");
            assert!(chunk.windows(2).all(|w| w[0].id < w[1].id));
        }
        assert!(
            chunks
                .iter()
                .any(|c| c.len() == 1 && c[0].envelope.len() > BATCH_BYTES_MAX)
        );
        assert!(
            chunks.len() >= 5,
            "two rooms, two months, row limit: {}",
            chunks.len()
        );
    }

    #[test]
    fn migrations_are_numbered_from_one_without_gaps() {
        for (i, m) in MIGRATIONS.iter().enumerate() {
            assert_eq!(m.version, i32::try_from(i).unwrap() + 1);
            // Safe to run twice: `IF NOT EXISTS`, or an `ALTER TABLE … ADD`
            // whose repeat `ddl` takes as done.
            assert!(
                m.statements.iter().all(|s| s.contains("IF NOT EXISTS")
                    || s.starts_with("ALTER TABLE {ks}.timeline ADD"))
            );
        }
        assert_eq!(checksum(&MIGRATIONS[0]).len(), 64);
    }
}
