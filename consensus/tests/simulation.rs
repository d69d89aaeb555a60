//! Seeded randomized simulation of the real consensus core: thousands of
//! schedules with 3 or 5 replicas, several proposers, message loss,
//! duplication, reordering and delay, partitions that heal, crash-restarts,
//! clock drift within the configured bound and lease renewals.
//!
//! Each schedule has two phases. In the *chaos* phase anything goes; in the
//! *heal* phase every node is up, the network delivers everything (still
//! reordered, with short delays) and ticks continue. At every step the
//! oracle of `common` checks `Agreement`, `LinearHistory`,
//! `CommittedChosen`, `OneValuePerBallot` and `LeaseReadSafety` (every
//! live node's `read(now)`), and the harness checks that no request gets a
//! second reply. At the end of the heal phase every request whose node did
//! not crash must have had exactly one reply, and a consensus read issued at
//! every node after the heal must have committed (progress, not just
//! time-outs).
//!
//! # Faults
//!
//! Every schedule draws its own mix of faults (swarm testing, see
//! [`Chaos`]): message loss, duplication, long delays (up to 400 ms against
//! a 100 ms lease), partitions (clean splits, or links cut at random, which
//! need not be transitive), crashes at random times and right after a node
//! acted, restarts after 0-250 ms from the durable acceptor state and a
//! stored committed state that may lag behind, lease seekers that come and
//! go, clients that stick to one node and retry changes with the same id.
//! Messages a node sends itself are delayed like any other (by up to 40 ms
//! in some schedules) and die with the process; every other message, lease
//! grants to a previous incarnation of their addressee included, survives
//! a restart (each incarnation numbers its lease requests from a fresh
//! random base, which is what makes those grants harmless: bug B3, fixed).
//!
//! # Replay
//!
//! A schedule is a function of its seed. A failure prints the seed and the
//! last events; `SEED=<n> cargo test -p saferchat-consensus --test
//! simulation simulation -- --exact --nocapture` replays that one schedule
//! with a full trace (`VARIANT=ExcessiveDrift` or `InconsistentLease` for
//! the broken variants; `SCHEDULES=<n>` changes how many schedules the main
//! test runs).
//!
//! # Time
//!
//! Real time advances in whole milliseconds. Every node's clock accumulates
//! `rate * elapsed` in millionths of a millisecond, where each node's rate
//! is redrawn now and then from `1 ± ρ` (the extremes half of the time);
//! the replica sees the floor in milliseconds. Flooring costs at most 1 ms
//! per measured interval, which `guard_ms = 1` covers, so the drift bound
//! holds exactly as configured.

mod common;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;

use common::{Catalog, History, Violation};
use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;
use saferchat_consensus::{
    AcceptorState, Ballot, Change, ChangeId, Drift, LeaseConfig, Message, Millis, NodeId, Outcome,
    Proposal, ProposerConfig, ReplicaConfig, RequestId, Revision, RoomReplica, RoomState,
};

/// Drift bound of the simulated clusters, in ppm (ρ = 10%).
const RHO_PPM: u64 = 100_000;

/// Millionths of a millisecond per millisecond.
const PPM: u64 = 1_000_000;

/// Lease timing: short enough that leases come and go within a schedule.
fn sim_lease() -> LeaseConfig {
    LeaseConfig {
        lease_ms: 100,
        renew_every_ms: 30,
        guard_ms: 1,
        drift: Drift::new(RHO_PPM),
    }
}

/// Proposer timing, scaled like the lease.
fn sim_proposer(batch_max: usize, request_timeout_ms: u64) -> ProposerConfig {
    ProposerConfig {
        round_timeout_ms: 60,
        request_timeout_ms,
        backoff_ms: 5,
        batch_max,
    }
}

/// What the harness does wrong on purpose, for the variants that must fail.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Variant {
    /// Nothing: the system as documented.
    Correct,
    /// (a) Clocks drift up to four times the configured bound.
    ExcessiveDrift,
    /// (b) Node 1 is configured with leases twice as long as the others':
    /// its lease requests say so and the others refuse them, so it must
    /// never read locally (before lease requests carried their length, it
    /// read stale rooms).
    InconsistentLease,
}

