//! One room's actor: validate, place (id and sequence number), store,
//! then acknowledge and fan out — itself on a single node, through the
//! replicated timeline in a cluster.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt as _;
use futures::stream::FuturesOrdered;
use saferchat_consensus::{Handle, RoomId, RoomState};
use saferchat_envelope::sealed::Fanout;
use saferchat_envelope::{Refusal, check_membership};
use tokio::sync::mpsc::OwnedPermit;
use tokio::sync::mpsc::error::TrySendError;
use tokio::sync::{mpsc, watch};

use super::{Live, PostOutcome, Posted, RoomCommand, RoomDeps, SessionId};
use crate::error::NodeError;
use crate::membership::View;
use crate::message_id::MessageId;
use crate::storage::StoredMessage;
use crate::timeline::tail::{RoomTail, Sequenced};
use crate::timeline::{AppliedPost, Durability, LogPost, Timeline};

/// A room with no sessions stops after this long without commands.
const IDLE_STOP_MS: u64 = 30_000;
/// Batches being made durable at once. While one batch waits for its
/// fsync the room already checks, ids and writes the next, so a room's
/// throughput is not one batch per fsync; acknowledgements and deliveries
/// still happen strictly in id order.
const APPENDS_IN_FLIGHT_MAX: usize = 4;

/// A batch on its way to storage: the posts, where each landed (or why
/// it did not), and when the write started.
type Appending = std::pin::Pin<
    Box<
        dyn std::future::Future<
                Output = (
                    Vec<Pending>,
                    Vec<Result<Sequenced, NodeError>>,
                    std::time::Instant,
                ),
            > + Send,
    >,
>;

/// How a room's posts are placed and stored.
enum Writer {
    /// A single node: this actor places posts and stores them.
    Local(RoomTail),
    /// A cluster: the partition log's leader (this node) places them when
    /// they commit; the timeline hands every applied post back.
    Replicated {
        timeline: Timeline,
        partition: u32,
        applied: mpsc::UnboundedReceiver<Arc<AppliedPost>>,
        leaders: watch::Receiver<u64>,
    },
}

struct Session {
    user: Handle,
    live: mpsc::Sender<Live>,
    /// A slot reserved at attach time, so that a session whose queue is
    /// full can still be told why it is being closed.
    close: OwnedPermit<Live>,
}

struct Pending {
    session: SessionId,
    user: Handle,
    client_seq: u64,
    envelope: saferchat_envelope::Envelope,
    raw: bytes::Bytes,
    durability: Durability,
    /// Wrapped for an earlier membership revision: sent to the log as
    /// retry-only ([`LogPost::retry_only`]), with the refusal (and the
    /// membership it was checked against) to answer if the log refuses
    /// it.
    stale: Option<(Refusal, Arc<RoomState>)>,
}

struct Actor {
    room: RoomId,
    deps: RoomDeps,
    sessions: HashMap<SessionId, Session>,
    view: watch::Receiver<View>,
    writer: Writer,
    /// The newest id delivered: what a new session's history goes up to
    /// (later ids reach it live).
    last_delivered: Option<MessageId>,
    /// The newest sequence number delivered.
    last_seq: u64,
    last_revision: Option<saferchat_consensus::Revision>,
    /// A write failed: later writes in flight are not acknowledged either,
    /// and once they are done the room's tail is read again from storage
    /// before the next post is placed, so that numbering continues from
    /// what storage really holds. Sessions stay open meanwhile; posts are
    /// refused UNAVAILABLE until storage answers.
    broken: bool,
}

