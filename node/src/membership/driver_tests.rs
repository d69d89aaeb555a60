//! Drivers of several nodes in one process, wired through the peer wire
//! format, moving a partition's rooms to a grown acceptor set: the
//! handover (`saferchat_consensus::handover`) as the node runs it, with
//! its durable state in the stores a restarted driver reads back.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use saferchat_consensus::{
    Change, Handle, LeaseConfig, NodeId, ProposerConfig, ReplicaConfig, RoomId,
};
use saferchat_placement::{
    ClusterMap, ClusterNode, MapNode, NodeState, PartitionCount, PartitionId, Pinned, Placement,
};
use saferchat_proto::peer as ppb;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::{DriverParts, spawn};
use crate::clock::SystemClock;
use crate::convert;
use crate::error::NodeError;
use crate::known_rooms::KnownRooms;
use crate::membership::{HandoverStep, Inbound, Membership, PeerSender};
use crate::storage::memory::{MemoryAcceptors, MemoryChat};
use crate::storage::{AcceptorStore, ChatStore, CommittedRoom};

/// Delivers what one node sends to the others' drivers, through the
/// protobuf conversions a real peer link uses.
#[derive(Clone, Debug)]
struct Router {
    me: NodeId,
    routes: Arc<Mutex<HashMap<NodeId, mpsc::Sender<Inbound>>>>,
}

impl Router {
    fn deliver(&self, to: NodeId, inbound: Inbound) {
        if let Some(route) = self.routes.lock().unwrap().get(&to) {
            let _ = route.try_send(inbound);
        }
    }
}

impl PeerSender for Router {
    fn send(&self, to: NodeId, message: ppb::RoomMessage) {
        let room = RoomId::new(&message.room).expect("a valid room on the wire");
        let message = convert::message_from_pb(&message).expect("a valid message");
        self.deliver(
            to,
            Inbound {
                from: self.me,
                messages: vec![(room, message)],
                handover: Vec::new(),
            },
        );
    }

    fn send_log(&self, _to: NodeId, _message: ppb::PartitionMessage) {}

    fn send_handover(
        &self,
        to: NodeId,
        message: ppb::HandoverMessage,
    ) -> Result<(), crate::membership::TooLarge> {
        let decoded = convert::handover::message_from_pb(&message).expect("a valid message");
        self.deliver(
            to,
            Inbound {
                from: self.me,
                messages: Vec::new(),
                handover: vec![decoded],
            },
        );
        Ok(())
    }
}

/// A node's durable stores, kept across its driver's restarts.
#[derive(Clone, Default)]
struct Disk {
    acceptors: Arc<MemoryAcceptors>,
    chat: Arc<MemoryChat>,
}

struct Running {
    membership: Membership,
    task: JoinHandle<Result<(), NodeError>>,
    stop: CancellationToken,
}

impl Running {
    async fn stop(self) {
        self.stop.cancel();
        self.task.await.expect("no panic").expect("no fatal error");
    }
}

fn cluster_node(id: u64) -> ClusterNode {
    ClusterNode {
        id: NodeId(id),
        datacenter: "dc1".into(),
    }
}

/// Short leases, so that the handover's wait is short too.
fn all(me: u64, nodes: u64) -> ReplicaConfig {
    let ids: Vec<NodeId> = (1..=nodes).map(NodeId).collect();
    ReplicaConfig {
        me: NodeId(me),
        replicas: ids.clone(),
        epoch: saferchat_placement::CREATED_EPOCH,
        holders: ids,
        lease: LeaseConfig {
            lease_ms: 300,
            renew_every_ms: 100,
            ..LeaseConfig::default()
        },
        proposer: ProposerConfig {
            request_timeout_ms: 2_000,
            ..ProposerConfig::default()
        },
    }
}

