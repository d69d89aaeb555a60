//! The mover: the task that carries partition moves out once the cluster
//! map plans them (`saferchat_placement::moves`).
//!
//! It runs on every node of a cluster and looks at the map whenever it
//! changes (and every [`MOVER_TICK_MS`], for what waits on others):
//!
//! - On the map group's leader, it proposes the planned steps
//!   (`ClusterMap::next_moves`: a grow, or a shrink once the set before was
//!   established; at most `MOVES_AT_ONCE` partitions in a move at once).
//!   A step a node proposed twice is refused as stale.
//! - On the mover of a step (the lowest node id in both sets,
//!   `ClusterMap::steps`), it hands the partition's rooms to the new set
//!   (`Membership::hand_over`) and then proposes `HandedOver`.
//! - On every replica of a partition whose epoch is not established, it
//!   makes the partition's log live, so that a leader is elected in the
//!   new epoch; the leader proposes `Establish` once its log is
//!   established (`Timeline::established`) and the rooms were handed over,
//!   and, for a grow, once the node it added holds everything the leader
//!   recovered (`ClusterMap::establish_waits_for`): the shrink that comes
//!   next then never leaves the partition's posts on fewer replicas.
//!
//! Every proposal runs in a task of its own (a proposal may wait seconds
//! for a map leader; the loop goes on meanwhile) and goes through
//! `ClusterMaps::propose`, which forwards to
//! the map group's leader; every command names the partition epoch it
//! was made for, so a retry or a duplicate from another node applies once.

use std::collections::HashSet;
use std::time::Duration;

use saferchat_consensus::NodeId;
use saferchat_placement::MapCommand;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::cluster_map::ClusterMaps;
use crate::error::NodeError;
use crate::membership::{HandoverStep, Membership};
use crate::timeline::Timeline;

/// How often the mover looks again at steps that wait on others (an
/// election, a handover, a map commit).
pub const MOVER_TICK_MS: u64 = 500;

/// Everything the mover needs.
pub struct MoverParts {
    /// This node.
    pub me: u64,
    /// The cluster map.
    pub maps: ClusterMaps,
    /// This node's membership driver (local: it never forwards).
    pub membership: Membership,
    /// This node's partition logs.
    pub timeline: Timeline,
    /// Stops the task.
    pub shutdown: CancellationToken,
}

/// Runs the mover until `shutdown`.
///
/// # Errors
/// Never at present; the type leaves room for a fatal error.
pub async fn run(parts: MoverParts) -> Result<(), NodeError> {
    let MoverParts {
        me,
        maps,
        membership,
        timeline,
        shutdown,
    } = parts;
    let mut changes = maps.watch();
    let mut tick = tokio::time::interval(Duration::from_millis(MOVER_TICK_MS));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // Handovers this node runs: (partition, epoch); a finished one tells
    // the loop through `done`.
    let mut handing: HashSet<(u32, u64)> = HashSet::new();
    let (done_tx, mut done) = mpsc::unbounded_channel::<(u32, u64)>();
    // Map commands this node has in flight; a finished one tells the loop
    // through `Proposals::finished`.
    let mut proposals = Proposals::new(maps.clone(), shutdown.clone());
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return Ok(()),
            changed = changes.changed() => {
                if changed.is_err() {
                    return Ok(());
                }
            }
            _ = tick.tick() => {}
            Some(step) = done.recv() => {
                handing.remove(&step);
            }
            Some(key) = proposals.finished.recv() => {
                proposals.in_flight.remove(&key);
            }
        }
        let status = maps.status();
        let map = status.map;
        if !map.is_created() {
            continue;
        }
        if status.leader == Some(me) {
            match map.next_moves() {
                Ok(steps) => {
                    for step in steps {
                        proposals.start(step);
                    }
                }
                Err(e) => tracing::warn!(error = %e, "the cluster map has no placement"),
            }
        }
        let steps = match map.steps() {
            Ok(steps) => steps,
            Err(e) => {
                tracing::warn!(error = %e, "the cluster map has no placement");
                continue;
            }
        };
        for (partition, step) in steps {
            if step.after.contains(&me) {
                timeline.touch(partition);
            }
            let handed = map.handed_over.contains(&partition);
            let waits_for = map.establish_waits_for(&step).map(NodeId);
            if step.mover == me && !handed && handing.insert((partition, step.epoch)) {
                if let Some(draining) = step.passed_over() {
                    // A dead mover's step taken over, or a step it would
                    // have moved.
                    tracing::info!(
                        partition,
                        epoch = step.epoch,
                        draining,
                        "moving the step in place of a draining node"
                    );
                    metrics::counter!("saferchat_handover_steps_for_draining_total").increment(1);
                }
                let membership = membership.clone();
                let maps = maps.clone();
                let done = done_tx.clone();
                let shutdown = shutdown.clone();
                tokio::spawn(async move {
                    let handover = HandoverStep {
                        partition,
                        epoch: step.epoch,
                        old: step.before.iter().copied().map(NodeId).collect(),
                        new: step.after.iter().copied().map(NodeId).collect(),
                    };
                    tokio::select! {
                        () = shutdown.cancelled() => {}
                        result = membership.hand_over(handover) => match result {
                            Ok(()) => {
                                propose(&maps, MapCommand::HandedOver { partition, epoch: step.epoch }).await;
                            }
                            Err(e) => {
                                tracing::warn!(partition, epoch = step.epoch, error = %e, "handing the partition's rooms over failed; trying again");
                            }
                        },
                    }
                    let _ = done.send((partition, step.epoch));
                });
            }
            if handed
                && let Ok(Some(established)) = timeline.established(partition, waits_for).await
                && established.epoch == step.epoch
            {
                proposals.start(MapCommand::Establish {
                    partition,
                    epoch: established.epoch,
                    leader: established.failover.then_some(me),
                    vouched: established.vouched,
                });
            }
        }
    }
}

