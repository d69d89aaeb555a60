//! The partition log (`consensus/src/partition_log`): scripted flows with
//! exact outputs, and a seeded simulation with crashes, loss, duplication
//! and reordering that checks the invariants of `specs/PartitionLog.tla`
//! (Agreement, AckedDurable, AckedOnce, AckedGapless) and must catch the
//! two broken variants the spec's broken configs describe.

mod log_ledger;

use std::collections::BTreeMap;

use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;
use saferchat_consensus::NodeId;
use saferchat_consensus::partition_log::{
    Checks, Committed, LogAcceptor, LogConfig, LogMessage, LogReplica, Slot, Term, Value,
};

use log_ledger::Ledger;

fn config(me: u64, n: u64, checks: Checks) -> LogConfig {
    let mut c = LogConfig::new(NodeId(me), (1..=n).map(NodeId).collect());
    c.checks = checks;
    c
}

/// Voters `1..=voters`, learners after them up to `n`.
fn config_with_learners(me: u64, voters: u64, n: u64, checks: Checks) -> LogConfig {
    let mut c = LogConfig::with_learners(
        NodeId(me),
        (1..=voters).map(NodeId).collect(),
        (voters + 1..=n).map(NodeId).collect(),
    );
    c.checks = checks;
    c
}

fn post(v: u32) -> Value<u32> {
    Value::Post(v)
}

fn released(c: &[Committed<u32>]) -> Vec<(u64, Value<u32>)> {
    c.iter().map(|c| (c.slot.0, c.value.clone())).collect()
}

#[test]
fn a_single_replica_leads_and_commits_at_once() {
    let mut r = LogReplica::new(
        config(1, 1, Checks::default()),
        LogAcceptor::restore(Term::ZERO, [], Slot(0)),
        Slot(0),
    );
    assert_eq!(r.append(vec![post(1)]).unwrap_err().leader, None);
    let term = r.campaign().unwrap();
    let ready = r.take_ready();
    assert_eq!(ready.leading, Some(term));
    assert_eq!(ready.write.unwrap().promised, term);
    assert!(ready.messages.is_empty());
    assert_eq!(r.append(vec![post(1), post(2)]).unwrap(), Slot(1));
    let ready = r.take_ready();
    assert_eq!(
        ready.write.unwrap().entries.len(),
        2,
        "durable before released"
    );
    assert_eq!(released(&ready.committed), vec![(1, post(1)), (2, post(2))]);
}

/// Three replicas with a hand-driven network.
struct Net {
    nodes: Vec<LogReplica<u32>>,
    inflight: Vec<(NodeId, NodeId, LogMessage<u32>)>,
    committed: Vec<Vec<(u64, Value<u32>)>>,
    /// (reporting node index, lagging node, from slot)
    lagging: Vec<(usize, NodeId, Slot)>,
}

impl Net {
    fn new(n: u64) -> Net {
        Net {
            nodes: (1..=n)
                .map(|me| {
                    LogReplica::new(
                        config(me, n, Checks::default()),
                        LogAcceptor::restore(Term::ZERO, [], Slot(0)),
                        Slot(0),
                    )
                })
                .collect(),
            inflight: Vec::new(),
            committed: vec![Vec::new(); n as usize],
            lagging: Vec::new(),
        }
    }

    fn collect(&mut self, i: usize) {
        let ready = self.nodes[i].take_ready();
        let me = NodeId(i as u64 + 1);
        for (to, m) in ready.messages {
            self.inflight.push((me, to, m));
        }
        self.committed[i].extend(released(&ready.committed));
        self.lagging
            .extend(ready.lagging.into_iter().map(|(n, s)| (i, n, s)));
    }

    /// Delivers everything in flight, except to or from `down`.
    fn run(&mut self, down: &[u64]) {
        for i in 0..self.nodes.len() {
            self.collect(i);
        }
        while !self.inflight.is_empty() {
            let (from, to, m) = self.inflight.remove(0);
            if down.contains(&from.0) || down.contains(&to.0) {
                continue;
            }
            let i = to.0 as usize - 1;
            self.nodes[i].step(from, m);
            self.collect(i);
        }
    }
}

#[test]
fn three_replicas_commit_in_order_and_followers_learn_the_commit_point() {
    let mut net = Net::new(3);
    net.nodes[0].campaign().unwrap();
    net.run(&[]);
    assert!(net.nodes[0].leading().is_some());
    net.nodes[0].append(vec![post(10), post(11)]).unwrap();
    net.run(&[]);
    assert_eq!(net.committed[0], vec![(1, post(10)), (2, post(11))]);
    // Followers release on the next write, which carries the commit point.
    net.nodes[0].append(vec![post(12)]).unwrap();
    net.run(&[]);
    for c in &net.committed[1..] {
        assert_eq!(c[..2], [(1, post(10)), (2, post(11))]);
    }
}

