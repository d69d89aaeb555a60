//! One room's replica on one node: acceptor, proposer, grantor and holder
//! behind a single sans-I/O interface.
//!
//! Inputs: [`RoomReplica::propose`], [`RoomReplica::step`] (a message from a
//! peer, or from this node to itself), [`RoomReplica::tick`], each with the
//! local time. Output: a [`Ready`] that the node executes in order.

use std::sync::Arc;

use crate::config::ReplicaConfig;
use crate::ids::{Ballot, NodeId, RequestId};
use crate::lease::grantor::Grantor;
use crate::lease::holder::{Holder, ReadError};
use crate::message::{Message, Phase};
use crate::paxos::acceptor::{Acceptor, AcceptorState};
use crate::paxos::proposer::{Effects, Outcome, Proposer};
use crate::room::{Proposal, RoomState};
use crate::time::Millis;

/// What the node must do after feeding the replica an input.
///
/// The order is the contract: `persist` must be durable before any of
/// `messages` is sent, any of `replies` is delivered or `committed` is
/// acted on, because promises and accepts in those messages assume it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct Ready {
    /// The acceptor's new durable state, if it changed.
    pub persist: Option<AcceptorState>,
    /// Messages to send, in order; those addressed to this node are fed
    /// back through [`RoomReplica::step`].
    pub messages: Vec<(NodeId, Message)>,
    /// Outcomes for callers of [`RoomReplica::propose`].
    pub replies: Vec<(RequestId, Outcome)>,
    /// The newest committed state learned, if the local copy moved.
    pub committed: Option<(Ballot, Arc<RoomState>)>,
    /// A replica spoke in a later epoch than this node's configuration:
    /// the node's copy of the cluster map is behind (the highest such
    /// epoch). This replica answered nothing of it.
    pub newer_epoch: Option<u64>,
}

impl Ready {
    /// Whether there is nothing to do.
    pub fn is_empty(&self) -> bool {
        self.persist.is_none()
            && self.messages.is_empty()
            && self.replies.is_empty()
            && self.committed.is_none()
            && self.newer_epoch.is_none()
    }
}

/// What a sealed room reports to the mover of a handover.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SealedRoom {
    /// The acceptor's accepted ballot and value.
    pub accepted: Option<(Ballot, Arc<RoomState>)>,
    /// The longest lease promise this node still owes on the room, in
    /// milliseconds of its clock (0: none).
    pub lease_left_ms: u64,
}

/// Who holds leases on the room, as far as this node can tell.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LeaseStatus {
    /// Whether this node may read locally right now.
    pub local_read: bool,
    /// Holders this node has promised, unexpired.
    pub promised_to: Vec<NodeId>,
}

/// The replica of one room on one node.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct RoomReplica {
    config: Arc<ReplicaConfig>,
    acceptor: Acceptor,
    proposer: Proposer,
    grantor: Grantor,
    holder: Holder,
    ready: Ready,
}

impl RoomReplica {
    /// A replica restored after (re)loading the room.
    ///
    /// `durable` is the acceptor state read back from storage; `known` the
    /// newest committed state stored locally (may be stale, or `None`);
    /// `recovering_until` the end of the window in which this node might
    /// still owe lease promises it made before a crash — the node's start
    /// time plus [`crate::LeaseConfig::promise_ms`], or `Millis(0)` when
    /// [`ReplicaConfig::may_have_promised_others`] is false.
    ///
    /// `lease_seq_base` numbers this incarnation's lease requests; it must
    /// differ from every earlier incarnation's of the same node and room
    /// (a random `u64` does), so that a grant answering a request sent
    /// before a restart is never taken for an answer to a newer one (see
    /// [`Holder::restore`]).
    ///
    /// A replica whose acceptor has promised anything may have answered
    /// accepts as a lease holder before it was reloaded; it serves no local
    /// read until it learns a commit at or above its durable promise (see
    /// [`Holder::assume_pending`]).
    pub fn new(
        config: Arc<ReplicaConfig>,
        durable: AcceptorState,
        known: Option<(Ballot, Arc<RoomState>)>,
        recovering_until: Millis,
        lease_seq_base: u64,
    ) -> RoomReplica {
        let mut holder = Holder::restore(known, lease_seq_base);
        if durable.promised > Ballot::ZERO {
            holder.assume_pending(durable.promised);
        }
        RoomReplica {
            config,
            acceptor: Acceptor::restore(durable),
            proposer: Proposer::default(),
            grantor: Grantor::restarted(recovering_until),
            holder,
            ready: Ready::default(),
        }
    }

