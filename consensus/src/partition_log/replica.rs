//! One partition's log on one node: acceptor and leadership behind one
//! interface, emitting a [`LogReady`].
//!
//! # Ordering contract
//!
//! The node performs a [`LogReady`] in this order: make `write` durable
//! (fdatasync), then send `messages`, then apply `committed` to the
//! timeline and acknowledge the posts in it. The local acceptor's promise
//! and entries are applied inside the step that causes them, never through
//! a message to itself, so a candidate's own promise and a leader's own
//! write are on disk before any Prepare or Accept of theirs leaves.

use std::collections::{BTreeMap, BTreeSet};

use super::acceptor::{LogAcceptor, LogWrite};
use super::home_lease::{LeaseGrantor, LeaseHolder};
use super::{Entry, LogMessage, RECOVERY_SLOTS_MAX, Slot, Term, Value};
use crate::config::LeaseConfig;
use crate::ids::NodeId;
use crate::time::Millis;

/// The replicas of a partition and the guards of the protocol.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LogConfig {
    /// This node.
    pub me: NodeId,
    /// Every voting replica, sorted: they elect leaders, and a slot
    /// commits once a majority of them stored it.
    pub replicas: Vec<NodeId>,
    /// Replicas that only follow, sorted, none of them a voter: they store
    /// every slot durably and release the committed prefix like a voter,
    /// but never campaign, are never asked for a promise, and count in no
    /// quorum. The replicas of a partition in datacenters other than its
    /// home are its learners, so a post commits on a quorum in the home
    /// datacenter alone while every other datacenter still receives the
    /// partition's slots in order (see [`LogReplica::stored_by`]).
    pub learners: Vec<NodeId>,
    /// The map epoch of this replica set: this node campaigns only in it,
    /// and answers writes and elections of no other (see [`Term`]).
    pub epoch: u64,
    /// Most values one Accept carries.
    pub batch_max: usize,
    /// Set in an epoch that a home failover created, until the cluster
    /// map records that a leader established it: its elections read
    /// learners too ([`Failover`]).
    pub failover: Option<Failover>,
    /// The home lease's timing. When set, a leader releases slots only
    /// while it holds grants from a majority of all the replicas, voters
    /// and learners ([`super::home_lease`]), and a replica answers a
    /// failover epoch's Prepare only once the grants it gave ran out. The
    /// node calls [`LogReplica::tick`] with a fresh reading of its clock
    /// before every input while it is set.
    pub home_lease: Option<LeaseConfig>,
    /// Guards a broken test variant may turn off to show what they
    /// protect; `Checks::default()` is the protocol.
    #[doc(hidden)]
    pub checks: Checks,
}

/// What an election of a failover epoch needs (`specs/HomeFailover.tla`,
/// `WIDE_RECOVERY`): promises from a majority of all the partition's
/// replicas and from a majority of each group, one group per datacenter
/// other than the lost home (the new home's voters are one of them). A
/// post acknowledged at the cross-datacenter level is stored, with every
/// slot before it, on a majority of some other datacenter, which this
/// meets; the majority of all meets every home lease's.
///
/// The candidate recovers the highest-term entry of each slot and cuts the
/// log at the first slot no promiser has, rather than filling holes with
/// no-ops: the old home released a post after a hole after a post the new
/// home does not have, and keeping it would give it another place.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Failover {
    /// The replicas of each datacenter but the lost home.
    pub groups: Vec<Vec<NodeId>>,
}

/// The protocol's guards (all on outside of tests).
#[doc(hidden)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Checks {
    /// Replicas refuse writes of a term below their promise.
    pub fencing: bool,
    /// A new leader adopts the highest-term entries of a quorum.
    pub tail_read: bool,
    /// A replica answers a failover epoch's Prepare (and runs in one)
    /// only once the home-lease grants it gave ran out.
    pub lease_wait: bool,
    /// A failover epoch's elections read a majority of all the replicas
    /// and of every group, not only of the voters.
    pub wide_recovery: bool,
    /// A failover leader vouches for its promisers' timelines only when
    /// every promise (its own too) says [`LogReplica::untouched`].
    pub untouched_only: bool,
    /// A failover candidate leads only if its released prefix agrees with
    /// what leaders of the epoch wrote below the slot it asked from
    /// (`LogReplica::conflicts_in_epoch`).
    pub epoch_below: bool,
    /// A held replica reports as released no more of what it released
    /// before it was held than the leader's log shares with it
    /// (`LogMessage::Accept::shared`), plus what it holds in the
    /// leader's term (`LogReplica::reported`), and acknowledges no slot
    /// beyond that which its compaction floor covers
    /// (`LogReplica::acknowledged`).
    pub held_report: bool,
}

impl Default for Checks {
    fn default() -> Checks {
        Checks {
            fencing: true,
            tail_read: true,
            lease_wait: true,
            wide_recovery: true,
            untouched_only: true,
            epoch_below: true,
            held_report: true,
        }
    }
}

impl LogConfig {
    /// A configuration of epoch 0 with the default batch size and every
    /// guard on.
    pub fn new(me: NodeId, mut replicas: Vec<NodeId>) -> LogConfig {
        replicas.sort_unstable();
        replicas.dedup();
        assert!(replicas.contains(&me), "{me} is one of the replicas");
        LogConfig {
            me,
            replicas,
            learners: Vec::new(),
            epoch: 0,
            batch_max: 256,
            failover: None,
            home_lease: None,
            checks: Checks::default(),
        }
    }

    /// The same configuration in `epoch`.
    #[must_use]
    pub fn in_epoch(mut self, epoch: u64) -> LogConfig {
        self.epoch = epoch;
        self
    }

    /// A configuration whose voters are `voters` and whose learners are
    /// `learners` (a node in both votes); `me` is one of either.
    pub fn with_learners(me: NodeId, voters: Vec<NodeId>, mut learners: Vec<NodeId>) -> LogConfig {
        let mut voters = voters;
        voters.sort_unstable();
        voters.dedup();
        learners.sort_unstable();
        learners.dedup();
        learners.retain(|n| !voters.contains(n));
        assert!(
            voters.contains(&me) || learners.contains(&me),
            "{me} is one of the replicas"
        );
        assert!(!voters.is_empty(), "a partition has voters");
        LogConfig {
            me,
            replicas: voters,
            learners,
            epoch: 0,
            batch_max: 256,
            failover: None,
            home_lease: None,
            checks: Checks::default(),
        }
    }

    /// Whether this node only follows.
    pub fn is_learner(&self) -> bool {
        self.learners.contains(&self.me)
    }

    fn majority(&self) -> usize {
        self.replicas.len() / 2 + 1
    }

    /// Every replica, voters and learners, sorted: whose grants make a
    /// home lease.
    pub fn all(&self) -> Vec<NodeId> {
        let mut all: Vec<NodeId> = self
            .replicas
            .iter()
            .chain(&self.learners)
            .copied()
            .collect();
        all.sort_unstable();
        all
    }

    /// Whether promises from `promisers` elect a candidate: a majority of
    /// the voters, and in a failover epoch also a majority of all the
    /// replicas and of each of [`Failover::groups`].
    pub fn elected_by(&self, promisers: &BTreeSet<NodeId>) -> bool {
        let majority_of =
            |set: &[NodeId]| 2 * set.iter().filter(|n| promisers.contains(n)).count() > set.len();
        let wide = |f: &Failover| {
            !self.checks.wide_recovery
                || (majority_of(&self.all()) && f.groups.iter().all(|g| majority_of(g)))
        };
        majority_of(&self.replicas) && self.failover.as_ref().is_none_or(wide)
    }

    fn is_voter(&self, node: NodeId) -> bool {
        self.replicas.contains(&node)
    }

    fn knows(&self, node: NodeId) -> bool {
        self.replicas.contains(&node) || self.learners.contains(&node)
    }
}

/// A slot released in order: committed, to apply and acknowledge.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Committed<T> {
    /// Its slot.
    pub slot: Slot,
    /// Its value.
    pub value: Value<T>,
}

