//! A room's replicas and the map epoch of their acceptor set: ballots
//! order by epoch first, and a replica proposes, accepts and grants leases
//! only in its own epoch (`specs/Reconfiguration.tla`, steps 1 and the
//! grant fence). Exact inputs, exact outputs.

use std::sync::Arc;

use saferchat_consensus::{
    AcceptorState, Ballot, Change, ChangeId, Message, Millis, NodeId, Outcome, Phase, Proposal,
    ReplicaConfig, RequestId, RoomReplica,
};

fn config(me: u64, epoch: u64) -> ReplicaConfig {
    let all: Vec<NodeId> = (1..=3).map(NodeId).collect();
    ReplicaConfig {
        me: NodeId(me),
        replicas: all.clone(),
        holders: all,
        epoch,
        ..ReplicaConfig::single(NodeId(me))
    }
}

fn replica(me: u64, epoch: u64, durable: AcceptorState) -> RoomReplica {
    RoomReplica::new(Arc::new(config(me, epoch)), durable, None, Millis(0), 0)
}

fn ballot(epoch: u64, round: u64, node: u64) -> Ballot {
    Ballot {
        epoch,
        round,
        node: NodeId(node),
    }
}

fn create(id: u128) -> Proposal {
    Proposal {
        id: ChangeId(id),
        change: Change::Create,
        expected: None,
    }
}

#[test]
fn a_ballot_of_a_later_epoch_is_above_every_ballot_of_an_earlier_one() {
    assert!(ballot(2, 1, 1) > ballot(1, 1_000, 3));
    assert!(
        ballot(1, 0, 0) > Ballot::ZERO,
        "stored before epochs: epoch 0"
    );
    assert_eq!(
        ballot(2, 7, 3).successor(),
        Some(ballot(2, 8, 3)),
        "a successor keeps its epoch"
    );
}

#[test]
fn an_acceptor_refuses_an_earlier_epoch_and_the_proposer_gives_up_on_it() {
    // Node 1 still runs epoch 1; node 2 knows epoch 2.
    let mut old = replica(1, 1, AcceptorState::default());
    let mut new = replica(2, 2, AcceptorState::default());
    old.propose(Millis(0), RequestId(1), create(1));
    let prepare = old
        .take_ready()
        .messages
        .into_iter()
        .find(|(to, _)| *to == NodeId(2))
        .map(|(_, m)| m)
        .expect("a prepare to node 2");
    let Message::Prepare { ballot: sent } = prepare else {
        panic!("{prepare:?}");
    };
    assert_eq!(sent.epoch, 1);
    new.step(Millis(0), NodeId(1), prepare);
    let ready = new.take_ready();
    assert!(ready.persist.is_none(), "nothing promised");
    assert_eq!(
        ready.messages,
        vec![(
            NodeId(1),
            Message::Nack {
                ballot: sent,
                promised: Ballot::floor_of(2),
                phase: Phase::Prepare,
            }
        )]
    );
    // A second acceptor refuses too: the round is lost, and no ballot of
    // epoch 1 can win again, so the proposal fails at once.
    for from in [2, 3] {
        old.step(
            Millis(1),
            NodeId(from),
            Message::Nack {
                ballot: sent,
                promised: Ballot::floor_of(2),
                phase: Phase::Prepare,
            },
        );
    }
    let mut ready = old.take_ready();
    assert_eq!(
        ready.newer_epoch,
        Some(2),
        "node 1 learns its map is behind"
    );
    for at in [10, 100, 1_000, 10_000] {
        old.tick(Millis(at));
        let next = old.take_ready();
        ready.replies.extend(next.replies);
        assert!(
            !next
                .messages
                .iter()
                .any(|(_, m)| matches!(m, Message::Prepare { .. })),
            "no new round in epoch 1: {:?}",
            next.messages
        );
    }
    assert_eq!(ready.replies, vec![(RequestId(1), Outcome::Unavailable)]);
}

#[test]
fn an_acceptor_answers_nothing_of_a_later_epoch() {
    let mut behind = replica(2, 1, AcceptorState::default());
    for message in [
        Message::Prepare {
            ballot: ballot(2, 1, 3),
        },
        Message::LeaseRequest {
            seq: 1,
            lease_ms: 2_000,
            epoch: 2,
        },
    ] {
        behind.step(Millis(0), NodeId(3), message);
        let ready = behind.take_ready();
        assert!(ready.messages.is_empty() && ready.persist.is_none());
        assert_eq!(ready.newer_epoch, Some(2));
    }
    assert_eq!(behind.acceptor_state().promised, Ballot::ZERO);
}

