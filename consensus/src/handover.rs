//! Handing a partition's room registers from one acceptor set to the next.
//!
//! When the cluster map moves a partition one replica slot (a *step*: the
//! set grows by a node, or shrinks by one), the partition's epoch rises
//! from `E - 1` to `E`, and every room of the partition must keep what was
//! chosen under the old set (`Old`) when the new set (`New`) takes over.
//! This is `specs/Reconfiguration.tla`, run once per partition instead of
//! once per room, because a partition's rooms cannot all be named in
//! advance (a room may be created while it moves):
//!
//! 1. **Seal.** The *mover* sends [`HandoverMessage::Seal`] at
//!    `B = <<E, 0, mover>>` to `Old` and `New`. An acceptor records the seal durably
//!    for the whole partition ([`PartitionSeal`]), raises the promise of
//!    every room it holds to `B` ([`crate::RoomReplica::seal`]), and answers
//!    with every room's accepted ballot and value and the longest lease
//!    promise it still owes on any of them. From then on it refuses every
//!    earlier-epoch Prepare and Accept of the partition (its promise) and
//!    grants no earlier-epoch lease (the grant fence).
//! 2. **Wait.** With answers from a majority of `Old` *and* a majority of
//!    `New`, the mover takes, per room, the value of the highest accepted
//!    ballot below `B` among them (a room that none of them holds was
//!    never chosen) and waits until every reported lease promise has run
//!    out on its own clock.
//! 3. **Transfer.** It records the values durably, then sends them to `New`
//!    at `B` ([`HandoverMessage::Transfer`]). An acceptor of `New` that
//!    accepts them is *installed* for epoch `E`: only installed acceptors
//!    answer epoch-`E` Prepares, Accepts and lease requests of the
//!    partition, so every later epoch-`E` round finds the transferred
//!    values (or later ones) in its phase 1. With a majority of `New`
//!    installed, the step is established and the map may take the next
//!    one; the mover goes on sending to the rest of `New` until every
//!    node is installed (a late copy at `B` is harmless: a later round's
//!    phase 1 takes the higher ballot of any quorum).
//!
//! The mover of a step is one node named by the map (the lowest id in
//! both sets that is not draining). Its ballot is fixed by the epoch, so
//! it must never send two different transfers at it: the values are
//! recorded ([`TransferRecord`]) before the first Transfer leaves the
//! node, and a mover that restarts with a record resends exactly that
//! record; one that restarts without one never sent a Transfer and may
//! seal again from the start.
//!
//! **Takeover.** A mover that dies for good would hold its step for
//! ever; once the operator drains it, the map names the next node of both
//! sets, whose ballot `B' = <<E, 0, mover'>>` is higher. Its transfer is a
//! second phase 2 in epoch `E`, and the first mover may have installed
//! part of `New` at `B` already (a majority, even, which makes its
//! values chosen at `B`). That is why every mover seals `New` as well:
//! sealing a majority of `Old` finds what earlier epochs chose, sealing a
//! majority of `New` finds what an earlier mover of `E` chose, and
//! promising `B'` on both stops either from choosing anything below it,
//! which is Paxos's phase 1 over the two sets that could have chosen
//! below `B'`. Every proposer of epoch `E` runs at a round above 0, so
//! above every mover's ballot: a room an earlier install already let
//! move on keeps its newer value. The new mover leaves out of its
//! transfer every room some answer shows accepted at or above `B'`
//! (that answer no longer says what its replica held below `B'`;
//! `Found::MovedOn`), and an installed acceptor skips a room its promise
//! has moved past (the driver's `on_transfer`). An earlier mover that is still
//! running is refused by the higher seal and stops
//! ([`HandoverStatus::Superseded`]). With the map's one-slot steps a
//! majority of `Old` already meets every majority of `New` (the sets
//! share all but one node, so the two majorities hold more nodes than
//! both sets together), so the `Old` seal alone would find an earlier
//! mover's chosen values too, as long as the mover keeps values of its
//! own epoch below its ballot; sealing `New` as well makes the argument
//! hold for any two sets, for one more message per step. The
//! simulation (`consensus/tests/room_handover.rs`) hands steps to a
//! second mover in the middle of them, with the first one crashed or
//! still running.
//!
//! Sans-I/O like the rest of the crate: time is an argument, messages and
//! the record to persist come out in a [`HandoverReady`].

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use crate::config::LeaseConfig;
use crate::ids::{Ballot, NodeId};
use crate::room::{RoomId, RoomState};
use crate::time::Millis;

