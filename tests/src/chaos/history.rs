//! What the clients of a chaos run saw, and the checks over it.
//!
//! - No acknowledged post is lost: it is in the final history, with the
//!   id and room sequence number its acknowledgement gave.
//! - Nothing is stored twice (a text twice in the final history) or
//!   delivered twice to one session.
//! - One order: the final history is numbered 1, 2, 3, … without gaps;
//!   every node's own store is a prefix of it; every session's deliveries
//!   agree with it and arrive in increasing order.
//! - Nothing appears that nobody posted.

use std::collections::{HashMap, HashSet};

/// A message as a client saw it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Seen {
    /// The server's id.
    pub id: Vec<u8>,
    /// The room's sequence number.
    pub seq: u64,
    /// The decrypted text.
    pub text: String,
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
    /// A node's store is not a prefix of the final history.
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
}

/// Every anomaly in `h`.
pub fn check(h: &History) -> Vec<Anomaly> {
    let mut found = Vec::new();
    let by_text: HashMap<&str, &Seen> = h.fin.iter().map(|m| (m.text.as_str(), m)).collect();
    let posted: HashSet<&str> = h.posts.iter().map(|p| p.text.as_str()).collect();
    for p in &h.posts {
        match (&p.outcome, by_text.get(p.text.as_str())) {
            (Outcome::Acked { .. }, None) => found.push(Anomaly::LostAck(p.text.clone())),
            (Outcome::Acked { id, seq }, Some(m)) if m.id != *id || m.seq != *seq => {
                found.push(Anomaly::AckMismatch {
                    text: p.text.clone(),
                    acked_seq: *seq,
                    stored_seq: m.seq,
                    other_id: m.id != *id,
                });
            }
            // UNAVAILABLE is the protocol's "outcome unknown".
            (Outcome::Refused(why), Some(_)) if !why.starts_with("Unavailable") => {
                found.push(Anomaly::RefusedStored(format!("{} ({why})", p.text)));
            }
            _ => {}
        }
    }
    let mut stored = HashSet::new();
    for (i, m) in h.fin.iter().enumerate() {
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
    for (node, store) in h.stores.iter().enumerate() {
        if let Some(index) = store
            .iter()
            .zip(h.fin.iter().map(Some).chain(std::iter::repeat(None)))
            .position(|(mine, theirs)| theirs != Some(mine))
        {
            found.push(Anomaly::StoreDiverges { node, index });
        }
    }
    let by_seq: HashMap<u64, &Seen> = h.fin.iter().map(|m| (m.seq, m)).collect();
    for (session, seen) in h.sessions.iter().enumerate() {
        let mut texts = HashSet::new();
        let mut last = 0;
        for m in seen {
            if !texts.insert(m.text.as_str()) {
                found.push(Anomaly::DeliveredTwice {
                    session,
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
        }
    }

    fn acked(seq: u64, text: &str) -> Post {
        Post {
            text: text.to_owned(),
            outcome: Outcome::Acked {
                id: vec![u8::try_from(seq).unwrap(); 16],
                seq,
            },
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
                },
                acked(4, "d"),
                Post {
                    text: "e".into(),
                    outcome: Outcome::Refused("RESOURCE_EXHAUSTED: too fast".into()),
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
        }
    }

    #[test]
    fn a_clean_history_passes() {
        assert_eq!(check(&clean()), vec![]);
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
        let mut h = clean();
        h.stores[0].push(seen(5, "late"));
        assert_eq!(
            check(&h),
            vec![Anomaly::StoreDiverges { node: 0, index: 4 }]
        );

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
}
