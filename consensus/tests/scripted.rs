//! Scripted tests of one room's replicas: feed inputs, assert the exact
//! commands that come out.

use std::collections::VecDeque;
use std::sync::Arc;

use saferchat_consensus::{
    AcceptorState, Ballot, Change, ChangeId, Handle, Message, Millis, NodeId, Outcome, Proposal,
    RECENT_CHANGES_MAX, ReadError, Ready, ReplicaConfig, RequestId, Revision, RoomReplica,
    RoomState,
};

fn b(round: u64, node: u64) -> Ballot {
    Ballot {
        epoch: 1,
        round,
        node: NodeId(node),
    }
}

fn proposal(id: u128, change: Change) -> Proposal {
    Proposal {
        id: ChangeId(id),
        change,
        expected: None,
    }
}

fn alice() -> Handle {
    Handle::of_modulus(b"alice")
}

/// Runs a set of replicas with instant, lossless delivery.
struct Cluster {
    nodes: Vec<RoomReplica>,
    durable: Vec<AcceptorState>,
    inflight: VecDeque<(NodeId, NodeId, Message)>,
    replies: Vec<(NodeId, RequestId, Outcome)>,
    sent: usize,
    restarts: u64,
}

impl Cluster {
    fn new(n: u64) -> Cluster {
        Cluster::with(n, |_| {})
    }

    /// `n` replicas, all holders, with the default timings as `tune`
    /// changes them.
    fn with(n: u64, tune: impl Fn(&mut ReplicaConfig)) -> Cluster {
        let ids: Vec<NodeId> = (1..=n).map(NodeId).collect();
        let nodes = ids
            .iter()
            .map(|me| {
                let mut config = ReplicaConfig {
                    me: *me,
                    replicas: ids.clone(),
                    holders: ids.clone(),
                    ..ReplicaConfig::single(*me)
                };
                tune(&mut config);
                RoomReplica::new(
                    Arc::new(config),
                    AcceptorState::default(),
                    None,
                    Millis(0),
                    0,
                )
            })
            .collect();
        Cluster {
            nodes,
            durable: vec![AcceptorState::default(); n as usize],
            inflight: VecDeque::new(),
            replies: Vec::new(),
            sent: 0,
            restarts: 0,
        }
    }

    fn collect(&mut self, index: usize) {
        let me = NodeId(index as u64 + 1);
        let Ready {
            persist,
            messages,
            replies,
            ..
        } = self.nodes[index].take_ready();
        if let Some(state) = persist {
            self.durable[index] = state;
        }
        for (to, message) in messages {
            if to != me {
                self.sent += 1;
            }
            self.inflight.push_back((me, to, message));
        }
        for (request, outcome) in replies {
            self.replies.push((me, request, outcome));
        }
    }

    fn run(&mut self, now: Millis) {
        self.run_losing(now, |_, _, _| false);
    }

    /// Delivers everything in flight, and what that causes, except the
    /// messages `lost(from, to, message)` picks, which the network loses.
    fn run_losing(&mut self, now: Millis, lost: impl Fn(NodeId, NodeId, &Message) -> bool) {
        for i in 0..self.nodes.len() {
            self.collect(i);
        }
        while let Some((from, to, message)) = self.inflight.pop_front() {
            if lost(from, to, &message) {
                continue;
            }
            let index = to.0 as usize - 1;
            self.nodes[index].step(now, from, message);
            self.collect(index);
        }
    }

    /// Every node asks for leases at `now`, and gets them.
    fn lease_all(&mut self, now: Millis) {
        for node in &mut self.nodes {
            node.want_lease(now, true);
        }
        self.run(now);
    }

    fn tick_all(&mut self, now: Millis) {
        for i in 0..self.nodes.len() {
            self.nodes[i].tick(now);
        }
        self.run(now);
    }
}

#[test]
fn a_single_node_commits_and_reads_locally() {
    let mut node = RoomReplica::new(
        Arc::new(ReplicaConfig::single(NodeId(1))),
        AcceptorState::default(),
        None,
        Millis(0),
        0,
    );
    node.propose(Millis(0), RequestId(1), proposal(1, Change::Create));
    let ready = node.take_ready();
    assert_eq!(ready.persist, None);
    assert_eq!(
        ready.messages,
        vec![(NodeId(1), Message::Prepare { ballot: b(1, 1) })]
    );

    node.step(Millis(0), NodeId(1), Message::Prepare { ballot: b(1, 1) });
    let ready = node.take_ready();
    assert_eq!(
        ready.persist,
        Some(AcceptorState {
            promised: b(1, 1),
            accepted: None
        })
    );
    assert_eq!(
        ready.messages,
        vec![(
            NodeId(1),
            Message::Promise {
                ballot: b(1, 1),
                accepted: None
            }
        )]
    );

    node.step(
        Millis(0),
        NodeId(1),
        Message::Promise {
            ballot: b(1, 1),
            accepted: None,
        },
    );
    let ready = node.take_ready();
    let [
        (
            to,
            Message::Accept {
                ballot,
                value,
                next,
            },
        ),
    ] = ready.messages.as_slice()
    else {
        panic!("expected one accept, got {:?}", ready.messages);
    };
    assert_eq!((*to, *ballot, *next), (NodeId(1), b(1, 1), Some(b(2, 1))));
    assert_eq!(value.revision, Revision(1));
    assert!(value.created);
    let value = Arc::clone(value);

    node.step(
        Millis(0),
        NodeId(1),
        Message::Accept {
            ballot: b(1, 1),
            value: Arc::clone(&value),
            next: Some(b(2, 1)),
        },
    );
    let ready = node.take_ready();
    assert_eq!(
        ready.persist,
        Some(AcceptorState {
            promised: b(2, 1),
            accepted: Some((b(1, 1), Arc::clone(&value)))
        })
    );
    assert_eq!(
        ready.messages,
        vec![(
            NodeId(1),
            Message::Accepted {
                ballot: b(1, 1),
                holders: vec![]
            }
        )]
    );

    node.step(
        Millis(0),
        NodeId(1),
        Message::Accepted {
            ballot: b(1, 1),
            holders: vec![],
        },
    );
    let ready = node.take_ready();
    assert_eq!(
        ready.messages,
        vec![],
        "a replica set of one sends no commit"
    );
    assert_eq!(ready.committed, Some((b(1, 1), Arc::clone(&value))));
    assert_eq!(
        ready.replies,
        vec![(
            RequestId(1),
            Outcome::Decided {
                result: Ok(saferchat_consensus::Applied {
                    changed: true,
                    revision: Revision(1)
                }),
                state: Arc::clone(&value)
            }
        )]
    );
    // Known, but no lease yet.
    assert_eq!(node.read(Millis(0)), Err(ReadError::NoLease));
    assert!(node.has_fast_path());

    // The next change skips phase 1.
    node.propose(Millis(1), RequestId(2), proposal(2, Change::Add(alice())));
    let ready = node.take_ready();
    assert!(
        matches!(ready.messages.as_slice(), [(NodeId(1), Message::Accept { ballot, .. })] if *ballot == b(2, 1))
    );
}

