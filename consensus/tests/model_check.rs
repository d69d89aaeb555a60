//! Exhaustive bounded model check of the real consensus core with
//! [`stateright`].
//!
//! The model's state holds three real [`RoomReplica`]s (cloned on every
//! transition; the core derives `Clone + Eq + Hash` for this), the network,
//! per-node clocks and the oracle of `common`, which records every accept
//! persisted and every reply. A transition feeds one input to one replica
//! and executes its [`Ready`](saferchat_consensus::Ready) atomically:
//! persist, then send, reply, learn. A crash between two transitions is
//! therefore a crash at any point the contract allows, since nothing of a
//! `Ready` takes effect before its persist.
//!
//! # What the environment may do
//!
//! - **Network**: a multiset of messages in flight. Any message may be
//!   delivered next (reordering) or never (loss); a bounded number of
//!   deliveries may leave their message in flight (duplication).
//! - **Messages to self**: in most scenarios a node feeds the messages it
//!   addresses to itself back at once, in order, within the same transition,
//!   as a node that drains its own messages before taking the next input
//!   would. One scenario instead puts them in the network like any other
//!   message (delayed, reordered, lost with a crash) — the core does not
//!   require immediate feedback, and this is where a ballot could be reused
//!   after a restart (bug B1, fixed).
//! - **Proposals**: each proposal of a scenario is issued once, at its node,
//!   at any time. Requests never time out within the bounds (retries after a
//!   round timeout do happen).
//! - **Leases**: the seeker calls `want_lease(true)` once per incarnation;
//!   the model then stops renewals (`want_lease(false)`, an ordinary input)
//!   so that one request round per incarnation is explored.
//! - **Crash-restart**: volatile state is lost; the new replica is built with
//!   `RoomReplica::new(config, durable, known, now + promise_ms)` as the core
//!   documents, with the durable acceptor state and the newest committed
//!   state the node stored, and a lease sequence base that differs from the
//!   previous incarnations'. Messages the node addressed to itself die with
//!   the process; every other message in flight survives, lease grants
//!   that answer a request of the previous incarnation included (bug B3,
//!   fixed: such a grant used to be taken as an answer to the new
//!   incarnation's request with the same number;
//!   `stale_lease_grants_after_a_restart_are_ignored`).
//! - **Time**: real time advances in steps of 5 ms, and in each step every
//!   clock advances by 4, 5 or 6 ms (debug builds explore only the extremes
//!   4 and 6, i.e. rates 0.8 and 1.2), independently per node and per step.
//!   With `Drift::new(200_000)` (ρ = 20%) these are exactly the rates the
//!   bound allows, measured at step boundaries, where all events happen: the
//!   discretisation neither exceeds nor under-uses the bound. ρ is large so
//!   that small integers express it exactly: `cover(ms) = ceil(1.5 * ms)`,
//!   so `lease_ms = 4` gives `promise_ms = 6` with no guard. Timer inputs
//!   (`tick`) happen whenever a node is due, or later.
//! - **Long leases**: with `lease_ms = 4` every lease and promise ends at
//!   the next step whatever the rates, so drift never decides anything
//!   there. The `long_lease` scenarios use `lease_ms = 12`: a lease lasts
//!   two steps of a fast clock and three of a slow one, a promise
//!   (`cover(12) = 18`) three to five, so a slow holder outlives a fast
//!   grantor's promise unless the cover is there. To afford those steps the
//!   holder gets its lease in the prefix; the short-lease scenarios keep
//!   the lease messages' interleavings. Removing the cover from
//!   `Drift::cover` or from `LeaseConfig::promise_ms` makes them fail.
//!   Removing it from `LeaseConfig::wait_ms` does not, and cannot: that
//!   cover is redundant (see `wait_ms`).
//!
//! To keep the exhaustive search within a minute or two of an unoptimised
//! build, each scenario starts from a *prefix* in which node 1 created the
//! room with instant, lossless delivery, and then explores one combination
//! of the features above; commits addressed to a node that neither proposes
//! nor holds a lease in the scenario are lost at the source (they cannot
//! affect any property there, and the network may always lose them). Every
//! scenario prints how many states it explored.
//!
//! | scenario | proposers, changes after the prefix | faults | time | bound |
//! |---|---|---|---|---|
//! | `race_of_two_proposers_with_a_crash` | n1, n2: one each | crash of any node | – | complete |
//! | `race_of_two_proposers_with_a_duplicate` | n1, n2: one each | one message delivered twice | – | complete |
//! | `proposer_restart_with_asynchronous_messages_to_self` | n1: three | crash of n1, self-messages in the network | – | 15 actions |
//! | `lease_holder_that_restarts` | n1, n3 (the holder): one each | crash of n3 | – | 11 actions |
//! | `lease_reads_under_clock_drift` | n1: one; n3 holds a lease | – | 2 steps, per-node drift | complete |
//! | `lease_reads_across_a_grantor_restart` | n1: one; n3 holds a lease | crash of n2 | 1 step, per-node drift | complete |
//! | `stale_lease_grants_after_a_restart_are_ignored` | n1: two; n3 holds a lease | crash of n3 | 1 step | 13 actions |
//! | `a_read_racing_a_change_under_a_lease` | n1: one change; n2: a consensus read; n3 holds a lease | – | – | 14 actions |
//! | `long_lease_reads_under_clock_drift` | n1: one; n3 leased from n1-n3 in the prefix | – | 3 steps, per-node drift, lease of 12 | complete |
//! | `long_lease_reads_across_a_grantor_restart` | n1: one; n3 leased from n2, n3 in the prefix | crash of n2 | 2 steps, per-node drift, lease of 12 | complete |
//!
//! All of them lose and reorder messages. The broken variants reuse the
//! lease scenarios and must *fail*.
//!
//! # Properties
//!
//! `Agreement`, `LinearHistory`, `CommittedChosen` and `OneValuePerBallot`
//! (checked by the oracle when an accept is persisted, a value becomes
//! chosen or a reply arrives), `LeaseReadSafety` (every node's `read(now)`
//! in every state), `NoPanic` (the core's own assertions), and `sometimes`
//! properties showing that the check is not vacuous: some path commits every
//! change, and some path serves a local read.

