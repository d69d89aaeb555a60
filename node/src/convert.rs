//! Free functions between protobuf records and domain types, at the edge.
//! Domain types carry no prost derives; everything that crosses the wire or
//! the disk goes through here.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;

use bytes::Bytes;
use saferchat_consensus::room::{PUBLIC_KEY_BYTES_MAX, RECENT_CHANGES_MAX, ROOM_MEMBERS_MAX};
use saferchat_consensus::{
    AcceptorState, Ballot, ChangeId, Handle, Message, NodeId, Phase, PublicKey, Revision, RoomState,
};
use saferchat_proto::common as cpb;
use saferchat_proto::peer as ppb;

use crate::error::NodeError;
use crate::storage::CommittedRoom;

fn corrupt(what: &str) -> NodeError {
    NodeError::InvalidArgument(format!("malformed record: {what}"))
}

/// Ballot to wire.
pub fn ballot_to_pb(b: Ballot) -> ppb::Ballot {
    ppb::Ballot {
        epoch: b.epoch,
        round: b.round,
        node: b.node.0,
    }
}

/// Ballot from wire (absent: the zero ballot).
///
/// # Errors
/// A round beyond [`Ballot::ROUND_MAX`] or an epoch beyond
/// [`Ballot::EPOCH_MAX`]: no honest node sends one, and accepting it would
/// exhaust the room's ballots.
pub fn ballot_from_pb(b: Option<&ppb::Ballot>) -> Result<Ballot, NodeError> {
    let ballot = b.map_or(Ballot::ZERO, |b| Ballot {
        epoch: b.epoch,
        round: b.round,
        node: NodeId(b.node),
    });
    if !ballot.is_sane() {
        return Err(corrupt("ballot round or epoch beyond the maximum"));
    }
    Ok(ballot)
}

/// Revision from wire.
///
/// # Errors
/// A revision beyond [`Revision::MAX`].
fn revision_from_pb(revision: u64) -> Result<Revision, NodeError> {
    let revision = Revision(revision);
    if !revision.is_sane() {
        return Err(corrupt("revision beyond the maximum"));
    }
    Ok(revision)
}

/// Room state to record.
pub fn state_to_pb(s: &RoomState) -> ppb::RoomStateRecord {
    ppb::RoomStateRecord {
        revision: s.revision.0,
        created: s.created,
        members: s
            .members
            .iter()
            .map(|(h, k)| ppb::MemberRecord {
                handle: Bytes::copy_from_slice(h.as_bytes()),
                public_key: k.as_ref().map(|k| k.der().clone()).unwrap_or_default(),
            })
            .collect(),
        recent: s
            .recent
            .iter()
            .map(|(id, rev)| ppb::RecentChange {
                id: Bytes::copy_from_slice(&id.0.to_be_bytes()),
                revision: rev.0,
            })
            .collect(),
    }
}

/// Room state from record, validated (a peer or a disk may hand us junk).
///
/// # Errors
/// [`NodeError::InvalidArgument`] when a field is out of range.
pub fn state_from_pb(r: &ppb::RoomStateRecord) -> Result<RoomState, NodeError> {
    if r.members.len() > ROOM_MEMBERS_MAX || r.recent.len() > RECENT_CHANGES_MAX {
        return Err(corrupt("too many members or recent changes"));
    }
    let mut members = BTreeMap::new();
    for m in &r.members {
        let raw: [u8; 32] = m
            .handle
            .as_ref()
            .try_into()
            .map_err(|_| corrupt("handle"))?;
        let key = if m.public_key.is_empty() {
            None
        } else if m.public_key.len() > PUBLIC_KEY_BYTES_MAX {
            return Err(corrupt("public key"));
        } else {
            Some(PublicKey::new(m.public_key.clone()))
        };
        members.insert(Handle::from_bytes(raw), key);
    }
    let recent = r
        .recent
        .iter()
        .map(|c| {
            let raw: [u8; 16] = c.id.as_ref().try_into().map_err(|_| corrupt("change id"))?;
            Ok((
                ChangeId(u128::from_be_bytes(raw)),
                revision_from_pb(c.revision)?,
            ))
        })
        .collect::<Result<VecDeque<_>, NodeError>>()?;
    Ok(RoomState {
        revision: revision_from_pb(r.revision)?,
        created: r.created,
        members,
        recent,
    })
}

/// Acceptor state to record.
pub fn acceptor_to_pb(a: &AcceptorState) -> ppb::AcceptorRecord {
    ppb::AcceptorRecord {
        promised: Some(ballot_to_pb(a.promised)),
        accepted_ballot: a.accepted.as_ref().map(|(b, _)| ballot_to_pb(*b)),
        accepted_value: a.accepted.as_ref().map(|(_, v)| state_to_pb(v)),
    }
}

