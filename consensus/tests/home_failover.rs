//! Failing a partition's home over to another datacenter
//! (`specs/HomeFailover.tla`): the home lease that fences the old home,
//! the failover election that waits out the grants it gave and reads a
//! majority of every other datacenter, and the cut of the recovered log at
//! its first hole. Scripted flows on a hand-driven network, each node with
//! its own clock, and a seeded simulation (below) that must catch each
//! guard turned off.

use std::collections::BTreeMap;

use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;
use saferchat_consensus::partition_log::{
    Checks, Entry, Failover, HeldCopies, LogAcceptor, LogConfig, LogMessage, LogReplica, Slot,
    Term, Value,
};
use saferchat_consensus::{Drift, LeaseConfig, Millis, NodeId};

fn lease() -> LeaseConfig {
    LeaseConfig {
        lease_ms: 1_000,
        renew_every_ms: 250,
        guard_ms: 10,
        drift: Drift::new(500),
    }
}

fn ids(v: &[u64]) -> Vec<NodeId> {
    v.iter().copied().map(NodeId).collect()
}

/// Node `me` of a partition with `voters` and `learners`, a home lease,
/// in `epoch`, a failover epoch when `groups` is given.
fn config(
    me: u64,
    voters: &[u64],
    learners: &[u64],
    epoch: u64,
    groups: Option<&[&[u64]]>,
) -> LogConfig {
    let mut c = LogConfig::with_learners(NodeId(me), ids(voters), ids(learners)).in_epoch(epoch);
    c.home_lease = Some(lease());
    c.failover = groups.map(|g| Failover {
        groups: g.iter().map(|g| ids(g)).collect(),
    });
    c
}

fn post(v: u32) -> Value<u32> {
    Value::Post(v)
}

/// Replicas on a hand-driven network; every node reads its own clock.
struct Net {
    nodes: BTreeMap<u64, LogReplica<u32>>,
    clocks: BTreeMap<u64, Millis>,
    inflight: Vec<(NodeId, NodeId, LogMessage<u32>)>,
    released: BTreeMap<u64, Vec<(u64, Value<u32>)>>,
    newer_epoch: BTreeMap<u64, u64>,
}

impl Net {
    fn new(configs: Vec<LogConfig>) -> Net {
        let mut net = Net {
            nodes: BTreeMap::new(),
            clocks: BTreeMap::new(),
            inflight: Vec::new(),
            released: BTreeMap::new(),
            newer_epoch: BTreeMap::new(),
        };
        for c in configs {
            let me = c.me.0;
            net.nodes.insert(
                me,
                LogReplica::new(c, LogAcceptor::restore(Term::ZERO, [], Slot(0)), Slot(0)),
            );
            net.set_clock(me, 0);
        }
        net
    }

    fn node(&mut self, n: u64) -> &mut LogReplica<u32> {
        self.nodes.get_mut(&n).unwrap()
    }

    /// Moves node `n`'s clock to `t` (never back) and ticks it.
    fn set_clock(&mut self, n: u64, t: u64) {
        let now = Millis(t);
        self.clocks.insert(n, now);
        self.node(n).tick(now);
        self.collect(n);
    }

    fn collect(&mut self, n: u64) {
        let ready = self.node(n).take_ready();
        for (to, m) in ready.messages {
            self.inflight.push((NodeId(n), to, m));
        }
        if let Some(e) = ready.newer_epoch {
            self.newer_epoch.insert(n, e);
        }
        self.released
            .entry(n)
            .or_default()
            .extend(ready.committed.into_iter().map(|c| (c.slot.0, c.value)));
    }

    /// Delivers everything in flight (each message after a tick of its
    /// receiver's clock) except what `drop` says is lost.
    fn run(&mut self, drop: impl Fn(u64, u64, &LogMessage<u32>) -> bool) {
        let ns: Vec<u64> = self.nodes.keys().copied().collect();
        for n in ns {
            self.collect(n);
        }
        while !self.inflight.is_empty() {
            let (from, to, m) = self.inflight.remove(0);
            if drop(from.0, to.0, &m) || !self.nodes.contains_key(&to.0) {
                continue;
            }
            let now = self.clocks[&to.0];
            let node = self.node(to.0);
            node.tick(now);
            node.step(from, m);
            self.collect(to.0);
        }
    }

    fn released(&self, n: u64) -> Vec<(u64, Value<u32>)> {
        self.released.get(&n).cloned().unwrap_or_default()
    }
}

fn cut(nodes: &'static [u64]) -> impl Fn(u64, u64, &LogMessage<u32>) -> bool {
    move |from, to, _| nodes.contains(&from) || nodes.contains(&to)
}

#[test]
fn a_leader_releases_only_while_a_majority_of_all_replicas_grant_its_home_lease() {
    // Home voters 1 and 2; learners 3, 4 and 5 in other datacenters.
    let (v, l) = (&[1, 2][..], &[3, 4, 5][..]);
    let mut net = Net::new((1..=5).map(|me| config(me, v, l, 1, None)).collect());
    net.node(1).campaign().unwrap();
    net.run(cut(&[3, 4, 5]));
    assert!(net.node(1).leading().is_some(), "voters elect");
    assert_eq!(net.node(1).home_lease_until(), None, "2 of 5 grants");
    net.node(1).append(vec![post(7)]).unwrap();
    net.run(cut(&[3, 4, 5]));
    assert_eq!(
        net.released(1),
        vec![],
        "committed by the voters, but no lease"
    );

    // Learner 3 comes back; the next renewal brings its grant.
    net.set_clock(1, 250);
    net.run(cut(&[4, 5]));
    assert_eq!(net.node(1).home_lease_until(), Some(Millis(1_250)));
    assert_eq!(net.released(1), vec![(1, post(7))]);

    // Learner 3 is cut off again: renewals fail, the lease runs out at the
    // end of the last grant, and a post committed after stays unreleased.
    for t in [500, 750, 1_000, 1_249] {
        net.set_clock(1, t);
        net.run(cut(&[3, 4, 5]));
    }
    assert_eq!(net.node(1).home_lease_until(), Some(Millis(1_250)));
    net.set_clock(1, 1_250);
    net.run(cut(&[3, 4, 5]));
    assert_eq!(net.node(1).home_lease_until(), None);
    net.node(1).append(vec![post(8)]).unwrap();
    net.run(cut(&[3, 4, 5]));
    assert_eq!(net.released(1), vec![(1, post(7))]);
    assert!(
        net.node(1).leading().is_some(),
        "still leads, cannot release"
    );

    // Any majority of all the replicas will do: 4 and 5 answer the next renewal.
    net.set_clock(1, 1_500);
    net.run(cut(&[3]));
    assert_eq!(net.released(1), vec![(1, post(7)), (2, post(8))]);
}

/// Epoch 1: node 1 is the home's only voter, 2 and 3 learn (one
/// datacenter each). Node 1 leads, holds a lease from itself and 2, and
/// released `posts` in order; what `lost` names never arrived.
fn old_home(posts: &[u32], lost: impl Fn(u64, &LogMessage<u32>) -> bool) -> Net {
    let mut net = Net::new(vec![
        config(1, &[1], &[2, 3], 1, None),
        config(2, &[1], &[2, 3], 1, None),
        config(3, &[1], &[2, 3], 1, None),
    ]);
    net.node(1).campaign().unwrap();
    net.run(|_, _, _| false);
    for p in posts {
        net.node(1).append(vec![post(*p)]).unwrap();
        net.run(|_, to, m| lost(to, m));
    }
    net
}

/// Nodes 2 and 3 learn that the map moved the home to node 2's datacenter
/// in epoch 2: a failover epoch, whose elections need 2 and 3.
fn fail_over(net: &mut Net) {
    let (v, l, groups) = (&[2][..], &[1, 3][..], &[&[2][..], &[3][..]][..]);
    for me in [2, 3] {
        assert!(net.node(me).reconfigure(config(me, v, l, 2, Some(groups))));
    }
}

#[test]
fn a_failover_candidate_waits_out_the_grants_given_and_reads_every_other_datacenter() {
    let mut net = old_home(&[10], |_, _| false);
    assert_eq!(net.released(1), vec![(1, post(10))]);
    fail_over(&mut net);
    let promise = lease().promise_ms();

    // Node 2 granted node 1 a lease at time 0: it does not run until that
    // promise ran out.
    net.set_clock(2, promise - 1);
    assert_eq!(net.node(2).campaign(), None);
    net.set_clock(2, promise);
    let term = net.node(2).campaign().unwrap();
    assert_eq!(term.epoch, 2);

    // Node 3's clock is behind: its grant to node 1 still runs, so it
    // holds the Prepare back, and node 2 cannot lead with its own promise
    // alone (nor with node 1's, which is cut off).
    net.set_clock(3, promise - 1);
    net.run(cut(&[1]));
    assert!(net.node(2).leading().is_none());
    net.set_clock(3, promise);
    net.run(cut(&[1]));
    assert_eq!(net.node(2).leading(), Some(term));

    // It recovered node 1's post from node 3, holds a lease from 2 and 3
    // (two of three), and releases it, then its own.
    assert!(net.node(2).home_lease_until().is_some());
    net.node(2).append(vec![post(20)]).unwrap();
    net.run(cut(&[1]));
    assert_eq!(net.released(2), vec![(1, post(10)), (2, post(20))]);
}

#[test]
fn the_old_home_cut_off_loses_its_lease_and_a_replica_of_the_new_epoch_refuses_it() {
    let mut net = old_home(&[10], |_, _| false);
    fail_over(&mut net);
    // Node 1 renews: 2 and 3 know epoch 2 and refuse, so it learns that
    // the map moved on and stops leading.
    net.set_clock(1, 250);
    net.run(|_, _, _| false);
    assert_eq!(net.newer_epoch.get(&1), Some(&2));
    assert!(net.node(1).leading().is_none());
    assert_eq!(net.node(1).home_lease_until(), None);
    assert_eq!(net.released(1), vec![(1, post(10))]);
}

#[test]
fn a_failover_leader_cuts_the_recovered_log_at_its_first_hole() {
    // Node 3 stored slots 1 and 3 but not 2 (its Accept was lost), and
    // node 2 none of them (cut off from the old home's writes).
    let mut net = old_home(&[1, 2, 3], |to, m| {
        let LogMessage::Accept { first, values, .. } = m else {
            return false;
        };
        !values.is_empty() && (to == 2 || (to == 3 && *first == Slot(2)))
    });
    assert_eq!(
        net.released(1),
        vec![(1, post(1)), (2, post(2)), (3, post(3))]
    );
    fail_over(&mut net);
    let promise = lease().promise_ms();
    for n in [2, 3] {
        net.set_clock(n, promise);
    }
    net.node(2).campaign().unwrap();
    net.run(cut(&[1]));
    assert!(net.node(2).leading().is_some());
    net.node(2).append(vec![post(99)]).unwrap();
    net.run(cut(&[1]));
    // Slot 3 (a post released after the lost slot 2) is not kept: the
    // new home's log goes on from slot 1.
    assert_eq!(net.released(2), vec![(1, post(1)), (2, post(99))]);
}

