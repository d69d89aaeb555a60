//! The driver over a real partition-log file and a timeline store that
//! loses what was not synced when it "crashes": what the driver answered
//! must survive, each post once, whatever the store dropped.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use saferchat_consensus::{Handle, Millis, NodeId, Revision, RoomId};
use saferchat_envelope::{Envelope, WrappedKey};
use saferchat_placement::{ClusterNode, PartitionCount, Placement};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::{DriverParts, spawn};
use crate::clock::Clock;
use crate::error::NodeError;
use crate::membership::NoPeers;
use crate::message_id::Bucket;
use crate::storage::log_store::LogStore;
use crate::storage::memory::MemoryChat;
use crate::storage::{ChatStore, CommittedRoom, Range, RoomSummary, StoredMessage, history};
use crate::timeline::{LogPost, Timeline};

/// Time stands still unless the test moves it: nothing is synced because
/// time passed.
#[derive(Debug, Default)]
struct StillClock(AtomicU64);

impl Clock for StillClock {
    fn monotonic(&self) -> Millis {
        Millis(self.0.load(Ordering::SeqCst))
    }
    fn unix_ms(&self) -> i64 {
        1_800_000_000_000
    }
}

/// A store whose unsynced appends are visible but lost by [`Disk::crash`].
#[derive(Debug, Default)]
struct Disk {
    /// What reads see.
    visible: MemoryChat,
    /// What a crash keeps.
    durable: Mutex<Vec<StoredMessage>>,
    pending: Mutex<Vec<StoredMessage>>,
}

impl Disk {
    /// A store holding only what was synced here.
    async fn crash(&self) -> Disk {
        let kept = self.durable.lock().unwrap().clone();
        let disk = Disk::default();
        disk.visible.append(&kept).await.unwrap();
        *disk.durable.lock().unwrap() = kept;
        disk
    }
}

#[async_trait]
impl ChatStore for Disk {
    async fn load_room(&self, room: &RoomId) -> Result<Option<CommittedRoom>, NodeError> {
        self.visible.load_room(room).await
    }
    async fn save_room(&self, room: &RoomId, committed: &CommittedRoom) -> Result<bool, NodeError> {
        self.visible.save_room(room, committed).await
    }
    async fn list_rooms(
        &self,
        after: Option<&RoomId>,
        limit: usize,
    ) -> Result<Vec<RoomSummary>, NodeError> {
        self.visible.list_rooms(after, limit).await
    }
    async fn append(&self, batch: &[StoredMessage]) -> Result<(), NodeError> {
        self.append_unsynced(batch).await?;
        self.sync_appended().await
    }
    async fn append_unsynced(&self, batch: &[StoredMessage]) -> Result<(), NodeError> {
        self.visible.append(batch).await?;
        self.pending.lock().unwrap().extend_from_slice(batch);
        Ok(())
    }
    async fn sync_appended(&self) -> Result<(), NodeError> {
        let mut pending = std::mem::take(&mut *self.pending.lock().unwrap());
        self.durable.lock().unwrap().append(&mut pending);
        Ok(())
    }
    async fn buckets(&self, room: &RoomId) -> Result<Vec<Bucket>, NodeError> {
        self.visible.buckets(room).await
    }
    async fn read_bucket(
        &self,
        room: &RoomId,
        bucket: Bucket,
        range: Range,
        limit: usize,
    ) -> Result<Vec<StoredMessage>, NodeError> {
        self.visible.read_bucket(room, bucket, range, limit).await
    }
}

const PARTITIONS: u32 = 4;

fn placement() -> Arc<Placement> {
    let nodes = [ClusterNode {
        id: NodeId(1),
        datacenter: "dc1".into(),
    }];
    Arc::new(Placement::build(&nodes, PartitionCount::new(PARTITIONS).unwrap(), 1).unwrap())
}

fn room() -> RoomId {
    RoomId::new("team").unwrap()
}

/// A structurally valid envelope, distinct per `n` (its nonce).
fn envelope(n: u32) -> Bytes {
    let member = Handle::of_modulus(&[7; 256]);
    let mut nonce = [0u8; 12];
    nonce[..4].copy_from_slice(&n.to_be_bytes());
    Envelope {
        room: room(),
        sender: member,
        revision: Revision(2),
        nonce,
        ciphertext: Bytes::from(vec![9u8; 64]),
        keys: vec![WrappedKey {
            recipient: member,
            wrapped: Bytes::from(vec![1u8; 256]),
        }],
        signature: Bytes::from(vec![5u8; 256]),
        chain: None,
    }
    .encode()
}

struct Node {
    timeline: Timeline,
    task: JoinHandle<Result<(), NodeError>>,
    shutdown: CancellationToken,
}

fn start(dir: &std::path::Path, chat: Arc<Disk>, clock: Arc<StillClock>) -> Node {
    let (store, states) = LogStore::open(dir).unwrap();
    let (_inbound_tx, inbound) = tokio::sync::mpsc::channel(8);
    let shutdown = CancellationToken::new();
    let (timeline, task) = spawn(DriverParts {
        me: NodeId(1),
        placement: placement(),
        store: Arc::new(store),
        states,
        chat,
        peers: Arc::new(NoPeers),
        inbound,
        clock,
        shutdown: shutdown.clone(),
    });
    // The sender side of `inbound` is dropped: no peers.
    Node {
        timeline,
        task,
        shutdown,
    }
}