/// What the node must do after an input, in order (see the module docs).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LogReady<T> {
    /// Make durable first.
    pub write: Option<LogWrite<T>>,
    /// Then send.
    pub messages: Vec<(NodeId, LogMessage<T>)>,
    /// Then apply and acknowledge, in slot order.
    pub committed: Vec<Committed<T>>,
    /// This node became leader in this term (after recovery was sent).
    pub leading: Option<Term>,
    /// Replicas that miss entries compacted away, and the slot up to which
    /// they need the timeline copied (a snapshot) before the log can catch
    /// them up. This node itself when it ran for leader behind a promiser's
    /// floor or was told so by its leader ([`LogMessage::Compacted`]): the
    /// node then copies the timeline from a replica that applied at least
    /// that far and calls [`LogReplica::install`].
    pub lagging: Vec<(NodeId, Slot)>,
    /// This held follower reports to its leader less than the leader's
    /// compaction floor without being behind that floor itself: the
    /// leader can resend nothing of what the replica does not report, and
    /// a copy from after its released prefix would count for nothing.
    /// The node then makes its whole timeline the leader's (cutting what
    /// differs, copying the rest, up to at least the slot given) and calls
    /// [`LogReplica::realigned`].
    pub realign: Option<(NodeId, Slot)>,
    /// A replica spoke in an epoch later than this node's configuration:
    /// the node's copy of the cluster map is behind (the highest such
    /// epoch). The replica refused what it could not check and will not
    /// campaign until [`LogReplica::reconfigure`] brings it there.
    pub newer_epoch: Option<u64>,
}

impl<T> Default for LogReady<T> {
    fn default() -> Self {
        LogReady {
            write: None,
            messages: Vec::new(),
            committed: Vec::new(),
            leading: None,
            lagging: Vec::new(),
            realign: None,
            newer_epoch: None,
        }
    }
}

impl<T> LogReady<T> {
    /// Whether there is nothing to do.
    pub fn is_empty(&self) -> bool {
        self.write.is_none()
            && self.messages.is_empty()
            && self.committed.is_empty()
            && self.leading.is_none()
            && self.lagging.is_empty()
            && self.realign.is_none()
            && self.newer_epoch.is_none()
    }
}

/// An append refused because this node does not lead.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("not the leader of this partition (last known leader: {leader:?})")]
pub struct NotLeader {
    /// The node that led the newest term this node has seen, if any.
    pub leader: Option<NodeId>,
}

/// A promiser's compaction floor, its entries from the asked slot, and
/// what it said it released untouched ([`LogReplica::untouched`]).
type Promised<T> = (Slot, Vec<(Slot, Entry<T>)>, Option<Slot>);

#[derive(Clone, Debug, PartialEq, Eq)]
enum Role<T> {
    Follower,
    Candidate {
        term: Term,
        from: Slot,
        /// Each promiser's compaction floor and entries.
        promises: BTreeMap<NodeId, Promised<T>>,
    },
    Leader {
        term: Term,
        next: Slot,
        /// Uncommitted slots of this term: value and who stored it
        /// (voters and learners; only voters count towards a commit).
        pending: BTreeMap<Slot, (Value<T>, BTreeSet<NodeId>)>,
        /// The last slot this leader recovered at its election (or its
        /// released prefix then): the log as the sets before this epoch
        /// left it.
        recovered_to: Slot,
        /// Other replicas that reported, in this term, a released prefix
        /// reaching `recovered_to` (voters and learners; only voters count
        /// towards [`LogReplica::established`]).
        caught_up: BTreeSet<NodeId>,
        /// Each learner's durable prefix as reported in this term: every
        /// slot up to it is stored there.
        stored: BTreeMap<NodeId, Slot>,
        /// The home lease's grants in this term (unused without
        /// [`LogConfig::home_lease`]).
        lease: LeaseHolder,
        /// In a failover epoch, the other promisers whose timelines this
        /// election showed to be a prefix of the recovered log, and the
        /// prefix each had released ([`LogReplica::vouched`]).
        vouched: Vec<(NodeId, Slot)>,
        /// How much of a held replica's earlier released prefix this
        /// leader's log shares (`LogReplica::shared_at_election`).
        shared: Slot,
    },
}

/// One partition's log on one node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LogReplica<T> {
    config: LogConfig,
    acceptor: LogAcceptor<T>,
    role: Role<T>,
    /// The highest term seen in any message, and its node.
    highest: Term,
    /// Everything up to here was released as committed, in order.
    released: Slot,
    /// The highest commit point a leader's Accept (that this node took)
    /// carried since the replica was built; `None` before the first. Not
    /// kept across restarts: a replica that restarted knows nothing of
    /// what was committed while it was down until a leader tells it.
    heard: Option<Slot>,
    /// The latest reading of the node's clock ([`LogReplica::tick`]).
    now: Millis,
    /// The home-lease grants this replica gave.
    grantor: LeaseGrantor,
    /// Prepares of a failover epoch held back until the grants this
    /// replica gave ran out: candidate, term and asked slot.
    deferred: Vec<(NodeId, Term, Slot)>,
    /// On a held follower ([`LogReplica::hold`]), the failover epoch
    /// whose check it owes first; `None` when not held.
    owed: Option<u64>,
    /// On a held follower, what it would have released: the committed
    /// slots it holds in the term that committed them.
    held_through: Slot,
    /// Whether an Accept wrote, while this replica was held, over a slot
    /// it had released another value than its log held there (or where
    /// it had compacted):
    /// its timeline may then hold another value than its log, so it may
    /// not lead a failover epoch before it checked (see
    /// `LogReplica::conflicts_in_epoch`). Cleared by
    /// [`LogReplica::rewind`].
    clobbered: bool,
    /// What was released when this replica was restored: an entry of a
    /// later epoch at one of those slots came before this process, so
    /// whether it equals what was released there is not known.
    restored: Slot,
    /// The failover epoch this replica may not lead before it checked
    /// its timeline (`LogReplica::conflicts_in_epoch`).
    barred: Option<u64>,
    /// The term of the newest Accept this replica stored, and how much of
    /// its earlier released prefix that leader's log shares with it
    /// (`LogMessage::Accept::shared`).
    shared: Option<(Term, Slot)>,
    /// While held, the first slot a copy it installed brought (the copy
    /// may hold what a leader of the epoch wrote); `None` when it
    /// installed none since it was held.
    installed_held: Option<Slot>,
    /// While held, whose timelines the copies it installed hold.
    copies: HeldCopies,
    ready: LogReady<T>,
}

/// Whose timelines the copies a held replica installed hold
/// ([`LogReplica::install_copy`]), each as one run of slots (first,
/// last). The copies are in the node's store, so the node keeps this with
/// the log's state ([`LogReplica::held_copies_restored`]): a held voter
/// restarted after its copy would otherwise count nothing of it, and a new
/// home of two voters where it had to copy would not establish (see
/// `install_copy`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HeldCopies {
    /// Copied from the leader of the term named: its timeline holds that
    /// leader's there.
    pub from_leader: Option<(Term, Slot, Slot)>,
    /// Copied from one replica: as a leader, it shares them with that
    /// replica.
    pub from: Option<(NodeId, Slot, Slot)>,
}

/// At most this many entries of a failover epoch below the asked slot
/// travel with a promise (see `LogReplica::conflicts_in_epoch`); a
/// candidate that gets as many cannot see them all and does not lead.
pub const EPOCH_ENTRIES_BELOW_MAX: usize = 4_096;

impl<T: Clone + PartialEq> LogReplica<T> {
    /// A replica restored from its durable acceptor state; `released` is
    /// what the node had applied to its timeline (at most the committed
    /// prefix).
    pub fn new(config: LogConfig, acceptor: LogAcceptor<T>, released: Slot) -> Self {
        let highest = acceptor.promised();
        LogReplica {
            config,
            acceptor,
            role: Role::Follower,
            highest,
            released,
            heard: None,
            now: Millis::default(),
            grantor: LeaseGrantor::default(),
            deferred: Vec::new(),
            owed: None,
            held_through: Slot(0),
            clobbered: false,
            restored: released,
            barred: None,
            shared: None,
            installed_held: None,
            copies: HeldCopies::default(),
            ready: LogReady::default(),
        }
    }

    /// A reading of the node's clock: renews the home lease when a renewal
    /// is due, releases what a renewed lease allows, and answers the
    /// failover Prepares held back once this replica's grants ran out.
    /// With [`LogConfig::home_lease`] set, the node calls this with a
    /// fresh reading before every input (a message, an append), so that
    /// grants and releases are timed by a clock read after the input
    /// arrived; readings never go back.
    pub fn tick(&mut self, now: Millis) {
        self.now = self.now.max(now);
        let Some(lease) = self.config.home_lease else {
            return;
        };
        self.grantor.start(&lease, self.now);
        self.renew_lease();
        self.release_as_leader();
        if !self.deferred.is_empty() && !self.grantor.promising(self.now) {
            for (from, term, slot) in std::mem::take(&mut self.deferred) {
                self.step(from, LogMessage::Prepare { term, from: slot });
            }
        }
    }

