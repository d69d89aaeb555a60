//! What the clients of a chaos run saw, and the checks over it.
//!
//! - No acknowledged post is lost: it is in the final history, with the
//!   id and room sequence number its acknowledgement gave.
//! - Nothing is stored twice (a text twice in the final history) or
//!   delivered twice to one session.
//! - One order: the final history and every node's own store are
//!   prefixes of one sequence (the longest of them), numbered 1, 2, 3, …
//!   without gaps; every session's deliveries agree with it and arrive in
//!   increasing order. A store may run past the final history: the nodes
//!   stop one after the other after it was read, and a leader elected
//!   among the last ones commits the uncommitted tail its promisers hold
//!   (posts whose outcome was unknown), as Paxos does (campaign
//!   `SEED=453`, where the node that led stopped first).
//! - Nothing appears that nobody posted, or that was refused.
//! - Where the room's home was cut off and moved ([`History::lossy`]),
//!   a post the old home acknowledged at the local level may be lost
//!   (the level's loss window): it is reported, not an anomaly, and so
//!   is its live delivery; but a session that was shown a lost post is
//!   shown nothing after it that the room kept (its node ends it once it
//!   learns the home moved, and the client reads again).

use std::collections::{HashMap, HashSet};
use std::time::Instant;

/// A message as a client saw it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Seen {
    /// The server's id.
    pub id: Vec<u8>,
    /// The room's sequence number.
    pub seq: u64,
    /// The decrypted text.
    pub text: String,
    /// The membership revision its sender sealed it under (0 where the
    /// envelope does not decode).
    pub revision: u64,
}

/// How a post ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Acknowledged with this id and room sequence number.
    Acked {
        /// The id.
        id: Vec<u8>,
        /// The room sequence number.
        seq: u64,
    },
    /// Refused (with the status code and message): must be stored nowhere,
    /// unless the code is UNAVAILABLE (the protocol's "outcome unknown").
    Refused(String),
    /// No answer (a crash, a cut, a timeout): may or may not be stored.
    Unknown,
}

/// One post attempt.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Post {
    /// Its text (unique in the run).
    pub text: String,
    /// How it ended.
    pub outcome: Outcome,
    /// When it was sent.
    pub sent: Instant,
    /// When it ended (answered, or given up on).
    pub answered: Instant,
}

/// A stretch of the run in which a post acknowledged at the local level
/// may be lost: from some seconds before the room's home was cut off and
/// moved (what the old home acknowledged then may not have reached
/// another datacenter yet) until after it was reconnected, for a post
/// sent before the old home's home lease ran out (after that, no node may
/// acknowledge a post it then loses: the old home releases nothing, and
/// the new home loses nothing).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Window {
    /// Answered from.
    pub from: Instant,
    /// Answered until.
    pub to: Instant,
    /// Sent at the latest.
    pub sent_by: Instant,
}

/// Everything recorded in a run.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct History {
    /// Every post attempted.
    pub posts: Vec<Post>,
    /// Per session (one per connection lifetime): live deliveries in the
    /// order received.
    pub sessions: Vec<Vec<Seen>>,
    /// The room's history read through the cluster after the run, oldest
    /// first.
    pub fin: Vec<Seen>,
    /// Each node's own store after the run, oldest first.
    pub stores: Vec<Vec<Seen>>,
    /// Where the room's home was cut off and moved.
    pub lossy: Vec<Window>,
}

/// Something that must not happen.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Anomaly {
    /// An acknowledged post is not in the final history.
    LostAck(String),
    /// An acknowledged post is there under another id or number.
    AckMismatch {
        /// The text.
        text: String,
        /// The number its acknowledgement gave.
        acked_seq: u64,
        /// The number it is stored under.
        stored_seq: u64,
        /// Whether the ids differ too.
        other_id: bool,
    },
    /// A refused post was stored.
    RefusedStored(String),
    /// A text is stored more than once.
    StoredTwice(String),
    /// A text nobody posted.
    Phantom(String),
    /// The final history's numbers are not 1, 2, 3, … .
    Numbering {
        /// Where.
        index: usize,
        /// The number found.
        seq: u64,
    },
    /// The final history is not a prefix of the longest store.
    FinalDiverges {
        /// The first position that differs.
        index: usize,
    },
    /// A node's store is not a prefix of the longest of the final
    /// history and the stores.
    StoreDiverges {
        /// The node.
        node: usize,
        /// The first position that differs.
        index: usize,
    },
    /// A session received a message twice.
    DeliveredTwice {
        /// The session.
        session: usize,
        /// The text.
        text: String,
    },
    /// A session received a message out of the room's order, or one that
    /// differs from the final history at its number.
    SessionOrder {
        /// The session.
        session: usize,
        /// The text.
        text: String,
    },
    /// A session went on after it was shown a post of a loss window: it
    /// was shown one the room kept.
    ShownAfterLost {
        /// The session.
        session: usize,
        /// The lost post it was shown first.
        lost: String,
        /// The kept one it was shown after it.
        text: String,
    },
}

