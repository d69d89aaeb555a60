//! The Cassandra store against a real Cassandra 5 (the shared test
//! instance, `SAFERCHAT_CASSANDRA`): the storage conformance suite
//! unchanged, how Cassandra orders UUIDv7 ids, migrations, and clear
//! errors for bad settings.

use std::sync::Arc;

use bytes::Bytes;
use saferchat_consensus::RoomId;
use saferchat_node::error::NodeError;
use saferchat_node::message_id::{IdGenerator, MessageId};
use saferchat_node::storage::cassandra::{CassandraStore, MIGRATIONS};
use saferchat_node::storage::conformance::{BEFORE_DECEMBER_MS, unique_room};
use saferchat_node::storage::{ChatStore, Range, StoredMessage};
use saferchat_tests::cassandra;

/// Every check of the suite shares this keyspace; rooms are unique per run.
const KEYSPACE: &str = "saferchat_conformance";

async fn store() -> Arc<CassandraStore> {
    cassandra::store(KEYSPACE).await
}

mod conformance {
    saferchat_node::chat_store_conformance!(
        #[ignore = "needs Cassandra: run scripts/test.sh or set SAFERCHAT_CASSANDRA"]
        super::store()
    );
}

/// A UUIDv7 from its parts: 48-bit milliseconds, 12-bit `rand_a`, 62-bit
/// `rand_b` (the counter spans `rand_a ‖ rand_b`).
fn v7(ms: u64, rand_a: u16, rand_b: u64) -> MessageId {
    assert!(ms < 1 << 48 && rand_a < 1 << 12 && rand_b < 1 << 62);
    let raw = (u128::from(ms) << 80)
        | (0x7 << 76)
        | (u128::from(rand_a) << 64)
        | (0b10 << 62)
        | u128::from(rand_b);
    MessageId::from_bytes(&raw.to_be_bytes()).expect("a v7 id")
}

/// A fixed permutation: Fisher-Yates driven by a constant-seeded LCG, so
/// the order is scrambled but the same every run.
fn shuffled<T: Clone>(items: &[T]) -> Vec<T> {
    let mut out = items.to_vec();
    let mut state: u64 = 0x5eed;
    for i in (1..out.len()).rev() {
        state = state
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        let j = usize::try_from((state >> 33) % (i as u64 + 1)).expect("small");
        out.swap(i, j);
    }
    out
}

/// Cassandra's `uuid` clustering order is our id order for UUIDv7: ids in
/// different milliseconds (including ones whose top bit is set, which a
/// signed comparison would put first), many ids in one millisecond that
/// differ only in the counter (carrying from `rand_b` into `rand_a`), all
/// inserted out of order, come back sorted by id in both directions,
/// straight from the `timeline` table and through the store.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs Cassandra: run scripts/test.sh or set SAFERCHAT_CASSANDRA"]
async fn uuid_v7_clustering_order_is_id_order() {
    let store = store().await;
    let room = unique_room("uuid-order");
    let same_ms = BEFORE_DECEMBER_MS as u64;
    let mut ids = vec![
        v7(0, 0, 0),
        v7(1, 0, 0),
        v7(same_ms - 1, 0xFFF, (1 << 62) - 1),
        v7(same_ms, 0, 0),
        v7(same_ms, 0, 1),
        v7(same_ms, 0, 2),
        v7(same_ms, 0, 1 << 61),
        v7(same_ms, 0, (1 << 62) - 1),
        v7(same_ms, 1, 0), // the counter carried into rand_a
        v7(same_ms, 1, 1),
        v7(same_ms, 0x800, 0),
        v7(same_ms, 0xFFF, (1 << 62) - 1),
        v7(same_ms + 1, 0, 0),
        v7(1 << 47, 0, 0), // top bit of the timestamp set
        v7((1 << 48) - 1, 0xFFF, (1 << 62) - 1),
    ];
    // And what the generator hands out within one millisecond.
    let mut generator = IdGenerator::default();
    for i in 0..20u64 {
        ids.push(generator.next(same_ms as i64 + 5, i));
    }
    ids.sort();
    ids.dedup();
    let n = ids.len();

    // Straight into one partition of the real table, out of order.
    let session = store.session();
    let insert = session
        .prepare(format!(
            "INSERT INTO {KEYSPACE}.timeline (chat, time_bucket, when, envelope) VALUES (?, ?, ?, ?)"
        ))
        .await
        .expect("prepare");
    for id in shuffled(&ids) {
        session
            .execute_unpaged(
                &insert,
                (room.as_str(), "order", id.to_uuid(), id.to_bytes().to_vec()),
            )
            .await
            .expect("insert");
    }
    let read = |order: &'static str| {
        let room = room.clone();
        async move {
            session
                .query_unpaged(
                    format!(
                        "SELECT when FROM {KEYSPACE}.timeline WHERE chat = ? AND time_bucket = 'order' ORDER BY when {order}"
                    ),
                    (room.as_str(),),
                )
                .await
                .expect("select")
                .into_rows_result()
                .expect("rows")
                .rows::<(uuid::Uuid,)>()
                .expect("typed")
                .map(|r| MessageId::from_uuid(r.expect("row").0).expect("v7"))
                .collect::<Vec<_>>()
        }
    };
    let descending = read("DESC").await;
    let mut expected: Vec<_> = ids.iter().rev().copied().collect();
    assert_eq!(descending, expected, "clustering order (DESC) is id order");
    let ascending = read("ASC").await;
    expected.reverse();
    assert_eq!(ascending, expected, "reversed clustering order is id order");

    // Through the store: one real bucket, appended out of order in batches.
    let mut generator = IdGenerator::default();
    let messages: Vec<StoredMessage> = (0..40u64)
        .map(|i| StoredMessage {
            room: room.clone(),
            // Two bursts of 20 ids in one millisecond each.
            id: generator.next(same_ms as i64 - 10 + (i as i64 / 20), i),
            seq: i + 1,
            envelope: Bytes::from(format!("m{i}")),
        })
        .collect();
    let mixed = shuffled(&messages);
    for part in mixed.chunks(7) {
        store.append(part).await.expect("append");
    }
    let bucket = messages[0].id.bucket();
    let newest = store
        .read_bucket(&room, bucket, Range::Before(None), 100)
        .await
        .expect("read");
    let want: Vec<_> = messages.iter().rev().cloned().collect();
    assert_eq!(newest, want);
    let middle = messages[20].id;
    let after = store
        .read_bucket(&room, bucket, Range::After(Some(middle)), 5)
        .await
        .expect("read");
    assert_eq!(after, messages[21..26].to_vec());
    assert!(n > 30, "{n} distinct ids checked");
}

