//! The storage conformance suite: what every [`ChatStore`] and
//! [`AcceptorStore`] must do, checked the same way for memory, sled and
//! Cassandra.
//!
//! Each check is a plain async function; [`chat_store_conformance!`] and
//! [`acceptor_store_conformance!`] turn them into one `#[tokio::test]` per
//! check for a given store constructor. Checks use room names unique to the
//! process run, so they can share one database (and one Cassandra keyspace
//! across repeated runs).
//!
//! Time enters only through message ids, which the checks build at chosen
//! instants (e.g. both sides of a month boundary): no clock is read.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use saferchat_consensus::{
    AcceptorState, Ballot, Change, ChangeId, Handle, NodeId, Proposal, PublicKey, Revision, RoomId,
    RoomState, apply,
};

use super::{AcceptorStore, ChatStore, CommittedRoom, Range, StoredMessage, history};
use crate::message_id::{Bucket, IdGenerator, MessageId};

/// 2026-11-30T23:59:59.000Z: one second before a month boundary.
pub const BEFORE_DECEMBER_MS: i64 = 1_796_083_199_000;

/// A room name no other check (in this or an earlier run) uses.
pub fn unique_room(tag: &str) -> RoomId {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    static RUN: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    let run = RUN.get_or_init(|| {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        u64::try_from(nanos % u128::from(u64::MAX)).unwrap_or(0) ^ u64::from(std::process::id())
    });
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    RoomId::new(&format!("conf-{tag}-{run:x}-{n}")).expect("valid room name")
}

fn message(room: &RoomId, id: MessageId, body: &[u8]) -> StoredMessage {
    StoredMessage {
        room: room.clone(),
        id,
        // Any value: every read must give back the one written.
        seq: u64::from(id.to_bytes()[15]) << 8 | u64::from(body.first().copied().unwrap_or(0)),
        envelope: Bytes::copy_from_slice(body),
    }
}

/// `n` messages, `step_ms` apart from `start_ms`, with distinct bodies.
fn messages(room: &RoomId, start_ms: i64, step_ms: i64, n: usize) -> Vec<StoredMessage> {
    let mut ids = IdGenerator::default();
    (0..n)
        .map(|i| {
            let id = ids.next(start_ms + step_ms * i as i64, i as u64);
            message(room, id, format!("envelope {i}").as_bytes())
        })
        .collect()
}

fn ids(v: &[StoredMessage]) -> Vec<MessageId> {
    v.iter().map(|m| m.id).collect()
}

/// Messages of one bucket come back newest first or oldest first, bounded
/// by id and limit, with their bodies intact.
pub async fn ordering_within_a_bucket(store: &dyn ChatStore) {
    let room = unique_room("order");
    let all = messages(&room, BEFORE_DECEMBER_MS - 3_600_000, 10, 20);
    // Append out of order, in two batches.
    let (a, b) = all.split_at(7);
    store.append(b).await.expect("append");
    store.append(a).await.expect("append");
    let bucket = all[0].id.bucket();
    assert_eq!(store.buckets(&room).await.expect("buckets"), vec![bucket]);

    let newest = store
        .read_bucket(&room, bucket, Range::Before(None), 5)
        .await
        .expect("read");
    let expected: Vec<_> = all.iter().rev().take(5).cloned().collect();
    assert_eq!(newest, expected, "newest first, bodies intact");

    let before = store
        .read_bucket(&room, bucket, Range::Before(Some(all[10].id)), 3)
        .await
        .expect("read");
    assert_eq!(ids(&before), vec![all[9].id, all[8].id, all[7].id]);

    let after = store
        .read_bucket(&room, bucket, Range::After(Some(all[10].id)), 4)
        .await
        .expect("read");
    assert_eq!(ids(&after), ids(&all[11..15]));

    let oldest = store
        .read_bucket(&room, bucket, Range::After(None), 100)
        .await
        .expect("read");
    assert_eq!(oldest, all);

    let other = unique_room("order-empty");
    assert!(
        store
            .read_bucket(&other, bucket, Range::Before(None), 10)
            .await
            .expect("read")
            .is_empty()
    );
    assert!(store.buckets(&other).await.expect("buckets").is_empty());
}