impl History {
    /// Whether `p` ended within a loss window.
    fn in_window(&self, p: &Post) -> bool {
        self.lossy
            .iter()
            .any(|w| p.answered >= w.from && p.answered <= w.to && p.sent <= w.sent_by)
    }
}

/// The posts of a loss window (acknowledged or not) that no store and
/// no history read kept: the old home may have shown them live.
pub fn vanished(h: &History) -> Vec<String> {
    let anywhere: HashSet<&str> = std::iter::once(&h.fin)
        .chain(&h.stores)
        .flatten()
        .map(|m| m.text.as_str())
        .collect();
    h.posts
        .iter()
        .filter(|p| {
            !matches!(p.outcome, Outcome::Refused(_))
                && !anywhere.contains(p.text.as_str())
                && h.in_window(p)
        })
        .map(|p| p.text.clone())
        .collect()
}

/// The posts acknowledged within a loss window that the room did not
/// keep: what the local level lost there (no anomaly; the report counts
/// them).
pub fn lost_in_windows(h: &History) -> Vec<String> {
    let kept: HashSet<&str> = h.fin.iter().map(|m| m.text.as_str()).collect();
    h.posts
        .iter()
        .filter(|p| {
            matches!(p.outcome, Outcome::Acked { .. })
                && !kept.contains(p.text.as_str())
                && h.in_window(p)
        })
        .map(|p| p.text.clone())
        .collect()
}

/// The first position where `short` is not a prefix of `long`.
fn diverges(short: &[Seen], long: &[Seen]) -> Option<usize> {
    short
        .iter()
        .zip(long.iter().map(Some).chain(std::iter::repeat(None)))
        .position(|(mine, theirs)| theirs != Some(mine))
}