#[test]
fn a_grantor_grants_only_in_its_epoch_and_not_once_a_later_one_sealed_it() {
    let request = |epoch| Message::LeaseRequest {
        seq: 1,
        lease_ms: 2_000,
        epoch,
    };
    let mut grantor = replica(2, 2, AcceptorState::default());
    grantor.step(Millis(0), NodeId(3), request(1));
    assert!(
        grantor.take_ready().messages.is_empty(),
        "no lease of an earlier epoch"
    );
    grantor.step(Millis(0), NodeId(3), request(2));
    assert!(matches!(
        grantor.take_ready().messages.as_slice(),
        [(NodeId(3), Message::LeaseGrant { seq: 1, .. })]
    ));
    // A grantor whose durable promise is of epoch 3 (sealed by the next
    // set's mover) while its map still says 2 grants nothing: epoch 3's
    // transfer waits only for the leases its seal was told of.
    let mut sealed = replica(
        2,
        2,
        AcceptorState {
            promised: ballot(3, 0, 4),
            accepted: None,
        },
    );
    sealed.step(Millis(0), NodeId(3), request(2));
    assert!(sealed.take_ready().messages.is_empty());
}

#[test]
fn ballots_stored_before_epochs_are_outbid_by_the_first_epoch() {
    // A data folder from before epochs: promised round 50 (epoch 0).
    let mut node = RoomReplica::new(
        Arc::new(ReplicaConfig::single(NodeId(1))),
        AcceptorState {
            promised: ballot(0, 50, 2),
            accepted: None,
        },
        None,
        Millis(0),
        0,
    );
    node.propose(Millis(0), RequestId(7), create(7));
    let mut replies = Vec::new();
    for _ in 0..8 {
        let ready = node.take_ready();
        replies.extend(ready.replies);
        if ready.messages.is_empty() {
            break;
        }
        for (to, m) in ready.messages {
            assert_eq!(to, NodeId(1));
            if let Message::Prepare { ballot } | Message::Accept { ballot, .. } = &m {
                assert_eq!(
                    (ballot.epoch, ballot.round),
                    (1, 51),
                    "epoch 1, and a round above every round seen"
                );
            }
            node.step(Millis(0), NodeId(1), m);
        }
    }
    assert!(
        matches!(
            replies.as_slice(),
            [(RequestId(7), Outcome::Decided { .. })]
        ),
        "{replies:?}"
    );
}

#[test]
fn news_of_a_later_epoch_comes_from_any_answer_and_only_a_later_one_counts() {
    let later = Some((ballot(2, 3, 3), saferchat_consensus::Revision(4)));
    let value = Arc::new(saferchat_consensus::RoomState::absent());
    let answers = [
        (
            Message::Nack {
                ballot: ballot(1, 1, 1),
                promised: ballot(2, 3, 3),
                phase: Phase::Accept,
            },
            Some(2),
        ),
        (
            Message::Promise {
                ballot: ballot(1, 1, 1),
                accepted: Some((ballot(2, 3, 3), Arc::clone(&value))),
            },
            Some(2),
        ),
        (
            Message::LeaseGrant {
                seq: 0,
                accepted: later,
            },
            Some(2),
        ),
        // The same epoch is no news.
        (
            Message::Nack {
                ballot: ballot(1, 1, 1),
                promised: ballot(1, 3, 3),
                phase: Phase::Accept,
            },
            None,
        ),
        (
            Message::Promise {
                ballot: ballot(1, 1, 1),
                accepted: Some((ballot(1, 3, 3), Arc::clone(&value))),
            },
            None,
        ),
    ];
    for (answer, news) in answers {
        let mut node = replica(1, 1, AcceptorState::default());
        node.step(Millis(0), NodeId(2), answer.clone());
        assert_eq!(node.take_ready().newer_epoch, news, "{answer:?}");
    }
}