/// History pages walk buckets newest first across a month boundary and
/// stop at the limit; paging with the last id seen visits every message
/// exactly once, in both directions.
pub async fn pagination_across_buckets(store: &dyn ChatStore) {
    let room = unique_room("pages");
    // 30 messages 100 ms apart, straddling 2026-12-01T00:00:00Z.
    let all = messages(&room, BEFORE_DECEMBER_MS + 1_000 - 1_500, 100, 30);
    let november: Vec<_> = all.iter().filter(|m| m.id.bucket().month == 11).collect();
    assert!(
        !november.is_empty() && november.len() < all.len(),
        "the set straddles the boundary"
    );
    store.append(&all).await.expect("append");
    assert_eq!(
        store.buckets(&room).await.expect("buckets"),
        vec![
            Bucket {
                year: 2026,
                month: 11
            },
            Bucket {
                year: 2026,
                month: 12
            }
        ]
    );

    let mut seen = Vec::new();
    let mut cursor = None;
    loop {
        let page = history(store, &room, Range::Before(cursor), 7)
            .await
            .expect("page");
        if page.is_empty() {
            break;
        }
        assert!(page.len() <= 7);
        cursor = page.last().map(|m| m.id);
        seen.extend(page);
    }
    let newest_first: Vec<_> = all.iter().rev().cloned().collect();
    assert_eq!(seen, newest_first);

    let mut seen = Vec::new();
    let mut cursor = None;
    loop {
        let page = history(store, &room, Range::After(cursor), 4)
            .await
            .expect("page");
        if page.is_empty() {
            break;
        }
        cursor = page.last().map(|m| m.id);
        seen.extend(page);
    }
    assert_eq!(seen, all);

    let limited = history(store, &room, Range::Before(None), 3)
        .await
        .expect("page");
    assert_eq!(ids(&limited), vec![all[29].id, all[28].id, all[27].id]);
    assert_eq!(
        super::last_id(store, &room).await.expect("last"),
        Some(all[29].id)
    );
}

/// Appending the same `(room, id)` again stores it once.
pub async fn idempotent_append(store: &dyn ChatStore) {
    let room = unique_room("idem");
    let all = messages(&room, BEFORE_DECEMBER_MS - 60_000, 1, 5);
    store.append(&all).await.expect("append");
    store.append(&all[1..3]).await.expect("append again");
    store.append(&all).await.expect("append again");
    let stored = history(store, &room, Range::After(None), 100)
        .await
        .expect("read");
    assert_eq!(stored, all);
}

/// Messages appended without a sync are read back at once, a repeat is
/// stored once, and a sync keeps them; a durable append after them keeps
/// the order.
pub async fn unsynced_appends(store: &dyn ChatStore) {
    let room = unique_room("unsynced");
    let all = messages(&room, BEFORE_DECEMBER_MS - 60_000, 1, 6);
    store.append_unsynced(&all[..2]).await.expect("append");
    store.append_unsynced(&all[1..4]).await.expect("append");
    let stored = history(store, &room, Range::After(None), 100)
        .await
        .expect("read");
    assert_eq!(stored, all[..4], "visible before the sync");
    store.sync_appended().await.expect("sync");
    store.append(&all[4..]).await.expect("append");
    let stored = history(store, &room, Range::After(None), 100)
        .await
        .expect("read");
    assert_eq!(stored, all);
}

/// The largest envelope the node accepts round-trips byte for byte.
pub async fn largest_message(store: &dyn ChatStore) {
    let room = unique_room("large");
    let mut ids = IdGenerator::default();
    let body: Vec<u8> = (0..saferchat_envelope::ENVELOPE_BYTES_MAX)
        .map(|i| (i % 251) as u8)
        .collect();
    let m = message(&room, ids.next(BEFORE_DECEMBER_MS, 1), &body);
    store
        .append(std::slice::from_ref(&m))
        .await
        .expect("append");
    let back = history(store, &room, Range::Before(None), 1)
        .await
        .expect("read");
    assert_eq!(back, vec![m]);
}

/// Many writers at once, in one room and across rooms: nothing lost,
/// nothing duplicated, order by id.
pub async fn concurrent_writers(store: Arc<dyn ChatStore>) {
    let shared = unique_room("conc-shared");
    let mut tasks = Vec::new();
    for writer in 0..8u64 {
        let store = Arc::clone(&store);
        let shared = shared.clone();
        let own = unique_room("conc-own");
        tasks.push(tokio::spawn(async move {
            let mut mine = Vec::new();
            let mut ids = IdGenerator::default();
            for i in 0..25u64 {
                // Distinct ids across writers: each writer its own ms slot.
                let ms = BEFORE_DECEMBER_MS - 100_000 + (i * 8 + writer) as i64;
                let id = ids.next(ms, writer);
                let m = message(&shared, id, format!("w{writer} m{i}").as_bytes());
                let o = message(&own, id, b"own");
                store.append(&[m.clone(), o]).await.expect("append");
                mine.push(m);
            }
            (own, mine)
        }));
    }
    let mut expected = BTreeSet::new();
    for task in tasks {
        let (own, mine) = task.await.expect("writer");
        assert_eq!(
            history(&*store, &own, Range::After(None), 1000)
                .await
                .expect("read")
                .len(),
            25
        );
        expected.extend(mine.into_iter().map(|m| m.id));
    }
    let stored = history(&*store, &shared, Range::After(None), 1000)
        .await
        .expect("read");
    assert_eq!(stored.len(), 200);
    let stored_ids: Vec<_> = ids(&stored);
    let expected: Vec<_> = expected.into_iter().collect();
    assert_eq!(stored_ids, expected, "every message once, in id order");
}

