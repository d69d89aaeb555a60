//! The durable half of the partition log: a promise and the entries.

use std::collections::BTreeMap;

use super::{Entry, LogMessage, Slot, Term, Value};

/// What must be durable (fdatasync'ed) before the answer that follows it
/// leaves the node: the promise, and entries to store (each replacing
/// whatever the slot held).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LogWrite<T> {
    /// The promise after the step.
    pub promised: Term,
    /// Entries to store.
    pub entries: Vec<(Slot, Entry<T>)>,
}

/// One replica's durable log state.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LogAcceptor<T> {
    promised: Term,
    entries: BTreeMap<Slot, Entry<T>>,
    /// Entries at or below are compacted away (applied to the timeline).
    floor: Slot,
}

impl<T: Clone> LogAcceptor<T> {
    /// An acceptor restored from what was persisted: the promise, the
    /// entries above `floor`, and the floor (the slot up to which entries
    /// were applied to the timeline and dropped).
    pub fn restore(
        promised: Term,
        entries: impl IntoIterator<Item = (Slot, Entry<T>)>,
        floor: Slot,
    ) -> Self {
        LogAcceptor {
            promised,
            entries: entries.into_iter().filter(|(s, _)| *s > floor).collect(),
            floor,
        }
    }

    /// The promise.
    pub fn promised(&self) -> Term {
        self.promised
    }

    /// The entry in `slot`, if kept.
    pub fn entry(&self, slot: Slot) -> Option<&Entry<T>> {
        self.entries.get(&slot)
    }

    /// Kept entries from `from` on, in slot order.
    pub fn entries_from(&self, from: Slot) -> Vec<(Slot, Entry<T>)> {
        self.entries
            .range(from..)
            .map(|(s, e)| (*s, e.clone()))
            .collect()
    }

    /// The slot below which entries were compacted away.
    pub fn floor(&self) -> Slot {
        self.floor
    }

    /// Phase 1: promise `term` unless a higher one was promised. The same
    /// term again gets the same answer (a retransmitted Prepare). The
    /// promise's `untouched` is left `None` for the replica to fill in.
    pub fn on_prepare(&mut self, term: Term, from: Slot) -> (LogMessage<T>, Option<LogWrite<T>>) {
        if term < self.promised {
            return (self.refuse(term), None);
        }
        let write = (term > self.promised).then(|| {
            self.promised = term;
            LogWrite {
                promised: term,
                entries: Vec::new(),
            }
        });
        let entries = self.entries_from(from.max(self.floor.next()));
        let floor = self.floor;
        (
            LogMessage::Promise {
                term,
                floor,
                entries,
                untouched: None,
            },
            write,
        )
    }

    /// Phase 2: store `values` from `first` in `term`, unless a higher
    /// term was promised (`fencing`; only a broken test variant turns it
    /// off). Storing raises the promise to `term`. The reply's `released`
    /// is left 0 for the replica to fill in.
    pub fn on_accept(
        &mut self,
        term: Term,
        first: Slot,
        values: &[Value<T>],
        fencing: bool,
    ) -> (LogMessage<T>, Option<LogWrite<T>>) {
        if fencing && term < self.promised {
            return (self.refuse(term), None);
        }
        let raised = term > self.promised;
        self.promised = self.promised.max(term);
        let mut written = Vec::with_capacity(values.len());
        for (i, value) in values.iter().enumerate() {
            let slot = Slot(first.0 + i as u64);
            if slot <= self.floor {
                // Already committed and applied: the leader resent it.
                continue;
            }
            let entry = Entry {
                term,
                value: value.clone(),
            };
            self.entries.insert(slot, entry.clone());
            written.push((slot, entry));
        }
        let reply = LogMessage::Accepted {
            term,
            first,
            count: values.len() as u64,
            released: Slot(0),
        };
        // An empty Accept (a heartbeat carrying the commit point) that
        // raises no promise has nothing to make durable.
        let write = (raised || !written.is_empty()).then(|| LogWrite {
            promised: self.promised,
            entries: written,
        });
        (reply, write)
    }