#[test]
fn an_earlier_accept_is_refused_and_still_counts_as_seen_by_the_holder() {
    // Node 2 knows epoch 2 and holds a lease on revision 1; node 1 still
    // proposes revision 2 in epoch 1.
    let known = Arc::new(saferchat_consensus::RoomState {
        revision: saferchat_consensus::Revision(1),
        created: true,
        ..saferchat_consensus::RoomState::default()
    });
    let mut node = RoomReplica::new(
        Arc::new(config(2, 2)),
        AcceptorState::default(),
        Some((ballot(2, 1, 2), known)),
        Millis(0),
        0,
    );
    node.want_lease(Millis(0), true);
    let requests = node.take_ready().messages;
    assert!(
        requests
            .iter()
            .all(|(_, m)| matches!(m, Message::LeaseRequest { epoch: 2, .. })),
        "{requests:?}"
    );
    for from in [2, 3] {
        node.step(
            Millis(1),
            NodeId(from),
            Message::LeaseGrant {
                seq: 0,
                accepted: None,
            },
        );
    }
    node.take_ready();
    assert!(node.read(Millis(2)).is_ok(), "a local read under the lease");
    let value = Arc::new(saferchat_consensus::RoomState {
        revision: saferchat_consensus::Revision(2),
        created: true,
        ..saferchat_consensus::RoomState::default()
    });
    node.step(
        Millis(0),
        NodeId(1),
        Message::Accept {
            ballot: ballot(1, 4, 1),
            value,
            next: None,
        },
    );
    let ready = node.take_ready();
    assert_eq!(
        ready.messages,
        vec![(
            NodeId(1),
            Message::Nack {
                ballot: ballot(1, 4, 1),
                promised: Ballot::floor_of(2),
                phase: Phase::Accept,
            }
        )]
    );
    assert!(ready.persist.is_none(), "nothing accepted");
    assert_eq!(node.acceptor_state().accepted, None);
    assert_eq!(
        node.read(Millis(3)).err(),
        Some(saferchat_consensus::ReadError::Pending),
        "the refusal tells the proposer this holder saw the accept, so it reads no more until it learns"
    );
}

fn room_value(revision: u64) -> Arc<saferchat_consensus::RoomState> {
    Arc::new(saferchat_consensus::RoomState {
        revision: saferchat_consensus::Revision(revision),
        created: true,
        ..saferchat_consensus::RoomState::default()
    })
}

#[test]
fn a_seal_promises_the_step_reports_the_room_and_its_leases_and_fences_epoch_1() {
    let accepted = (ballot(1, 4, 1), room_value(3));
    let mut node = replica(
        2,
        1,
        AcceptorState {
            promised: ballot(1, 5, 1),
            accepted: Some(accepted.clone()),
        },
    );
    // A lease granted to node 3 at 1,000 (promise_ms of the default
    // lease config from then).
    node.step(
        Millis(1_000),
        NodeId(3),
        Message::LeaseRequest {
            seq: 1,
            lease_ms: 2_000,
            epoch: 1,
        },
    );
    node.take_ready();
    let promise_ms = config(2, 1).lease.promise_ms();

    let below = node.seal(Millis(1_000), ballot(1, 2, 3));
    assert_eq!(
        below.accepted,
        Some(accepted.clone()),
        "a seal below the promise keeps the promise and still hears what was accepted"
    );
    assert!(node.take_ready().persist.is_none());
    assert_eq!(node.acceptor_state().promised, ballot(1, 5, 1));
    let sealed = node.seal(Millis(1_500), ballot(2, 0, 1));
    assert_eq!(sealed.accepted, Some(accepted));
    assert_eq!(sealed.lease_left_ms, promise_ms - 500);
    let ready = node.take_ready();
    assert_eq!(
        ready.persist.map(|s| s.promised),
        Some(ballot(2, 0, 1)),
        "durable before the answer leaves"
    );
    // A change proposed here now fails at once: epoch 1 cannot win again.
    node.propose(Millis(1_500), RequestId(9), create(9));
    assert_eq!(
        node.take_ready().replies,
        vec![(RequestId(9), Outcome::Unavailable)]
    );
    // Sealed again at the same ballot (a resend): nothing new to persist.
    node.seal(Millis(1_600), ballot(2, 0, 1));
    assert!(node.take_ready().persist.is_none());
    // A lower seal leaves the promise where it is.
    node.seal(Millis(1_600), ballot(1, 9, 3));
    assert!(node.take_ready().persist.is_none());
    assert_eq!(node.acceptor_state().promised, ballot(2, 0, 1));
    // Epoch 1 is fenced: an Accept is refused, no lease granted.
    node.step(
        Millis(1_700),
        NodeId(1),
        Message::Accept {
            ballot: ballot(1, 5, 1),
            value: room_value(4),
            next: None,
        },
    );
    node.step(
        Millis(1_700),
        NodeId(3),
        Message::LeaseRequest {
            seq: 2,
            lease_ms: 2_000,
            epoch: 1,
        },
    );
    let ready = node.take_ready();
    assert!(ready.persist.is_none());
    assert_eq!(
        ready.messages,
        vec![(
            NodeId(1),
            Message::Nack {
                ballot: ballot(1, 5, 1),
                promised: ballot(2, 0, 1),
                phase: Phase::Accept,
            }
        )]
    );
}