#[test]
fn a_new_leader_recovers_every_acknowledged_post_and_fences_the_old_one() {
    let mut net = Net::new(3);
    net.nodes[0].campaign().unwrap();
    net.run(&[]);
    // 10 is acknowledged (stored on 1 and 2); 11 reaches only node 1.
    net.nodes[0].append(vec![post(10)]).unwrap();
    net.run(&[3]);
    assert_eq!(net.committed[0], vec![(1, post(10))]);
    net.nodes[0].append(vec![post(11)]).unwrap();
    net.collect(0);
    let late: Vec<_> = net.inflight.drain(..).collect();

    // Node 1 is cut off; node 3 takes over with node 2.
    net.nodes[2].campaign().unwrap();
    net.run(&[1]);
    assert!(net.nodes[2].leading().is_some());
    net.nodes[2].append(vec![post(20)]).unwrap();
    net.run(&[1]);
    assert_eq!(net.committed[2], vec![(1, post(10)), (2, post(20))]);

    // The old leader's late write of 11 into slot 2 is refused.
    for (from, to, m) in late {
        let i = to.0 as usize - 1;
        net.nodes[i].step(from, m.clone());
        let ready = net.nodes[i].take_ready();
        assert!(ready.write.is_none(), "stored a deposed leader's write");
        assert!(matches!(
            ready.messages.as_slice(),
            [(_, LogMessage::Refused { .. })]
        ));
    }
    // Told so, node 1 stops leading.
    net.run(&[]);
    net.nodes[0].append(vec![post(12)]).ok();
    net.run(&[]);
    assert_eq!(net.nodes[0].leading(), None);
}

#[test]
fn a_hole_is_filled_with_a_noop_so_later_slots_commit() {
    let mut net = Net::new(3);
    net.nodes[0].campaign().unwrap();
    net.run(&[]);
    // Slot 1 reaches nobody but node 1; slot 2 reaches node 2 too.
    net.nodes[0].append(vec![post(10)]).unwrap();
    net.collect(0);
    net.inflight.clear();
    net.nodes[0].append(vec![post(11)]).unwrap();
    net.collect(0);
    net.inflight.retain(|(_, to, _)| to.0 == 2);
    net.run(&[]);
    net.nodes[2].campaign().unwrap();
    net.run(&[1]);
    assert_eq!(net.committed[2], vec![(1, Value::Noop), (2, post(11))]);
}

/// A replica that compacted a committed slot no longer reports it; a
/// candidate that has not released that slot must not lead on its word
/// (it would write another post into the committed slot), and says it
/// needs a snapshot instead.
#[test]
fn a_candidate_behind_a_compaction_floor_does_not_lead() {
    let mut net = Net::new(3);
    net.nodes[0].campaign().unwrap();
    net.run(&[3]);
    net.nodes[0].append(vec![post(10)]).unwrap();
    net.run(&[3]);
    net.nodes[0].resend();
    net.run(&[3]);
    assert_eq!(
        net.committed[1],
        vec![(1, post(10))],
        "node 2 released slot 1"
    );
    net.nodes[1].compact(Slot(1));
    assert!(net.nodes[1].acceptor().entry(Slot(1)).is_none());
    // Node 1 is gone; node 3 never saw slot 1.
    net.nodes[2].campaign().unwrap();
    net.run(&[1]);
    assert_eq!(net.nodes[2].leading(), None);
    assert_eq!(net.lagging, vec![(2, NodeId(3), Slot(1))]);
    assert!(net.nodes[2].append(vec![post(20)]).is_err());
    assert!(net.committed[2].is_empty(), "nothing else took slot 1");
}