#[test]
fn a_restarted_replica_holds_a_failover_prepare_back_for_one_promise() {
    let mut net = old_home(&[10], |_, _| false);
    fail_over(&mut net);
    // Node 3 restarts (its durable state kept, its grants forgotten): its
    // first reading of the clock starts one whole promise.
    let acceptor = net.node(3).acceptor().clone();
    let released = net.node(3).released();
    let c = net.node(3).config().clone();
    net.nodes.insert(3, LogReplica::new(c, acceptor, released));
    let promise = lease().promise_ms();
    net.set_clock(3, 5_000);
    net.set_clock(2, 5_000);
    net.node(2).campaign().unwrap();
    net.run(cut(&[1]));
    assert!(net.node(2).leading().is_none());
    net.set_clock(3, 5_000 + promise);
    net.run(cut(&[1]));
    assert!(net.node(2).leading().is_some());
}

/// Epoch 1: node 1 is the home's only voter; 2, 3 and 4 (the next home)
/// and 5 (a third datacenter) learn. Node 1 leads and released post 10,
/// which every node released too, and post 11, which only node 2 stored
/// and released (its Accepts to the others were lost).
fn three_datacenters(checks: Checks) -> Net {
    three_datacenters_without(checks, &[])
}

/// [`three_datacenters`], with nothing of epoch 1 reaching the nodes
/// `behind` (a learner far behind): they store and release nothing.
fn three_datacenters_without(checks: Checks, behind: &'static [u64]) -> Net {
    let mut net = Net::new(
        (1..=5)
            .map(|me| {
                let mut c = config(me, &[1], &[2, 3, 4, 5], 1, None);
                c.checks = checks;
                c
            })
            .collect(),
    );
    let lost = |_, to, _: &LogMessage<u32>| behind.contains(&to);
    net.node(1).campaign().unwrap();
    net.run(lost);
    net.node(1).append(vec![post(10)]).unwrap();
    net.run(lost);
    net.node(1).resend();
    net.run(lost);
    let only_to_2 = |from, to, m: &LogMessage<u32>| {
        lost(from, to, m)
            || (matches!(m, LogMessage::Accept { values, .. } if !values.is_empty()) && to != 2)
    };
    net.node(1).append(vec![post(11)]).unwrap();
    net.run(only_to_2);
    net.node(1).resend();
    net.run(only_to_2);
    assert_eq!(net.released(2), vec![(1, post(10)), (2, post(11))]);
    for n in [3, 4, 5] {
        if behind.contains(&n) {
            assert_eq!(net.released(n), vec![]);
        } else {
            assert_eq!(net.released(n), vec![(1, post(10))]);
        }
    }
    net
}

/// Nodes 2 to 5 learn that the home moved to 2, 3 and 4 in epoch 2, a
/// failover epoch, and are held owing its check (as the node holds every
/// replica that applied the partition before); their grants to node 1
/// have run out.
fn fail_over_to_three(net: &mut Net, checks: Checks) {
    let groups = &[&[2, 3, 4][..], &[5][..]][..];
    for me in 2..=5 {
        let mut c = config(me, &[2, 3, 4], &[1, 5], 2, Some(groups));
        c.checks = checks;
        assert!(net.node(me).reconfigure(c));
        net.node(me).hold(Some(2));
        net.set_clock(me, lease().promise_ms());
    }
}

#[test]
fn a_failover_leader_vouches_for_promisers_whose_timelines_it_recovered() {
    let mut net = three_datacenters(Checks::default());
    fail_over_to_three(&mut net, Checks::default());
    // Node 3 runs with promises from 2 and 5 (4 is away): every promise
    // says its timeline is untouched, and node 2's brings post 11.
    net.node(3).campaign().unwrap();
    net.run(cut(&[1, 4]));
    assert!(net.node(3).leading().is_some());
    net.node(3).hold(None);
    assert_eq!(
        net.node(3).vouched(),
        [(NodeId(2), Slot(2)), (NodeId(5), Slot(1))],
        "each promiser but the leader, with the prefix it released"
    );
    net.node(3).resend();
    net.run(cut(&[1, 4]));
    assert!(net.node(3).established().is_some());
    assert_eq!(net.released(3), vec![(1, post(10)), (2, post(11))]);
    // What each vouched replica released is a prefix of the established
    // log: the node lifts its hold where it is, without a check.
    for (n, prefix) in net.node(3).vouched().to_vec() {
        let mine = net.released(n.0);
        assert_eq!(mine.len() as u64, prefix.0);
        assert_eq!(mine[..], net.released(3)[..mine.len()], "{n}");
        assert!(net.node(n.0).rewind(prefix, 2));
        assert!(!net.node(n.0).is_held());
    }
    // They release on from there; node 4, which did not promise, stays
    // held until it checked.
    net.node(3).append(vec![post(12)]).unwrap();
    net.run(|_, _, _| false);
    net.node(3).resend();
    net.run(|_, _, _| false);
    let log = vec![(1, post(10)), (2, post(11)), (3, post(12))];
    for n in [2, 3, 5] {
        assert_eq!(net.released(n), log, "node {n}");
    }
    assert!(net.node(4).is_held());
    assert_eq!(net.released(4), vec![(1, post(10))]);
}

#[test]
fn a_promiser_that_released_nothing_is_not_vouched_for_and_does_not_stop_the_vouching() {
    let mut net = three_datacenters_without(Checks::default(), &[5]);
    fail_over_to_three(&mut net, Checks::default());
    // Node 5 is held like the others but released nothing: its promise
    // says untouched at slot 0. Node 3 still vouches for node 2, whose
    // promise brings post 11, and not for node 5, which may keep rooms
    // of the partition no prefix of the log accounts for.
    net.node(3).campaign().unwrap();
    net.run(cut(&[1, 4]));
    assert!(net.node(3).leading().is_some());
    net.node(3).hold(None);
    assert_eq!(net.node(3).vouched(), [(NodeId(2), Slot(2))]);
    net.node(3).resend();
    net.run(cut(&[1, 4]));
    assert!(net.node(3).established().is_some());
    assert_eq!(net.released(3), vec![(1, post(10)), (2, post(11))]);
    assert!(net.node(5).is_held());
}

/// Node 3 leads epoch 2 first without node 2, which alone holds post
/// 11: it recovers nothing after slot 1 and commits post 30 there on 3,
/// 4 and 5. It stops leading before it established the epoch, and node 4
/// runs with promises from 2 and 5, and establishes the epoch.
fn a_second_failover_leader(net: &mut Net) {
    net.node(3).campaign().unwrap();
    net.run(cut(&[1, 2]));
    assert!(net.node(3).leading().is_some());
    net.node(3).hold(None);
    assert_eq!(
        net.node(3).vouched(),
        [(NodeId(4), Slot(1)), (NodeId(5), Slot(1))]
    );
    net.node(3).append(vec![post(30)]).unwrap();
    net.run(cut(&[1, 2]));
    assert_eq!(net.released(3), vec![(1, post(10)), (2, post(30))]);
    net.node(3).step_down();
    // 4 and 5 granted 3 a home lease: they wait for it to run out.
    for n in [2, 4, 5] {
        net.set_clock(n, 2 * lease().promise_ms());
    }
    net.node(4).campaign().unwrap();
    net.run(cut(&[1, 3]));
    assert!(net.node(4).leading().is_some());
    net.node(4).hold(None);
    net.node(4).resend();
    net.run(cut(&[1, 3]));
    assert!(net.node(4).established().is_some());
}

#[test]
fn a_failover_leader_vouches_for_no_one_once_a_leader_of_its_epoch_wrote() {
    let mut net = three_datacenters(Checks::default());
    fail_over_to_three(&mut net, Checks::default());
    a_second_failover_leader(&mut net);
    // Nodes 4 and 5 hold post 30 of epoch 2, which outranks node 2's
    // post 11: the log goes on with post 30, and node 2's timeline is no
    // prefix of it. Their promises did not say untouched, so node 4
    // vouches for no one, and node 2 checks.
    assert_eq!(net.released(4), vec![(1, post(10)), (2, post(30))]);
    assert!(net.node(4).vouched().is_empty());
}

#[test]
fn broken_vouching_for_touched_promisers_keeps_a_divergent_timeline() {
    let broken = Checks {
        untouched_only: false,
        ..Checks::default()
    };
    let mut net = three_datacenters(broken);
    fail_over_to_three(&mut net, broken);
    a_second_failover_leader(&mut net);
    // Vouching for every promiser that said untouched, whatever the
    // others said: node 2 is vouched for, and its post 11 at slot 2 is
    // not what the established log holds there.
    assert_eq!(net.node(4).vouched(), [(NodeId(2), Slot(2))]);
    assert_eq!(net.released(2)[1], (2, post(11)));
    assert_eq!(net.released(4)[1], (2, post(30)));
}

#[test]
fn a_failover_leader_that_did_not_establish_may_hold_a_slot_the_log_replaced() {
    // Node 2 alone released post 11 at slot 2. It leads epoch 2 first,
    // elected by 2, 3 and 5: its log starts after its own released
    // prefix, so it writes nothing at slot 2, and it is cut off at once.
    let mut net = three_datacenters(Checks::default());
    fail_over_to_three(&mut net, Checks::default());
    net.node(2).campaign().unwrap();
    net.run(cut(&[1, 4]));
    assert!(net.node(2).leading().is_some_and(|t| t.epoch == 2));
    net.node(2).hold(None);
    // Node 3 leads without it (promises from 3, 4 and 5: none has slot
    // 2), once the grants 3 and 5 gave node 2 ran out, puts post 30
    // there and establishes the epoch.
    for n in [3, 4, 5] {
        net.set_clock(n, 2 * lease().promise_ms());
    }
    net.node(3).campaign().unwrap();
    net.run(cut(&[1, 2]));
    assert!(net.node(3).leading().is_some());
    net.node(3).append(vec![post(30)]).unwrap();
    net.run(cut(&[1, 2]));
    net.node(3).resend();
    net.run(cut(&[1, 2]));
    assert!(net.node(3).established().is_some());
    // Node 2 led the epoch, and its timeline is not the epoch's: only
    // the leader that established it is checked by definition, and the
    // node keeps any other leader of it unchecked.
    assert_eq!(net.released(2), vec![(1, post(10)), (2, post(11))]);
    assert_eq!(net.released(3), vec![(1, post(10)), (2, post(30))]);
}

