//! What a recipient checks about each sender device's stream of messages
//! in a room (envelope v1.1): nothing dropped, replayed or reordered
//! unnoticed, and the sender saw the same members at that revision.
//!
//! A pure tracker: [`Streams::observe`] takes one verified message and
//! says what to warn about and whether to show it. The session feeds it
//! live deliveries and history in order, and saves it beside the key file
//! (`device.rs`), so the checks carry across reconnects and restarts.
//!
//! What it can and cannot see:
//! - a message missing between two it received: a gap (also across
//!   sessions: the last message seen per device is kept);
//! - a message delivered twice: the second is not shown (a replay);
//! - an older message arriving live after a newer one: out of order;
//! - two different messages with one number, or a message that does not
//!   name the one before it: a forked stream;
//! - a membership hash that differs from this member's own view of that
//!   revision (only for revisions this member saw).
//!
//! It cannot see the last messages of a stream withheld (nothing follows
//! them), nor gaps among history older than what it saw first (reading
//! older pages backwards is not judged).

use std::collections::{BTreeMap, HashMap, VecDeque};

use saferchat_consensus::{Handle, Revision};
use saferchat_envelope::chain::{Chain, DEVICE_BYTES, Hash};
use serde::{Deserialize, Serialize};

/// Messages remembered per process to recognise a replay.
const SHOWN_MAX: usize = 4096;
/// Membership revisions remembered per room.
const REVISIONS_MAX: usize = 256;

/// One sender device's stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct StreamId {
    /// The sender.
    pub sender: Handle,
    /// Their device.
    pub device: [u8; DEVICE_BYTES],
}

/// The last message seen of a stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Seen {
    /// Its number.
    pub seq: u64,
    /// Its message hash.
    pub hash: Hash,
}

/// Something a recipient should be told about a message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Warning {
    /// Messages of this sender's device between the last one seen and
    /// this one never arrived (dropped, or not loaded).
    Gap {
        /// How many.
        missing: u64,
    },
    /// A message older than one already received arrived live.
    OutOfOrder {
        /// The newest number seen before it.
        newest: u64,
    },
    /// The exact message was shown before: not shown again.
    Replayed,
    /// Another message carries the same number, or this one does not name
    /// the message seen before it: the sender's stream forked.
    Forked,
    /// The sender's membership at this revision differs from the one this
    /// member was shown: the server may show members different lists.
    MembershipDiffers {
        /// The revision.
        revision: Revision,
    },
    /// An envelope v1 message: carries no sequence or membership to check.
    Unsequenced,
}

impl std::fmt::Display for Warning {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Warning::Gap { missing } => write!(
                f,
                "{missing} earlier message(s) from this sender's device did not arrive (dropped, or not loaded)"
            ),
            Warning::OutOfOrder { newest } => write!(
                f,
                "arrived out of order: a later message (number {newest}) from this device came first"
            ),
            Warning::Replayed => f.write_str("a replay of a message already shown: not shown again"),
            Warning::Forked => f.write_str(
                "this device's messages fork: another message claims this place (sender equivocating, or a forgery)",
            ),
            Warning::MembershipDiffers { revision } => write!(
                f,
                "the sender saw other members at revision {revision} than you were shown: the server may be showing members different lists"
            ),
            Warning::Unsequenced => {
                f.write_str("old envelope format (v1): order and membership not checked")
            }
        }
    }
}

/// What [`Streams::observe`] decided.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Verdict {
    /// Whether to show the message (false for a replay).
    pub show: bool,
    /// What to tell the user.
    pub warnings: Vec<Warning>,
}

/// The streams of one room as this member saw them.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Streams {
    last: HashMap<StreamId, Seen>,
    memberships: BTreeMap<Revision, Hash>,
    shown: HashMap<(StreamId, u64), Hash>,
    shown_order: VecDeque<(StreamId, u64)>,
}

/// What is saved of [`Streams`] between runs.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Saved {
    /// The last message seen per stream.
    pub last: Vec<SavedStream>,
    /// Membership hashes by revision.
    pub memberships: Vec<(u64, Hash)>,
}

/// One stream's last message, as saved.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SavedStream {
    /// The sender's handle.
    pub sender: String,
    /// The device.
    pub device: [u8; DEVICE_BYTES],
    /// The last message seen.
    pub seen: Seen,
}

