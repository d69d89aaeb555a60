//! The membership driver: one task that runs every room's consensus core.
//!
//! Each input (a request, a batch of peer messages, a timer) is fed to the
//! rooms it concerns; then the driver executes what the cores asked for, in
//! the order their contract requires:
//!
//! 1. publish every touched room's [`View`] (so readers stop using a state
//!    before this node acknowledges a change to it);
//! 2. persist all changed acceptor states in one durable batch;
//! 3. send messages (those to this node are fed straight back in), answer
//!    callers, record commits.
//!
//! Consensus traffic is small (one round per membership change, a lease
//! renewal per active room every few hundred ms), so one task is plenty
//! and keeps the ordering above trivially true.

use std::cmp::Reverse;
use std::collections::{BTreeSet, BinaryHeap, HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use saferchat_consensus::handover::{Handover, HandoverMessage, PartitionSeal};
use saferchat_consensus::{
    AcceptorState, Ballot, ChangeId, Message, Millis, NodeId, Outcome, Proposal, ReplicaConfig,
    RequestId, RoomId, RoomReplica, RoomState,
};
use saferchat_placement::CREATED_EPOCH;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::{
    COMMAND_QUEUE_MAX, Command, HandoverStep, Inbound, Membership, PeerSender, Status, View,
};
use crate::clock::Clock;
use crate::convert;
use crate::error::NodeError;
use crate::known_rooms::KnownRooms;
use crate::storage::{AcceptorStore, ChatStore, CommittedRoom};

/// Rooms with no readers, no proposals and no outstanding lease promises
/// are unloaded after this long (their state is on disk).
const ROOM_IDLE_MS: u64 = 60_000;
/// The longest the driver sleeps before it reads its clock again. Timers
/// are deadlines on the injected clock, which need not run with tokio's
/// (a test clock jumps or changes rate); without a recheck, a timer armed
/// before a jump would sleep its whole old span, as a lease-expiry wait
/// armed before the grantor saw the jump once slept 120 s in a test.
const TIMER_RECHECK_MS: u64 = 1_000;

/// After a membership read, this node keeps a lease on the room for this
/// long, so that repeated reads (an operator, a dashboard) become local.
const READ_INTEREST_MS: u64 = 30_000;

/// How often a mover resends a handover message that was not answered.
const HANDOVER_RETRY_MS: u64 = 500;

/// Acceptor states read per page when a seal walks this node's rooms.
const SEAL_PAGE: usize = 1_000;

/// On a store every node shares, how long a replica that learned a commit
/// it did not propose waits before it checks that the proposer recorded
/// it (see [`ChatDetailsWriter`]).
pub const CHAT_DETAILS_REPAIR_AFTER: Duration = Duration::from_secs(10);

/// Who writes a learned commit to the committed-membership cache
/// (`chat_details`).
///
/// Every replica of a room learns each commit. On a node's own store
/// (sled) each writes its own row. On a store every node shares
/// (Cassandra) that would be one compare-and-set per replica on the same
/// row for every change, contending with each other (a lightweight
/// transaction is four round trips, more when retried), so only the
/// proposer whose round chose the value (the node in the commit's ballot)
/// writes it at once. The others *repair*: after
/// [`CHAT_DETAILS_REPAIR_AFTER`] they read the row (no transaction) and
/// write only if it is still behind, which happens when the proposer
/// stopped between the commit and its write. The compare-and-set on the
/// revision keeps the newest whichever writes land.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ChatDetailsWriter {
    /// Write now.
    Now,
    /// Check later; write only if the row is still behind.
    Repair,
}

impl ChatDetailsWriter {
    /// The writer for a commit chosen at `ballot`, learned by `me`.
    pub fn of(shared_store: bool, ballot: Ballot, me: NodeId) -> ChatDetailsWriter {
        if !shared_store || ballot.node == me {
            ChatDetailsWriter::Now
        } else {
            ChatDetailsWriter::Repair
        }
    }
}

/// A step of a partition's move that this node runs as the mover.
struct Mover {
    handover: Handover,
    /// Told once the step is established (a majority of the new set
    /// installed) or can never be.
    reply: Option<oneshot::Sender<Result<(), NodeError>>>,
}

