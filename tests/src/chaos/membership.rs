//! Membership operations as a chaos run records them, and the sequential
//! model the linearizability checker ([`super::linear`]) holds them to: a
//! room's member set and revision, where every change that changes
//! something moves the revision by one.

use std::collections::BTreeSet;

use super::linear::Model;

/// A membership: revision and member handles.
pub type State = (u64, BTreeSet<String>);

/// One admin operation and what it answered (`None`: unknown outcome).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MemberOp {
    /// AddUser: the revision after it, and whether it changed anything.
    Add {
        /// The handle.
        handle: String,
        /// Revision and changed flag, if answered.
        out: Option<(u64, bool)>,
    },
    /// RmUser: as `Add`.
    Remove {
        /// The handle.
        handle: String,
        /// Revision and changed flag, if answered.
        out: Option<(u64, bool)>,
    },
    /// Members: the revision and members read.
    Read {
        /// What was read, if answered.
        out: Option<State>,
    },
}

/// The room as it was when the run began.
#[derive(Clone, Debug)]
pub struct Room {
    /// Its membership then.
    pub initial: State,
}

impl Model for Room {
    type State = State;
    type Op = MemberOp;

    fn init(&self) -> State {
        self.initial.clone()
    }

    fn step(&self, (revision, members): &State, op: &MemberOp) -> Option<State> {
        let change = |add: bool, handle: &String, out: &Option<(u64, bool)>| {
            let present = members.contains(handle);
            let changes = present != add;
            match out {
                Some((r, changed))
                    if *changed != changes || *r != revision + u64::from(changes) =>
                {
                    None
                }
                _ => {
                    let mut next = members.clone();
                    if add {
                        next.insert(handle.clone());
                    } else {
                        next.remove(handle);
                    }
                    Some((revision + u64::from(changes), next))
                }
            }
        };
        match op {
            MemberOp::Add { handle, out } => change(true, handle, out),
            MemberOp::Remove { handle, out } => change(false, handle, out),
            MemberOp::Read { out: Some(read) } => {
                (read == &(*revision, members.clone())).then(|| (*revision, members.clone()))
            }
            MemberOp::Read { out: None } => Some((*revision, members.clone())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::linear::{Operation, linearizable};
    use super::*;

    fn room() -> Room {
        Room {
            initial: (4, ["a".to_owned()].into()),
        }
    }

    fn at(call: u64, ret: Option<u64>, op: MemberOp) -> Operation<MemberOp> {
        Operation { call, ret, op }
    }

    fn read(revision: u64, members: &[&str]) -> MemberOp {
        MemberOp::Read {
            out: Some((revision, members.iter().map(|m| (*m).to_owned()).collect())),
        }
    }

    #[test]
    fn changes_and_reads_in_order_pass() {
        let h = [
            at(
                0,
                Some(1),
                MemberOp::Add {
                    handle: "b".into(),
                    out: Some((5, true)),
                },
            ),
            at(2, Some(3), read(5, &["a", "b"])),
            at(
                4,
                Some(5),
                MemberOp::Add {
                    handle: "b".into(),
                    out: Some((5, false)),
                },
            ),
            at(
                6,
                None,
                MemberOp::Remove {
                    handle: "a".into(),
                    out: None,
                },
            ),
            at(8, Some(9), read(6, &["b"])),
        ];
        assert!(linearizable(&room(), &h));
    }

    #[test]
    fn a_stale_read_and_a_skipped_revision_are_caught() {
        let stale = [
            at(
                0,
                Some(1),
                MemberOp::Add {
                    handle: "b".into(),
                    out: Some((5, true)),
                },
            ),
            at(2, Some(3), read(4, &["a"])),
        ];
        assert!(!linearizable(&room(), &stale));
        let skipped = [at(
            0,
            Some(1),
            MemberOp::Add {
                handle: "b".into(),
                out: Some((6, true)),
            },
        )];
        assert!(!linearizable(&room(), &skipped));
    }
}