    /// Drops entries up to `upto`, which the node has applied to the
    /// timeline and which are committed.
    pub fn compact(&mut self, upto: Slot) {
        if upto > self.floor {
            self.entries.retain(|s, _| *s > upto);
            self.floor = upto;
        }
    }

    /// Whether the log holds an entry written in `epoch` or later.
    pub fn holds_epoch(&self, epoch: u64) -> bool {
        self.entries.values().any(|e| e.term.epoch >= epoch)
    }

    /// The first `max` entries below `below` written in `epoch` or later,
    /// in slot order.
    pub fn epoch_entries_below(
        &self,
        epoch: u64,
        below: Slot,
        max: usize,
    ) -> Vec<(Slot, Entry<T>)> {
        self.entries
            .range(..below)
            .filter(|(_, e)| e.term.epoch >= epoch)
            .take(max)
            .map(|(s, e)| (*s, e.clone()))
            .collect()
    }

    /// Starts again from a timeline copied up to `upto` after a home
    /// failover of `epoch` (see [`super::LogReplica::rewind`]): drops the
    /// entries up to `upto` and every entry written before `epoch`, and
    /// puts the floor at `upto`, even below where it was. Entries of
    /// earlier epochs may be the old home's divergent tail; once the
    /// failover epoch is established its log no longer needs them, and a
    /// later election must not find them.
    pub fn rewind(&mut self, upto: Slot, epoch: u64) {
        self.entries
            .retain(|s, e| *s > upto && e.term.epoch >= epoch);
        self.floor = upto;
    }

    fn refuse(&self, term: Term) -> LogMessage<T> {
        LogMessage::Refused {
            term,
            promised: self.promised,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::NodeId;

    fn t(round: u64, node: u64) -> Term {
        Term {
            epoch: 0,
            round,
            node: NodeId(node),
        }
    }

    #[test]
    fn promises_fence_older_terms() {
        let mut a = LogAcceptor::<u8>::restore(Term::ZERO, [], Slot(0));
        let (reply, write) = a.on_prepare(t(2, 1), Slot(1));
        assert_eq!(
            reply,
            LogMessage::Promise {
                term: t(2, 1),
                floor: Slot(0),
                entries: vec![],
                untouched: None,
            }
        );
        assert_eq!(write.unwrap().promised, t(2, 1));
        // A retransmitted prepare: same answer, nothing to persist.
        assert!(a.on_prepare(t(2, 1), Slot(1)).1.is_none());
        // An older leader's write is refused.
        let (reply, write) = a.on_accept(t(1, 2), Slot(1), &[Value::Post(7)], true);
        assert_eq!(
            reply,
            LogMessage::Refused {
                term: t(1, 2),
                promised: t(2, 1)
            }
        );
        assert!(write.is_none());
        // Without fencing (the broken variant) it would be stored.
        let (_, write) = a
            .clone()
            .on_accept(t(1, 2), Slot(1), &[Value::Post(7)], false);
        assert_eq!(write.unwrap().entries.len(), 1);
    }

    #[test]
    fn accepts_overwrite_and_promises_report_entries() {
        let mut a = LogAcceptor::<u8>::restore(Term::ZERO, [], Slot(0));
        a.on_accept(t(1, 1), Slot(1), &[Value::Post(1), Value::Post(2)], true);
        a.on_accept(t(2, 2), Slot(2), &[Value::Post(3)], true);
        let (LogMessage::Promise { entries, .. }, _) = a.on_prepare(t(3, 3), Slot(2)) else {
            panic!()
        };
        assert_eq!(
            entries,
            vec![(
                Slot(2),
                Entry {
                    term: t(2, 2),
                    value: Value::Post(3)
                }
            )]
        );
        a.compact(Slot(1));
        assert!(a.entry(Slot(1)).is_none());
        let (reply, write) = a.on_accept(t(3, 3), Slot(1), &[Value::Post(1)], true);
        assert!(write.is_none(), "compacted slots stay; nothing to persist");
        assert!(matches!(reply, LogMessage::Accepted { count: 1, .. }));
        assert!(a.entry(Slot(1)).is_none());
    }
}