/// A follower that was away while its leader compacted the slots it
/// misses is told so (`Compacted`), reports itself lagging, and after the
/// node copied the timeline (`install`) catches up from the log: it
/// releases exactly the slots after the copy, in order, and stores no
/// older leader's word about them.
#[test]
fn a_follower_behind_the_leaders_floor_installs_a_copy_and_catches_up() {
    let mut net = Net::new(3);
    net.nodes[0].campaign().unwrap();
    net.run(&[3]);
    net.nodes[0].append(vec![post(10), post(11)]).unwrap();
    net.run(&[3]);
    net.nodes[0].compact(Slot(2));
    assert_eq!(net.nodes[0].acceptor().floor(), Slot(2));
    // Node 3 comes back; the leader's next write reaches it.
    net.nodes[0].append(vec![post(12)]).unwrap();
    net.run(&[]);
    assert_eq!(
        net.lagging,
        vec![(0, NodeId(3), Slot(2)), (2, NodeId(3), Slot(2))],
        "the leader reports it, and node 3 learns it from the leader: a copy up to slot 2"
    );
    assert!(
        net.committed[2].is_empty(),
        "nothing released across the gap"
    );
    // A copy below what the leader compacted moves nothing useful, and a
    // leader never installs.
    assert!(!net.nodes[0].install(Slot(9)));
    // The node copied slots 1 and 2 from the leader.
    assert!(net.nodes[2].install(Slot(2)));
    assert!(!net.nodes[2].install(Slot(2)), "once");
    assert_eq!(net.nodes[2].released(), Slot(2));
    assert_eq!(net.nodes[2].acceptor().floor(), Slot(2));
    net.nodes[0].append(vec![post(13)]).unwrap();
    net.run(&[]);
    net.nodes[0].resend();
    net.run(&[]);
    assert_eq!(net.committed[2], vec![(3, post(12)), (4, post(13))]);
    // A Compacted from a node that does not lead the newest term is ignored.
    let lagging = net.lagging.len();
    net.nodes[2].step(
        NodeId(2),
        LogMessage::Compacted {
            term: Term {
                epoch: 0,
                round: 0,
                node: NodeId(2),
            },
            floor: Slot(50),
        },
    );
    net.collect(2);
    assert_eq!(net.lagging.len(), lagging);
}

/// A held follower (its timeline may carry a home failover's divergent
/// tail) stores and answers but releases nothing; once the node cut its
/// timeline back and rewound the log, even below what it had released,
/// the leader resends everything after the rewind point and it releases
/// that again, in order.
#[test]
fn a_held_follower_releases_nothing_until_it_rewinds_then_catches_up_from_there() {
    let mut net = Net::new(3);
    net.nodes[0].campaign().unwrap();
    net.run(&[]);
    net.nodes[0].append(vec![post(10)]).unwrap();
    net.run(&[]);
    net.nodes[0].resend();
    net.run(&[]);
    assert_eq!(net.committed[2], vec![(1, post(10))]);
    net.nodes[2].hold(Some(1));
    assert!(net.nodes[2].is_held());
    // Node 2 is away: the leader commits with the held node's votes.
    net.nodes[0].append(vec![post(11), post(12)]).unwrap();
    net.run(&[2]);
    net.nodes[0].resend();
    net.run(&[2]);
    assert_eq!(net.committed[0].len(), 3, "its votes still count");
    assert_eq!(net.committed[2], vec![(1, post(10))], "held: nothing more");
    assert_eq!(
        net.nodes[2].acceptor().entry(Slot(3)).unwrap().value,
        post(12)
    );
    // A leader defines the log: it never rewinds.
    assert!(!net.nodes[0].rewind(Slot(0), 0));
    // The node kept nothing of the timeline: it rewinds to slot 0.
    net.committed[2].clear();
    assert!(net.nodes[2].rewind(Slot(0), 0));
    assert!(!net.nodes[2].is_held());
    assert_eq!(net.nodes[2].released(), Slot(0));
    assert!(!net.nodes[2].caught_up_with_heard(), "it must hear again");
    net.nodes[0].resend();
    net.run(&[]);
    net.nodes[0].resend();
    net.run(&[]);
    assert_eq!(
        net.committed[2],
        vec![(1, post(10)), (2, post(11)), (3, post(12))]
    );
    assert!(net.nodes[2].caught_up_with_heard());
}

/// A held voter still counts for a leader's establishment: it reports as
/// released the committed slots it holds (two voters, so the leader
/// cannot establish without it).
#[test]
fn a_held_voter_counts_for_establishment_with_what_it_holds() {
    let mut net = Net::new(2);
    net.nodes[0].campaign().unwrap();
    net.run(&[]);
    net.nodes[0].append(vec![post(10), post(11)]).unwrap();
    net.run(&[]);
    assert!(net.committed[1].is_empty(), "not told the commit point yet");
    net.nodes[1].hold(Some(1));
    // A new term recovers slots 1 and 2 and writes them again.
    net.nodes[0].step_down();
    net.nodes[0].campaign().unwrap();
    net.run(&[]);
    net.nodes[0].resend();
    net.run(&[]);
    assert!(net.nodes[0].leading().is_some());
    assert!(net.committed[1].is_empty(), "held: nothing released");
    assert!(
        net.nodes[0].established().is_some(),
        "the held voter holds what the leader recovered"
    );
    assert!(net.nodes[0].has_caught_up(NodeId(2)));
}