/// The values a transfer carries: every room with a value to keep, by
/// name (shared between the mover's record and every resend).
pub type TransferredRooms = Arc<Vec<(RoomId, Arc<RoomState>)>>;

/// The partition-level messages of a handover.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HandoverMessage {
    /// Mover to `Old`: seal the partition at `ballot`.
    Seal {
        /// `<<E, 0, mover>>`.
        ballot: Ballot,
    },
    /// `Old` to the mover: sealed; what this acceptor holds.
    Sealed {
        /// The seal's ballot.
        ballot: Ballot,
        /// Every room of the partition this acceptor accepted a value for.
        rooms: Vec<(RoomId, Ballot, Arc<RoomState>)>,
        /// The longest lease promise this acceptor still owes on any room
        /// of the partition, in milliseconds of its own clock.
        lease_left_ms: u64,
    },
    /// Mover to `New`: accept these values at `ballot` and be installed.
    Transfer {
        /// `<<E, 0, mover>>`.
        ballot: Ballot,
        /// Every room with a value to keep, by name.
        rooms: TransferredRooms,
    },
    /// `New` to the mover: the transfer is durable here.
    Installed {
        /// The transfer's ballot.
        ballot: Ballot,
    },
    /// Either set to the mover: this acceptor is sealed at a higher
    /// ballot (a later step's mover, or a mover that took this step
    /// over, got there first), so this mover can never finish.
    Refused {
        /// The ballot refused.
        ballot: Ballot,
        /// The acceptor's partition seal.
        sealed: Ballot,
    },
}

impl HandoverMessage {
    /// The ballot the message is about.
    pub fn ballot(&self) -> Ballot {
        match self {
            HandoverMessage::Seal { ballot }
            | HandoverMessage::Sealed { ballot, .. }
            | HandoverMessage::Transfer { ballot, .. }
            | HandoverMessage::Installed { ballot }
            | HandoverMessage::Refused { ballot, .. } => *ballot,
        }
    }

    /// Whether every ballot in it is within bounds (an absurd one is
    /// dropped, as for room messages).
    pub fn is_sane(&self) -> bool {
        let inner = match self {
            HandoverMessage::Sealed { rooms, .. } => rooms.iter().all(|(_, b, _)| b.is_sane()),
            HandoverMessage::Refused { sealed, .. } => sealed.is_sane(),
            _ => true,
        };
        self.ballot().is_sane() && inner
    }
}

/// What one acceptor keeps, durably, about the handovers of one
/// partition. Both start at [`Ballot::ZERO`]: a partition that never moved
/// is served in the epoch it was created in.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct PartitionSeal {
    /// The highest seal or transfer ballot accepted: every room of the
    /// partition on this node promises at least this.
    pub sealed: Ballot,
    /// The highest transfer accepted: this node serves that epoch.
    pub installed: Ballot,
}

impl PartitionSeal {
    /// A seal at `ballot`. `Ok(changed)` when it is taken (the record must
    /// then be durable, with every room's raised promise, before the
    /// answer leaves); `Err(sealed)` when a higher one was taken before.
    ///
    /// # Errors
    /// The seal ballot already taken, when it is above `ballot`.
    pub fn on_seal(&mut self, ballot: Ballot) -> Result<bool, Ballot> {
        if ballot < self.sealed {
            return Err(self.sealed);
        }
        let changed = ballot > self.sealed;
        self.sealed = ballot;
        Ok(changed)
    }

    /// A transfer at `ballot`: seals at it and installs its epoch.
    ///
    /// # Errors
    /// As [`PartitionSeal::on_seal`].
    pub fn on_transfer(&mut self, ballot: Ballot) -> Result<bool, Ballot> {
        let sealed = self.on_seal(ballot)?;
        let installed = ballot > self.installed;
        self.installed = self.installed.max(ballot);
        Ok(sealed || installed)
    }

    /// Whether this acceptor answers room messages of `epoch` in this
    /// partition: the epoch the partition was created in needs no
    /// transfer; a later one is served once installed.
    pub fn serves(&self, epoch: u64, created_epoch: u64) -> bool {
        epoch <= created_epoch || self.installed.epoch >= epoch
    }