mod common;

use std::collections::{BTreeMap, VecDeque};
use std::fmt::Write as _;
use std::hash::{Hash, Hasher};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;
use std::time::Instant;

use common::{Catalog, History, Violation};
use saferchat_consensus::{
    AcceptorState, Change, Drift, LeaseConfig, Message, Millis, NodeId, Outcome, Proposal,
    ProposerConfig, ReplicaConfig, RequestId, RoomReplica,
};
use stateright::{Checker, HasDiscoveries, Model, Property};

/// Clock advances per real step of 5 ms that ρ = 20% allows. Debug builds
/// explore the extremes only, where lease timing is tightest; the middle
/// rate would multiply the state space of the timed scenarios by about
/// three.
const CORRECT_RATES: &[u64] = if cfg!(debug_assertions) {
    &[4, 6]
} else {
    &[4, 5, 6]
};

/// Clock advances per real step of 5 ms for the broken variant (a): ρ = 40%,
/// twice the configured bound.
const EXCESSIVE_RATES: &[u64] = &[3, 7];

/// Lease timing of the model: ρ = 20%, no guard, small integers.
fn model_lease() -> LeaseConfig {
    LeaseConfig {
        lease_ms: 4,
        renew_every_ms: 1,
        guard_ms: 0,
        drift: Drift::new(200_000),
    }
}

/// Lease timing of the long-lease scenarios: a lease of 12 lasts two steps
/// of a fast clock and three of a slow one, a promise (`cover(12) = 18`)
/// three to five. Drift decides who expires first, which it never does
/// with `model_lease`, whose leases end at the next step whatever the
/// rates.
fn long_lease() -> LeaseConfig {
    LeaseConfig {
        lease_ms: 12,
        ..model_lease()
    }
}

/// Proposer timing of the model: a round stuck below a quorum is retried
/// after about two real steps; requests outlive the bounds; one change per
/// round, so consecutive chosen revisions are one change apart.
fn model_proposer() -> ProposerConfig {
    ProposerConfig {
        round_timeout_ms: 8,
        request_timeout_ms: 1_000,
        backoff_ms: 1,
        batch_max: 1,
    }
}

/// How the harness perturbs the system, for the variants that must fail.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Perturbation {
    /// None: the system as documented.
    None,
    /// A restarted node is given `recovering_until = Millis(0)`.
    NoRecoveryWindow,
    /// `Accepted` messages lose their `holders` list in flight: a write
    /// that skips the lease holders' acknowledgement.
    DropHolders,
}

/// A message in flight.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct Envelope {
    from: NodeId,
    to: NodeId,
    message: Message,
}

/// One node: its clock and its replica.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Node {
    clock: u64,
    replica: RoomReplica,
    /// Lease request rounds sent by this incarnation.
    lease_rounds: u8,
    /// Fingerprint of `replica`, which is expensive to hash, cached so that
    /// only the node a transition touches is hashed again.
    replica_fingerprint: u64,
}

impl Node {
    fn new(clock: u64, replica: RoomReplica, lease_rounds: u8) -> Node {
        let replica_fingerprint = fingerprint(&replica);
        Node {
            clock,
            replica,
            lease_rounds,
            replica_fingerprint,
        }
    }

    fn now(&self) -> Millis {
        Millis(self.clock)
    }
}

/// A deterministic 64-bit fingerprint of a value.
fn fingerprint<T: Hash + ?Sized>(value: &T) -> u64 {
    let mut hasher = Fingerprinter(0x243F_6A88_85A3_08D3);
    value.hash(&mut hasher);
    hasher.finish()
}

/// A cheap, well-mixing hasher for fingerprints.
///
/// The test crate is not optimised, and SipHash compiled without
/// optimisation took a third of the checker's time. This mixes each word
/// with a multiply and xor-shift and finishes with the splitmix64
/// finaliser: not a keyed hash, but states are not adversarial, and a 64-bit
/// fingerprint is all the checker keeps of a state anyway.
struct Fingerprinter(u64);

impl Fingerprinter {
    fn mix(&mut self, word: u64) {
        let x = (self.0 ^ word).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        self.0 = x ^ (x >> 29) ^ word.rotate_left(17);
    }
}

