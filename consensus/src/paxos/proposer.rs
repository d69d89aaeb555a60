//! The proposer: turns queued changes into Paxos rounds.
//!
//! A round carries a batch of changes. Phase 1 learns the newest accepted
//! state from a majority; the batch is applied to it (CASPaxos: the value is
//! a function of the previous value); phase 2 has a majority accept the
//! result. Every accept also asks for a promise on the proposer's next
//! ballot, so while no one else proposes, the next round skips phase 1:
//! one round trip per change in steady state.
//!
//! A round *commits* only when, in addition, every lease holder reported by
//! an accepting acceptor has answered the accept (and so stopped local
//! reads) or the reported promise has run out on this clock. Until then no
//! caller hears of the outcome and no `Commit` is sent, so nobody can have
//! observed the new state while a holder still serves the old one.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::Arc;

use crate::config::ReplicaConfig;
use crate::ids::{Ballot, NodeId, RequestId, Revision};
use crate::message::{Message, Phase};
use crate::room::{Applied, ChangeError, Proposal, RECENT_CHANGES_MAX, RoomState, apply};
use crate::time::Millis;

/// How a proposal ended.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Outcome {
    /// The round that carried the proposal committed. `result` is the
    /// change's own result; `state` is the committed state after the whole
    /// batch (the caller's change included, when it succeeded).
    Decided {
        /// The change's result.
        result: Result<Applied, ChangeError>,
        /// The committed room state.
        state: Arc<RoomState>,
    },
    /// No round carrying the proposal committed before its deadline, or
    /// the proposer can no longer tell whether an earlier round chose it.
    /// The change may or may not have been applied. A retry with the same
    /// [`crate::ChangeId`] applies it at most once while fewer than
    /// [`RECENT_CHANGES_MAX`] changes commit after its first attempt; the
    /// proposer holds its own retries to that bound and answers
    /// `Unavailable` rather than risk applying a change twice.
    Unavailable,
}