    /// Whether a room that refused a transfer at `ballot` because it
    /// promised `promised` has moved on since an earlier mover of the same
    /// epoch installed this replica (`self` is the seal before the
    /// transfer): a proposer of the epoch ran there after that install, so
    /// the room keeps its newer value and the transfer installs the
    /// partition all the same ("Takeover" above). Any other refusal leaves
    /// the partition uninstalled.
    pub fn moved_on_since_install(&self, ballot: Ballot, promised: Ballot) -> bool {
        self.installed.epoch == ballot.epoch && promised > ballot
    }

    /// The promise a room of the partition must start with on this node
    /// (a room this node had no state for when the partition was sealed).
    pub fn floor(&self) -> Ballot {
        self.sealed
    }
}

/// What the mover must keep across a restart once it transfers: the exact
/// values it sends at its ballot.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TransferRecord {
    /// The step's ballot.
    pub ballot: Ballot,
    /// The values.
    pub rooms: TransferredRooms,
}

/// What the node must do after feeding the mover an input. `persist` is
/// durable before any of `messages` leaves.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct HandoverReady {
    /// The transfer record, when it is first made.
    pub persist: Option<TransferRecord>,
    /// Messages to send (a message to this node included).
    pub messages: Vec<(NodeId, HandoverMessage)>,
}

/// Where a handover stands.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HandoverStatus {
    /// Waiting for a majority of `Old` and one of `New` to seal.
    Sealing {
        /// Acceptors that answered (of either set).
        sealed: usize,
    },
    /// Waiting out the reported leases.
    Waiting {
        /// On the mover's clock.
        until: Millis,
    },
    /// Waiting for `New` to install (the step is established once a
    /// majority did).
    Transferring {
        /// Acceptors installed.
        installed: usize,
    },
    /// Every node of `New` is installed (a majority established the
    /// step before that).
    Done,
    /// A higher seal was seen: this mover can never finish.
    Superseded {
        /// The seal seen.
        by: Ballot,
    },
}

/// What the seals found of one room.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Found {
    /// The highest value accepted below the mover's ballot, and its
    /// ballot.
    Value(Ballot, Arc<RoomState>),
    /// Some replica accepted the room at or above the mover's ballot: a
    /// proposer of the epoch moved it on after an earlier mover's install.
    /// That replica's answer says nothing of what it held below the
    /// ballot (the later accept replaced it), so this mover cannot know
    /// the room's value; it leaves the room out. That is safe: the
    /// proposer ran phase 1 on a quorum of the new set installed by the
    /// earlier mover, whose values for the room (at that mover's ballot
    /// or above, kept for good) every later quorum of the new set meets.
    MovedOn,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Stage {
    Sealing {
        /// Answers so far, and the latest time each asks to wait until.
        answers: BTreeMap<NodeId, Millis>,
        /// Per room, what the answers found.
        rooms: BTreeMap<RoomId, Found>,
    },
    Waiting {
        until: Millis,
        rooms: BTreeMap<RoomId, Found>,
    },
    Transferring {
        record: TransferRecord,
        installed: BTreeSet<NodeId>,
    },
    Done,
    Superseded(Ballot),
}

/// The mover's side of one step of one partition.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Handover {
    ballot: Ballot,
    /// Sets a majority of each must seal before the transfer.
    seal: Vec<Vec<NodeId>>,
    new: Vec<NodeId>,
    lease: LeaseConfig,
    retry_ms: u64,
    next_send: Millis,
    stage: Stage,
    ready: HandoverReady,
}

fn majority(set: &[NodeId]) -> usize {
    set.len() / 2 + 1
}

impl Handover {
    /// A step to run from its start: `mover` moves the partition from
    /// `old` to `new` in `epoch`, sealing a majority of each first;
    /// messages are resent every `retry_ms` until answered. The first
    /// [`Handover::tick`] sends the seal.
    pub fn start(
        mover: NodeId,
        epoch: u64,
        old: Vec<NodeId>,
        new: Vec<NodeId>,
        lease: LeaseConfig,
        retry_ms: u64,
    ) -> Handover {
        Handover::sealing(mover, epoch, vec![old, new.clone()], new, lease, retry_ms)
    }