    /// On a leader, asks every other replica for a home lease when a
    /// renewal is due, granting its own at once.
    fn renew_lease(&mut self) {
        let Some(lease) = self.config.home_lease else {
            return;
        };
        let me = self.config.me;
        let Role::Leader {
            term,
            lease: holder,
            ..
        } = &mut self.role
        else {
            return;
        };
        let Some(seq) = holder.due(&lease, me, self.now) else {
            return;
        };
        let term = *term;
        self.grantor.grant(&lease, self.now);
        for to in self.others() {
            self.ready
                .messages
                .push((to, LogMessage::LeaseRequest { term, seq }));
        }
    }

    /// Whether home-lease grants this replica gave may still bind it in a
    /// failover epoch (`LEASE_WAIT`): it neither runs nor promises then.
    fn bound_by_grants(&self) -> bool {
        self.config.failover.is_some()
            && self.config.home_lease.is_some()
            && self.config.checks.lease_wait
            && self.grantor.promising(self.now)
    }

    /// Until when this leader holds its home lease, if it does now
    /// (`None` also when it does not lead, or when the configuration has
    /// no home lease).
    pub fn home_lease_until(&self) -> Option<Millis> {
        self.config.home_lease?;
        match &self.role {
            Role::Leader { lease, .. } => lease.holds_until(&self.config.all(), self.now),
            _ => None,
        }
    }

    /// When [`LogReplica::tick`] has something to do next: the home
    /// lease's renewal on a leader, the end of this replica's grants while
    /// a Prepare waits for it.
    pub fn next_tick(&self) -> Option<Millis> {
        let lease = self.config.home_lease?;
        let renewal = match &self.role {
            Role::Leader { lease: holder, .. } => Some(holder.next_request(&lease)),
            _ => None,
        };
        let deferred = if self.deferred.is_empty() {
            None
        } else {
            self.grantor.until()
        };
        renewal.into_iter().chain(deferred).min()
    }

    /// Takes what the node must do now.
    pub fn take_ready(&mut self) -> LogReady<T> {
        std::mem::take(&mut self.ready)
    }

    /// The durable acceptor state.
    pub fn acceptor(&self) -> &LogAcceptor<T> {
        &self.acceptor
    }

    /// The committed prefix released so far.
    pub fn released(&self) -> Slot {
        self.released
    }

    /// Whether this replica has released everything it knows to be
    /// committed: a leader always; a follower once a leader's Accept
    /// reached it since it started and it released up to the newest
    /// commit point it heard. A follower that answers reads from its own
    /// copy (a learner serving history in its datacenter) asks this
    /// first: false means its copy misses slots it has heard committed,
    /// or it cannot tell.
    ///
    /// It says nothing about slots committed since the last Accept
    /// arrived: a follower cut off from its leader stays "caught up" with
    /// what it last heard.
    pub fn caught_up_with_heard(&self) -> bool {
        match self.role {
            Role::Leader { .. } => true,
            _ => self.heard.is_some_and(|heard| self.released >= heard),
        }
    }

    /// The term this node leads, if it leads.
    pub fn leading(&self) -> Option<Term> {
        match self.role {
            Role::Leader { term, .. } => Some(term),
            _ => None,
        }
    }

    /// The term this node leads if it *established* its epoch: it was
    /// elected by a quorum of its epoch's set (so no earlier epoch can
    /// elect or commit again there) and a quorum of that set, itself
    /// included, has released everything it recovered (so every slot the
    /// sets before chose is durable, in the log or applied, on a quorum
    /// of this set, which meets every quorum of the next set). The map
    /// takes a partition's next move step only after this
    /// (`specs/PartitionMove.tla`, `ESTABLISH_BEFORE_SHRINK`).
    pub fn established(&self) -> Option<Term> {
        let Role::Leader {
            term,
            recovered_to,
            caught_up,
            ..
        } = &self.role
        else {
            return None;
        };
        // `caught_up` holds replicas of this configuration only: answers
        // come from its replicas, and `reconfigure` ends this leadership.
        let voters = caught_up
            .iter()
            .filter(|n| self.config.is_voter(**n))
            .count();
        (self.released >= *recovered_to && voters + 1 >= self.config.majority()).then_some(*term)
    }

    /// Whether `node` holds everything this leader recovered at its
    /// election: it reported, in this term, a released prefix (applied, or
    /// copied and installed) reaching the recovered slots; the leader
    /// itself once it released them. `false` on a node that does not
    /// lead.
    ///
    /// The map waits for this of the node a grow added before it counts
    /// the grow established, so that the shrink after it never leaves the
    /// partition's earlier posts on fewer replicas than it had: a quorum
    /// holding them (what [`LogReplica::established`] asks) keeps them
    /// safe, this keeps them as redundant as before the move.
    pub fn has_caught_up(&self, node: NodeId) -> bool {
        let Role::Leader {
            recovered_to,
            caught_up,
            ..
        } = &self.role
        else {
            return false;
        };
        if node == self.config.me {
            self.released >= *recovered_to
        } else {
            caught_up.contains(&node)
        }
    }

    /// On a leader, the highest slot that at least `count` of `nodes`
    /// (learners of this configuration) reported durably stored, with
    /// every slot before it, in this term; [`Slot::default`] when fewer
    /// than `count` reported or this node does not lead. The node holds a
    /// post's acknowledgement for this when the post asks to be durable in
    /// another datacenter as well: `nodes` are that datacenter's replicas
    /// and `count` their majority, so any leader later elected among them
    /// recovers the post.
    pub fn stored_by(&self, nodes: &[NodeId], count: usize) -> Slot {
        let Role::Leader { stored, .. } = &self.role else {
            return Slot::default();
        };
        if count == 0 {
            return self.released;
        }
        let mut marks: Vec<Slot> = nodes
            .iter()
            .filter_map(|n| stored.get(n).copied())
            .collect();
        marks.sort_unstable_by(|a, b| b.cmp(a));
        marks.get(count - 1).copied().unwrap_or_default()
    }

    /// On a leader, each learner's reported durable prefix in this term
    /// (learners that have not reported are absent).
    pub fn learner_marks(&self) -> Vec<(NodeId, Slot)> {
        match &self.role {
            Role::Leader { stored, .. } => stored.iter().map(|(n, s)| (*n, *s)).collect(),
            _ => Vec::new(),
        }
    }

    /// The node that ran for the newest term seen (possibly this one).
    pub fn leader_hint(&self) -> Option<NodeId> {
        // Round 0 is no candidate's: ZERO, or an epoch's floor a refusal
        // carried.
        (self.highest.round > 0).then_some(self.highest.node)
    }

    /// The configuration.
    pub fn config(&self) -> &LogConfig {
        &self.config
    }

    /// Runs for leadership in a term of its configuration's epoch above
    /// every term seen, promising it locally first. `None` when the rounds
    /// are exhausted, when a term of a later epoch was seen (this node
    /// must learn that epoch's replica set first), or, in a failover epoch,
    /// while home-lease grants this node gave may still bind it.
    pub fn campaign(&mut self) -> Option<Term> {
        if self.config.is_learner() || self.is_barred() {
            return None;
        }
        if self.bound_by_grants() {
            // LEASE_WAIT holds for a candidate's own promise too: the old
            // home's leader may still count a grant of this node.
            return None;
        }
        let epoch = self.config.epoch;
        let promised = self.acceptor.promised();
        if self.highest.epoch > epoch || promised.epoch > epoch {
            return None;
        }
        // Rounds rise across epochs too, so a candidate of a new epoch also
        // outbids, round for round, replicas that compare rounds alone
        // (nodes of a version before epochs, in a rolling upgrade).
        let round = self.highest.round.max(promised.round) + 1;
        if round > Term::ROUND_MAX {
            return None;
        }
        let term = Term {
            epoch,
            round,
            node: self.config.me,
        };
        let from = self.released.next();
        let untouched = self.untouched();
        let (reply, write) = self.acceptor.on_prepare(term, from);
        self.merge_write(write);
        self.highest = term;
        let LogMessage::Promise { floor, entries, .. } = reply else {
            unreachable!("a term above the promise is promised");
        };
        self.role = Role::Candidate {
            term,
            from,
            promises: BTreeMap::from([(self.config.me, (floor, entries, untouched))]),
        };
        // A failover epoch's election reads the learners too.
        let targets = if self.config.failover.is_some() {
            self.others()
        } else {
            self.other_voters()
        };
        for to in targets {
            self.ready
                .messages
                .push((to, LogMessage::Prepare { term, from }));
        }
        self.try_lead();
        Some(term)
    }

    /// Appends values at the next free slots; returns the first slot.
    ///
    /// # Errors
    /// [`NotLeader`] unless this node leads.
    pub fn append(&mut self, values: Vec<Value<T>>) -> Result<Slot, NotLeader> {
        let Role::Leader { next, .. } = &self.role else {
            return Err(NotLeader {
                leader: self.leader_hint(),
            });
        };
        let first = *next;
        self.write_as_leader(first, values);
        Ok(first)
    }