/// Runs a room until it is idle (or the node stops).
///
/// `me` is a weak handle on this actor's own queue: it lets the actor
/// recognise its entry in the registry without keeping its queue open.
pub async fn run(
    room: RoomId,
    mut rx: mpsc::Receiver<RoomCommand>,
    me: mpsc::WeakSender<RoomCommand>,
    deps: RoomDeps,
    registry: Arc<Mutex<HashMap<RoomId, mpsc::Sender<RoomCommand>>>>,
) {
    let started = async {
        let view = deps.membership.watch(&room).await?;
        let writer = match &deps.timeline {
            None => Writer::Local(RoomTail::load(&*deps.store, &room).await?),
            Some(timeline) => Writer::Replicated {
                partition: deps.placement.partitions().of_room(room.as_str()).0,
                // Subscribed before the store is read: a post applied in
                // between is in both, and skipped by its sequence number.
                applied: timeline.subscribe(&room),
                leaders: timeline.leaders().watch(),
                timeline: timeline.clone(),
            },
        };
        let last =
            crate::storage::history(&*deps.store, &room, crate::storage::Range::Before(None), 1)
                .await?
                .pop();
        Ok::<_, NodeError>((view, writer, last))
    }
    .await;
    let (view, writer, last) = match started {
        Ok(parts) => parts,
        Err(e) => {
            tracing::warn!(%room, error = %e, "room could not start");
            deregister(&registry, &room, &me);
            fail_all(&mut rx, &e);
            return;
        }
    };
    let last_revision = view.borrow().state.as_ref().map(|s| s.revision);
    let mut actor = Actor {
        room: room.clone(),
        writer,
        last_delivered: last.as_ref().map(|m| m.id),
        last_seq: last.as_ref().map_or(0, |m| m.seq),
        deps,
        sessions: HashMap::new(),
        view,
        last_revision,
        broken: false,
    };
    metrics::gauge!("saferchat_rooms_active").increment(1.0);
    let idle = Duration::from_millis(IDLE_STOP_MS);
    let batch_max = actor.deps.limits.room_batch_max;
    let mut appending: FuturesOrdered<Appending> = FuturesOrdered::new();
    loop {
        let first = tokio::select! {
            command = rx.recv(), if appending.len() < APPENDS_IN_FLIGHT_MAX && (!actor.broken || appending.is_empty()) => command,
            Some((accepted, results, started)) = appending.next(), if !appending.is_empty() => {
                actor.complete(accepted, results, started);
                continue;
            }
            event = timeline_event(&mut actor.writer) => {
                match event {
                    TimelineEvent::Applied(post) => actor.on_applied(&post),
                    TimelineEvent::LeadersChanged => {
                        if actor.leadership_moved() {
                            break;
                        }
                    }
                }
                continue;
            }
            changed = actor.view.changed() => {
                if changed.is_err() {
                    break;
                }
                actor.on_membership();
                continue;
            }
            () = actor.deps.shutdown.cancelled() => break,
            () = tokio::time::sleep(idle), if actor.sessions.is_empty() && appending.is_empty() => {
                if deregister_if_idle(&registry, &room, &rx, &me) {
                    break;
                }
                continue;
            }
        };
        let Some(first) = first else { break };
        let mut commands = vec![first];
        while commands.len() < batch_max {
            match rx.try_recv() {
                Ok(c) => commands.push(c),
                Err(_) => break,
            }
        }
        if let Some(batch) = actor.handle(commands).await {
            appending.push_back(batch);
        }
    }
    let e = if actor.deps.shutdown.is_cancelled() {
        NodeError::Unavailable("node is shutting down".into())
    } else {
        NodeError::Unavailable(format!(
            "room {:?} moved to another node; rejoin to be sent there (posts not acknowledged may be retried: a retry is recognised)",
            room.as_str()
        ))
    };
    for (_, session) in actor.sessions.drain() {
        session
            .close
            .send(Live::Close(NodeError::Unavailable(e.to_string())));
    }
    deregister(&registry, &room, &me);
    fail_all(&mut rx, &e);
    metrics::gauge!("saferchat_rooms_active").decrement(1.0);
}

/// What the replicated timeline tells a room actor.
enum TimelineEvent {
    /// A post was applied to the room here.
    Applied(Arc<AppliedPost>),
    /// Some partition's leader changed (perhaps this room's).
    LeadersChanged,
}

/// The timeline's next word for the actor (never, on a single node).
async fn timeline_event(writer: &mut Writer) -> TimelineEvent {
    match writer {
        Writer::Replicated {
            applied, leaders, ..
        } => tokio::select! {
            Some(post) = applied.recv() => TimelineEvent::Applied(post),
            Ok(()) = leaders.changed() => TimelineEvent::LeadersChanged,
            else => std::future::pending().await,
        },
        Writer::Local(_) => std::future::pending().await,
    }
}