/// A rewind drops the entries written before the failover epoch (the old
/// home's, perhaps divergent), wherever they are, and those up to the
/// copied slot, and puts the floor there even below where it was.
#[test]
fn a_rewind_drops_entries_of_earlier_epochs_and_moves_the_floor_to_the_copy() {
    let term = |epoch, round| Term {
        epoch,
        round,
        node: NodeId(1),
    };
    let entry = |t, v| saferchat_consensus::partition_log::Entry {
        term: t,
        value: post(v),
    };
    let mut a = LogAcceptor::restore(
        term(2, 1),
        [
            (Slot(5), entry(term(1, 3), 5)),
            (Slot(6), entry(term(2, 1), 6)),
            (Slot(7), entry(term(1, 3), 7)),
            (Slot(8), entry(term(2, 1), 8)),
        ],
        Slot(4),
    );
    a.rewind(Slot(2), 2);
    assert_eq!(a.floor(), Slot(2));
    let kept: Vec<u64> = a.entries_from(Slot(0)).iter().map(|(s, _)| s.0).collect();
    assert_eq!(kept, [6, 8]);
    a.rewind(Slot(6), 2);
    let kept: Vec<u64> = a.entries_from(Slot(0)).iter().map(|(s, _)| s.0).collect();
    assert_eq!(kept, [8]);
    assert_eq!(a.promised(), term(2, 1), "the promise stays");
}

/// An idle leader's resend carries the commit point, so followers release
/// the last slots of a quiet partition.
#[test]
fn followers_of_a_quiet_partition_learn_the_last_commit() {
    let mut net = Net::new(3);
    net.nodes[0].campaign().unwrap();
    net.run(&[]);
    net.nodes[0].append(vec![post(10)]).unwrap();
    net.run(&[]);
    assert!(net.committed[1].is_empty(), "not yet told");
    net.nodes[0].resend();
    net.run(&[]);
    assert_eq!(net.committed[1], vec![(1, post(10))]);
    assert_eq!(net.committed[2], vec![(1, post(10))]);
}

/// A report of 2^62 stored slots costs no more than the pending ones.
#[test]
fn an_absurd_accepted_count_is_cheap() {
    let mut net = Net::new(3);
    let term = net.nodes[0].campaign().unwrap();
    net.run(&[]);
    net.nodes[0].step(
        NodeId(2),
        LogMessage::Accepted {
            term,
            first: Slot(1),
            count: saferchat_consensus::partition_log::SLOT_MAX - 1,
            released: Slot(0),
        },
    );
    assert!(net.nodes[0].leading().is_some());
}

// ---------------------------------------------------------------------
// Seeded simulation.

const POSTS: u32 = 12;

struct Sim {
    rng: ChaCha8Rng,
    checks: Checks,
    /// Nodes `1..=voters` vote; the rest are learners.
    voters: u64,
    /// Posts acknowledged as stored on a majority of the learners too
    /// ([`LogReplica::stored_by`]): slot by post.
    remote_acked: BTreeMap<u32, u64>,
    /// How many learners `stored_by` is asked for (a majority; a broken
    /// test variant asks for fewer).
    remote_count: usize,
    nodes: Vec<LogReplica<u32>>,
    /// What each node has durably: promise, entries, released prefix.
    disk: Vec<(
        Term,
        BTreeMap<Slot, saferchat_consensus::partition_log::Entry<u32>>,
        Slot,
    )>,
    net: Vec<(NodeId, NodeId, LogMessage<u32>)>,
    /// Every slot released and every post acknowledged.
    ledger: Ledger,
    next_post: u32,
    /// Each node's compaction floor (durable, like its entries).
    floors: Vec<Slot>,
    /// Nodes that reported themselves lagging and have not installed a
    /// copy since, and how far the copy must reach.
    wants_copy: Vec<Option<Slot>>,
    copies: usize,
}

impl Sim {
    fn new(seed: u64, checks: Checks) -> Sim {
        Sim::with_learners(seed, checks, 0)
    }

    fn with_learners(seed: u64, checks: Checks, learners: u64) -> Sim {
        let voters = 3;
        let n = voters + learners;
        Sim {
            rng: ChaCha8Rng::seed_from_u64(seed),
            checks,
            voters,
            remote_acked: BTreeMap::new(),
            remote_count: learners as usize / 2 + 1,
            nodes: (1..=n)
                .map(|me| {
                    LogReplica::new(
                        config_with_learners(me, voters, n, checks),
                        LogAcceptor::restore(Term::ZERO, [], Slot(0)),
                        Slot(0),
                    )
                })
                .collect(),
            disk: vec![(Term::ZERO, BTreeMap::new(), Slot(0)); n as usize],
            net: Vec::new(),
            ledger: Ledger::default(),
            next_post: 1,
            floors: vec![Slot(0); n as usize],
            wants_copy: vec![None; n as usize],
            copies: 0,
        }
    }