/// Probabilities of the chaos phase (per step, or per message sent).
///
/// Every schedule draws its own mix ("swarm testing"): a schedule with
/// many crashes and few partitions explores different corners than one
/// with the opposite, and a single fixed mix dilutes both.
#[derive(Clone, Copy, Debug)]
struct Chaos {
    /// A message is lost.
    loss: f64,
    /// A message is sent twice.
    duplicate: f64,
    /// A message takes 20 to 400 ms instead of at most 12.
    long_delay: f64,
    /// A node crashes.
    crash: f64,
    /// A node crashes right after handling an input.
    crash_after_input: f64,
    /// Links are cut.
    partition: f64,
    /// A node starts or stops asking for leases.
    toggle_lease: f64,
    /// A client proposes a change.
    propose: f64,
    /// The next proposal goes to the node that got the last one.
    sticky: f64,
    /// Longest delay of a message a node sends itself, in ms: the core
    /// does not require the node to feed them back at once.
    self_delay: u64,
}

impl Chaos {
    fn draw(rng: &mut ChaCha8Rng) -> Chaos {
        Chaos {
            loss: rng.random_range(0.0..0.2),
            duplicate: rng.random_range(0.0..0.05),
            long_delay: rng.random_range(0.0..0.2),
            crash: rng.random_range(0.0..0.015),
            crash_after_input: rng.random_range(0.0..0.01),
            partition: rng.random_range(0.0..0.01),
            toggle_lease: rng.random_range(0.0..0.01),
            propose: rng.random_range(0.02..0.1),
            sticky: rng.random_range(0.0..0.9),
            self_delay: [0, 2, 10, 40][rng.random_range(0..4)],
        }
    }
}

/// A message in flight.
struct InFlight {
    /// Real time at which it may be delivered.
    at: u64,
    from: NodeId,
    to: NodeId,
    message: Message,
}

/// A request issued by a client.
struct Request {
    node: usize,
    incarnation: u32,
    proposal: Proposal,
    replies: u32,
    /// Issued in the heal phase as a progress probe: must commit.
    probe: bool,
    decided: bool,
    /// Whether the client has retried it after `Unavailable`.
    retried: bool,
}

/// One simulated node.
struct SimNode {
    config: Arc<ReplicaConfig>,
    replica: Option<RoomReplica>,
    /// Clock in millionths of a millisecond.
    clock: u128,
    rate_ppm: u64,
    incarnation: u32,
    /// Real time until which the node stays down.
    down_until: u64,
    /// Whether this node asks for leases while up.
    seeker: bool,
    /// The acceptor state last persisted.
    durable: AcceptorState,
    /// Committed states this node has stored, oldest first (a restart may
    /// come back with any of them, or none: storage may lag).
    stored: Vec<(Ballot, Arc<RoomState>)>,
}

impl SimNode {
    fn now(&self) -> Millis {
        Millis(u64::try_from(self.clock / u128::from(PPM)).expect("clock fits"))
    }
}

/// Whether a schedule records what happens.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Tracing {
    /// No: the sweep runs thousands of schedules.
    Off,
    /// Keep the events, to print the end of a failing schedule.
    Collect,
    /// Print every event as it happens (replaying one seed).
    Print,
}

/// How a schedule ended, for the statistics line.
#[derive(Default)]
struct Stats {
    steps: u64,
    decided: u64,
    unavailable: u64,
    local_reads: u64,
    /// Local reads served by node 1 (the misconfigured node of
    /// `InconsistentLease`).
    local_reads_at_node_1: u64,
    crashes: u64,
    chosen: u64,
}

/// A failed schedule.
struct Failure {
    seed: u64,
    what: String,
    trace: String,
}

/// One schedule.
struct Sim {
    rng: ChaCha8Rng,
    variant: Variant,
    nodes: Vec<SimNode>,
    net: Vec<InFlight>,
    now: u64,
    history: History,
    catalog: Catalog,
    requests: BTreeMap<u64, Request>,
    next_change: u128,
    /// Cut links (bit `from * n + to`), when partitioned, and when they
    /// heal.
    partition: Option<(u32, u64)>,
    chaos: Chaos,
    /// The node that got the last proposal.
    last_proposer: Option<usize>,
    healing: bool,
    stats: Stats,
    /// Every event, when tracing.
    trace: Vec<String>,
    tracing: Tracing,
}