/// Whether `room` is among [`ChatStore::rooms_with_messages`], walking
/// every page.
async fn lists_room(store: &dyn ChatStore, room: &RoomId) -> bool {
    let mut after: Option<RoomId> = None;
    loop {
        let page = store
            .rooms_with_messages(after.as_ref(), 1000)
            .await
            .expect("list");
        if page.contains(room) {
            return true;
        }
        let Some(last) = page.last() else {
            return false;
        };
        after = Some(last.clone());
    }
}

/// What [`ChatStore::buckets`] and [`ChatStore::rooms_with_messages`] say
/// of `room` after a truncation left it messages in `expected` (oldest
/// first): exactly those, or, for a shared store, at least those (its index
/// keeps buckets left empty; see [`ChatStore::truncate_room`]).
async fn check_indexes(store: &dyn ChatStore, room: &RoomId, expected: &[StoredMessage]) {
    let with_messages: Vec<Bucket> = expected
        .iter()
        .map(|m| m.id.bucket())
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    let listed = store.buckets(room).await.expect("buckets");
    if store.shared() {
        assert!(
            with_messages.iter().all(|b| listed.contains(b)),
            "{listed:?} lists every bucket in {with_messages:?}"
        );
        if !expected.is_empty() {
            assert!(lists_room(store, room).await, "a room with messages");
        }
    } else {
        assert_eq!(listed, with_messages, "only buckets with messages");
        assert_eq!(
            lists_room(store, room).await,
            !expected.is_empty(),
            "listed exactly while it has messages"
        );
    }
    let newest_first: Vec<StoredMessage> = expected.iter().rev().cloned().collect();
    assert_eq!(
        history(store, room, Range::Before(None), 1000)
            .await
            .expect("read"),
        newest_first
    );
    assert_eq!(
        history(store, room, Range::After(None), 1000)
            .await
            .expect("read"),
        expected
    );
    assert_eq!(
        super::last_id(store, room).await.expect("last"),
        expected.last().map(|m| m.id)
    );
}

/// Ten messages ten days apart from 2026-11-05: three in November, three
/// in December, three in January 2027, one in February.
pub fn four_buckets(room: &RoomId) -> Vec<StoredMessage> {
    const DAY_MS: i64 = 24 * 3_600_000;
    let all = messages(room, BEFORE_DECEMBER_MS - 25 * DAY_MS, 10 * DAY_MS, 10);
    let months: Vec<u32> = all.iter().map(|m| m.id.bucket().month).collect();
    assert_eq!(months, [11, 11, 11, 12, 12, 12, 1, 1, 1, 2]);
    all
}

/// Truncating a room deletes exactly its messages after the given id, in
/// every bucket from that id's on, and counts them; the room's history,
/// last id and indexes follow; other rooms are untouched; messages
/// appended afterwards are stored, a deleted id's new body included.
pub async fn truncate_room(store: &dyn ChatStore) {
    let room = unique_room("trunc");
    let other = unique_room("trunc-other");
    let all = four_buckets(&room);
    let others = four_buckets(&other);
    store.append(&all).await.expect("append");
    store.append(&others).await.expect("append");

    assert_eq!(
        store
            .truncate_room(&room, Some(all[9].id))
            .await
            .expect("truncate"),
        0,
        "nothing after the last"
    );
    check_indexes(store, &room, &all).await;

    // After the middle one of December: the rest of December, January and
    // February go.
    assert_eq!(
        store
            .truncate_room(&room, Some(all[4].id))
            .await
            .expect("truncate"),
        5
    );
    check_indexes(store, &room, &all[..5]).await;
    check_indexes(store, &other, &others).await;
    assert_eq!(
        store
            .truncate_room(&room, Some(all[4].id))
            .await
            .expect("truncate"),
        0,
        "again: nothing left to delete"
    );

    // After an id in a month left without messages (January): nothing
    // is above it.
    let mid_january = MessageId::floor_of_ms(all[7].id.time_ms());
    assert_eq!(
        store
            .truncate_room(&room, Some(mid_january))
            .await
            .expect("truncate"),
        0
    );
    check_indexes(store, &room, &all[..5]).await;

    // Deleted ids can be stored again, with whatever they now carry.
    let mut again = all.clone();
    for m in &mut again[5..] {
        m.envelope = Bytes::from(format!("again {}", m.id));
        m.seq += 1000;
    }
    store.append(&again[5..]).await.expect("append again");
    check_indexes(store, &room, &again).await;

    // After an id below every message (October): all go, as with `None`.
    let october = MessageId::floor_of_ms(BEFORE_DECEMBER_MS - 45 * 24 * 3_600_000);
    assert_eq!(october.bucket().month, 10);
    assert_eq!(
        store
            .truncate_room(&room, Some(october))
            .await
            .expect("truncate"),
        10
    );
    check_indexes(store, &room, &[]).await;
    store.append(&all[..2]).await.expect("append");
    check_indexes(store, &room, &all[..2]).await;

    assert_eq!(
        store.truncate_room(&other, None).await.expect("truncate"),
        10
    );
    check_indexes(store, &other, &[]).await;
    assert_eq!(
        store.truncate_room(&other, None).await.expect("truncate"),
        0
    );
    check_indexes(store, &room, &all[..2]).await;
    store.append(&others[9..]).await.expect("append");
    check_indexes(store, &other, &others[9..]).await;

    let silent = unique_room("trunc-silent");
    assert_eq!(
        store.truncate_room(&silent, None).await.expect("truncate"),
        0,
        "a room without messages"
    );
}