impl Hasher for Fingerprinter {
    fn write(&mut self, bytes: &[u8]) {
        let mut chunks = bytes.chunks_exact(8);
        for chunk in &mut chunks {
            self.mix(u64::from_le_bytes(chunk.try_into().expect("8 bytes")));
        }
        let mut last = [0u8; 8];
        last[..chunks.remainder().len()].copy_from_slice(chunks.remainder());
        self.mix(u64::from_le_bytes(last) ^ ((bytes.len() as u64) << 56));
    }

    fn write_u8(&mut self, n: u8) {
        self.mix(u64::from(n));
    }

    fn write_u16(&mut self, n: u16) {
        self.mix(u64::from(n));
    }

    fn write_u32(&mut self, n: u32) {
        self.mix(u64::from(n));
    }

    fn write_u64(&mut self, n: u64) {
        self.mix(n);
    }

    fn write_u128(&mut self, n: u128) {
        self.mix(n as u64);
        self.mix((n >> 64) as u64);
    }

    fn write_usize(&mut self, n: usize) {
        self.mix(n as u64);
    }

    fn finish(&self) -> u64 {
        let mut z = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
}

/// The model's state. Parts are behind `Arc` so that a transition copies
/// only what it changes.
#[derive(Clone, Debug, PartialEq, Eq)]
struct State {
    /// Real time, in steps.
    step: u8,
    /// Whether anything happened after the prefix. Until then no clock
    /// reading is recorded anywhere and advancing time would only shift the
    /// clocks' origins, so it is not explored.
    started: bool,
    nodes: Vec<Arc<Node>>,
    /// Messages in flight, sorted by fingerprint so that equal multisets are
    /// equal vectors.
    net: Arc<Vec<(u64, Arc<Envelope>)>>,
    history: Arc<History>,
    /// Fingerprint of `history`.
    history_fingerprint: u64,
    /// Proposals issued (bit per proposal).
    issued: u8,
    /// Proposals that got a `Decided` reply.
    decided: u8,
    crashes: u8,
    duplicates: u8,
    /// The first invariant the oracle saw broken, or a panic of the core.
    violation: Option<Violation>,
}

impl Hash for State {
    fn hash<H: Hasher>(&self, state: &mut H) {
        (self.step, self.started).hash(state);
        for node in &self.nodes {
            (node.clock, node.replica_fingerprint, node.lease_rounds).hash(state);
        }
        for (key, _) in self.net.iter() {
            key.hash(state);
        }
        self.history_fingerprint.hash(state);
        (self.issued, self.decided, self.crashes, self.duplicates).hash(state);
        self.violation.hash(state);
    }
}

/// One step of the environment.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Action {
    /// Deliver a message and take it out of the network.
    Deliver(Arc<Envelope>),
    /// Deliver a message and leave a copy in the network.
    Duplicate(Arc<Envelope>),
    /// A node's timer fires.
    Tick(usize),
    /// Proposal `k` is issued at its node.
    Propose(usize),
    /// A node starts asking for leases.
    WantLease(usize),
    /// A node crashes and restarts.
    Crash(usize),
    /// Real time advances one step; each clock by the amount given.
    Advance(Vec<u64>),
}

/// An input to one replica at its node's current time.
type Input = Box<dyn FnOnce(&mut RoomReplica, Millis)>;

/// One scenario: the cluster and the bounds of the environment.
struct RoomModel {
    /// Per-node configurations (index 0 is `NodeId(1)`).
    configs: Vec<Arc<ReplicaConfig>>,
    /// Proposals and the node index each is issued at.
    proposals: Vec<(Proposal, usize)>,
    catalog: Catalog,
    /// How many proposals are committed by the prefix.
    prefix: usize,
    /// Node indexes that ask for leases.
    seekers: Vec<usize>,
    /// Allowed clock advances per real step.
    rates: Vec<u64>,
    max_steps: u8,
    max_crashes: u8,
    /// Node indexes that may crash.
    crashable: Vec<usize>,
    max_duplicates: u8,
    /// Whether a node feeds its own messages back within the transition.
    self_sync: bool,
    perturbation: Perturbation,
    /// Explore paths of at most this many actions (0: no limit).
    max_actions: usize,
    /// When not empty, the seekers get their leases in the prefix, from
    /// these node indexes (one request round, instant delivery; requests to
    /// other nodes are lost), instead of during the exploration: this spares
    /// the interleavings of lease messages, so that the exploration affords
    /// the steps a long lease lasts.
    prefix_grantors: Vec<usize>,
}

impl RoomModel {
    /// Three replicas, all of them lease holders, with the model's timing;
    /// `proposals[..prefix]` are committed before the exploration starts.
    fn new(prefix: usize, proposals: &[(Change, usize)]) -> RoomModel {
        let configs = (1..=3)
            .map(|me| Arc::new(common::config(me, 3, model_lease(), model_proposer())))
            .collect();
        let proposals: Vec<_> = proposals
            .iter()
            .enumerate()
            .map(|(k, (change, node))| (common::proposal(k as u128 + 1, change.clone()), *node))
            .collect();
        let mut catalog = Catalog::default();
        for (proposal, _) in &proposals {
            catalog.add(proposal);
        }
        RoomModel {
            configs,
            proposals,
            catalog,
            prefix,
            seekers: Vec::new(),
            rates: CORRECT_RATES.to_vec(),
            max_steps: 0,
            max_crashes: 0,
            crashable: Vec::new(),
            max_duplicates: 0,
            self_sync: true,
            perturbation: Perturbation::None,
            max_actions: 0,
            prefix_grantors: Vec::new(),
        }
    }