// ---------------------------------------------------------------------
// Seeded simulation.
//
// Three datacenters of three replicas: `H1` the old home, `H2` the new
// one, `H3` a third. Real time advances a few milliseconds per step and
// every node reads its own clock, offset and drifting within the lease's
// bound. Messages are lost, duplicated and reordered, leaders crash and
// restart, `H1` may be cut off from the rest (and healed), and the map
// fails the home over to `H2` at any moment (an operator may do so while
// the old home is alive), then records `Establish` (a broken map records
// it as soon as the new home has a leader). Every replica that learns of
// epoch 2 is held owing its check, as the node holds it; once it knows
// the epoch established, the leader that established it is checked, and
// so is a replica that leader vouched for, which rewinds where it is
// (the check against another's timeline is left to the node's tests).
// In half the schedules an unheld node compacts its log a few slots
// behind what it released, and a node told it is behind copies a
// timeline as the node does (`Sim::copy`; held, it realigns with its
// leader: `Sim::realign`). Checked on every
// release by a leader (an acknowledgement): agreement within each epoch,
// the fence (no release of epoch 1 after epoch 2's first, in real time),
// and that every post acknowledged at the cross-datacenter level is what
// epoch 2 has at its slot; and on every replica that becomes checked and
// every release of a checked one, that all checked timelines hold the
// same post at every slot (`CheckedAgree`) and none holds another post
// where a leader of epoch 2 acknowledged one (`AckedKept`). An epoch-2
// leader's cross-datacenter acknowledgements are checked against the
// logs and timelines of the datacenter it counted (`CrossStored`). Once
// the faults end, the new home must establish (`Live`, `Sim::settle`).
// Each guard off must be caught.

const H1: [u64; 3] = [1, 2, 3];
const H2: [u64; 3] = [4, 5, 6];
const H3: [u64; 3] = [7, 8, 9];
const NODES: usize = 9;
const POSTS: u32 = 60;

fn sim_config(me: u64, epoch: u64, failover: bool, checks: Checks) -> LogConfig {
    let (voters, learners): (&[u64], Vec<u64>) = if epoch == 1 {
        (&H1, H2.iter().chain(&H3).copied().collect())
    } else {
        (&H2, H1.iter().chain(&H3).copied().collect())
    };
    let mut c = LogConfig::with_learners(NodeId(me), ids(voters), ids(&learners)).in_epoch(epoch);
    c.home_lease = Some(lease());
    c.checks = checks;
    if epoch == 2 && failover {
        c.failover = Some(Failover {
            groups: vec![ids(&H2), ids(&H3)],
        });
    }
    c
}

type Disk = (Term, BTreeMap<Slot, Entry<u32>>, Slot);

struct Sim {
    rng: ChaCha8Rng,
    checks: Checks,
    /// Broken map: it records `Establish` as soon as epoch 2 has a leader.
    early_narrow: bool,
    /// Real time, in milliseconds.
    real: u64,
    /// Each node's clock: offset and drift in parts per million.
    clocks: Vec<(u64, i64)>,
    nodes: Vec<LogReplica<u32>>,
    /// The epoch each node knows, and whether it knows epoch 2 established.
    known: Vec<(u64, bool)>,
    disk: Vec<Disk>,
    net: Vec<(NodeId, NodeId, LogMessage<u32>)>,
    /// `H1` cut off from the other datacenters.
    cut: bool,
    /// When (real time) `H1` is cut off, the map moves the home, and the
    /// cut heals (never, for some schedules); a schedule without a cut
    /// has an operator move the home of a healthy partition.
    cut_at: Option<u64>,
    move_at: u64,
    heal_at: Option<u64>,
    /// Whether the cut leaves `H1` and `H3` connected (only `H2` is cut
    /// off from the old home).
    partial: bool,
    /// Whether the cut leaves node 4 (a voter of the new home) still
    /// reaching `H1`: it learns what the old home releases after the cut,
    /// which the rest of the new home does not (drawn apart from the
    /// schedule, so that a seed without it runs as it always did).
    leak: bool,
    /// Per mille of steps that lose a message, and percent of a node's
    /// steps that learn the map.
    loss: u32,
    learn: u32,
    map_epoch: u64,
    established: bool,
    next_post: u32,
    /// What leaders released (acknowledged), by epoch and slot.
    acks: BTreeMap<(u64, u64), Value<u32>>,
    /// Posts acknowledged in epoch 2, by post: slot.
    acked_new: BTreeMap<u32, u64>,
    /// Posts acknowledged at the cross-datacenter level, by slot.
    cross: BTreeMap<u64, u32>,
    /// Slots epoch 2's leaders acknowledged at the cross-datacenter level
    /// (checked by `CrossStored` when they are).
    cross_new: BTreeMap<u64, u32>,
    /// Real time of epoch 2's first release.
    first_new_release: Option<u64>,
    /// Each node's timeline: the values it released, slot 1 first.
    stores: Vec<Vec<Value<u32>>>,
    /// Each node's owed check (durable): the node holds every replica
    /// that learns of epoch 2 until it is checked, which here only the
    /// leader that established the epoch and the replicas it vouched for
    /// ever are (the check against another's timeline is left to the
    /// node's tests).
    owed: Vec<Option<u64>>,
    /// The leader that established epoch 2, and whom it vouched for.
    establisher: Option<(usize, Vec<(NodeId, Slot)>)>,
    /// The timeline of every checked replica, slot by slot, as the first
    /// of them to reach a slot released it (`CheckedAgree`).
    lineage: BTreeMap<u64, Value<u32>>,
    /// Broken node: a leader of the failover epoch counts as checked the
    /// moment it leads, as the node did before the map named the leader.
    checked_when_leading: bool,
    /// Replicas checked because the establishing leader vouched for them.
    vouched_checks: usize,
    /// Nodes found barred from leading epoch 2 (`LogReplica::is_barred`).
    barred: std::collections::BTreeSet<usize>,
    /// Applied slots an unheld node keeps in its log before compacting
    /// them away (`None`: it compacts nothing); drawn apart from the
    /// schedule, so that a seed without compaction runs as it always did.
    keep: Option<u64>,
    /// Each node's compaction floor (durable).
    floors: Vec<Slot>,
    /// What each held node copied while held (durable, as the node keeps
    /// it in the partition log file): `installed_held` and whose
    /// timelines the copies hold.
    held_disk: Vec<(Option<Slot>, HeldCopies)>,
    /// Timeline copies installed (the node's `copy`).
    copies: usize,
    /// Held timelines made their leader's (`LogReplica::realigned`).
    realigns: usize,
    /// The schedule's faults are over (`Sim::settle`): no restarts, no
    /// loss, no cut, and every node learns the map at every step.
    calm: bool,
    /// Broken node: see [`Broken`].
    no_realign: bool,
    copy_from_unchecked: bool,
}

/// How a simulated node treats a failover epoch's checks.
#[derive(Clone, Copy)]
struct Broken {
    /// The map records `Establish` as soon as epoch 2 has a leader.
    early_narrow: bool,
    /// A leader of epoch 2 counts as checked as soon as it leads.
    checked_when_leading: bool,
    /// A held replica never realigns (`LogReady::realign` ignored).
    no_realign: bool,
    /// A checked replica copies from a replica that has not checked.
    copy_from_unchecked: bool,
}

const AS_DESIGNED: Broken = Broken {
    early_narrow: false,
    checked_when_leading: false,
    no_realign: false,
    copy_from_unchecked: false,
};

impl Sim {
    fn new(seed: u64, checks: Checks, broken: Broken) -> Sim {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let clocks = (0..NODES)
            .map(|_| (rng.random_range(0..10_000), rng.random_range(-400..=400)))
            .collect();
        let cut_at = (rng.random_range(0..10) > 0).then(|| rng.random_range(1_000..6_000));
        let move_at = cut_at.unwrap_or(3_000) + rng.random_range(0..2_000);
        let heal_at = rng
            .random_bool(0.5)
            .then(|| move_at + rng.random_range(0..4_000));
        let partial = rng.random_bool(0.3);
        let leak = ChaCha8Rng::seed_from_u64(seed ^ 0x1ea4).random_bool(0.3);
        let loss = [20, 150][rng.random_range(0..2)];
        let learn = [3, 20][rng.random_range(0..2)];
        let mut apart = ChaCha8Rng::seed_from_u64(seed ^ 0xc0b1);
        let keep = apart.random_bool(0.5).then(|| apart.random_range(1..8));
        Sim {
            rng,
            checks,
            early_narrow: broken.early_narrow,
            real: 0,
            clocks,
            nodes: (1..=NODES as u64)
                .map(|me| {
                    LogReplica::new(
                        sim_config(me, 1, false, checks),
                        LogAcceptor::restore(Term::ZERO, [], Slot(0)),
                        Slot(0),
                    )
                })
                .collect(),
            known: vec![(1, false); NODES],
            disk: vec![(Term::ZERO, BTreeMap::new(), Slot(0)); NODES],
            net: Vec::new(),
            cut: false,
            cut_at,
            move_at,
            heal_at,
            partial,
            leak,
            loss,
            learn,
            map_epoch: 1,
            established: false,
            next_post: 1,
            acks: BTreeMap::new(),
            acked_new: BTreeMap::new(),
            cross: BTreeMap::new(),
            cross_new: BTreeMap::new(),
            first_new_release: None,
            stores: vec![Vec::new(); NODES],
            owed: vec![None; NODES],
            establisher: None,
            lineage: BTreeMap::new(),
            checked_when_leading: broken.checked_when_leading,
            vouched_checks: 0,
            barred: std::collections::BTreeSet::new(),
            keep,
            floors: vec![Slot(0); NODES],
            held_disk: vec![(None, HeldCopies::default()); NODES],
            copies: 0,
            realigns: 0,
            calm: false,
            no_realign: broken.no_realign,
            copy_from_unchecked: broken.copy_from_unchecked,
        }
    }

    /// Whether node `i`'s timeline counts as checked against epoch 2.
    fn checked(&self, i: usize) -> bool {
        self.known[i].0 == 2 && self.owed[i].is_none()
    }

    /// `CheckedAgree`: node `i`, checked, holds at every slot what every
    /// other checked replica holds there.
    fn agree(&mut self, i: usize, from: usize) -> Result<(), String> {
        for (k, v) in self.stores[i].iter().enumerate().skip(from) {
            let slot = k as u64 + 1;
            if let Some(acked) = self.acks.get(&(2, slot))
                && acked != v
            {
                return Err(format!(
                    "AckedKept: node {}, checked, holds {v:?} at #{slot}, where a leader of epoch 2 acknowledged {acked:?}",
                    i + 1
                ));
            }
            match self.lineage.get(&slot) {
                Some(have) if have != v => {
                    return Err(format!(
                        "CheckedAgree: node {} holds {v:?} at #{slot}, another checked replica {have:?}",
                        i + 1
                    ));
                }
                Some(_) => {}
                None => {
                    self.lineage.insert(slot, v.clone());
                }
            }
        }
        Ok(())
    }

    /// Node `i` no longer owes the check: compare all of its timeline.
    fn mark_checked(&mut self, i: usize) -> Result<(), String> {
        self.owed[i] = None;
        self.nodes[i].hold(None);
        self.held_disk[i] = (None, HeldCopies::default());
        self.agree(i, 0)
    }

    /// What the node's driver does once it knows epoch 2 established: the
    /// leader the map names is checked; a replica it vouched for that is
    /// a follower and has released exactly the prefix it promised with
    /// rewinds there and is checked too.
    fn settle_checks(&mut self, i: usize) -> Result<(), String> {
        if self.owed[i] != Some(2) || self.known[i] != (2, true) {
            return Ok(());
        }
        let Some((leader, vouched)) = &self.establisher else {
            return Ok(());
        };
        if *leader == i {
            return self.mark_checked(i);
        }
        let me = NodeId(i as u64 + 1);
        let Some((_, prefix)) = vouched.iter().find(|(n, _)| *n == me).copied() else {
            return Ok(());
        };
        if self.nodes[i].released() == prefix && self.nodes[i].rewind(prefix, 2) {
            self.vouched_checks += 1;
            return self.mark_checked(i);
        }
        Ok(())
    }