/// A committed room state at `revision` (for tests that need rooms listed).
pub fn state_at(revision: u64) -> Arc<RoomState> {
    let mut s = RoomState::absent();
    apply(
        &mut s,
        &Proposal {
            id: ChangeId(1),
            change: Change::Create,
            expected: None,
        },
    )
    .expect("create");
    let member = Handle::of_modulus(b"conformance member");
    apply(
        &mut s,
        &Proposal {
            id: ChangeId(2),
            change: Change::Add(member),
            expected: None,
        },
    )
    .expect("add");
    let key = PublicKey::new(Bytes::from_static(b"spki der bytes"));
    apply(
        &mut s,
        &Proposal {
            id: ChangeId(3),
            change: Change::RegisterKey(member, key),
            expected: None,
        },
    )
    .expect("register");
    s.revision = Revision(revision);
    Arc::new(s)
}

/// A committed membership is stored only if newer than what is stored:
/// compare-and-set on the revision, so late writers never move a room back.
pub async fn room_revision_compare_and_set(store: &dyn ChatStore) {
    let room = unique_room("cas");
    assert_eq!(store.load_room(&room).await.expect("load"), None);
    let ballot = Ballot {
        epoch: 0,
        round: 3,
        node: NodeId(2),
    };
    let v5 = CommittedRoom {
        ballot,
        state: state_at(5),
    };
    let v4 = CommittedRoom {
        ballot,
        state: state_at(4),
    };
    let v6 = CommittedRoom {
        ballot: ballot.successor().expect("a small round"),
        state: state_at(6),
    };
    assert!(store.save_room(&room, &v5).await.expect("save"));
    assert!(
        !store.save_room(&room, &v4).await.expect("save"),
        "older revision refused"
    );
    assert!(
        !store.save_room(&room, &v5).await.expect("save"),
        "same revision is not newer"
    );
    assert_eq!(store.load_room(&room).await.expect("load"), Some(v5));
    assert!(store.save_room(&room, &v6).await.expect("save"));
    assert_eq!(store.load_room(&room).await.expect("load"), Some(v6));
}

/// Concurrent saves of different revisions leave the highest.
pub async fn concurrent_room_saves_keep_the_highest(store: Arc<dyn ChatStore>) {
    let room = unique_room("cas-conc");
    let mut tasks = Vec::new();
    for revision in (1..=20u64).rev() {
        let store = Arc::clone(&store);
        let room = room.clone();
        tasks.push(tokio::spawn(async move {
            let c = CommittedRoom {
                ballot: Ballot {
                    epoch: 0,
                    round: revision,
                    node: NodeId(1),
                },
                state: state_at(revision),
            };
            store.save_room(&room, &c).await.expect("save");
        }));
    }
    for t in tasks {
        t.await.expect("task");
    }
    let stored = store.load_room(&room).await.expect("load").expect("stored");
    assert_eq!(stored.state.revision, Revision(20));
}