impl Streams {
    /// The streams as saved.
    pub fn restore(saved: Saved) -> Streams {
        Streams {
            last: saved
                .last
                .into_iter()
                .filter_map(|s| {
                    let sender = s.sender.parse().ok()?;
                    Some((
                        StreamId {
                            sender,
                            device: s.device,
                        },
                        s.seen,
                    ))
                })
                .collect(),
            memberships: saved
                .memberships
                .into_iter()
                .map(|(r, h)| (Revision(r), h))
                .collect(),
            ..Streams::default()
        }
    }

    /// What to save (replays are recognised within one process only).
    pub fn save(&self) -> Saved {
        let mut last: Vec<_> = self.last.iter().collect();
        last.sort_by_key(|(k, _)| **k);
        Saved {
            last: last
                .into_iter()
                .map(|(k, seen)| SavedStream {
                    sender: k.sender.to_string(),
                    device: k.device,
                    seen: *seen,
                })
                .collect(),
            memberships: self.memberships.iter().map(|(r, h)| (r.0, *h)).collect(),
        }
    }

    /// Records this member's own view of the membership at `revision`.
    pub fn saw_membership(&mut self, revision: Revision, hash: Hash) {
        self.memberships.insert(revision, hash);
        while self.memberships.len() > REVISIONS_MAX {
            self.memberships.pop_first();
        }
    }

    /// The membership hash this member saw at `revision`, if it did.
    pub fn membership_at(&self, revision: Revision) -> Option<Hash> {
        self.memberships.get(&revision).copied()
    }

    /// Judges one verified message from `sender` at `revision` with
    /// `chain` (None: envelope v1) and message hash `hash`. `live`: a
    /// delivery as it happens, rather than history read on request (where
    /// older messages are expected).
    pub fn observe(
        &mut self,
        sender: Handle,
        revision: Revision,
        chain: Option<&Chain>,
        hash: Hash,
        live: bool,
    ) -> Verdict {
        let Some(chain) = chain else {
            return Verdict {
                show: true,
                warnings: vec![Warning::Unsequenced],
            };
        };
        let mut warnings = Vec::new();
        if let Some(mine) = self.memberships.get(&revision)
            && *mine != chain.membership
        {
            warnings.push(Warning::MembershipDiffers { revision });
        }
        let id = StreamId {
            sender,
            device: chain.device,
        };
        match self.shown.get(&(id, chain.seq)) {
            Some(seen) if *seen == hash => {
                return Verdict {
                    show: false,
                    warnings: vec![Warning::Replayed],
                };
            }
            Some(_) => warnings.push(Warning::Forked),
            None => self.remember_shown(id, chain.seq, hash),
        }
        let forked = warnings.contains(&Warning::Forked);
        match self.last.get(&id).copied() {
            None => {}
            Some(last) if chain.seq == last.seq + 1 && chain.prev != last.hash && !forked => {
                warnings.push(Warning::Forked);
            }
            Some(last) if chain.seq > last.seq + 1 => warnings.push(Warning::Gap {
                missing: chain.seq - last.seq - 1,
            }),
            Some(last) if chain.seq == last.seq && hash != last.hash && !forked => {
                warnings.push(Warning::Forked);
            }
            Some(last) if chain.seq < last.seq && live => {
                warnings.push(Warning::OutOfOrder { newest: last.seq });
            }
            Some(_) => {}
        }
        if self.last.get(&id).is_none_or(|last| chain.seq > last.seq) {
            self.last.insert(
                id,
                Seen {
                    seq: chain.seq,
                    hash,
                },
            );
        }
        Verdict {
            show: true,
            warnings,
        }
    }

    /// Takes in what `other` knows: the further position of every stream,
    /// and every membership revision.
    pub fn merge(&mut self, other: &Streams) {
        for (id, seen) in &other.last {
            if self.last.get(id).is_none_or(|mine| seen.seq > mine.seq) {
                self.last.insert(*id, *seen);
            }
        }
        for (revision, hash) in &other.memberships {
            self.saw_membership(*revision, *hash);
        }
    }