#[test]
fn a_seal_reports_no_lease_when_none_is_owed() {
    let mut node = replica(2, 1, AcceptorState::default());
    let sealed = node.seal(Millis(0), ballot(2, 0, 1));
    assert_eq!(sealed.accepted, None);
    assert_eq!(sealed.lease_left_ms, 0);
}

#[test]
fn an_install_accepts_the_transfer_once_and_the_holder_waits_for_a_commit_above_it() {
    let transfer = ballot(2, 0, 1);
    let value = room_value(3);
    // Node 2 of epoch 2, sealed at the transfer's ballot.
    let mut node = replica(
        2,
        2,
        AcceptorState {
            promised: transfer,
            accepted: Some((ballot(1, 4, 1), room_value(2))),
        },
    );
    assert_eq!(
        node.install(ballot(1, 9, 1), &value),
        Err(transfer),
        "below the promise"
    );
    assert!(node.take_ready().persist.is_none());
    assert_eq!(node.install(transfer, &value), Ok(true));
    assert_eq!(
        node.take_ready().persist,
        Some(AcceptorState {
            promised: transfer,
            accepted: Some((transfer, Arc::clone(&value))),
        })
    );
    assert_eq!(node.install(transfer, &value), Ok(false), "a resend");
    assert!(node.take_ready().persist.is_none());
    assert_eq!(
        node.install(transfer, &room_value(4)),
        Err(transfer),
        "another value at the same ballot is refused, not a panic"
    );
    assert_eq!(
        node.acceptor_state().accepted,
        Some((transfer, Arc::clone(&value)))
    );
}

#[test]
fn a_holder_stops_reading_at_an_install_until_it_learns_a_commit_at_or_above_it() {
    let transfer = ballot(2, 0, 1);
    let before = (ballot(2, 0, 1), room_value(3));
    let mut node = replica(
        2,
        2,
        AcceptorState {
            promised: transfer,
            accepted: None,
        },
    );
    // Node 2 knows revision 3 committed and holds a lease on it from 1
    // and 3.
    node.step(
        Millis(0),
        NodeId(1),
        Message::Commit {
            ballot: before.0,
            value: Arc::clone(&before.1),
        },
    );
    node.want_lease(Millis(0), true);
    let seq = node
        .take_ready()
        .messages
        .iter()
        .find_map(|(_, m)| match m {
            Message::LeaseRequest { seq, .. } => Some(*seq),
            _ => None,
        })
        .expect("a lease request");
    for from in [1, 3] {
        node.step(
            Millis(1),
            NodeId(from),
            Message::LeaseGrant {
                seq,
                accepted: Some((before.0, before.1.revision)),
            },
        );
    }
    assert!(node.read(Millis(2)).is_ok(), "a lease on revision 3");
    let moved = ballot(2, 2, 1);
    let next = room_value(4);
    assert_eq!(node.install(moved, &next), Ok(true));
    assert!(
        node.read(Millis(3)).is_err(),
        "the holder saw a newer accepted value"
    );
    node.step(
        Millis(4),
        NodeId(1),
        Message::Commit {
            ballot: moved,
            value: Arc::clone(&next),
        },
    );
    assert_eq!(node.read(Millis(5)).map(|v| v.revision), Ok(next.revision));
}