fn start(
    me: u64,
    nodes: u64,
    placement: &Arc<Placement>,
    map: &Arc<ClusterMap>,
    disk: &Disk,
    routes: &Arc<Mutex<HashMap<NodeId, mpsc::Sender<Inbound>>>>,
    maps: Option<&watch::Receiver<ClusterMap>>,
) -> Running {
    start_with(
        me,
        nodes,
        placement,
        map,
        disk,
        disk.chat.clone(),
        routes,
        maps,
    )
}

/// [`start`] with another store of committed memberships.
#[allow(clippy::too_many_arguments)]
fn start_with(
    me: u64,
    nodes: u64,
    placement: &Arc<Placement>,
    map: &Arc<ClusterMap>,
    disk: &Disk,
    chat: Arc<dyn ChatStore>,
    routes: &Arc<Mutex<HashMap<NodeId, mpsc::Sender<Inbound>>>>,
    maps: Option<&watch::Receiver<ClusterMap>>,
) -> Running {
    let (tx, inbound) = mpsc::channel(1024);
    routes.lock().unwrap().insert(NodeId(me), tx);
    let stop = CancellationToken::new();
    let (membership, task) = spawn(DriverParts {
        config: Arc::new(all(me, nodes)),
        placement: Arc::clone(placement),
        map: Arc::clone(map),
        maps: maps.cloned(),
        acceptors: disk.acceptors.clone(),
        chat,
        peers: Arc::new(Router {
            me: NodeId(me),
            routes: Arc::clone(routes),
        }),
        inbound,
        clock: SystemClock::new(),
        known: Arc::new(KnownRooms::new()),
        chat_repair_after: Duration::from_secs(2),
        shutdown: stop.clone(),
    });
    Running {
        membership,
        task,
        stop,
    }
}

fn handle(name: &str) -> Handle {
    Handle::of_modulus(name.as_bytes())
}

/// A change, retried while it is unavailable (leases and elections settle
/// on a loaded machine), for up to a minute.
async fn change(m: &Membership, room: &RoomId, what: Change) -> Result<(), NodeError> {
    let deadline = Instant::now() + Duration::from_secs(60);
    let id = saferchat_consensus::ChangeId(rand::random());
    loop {
        match m.change_with_id(room, what.clone(), None, id).await {
            Err(NodeError::Unavailable(_)) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            other => return other.map(|_| ()),
        }
    }
}