/// Connecting again finds the schema applied: every migration recorded
/// once, with its checksum; the tables exist.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs Cassandra: run scripts/test.sh or set SAFERCHAT_CASSANDRA"]
async fn migrations_run_once_and_are_recorded() {
    let first = store().await;
    let again = store().await;
    let rows: Vec<(i32, String)> = again
        .session()
        .query_unpaged(
            format!("SELECT version, checksum FROM {KEYSPACE}.schema_migrations"),
            (),
        )
        .await
        .expect("select")
        .into_rows_result()
        .expect("rows")
        .rows::<(i32, String)>()
        .expect("typed")
        .collect::<Result<_, _>>()
        .expect("decode");
    assert_eq!(rows.len(), MIGRATIONS.len(), "{rows:?}");
    assert!(rows.iter().all(|(_, sum)| sum.len() == 64), "{rows:?}");
    let tables = cassandra::every_value(first.session(), KEYSPACE).await;
    let names: std::collections::BTreeSet<&str> = tables.iter().map(|(t, _)| t.as_str()).collect();
    for table in [
        "chat_names",
        "timeline",
        "timeline_buckets",
        "schema_migrations",
    ] {
        assert!(names.contains(table), "{table} in {names:?}");
    }
}

/// A datacenter the cluster does not have is a configuration error that
/// names the datacenters it does have; nobody listening is UNAVAILABLE.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs Cassandra: run scripts/test.sh or set SAFERCHAT_CASSANDRA"]
async fn bad_settings_get_clear_errors() {
    let mut config = cassandra::config(&cassandra::address(), KEYSPACE);
    config.datacenter = "dc-nowhere".into();
    let e = CassandraStore::connect(&config).await.unwrap_err();
    assert!(matches!(e, NodeError::Config(_)), "{e}");
    assert!(
        e.to_string().contains("dc-nowhere") && e.to_string().contains(cassandra::DATACENTER),
        "{e}"
    );

    let closed = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = closed.local_addr().expect("addr").port();
    drop(closed);
    let config = cassandra::config(&format!("127.0.0.1:{port}"), KEYSPACE);
    let e = CassandraStore::connect(&config).await.unwrap_err();
    assert!(matches!(e, NodeError::Unavailable(_)), "{e}");
    assert!(e.to_string().contains(&port.to_string()), "{e}");
}

/// Room names list in byte order across the name index's partitions
/// (digits, upper case, `_`, lower case).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs Cassandra: run scripts/test.sh or set SAFERCHAT_CASSANDRA"]
async fn room_names_list_in_byte_order_across_initials() {
    use saferchat_consensus::Ballot;
    use saferchat_node::storage::CommittedRoom;
    let store = store().await;
    let tag = unique_room("x").as_str().replace("conf-x-", "");
    let names: Vec<RoomId> = ["0", "9", "A", "Z", "_", "a", "z"]
        .iter()
        .map(|p| RoomId::new(&format!("{p}list-{tag}")).expect("valid"))
        .collect();
    for room in shuffled(&names) {
        let state = saferchat_consensus::RoomState {
            revision: saferchat_consensus::Revision(1),
            created: true,
            ..saferchat_consensus::RoomState::default()
        };
        let c = CommittedRoom {
            ballot: Ballot::ZERO,
            state: Arc::new(state),
        };
        assert!(store.save_room(&room, &c).await.expect("save"));
    }
    let mut listed = Vec::new();
    let mut after: Option<RoomId> = None;
    for _ in 0..10_000 {
        let page = store.list_rooms(after.as_ref(), 50).await.expect("list");
        let Some(last) = page.last() else { break };
        after = Some(last.room.clone());
        listed.extend(page.into_iter().map(|s| s.room));
    }
    assert!(listed.windows(2).all(|w| w[0] < w[1]), "byte order");
    let ours: Vec<_> = listed.into_iter().filter(|r| names.contains(r)).collect();
    assert_eq!(ours, names);
}