/// Removes this actor from the registry if its queue is empty, under the
/// registry lock so no sender can slip a command in between.
fn deregister_if_idle(
    registry: &Mutex<HashMap<RoomId, mpsc::Sender<RoomCommand>>>,
    room: &RoomId,
    rx: &mpsc::Receiver<RoomCommand>,
    me: &mpsc::WeakSender<RoomCommand>,
) -> bool {
    let mut actors = registry.lock().expect("lock");
    if !rx.is_empty() {
        return false;
    }
    remove_own_entry(&mut actors, room, me);
    true
}

fn deregister(
    registry: &Mutex<HashMap<RoomId, mpsc::Sender<RoomCommand>>>,
    room: &RoomId,
    me: &mpsc::WeakSender<RoomCommand>,
) {
    remove_own_entry(&mut registry.lock().expect("lock"), room, me);
}

/// Removes the registry entry for `room` only if it is this actor's queue
/// (a newer actor may have replaced it).
fn remove_own_entry(
    actors: &mut HashMap<RoomId, mpsc::Sender<RoomCommand>>,
    room: &RoomId,
    me: &mpsc::WeakSender<RoomCommand>,
) {
    let mine = actors
        .get(room)
        .is_some_and(|tx| me.upgrade().is_some_and(|own| own.same_channel(tx)));
    if mine {
        actors.remove(room);
    }
}

/// Answers what is still queued: attaches fail with `e`; queued posts were
/// never acknowledged, and their sessions have already been closed.
fn fail_all(rx: &mut mpsc::Receiver<RoomCommand>, e: &NodeError) {
    rx.close();
    while let Ok(command) = rx.try_recv() {
        if let RoomCommand::Attach { reply, .. } = command {
            drop(reply.send(Err(NodeError::Unavailable(e.to_string()))));
        }
    }
}

fn refusal_error(refusal: &Refusal) -> NodeError {
    match refusal {
        Refusal::WrongRoom { .. } | Refusal::WrongSender => {
            NodeError::InvalidArgument(refusal.to_string())
        }
        Refusal::NotMember => NodeError::PermissionDenied(refusal.to_string()),
        Refusal::StaleRevision { .. } | Refusal::Recipients { .. } => {
            NodeError::FailedPrecondition(refusal.to_string())
        }
    }
}

impl Actor {
    /// Handles a batch of commands; returns the append started for its
    /// posts, if any.
    async fn handle(&mut self, commands: Vec<RoomCommand>) -> Option<Appending> {
        let mut posts = Vec::new();
        for command in commands {
            match command {
                RoomCommand::Attach {
                    session,
                    user,
                    live,
                    reply,
                } => {
                    let Ok(close) = live.clone().try_reserve_owned() else {
                        let _ = reply
                            .send(Err(NodeError::Unavailable("session queue unusable".into())));
                        continue;
                    };
                    // The session's Joined frame may predate a change this
                    // room has already announced: start it with the newest
                    // membership known here (clients ignore older ones).
                    if let Some(state) = self.view.borrow().state.clone() {
                        let _ = live.try_send(Live::Membership(state));
                    }
                    self.sessions.insert(session, Session { user, live, close });
                    metrics::gauge!("saferchat_sessions").increment(1.0);
                    let _ = reply.send(Ok((self.last_delivered, self.last_seq)));
                }
                RoomCommand::Detach { session } => {
                    if self.sessions.remove(&session).is_some() {
                        metrics::gauge!("saferchat_sessions").decrement(1.0);
                    }
                }
                RoomCommand::Post {
                    session,
                    user,
                    client_seq,
                    envelope,
                    raw,
                    durability,
                } => posts.push(Pending {
                    session,
                    user,
                    client_seq,
                    envelope,
                    raw,
                    durability,
                    stale: None,
                }),
            }
        }
        if posts.is_empty() {
            None
        } else {
            self.prepare(posts).await
        }
    }

    /// The membership to check posts against, read linearizably: locally
    /// under the lease when valid, else through consensus.
    async fn membership(&self) -> Result<Arc<RoomState>, NodeError> {
        let now = self.deps.clock.monotonic();
        if let Some(state) = self.view.borrow().read(now) {
            return Ok(Arc::clone(state));
        }
        metrics::counter!("saferchat_membership_quorum_reads_total").increment(1);
        self.deps.membership.read(&self.room).await
    }