    /// [`Handover::start`] that seals a majority of each of `seal`
    /// instead of `Old` and `New`. Every set that may have chosen below
    /// the mover's ballot must be among them, which is what `start` does;
    /// the simulation's broken variants leave one out.
    pub fn sealing(
        mover: NodeId,
        epoch: u64,
        seal: Vec<Vec<NodeId>>,
        new: Vec<NodeId>,
        lease: LeaseConfig,
        retry_ms: u64,
    ) -> Handover {
        Handover {
            ballot: Ballot {
                epoch,
                round: 0,
                node: mover,
            },
            seal,
            new,
            lease,
            retry_ms: retry_ms.max(1),
            next_send: Millis(0),
            stage: Stage::Sealing {
                answers: BTreeMap::new(),
                rooms: BTreeMap::new(),
            },
            ready: HandoverReady::default(),
        }
    }

    /// A step resumed after a restart from its durable record: it resends
    /// exactly that transfer.
    pub fn resume(record: TransferRecord, new: Vec<NodeId>, retry_ms: u64) -> Handover {
        Handover {
            ballot: record.ballot,
            seal: Vec::new(),
            new,
            lease: LeaseConfig::default(),
            retry_ms: retry_ms.max(1),
            next_send: Millis(0),
            stage: Stage::Transferring {
                record,
                installed: BTreeSet::new(),
            },
            ready: HandoverReady::default(),
        }
    }

    /// The step's ballot, `<<E, 0, mover>>`.
    pub fn ballot(&self) -> Ballot {
        self.ballot
    }

    /// Where the step stands.
    pub fn status(&self) -> HandoverStatus {
        match &self.stage {
            Stage::Sealing { answers, .. } => HandoverStatus::Sealing {
                sealed: answers.len(),
            },
            Stage::Waiting { until, .. } => HandoverStatus::Waiting { until: *until },
            Stage::Transferring { installed, .. } => HandoverStatus::Transferring {
                installed: installed.len(),
            },
            Stage::Done => HandoverStatus::Done,
            Stage::Superseded(by) => HandoverStatus::Superseded { by: *by },
        }
    }

    /// Whether a majority of `New` is installed: the step is established
    /// (the map may take the next one). The mover still sends the transfer
    /// to the rest of `New` until [`Handover::is_complete`], so that a
    /// node that was down catches up instead of staying out of the set's
    /// quorums.
    pub fn is_established(&self) -> bool {
        match &self.stage {
            Stage::Transferring { installed, .. } => installed.len() >= majority(&self.new),
            Stage::Done => true,
            _ => false,
        }
    }

    /// Whether every node of `New` is installed: nothing left to send.
    pub fn is_complete(&self) -> bool {
        self.stage == Stage::Done
    }

    /// Whether a refusal that names `sealed` ends this mover: a later
    /// epoch's seal (a later step), or a higher mover's ballot of this
    /// epoch (round 0: a mover that took the step over). A higher ballot
    /// of this epoch at a round above 0 is a proposer that runs after the
    /// step's install, and ends nothing.
    fn superseded_by(&self, sealed: Ballot) -> bool {
        sealed.epoch > self.ballot.epoch
            || (sealed.epoch == self.ballot.epoch && sealed.round == 0 && sealed > self.ballot)
    }

    /// Handles an answer from `from`.
    pub fn step(&mut self, now: Millis, from: NodeId, message: HandoverMessage) {
        if !message.is_sane() || message.ballot() != self.ballot {
            return;
        }
        if let HandoverMessage::Refused { sealed, .. } = message {
            if self.superseded_by(sealed) {
                self.stage = Stage::Superseded(sealed);
            }
            return;
        }
        let sealer = self.seal.iter().any(|set| set.contains(&from));
        let sets = &self.seal;
        let enough = |answers: &BTreeMap<NodeId, Millis>| {
            sets.iter()
                .all(|set| set.iter().filter(|n| answers.contains_key(n)).count() >= majority(set))
        };
        match (&mut self.stage, message) {
            (
                Stage::Sealing { answers, rooms },
                HandoverMessage::Sealed {
                    rooms: held,
                    lease_left_ms,
                    ..
                },
            ) if sealer => {
                let until = now.plus(self.lease.wait_ms(lease_left_ms));
                let entry = answers.entry(from).or_insert(until);
                *entry = (*entry).max(until);
                for (room, ballot, value) in held {
                    // Phase 1: the highest value accepted below this
                    // ballot (earlier epochs', or an earlier mover's of
                    // this one); a room accepted at or above it has moved
                    // on and is left out ([`Found::MovedOn`]).
                    if ballot >= self.ballot {
                        rooms.insert(room, Found::MovedOn);
                        continue;
                    }
                    match rooms.get(&room) {
                        Some(Found::MovedOn) => {}
                        Some(Found::Value(known, _)) if *known >= ballot => {}
                        _ => {
                            rooms.insert(room, Found::Value(ballot, value));
                        }
                    }
                }
                if enough(answers) {
                    let until = answers.values().copied().max().unwrap_or(now);
                    self.stage = Stage::Waiting {
                        until,
                        rooms: std::mem::take(rooms),
                    };
                    self.tick(now);
                }
            }
            (Stage::Transferring { installed, .. }, HandoverMessage::Installed { .. })
                if self.new.contains(&from) =>
            {
                installed.insert(from);
                if installed.len() == self.new.len() {
                    self.stage = Stage::Done;
                }
            }
            _ => {}
        }
    }