#[test]
fn three_nodes_commit_with_one_round_trip_in_steady_state() {
    let mut c = Cluster::new(3);
    c.nodes[0].propose(Millis(0), RequestId(1), proposal(1, Change::Create));
    c.run(Millis(0));
    let first = c.sent;
    // Prepare x2, Promise x2, Accept x2, Accepted x2, Commit x2.
    assert_eq!(first, 10);
    assert_eq!(c.replies.len(), 1);

    c.nodes[0].propose(Millis(1), RequestId(2), proposal(2, Change::Add(alice())));
    c.run(Millis(1));
    // Accept x2, Accepted x2, Commit x2: one round trip.
    assert_eq!(c.sent - first, 6);
    let (_, _, Outcome::Decided { result, state }) = &c.replies[1] else {
        panic!()
    };
    assert_eq!(result.as_ref().unwrap().revision, Revision(2));
    assert!(state.is_member(&alice()));
    for node in &c.nodes {
        assert_eq!(node.known().unwrap().1.revision, Revision(2));
    }
}

#[test]
fn holders_read_locally_under_a_lease_and_stop_while_a_change_is_pending() {
    let mut c = created(3);
    c.lease_all(Millis(10));
    for node in &c.nodes {
        assert_eq!(node.read(Millis(11)).unwrap().revision, Revision(1));
    }
    // Node 3 proposes; deliver only the accept to node 2 (which is now
    // pending) and check that node 2 stops reading locally.
    c.nodes[2].propose(Millis(20), RequestId(7), proposal(7, Change::Add(alice())));
    c.collect(2);
    let prepares: Vec<_> = c.inflight.drain(..).collect();
    for (from, to, m) in prepares {
        let i = to.0 as usize - 1;
        c.nodes[i].step(Millis(20), from, m);
        c.collect(i);
    }
    // Deliver promises back to node 3.
    let promises: Vec<_> = c.inflight.drain(..).collect();
    for (from, to, m) in promises {
        let i = to.0 as usize - 1;
        c.nodes[i].step(Millis(20), from, m);
        c.collect(i);
    }
    let accepts: Vec<_> = c.inflight.drain(..).collect();
    assert_eq!(accepts.len(), 3);
    let to_node2 = accepts
        .iter()
        .find(|(_, to, _)| *to == NodeId(2))
        .unwrap()
        .clone();
    c.nodes[1].step(Millis(20), to_node2.0, to_node2.2);
    assert_eq!(c.nodes[1].read(Millis(21)), Err(ReadError::Pending));
    assert!(
        c.nodes[0].read(Millis(21)).is_ok(),
        "node 1 has not seen the accept"
    );
    // Deliver everything else: the round commits and reads resume.
    c.collect(1);
    for m in accepts.into_iter().filter(|(_, to, _)| *to != NodeId(2)) {
        c.inflight.push_back(m);
    }
    c.run(Millis(21));
    assert_eq!(c.replies.len(), 2);
    for node in &c.nodes {
        assert_eq!(node.read(Millis(22)).unwrap().revision, Revision(2));
    }
}

#[test]
fn a_silent_holder_delays_commit_until_its_promise_runs_out() {
    let mut c = created(3);
    c.lease_all(Millis(10));
    // Node 3 goes silent: drop everything addressed to it from now on.
    c.nodes[0].propose(Millis(100), RequestId(2), proposal(2, Change::Add(alice())));
    c.run_losing(Millis(100), |_, to, _| to == NodeId(3));
    assert_eq!(c.replies.len(), 1, "must wait for the silent holder");
    let lease = c.nodes[0].config().lease;
    // Node 3 was granted at t=10 by nodes 1 and 2; their promises end at
    // 10 + promise_ms, reported at t=100 as remaining, which the proposer
    // stretches by the drift factor.
    let remaining = 10 + lease.promise_ms() - 100;
    let deadline = 100 + lease.wait_ms(remaining);
    c.nodes[0].tick(Millis(deadline - 1));
    c.collect(0);
    assert_eq!(c.replies.len(), 1);
    c.nodes[0].tick(Millis(deadline));
    c.collect(0);
    assert_eq!(c.replies.len(), 2);
    assert!(deadline - 100 <= 2 * lease.promise_ms());
}

