//! The driver over a real partition-log file and a timeline store that
//! loses what was not synced when it "crashes", or fails for a while (as
//! a Cassandra outage does): what the driver answered must survive, each
//! post once, whatever the store dropped, and a failing store must not
//! stop the node.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use saferchat_consensus::{Millis, NodeId, RoomId};
use saferchat_placement::{ClusterNode, PartitionCount, Placement};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::{DriverParts, spawn};
use crate::clock::Clock;
use crate::error::NodeError;
use crate::membership::NoPeers;
use crate::message_id::Bucket;
use crate::storage::log_store::{LogStore, files};
use crate::storage::memory::MemoryChat;
use crate::storage::{ChatStore, CommittedRoom, Range, RoomSummary, StoredMessage, history};
use crate::timeline::tail::Sequenced;
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
    /// While set, the store is failing: an append stores this many
    /// messages of its batch and then fails, and reads fail.
    failing: Mutex<Option<usize>>,
    /// Calls that failed.
    failures: AtomicU64,
}

impl Disk {
    fn fail(&self) -> NodeError {
        self.failures.fetch_add(1, Ordering::SeqCst);
        NodeError::Storage("the store is down".into())
    }

    /// The room's sequence numbers as stored (reads that bypass failures).
    async fn visible_seqs(&self) -> Vec<u64> {
        stored_seqs(&self.visible).await
    }

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
        let failing = *self.failing.lock().unwrap();
        if let Some(stored) = failing {
            let part = &batch[..stored.min(batch.len())];
            self.visible.append(part).await?;
            self.pending.lock().unwrap().extend_from_slice(part);
            return Err(self.fail());
        }
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
        if self.failing.lock().unwrap().is_some() {
            return Err(self.fail());
        }
        self.visible.buckets(room).await
    }
    async fn rooms_with_messages(
        &self,
        after: Option<&RoomId>,
        limit: usize,
    ) -> Result<Vec<RoomId>, NodeError> {
        self.visible.rooms_with_messages(after, limit).await
    }
    async fn truncate_room(
        &self,
        room: &RoomId,
        after: Option<crate::message_id::MessageId>,
    ) -> Result<u64, NodeError> {
        let kept = |m: &StoredMessage| m.room != *room || after.is_some_and(|a| m.id <= a);
        self.durable.lock().unwrap().retain(kept);
        self.pending.lock().unwrap().retain(kept);
        self.visible.truncate_room(room, after).await
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

fn envelope(n: u32) -> Bytes {
    crate::timeline::test_envelope(&room(), n)
}

struct Node {
    timeline: Timeline,
    task: JoinHandle<Result<(), NodeError>>,
    shutdown: CancellationToken,
}

fn start(dir: &std::path::Path, chat: Arc<Disk>, clock: Arc<StillClock>) -> Node {
    start_following(dir, chat, clock, None)
}

fn start_following(
    dir: &std::path::Path,
    chat: Arc<Disk>,
    clock: Arc<StillClock>,
    maps: Option<tokio::sync::watch::Receiver<saferchat_placement::ClusterMap>>,
) -> Node {
    let (store, states) = LogStore::open(dir).unwrap();
    start_on(store, states, chat, clock, maps)
}

fn start_on(
    store: LogStore,
    states: std::collections::HashMap<u32, crate::storage::log_store::PartitionLogState>,
    chat: Arc<Disk>,
    clock: Arc<StillClock>,
    maps: Option<tokio::sync::watch::Receiver<saferchat_placement::ClusterMap>>,
) -> Node {
    // The sender side of `inbound` is dropped: no peers.
    spawn_with(store, states, chat, clock, |parts| parts.maps = maps).0
}

/// Starts node 1 with this file's one-node placement, an empty map, no
/// peers and no copier, as `shape` leaves them; returns it and the sender
/// of its peer traffic.
fn spawn_with(
    store: LogStore,
    states: std::collections::HashMap<u32, crate::storage::log_store::PartitionLogState>,
    chat: Arc<Disk>,
    clock: Arc<StillClock>,
    shape: impl FnOnce(&mut DriverParts),
) -> (Node, tokio::sync::mpsc::Sender<super::LogInbound>) {
    let (inbound_tx, inbound) = tokio::sync::mpsc::channel(8);
    let shutdown = CancellationToken::new();
    let mut parts = DriverParts {
        me: NodeId(1),
        placement: placement(),
        map: Arc::default(),
        maps: None,
        store: Arc::new(store),
        states,
        chat,
        peers: Arc::new(NoPeers),
        inbound,
        clock,
        shutdown: shutdown.clone(),
        copier: None,
        retained_max: super::RETAINED_BYTES_MAX,
        home_lease: saferchat_consensus::LeaseConfig::default(),
    };
    shape(&mut parts);
    let (timeline, task) = spawn(parts);
    (
        Node {
            timeline,
            task,
            shutdown,
        },
        inbound_tx,
    )
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

fn posts(range: std::ops::Range<u32>) -> Vec<LogPost> {
    range
        .map(|n| LogPost {
            room: room(),
            proposed_ms: 1_800_000_000_000,
            seed: u64::from(n),
            origin: (NodeId(1), 0),
            envelope: envelope(n),
            retry_only: false,
        })
        .collect()
}

/// Posts `range` and returns each answer's sequence number.
async fn post(timeline: &Timeline, partition: u32, range: std::ops::Range<u32>) -> Vec<u64> {
    let mut seqs = Vec::new();
    for reply in timeline
        .append(partition, posts(range), Vec::new())
        .await
        .unwrap()
    {
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

/// Appends `range` retry-only ([`LogPost::retry_only`]) and returns each
/// answer.
async fn post_retry_only(
    timeline: &Timeline,
    partition: u32,
    range: std::ops::Range<u32>,
) -> Vec<Result<Sequenced, NodeError>> {
    let mut answers = Vec::new();
    let retries = posts(range)
        .into_iter()
        .map(|p| LogPost {
            retry_only: true,
            ..p
        })
        .collect();
    for reply in timeline
        .append(partition, retries, Vec::new())
        .await
        .unwrap()
    {
        answers.push(reply.await.unwrap());
    }
    answers
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_only_post_gets_its_first_attempts_place_or_is_refused_and_stored_never() {
    let dir = tempfile::tempdir().unwrap();
    let clock = Arc::new(StillClock::default());
    let disk = Arc::new(Disk::default());
    let node = start(dir.path(), Arc::clone(&disk), Arc::clone(&clock));
    let partition = lead(&node.timeline).await;
    assert_eq!(post(&node.timeline, partition, 0..3).await, vec![1, 2, 3]);
    let original = ids_of(&*disk).await[1];

    // The same envelope as post 1 (a retry whose first attempt
    // committed): its place, nothing new.
    let again = post_retry_only(&node.timeline, partition, 1..2).await;
    let Ok(placed) = &again[0] else {
        panic!("a retry of a stored post is answered with its place: {again:?}");
    };
    assert_eq!((placed.id, placed.seq, placed.fresh), (original, 2, false));
    // An envelope the room never held: refused, and no number used.
    let refused = post_retry_only(&node.timeline, partition, 7..8).await;
    assert!(
        matches!(refused[0], Err(NodeError::FailedPrecondition(_))),
        "{refused:?}"
    );
    assert_eq!(post(&node.timeline, partition, 3..4).await, vec![4]);
    assert_eq!(stored_seqs(&*disk).await, vec![1, 2, 3, 4]);
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
async fn the_log_rotates_while_posts_go_on_and_a_crash_keeps_every_answered_post() {
    let dir = tempfile::tempdir().unwrap();
    let clock = Arc::new(StillClock::default());
    let disk = Arc::new(Disk::default());
    // Rotated after 4 KiB (or the checkpoint's size): several times over
    // these posts, each checkpoint written beside the file in use.
    let (store, states) = LogStore::open_rotating_after(dir.path(), 4 * 1024).unwrap();
    let first = files(dir.path()).unwrap();
    let node = start_on(store, states, Arc::clone(&disk), Arc::clone(&clock), None);
    let partition = lead(&node.timeline).await;
    let mut answered = Vec::new();
    let mut batch = 0;
    // Posts go on until two rotations finished (bounded: 2,000 posts).
    while files(dir.path()).unwrap()[0] < first[0] + 2 {
        assert!(batch < 400, "the log never rotated twice");
        answered.extend(post(&node.timeline, partition, batch * 5..batch * 5 + 5).await);
        batch += 1;
    }
    let posted = answered.len();
    assert_eq!(answered, (1..=posted as u64).collect::<Vec<_>>());
    // (A rotation finishing right now holds two files for a moment.)
    until("the old files are deleted", || {
        files(dir.path()).unwrap().len() == 1
    })
    .await;

    // Crash: every answered post comes back from the rotated log.
    node.task.abort();
    let _ = node.task.await;
    let disk = Arc::new(disk.crash().await);
    let node = start(dir.path(), Arc::clone(&disk), Arc::clone(&clock));
    let partition = lead(&node.timeline).await;
    assert_eq!(
        stored(&*disk, posted).await,
        (1..=posted as u64).collect::<Vec<_>>()
    );
    assert_eq!(
        post(&node.timeline, partition, 10_000..10_001).await,
        vec![posted as u64 + 1],
        "numbering goes on after the last answered post"
    );
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

/// Waits (generously) until `done` holds.
async fn until(what: &str, done: impl Fn() -> bool) {
    for _ in 0..600 {
        if done() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("never: {what}");
}

/// The store fails in the middle of a batch and stays down: the node keeps
/// running, refuses new posts with UNAVAILABLE and is not named leader
/// while committed posts wait; once the store answers they are answered,
/// stored once and delivered live once each, the one the failed attempt
/// stored included.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_store_holds_posts_back_without_stopping_the_node() {
    let dir = tempfile::tempdir().unwrap();
    let clock = Arc::new(StillClock::default());
    let disk = Arc::new(Disk::default());
    let node = start(dir.path(), Arc::clone(&disk), Arc::clone(&clock));
    let partition = lead(&node.timeline).await;
    let mut live = node.timeline.subscribe(&room());
    assert_eq!(post(&node.timeline, partition, 0..2).await, vec![1, 2]);

    // One message of the next batch is stored, then the store fails.
    *disk.failing.lock().unwrap() = Some(1);
    let waiting = node
        .timeline
        .append(partition, posts(2..5), Vec::new())
        .await
        .unwrap();
    until("the store failed", || {
        disk.failures.load(Ordering::SeqCst) > 0
    })
    .await;
    let refused = node
        .timeline
        .append(partition, posts(5..6), Vec::new())
        .await
        .unwrap();
    for reply in refused {
        let answer = tokio::time::timeout(Duration::from_secs(30), reply)
            .await
            .expect("a post sent while the store fails is answered at once");
        match answer.unwrap() {
            Err(NodeError::Unavailable(why)) => {
                assert!(why.contains("timeline store is unavailable"), "{why}");
            }
            other => panic!("a post taken while the store fails: {other:?}"),
        }
    }
    until("not named leader while posts wait", || {
        !node.timeline.leads(partition)
    })
    .await;
    assert!(!node.task.is_finished(), "the node keeps running");

    // The store answers again; the next attempt is due.
    *disk.failing.lock().unwrap() = None;
    clock
        .0
        .fetch_add(super::STORE_RETRY_MAX_MS, Ordering::SeqCst);
    let mut seqs = Vec::new();
    for reply in waiting {
        seqs.push(reply.await.unwrap().unwrap().seq);
    }
    assert_eq!(seqs, vec![3, 4, 5]);
    assert_eq!(
        disk.visible_seqs().await,
        (1..=5).collect::<Vec<_>>(),
        "each stored once"
    );
    let mut delivered = Vec::new();
    while delivered.len() < 5 {
        let applied = tokio::time::timeout(Duration::from_secs(30), live.recv())
            .await
            .expect("delivered")
            .expect("subscribed");
        delivered.push(applied.seq);
    }
    assert_eq!(delivered, vec![1, 2, 3, 4, 5]);
    until("named leader again", || node.timeline.leads(partition)).await;
    assert_eq!(post(&node.timeline, partition, 6..7).await, vec![6]);
    assert_eq!(live.recv().await.unwrap().seq, 6, "nothing delivered twice");
    node.shutdown.cancel();
    node.task.await.unwrap().unwrap();
}

/// A node of this file's maps, in `dc1`, in `state`.
fn map_node(state: saferchat_placement::NodeState) -> saferchat_placement::MapNode {
    saferchat_placement::MapNode {
        datacenter: "dc1".into(),
        peer_address: String::new(),
        client_address: String::new(),
        state,
    }
}

/// The map of this one-node cluster at `epoch`, partition `moved` (if any)
/// in epoch `epoch` on the same node.
fn one_node_map(epoch: u64, moved: Option<u32>) -> saferchat_placement::ClusterMap {
    let mut map = saferchat_placement::ClusterMap {
        epoch,
        partitions: PARTITIONS,
        replicas_per_datacenter: 1,
        ..saferchat_placement::ClusterMap::default()
    };
    map.nodes
        .insert(1, map_node(saferchat_placement::NodeState::Active));
    if let Some(p) = moved {
        map.moving
            .insert(p, saferchat_placement::Pinned { replicas: vec![1] });
        map.partition_epochs.insert(p, epoch);
    }
    map
}

/// Posts `range` once this node leads the partition again (after its
/// epoch moved), trying again (generously) until every post is answered;
/// their numbers, or what the last try got.
async fn post_once_led(
    timeline: &Timeline,
    partition: u32,
    range: std::ops::Range<u32>,
) -> Vec<u64> {
    let mut answered = Vec::new();
    for _ in 0..600 {
        lead(timeline).await;
        if let Ok(replies) = timeline
            .append(partition, posts(range.clone()), Vec::new())
            .await
        {
            answered.clear();
            for reply in replies {
                if let Ok(Ok(placed)) = reply.await {
                    answered.push(placed.seq);
                }
            }
            if answered.len() == range.len() {
                return answered;
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    answered
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partition_whose_epoch_moves_runs_its_log_in_the_new_epoch() {
    let dir = tempfile::tempdir().unwrap();
    let clock = Arc::new(StillClock::default());
    let disk = Arc::new(Disk::default());
    let (publish, maps) = tokio::sync::watch::channel(one_node_map(1, None));
    let node = start_following(
        dir.path(),
        Arc::clone(&disk),
        Arc::clone(&clock),
        Some(maps),
    );
    let partition = lead(&node.timeline).await;
    assert_eq!(post(&node.timeline, partition, 0..3).await, vec![1, 2, 3]);
    assert_eq!(
        node.timeline
            .established(partition, None)
            .await
            .unwrap()
            .map(|e| e.epoch),
        Some(1),
        "the leader committed what it recovered, in epoch 1"
    );
    assert_eq!(
        node.timeline
            .established(partition, Some(node.timeline.me()))
            .await
            .unwrap()
            .map(|e| e.epoch),
        Some(1),
        "the leader holds what it recovered"
    );
    assert_eq!(
        node.timeline
            .established(partition, Some(NodeId(9)))
            .await
            .unwrap()
            .map(|e| e.epoch),
        None,
        "a node that never reported having it"
    );
    assert_eq!(
        node.timeline
            .established(partition + 1, None)
            .await
            .unwrap()
            .map(|e| e.epoch),
        None,
        "a partition it does not lead"
    );

    // The map moves the partition (to the same node, in epoch 2): the
    // leader of epoch 1 steps down and leads again in epoch 2, and the
    // log goes on where it was.
    publish.send(one_node_map(2, Some(partition))).unwrap();
    let seqs = post_once_led(&node.timeline, partition, 3..5).await;
    assert_eq!(seqs, vec![4, 5], "the log goes on in the new epoch");
    let mut established = None;
    for _ in 0..600 {
        established = node
            .timeline
            .established(partition, None)
            .await
            .unwrap()
            .map(|e| e.epoch);
        if established == Some(2) {
            break;
        }
        node.timeline.touch(partition);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(established, Some(2), "established in the new epoch");
    node.shutdown.cancel();
    node.task.await.unwrap().unwrap();
    let (_, states) = LogStore::open(dir.path()).unwrap();
    assert_eq!(
        states[&partition].promised.epoch, 2,
        "the partition's log promised a term of epoch 2"
    );
}

/// The map of [`one_node_map`] at `epoch` with partition `moved` taken
/// off node 1 to node 2 (joining), as a rebalance's shrink would.
fn moved_off(epoch: u64, moved: u32) -> saferchat_placement::ClusterMap {
    let mut map = one_node_map(epoch, None);
    map.nodes
        .insert(2, map_node(saferchat_placement::NodeState::Joining));
    map.moving
        .insert(moved, saferchat_placement::Pinned { replicas: vec![2] });
    map.partition_epochs.insert(moved, epoch);
    map
}

/// A partition the map moves off this node stops running here: its leader
/// steps down, and a client's touch does not make it run again in the
/// epoch it left, where node 1 alone was a quorum (`Part::retired`; a
/// node kept running every partition a rebalance took off it). Moved
/// back, it leads again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partition_moved_off_this_node_stops_running_here_until_it_moves_back() {
    let dir = tempfile::tempdir().unwrap();
    let clock = Arc::new(StillClock::default());
    let disk = Arc::new(Disk::default());
    let (publish, maps) = tokio::sync::watch::channel(one_node_map(1, None));
    let node = start_following(dir.path(), disk, Arc::clone(&clock), Some(maps));
    let partition = lead(&node.timeline).await;
    assert_eq!(post(&node.timeline, partition, 0..2).await, vec![1, 2]);

    publish.send(moved_off(2, partition)).unwrap();
    until("node 1 stops leading the partition it lost", || {
        !node.timeline.leads(partition)
    })
    .await;
    for step in 1..=5 {
        // Later, a client asks: a touch runs at once where no leader is
        // known. Two answers later, the driver settled what the touch did.
        clock.0.store(step * 10_000, Ordering::SeqCst);
        node.timeline.touch(partition);
        for _ in 0..2 {
            node.timeline.established(partition, None).await.unwrap();
        }
        assert!(
            !node.timeline.leads(partition),
            "node 1 ran again for a partition it no longer replicates"
        );
    }
    let replies = node
        .timeline
        .append(partition, posts(2..3), Vec::new())
        .await
        .unwrap();
    for reply in replies {
        assert!(
            matches!(reply.await, Ok(Err(NodeError::Unavailable(_)))),
            "a partition it lost takes no posts"
        );
    }

    // The map moves the partition back: it runs, in the new epoch, and
    // the log goes on where it was.
    publish.send(one_node_map(3, Some(partition))).unwrap();
    let seqs = post_once_led(&node.timeline, partition, 2..3).await;
    assert_eq!(
        seqs,
        vec![3],
        "the log goes on in the epoch it moved back in"
    );
    node.shutdown.cancel();
    node.task.await.unwrap().unwrap();
}

/// Serves copy pages from one store, as the partition's leader would, or
/// fails while `down`.
#[derive(Debug)]
struct LeaderPages {
    store: MemoryChat,
    applied: saferchat_consensus::partition_log::Slot,
    down: std::sync::atomic::AtomicBool,
    /// Pages asked for.
    asked: AtomicU64,
}

#[async_trait]
impl super::super::copy::CopySource for LeaderPages {
    async fn rooms(
        &self,
        _node: NodeId,
        _partition: u32,
        after: Option<&RoomId>,
    ) -> Result<super::super::copy::RoomsPage, NodeError> {
        self.asked.fetch_add(1, Ordering::SeqCst);
        if self.down.load(Ordering::SeqCst) {
            return Err(NodeError::Unavailable("the leader is unreachable".into()));
        }
        let all = |_: &RoomId| true;
        super::super::copy::read_rooms(&self.store, &all, (self.applied, 3), after.cloned()).await
    }

    async fn room(
        &self,
        _node: NodeId,
        _partition: u32,
        room: &RoomId,
        after: Option<crate::message_id::MessageId>,
    ) -> Result<super::super::copy::RoomPage, NodeError> {
        self.asked.fetch_add(1, Ordering::SeqCst);
        if self.down.load(Ordering::SeqCst) {
            return Err(NodeError::Unavailable("the leader is unreachable".into()));
        }
        super::super::copy::read_room(&self.store, room, after).await
    }
}

async fn ids_of(store: &dyn ChatStore) -> Vec<crate::message_id::MessageId> {
    history(store, &room(), Range::After(None), 10_000)
        .await
        .unwrap()
        .iter()
        .map(|m| m.id)
        .collect()
}

/// `count` messages of the room numbered after `from`, ids drawn by a
/// leader whose randomness is `seed`.
fn messages(
    last: Option<crate::message_id::MessageId>,
    from: u64,
    count: u64,
    seed: u64,
) -> Vec<StoredMessage> {
    let mut ids = crate::message_id::IdGenerator::after(last);
    (from + 1..=from + count)
        .map(|n| StoredMessage {
            room: room(),
            id: ids.next(1_800_000_000_000 + i64::try_from(n).unwrap(), seed ^ n),
            seq: n,
            envelope: envelope(u32::try_from(n).unwrap() ^ u32::try_from(seed).unwrap()),
        })
        .collect()
}

/// A replica that applied five slots of its partition before the home
/// failed over (epoch 3), the last two of them posts the new home replaced:
/// held, it applies none of the new leader's commits; its check fails while
/// the leader is unreachable and survives a restart; then it cuts the two,
/// copies the leader's, rewinds its log to the leader's mark, and applies
/// the leader's next commit at the number after the leader's; restarted
/// again, it stays checked.
/// The one-node map with the room's partition failed over in epoch 3
/// (from a datacenter that has no node left): still failing over (map
/// epoch 3), or established by `leader` (map epoch 4).
fn failed_over(partition: u32, leader: Option<u64>) -> saferchat_placement::ClusterMap {
    let mut map = one_node_map(if leader.is_some() { 4 } else { 3 }, None);
    map.partition_epochs.insert(partition, 3);
    map.failover_epochs.insert(partition, [3].into());
    match leader {
        None => {
            map.failing_over.insert(partition, "dc0".into());
        }
        Some(node) => {
            map.failover_leaders.entry(partition).or_default().insert(
                3,
                saferchat_placement::FailoverLeader {
                    node,
                    vouched: std::collections::BTreeMap::new(),
                },
            );
        }
    }
    map
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failover_leader_is_checked_once_the_map_names_it_as_the_establisher() {
    let dir = tempfile::tempdir().unwrap();
    let clock = Arc::new(StillClock::default());
    let disk = Arc::new(Disk::default());
    let partition = placement().room(room().as_str()).0.0;
    let (publish, maps) = tokio::sync::watch::channel(failed_over(partition, None));
    let node = start_following(
        dir.path(),
        Arc::clone(&disk),
        Arc::clone(&clock),
        Some(maps),
    );
    // It owes the check of epoch 3, runs in it (its new home's only
    // voter) once a whole home-lease promise passed since it started
    // (grants it may have given before), and leads: a leader releases
    // all the same, but is not checked yet (a later leader of the epoch
    // could replace a slot of what it released before).
    for _ in 0..600 {
        node.timeline.touch(partition);
        if node.timeline.leads(partition) {
            break;
        }
        clock.0.fetch_add(500, Ordering::SeqCst);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(node.timeline.leads(partition), "no leader after 30 s");
    assert_eq!(post(&node.timeline, partition, 0..3).await, vec![1, 2, 3]);
    assert_eq!(
        node.timeline
            .copy_mark(partition)
            .await
            .unwrap()
            .map(|(_, checked)| checked),
        Some(0),
        "leading, not checked"
    );
    // The map records that it established the epoch.
    publish.send(failed_over(partition, Some(1))).unwrap();
    let mut mark = None;
    for _ in 0..600 {
        mark = node.timeline.copy_mark(partition).await.unwrap();
        if mark.is_some_and(|(_, checked)| checked == 3) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        mark.map(|(_, checked)| checked),
        Some(3),
        "checked once named"
    );
    node.shutdown.cancel();
    node.task.await.unwrap().unwrap();
    let (_, states) = LogStore::open(dir.path()).unwrap();
    assert_eq!(states[&partition].checked, 3, "and the log file says so");
}

/// Nodes 1 (this one) and 2, both in `dc1`, each replicating every
/// partition.
fn two_node_placement() -> Arc<Placement> {
    let nodes = [1, 2].map(|id| ClusterNode {
        id: NodeId(id),
        datacenter: "dc1".into(),
    });
    Arc::new(Placement::build(&nodes, PartitionCount::new(PARTITIONS).unwrap(), 2).unwrap())
}

/// A timeline of three posts a new home shares and two of the old
/// home's that it replaced, and the three shared.
async fn three_shared_and_two_own() -> (Arc<Disk>, Vec<StoredMessage>) {
    let disk = Arc::new(Disk::default());
    let shared = messages(None, 0, 3, 1);
    disk.append(&shared).await.unwrap();
    disk.append(&messages(Some(shared[2].id), 3, 2, 2))
        .await
        .unwrap();
    (disk, shared)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_with_a_divergent_tail_is_held_then_cuts_it_and_follows_the_new_home() {
    use saferchat_consensus::partition_log::{Entry, LogMessage, Slot, Term, Value};

    let dir = tempfile::tempdir().unwrap();
    let placement = two_node_placement();
    let partition = placement.room(room().as_str()).0.0;
    let mut map = one_node_map(3, None);
    map.partition_epochs.insert(partition, 3);
    map.failover_epochs.insert(partition, [3].into());
    let old = Term {
        epoch: 1,
        round: 1,
        node: NodeId(1),
    };
    let new = Term {
        epoch: 3,
        round: 1,
        node: NodeId(2),
    };
    // This node's timeline: three shared posts and two of its own; its
    // log applied slots 1-5 in epoch 1 and still holds slot 5.
    let (disk, shared) = three_shared_and_two_own().await;
    {
        let (store, _) = LogStore::open(dir.path()).unwrap();
        store
            .write(&[crate::storage::log_store::LogChange {
                partition,
                promised: Some(old),
                entries: vec![(
                    Slot(5),
                    Entry {
                        term: old,
                        value: Value::Post(posts(5..6).remove(0)),
                    },
                )],
                floor: Some(Slot(4)),
                applied: Some(Slot(5)),
                ..Default::default()
            }])
            .unwrap();
    }
    // The new home's timeline: the three shared, then two of its own.
    let leader = Arc::new(LeaderPages {
        store: MemoryChat::default(),
        applied: Slot(5),
        down: std::sync::atomic::AtomicBool::new(true),
        asked: AtomicU64::new(0),
    });
    leader.store.append(&shared).await.unwrap();
    let theirs = messages(Some(shared[2].id), 3, 2, 3);
    leader.store.append(&theirs).await.unwrap();

    let clock = Arc::new(StillClock::default());
    let start = |disk: &Arc<Disk>| {
        let (store, states) = LogStore::open(dir.path()).unwrap();
        spawn_with(
            store,
            states,
            Arc::clone(disk),
            Arc::clone(&clock),
            |parts| {
                parts.placement = Arc::clone(&placement);
                parts.map = Arc::new(map.clone());
                parts.copier = Some(Arc::clone(&leader) as Arc<dyn super::super::copy::CopySource>);
            },
        )
    };
    // The new leader writes slots 4-6 in epoch 3 (posts 40, 41 and 42)
    // and says they are committed.
    let accept = |first: u64, range: std::ops::Range<u32>, commit: u64| super::LogInbound {
        from: NodeId(2),
        messages: vec![(
            partition,
            LogMessage::Accept {
                term: new,
                first: Slot(first),
                values: posts(range).into_iter().map(Value::Post).collect(),
                commit: Slot(commit),
                shared: Slot(0),
            },
        )],
    };
    let ours: Vec<u64> = stored_seqs(&*disk).await;
    assert_eq!(ours, [1, 2, 3, 4, 5]);
    let original = ids_of(&*disk).await;

    let (node, inbound) = start(&disk);
    inbound.send(accept(4, 40..43, 6)).await.unwrap();
    // The check fails (the leader is unreachable); nothing is applied
    // meanwhile, while the leader's commits go on arriving. (Time moves
    // less than an election timeout between two of the leader's
    // messages: this node never runs.)
    until("a check asked the leader", || {
        leader.asked.load(Ordering::SeqCst) >= 1
    })
    .await;
    for _ in 0..10 {
        inbound.send(accept(4, 40..43, 6)).await.unwrap();
        clock.0.fetch_add(300, Ordering::SeqCst);
        tokio::time::sleep(Duration::from_millis(60)).await;
    }
    assert_eq!(ids_of(&*disk).await, original, "nothing cut");
    assert_eq!(stored_seqs(&*disk).await, [1, 2, 3, 4, 5], "held");
    assert_eq!(
        node.timeline.copy_mark(partition).await.unwrap(),
        Some((Slot(5), 0)),
        "applied up to 5, not checked"
    );
    assert!(!node.timeline.reads_locally(partition).await.unwrap());
    node.shutdown.cancel();
    node.task.await.unwrap().unwrap();
    let (_, states) = LogStore::open(dir.path()).unwrap();
    assert_eq!(states[&partition].checked, 0, "not checked yet");

    // Restarted, still held; the leader is reachable now.
    leader.down.store(false, Ordering::SeqCst);
    let (node, inbound) = start(&disk);
    inbound.send(accept(4, 40..43, 6)).await.unwrap();
    for _ in 0..600 {
        if ids_of(&*disk).await[3..] == theirs.iter().map(|m| m.id).collect::<Vec<_>>()[..] {
            break;
        }
        inbound.send(accept(4, 40..43, 6)).await.unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let copied = history(&*disk, &room(), Range::After(None), 100)
        .await
        .unwrap();
    let expected: Vec<StoredMessage> = shared.iter().chain(&theirs).cloned().collect();
    assert_eq!(
        copied, expected,
        "cut back to the three shared, then the leader's"
    );
    // The leader's next commit (slot 6, post 42, which it resends as its
    // follower now reports slot 5) is applied after the leader's fifth.
    let mut seqs = Vec::new();
    for _ in 0..600 {
        inbound.send(accept(6, 42..43, 6)).await.unwrap();
        clock.0.fetch_add(300, Ordering::SeqCst);
        tokio::time::sleep(Duration::from_millis(50)).await;
        seqs = stored_seqs(&*disk).await;
        if seqs.len() == 6 {
            break;
        }
    }
    assert_eq!(seqs, [1, 2, 3, 4, 5, 6]);
    node.shutdown.cancel();
    node.task.await.unwrap().unwrap();
    let (_, states) = LogStore::open(dir.path()).unwrap();
    let state = &states[&partition];
    assert_eq!(state.checked, 3);
    assert_eq!(state.applied, Slot(6));
    assert!(
        state.entries.values().all(|e| e.term.epoch >= 3),
        "no entry of the old epoch is left"
    );

    // Restarted again: checked, it applies the next commit at once.
    let (node, inbound) = start(&disk);
    for _ in 0..600 {
        inbound.send(accept(7, 43..44, 7)).await.unwrap();
        clock.0.fetch_add(300, Ordering::SeqCst);
        tokio::time::sleep(Duration::from_millis(50)).await;
        if stored_seqs(&*disk).await.len() == 7 {
            break;
        }
    }
    assert_eq!(stored_seqs(&*disk).await, [1, 2, 3, 4, 5, 6, 7]);
    node.shutdown.cancel();
    node.task.await.unwrap().unwrap();
}

/// Partition-log messages the node sends, by destination, for a test to
/// wait on.
#[derive(Default)]
struct SentLog(Mutex<Vec<NodeId>>);

impl crate::membership::PeerSender for SentLog {
    fn send(&self, _to: NodeId, _message: saferchat_proto::peer::RoomMessage) {}

    fn send_log(&self, to: NodeId, _message: saferchat_proto::peer::PartitionMessage) {
        self.0.lock().unwrap().push(to);
    }

    fn send_handover(
        &self,
        _to: NodeId,
        _message: saferchat_proto::peer::HandoverMessage,
    ) -> Result<(), crate::membership::TooLarge> {
        Ok(())
    }
}

/// Home moves in a row: this node still owes the check of failover
/// epoch 3 when the partition fails over again in epoch 5, whose leader
/// is node 2. It checks epoch 3 against node 2, the leader of the newest
/// term it knows, and is then held for epoch 5 with node 2's timeline:
/// that counts as a copy from the leader of slots 1 onwards
/// (`LogReplica::checked_against`), which the log file keeps.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_check_against_the_leader_while_a_later_failover_is_owed_counts_as_a_copy_from_it() {
    use saferchat_consensus::partition_log::{LogMessage, Slot, Term};

    let dir = tempfile::tempdir().unwrap();
    let placement = two_node_placement();
    let partition = placement.room(room().as_str()).0.0;
    let mut map = one_node_map(6, None);
    map.partition_epochs.insert(partition, 5);
    map.failover_epochs.insert(partition, [3, 5].into());
    map.failing_over.insert(partition, "dc0".into());
    let leader = Arc::new(LeaderPages {
        store: MemoryChat::default(),
        applied: Slot(3),
        down: std::sync::atomic::AtomicBool::new(true),
        asked: AtomicU64::new(0),
    });
    leader.store.append(&messages(None, 0, 3, 1)).await.unwrap();
    let sent = Arc::new(SentLog::default());
    let clock = Arc::new(StillClock::default());
    let (store, states) = LogStore::open(dir.path()).unwrap();
    let (node, inbound) = spawn_with(
        store,
        states,
        Arc::new(Disk::default()),
        Arc::clone(&clock),
        |parts| {
            parts.placement = Arc::clone(&placement);
            parts.map = Arc::new(map.clone());
            parts.copier = Some(Arc::clone(&leader) as Arc<dyn super::super::copy::CopySource>);
            parts.peers = Arc::clone(&sent) as Arc<dyn crate::membership::PeerSender>;
        },
    );
    let term = Term {
        epoch: 5,
        round: 1,
        node: NodeId(2),
    };
    inbound
        .send(super::LogInbound {
            from: NodeId(2),
            messages: vec![(
                partition,
                LogMessage::Accept {
                    term,
                    first: Slot(1),
                    values: Vec::new(),
                    commit: Slot(0),
                    shared: Slot(0),
                },
            )],
        })
        .await
        .unwrap();
    // It answered node 2: it knows the term. A check that began before
    // may still be asking (and fails: node 2 is unreachable so far).
    until("an answer to node 2", || {
        sent.0.lock().unwrap().contains(&NodeId(2))
    })
    .await;
    let asked = leader.asked.load(Ordering::SeqCst);
    for _ in 0..600 {
        if leader.asked.load(Ordering::SeqCst) > asked {
            break;
        }
        // Past the wait after a failed check.
        clock.0.fetch_add(1_000, Ordering::SeqCst);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        leader.asked.load(Ordering::SeqCst) > asked,
        "no check asked node 2 since"
    );
    leader.down.store(false, Ordering::SeqCst);
    let mut checked = None;
    for _ in 0..600 {
        clock.0.fetch_add(1_000, Ordering::SeqCst);
        node.timeline.touch(partition);
        checked = node.timeline.copy_mark(partition).await.unwrap();
        if checked.is_some_and(|(_, c)| c == 3) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(checked, Some((Slot(3), 3)), "checked epoch 3");
    node.shutdown.cancel();
    node.task.await.unwrap().unwrap();
    let (_, states) = LogStore::open(dir.path()).unwrap();
    let state = &states[&partition];
    assert_eq!(state.checked, 3);
    assert_eq!(state.installed_held, None);
    assert_eq!(
        state.held_copies,
        saferchat_consensus::partition_log::HeldCopies {
            from_leader: Some((term, Slot(1), Slot(3))),
            from: Some((NodeId(2), Slot(1), Slot(3))),
        }
    );
}

/// A replica held for the check of failover epoch 5 (not established
/// yet) that applied five slots, the last two posts the new home
/// replaced. The leader of epoch 5 (node 2) says its log shares three
/// slots with it and that it compacted up to slot 4: the replica reports
/// 3, the leader can resend nothing at or below 4, and the replica is not
/// behind 4. It makes its timeline the leader's (cut its two, copy the
/// leader's three) and the log file keeps the mark, the floor and that
/// slots 1 to 6 are the leader's (`LogReplica::realigned`); it is still
/// held (checked nothing) and applied nothing else.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_held_replica_reporting_less_than_its_leaders_floor_makes_its_timeline_the_leaders() {
    use saferchat_consensus::partition_log::{HeldCopies, LogMessage, Slot, Term};

    let dir = tempfile::tempdir().unwrap();
    let placement = two_node_placement();
    let partition = placement.room(room().as_str()).0.0;
    let mut map = one_node_map(5, None);
    map.partition_epochs.insert(partition, 5);
    map.failover_epochs.insert(partition, [5].into());
    map.failing_over.insert(partition, "dc0".into());
    let (disk, shared) = three_shared_and_two_own().await;
    {
        let (store, _) = LogStore::open(dir.path()).unwrap();
        store
            .write(&[crate::storage::log_store::LogChange {
                partition,
                applied: Some(Slot(5)),
                ..Default::default()
            }])
            .unwrap();
    }
    let leader = Arc::new(LeaderPages {
        store: MemoryChat::default(),
        applied: Slot(6),
        down: std::sync::atomic::AtomicBool::new(false),
        asked: AtomicU64::new(0),
    });
    leader.store.append(&shared).await.unwrap();
    leader
        .store
        .append(&messages(Some(shared[2].id), 3, 3, 3))
        .await
        .unwrap();
    let clock = Arc::new(StillClock::default());
    let (store, states) = LogStore::open(dir.path()).unwrap();
    let (node, inbound) = spawn_with(
        store,
        states,
        Arc::clone(&disk),
        Arc::clone(&clock),
        |parts| {
            parts.placement = Arc::clone(&placement);
            parts.map = Arc::new(map.clone());
            parts.copier = Some(Arc::clone(&leader) as Arc<dyn super::super::copy::CopySource>);
        },
    );
    let term = Term {
        epoch: 5,
        round: 1,
        node: NodeId(2),
    };
    let from_leader = |m: LogMessage<super::super::LogPost>| super::LogInbound {
        from: NodeId(2),
        messages: vec![(partition, m)],
    };
    let accept = LogMessage::Accept {
        term,
        first: Slot(6),
        values: Vec::new(),
        commit: Slot(0),
        shared: Slot(3),
    };
    let compacted = LogMessage::Compacted {
        term,
        floor: Slot(4),
    };
    let theirs = ids_of(&leader.store).await;
    for _ in 0..600 {
        if ids_of(&*disk).await == theirs {
            break;
        }
        inbound.send(from_leader(accept.clone())).await.unwrap();
        inbound.send(from_leader(compacted.clone())).await.unwrap();
        // Past the wait after a copy that could not start or failed.
        clock.0.fetch_add(1_000, Ordering::SeqCst);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(ids_of(&*disk).await, theirs, "the leader's timeline");
    node.shutdown.cancel();
    node.task.await.unwrap().unwrap();
    let (_, states) = LogStore::open(dir.path()).unwrap();
    let state = &states[&partition];
    assert_eq!((state.applied, state.floor), (Slot(6), Slot(6)));
    assert_eq!(state.checked, 0, "still owes the check");
    assert_eq!(
        state.installed_held,
        Some(Slot(4)),
        "past what the leader shares"
    );
    assert_eq!(
        state.held_copies,
        HeldCopies {
            from_leader: Some((term, Slot(1), Slot(6))),
            from: Some((NodeId(2), Slot(1), Slot(6))),
        }
    );
}

#[test]
fn a_held_replica_copies_from_its_homes_voters_first_and_others_from_the_leader_first() {
    let n = |ids: &[u64]| ids.iter().copied().map(NodeId).collect::<Vec<_>>();
    // Replicas in datacenter order: dc1 = 1, 2; dc2 = 3, 4; dc3 = 5, 6.
    let replicas = n(&[1, 2, 3, 4, 5, 6]);
    // Not held: the leader first, then everyone in placement order.
    assert_eq!(
        super::copy_order(NodeId(3), Some(NodeId(5)), None, replicas.clone()),
        n(&[5, 1, 2, 4, 6])
    );
    // Held in a new home of 3 and 4: the other voter before dc1's nodes,
    // the leader first among the voters...
    let home = n(&[3, 4]);
    assert_eq!(
        super::copy_order(NodeId(3), None, Some(&home), replicas.clone()),
        n(&[4, 1, 2, 5, 6])
    );
    assert_eq!(
        super::copy_order(NodeId(6), Some(NodeId(4)), Some(&home), replicas.clone()),
        n(&[4, 3, 1, 2, 5])
    );
    // ...and a leader outside them (of an older term) last.
    assert_eq!(
        super::copy_order(NodeId(3), Some(NodeId(1)), Some(&home), replicas),
        n(&[4, 2, 5, 6, 1])
    );
}