    /// Checks posts against the membership, gives the accepted ones their
    /// ids and starts writing them; refusals are answered right away.
    async fn prepare(&mut self, posts: Vec<Pending>) -> Option<Appending> {
        let state = match self.membership().await {
            Ok(state) => state,
            Err(e) => {
                for p in posts {
                    self.reply(
                        p.session,
                        p.client_seq,
                        Err((NodeError::Unavailable(e.to_string()), None)),
                    );
                }
                return None;
            }
        };
        self.publish_membership(&state);
        let mut accepted = Vec::with_capacity(posts.len());
        for p in posts {
            if let Err(refusal) = check_membership(&p.envelope, &self.room, &p.user, &state) {
                // Wrapped for an earlier revision, it may be the retry of
                // a post sent under that revision whose answer the client
                // never got (its connection broke, or the partition's
                // leader moved): refused, the client would wrap the
                // message again and the room might hold it twice. A single
                // node answers from the room's tail (unless a failed write
                // left the tail ahead of the store). In a cluster the first
                // attempt may still be in the log and yet commit, so the
                // post goes to the log as retry-only, which answers with
                // the first attempt's place or refuses it, alike on every
                // replica.
                if let Refusal::StaleRevision { envelope, current } = &refusal
                    && envelope < current
                {
                    match &self.writer {
                        Writer::Replicated { .. } => {
                            accepted.push(Pending {
                                stale: Some((refusal, Arc::clone(&state))),
                                ..p
                            });
                            continue;
                        }
                        Writer::Local(tail) if !self.broken => {
                            if let Some(placed) =
                                tail.recall(&(p.envelope.sender, p.envelope.nonce))
                            {
                                self.reply(p.session, p.client_seq, Ok(placed));
                                continue;
                            }
                        }
                        Writer::Local(_) => {}
                    }
                }
                metrics::counter!("saferchat_posts_rejected_total").increment(1);
                let with_state = matches!(
                    refusal,
                    Refusal::StaleRevision { .. } | Refusal::Recipients { .. }
                );
                self.reply(
                    p.session,
                    p.client_seq,
                    Err((
                        refusal_error(&refusal),
                        with_state.then(|| Arc::clone(&state)),
                    )),
                );
                continue;
            }
            if p.durability == Durability::CrossDatacenter
                && matches!(self.writer, Writer::Local(_))
            {
                self.reply(
                    p.session,
                    p.client_seq,
                    Err((
                        NodeError::FailedPrecondition(
                            "this node runs alone, in one datacenter: a post cannot be durable in another datacenter; post it at the local level".into(),
                        ),
                        None,
                    )),
                );
                continue;
            }
            accepted.push(p);
        }
        if accepted.is_empty() {
            return None;
        }
        if self.broken && matches!(self.writer, Writer::Local(_)) {
            // Nothing is in flight (the run loop waits for that).
            match RoomTail::load(&*self.deps.store, &self.room).await {
                Ok(fresh) => {
                    self.writer = Writer::Local(fresh);
                    self.broken = false;
                }
                Err(e) => {
                    for p in accepted {
                        self.reply(
                            p.session,
                            p.client_seq,
                            Err((
                                NodeError::Unavailable(format!(
                                    "message could not be stored and was not acknowledged: {e}"
                                )),
                                None,
                            )),
                        );
                    }
                    return None;
                }
            }
        }
        match &mut self.writer {
            Writer::Local(tail) => {
                let now = self.deps.clock.unix_ms();
                let placed: Vec<Sequenced> = accepted
                    .iter()
                    .map(|p| tail.place((p.envelope.sender, p.envelope.nonce), now, rand::random()))
                    .collect();
                let batch: Vec<StoredMessage> = accepted
                    .iter()
                    .zip(&placed)
                    .filter(|(_, s)| s.fresh)
                    .map(|(p, s)| StoredMessage {
                        room: self.room.clone(),
                        id: s.id,
                        seq: s.seq,
                        envelope: p.raw.clone(),
                    })
                    .collect();
                let store = Arc::clone(&self.deps.store);
                Some(Box::pin(async move {
                    let started = std::time::Instant::now();
                    let results = match store.append(&batch).await {
                        Ok(()) => placed.into_iter().map(Ok).collect(),
                        Err(e) => placed.iter().map(|_| Err(e.clone())).collect(),
                    };
                    (accepted, results, started)
                }))
            }
            Writer::Replicated {
                timeline,
                partition,
                ..
            } => {
                let now = self.deps.clock.unix_ms();
                let posts = accepted
                    .iter()
                    .map(|p| LogPost {
                        room: self.room.clone(),
                        proposed_ms: now,
                        seed: rand::random(),
                        origin: (timeline.me(), 0),
                        envelope: p.raw.clone(),
                        retry_only: p.stale.is_some(),
                    })
                    .collect();
                let durability = accepted.iter().map(|p| p.durability).collect();
                let timeline = timeline.clone();
                let partition = *partition;
                Some(Box::pin(async move {
                    let started = std::time::Instant::now();
                    let results = match timeline.append(partition, posts, durability).await {
                        Ok(replies) => {
                            let mut results = Vec::with_capacity(replies.len());
                            for reply in replies {
                                results.push(reply.await.unwrap_or_else(|_| {
                                    Err(NodeError::Unavailable(
                                        "the timeline stopped before the post committed".into(),
                                    ))
                                }));
                            }
                            results
                        }
                        Err(e) => accepted.iter().map(|_| Err(e.clone())).collect(),
                    };
                    (accepted, results, started)
                }))
            }
        }
    }

