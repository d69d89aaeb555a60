//! Rooms to partitions: a fixed hash of the room name, and partitions as
//! equal ranges of the hash space.
//!
//! `room_hash(name)` is the first 8 bytes, big endian, of SHA-256 over the
//! UTF-8 bytes of the room name (no prefix, no length). With `P`
//! partitions, partition `p` covers hashes `[p·2^64/P, (p+1)·2^64/P)`, so
//! a room's partition is `⌊room_hash · P / 2^64⌋`. Both are part of the
//! protocol: every node of every version computes them this way, and
//! `tests/vectors.rs` pins them. Ranges (rather than `hash mod P`) keep a
//! partition a contiguous slice of the space, which a later split into
//! `2P` partitions halves without moving a room to an unrelated partition.

use std::fmt;

use crate::stable_hash::hash_bytes;

/// The hash that places a room.
pub fn room_hash(room: &str) -> u64 {
    hash_bytes(&[room.as_bytes()])
}

/// How many partitions a cluster has; fixed when the cluster is created.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct PartitionCount(u32);

impl PartitionCount {
    /// The count a new cluster gets unless told otherwise: enough that a
    /// cluster of tens of nodes spreads evenly, few enough that
    /// per-partition state stays small.
    pub const DEFAULT: PartitionCount = PartitionCount(256);
    /// The largest supported count.
    pub const MAX: u32 = 65_536;

    /// A count of 1 to [`PartitionCount::MAX`].
    pub fn new(count: u32) -> Option<PartitionCount> {
        (1..=Self::MAX)
            .contains(&count)
            .then_some(PartitionCount(count))
    }

    /// The number.
    pub fn get(self) -> u32 {
        self.0
    }

    /// The partition that holds `hash`.
    pub fn of_hash(self, hash: u64) -> PartitionId {
        let p = (u128::from(hash) * u128::from(self.0)) >> 64;
        PartitionId(u32::try_from(p).expect("below the count"))
    }

    /// The partition of a room.
    pub fn of_room(self, room: &str) -> PartitionId {
        self.of_hash(room_hash(room))
    }

    /// The first and last hash of partition `p`.
    ///
    /// # Panics
    /// When `p` is not below the count.
    pub fn range(self, p: PartitionId) -> (u64, u64) {
        assert!(p.0 < self.0, "{p} is not below {}", self.0);
        let start = |i: u32| -> u128 { (u128::from(i) << 64).div_ceil(u128::from(self.0)) };
        let first = start(p.0);
        let last = start(p.0 + 1) - 1;
        (
            u64::try_from(first).expect("in range"),
            u64::try_from(last).expect("in range"),
        )
    }

    /// Every partition, in order.
    pub fn all(self) -> impl Iterator<Item = PartitionId> {
        (0..self.0).map(PartitionId)
    }
}

/// One partition.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PartitionId(pub u32);

impl fmt::Display for PartitionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "p{}", self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_tile_the_hash_space() {
        for count in [1, 3, 7, 256, 1000, 1024, PartitionCount::MAX] {
            let c = PartitionCount::new(count).unwrap();
            let mut next = 0u64;
            for p in c.all() {
                let (first, last) = c.range(p);
                assert_eq!(first, next, "count {count} {p}");
                assert_eq!(c.of_hash(first), p);
                assert_eq!(c.of_hash(last), p);
                next = last.wrapping_add(1);
            }
            assert_eq!(next, 0, "the last range ends at u64::MAX");
        }
    }

    #[test]
    fn counts_are_bounded() {
        assert!(PartitionCount::new(0).is_none());
        assert!(PartitionCount::new(PartitionCount::MAX + 1).is_none());
        assert_eq!(PartitionCount::DEFAULT.of_hash(u64::MAX), PartitionId(255));
    }

    #[test]
    fn doubling_the_count_splits_each_partition_in_two() {
        let (a, b) = (
            PartitionCount::new(256).unwrap(),
            PartitionCount::new(512).unwrap(),
        );
        for i in 0..2_000u32 {
            let h = room_hash(&format!("room-{i}"));
            assert_eq!(b.of_hash(h).0 / 2, a.of_hash(h).0);
        }
    }
}