/// Rooms list in name order, a page at a time.
pub async fn list_rooms_in_pages(store: &dyn ChatStore) {
    let base = unique_room("list");
    let names: Vec<RoomId> = (0..5)
        .map(|i| RoomId::new(&format!("{base}-{i}")).expect("valid"))
        .collect();
    for (i, room) in names.iter().enumerate() {
        let c = CommittedRoom {
            ballot: Ballot::ZERO,
            state: state_at(i as u64 + 3),
        };
        store.save_room(room, &c).await.expect("save");
    }
    // Page through everything after the name just below ours.
    let below = RoomId::new(&format!("{base}-")).expect("valid");
    let first = store.list_rooms(Some(&below), 3).await.expect("list");
    let first_ours: Vec<_> = first.iter().filter(|s| names.contains(&s.room)).collect();
    assert_eq!(first_ours.len(), 3, "{first:?}");
    assert_eq!(first_ours[0].room, names[0]);
    assert_eq!(first_ours[0].revision, 3);
    assert_eq!(first_ours[0].members, 1);
    let rest = store.list_rooms(Some(&names[2]), 2).await.expect("list");
    assert_eq!(
        rest.iter().map(|s| s.room.clone()).collect::<Vec<_>>(),
        names[3..5].to_vec()
    );
    let all = store.list_rooms(None, 100_000).await.expect("list");
    assert!(all.windows(2).all(|w| w[0].room < w[1].room), "name order");
}

/// Rooms with messages are listed in pages, each once, whether or not
/// their membership was saved here; a room without messages is not.
pub async fn rooms_with_messages_in_pages(store: &dyn ChatStore) {
    let base = unique_room("posted");
    let rooms: Vec<RoomId> = (0..5)
        .map(|i| RoomId::new(&format!("{base}-{i}")).expect("valid"))
        .collect();
    let mut ids = IdGenerator::after(None);
    for (i, room) in rooms.iter().enumerate() {
        // Two buckets for some rooms: listed once all the same.
        for when in [BEFORE_DECEMBER_MS, BEFORE_DECEMBER_MS + 40 * 24 * 3_600_000]
            .iter()
            .take(1 + i % 2)
        {
            let message = StoredMessage {
                room: room.clone(),
                id: ids.next(*when, i as u64),
                seq: 1,
                envelope: Bytes::from_static(b"ciphertext"),
            };
            store.append(&[message]).await.expect("append");
        }
    }
    let silent = RoomId::new(&format!("{base}-silent")).expect("valid");
    let c = CommittedRoom {
        ballot: Ballot::ZERO,
        state: state_at(3),
    };
    store.save_room(&silent, &c).await.expect("save");
    let mut seen = Vec::new();
    let mut after: Option<RoomId> = None;
    for _ in 0..100_000 {
        let page = store
            .rooms_with_messages(after.as_ref(), 2)
            .await
            .expect("list");
        assert!(page.len() <= 2);
        if page.is_empty() {
            break;
        }
        after = page.last().cloned();
        seen.extend(page);
    }
    let ours: Vec<&RoomId> = seen.iter().filter(|r| rooms.contains(r)).collect();
    assert_eq!(ours.len(), rooms.len(), "each once: {ours:?}");
    assert!(!seen.contains(&silent), "a room without messages");
    let distinct: std::collections::BTreeSet<&RoomId> = seen.iter().collect();
    assert_eq!(distinct.len(), seen.len(), "no room twice");
}

/// Acceptor states round-trip; the last save wins.
pub async fn acceptor_round_trip(store: &dyn AcceptorStore) {
    let a = unique_room("acc");
    let b = unique_room("acc");
    assert_eq!(store.load_acceptor(&a).await.expect("load"), None);
    // Epochs other than 0, so that a store that dropped them would show.
    let promised_only = AcceptorState {
        promised: Ballot {
            epoch: 3,
            round: 2,
            node: NodeId(3),
        },
        accepted: None,
    };
    let with_value = AcceptorState {
        promised: Ballot {
            epoch: 2,
            round: 5,
            node: NodeId(1),
        },
        accepted: Some((
            Ballot {
                epoch: 1,
                round: 4,
                node: NodeId(1),
            },
            state_at(9),
        )),
    };
    store
        .save_acceptors(&[
            (a.clone(), promised_only.clone()),
            (b.clone(), with_value.clone()),
        ])
        .await
        .expect("save");
    assert_eq!(
        store.load_acceptor(&a).await.expect("load"),
        Some(promised_only)
    );
    assert_eq!(
        store.load_acceptor(&b).await.expect("load"),
        Some(with_value.clone())
    );
    let newer = AcceptorState {
        promised: Ballot {
            epoch: 0,
            round: 7,
            node: NodeId(2),
        },
        ..with_value
    };
    store
        .save_acceptors(&[(b.clone(), newer.clone())])
        .await
        .expect("save");
    assert_eq!(store.load_acceptor(&b).await.expect("load"), Some(newer));
}