    fn now(&self, i: usize) -> Millis {
        let (offset, ppm) = self.clocks[i];
        let drift = i64::try_from(self.real).unwrap() * ppm / 1_000_000;
        Millis(offset + u64::try_from(i64::try_from(self.real).unwrap() + drift).unwrap())
    }

    fn tick(&mut self, i: usize) {
        let now = self.now(i);
        self.nodes[i].tick(now);
    }

    fn in_home(i: usize) -> bool {
        H1.contains(&(i as u64 + 1))
    }

    /// Node `i` cannot reach the map while cut off from both other
    /// datacenters.
    fn reaches_map(&self, i: usize) -> bool {
        !(self.cut && !self.partial && Self::in_home(i))
    }

    /// Whether the cut drops messages between nodes `i` and `j`.
    fn cut_between(&self, i: usize, j: usize) -> bool {
        let dc = |n: usize| n / 3;
        self.cut
            && dc(i) != dc(j)
            && (dc(i) == 0 || dc(j) == 0)
            && !(self.partial && (dc(i) == 2 || dc(j) == 2))
            && !(self.leak && (i == 3 || j == 3))
    }

    fn collect(&mut self, i: usize) -> Result<(), String> {
        if self.nodes[i].is_barred() {
            self.barred.insert(i);
        }
        let epoch_led = self.nodes[i].leading().map(|t| t.epoch);
        let ready = self.nodes[i].take_ready();
        if let Some(w) = ready.write {
            self.disk[i].0 = w.promised;
            self.disk[i].1.extend(w.entries);
        }
        let me = NodeId(i as u64 + 1);
        for (to, m) in ready.messages {
            self.net.push((me, to, m));
        }
        let need = ready
            .lagging
            .iter()
            .filter(|(n, _)| *n == me)
            .map(|(_, s)| *s)
            .max();
        let realign = ready.realign;
        if ready.leading.is_some_and(|t| t.epoch == 2)
            && self.checked_when_leading
            && self.owed[i] == Some(2)
        {
            self.mark_checked(i)?;
        }
        for c in ready.committed {
            if c.slot != self.disk[i].2.next() {
                return Err(format!("{me} released {} after {}", c.slot, self.disk[i].2));
            }
            self.disk[i].2 = c.slot;
            self.stores[i].push(c.value.clone());
            if self.checked(i) {
                let from = self.stores[i].len() - 1;
                self.agree(i, from)?;
            }
            if let Some(e) = epoch_led {
                self.acknowledged(me, e, c.slot.0, c.value)?;
            }
        }
        self.compact(i);
        if let Some(need) = need {
            self.copy(i, need)?;
        }
        if let Some((leader, need)) = realign.filter(|_| !self.no_realign) {
            self.realign(i, leader, need);
        }
        self.cross_acknowledge(i)
    }

    /// Node `i`, held, reports less than its leader's floor without being
    /// behind it, and makes its whole timeline the leader's, as the node's
    /// driver does (`LogReady::realign`), in one step here.
    fn realign(&mut self, i: usize, leader: NodeId, need: Slot) {
        let j = usize::try_from(leader.0).unwrap() - 1;
        let applied = self.nodes[j].released();
        if self.cut_between(i, j) || applied < need {
            return;
        }
        let term = self.nodes[i].newest_term();
        if !self.nodes[i].realigned(applied, leader, term) {
            return;
        }
        let upto = usize::try_from(applied.0).unwrap();
        self.stores[i] = self.stores[j][..upto].to_vec();
        self.disk[i].2 = applied;
        self.floors[i] = applied;
        self.disk[i].1.retain(|s, _| *s > applied);
        self.held_disk[i] = (self.nodes[i].installed_held(), self.nodes[i].held_copies());
        self.realigns += 1;
    }

    /// Node `i` drops the applied entries beyond the last `keep` from its
    /// log, as the node does beyond its retained bytes; a held log keeps
    /// them (the node compacts nothing of a held log).
    fn compact(&mut self, i: usize) {
        let Some(keep) = self.keep else {
            return;
        };
        let released = self.nodes[i].released();
        if self.owed[i].is_some() || released.0 <= keep {
            return;
        }
        let floor = Slot(released.0 - keep);
        if floor > self.floors[i] {
            self.nodes[i].compact(floor);
            self.floors[i] = floor;
            self.disk[i].1.retain(|s, _| *s > floor);
        }
    }

    /// Node `i` was told that its log is behind what its leader compacted
    /// (or found so as a candidate), and copies the partition's timeline
    /// as the node's driver does: from the first replica it reaches that
    /// applied `need`, in the order of `timeline/driver.rs::copy_order`
    /// (the leader it knows first; on a held replica its home's voters
    /// first, a leader outside them last). The copy is taken in one step
    /// here; the node's takes a while, with the newest term it knew as it
    /// began.
    fn copy(&mut self, i: usize, need: Slot) -> Result<(), String> {
        let me = NodeId(i as u64 + 1);
        let term = self.nodes[i].newest_term();
        let hint = self.nodes[i].leader_hint().filter(|l| *l != me);
        let voters: &[u64] = if self.known[i].0 == 1 { &H1 } else { &H2 };
        let voters = ids(voters);
        let mut order: Vec<NodeId> = Vec::new();
        let mut last = None;
        if self.owed[i].is_some() {
            order.extend(hint.filter(|h| voters.contains(h)));
            order.extend(&voters);
            last = hint.filter(|h| !voters.contains(h));
        } else {
            order.extend(hint);
        }
        order.extend((1..=NODES as u64).map(NodeId).filter(|n| Some(*n) != last));
        order.extend(last);
        let mut seen = Vec::new();
        for source in order {
            if source == me || seen.contains(&source) {
                continue;
            }
            seen.push(source);
            let j = usize::try_from(source.0).unwrap() - 1;
            let applied = self.nodes[j].released();
            if self.cut_between(i, j)
                || applied < need
                || (self.checked(i) && !self.checked(j) && !self.copy_from_unchecked)
            {
                continue;
            }
            let from = self.nodes[i].released();
            if !self.nodes[i].install_copy(applied, source, term) {
                return Ok(());
            }
            let (a, b) = (
                usize::try_from(from.0).unwrap(),
                usize::try_from(applied.0).unwrap(),
            );
            let copied = self.stores[j][a..b].to_vec();
            self.stores[i].extend(copied);
            self.disk[i].2 = applied;
            self.floors[i] = self.floors[i].max(applied);
            self.disk[i].1.retain(|s, _| *s > applied);
            self.held_disk[i] = (self.nodes[i].installed_held(), self.nodes[i].held_copies());
            self.copies += 1;
            if self.checked(i) {
                self.agree(i, a)?;
            }
            return Ok(());
        }
        Ok(())
    }

    fn acknowledged(
        &mut self,
        me: NodeId,
        epoch: u64,
        slot: u64,
        value: Value<u32>,
    ) -> Result<(), String> {
        if let Some(v) = self.acks.get(&(epoch, slot))
            && *v != value
        {
            return Err(format!(
                "Agreement in epoch {epoch}: #{slot} is {v:?} and {value:?} ({me})"
            ));
        }
        if epoch == 1 && self.first_new_release.is_some_and(|t| t < self.real) {
            return Err(format!(
                "Fence: {me} released #{slot} of epoch 1 at {} ms, after epoch 2 first released at {:?} ms",
                self.real, self.first_new_release
            ));
        }
        if epoch == 2 {
            self.first_new_release.get_or_insert(self.real);
            if let Some(kept) = self.lineage.get(&slot)
                && *kept != value
            {
                return Err(format!(
                    "AckedKept: {me} acknowledged {value:?} at #{slot} of epoch 2, where a checked replica holds {kept:?}"
                ));
            }
            if let Some(p) = self.cross.get(&slot)
                && value != Value::Post(*p)
            {
                return Err(format!(
                    "CrossKept: #{slot} held post {p}, released as {value:?} by {me}"
                ));
            }
            if let Value::Post(p) = value
                && let Some(other) = self.acked_new.insert(p, slot)
                && other != slot
            {
                return Err(format!("AckedOnce: post {p} in #{other} and #{slot}"));
            }
        }
        self.acks.insert((epoch, slot), value);
        Ok(())
    }

    /// An epoch-1 leader acknowledges at the cross-datacenter level what
    /// it released and a majority of `H2` or of `H3` stored; an epoch-2
    /// leader what a majority of `H1` or `H3` stored
    /// (`LogReplica::stored_by`), checked against what their logs and
    /// timelines hold (`CrossStored`).
    fn cross_acknowledge(&mut self, i: usize) -> Result<(), String> {
        let node = &self.nodes[i];
        match node.leading().map(|t| t.epoch) {
            Some(1) => {}
            Some(2) => return self.cross_acknowledge_new(i),
            _ => return Ok(()),
        }
        let released = node.released();
        let stored = node
            .stored_by(&ids(&H2), 2)
            .max(node.stored_by(&ids(&H3), 2));
        for s in 1..=stored.min(released).0 {
            if self.cross.contains_key(&s) {
                continue;
            }
            let Some(Value::Post(p)) = self.acks.get(&(1, s)).cloned() else {
                continue;
            };
            if let Some(v) = self.acks.get(&(2, s))
                && *v != Value::Post(p)
            {
                return Err(format!(
                    "CrossKept: post {p} acknowledged at #{s} after epoch 2 released {v:?} there"
                ));
            }
            self.cross.insert(s, p);
        }
        Ok(())
    }

    /// `CrossStored`: every slot an epoch-2 leader counts as stored on a
    /// majority of another datacenter (`H1` or `H3`) is held there, with
    /// the post it released, by a majority: in each replica's log, or in
    /// its timeline where its log no longer holds the slot (a checked
    /// replica rewound there). A held replica's timeline may hold a post
    /// of the old home's loss window where its log has none of the slot.
    fn cross_acknowledge_new(&mut self, i: usize) -> Result<(), String> {
        let node = &self.nodes[i];
        let released = node.released();
        let groups = [H1, H3];
        let marks: Vec<Slot> = groups
            .iter()
            .map(|g| node.stored_by(&ids(g), 2).min(released))
            .collect();
        let upto = marks.iter().copied().max().unwrap_or_default();
        for s in 1..=upto.0 {
            if self.cross_new.contains_key(&s) {
                continue;
            }
            let Some(Value::Post(p)) = self.acks.get(&(2, s)).cloned() else {
                continue;
            };
            for (g, mark) in groups.iter().zip(&marks) {
                if mark.0 < s {
                    continue;
                }
                let holders: Vec<u64> =
                    g.iter().copied().filter(|n| self.holds(*n, s, p)).collect();
                if holders.len() < 2 {
                    return Err(format!(
                        "CrossStored: post {p} at #{s} counted as stored on a majority of {g:?}, held by {holders:?}"
                    ));
                }
            }
            self.cross_new.insert(s, p);
        }
        Ok(())
    }