/// Every anomaly in `h`.
pub fn check(h: &History) -> Vec<Anomaly> {
    let mut found = Vec::new();
    // The one sequence every history read and store must be a prefix of.
    let longest: &[Seen] = std::iter::once(&h.fin)
        .chain(&h.stores)
        .max_by_key(|v| v.len())
        .map_or(&[], Vec::as_slice);
    let by_text: HashMap<&str, &Seen> = h.fin.iter().map(|m| (m.text.as_str(), m)).collect();
    let anywhere: HashSet<&str> = longest.iter().map(|m| m.text.as_str()).collect();
    let posted: HashSet<&str> = h.posts.iter().map(|p| p.text.as_str()).collect();
    // Posts of a loss window the room did not keep (acknowledged or not:
    // an unknown one may have been shown live by the old home).
    let lost = vanished(h);
    let vanished: HashSet<&str> = lost.iter().map(String::as_str).collect();
    for p in &h.posts {
        match (&p.outcome, by_text.get(p.text.as_str())) {
            (Outcome::Acked { .. }, None) if vanished.contains(p.text.as_str()) => {}
            (Outcome::Acked { .. }, None) => found.push(Anomaly::LostAck(p.text.clone())),
            (Outcome::Acked { id, seq }, Some(m)) if m.id != *id || m.seq != *seq => {
                found.push(Anomaly::AckMismatch {
                    text: p.text.clone(),
                    acked_seq: *seq,
                    stored_seq: m.seq,
                    other_id: m.id != *id,
                });
            }
            _ => {}
        }
        // UNAVAILABLE is the protocol's "outcome unknown".
        if let Outcome::Refused(why) = &p.outcome
            && !why.starts_with("Unavailable")
            && anywhere.contains(p.text.as_str())
        {
            found.push(Anomaly::RefusedStored(format!("{} ({why})", p.text)));
        }
    }
    let mut stored = HashSet::new();
    for (i, m) in longest.iter().enumerate() {
        if !stored.insert(m.text.as_str()) {
            found.push(Anomaly::StoredTwice(m.text.clone()));
        }
        if !posted.contains(m.text.as_str()) {
            found.push(Anomaly::Phantom(m.text.clone()));
        }
        if m.seq != i as u64 + 1 {
            found.push(Anomaly::Numbering {
                index: i,
                seq: m.seq,
            });
        }
    }
    if let Some(index) = diverges(&h.fin, longest) {
        found.push(Anomaly::FinalDiverges { index });
    }
    for (node, store) in h.stores.iter().enumerate() {
        if let Some(index) = diverges(store, longest) {
            found.push(Anomaly::StoreDiverges { node, index });
        }
    }
    let by_seq: HashMap<u64, &Seen> = longest.iter().map(|m| (m.seq, m)).collect();
    for (session, seen) in h.sessions.iter().enumerate() {
        let mut texts = HashSet::new();
        let mut last = 0;
        let mut lost: Option<&str> = None;
        for m in seen {
            if !texts.insert(m.text.as_str()) {
                found.push(Anomaly::DeliveredTwice {
                    session,
                    text: m.text.clone(),
                });
                continue;
            }
            if vanished.contains(m.text.as_str()) {
                lost.get_or_insert(m.text.as_str());
                last = last.max(m.seq);
                continue;
            }
            if let Some(lost) = lost {
                found.push(Anomaly::ShownAfterLost {
                    session,
                    lost: lost.to_owned(),
                    text: m.text.clone(),
                });
                continue;
            }
            if m.seq <= last || by_seq.get(&m.seq) != Some(&m) {
                found.push(Anomaly::SessionOrder {
                    session,
                    text: m.text.clone(),
                });
            }
            last = last.max(m.seq);
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seen(seq: u64, text: &str) -> Seen {
        Seen {
            id: vec![u8::try_from(seq).unwrap(); 16],
            seq,
            text: text.to_owned(),
            revision: 1,
        }
    }

    /// The doctored runs' clock: `ms` after one start.
    fn at(ms: u64) -> Instant {
        static START: std::sync::LazyLock<Instant> = std::sync::LazyLock::new(Instant::now);
        *START + std::time::Duration::from_millis(ms)
    }

    fn acked(seq: u64, text: &str) -> Post {
        Post {
            text: text.to_owned(),
            outcome: Outcome::Acked {
                id: vec![u8::try_from(seq).unwrap(); 16],
                seq,
            },
            sent: at(seq * 1_000 - 100),
            answered: at(seq * 1_000),
        }
    }

    /// A clean run: three acked posts, one unknown that was stored, one
    /// refused; two sessions; a lagging store.
    fn clean() -> History {
        History {
            posts: vec![
                acked(1, "a"),
                acked(2, "b"),
                Post {
                    text: "c".into(),
                    outcome: Outcome::Unknown,
                    sent: at(1_000),
                    answered: at(3_000),
                },
                acked(4, "d"),
                Post {
                    text: "e".into(),
                    outcome: Outcome::Refused("RESOURCE_EXHAUSTED: too fast".into()),
                    sent: at(4_900),
                    answered: at(5_000),
                },
            ],
            sessions: vec![
                vec![seen(1, "a"), seen(2, "b"), seen(4, "d")],
                vec![seen(3, "c"), seen(4, "d")],
            ],
            fin: vec![seen(1, "a"), seen(2, "b"), seen(3, "c"), seen(4, "d")],
            stores: vec![
                vec![seen(1, "a"), seen(2, "b"), seen(3, "c"), seen(4, "d")],
                vec![seen(1, "a"), seen(2, "b")],
            ],
            lossy: Vec::new(),
        }
    }

    fn unknown(text: &str) -> Post {
        Post {
            text: text.to_owned(),
            outcome: Outcome::Unknown,
            sent: at(1_000),
            answered: at(9_000),
        }
    }

    #[test]
    fn a_clean_history_passes() {
        assert_eq!(check(&clean()), vec![]);
        // Campaign SEED=453: the nodes stop after the final history was
        // read, the leader first, and the two left elect one that commits
        // a post whose outcome was unknown: their stores run past the
        // final history, and that is no anomaly.
        let mut h = clean();
        h.posts.push(unknown("f"));
        let mut ran_on = h.fin.clone();
        ran_on.push(seen(5, "f"));
        h.stores = vec![ran_on.clone(), ran_on];
        assert_eq!(check(&h), vec![]);
        // UNAVAILABLE says "outcome unknown": stored is allowed.
        let mut h = clean();
        h.posts[2].outcome = Outcome::Refused("Unavailable: leader moved".into());
        assert_eq!(check(&h), vec![]);
    }

    #[test]
    fn each_checker_bites_on_a_doctored_history() {
        let mut h = clean();
        h.fin.retain(|m| m.text != "b");
        h.stores.clear();
        h.sessions.clear();
        let found = check(&h);
        assert!(found.contains(&Anomaly::LostAck("b".into())), "{found:?}");
        assert!(
            found.contains(&Anomaly::Numbering { index: 1, seq: 3 }),
            "{found:?}"
        );

        let mut h = clean();
        h.fin[3].id = vec![9; 16];
        h.stores.clear();
        h.sessions.clear();
        assert_eq!(
            check(&h),
            vec![Anomaly::AckMismatch {
                text: "d".into(),
                acked_seq: 4,
                stored_seq: 4,
                other_id: true
            }]
        );

        let mut h = clean();
        h.fin.push(seen(5, "e"));
        h.fin.push(seen(6, "a"));
        h.fin.push(seen(7, "zzz"));
        let found = check(&h);
        for a in [
            Anomaly::RefusedStored("e (RESOURCE_EXHAUSTED: too fast)".into()),
            Anomaly::StoredTwice("a".into()),
            Anomaly::Phantom("zzz".into()),
        ] {
            assert!(found.contains(&a), "{a:?} in {found:?}");
        }

        let mut h = clean();
        h.stores[1][1] = seen(2, "x");
        assert_eq!(
            check(&h),
            vec![Anomaly::StoreDiverges { node: 1, index: 1 }]
        );
        // A store past the final history with a post nobody made, or one
        // whose place the final history gave to another.
        let mut h = clean();
        h.stores[0].push(seen(5, "late"));
        assert_eq!(check(&h), vec![Anomaly::Phantom("late".into())]);
        let mut h = clean();
        h.posts.push(unknown("f"));
        h.stores[0].push(seen(5, "f"));
        h.fin.swap(0, 1);
        assert_eq!(check(&h), vec![Anomaly::FinalDiverges { index: 0 }]);

        let mut h = clean();
        h.sessions[0].push(seen(4, "d"));
        assert_eq!(
            check(&h),
            vec![Anomaly::DeliveredTwice {
                session: 0,
                text: "d".into()
            }]
        );
        let mut h = clean();
        h.sessions[1].swap(0, 1);
        assert_eq!(
            check(&h),
            vec![Anomaly::SessionOrder {
                session: 1,
                text: "c".into()
            }]
        );
    }

    /// The home of `clean()`'s room was cut off and moved around the
    /// acknowledgement of "d" (4 s in): the old home had acknowledged it
    /// and shown it to session 0, then the new home gave #4 to "f".
    fn moved_around_d() -> History {
        let mut h = clean();
        h.posts.push(acked(4, "f"));
        h.posts.last_mut().unwrap().answered = at(8_000);
        h.fin[3] = seen(4, "f");
        for store in &mut h.stores {
            if store.len() == 4 {
                store[3] = seen(4, "f");
            }
        }
        h.sessions = vec![
            vec![seen(1, "a"), seen(2, "b"), seen(4, "d")],
            vec![seen(3, "c"), seen(4, "f")],
        ];
        h
    }

    #[test]
    fn a_post_lost_in_a_loss_window_is_reported_and_no_anomaly() {
        let mut h = moved_around_d();
        // Without the window, "d" is an acknowledged post lost, and
        // session 0 was shown what the room does not hold at #4.
        let found = check(&h);
        assert!(found.contains(&Anomaly::LostAck("d".into())), "{found:?}");
        assert!(
            found.contains(&Anomaly::SessionOrder {
                session: 0,
                text: "d".into()
            }),
            "{found:?}"
        );
        h.lossy.push(Window {
            from: at(3_500),
            to: at(6_000),
            sent_by: at(4_000),
        });
        assert_eq!(check(&h), vec![]);
        assert_eq!(lost_in_windows(&h), ["d"]);
        // A window elsewhere excuses nothing, nor one whose old home's
        // lease ran out before the post was sent.
        h.lossy[0] = Window {
            from: at(5_000),
            to: at(6_000),
            sent_by: at(6_000),
        };
        assert!(check(&h).contains(&Anomaly::LostAck("d".into())));
        h.lossy[0] = Window {
            from: at(3_500),
            to: at(6_000),
            sent_by: at(3_800),
        };
        assert!(check(&h).contains(&Anomaly::LostAck("d".into())));
    }

    #[test]
    fn a_session_shown_a_lost_post_and_then_a_kept_one_is_reported() {
        let mut h = moved_around_d();
        h.lossy.push(Window {
            from: at(3_500),
            to: at(6_000),
            sent_by: at(4_000),
        });
        h.sessions[0].push(seen(4, "f"));
        assert_eq!(
            check(&h),
            vec![Anomaly::ShownAfterLost {
                session: 0,
                lost: "d".into(),
                text: "f".into()
            }]
        );
    }
}