impl Sim {
    fn new(seed: u64, variant: Variant, tracing: Tracing) -> Sim {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let n: u64 = if rng.random_bool(0.7) { 3 } else { 5 };
        let batch_max = rng.random_range(1..=3);
        // Short time-outs make requests fail during the chaos (and retries
        // of changes that may or may not have been applied).
        let request_timeout_ms = [150, 500, 1_500][rng.random_range(0..3)];
        let chaos = Chaos::draw(&mut rng);
        let nodes = (1..=n)
            .map(|me| {
                let mut config = common::config(
                    me,
                    n,
                    sim_lease(),
                    sim_proposer(batch_max, request_timeout_ms),
                );
                if variant == Variant::InconsistentLease && me == 1 {
                    // Node 1 believes leases last twice as long as the
                    // others promise it.
                    config.lease.lease_ms *= 2;
                }
                let config = Arc::new(config);
                let replica = RoomReplica::new(
                    Arc::clone(&config),
                    AcceptorState::default(),
                    None,
                    Millis(0),
                    rng.random(),
                );
                SimNode {
                    config,
                    replica: Some(replica),
                    clock: u128::from(rng.random_range(0..1_000u64)) * u128::from(PPM),
                    rate_ppm: PPM,
                    incarnation: 0,
                    down_until: 0,
                    seeker: rng.random_bool(0.6)
                        || variant == Variant::InconsistentLease && me == 1,
                    durable: AcceptorState::default(),
                    stored: Vec::new(),
                }
            })
            .collect();
        let mut sim = Sim {
            rng,
            variant,
            nodes,
            net: Vec::new(),
            now: 0,
            history: History::new(n as usize / 2 + 1),
            catalog: Catalog::default(),
            requests: BTreeMap::new(),
            next_change: 1,
            partition: None,
            chaos,
            last_proposer: None,
            healing: false,
            stats: Stats::default(),
            trace: Vec::new(),
            tracing,
        };
        for index in 0..sim.nodes.len() {
            sim.redraw_rate(index);
        }
        sim
    }

    fn log(&mut self, event: impl FnOnce() -> String) {
        if self.tracing != Tracing::Off {
            let line = format!("[t={}] {}", self.now, event());
            if self.tracing == Tracing::Print {
                println!("{line}");
            }
            self.trace.push(line);
        }
    }

    fn me(index: usize) -> NodeId {
        NodeId(index as u64 + 1)
    }

    /// Picks a new clock rate for a node, within the bound (or beyond it,
    /// for the broken variant).
    fn redraw_rate(&mut self, index: usize) {
        let rho = match self.variant {
            Variant::ExcessiveDrift => 4 * RHO_PPM,
            _ => RHO_PPM,
        };
        // Extremes are the interesting cases; draw them often (always, for
        // the variant that exceeds the bound).
        let rate = match self.rng.random_range(0..4) {
            0 => PPM - rho,
            1 => PPM + rho,
            _ if self.variant == Variant::ExcessiveDrift => PPM + rho,
            _ => self.rng.random_range(PPM - rho..=PPM + rho),
        };
        self.nodes[index].rate_ppm = rate;
    }

    /// Runs an input on a live node and carries out its `Ready`.
    fn input(
        &mut self,
        index: usize,
        what: &str,
        input: impl FnOnce(&mut RoomReplica, Millis),
    ) -> Result<(), String> {
        let node = &mut self.nodes[index];
        let now = node.now();
        let Some(replica) = node.replica.as_mut() else {
            return Ok(());
        };
        input(replica, now);
        let ready = replica.take_ready();
        let me = Self::me(index);
        self.log(|| format!("{me} {what} @{}", now.0));
        if let Some(persist) = ready.persist {
            self.history
                .on_persist(me, &persist, &self.catalog)
                .map_err(|v| v.to_string())?;
            self.nodes[index].durable = persist;
        }
        for (to, message) in ready.messages {
            self.send(me, to, message);
        }
        for (request, outcome) in ready.replies {
            self.on_reply(index, request, &outcome)?;
        }
        if let Some(committed) = ready.committed {
            self.nodes[index].stored.push(committed);
        }
        if !self.healing && self.rng.random_bool(self.chaos.crash_after_input) {
            // Crash at the worst moment: right after the node acted, with
            // its messages to itself not yet fed back.
            self.crash(index);
        }
        Ok(())
    }