    /// Whether node `n` holds post `p` at `slot` (see `CrossStored`).
    fn holds(&self, n: u64, slot: u64, p: u32) -> bool {
        let k = usize::try_from(n).unwrap() - 1;
        let want = Value::Post(p);
        match self.nodes[k].acceptor().entry(Slot(slot)) {
            Some(e) => e.value == want,
            None => self.stores[k].get(usize::try_from(slot).unwrap() - 1) == Some(&want),
        }
    }

    fn restart(&mut self, i: usize) {
        let (promised, entries, released) = self.disk[i].clone();
        let (epoch, established) = self.known[i];
        self.nodes[i] = LogReplica::new(
            sim_config(i as u64 + 1, epoch, epoch == 2 && !established, self.checks),
            LogAcceptor::restore(promised, entries, self.floors[i]),
            released,
        );
        self.nodes[i].hold(self.owed[i]);
        let (installed, copies) = self.held_disk[i];
        self.nodes[i].held_copy_restored(installed);
        self.nodes[i].held_copies_restored(copies);
    }

    /// Node `i` learns what the map holds, if it can reach it.
    fn learn(&mut self, i: usize) {
        if !self.reaches_map(i) || self.known[i] == (self.map_epoch, self.established) {
            return;
        }
        let first = self.known[i].0 == 1 && self.map_epoch == 2;
        self.known[i] = (self.map_epoch, self.established);
        let c = sim_config(i as u64 + 1, self.map_epoch, !self.established, self.checks);
        self.nodes[i].reconfigure(c);
        if first {
            // Every replica that learns of the failover owes its check.
            self.owed[i] = Some(2);
            self.nodes[i].hold(Some(2));
            self.held_disk[i] = (None, HeldCopies::default());
        }
    }

    /// Whether node `i` may run for leader, as the node's driver decides
    /// (`Part::may_campaign`): not while barred, and while held only in
    /// the failover epoch it owes the check of, before it knows the map
    /// recorded `Establish`. (A held replica that learned the map only
    /// after `Establish` runs with the voters-only election of the
    /// established epoch and no check of its released prefix; it waits
    /// for its check instead.)
    fn may_campaign(&self, i: usize) -> bool {
        !self.nodes[i].is_barred()
            && match self.owed[i] {
                None => true,
                Some(owed) => self.known[i] == (owed, false),
            }
    }

    /// A post for node `i`, taken if it leads.
    fn append(&mut self, i: usize) {
        if self.nodes[i]
            .append(vec![Value::Post(self.next_post)])
            .is_ok()
        {
            self.next_post += 1;
        }
    }

    /// The map records `Establish` once a leader of epoch 2 established it
    /// (broken: once epoch 2 has a leader).
    fn establish(&mut self) {
        if self.established {
            return;
        }
        let early = self.early_narrow;
        let by = self.nodes.iter().position(|n| {
            n.established().is_some_and(|t| t.epoch == 2)
                || (early && n.leading().is_some_and(|t| t.epoch == 2))
        });
        if let Some(leader) = by {
            self.established = true;
            self.establisher = Some((leader, self.nodes[leader].vouched().to_vec()));
        }
    }

    fn step(&mut self) -> Result<(), String> {
        self.real += self.rng.random_range(0..=3);
        self.cut = self.cut_at.is_some_and(|t| self.real >= t)
            && self.heal_at.is_none_or(|t| self.real < t);
        if self.real >= self.move_at {
            self.map_epoch = 2;
        }
        if self.early_narrow {
            self.establish();
        }
        let i = self.rng.random_range(0..NODES);
        self.tick(i);
        if self.rng.random_range(0..1_000) < self.loss && !self.net.is_empty() {
            let k = self.rng.random_range(0..self.net.len());
            self.net.swap_remove(k);
        }
        let learn = self.rng.random_range(0..100) < self.learn;
        if learn {
            self.learn(i);
        }
        self.settle_checks(i)?;
        match self.rng.random_range(0..200) {
            // Campaigns now and then, and soon after the home moved while
            // the new home has no leader (an election timeout's stand-in).
            0..2 if self.may_campaign(i) => {
                self.nodes[i].campaign();
            }
            2..12
                if self.known[i].0 == 2
                    && self.may_campaign(i)
                    && !self
                        .nodes
                        .iter()
                        .any(|n| n.leading().is_some_and(|t| t.epoch == 2)) =>
            {
                self.nodes[i].campaign();
            }
            3..30 if self.next_post <= POSTS => self.append(i),
            30..32 if !self.calm => self.restart(i),
            32..40 => self.nodes[i].resend(),
            80..83 if self.map_epoch == 2 => self.establish(),
            _ if !self.net.is_empty() => {
                // Mostly among the oldest: messages take a few steps, not
                // hundreds (the lease is a few hundred steps long).
                let k = self.rng.random_range(0..self.net.len().min(8));
                let (from, to, m) = if self.rng.random_range(0..10) == 0 {
                    self.net[k].clone()
                } else {
                    self.net.remove(k)
                };
                let j = usize::try_from(to.0).unwrap() - 1;
                if !self.cut_between(j, usize::try_from(from.0).unwrap() - 1) {
                    self.tick(j);
                    self.nodes[j].step(from, m);
                    self.collect(j)?;
                }
            }
            _ => {}
        }
        self.collect(i)
    }
}

impl Sim {
    /// The faults end: the cut heals, nothing is lost, no node restarts,
    /// the map moves the home (if it had not) and every node learns the
    /// map at every step. `Live`: the new home must then establish (a
    /// leader of epoch 2 established it and the map recorded it) within
    /// `limit` steps; returns how many it took.
    fn settle(&mut self, limit: usize) -> Result<usize, String> {
        self.calm = true;
        self.heal_at = Some(0);
        self.move_at = 0;
        self.loss = 0;
        self.learn = 100;
        for n in 0..limit {
            if self.established {
                return Ok(n);
            }
            self.step()?;
        }
        let nodes: Vec<String> = H2
            .iter()
            .map(|&n| {
                let i = usize::try_from(n).unwrap() - 1;
                let r = &self.nodes[i];
                format!(
                    "node {n}: follower {}, barred {}, may campaign {}, known {:?}, released {:?}, floor {:?}, owed {:?}, leading {:?}, newest {:?}, copies {:?}",
                    r.is_follower(),
                    r.is_barred(),
                    self.may_campaign(i),
                    self.known[i],
                    r.released(),
                    self.floors[i],
                    self.owed[i],
                    r.leading(),
                    r.newest_term(),
                    r.held_copies(),
                )
            })
            .collect();
        Err(format!(
            "Live: epoch 2 not established {limit} steps after the faults ended ({} copies, {} realigned); {}",
            self.copies,
            self.realigns,
            nodes.join("; ")
        ))
    }
}

/// What one schedule did.
#[derive(Debug)]
struct Outcome {
    /// Slots released by epoch-2 leaders.
    new: usize,
    /// Posts epoch-1 leaders acknowledged at the cross-datacenter level.
    cross: usize,
    /// Posts epoch-2 leaders acknowledged at the cross-datacenter level.
    cross_new: usize,
    /// Replicas checked because the establishing leader vouched for them.
    vouched: usize,
    /// Nodes barred from leading epoch 2 at some point.
    barred: usize,
    /// Timeline copies installed.
    copies: usize,
    /// Held timelines made their leader's.
    realigns: usize,
    /// Steps the new home took to establish once the faults ended
    /// (`Sim::settle`; only when asked).
    settled: Option<usize>,
}

fn simulate(seed: u64, checks: Checks, broken: Broken, steps: usize) -> Result<Outcome, String> {
    run(seed, checks, broken, steps, None)
}

/// [`simulate`], then [`Sim::settle`] within `settle` steps when asked.
fn run(
    seed: u64,
    checks: Checks,
    broken: Broken,
    steps: usize,
    settle: Option<usize>,
) -> Result<Outcome, String> {
    let mut sim = Sim::new(seed, checks, broken);
    for _ in 0..steps {
        sim.step()?;
    }
    let settled = settle.map(|limit| sim.settle(limit)).transpose()?;
    let new = sim.acks.keys().filter(|(e, _)| *e == 2).count();
    Ok(Outcome {
        new,
        cross: sim.cross.len(),
        cross_new: sim.cross_new.len(),
        vouched: sim.vouched_checks,
        barred: sim.barred.len(),
        copies: sim.copies,
        realigns: sim.realigns,
        settled,
    })
}