/// Effects the proposer asks its replica to carry out.
#[derive(Debug, Default)]
pub(crate) struct Effects {
    /// Messages to send.
    pub messages: Vec<(NodeId, Message)>,
    /// Answers to callers.
    pub replies: Vec<(RequestId, Outcome)>,
    /// A round committed this value at this ballot.
    pub committed: Option<(Ballot, Arc<RoomState>)>,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct Queued {
    request: RequestId,
    proposal: Proposal,
    deadline: Millis,
    /// The lowest revision of any base an accept carrying this change was
    /// computed from; `None` until it rides an accept.
    ///
    /// Such an accept may have been chosen without this proposer learning
    /// it (answers lost, round aborted), applying the change at a revision
    /// above `lowest_base`. A retry recognises the change by its id in the
    /// new base's [`RoomState::recent`], which holds only the changes that
    /// produced the last [`RECENT_CHANGES_MAX`] revisions: once the base is
    /// more than that many revisions past `lowest_base`, absence from
    /// `recent` proves nothing, and applying the change again could apply
    /// it twice. The proposer then answers [`Outcome::Unavailable`].
    lowest_base: Option<Revision>,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct Prepared {
    /// A ballot a majority has promised, with nothing accepted since the
    /// value below.
    ballot: Ballot,
    /// The committed value those acceptors accepted last.
    value: Arc<RoomState>,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct AcceptRound {
    value: Arc<RoomState>,
    results: Vec<Result<Applied, ChangeError>>,
    accepted: BTreeSet<NodeId>,
    refused: BTreeSet<NodeId>,
    /// Nodes that answered the accept (either way): as lease holders they
    /// have marked the room pending.
    answered: BTreeSet<NodeId>,
    /// Reported lease holders and how long to wait for each at most.
    waits: BTreeMap<NodeId, Millis>,
    /// The value is one this node learned as committed, re-accepted by a
    /// read or a round whose changes all were no-ops. Committing it again
    /// adds nothing a lease holder could miss, so the round need not wait
    /// for holders (a new leader's first read no longer waits out the lease
    /// of the node it replaces).
    recommit: bool,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
enum RoundPhase {
    Prepare {
        promises: BTreeMap<NodeId, Option<(Ballot, Arc<RoomState>)>>,
        refused: BTreeSet<NodeId>,
    },
    Accept(AcceptRound),
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct Round {
    ballot: Ballot,
    started: Millis,
    batch: Vec<Queued>,
    phase: RoundPhase,
}

/// The proposer of one room on one node. Volatile: after a restart it
/// starts with phase 1.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct Proposer {
    queue: VecDeque<Queued>,
    round: Option<Round>,
    prepared: Option<Prepared>,
    /// The highest ballot seen in any answer.
    max_seen: Ballot,
    /// Consecutive rounds that failed, for back-off.
    failures: u32,
    retry_at: Millis,
}

impl Proposer {
    /// Queues a change; it rides the next round.
    pub(crate) fn enqueue(
        &mut self,
        config: &ReplicaConfig,
        now: Millis,
        request: RequestId,
        proposal: Proposal,
    ) {
        self.queue.push_back(Queued {
            request,
            proposal,
            deadline: now.plus(config.proposer.request_timeout_ms),
            lowest_base: None,
        });
    }

    /// Whether the next round can skip phase 1.
    pub fn has_fast_path(&self) -> bool {
        self.prepared.is_some()
    }

    /// Starts a round if one is due. `floor` is the local acceptor's
    /// promise: a new ballot must exceed it.
    pub(crate) fn drive(
        &mut self,
        config: &ReplicaConfig,
        now: Millis,
        floor: Ballot,
        out: &mut Effects,
    ) {
        if self.round.is_some() || self.queue.is_empty() || now < self.retry_at {
            return;
        }
        let take = self.queue.len().min(config.proposer.batch_max);
        let batch: Vec<Queued> = self.queue.drain(..take).collect();
        if let Some(prepared) = self.prepared.take() {
            let round = Round {
                ballot: prepared.ballot,
                started: now,
                batch,
                phase: RoundPhase::Prepare {
                    promises: BTreeMap::new(),
                    refused: BTreeSet::new(),
                },
            };
            self.round = Some(round);
            // The fast path's base is the value this proposer committed.
            self.begin_accept(config, &prepared.value, Some(&prepared.value), out);
            return;
        }
        if self.max_seen.epoch > config.epoch || floor.epoch > config.epoch {
            // The room's acceptor set moved to a later epoch: a ballot of
            // this one can never win again, and this node may not run in
            // the later one before it knows that set.
            for queued in batch {
                out.replies.push((queued.request, Outcome::Unavailable));
            }
            return;
        }
        // Rounds rise across epochs too, so a proposer of a new epoch also
        // outbids, round for round, acceptors that compare rounds alone
        // (nodes of a version before epochs, in a rolling upgrade).
        let highest = self.max_seen.round.max(floor.round);
        let Some(ballot) = (Ballot {
            epoch: config.epoch,
            round: highest,
            node: config.me,
        })
        .successor() else {
            // The rounds are exhausted: a peer (one holding a cluster
            // certificate) promised or proposed ROUND_MAX itself. Fail the
            // batch rather than overflow; the room takes no more changes,
            // which is all an authenticated but malicious node can do
            // here, and 2^62 honest rounds never get this far.
            for queued in batch {
                out.replies.push((queued.request, Outcome::Unavailable));
            }
            return;
        };
        self.max_seen = self.max_seen.max(ballot);
        for to in &config.replicas {
            out.messages.push((*to, Message::Prepare { ballot }));
        }
        self.round = Some(Round {
            ballot,
            started: now,
            batch,
            phase: RoundPhase::Prepare {
                promises: BTreeMap::new(),
                refused: BTreeSet::new(),
            },
        });
    }

    /// Applies the batch to `base` and sends the accepts; `committed` is a
    /// value known to be committed (this node's newest), if any.
    fn begin_accept(
        &mut self,
        config: &ReplicaConfig,
        base: &Arc<RoomState>,
        committed: Option<&Arc<RoomState>>,
        out: &mut Effects,
    ) {
        let round = self.round.as_mut().expect("a round to accept in");
        round.batch.retain_mut(|queued| {
            if outcome_unknowable(queued, base) {
                out.replies.push((queued.request, Outcome::Unavailable));
                return false;
            }
            let lowest = queued
                .lowest_base
                .map_or(base.revision, |r| r.min(base.revision));
            queued.lowest_base = Some(lowest);
            true
        });
        let mut state = RoomState::clone(base);
        let results: Vec<_> = round
            .batch
            .iter()
            .map(|q| apply(&mut state, &q.proposal))
            .collect();
        // An unchanged state is re-accepted as the same value: a read.
        let value = if state == **base {
            Arc::clone(base)
        } else {
            Arc::new(state)
        };
        assert!(
            value.revision >= base.revision,
            "a round moved the revision backwards"
        );
        let ballot = round.ballot;
        for to in &config.replicas {
            out.messages.push((
                *to,
                Message::Accept {
                    ballot,
                    value: Arc::clone(&value),
                    next: ballot.successor(),
                },
            ));
        }
        let recommit = committed.is_some_and(|c| **c == *value);
        round.phase = RoundPhase::Accept(AcceptRound {
            recommit,
            value,
            results,
            accepted: BTreeSet::new(),
            refused: BTreeSet::new(),
            answered: BTreeSet::new(),
            waits: BTreeMap::new(),
        });
    }

    /// Phase 1b arrived. `committed` is the newest value this node learned
    /// as committed.
    pub(crate) fn on_promise(
        &mut self,
        config: &ReplicaConfig,
        from: NodeId,
        (ballot, accepted): (Ballot, Option<(Ballot, Arc<RoomState>)>),
        committed: Option<&Arc<RoomState>>,
        out: &mut Effects,
    ) {
        let Some(round) = self.round.as_mut() else {
            return;
        };
        if round.ballot != ballot {
            return;
        }
        let RoundPhase::Prepare { promises, .. } = &mut round.phase else {
            return;
        };
        promises.insert(from, accepted);
        // The local acceptor must be among the promisers: its promise is
        // durable before any accept at this ballot leaves, and a restarted
        // proposer starts above its acceptor's promise, so it can never
        // reuse this ballot with another value.
        if promises.len() < config.majority() || !promises.contains_key(&config.me) {
            return;
        }
        let base = promises
            .values()
            .flatten()
            .max_by_key(|(b, _)| *b)
            .map_or_else(|| Arc::new(RoomState::absent()), |(_, v)| Arc::clone(v));
        self.begin_accept(config, &base, committed, out);
    }

    /// Phase 2b arrived.
    pub(crate) fn on_accepted(
        &mut self,
        config: &ReplicaConfig,
        now: Millis,
        from: NodeId,
        ballot: Ballot,
        holders: &[(NodeId, u64)],
        out: &mut Effects,
    ) {
        let Some(round) = self.round.as_mut() else {
            return;
        };
        if round.ballot != ballot {
            return;
        }
        let RoundPhase::Accept(accept) = &mut round.phase else {
            return;
        };
        accept.accepted.insert(from);
        accept.answered.insert(from);
        for (holder, remaining_ms) in holders {
            // No honest grantor promises longer than `promise_ms`; a bigger
            // number is a lie that would stall every change of the room.
            let remaining_ms = (*remaining_ms).min(config.lease.promise_ms());
            let until = now.plus(config.lease.wait_ms(remaining_ms));
            let entry = accept.waits.entry(*holder).or_default();
            *entry = (*entry).max(until);
        }
        self.try_commit(config, now, out);
    }

    /// A refusal arrived: `from` refused `ballot` in `phase` because it
    /// promised `promised`.
    pub(crate) fn on_nack(
        &mut self,
        config: &ReplicaConfig,
        now: Millis,
        from: NodeId,
        (ballot, promised, phase): (Ballot, Ballot, Phase),
        out: &mut Effects,
    ) {
        self.max_seen = self.max_seen.max(promised);
        if self.prepared.as_ref().is_some_and(|p| p.ballot < promised) {
            self.prepared = None;
        }
        let Some(round) = self.round.as_mut() else {
            return;
        };
        if round.ballot != ballot {
            return;
        }
        let refused_count = match (&mut round.phase, phase) {
            (RoundPhase::Prepare { refused, .. }, Phase::Prepare) => {
                refused.insert(from);
                refused.len()
            }
            (RoundPhase::Accept(accept), Phase::Accept) => {
                accept.answered.insert(from);
                accept.refused.insert(from);
                accept.refused.len()
            }
            _ => return,
        };
        if refused_count > config.replicas.len() - config.majority() {
            self.abort(config, now, out);
        } else {
            self.try_commit(config, now, out);
        }
    }

    /// Commits the round in flight if it has a majority and every reported
    /// holder has answered or timed out.
    fn try_commit(&mut self, config: &ReplicaConfig, now: Millis, out: &mut Effects) {
        let Some(round) = self.round.as_ref() else {
            return;
        };
        let RoundPhase::Accept(accept) = &round.phase else {
            return;
        };
        if accept.accepted.len() < config.majority() {
            return;
        }
        let holders_done = accept.recommit
            || accept
                .waits
                .iter()
                .all(|(holder, until)| accept.answered.contains(holder) || now >= *until);
        if !holders_done {
            return;
        }
        let round = self.round.take().expect("checked above");
        let RoundPhase::Accept(accept) = round.phase else {
            unreachable!()
        };
        for (queued, result) in round.batch.into_iter().zip(accept.results) {
            out.replies.push((
                queued.request,
                Outcome::Decided {
                    result,
                    state: Arc::clone(&accept.value),
                },
            ));
        }
        for to in config.replicas.iter().filter(|n| **n != config.me) {
            out.messages.push((
                *to,
                Message::Commit {
                    ballot: round.ballot,
                    value: Arc::clone(&accept.value),
                },
            ));
        }
        // Every acceptor that accepted also promised the successor ballot,
        // and a majority accepted: phase 1 of the next round is done. Only
        // if the local acceptor is one of them, though: its durable promise
        // of the successor is what stops a restarted proposer from reusing
        // that ballot.
        let successor = round.ballot.successor();
        self.prepared = successor
            .filter(|_| accept.accepted.contains(&config.me))
            .map(|ballot| Prepared {
                ballot,
                value: Arc::clone(&accept.value),
            });
        if let Some(successor) = successor {
            self.max_seen = self.max_seen.max(successor);
        }
        self.failures = 0;
        out.committed = Some((round.ballot, accept.value));
    }

    /// Gives up on the round in flight and schedules a retry.
    fn abort(&mut self, config: &ReplicaConfig, now: Millis, out: &mut Effects) {
        let Some(round) = self.round.take() else {
            return;
        };
        self.prepared = None;
        self.failures = self.failures.saturating_add(1);
        self.retry_at = now.plus(backoff_ms(config, self.failures));
        for queued in round.batch.into_iter().rev() {
            if now >= queued.deadline {
                out.replies.push((queued.request, Outcome::Unavailable));
            } else {
                self.queue.push_front(queued);
            }
        }
    }

    /// The acceptors this proposer's rounds go to can answer again (its
    /// partition was installed here in the proposer's epoch; until then
    /// they dropped every Prepare unanswered). The rounds that failed
    /// meanwhile say nothing about contention, so their back-off is
    /// dropped, and a round still in phase 1 (whose Prepares may have
    /// been dropped) is given up for a new one: without this a request
    /// queued during the move waits out up to a round timeout and the
    /// longest back-off after the install, or fails at its deadline
    /// although the set could answer it. Giving up a round is always
    /// safe; the next one has a higher ballot.
    pub(crate) fn acceptors_ready(&mut self, now: Millis) {
        self.failures = 0;
        self.retry_at = now;
        if let Some(round) = self
            .round
            .take_if(|r| matches!(r.phase, RoundPhase::Prepare { .. }))
        {
            for queued in round.batch.into_iter().rev() {
                self.queue.push_front(queued);
            }
        }
    }

    /// Timeouts: abandons a round stuck below a quorum, commits a round
    /// whose holder waits ran out, fails expired requests, starts the next
    /// round.
    pub(crate) fn tick(
        &mut self,
        config: &ReplicaConfig,
        now: Millis,
        floor: Ballot,
        out: &mut Effects,
    ) {
        if let Some(round) = &self.round {
            let quorate = matches!(&round.phase,
                RoundPhase::Accept(a) if a.accepted.len() >= config.majority());
            if quorate {
                self.try_commit(config, now, out);
            } else if now.since(round.started) >= config.proposer.round_timeout_ms {
                self.abort(config, now, out);
            }
        }
        while let Some(front) = self.queue.front() {
            if now < front.deadline {
                break;
            }
            let expired = self.queue.pop_front().expect("front exists");
            out.replies.push((expired.request, Outcome::Unavailable));
        }
        self.drive(config, now, floor, out);
    }

    /// Learned that someone committed at `ballot`: a fast path older than
    /// that would only be refused.
    pub(crate) fn on_commit_seen(&mut self, ballot: Ballot) {
        self.max_seen = self.max_seen.max(ballot);
        if self.prepared.as_ref().is_some_and(|p| p.ballot <= ballot) {
            self.prepared = None;
        }
    }

    /// The earliest time `tick` has something to do.
    pub fn next_wakeup(&self, config: &ReplicaConfig) -> Option<Millis> {
        let mut times = Vec::new();
        if let Some(round) = &self.round {
            times.push(round.started.plus(config.proposer.round_timeout_ms));
            if let RoundPhase::Accept(accept) = &round.phase {
                times.extend(
                    accept
                        .waits
                        .iter()
                        .filter(|(h, _)| !accept.answered.contains(h))
                        .map(|(_, until)| *until),
                );
            }
        } else if !self.queue.is_empty() {
            times.push(self.retry_at);
        }
        if let Some(front) = self.queue.front() {
            times.push(front.deadline);
        }
        times.into_iter().min()
    }
}

/// Whether `queued` may already have been applied by an earlier round in a
/// way that `base` can no longer show (see [`Queued::lowest_base`]).
fn outcome_unknowable(queued: &Queued, base: &RoomState) -> bool {
    let Some(lowest) = queued.lowest_base else {
        return false;
    };
    let window = RECENT_CHANGES_MAX as u64;
    base.revision.0 > lowest.0.saturating_add(window)
        && !base.recent.iter().any(|(id, _)| *id == queued.proposal.id)
}

/// Randomised exponential back-off without a random number generator: the
/// jitter is a hash of the node and the attempt, so runs are reproducible
/// and two nodes never retry in lock step.
fn backoff_ms(config: &ReplicaConfig, failures: u32) -> u64 {
    let base = config.proposer.backoff_ms.max(1);
    let span = base << failures.min(6);
    let mix = config
        .me
        .0
        .wrapping_mul(0x9E37_79B9_7F4A_7C15)
        .wrapping_add(u64::from(failures).wrapping_mul(0xBF58_476D_1CE4_E5B9));
    span / 2 + (mix >> 33) % (span / 2 + 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(me: u64, backoff_ms: u64) -> ReplicaConfig {
        let mut config = ReplicaConfig::single(NodeId(me));
        config.proposer.backoff_ms = backoff_ms;
        config
    }

    /// After `f` failures the wait is drawn from [span/2, span] with
    /// span = base·2^min(f, 6), and over many nodes every value of that
    /// range occurs: the jitter spreads retries over the whole range.
    #[test]
    fn backoff_covers_half_to_all_of_a_doubling_span() {
        for base in [1, 2, 20] {
            for failures in 1..=8 {
                let span = base << failures.min(6);
                let seen: std::collections::BTreeSet<u64> = (1..=400)
                    .map(|me| backoff_ms(&config(me, base), failures))
                    .collect();
                let expected: std::collections::BTreeSet<u64> = (span / 2..=span).collect();
                if span <= 64 {
                    assert_eq!(seen, expected, "base {base}, {failures} failures");
                } else {
                    assert!(
                        seen.is_subset(&expected),
                        "base {base}, {failures} failures"
                    );
                    let possible = expected.len().min(400);
                    assert!(
                        seen.len() > possible / 2,
                        "base {base}, {failures} failures: {seen:?}"
                    );
                }
            }
        }
    }

    /// A zero base counts as 1 ms.
    #[test]
    fn a_zero_base_counts_as_one_millisecond() {
        for failures in 1..=8 {
            assert_eq!(
                backoff_ms(&config(7, 0), failures),
                backoff_ms(&config(7, 1), failures)
            );
        }
    }
}