    fn collect(&mut self, i: usize) -> Result<(), String> {
        let leading = self.nodes[i].leading().is_some();
        if leading && i as u64 >= self.voters {
            return Err(format!("learner {} leads", i + 1));
        }
        if leading && self.nodes.len() as u64 > self.voters {
            // What the node would acknowledge at the cross-datacenter
            // level: posts a majority of the learners stored.
            let learners: Vec<NodeId> = (self.voters + 1..=self.nodes.len() as u64)
                .map(NodeId)
                .collect();
            let stored = self.nodes[i].stored_by(&learners, self.remote_count);
            for (p, slot) in &self.ledger.acked {
                if *slot <= stored.0 {
                    self.remote_acked.insert(*p, *slot);
                }
            }
        }
        let ready = self.nodes[i].take_ready();
        if let Some(w) = ready.write {
            self.disk[i].0 = w.promised;
            for (s, e) in w.entries {
                self.disk[i].1.insert(s, e);
            }
        }
        for (to, m) in ready.messages {
            self.net.push((NodeId(i as u64 + 1), to, m));
        }
        for (n, need) in &ready.lagging {
            if n.0 == i as u64 + 1 {
                self.wants_copy[i] = Some(self.wants_copy[i].map_or(*need, |w| w.max(*need)));
            }
        }
        self.ledger.release(
            NodeId(i as u64 + 1),
            leading,
            &mut self.disk[i].2,
            ready.committed,
        )
    }

    fn restart(&mut self, i: usize) {
        let (promised, entries, released) = self.disk[i].clone();
        self.nodes[i] = LogReplica::new(
            config_with_learners(
                i as u64 + 1,
                self.voters,
                self.nodes.len() as u64,
                self.checks,
            ),
            LogAcceptor::restore(promised, entries, self.floors[i]),
            released,
        );
    }

    /// Drops what node `i` released from its log, as the node's driver does
    /// once it retains too much.
    fn compact(&mut self, i: usize) {
        let upto = self.disk[i].2;
        self.nodes[i].compact(upto);
        self.floors[i] = self.nodes[i].acceptor().floor();
        let floor = self.floors[i];
        self.disk[i].1.retain(|s, _| *s > floor);
    }

    /// Node `i` copies the timeline node `j` applied (its durable released
    /// prefix) and installs it, as the node does when it lags: only from
    /// a replica that applied as far as `i` needs.
    fn copy(&mut self, i: usize, j: usize) {
        let upto = self.disk[j].2;
        if upto < self.wants_copy[i].unwrap_or(Slot(u64::MAX)) {
            return;
        }
        if self.nodes[i].install(upto) {
            self.disk[i].2 = upto;
            self.floors[i] = upto;
            self.disk[i].1.retain(|s, _| *s > upto);
            self.wants_copy[i] = None;
            self.copies += 1;
        }
    }

    fn step(&mut self) -> Result<(), String> {
        let i = self.rng.random_range(0..self.nodes.len());
        match self.rng.random_range(0..100) {
            0..4 => {
                self.nodes[i].campaign();
            }
            4..20
                if self.next_post <= POSTS
                    && self.nodes[i]
                        .append(vec![Value::Post(self.next_post)])
                        .is_ok() =>
            {
                self.next_post += 1;
            }
            20..23 => self.restart(i),
            23..26 => self.nodes[i].resend(),
            30..33 => self.compact(i),
            33..36 if self.wants_copy[i].is_some() => {
                let j = (i + self.rng.random_range(1..self.nodes.len())) % self.nodes.len();
                self.copy(i, j);
            }
            26..30 if !self.net.is_empty() => {
                // Loss.
                let k = self.rng.random_range(0..self.net.len());
                self.net.swap_remove(k);
            }
            _ if !self.net.is_empty() => {
                // Delivery in any order; sometimes duplicated.
                let k = self.rng.random_range(0..self.net.len());
                let (from, to, m) = if self.rng.random_range(0..10) == 0 {
                    self.net[k].clone()
                } else {
                    self.net.swap_remove(k)
                };
                let j = to.0 as usize - 1;
                self.nodes[j].step(from, m);
                self.collect(j)?;
            }
            _ => {}
        }
        self.collect(i)
    }

