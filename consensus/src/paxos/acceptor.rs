//! The acceptor: the durable half of Paxos.

use std::sync::Arc;

use crate::ids::Ballot;
use crate::message::{Message, Phase};
use crate::room::RoomState;

/// What an acceptor must keep across crashes. The node persists it
/// (durably) before any reply that depends on it leaves the node.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct AcceptorState {
    /// No prepare or accept below this ballot will be honoured.
    pub promised: Ballot,
    /// The last accepted ballot and value.
    pub accepted: Option<(Ballot, Arc<RoomState>)>,
}

/// An acceptor's answer to one message, and whether its durable state
/// changed (and must be persisted before the answer is sent).
#[derive(Debug, PartialEq, Eq)]
pub struct Answer {
    /// The reply to send back.
    pub reply: Message,
    /// Whether [`AcceptorState`] changed.
    pub changed: bool,
}

/// The acceptor of one room on one node.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct Acceptor {
    state: AcceptorState,
}

impl Acceptor {
    /// An acceptor restored from its durable state.
    pub fn restore(state: AcceptorState) -> Acceptor {
        Acceptor { state }
    }

    /// The durable state.
    pub fn state(&self) -> &AcceptorState {
        &self.state
    }

    /// Phase 1b. A repeated prepare at the promised ballot is promised
    /// again, so a retransmission gets the same answer.
    pub fn on_prepare(&mut self, ballot: Ballot) -> Answer {
        if ballot < self.state.promised {
            return self.nack(ballot, Phase::Prepare);
        }
        let changed = ballot > self.state.promised;
        self.state.promised = ballot;
        Answer {
            reply: Message::Promise {
                ballot,
                accepted: self.state.accepted.clone(),
            },
            changed,
        }
    }

    /// Phase 2b. Accepts at or above the promised ballot; `next` becomes
    /// the new promise.
    ///
    /// The caller adds the lease holders to the returned `Accepted` (the
    /// acceptor does not know about leases).
    pub fn on_accept(
        &mut self,
        ballot: Ballot,
        value: &Arc<RoomState>,
        next: Option<Ballot>,
    ) -> Answer {
        if ballot < self.state.promised {
            return self.nack(ballot, Phase::Accept);
        }
        if let Some((accepted_ballot, accepted_value)) = &self.state.accepted {
            // One ballot, one value: a proposer never sends two values
            // under the same ballot.
            assert!(
                *accepted_ballot != ballot || accepted_value == value,
                "two values accepted under ballot {ballot}"
            );
            assert!(*accepted_ballot <= ballot, "accepted ballot went backwards");
        }
        let promised = next.map_or(ballot, |next| next.max(ballot));
        let new_state = AcceptorState {
            promised,
            accepted: Some((ballot, Arc::clone(value))),
        };
        let changed = new_state != self.state;
        self.state = new_state;
        Answer {
            reply: Message::Accepted {
                ballot,
                holders: Vec::new(),
            },
            changed,
        }
    }

    fn nack(&self, ballot: Ballot, phase: Phase) -> Answer {
        Answer {
            reply: Message::Nack {
                ballot,
                promised: self.state.promised,
                phase,
            },
            changed: false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::{NodeId, Revision};

    fn b(round: u64, node: u64) -> Ballot {
        Ballot {
            epoch: 0,
            round,
            node: NodeId(node),
        }
    }

    fn value(rev: u64) -> Arc<RoomState> {
        Arc::new(RoomState {
            revision: Revision(rev),
            created: true,
            ..RoomState::default()
        })
    }

    #[test]
    fn a_repeated_prepare_is_promised_again_without_a_new_write() {
        let ballot = Ballot {
            epoch: 0,
            round: 3,
            node: crate::NodeId(2),
        };
        let mut a = Acceptor::default();
        let first = a.on_prepare(ballot);
        assert!(first.changed);
        let again = a.on_prepare(ballot);
        assert_eq!(again.reply, first.reply);
        assert!(!again.changed, "nothing new to persist");
    }

    #[test]
    fn promises_only_higher_ballots() {
        let mut a = Acceptor::default();
        let first = a.on_prepare(b(1, 1));
        assert!(first.changed);
        assert_eq!(
            first.reply,
            Message::Promise {
                ballot: b(1, 1),
                accepted: None
            }
        );
        let repeat = a.on_prepare(b(1, 1));
        assert!(!repeat.changed);
        let lower = a.on_prepare(b(0, 9));
        assert_eq!(
            lower.reply,
            Message::Nack {
                ballot: b(0, 9),
                promised: b(1, 1),
                phase: Phase::Prepare
            }
        );
        assert!(!lower.changed);
    }

    #[test]
    fn accepts_at_or_above_promise_and_piggybacks_next() {
        let mut a = Acceptor::default();
        a.on_prepare(b(2, 1));
        let nack = a.on_accept(b(1, 3), &value(1), None);
        assert_eq!(
            nack.reply,
            Message::Nack {
                ballot: b(1, 3),
                promised: b(2, 1),
                phase: Phase::Accept
            }
        );
        let ok = a.on_accept(b(2, 1), &value(1), Some(b(3, 1)));
        assert!(ok.changed);
        assert_eq!(a.state().promised, b(3, 1));
        assert_eq!(a.state().accepted, Some((b(2, 1), value(1))));
        // The piggybacked promise now refuses the ballots between.
        assert!(matches!(
            a.on_accept(b(2, 9), &value(2), None).reply,
            Message::Nack { .. }
        ));
        // The proposer's fast-path accept at its next ballot goes through.
        assert!(matches!(
            a.on_accept(b(3, 1), &value(2), Some(b(4, 1))).reply,
            Message::Accepted { .. }
        ));
        let promise = a.on_prepare(b(5, 2));
        assert_eq!(
            promise.reply,
            Message::Promise {
                ballot: b(5, 2),
                accepted: Some((b(3, 1), value(2)))
            }
        );
    }

    #[test]
    fn a_duplicate_accept_changes_nothing() {
        let mut a = Acceptor::default();
        assert!(a.on_accept(b(1, 1), &value(1), None).changed);
        assert!(!a.on_accept(b(1, 1), &value(1), None).changed);
    }

    #[test]
    #[should_panic(expected = "two values accepted")]
    fn two_values_under_one_ballot_is_a_bug() {
        let mut a = Acceptor::default();
        a.on_accept(b(1, 1), &value(1), None);
        a.on_accept(b(1, 1), &value(2), None);
    }
}