/// What identifies a partition step's command: its kind, partition and
/// epoch.
type ProposalKey = (&'static str, u32, u64);

/// The map commands this node proposes for partition moves, each in a task
/// of its own. A proposal can wait seconds (for a map leader, after one
/// died, up to `ClusterMaps::propose`'s bound); awaited in the loop, it
/// held up every other partition's step, the start of handovers included,
/// and with hundreds of partitions moving at once the proposals queued
/// behind each other.
struct Proposals {
    maps: ClusterMaps,
    shutdown: CancellationToken,
    /// Commands proposed and not yet answered: the same step is not
    /// proposed again meanwhile (it would only be refused as stale).
    in_flight: HashSet<ProposalKey>,
    done: mpsc::UnboundedSender<ProposalKey>,
    /// Keys of the proposals that finished.
    finished: mpsc::UnboundedReceiver<ProposalKey>,
}

impl Proposals {
    fn new(maps: ClusterMaps, shutdown: CancellationToken) -> Proposals {
        let (done, finished) = mpsc::unbounded_channel();
        Proposals {
            maps,
            shutdown,
            in_flight: HashSet::new(),
            done,
            finished,
        }
    }

    /// Proposes `command` in a task, unless the same step is in flight.
    fn start(&mut self, command: MapCommand) {
        let key = match &command {
            MapCommand::Grow {
                partition, epoch, ..
            } => Some(("grow", *partition, *epoch)),
            MapCommand::Shrink {
                partition, epoch, ..
            } => Some(("shrink", *partition, *epoch)),
            MapCommand::Establish {
                partition, epoch, ..
            } => Some(("establish", *partition, *epoch)),
            _ => None,
        };
        if let Some(key) = key
            && !self.in_flight.insert(key)
        {
            return;
        }
        let maps = self.maps.clone();
        let shutdown = self.shutdown.clone();
        let done = self.done.clone();
        tokio::spawn(async move {
            tokio::select! {
                () = shutdown.cancelled() => {}
                () = propose(&maps, command) => {}
            }
            if let Some(key) = key {
                let _ = done.send(key);
            }
        });
    }
}

/// Proposes a step; a refusal (stale, already applied) is expected when
/// several nodes see the same step, so it is only logged.
async fn propose(maps: &ClusterMaps, command: MapCommand) {
    match maps.propose(command.clone()).await {
        Ok(epoch) => tracing::info!(?command, epoch, "partition move step applied"),
        Err(e) => tracing::debug!(?command, error = %e, "partition move step not applied"),
    }
}