    /// A batch's append finished (batches finish in the order they
    /// started): acknowledge what is durable, refuse what is not; on a
    /// single node, deliver what was stored.
    fn complete(
        &mut self,
        accepted: Vec<Pending>,
        results: Vec<Result<Sequenced, NodeError>>,
        started: std::time::Instant,
    ) {
        metrics::histogram!("saferchat_store_append_seconds")
            .record(started.elapsed().as_secs_f64());
        let local = matches!(self.writer, Writer::Local(_));
        for (p, result) in accepted.into_iter().zip(results) {
            let placed = match result {
                Ok(placed) if !self.broken || !local => placed,
                Ok(_) => {
                    self.reply(
                        p.session,
                        p.client_seq,
                        Err((
                            NodeError::Unavailable(
                                "an earlier write of this room failed; not acknowledged: retry the same post after rejoining".into(),
                            ),
                            None,
                        )),
                    );
                    continue;
                }
                Err(NodeError::FailedPrecondition(_)) if p.stale.is_some() => {
                    // The log found no first attempt: the refusal the
                    // membership check gave, now definite.
                    let (refusal, state) = p.stale.expect("stale");
                    metrics::counter!("saferchat_posts_rejected_total").increment(1);
                    self.reply(
                        p.session,
                        p.client_seq,
                        Err((refusal_error(&refusal), Some(state))),
                    );
                    continue;
                }
                Err(e) => {
                    if local {
                        if !self.broken {
                            tracing::warn!(room = %self.room, error = %e, "storing posts failed; none acknowledged");
                        }
                        self.broken = true;
                    }
                    let error = match e {
                        NodeError::Unavailable(m) => NodeError::Unavailable(m),
                        other => NodeError::Unavailable(format!(
                            "message could not be stored and was not acknowledged: {other}"
                        )),
                    };
                    self.reply(p.session, p.client_seq, Err((error, None)));
                    continue;
                }
            };
            self.reply(p.session, p.client_seq, Ok(placed));
            if local && placed.fresh {
                metrics::counter!("saferchat_posts_stored_total").increment(1);
                let posted = Arc::new(Posted {
                    id: placed.id,
                    seq: placed.seq,
                    fanout: Fanout::new(&p.envelope),
                });
                self.deliver(&posted);
            }
        }
    }

    /// A post the replicated timeline applied: deliver it unless this
    /// actor's start already counted it.
    fn on_applied(&mut self, post: &AppliedPost) {
        if post.seq != 0 && post.seq <= self.last_seq {
            return;
        }
        let posted = Arc::new(Posted {
            id: post.id,
            seq: post.seq,
            fanout: Fanout::new(&post.envelope),
        });
        self.deliver(&posted);
    }