    /// The same cluster with other lease timing on every node.
    fn with_lease(mut self, lease: LeaseConfig) -> RoomModel {
        for config in &mut self.configs {
            Arc::make_mut(config).lease = lease;
        }
        self
    }

    fn me(index: usize) -> NodeId {
        NodeId(index as u64 + 1)
    }

    /// Runs `input` on node `index` and carries out its `Ready` (and, with
    /// `self_sync`, those of the messages the node sends itself), catching a
    /// panic of the core as a violation.
    fn input(&self, state: &mut State, index: usize, input: Input) {
        let mut node = Node::clone(&state.nodes[index]);
        let now = node.now();
        let me = Self::me(index);
        let mut next = Some(input);
        let mut own: VecDeque<Message> = VecDeque::new();
        let mut history: Option<History> = None;
        let mut net: Option<Vec<(u64, Arc<Envelope>)>> = None;
        let mut lease_round = false;
        loop {
            let step = match next.take() {
                Some(step) => step,
                None => match own.pop_front() {
                    Some(message) => {
                        Box::new(move |r: &mut RoomReplica, now| r.step(now, me, message))
                    }
                    None => break,
                },
            };
            if let Err(panic) = catch_unwind(AssertUnwindSafe(|| step(&mut node.replica, now))) {
                let detail = panic
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| panic.downcast_ref::<&str>().map(|s| (*s).to_owned()))
                    .unwrap_or_default();
                state.violation.get_or_insert(Violation {
                    property: "NoPanic",
                    detail: detail.into(),
                });
                return;
            }
            let ready = node.replica.take_ready();
            if let Some(persist) = &ready.persist {
                let h = history.get_or_insert_with(|| History::clone(&state.history));
                if let Err(v) = h.on_persist(me, persist, &self.catalog) {
                    state.violation.get_or_insert(v);
                }
            }
            for (to, mut message) in ready.messages {
                lease_round |= to == me && matches!(message, Message::LeaseRequest { .. });
                if self.perturbation == Perturbation::DropHolders
                    && let Message::Accepted { holders, .. } = &mut message
                {
                    holders.clear();
                }
                if matches!(message, Message::Commit { .. }) && !self.listens(to) {
                    // Lost: see `listens`.
                } else if to == me && self.self_sync {
                    own.push_back(message);
                } else {
                    let net = net.get_or_insert_with(|| Vec::clone(&state.net));
                    insert(
                        net,
                        Envelope {
                            from: me,
                            to,
                            message,
                        },
                    );
                }
            }
            for (request, outcome) in &ready.replies {
                let k = request.0 as usize;
                let h = history.get_or_insert_with(|| History::clone(&state.history));
                if let Err(v) = h.on_reply(&self.proposals[k].0, outcome, &self.catalog) {
                    state.violation.get_or_insert(v);
                }
                if matches!(outcome, Outcome::Decided { .. }) {
                    state.decided |= 1 << k;
                }
            }
        }
        if let Some(h) = history {
            state.history_fingerprint = fingerprint(&h);
            state.history = Arc::new(h);
        }
        if let Some(net) = net {
            state.net = Arc::new(net);
        }
        if lease_round {
            // One request round per incarnation: stop renewing (grants
            // already given stay valid until they expire).
            node.lease_rounds += 1;
            node.replica.want_lease(now, false);
            let quiet = node.replica.take_ready();
            assert!(quiet.is_empty(), "no renewal, no timer due: {quiet:?}");
        }
        state.nodes[index] = Arc::new(Node::new(node.clock, node.replica, node.lease_rounds));
    }

    /// Whether commits sent to node `to` can matter. A commit only updates
    /// the local copy a holder reads and the proposer's fast path; for a
    /// node that neither proposes nor seeks leases in the scenario it is
    /// dead weight, so the model has the network lose it (which the network
    /// may always do) and spares the interleavings of its delivery.
    fn listens(&self, to: NodeId) -> bool {
        let index = to.0 as usize - 1;
        self.seekers.contains(&index)
            || self.proposals[self.prefix..]
                .iter()
                .any(|(_, n)| *n == index)
    }

    /// Hands a message to its addressee.
    fn deliver(&self, state: &mut State, envelope: &Envelope) {
        let index = envelope.to.0 as usize - 1;
        let Envelope { from, message, .. } = envelope.clone();
        self.input(
            state,
            index,
            Box::new(move |r, now| r.step(now, from, message)),
        );
    }

    /// Crash and restart: a fresh replica from what the node stored.
    fn restart(&self, state: &mut State, index: usize) {
        let old = &state.nodes[index];
        let config = Arc::clone(&self.configs[index]);
        let recovering_until = match self.perturbation {
            Perturbation::NoRecoveryWindow => Millis(0),
            _ => old.now().plus(config.lease.promise_ms()),
        };
        let replica = RoomReplica::new(
            config,
            old.replica.acceptor_state().clone(),
            old.replica.known().cloned(),
            recovering_until,
            (u64::from(state.crashes) + 1) << 32,
        );
        let me = Self::me(index);
        let mut net = Vec::clone(&state.net);
        net.retain(|(_, e)| !(e.from == me && e.to == me));
        state.net = Arc::new(net);
        state.nodes[index] = Arc::new(Node::new(old.clock, replica, 0));
        state.crashes += 1;
    }

    /// Every vector of per-node clock advances for one real step.
    fn rate_vectors(&self) -> Vec<Vec<u64>> {
        let mut vectors: Vec<Vec<u64>> = vec![Vec::new()];
        for _ in 0..self.configs.len() {
            vectors = vectors
                .into_iter()
                .flat_map(|v| {
                    self.rates.iter().map(move |r| {
                        let mut v = v.clone();
                        v.push(*r);
                        v
                    })
                })
                .collect();
        }
        vectors
    }
}