    /// The configuration.
    pub fn config(&self) -> &ReplicaConfig {
        &self.config
    }

    /// Queues a change (or a [`crate::Change::Read`]) for consensus.
    pub fn propose(&mut self, now: Millis, request: RequestId, proposal: Proposal) {
        self.proposer.enqueue(&self.config, now, request, proposal);
        self.drive(now);
    }

    /// The local copy, if a linearizable local read is possible at `now`.
    ///
    /// # Errors
    /// [`ReadError`] when the caller must fall back to a consensus read.
    pub fn read(&self, now: Millis) -> Result<&Arc<RoomState>, ReadError> {
        self.holder.read(&self.config, now)
    }

    /// The local copy and until when a local read of it stays valid (on
    /// this node's clock) unless another input arrives first; `None` when
    /// a local read is not possible at `now`. Lets the node hand a cheap,
    /// time-bounded view to code that reads on every request.
    pub fn read_until(&self, now: Millis) -> Option<(&Arc<RoomState>, Millis)> {
        let until = self.holder.readable_until(&self.config, now)?;
        let state = self.holder.read(&self.config, now).ok()?;
        Some((state, until))
    }

    /// Starts or stops asking for leases on this room.
    pub fn want_lease(&mut self, now: Millis, wanted: bool) {
        self.holder.set_wanted(wanted);
        self.tick(now);
    }

    /// Whether this node currently asks for leases on this room.
    pub fn lease_wanted(&self) -> bool {
        self.holder.wanted()
    }

    /// Lease facts for operators.
    pub fn lease_status(&self, now: Millis) -> LeaseStatus {
        LeaseStatus {
            local_read: self.read(now).is_ok(),
            promised_to: self.grantor.promised(now),
        }
    }

    /// The newest committed state known locally (not necessarily current).
    pub fn known(&self) -> Option<&(Ballot, Arc<RoomState>)> {
        self.holder.known()
    }

    /// The acceptor's durable state.
    pub fn acceptor_state(&self) -> &AcceptorState {
        self.acceptor.state()
    }

    /// Whether the next change can skip phase 1.
    pub fn has_fast_path(&self) -> bool {
        self.proposer.has_fast_path()
    }

    /// Whether proposals are queued or in flight: exactly when the
    /// proposer has a timer set (a round in flight has its timeout, a
    /// queued proposal its deadline).
    pub fn proposing(&self) -> bool {
        self.proposer.next_wakeup(&self.config).is_some()
    }

    /// Seals this room at a handover's `ballot` (see [`crate::handover`]):
    /// the acceptor promises it, so this node accepts nothing of an
    /// earlier epoch any more and grants no earlier-epoch lease; a change
    /// proposed here fails at once, and a round in flight loses (this
    /// acceptor refuses it). Answers what the acceptor accepted
    /// and the longest lease promise this node still owes on the room.
    ///
    /// An acceptor that promised above `ballot` already keeps that
    /// promise and still answers what it accepted: it accepts nothing
    /// below its promise, so nothing below `ballot` either, which is all
    /// a mover's phase 1 needs of it. (That is a room a proposer of the
    /// mover's epoch moved on after an earlier mover's install, when a
    /// mover takes a step over; leaving its value out of the answer would
    /// let the new mover carry an older one.)
    pub fn seal(&mut self, now: Millis, ballot: Ballot) -> SealedRoom {
        let changed = self.acceptor.on_prepare(ballot).changed;
        if changed {
            self.ready.persist = Some(self.acceptor.state().clone());
        }
        let lease_left_ms = self
            .grantor
            .unexpired(&self.config, now)
            .into_iter()
            .map(|(_, left)| left)
            .max()
            .unwrap_or(0);
        self.drive(now);
        SealedRoom {
            accepted: self.acceptor.state().accepted.clone(),
            lease_left_ms,
        }
    }