    /// Puts a message in flight, with a random delay; during the chaos
    /// phase it may be lost or duplicated.
    fn send(&mut self, from: NodeId, to: NodeId, message: Message) {
        let copies = if self.healing {
            1
        } else if self.rng.random_bool(self.chaos.loss) {
            0
        } else if self.rng.random_bool(self.chaos.duplicate) {
            2
        } else {
            1
        };
        for _ in 0..copies {
            let delay = if from == to {
                // After the heal a node feeds its own messages back promptly.
                let most = if self.healing {
                    2
                } else {
                    self.chaos.self_delay
                };
                self.rng.random_range(0..=most)
            } else if !self.healing && self.rng.random_bool(self.chaos.long_delay) {
                self.rng.random_range(20..=400)
            } else {
                self.rng.random_range(0..=12)
            };
            self.net.push(InFlight {
                at: self.now + delay,
                from,
                to,
                message: message.clone(),
            });
        }
    }

    fn on_reply(
        &mut self,
        index: usize,
        request: RequestId,
        outcome: &Outcome,
    ) -> Result<(), String> {
        let entry = self
            .requests
            .get_mut(&request.0)
            .ok_or_else(|| format!("reply to unknown request {request:?}"))?;
        entry.replies += 1;
        if entry.replies > 1 {
            return Err(format!(
                "request {request:?} got a second reply: {outcome:?}"
            ));
        }
        if entry.node != index {
            return Err(format!("request {request:?} answered by the wrong node"));
        }
        let proposal = entry.proposal.clone();
        match outcome {
            Outcome::Decided { .. } => {
                entry.decided = true;
                self.stats.decided += 1;
            }
            Outcome::Unavailable => self.stats.unavailable += 1,
        }
        self.log(|| format!("reply to {request:?}: {}", short_outcome(outcome)));
        self.history
            .on_reply(&proposal, outcome, &self.catalog)
            .map_err(|v| v.to_string())
    }

    /// `LeaseReadSafety` at every live node, now.
    fn check_reads(&mut self) -> Result<(), String> {
        for index in 0..self.nodes.len() {
            let node = &self.nodes[index];
            let Some(replica) = &node.replica else {
                continue;
            };
            if let Ok(state) = replica.read(node.now()) {
                self.stats.local_reads += 1;
                if index == 0 {
                    self.stats.local_reads_at_node_1 += 1;
                }
                self.history
                    .check_read(Self::me(index), state)
                    .map_err(|v: Violation| v.to_string())?;
            }
        }
        Ok(())
    }

    /// A new change for a client to propose.
    fn random_proposal(&mut self, index: usize) -> Proposal {
        let id = ChangeId(self.next_change);
        self.next_change += 1;
        let who = common::handle(["ann", "ben", "cyd", "dee"][self.rng.random_range(0..4)]);
        let change = match self.rng.random_range(0..10) {
            0 => Change::Create,
            1..=3 => Change::Add(who),
            4 | 5 => Change::Remove(who),
            6 | 7 => Change::RegisterKey(who, common::key(&who.to_string()[..4])),
            _ => Change::Read,
        };
        let expected = self.rng.random_bool(0.15).then(|| {
            self.nodes[index]
                .replica
                .as_ref()
                .and_then(|r| r.known())
                .map_or(Revision(0), |(_, s)| s.revision)
        });
        Proposal {
            id,
            change,
            expected,
        }
    }

    fn propose(&mut self, index: usize, proposal: Proposal, probe: bool) -> Result<(), String> {
        let id = self.requests.len() as u64;
        self.catalog.add(&proposal);
        self.requests.insert(
            id,
            Request {
                node: index,
                incarnation: self.nodes[index].incarnation,
                proposal: proposal.clone(),
                replies: 0,
                probe,
                decided: false,
                retried: false,
            },
        );
        let what = format!("propose {:?} {:?}", proposal.id, proposal.change);
        self.input(index, &what, |r, now| {
            r.propose(now, RequestId(id), proposal)
        })
    }