    /// Sends every uncommitted slot again to the replicas that have not
    /// stored it, and to the others an empty Accept that carries the
    /// commit point (the node calls this on a timer: messages may be lost,
    /// and a quiet partition's followers would otherwise never learn that
    /// its last slots committed).
    pub fn resend(&mut self) {
        let Role::Leader {
            term,
            pending,
            next,
            shared,
            ..
        } = &self.role
        else {
            return;
        };
        let (next, term, shared) = (*next, *term, *shared);
        let commit = self.released;
        let mut sends = Vec::new();
        for to in self.others() {
            let shared = self.shared_for(shared, to);
            let missing: Vec<(Slot, Value<T>)> = pending
                .iter()
                .filter(|(_, (_, acks))| !acks.contains(&to))
                .map(|(s, (v, _))| (*s, v.clone()))
                .collect();
            if missing.is_empty() {
                sends.push((
                    to,
                    LogMessage::Accept {
                        term,
                        first: next,
                        values: Vec::new(),
                        commit,
                        shared,
                    },
                ));
            } else {
                sends.extend(accepts(
                    to,
                    (term, commit, shared),
                    missing,
                    self.config.batch_max,
                ));
            }
        }
        self.ready.messages.extend(sends);
    }

    /// A learner that needs a leader (a client is waiting) tells the
    /// voters it is there and what it released: an empty `Accepted` in
    /// the newest term it saw. A leader of that term takes it as any
    /// follower's report (and resends what the learner lacks); any other
    /// voter ignores it, but the node's driver takes it as a reason to
    /// make the partition live, so that its voters elect a leader. Does
    /// nothing on a voter, which campaigns itself.
    pub fn nudge(&mut self) {
        if !self.config.is_learner() {
            return;
        }
        let message = LogMessage::Accepted {
            term: self.highest,
            first: self.released.next(),
            count: 0,
            released: self.reported(),
        };
        for to in self.config.replicas.clone() {
            self.ready.messages.push((to, message.clone()));
        }
    }

    /// Stops leading (or running): the node calls this when it has not
    /// heard from a quorum for a while, so that clients stop waiting on a
    /// leader that cannot commit. Always safe: a follower only votes.
    pub fn step_down(&mut self) {
        self.role = Role::Follower;
    }

    /// Drops log entries the node has applied to its timeline.
    pub fn compact(&mut self, upto: Slot) {
        self.acceptor.compact(upto.min(self.released));
    }

    /// The node copied the partition's timeline from a replica that had
    /// applied every slot up to `upto` (so they are committed): this
    /// replica counts them as released and drops its own entries up to
    /// there, which the copy supersedes. Returns whether anything moved
    /// (`upto` beyond what was released). Only a follower installs: a
    /// candidate or leader never lags behind its own log.
    ///
    /// Dropping entries is safe for the same reason as compaction: the
    /// slots are committed, and a candidate that has not released them
    /// finds this replica's floor above its start and catches up the same
    /// way instead of recovering them from promises.
    pub fn install(&mut self, upto: Slot) -> bool {
        if upto <= self.released || !matches!(self.role, Role::Follower) {
            return false;
        }
        if self.owed.is_some() {
            let first = self.released.next();
            self.installed_held = Some(self.installed_held.map_or(first, |s| s.min(first)));
        }
        self.released = upto;
        self.acceptor.compact(upto);
        true
    }

    /// [`LogReplica::install`] of a copy from `source`, begun when `term`
    /// was the newest term this replica knew (the node asks
    /// [`LogReplica::newest_term`] as it starts the copy).
    ///
    /// A held replica's copy holds the source's timeline from the slot
    /// after its released prefix up to `upto`, which a held replica may
    /// count as shared with the source, where the prefix before it is
    /// shared too (`LogMessage::Accept::shared` reaches that far):
    /// - as a follower, when the source leads `term` and `term` is still
    ///   the newest it knows (a candidate or leader of the newest term
    ///   neither rewinds nor takes a check's copy meanwhile, so its
    ///   timeline there is the one it leads with): it reports the copy as
    ///   released (`LogReplica::reported`);
    /// - as a leader later (the copy let it run), towards the source: it
    ///   tells the source that its log shares the copy (`shared_for`).
    ///
    /// Without either, a new home of two voters where one had to copy
    /// past the other's compacted prefix (or copied from the leader past
    /// the floor its leader's own copy had put) never established: the
    /// replica reported less than the leader's floor, the leader could
    /// resend nothing below its floor, and the replica, its released
    /// prefix not behind that floor, copied nothing more (the chaos
    /// campaign, `SEED=7009`).
    pub fn install_copy(&mut self, upto: Slot, source: NodeId, term: Term) -> bool {
        let first = self.released.next();
        if !self.install(upto) {
            return false;
        }
        if self.owed.is_none() {
            return true;
        }
        if source == term.node && term == self.highest {
            self.copies.from_leader = Some(extend_run(self.copies.from_leader, term, first, upto));
        }
        self.copies.from = Some(extend_run(self.copies.from, source, first, upto));
        true
    }

    /// The newest term this replica has seen: its leader (`Term::node`)
    /// is whom a copy should come from for [`LogReplica::install_copy`].
    pub fn newest_term(&self) -> Term {
        self.highest
    }

    /// While held (`owed` is the failover epoch whose check this replica
    /// owes first), it releases nothing as a follower; it still stores,
    /// answers and votes. The node holds a replica whose timeline may
    /// carry a divergent tail (slots an old home released that a home
    /// failover replaced) until it checked it against the new home's, so
    /// that it applies no later slot on top of that tail; `None` lifts the
    /// hold.
    ///
    /// A held follower reports as released what it holds of the leader's
    /// log (`LogReplica::reported`), which is what a leader counts it
    /// caught up for ([`LogReplica::established`] needs a quorum of voters
    /// holding what it recovered, and the new home of a failover may have
    /// no voter to spare) and storing for the cross-datacenter level; the
    /// node compacts nothing of a held log, and after
    /// [`LogReplica::rewind`] it reports what it released again.
    pub fn hold(&mut self, owed: Option<u64>) {
        self.owed = owed;
        self.held_through = Slot(0);
        self.installed_held = None;
        self.copies = HeldCopies::default();
    }

    /// What this replica tells a leader it released: on a held replica,
    /// what it holds of that leader's log. Of what it released before it
    /// was held, that is no more than the leader says its log shares
    /// (`LogMessage::Accept::shared`: the slots before the first that a
    /// leader of the failover epoch may have written; past it, this
    /// replica may have released a post of the old home's loss window
    /// that the epoch replaced), and nothing when it owes an earlier
    /// epoch's check or has not heard the leader of the newest term; on
    /// from there, the committed slots it holds in the term that
    /// committed them (`held_through`), or a copy it installed from that
    /// leader right after what the leader shares
    /// ([`LogReplica::install_copy`]). The leader resends the rest in
    /// its term, and counts the replica once it stored it. A broken
    /// variant (`Checks::held_report` off) reports its whole released
    /// prefix.
    fn reported(&self) -> Slot {
        let Some(owed) = self.owed else {
            return self.released;
        };
        if !self.config.checks.held_report {
            return self.released.max(self.held_through);
        }
        if owed != self.config.epoch {
            return self.held_through;
        }
        let shared = match self.shared {
            Some((term, shared)) if term == self.highest => self.released.min(shared),
            _ => Slot(0),
        };
        let copied = match self.copies.from_leader {
            Some((term, first, last)) if term == self.highest && shared.next() >= first => {
                self.released.min(last)
            }
            _ => Slot(0),
        };
        shared.max(copied).max(self.held_through)
    }

    /// Of an Accept of `count` slots from `first` that the acceptor took,
    /// the run this replica acknowledges as stored.
    ///
    /// An acceptor skips a slot at or below its compaction floor: the
    /// slot is committed and applied, so the leader's resend is no news.
    /// On a held replica it may be: it compacted what it released before
    /// it was held, and past what it reports (`LogReplica::reported`)
    /// that may be a post of the old home's loss window where the epoch
    /// chose another. Acknowledging the slot would let the leader count
    /// it as stored (towards a commit, for a voter; for the
    /// cross-datacenter level, for a learner) on a replica whose timeline
    /// holds another post there. So a held replica acknowledges only the
    /// slots after its floor, and counts for the others once it checked.
    /// When nothing is left it acknowledges nothing from `first`, so that
    /// the leader resends no slot before `first` again for it (a leader
    /// resends what a replica reports missing before the run it stored).
    /// A broken variant (`Checks::held_report` off) acknowledges all.
    fn acknowledged(&self, first: Slot, count: u64) -> (Slot, u64) {
        let floor = self.acceptor.floor();
        if self.owed.is_none() || !self.config.checks.held_report || floor <= self.reported() {
            return (first, count);
        }
        let end = first.0.saturating_add(count);
        let after = floor.0.saturating_add(1).max(first.0);
        if after >= end {
            (first, 0)
        } else {
            (Slot(after), end - after)
        }
    }

