//! Scripted tests of one room's replicas: feed inputs, assert the exact
//! commands that come out.

use std::collections::VecDeque;
use std::sync::Arc;

use saferchat_consensus::{
    AcceptorState, Ballot, Change, ChangeId, Handle, Message, Millis, NodeId, Outcome, Proposal,
    ReadError, Ready, ReplicaConfig, RequestId, Revision, RoomReplica, RoomState,
};

fn b(round: u64, node: u64) -> Ballot {
    Ballot {
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
}

impl Cluster {
    fn new(n: u64) -> Cluster {
        let ids: Vec<NodeId> = (1..=n).map(NodeId).collect();
        let nodes = ids
            .iter()
            .map(|me| {
                let config = ReplicaConfig {
                    me: *me,
                    replicas: ids.clone(),
                    holders: ids.clone(),
                    ..ReplicaConfig::single(*me)
                };
                RoomReplica::new(Arc::new(config), AcceptorState::default(), None, Millis(0))
            })
            .collect();
        Cluster {
            nodes,
            durable: vec![AcceptorState::default(); n as usize],
            inflight: VecDeque::new(),
            replies: Vec::new(),
            sent: 0,
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
        for i in 0..self.nodes.len() {
            self.collect(i);
        }
        while let Some((from, to, message)) = self.inflight.pop_front() {
            let index = to.0 as usize - 1;
            self.nodes[index].step(now, from, message);
            self.collect(index);
        }
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
    let mut c = Cluster::new(3);
    c.nodes[0].propose(Millis(0), RequestId(1), proposal(1, Change::Create));
    c.run(Millis(0));
    for i in 0..3 {
        c.nodes[i].want_lease(Millis(10), true);
    }
    c.run(Millis(10));
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
    let mut c = Cluster::new(3);
    c.nodes[0].propose(Millis(0), RequestId(1), proposal(1, Change::Create));
    c.run(Millis(0));
    for i in 0..3 {
        c.nodes[i].want_lease(Millis(10), true);
    }
    c.run(Millis(10));
    // Node 3 goes silent: drop everything addressed to it from now on.
    c.nodes[0].propose(Millis(100), RequestId(2), proposal(2, Change::Add(alice())));
    c.collect(0);
    while let Some((from, to, m)) = c.inflight.pop_front() {
        if to == NodeId(3) {
            continue;
        }
        let i = to.0 as usize - 1;
        c.nodes[i].step(Millis(100), from, m);
        c.collect(i);
    }
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