    /// Accepts a handover's transferred `value` at its `ballot` (see
    /// [`crate::handover`]); `Ok(true)` when the acceptor state changed
    /// and must be durable before the node answers. This node's holder
    /// treats it as an accept it saw: it reads locally again only once it
    /// learns a commit at or above `ballot`.
    ///
    /// # Errors
    /// The acceptor's promise, when it is above `ballot`, or `ballot`
    /// itself when a different value was accepted at it already (a mover
    /// never sends two values at one ballot; such a frame is refused, not
    /// a reason to stop the node).
    pub fn install(&mut self, ballot: Ballot, value: &Arc<RoomState>) -> Result<bool, Ballot> {
        let state = self.acceptor.state();
        if ballot < state.promised {
            return Err(state.promised);
        }
        if let Some((accepted, held)) = &state.accepted
            && (*accepted > ballot || (*accepted == ballot && held != value))
        {
            return Err(ballot);
        }
        self.holder.on_accept_seen(ballot, value.revision);
        let changed = self.acceptor.on_accept(ballot, value, None).changed;
        if changed {
            self.ready.persist = Some(self.acceptor.state().clone());
        }
        Ok(changed)
    }

    /// This node's partition was installed in the replica's epoch (see
    /// [`crate::handover`]): the acceptor set answers again, and a change
    /// or read queued while it could not goes out now, without the
    /// back-off its unanswered rounds built up.
    pub fn acceptors_ready(&mut self, now: Millis) {
        self.proposer.acceptors_ready(now);
        self.drive(now);
    }

    /// Handles one message from `from` (possibly this node).
    pub fn step(&mut self, now: Millis, from: NodeId, message: Message) {
        if !message.is_sane() {
            return;
        }
        if let Some(epoch) = message.asked_epoch()
            && epoch != self.config.epoch
        {
            self.other_epoch(from, epoch, &message);
            return;
        }
        match &message {
            Message::Nack { promised, .. } => self.note_epoch(promised.epoch),
            Message::Promise {
                accepted: Some((b, _)),
                ..
            } => self.note_epoch(b.epoch),
            Message::LeaseGrant {
                accepted: Some((b, _)),
                ..
            } => self.note_epoch(b.epoch),
            _ => {}
        }
        let mut effects = Effects::default();
        match message {
            Message::Prepare { ballot } => {
                let answer = self.acceptor.on_prepare(ballot);
                self.answer(from, answer.reply, answer.changed);
            }
            Message::Accept {
                ballot,
                value,
                next,
            } => {
                // As a holder first: the answer below is the acknowledgement.
                self.holder.on_accept_seen(ballot, value.revision);
                let answer = self.acceptor.on_accept(ballot, &value, next);
                let reply = match answer.reply {
                    Message::Accepted { ballot, .. } => Message::Accepted {
                        ballot,
                        holders: self.grantor.unexpired(&self.config, now),
                    },
                    nack => nack,
                };
                self.answer(from, reply, answer.changed);
            }
            Message::Promise { ballot, accepted } => {
                let committed = self.holder.known().map(|(_, value)| value);
                self.proposer.on_promise(
                    &self.config,
                    from,
                    (ballot, accepted),
                    committed,
                    &mut effects,
                );
            }
            Message::Accepted { ballot, holders } => {
                self.proposer
                    .on_accepted(&self.config, now, from, ballot, &holders, &mut effects);
            }
            Message::Nack {
                ballot,
                promised,
                phase,
            } => {
                self.proposer.on_nack(
                    &self.config,
                    now,
                    from,
                    (ballot, promised, phase),
                    &mut effects,
                );
            }
            Message::Commit { ballot, value } => {
                self.proposer.on_commit_seen(ballot);
                self.learn(ballot, &value);
            }
            Message::LeaseRequest { seq, lease_ms, .. } => {
                // A holder that would read longer than this grantor's
                // promise lasts gets no grant: its lease would outlive the
                // promise (a misconfigured or older node). Nor does any
                // holder once this acceptor promised a later epoch's
                // ballot: that epoch's transfer waits only for the leases
                // granted before (`specs/Reconfiguration.tla`,
                // GRANT_FENCE).
                let sealed = self.acceptor.state().promised.epoch > self.config.epoch;
                if self.config.is_holder(from) && self.config.lease.covers(lease_ms) && !sealed {
                    self.grantor.grant(&self.config, now, from);
                    let accepted = self
                        .acceptor
                        .state()
                        .accepted
                        .as_ref()
                        .map(|(b, v)| (*b, v.revision));
                    self.ready
                        .messages
                        .push((from, Message::LeaseGrant { seq, accepted }));
                }
            }
            Message::LeaseGrant { seq, accepted } => {
                self.holder.on_grant(&self.config, from, seq, accepted);
            }
        }
        self.absorb(effects);
        self.drive(now);
    }