    /// While held, the first slot a copy it installed brought (the node
    /// keeps it with the log's state: see [`LogReplica::held_copy_restored`]).
    pub fn installed_held(&self) -> Option<Slot> {
        self.installed_held
    }

    /// A restarted replica, held again, had installed a copy from slot
    /// `from` while it was held before: it may hold what a leader of the
    /// epoch wrote there, as if it had installed it in this process.
    /// Nothing on a replica that is not held.
    pub fn held_copy_restored(&mut self, from: Option<Slot>) {
        if self.owed.is_some() {
            self.installed_held = from;
        }
    }

    /// After a check of an earlier failover epoch against `source`
    /// ([`LogReplica::rewind`] to `upto`), with `term` the newest term
    /// this replica knew as the check began, and held again for the next
    /// failover epoch ([`LogReplica::hold`]): its whole timeline up to
    /// `upto` is `source`'s, as after [`LogReplica::install_copy`] of
    /// slots 1 to `upto` from it: when `source` leads `term` and `term`
    /// is still the newest it knows, it reports all of it as released.
    /// (It does not count as a copy for `installed_held`: two voters that
    /// checked against the same replica hold the same timeline, which
    /// the one that leads then shares with the other; counted as copied,
    /// it shared nothing, below its floor, and a CI run of the chaos plan
    /// with home moves stalled so.) Without this, a voter of a new home of two that
    /// still owed the failover before when the home moved again (home
    /// moves in a row) and checked it against the leader reported only
    /// what the leader shares with held replicas; below the leader's
    /// floor the leader could resend nothing, the voter was not behind
    /// the floor, and the new home never established. Nothing on a
    /// replica that is not held, or for an empty timeline.
    pub fn checked_against(&mut self, upto: Slot, source: NodeId, term: Term) {
        if self.owed.is_none() || upto == Slot(0) || upto != self.released {
            return;
        }
        let first = Slot(1);
        if source == term.node && term == self.highest {
            self.copies.from_leader = Some((term, first, upto));
        }
        self.copies.from = Some((source, first, upto));
    }

    /// The node made this held follower's whole timeline its leader's
    /// ([`LogReady::realign`]): it cut what differed from the timeline of
    /// `source`, the leader of `term`, and copied the rest, up to `upto`
    /// (the source's applied mark). The replica counts slots 1 to `upto`
    /// as released and copied from that leader, which it reports while
    /// `term` is the newest it knows (as after [`LogReplica::install_copy`]
    /// of all of them), and drops its log entries up to there. Returns
    /// whether it took it: only a follower held for this epoch's check
    /// whose newest term is still `term`, and only up to no less than its
    /// compaction floor (a lower floor would leave a gap the log once
    /// held).
    ///
    /// Why: a held replica reports of its released prefix only what the
    /// leader says its log shares with it (`LogMessage::Accept::shared`),
    /// and of a copy only a run that starts right after that; where the
    /// leader's floor is above what it reports and its released prefix
    /// is not behind that floor, the leader can resend nothing and a copy
    /// after its prefix counts for nothing: a new home of two voters never
    /// established so (the seeded simulation of `home_failover.rs`, a
    /// voter that had copied from the other before it led, which had
    /// copied from outside the home; two voters that checked an earlier
    /// failover against the same third replica were another way there).
    /// The slots it drops were released by the leader and by this replica
    /// (a held log compacts nothing else): the replica stays held and its
    /// check, once the epoch is established, cuts anything the epoch's log
    /// replaced, as after any copy installed while held. The copy may hold
    /// what a leader of the epoch wrote from the first slot the leader
    /// did not say it shares (`installed_held`).
    pub fn realigned(&mut self, upto: Slot, source: NodeId, term: Term) -> bool {
        if self.owed != Some(self.config.epoch)
            || !matches!(self.role, Role::Follower)
            || source != term.node
            || term != self.highest
            || upto == Slot(0)
            || upto < self.acceptor.floor()
        {
            return false;
        }
        let shared = match self.shared {
            Some((t, shared)) if t == term => shared,
            _ => Slot(0),
        };
        let written = shared.next().min(upto);
        self.installed_held = Some(self.installed_held.map_or(written, |s| s.min(written)));
        self.released = upto;
        self.acceptor.compact(upto);
        self.copies = HeldCopies {
            from_leader: Some((term, Slot(1), upto)),
            from: Some((source, Slot(1), upto)),
        };
        true
    }

    /// On a follower held for this epoch's check, told by `leader` (of
    /// the newest term) that its floor is `leader_floor`: asks the node
    /// to realign ([`LogReady::realign`]) when it reports less than that
    /// floor or its own, which no resend from the leader can fill (it
    /// resends nothing below its floor, and this replica stores nothing
    /// at or below its own). Only before the map recorded that a leader
    /// established the epoch: from then on the replica's check against
    /// that leader ends the hold, which a realignment would only delay.
    fn realign_if_stuck(&mut self, leader: NodeId, leader_floor: Slot) {
        let floor = leader_floor.max(self.acceptor.floor());
        if self.owed == Some(self.config.epoch)
            && self.config.failover.is_some()
            && matches!(self.role, Role::Follower)
            && self.highest.node == leader
            && floor > self.reported()
        {
            self.ready.realign = Some((leader, floor));
        }
    }

    /// While held, whose timelines the copies it installed hold (the
    /// node keeps them with the log's state: see
    /// [`LogReplica::held_copies_restored`]).
    pub fn held_copies(&self) -> HeldCopies {
        self.copies
    }

    /// A restarted replica, held again, had installed `copies` while it
    /// was held before, and its store still holds them: they count as if
    /// it had installed them in this process. Nothing on a replica that
    /// is not held.
    pub fn held_copies_restored(&mut self, copies: HeldCopies) {
        if self.owed.is_some() {
            self.copies = copies;
        }
    }

    /// Whether the replica is held ([`LogReplica::hold`]).
    pub fn is_held(&self) -> bool {
        self.owed.is_some()
    }

    /// What this replica released, when its timeline is still the one
    /// the epochs before this failover epoch left it: it is held owing
    /// this epoch's check and no earlier one (so it checked every earlier
    /// failover, and has released nothing since it learned of this one),
    /// installed no copy since (one may hold what a leader of the epoch
    /// wrote), and its log holds no entry of this epoch (no leader of it
    /// wrote here yet). Sent with its promises in a failover election
    /// (`LogMessage::Promise::untouched`). `Slot(0)` when it released
    /// nothing: such a promise does not keep the leader from vouching for
    /// the others (its log is as untouched), but the leader vouches for
    /// no such replica, since a node whose log state is empty may still
    /// keep rooms of the partition from an earlier membership that no
    /// prefix of the log accounts for. (A learner far behind, or a new
    /// home's voter that had not applied the partition yet, promises so.)
    ///
    /// Why a leader elected by such promises alone may vouch for them
    /// ([`LogReplica::vouched`]): every slot a promiser released is chosen
    /// in the lineage the earlier epochs agree on, so any higher-term
    /// entry of that slot written before this epoch holds the same value,
    /// and no promiser holds one of this epoch; the candidate recovers
    /// the highest-term entry of each slot from its own released prefix
    /// on, and a promiser's compaction floor below that start (else the
    /// candidate copies first), so the promiser's released values are
    /// what the recovered log holds; below that start both released
    /// prefixes of the same lineage. A promiser that held an entry of
    /// this epoch may have one of an earlier leader of it that cut the
    /// log before a slot another promiser released: the recovered log
    /// then replaces that slot.
    pub fn untouched(&self) -> Option<Slot> {
        let epoch = self.config.epoch;
        (self.config.failover.is_some()
            && self.owed == Some(epoch)
            && self.installed_held.is_none()
            && !self.acceptor.holds_epoch(epoch))
        .then_some(self.released)
    }