impl RoomModel {
    /// Delivers every message in flight of a prefix state, at once and in
    /// order, messages to self first, as a node that feeds them back at
    /// once.
    fn settle(&self, state: Option<State>) -> State {
        let mut state = state.expect("a state");
        while let Some((_, envelope)) = state
            .net
            .iter()
            .find(|(_, e)| e.from == e.to)
            .or(state.net.first())
        {
            let deliver = Action::Deliver(Arc::clone(envelope));
            state = self.next_state(&state, deliver).expect("a state");
        }
        state
    }
}

/// Adds a message to the sorted multiset. An identical copy already in
/// flight absorbs it (the network may always lose one).
fn insert(net: &mut Vec<(u64, Arc<Envelope>)>, envelope: Envelope) {
    let key = fingerprint(&envelope);
    let start = net.partition_point(|(k, _)| *k < key);
    let present = net[start..]
        .iter()
        .take_while(|(k, _)| *k == key)
        .any(|(_, e)| **e == envelope);
    if !present {
        net.insert(start, (key, Arc::new(envelope)));
    }
}

impl Model for RoomModel {
    type State = State;
    type Action = Action;

    fn init_states(&self) -> Vec<State> {
        let nodes = self
            .configs
            .iter()
            .map(|config| {
                let replica = RoomReplica::new(
                    Arc::clone(config),
                    AcceptorState::default(),
                    None,
                    Millis(0),
                    0,
                );
                Arc::new(Node::new(0, replica, 0))
            })
            .collect();
        let history = History::new(self.configs[0].majority());
        let mut state = State {
            step: 0,
            started: false,
            nodes,
            net: Arc::new(Vec::new()),
            history_fingerprint: fingerprint(&history),
            history: Arc::new(history),
            issued: 0,
            decided: 0,
            crashes: 0,
            duplicates: 0,
            violation: None,
        };
        for k in 0..self.prefix {
            state = self.settle(self.next_state(&state, Action::Propose(k)));
            assert!(
                state.decided & (1 << k) != 0,
                "the prefix commits proposal {k}"
            );
        }
        if !self.prefix_grantors.is_empty() {
            for index in &self.seekers {
                let mut asked = self
                    .next_state(&state, Action::WantLease(*index))
                    .expect("a state");
                let mut net = Vec::clone(&asked.net);
                net.retain(|(_, e)| {
                    !matches!(e.message, Message::LeaseRequest { .. })
                        || self.prefix_grantors.contains(&(e.to.0 as usize - 1))
                });
                asked.net = Arc::new(net);
                state = self.settle(Some(asked));
                assert!(
                    state.nodes[*index]
                        .replica
                        .read(state.nodes[*index].now())
                        .is_ok(),
                    "the prefix gives node {index} a lease"
                );
            }
        }
        state.started = false;
        vec![state]
    }

    fn actions(&self, state: &State, actions: &mut Vec<Action>) {
        if state.violation.is_some() {
            return;
        }
        for (_, envelope) in state.net.iter() {
            actions.push(Action::Deliver(Arc::clone(envelope)));
            if state.duplicates < self.max_duplicates {
                actions.push(Action::Duplicate(Arc::clone(envelope)));
            }
        }
        for (index, node) in state.nodes.iter().enumerate() {
            let now = node.now();
            if node.replica.next_wakeup(now).is_some_and(|t| t <= now) {
                actions.push(Action::Tick(index));
            }
        }
        for k in 0..self.proposals.len() {
            if state.issued & (1 << k) == 0 {
                actions.push(Action::Propose(k));
            }
        }
        for index in &self.seekers {
            let node = &state.nodes[*index];
            if !node.replica.lease_wanted() && node.lease_rounds == 0 {
                actions.push(Action::WantLease(*index));
            }
        }
        if state.crashes < self.max_crashes {
            actions.extend(self.crashable.iter().map(|i| Action::Crash(*i)));
        }
        if state.step < self.max_steps && state.started {
            actions.extend(self.rate_vectors().into_iter().map(Action::Advance));
        }
    }