/// A failover's first read: node 2 reads (phase 1, then re-accepts the
/// newest value) while node 3, a holder, is silent. The value is one node 2
/// learned as committed, so nothing new becomes visible and the read
/// commits at once; a change in the same situation waits out node 3's
/// promise (above).
#[test]
fn a_read_of_a_known_committed_value_does_not_wait_for_a_silent_holder() {
    let mut c = created(3);
    c.lease_all(Millis(10));
    assert!(c.nodes[2].read(Millis(10)).is_ok(), "node 3 holds a lease");
    c.nodes[1].propose(Millis(100), RequestId(2), Proposal::read(ChangeId(2)));
    c.run_losing(Millis(100), |_, to, _| to == NodeId(3));
    let read = c
        .replies
        .iter()
        .find(|(node, request, _)| *node == NodeId(2) && *request == RequestId(2));
    let Some((_, _, Outcome::Decided { state, .. })) = read else {
        panic!("the read waited: {:?}", c.replies);
    };
    assert_eq!(state.revision, Revision(1));
}

/// The same read when node 2 has not learned the value as committed (its
/// commit never reached it): the value may be new to node 3, so the read
/// waits for node 3's promise like a change.
#[test]
fn a_read_of_a_value_not_known_committed_waits_for_a_silent_holder() {
    let mut c = Cluster::new(3);
    for i in 0..3 {
        c.nodes[i].want_lease(Millis(0), true);
    }
    c.run(Millis(0));
    // Node 1 creates the room; node 2 accepts but never sees the commit.
    c.nodes[0].propose(Millis(10), RequestId(1), proposal(1, Change::Create));
    c.run_losing(Millis(10), |_, to, m| {
        to == NodeId(2) && matches!(m, Message::Commit { .. })
    });
    assert!(c.nodes[1].known().is_none(), "node 2 missed the commit");
    c.nodes[1].propose(Millis(100), RequestId(2), Proposal::read(ChangeId(2)));
    c.run_losing(Millis(100), |_, to, _| to == NodeId(3));
    assert!(
        !c.replies.iter().any(|(node, _, _)| *node == NodeId(2)),
        "the read must wait for node 3: {:?}",
        c.replies
    );
}

#[test]
fn concurrent_proposers_both_commit_in_some_order() {
    let mut c = Cluster::new(3);
    c.nodes[0].propose(Millis(0), RequestId(1), proposal(1, Change::Create));
    c.run(Millis(0));
    let bob = Handle::of_modulus(b"bob");
    c.nodes[1].propose(Millis(1), RequestId(2), proposal(2, Change::Add(alice())));
    c.nodes[2].propose(Millis(1), RequestId(3), proposal(3, Change::Add(bob)));
    let mut now = 1;
    for _ in 0..200 {
        c.tick_all(Millis(now));
        if c.replies.len() == 3 {
            break;
        }
        now += 5;
    }
    assert_eq!(c.replies.len(), 3, "{:?}", c.replies);
    let final_state = c
        .nodes
        .iter()
        .map(|n| n.known().unwrap().1.clone())
        .max_by_key(|s| s.revision)
        .unwrap();
    assert_eq!(final_state.revision, Revision(3));
    assert!(final_state.is_member(&alice()) && final_state.is_member(&bob));
    let _ = RoomState::absent();
}

// Regression tests for bugs found by the model check (`model_check.rs`).

impl Cluster {
    /// Delivers the first message in flight from `from` to `to` whose kind
    /// (its `Debug` name) is `kind`.
    fn deliver(&mut self, now: Millis, from: u64, to: u64, kind: &str) {
        let at = self
            .inflight
            .iter()
            .position(|(f, t, m)| f.0 == from && t.0 == to && format!("{m:?}").starts_with(kind))
            .unwrap_or_else(|| {
                panic!(
                    "no {kind} from n{from} to n{to} in flight: {:?}",
                    self.inflight
                )
            });
        let (from, to, message) = self.inflight.remove(at).expect("found above");
        let index = to.0 as usize - 1;
        self.nodes[index].step(now, from, message);
        self.collect(index);
    }

    /// Crashes node `index` and restarts it from what it stored: its
    /// durable acceptor state and its last committed state. The messages it
    /// had addressed to itself die with it.
    fn restart(&mut self, index: usize, now: Millis) {
        let me = NodeId(index as u64 + 1);
        let old = &self.nodes[index];
        let config = Arc::new(old.config().clone());
        let known = old.known().cloned();
        let recovering_until = now.plus(config.lease.promise_ms());
        self.restarts += 1;
        let lease_seq_base = self.restarts << 32;
        self.nodes[index] = RoomReplica::new(
            config,
            self.durable[index].clone(),
            known,
            recovering_until,
            lease_seq_base,
        );
        self.inflight.retain(|(f, t, _)| !(*f == me && *t == me));
    }