    /// Whether a candidate of a failover epoch, with `promises` from its
    /// election, may hold in its released prefix (up to `from`) another
    /// value than a leader of the epoch wrote there: it must not lead the
    /// epoch then ([`LogReplica::is_barred`]), and waits to be checked.
    ///
    /// A candidate asks its promisers from the slot after its released
    /// prefix, taking that prefix as chosen. In a failover epoch it may
    /// not be: a held replica may have released a post of the old home's
    /// loss window at a slot where an earlier leader of the epoch, elected
    /// without it, committed another post. So a promise of a failover
    /// epoch also carries the entries of the epoch below the asked slot
    /// (at most [`EPOCH_ENTRIES_BELOW_MAX`]), and the candidate leads only
    /// if its log holds the same value at each of those slots, no Accept
    /// changed a slot it had released (`clobbered`), and no
    /// entry of the epoch that another node wrote before this process
    /// started sits among what it released (whether it changed a released
    /// value is not known). The others, whose released prefixes end
    /// below those entries, recover them as usual.
    fn conflicts_in_epoch(&self, from: Slot, promises: &BTreeMap<NodeId, Promised<T>>) -> bool {
        let epoch = self.config.epoch;
        let me = self.config.me;
        if self.clobbered {
            return true;
        }
        let restored = self.restored.min(self.released).next();
        if self
            .acceptor
            .epoch_entries_below(epoch, restored, usize::MAX)
            .iter()
            .any(|(_, e)| e.term.node != me)
        {
            return true;
        }
        promises.values().any(|(_, entries, _)| {
            let below: Vec<&(Slot, Entry<T>)> = entries
                .iter()
                .filter(|(s, e)| *s < from && e.term.epoch >= epoch)
                .collect();
            below.len() >= EPOCH_ENTRIES_BELOW_MAX
                || below
                    .iter()
                    .any(|(s, e)| self.acceptor.entry(*s).map(|mine| &mine.value) != Some(&e.value))
        })
    }

    /// How much of what a replica held owing this failover epoch released
    /// before it was held this candidate's log shares with it, elected
    /// from `from` (`LogMessage::Accept::shared`).
    ///
    /// Only a held candidate can tell. It released nothing as a follower
    /// since it was held, so what it released is, like the held replica's,
    /// a prefix of the lineage the epochs before this one chose (both owe
    /// this epoch's check and no earlier one), except where a leader of
    /// this epoch wrote what it released: as that leader itself, in an
    /// earlier term, which its log keeps as entries of the epoch (a held
    /// log is not compacted); or through a copy it installed since it was
    /// held. (An entry of the epoch that an earlier leader wrote over a
    /// slot it released, with another value, bars it, and one with the
    /// same value changes nothing; so the epoch's entries its promises
    /// carry below `from` need no look.) So it shares every slot before
    /// the first of its own entries of the epoch, the first slot a copy
    /// brought, and `from`. A candidate that is not held (it checked)
    /// cannot tell which of its slots the epoch wrote: 0, and held
    /// replicas count once they stored its log in its term, or checked.
    fn shared_at_election(&self, from: Slot) -> Slot {
        let epoch = self.config.epoch;
        if self.owed != Some(epoch) {
            return Slot(0);
        }
        let own = self
            .acceptor
            .epoch_entries_below(epoch, from, 1)
            .first()
            .map(|(s, _)| *s);
        let first = [Some(from), own, self.installed_held]
            .into_iter()
            .flatten()
            .min()
            .unwrap_or(from);
        Slot(first.0.saturating_sub(1))
    }

    /// On a leader, what it tells held replicas its log shares with what
    /// they released ([`LogReplica::shared_at_election`]); 0 elsewhere.
    fn leader_shared(&self) -> Slot {
        match &self.role {
            Role::Leader { shared, .. } => *shared,
            _ => Slot(0),
        }
    }

    /// What a leader that shares `shared` with every held replica tells
    /// `to`: more, where it copied `to`'s timeline right after what it
    /// shares ([`LogReplica::install_copy`]).
    fn shared_for(&self, shared: Slot, to: NodeId) -> Slot {
        match self.copies.from {
            Some((source, first, last)) if source == to && shared.next() >= first => {
                shared.max(last)
            }
            _ => shared,
        }
    }

    /// Whether this replica found, running for leader, that its released
    /// prefix may disagree with what a leader of the failover epoch wrote
    /// (`LogReplica::conflicts_in_epoch`): it does not run again in that
    /// epoch until it checked its timeline ([`LogReplica::rewind`]).
    pub fn is_barred(&self) -> bool {
        self.barred == Some(self.config.epoch)
    }

    /// On a leader of a failover epoch, the other promisers of its
    /// election whose timelines it recovered a prefix of, with the prefix
    /// each had released: every promise, this node's own included, said
    /// [`LogReplica::untouched`] (empty otherwise, and off a failover
    /// epoch). Once the leader established the epoch, the node records
    /// them with it in the cluster map; a replica listed there that has
    /// released exactly that prefix since needs no check against the new
    /// home (its timeline is one), so the others need not wait for this
    /// leader to check theirs when it is lost.
    pub fn vouched(&self) -> &[(NodeId, Slot)] {
        match &self.role {
            Role::Leader { vouched, .. } => vouched,
            _ => &[],
        }
    }

    /// Whether it neither leads nor runs for leader.
    pub fn is_follower(&self) -> bool {
        matches!(self.role, Role::Follower)
    }

    /// The node cut its timeline back to what it shares with the new home
    /// of a failover of `epoch` and copied the rest from a replica that had
    /// applied every slot up to `upto`: the replica counts exactly those as
    /// released, even fewer than before (what it released beyond may be
    /// the old home's divergent tail), drops its entries of earlier epochs
    /// ([`LogAcceptor::rewind`]) and is no longer held; the leader then
    /// resends the slots after `upto`. Only a follower rewinds (a leader
    /// defines the log). Returns whether it did.
    pub fn rewind(&mut self, upto: Slot, epoch: u64) -> bool {
        if !matches!(self.role, Role::Follower) {
            return false;
        }
        self.released = upto;
        self.heard = None;
        self.acceptor.rewind(upto, epoch);
        self.hold(None);
        self.clobbered = false;
        self.restored = Slot(0);
        self.barred = None;
        true
    }

    /// The partition's replica set moved to a later epoch (the cluster map
    /// says so): from now on this node campaigns in `config.epoch` and
    /// answers no other. A candidate or leader of an earlier epoch steps
    /// down: its term is fenced as soon as anyone is elected in the new
    /// one. Returns whether the configuration changed (a configuration of
    /// the same or an earlier epoch, or for another node, is ignored).
    ///
    /// The same epoch is taken when only [`LogConfig::failover`] is lifted:
    /// the map recorded that a leader established the failover epoch, so
    /// its elections read the voters alone from then on; the leader, if
    /// any, goes on.
    pub fn reconfigure(&mut self, config: LogConfig) -> bool {
        if config.me == self.config.me
            && config.epoch == self.config.epoch
            && self.config.failover.is_some()
            && config.failover.is_none()
            && (LogConfig {
                failover: self.config.failover.clone(),
                ..config.clone()
            }) == self.config
        {
            self.config = config;
            return true;
        }
        if config.me != self.config.me || config.epoch <= self.config.epoch {
            return false;
        }
        if let Role::Candidate { term, .. } | Role::Leader { term, .. } = &self.role
            && term.epoch < config.epoch
        {
            self.role = Role::Follower;
        }
        self.config = config;
        true
    }