    fn next_state(&self, last: &State, action: Action) -> Option<State> {
        let mut state = last.clone();
        state.started |= !matches!(action, Action::Advance(_));
        match action {
            Action::Deliver(envelope) => {
                let mut net = Vec::clone(&state.net);
                let at = net
                    .iter()
                    .position(|(_, e)| *e == envelope)
                    .expect("in flight");
                net.remove(at);
                state.net = Arc::new(net);
                self.deliver(&mut state, &envelope);
            }
            Action::Duplicate(envelope) => {
                state.duplicates += 1;
                self.deliver(&mut state, &envelope);
            }
            Action::Tick(index) => self.input(&mut state, index, Box::new(|r, now| r.tick(now))),
            Action::Propose(k) => {
                state.issued |= 1 << k;
                let (proposal, index) = self.proposals[k].clone();
                let request = RequestId(k as u64);
                self.input(
                    &mut state,
                    index,
                    Box::new(move |r, now| r.propose(now, request, proposal)),
                );
            }
            Action::WantLease(index) => {
                self.input(
                    &mut state,
                    index,
                    Box::new(|r, now| r.want_lease(now, true)),
                );
            }
            Action::Crash(index) => self.restart(&mut state, index),
            Action::Advance(rates) => {
                state.step += 1;
                for (node, rate) in state.nodes.iter_mut().zip(rates) {
                    Arc::make_mut(node).clock += rate;
                }
            }
        }
        Some(state)
    }

    fn properties(&self) -> Vec<Property<Self>> {
        fn holds(state: &State, property: &str) -> bool {
            state
                .violation
                .as_ref()
                .is_none_or(|v| v.property != property)
        }
        let mut properties = vec![
            Property::always(common::AGREEMENT, |_, s: &State| {
                holds(s, common::AGREEMENT)
            }),
            Property::always(common::LINEAR_HISTORY, |_, s: &State| {
                holds(s, common::LINEAR_HISTORY)
            }),
            Property::always(common::COMMITTED_CHOSEN, |_, s: &State| {
                holds(s, common::COMMITTED_CHOSEN)
            }),
            Property::always(common::ONE_VALUE_PER_BALLOT, |_, s: &State| {
                holds(s, common::ONE_VALUE_PER_BALLOT)
            }),
            Property::always("NoPanic", |_, s: &State| holds(s, "NoPanic")),
            Property::always(common::LEASE_READ_SAFETY, |_, s: &State| {
                s.nodes.iter().enumerate().all(|(index, node)| {
                    node.replica
                        .read(node.now())
                        .ok()
                        .is_none_or(|read| s.history.check_read(RoomModel::me(index), read).is_ok())
                })
            }),
            Property::sometimes("AllChangesCommitted", |m: &RoomModel, s: &State| {
                s.decided.count_ones() as usize == m.proposals.len()
            }),
        ];
        if !self.seekers.is_empty() {
            properties.push(Property::sometimes("LeaseReadServed", |_, s: &State| {
                s.nodes.iter().any(|n| n.replica.read(n.now()).is_ok())
            }));
        }
        properties
    }
}

/// What one run of the checker found.
struct Report {
    /// Property name → the path that discovered it: a counterexample for
    /// `always` properties, an example for `sometimes` ones.
    discoveries: BTreeMap<&'static str, String>,
}