/// Acceptor state from record.
///
/// # Errors
/// When the record is inconsistent.
pub fn acceptor_from_pb(r: &ppb::AcceptorRecord) -> Result<AcceptorState, NodeError> {
    let accepted = match (&r.accepted_ballot, &r.accepted_value) {
        (Some(b), Some(v)) => Some((ballot_from_pb(Some(b))?, Arc::new(state_from_pb(v)?))),
        (None, None) => None,
        _ => return Err(corrupt("accepted ballot without value")),
    };
    Ok(AcceptorState {
        promised: ballot_from_pb(r.promised.as_ref())?,
        accepted,
    })
}

/// Committed room to record.
pub fn committed_to_pb(c: &CommittedRoom) -> ppb::CommittedRecord {
    ppb::CommittedRecord {
        ballot: Some(ballot_to_pb(c.ballot)),
        state: Some(state_to_pb(&c.state)),
    }
}

/// Committed room from record.
///
/// # Errors
/// When the record is incomplete.
pub fn committed_from_pb(r: &ppb::CommittedRecord) -> Result<CommittedRoom, NodeError> {
    let state = r
        .state
        .as_ref()
        .ok_or_else(|| corrupt("committed record without state"))?;
    Ok(CommittedRoom {
        ballot: ballot_from_pb(r.ballot.as_ref())?,
        state: Arc::new(state_from_pb(state)?),
    })
}

/// Membership for clients (admin and chat faces).
pub fn membership_to_pb(room: &str, s: &RoomState) -> cpb::Membership {
    cpb::Membership {
        chat: room.to_owned(),
        revision: s.revision.0,
        members: s
            .members
            .iter()
            .map(|(h, k)| cpb::Member {
                user: h.to_string(),
                public_key: k.as_ref().map(|k| k.der().clone()).unwrap_or_default(),
                fingerprint: k.as_ref().map(PublicKey::fingerprint).unwrap_or_default(),
            })
            .collect(),
    }
}

/// A consensus message to the peer wire.
pub fn message_to_pb(room: &str, m: &Message) -> ppb::RoomMessage {
    use ppb::room_message::Body;
    let body = match m {
        Message::Prepare { ballot } => Body::Prepare(ppb::Prepare {
            ballot: Some(ballot_to_pb(*ballot)),
        }),
        Message::Promise { ballot, accepted } => Body::Promise(ppb::Promise {
            ballot: Some(ballot_to_pb(*ballot)),
            accepted_ballot: accepted.as_ref().map(|(b, _)| ballot_to_pb(*b)),
            accepted_value: accepted.as_ref().map(|(_, v)| state_to_pb(v)),
        }),
        Message::Accept {
            ballot,
            value,
            next,
        } => Body::Accept(ppb::Accept {
            ballot: Some(ballot_to_pb(*ballot)),
            value: Some(state_to_pb(value)),
            next: next.map(ballot_to_pb),
        }),
        Message::Accepted { ballot, holders } => Body::Accepted(ppb::Accepted {
            ballot: Some(ballot_to_pb(*ballot)),
            holders: holders
                .iter()
                .map(|(n, ms)| ppb::HolderPromise {
                    node: n.0,
                    remaining_ms: *ms,
                })
                .collect(),
        }),
        Message::Nack {
            ballot,
            promised,
            phase,
        } => Body::Nack(ppb::Nack {
            ballot: Some(ballot_to_pb(*ballot)),
            promised: Some(ballot_to_pb(*promised)),
            phase: match phase {
                Phase::Prepare => ppb::NackPhase::Prepare,
                Phase::Accept => ppb::NackPhase::Accept,
            }
            .into(),
        }),
        Message::Commit { ballot, value } => Body::Commit(ppb::Commit {
            ballot: Some(ballot_to_pb(*ballot)),
            value: Some(state_to_pb(value)),
        }),
        Message::LeaseRequest {
            seq,
            lease_ms,
            epoch,
        } => Body::LeaseRequest(ppb::LeaseRequest {
            seq: *seq,
            lease_ms: *lease_ms,
            epoch: *epoch,
        }),
        Message::LeaseGrant { seq, accepted } => Body::LeaseGrant(ppb::LeaseGrant {
            seq: *seq,
            accepted_ballot: accepted.map(|(b, _)| ballot_to_pb(b)),
            accepted_revision: accepted.map_or(0, |(_, r)| r.0),
        }),
    };
    ppb::RoomMessage {
        room: room.to_owned(),
        body: Some(body),
    }
}