    /// Node `index` proposes adding "user k" for every k in `users`
    /// (request and change id 10 + k).
    fn add_users(&mut self, index: usize, now: Millis, users: std::ops::Range<usize>) {
        for k in users {
            let handle = Handle::of_modulus(format!("user {k}").as_bytes());
            let request = RequestId(10 + k as u64);
            self.nodes[index].propose(
                now,
                request,
                proposal(request.0.into(), Change::Add(handle)),
            );
        }
    }

    /// Ticks every node each 10 ms from `from` until some node answers
    /// `request` (by 5 s at the latest); returns when, and the answer.
    fn tick_until_answered(&mut self, from: Millis, request: RequestId) -> (Millis, Outcome) {
        let mut now = from;
        loop {
            if let Some((_, _, outcome)) = self.replies.iter().find(|(_, r, _)| *r == request) {
                return (now, outcome.clone());
            }
            now = now.plus(10);
            assert!(
                now.0 < 5_000,
                "{request:?} never answered: {:?}",
                self.replies
            );
            self.tick_all(now);
        }
    }

    /// Every (ballot, value) the acceptors hold.
    fn accepted(&self) -> Vec<(Ballot, Arc<RoomState>)> {
        self.nodes
            .iter()
            .filter_map(|n| n.acceptor_state().accepted.clone())
            .collect()
    }
}

/// Bug B1: a proposer whose own messages lag behind its peers' answers
/// used to send accepts (and take the fast path) at ballots its own
/// acceptor had not promised. After a crash it restarted above that
/// acceptor's promise — at a ballot it had already used, now with another
/// value: two values accepted under one ballot, and histories that fork.
/// The proposer now waits for its own promise before accepting and takes
/// the fast path only if its own acceptor accepted.
#[test]
fn a_restarted_proposer_never_reuses_a_ballot() {
    let mut c = Cluster::new(3);
    c.nodes[0].propose(Millis(0), RequestId(1), proposal(1, Change::Create));
    c.run(Millis(0));
    let t = Millis(1);
    // A change at node 1 commits on the fast path while node 1's own accept
    // is still queued.
    c.nodes[0].propose(t, RequestId(2), proposal(2, Change::Remove(alice())));
    c.collect(0);
    c.deliver(t, 1, 2, "Accept");
    c.deliver(t, 1, 3, "Accept");
    c.deliver(t, 2, 1, "Accepted");
    c.deliver(t, 3, 1, "Accepted");
    assert_eq!(c.replies.len(), 2, "the change committed");
    assert!(
        !c.nodes[0].has_fast_path(),
        "no fast path: node 1's acceptor has not promised the next ballot"
    );
    // The next change, then a crash before node 1 hears from itself.
    let bob = Handle::of_modulus(b"bob");
    c.nodes[0].propose(t, RequestId(3), proposal(3, Change::Add(bob)));
    c.collect(0);
    assert!(
        matches!(c.inflight.back(), Some((_, _, Message::Prepare { .. }))),
        "the next change goes through phase 1"
    );
    let accepts_sent = [b(2, 1)];
    c.restart(0, t);
    c.nodes[0].propose(t, RequestId(4), proposal(4, Change::Add(alice())));
    c.collect(0);
    let Some((_, _, Message::Prepare { ballot })) = c.inflight.back() else {
        panic!("the restarted proposer starts with phase 1");
    };
    assert!(
        accepts_sent.iter().all(|b| b < ballot),
        "restarted at {ballot}, above every ballot it sent accepts at before"
    );
    // Whatever is delivered now, one ballot carries one value.
    c.run(t);
    let accepted = c.accepted();
    for (b1, v1) in &accepted {
        for (b2, v2) in &accepted {
            assert!(b1 != b2 || v1 == v2, "two values accepted at {b1}");
        }
    }
}

/// The first half of the B1 fix on its own: promises from a majority of
/// peers are not enough, the proposer's own acceptor must have promised.
#[test]
fn a_proposer_accepts_only_after_its_own_promise() {
    let mut c = Cluster::new(3);
    c.nodes[0].propose(Millis(0), RequestId(1), proposal(1, Change::Create));
    c.collect(0);
    c.deliver(Millis(0), 1, 2, "Prepare");
    c.deliver(Millis(0), 1, 3, "Prepare");
    c.deliver(Millis(0), 2, 1, "Promise");
    c.deliver(Millis(0), 3, 1, "Promise");
    assert!(
        !c.inflight
            .iter()
            .any(|(_, _, m)| matches!(m, Message::Accept { .. })),
        "no accept before node 1's own promise"
    );
    c.deliver(Millis(0), 1, 1, "Prepare");
    c.deliver(Millis(0), 1, 1, "Promise");
    assert_eq!(
        c.inflight
            .iter()
            .filter(|(_, _, m)| matches!(m, Message::Accept { .. }))
            .count(),
        3
    );
}