    fn deliver(&mut self, posted: &Arc<Posted>) {
        self.fan_out(posted);
        self.last_delivered = Some(posted.id);
        self.last_seq = posted.seq;
    }

    /// The partitions' leaders changed: true when this node no longer
    /// leads the room's partition (the actor then stops and its sessions
    /// are told to rejoin, which sends them to the new leader).
    fn leadership_moved(&mut self) -> bool {
        match &mut self.writer {
            Writer::Replicated {
                timeline,
                partition,
                leaders,
                ..
            } => {
                leaders.borrow_and_update();
                !timeline.leads(*partition)
            }
            Writer::Local(_) => false,
        }
    }

    fn fan_out(&mut self, posted: &Arc<Posted>) {
        let mut overflowed = Vec::new();
        let mut delivered = 0u64;
        for (id, session) in &self.sessions {
            if posted.fanout.index_of(&session.user).is_none() {
                continue;
            }
            match session.live.try_send(Live::Deliver(Arc::clone(posted))) {
                Ok(()) => delivered += 1,
                Err(TrySendError::Full(_)) => overflowed.push(*id),
                Err(TrySendError::Closed(_)) => overflowed.push(*id),
            }
        }
        metrics::counter!("saferchat_deliveries_total").increment(delivered);
        for id in overflowed {
            self.close(
                id,
                NodeError::ResourceExhausted(format!(
                    "session fell behind (more than {} undelivered messages); nothing is lost: rejoin with after_id set to the last id you received, or read History",
                    self.deps.limits.session_queue_max
                )),
            );
        }
    }

    fn reply(
        &mut self,
        session: SessionId,
        client_seq: u64,
        outcome: Result<Sequenced, (NodeError, Option<Arc<RoomState>>)>,
    ) {
        let item = match outcome {
            Ok(placed) => PostOutcome::Accepted {
                client_seq,
                id: placed.id,
                seq: placed.seq,
            },
            Err((error, state)) => PostOutcome::Rejected {
                client_seq,
                error,
                state,
            },
        };
        let Some(target) = self.sessions.get(&session) else {
            return;
        };
        if let Err(TrySendError::Full(_)) = target.live.try_send(Live::Result(item)) {
            self.close(
                session,
                NodeError::ResourceExhausted("session fell behind; rejoin to continue".into()),
            );
        }
    }

    fn close(&mut self, session: SessionId, error: NodeError) {
        if let Some(s) = self.sessions.remove(&session) {
            metrics::gauge!("saferchat_sessions").decrement(1.0);
            metrics::counter!("saferchat_sessions_closed_total").increment(1);
            s.close.send(Live::Close(error));
        }
    }

    /// The view changed: act on its membership.
    fn on_membership(&mut self) {
        let Some(state) = self.view.borrow_and_update().state.clone() else {
            return;
        };
        self.publish_membership(&state);
    }

    /// A newer committed membership: removed members' sessions end, the
    /// rest hear about it. Called before anything posted under that
    /// membership is delivered, so every session knows a sender's key
    /// before it receives the sender's message.
    fn publish_membership(&mut self, state: &Arc<RoomState>) {
        if self
            .last_revision
            .is_some_and(|last| last >= state.revision)
        {
            return;
        }
        self.last_revision = Some(state.revision);
        let removed: Vec<SessionId> = self
            .sessions
            .iter()
            .filter(|(_, s)| !state.is_member(&s.user))
            .map(|(id, _)| *id)
            .collect();
        for id in removed {
            self.close(
                id,
                NodeError::PermissionDenied(format!(
                    "you were removed from room {:?} at revision {}",
                    self.room.as_str(),
                    state.revision
                )),
            );
        }
        let mut overflowed = Vec::new();
        for (id, s) in &self.sessions {
            if s.live
                .try_send(Live::Membership(Arc::clone(state)))
                .is_err()
            {
                overflowed.push(*id);
            }
        }
        for id in overflowed {
            self.close(
                id,
                NodeError::ResourceExhausted("session fell behind; rejoin to continue".into()),
            );
        }
    }
}