    fn crash(&mut self, index: usize) {
        // Often a quick restart (a process crash), sometimes a long outage.
        let downtime = if self.rng.random_bool(0.5) {
            self.rng.random_range(0..=30)
        } else {
            self.rng.random_range(0..=250)
        };
        let node = &mut self.nodes[index];
        node.replica = None;
        node.incarnation += 1;
        node.down_until = self.now + downtime;
        let me = Self::me(index);
        // What the process held in memory dies with it.
        self.net.retain(|m| !(m.from == me && m.to == me));
        self.stats.crashes += 1;
        self.log(|| format!("{me} crashes for {downtime} ms"));
    }

    fn restart(&mut self, index: usize) -> Result<(), String> {
        let stale = self.rng.random_bool(0.2);
        let node = &mut self.nodes[index];
        let known = if stale && !node.stored.is_empty() {
            // Storage lagged: come back with an older committed state.
            let k = self.rng.random_range(0..=node.stored.len());
            k.checked_sub(1).map(|k| node.stored[k].clone())
        } else {
            node.stored.last().cloned()
        };
        let durable = node.durable.clone();
        let now = node.now();
        let recovering_until = now.plus(node.config.lease.promise_ms());
        let lease_seq_base = self.rng.random();
        let node = &mut self.nodes[index];
        node.replica = Some(RoomReplica::new(
            Arc::clone(&node.config),
            durable,
            known,
            recovering_until,
            lease_seq_base,
        ));
        let seeker = node.seeker;
        self.log(|| format!("{} restarts", Self::me(index)));
        if seeker {
            self.input(index, "want_lease", |r, now| r.want_lease(now, true))?;
        }
        Ok(())
    }
}

/// Simulated milliseconds of the heal phase: long enough for every request
/// to commit or time out, and for the probes to commit.
const HEAL_MS: u64 = 2_500;

/// When, after the heal, every live node issues its probe read.
const PROBE_AFTER_MS: u64 = 300;

impl Sim {
    /// Hands the in-flight message at `k` to its addressee, unless the
    /// network or the addressee's state says it is lost.
    fn deliver(&mut self, k: usize) -> Result<(), String> {
        let m = self.net.swap_remove(k);
        let index = m.to.0 as usize - 1;
        let node = &self.nodes[index];
        if node.replica.is_none() {
            return Ok(());
        }
        let n = self.nodes.len();
        if let Some((cut, _)) = self.partition
            && cut & (1 << ((m.from.0 as usize - 1) * n + index)) != 0
        {
            return Ok(());
        }
        let from = m.from;
        let what = if self.tracing != Tracing::Off {
            format!("<- {from} {}", short_message(&m.message))
        } else {
            String::new()
        };
        self.input(index, &what, |r, now| r.step(now, from, m.message))
    }

    /// Advances real time, and every clock at its own rate; restarts the
    /// nodes whose downtime is over, heals a partition that is due, and
    /// fires the timers that are due.
    fn advance(&mut self, ms: u64) -> Result<(), String> {
        self.now += ms;
        for node in &mut self.nodes {
            node.clock += u128::from(ms) * u128::from(node.rate_ppm);
        }
        if self.rng.random_bool(0.02) {
            let index = self.rng.random_range(0..self.nodes.len());
            self.redraw_rate(index);
        }
        if self
            .partition
            .as_ref()
            .is_some_and(|(_, until)| *until <= self.now)
        {
            self.partition = None;
            self.log(|| "partition heals".to_owned());
        }
        for index in 0..self.nodes.len() {
            let node = &self.nodes[index];
            if node.replica.is_none() && node.down_until <= self.now {
                self.restart(index)?;
            }
        }
        for index in 0..self.nodes.len() {
            let node = &self.nodes[index];
            let Some(replica) = &node.replica else {
                continue;
            };
            let now = node.now();
            let due = replica.next_wakeup(now).is_some_and(|t| t <= now);
            // Timers may fire late under load, but not forever.
            if due && (self.healing || self.rng.random_bool(0.8)) {
                self.input(index, "tick", |r, now| r.tick(now))?;
            }
        }
        Ok(())
    }

