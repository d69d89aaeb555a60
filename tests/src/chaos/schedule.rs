//! A seeded fault schedule: which fault hits which node or link when, and
//! when it is undone. Episodes follow one another (each is undone before
//! the next starts), so the cluster always comes back; the last step
//! leaves everything healed and running.

use rand::{RngExt as _, SeedableRng as _};
use rand_chacha::ChaCha8Rng;

/// One fault or its undoing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// SIGKILL node `.0`.
    Kill(usize),
    /// Start it again on its data.
    Restart(usize),
    /// SIGSTOP: a process that stalls (a long pause).
    Pause(usize),
    /// SIGCONT.
    Resume(usize),
    /// Cut node `.0` off from every other node, both ways.
    Isolate(usize),
    /// Reconnect it.
    Heal(usize),
    /// Block the connections `from` opens to `to` (one way: `to` can
    /// still reach `from`).
    Cut {
        /// The dialling node.
        from: usize,
        /// The dialled node.
        to: usize,
    },
    /// Undo [`Fault::Cut`].
    Mend {
        /// The dialling node.
        from: usize,
        /// The dialled node.
        to: usize,
    },
    /// Node `node`'s clocks run `ppm` parts per million fast (negative:
    /// slow); 0 undoes it. Within the configured drift bound (500 ppm).
    Drift {
        /// The node.
        node: usize,
        /// Rate error.
        ppm: i64,
    },
    /// Node `node`'s clocks (the lease clock and the wall clock) jump `ms`
    /// ahead at once: beyond the drift bound, which covers rates, not
    /// steps. Undone by `Drift { ppm: 0 }` (time does not go back).
    Jump {
        /// The node.
        node: usize,
        /// The step.
        ms: u64,
    },
    /// Drop `percent` % of the packets of the link `from` → `to`, both
    /// ways (TCP retransmits); 0 undoes it. Needs the test's own network
    /// namespace ([`crate::netns`]).
    Loss {
        /// The dialling node.
        from: usize,
        /// The dialled node.
        to: usize,
        /// Share of packets dropped.
        percent: u8,
    },
    /// Delay every byte on the link `from` → `to` by `ms`.
    Delay {
        /// The dialling node.
        from: usize,
        /// The dialled node.
        to: usize,
        /// One-way delay.
        ms: u64,
    },
    /// Stop the Cassandra node every saferchat node stores in (SIGTERM:
    /// it drains first). Only with [`Store::Cassandra`].
    CassandraStop,
    /// Start it again on its data (it answers some tens of seconds later).
    CassandraStart,
    /// SIGSTOP the Cassandra JVM: a stall such as a long GC pause.
    CassandraPause,
    /// SIGCONT.
    CassandraResume,
    /// Fill node `.0`'s disk (its data folder is a small tmpfs). Only with
    /// [`Kinds::disk`].
    FillDisk(usize),
    /// Free it again; a node that stopped meanwhile is started again (as
    /// a supervisor would).
    FreeDisk(usize),
    /// SIGKILL every node of datacenter `.0` (0-based, in name order) at
    /// once. Only with [`Kinds::datacenters`].
    KillDatacenter(usize),
    /// Start them all again on their data.
    RestartDatacenter(usize),
    /// Cut datacenter `.0` off from the others, both ways (its nodes
    /// still reach each other, clients still reach every node).
    CutDatacenter(usize),
    /// Reconnect it.
    ReconnectDatacenter(usize),
    /// Cut the room's home datacenter off from the others (as
    /// [`Fault::CutDatacenter`]) and move the homes of its partitions to
    /// the next datacenter in name order, as an operator does for a
    /// datacenter lost (`MoveHomes`). What the old home acknowledged at
    /// the local level and no other datacenter holds yet is lost: the
    /// level's loss window, which the checkers excuse around the cut. Only
    /// with [`Kinds::moves`].
    MoveHome,
    /// Reconnect the datacenter the last [`Fault::MoveHome`] cut off: its
    /// nodes check their copies against the new home's and follow it.
    RejoinHome,
}

/// A fault at a time from the start of the run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Step {
    /// Milliseconds from the start.
    pub at_ms: u64,
    /// What happens.
    pub fault: Fault,
}

/// Which clock faults a schedule holds.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Clocks {
    /// Drift within the configured bound (±500 ppm): every checker must
    /// pass, membership reads under leases included.
    #[default]
    Within,
    /// Drift far beyond the bound (2,000 to 100,000 ppm either way) and
    /// forward jumps of 1 to 30 s: lease reads may be stale, which the
    /// membership checkers may flag; nothing else may break (the
    /// partition log's safety does not rest on clocks).
    Beyond,
}