    /// Handles one message from another replica.
    pub fn step(&mut self, from: NodeId, message: LogMessage<T>) {
        if !message.is_sane() || from == self.config.me {
            return;
        }
        let term = message.term();
        if !self.config.knows(from) {
            // A node of a later epoch's set (a joiner) is news even though
            // this node cannot answer it yet.
            if term.epoch > self.config.epoch {
                self.note_newer_epoch(term.epoch);
            }
            return;
        }
        let election = matches!(
            message,
            LogMessage::Prepare { .. } | LogMessage::Promise { .. }
        );
        if election && !self.takes_part(from, &message) {
            // Elections are among voters only, but for a failover epoch's,
            // which learners answer too: a learner never asks. One of a
            // later epoch (where this node may vote) still says the map
            // moved on.
            if term.epoch > self.config.epoch {
                self.observe(term);
            }
            return;
        }
        let asks = matches!(
            message,
            LogMessage::Prepare { .. }
                | LogMessage::Accept { .. }
                | LogMessage::Compacted { .. }
                | LogMessage::LeaseRequest { .. }
        );
        if asks && term.epoch != self.config.epoch {
            // Elections, writes and leader notices are answered only in
            // this node's epoch. A later one: the map moved on and this
            // node cannot check the set of that epoch yet, so it learns
            // the term (and steps down) but answers nothing. An earlier
            // one: the sender's map is behind; the refusal tells it the
            // epoch moved on.
            if term.epoch > self.config.epoch {
                self.observe(term);
            } else if !matches!(message, LogMessage::Compacted { .. }) {
                let promised = self
                    .acceptor
                    .promised()
                    .max(Term::floor_of(self.config.epoch));
                self.ready
                    .messages
                    .push((from, LogMessage::Refused { term, promised }));
            }
            return;
        }
        match message {
            LogMessage::Prepare { term, from: slot } => {
                if self.bound_by_grants() && term > self.acceptor.promised() {
                    // LEASE_WAIT: a leader of the old epoch may still
                    // release under a grant of this replica; answer once
                    // the grants ran out (`tick`).
                    self.deferred.retain(|(n, t, _)| *n != from || *t > term);
                    if !self.deferred.iter().any(|(n, _, _)| *n == from) {
                        self.deferred.push((from, term, slot));
                    }
                    return;
                }
                let (mut reply, write) = self.acceptor.on_prepare(term, slot);
                if let LogMessage::Promise {
                    untouched, entries, ..
                } = &mut reply
                {
                    *untouched = self.untouched();
                    if self.config.failover.is_some() {
                        // What leaders of this epoch wrote below the asked
                        // slot: see `conflicts_in_epoch`.
                        let mut below = self.acceptor.epoch_entries_below(
                            term.epoch,
                            slot,
                            EPOCH_ENTRIES_BELOW_MAX,
                        );
                        below.append(entries);
                        *entries = below;
                    }
                }
                self.merge_write(write);
                self.observe(term);
                self.ready.messages.push((from, reply));
            }
            LogMessage::Accept {
                term,
                first,
                values,
                commit,
                shared,
            } => {
                // Only a held replica's timeline can differ from the
                // epoch's log (outside a failover, a chosen slot keeps its
                // value; a resend of a slot compacted here is no news).
                let clobbers = self.owed.is_some()
                    && values.iter().enumerate().any(|(i, v)| {
                        let slot = Slot(first.0 + i as u64);
                        slot <= self.released
                            && self.acceptor.entry(slot).map(|e| &e.value) != Some(v)
                    });
                let (reply, write) =
                    self.acceptor
                        .on_accept(term, first, &values, self.config.checks.fencing);
                let stored = matches!(reply, LogMessage::Accepted { .. });
                self.clobbered |= stored && clobbers;
                self.merge_write(write);
                self.observe(term);
                if stored {
                    self.shared = Some((term, shared));
                    self.heard = self.heard.max(Some(commit));
                    self.release_as_follower(term, commit);
                    if term.node == from {
                        self.realign_if_stuck(from, Slot(0));
                    }
                }
                let reply = match reply {
                    LogMessage::Accepted {
                        term, first, count, ..
                    } => {
                        let (first, count) = self.acknowledged(first, count);
                        LogMessage::Accepted {
                            term,
                            first,
                            count,
                            released: self.reported(),
                        }
                    }
                    refused => refused,
                };
                self.ready.messages.push((from, reply));
            }
            LogMessage::Promise {
                floor,
                entries,
                untouched,
                ..
            } => {
                if let Role::Candidate {
                    term: running,
                    promises,
                    ..
                } = &mut self.role
                    && *running == term
                {
                    promises.insert(from, (floor, entries, untouched));
                    self.try_lead();
                }
            }
            LogMessage::Accepted {
                first,
                count,
                released,
                ..
            } => self.on_accepted(from, term, first, count, released),
            LogMessage::Compacted { floor, .. } => {
                self.observe(term);
                // Only the leader of the newest term seen speaks for what
                // the log holds; an older leader's floor is no reason to
                // copy anything.
                if term != self.highest || term.node != from {
                    return;
                }
                if floor > self.released {
                    self.ready.lagging.push((self.config.me, floor));
                } else {
                    self.realign_if_stuck(from, floor);
                }
            }
            LogMessage::LeaseRequest { term, seq } => self.on_lease_request(from, term, seq),
            LogMessage::LeaseGrant { term, seq } => {
                let Some(lease) = self.config.home_lease else {
                    return;
                };
                if let Role::Leader {
                    term: leading,
                    lease: holder,
                    ..
                } = &mut self.role
                    && *leading == term
                {
                    holder.on_grant(&lease, from, seq);
                    self.release_as_leader();
                }
            }
            LogMessage::Refused { promised, .. } => self.observe(promised),
        }
    }

    /// Whether `from`'s election message is one this node takes part in:
    /// a Prepare from a voter, answered by voters (and by learners in a
    /// failover epoch); a Promise to a candidate, from a voter (or from
    /// any replica in a failover epoch).
    fn takes_part(&self, from: NodeId, message: &LogMessage<T>) -> bool {
        let open = self.config.failover.is_some() && message.term().epoch == self.config.epoch;
        match message {
            LogMessage::Prepare { .. } => {
                self.config.is_voter(from) && (open || !self.config.is_learner())
            }
            LogMessage::Promise { .. } => {
                !self.config.is_learner() && (open || self.config.is_voter(from))
            }
            _ => true,
        }
    }

    /// The leader of `term` asks for a home lease: granted unless this
    /// replica promised a later term (then refused, so the leader learns
    /// it was deposed). Requests of another epoch never get here, so a
    /// replica that knows a failover epoch grants nothing to the old one.
    fn on_lease_request(&mut self, from: NodeId, term: Term, seq: u64) {
        let Some(lease) = self.config.home_lease else {
            return;
        };
        if term.node != from {
            return;
        }
        let promised = self.acceptor.promised();
        if term < promised {
            self.ready
                .messages
                .push((from, LogMessage::Refused { term, promised }));
            return;
        }
        self.observe(term);
        self.grantor.grant(&lease, self.now);
        self.ready
            .messages
            .push((from, LogMessage::LeaseGrant { term, seq }));
    }

    /// A term seen: a newer one ends this node's candidacy or leadership,
    /// and one of a later epoch says the node's map is behind.
    fn observe(&mut self, term: Term) {
        if term.epoch > self.config.epoch {
            self.note_newer_epoch(term.epoch);
        }
        self.highest = self.highest.max(term);
        let mine = match &self.role {
            Role::Follower => return,
            Role::Candidate { term, .. } | Role::Leader { term, .. } => *term,
        };
        if term > mine {
            self.role = Role::Follower;
        }
    }

    fn note_newer_epoch(&mut self, epoch: u64) {
        self.ready.newer_epoch = Some(self.ready.newer_epoch.unwrap_or(0).max(epoch));
    }

    /// With promises from a quorum, recover and lead.
    fn try_lead(&mut self) {
        let Role::Candidate {
            term,
            from,
            promises,
        } = &self.role
        else {
            return;
        };
        if !self.config.elected_by(&promises.keys().copied().collect()) {
            return;
        }
        let (term, from) = (*term, *from);
        // A promiser that compacted slots this candidate has not released
        // no longer reports them: recovering without them could put
        // another value in a committed slot. So could a tail too long to
        // recover here. Either way, catch up from a snapshot first.
        let floor = promises
            .values()
            .map(|(f, _, _)| *f)
            .max()
            .unwrap_or_default();
        let end = promises
            .values()
            .filter_map(|(_, e, _)| e.last().map(|(s, _)| *s))
            .max()
            .unwrap_or_default();
        if floor >= from || end.0.saturating_sub(from.0) > RECOVERY_SLOTS_MAX {
            let need = floor
                .max(from)
                .max(Slot(end.0.saturating_sub(RECOVERY_SLOTS_MAX)));
            self.ready.lagging.push((self.config.me, need));
            self.role = Role::Follower;
            return;
        }
        if self.config.checks.epoch_below
            && self.config.failover.is_some()
            && self.conflicts_in_epoch(from, promises)
        {
            self.barred = Some(term.epoch);
            self.role = Role::Follower;
            return;
        }
        let mut recovered: BTreeMap<Slot, Entry<T>> = BTreeMap::new();
        let sources: Vec<&Vec<(Slot, Entry<T>)>> = if self.config.checks.tail_read {
            promises.values().map(|(_, e, _)| e).collect()
        } else {
            // Broken variant: only this node's own entries.
            promises
                .get(&self.config.me)
                .map(|(_, e, _)| e)
                .into_iter()
                .collect()
        };
        for entries in sources {
            for (slot, entry) in entries {
                if *slot < from {
                    continue;
                }
                match recovered.get(slot) {
                    Some(have) if have.term >= entry.term => {}
                    _ => {
                        recovered.insert(*slot, entry.clone());
                    }
                }
            }
        }
        let last = if self.config.failover.is_some() {
            // Cut at the first slot no promiser has (see `Failover`).
            let mut last = Slot(from.0 - 1);
            while recovered.contains_key(&last.next()) {
                last = last.next();
            }
            last
        } else {
            recovered
                .keys()
                .next_back()
                .copied()
                .unwrap_or(self.released)
        };
        let values: Vec<Value<T>> = (from.0..=last.0)
            .map(|s| recovered.remove(&Slot(s)).map_or(Value::Noop, |e| e.value))
            .collect();
        // See `LogReplica::untouched` (a broken variant vouches for every
        // promiser that sent a prefix).
        let me = self.config.me;
        let vouched: Vec<(NodeId, Slot)> = if self.config.failover.is_some()
            && (!self.config.checks.untouched_only
                || promises.values().all(|(_, _, u)| u.is_some()))
        {
            promises
                .iter()
                .filter(|(n, _)| **n != me)
                .filter_map(|(n, (_, _, u))| u.filter(|s| *s > Slot(0)).map(|s| (*n, s)))
                .collect()
        } else {
            Vec::new()
        };
        let shared = self.shared_at_election(from);
        self.role = Role::Leader {
            term,
            next: from,
            pending: BTreeMap::new(),
            recovered_to: last,
            caught_up: BTreeSet::new(),
            stored: BTreeMap::new(),
            lease: LeaseHolder::default(),
            vouched,
            shared,
        };
        self.ready.leading = Some(term);
        self.renew_lease();
        if !values.is_empty() {
            self.write_as_leader(from, values);
        }
    }