/// Waits (generously) until this node leads the room's partition.
async fn lead(timeline: &Timeline) -> u32 {
    let partition = placement().room(room().as_str()).0.0;
    for _ in 0..600 {
        timeline.touch(partition);
        if timeline.leads(partition) {
            return partition;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("no leader after 30 s");
}

/// Posts `range` and returns each answer's sequence number.
async fn post(timeline: &Timeline, partition: u32, range: std::ops::Range<u32>) -> Vec<u64> {
    let posts = range
        .map(|n| LogPost {
            room: room(),
            proposed_ms: 1_800_000_000_000,
            seed: u64::from(n),
            origin: (NodeId(1), 0),
            envelope: envelope(n),
        })
        .collect();
    let mut seqs = Vec::new();
    for reply in timeline.append(partition, posts).await.unwrap() {
        seqs.push(reply.await.unwrap().unwrap().seq);
    }
    seqs
}

async fn stored_seqs(store: &dyn ChatStore) -> Vec<u64> {
    history(store, &room(), Range::After(None), 10_000)
        .await
        .unwrap()
        .iter()
        .map(|m| m.seq)
        .collect()
}

/// Waits until the store holds `n` posts of the room.
async fn stored(store: &dyn ChatStore, n: usize) -> Vec<u64> {
    for _ in 0..600 {
        let seqs = stored_seqs(store).await;
        if seqs.len() >= n {
            return seqs;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("the store never held {n} posts");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn posts_applied_without_a_sync_are_applied_again_after_a_crash() {
    let dir = tempfile::tempdir().unwrap();
    let clock = Arc::new(StillClock::default());
    let disk = Arc::new(Disk::default());
    let node = start(dir.path(), Arc::clone(&disk), Arc::clone(&clock));
    let partition = lead(&node.timeline).await;

    // Answered, readable, and not synced to the store: the log holds them.
    // (The second append makes the driver write the log again, which is
    // where an applied mark queued too early would be written.)
    assert_eq!(
        post(&node.timeline, partition, 0..10).await,
        (1..=10).collect::<Vec<_>>()
    );
    assert_eq!(post(&node.timeline, partition, 10..11).await, vec![11]);
    assert_eq!(stored_seqs(&*disk).await, (1..=11).collect::<Vec<_>>());
    assert!(
        disk.durable.lock().unwrap().is_empty(),
        "nothing synced yet"
    );

    // Crash: the driver stops without a word and the store keeps only
    // what was synced (nothing).
    node.task.abort();
    let _ = node.task.await;
    let disk = Arc::new(disk.crash().await);
    assert!(stored_seqs(&*disk).await.is_empty());

    // The restarted node applies the log's entries again.
    let node = start(dir.path(), Arc::clone(&disk), Arc::clone(&clock));
    let partition = lead(&node.timeline).await;
    assert_eq!(stored(&*disk, 11).await, (1..=11).collect::<Vec<_>>());

    // Time passes: the store is synced, and then the applied mark written
    // (with the next log write, the post below).
    clock
        .0
        .fetch_add(super::FOLLOWER_APPLY_DELAY_MS, Ordering::SeqCst);
    for _ in 0..600 {
        if disk.durable.lock().unwrap().len() >= 11 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        disk.durable.lock().unwrap().len(),
        11,
        "synced once time passed"
    );
    assert_eq!(post(&node.timeline, partition, 11..12).await, vec![12]);
    assert_eq!(post(&node.timeline, partition, 12..13).await, vec![13]);

    // A second crash keeps the synced eleven; the others are applied
    // again, and nothing is stored twice.
    node.task.abort();
    let _ = node.task.await;
    let disk = Arc::new(disk.crash().await);
    assert_eq!(stored_seqs(&*disk).await.len(), 11);
    let node = start(dir.path(), Arc::clone(&disk), Arc::clone(&clock));
    lead(&node.timeline).await;
    assert_eq!(stored(&*disk, 13).await, (1..=13).collect::<Vec<_>>());

    // A clean stop syncs what it applied.
    node.shutdown.cancel();
    node.task.await.unwrap().unwrap();
    assert_eq!(disk.durable.lock().unwrap().len(), 13);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_store_is_synced_once_enough_posts_gather() {
    let dir = tempfile::tempdir().unwrap();
    let clock = Arc::new(StillClock::default());
    let disk = Arc::new(Disk::default());
    let node = start(dir.path(), Arc::clone(&disk), Arc::clone(&clock));
    let partition = lead(&node.timeline).await;
    let max = u32::try_from(super::UNSYNCED_POSTS_MAX).unwrap();
    let mut seqs = Vec::new();
    for chunk in 0..3 {
        seqs.extend(post(&node.timeline, partition, chunk * max..(chunk + 1) * max).await);
    }
    assert_eq!(seqs, (1..=u64::from(3 * max)).collect::<Vec<_>>());
    // Time stood still, so only the count made it sync; never more than
    // the limit waits unsynced.
    let durable = disk.durable.lock().unwrap().len();
    let pending = disk.pending.lock().unwrap().len();
    assert!(durable >= 2 * max as usize, "synced {durable}");
    assert!(pending <= max as usize, "unsynced {pending}");
    node.shutdown.cancel();
    node.task.await.unwrap().unwrap();
}