    fn remember_shown(&mut self, id: StreamId, seq: u64, hash: Hash) {
        self.shown.insert((id, seq), hash);
        self.shown_order.push_back((id, seq));
        while self.shown_order.len() > SHOWN_MAX {
            if let Some(old) = self.shown_order.pop_front() {
                self.shown.remove(&old);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use saferchat_envelope::chain::NO_PREVIOUS;

    /// A device's stream of `n` messages: (chain, hash) pairs linked by
    /// their hashes, under membership `membership`.
    fn stream(device: u8, n: u64, membership: Hash) -> Vec<(Chain, Hash)> {
        let mut out = Vec::new();
        let mut prev = NO_PREVIOUS;
        for seq in 1..=n {
            let chain = Chain {
                device: [device; DEVICE_BYTES],
                seq,
                prev,
                sent_at_ms: seq,
                membership,
                key_commitment: [0; 32],
            };
            let mut hash = [device; 32];
            hash[..8].copy_from_slice(&seq.to_be_bytes());
            out.push((chain, hash));
            prev = hash;
        }
        out
    }

    fn alice() -> Handle {
        Handle::of_modulus(b"alice")
    }

    fn feed(s: &mut Streams, m: &(Chain, Hash), live: bool) -> Verdict {
        s.observe(alice(), Revision(3), Some(&m.0), m.1, live)
    }

    const CLEAN: Verdict = Verdict {
        show: true,
        warnings: Vec::new(),
    };

    #[test]
    fn an_intact_stream_raises_nothing() {
        let mut s = Streams::default();
        for m in &stream(1, 5, [0; 32]) {
            assert_eq!(feed(&mut s, m, true), CLEAN);
        }
    }

    #[test]
    fn a_dropped_message_is_a_gap_and_a_late_one_is_out_of_order() {
        let msgs = stream(1, 4, [0; 32]);
        let mut s = Streams::default();
        feed(&mut s, &msgs[0], true);
        assert_eq!(
            feed(&mut s, &msgs[2], true).warnings,
            vec![Warning::Gap { missing: 1 }]
        );
        assert_eq!(
            feed(&mut s, &msgs[1], true).warnings,
            vec![Warning::OutOfOrder { newest: 3 }]
        );
        assert_eq!(feed(&mut s, &msgs[3], true), CLEAN);
        // In history read on request, older messages are expected.
        let mut s = Streams::default();
        feed(&mut s, &msgs[3], false);
        assert_eq!(feed(&mut s, &msgs[0], false), CLEAN);
    }

    #[test]
    fn a_replay_is_not_shown_and_a_fork_is_flagged() {
        let msgs = stream(1, 3, [0; 32]);
        let mut s = Streams::default();
        feed(&mut s, &msgs[0], true);
        feed(&mut s, &msgs[1], true);
        let again = feed(&mut s, &msgs[1], true);
        assert_eq!(
            (again.show, again.warnings),
            (false, vec![Warning::Replayed])
        );
        // Another message in place 2 (the sender equivocates).
        let mut other = msgs[1];
        other.1 = [99; 32];
        assert_eq!(feed(&mut s, &other, true).warnings, vec![Warning::Forked]);
        // Place 3 naming something else than the message seen in place 2.
        let mut wrong = msgs[2];
        wrong.0.prev = [98; 32];
        assert_eq!(feed(&mut s, &wrong, true).warnings, vec![Warning::Forked]);
    }

    #[test]
    fn what_is_saved_carries_gaps_across_restarts_but_not_replays() {
        let msgs = stream(1, 4, [0; 32]);
        let mut s = Streams::default();
        feed(&mut s, &msgs[0], true);
        feed(&mut s, &msgs[1], true);
        let json = serde_json::to_string(&s.save()).unwrap();
        let mut again = Streams::restore(serde_json::from_str(&json).unwrap());
        // Reconnecting replays recent history: already-seen, no warning.
        assert_eq!(feed(&mut again, &msgs[1], false), CLEAN);
        assert_eq!(
            feed(&mut again, &msgs[3], true).warnings,
            vec![Warning::Gap { missing: 1 }]
        );
    }

    #[test]
    fn devices_are_separate_streams_and_memberships_are_compared() {
        let mut s = Streams::default();
        let (laptop, phone) = (stream(1, 2, [5; 32]), stream(2, 2, [5; 32]));
        for m in [&laptop[0], &phone[0], &laptop[1], &phone[1]] {
            assert_eq!(feed(&mut s, m, true), CLEAN);
        }
        s.saw_membership(Revision(3), [6; 32]);
        let other = stream(3, 1, [5; 32]);
        assert_eq!(
            feed(&mut s, &other[0], true).warnings,
            vec![Warning::MembershipDiffers {
                revision: Revision(3)
            }]
        );
        let v1 = s.observe(alice(), Revision(3), None, [0; 32], true);
        assert_eq!(v1.warnings, vec![Warning::Unsequenced]);
    }

    #[test]
    fn replay_memory_is_bounded() {
        let mut s = Streams::default();
        let msgs = stream(1, 5000, [0; 32]);
        for m in &msgs {
            feed(&mut s, m, true);
        }
        assert_eq!(s.shown.len(), SHOWN_MAX);
        assert_eq!(s.shown_order.len(), SHOWN_MAX);
    }
}