    /// Writes values from `first` in the leader's term: locally (durable
    /// before the Accepts leave), then to every other replica.
    fn write_as_leader(&mut self, first: Slot, values: Vec<Value<T>>) {
        let Role::Leader {
            term,
            next,
            pending,
            shared,
            ..
        } = &mut self.role
        else {
            return;
        };
        let (term, shared) = (*term, *shared);
        let me = self.config.me;
        for (i, v) in values.iter().enumerate() {
            pending.insert(Slot(first.0 + i as u64), (v.clone(), BTreeSet::from([me])));
        }
        *next = Slot(first.0 + values.len() as u64);
        let (_, write) = self.acceptor.on_accept(term, first, &values, true);
        self.merge_write(write);
        let commit = self.released;
        let others = self.others();
        for chunk_start in (0..values.len()).step_by(self.config.batch_max.max(1)) {
            let chunk: Vec<Value<T>> = values
                [chunk_start..(chunk_start + self.config.batch_max).min(values.len())]
                .to_vec();
            for to in &others {
                self.ready.messages.push((
                    *to,
                    LogMessage::Accept {
                        term,
                        first: Slot(first.0 + chunk_start as u64),
                        values: chunk.clone(),
                        commit,
                        shared: self.shared_for(shared, *to),
                    },
                ));
            }
        }
        self.release_as_leader();
    }

    fn on_accepted(&mut self, from: NodeId, term: Term, first: Slot, count: u64, released: Slot) {
        let Role::Leader {
            term: leading,
            pending,
            recovered_to,
            caught_up,
            stored,
            ..
        } = &mut self.role
        else {
            return;
        };
        if *leading != term {
            return;
        }
        // Only the slots this leader has pending: a report of 2^62 slots
        // costs no more than the pending ones. Learners' acknowledgements
        // are kept too (so that a resend skips what they stored), but only
        // voters' count towards a commit.
        for (_, (_, acks)) in pending.range_mut(first..Slot(first.0 + count)) {
            acks.insert(from);
        }
        if !self.config.is_voter(from) {
            // A learner stored `first ..= first + count - 1` in this term
            // and everything up to what it released; its durable prefix
            // grows by a run that starts within it.
            let mark = stored.entry(from).or_default();
            *mark = (*mark).max(released);
            if count > 0 && first.0 <= mark.0 + 1 {
                *mark = (*mark).max(Slot(first.0 + count - 1));
            }
        }
        if released >= *recovered_to {
            caught_up.insert(from);
        }
        self.release_as_leader();
        self.catch_up(from, term, released, first);
    }

    /// Resends committed slots a replica reports it has not released and
    /// that precede what it just stored.
    fn catch_up(&mut self, to: NodeId, term: Term, released: Slot, first: Slot) {
        let upto = self.released.min(Slot(first.0.saturating_sub(1)));
        if released >= upto {
            return;
        }
        let from = released.next();
        if from <= self.acceptor.floor() {
            self.ready.lagging.push((to, self.acceptor.floor()));
            self.ready.messages.push((
                to,
                LogMessage::Compacted {
                    term,
                    floor: self.acceptor.floor(),
                },
            ));
            return;
        }
        let missing: Vec<(Slot, Value<T>)> = self
            .acceptor
            .entries_from(from)
            .into_iter()
            .take_while(|(s, _)| *s <= upto)
            .map(|(s, e)| (s, e.value))
            .collect();
        let sends = accepts(
            to,
            (
                term,
                self.released,
                self.shared_for(self.leader_shared(), to),
            ),
            missing,
            self.config.batch_max,
        );
        self.ready.messages.extend(sends);
    }

    /// Releases the leader's committed prefix, in order; with a home
    /// lease, only while the lease holds.
    fn release_as_leader(&mut self) {
        if self.config.home_lease.is_some() && self.home_lease_until().is_none() {
            return;
        }
        let majority = self.config.majority();
        let Role::Leader { pending, .. } = &mut self.role else {
            return;
        };
        while let Some((value, acks)) = pending.get(&self.released.next()) {
            if acks.iter().filter(|n| self.config.is_voter(**n)).count() < majority {
                break;
            }
            let slot = self.released.next();
            self.ready.committed.push(Committed {
                slot,
                value: value.clone(),
            });
            pending.remove(&slot);
            self.released = slot;
        }
    }

    /// A follower releases slots up to the leader's commit point that it
    /// holds in the leader's term (an entry of an older term may not be
    /// the one chosen).
    /// (Held, it only notes how far it would have released.)
    fn release_as_follower(&mut self, term: Term, commit: Slot) {
        if !matches!(self.role, Role::Follower) {
            return;
        }
        let mut through = self.reported();
        while through < commit {
            let slot = through.next();
            match self.acceptor.entry(slot) {
                Some(e) if e.term == term => {
                    if self.owed.is_none() {
                        self.ready.committed.push(Committed {
                            slot,
                            value: e.value.clone(),
                        });
                        self.released = slot;
                    }
                    through = slot;
                }
                _ => break,
            }
        }
        if self.owed.is_some() {
            self.held_through = through;
        }
    }

    fn merge_write(&mut self, write: Option<LogWrite<T>>) {
        let Some(write) = write else { return };
        match &mut self.ready.write {
            Some(w) => {
                w.promised = write.promised;
                w.entries.extend(write.entries);
            }
            None => self.ready.write = Some(write),
        }
    }

    /// Every other replica, voters first: whom a leader writes to.
    fn others(&self) -> Vec<NodeId> {
        self.config
            .replicas
            .iter()
            .chain(&self.config.learners)
            .copied()
            .filter(|n| *n != self.config.me)
            .collect()
    }

    /// The other voters: whom a candidate asks for a promise.
    fn other_voters(&self) -> Vec<NodeId> {
        self.config
            .replicas
            .iter()
            .copied()
            .filter(|n| *n != self.config.me)
            .collect()
    }
}

/// Accepts to `to` in a leader's term, with its commit point and what
/// its log shares with held replicas, carrying `items` (in slot order),
/// one per run of consecutive slots of at most `max` values.
fn accepts<T>(
    to: NodeId,
    (term, commit, shared): (Term, Slot, Slot),
    items: Vec<(Slot, Value<T>)>,
    max: usize,
) -> Vec<(NodeId, LogMessage<T>)> {
    contiguous(items, max)
        .into_iter()
        .map(|(first, values)| {
            (
                to,
                LogMessage::Accept {
                    term,
                    first,
                    values,
                    commit,
                    shared,
                },
            )
        })
        .collect()
}

/// The run of copied slots kept under `key` once a copy of `first ..=
/// upto` under it is installed: an earlier run under the same key grows
/// when the copy follows on from it; otherwise the copy starts a new one.
fn extend_run<K: PartialEq>(
    run: Option<(K, Slot, Slot)>,
    key: K,
    first: Slot,
    upto: Slot,
) -> (K, Slot, Slot) {
    match run {
        Some((k, f, last)) if k == key && last.next() == first => (key, f, upto),
        _ => (key, first, upto),
    }
}

/// Groups `(slot, value)` pairs in slot order into runs of consecutive
/// slots of at most `max` values.
fn contiguous<T>(items: Vec<(Slot, T)>, max: usize) -> Vec<(Slot, Vec<T>)> {
    let mut runs: Vec<(Slot, Vec<T>)> = Vec::new();
    for (slot, value) in items {
        match runs.last_mut() {
            Some((first, values))
                if first.0 + values.len() as u64 == slot.0 && values.len() < max.max(1) =>
            {
                values.push(value);
            }
            _ => runs.push((slot, vec![value])),
        }
    }
    runs
}