    /// Advances timers: the end of the lease wait, and resends.
    pub fn tick(&mut self, now: Millis) {
        if let Stage::Waiting { until, rooms } = &mut self.stage
            && now >= *until
        {
            let record = TransferRecord {
                ballot: self.ballot,
                rooms: Arc::new(
                    std::mem::take(rooms)
                        .into_iter()
                        .filter_map(|(room, found)| match found {
                            Found::Value(_, value) => Some((room, value)),
                            Found::MovedOn => None,
                        })
                        .collect(),
                ),
            };
            self.ready.persist = Some(record.clone());
            self.stage = Stage::Transferring {
                record,
                installed: BTreeSet::new(),
            };
            self.next_send = now;
        }
        if now < self.next_send {
            return;
        }
        let ballot = self.ballot;
        match &self.stage {
            Stage::Sealing { answers, .. } => {
                let all: BTreeSet<NodeId> = self.seal.iter().flatten().copied().collect();
                for to in all.iter().filter(|n| !answers.contains_key(n)) {
                    self.ready
                        .messages
                        .push((*to, HandoverMessage::Seal { ballot }));
                }
            }
            Stage::Transferring { record, installed } => {
                for to in self.new.iter().filter(|n| !installed.contains(n)) {
                    self.ready.messages.push((
                        *to,
                        HandoverMessage::Transfer {
                            ballot,
                            rooms: Arc::clone(&record.rooms),
                        },
                    ));
                }
            }
            Stage::Waiting { .. } | Stage::Done | Stage::Superseded(_) => return,
        }
        self.next_send = now.plus(self.retry_ms);
    }

    /// The earliest time [`Handover::tick`] has work to do.
    pub fn next_wakeup(&self) -> Option<Millis> {
        match &self.stage {
            Stage::Sealing { .. } | Stage::Transferring { .. } => Some(self.next_send),
            Stage::Waiting { until, .. } => Some(*until),
            Stage::Done | Stage::Superseded(_) => None,
        }
    }