    /// Delivers a random message that is due, if any.
    fn deliver_one(&mut self) -> Result<bool, String> {
        let due: Vec<usize> = (0..self.net.len())
            .filter(|k| self.net[*k].at <= self.now)
            .collect();
        if due.is_empty() {
            return Ok(false);
        }
        let k = due[self.rng.random_range(0..due.len())];
        self.deliver(k)?;
        Ok(true)
    }

    /// One step of the chaos phase.
    fn chaos_step(&mut self) -> Result<(), String> {
        if !(self.rng.random_bool(0.75) && self.deliver_one()?) {
            let ms = self.rng.random_range(1..=3);
            self.advance(ms)?;
        }
        let live: Vec<usize> = (0..self.nodes.len())
            .filter(|i| self.nodes[*i].replica.is_some())
            .collect();
        if live.is_empty() {
            return Ok(());
        }
        let pick = live[self.rng.random_range(0..live.len())];
        if self.requests.len() < 40 && self.rng.random_bool(self.chaos.propose) {
            // Clients tend to stick to one node (and restarted nodes get
            // their clients back), so one proposer often makes several
            // changes in a row.
            let pick = match self.last_proposer {
                Some(last) if self.rng.random_bool(self.chaos.sticky) && live.contains(&last) => {
                    last
                }
                _ => pick,
            };
            self.last_proposer = Some(pick);
            let proposal = if self.next_change == 1 || self.rng.random_bool(0.1) {
                // Every room starts with a create; sometimes two race.
                let id = ChangeId(self.next_change);
                self.next_change += 1;
                common::proposal(id.0, Change::Create)
            } else if self.rng.random_bool(0.1) {
                // A client retries a change whose outcome it did not learn,
                // with the same id, maybe at another node.
                self.retry_candidate()
                    .unwrap_or_else(|| self.random_proposal(pick))
            } else {
                self.random_proposal(pick)
            };
            self.propose(pick, proposal, false)?;
        }
        if self.rng.random_bool(self.chaos.crash) {
            self.crash(pick);
        }
        if self.partition.is_none() && self.rng.random_bool(self.chaos.partition) {
            self.partition_links();
        }
        if self.rng.random_bool(self.chaos.toggle_lease) {
            let seeker = !self.nodes[pick].seeker;
            self.nodes[pick].seeker = seeker;
            self.input(pick, "want_lease toggled", |r, now| {
                r.want_lease(now, seeker)
            })?;
        }
        Ok(())
    }

    /// Cuts links for a while: either a clean split into two groups, or
    /// each link independently (partial, non-transitive partitions).
    fn partition_links(&mut self) {
        let n = self.nodes.len();
        let groups: Vec<bool> = (0..n).map(|_| self.rng.random_bool(0.5)).collect();
        let split = self.rng.random_bool(0.5);
        let mut cut = 0u32;
        for a in 0..n {
            for b in a + 1..n {
                let cut_ab = if split {
                    groups[a] != groups[b]
                } else {
                    self.rng.random_bool(0.4)
                };
                if cut_ab {
                    cut |= (1 << (a * n + b)) | (1 << (b * n + a));
                }
            }
        }
        let until = self.now + self.rng.random_range(50..=400);
        self.log(|| format!("links cut {cut:#x} until {until}"));
        self.partition = Some((cut, until));
    }

    /// A proposal that got `Unavailable` or whose node crashed, to retry.
    fn retry_candidate(&mut self) -> Option<Proposal> {
        let candidates: Vec<Proposal> = self
            .requests
            .values()
            .filter(|r| !r.decided && !r.probe)
            .map(|r| r.proposal.clone())
            .collect();
        (!candidates.is_empty())
            .then(|| candidates[self.rng.random_range(0..candidates.len())].clone())
    }