    /// Every acknowledged post must survive: a quorum's logs hold it in
    /// its slot (AckedDurable), and acknowledged slots form a prefix
    /// (AckedGapless).
    fn check_acked(&self) -> Result<(), String> {
        let holds = |(_, entries, released): &&(
            Term,
            BTreeMap<Slot, saferchat_consensus::partition_log::Entry<u32>>,
            Slot,
        ),
                     p: u32,
                     slot: u64| {
            entries
                .get(&Slot(slot))
                .is_some_and(|e| e.value == Value::Post(p))
                || (released.0 >= slot && self.ledger.chosen.get(&slot) == Some(&Value::Post(p)))
        };
        let voters = self.voters as usize;
        for (p, slot) in &self.ledger.acked {
            let holders = self.disk[..voters]
                .iter()
                .filter(|d| holds(d, *p, *slot))
                .count();
            if holders < 2 {
                return Err(format!(
                    "AckedDurable: post {p} in #{slot} is on {holders} voter(s)"
                ));
            }
        }
        let learners = self.disk.len() - voters;
        for (p, slot) in &self.remote_acked {
            let holders = self.disk[voters..]
                .iter()
                .filter(|d| holds(d, *p, *slot))
                .count();
            if holders < learners / 2 + 1 {
                return Err(format!(
                    "RemoteDurable: post {p} in #{slot} is on {holders} learner(s)"
                ));
            }
        }
        let mut slots: Vec<u64> = self.ledger.acked.values().copied().collect();
        slots.sort_unstable();
        for (k, s) in slots.iter().enumerate() {
            let prefix_slot = self.ledger.chosen.range(..=*s).count() as u64;
            if prefix_slot != *s {
                return Err(format!("AckedGapless: #{s} acknowledged with a gap ({k})"));
            }
        }
        Ok(())
    }
}

/// Runs one schedule; returns how many posts were acknowledged, how many
/// terms were led and how many copies were installed, so a test can tell a
/// busy schedule from an idle one.
fn simulate(seed: u64, checks: Checks, steps: usize) -> Result<(usize, usize, usize), String> {
    simulate_with(Sim::new(seed, checks), steps)
}

fn simulate_with(mut sim: Sim, steps: usize) -> Result<(usize, usize, usize), String> {
    let mut terms = std::collections::BTreeSet::new();
    for _ in 0..steps {
        sim.step()?;
        sim.check_acked()?;
        terms.extend(sim.nodes.iter().filter_map(LogReplica::leading));
    }
    Ok((sim.ledger.acked.len(), terms.len(), sim.copies))
}

fn seed_base() -> u64 {
    log_ledger::seed_base(0x5a1e)
}

#[test]
fn seeded_schedules_keep_every_invariant() {
    let base = seed_base();
    let (mut acked, mut terms, mut copies) = (0, 0, 0);
    for k in 0..400 {
        let seed = base + k;
        match simulate(seed, Checks::default(), 600) {
            Ok((a, t, c)) => {
                acked += a;
                terms += t;
                copies += c;
            }
            Err(e) => panic!("SEED={seed}: {e}"),
        }
    }
    println!(
        "400 schedules from SEED={base}: {acked} posts acknowledged, {terms} terms led, {copies} copies installed"
    );
    assert!(
        acked > 400 && terms > 800 && copies > 40,
        "the schedules did little: {acked} acked, {terms} terms, {copies} copies"
    );
}

/// The broken variants of specs/PartitionLog_Broken*.cfg: the simulation
/// must find a violation for each.
fn must_break(checks: Checks) -> String {
    let base = seed_base();
    for k in 0..2_000 {
        if let Err(e) = simulate(base + k, checks, 600) {
            return format!("SEED={}: {e}", base + k);
        }
    }
    panic!("no schedule broke {checks:?}");
}

#[test]
fn broken_without_fencing_is_caught() {
    let found = must_break(Checks {
        fencing: false,
        ..Checks::default()
    });
    println!("without fencing: {found}");
}

#[test]
fn broken_without_tail_read_is_caught() {
    let found = must_break(Checks {
        tail_read: false,
        ..Checks::default()
    });
    println!("without the tail read: {found}");
}

/// Three voters and three learners (a partition's replicas in its home
/// datacenter and in one other): the same faults, and learners that
/// compact and copy like voters. Agreement and AckedOnce hold over every
/// node's releases, acknowledged posts stay on a majority of the voters,
/// a learner never leads, and posts that [`LogReplica::stored_by`] said a
/// majority of the learners stored stay there. After the faults stop, the
/// learners catch up on everything the leader released, by the log or by
/// a copy.
#[test]
fn seeded_schedules_with_learners_keep_every_invariant_and_the_learners_catch_up() {
    let base = seed_base();
    let (mut acked, mut remote, mut remote_under_faults, mut copies) = (0, 0, 0, 0);
    for k in 0..300 {
        let seed = base + k;
        let mut sim = Sim::with_learners(seed, Checks::default(), 3);
        for _ in 0..600 {
            if let Err(e) = sim.step().and_then(|()| sim.check_acked()) {
                panic!("SEED={seed}: {e}");
            }
        }
        remote_under_faults += sim.remote_acked.len();
        if let Err(e) = heal(&mut sim) {
            panic!("SEED={seed}: {e}");
        }
        acked += sim.ledger.acked.len();
        remote += sim.remote_acked.len();
        copies += sim.copies;
    }
    println!(
        "300 schedules with learners from SEED={base}: {acked} posts acknowledged, {remote} of them stored on a majority of the learners ({remote_under_faults} before the network healed), {copies} copies installed"
    );
    assert!(
        acked > 300 && remote_under_faults > 100 && copies > 30,
        "the schedules did little: {acked} acked, {remote_under_faults} remote, {copies} copies"
    );
}