#[test]
fn an_install_after_a_later_value_was_accepted_is_refused() {
    let mut node = replica(
        2,
        2,
        AcceptorState {
            promised: ballot(2, 0, 1),
            accepted: Some((ballot(2, 0, 1), room_value(3))),
        },
    );
    // Accepted a later value in epoch 2 at round 3 (an earlier install
    // went through and the epoch moved on).
    node.step(
        Millis(0),
        NodeId(1),
        Message::Accept {
            ballot: ballot(2, 3, 1),
            value: room_value(4),
            next: None,
        },
    );
    node.take_ready();
    assert_eq!(
        node.install(ballot(2, 0, 1), &room_value(3)),
        Err(ballot(2, 3, 1))
    );
}

/// Delivers the messages `nodes` (node `i + 1` at index `i`) have to send,
/// and what those cause, at `now` until none is left; returns the replies
/// node 1 gave its callers.
fn deliver_all(nodes: &mut [RoomReplica], now: Millis) -> Vec<(RequestId, Outcome)> {
    let mut replies = Vec::new();
    loop {
        let mut sent = Vec::new();
        for (i, node) in nodes.iter_mut().enumerate() {
            let ready = node.take_ready();
            if i == 0 {
                replies.extend(ready.replies);
            }
            let from = NodeId(i as u64 + 1);
            sent.extend(ready.messages.into_iter().map(|(to, m)| (from, to, m)));
        }
        if sent.is_empty() {
            return replies;
        }
        for (from, to, message) in sent {
            nodes[usize::try_from(to.0 - 1).unwrap()].step(now, from, message);
        }
    }
}

/// The Prepares in `ready`, by the ballot they carry, with how many nodes
/// each went to.
fn prepares(messages: &[(NodeId, Message)]) -> Vec<(Ballot, usize)> {
    let mut out: Vec<(Ballot, usize)> = Vec::new();
    for (_, m) in messages {
        if let Message::Prepare { ballot } = m {
            match out.iter_mut().find(|(b, _)| b == ballot) {
                Some((_, n)) => *n += 1,
                None => out.push((*ballot, 1)),
            }
        }
    }
    out
}

#[test]
fn a_request_queued_while_the_set_could_not_answer_goes_out_at_the_install_without_back_off() {
    // Node 1 runs epoch 2 before its partition is installed: the other
    // replicas drop its Prepares, so its rounds time out and back off.
    let mut node = replica(1, 2, AcceptorState::default());
    node.propose(Millis(0), RequestId(1), create(1));
    let mut highest = Ballot::ZERO;
    let mut now = Millis(0);
    let mut rounds = 0;
    while now < Millis(3_000) {
        let ready = node.take_ready();
        assert!(ready.replies.is_empty(), "not yet at its deadline");
        for (ballot, _) in prepares(&ready.messages) {
            highest = highest.max(ballot);
            rounds += 1;
        }
        let next = node.next_wakeup(now).expect("a round or a retry is due");
        assert!(next > now, "a wakeup after {now:?}: {next:?}");
        now = next;
        node.tick(now);
    }
    assert!(rounds >= 4, "{rounds} rounds");
    // Just after a wakeup nothing more is due.
    let ready = node.take_ready();
    for (ballot, _) in prepares(&ready.messages) {
        highest = highest.max(ballot);
    }
    let installed = Millis(now.0 + 1);
    node.tick(installed);
    assert!(
        prepares(&node.take_ready().messages).is_empty(),
        "nothing due one millisecond after a wakeup"
    );
    // The install: a round goes out at once, above every earlier one, to
    // every replica.
    node.acceptors_ready(installed);
    let ready = node.take_ready();
    let sent = prepares(&ready.messages);
    assert_eq!(sent.len(), 1, "{sent:?}");
    assert!(sent[0].0 > highest, "{sent:?} above {highest}");
    assert_eq!(sent[0].1, 3, "to every replica");
    // Installed replicas answer it: the change commits, well before its
    // deadline (5 s after it was queued).
    let mut nodes = vec![
        node,
        replica(2, 2, AcceptorState::default()),
        replica(3, 2, AcceptorState::default()),
    ];
    for (to, message) in ready.messages {
        nodes[usize::try_from(to.0 - 1).unwrap()].step(installed, NodeId(1), message);
    }
    let replies = deliver_all(&mut nodes, installed);
    assert!(
        matches!(
            replies.as_slice(),
            [(RequestId(1), Outcome::Decided { result: Ok(_), .. })]
        ),
        "{replies:?}"
    );
}