    /// Runs the heal phase and checks liveness at its end.
    fn heal(&mut self) -> Result<(), String> {
        self.healing = true;
        self.partition = None;
        for node in &mut self.nodes {
            node.down_until = node.down_until.min(self.now);
        }
        self.log(|| "heal".to_owned());
        let start = self.now;
        let mut probed = false;
        while self.now < start + HEAL_MS {
            while self.deliver_one()? {
                self.check_reads()?;
            }
            self.advance(1)?;
            self.check_reads()?;
            if !probed && self.now >= start + PROBE_AFTER_MS {
                probed = true;
                for index in 0..self.nodes.len() {
                    let id = ChangeId(self.next_change);
                    self.next_change += 1;
                    self.propose(index, Proposal::read(id), true)?;
                }
            }
            // A probe that timed out is retried, as a client would.
            let retries: Vec<(usize, Proposal)> = self
                .requests
                .values()
                .filter(|r| r.probe && r.replies == 1 && !r.decided && !r.retried)
                .map(|r| (r.node, r.proposal.clone()))
                .collect();
            for request in self.requests.values_mut() {
                request.retried |= request.probe && request.replies == 1;
            }
            for (index, proposal) in retries {
                self.propose(index, proposal, true)?;
            }
            self.stats.steps += 1;
        }
        for (id, request) in &self.requests {
            let lost = self.nodes[request.node].incarnation != request.incarnation;
            if request.replies == 0 && !lost {
                return Err(format!(
                    "liveness: request {id} ({:?} at {}) got no reply {HEAL_MS} ms after the heal",
                    request.proposal.change,
                    Self::me(request.node)
                ));
            }
        }
        for index in 0..self.nodes.len() {
            let committed = self
                .requests
                .values()
                .any(|r| r.probe && r.node == index && r.decided);
            if !committed {
                return Err(format!(
                    "liveness: no consensus read committed at {} in the {HEAL_MS} ms after the heal",
                    Self::me(index)
                ));
            }
        }
        Ok(())
    }
}

/// Runs one schedule from its seed.
fn run(seed: u64, variant: Variant, tracing: Tracing) -> Result<Stats, Failure> {
    let mut sim = Sim::new(seed, variant, tracing);
    let chaos_steps = sim.rng.random_range(200..=500);
    let (n, chaos) = (sim.nodes.len(), sim.chaos);
    sim.log(|| format!("{variant:?}, {n} nodes, {chaos_steps} chaos steps, {chaos:?}"));
    let outcome = (|| {
        for index in 0..sim.nodes.len() {
            if sim.nodes[index].seeker {
                sim.input(index, "want_lease", |r, now| r.want_lease(now, true))?;
            }
        }
        for _ in 0..chaos_steps {
            sim.chaos_step()?;
            sim.check_reads()?;
            sim.stats.steps += 1;
        }
        sim.heal()
    })();
    match outcome {
        Ok(()) => {
            sim.stats.chosen = sim.history.chosen().len() as u64;
            Ok(sim.stats)
        }
        Err(what) => Err(Failure {
            seed,
            what,
            trace: sim.trace.join("\n"),
        }),
    }
}

fn short_message(message: &Message) -> String {
    match message {
        Message::Accept {
            ballot,
            value,
            next,
        } => {
            format!(
                "Accept {{ {ballot}, rev {}, next {next:?} }}",
                value.revision
            )
        }
        Message::Commit { ballot, value } => {
            format!("Commit {{ {ballot}, rev {} }}", value.revision)
        }
        Message::Promise { ballot, accepted } => format!(
            "Promise {{ {ballot}, accepted {:?} }}",
            accepted.as_ref().map(|(b, v)| (b.to_string(), v.revision))
        ),
        other => format!("{other:?}"),
    }
}

fn short_outcome(outcome: &Outcome) -> String {
    match outcome {
        Outcome::Decided { result, state } => {
            format!("Decided {result:?} at rev {}", state.revision)
        }
        Outcome::Unavailable => "Unavailable".to_owned(),
    }
}