enum Waiter {
    Change(oneshot::Sender<Outcome>),
    Read(oneshot::Sender<Result<(Arc<RoomState>, &'static str), NodeError>>),
    Status(oneshot::Sender<Result<Status, NodeError>>),
}

struct Slot {
    replica: RoomReplica,
    waiters: HashMap<RequestId, Waiter>,
    view: watch::Sender<View>,
    last_used: Millis,
    /// Keep a lease until then, because someone read the room.
    read_interest_until: Millis,
}

impl Slot {
    /// Whether this node should hold a lease on the room: someone watches
    /// it (a room actor) or read it recently.
    fn lease_wanted(&self, now: Millis) -> bool {
        self.view.receiver_count() > 0 || now < self.read_interest_until
    }
}

/// What sealing a partition's rooms found and changed.
#[derive(Default)]
struct SealedRooms {
    /// Every room with an accepted value: ballot and value.
    accepted: Vec<(RoomId, Ballot, Arc<RoomState>)>,
    /// The longest lease promise this node may still owe.
    lease_left_ms: u64,
    /// Unloaded rooms whose durable state got the higher promise.
    raised: Vec<(RoomId, AcceptorState)>,
    /// Loaded rooms whose replica was sealed (for `settle`).
    touched: Vec<RoomId>,
}

/// Everything the driver needs.
pub struct DriverParts {
    /// Every node of the cluster and the timings; a room's replica set is
    /// its partition's replicas (see [`crate::placement::room_replicas`]).
    pub config: Arc<ReplicaConfig>,
    /// Which partition a room is in and who replicates it.
    pub placement: Arc<saferchat_placement::Placement>,
    /// The cluster map as read at start, for each partition's epoch
    /// ([`saferchat_placement::ClusterMap::partition_epoch`]), which its
    /// rooms' ballots carry.
    pub map: Arc<saferchat_placement::ClusterMap>,
    /// The cluster map as it changes (`None`: it never does): a partition
    /// whose epoch moves gets its new replica set from it.
    pub maps: Option<watch::Receiver<saferchat_placement::ClusterMap>>,
    /// This node's votes.
    pub acceptors: Arc<dyn AcceptorStore>,
    /// Committed memberships.
    pub chat: Arc<dyn ChatStore>,
    /// Outgoing peer traffic.
    pub peers: Arc<dyn PeerSender>,
    /// Incoming peer traffic.
    pub inbound: mpsc::Receiver<Inbound>,
    /// Time.
    pub clock: Arc<dyn Clock>,
    /// Room existence filter, updated on every commit.
    pub known: Arc<KnownRooms>,
    /// How long a replica waits before it repairs a commit the proposer
    /// did not record (a shared store only; [`ChatDetailsWriter`]).
    pub chat_repair_after: Duration,
    /// Stops the driver.
    pub shutdown: CancellationToken,
}

struct Driver {
    config: Arc<ReplicaConfig>,
    placement: Arc<saferchat_placement::Placement>,
    map: Arc<saferchat_placement::ClusterMap>,
    /// Each partition's replica configuration (`None`: not a replica).
    configs: HashMap<u32, Option<Arc<ReplicaConfig>>>,
    acceptors: Arc<dyn AcceptorStore>,
    chat: Arc<dyn ChatStore>,
    peers: Arc<dyn PeerSender>,
    clock: Arc<dyn Clock>,
    known: Arc<KnownRooms>,
    chat_repair_after: Duration,
    rooms: HashMap<RoomId, Slot>,
    timers: BinaryHeap<Reverse<(Millis, RoomId)>>,
    next_request: u64,
    /// Until then, assume promises made before this process started.
    recovering_until: Millis,
    /// Peers whose refused lease requests were logged (once each).
    lease_refusals_logged: BTreeSet<NodeId>,
    /// Each partition's handover state on this node, read from the store
    /// on first use.
    seals: HashMap<u32, PartitionSeal>,
    /// Steps this node moves, by partition.
    movers: HashMap<u32, Mover>,
    /// Handover messages this node sent itself, handled next.
    handover_local: VecDeque<(u32, HandoverMessage)>,
    /// Handover steps whose messages were too large to send, logged once.
    oversized_logged: BTreeSet<(u32, Ballot)>,
}

/// Starts the driver; returns its handle and its task (which ends with
/// `Err(Fatal)` if the node can no longer keep its promises).
pub fn spawn(parts: DriverParts) -> (Membership, JoinHandle<Result<(), NodeError>>) {
    let (tx, rx) = mpsc::channel(COMMAND_QUEUE_MAX);
    let now = parts.clock.monotonic();
    let recovering_until = if parts.config.may_have_promised_others() {
        now.plus(parts.config.lease.promise_ms())
    } else {
        Millis(0)
    };
    let driver = Driver {
        config: parts.config,
        placement: parts.placement,
        map: parts.map,
        configs: HashMap::new(),
        acceptors: parts.acceptors,
        chat: parts.chat,
        peers: parts.peers,
        clock: parts.clock,
        known: parts.known,
        chat_repair_after: parts.chat_repair_after,
        rooms: HashMap::new(),
        timers: BinaryHeap::new(),
        next_request: 0,
        recovering_until,
        lease_refusals_logged: BTreeSet::new(),
        seals: HashMap::new(),
        movers: HashMap::new(),
        handover_local: VecDeque::new(),
        oversized_logged: BTreeSet::new(),
    };
    let task = tokio::spawn(driver.run(rx, parts.inbound, parts.maps, parts.shutdown));
    (Membership::new(tx), task)
}

impl Driver {
    async fn run(
        mut self,
        mut commands: mpsc::Receiver<Command>,
        mut inbound: mpsc::Receiver<Inbound>,
        maps: Option<watch::Receiver<saferchat_placement::ClusterMap>>,
        shutdown: CancellationToken,
    ) -> Result<(), NodeError> {
        let mut maps = maps;
        if let Some(maps) = &mut maps {
            let current = maps.borrow_and_update().clone();
            self.follow(current);
        }
        loop {
            let map_changed = async {
                match &mut maps {
                    Some(maps) => maps.changed().await.is_ok(),
                    None => std::future::pending().await,
                }
            };
            let next_timer = self
                .timers
                .peek()
                .map(|Reverse((t, _))| *t)
                .into_iter()
                .chain(
                    self.movers
                        .values()
                        .filter_map(|m| m.handover.next_wakeup()),
                )
                .min();
            let sleep = async {
                match next_timer {
                    Some(t) => {
                        let wait = t.since(self.clock.monotonic()).min(TIMER_RECHECK_MS);
                        tokio::time::sleep(Duration::from_millis(wait)).await;
                    }
                    None => std::future::pending::<()>().await,
                }
            };
            tokio::select! {
                biased;
                () = shutdown.cancelled() => break,
                command = commands.recv() => match command {
                    Some(command) => self.on_command(command).await?,
                    None => break,
                },
                Some(batch) = inbound.recv() => self.on_inbound(batch).await?,
                changed = map_changed => {
                    match maps.as_mut() {
                        Some(watch) if changed => {
                            let current = watch.borrow_and_update().clone();
                            self.follow(current);
                            self.pump_handovers().await?;
                        }
                        _ => maps = None,
                    }
                }
                () = sleep => self.on_timers().await?,
            }
        }
        for (_, mover) in self.movers.drain() {
            if let Some(reply) = mover.reply {
                let _ = reply.send(Err(NodeError::Unavailable("node is shutting down".into())));
            }
        }
        for slot in self.rooms.values_mut() {
            for (_, waiter) in slot.waiters.drain() {
                fail(
                    waiter,
                    NodeError::Unavailable("node is shutting down".into()),
                );
            }
        }
        Ok(())
    }

    fn request_id(&mut self) -> RequestId {
        self.next_request += 1;
        RequestId(self.next_request)
    }

    /// The replica configuration of `room`'s partition, `None` when this
    /// node is not one of its replicas.
    fn config_for(&mut self, room: &RoomId) -> Option<Arc<ReplicaConfig>> {
        let partition = self.partition_of(room);
        self.config_of(partition)
    }

    /// A room's partition.
    fn partition_of(&self, room: &RoomId) -> u32 {
        self.placement.partitions().of_room(room.as_str()).0
    }

    /// The replica configuration of `partition`'s rooms, `None` when this
    /// node is not one of its replicas.
    fn config_of(&mut self, partition: u32) -> Option<Arc<ReplicaConfig>> {
        let partition = saferchat_placement::PartitionId(partition);
        let (all, placement) = (&self.config, &self.placement);
        let epoch = self.map.partition_epoch(partition.0);
        self.configs
            .entry(partition.0)
            .or_insert_with(|| {
                crate::placement::room_replicas(all, placement, partition, epoch).map(Arc::new)
            })
            .clone()
    }

    /// Loads a room's replica if it is not loaded.
    async fn ensure(&mut self, room: &RoomId) -> Result<(), NodeError> {
        if self.rooms.contains_key(room) {
            return Ok(());
        }
        let Some(config) = self.config_for(room) else {
            // Unavailable, not a precondition: a node forwarding here
            // placed the room by a map that moved since (or not yet), and
            // tries the next replica.
            return Err(NodeError::Unavailable(format!(
                "this node does not replicate the membership of room {:?} (its partition moved); ask one of its replicas",
                room.as_str()
            )));
        };
        let seal = self.seal_of(self.partition_of(room)).await?;
        let mut durable = self
            .acceptors
            .load_acceptor(room)
            .await
            .map_err(|e| NodeError::Unavailable(format!("loading room {room:?}: {e}")))?
            .unwrap_or_default();
        // A room this node had no vote for when its partition was sealed
        // starts with the seal's promise.
        durable.promised = durable.promised.max(seal.floor());
        let known = self
            .chat
            .load_room(room)
            .await
            .map_err(|e| NodeError::Unavailable(format!("loading room {room:?}: {e}")))?
            .map(|c| (c.ballot, c.state));
        let initial = View {
            state: known.as_ref().map(|(_, s)| Arc::clone(s)),
            readable_until: Millis(0),
        };
        let replica = RoomReplica::new(
            config,
            durable,
            known,
            self.recovering_until,
            // Differs from every earlier load of this room, in this process
            // or a previous one: see `RoomReplica::new`.
            rand::random(),
        );
        let (view, _) = watch::channel(initial);
        self.rooms.insert(
            room.clone(),
            Slot {
                replica,
                waiters: HashMap::new(),
                view,
                last_used: self.clock.monotonic(),
                read_interest_until: Millis(0),
            },
        );
        Ok(())
    }

    async fn on_command(&mut self, command: Command) -> Result<(), NodeError> {
        let now = self.clock.monotonic();
        let room = match &command {
            Command::Propose { room, .. }
            | Command::Read { room, .. }
            | Command::Watch { room, .. }
            | Command::Status { room, .. } => room.clone(),
            Command::HandOver { .. } => {
                let Command::HandOver { step, reply } = command else {
                    unreachable!("matched above")
                };
                return self.hand_over(step, reply).await;
            }
        };
        if let Err(e) = self.ensure(&room).await {
            match command {
                Command::Propose { reply, .. } => drop(reply.send(Outcome::Unavailable)),
                Command::Read { reply, .. } => drop(reply.send(Err(e))),
                Command::Status { reply, .. } => drop(reply.send(Err(e))),
                Command::Watch { .. } | Command::HandOver { .. } => {}
            }
            return Ok(());
        }
        let serving = self.serving(&room);
        let request = self.request_id();
        let slot = self.rooms.get_mut(&room).expect("ensured");
        slot.last_used = now;
        match command {
            Command::Propose {
                proposal, reply, ..
            } => {
                slot.waiters.insert(request, Waiter::Change(reply));
                slot.replica.propose(now, request, proposal);
            }
            Command::Read { reply, .. } => {
                slot.read_interest_until = now.plus(READ_INTEREST_MS);
                slot.replica.want_lease(now, serving);
                if let Ok(state) = slot.replica.read(now) {
                    let _ = reply.send(Ok((Arc::clone(state), "lease")));
                } else {
                    slot.waiters.insert(request, Waiter::Read(reply));
                    slot.replica
                        .propose(now, request, Proposal::read(ChangeId(rand::random())));
                }
            }
            Command::Status { reply, .. } => {
                slot.read_interest_until = now.plus(READ_INTEREST_MS);
                slot.replica.want_lease(now, serving);
                if let Ok(state) = slot.replica.read(now) {
                    let status = Status {
                        state: Arc::clone(state),
                        read_path: "lease",
                        lease: slot.replica.lease_status(now),
                    };
                    let _ = reply.send(Ok(status));
                } else {
                    slot.waiters.insert(request, Waiter::Status(reply));
                    slot.replica
                        .propose(now, request, Proposal::read(ChangeId(rand::random())));
                }
            }
            Command::Watch { reply, .. } => {
                let _ = reply.send(slot.view.subscribe());
                slot.replica.want_lease(now, serving);
            }
            Command::HandOver { .. } => unreachable!("answered above"),
        }
        self.settle(vec![room]).await
    }

    async fn on_inbound(&mut self, batch: Inbound) -> Result<(), NodeError> {
        let now = self.clock.monotonic();
        let mut touched = Vec::new();
        for (room, message) in batch.messages {
            if !self
                .config_for(&room)
                .is_some_and(|c| c.replicas.contains(&batch.from))
            {
                tracing::warn!(from = %batch.from, %room, "dropping a membership message from outside the room's replica set");
                continue;
            }
            if let Err(e) = self.ensure(&room).await {
                tracing::warn!(%room, error = %e, "cannot load room for a peer message");
                continue;
            }
            if !self.answers(&room, &message) {
                continue;
            }
            let slot = self.rooms.get_mut(&room).expect("ensured");
            if let Message::LeaseRequest { lease_ms, .. } = &message
                && !slot.replica.config().lease.covers(*lease_ms)
            {
                // The core refuses it; say why (once per peer), since the
                // cluster's leases quietly stop working otherwise.
                metrics::counter!("saferchat_lease_requests_refused_total").increment(1);
                if self.lease_refusals_logged.insert(batch.from) {
                    tracing::warn!(
                        from = %batch.from,
                        %room,
                        requested_ms = lease_ms,
                        lease_ms = slot.replica.config().lease.lease_ms,
                        "refusing a lease longer than this node's: SAFERCHAT_LEASE_MS must be the same on every node"
                    );
                }
            }
            slot.replica.step(now, batch.from, message);
            touched.push(room);
        }
        self.settle(touched).await?;
        for (partition, message) in batch.handover {
            self.on_handover(batch.from, partition, message).await?;
        }
        self.pump_handovers().await
    }

    async fn on_timers(&mut self) -> Result<(), NodeError> {
        let now = self.clock.monotonic();
        let mut due = BTreeSet::new();
        while let Some(Reverse((t, _))) = self.timers.peek() {
            if *t > now {
                break;
            }
            let Reverse((_, room)) = self.timers.pop().expect("peeked");
            due.insert(room);
        }
        let mut touched = Vec::new();
        for room in due {
            let serving = self.serving(&room);
            let Some(slot) = self.rooms.get_mut(&room) else {
                continue;
            };
            let wanted = slot.lease_wanted(now) && serving;
            if wanted != slot.replica.lease_wanted() {
                slot.replica.want_lease(now, wanted);
            }
            slot.replica.tick(now);
            if wanted {
                slot.last_used = now;
            }
            touched.push(room);
        }
        self.settle(touched).await?;
        self.pump_handovers().await?;
        self.unload_idle(now);
        Ok(())
    }

    /// Drops rooms nobody uses. A room is unloaded only when nothing in its
    /// memory matters any more: no watchers, callers or proposals, and no
    /// unexpired lease promises (those are volatile and must be honoured).
    fn unload_idle(&mut self, now: Millis) {
        self.rooms.retain(|_, slot| {
            let idle = now.since(slot.last_used) >= ROOM_IDLE_MS
                && !slot.lease_wanted(now)
                && slot.waiters.is_empty()
                && !slot.replica.proposing()
                && slot.replica.lease_status(now).promised_to.is_empty()
                && now >= slot.replica.next_wakeup(now).unwrap_or(Millis(0));
            !idle
        });
    }

    /// Executes what the touched rooms asked for, until nothing is left
    /// (messages to this node cause more work).
    async fn settle(&mut self, mut touched: Vec<RoomId>) -> Result<(), NodeError> {
        let me = self.config.me;
        while !touched.is_empty() {
            touched.sort();
            touched.dedup();
            let now = self.clock.monotonic();
            let mut persists: Vec<(RoomId, AcceptorState)> = Vec::new();
            let mut readies = Vec::new();
            for room in touched.drain(..) {
                let Some(slot) = self.rooms.get_mut(&room) else {
                    continue;
                };
                publish_view(slot, now);
                let ready = slot.replica.take_ready();
                if let Some(wake) = slot.replica.next_wakeup(now) {
                    self.timers.push(Reverse((wake, room.clone())));
                }
                if ready.is_empty() {
                    continue;
                }
                if let Some(epoch) = ready.newer_epoch {
                    // A replica of the room runs in a later map epoch than
                    // this node read at start: the room's partition moved
                    // on, and this node answers nothing of that epoch.
                    tracing::debug!(
                        room = %room,
                        epoch,
                        known = slot.replica.config().epoch,
                        "a replica of the room runs in a later map epoch"
                    );
                    metrics::counter!("saferchat_membership_newer_epoch_total").increment(1);
                }
                if let Some(state) = &ready.persist {
                    persists.push((room.clone(), state.clone()));
                }
                readies.push((room, ready));
            }
            if !persists.is_empty() {
                // A vote that cannot be made durable must not be sent: the
                // node stops rather than risk two different answers.
                self.acceptors
                    .save_acceptors(&persists)
                    .await
                    .map_err(|e| NodeError::Fatal(format!("persisting acceptor state: {e}")))?;
                metrics::counter!("saferchat_consensus_persists_total")
                    .increment(persists.len() as u64);
            }
            let mut local: VecDeque<(RoomId, Message)> = VecDeque::new();
            for (room, ready) in readies {
                for (to, message) in ready.messages {
                    if to == me {
                        local.push_back((room.clone(), message));
                    } else {
                        metrics::counter!("saferchat_peer_messages_sent_total", "kind" => kind(&message)).increment(1);
                        self.peers
                            .send(to, convert::message_to_pb(room.as_str(), &message));
                    }
                }
                if let Some((ballot, state)) = ready.committed {
                    self.on_commit(&room, ballot, state);
                }
                let slot = self.rooms.get_mut(&room).expect("loaded");
                for (request, outcome) in ready.replies {
                    if let Some(waiter) = slot.waiters.remove(&request) {
                        answer(waiter, outcome, &slot.replica, now);
                    }
                }
            }
            for (room, message) in local {
                if !self.answers(&room, &message) {
                    continue;
                }
                if let Some(slot) = self.rooms.get_mut(&room) {
                    slot.replica.step(now, me, message);
                    touched.push(room);
                }
            }
        }
        Ok(())
    }

    /// Takes the replica sets and epochs of `map` for every partition whose
    /// epoch it moved (a grow or a shrink): the partition's rooms get the
    /// new configuration, and its loaded rooms are rebuilt from their
    /// durable state, as after a restart (their proposals fail, and the
    /// lease promises they forget are honoured for a promise period).
    /// A partition's set changes only with its epoch; a map that places a
    /// partition elsewhere at the same epoch (a node configured with
    /// another view of the cluster) is logged and not followed.
    fn follow(&mut self, map: saferchat_placement::ClusterMap) {
        let Some((placement, moved)) =
            crate::placement::follow_map(&self.placement, &self.map, &map)
        else {
            return;
        };
        self.map = Arc::new(map);
        self.placement = Arc::new(placement);
        if moved.is_empty() {
            return;
        }
        // Rebuilt or dropped replicas forget the lease promises they made:
        // honour them, as after a restart, for one promise period. Every
        // seal this node answers meanwhile reports that window, and rooms
        // loaded meanwhile assume it too (the forgotten promises are not
        // per room any more).
        let now = self.clock.monotonic();
        let recovering = now.plus(self.config.lease.promise_ms());
        if self.config.may_have_promised_others() {
            self.recovering_until = self.recovering_until.max(recovering);
        }
        for partition in &moved {
            self.configs.remove(partition);
            // A step this node moves that the map has moved past: its
            // resends go to nodes that now drop them (a transfer of an
            // epoch they do not run), for as long as the process lives,
            // so it ends here; the later step seals and transfers anew.
            let epoch = self.map.partition_epoch(*partition);
            if self
                .movers
                .get(partition)
                .is_some_and(|m| m.handover.ballot().epoch < epoch)
                && let Some(mover) = self.movers.remove(partition)
            {
                tracing::info!(
                    partition,
                    step = mover.handover.ballot().epoch,
                    epoch,
                    "the map moved the partition past this node's step; it stops sending it"
                );
                if let Some(reply) = mover.reply {
                    let _ = reply.send(Err(NodeError::Unavailable(format!(
                        "partition {partition} moved on to epoch {epoch} before this step was established"
                    ))));
                }
            }
            tracing::info!(
                partition,
                epoch = self.map.partition_epoch(*partition),
                replicas = ?self.placement.replicas(saferchat_placement::PartitionId(*partition)),
                "the partition's rooms have a new acceptor set"
            );
        }
        let rebuild: Vec<RoomId> = self
            .rooms
            .keys()
            .filter(|room| moved.contains(&self.partition_of(room)))
            .cloned()
            .collect();
        for room in rebuild {
            let config = self.config_for(&room);
            let slot = self.rooms.get_mut(&room).expect("listed");
            for (_, waiter) in slot.waiters.drain() {
                fail(
                    waiter,
                    NodeError::Unavailable(format!(
                        "room {:?} moved to a new acceptor set; try again",
                        room.as_str()
                    )),
                );
            }
            match config {
                Some(config) => {
                    slot.replica = RoomReplica::new(
                        config,
                        slot.replica.acceptor_state().clone(),
                        slot.replica.known().cloned(),
                        self.recovering_until,
                        rand::random(),
                    );
                    self.timers.push(Reverse((now, room)));
                }
                None => {
                    // Not a replica any more: its vote stays on disk, for
                    // a seal of the step that took it out.
                    self.rooms.remove(&room);
                }
            }
        }
    }

    /// `partition`'s handover state on this node.
    async fn seal_of(&mut self, partition: u32) -> Result<PartitionSeal, NodeError> {
        if let Some(seal) = self.seals.get(&partition) {
            return Ok(*seal);
        }
        let seal = self
            .acceptors
            .load_partition_seal(partition)
            .await
            .map_err(|e| NodeError::Unavailable(format!("loading partition {partition}: {e}")))?;
        self.seals.insert(partition, seal);
        Ok(seal)
    }

    /// Whether this node serves the epoch its loaded replica of `room`
    /// runs in: the epoch the partition was created in, or one a transfer
    /// installed here (`PartitionSeal::serves`).
    fn serving(&self, room: &RoomId) -> bool {
        let Some(slot) = self.rooms.get(room) else {
            return false;
        };
        self.serves(room, slot.replica.config().epoch)
    }

    /// Whether this node serves `epoch` in `room`'s partition, by the seal
    /// loaded with the room (`PartitionSeal::serves`).
    fn serves(&self, room: &RoomId, epoch: u64) -> bool {
        self.seals
            .get(&self.partition_of(room))
            .copied()
            .unwrap_or_default()
            .serves(epoch, CREATED_EPOCH)
    }

    /// Whether this node answers `message` for a loaded `room`: a Prepare,
    /// Accept or lease request of an epoch this node is not installed in
    /// gets no answer (only installed replicas hold the transferred values;
    /// `specs/Reconfiguration.tla`, WAIT_INSTALL).
    fn answers(&self, room: &RoomId, message: &Message) -> bool {
        let Some(epoch) = message.asked_epoch() else {
            return true;
        };
        let answers = self.serves(room, epoch);
        if !answers {
            metrics::counter!("saferchat_membership_not_installed_total").increment(1);
        }
        answers
    }

    fn send_handover(&mut self, to: NodeId, partition: u32, message: HandoverMessage) {
        if to == self.config.me {
            self.handover_local.push_back((partition, message));
            return;
        }
        let wire = convert::handover::message_to_pb(partition, &message);
        if let Err(too_large) = self.peers.send_handover(to, wire) {
            // Every room of the partition travels in one message, which
            // no link carries: the move of this partition cannot go on.
            // Say so once per step.
            if self.oversized_logged.insert((partition, message.ballot())) {
                metrics::counter!("saferchat_handover_too_large_total").increment(1);
                tracing::error!(
                    partition,
                    ballot = %message.ballot(),
                    bytes = too_large.bytes,
                    max = too_large.max,
                    "the partition's rooms do not fit in one peer message; its move cannot go on"
                );
            }
        }
    }

    /// Starts (or resumes, from its durable record) a step this node moves.
    async fn hand_over(
        &mut self,
        step: HandoverStep,
        reply: oneshot::Sender<Result<(), NodeError>>,
    ) -> Result<(), NodeError> {
        let me = self.config.me;
        if !step.old.contains(&me) || !step.new.contains(&me) {
            let _ = reply.send(Err(NodeError::InvalidArgument(format!(
                "the mover of partition {} must be in both sets",
                step.partition
            ))));
            return Ok(());
        }
        let ballot = Ballot {
            epoch: step.epoch,
            round: 0,
            node: me,
        };
        let record = self
            .acceptors
            .load_transfer(step.partition)
            .await
            .map_err(|e| NodeError::Unavailable(format!("loading a transfer record: {e}")))?;
        let handover = match record {
            // Sent before a restart: exactly that again.
            Some(record) if record.ballot == ballot => {
                Handover::resume(record, step.new, HANDOVER_RETRY_MS)
            }
            _ => Handover::start(
                me,
                step.epoch,
                step.old,
                step.new,
                self.config.lease,
                HANDOVER_RETRY_MS,
            ),
        };
        tracing::info!(
            partition = step.partition,
            epoch = step.epoch,
            "moving the partition's rooms to their new acceptor set"
        );
        let mover = Mover {
            handover,
            reply: Some(reply),
        };
        if let Some(replaced) = self.movers.insert(step.partition, mover)
            && let Some(reply) = replaced.reply
        {
            let _ = reply.send(Err(NodeError::Unavailable(format!(
                "another step of partition {} replaced this one",
                step.partition
            ))));
        }
        self.pump_handovers().await
    }

    /// Ticks the movers and handles the handover messages this node sent
    /// itself, until neither has anything left to do.
    async fn pump_handovers(&mut self) -> Result<(), NodeError> {
        loop {
            let now = self.clock.monotonic();
            let partitions: Vec<u32> = self.movers.keys().copied().collect();
            for partition in partitions {
                let mover = self.movers.get_mut(&partition).expect("listed");
                mover.handover.tick(now);
                let ready = mover.handover.take_ready();
                if let Some(record) = &ready.persist {
                    // The values must be durable before the first transfer
                    // leaves: the ballot is fixed, so a restarted mover must
                    // send exactly them again.
                    self.acceptors
                        .save_transfer(partition, record)
                        .await
                        .map_err(|e| NodeError::Fatal(format!("recording a transfer: {e}")))?;
                }
                for (to, message) in ready.messages {
                    self.send_handover(to, partition, message);
                }
                let mover = self.movers.get_mut(&partition).expect("listed");
                let status = mover.handover.status();
                if mover.handover.is_established()
                    && let Some(reply) = mover.reply.take()
                {
                    tracing::info!(partition, "partition handover established");
                    let _ = reply.send(Ok(()));
                }
                match status {
                    saferchat_consensus::handover::HandoverStatus::Done => {
                        self.movers.remove(&partition);
                    }
                    saferchat_consensus::handover::HandoverStatus::Superseded { by } => {
                        tracing::warn!(partition, %by, "a later step sealed the partition first");
                        if let Some(reply) = self.movers.remove(&partition).and_then(|m| m.reply) {
                            let _ = reply.send(Err(NodeError::Unavailable(format!(
                                "partition {partition} was sealed by a later step ({by})"
                            ))));
                        }
                    }
                    _ => {}
                }
            }
            let Some((partition, message)) = self.handover_local.pop_front() else {
                return Ok(());
            };
            let me = self.config.me;
            self.on_handover(me, partition, message).await?;
        }
    }

    /// A handover message from `from` (possibly this node).
    async fn on_handover(
        &mut self,
        from: NodeId,
        partition: u32,
        message: HandoverMessage,
    ) -> Result<(), NodeError> {
        match message {
            HandoverMessage::Seal { ballot } => self.on_seal(from, partition, ballot).await,
            HandoverMessage::Transfer { ballot, rooms } => {
                self.on_transfer(from, partition, ballot, &rooms).await
            }
            answer => {
                let now = self.clock.monotonic();
                if let Some(mover) = self.movers.get_mut(&partition) {
                    mover.handover.step(now, from, answer);
                }
                Ok(())
            }
        }
    }

    /// Whether a seal or transfer at `ballot` from `from` may be taken: a
    /// mover speaks in its own name (the peer link authenticated `from`),
    /// of an epoch this node's map has reached.
    fn handover_allowed(&self, from: NodeId, partition: u32, ballot: Ballot) -> bool {
        if ballot.node != from || ballot.round != 0 {
            tracing::warn!(%from, %ballot, partition, "dropping a handover message in another mover's name");
            return false;
        }
        let known = self.map.partition_epoch(partition);
        if ballot.epoch > known {
            tracing::debug!(%from, %ballot, partition, known, "a handover of an epoch this node's map has not reached");
            return false;
        }
        true
    }

    /// Raises the promise of every room of `partition` this node holds a
    /// vote for to `ballot`: loaded rooms through their replica (touched,
    /// for `settle`), the others in their durable state (returned, to be
    /// saved). Also returns what the rooms accepted and the longest lease
    /// promise this node may still owe on any of them.
    async fn seal_rooms(
        &mut self,
        partition: u32,
        ballot: Ballot,
    ) -> Result<SealedRooms, NodeError> {
        let now = self.clock.monotonic();
        let mut sealed = SealedRooms {
            lease_left_ms: if self.recovering_until > now {
                self.recovering_until.since(now)
            } else {
                0
            },
            ..SealedRooms::default()
        };
        let placement = Arc::clone(&self.placement);
        let in_partition =
            |room: &RoomId| placement.partitions().of_room(room.as_str()).0 == partition;
        for (room, slot) in self.rooms.iter_mut().filter(|(r, _)| in_partition(r)) {
            let room_seal = slot.replica.seal(now, ballot);
            sealed.lease_left_ms = sealed.lease_left_ms.max(room_seal.lease_left_ms);
            if let Some((b, value)) = room_seal.accepted {
                sealed.accepted.push((room.clone(), b, value));
            }
            sealed.touched.push(room.clone());
        }
        let mut after: Option<RoomId> = None;
        loop {
            let page = self
                .acceptors
                .list_acceptors(after.as_ref(), SEAL_PAGE)
                .await
                .map_err(|e| NodeError::Unavailable(format!("listing acceptor states: {e}")))?;
            let Some((last, _)) = page.last() else { break };
            after = Some(last.clone());
            for (room, mut state) in page {
                if !in_partition(&room) || self.rooms.contains_key(&room) {
                    continue;
                }
                // A room promised above the seal keeps its promise and
                // still reports what it accepted (`RoomReplica::seal`).
                if state.promised < ballot {
                    state.promised = ballot;
                    sealed.raised.push((room.clone(), state.clone()));
                }
                if let Some((b, value)) = state.accepted {
                    sealed.accepted.push((room, b, value));
                }
            }
        }
        Ok(sealed)
    }

    async fn on_seal(
        &mut self,
        from: NodeId,
        partition: u32,
        ballot: Ballot,
    ) -> Result<(), NodeError> {
        if !self.handover_allowed(from, partition, ballot) {
            return Ok(());
        }
        let mut seal = self.seal_of(partition).await?;
        if seal.installed >= ballot {
            // A late copy: the step is past its seal.
            return Ok(());
        }
        if let Err(sealed) = seal.on_seal(ballot) {
            self.send_handover(from, partition, HandoverMessage::Refused { ballot, sealed });
            return Ok(());
        }
        let sealed = self.seal_rooms(partition, ballot).await?;
        self.acceptors
            .save_partition_seal(partition, &seal, &sealed.raised)
            .await
            .map_err(|e| NodeError::Fatal(format!("persisting a partition seal: {e}")))?;
        self.seals.insert(partition, seal);
        // The loaded rooms' raised promises become durable here, before
        // the answer below leaves.
        self.settle(sealed.touched).await?;
        tracing::info!(partition, %ballot, rooms = sealed.accepted.len(), lease_left_ms = sealed.lease_left_ms, "sealed the partition's rooms for a handover");
        self.send_handover(
            from,
            partition,
            HandoverMessage::Sealed {
                ballot,
                rooms: sealed.accepted,
                lease_left_ms: sealed.lease_left_ms,
            },
        );
        Ok(())
    }

    async fn on_transfer(
        &mut self,
        from: NodeId,
        partition: u32,
        ballot: Ballot,
        rooms: &[(RoomId, Arc<RoomState>)],
    ) -> Result<(), NodeError> {
        if !self.handover_allowed(from, partition, ballot) {
            return Ok(());
        }
        match self.config_of(partition) {
            Some(config) if config.epoch == ballot.epoch => {}
            _ => {
                tracing::warn!(%from, %ballot, partition, "a transfer for a set of the partition this node is not in");
                return Ok(());
            }
        }
        if let Some((room, _)) = rooms
            .iter()
            .find(|(r, _)| self.partition_of(r) != partition)
        {
            tracing::warn!(%from, %room, partition, "dropping a transfer naming a room of another partition");
            return Ok(());
        }
        let mut seal = self.seal_of(partition).await?;
        if seal.installed >= ballot {
            self.send_handover(from, partition, HandoverMessage::Installed { ballot });
            return Ok(());
        }
        let before = seal;
        if let Err(sealed) = seal.on_transfer(ballot) {
            self.send_handover(from, partition, HandoverMessage::Refused { ballot, sealed });
            return Ok(());
        }
        let sealed = self.seal_rooms(partition, ballot).await?;
        self.acceptors
            .save_acceptors(&sealed.raised)
            .await
            .map_err(|e| NodeError::Fatal(format!("persisting acceptor state: {e}")))?;
        let mut touched = sealed.touched;
        for (room, value) in rooms {
            self.ensure(room).await?;
            let slot = self.rooms.get_mut(room).expect("ensured");
            match slot.replica.install(ballot, value) {
                Ok(_) => {}
                Err(promised) if before.moved_on_since_install(ballot, promised) => {
                    tracing::info!(%room, %ballot, %promised, "a room moved on since an earlier install of this epoch; it keeps its value");
                    continue;
                }
                Err(refused) => {
                    tracing::warn!(%room, %ballot, %refused, "a room refused the transfer; the partition stays uninstalled");
                    return self.settle(touched).await;
                }
            }
            touched.push(room.clone());
        }
        // Every transferred value is durable before the partition counts
        // as installed, and that before the answer.
        self.settle(touched).await?;
        self.acceptors
            .save_partition_seal(partition, &seal, &[])
            .await
            .map_err(|e| NodeError::Fatal(format!("persisting a partition seal: {e}")))?;
        self.seals.insert(partition, seal);
        tracing::info!(partition, %ballot, rooms = rooms.len(), "installed the partition's rooms in a new epoch");
        self.send_handover(from, partition, HandoverMessage::Installed { ballot });
        // Its loaded rooms may hold leases again, and what they queued
        // while the set could not answer goes out now.
        let now = self.clock.monotonic();
        let placement = Arc::clone(&self.placement);
        let mut ready = Vec::new();
        for (room, slot) in &mut self.rooms {
            if placement.partitions().of_room(room.as_str()).0 == partition {
                if slot.replica.config().epoch == ballot.epoch {
                    slot.replica.acceptors_ready(now);
                }
                ready.push(room.clone());
            }
        }
        for room in &ready {
            self.timers.push(Reverse((now, room.clone())));
        }
        self.settle(ready).await
    }

    fn on_commit(&self, room: &RoomId, ballot: Ballot, state: Arc<RoomState>) {
        if state.created {
            self.known.insert(room);
        }
        metrics::counter!("saferchat_membership_commits_learned_total").increment(1);
        let chat = Arc::clone(&self.chat);
        let room = room.clone();
        let writer = ChatDetailsWriter::of(chat.shared(), ballot, self.config.me);
        let repair_after = self.chat_repair_after;
        // A cache of the consensus state (the acceptors hold the truth), so
        // it is written in the background; compare-and-set on the revision
        // keeps the newest whatever order the writes land in.
        tokio::spawn(async move {
            if writer == ChatDetailsWriter::Repair {
                tokio::time::sleep(repair_after).await;
                match chat.load_room(&room).await {
                    Ok(Some(saved)) if saved.state.revision >= state.revision => return,
                    Ok(_) => {}
                    Err(e) => {
                        tracing::warn!(%room, error = %e, "could not check recorded membership");
                        return;
                    }
                }
            }
            match chat
                .save_room(&room, &CommittedRoom { ballot, state })
                .await
            {
                Ok(_) => {
                    let by = match writer {
                        ChatDetailsWriter::Now => "now",
                        ChatDetailsWriter::Repair => "repair",
                    };
                    metrics::counter!("saferchat_chat_details_writes_total", "by" => by)
                        .increment(1);
                }
                Err(e) => {
                    tracing::warn!(%room, error = %e, "could not record committed membership");
                }
            }
        });
    }
}

/// A message's kind, for metrics: prepares and accepts sent per commit
/// are the round trips a change costs.
fn kind(message: &Message) -> &'static str {
    match message {
        Message::Prepare { .. } => "prepare",
        Message::Promise { .. } => "promise",
        Message::Accept { .. } => "accept",
        Message::Accepted { .. } => "accepted",
        Message::Nack { .. } => "nack",
        Message::Commit { .. } => "commit",
        Message::LeaseRequest { .. } => "lease_request",
        Message::LeaseGrant { .. } => "lease_grant",
    }
}

fn publish_view(slot: &mut Slot, now: Millis) {
    let state = slot.replica.known().map(|(_, s)| Arc::clone(s));
    let readable_until = slot
        .replica
        .read_until(now)
        .map_or(Millis(0), |(_, until)| until);
    let next = View {
        state,
        readable_until,
    };
    slot.view.send_if_modified(|view| {
        if *view == next {
            false
        } else {
            *view = next;
            true
        }
    });
}

fn fail(waiter: Waiter, error: NodeError) {
    match waiter {
        Waiter::Change(reply) => drop(reply.send(Outcome::Unavailable)),
        Waiter::Read(reply) => drop(reply.send(Err(error))),
        Waiter::Status(reply) => drop(reply.send(Err(error))),
    }
}

fn answer(waiter: Waiter, outcome: Outcome, replica: &RoomReplica, now: Millis) {
    let unavailable =
        || NodeError::Unavailable("membership read could not reach a quorum in time".into());
    match (waiter, outcome) {
        (Waiter::Change(reply), outcome) => drop(reply.send(outcome)),
        (Waiter::Read(reply), Outcome::Decided { state, .. }) => {
            drop(reply.send(Ok((state, "quorum"))));
        }
        (Waiter::Status(reply), Outcome::Decided { state, .. }) => {
            let status = Status {
                state,
                read_path: "quorum",
                lease: replica.lease_status(now),
            };
            drop(reply.send(Ok(status)));
        }
        (waiter, Outcome::Unavailable) => fail(waiter, unavailable()),
    }
}

/// The node-wide peer id of this node, for logs.
pub fn describe(config: &ReplicaConfig) -> String {
    let holders: Vec<String> = config.holders.iter().map(NodeId::to_string).collect();
    format!(
        "node {} of {} replicas, lease holders [{}], lease {} ms",
        config.me,
        config.replicas.len(),
        holders.join(", "),
        config.lease.lease_ms
    )
}

#[cfg(test)]
#[path = "driver_tests.rs"]
mod driver_tests;