fn seed_base() -> u64 {
    std::env::var("SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x40fe)
}

#[test]
fn seeded_failovers_keep_the_fence_and_every_cross_datacenter_post() {
    let base = seed_base();
    let count: usize = std::env::var("SCHEDULES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(300);
    let (mut new, mut cross, mut cross_new, mut failed_over, mut vouched, mut barred) =
        (0, 0, 0, 0, 0, 0);
    let (mut copies, mut copied_in, mut realigns, mut slowest) = (0, 0, 0, 0);
    for k in 0..count as u64 {
        let seed = base + k;
        match run(
            seed,
            Checks::default(),
            AS_DESIGNED,
            6_000,
            Some(SETTLE_STEPS),
        ) {
            Ok(o) => {
                new += o.new;
                cross += o.cross;
                cross_new += o.cross_new;
                failed_over += usize::from(o.new > 0);
                vouched += o.vouched;
                barred += o.barred;
                copies += o.copies;
                copied_in += usize::from(o.copies > 0);
                realigns += o.realigns;
                slowest = slowest.max(o.settled.unwrap_or_default());
            }
            Err(e) => panic!("SEED={seed}: {e}"),
        }
    }
    println!(
        "{count} schedules from SEED={base}: {new} slots released by the new home in {failed_over} schedules, {cross} posts acknowledged across datacenters by the old home and {cross_new} by the new one, {vouched} replicas vouched for, {barred} candidates barred, {copies} timeline copies in {copied_in} schedules, {realigns} held timelines realigned; every new home established, at most {slowest} steps after the faults ended"
    );
    assert!(
        failed_over > count / 3
            && cross > count
            && cross_new > count
            && vouched > count / 3
            && copied_in > count / 10
            && realigns > 0,
        "the schedules did little: {failed_over} failed over, {cross} and {cross_new} cross-datacenter acknowledgements, {vouched} replicas vouched for, {copied_in} with copies, {realigns} realigned"
    );
}

/// Steps after the faults end within which the new home must establish
/// (`Sim::settle`): tens of seconds of simulated time, over ten times
/// what the slowest of the 300 schedules took (1,733 steps).
const SETTLE_STEPS: usize = 30_000;

fn must_break(checks: Checks, broken: Broken, what: &str) -> String {
    let base = seed_base();
    for k in 0..3_000 {
        if let Err(e) = simulate(base + k, checks, broken, 6_000) {
            println!("{what}: SEED={}: {e}", base + k);
            return e;
        }
    }
    panic!("no schedule broke {what}");
}

#[test]
fn broken_without_the_lease_wait_is_caught() {
    let e = must_break(
        Checks {
            lease_wait: false,
            ..Checks::default()
        },
        AS_DESIGNED,
        "no lease wait",
    );
    assert!(e.starts_with("Fence") || e.starts_with("CrossKept"), "{e}");
}

#[test]
fn broken_narrow_recovery_is_caught() {
    let e = must_break(
        Checks {
            wide_recovery: false,
            ..Checks::default()
        },
        AS_DESIGNED,
        "narrow recovery",
    );
    assert!(e.starts_with("Fence") || e.starts_with("CrossKept"), "{e}");
}

#[test]
fn broken_narrow_elections_before_establish_are_caught() {
    let e = must_break(
        Checks::default(),
        Broken {
            early_narrow: true,
            ..AS_DESIGNED
        },
        "narrow before Establish",
    );
    assert!(
        e.starts_with("CrossKept")
            || e.starts_with("Agreement")
            || e.starts_with("CheckedAgree")
            || e.starts_with("AckedKept"),
        "{e}"
    );
}

#[test]
fn broken_vouching_for_touched_promisers_is_caught() {
    let e = must_break(
        Checks {
            untouched_only: false,
            ..Checks::default()
        },
        AS_DESIGNED,
        "vouching for touched promisers",
    );
    assert!(
        e.starts_with("CheckedAgree") || e.starts_with("AckedKept"),
        "{e}"
    );
}

#[test]
fn broken_a_held_replica_reporting_its_whole_released_prefix_is_caught() {
    let e = must_break(
        Checks {
            held_report: false,
            ..Checks::default()
        },
        AS_DESIGNED,
        "a held replica reporting its whole released prefix",
    );
    assert!(e.starts_with("CrossStored"), "{e}");
}

/// A schedule (the first of the seeded ones to stall once copies were
/// simulated) where node 5, held, copied from node 2 (outside the new
/// home) while it ran for leader, and node 4, held, copied from node 5
/// before node 5 led: node 5 then shares only the slots before its copy,
/// below its floor, so node 4 reports less than it can be resent and,
/// not behind the floor, copies nothing more. Without realigning, the new
/// home never establishes.
const HELD_BELOW_THE_LEADERS_FLOOR: u64 = 16_686;

#[test]
fn broken_without_realigning_a_held_voter_the_new_home_never_establishes() {
    let broken = Broken {
        no_realign: true,
        ..AS_DESIGNED
    };
    let seed = HELD_BELOW_THE_LEADERS_FLOOR;
    let e = run(seed, Checks::default(), broken, 6_000, Some(SETTLE_STEPS))
        .expect_err("a held voter below its leader's floor stalls the new home");
    println!("SEED={seed}: {e}");
    assert!(e.starts_with("Live"), "{e}");
    let o = run(
        seed,
        Checks::default(),
        AS_DESIGNED,
        6_000,
        Some(SETTLE_STEPS),
    )
    .expect("realigned, the new home establishes");
    assert!(o.realigns > 0, "{o:?}");
}

/// A schedule where node 5, checked, ran for leader behind a promiser's
/// floor and copied from node 4, a voter of the new home still held,
/// whose timeline held posts of the old home's loss window that the
/// established log replaced (the first found once copies were
/// simulated).
const CHECKED_COPYING_FROM_HELD: u64 = 16_842;

#[test]
fn broken_a_checked_replica_copying_from_one_that_has_not_checked_is_caught() {
    let broken = Broken {
        copy_from_unchecked: true,
        ..AS_DESIGNED
    };
    let seed = CHECKED_COPYING_FROM_HELD;
    let e = run(seed, Checks::default(), broken, 6_000, Some(SETTLE_STEPS))
        .expect_err("a checked replica takes a held one's loss window");
    println!("SEED={seed}: {e}");
    assert!(
        e.starts_with("AckedKept") || e.starts_with("CheckedAgree"),
        "{e}"
    );
    run(
        seed,
        Checks::default(),
        AS_DESIGNED,
        6_000,
        Some(SETTLE_STEPS),
    )
    .expect("a checked replica copies only from one checked as far");
}

/// A schedule where node 4, a voter of the new home still reaching the
/// cut-off old home, released posts of its loss window that the new
/// home's first leader did not recover, and that leader acknowledged
/// another post in one of their slots (the first found from SEED=16638;
/// two in 20,000 schedules).
const HELD_CANDIDATE_OVER_A_COMMITTED_SLOT: u64 = 23_428;

#[test]
fn broken_without_the_epoch_check_a_held_candidate_leading_over_a_committed_slot_is_caught() {
    let broken = Checks {
        epoch_below: false,
        ..Checks::default()
    };
    let seed = HELD_CANDIDATE_OVER_A_COMMITTED_SLOT;
    let e = simulate(seed, broken, AS_DESIGNED, 6_000)
        .expect_err("a held candidate leads over a committed slot");
    println!("SEED={seed}: {e}");
    assert!(
        e.starts_with("AckedKept") || e.starts_with("CheckedAgree"),
        "{e}"
    );
    let o = simulate(seed, Checks::default(), AS_DESIGNED, 6_000)
        .expect("a candidate whose released prefix disagrees with the epoch does not lead");
    assert!(o.barred > 0, "{o:?}");
}

/// A schedule where a leader of epoch 2 that did not establish it holds
/// a slot the established log replaced (the first found from SEED=30000:
/// three in 48,000 schedules; `SEED=40045` was one before the schedules
/// had node 4 reach the cut-off old home and held replicas kept the
/// node's rule for running).
const DEPOSED_FAILOVER_LEADER: u64 = 57_849;

#[test]
fn broken_checking_a_leader_before_it_established_is_caught() {
    let broken = Broken {
        checked_when_leading: true,
        ..AS_DESIGNED
    };
    let e = simulate(DEPOSED_FAILOVER_LEADER, Checks::default(), broken, 6_000)
        .expect_err("a leader checked as soon as it leads");
    println!("SEED={DEPOSED_FAILOVER_LEADER}: {e}");
    assert!(
        e.starts_with("CheckedAgree") || e.starts_with("AckedKept"),
        "{e}"
    );
    simulate(
        DEPOSED_FAILOVER_LEADER,
        Checks::default(),
        AS_DESIGNED,
        6_000,
    )
    .expect("only the leader that established the epoch is checked");
}

/// Node 3 leads the failover epoch first without node 2 and commits
/// post 30 at slot 2 (on 3 and 4, a majority of the new home's voters 2,
/// 3 and 4; `reach_2`: its Accepts reach node 2 as well, which stores
/// post 30 over the post 11 it had released there), then steps down
/// before it established the epoch. Node 2, held, had released post 11 at
/// slot 2 before the failover (the old home's loss window).
fn a_deposed_leader_commits_over_a_loss_window_slot(checks: Checks, reach_2: bool) -> Net {
    let mut net = three_datacenters(checks);
    fail_over_to_three(&mut net, checks);
    net.node(3).campaign().unwrap();
    net.run(cut(&[1, 2]));
    assert!(net.node(3).leading().is_some());
    net.node(3).hold(None);
    net.node(3).append(vec![post(30)]).unwrap();
    if reach_2 {
        net.run(cut(&[1]));
    } else {
        net.run(cut(&[1, 2]));
    }
    assert_eq!(net.released(3), vec![(1, post(10)), (2, post(30))]);
    net.node(3).step_down();
    for n in [2, 4, 5] {
        net.set_clock(n, 2 * lease().promise_ms());
    }
    net
}

/// Node 2 runs twice with promises from 4 and 5 (its first round ties
/// node 3's); whether it leads.
fn node_2_runs(net: &mut Net) -> bool {
    for _ in 0..2 {
        if net.node(2).campaign().is_none() {
            break;
        }
        net.run(cut(&[1, 3]));
    }
    net.node(2).resend();
    net.run(cut(&[1, 3]));
    net.node(2).leading().is_some()
}

#[test]
fn a_held_candidate_whose_released_prefix_disagrees_with_its_epoch_does_not_lead() {
    let mut net = a_deposed_leader_commits_over_a_loss_window_slot(Checks::default(), false);
    // Node 2 asks from slot 3, after its released prefix; node 4's
    // promise also carries the epoch's post 30 at slot 2, which node 2's
    // log does not hold there: it does not lead, and does not run again.
    assert!(!node_2_runs(&mut net));
    assert!(net.node(2).is_barred());
    assert_eq!(net.node(2).campaign(), None);
    // Node 4, whose released prefix ends before slot 2, leads and
    // establishes the epoch with post 30 there.
    net.node(4).campaign().unwrap();
    net.run(cut(&[1, 3]));
    net.node(4).hold(None);
    net.node(4).resend();
    net.run(cut(&[1, 3]));
    assert!(net.node(4).established().is_some());
    assert_eq!(net.released(4), vec![(1, post(10)), (2, post(30))]);
    // Checked (rewound to a copy of the new home), it may run again.
    assert!(net.node(2).rewind(Slot(2), 2));
    assert!(!net.node(2).is_barred());
}

#[test]
fn broken_without_the_epoch_check_a_held_candidate_establishes_over_a_committed_slot() {
    let broken = Checks {
        epoch_below: false,
        ..Checks::default()
    };
    let mut net = a_deposed_leader_commits_over_a_loss_window_slot(broken, false);
    // Node 2 establishes the epoch with its post 11 at slot 2, where post
    // 30 was committed and released in the epoch: as the establishing
    // leader it defines the log, and the others would cut post 30.
    assert!(node_2_runs(&mut net));
    assert!(net.node(2).established().is_some());
    assert_eq!(net.released(2), vec![(1, post(10)), (2, post(11))]);
}

#[test]
fn a_held_replica_whose_released_slot_an_accept_changed_does_not_lead() {
    // Node 2 stores post 30 over its released post 11: its log and its
    // timeline now differ at slot 2, though its log agrees with node 4's.
    let mut net = a_deposed_leader_commits_over_a_loss_window_slot(Checks::default(), true);
    assert!(!node_2_runs(&mut net));
    assert!(net.node(2).is_barred());
}

#[test]
fn a_held_replica_restarted_with_another_leaders_entry_among_what_it_released_does_not_lead() {
    let mut net = a_deposed_leader_commits_over_a_loss_window_slot(Checks::default(), true);
    // Node 2 restarts: it no longer knows that post 30 came over a slot
    // it had released, and its log agrees with node 4's there; but an
    // entry of the epoch written by another node sits among what it
    // released, so it does not lead.
    let old = net.node(2);
    let (promised, entries) = (
        old.acceptor().promised(),
        old.acceptor().entries_from(Slot(0)),
    );
    let groups = &[&[2, 3, 4][..], &[5][..]][..];
    let mut restarted = LogReplica::new(
        config(2, &[2, 3, 4], &[1, 5], 2, Some(groups)),
        LogAcceptor::restore(promised, entries.iter().cloned(), Slot(0)),
        Slot(2),
    );
    restarted.hold(Some(2));
    net.nodes.insert(2, restarted);
    // A restarted replica waits out a promise before it runs.
    net.set_clock(2, 2 * lease().promise_ms());
    net.set_clock(2, 4 * lease().promise_ms());
    assert!(!node_2_runs(&mut net));
    assert!(net.node(2).is_barred());
}

#[test]
fn a_held_candidate_leads_over_what_an_earlier_leader_of_its_epoch_recovered_from_it() {
    let mut net = three_datacenters(Checks::default());
    fail_over_to_three(&mut net, Checks::default());
    // Node 3 is elected with node 2's promise, recovers its post 11 at
    // slot 2 and writes it in the epoch (to node 2 too: the same value),
    // then steps down before it established the epoch.
    net.node(3).campaign().unwrap();
    net.run(cut(&[1]));
    assert!(net.node(3).leading().is_some());
    net.node(3).step_down();
    for n in [2, 4, 5] {
        net.set_clock(n, 2 * lease().promise_ms());
    }
    // Node 2's released post 11 is what the epoch holds at slot 2: it
    // leads and establishes it.
    assert!(node_2_runs(&mut net));
    assert!(!net.node(2).is_barred());
    net.node(2).hold(None);
    net.node(2).resend();
    net.run(cut(&[1, 3]));
    assert!(net.node(2).established().is_some());
}

/// Epoch 1: node 1 is the home's only voter, 2 to 7 learn (2, 3, 4 the
/// next home, 5, 6, 7 a third datacenter). Every node released post 10;
/// node 5 alone stored and released post 11 (the old home's loss window).
/// The home fails over to 2, 3 and 4 in epoch 2, and node 3 leads with
/// promises from 2, 4, 6 and 7 (node 5 is away): nobody it heard has slot
/// 2, so its log goes on from there. It writes post 30 at slot 2 and post
/// 31 at slot 3; every Accept reaches every node but 1, except the one of
/// slot 2 to node 5 while `slot_2_reaches_5` is false. Node 5 compacted
/// what it released before it was held when `compacted` says so.
fn a_held_learner_released_what_the_new_home_replaces(checks: Checks, compacted: bool) -> Net {
    let groups = &[&[2, 3, 4][..], &[5, 6, 7][..]][..];
    let mut net = Net::new(
        (1..=7)
            .map(|me| {
                let mut c = config(me, &[1], &[2, 3, 4, 5, 6, 7], 1, None);
                c.checks = checks;
                c
            })
            .collect(),
    );
    net.node(1).campaign().unwrap();
    net.run(|_, _, _| false);
    net.node(1).append(vec![post(10)]).unwrap();
    net.run(|_, _, _| false);
    let only_to_5 = |_, to, m: &LogMessage<u32>| {
        matches!(m, LogMessage::Accept { values, .. } if !values.is_empty()) && to != 5
    };
    net.node(1).append(vec![post(11)]).unwrap();
    net.run(only_to_5);
    net.node(1).resend();
    net.run(only_to_5);
    assert_eq!(net.released(5), vec![(1, post(10)), (2, post(11))]);
    if compacted {
        net.node(5).compact(Slot(2));
    }
    for me in 2..=7 {
        let mut c = config(me, &[2, 3, 4], &[1, 5, 6, 7], 2, Some(groups));
        c.checks = checks;
        assert!(net.node(me).reconfigure(c));
        net.node(me).hold(Some(2));
        net.set_clock(me, lease().promise_ms());
    }
    net.node(3).campaign().unwrap();
    net.run(cut(&[1, 5]));
    assert!(net.node(3).leading().is_some());
    net.node(3).append(vec![post(30)]).unwrap();
    net.run(slot_2_not_to_5);
    net.node(3).append(vec![post(31)]).unwrap();
    net.run(slot_2_not_to_5);
    net.node(3).resend();
    net.run(slot_2_not_to_5);
    assert_eq!(
        net.released(3),
        vec![(1, post(10)), (2, post(30)), (3, post(31))]
    );
    net
}

/// Drops what node 1 sends and gets, and the Accepts of slot 2 to node 5.
fn slot_2_not_to_5(from: u64, to: u64, m: &LogMessage<u32>) -> bool {
    from == 1
        || to == 1
        || (to == 5
            && matches!(m, LogMessage::Accept { first, values, .. } if *first == Slot(2) && !values.is_empty()))
}

/// What node 5's log holds at slot 2.
fn slot_2_of_5(net: &mut Net) -> Option<Value<u32>> {
    net.node(5)
        .acceptor()
        .entry(Slot(2))
        .map(|e| e.value.clone())
}

#[test]
fn a_held_learner_counts_as_storing_only_what_it_holds_of_the_new_homes_log() {
    let mut net = a_held_learner_released_what_the_new_home_replaces(Checks::default(), false);
    // Node 5 released post 11 at slot 2 before it was held, and its log
    // still holds it there: for the cross-datacenter level, the leader
    // counts it as storing slot 1 only (nodes 6 and 7 store all three),
    // so post 30 is on a majority of the third datacenter (6 and 7) but
    // not on all of it.
    assert_eq!(slot_2_of_5(&mut net), Some(post(11)));
    let third = ids(&[5, 6, 7]);
    assert_eq!(net.node(3).stored_by(&third, 2), Slot(3));
    assert_eq!(net.node(3).stored_by(&third, 3), Slot(1));
    // Once the Accept of slot 2 reaches it (the leader resends what a
    // replica reports missing), it counts as storing all three.
    net.node(3).resend();
    net.run(cut(&[1]));
    net.node(3).resend();
    net.run(cut(&[1]));
    assert_eq!(slot_2_of_5(&mut net), Some(post(30)));
    assert_eq!(net.node(3).stored_by(&third, 3), Slot(3));
    assert!(net.node(5).is_held());
}

#[test]
fn a_held_learner_acknowledges_no_slot_its_compaction_floor_covers_beyond_what_it_reports() {
    let mut net = a_held_learner_released_what_the_new_home_replaces(Checks::default(), true);
    // Node 5 compacted slot 2 before it was held: its log no longer holds
    // post 11 there, its timeline does. The leader resends slot 2 (node 5
    // reports slot 1); the acceptor skips a slot its floor covers, and
    // were that acknowledged, the leader would count node 5 as storing
    // post 30 at slot 2.
    assert_eq!(slot_2_of_5(&mut net), None);
    let third = ids(&[5, 6, 7]);
    for _ in 0..2 {
        net.node(3).resend();
        net.run(cut(&[1]));
    }
    assert_eq!(slot_2_of_5(&mut net), None);
    assert_eq!(net.node(3).stored_by(&third, 2), Slot(3));
    assert_eq!(net.node(3).stored_by(&third, 3), Slot(1));
    // Once node 5 checked its timeline against the new home's (it cuts
    // it after slot 1, where they first differ), it stores the rest and
    // counts.
    assert!(net.node(5).rewind(Slot(1), 2));
    for _ in 0..2 {
        net.node(3).resend();
        net.run(cut(&[1]));
    }
    assert_eq!(slot_2_of_5(&mut net), Some(post(30)));
    assert_eq!(net.node(3).stored_by(&third, 3), Slot(3));
}

#[test]
fn broken_a_held_learner_reporting_its_whole_released_prefix_counts_as_storing_a_post_it_lacks() {
    let broken = Checks {
        held_report: false,
        ..Checks::default()
    };
    let mut net = a_held_learner_released_what_the_new_home_replaces(broken, false);
    // Node 5 reports slots 1 and 2 released (post 11 is at slot 2 in its
    // log and timeline) and then stores slot 3: the leader counts it as
    // storing post 30, so all of the third datacenter seems to hold it
    // while only 6 and 7 do. Were 6 lost, a majority of that datacenter
    // (5 and 7) would no longer hold it.
    assert_eq!(slot_2_of_5(&mut net), Some(post(11)));
    assert_eq!(net.node(3).stored_by(&ids(&[5, 6, 7]), 3), Slot(3));
}

#[test]
fn a_held_replica_that_installed_a_copy_is_not_vouched_for_nor_shares_beyond_it() {
    let mut net = three_datacenters(Checks::default());
    fail_over_to_three(&mut net, Checks::default());
    // Node 3 (released slot 1) installs a copy up to slot 2 while held:
    // the copy may hold what a leader of the epoch wrote, so its timeline
    // is no longer the one the epochs before left it.
    assert_eq!(net.node(3).untouched(), Some(Slot(1)));
    assert!(net.node(3).install(Slot(2)));
    assert_eq!(net.node(3).untouched(), None);
    // It runs with promises from 2 and 5: it vouches for no one, and it
    // tells the held replicas that its log shares slot 1 only with what
    // they released, so node 2 (post 11 at slot 2, which the copy may not
    // hold) is not counted as holding slot 2 of the new home's log.
    node_3_leads_sharing_too_little_for_node_2(&mut net);
}

/// Node 3, which installed a copy from slot 2 while held, runs with
/// promises from 2 and 5 and leads: it vouches for no one, and node 2
/// (post 11 at slot 2) does not count as holding what it recovered.
fn node_3_leads_sharing_too_little_for_node_2(net: &mut Net) {
    net.node(3).campaign().unwrap();
    net.run(cut(&[1, 4]));
    assert!(net.node(3).leading().is_some());
    assert!(net.node(3).vouched().is_empty());
    net.node(3).resend();
    net.run(cut(&[1, 4]));
    assert!(!net.node(3).has_caught_up(NodeId(2)));
    assert!(net.node(3).has_caught_up(NodeId(3)));
}

#[test]
fn a_held_leader_elected_again_shares_no_slot_it_wrote_in_its_epoch() {
    let mut net = a_held_learner_released_what_the_new_home_replaces(Checks::default(), false);
    // Node 3 (still held: it has not established the epoch) steps down
    // and runs again once its grants ran out: it asks from slot 4, after
    // what it released, but it wrote slots 2 and 3 in the epoch itself,
    // so it shares slot 1 only with what node 5 released (post 11 at slot
    // 2), and node 5 still counts as storing slot 1 only.
    net.node(3).step_down();
    for n in 2..=7 {
        net.set_clock(n, 3 * lease().promise_ms());
    }
    net.node(3).campaign().unwrap();
    net.run(slot_2_not_to_5);
    assert!(net.node(3).leading().is_some());
    net.node(3).append(vec![post(32)]).unwrap();
    net.run(slot_2_not_to_5);
    net.node(3).resend();
    net.run(slot_2_not_to_5);
    assert_eq!(slot_2_of_5(&mut net), Some(post(11)));
    let third = ids(&[5, 6, 7]);
    assert_eq!(net.node(3).stored_by(&third, 2), Slot(4));
    assert_eq!(net.node(3).stored_by(&third, 3), Slot(1));
}

#[test]
fn a_held_replica_restarted_after_installing_a_copy_still_shares_nothing_beyond_it() {
    let mut net = three_datacenters(Checks::default());
    fail_over_to_three(&mut net, Checks::default());
    assert!(net.node(3).install(Slot(2)));
    // Node 3 restarts: the node restores, with its log, that it installed
    // a copy from slot 2 while held.
    let (acceptor, released, c) = {
        let n = net.node(3);
        (n.acceptor().clone(), n.released(), n.config().clone())
    };
    let mut restarted = LogReplica::new(c, acceptor, released);
    restarted.hold(Some(2));
    restarted.held_copy_restored(Some(Slot(2)));
    assert_eq!(restarted.installed_held(), Some(Slot(2)));
    assert_eq!(restarted.untouched(), None);
    net.nodes.insert(3, restarted);
    // It waits out one promise after its restart, then runs as above.
    for t in [3, 5] {
        for n in [2, 3, 5] {
            net.set_clock(n, t * lease().promise_ms());
        }
    }
    node_3_leads_sharing_too_little_for_node_2(&mut net);
    // Restored on a replica that is not held, it means nothing.
    let mut free: LogReplica<u32> = LogReplica::new(
        net.node(4).config().clone(),
        LogAcceptor::restore(Term::ZERO, [], Slot(0)),
        Slot(0),
    );
    free.held_copy_restored(Some(Slot(2)));
    assert_eq!(free.installed_held(), None);
}

/// Epoch 1: node 1 the home's voter; 2 and 3 (the next home, of two
/// voters) and 4 (a third datacenter) learn. Node 1 releases posts 10, 11
/// and 12; node `n` stores the Accepts of the first `got[n]` slots only,
/// releases them, and compacts what it released when `compacts[n]`. Then
/// the home moves to 2 and 3 in a failover epoch (groups `[2, 3]` and
/// `[4]`), and 2 to 4 are held owing its check.
fn a_new_home_of_two(got: [u64; 3], compacts: [bool; 3]) -> Net {
    let mut net = Net::new(
        (1..=4)
            .map(|me| config(me, &[1], &[2, 3, 4], 1, None))
            .collect(),
    );
    net.node(1).campaign().unwrap();
    net.run(|_, _, _| false);
    let dropped = move |_, to: u64, m: &LogMessage<u32>| {
        (2..=4).contains(&to)
            && matches!(m, LogMessage::Accept { first, values, .. }
                if !values.is_empty() && first.0 > got[usize::try_from(to).unwrap() - 2])
    };
    for p in [10, 11, 12] {
        net.node(1).append(vec![post(p)]).unwrap();
        net.run(dropped);
    }
    net.node(1).resend();
    net.run(dropped);
    for n in 2..=4u64 {
        let k = usize::try_from(n).unwrap() - 2;
        assert_eq!(net.released(n).len() as u64, got[k], "node {n}");
        if compacts[k] {
            net.node(n).compact(Slot(got[k]));
        }
    }
    let groups = &[&[2, 3][..], &[4][..]][..];
    for me in 2..=4 {
        assert!(
            net.node(me)
                .reconfigure(config(me, &[2, 3], &[1, 4], 2, Some(groups)))
        );
        net.node(me).hold(Some(2));
        net.set_clock(me, lease().promise_ms());
    }
    net
}

/// Node 2 runs, finds a promiser's floor past its start, copies from
/// `source` (what the node does), and runs again: it leads.
fn node_2_copies_from_and_leads(net: &mut Net, source: u64, upto: u64) {
    net.node(2).campaign().unwrap();
    net.run(cut(&[1]));
    assert!(net.node(2).leading().is_none(), "it copies first");
    let term = net.node(2).newest_term();
    assert!(net.node(2).install_copy(Slot(upto), NodeId(source), term));
    net.node(2).campaign().unwrap();
    net.run(cut(&[1]));
    assert!(net.node(2).leading().is_some());
}

#[test]
fn a_new_home_of_two_establishes_when_its_leader_copied_from_the_other_voter() {
    // Node 3 released and compacted all three posts; node 2 released
    // post 10 only. Node 2 copies slots 2 and 3 from node 3 before it
    // leads: its log shares them with node 3, which it says to node 3
    // alone, and node 3 counts as holding what node 2 recovered.
    let mut net = a_new_home_of_two([1, 3, 3], [false, true, true]);
    node_2_copies_from_and_leads(&mut net, 3, 3);
    net.node(2).resend();
    net.run(cut(&[1]));
    assert!(net.node(2).has_caught_up(NodeId(3)));
    assert!(net.node(2).established().is_some());
}

/// Node `n` restarts: rebuilt from its durable acceptor state and what it
/// released, held again owing epoch 2, with what the node keeps of its
/// held copies restored when `keep_copies`.
fn restart_held(net: &mut Net, n: u64, keep_copies: bool) {
    let (acceptor, released, c, installed, copies) = {
        let r = net.node(n);
        (
            r.acceptor().clone(),
            r.released(),
            r.config().clone(),
            r.installed_held(),
            r.held_copies(),
        )
    };
    let mut restarted = LogReplica::new(c, acceptor, released);
    restarted.hold(Some(2));
    restarted.held_copy_restored(installed);
    if keep_copies {
        restarted.held_copies_restored(copies);
    }
    net.nodes.insert(n, restarted);
}

/// [`a_new_home_of_two_establishes_when_its_other_voter_copied_from_the_leader`]
/// where node 3 still owes an earlier failover's check (consecutive home
/// moves): its copy from the leader counts for nothing then; it checks
/// the earlier epoch against the leader (what the node's check does: a
/// rewind to the leader's timeline) and is held for this one. Its whole
/// timeline is then the leader's, and it counts as such
/// (`LogReplica::checked_against`). Without that it reported only what
/// the leader shares with held replicas, below the leader's floor: the
/// leader could resend nothing below its floor, node 3 was not behind
/// it, and the new home waited for good.
#[test]
fn a_new_home_of_two_establishes_when_its_other_voter_checked_an_earlier_failover_against_the_leader()
 {
    for counted in [true, false] {
        let mut net = a_new_home_of_two([1, 1, 3], [false, false, true]);
        net.node(3).hold(Some(1));
        node_2_copies_from_and_leads(&mut net, 4, 3);
        net.node(2).resend();
        net.run(cut(&[1]));
        let term = net.node(3).newest_term();
        assert_eq!(term.node, NodeId(2));
        assert!(net.node(3).install_copy(Slot(3), NodeId(2), term));
        net.node(2).resend();
        net.run(cut(&[1]));
        assert!(
            !net.node(2).has_caught_up(NodeId(3)),
            "a copy counts for nothing while an earlier check is owed"
        );
        assert!(net.node(3).rewind(Slot(3), 1));
        net.node(3).hold(Some(2));
        if counted {
            net.node(3).checked_against(Slot(3), NodeId(2), term);
        }
        establishes_iff(&mut net, counted);
    }
}

/// Both voters of a new home of two still owed an earlier failover's
/// check, and checked it against the same third replica (node 4, with
/// all three posts): both timelines are node 4's, and the one that leads
/// shares them with the other, which then holds what it recovered. Had
/// the checks counted as copies that may hold what a leader of the epoch
/// wrote (`installed_held` from slot 1), the leader would have shared
/// nothing with the other voter, below its floor, and the home would
/// have waited for good (a CI run of the chaos plan with home moves).
#[test]
fn a_new_home_of_two_establishes_when_both_voters_checked_an_earlier_failover_against_a_third() {
    for as_copies in [false, true] {
        let mut net = a_new_home_of_two([1, 1, 3], [false, false, true]);
        for n in [2, 3] {
            net.node(n).hold(Some(1));
            assert!(net.node(n).rewind(Slot(3), 1));
            net.node(n).hold(Some(2));
            let term = net.node(n).newest_term();
            net.node(n).checked_against(Slot(3), NodeId(4), term);
            if as_copies {
                net.node(n).held_copy_restored(Some(Slot(1)));
            }
        }
        net.node(2).campaign().unwrap();
        net.run(cut(&[1]));
        assert!(net.node(2).leading().is_some());
        for _ in 0..3 {
            net.node(2).resend();
            net.run(cut(&[1]));
        }
        assert_eq!(
            net.node(2).established().is_some(),
            !as_copies,
            "counted as copies that may hold the epoch's writes: {as_copies}"
        );
    }
}

/// Leader 2 resends a few times: it establishes the epoch exactly when
/// the restarted voter kept its copies.
fn establishes_iff(net: &mut Net, keep_copies: bool) {
    for _ in 0..3 {
        net.node(2).resend();
        net.run(cut(&[1]));
    }
    assert_eq!(
        net.node(2).established().is_some(),
        keep_copies,
        "keeping the copies: {keep_copies}"
    );
}

/// [`a_new_home_of_two_establishes_when_its_other_voter_copied_from_the_leader`]
/// with node 3 restarted after its copy: the node keeps whose timeline
/// the copy holds, so the restarted voter still counts it; had it
/// forgotten, it would report less than the leader's floor, and the new
/// home would wait for good.
#[test]
fn a_new_home_of_two_establishes_when_its_other_voter_restarted_after_copying_from_the_leader() {
    for keep_copies in [true, false] {
        let mut net = a_new_home_of_two([1, 1, 3], [false, false, true]);
        node_2_copies_from_and_leads(&mut net, 4, 3);
        net.node(2).resend();
        net.run(cut(&[1]));
        let term = net.node(3).newest_term();
        assert!(net.node(3).install_copy(Slot(3), NodeId(2), term));
        restart_held(&mut net, 3, keep_copies);
        establishes_iff(&mut net, keep_copies);
    }
}

/// [`a_new_home_of_two_establishes_when_its_leader_copied_from_the_other_voter`]
/// with node 2 restarted after its copy, before it runs: it still shares
/// the copy with node 3 once it leads, because the node kept whom it
/// copied from.
#[test]
fn a_new_home_of_two_establishes_when_its_leader_restarted_after_copying_from_the_other_voter() {
    for keep_copies in [true, false] {
        let mut net = a_new_home_of_two([1, 3, 3], [false, true, true]);
        net.node(2).campaign().unwrap();
        net.run(cut(&[1]));
        assert!(net.node(2).leading().is_none(), "it copies first");
        let term = net.node(2).newest_term();
        assert!(net.node(2).install_copy(Slot(3), NodeId(3), term));
        restart_held(&mut net, 2, keep_copies);
        // It waits out one promise after its restart, then runs.
        for t in [3, 5] {
            for n in 2..=4 {
                net.set_clock(n, t * lease().promise_ms());
            }
        }
        net.node(2).campaign().unwrap();
        net.run(cut(&[1]));
        assert!(net.node(2).leading().is_some());
        establishes_iff(&mut net, keep_copies);
    }
}

#[test]
fn a_new_home_of_two_establishes_when_its_other_voter_copied_from_the_leader() {
    // Nodes 2 and 3 released post 10 only, node 4 all three (and
    // compacted them). Node 2 copies slots 2 and 3 from node 4 and leads:
    // it shares slot 1 with node 3 (its copy may hold what a leader of the
    // epoch wrote), and its floor is slot 3, so node 3 copies slots 2 and
    // 3 from it, and then counts as holding what it recovered (the chaos
    // campaign's `SEED=7009`, where the new home never established: the
    // copy did not count).
    let mut net = a_new_home_of_two([1, 1, 3], [false, false, true]);
    node_2_copies_from_and_leads(&mut net, 4, 3);
    net.node(2).resend();
    net.run(cut(&[1]));
    assert!(!net.node(2).has_caught_up(NodeId(3)));
    let term = net.node(3).newest_term();
    assert_eq!(term.node, NodeId(2));
    assert!(net.node(3).install_copy(Slot(3), NodeId(2), term));
    net.node(2).resend();
    net.run(cut(&[1]));
    assert!(net.node(2).has_caught_up(NodeId(3)));
    assert!(net.node(2).established().is_some());
}