impl Report {
    /// Asserts that no `always` property failed and every `sometimes`
    /// property has an example.
    fn assert_holds(&self, model_properties: &[(&'static str, bool)]) {
        for (name, always) in model_properties {
            match (self.discoveries.get(name), always) {
                (Some(path), true) => panic!("{name} violated:\n{path}"),
                (None, false) => panic!("no example of {name}: the check is vacuous"),
                _ => {}
            }
        }
    }

    /// Asserts that `property` failed, and prints the counterexample.
    fn assert_violated(&self, property: &str) {
        let path = self
            .discoveries
            .get(property)
            .unwrap_or_else(|| panic!("{property} not violated: the check cannot fail"));
        println!("counterexample for {property}:\n{path}");
    }
}

/// Explores `model` with two threads, breadth first (so counterexamples are
/// shortest), and reports what it found. With `stop_at_failure` it stops
/// at the first broken `always` property.
fn check(name: &str, model: RoomModel, stop_at_failure: bool) -> Report {
    let started = Instant::now();
    let properties: Vec<&'static str> = model.properties().iter().map(|p| p.name).collect();
    // Stateright counts the initial state as depth 1 and skips states at
    // the target depth without checking them.
    let target_depth = if model.max_actions == 0 {
        0
    } else {
        model.max_actions + 2
    };
    let checker = model
        .checker()
        .threads(2)
        .target_max_depth(target_depth)
        .finish_when(if stop_at_failure {
            HasDiscoveries::AnyFailures
        } else {
            HasDiscoveries::All
        })
        .spawn_bfs()
        .join();
    println!(
        "{name}: {} states explored ({} unique), max depth {}, {:.1?}",
        checker.state_count(),
        checker.unique_state_count(),
        checker.max_depth(),
        started.elapsed()
    );
    let discoveries = properties
        .iter()
        .filter_map(|p| checker.discovery(p).map(|path| (*p, format_path(&path))))
        .collect();
    Report { discoveries }
}

/// A path as one action per line, messages abbreviated.
fn format_path(path: &stateright::Path<State, Action>) -> String {
    let mut out = String::new();
    for action in path.clone().into_actions() {
        let line = format!("{action:?}");
        let short: String = line.chars().take(200).collect();
        let _ = writeln!(out, "  {short}");
    }
    if let Some(v) = &path.last_state().violation {
        let _ = writeln!(out, "  => {v}");
    }
    out
}

/// Checks a scenario that must hold and returns its report.
fn check_holds(name: &str, model: RoomModel) -> Report {
    let expectations: Vec<_> = model
        .properties()
        .iter()
        .map(|p| (p.name, p.expectation == stateright::Expectation::Always))
        .collect();
    let report = check(name, model, false);
    report.assert_holds(&expectations);
    report
}

// ---------------------------------------------------------------------------
// Scenarios that must hold.
// ---------------------------------------------------------------------------

fn alice() -> Change {
    Change::Add(common::handle("alice"))
}

fn bob() -> Change {
    Change::Add(common::handle("bob"))
}

/// Two proposers race for the revision after creation: node 1 on its fast
/// path, node 2 through phase 1. Messages are lost, reordered; any one node
/// may crash and restart at any point.
#[test]
fn race_of_two_proposers_with_a_crash() {
    let mut model = RoomModel::new(1, &[(Change::Create, 0), (alice(), 0), (bob(), 1)]);
    model.max_crashes = 1;
    model.crashable = vec![0, 1, 2];
    check_holds("race_of_two_proposers_with_a_crash", model);
}

/// The same race where one message, any, may be delivered twice: at once,
/// or again much later.
#[test]
fn race_of_two_proposers_with_a_duplicate() {
    let mut model = RoomModel::new(1, &[(Change::Create, 0), (alice(), 0), (bob(), 1)]);
    model.max_duplicates = 1;
    check_holds("race_of_two_proposers_with_a_duplicate", model);
}

/// One proposer whose messages to itself go through the network like any
/// other (delayed, reordered, lost when it crashes) makes three changes and
/// crashes at any point. Paths of up to 15 actions: enough for all three
/// changes to commit, and for bug B1 (fixed), found here in 14: a restarted
/// proposer reused a ballot its acceptor had not yet promised, with
/// another value.
#[test]
fn proposer_restart_with_asynchronous_messages_to_self() {
    let mut model = RoomModel::new(
        1,
        &[
            (Change::Create, 0),
            (Change::Remove(common::handle("alice")), 0),
            (bob(), 0),
            (alice(), 0),
        ],
    );
    model.self_sync = false;
    model.max_crashes = 1;
    model.crashable = vec![0];
    model.max_actions = 15;
    check_holds("proposer_restart_with_asynchronous_messages_to_self", model);
}

/// A lease holder that proposes too, and crashes: node 3 holds a lease and
/// races node 1. Paths of up to 11 actions: bug B2 (fixed) was found here
/// in 10 — a holder that answered an accept before a restart forgot that it
/// had, while the proposer still counted the answer.
#[test]
fn lease_holder_that_restarts() {
    let mut model = RoomModel::new(1, &[(Change::Create, 0), (alice(), 0), (bob(), 2)]);
    model.seekers = vec![2];
    model.max_crashes = 1;
    model.crashable = vec![2];
    model.max_actions = 11;
    check_holds("lease_holder_that_restarts", model);
}

/// A consensus read at node 2 races a change at node 1 while node 3 holds
/// a lease: a read that re-commits a value its node learned as committed
/// skips the wait for lease holders (nothing new becomes visible), one that
/// re-commits anything else waits like a change. Time stands still, so a
/// round that waits for node 3 ends only by node 3's answer; paths of up to
/// 14 actions (enough for both to commit in either order).
#[test]
fn a_read_racing_a_change_under_a_lease() {
    let mut model = RoomModel::new(1, &[(Change::Create, 0), (alice(), 0), (Change::Read, 1)]);
    model.seekers = vec![2];
    model.max_actions = 14;
    check_holds("a_read_racing_a_change_under_a_lease", model);
}

/// A lease holder and a write under clock drift: leases are requested,
/// granted, expire; the write waits for the holder or its promise; every
/// clock runs at its own rate within the bound, step by step.
fn lease_and_drift() -> RoomModel {
    let mut model = RoomModel::new(1, &[(Change::Create, 0), (alice(), 0)]);
    model.seekers = vec![2];
    model.max_steps = 2;
    model
}

#[test]
fn lease_reads_under_clock_drift() {
    check_holds("lease_reads_under_clock_drift", lease_and_drift());
}

/// A grantor crashes and restarts while a holder relies on its grant.
fn lease_and_grantor_crash() -> RoomModel {
    let mut model = RoomModel::new(1, &[(Change::Create, 0), (alice(), 0)]);
    model.seekers = vec![2];
    model.max_steps = 1;
    model.max_crashes = 1;
    model.crashable = vec![1];
    model
}

#[test]
fn lease_reads_across_a_grantor_restart() {
    check_holds(
        "lease_reads_across_a_grantor_restart",
        lease_and_grantor_crash(),
    );
}

/// Long leases under clock drift: node 3 holds a lease of 12 from every
/// grantor when the exploration starts, node 1 writes at any time, messages
/// are lost and reordered, and every clock runs fast or slow, step by step,
/// for three steps: enough for a fast holder's lease to end before a slow
/// grantor's promise and for a slow holder's lease to outlive a fast
/// grantor's uncovered promise (which the broken variants below and
/// `Drift::cover` mutants make happen).
fn long_lease_and_drift() -> RoomModel {
    let mut model =
        RoomModel::new(1, &[(Change::Create, 0), (alice(), 0)]).with_lease(long_lease());
    model.seekers = vec![2];
    model.prefix_grantors = vec![0, 1, 2];
    model.max_steps = 3;
    model
}

#[test]
fn long_lease_reads_under_clock_drift() {
    check_holds("long_lease_reads_under_clock_drift", long_lease_and_drift());
}

/// The same with a grantor that crashes and restarts: its recovery window
/// must cover the promise it forgot, drift included. The holder's lease
/// rests on grants from nodes 2 and 3 only (its request to the proposer,
/// node 1, is lost), so that node 2's forgotten promise is all that stands
/// between node 1's write and a stale read.
fn long_lease_and_grantor_crash() -> RoomModel {
    let mut model = long_lease_and_drift();
    model.prefix_grantors = vec![1, 2];
    // Two steps: a restart at the start outlives a fast clock's uncovered
    // promise (12) by the end, not a covered one (18); a third step would
    // multiply the 2-minute exploration by about six.
    model.max_steps = 2;
    model.max_crashes = 1;
    model.crashable = vec![1];
    model
}

#[test]
fn long_lease_reads_across_a_grantor_restart() {
    check_holds(
        "long_lease_reads_across_a_grantor_restart",
        long_lease_and_grantor_crash(),
    );
}

// ---------------------------------------------------------------------------
// Broken variants: the checker must find the violation.
// ---------------------------------------------------------------------------

/// (a) Clocks drift at ±40% while the configuration promises ±20%.
#[test]
fn broken_clocks_beyond_the_drift_bound_are_caught() {
    let mut model = lease_and_drift();
    model.rates = EXCESSIVE_RATES.to_vec();
    check("broken: clocks beyond the drift bound", model, true)
        .assert_violated(common::LEASE_READ_SAFETY);
}

/// (b) The holder is configured with leases twice as long as its grantors'.
/// Its requests say so, and the grantors refuse them: no property breaks,
/// and no local read is ever served. (Before requests carried their length,
/// this scenario read a stale room.)
#[test]
fn inconsistent_lease_configs_are_refused() {
    let mut model = lease_and_drift();
    let mut holder = ReplicaConfig::clone(&model.configs[2]);
    holder.lease.lease_ms *= 2;
    model.configs[2] = Arc::new(holder);
    let report = check("holder's lease longer than grantors'", model, false);
    let always: Vec<_> = report
        .discoveries
        .keys()
        .filter(|p| !["AllChangesCommitted", "LeaseReadServed"].contains(p))
        .collect();
    assert!(
        always.is_empty(),
        "violated: {always:?}\n{:?}",
        report.discoveries
    );
    assert!(
        !report.discoveries.contains_key("LeaseReadServed"),
        "a read was served on refused grants"
    );
}

/// (c) A restarted grantor forgets its promises at once.
#[test]
fn broken_restart_without_recovery_window_is_caught() {
    let mut model = lease_and_grantor_crash();
    model.perturbation = Perturbation::NoRecoveryWindow;
    check("broken: restart without recovery window", model, true)
        .assert_violated(common::LEASE_READ_SAFETY);
}

/// (d) The network strips the holders list from `Accepted`: a write that
/// skips the lease holders' acknowledgement.
#[test]
fn broken_write_skipping_holder_acknowledgement_is_caught() {
    let mut model = lease_and_drift();
    model.perturbation = Perturbation::DropHolders;
    check("broken: accepted without holders", model, true)
        .assert_violated(common::LEASE_READ_SAFETY);
}

/// Bug B3 (fixed): a lease holder's request sequence numbers restarted at
/// zero with the process, so a grant that answered the previous
/// incarnation's request was taken as an answer to the new one: the lease
/// was counted from the new request although the grantor's promise started
/// at the old one (and the grant's accepted revision was just as old), and
/// the holder read a stale room. This scenario found it in 13 actions; each
/// incarnation now numbers its requests from its own base.
#[test]
fn stale_lease_grants_after_a_restart_are_ignored() {
    let mut model = RoomModel::new(1, &[(Change::Create, 0), (alice(), 0), (bob(), 0)]);
    model.seekers = vec![2];
    model.max_steps = 1;
    model.rates = vec![6];
    model.max_crashes = 1;
    model.crashable = vec![2];
    model.max_actions = 13;
    check_holds("stale_lease_grants_after_a_restart_are_ignored", model);
}

/// (a) with long leases: clocks at ±40%, twice the configured bound.
#[test]
fn broken_long_leases_beyond_the_drift_bound_are_caught() {
    let mut model = long_lease_and_drift();
    model.rates = EXCESSIVE_RATES.to_vec();
    check("broken: long leases, clocks beyond the bound", model, true)
        .assert_violated(common::LEASE_READ_SAFETY);
}

/// (c) with long leases: a restarted grantor forgets its promises at once.
#[test]
fn broken_long_leases_restart_without_recovery_window_is_caught() {
    let mut model = long_lease_and_grantor_crash();
    model.perturbation = Perturbation::NoRecoveryWindow;
    check("broken: long leases, no recovery window", model, true)
        .assert_violated(common::LEASE_READ_SAFETY);
}