/// Where the nodes keep their timelines, and so which store faults a
/// schedule holds.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Store {
    /// Each node its own embedded store: no store faults.
    #[default]
    Sled,
    /// One Cassandra node for the whole cluster, which the schedule stops,
    /// starts, pauses and resumes.
    Cassandra,
}

/// Which kinds of faults beyond the basic ones a schedule holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Kinds {
    /// Clock faults within the drift bound or beyond it.
    pub clocks: Clocks,
    /// The nodes' timeline store, and with Cassandra its faults.
    pub store: Store,
    /// Full disks: each node's data folder on a small tmpfs.
    pub disk: bool,
    /// Three datacenters, the nodes spread evenly over them in order, and
    /// whole datacenters killed or cut off.
    pub datacenters: bool,
    /// With [`Kinds::datacenters`]: the room's home cut off and moved to
    /// another datacenter now and then ([`Fault::MoveHome`]).
    pub moves: bool,
}

impl Kinds {
    /// Clocks within the bound, the embedded store, no full disks.
    pub const WITHIN: Kinds = Kinds {
        clocks: Clocks::Within,
        store: Store::Sled,
        disk: false,
        datacenters: false,
        moves: false,
    };
}

impl Default for Kinds {
    fn default() -> Kinds {
        Kinds::WITHIN
    }
}

/// How many datacenters [`Kinds::datacenters`] spreads the nodes over.
pub const DATACENTERS: usize = 3;

/// The name of datacenter `d` (0-based) with [`Kinds::datacenters`]:
/// `dc1` to `dc3`.
pub fn datacenter_name(d: usize) -> String {
    format!("dc{}", d + 1)
}

/// The datacenter (0-based, in name order) of node `node` of `nodes` with
/// [`Kinds::datacenters`].
pub fn datacenter_of(node: usize, nodes: usize) -> usize {
    node * DATACENTERS / nodes
}

/// The schedule of `seed` for `nodes` nodes over about `duration_ms`,
/// clocks within the bound, on the embedded store.
///
/// # Panics
/// With fewer than two nodes.
pub fn schedule(seed: u64, nodes: usize, duration_ms: u64) -> Vec<Step> {
    schedule_with(seed, nodes, duration_ms, Kinds::default())
}