/// Bug B2: a lease holder's pending mark is volatile, but proposers count
/// its answer to an accept as its acknowledgement. A holder that answered
/// (here: refused, having promised its own higher ballot), crashed and got
/// fresh grants from grantors that had not yet accepted the value read its
/// stale copy after the value committed. A restarted replica now treats
/// everything up to its durable promise as pending.
#[test]
fn a_restarted_holder_does_not_read_what_it_acknowledged_before() {
    let mut c = Cluster::new(3);
    c.nodes[0].propose(Millis(0), RequestId(1), proposal(1, Change::Create));
    c.run(Millis(0));
    let t = Millis(1);
    // Node 3 starts its own round; its acceptor promises the higher ballot.
    let bob = Handle::of_modulus(b"bob");
    c.nodes[2].propose(t, RequestId(2), proposal(2, Change::Add(bob)));
    c.collect(2);
    c.deliver(t, 3, 3, "Prepare");
    // Node 1's fast-path accept reaches node 3, which refuses it.
    c.nodes[0].propose(t, RequestId(3), proposal(3, Change::Add(alice())));
    c.collect(0);
    c.deliver(t, 1, 1, "Accept");
    c.deliver(t, 1, 1, "Accepted");
    c.deliver(t, 1, 3, "Accept");
    c.deliver(t, 3, 1, "Nack");
    // Node 3 restarts, asks for a lease and gets one from node 2, which
    // has not seen the accept yet.
    c.restart(2, t);
    c.inflight.retain(|(_, to, _)| to.0 != 3);
    c.nodes[2].want_lease(t, true);
    c.collect(2);
    c.deliver(t, 3, 3, "LeaseRequest");
    c.deliver(t, 3, 3, "LeaseGrant");
    c.deliver(t, 3, 2, "LeaseRequest");
    c.deliver(t, 2, 3, "LeaseGrant");
    // Node 2 accepts and reports node 3 as a holder; node 1 counts node 3's
    // refusal from before the crash and commits.
    c.deliver(t, 1, 2, "Accept");
    c.deliver(t, 2, 1, "Accepted");
    let committed = c
        .replies
        .iter()
        .any(|(_, r, o)| *r == RequestId(3) && matches!(o, Outcome::Decided { .. }));
    assert!(committed, "revision 2 committed");
    assert_eq!(c.nodes[2].read(t), Err(ReadError::Pending));
    // Only a commit at or above the promise node 3 made before the crash
    // lifts the block: the commit of revision 2 is below it.
    c.run(t);
    assert_eq!(c.nodes[2].read(t), Err(ReadError::Pending));
    // A consensus read from node 3 itself, as a node falls back to when a
    // local read is refused, commits above it.
    c.nodes[2].propose(t, RequestId(4), Proposal::read(ChangeId(4)));
    c.run(t);
    assert!(c.nodes[2].read(t).is_ok_and(|s| s.revision == Revision(2)));
}

/// Bug B3: a lease holder numbered its requests from zero in every
/// incarnation, so a grant that answered a request sent before a crash
/// was taken as an answer to the first request after it, and counted from
/// the later send time. Each incarnation now numbers from its own base.
#[test]
fn a_grant_for_a_request_from_before_a_restart_is_ignored() {
    let mut c = Cluster::new(3);
    c.nodes[0].propose(Millis(0), RequestId(1), proposal(1, Change::Create));
    c.run(Millis(0));
    let t = Millis(10);
    c.nodes[2].want_lease(t, true);
    c.collect(2);
    c.deliver(t, 3, 2, "LeaseRequest");
    // Node 3 crashes with node 2's grant still in flight.
    c.restart(2, t);
    c.inflight.retain(|(from, to, m)| {
        (from.0, to.0) == (2, 3) && matches!(m, Message::LeaseGrant { .. })
    });
    let later = Millis(60);
    c.nodes[2].want_lease(later, true);
    c.collect(2);
    c.deliver(later, 3, 3, "LeaseRequest");
    c.deliver(later, 3, 3, "LeaseGrant");
    // The old grant arrives: it must not count for the new request.
    c.deliver(later, 2, 3, "LeaseGrant");
    assert_eq!(c.nodes[2].read(later), Err(ReadError::NoLease));
    // The new request's own grant from node 2 does count.
    c.deliver(later, 3, 2, "LeaseRequest");
    c.deliver(later, 2, 3, "LeaseGrant");
    assert_ne!(c.nodes[2].read(later), Err(ReadError::NoLease));
}

/// Runs a change at node 1 whose accept is chosen while node 1 hears none
/// of the answers, lets node 2 commit `intervening` other changes (the
/// first removes alice again), then lets node 1 retry. Returns node 1's
/// answer and the committed state after the retry.
fn retry_after(intervening: usize) -> (Outcome, Arc<RoomState>) {
    let mut c = Cluster::new(3);
    c.nodes[0].propose(Millis(0), RequestId(1), proposal(1, Change::Create));
    c.run(Millis(0));
    let t = Millis(1);
    c.nodes[0].propose(t, RequestId(2), proposal(2, Change::Add(alice())));
    c.collect(0);
    c.deliver(t, 1, 1, "Accept");
    c.deliver(t, 1, 2, "Accept");
    // Revision 2 is chosen (nodes 1 and 2 accepted); every answer is lost.
    c.inflight.clear();
    let aborted = t.plus(c.nodes[0].config().proposer.round_timeout_ms);
    c.nodes[0].tick(aborted);
    c.collect(0);
    assert!(c.replies.iter().all(|(_, r, _)| *r != RequestId(2)));
    c.nodes[1].propose(aborted, RequestId(3), proposal(3, Change::Remove(alice())));
    c.add_users(1, aborted, 1..intervening);
    c.run(aborted);
    let (now, outcome) = c.tick_until_answered(aborted, RequestId(2));
    c.nodes[1].propose(now, RequestId(4), Proposal::read(ChangeId(4)));
    c.run(now);
    let state = c.nodes[1].known().expect("a committed state").1.clone();
    (outcome, state)
}