    /// Takes what the node must do now.
    pub fn take_ready(&mut self) -> HandoverReady {
        std::mem::take(&mut self.ready)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::Revision;

    fn b(epoch: u64, round: u64, node: u64) -> Ballot {
        Ballot {
            epoch,
            round,
            node: NodeId(node),
        }
    }

    fn nodes(ids: &[u64]) -> Vec<NodeId> {
        ids.iter().copied().map(NodeId).collect()
    }

    fn room(name: &str) -> RoomId {
        RoomId::new(name).expect("valid room name")
    }

    fn value(revision: u64) -> Arc<RoomState> {
        Arc::new(RoomState {
            revision: Revision(revision),
            created: true,
            ..RoomState::default()
        })
    }

    fn lease() -> LeaseConfig {
        LeaseConfig::default()
    }

    #[test]
    fn a_seal_below_the_one_taken_is_refused_and_a_transfer_installs() {
        let mut seal = PartitionSeal::default();
        assert!(seal.serves(1, 1), "the created epoch needs no transfer");
        assert!(!seal.serves(2, 1));
        assert_eq!(seal.on_seal(b(2, 0, 2)), Ok(true));
        assert_eq!(seal.on_seal(b(2, 0, 2)), Ok(false), "a resend");
        assert_eq!(seal.on_seal(b(2, 0, 1)), Err(b(2, 0, 2)));
        assert!(!seal.serves(2, 1), "sealed is not installed");
        assert_eq!(seal.on_transfer(b(2, 0, 1)), Err(b(2, 0, 2)));
        assert_eq!(seal.on_transfer(b(2, 0, 2)), Ok(true));
        assert_eq!(seal.on_transfer(b(2, 0, 2)), Ok(false));
        assert!(seal.serves(2, 1));
        assert!(!seal.serves(3, 1));
        assert_eq!(seal.floor(), b(2, 0, 2));
        // Installed in epoch 2: a room a proposer of epoch 2 moved on is
        // kept in a later mover's transfer; a refusal at the ballot itself,
        // or on a replica not installed in the epoch, is not.
        assert!(seal.moved_on_since_install(b(2, 0, 3), b(2, 1, 4)));
        assert!(!seal.moved_on_since_install(b(2, 0, 3), b(2, 0, 3)));
        assert!(!PartitionSeal::default().moved_on_since_install(b(2, 0, 3), b(2, 1, 4)));
    }

    #[test]
    fn the_mover_transfers_the_highest_value_of_a_seal_majority_after_the_leases() {
        let mut h = Handover::start(
            NodeId(1),
            2,
            nodes(&[1, 2, 3]),
            nodes(&[1, 2, 3, 4]),
            lease(),
            100,
        );
        h.tick(Millis(0));
        let seals = h.take_ready().messages;
        assert_eq!(seals.len(), 4, "to Old and New");
        let ballot = b(2, 0, 1);
        assert!(
            seals
                .iter()
                .all(|(_, m)| *m == HandoverMessage::Seal { ballot })
        );
        h.step(
            Millis(10),
            NodeId(1),
            HandoverMessage::Sealed {
                ballot,
                rooms: vec![
                    (room("a"), b(1, 3, 1), value(3)),
                    (room("b"), b(1, 1, 2), value(1)),
                ],
                lease_left_ms: 0,
            },
        );
        // Of neither set: ignored.
        h.step(
            Millis(10),
            NodeId(5),
            HandoverMessage::Sealed {
                ballot,
                rooms: vec![(room("a"), b(1, 9, 5), value(9))],
                lease_left_ms: 0,
            },
        );
        assert_eq!(h.status(), HandoverStatus::Sealing { sealed: 1 });
        assert!(!h.is_established());
        h.step(
            Millis(20),
            NodeId(3),
            HandoverMessage::Sealed {
                ballot,
                rooms: vec![(room("a"), b(1, 4, 3), value(4))],
                lease_left_ms: 1_000,
            },
        );
        assert_eq!(
            h.status(),
            HandoverStatus::Sealing { sealed: 2 },
            "a majority of Old, but 2 of New's 4 are no majority"
        );
        // Node 4, of New only, holds nothing of the partition yet.
        h.step(
            Millis(30),
            NodeId(4),
            HandoverMessage::Sealed {
                ballot,
                rooms: Vec::new(),
                lease_left_ms: 0,
            },
        );
        let until = Millis(20).plus(lease().wait_ms(1_000));
        assert_eq!(h.status(), HandoverStatus::Waiting { until });
        h.tick(Millis(until.0 - 1));
        assert_eq!(h.take_ready(), HandoverReady::default(), "still waiting");
        h.tick(until);
        let ready = h.take_ready();
        let record = ready.persist.expect("recorded before it is sent");
        assert_eq!(
            *record.rooms,
            vec![(room("a"), value(4)), (room("b"), value(1))]
        );
        assert_eq!(ready.messages.len(), 4);
        for n in [1, 2] {
            h.step(until, NodeId(n), HandoverMessage::Installed { ballot });
        }
        assert!(!h.is_established(), "2 of 4 is no majority");
        assert_eq!(h.status(), HandoverStatus::Transferring { installed: 2 });
        // Not of New: ignored.
        h.step(until, NodeId(5), HandoverMessage::Installed { ballot });
        h.step(until, NodeId(4), HandoverMessage::Installed { ballot });
        assert!(h.is_established(), "a majority of New");
        assert!(!h.is_complete());
        assert_eq!(h.next_wakeup(), Some(until.plus(100)));
        h.tick(until.plus(99));
        assert!(h.take_ready().messages.is_empty(), "not due yet");
        h.tick(until.plus(100));
        let resent: Vec<NodeId> = h
            .take_ready()
            .messages
            .into_iter()
            .map(|(to, _)| to)
            .collect();
        assert_eq!(resent, nodes(&[3]), "the rest of New still gets it");
        h.step(until, NodeId(3), HandoverMessage::Installed { ballot });
        assert!(h.is_complete());
        assert!(h.is_established(), "complete is established too");
        assert_eq!(h.next_wakeup(), None);
    }

    #[test]
    fn the_mover_resends_only_to_the_silent_and_ignores_what_is_not_its_step() {
        let ballot = b(2, 0, 1);
        let mut h = Handover::start(
            NodeId(1),
            2,
            nodes(&[1, 2, 3]),
            nodes(&[1, 2, 3, 4]),
            lease(),
            100,
        );
        assert_eq!(h.ballot(), ballot);
        assert_eq!(h.next_wakeup(), Some(Millis(0)));
        h.tick(Millis(0));
        h.take_ready();
        let sealed = |ballot, lease_left_ms, rooms| HandoverMessage::Sealed {
            ballot,
            rooms,
            lease_left_ms,
        };
        // Another step's answer, and an absurd one: ignored.
        h.step(Millis(1), NodeId(2), sealed(b(3, 0, 1), 0, vec![]));
        h.step(
            Millis(1),
            NodeId(2),
            sealed(
                ballot,
                0,
                vec![(room("a"), b(Ballot::EPOCH_MAX + 1, 0, 2), value(9))],
            ),
        );
        assert_eq!(h.status(), HandoverStatus::Sealing { sealed: 0 });
        // A higher ballot of the step's own epoch is a later proposer of it,
        // not a later step.
        h.step(
            Millis(1),
            NodeId(2),
            HandoverMessage::Refused {
                ballot,
                sealed: b(2, 5, 3),
            },
        );
        assert_eq!(h.status(), HandoverStatus::Sealing { sealed: 0 });
        // Node 2 answers twice: the later wait counts; a value at or above
        // the step's ballot is not an old one and is ignored.
        h.step(
            Millis(10),
            NodeId(2),
            sealed(ballot, 500, vec![(room("a"), b(1, 2, 2), value(2))]),
        );
        h.step(
            Millis(20),
            NodeId(2),
            sealed(ballot, 0, vec![(room("b"), b(2, 0, 1), value(7))]),
        );
        assert_eq!(h.status(), HandoverStatus::Sealing { sealed: 1 });
        h.tick(Millis(99));
        assert!(h.take_ready().messages.is_empty(), "not due yet");
        h.tick(Millis(100));
        let resent: Vec<NodeId> = h
            .take_ready()
            .messages
            .into_iter()
            .map(|(to, _)| to)
            .collect();
        assert_eq!(
            resent,
            nodes(&[1, 3, 4]),
            "only to those of either set that did not answer"
        );
        assert_eq!(h.next_wakeup(), Some(Millis(200)));
        // An older value of "a" from node 3 does not replace node 2's.
        h.step(
            Millis(30),
            NodeId(3),
            sealed(ballot, 0, vec![(room("a"), b(1, 1, 3), value(1))]),
        );
        assert_eq!(
            h.status(),
            HandoverStatus::Sealing { sealed: 2 },
            "New has 2 of 4"
        );
        h.step(Millis(40), NodeId(4), sealed(ballot, 0, vec![]));
        let until = Millis(10).plus(lease().wait_ms(500));
        assert_eq!(h.status(), HandoverStatus::Waiting { until });
        assert_eq!(h.next_wakeup(), Some(until));
        h.tick(until);
        let record = h.take_ready().persist.expect("recorded");
        assert_eq!(*record.rooms, vec![(room("a"), value(2))]);
    }

    #[test]
    fn a_takeover_finds_what_an_earlier_mover_installed_in_new_and_supersedes_it() {
        // Node 1 moved epoch 2 from {1, 2, 3} to {1, 2, 3, 4} and died
        // after installing nodes 2 and 4 (a majority of New with itself);
        // node 2 takes the step over at the higher <<2, 0, 2>>.
        let first = b(2, 0, 1);
        let ballot = b(2, 0, 2);
        let mut h = Handover::start(
            NodeId(2),
            2,
            nodes(&[1, 2, 3]),
            nodes(&[1, 2, 3, 4]),
            lease(),
            100,
        );
        assert_eq!(h.ballot(), ballot);
        let sealed = |rooms| HandoverMessage::Sealed {
            ballot,
            rooms,
            lease_left_ms: 0,
        };
        // Node 3 (Old) still holds the epoch-1 value; nodes 2 and 4 hold
        // the first mover's transfer, and node 4 also a value a proposer
        // of epoch 2 accepted after the install (above this ballot: not
        // this mover's to carry).
        h.step(
            Millis(1),
            NodeId(3),
            sealed(vec![
                (room("a"), b(1, 4, 3), value(4)),
                (room("c"), b(1, 2, 3), value(2)),
            ]),
        );
        h.step(
            Millis(1),
            NodeId(2),
            sealed(vec![
                (room("a"), first, value(5)),
                (room("d"), b(2, 2, 4), value(3)),
            ]),
        );
        assert_eq!(h.status(), HandoverStatus::Sealing { sealed: 2 });
        h.step(
            Millis(1),
            NodeId(4),
            sealed(vec![
                (room("a"), first, value(5)),
                (room("b"), b(2, 3, 4), value(1)),
                (room("c"), b(2, 1, 4), value(7)),
                (room("d"), first, value(2)),
            ]),
        );
        let until = Millis(1).plus(lease().wait_ms(0));
        assert_eq!(h.status(), HandoverStatus::Waiting { until });
        h.tick(until);
        let record = h.take_ready().persist.expect("recorded");
        assert_eq!(
            *record.rooms,
            vec![(room("a"), value(5))],
            "the value the first mover installed, not the older one of Old; \
             b and c moved on at node 4 (whose answer hides what it held \
             below this ballot), so node 3's older c is not carried either, \
             and d, moved on at node 2, stays out whatever came after"
        );
        // The first mover, refused by the higher seal, stops; a proposer's
        // higher ballot of the epoch does not stop it.
        let mut old = Handover::start(
            NodeId(1),
            2,
            nodes(&[1, 2, 3]),
            nodes(&[1, 2, 3, 4]),
            lease(),
            100,
        );
        old.step(
            Millis(2),
            NodeId(4),
            HandoverMessage::Refused {
                ballot: first,
                sealed: b(2, 3, 4),
            },
        );
        assert_eq!(old.status(), HandoverStatus::Sealing { sealed: 0 });
        // A refusal at its own ballot is no later mover's.
        old.step(
            Millis(2),
            NodeId(3),
            HandoverMessage::Refused {
                ballot: first,
                sealed: first,
            },
        );
        assert_eq!(old.status(), HandoverStatus::Sealing { sealed: 0 });
        old.step(
            Millis(2),
            NodeId(4),
            HandoverMessage::Refused {
                ballot: first,
                sealed: ballot,
            },
        );
        assert_eq!(old.status(), HandoverStatus::Superseded { by: ballot });
        // ...and the taking-over mover is not stopped by the first's seal.
        h.step(
            Millis(3),
            NodeId(1),
            HandoverMessage::Refused {
                ballot,
                sealed: first,
            },
        );
        assert_eq!(h.status(), HandoverStatus::Transferring { installed: 0 });
    }

    #[test]
    fn a_resumed_mover_resends_its_record_and_a_higher_seal_supersedes_it() {
        let record = TransferRecord {
            ballot: b(3, 0, 1),
            rooms: Arc::new(vec![(room("a"), value(2))]),
        };
        let mut h = Handover::resume(record.clone(), nodes(&[1, 2, 4]), 50);
        h.tick(Millis(7));
        let first = h.take_ready();
        assert_eq!(first.persist, None, "already durable");
        assert_eq!(first.messages.len(), 3);
        h.tick(Millis(56));
        assert!(h.take_ready().messages.is_empty(), "not due yet");
        h.tick(Millis(57));
        assert_eq!(h.take_ready().messages, first.messages, "the same transfer");
        // An absurd seal in a refusal is dropped, not taken as a later step.
        h.step(
            Millis(60),
            NodeId(2),
            HandoverMessage::Refused {
                ballot: b(3, 0, 1),
                sealed: b(Ballot::EPOCH_MAX + 1, 0, 2),
            },
        );
        assert_eq!(h.status(), HandoverStatus::Transferring { installed: 0 });
        h.step(
            Millis(60),
            NodeId(2),
            HandoverMessage::Refused {
                ballot: b(3, 0, 1),
                sealed: b(4, 0, 2),
            },
        );
        assert_eq!(h.status(), HandoverStatus::Superseded { by: b(4, 0, 2) });
        assert_eq!(h.next_wakeup(), None);
    }
}