/// Runs a step of partition 0 with `mover` as its mover until it is
/// established (at most a minute).
async fn hand_over(mover: &Membership, epoch: u64, old: &[u64], new: &[u64]) {
    let step = HandoverStep {
        partition: 0,
        epoch,
        old: old.iter().copied().map(NodeId).collect(),
        new: new.iter().copied().map(NodeId).collect(),
    };
    tokio::time::timeout(Duration::from_secs(60), mover.hand_over(step))
        .await
        .expect("the step finished in a minute")
        .expect("established");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partitions_rooms_move_to_a_grown_set_with_their_members() {
    let routes = Arc::new(Mutex::new(HashMap::new()));
    let disks: Vec<Disk> = (0..4).map(|_| Disk::default()).collect();
    let one = PartitionCount::new(1).unwrap();
    let three: Arc<Placement> =
        Arc::new(Placement::build(&(1..=3).map(cluster_node).collect::<Vec<_>>(), one, 3).unwrap());
    let epoch_1 = Arc::new(ClusterMap::default());
    let room = RoomId::new("team").unwrap();

    // Epoch 1: {1, 2, 3} keep the room.
    let mut nodes: Vec<Running> = (1..=3)
        .map(|n| {
            start(
                n,
                3,
                &three,
                &epoch_1,
                &disks[n as usize - 1],
                &routes,
                None,
            )
        })
        .collect();
    change(&nodes[0].membership, &room, Change::Create)
        .await
        .unwrap();
    for name in ["alice", "bob"] {
        change(&nodes[0].membership, &room, Change::Add(handle(name)))
            .await
            .unwrap();
    }
    // Every replica learns the commit (the next change's accept carries
    // it), so that node 3's stale view below is the room as it stood.
    nodes[2].membership.read(&room).await.unwrap();

    // The map grows the partition to {1, 2, 3, 4} in epoch 2. Nodes 1 and
    // 2 restart on the new map and node 4 joins; node 3 keeps the old map
    // (its copy lags), so its seal is not counted: 1 and 2 are the old
    // set's majority.
    for n in nodes.drain(..2) {
        n.stop().await;
    }
    let node_3 = nodes.pop().unwrap();
    let mut grown =
        Placement::build(&(1..=3).map(cluster_node).collect::<Vec<_>>(), one, 3).unwrap();
    grown.pin(
        PartitionId(0),
        &(1..=4).map(cluster_node).collect::<Vec<_>>(),
    );
    let grown = Arc::new(grown);
    let mut map = ClusterMap::default();
    map.partition_epochs.insert(0, 2);
    let epoch_2 = Arc::new(map);
    let new: Vec<Running> = (1..=4)
        .filter(|n| *n != 3)
        .map(|n| {
            start(
                n,
                4,
                &grown,
                &epoch_2,
                &disks[n as usize - 1],
                &routes,
                None,
            )
        })
        .collect();

    // Not installed yet: node 4 holds nothing and answers nothing of
    // epoch 2, nor does anyone else, so the room cannot be read there.
    let early = new[2].membership.read(&room).await;
    assert!(
        matches!(early, Err(NodeError::Unavailable(_))),
        "read before the transfer: {early:?}"
    );

    hand_over(&new[0].membership, 2, &[1, 2, 3], &[1, 2, 3, 4]).await;
    let record = disks[0]
        .acceptors
        .load_transfer(0)
        .await
        .unwrap()
        .expect("the mover recorded what it transferred");
    assert_eq!(record.rooms.len(), 1);
    assert_eq!(record.rooms[0].1.members.len(), 2);

    // Node 4 serves the room with its members, and changes commit in
    // epoch 2.
    let state = read(&new[2].membership, &room).await;
    assert!(state.members.contains_key(&handle("alice")));
    assert!(state.members.contains_key(&handle("bob")));
    change(&new[2].membership, &room, Change::Add(handle("carol")))
        .await
        .unwrap();
    let through_2 = new[1].membership.read(&room).await.unwrap();
    assert_eq!(through_2.members.len(), 3);
    assert!(
        through_2.revision > state.revision,
        "committed after the transfer"
    );
    let seal = disks[3].acceptors.load_partition_seal(0).await.unwrap();
    assert_eq!(seal.installed.epoch, 2, "node 4 is installed in epoch 2");

    // Node 3, still on epoch 1, can change nothing: epoch 1 is sealed.
    let stale = node_3
        .membership
        .change(&room, Change::Add(handle("mallory")), None)
        .await;
    assert!(
        matches!(stale, Err(NodeError::Unavailable(_))),
        "a change in the sealed epoch: {stale:?}"
    );
    let after = new[0].membership.read(&room).await.unwrap();
    assert!(!after.members.contains_key(&handle("mallory")));

    node_3.stop().await;
    for n in new {
        n.stop().await;
    }
}

/// The map of a cluster of nodes 1-3 (active) and 4 (joined), one
/// partition of three replicas, at map epoch `epoch`, the partition pinned
/// to `pinned` since epoch `partition_epoch`.
fn map_at(epoch: u64, pinned: Option<&[u64]>, partition_epoch: u64) -> ClusterMap {
    let node = |state| MapNode {
        datacenter: "dc1".into(),
        peer_address: String::new(),
        client_address: String::new(),
        state,
    };
    let mut map = ClusterMap {
        epoch,
        partitions: 1,
        replicas_per_datacenter: 3,
        ..ClusterMap::default()
    };
    for id in 1..=3 {
        map.nodes.insert(id, node(NodeState::Active));
    }
    map.nodes.insert(4, node(NodeState::Joining));
    if let Some(replicas) = pinned {
        map.moving.insert(
            0,
            Pinned {
                replicas: replicas.to_vec(),
            },
        );
        map.partition_epochs.insert(0, partition_epoch);
    }
    map
}

/// A consensus read, retried while unavailable, for up to a minute.
async fn read(m: &Membership, room: &RoomId) -> Arc<saferchat_consensus::RoomState> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        match m.read(room).await {
            Ok(state) => return state,
            Err(NodeError::Unavailable(_)) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => panic!("reading {room:?}: {e}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn running_nodes_follow_the_map_through_a_grow_and_a_shrink() {
    let routes = Arc::new(Mutex::new(HashMap::new()));
    let disks: Vec<Disk> = (0..4).map(|_| Disk::default()).collect();
    let first = map_at(2, None, 1);
    let placement = Arc::new(first.placement().unwrap());
    let (publish, maps) = watch::channel(first.clone());
    let first = Arc::new(first);
    let nodes: Vec<Running> = (1..=4)
        .map(|n| {
            start(
                n,
                4,
                &placement,
                &first,
                &disks[n as usize - 1],
                &routes,
                Some(&maps),
            )
        })
        .collect();
    let room = RoomId::new("team").unwrap();
    change(&nodes[0].membership, &room, Change::Create)
        .await
        .unwrap();
    change(&nodes[1].membership, &room, Change::Add(handle("alice")))
        .await
        .unwrap();
    // Node 4 holds no slot: it does not replicate the room.
    let outside = nodes[3].membership.read(&room).await;
    assert!(
        matches!(&outside, Err(NodeError::Unavailable(m)) if m.contains("does not replicate")),
        "{outside:?}"
    );

    // Grow: {1,2,3} -> {1,2,3,4} at epoch 3; node 1 moves it.
    publish.send(map_at(3, Some(&[1, 2, 3, 4]), 3)).unwrap();
    hand_over(&nodes[0].membership, 3, &[1, 2, 3], &[1, 2, 3, 4]).await;
    let state = read(&nodes[3].membership, &room).await;
    assert!(
        state.members.contains_key(&handle("alice")),
        "node 4 has the room"
    );
    change(&nodes[3].membership, &room, Change::Add(handle("bob")))
        .await
        .unwrap();

    // Shrink: {1,2,3,4} -> {1,2,4} at epoch 4; node 2 moves it this time.
    publish.send(map_at(4, Some(&[1, 2, 4]), 4)).unwrap();
    let shrink = HandoverStep {
        partition: 0,
        epoch: 4,
        old: (1..=4).map(NodeId).collect(),
        new: vec![NodeId(1), NodeId(2), NodeId(4)],
    };
    tokio::time::timeout(
        Duration::from_secs(60),
        nodes[1].membership.hand_over(shrink),
    )
    .await
    .expect("the shrink finished in a minute")
    .expect("established");
    change(&nodes[0].membership, &room, Change::Add(handle("carol")))
        .await
        .unwrap();
    for n in [0, 1, 3] {
        let state = read(&nodes[n].membership, &room).await;
        for name in ["alice", "bob", "carol"] {
            assert!(
                state.members.contains_key(&handle(name)),
                "node {} lost {name}",
                n + 1
            );
        }
    }
    // Node 3 left the set: it replicates the room no more.
    let left = nodes[2].membership.read(&room).await;
    assert!(
        matches!(&left, Err(NodeError::Unavailable(m)) if m.contains("does not replicate")),
        "{left:?}"
    );
    for n in nodes {
        n.stop().await;
    }
}

/// A step the map moved past ends on its mover: it would otherwise resend
/// its seal (or, once established, its transfer to the nodes that never
/// answered) for as long as the process lives, to nodes that drop a
/// message of an epoch they do not run. Node 1 moves a grow nobody
/// answers; the map moves the partition on; the step fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_step_the_map_moved_past_stops_on_its_mover() {
    let routes = Arc::new(Mutex::new(HashMap::new()));
    let disk = Disk::default();
    let first = map_at(2, None, 1);
    let placement = Arc::new(first.placement().unwrap());
    let (publish, maps) = watch::channel(first.clone());
    let node = start(
        1,
        4,
        &placement,
        &Arc::new(first),
        &disk,
        &routes,
        Some(&maps),
    );
    // Node 2 is this test: it sees what node 1 sends it, and answers
    // nothing; nodes 3 and 4 are down.
    let (tx, mut to_two) = mpsc::channel(1024);
    routes.lock().unwrap().insert(NodeId(2), tx);

    publish.send(map_at(3, Some(&[1, 2, 3, 4]), 3)).unwrap();
    let step = HandoverStep {
        partition: 0,
        epoch: 3,
        old: vec![NodeId(1), NodeId(2), NodeId(3)],
        new: (1..=4).map(NodeId).collect(),
    };
    let membership = node.membership.clone();
    let moving = tokio::spawn(async move { membership.hand_over(step).await });
    // The step runs: its seal reached node 2.
    loop {
        let inbound = tokio::time::timeout(Duration::from_secs(60), to_two.recv())
            .await
            .expect("a seal within a minute")
            .expect("open");
        if inbound.handover.iter().any(|(_, m)| {
            matches!(m, saferchat_consensus::handover::HandoverMessage::Seal { ballot } if ballot.epoch == 3)
        }) {
            break;
        }
    }
    publish.send(map_at(4, Some(&[1, 2, 3]), 4)).unwrap();
    let ended = tokio::time::timeout(Duration::from_secs(60), moving)
        .await
        .expect("the step ended within a minute")
        .expect("no panic");
    assert!(
        matches!(&ended, Err(NodeError::Unavailable(m)) if m.contains("moved on")),
        "{ended:?}"
    );
    node.stop().await;
}

/// One node's view of a store every node shares (as Cassandra is): saves
/// are logged by node, and a node's saves can be dropped, as if it stopped
/// between learning a commit and recording it.
#[derive(Debug)]
struct SharedChat {
    node: u64,
    inner: Arc<MemoryChat>,
    /// `(node, revision)` of every save that reached the store.
    saves: Arc<Mutex<Vec<(u64, u64)>>>,
    /// Nodes whose saves are dropped.
    muted: Arc<Mutex<Vec<u64>>>,
}

#[async_trait::async_trait]
impl ChatStore for SharedChat {
    async fn load_room(&self, room: &RoomId) -> Result<Option<CommittedRoom>, NodeError> {
        self.inner.load_room(room).await
    }
    async fn save_room(&self, room: &RoomId, committed: &CommittedRoom) -> Result<bool, NodeError> {
        if self.muted.lock().unwrap().contains(&self.node) {
            return Ok(false);
        }
        self.saves
            .lock()
            .unwrap()
            .push((self.node, committed.state.revision.0));
        self.inner.save_room(room, committed).await
    }
    async fn list_rooms(
        &self,
        after: Option<&RoomId>,
        limit: usize,
    ) -> Result<Vec<crate::storage::RoomSummary>, NodeError> {
        self.inner.list_rooms(after, limit).await
    }
    async fn append(&self, batch: &[crate::storage::StoredMessage]) -> Result<(), NodeError> {
        self.inner.append(batch).await
    }
    async fn buckets(&self, room: &RoomId) -> Result<Vec<crate::message_id::Bucket>, NodeError> {
        self.inner.buckets(room).await
    }
    async fn rooms_with_messages(
        &self,
        after: Option<&RoomId>,
        limit: usize,
    ) -> Result<Vec<RoomId>, NodeError> {
        self.inner.rooms_with_messages(after, limit).await
    }
    async fn truncate_room(
        &self,
        room: &RoomId,
        after: Option<crate::message_id::MessageId>,
    ) -> Result<u64, NodeError> {
        self.inner.truncate_room(room, after).await
    }
    fn shared(&self) -> bool {
        true
    }
    async fn read_bucket(
        &self,
        room: &RoomId,
        bucket: crate::message_id::Bucket,
        range: crate::storage::Range,
        limit: usize,
    ) -> Result<Vec<crate::storage::StoredMessage>, NodeError> {
        self.inner.read_bucket(room, bucket, range, limit).await
    }
}

/// The revision of `room` in `store`, waiting (up to a minute) until it
/// reaches `revision`.
async fn recorded(store: &MemoryChat, room: &RoomId, revision: u64) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let saved = store
            .load_room(room)
            .await
            .unwrap()
            .map_or(0, |c| c.state.revision.0);
        if saved >= revision || Instant::now() > deadline {
            return saved;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_a_shared_store_the_proposer_records_each_commit_and_the_others_repair_a_missed_one() {
    let routes = Arc::new(Mutex::new(HashMap::new()));
    let disks: Vec<Disk> = (0..3).map(|_| Disk::default()).collect();
    let one = PartitionCount::new(1).unwrap();
    let placement: Arc<Placement> =
        Arc::new(Placement::build(&(1..=3).map(cluster_node).collect::<Vec<_>>(), one, 3).unwrap());
    let map = Arc::new(ClusterMap::default());
    let store = Arc::new(MemoryChat::default());
    let saves = Arc::new(Mutex::new(Vec::new()));
    let muted = Arc::new(Mutex::new(Vec::new()));
    let nodes: Vec<Running> = (1..=3)
        .map(|n| {
            let chat = Arc::new(SharedChat {
                node: n,
                inner: Arc::clone(&store),
                saves: Arc::clone(&saves),
                muted: Arc::clone(&muted),
            });
            start_with(
                n,
                3,
                &placement,
                &map,
                &disks[n as usize - 1],
                chat,
                &routes,
                None,
            )
        })
        .collect();
    let room = RoomId::new("team").unwrap();

    // Node 1 proposes three changes and records each.
    change(&nodes[0].membership, &room, Change::Create)
        .await
        .unwrap();
    for name in ["alice", "bob"] {
        change(&nodes[0].membership, &room, Change::Add(handle(name)))
            .await
            .unwrap();
    }
    assert_eq!(recorded(&store, &room, 3).await, 3);

    // Node 1 stops recording; its next commit is repaired by a replica
    // that learned it.
    muted.lock().unwrap().push(1);
    change(&nodes[0].membership, &room, Change::Add(handle("carol")))
        .await
        .unwrap();
    assert_eq!(recorded(&store, &room, 4).await, 4, "repaired");
    let saves = saves.lock().unwrap().clone();
    let early: Vec<u64> = saves
        .iter()
        .filter(|(_, revision)| *revision <= 3)
        .map(|(node, _)| *node)
        .collect();
    assert!(
        !early.is_empty() && early.iter().all(|node| *node == 1),
        "only the proposer recorded revisions 1 to 3: {saves:?}"
    );
    assert!(
        saves
            .iter()
            .any(|(node, revision)| *revision == 4 && *node != 1),
        "another replica recorded revision 4: {saves:?}"
    );
    for n in nodes {
        n.stop().await;
    }
}

#[test]
fn only_the_proposer_writes_a_shared_store_at_once() {
    use crate::membership::driver::ChatDetailsWriter;
    let ballot = saferchat_consensus::Ballot {
        epoch: 1,
        round: 3,
        node: NodeId(2),
    };
    assert_eq!(
        ChatDetailsWriter::of(true, ballot, NodeId(2)),
        ChatDetailsWriter::Now
    );
    assert_eq!(
        ChatDetailsWriter::of(true, ballot, NodeId(1)),
        ChatDetailsWriter::Repair
    );
    assert_eq!(
        ChatDetailsWriter::of(false, ballot, NodeId(1)),
        ChatDetailsWriter::Now,
        "a node's own store is written by every replica"
    );
}