/// One `#[tokio::test]` per [`ChatStore`] check. `$make` is an async
/// expression returning `Arc<dyn ChatStore>`. Attributes written before it
/// go on every generated test, e.g. `#[ignore = "needs Cassandra"]` for a
/// store that needs a server.
#[macro_export]
macro_rules! chat_store_conformance {
    ($(#[$attr:meta])+ $make:expr) => {
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        $(#[$attr])+
        async fn conformance_ordering_within_a_bucket() {
            let store: std::sync::Arc<dyn $crate::storage::ChatStore> = $make.await;
            $crate::storage::conformance::ordering_within_a_bucket(&*store).await;
        }
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        $(#[$attr])+
        async fn conformance_pagination_across_buckets() {
            let store: std::sync::Arc<dyn $crate::storage::ChatStore> = $make.await;
            $crate::storage::conformance::pagination_across_buckets(&*store).await;
        }
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        $(#[$attr])+
        async fn conformance_idempotent_append() {
            let store: std::sync::Arc<dyn $crate::storage::ChatStore> = $make.await;
            $crate::storage::conformance::idempotent_append(&*store).await;
        }
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        $(#[$attr])+
        async fn conformance_unsynced_appends() {
            let store: std::sync::Arc<dyn $crate::storage::ChatStore> = $make.await;
            $crate::storage::conformance::unsynced_appends(&*store).await;
        }
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        $(#[$attr])+
        async fn conformance_largest_message() {
            let store: std::sync::Arc<dyn $crate::storage::ChatStore> = $make.await;
            $crate::storage::conformance::largest_message(&*store).await;
        }
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        $(#[$attr])+
        async fn conformance_concurrent_writers() {
            let store: std::sync::Arc<dyn $crate::storage::ChatStore> = $make.await;
            $crate::storage::conformance::concurrent_writers(store).await;
        }
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        $(#[$attr])+
        async fn conformance_room_revision_compare_and_set() {
            let store: std::sync::Arc<dyn $crate::storage::ChatStore> = $make.await;
            $crate::storage::conformance::room_revision_compare_and_set(&*store).await;
        }
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        $(#[$attr])+
        async fn conformance_concurrent_room_saves_keep_the_highest() {
            let store: std::sync::Arc<dyn $crate::storage::ChatStore> = $make.await;
            $crate::storage::conformance::concurrent_room_saves_keep_the_highest(store).await;
        }
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        $(#[$attr])+
        async fn conformance_list_rooms_in_pages() {
            let store: std::sync::Arc<dyn $crate::storage::ChatStore> = $make.await;
            $crate::storage::conformance::list_rooms_in_pages(&*store).await;
        }
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        $(#[$attr])+
        async fn conformance_rooms_with_messages_in_pages() {
            let store: std::sync::Arc<dyn $crate::storage::ChatStore> = $make.await;
            $crate::storage::conformance::rooms_with_messages_in_pages(&*store).await;
        }
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        $(#[$attr])+
        async fn conformance_truncate_room() {
            let store: std::sync::Arc<dyn $crate::storage::ChatStore> = $make.await;
            $crate::storage::conformance::truncate_room(&*store).await;
        }
    };
    ($make:expr) => {
        $crate::chat_store_conformance!(#[allow(unused_attributes)] $make);
    };
}

/// Acceptor states list in name order, page by page; a partition's
/// handover state and a mover's transfer record round-trip, and a seal is
/// saved with the room states it raised.
pub async fn acceptor_listing_and_handover_records(store: &dyn AcceptorStore) {
    use saferchat_consensus::handover::{PartitionSeal, TransferRecord};
    let ballot = |epoch, round, node| Ballot {
        epoch,
        round,
        node: NodeId(node),
    };
    let rooms: Vec<RoomId> = (0..5).map(|_| unique_room("list")).collect();
    let state = |round| AcceptorState {
        promised: ballot(1, round, 1),
        accepted: None,
    };
    for (i, room) in rooms.iter().enumerate() {
        store
            .save_acceptors(&[(room.clone(), state(i as u64 + 1))])
            .await
            .expect("save");
    }
    let mut listed = Vec::new();
    let mut after: Option<RoomId> = None;
    loop {
        let page = store.list_acceptors(after.as_ref(), 2).await.expect("list");
        assert!(page.len() <= 2, "a page holds at most the limit");
        let Some((last, _)) = page.last() else { break };
        after = Some(last.clone());
        listed.extend(page);
    }
    assert!(
        listed.windows(2).all(|w| w[0].0 < w[1].0),
        "in name order, each once"
    );
    for (i, room) in rooms.iter().enumerate() {
        let found = listed.iter().find(|(r, _)| r == room).map(|(_, s)| s);
        assert_eq!(found, Some(&state(i as u64 + 1)), "{room:?} listed");
    }

    assert_eq!(
        store.load_partition_seal(41).await.expect("load"),
        PartitionSeal::default(),
        "never sealed"
    );
    let seal = PartitionSeal {
        sealed: ballot(3, 0, 2),
        installed: ballot(2, 0, 1),
    };
    let raised = AcceptorState {
        promised: ballot(3, 0, 2),
        accepted: Some((ballot(2, 0, 1), state_at(4))),
    };
    store
        .save_partition_seal(41, &seal, &[(rooms[0].clone(), raised.clone())])
        .await
        .expect("save seal");
    assert_eq!(store.load_partition_seal(41).await.expect("load"), seal);
    assert_eq!(
        store.load_partition_seal(42).await.expect("load"),
        PartitionSeal::default(),
        "per partition"
    );
    assert_eq!(
        store.load_acceptor(&rooms[0]).await.expect("load"),
        Some(raised),
        "saved with the seal"
    );

    assert_eq!(store.load_transfer(41).await.expect("load"), None);
    let first = TransferRecord {
        ballot: ballot(2, 0, 1),
        rooms: Arc::new(vec![(rooms[1].clone(), state_at(2))]),
    };
    let later = TransferRecord {
        ballot: ballot(3, 0, 2),
        rooms: Arc::new(vec![
            (rooms[1].clone(), state_at(3)),
            (rooms[2].clone(), state_at(1)),
        ]),
    };
    store.save_transfer(41, &first).await.expect("save");
    assert_eq!(store.load_transfer(41).await.expect("load"), Some(first));
    store.save_transfer(41, &later).await.expect("save");
    assert_eq!(
        store.load_transfer(41).await.expect("load"),
        Some(later),
        "a later step's record replaces it"
    );
    assert_eq!(store.load_transfer(40).await.expect("load"), None);
}

/// One `#[tokio::test]` per [`AcceptorStore`] check.
#[macro_export]
macro_rules! acceptor_store_conformance {
    ($make:expr) => {
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn conformance_acceptor_round_trip() {
            let store: std::sync::Arc<dyn $crate::storage::AcceptorStore> = $make.await;
            $crate::storage::conformance::acceptor_round_trip(&*store).await;
        }

        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn conformance_acceptor_listing_and_handover_records() {
            let store: std::sync::Arc<dyn $crate::storage::AcceptorStore> = $make.await;
            $crate::storage::conformance::acceptor_listing_and_handover_records(&*store).await;
        }
    };
}

#[cfg(test)]
mod memory_store {
    use std::sync::Arc;

    use crate::storage::memory::{MemoryAcceptors, MemoryChat};

    crate::chat_store_conformance!(async { Arc::new(MemoryChat::default()) });
    crate::acceptor_store_conformance!(async { Arc::new(MemoryAcceptors::default()) });
}

#[cfg(test)]
mod sled_store {
    use std::sync::{Arc, OnceLock};

    use crate::storage::sled::SledStore;

    /// One database per test (sled locks its folder); kept for the process.
    async fn open() -> Arc<SledStore> {
        static DIRS: OnceLock<std::sync::Mutex<Vec<tempfile::TempDir>>> = OnceLock::new();
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Arc::new(SledStore::open(dir.path()).expect("open sled"));
        DIRS.get_or_init(Default::default)
            .lock()
            .expect("lock")
            .push(dir);
        store
    }

    crate::chat_store_conformance!(open());
    crate::acceptor_store_conformance!(open());

    /// A crash after the envelope log's fsync (which acknowledges a post)
    /// but before the index reached the disk: opening the store re-indexes
    /// the log, so the acknowledged messages are there.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn messages_only_in_the_log_are_reindexed_on_open() {
        use crate::storage::envelope_log::{Entry, EnvelopeLog};
        use crate::storage::{ChatStore, Range, history};
        let dir = tempfile::tempdir().expect("tempdir");
        let room = super::unique_room("replay");
        let msgs = super::messages(&room, super::BEFORE_DECEMBER_MS - 500, 100, 10);
        // A first store run that indexes the first half normally.
        let store = SledStore::open(dir.path()).expect("open");
        store.append(&msgs[..5]).await.expect("append");
        store.close().await.expect("close");
        // The second half reaches only the log, as if the process died
        // between the log's fsync and the index flush.
        {
            let log = EnvelopeLog::open(&dir.path().join("envelopes")).expect("log");
            let entries: Vec<Entry<'_>> = msgs[5..]
                .iter()
                .map(|m| Entry {
                    room: &m.room,
                    id: m.id,
                    seq: m.seq,
                    envelope: &m.envelope,
                })
                .collect();
            log.append(&entries).expect("log append");
            log.sync().expect("log sync");
        }
        let store = SledStore::open(dir.path()).expect("reopen");
        assert_eq!(
            history(&store, &room, Range::After(None), 100)
                .await
                .expect("read"),
            msgs
        );
        // Appending again stores nothing twice.
        store.append(&msgs).await.expect("append again");
        assert_eq!(
            history(&store, &room, Range::After(None), 100)
                .await
                .expect("read"),
            msgs
        );
    }

    /// A truncation holds across a restart, and so do messages appended
    /// after it under the deleted ids.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_truncation_survives_a_reopen() {
        use crate::storage::{ChatStore, Range, history};
        let dir = tempfile::tempdir().expect("tempdir");
        let room = super::unique_room("trunc-reopen");
        let all = super::four_buckets(&room);
        let store = SledStore::open(dir.path()).expect("open");
        store.append(&all).await.expect("append");
        assert_eq!(
            store
                .truncate_room(&room, Some(all[2].id))
                .await
                .expect("truncate"),
            7
        );
        store.close().await.expect("close");
        let store = SledStore::open(dir.path()).expect("reopen");
        super::check_indexes(&store, &room, &all[..3]).await;
        let mut again = all.clone();
        for m in &mut again[3..] {
            m.envelope = bytes::Bytes::from(format!("again {}", m.id));
        }
        store.append(&again[3..]).await.expect("append again");
        store.close().await.expect("close");
        let store = SledStore::open(dir.path()).expect("reopen");
        assert_eq!(
            history(&store, &room, Range::After(None), 100)
                .await
                .expect("read"),
            again
        );
        store.close().await.expect("close");
    }

    /// Copies a folder tree (what a crash would leave on disk, taken while
    /// the store still runs: everything it made durable is in the files).
    fn copy_tree(from: &std::path::Path, to: &std::path::Path) {
        std::fs::create_dir_all(to).expect("mkdir");
        for entry in std::fs::read_dir(from).expect("list") {
            let entry = entry.expect("entry");
            let target = to.join(entry.file_name());
            if entry.file_type().expect("type").is_dir() {
                copy_tree(&entry.path(), &target);
            } else {
                std::fs::copy(entry.path(), &target).expect("copy");
            }
        }
    }

    /// A truncation is durable when it returns, without a shutdown: the
    /// deleted messages' log records lie past the checkpoint the store
    /// opened with, and a restart that replayed from there would index
    /// them again.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_truncation_survives_a_crash() {
        use crate::storage::ChatStore;
        let dir = tempfile::tempdir().expect("tempdir");
        let room = super::unique_room("trunc-crash");
        let all = super::four_buckets(&room);
        let store = SledStore::open(dir.path()).expect("open");
        store.append(&all).await.expect("append");
        assert_eq!(
            store
                .truncate_room(&room, Some(all[4].id))
                .await
                .expect("truncate"),
            5
        );
        let crashed = tempfile::tempdir().expect("tempdir");
        copy_tree(dir.path(), crashed.path());
        store.close().await.expect("close");
        let store = SledStore::open(crashed.path()).expect("open the copy");
        super::check_indexes(&store, &room, &all[..5]).await;
        store.close().await.expect("close");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn everything_survives_a_reopen() {
        use crate::storage::{AcceptorStore, ChatStore, Range, history};
        let dir = tempfile::tempdir().expect("tempdir");
        let room = super::unique_room("reopen");
        let msgs = super::messages(&room, super::BEFORE_DECEMBER_MS, 1, 3);
        let acceptor = saferchat_consensus::AcceptorState {
            promised: saferchat_consensus::Ballot {
                epoch: 0,
                round: 1,
                node: saferchat_consensus::NodeId(1),
            },
            accepted: Some((
                saferchat_consensus::Ballot {
                    epoch: 0,
                    round: 1,
                    node: saferchat_consensus::NodeId(1),
                },
                super::state_at(3),
            )),
        };
        let store = SledStore::open(dir.path()).expect("open");
        store.append(&msgs).await.expect("append");
        store
            .save_acceptors(&[(room.clone(), acceptor.clone())])
            .await
            .expect("save");
        let c = crate::storage::CommittedRoom {
            ballot: saferchat_consensus::Ballot::ZERO,
            state: super::state_at(3),
        };
        store.save_room(&room, &c).await.expect("save");
        store.close().await.expect("close");
        let store = SledStore::open(dir.path()).expect("reopen");
        assert_eq!(
            history(&store, &room, Range::After(None), 10)
                .await
                .expect("read"),
            msgs
        );
        assert_eq!(
            store.load_acceptor(&room).await.expect("load"),
            Some(acceptor)
        );
        assert_eq!(
            store
                .load_room(&room)
                .await
                .expect("load")
                .expect("room")
                .state
                .revision
                .0,
            3
        );
    }
}
