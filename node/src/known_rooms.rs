//! Which rooms exist, answered from memory.
//!
//! A Bloom filter of every room name this node has seen committed: "no"
//! is certain (for this node's knowledge), "yes" may be wrong at the chosen
//! rate and is then settled by the membership read. Joins and history
//! calls for rooms that do not exist — typos, scanners — therefore never
//! reach consensus or the disk. Rooms are never deleted, so the filter
//! never needs to forget.

use std::sync::Mutex;

use bloomfilter::Bloom;
use saferchat_consensus::RoomId;

/// Rooms the filter is sized for; beyond that its false-positive rate
/// rises gradually (nothing breaks).
pub const ROOMS_EXPECTED: usize = 1_000_000;
/// Target false-positive rate at that size.
const FALSE_POSITIVE_RATE: f64 = 0.01;

/// The filter.
pub struct KnownRooms {
    bloom: Mutex<Bloom<str>>,
}

impl std::fmt::Debug for KnownRooms {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("KnownRooms")
    }
}

impl Default for KnownRooms {
    fn default() -> KnownRooms {
        KnownRooms::new()
    }
}

impl KnownRooms {
    /// An empty filter (about 1.2 MB).
    pub fn new() -> KnownRooms {
        let bloom = Bloom::new_for_fp_rate(ROOMS_EXPECTED, FALSE_POSITIVE_RATE)
            .expect("valid bloom parameters");
        KnownRooms {
            bloom: Mutex::new(bloom),
        }
    }

    /// Records that `room` exists.
    pub fn insert(&self, room: &RoomId) {
        self.bloom.lock().expect("lock").set(room.as_str());
    }

    /// False only if `room` was never inserted.
    pub fn may_exist(&self, room: &RoomId) -> bool {
        self.bloom.lock().expect("lock").check(room.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inserted_rooms_are_known_and_most_others_are_not() {
        let k = KnownRooms::new();
        let aaa = RoomId::new("aaa").unwrap();
        assert!(!k.may_exist(&aaa));
        k.insert(&aaa);
        assert!(k.may_exist(&aaa));
        let false_positives = (0..10_000)
            .filter(|i| k.may_exist(&RoomId::new(&format!("unknown-{i}")).unwrap()))
            .count();
        assert!(false_positives < 100, "{false_positives}");
    }
}