/// The schedule of `seed` with the given kinds of faults. A seed's
/// schedule of the default kinds (clocks within the bound, the embedded
/// store, no full disks) is the same as before the other kinds existed.
///
/// # Panics
/// With fewer than two nodes.
pub fn schedule_with(seed: u64, nodes: usize, duration_ms: u64, kinds: Kinds) -> Vec<Step> {
    let Kinds {
        clocks,
        store,
        disk,
        datacenters,
        moves,
    } = kinds;
    assert!(nodes >= 2, "faults between nodes need two");
    assert!(!moves || datacenters, "homes move between datacenters");
    assert!(
        !datacenters || nodes.is_multiple_of(DATACENTERS),
        "{nodes} nodes do not spread evenly over {DATACENTERS} datacenters"
    );
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut steps = Vec::new();
    let mut at = rng.random_range(500..1_500);
    while at < duration_ms {
        let node = rng.random_range(0..nodes);
        let other = (node + rng.random_range(1..nodes)) % nodes;
        let lasts = rng.random_range(500..4_000);
        // Beyond the bound, half the faults are clock faults; on
        // Cassandra, a quarter are store faults; with full disks, a fifth
        // are those; with moves, a quarter are home moves; in datacenters,
        // a third of the others are whole datacenters'. (A kind not asked
        // for draws nothing: a seed's schedule stays what it was.)
        let kind = if clocks == Clocks::Beyond && rng.random_bool(0.5) {
            4
        } else if store == Store::Cassandra && rng.random_bool(0.25) {
            7 + rng.random_range(0..2)
        } else if disk && rng.random_bool(0.2) {
            9
        } else if moves && rng.random_bool(0.25) {
            12
        } else if datacenters && rng.random_bool(1.0 / 3.0) {
            10 + rng.random_range(0..2)
        } else {
            rng.random_range(0..7)
        };
        let dc = datacenter_of(node, nodes);
        let (start, undo) = match kind {
            12 => (Fault::MoveHome, Fault::RejoinHome),
            10 => (Fault::KillDatacenter(dc), Fault::RestartDatacenter(dc)),
            11 => (Fault::CutDatacenter(dc), Fault::ReconnectDatacenter(dc)),
            7 => (Fault::CassandraStop, Fault::CassandraStart),
            8 => (Fault::CassandraPause, Fault::CassandraResume),
            9 => (Fault::FillDisk(node), Fault::FreeDisk(node)),
            0 => (Fault::Kill(node), Fault::Restart(node)),
            1 => (Fault::Pause(node), Fault::Resume(node)),
            2 => (Fault::Isolate(node), Fault::Heal(node)),
            4 if clocks == Clocks::Within => (
                Fault::Drift {
                    node,
                    ppm: rng.random_range(-500..=500),
                },
                Fault::Drift { node, ppm: 0 },
            ),
            4 => {
                let fault = if rng.random_bool(0.5) {
                    let ppm = rng.random_range(2_000..=100_000);
                    Fault::Drift {
                        node,
                        ppm: if rng.random_bool(0.5) { ppm } else { -ppm },
                    }
                } else {
                    Fault::Jump {
                        node,
                        ms: rng.random_range(1_000..=30_000),
                    }
                };
                (fault, Fault::Drift { node, ppm: 0 })
            }
            6 => (
                Fault::Loss {
                    from: node,
                    to: other,
                    percent: rng.random_range(5..=30),
                },
                Fault::Loss {
                    from: node,
                    to: other,
                    percent: 0,
                },
            ),
            3 => (
                Fault::Cut {
                    from: node,
                    to: other,
                },
                Fault::Mend {
                    from: node,
                    to: other,
                },
            ),
            _ => (
                Fault::Delay {
                    from: node,
                    to: other,
                    ms: rng.random_range(20..400),
                },
                Fault::Mend {
                    from: node,
                    to: other,
                },
            ),
        };
        steps.push(Step {
            at_ms: at,
            fault: start,
        });
        steps.push(Step {
            at_ms: at + lasts,
            fault: undo,
        });
        at += lasts + rng.random_range(300..2_000);
    }
    steps
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_seed_is_one_schedule_and_every_fault_is_undone() {
        for clocks in [Clocks::Within, Clocks::Beyond] {
            for store in [Store::Sled, Store::Cassandra] {
                for (disk, datacenters, moves) in [
                    (false, false, false),
                    (true, false, false),
                    (false, true, false),
                    (false, true, true),
                ] {
                    let kinds = Kinds {
                        clocks,
                        store,
                        disk,
                        datacenters,
                        moves,
                    };
                    let a = schedule_with(42, 6, 60_000, kinds);
                    assert_eq!(a, schedule_with(42, 6, 60_000, kinds));
                    assert_ne!(a, schedule_with(43, 6, 60_000, kinds));
                    every_fault_is_undone(&a);
                }
            }
        }
    }

    /// Store faults only where there is a Cassandra, and there both kinds.
    #[test]
    fn store_faults_only_on_cassandra() {
        let store_fault = |s: &Step| {
            matches!(
                s.fault,
                Fault::CassandraStop
                    | Fault::CassandraStart
                    | Fault::CassandraPause
                    | Fault::CassandraResume
            )
        };
        for clocks in [Clocks::Within, Clocks::Beyond] {
            let sled: Vec<Step> = (0..20)
                .flat_map(|s| {
                    let kinds = Kinds {
                        clocks,
                        ..Kinds::default()
                    };
                    schedule_with(s, 3, 60_000, kinds)
                })
                .collect();
            assert!(!sled.iter().any(store_fault));
        }
        let cassandra: Vec<Step> = (0..20)
            .flat_map(|s| {
                let kinds = Kinds {
                    store: Store::Cassandra,
                    ..Kinds::default()
                };
                schedule_with(s, 3, 60_000, kinds)
            })
            .collect();
        assert!(cassandra.iter().any(|s| s.fault == Fault::CassandraStop));
        assert!(cassandra.iter().any(|s| s.fault == Fault::CassandraPause));
    }

    /// Within the bound every drift is at most 500 ppm; beyond it, the
    /// clock faults are large, and some seed has each kind.
    #[test]
    fn clock_faults_keep_to_their_kind() {
        let within: Vec<Step> = (0..20).flat_map(|s| schedule(s, 3, 60_000)).collect();
        assert!(within.iter().all(|s| match s.fault {
            Fault::Drift { ppm, .. } => ppm.abs() <= 500,
            Fault::Jump { .. } => false,
            _ => true,
        }));
        let beyond: Vec<Step> = (0..20)
            .flat_map(|s| {
                let kinds = Kinds {
                    clocks: Clocks::Beyond,
                    ..Kinds::default()
                };
                schedule_with(s, 3, 60_000, kinds)
            })
            .collect();
        assert!(
            beyond
                .iter()
                .any(|s| matches!(s.fault, Fault::Jump { ms, .. } if ms >= 1_000))
        );
        assert!(
            beyond
                .iter()
                .any(|s| matches!(s.fault, Fault::Drift { ppm, .. } if ppm.abs() >= 2_000))
        );
        assert!(beyond.iter().all(|s| match s.fault {
            Fault::Drift { ppm, .. } => ppm == 0 || ppm.abs() >= 2_000,
            _ => true,
        }));
    }

    /// Full disks only when asked for, and then some.
    #[test]
    fn disk_faults_only_when_asked() {
        let fills = |disk: bool| {
            (0..20)
                .flat_map(|s| {
                    let kinds = Kinds {
                        disk,
                        ..Kinds::default()
                    };
                    schedule_with(s, 3, 60_000, kinds)
                })
                .filter(|s| matches!(s.fault, Fault::FillDisk(_)))
                .count()
        };
        assert_eq!(fills(false), 0);
        assert!(fills(true) > 0);
    }

    /// Whole datacenters only when asked for, then both kinds and every
    /// datacenter; and a seed's schedule without them is the one it
    /// always was (the campaign's earlier seeds replay as they ran).
    #[test]
    fn datacenter_faults_only_when_asked() {
        let of = |datacenters: bool| -> Vec<Step> {
            (0..20)
                .flat_map(|s| {
                    let kinds = Kinds {
                        datacenters,
                        ..Kinds::default()
                    };
                    schedule_with(s, 6, 60_000, kinds)
                })
                .collect()
        };
        let whole =
            |s: &Step| matches!(s.fault, Fault::KillDatacenter(_) | Fault::CutDatacenter(_));
        assert!(!of(false).iter().any(whole));
        let with = of(true);
        for d in 0..DATACENTERS {
            assert!(
                with.iter().any(|s| s.fault == Fault::KillDatacenter(d)),
                "a kill of {d}"
            );
            assert!(
                with.iter().any(|s| s.fault == Fault::CutDatacenter(d)),
                "a cut of {d}"
            );
        }
        assert_eq!(
            [
                datacenter_of(0, 6),
                datacenter_of(1, 6),
                datacenter_of(2, 6),
                datacenter_of(5, 6)
            ],
            [0, 0, 1, 2]
        );
    }

    /// Home moves only when asked for, and then some; and a schedule in
    /// datacenters without them is the one it always was.
    #[test]
    fn home_moves_only_when_asked() {
        let of = |moves: bool| -> Vec<Vec<Step>> {
            (0..20)
                .map(|s| {
                    let kinds = Kinds {
                        datacenters: true,
                        moves,
                        ..Kinds::default()
                    };
                    schedule_with(s, 6, 60_000, kinds)
                })
                .collect()
        };
        let moves = |all: &[Vec<Step>]| {
            all.iter()
                .flatten()
                .filter(|s| s.fault == Fault::MoveHome)
                .count()
        };
        assert_eq!(moves(&of(false)), 0);
        let with = of(true);
        assert!(moves(&with) >= 20, "{} moves", moves(&with));
        assert!(
            with.iter()
                .flatten()
                .any(|s| matches!(s.fault, Fault::CutDatacenter(_)))
        );
    }

    fn every_fault_is_undone(a: &[Step]) {
        assert!(a.len() >= 10, "{} steps", a.len());
        for pair in a.chunks(2) {
            let undone = match pair[0].fault {
                Fault::Kill(n) => Fault::Restart(n),
                Fault::Pause(n) => Fault::Resume(n),
                Fault::Isolate(n) => Fault::Heal(n),
                Fault::Cut { from, to } | Fault::Delay { from, to, .. } => Fault::Mend { from, to },
                Fault::Drift { node, .. } | Fault::Jump { node, .. } => {
                    Fault::Drift { node, ppm: 0 }
                }
                Fault::Loss { from, to, percent } if percent > 0 => Fault::Loss {
                    from,
                    to,
                    percent: 0,
                },
                Fault::CassandraStop => Fault::CassandraStart,
                Fault::CassandraPause => Fault::CassandraResume,
                Fault::FillDisk(n) => Fault::FreeDisk(n),
                Fault::KillDatacenter(d) => Fault::RestartDatacenter(d),
                Fault::CutDatacenter(d) => Fault::ReconnectDatacenter(d),
                Fault::MoveHome => Fault::RejoinHome,
                other => panic!("an undo opens an episode: {other:?}"),
            };
            assert_eq!(pair[1].fault, undone);
            assert!(pair[1].at_ms > pair[0].at_ms);
        }
        assert!(a.windows(2).all(|w| w[0].at_ms < w[1].at_ms));
    }
}
