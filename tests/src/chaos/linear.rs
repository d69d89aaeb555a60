//! A linearizability checker in the style of Porcupine and Knossos (the
//! Wing–Gong search with Lowe's memoisation): is there an order of the
//! operations, each placed between its call and its return, in which a
//! sequential model explains every output?
//!
//! An operation whose outcome is unknown (the client gave up waiting)
//! has no return: it may have taken effect at any time after its call, or
//! never.
//!
//! Written here because no crate on the registry checks histories recorded
//! from real processes against a model we supply (stateright checks
//! models it runs itself).

use std::collections::HashSet;
use std::hash::Hash;

/// A sequential specification.
pub trait Model {
    /// The state.
    type State: Clone + Eq + Hash;
    /// An operation with its output.
    type Op;
    /// The state before any operation.
    fn init(&self) -> Self::State;
    /// The state after `op` from `state`, if `op`'s output is possible
    /// there.
    fn step(&self, state: &Self::State, op: &Self::Op) -> Option<Self::State>;
}

/// One operation as recorded: when it was called and returned (times on
/// one clock), `None` when its outcome is unknown.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Operation<O> {
    /// Call time.
    pub call: u64,
    /// Return time; `None`: unknown outcome.
    pub ret: Option<u64>,
    /// What was asked and answered.
    pub op: O,
}

#[derive(Clone, Copy, Debug)]
struct Event {
    op: usize,
    is_call: bool,
    prev: usize,
    next: usize,
}

/// Whether `history` is linearizable with respect to `model`.
pub fn linearizable<M: Model>(model: &M, history: &[Operation<M::Op>]) -> bool {
    // Events sorted by time; a return before a call at the same time (the
    // operations do not overlap). Unknown outcomes return after everything.
    let mut order: Vec<(u64, bool, usize)> = Vec::new();
    for (i, o) in history.iter().enumerate() {
        order.push((o.call, true, i));
        order.push((o.ret.unwrap_or(u64::MAX), false, i));
    }
    order.sort_by_key(|(t, is_call, i)| (*t, *is_call, *i));
    // A doubly linked list over the events; index 0 is the head sentinel,
    // n + 1 the tail.
    let n = order.len();
    let mut events: Vec<Event> = Vec::with_capacity(n + 2);
    events.push(Event {
        op: usize::MAX,
        is_call: false,
        prev: 0,
        next: 1,
    });
    for (k, (_, is_call, op)) in order.iter().enumerate() {
        events.push(Event {
            op: *op,
            is_call: *is_call,
            prev: k,
            next: k + 2,
        });
    }
    events.push(Event {
        op: usize::MAX,
        is_call: false,
        prev: n,
        next: n + 1,
    });
    let tail = n + 1;
    let mut return_of = vec![0; history.len()];
    for (k, e) in events.iter().enumerate().skip(1).take(n) {
        if !e.is_call {
            return_of[e.op] = k;
        }
    }
    let unlink = |events: &mut Vec<Event>, k: usize| {
        let (p, nx) = (events[k].prev, events[k].next);
        events[p].next = nx;
        events[nx].prev = p;
    };
    let relink = |events: &mut Vec<Event>, k: usize| {
        let (p, nx) = (events[k].prev, events[k].next);
        events[p].next = k;
        events[nx].prev = k;
    };

    let mut linearized = vec![false; history.len()];
    let mut seen: HashSet<(Vec<bool>, M::State)> = HashSet::new();
    let mut stack: Vec<(usize, M::State)> = Vec::new();
    let mut state = model.init();
    let mut entry = events[0].next;
    while entry != tail {
        let e = events[entry];
        if e.is_call {
            let op = e.op;
            let next_state = model.step(&state, &history[op].op);
            let mut tried = false;
            if let Some(next_state) = next_state {
                linearized[op] = true;
                if seen.insert((linearized.clone(), next_state.clone())) {
                    stack.push((entry, state));
                    state = next_state;
                    unlink(&mut events, entry);
                    unlink(&mut events, return_of[op]);
                    entry = events[0].next;
                    tried = true;
                } else {
                    linearized[op] = false;
                }
            }
            if !tried {
                entry = e.next;
            }
        } else if history[e.op].ret.is_none() {
            // An unknown outcome that was never placed: it did not happen.
            entry = e.next;
        } else {
            // A return whose call could not be placed before it: undo the
            // last choice.
            let Some((call_entry, previous)) = stack.pop() else {
                return false;
            };
            let op = events[call_entry].op;
            linearized[op] = false;
            state = previous;
            relink(&mut events, return_of[op]);
            relink(&mut events, call_entry);
            entry = events[call_entry].next;
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A register of one number: writes and reads.
    struct Register;

    #[derive(Debug)]
    enum RegOp {
        Write(u32),
        Read(u32),
    }

    impl Model for Register {
        type State = u32;
        type Op = RegOp;
        fn init(&self) -> u32 {
            0
        }
        fn step(&self, state: &u32, op: &RegOp) -> Option<u32> {
            match op {
                RegOp::Write(v) => Some(*v),
                RegOp::Read(v) => (v == state).then_some(*state),
            }
        }
    }

    fn op(call: u64, ret: Option<u64>, op: RegOp) -> Operation<RegOp> {
        Operation { call, ret, op }
    }

    #[test]
    fn sequential_and_overlapping_histories_pass() {
        let h = [
            op(0, Some(1), RegOp::Write(1)),
            op(2, Some(3), RegOp::Read(1)),
            op(4, Some(9), RegOp::Write(2)),
            // Overlaps the write: may read either value.
            op(5, Some(6), RegOp::Read(1)),
            op(7, Some(8), RegOp::Read(2)),
            op(10, Some(11), RegOp::Read(2)),
        ];
        assert!(linearizable(&Register, &h));
    }

    #[test]
    fn a_stale_read_after_a_finished_write_fails() {
        let h = [
            op(0, Some(1), RegOp::Write(1)),
            op(2, Some(3), RegOp::Write(2)),
            op(4, Some(5), RegOp::Read(1)),
        ];
        assert!(!linearizable(&Register, &h));
        // Reads that go back in time once a newer value was read.
        let h = [
            op(0, Some(10), RegOp::Write(1)),
            op(1, Some(2), RegOp::Read(1)),
            op(3, Some(4), RegOp::Read(0)),
        ];
        assert!(!linearizable(&Register, &h));
    }

    #[test]
    fn an_unknown_outcome_may_or_may_not_have_happened() {
        let happened = [op(0, None, RegOp::Write(7)), op(5, Some(6), RegOp::Read(7))];
        assert!(linearizable(&Register, &happened));
        let not = [op(0, None, RegOp::Write(7)), op(5, Some(6), RegOp::Read(0))];
        assert!(linearizable(&Register, &not));
        let but_not_before_its_call =
            [op(0, Some(1), RegOp::Read(7)), op(2, None, RegOp::Write(7))];
        assert!(!linearizable(&Register, &but_not_before_its_call));
    }
}