/// A retried change is recognised by its id while its first application
/// is within the last `RECENT_CHANGES_MAX` revisions: it reports that
/// application and applies nothing again.
#[test]
fn a_retry_within_the_dedup_window_applies_nothing_twice() {
    let (outcome, state) = retry_after(10);
    let Outcome::Decided { result, .. } = outcome else {
        panic!("expected a decision, got {outcome:?}");
    };
    assert_eq!(result.map(|a| a.revision), Ok(Revision(2)));
    assert!(!state.is_member(&alice()), "alice was added twice");
    assert_eq!(state.revision, Revision(12));
}

/// Beyond the window the proposer cannot tell whether its first accept was
/// chosen. It used to apply the change again (here: re-adding a member
/// removed since); it now answers `Unavailable`.
#[test]
fn a_retry_beyond_the_dedup_window_is_not_applied_twice() {
    let (outcome, state) = retry_after(RECENT_CHANGES_MAX + 1);
    assert_eq!(outcome, Outcome::Unavailable);
    assert!(!state.is_member(&alice()), "alice was added twice");
    assert_eq!(state.revision.0, 2 + RECENT_CHANGES_MAX as u64 + 1);
}

/// A forged prepare at round `u64::MAX` reaching a majority once froze a
/// room: the acceptors promised it, and the proposer's next round
/// overflowed. Replicas now drop rounds past `Ballot::ROUND_MAX`.
#[test]
fn an_absurd_ballot_is_dropped_and_the_room_keeps_changing() {
    let mut c = Cluster::new(3);
    c.nodes[0].propose(Millis(0), RequestId(1), proposal(1, Change::Create));
    c.run(Millis(0));
    for i in 1..3 {
        c.nodes[i].step(
            Millis(1),
            NodeId(3),
            Message::Prepare {
                ballot: b(u64::MAX, 3),
            },
        );
        c.nodes[i].step(
            Millis(1),
            NodeId(3),
            Message::Prepare {
                ballot: b(Ballot::ROUND_MAX + 1, 3),
            },
        );
        assert!(c.nodes[i].acceptor_state().promised.is_sane());
        c.collect(i);
    }
    c.inflight.clear();
    c.nodes[0].propose(Millis(2), RequestId(2), proposal(2, Change::Add(alice())));
    c.run(Millis(2));
    let (_, _, Outcome::Decided { result, .. }) = &c.replies[1] else {
        panic!("{:?}", c.replies)
    };
    assert_eq!(result.as_ref().unwrap().revision, Revision(2));
}

/// An acceptor that reports a lease holder with `u64::MAX` milliseconds
/// left cannot hold a change back for longer than an honest promise.
#[test]
fn a_lying_holder_report_delays_commit_no_longer_than_an_honest_promise() {
    let mut c = Cluster::new(3);
    c.nodes[0].propose(Millis(0), RequestId(1), proposal(1, Change::Create));
    c.run(Millis(0));
    c.nodes[0].propose(Millis(100), RequestId(2), proposal(2, Change::Add(alice())));
    c.collect(0);
    while let Some((from, to, m)) = c.inflight.pop_front() {
        if to == NodeId(3) || from == NodeId(3) {
            continue;
        }
        let m = match m {
            Message::Accepted { ballot, .. } if from == NodeId(2) => Message::Accepted {
                ballot,
                holders: vec![(NodeId(3), u64::MAX)],
            },
            m => m,
        };
        let i = to.0 as usize - 1;
        c.nodes[i].step(Millis(100), from, m);
        c.collect(i);
    }
    assert_eq!(c.replies.len(), 1, "must wait for the reported holder");
    let lease = c.nodes[0].config().lease;
    let deadline = 100 + lease.wait_ms(lease.promise_ms());
    c.nodes[0].tick(Millis(deadline));
    c.collect(0);
    assert_eq!(c.replies.len(), 2, "{:?}", c.replies);
}

/// A room at `Revision::MAX` refuses further changes instead of wrapping.
#[test]
fn a_room_at_its_last_revision_refuses_changes() {
    let mut state = RoomState::default();
    saferchat_consensus::apply(&mut state, &proposal(1, Change::Create)).unwrap();
    state.revision = Revision::MAX;
    assert_eq!(
        saferchat_consensus::apply(&mut state, &proposal(2, Change::Add(alice()))),
        Err(saferchat_consensus::ChangeError::RevisionsExhausted)
    );
    assert!(saferchat_consensus::apply(&mut state, &proposal(3, Change::Read)).is_ok());
}

// Tests of the replica's smaller accessors and timers, written for the
// mutants that survived the rest of this file and the unit tests (see
// specs/README.md, "Mutation testing"). The node relies on each of them:
// `next_wakeup` schedules its timers, `proposing` and `lease_wanted`
// decide when a room may be unloaded, `read_until` bounds a cached view.

/// The state a created room has after `Cluster::new(n)` and one Create.
fn created(n: u64) -> Cluster {
    let mut c = Cluster::new(n);
    c.nodes[0].propose(Millis(0), RequestId(1), proposal(1, Change::Create));
    c.run(Millis(0));
    c
}

#[test]
fn ready_is_empty_only_with_nothing_to_do() {
    assert!(Ready::default().is_empty());
    let state = Arc::new(RoomState::absent());
    let readies = [
        Ready {
            persist: Some(AcceptorState::default()),
            ..Ready::default()
        },
        Ready {
            messages: vec![(NodeId(1), Message::Prepare { ballot: b(1, 1) })],
            ..Ready::default()
        },
        Ready {
            replies: vec![(RequestId(1), Outcome::Unavailable)],
            ..Ready::default()
        },
        Ready {
            committed: Some((b(1, 1), state)),
            ..Ready::default()
        },
    ];
    for ready in readies {
        assert!(!ready.is_empty(), "{ready:?}");
    }
}