/// Runs `count` schedules from `first`, stopping at the first failure.
fn sweep(first: u64, count: u64, variant: Variant) -> (Stats, Option<Failure>, u64) {
    let mut total = Stats::default();
    for seed in first..first + count {
        match run(seed, variant, Tracing::Off) {
            Ok(stats) => {
                total.steps += stats.steps;
                total.decided += stats.decided;
                total.unavailable += stats.unavailable;
                total.local_reads += stats.local_reads;
                total.local_reads_at_node_1 += stats.local_reads_at_node_1;
                total.crashes += stats.crashes;
                total.chosen += stats.chosen;
            }
            Err(_) => {
                // Deterministic: run it again, keeping the events.
                let failure = run(seed, variant, Tracing::Collect)
                    .err()
                    .expect("a schedule is a function of its seed");
                return (total, Some(failure), seed - first + 1);
            }
        }
    }
    (total, None, count)
}

fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name)
        .ok()
        .map(|v| v.parse().expect("a number"))
}

/// The main sweep: thousands of schedules of the system as documented.
#[test]
fn simulation() {
    if let Some(seed) = env_u64("SEED") {
        let variant = match std::env::var("VARIANT").as_deref() {
            Ok("ExcessiveDrift") => Variant::ExcessiveDrift,
            Ok("InconsistentLease") => Variant::InconsistentLease,
            _ => Variant::Correct,
        };
        match run(seed, variant, Tracing::Print) {
            Ok(_) => println!("SEED={seed}: ok"),
            Err(f) => panic!("SEED={seed}: {}", f.what),
        }
        return;
    }
    let count = env_u64("SCHEDULES").unwrap_or(2_000);
    let started = Instant::now();
    let (stats, failure, ran) = sweep(0, count, Variant::Correct);
    println!(
        "simulation: {ran} schedules, {} steps, {} decided, {} unavailable, {} local reads, \
         {} crashes, {} values chosen, {:.1?}",
        stats.steps,
        stats.decided,
        stats.unavailable,
        stats.local_reads,
        stats.crashes,
        stats.chosen,
        started.elapsed()
    );
    if let Some(f) = failure {
        let tail: Vec<&str> = f.trace.lines().rev().take(40).collect();
        panic!(
            "SEED={} failed: {}\nreplay: SEED={} cargo test -p saferchat-consensus --test simulation -- --nocapture\n{}",
            f.seed,
            f.what,
            f.seed,
            tail.into_iter().rev().collect::<Vec<_>>().join("\n")
        );
    }
}

/// Runs schedules of a broken variant until one fails, and asserts that
/// one does, with the expected property.
fn expect_violation(variant: Variant, property: &str, count: u64) {
    let started = Instant::now();
    let (_, failure, ran) = sweep(1_000_000, count, variant);
    let failure = failure.unwrap_or_else(|| {
        panic!("{variant:?}: no violation in {count} schedules: the checks cannot fail")
    });
    println!(
        "{variant:?}: violation after {ran} schedules ({:.1?}): {}\n\
         replay: VARIANT={variant:?} SEED={} cargo test -p saferchat-consensus --test simulation \
         simulation -- --exact --nocapture",
        started.elapsed(),
        failure.what,
        failure.seed,
    );
    assert!(
        failure.what.starts_with(property),
        "{variant:?} broke {} instead of {property}",
        failure.what
    );
}

#[test]
fn broken_clocks_beyond_the_drift_bound_are_caught() {
    expect_violation(Variant::ExcessiveDrift, common::LEASE_READ_SAFETY, 6_000);
}

/// A node configured with a longer lease than its grantors asks for it,
/// is refused by every other grantor, and so never holds a lease: every
/// schedule keeps every property, and node 1 serves no local read while
/// the others do.
#[test]
fn inconsistent_lease_configs_are_refused() {
    let (stats, failure, ran) = sweep(1_000_000, 500, Variant::InconsistentLease);
    if let Some(f) = failure {
        panic!(
            "SEED={} failed: {}\nreplay: VARIANT=InconsistentLease SEED={} cargo test -p \
             saferchat-consensus --test simulation simulation -- --exact --nocapture",
            f.seed, f.what, f.seed
        );
    }
    println!(
        "InconsistentLease: {ran} schedules, {} local reads, {} of them at node 1",
        stats.local_reads, stats.local_reads_at_node_1
    );
    assert_eq!(
        stats.local_reads_at_node_1, 0,
        "node 1 read on refused leases"
    );
    assert!(
        stats.local_reads > 0,
        "no local reads at all: the check is vacuous"
    );
}