/// A consensus message from the peer wire.
///
/// # Errors
/// When a required field is missing or malformed.
pub fn message_from_pb(m: &ppb::RoomMessage) -> Result<Message, NodeError> {
    use ppb::room_message::Body;
    let need = |b: &Option<ppb::Ballot>| -> Result<Ballot, NodeError> {
        b.as_ref()
            .ok_or_else(|| corrupt("missing ballot"))
            .and_then(|b| ballot_from_pb(Some(b)))
    };
    let value = |v: &Option<ppb::RoomStateRecord>| -> Result<Arc<RoomState>, NodeError> {
        v.as_ref()
            .ok_or_else(|| corrupt("missing value"))
            .and_then(state_from_pb)
            .map(Arc::new)
    };
    Ok(
        match m.body.as_ref().ok_or_else(|| corrupt("empty message"))? {
            Body::Prepare(p) => Message::Prepare {
                ballot: need(&p.ballot)?,
            },
            Body::Promise(p) => Message::Promise {
                ballot: need(&p.ballot)?,
                accepted: match &p.accepted_ballot {
                    Some(b) => Some((ballot_from_pb(Some(b))?, value(&p.accepted_value)?)),
                    None => None,
                },
            },
            Body::Accept(a) => Message::Accept {
                ballot: need(&a.ballot)?,
                value: value(&a.value)?,
                next: a
                    .next
                    .as_ref()
                    .map(|b| ballot_from_pb(Some(b)))
                    .transpose()?,
            },
            Body::Accepted(a) => Message::Accepted {
                ballot: need(&a.ballot)?,
                holders: a
                    .holders
                    .iter()
                    .map(|h| (NodeId(h.node), h.remaining_ms))
                    .collect(),
            },
            Body::Nack(n) => Message::Nack {
                ballot: need(&n.ballot)?,
                promised: need(&n.promised)?,
                phase: match n.phase() {
                    ppb::NackPhase::Prepare => Phase::Prepare,
                    ppb::NackPhase::Accept => Phase::Accept,
                    ppb::NackPhase::Unspecified => return Err(corrupt("nack phase")),
                },
            },
            Body::Commit(c) => Message::Commit {
                ballot: need(&c.ballot)?,
                value: value(&c.value)?,
            },
            Body::LeaseRequest(r) => Message::LeaseRequest {
                seq: r.seq,
                lease_ms: r.lease_ms,
                epoch: r.epoch,
            },
            Body::LeaseGrant(g) => Message::LeaseGrant {
                seq: g.seq,
                accepted: g
                    .accepted_ballot
                    .as_ref()
                    .map(|b| {
                        Ok::<_, NodeError>((
                            ballot_from_pb(Some(b))?,
                            revision_from_pb(g.accepted_revision)?,
                        ))
                    })
                    .transpose()?,
            },
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use saferchat_consensus::{Change, Proposal, apply};

    fn sample_state() -> RoomState {
        let mut s = RoomState::absent();
        let h = Handle::of_modulus(b"member");
        for (i, change) in [
            Change::Create,
            Change::Add(h),
            Change::RegisterKey(h, PublicKey::new(Bytes::from_static(b"spki"))),
            Change::Add(Handle::of_modulus(b"other")),
        ]
        .into_iter()
        .enumerate()
        {
            apply(
                &mut s,
                &Proposal {
                    id: ChangeId(i as u128 + 1),
                    change,
                    expected: None,
                },
            )
            .unwrap();
        }
        s
    }

    #[test]
    fn states_round_trip() {
        let s = sample_state();
        assert_eq!(state_from_pb(&state_to_pb(&s)).unwrap(), s);
        let a = AcceptorState {
            promised: Ballot {
                epoch: 2,
                round: 4,
                node: NodeId(2),
            },
            accepted: Some((
                Ballot {
                    epoch: 0,
                    round: 3,
                    node: NodeId(1),
                },
                Arc::new(s),
            )),
        };
        assert_eq!(acceptor_from_pb(&acceptor_to_pb(&a)).unwrap(), a);
        assert_eq!(
            acceptor_from_pb(&acceptor_to_pb(&AcceptorState::default())).unwrap(),
            AcceptorState::default()
        );
    }

    #[test]
    fn every_message_round_trips() {
        let v = Arc::new(sample_state());
        let b = Ballot {
            epoch: 5,
            round: 9,
            node: NodeId(3),
        };
        let messages = vec![
            Message::Prepare { ballot: b },
            Message::Promise {
                ballot: b,
                accepted: None,
            },
            Message::Promise {
                ballot: b,
                accepted: Some((b, Arc::clone(&v))),
            },
            Message::Accept {
                ballot: b,
                value: Arc::clone(&v),
                next: b.successor(),
            },
            Message::Accept {
                ballot: b,
                value: Arc::clone(&v),
                next: None,
            },
            Message::Accepted {
                ballot: b,
                holders: vec![(NodeId(1), 77)],
            },
            Message::Nack {
                ballot: b,
                promised: b.successor().unwrap(),
                phase: Phase::Accept,
            },
            Message::Nack {
                ballot: b,
                promised: b.successor().unwrap(),
                phase: Phase::Prepare,
            },
            Message::Commit {
                ballot: b,
                value: Arc::clone(&v),
            },
            Message::LeaseRequest {
                seq: 5,
                lease_ms: 2_000,
                epoch: 5,
            },
            Message::LeaseGrant {
                seq: 5,
                accepted: Some((b, Revision(4))),
            },
            Message::LeaseGrant {
                seq: 6,
                accepted: None,
            },
        ];
        for m in messages {
            assert_eq!(message_from_pb(&message_to_pb("aaa", &m)).unwrap(), m);
        }
    }

    #[test]
    fn junk_records_are_refused() {
        let mut r = state_to_pb(&sample_state());
        r.members[0].handle = Bytes::from_static(b"short");
        assert!(state_from_pb(&r).is_err());
        let empty = ppb::RoomMessage {
            room: "aaa".into(),
            body: None,
        };
        assert!(message_from_pb(&empty).is_err());
        let half = ppb::AcceptorRecord {
            promised: None,
            accepted_ballot: Some(ballot_to_pb(Ballot::ZERO)),
            accepted_value: None,
        };
        assert!(acceptor_from_pb(&half).is_err());
    }

    /// A frame naming a round past `ROUND_MAX` (the `u64::MAX` a peer once
    /// could send to freeze a room) or a revision past `Revision::MAX` is
    /// refused at the edge, whichever field carries it.
    #[test]
    fn absurd_ballots_and_revisions_are_refused() {
        let v = Arc::new(sample_state());
        let sane = Ballot {
            epoch: 0,
            round: Ballot::ROUND_MAX,
            node: NodeId(2),
        };
        let absurd = Ballot {
            epoch: 0,
            round: Ballot::ROUND_MAX + 1,
            node: NodeId(2),
        };
        let mut high = sample_state();
        high.revision = Revision(Revision::MAX.0 + 1);
        let high = Arc::new(high);
        let ok = Message::Commit {
            ballot: sane,
            value: Arc::clone(&v),
        };
        assert!(message_from_pb(&message_to_pb("aaa", &ok)).is_ok());
        let bad = [
            Message::Prepare { ballot: absurd },
            Message::Commit {
                ballot: absurd,
                value: Arc::clone(&v),
            },
            Message::Commit {
                ballot: sane,
                value: Arc::clone(&high),
            },
            Message::Accept {
                ballot: sane,
                value: Arc::clone(&v),
                next: Some(absurd),
            },
            Message::Nack {
                ballot: sane,
                promised: absurd,
                phase: Phase::Prepare,
            },
            Message::Promise {
                ballot: sane,
                accepted: Some((absurd, Arc::clone(&v))),
            },
            Message::LeaseGrant {
                seq: 1,
                accepted: Some((sane, Revision(u64::MAX))),
            },
        ];
        for m in bad {
            let err = message_from_pb(&message_to_pb("aaa", &m)).unwrap_err();
            assert!(
                err.to_string().contains("beyond the maximum"),
                "{m:?}: {err}"
            );
        }
        let mut record = acceptor_to_pb(&AcceptorState::default());
        record.promised = Some(ppb::Ballot {
            epoch: 0,
            round: u64::MAX,
            node: 1,
        });
        assert!(acceptor_from_pb(&record).is_err());
    }
}

/// The partition log's records and messages.
pub mod log {
    use bytes::Bytes;
    use saferchat_consensus::partition_log::{Entry, LogMessage, Slot, Term, Value};
    use saferchat_consensus::{NodeId, RoomId};
    use saferchat_envelope::ENVELOPE_BYTES_MAX;
    use saferchat_proto::peer as ppb;
    use saferchat_proto::peer::partition_message::Body;

    use super::corrupt;
    use crate::error::NodeError;
    use crate::timeline::LogPost;

    /// Term to wire.
    pub fn term_to_pb(t: Term) -> ppb::Term {
        ppb::Term {
            round: t.round,
            node: t.node.0,
            epoch: t.epoch,
        }
    }

    /// Term from wire.
    ///
    /// # Errors
    /// A round beyond [`Term::ROUND_MAX`] or an epoch beyond
    /// [`Term::EPOCH_MAX`].
    pub fn term_from_pb(t: &ppb::Term) -> Result<Term, NodeError> {
        let term = Term {
            epoch: t.epoch,
            round: t.round,
            node: NodeId(t.node),
        };
        if term.is_sane() {
            Ok(term)
        } else {
            Err(corrupt("term round or epoch beyond the maximum"))
        }
    }

    fn term_of(t: Option<&ppb::Term>) -> Result<Term, NodeError> {
        term_from_pb(t.ok_or_else(|| corrupt("missing term"))?)
    }

    fn value_to_pb(v: &Value<LogPost>) -> ppb::LogValue {
        use ppb::log_value::Value as V;
        ppb::LogValue {
            value: Some(match v {
                Value::Noop => V::Noop(ppb::LogNoop {}),
                Value::Post(p) => V::Post(ppb::LogPost {
                    room: p.room.as_str().to_owned(),
                    proposed_ms: p.proposed_ms,
                    seed: p.seed,
                    origin_node: p.origin.0.0,
                    origin_token: p.origin.1,
                    envelope: p.envelope.clone(),
                    retry_only: p.retry_only,
                }),
            }),
        }
    }

    fn value_from_pb(v: &ppb::LogValue) -> Result<Value<LogPost>, NodeError> {
        use ppb::log_value::Value as V;
        match &v.value {
            Some(V::Noop(_)) => Ok(Value::Noop),
            Some(V::Post(p)) => {
                if p.envelope.len() > ENVELOPE_BYTES_MAX {
                    return Err(corrupt("log post larger than an envelope may be"));
                }
                Ok(Value::Post(LogPost {
                    room: RoomId::new(&p.room)
                        .map_err(|e| corrupt(&format!("log post room: {e}")))?,
                    proposed_ms: p.proposed_ms,
                    seed: p.seed,
                    origin: (NodeId(p.origin_node), p.origin_token),
                    envelope: Bytes::clone(&p.envelope),
                    retry_only: p.retry_only,
                }))
            }
            None => Err(corrupt("log value without a value")),
        }
    }

    /// A slot's entry to wire.
    pub fn entry_to_pb(slot: Slot, e: &Entry<LogPost>) -> ppb::LogEntry {
        ppb::LogEntry {
            slot: slot.0,
            term: Some(term_to_pb(e.term)),
            value: Some(value_to_pb(&e.value)),
        }
    }

    /// A slot's entry from wire.
    ///
    /// # Errors
    /// Malformed or absurd fields.
    pub fn entry_from_pb(e: &ppb::LogEntry) -> Result<(Slot, Entry<LogPost>), NodeError> {
        Ok((
            Slot(e.slot),
            Entry {
                term: term_of(e.term.as_ref())?,
                value: value_from_pb(e.value.as_ref().ok_or_else(|| corrupt("entry value"))?)?,
            },
        ))
    }

    /// A partition-log message to wire.
    pub fn message_to_pb(partition: u32, m: &LogMessage<LogPost>) -> ppb::PartitionMessage {
        let body = match m {
            LogMessage::Prepare { term, from } => Body::Prepare(ppb::LogPrepare {
                term: Some(term_to_pb(*term)),
                from: from.0,
            }),
            LogMessage::Promise {
                term,
                floor,
                entries,
                untouched,
            } => Body::Promise(ppb::LogPromise {
                term: Some(term_to_pb(*term)),
                floor: floor.0,
                entries: entries.iter().map(|(s, e)| entry_to_pb(*s, e)).collect(),
                untouched: untouched.map(|s| s.0),
            }),
            LogMessage::Accept {
                term,
                first,
                values,
                commit,
                shared,
            } => Body::Accept(ppb::LogAccept {
                term: Some(term_to_pb(*term)),
                first: first.0,
                values: values.iter().map(value_to_pb).collect(),
                commit: commit.0,
                shared: shared.0,
            }),
            LogMessage::Accepted {
                term,
                first,
                count,
                released,
            } => Body::Accepted(ppb::LogAccepted {
                term: Some(term_to_pb(*term)),
                first: first.0,
                count: *count,
                released: released.0,
            }),
            LogMessage::Compacted { term, floor } => Body::Compacted(ppb::LogCompacted {
                term: Some(term_to_pb(*term)),
                floor: floor.0,
            }),
            LogMessage::Refused { term, promised } => Body::Refused(ppb::LogRefused {
                term: Some(term_to_pb(*term)),
                promised: Some(term_to_pb(*promised)),
            }),
            LogMessage::LeaseRequest { term, seq } => Body::LeaseRequest(ppb::LogLeaseRequest {
                term: Some(term_to_pb(*term)),
                seq: *seq,
            }),
            LogMessage::LeaseGrant { term, seq } => Body::LeaseGrant(ppb::LogLeaseGrant {
                term: Some(term_to_pb(*term)),
                seq: *seq,
            }),
        };
        ppb::PartitionMessage {
            partition,
            body: Some(body),
        }
    }

    /// A partition-log message from wire; refuses what the core would drop
    /// as insane, so that it is refused at the edge.
    ///
    /// # Errors
    /// Malformed or absurd fields.
    pub fn message_from_pb(m: &ppb::PartitionMessage) -> Result<LogMessage<LogPost>, NodeError> {
        let message = match m
            .body
            .as_ref()
            .ok_or_else(|| corrupt("empty log message"))?
        {
            Body::Prepare(p) => LogMessage::Prepare {
                term: term_of(p.term.as_ref())?,
                from: Slot(p.from),
            },
            Body::Promise(p) => LogMessage::Promise {
                term: term_of(p.term.as_ref())?,
                floor: Slot(p.floor),
                entries: p
                    .entries
                    .iter()
                    .map(entry_from_pb)
                    .collect::<Result<_, _>>()?,
                untouched: p.untouched.map(Slot),
            },
            Body::Accept(a) => LogMessage::Accept {
                term: term_of(a.term.as_ref())?,
                first: Slot(a.first),
                values: a
                    .values
                    .iter()
                    .map(value_from_pb)
                    .collect::<Result<_, _>>()?,
                commit: Slot(a.commit),
                shared: Slot(a.shared),
            },
            Body::Accepted(a) => LogMessage::Accepted {
                term: term_of(a.term.as_ref())?,
                first: Slot(a.first),
                count: a.count,
                released: Slot(a.released),
            },
            Body::Compacted(c) => LogMessage::Compacted {
                term: term_of(c.term.as_ref())?,
                floor: Slot(c.floor),
            },
            Body::Refused(r) => LogMessage::Refused {
                term: term_of(r.term.as_ref())?,
                promised: term_of(r.promised.as_ref())?,
            },
            Body::LeaseRequest(r) => LogMessage::LeaseRequest {
                term: term_of(r.term.as_ref())?,
                seq: r.seq,
            },
            Body::LeaseGrant(g) => LogMessage::LeaseGrant {
                term: term_of(g.term.as_ref())?,
                seq: g.seq,
            },
        };
        if message.is_sane() {
            Ok(message)
        } else {
            Err(corrupt("log message with slots out of bounds"))
        }
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn log_messages_round_trip_and_absurd_ones_are_refused() {
            let t = Term {
                epoch: 4,
                round: 3,
                node: NodeId(2),
            };
            let post = Value::Post(LogPost {
                room: RoomId::new("team").unwrap(),
                proposed_ms: 5,
                seed: 6,
                origin: (NodeId(1), 9),
                envelope: Bytes::from_static(b"env"),
                retry_only: true,
            });
            let messages = [
                LogMessage::Prepare {
                    term: t,
                    from: Slot(4),
                },
                LogMessage::Promise {
                    term: t,
                    floor: Slot(2),
                    entries: vec![(
                        Slot(3),
                        Entry {
                            term: t,
                            value: post.clone(),
                        },
                    )],
                    untouched: Some(Slot(2)),
                },
                LogMessage::Promise {
                    term: t,
                    floor: Slot(0),
                    entries: Vec::new(),
                    untouched: None,
                },
                LogMessage::Accept {
                    term: t,
                    first: Slot(3),
                    values: vec![post, Value::Noop],
                    commit: Slot(2),
                    shared: Slot(1),
                },
                LogMessage::Accepted {
                    term: t,
                    first: Slot(3),
                    count: 2,
                    released: Slot(4),
                },
                LogMessage::Refused {
                    term: t,
                    promised: t,
                },
                LogMessage::Compacted {
                    term: t,
                    floor: Slot(7),
                },
                LogMessage::LeaseRequest { term: t, seq: 9 },
                LogMessage::LeaseGrant { term: t, seq: 9 },
            ];
            for m in messages {
                assert_eq!(message_from_pb(&message_to_pb(1, &m)).unwrap(), m);
            }
            let absurd = LogMessage::<LogPost>::Prepare {
                term: Term {
                    epoch: 1,
                    round: u64::MAX,
                    node: NodeId(2),
                },
                from: Slot(1),
            };
            assert!(message_from_pb(&message_to_pb(1, &absurd)).is_err());
            let absurd_epoch = LogMessage::<LogPost>::Prepare {
                term: Term {
                    epoch: u64::MAX,
                    round: 1,
                    node: NodeId(2),
                },
                from: Slot(1),
            };
            assert!(message_from_pb(&message_to_pb(1, &absurd_epoch)).is_err());
            let beyond = LogMessage::<LogPost>::Prepare {
                term: t,
                from: Slot(u64::MAX),
            };
            assert!(message_from_pb(&message_to_pb(1, &beyond)).is_err());
        }
    }
}

/// The handover of a partition's rooms: messages and durable records.
pub mod handover {
    use std::sync::Arc;

    use saferchat_consensus::RoomId;
    use saferchat_consensus::handover::{
        HandoverMessage, PartitionSeal, TransferRecord, TransferredRooms,
    };
    use saferchat_proto::peer as ppb;
    use saferchat_proto::peer::handover_message::Body;

    use super::{ballot_from_pb, ballot_to_pb, corrupt, state_from_pb, state_to_pb};
    use crate::error::NodeError;

    fn room_from(name: &str) -> Result<RoomId, NodeError> {
        RoomId::new(name).map_err(|e| corrupt(&format!("room name: {e}")))
    }

    fn need(b: Option<&ppb::Ballot>) -> Result<saferchat_consensus::Ballot, NodeError> {
        ballot_from_pb(Some(b.ok_or_else(|| corrupt("missing ballot"))?))
    }

    fn rooms_to_pb(
        rooms: &[(RoomId, Arc<saferchat_consensus::RoomState>)],
    ) -> Vec<ppb::TransferredRoom> {
        rooms
            .iter()
            .map(|(room, value)| ppb::TransferredRoom {
                room: room.as_str().to_owned(),
                value: Some(state_to_pb(value)),
            })
            .collect()
    }

    fn rooms_from_pb(rooms: &[ppb::TransferredRoom]) -> Result<TransferredRooms, NodeError> {
        let mut out = Vec::with_capacity(rooms.len());
        for r in rooms {
            let value = r.value.as_ref().ok_or_else(|| corrupt("missing value"))?;
            out.push((room_from(&r.room)?, Arc::new(state_from_pb(value)?)));
        }
        Ok(Arc::new(out))
    }

    /// Handover message to wire.
    pub fn message_to_pb(partition: u32, m: &HandoverMessage) -> ppb::HandoverMessage {
        let body = match m {
            HandoverMessage::Seal { ballot } => Body::Seal(ppb::HandoverSeal {
                ballot: Some(ballot_to_pb(*ballot)),
            }),
            HandoverMessage::Sealed {
                ballot,
                rooms,
                lease_left_ms,
            } => Body::Sealed(ppb::HandoverSealed {
                ballot: Some(ballot_to_pb(*ballot)),
                rooms: rooms
                    .iter()
                    .map(|(room, b, value)| ppb::SealedRoom {
                        room: room.as_str().to_owned(),
                        accepted_ballot: Some(ballot_to_pb(*b)),
                        accepted_value: Some(state_to_pb(value)),
                    })
                    .collect(),
                lease_left_ms: *lease_left_ms,
            }),
            HandoverMessage::Transfer { ballot, rooms } => Body::Transfer(ppb::HandoverTransfer {
                ballot: Some(ballot_to_pb(*ballot)),
                rooms: rooms_to_pb(rooms),
            }),
            HandoverMessage::Installed { ballot } => Body::Installed(ppb::HandoverInstalled {
                ballot: Some(ballot_to_pb(*ballot)),
            }),
            HandoverMessage::Refused { ballot, sealed } => Body::Refused(ppb::HandoverRefused {
                ballot: Some(ballot_to_pb(*ballot)),
                sealed: Some(ballot_to_pb(*sealed)),
            }),
        };
        ppb::HandoverMessage {
            partition,
            body: Some(body),
        }
    }

    /// Handover message from wire, with its partition.
    ///
    /// # Errors
    /// A missing ballot or value, a ballot beyond the maximum, a bad room
    /// name, an empty message.
    pub fn message_from_pb(m: &ppb::HandoverMessage) -> Result<(u32, HandoverMessage), NodeError> {
        let message = match m.body.as_ref().ok_or_else(|| corrupt("empty message"))? {
            Body::Seal(s) => HandoverMessage::Seal {
                ballot: need(s.ballot.as_ref())?,
            },
            Body::Sealed(s) => {
                let mut rooms = Vec::with_capacity(s.rooms.len());
                for r in &s.rooms {
                    let value = r
                        .accepted_value
                        .as_ref()
                        .ok_or_else(|| corrupt("missing value"))?;
                    rooms.push((
                        room_from(&r.room)?,
                        need(r.accepted_ballot.as_ref())?,
                        Arc::new(state_from_pb(value)?),
                    ));
                }
                HandoverMessage::Sealed {
                    ballot: need(s.ballot.as_ref())?,
                    rooms,
                    lease_left_ms: s.lease_left_ms,
                }
            }
            Body::Transfer(t) => HandoverMessage::Transfer {
                ballot: need(t.ballot.as_ref())?,
                rooms: rooms_from_pb(&t.rooms)?,
            },
            Body::Installed(i) => HandoverMessage::Installed {
                ballot: need(i.ballot.as_ref())?,
            },
            Body::Refused(r) => HandoverMessage::Refused {
                ballot: need(r.ballot.as_ref())?,
                sealed: need(r.sealed.as_ref())?,
            },
        };
        Ok((m.partition, message))
    }

    /// Partition seal to record.
    pub fn seal_to_pb(seal: &PartitionSeal) -> ppb::PartitionSealRecord {
        ppb::PartitionSealRecord {
            sealed: Some(ballot_to_pb(seal.sealed)),
            installed: Some(ballot_to_pb(seal.installed)),
        }
    }

    /// Partition seal from record.
    ///
    /// # Errors
    /// A ballot beyond the maximum, or installed above sealed.
    pub fn seal_from_pb(r: &ppb::PartitionSealRecord) -> Result<PartitionSeal, NodeError> {
        let seal = PartitionSeal {
            sealed: ballot_from_pb(r.sealed.as_ref())?,
            installed: ballot_from_pb(r.installed.as_ref())?,
        };
        if seal.installed > seal.sealed {
            return Err(corrupt("partition installed above its seal"));
        }
        Ok(seal)
    }

    /// Transfer record to record.
    pub fn record_to_pb(record: &TransferRecord) -> ppb::HandoverRecord {
        ppb::HandoverRecord {
            ballot: Some(ballot_to_pb(record.ballot)),
            rooms: rooms_to_pb(&record.rooms),
        }
    }

    /// Transfer record from record.
    ///
    /// # Errors
    /// As [`message_from_pb`].
    pub fn record_from_pb(r: &ppb::HandoverRecord) -> Result<TransferRecord, NodeError> {
        Ok(TransferRecord {
            ballot: need(r.ballot.as_ref())?,
            rooms: rooms_from_pb(&r.rooms)?,
        })
    }

    #[cfg(test)]
    mod tests {
        use super::*;
        use saferchat_consensus::{Ballot, NodeId, Revision, RoomState};

        fn b(epoch: u64, round: u64, node: u64) -> Ballot {
            Ballot {
                epoch,
                round,
                node: NodeId(node),
            }
        }

        fn room(name: &str) -> RoomId {
            RoomId::new(name).unwrap()
        }

        fn value(revision: u64) -> Arc<RoomState> {
            Arc::new(RoomState {
                revision: Revision(revision),
                created: true,
                ..RoomState::default()
            })
        }

        #[test]
        fn every_handover_message_and_record_survives_the_wire() {
            let rooms = Arc::new(vec![(room("a"), value(3)), (room("b"), value(1))]);
            for m in [
                HandoverMessage::Seal { ballot: b(2, 0, 1) },
                HandoverMessage::Sealed {
                    ballot: b(2, 0, 1),
                    rooms: vec![(room("a"), b(1, 4, 2), value(3))],
                    lease_left_ms: 2_011,
                },
                HandoverMessage::Transfer {
                    ballot: b(2, 0, 1),
                    rooms: Arc::clone(&rooms),
                },
                HandoverMessage::Installed { ballot: b(2, 0, 1) },
                HandoverMessage::Refused {
                    ballot: b(2, 0, 1),
                    sealed: b(3, 0, 2),
                },
            ] {
                assert_eq!(message_from_pb(&message_to_pb(7, &m)).unwrap(), (7, m));
            }
            let seal = PartitionSeal {
                sealed: b(3, 0, 2),
                installed: b(2, 0, 1),
            };
            assert_eq!(seal_from_pb(&seal_to_pb(&seal)).unwrap(), seal);
            let record = TransferRecord {
                ballot: b(2, 0, 1),
                rooms,
            };
            assert_eq!(record_from_pb(&record_to_pb(&record)).unwrap(), record);
        }

        #[test]
        fn malformed_handover_frames_are_refused() {
            let mut seal = message_to_pb(1, &HandoverMessage::Seal { ballot: b(2, 0, 1) });
            seal.body = None;
            assert!(message_from_pb(&seal).is_err(), "empty");
            let absurd = message_to_pb(
                1,
                &HandoverMessage::Seal {
                    ballot: b(Ballot::EPOCH_MAX + 1, 0, 1),
                },
            );
            assert!(
                message_from_pb(&absurd).is_err(),
                "epoch beyond the maximum"
            );
            let mut transfer = message_to_pb(
                1,
                &HandoverMessage::Transfer {
                    ballot: b(2, 0, 1),
                    rooms: Arc::new(vec![(room("a"), value(1))]),
                },
            );
            if let Some(Body::Transfer(t)) = transfer.body.as_mut() {
                t.rooms[0].room = "no spaces allowed".into();
            }
            assert!(message_from_pb(&transfer).is_err(), "bad room name");
            let inverted = ppb::PartitionSealRecord {
                sealed: Some(ballot_to_pb(b(2, 0, 1))),
                installed: Some(ballot_to_pb(b(3, 0, 1))),
            };
            assert!(seal_from_pb(&inverted).is_err());
        }
    }
}