/// The RemoteDurable check bites: a node that took one learner's word for
/// the cross-datacenter level (instead of a majority's) acknowledges
/// posts that a majority of the learners do not hold.
#[test]
fn broken_remote_level_on_one_learner_is_caught() {
    let base = seed_base();
    for k in 0..2_000 {
        let mut sim = Sim::with_learners(base + k, Checks::default(), 3);
        sim.remote_count = 1;
        for _ in 0..600 {
            if let Err(e) = sim.step().and_then(|()| sim.check_acked()) {
                assert!(e.starts_with("RemoteDurable"), "SEED={}: {e}", base + k);
                println!("one learner's word: SEED={}: {e}", base + k);
                return;
            }
        }
    }
    panic!("no schedule caught a level acknowledged on one learner");
}

/// The network heals: node 1 leads (campaigning until it does), resends
/// on a reliable network, and lagging nodes copy from it; every node,
/// learners included, must then have released what the leader had.
fn heal(sim: &mut Sim) -> Result<(), String> {
    let deliver = |sim: &mut Sim| -> Result<(), String> {
        for i in 0..sim.nodes.len() {
            sim.collect(i)?;
        }
        let mut budget = 100_000;
        while let Some((from, to, m)) = (!sim.net.is_empty()).then(|| sim.net.remove(0)) {
            let j = to.0 as usize - 1;
            sim.nodes[j].step(from, m);
            sim.collect(j)?;
            budget -= 1;
            if budget == 0 {
                return Err("the healed network never went quiet".into());
            }
        }
        Ok(())
    };
    // Node 1 may lead a term that another node's late candidacy outbid;
    // it learns so on its first resend and runs again.
    for _ in 0..30 {
        if sim.nodes[0].leading().is_none() {
            sim.nodes[0].campaign();
        } else {
            sim.nodes[0].resend();
        }
        deliver(sim)?;
        // Lagging nodes (node 1 too, behind a promiser's floor) copy from
        // the node that applied the most.
        let source = (0..sim.nodes.len())
            .max_by_key(|j| sim.disk[*j].2)
            .unwrap_or(0);
        for i in 0..sim.nodes.len() {
            if i != source && sim.wants_copy[i].is_some() {
                sim.copy(i, source);
            }
        }
        sim.check_acked()?;
    }
    if sim.nodes[0].leading().is_none() {
        return Err("node 1 does not lead on a healed network".into());
    }
    let target = sim.nodes[0].released();
    for (i, node) in sim.nodes.iter().enumerate() {
        if node.released() < target {
            return Err(format!(
                "node {} released {} of the leader's {target} after healing (promised {:?}, leader {:?}, floor {}, entries {:?}, wants {:?})",
                i + 1,
                node.released(),
                node.acceptor().promised(),
                sim.nodes[0].leading(),
                node.acceptor().floor(),
                node.acceptor()
                    .entries_from(Slot(0))
                    .iter()
                    .map(|(s, e)| (s.0, e.term))
                    .collect::<Vec<_>>(),
                sim.wants_copy[i],
            ));
        }
    }
    Ok(())
}