#[test]
fn a_lease_is_wanted_renewed_on_time_and_read_until_it_ends() {
    let mut c = created(3);
    let node = &c.nodes[0];
    assert!(!node.proposing(), "the Create is committed");
    assert!(!node.lease_wanted());
    assert_eq!(node.next_wakeup(Millis(0)), None, "nothing to do");
    assert_eq!(node.read_until(Millis(0)), None);
    c.lease_all(Millis(10));
    let lease = c.nodes[0].config().lease;
    let node = &c.nodes[0];
    assert!(node.lease_wanted());
    // The grants count from the request sent at 10; the renewal is due
    // `renew_every_ms` later (before any promise of the grantors ends).
    let (state, until) = node.read_until(Millis(11)).expect("a lease");
    assert_eq!(state.revision, Revision(1));
    assert_eq!(until, Millis(10 + lease.lease_ms));
    assert_eq!(
        node.next_wakeup(Millis(11)),
        Some(Millis(10 + lease.renew_every_ms))
    );
    c.nodes[0].want_lease(Millis(20), false);
    assert!(!c.nodes[0].lease_wanted());
}

#[test]
fn lease_requests_from_nodes_that_may_not_hold_are_not_granted() {
    let mut c = created(3);
    let lease_ms = c.nodes[0].config().lease.lease_ms;
    let outsider = ReplicaConfig {
        holders: vec![NodeId(1), NodeId(2)],
        ..c.nodes[0].config().clone()
    };
    let mut node = RoomReplica::new(
        Arc::new(outsider),
        c.durable[0].clone(),
        c.nodes[0].known().cloned(),
        Millis(0),
        0,
    );
    node.step(
        Millis(5),
        NodeId(3),
        Message::LeaseRequest {
            seq: 1,
            lease_ms,
            epoch: 1,
        },
    );
    assert!(node.take_ready().messages.is_empty(), "n3 holds no leases");
    node.step(
        Millis(5),
        NodeId(2),
        Message::LeaseRequest {
            seq: 1,
            lease_ms,
            epoch: 1,
        },
    );
    assert!(matches!(
        node.take_ready().messages.as_slice(),
        [(NodeId(2), Message::LeaseGrant { seq: 1, .. })]
    ));
    c.nodes[0].step(
        Millis(5),
        NodeId(3),
        Message::LeaseRequest {
            seq: 1,
            lease_ms,
            epoch: 1,
        },
    );
    assert_eq!(c.nodes[0].take_ready().messages.len(), 1);
}

#[test]
fn the_acceptor_state_is_the_vote_the_node_persisted() {
    let c = created(3);
    for i in 0..3 {
        assert_eq!(c.nodes[i].acceptor_state(), &c.durable[i]);
        assert!(c.durable[i].accepted.is_some());
    }
}

/// A 3- or 5-node cluster whose node 1 has sent Prepares for a Create,
/// none delivered. Rounds never time out in these tests.
fn preparing(n: u64) -> (Cluster, Ballot) {
    let mut c = Cluster::with(n, |config| config.proposer.round_timeout_ms = 60_000);
    c.nodes[0].propose(Millis(0), RequestId(1), proposal(1, Change::Create));
    c.collect(0);
    let ballot = match c.inflight.front() {
        Some((_, _, Message::Prepare { ballot })) => *ballot,
        other => panic!("expected a prepare, got {other:?}"),
    };
    c.inflight.clear();
    (c, ballot)
}

#[test]
fn a_round_refused_by_a_majority_in_phase_one_is_abandoned_at_once() {
    for n in [3, 5] {
        let (mut c, ballot) = preparing(n);
        assert!(c.nodes[0].proposing());
        let refused_by = |c: &mut Cluster, from: u64| {
            let nack = Message::Nack {
                ballot,
                promised: b(9, from),
                phase: saferchat_consensus::Phase::Prepare,
            };
            c.nodes[0].step(Millis(1), NodeId(from), nack);
            c.collect(0);
        };
        let tolerated = (n - 1) / 2;
        for from in 2..2 + tolerated {
            refused_by(&mut c, from);
            assert_eq!(
                c.nodes[0].next_wakeup(Millis(1)),
                Some(Millis(60_000)),
                "n={n}: {} of {n} refused; the round goes on",
                from - 1
            );
        }
        refused_by(&mut c, 2 + tolerated);
        // Abandoned: the proposal waits for the back-off (20-40 ms after
        // one failure with the default 20 ms base) before the next round.
        let retry = c.nodes[0].next_wakeup(Millis(1)).expect("a retry is due");
        assert!((21..=41).contains(&retry.0), "n={n}: retry at {retry:?}");
        assert!(c.nodes[0].proposing(), "the proposal is still queued");
        c.nodes[0].tick(retry);
        c.collect(0);
        assert!(
            c.inflight
                .iter()
                .any(|(_, _, m)| matches!(m, Message::Prepare { ballot: next } if *next > b(9, 2 + tolerated))),
            "n={n}: the retry outbids the refusals"
        );
    }
}