    /// A Prepare, Accept or lease request of an epoch other than this
    /// replica's. An earlier one is refused with the floor of this epoch,
    /// so that its proposer learns the acceptor set moved on (a lease
    /// request of an earlier epoch is simply not granted). A later one is
    /// not answered: this node cannot check that epoch's set until its
    /// map has it.
    fn other_epoch(&mut self, from: NodeId, epoch: u64, message: &Message) {
        match epoch.cmp(&self.config.epoch) {
            std::cmp::Ordering::Greater => {
                self.note_epoch(epoch);
                return;
            }
            std::cmp::Ordering::Equal => return,
            std::cmp::Ordering::Less => {}
        }
        let promised = self
            .acceptor
            .state()
            .promised
            .max(Ballot::floor_of(self.config.epoch));
        let (ballot, phase) = match message {
            Message::Prepare { ballot } => (*ballot, Phase::Prepare),
            Message::Accept { ballot, value, .. } => {
                // Still a holder's news: the answer below tells the
                // proposer this node saw the accept.
                self.holder.on_accept_seen(*ballot, value.revision);
                (*ballot, Phase::Accept)
            }
            _ => return,
        };
        self.ready.messages.push((
            from,
            Message::Nack {
                ballot,
                promised,
                phase,
            },
        ));
    }

    fn note_epoch(&mut self, epoch: u64) {
        if epoch > self.config.epoch {
            self.ready.newer_epoch = Some(self.ready.newer_epoch.unwrap_or(0).max(epoch));
        }
    }

    /// Advances timers: lease renewals, holder waits, round and request
    /// timeouts.
    pub fn tick(&mut self, now: Millis) {
        if let Some(seq) = self.holder.due_request(&self.config, now) {
            let lease_ms = self.config.lease.lease_ms;
            let epoch = self.config.epoch;
            for to in &self.config.replicas {
                self.ready.messages.push((
                    *to,
                    Message::LeaseRequest {
                        seq,
                        lease_ms,
                        epoch,
                    },
                ));
            }
        }
        let mut effects = Effects::default();
        let floor = self.acceptor.state().promised;
        self.proposer.tick(&self.config, now, floor, &mut effects);
        self.absorb(effects);
    }

    /// The earliest time [`RoomReplica::tick`] has work to do.
    pub fn next_wakeup(&self, now: Millis) -> Option<Millis> {
        [
            self.proposer.next_wakeup(&self.config),
            self.holder.next_request(&self.config),
            self.grantor.next_expiry(now),
        ]
        .into_iter()
        .flatten()
        .min()
    }

    /// Takes what the node must do now.
    pub fn take_ready(&mut self) -> Ready {
        std::mem::take(&mut self.ready)
    }

    fn answer(&mut self, to: NodeId, reply: Message, changed: bool) {
        if changed {
            self.ready.persist = Some(self.acceptor.state().clone());
        }
        self.ready.messages.push((to, reply));
    }

    fn drive(&mut self, now: Millis) {
        let mut effects = Effects::default();
        let floor = self.acceptor.state().promised;
        self.proposer.drive(&self.config, now, floor, &mut effects);
        self.absorb(effects);
    }

    fn absorb(&mut self, effects: Effects) {
        self.ready.messages.extend(effects.messages);
        self.ready.replies.extend(effects.replies);
        if let Some((ballot, value)) = effects.committed {
            self.learn(ballot, &value);
        }
    }

    fn learn(&mut self, ballot: Ballot, value: &Arc<RoomState>) {
        if self.holder.learn(ballot, value) {
            self.ready.committed = Some((ballot, Arc::clone(value)));
        }
    }
}