/// A learner never runs for leader, a slot commits on the voters alone,
/// and `stored_by` reports the learners' durable prefix.
#[test]
fn learners_follow_without_voting_and_report_what_they_stored() {
    let nodes = |me| {
        LogReplica::new(
            config_with_learners(me, 3, 5, Checks::default()),
            LogAcceptor::restore(Term::ZERO, [], Slot(0)),
            Slot(0),
        )
    };
    let mut net = Net {
        nodes: (1..=5).map(nodes).collect(),
        inflight: Vec::new(),
        committed: vec![Vec::new(); 5],
        lagging: Vec::new(),
    };
    assert_eq!(net.nodes[3].campaign(), None, "a learner does not campaign");
    net.nodes[0].campaign().unwrap();
    net.collect(0);
    assert!(
        net.inflight.iter().all(|(_, to, _)| to.0 <= 3),
        "only voters are asked for a promise"
    );
    net.run(&[]);
    let learners = [NodeId(4), NodeId(5)];
    // The learners are cut off: slots still commit on the voters.
    net.nodes[0].append(vec![post(10), post(11)]).unwrap();
    net.run(&[4, 5]);
    assert_eq!(net.committed[0], vec![(1, post(10)), (2, post(11))]);
    assert_eq!(net.nodes[0].stored_by(&learners, 1), Slot(0));
    // Node 4 comes back and stores them; a majority of the two needs both.
    net.nodes[0].resend();
    net.run(&[5]);
    assert_eq!(net.nodes[0].stored_by(&learners, 1), Slot(2));
    assert_eq!(net.nodes[0].stored_by(&learners, 2), Slot(0));
    assert_eq!(net.committed[3], vec![(1, post(10)), (2, post(11))]);
    net.nodes[0].resend();
    net.run(&[]);
    assert_eq!(net.nodes[0].stored_by(&learners, 2), Slot(2));
    assert_eq!(net.committed[4], vec![(1, post(10)), (2, post(11))]);
    // A slot a learner stored but the voters did not is pending, and not
    // committed by the learners' word; a resend gives it to the voters
    // again, not to the learner that has it.
    net.nodes[0].append(vec![post(12)]).unwrap();
    net.run(&[2, 3]);
    assert_eq!(net.committed[0].len(), 2, "not committed on learners");
    assert_eq!(net.nodes[0].stored_by(&learners, 2), Slot(3));
    net.nodes[0].resend();
    net.collect(0);
    for (_, to, m) in &net.inflight {
        let LogMessage::Accept { values, .. } = m else {
            panic!("a resend is an Accept: {m:?}");
        };
        assert_eq!(values.is_empty(), to.0 >= 4, "to {to}: {values:?}");
    }
    net.run(&[]);
    assert_eq!(net.committed[0].last(), Some(&(3, post(12))));
    // A learner's Prepare (no honest node sends one) is not answered.
    let term = Term {
        epoch: 0,
        round: 99,
        node: NodeId(4),
    };
    net.nodes[1].step(
        NodeId(4),
        LogMessage::Prepare {
            term,
            from: Slot(1),
        },
    );
    assert!(net.nodes[1].take_ready().messages.is_empty());
    assert!(net.nodes[0].leading().is_some());
}

#[test]
fn a_learner_knows_whether_its_copy_holds_every_commit_it_heard_of() {
    let nodes = |me| {
        LogReplica::new(
            config_with_learners(me, 3, 4, Checks::default()),
            LogAcceptor::restore(Term::ZERO, [], Slot(0)),
            Slot(0),
        )
    };
    let mut net = Net {
        nodes: (1..=4).map(nodes).collect(),
        inflight: Vec::new(),
        committed: vec![Vec::new(); 4],
        lagging: Vec::new(),
    };
    assert!(
        !net.nodes[3].caught_up_with_heard(),
        "a replica that heard from no leader cannot tell"
    );
    net.nodes[0].campaign().unwrap();
    net.run(&[]);
    assert!(net.nodes[0].caught_up_with_heard(), "a leader is");
    net.nodes[0].append(vec![post(10), post(11)]).unwrap();
    net.run(&[]);
    net.nodes[0].resend();
    net.run(&[]);
    assert_eq!(net.nodes[3].released(), Slot(2));
    assert!(net.nodes[3].caught_up_with_heard());
    // The learner misses slot 3 but hears a later commit point: behind.
    net.nodes[0].append(vec![post(12)]).unwrap();
    net.run(&[4]);
    net.nodes[0].append(vec![post(13)]).unwrap();
    net.collect(0);
    // Deliver slot 4's Accept (commit point 3) to the learner only after
    // dropping the resend of slot 3: it stores 4, hears 3, releases none.
    let to_learner: Vec<_> = net
        .inflight
        .iter()
        .filter(|(_, to, _)| to.0 == 4)
        .cloned()
        .collect();
    net.inflight.retain(|(_, to, _)| to.0 != 4);
    net.run(&[4]);
    for (from, _, m) in to_learner {
        net.nodes[3].step(from, m);
    }
    net.nodes[3].take_ready();
    assert_eq!(net.nodes[3].released(), Slot(2));
    assert!(
        !net.nodes[3].caught_up_with_heard(),
        "slot 3 is committed and missing here"
    );
    // The leader's resend fills the gap.
    net.nodes[0].resend();
    net.run(&[]);
    assert!(net.nodes[3].released() >= Slot(3));
    net.nodes[0].resend();
    net.run(&[]);
    assert_eq!(net.nodes[3].released(), Slot(4));
    assert!(net.nodes[3].caught_up_with_heard());
    // Rebuilt from its durable state (a restart), it cannot tell again.
    let restarted = LogReplica::new(
        config_with_learners(4, 3, 4, Checks::default()),
        net.nodes[3].acceptor().clone(),
        net.nodes[3].released(),
    );
    assert!(!restarted.caught_up_with_heard());
}