#[test]
fn a_queued_request_fails_at_its_deadline() {
    let (mut c, _) = preparing(3);
    let timeout = c.nodes[0].config().proposer.request_timeout_ms;
    c.nodes[0].propose(Millis(10), RequestId(2), proposal(2, Change::Add(alice())));
    c.collect(0);
    // The round's own request fails only when the round ends; the queued
    // one at its deadline.
    assert_eq!(
        c.nodes[0].next_wakeup(Millis(10)),
        Some(Millis(10 + timeout))
    );
    c.nodes[0].tick(Millis(10 + timeout - 1));
    c.collect(0);
    assert!(c.replies.is_empty(), "{:?}", c.replies);
    c.nodes[0].tick(Millis(10 + timeout));
    c.collect(0);
    assert_eq!(
        c.replies,
        vec![(NodeId(1), RequestId(2), Outcome::Unavailable)]
    );
}

#[test]
fn the_fast_path_is_dropped_only_for_a_higher_promise_or_a_commit_at_or_above_it() {
    let mut c = created(3);
    // Node 1 committed at (1, n1) and holds the fast path at (2, n1).
    assert!(c.nodes[0].has_fast_path());
    let nack = |promised| Message::Nack {
        ballot: b(7, 1),
        promised,
        phase: saferchat_consensus::Phase::Accept,
    };
    c.nodes[0].step(Millis(1), NodeId(2), nack(b(1, 3)));
    assert!(c.nodes[0].has_fast_path(), "a lower promise");
    c.nodes[0].step(Millis(1), NodeId(2), nack(b(2, 1)));
    assert!(c.nodes[0].has_fast_path(), "the fast path's own ballot");
    c.nodes[0].step(Millis(1), NodeId(2), nack(b(2, 2)));
    assert!(!c.nodes[0].has_fast_path(), "a higher promise");

    let mut c = created(3);
    let value = c.nodes[0].known().expect("committed").1.clone();
    let commit = |ballot| Message::Commit {
        ballot,
        value: Arc::clone(&value),
    };
    c.nodes[0].step(Millis(1), NodeId(2), commit(b(1, 2)));
    assert!(c.nodes[0].has_fast_path(), "a commit below the fast path");
    c.nodes[0].step(Millis(1), NodeId(2), commit(b(2, 1)));
    assert!(!c.nodes[0].has_fast_path(), "a commit at its ballot");
    c.collect(0);
}

/// A round with a quorum that waits for a silent holder wakes up when
/// that holder's promise runs out, not at the round timeout.
#[test]
fn a_waiting_round_wakes_when_the_silent_holders_promise_ends() {
    let mut c = Cluster::with(3, |config| config.proposer.round_timeout_ms = 60_000);
    c.nodes[0].propose(Millis(0), RequestId(1), proposal(1, Change::Create));
    c.run(Millis(0));
    // Only node 3 holds a lease, then falls silent.
    c.nodes[2].want_lease(Millis(10), true);
    c.run(Millis(10));
    c.nodes[0].propose(Millis(100), RequestId(2), proposal(2, Change::Add(alice())));
    c.run_losing(Millis(100), |_, to, _| to == NodeId(3));
    let lease = c.nodes[0].config().lease;
    // Node 1's own promise to node 3 ends first (it wakes for that too)…
    let promise_end = Millis(10 + lease.promise_ms());
    assert_eq!(c.nodes[0].next_wakeup(Millis(100)), Some(promise_end));
    c.nodes[0].tick(promise_end);
    c.collect(0);
    assert_eq!(c.replies.len(), 1, "still waiting for node 3");
    // …then the wait for node 3, stretched by the drift cover.
    let remaining = 10 + lease.promise_ms() - 100;
    let deadline = Millis(100 + lease.wait_ms(remaining));
    assert!(deadline > promise_end && deadline.0 < 60_000);
    assert_eq!(c.nodes[0].next_wakeup(promise_end), Some(deadline));
    c.nodes[0].tick(deadline);
    c.collect(0);
    assert_eq!(c.replies.len(), 2, "committed once the wait ran out");
}

/// The other side of the dedup window (`a_retry_beyond_the_dedup_window…`):
/// a change whose first accept was never chosen is applied by a retry
/// while the base is at most `RECENT_CHANGES_MAX` revisions past the
/// first attempt's base (absence from `recent` then proves it was not
/// applied), and refused beyond.
#[test]
fn an_unchosen_change_retried_at_the_edge_of_the_window_is_applied() {
    for (intervening, applied) in [(RECENT_CHANGES_MAX, true), (RECENT_CHANGES_MAX + 1, false)] {
        let mut c = created(3);
        let t = Millis(1);
        c.nodes[0].propose(t, RequestId(2), proposal(2, Change::Add(alice())));
        c.collect(0);
        // Only node 1's own acceptor gets the accept: never chosen.
        c.deliver(t, 1, 1, "Accept");
        c.inflight.clear();
        let aborted = t.plus(c.nodes[0].config().proposer.round_timeout_ms);
        c.nodes[0].tick(aborted);
        c.collect(0);
        c.inflight.clear();
        c.add_users(1, aborted, 0..intervening);
        // Node 1 hears nothing until node 2 is done, so its accepted value
        // is not recovered by node 2's phase 1.
        c.run_losing(aborted, |from, _, _| from == NodeId(1));
        let (_, outcome) = c.tick_until_answered(aborted, RequestId(2));
        let base = 1 + intervening as u64;
        if applied {
            let Outcome::Decided { result, state } = outcome else {
                panic!("expected a decision, got {outcome:?}");
            };
            assert_eq!(result.as_ref().map(|a| a.revision), Ok(Revision(base + 1)));
            assert!(state.is_member(&alice()));
        } else {
            assert_eq!(outcome, Outcome::Unavailable);
        }
    }
}
