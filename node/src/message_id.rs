//! Server-assigned message ids: UUIDv7, strictly increasing per room.
//!
//! A UUIDv7 starts with 48 bits of Unix milliseconds, so ids sort by time
//! as plain big-endian bytes (sled keys, Cassandra `uuid` columns read back
//! and ordered in the node). Within one millisecond the 74 bits after the
//! timestamp carry a counter (RFC 9562 §6.2 method 1) seeded randomly at
//! each new millisecond, so ids stay unique across restarts and strictly
//! increase even when the clock stalls or steps back.

use std::fmt;

use chrono::{DateTime, Datelike, Utc};

/// A message id.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct MessageId(u128);

/// Why bytes are not a message id.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("a message id is 16 bytes of UUIDv7")]
pub struct BadMessageId;

const VERSION_MASK: u128 = 0xF << 76;
const VERSION_7: u128 = 0x7 << 76;
const VARIANT_MASK: u128 = 0b11 << 62;
const VARIANT_RFC: u128 = 0b10 << 62;
/// The 12 bits after the version and the 62 bits after the variant.
const RAND_A_SHIFT: u32 = 64;
const RAND_B_BITS: u32 = 62;

impl MessageId {
    /// The id as 16 big-endian bytes.
    pub fn to_bytes(self) -> [u8; 16] {
        self.0.to_be_bytes()
    }

    /// Parses 16 bytes of UUIDv7.
    ///
    /// # Errors
    /// [`BadMessageId`] for any other length or UUID version.
    pub fn from_bytes(bytes: &[u8]) -> Result<MessageId, BadMessageId> {
        let raw: [u8; 16] = bytes.try_into().map_err(|_| BadMessageId)?;
        let v = u128::from_be_bytes(raw);
        if v & VERSION_MASK != VERSION_7 || v & VARIANT_MASK != VARIANT_RFC {
            return Err(BadMessageId);
        }
        Ok(MessageId(v))
    }

    /// Parses an optional id: empty bytes mean none.
    ///
    /// # Errors
    /// [`BadMessageId`] when non-empty and not an id.
    pub fn from_optional(bytes: &[u8]) -> Result<Option<MessageId>, BadMessageId> {
        if bytes.is_empty() {
            Ok(None)
        } else {
            MessageId::from_bytes(bytes).map(Some)
        }
    }

    /// Unix milliseconds of the post.
    pub fn time_ms(self) -> i64 {
        i64::try_from(self.0 >> 80).expect("48 bits fit")
    }

    /// The month partition this id belongs to.
    pub fn bucket(self) -> Bucket {
        Bucket::of_ms(self.time_ms())
    }

    /// As a `uuid::Uuid`.
    pub fn to_uuid(self) -> uuid::Uuid {
        uuid::Uuid::from_u128(self.0)
    }

    /// From a `uuid::Uuid`.
    ///
    /// # Errors
    /// [`BadMessageId`] if it is not a v7 UUID.
    pub fn from_uuid(u: uuid::Uuid) -> Result<MessageId, BadMessageId> {
        MessageId::from_bytes(u.as_bytes())
    }

    /// The smallest id of a millisecond (for range bounds).
    pub fn floor_of_ms(ms: i64) -> MessageId {
        let ms = u128::try_from(ms.max(0)).expect("non-negative") & ((1 << 48) - 1);
        MessageId((ms << 80) | VERSION_7 | VARIANT_RFC)
    }

    /// The smallest id greater than this one (`None` past the last
    /// millisecond of the 48-bit clock, in the year 10889): where a read
    /// that must include this id ends.
    pub fn successor(self) -> Option<MessageId> {
        let ms = u64::try_from(self.time_ms()).expect("48 bits");
        if self.counter() < COUNTER_MAX {
            Some(MessageId::compose(ms, self.counter() + 1))
        } else if ms < (1 << 48) - 1 {
            Some(MessageId::compose(ms + 1, 0))
        } else {
            None
        }
    }

    fn counter(self) -> u128 {
        let rand_a = (self.0 >> RAND_A_SHIFT) & 0xFFF;
        let rand_b = self.0 & ((1 << RAND_B_BITS) - 1);
        (rand_a << RAND_B_BITS) | rand_b
    }

    fn compose(ms: u64, counter: u128) -> MessageId {
        let rand_a = (counter >> RAND_B_BITS) & 0xFFF;
        let rand_b = counter & ((1 << RAND_B_BITS) - 1);
        MessageId(
            (u128::from(ms) << 80) | VERSION_7 | (rand_a << RAND_A_SHIFT) | VARIANT_RFC | rand_b,
        )
    }
}

impl fmt::Display for MessageId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.to_uuid())
    }
}

impl fmt::Debug for MessageId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "MessageId({})", self.to_uuid())
    }
}

/// Hands out strictly increasing ids for one room.
#[derive(Debug, Default)]
pub struct IdGenerator {
    last: Option<MessageId>,
}

/// Counter values at or above this start the next millisecond instead, so
/// a random seed always leaves room for 2^60 increments.
const COUNTER_SEED_MAX: u128 = 1 << 60;
const COUNTER_MAX: u128 = (1 << 74) - 1;

impl IdGenerator {
    /// A generator that will only issue ids after `last` (the newest stored
    /// id of the room, read back on activation).
    pub fn after(last: Option<MessageId>) -> IdGenerator {
        IdGenerator { last }
    }

    /// The next id at wall-clock time `now_ms`, with `seed` as the fresh
    /// randomness for a new millisecond.
    pub fn next(&mut self, now_ms: i64, seed: u64) -> MessageId {
        let now = u64::try_from(now_ms.max(0)).expect("non-negative") & ((1 << 48) - 1);
        let id = match self.last {
            Some(last) if u64::try_from(last.time_ms()).expect("48 bits") >= now => last
                .successor()
                .expect("message ids last until the year 10889"),
            _ => MessageId::compose(now, u128::from(seed) % COUNTER_SEED_MAX),
        };
        assert!(
            self.last.is_none_or(|last| id > last),
            "message ids must increase"
        );
        self.last = Some(id);
        id
    }

    /// The last id issued (or the one this generator started after).
    pub fn last(&self) -> Option<MessageId> {
        self.last
    }
}

/// A month partition of a room's timeline, `yyyy-MM` in UTC.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Bucket {
    /// Year.
    pub year: i32,
    /// Month, 1-12.
    pub month: u32,
}

impl Bucket {
    /// The bucket of a Unix millisecond.
    pub fn of_ms(ms: i64) -> Bucket {
        let t = DateTime::<Utc>::from_timestamp_millis(ms).unwrap_or_default();
        Bucket {
            year: t.year(),
            month: t.month(),
        }
    }

    /// Parses `yyyy-MM`.
    pub fn parse(text: &str) -> Option<Bucket> {
        let (y, m) = text.split_once('-')?;
        let (year, month) = (y.parse().ok()?, m.parse().ok()?);
        (m.len() == 2 && (1..=12).contains(&month)).then_some(Bucket { year, month })
    }
}

impl fmt::Display for Bucket {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:04}-{:02}", self.year, self.month)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOV_2026: i64 = 1_795_000_000_000; // 2026-11-18

    #[test]
    fn ids_are_uuid_v7_and_carry_their_time() {
        let mut g = IdGenerator::default();
        let id = g.next(NOV_2026, 42);
        assert_eq!(id.to_uuid().get_version_num(), 7);
        assert_eq!(id.time_ms(), NOV_2026);
        assert_eq!(MessageId::from_bytes(&id.to_bytes()), Ok(id));
        assert_eq!(MessageId::from_uuid(id.to_uuid()), Ok(id));
        assert_eq!(id.bucket().to_string(), "2026-11");
    }

    #[test]
    fn ids_increase_when_the_clock_stalls_or_steps_back() {
        let mut g = IdGenerator::default();
        let mut prev = g.next(NOV_2026, u64::MAX);
        for (i, now) in [
            NOV_2026,
            NOV_2026,
            NOV_2026 - 5_000,
            NOV_2026 + 1,
            NOV_2026 + 1,
        ]
        .into_iter()
        .enumerate()
        {
            let id = g.next(now, i as u64 * 7919);
            assert!(id > prev);
            assert!(id.to_bytes() > prev.to_bytes(), "byte order is id order");
            prev = id;
        }
    }

    #[test]
    fn a_restarted_generator_continues_after_the_stored_id() {
        let mut g = IdGenerator::default();
        let last = g.next(NOV_2026 + 10_000, 3);
        let mut restarted = IdGenerator::after(Some(last));
        assert!(
            restarted.next(NOV_2026, 0) > last,
            "even with a clock behind the stored id"
        );
    }

    #[test]
    fn counter_overflow_moves_to_the_next_millisecond() {
        let last = MessageId::compose(1000, COUNTER_MAX);
        let mut g = IdGenerator::after(Some(last));
        let id = g.next(1000, 0);
        assert_eq!(id.time_ms(), 1001);
        assert!(id > last);
    }

    #[test]
    fn a_successor_is_the_next_id_in_order() {
        let id = MessageId::compose(1000, 41);
        assert_eq!(id.successor(), Some(MessageId::compose(1000, 42)));
        let full = MessageId::compose(1000, COUNTER_MAX);
        assert_eq!(full.successor(), Some(MessageId::compose(1001, 0)));
        // The counter carries from `rand_b` into `rand_a`, over the
        // variant bits between them.
        let across = MessageId::compose(1000, (1 << RAND_B_BITS) - 1);
        let next = across.successor().unwrap();
        assert!(next > across);
        assert_eq!(next, MessageId::compose(1000, 1 << RAND_B_BITS));
        assert_eq!(MessageId::from_bytes(&next.to_bytes()), Ok(next));
        assert_eq!(
            MessageId::compose((1 << 48) - 1, COUNTER_MAX).successor(),
            None
        );
    }

    #[test]
    fn bad_bytes_are_not_ids() {
        assert_eq!(MessageId::from_bytes(&[0; 15]), Err(BadMessageId));
        assert_eq!(
            MessageId::from_bytes(uuid::Uuid::new_v4().as_bytes()),
            Err(BadMessageId)
        );
        assert_eq!(MessageId::from_optional(&[]), Ok(None));
    }

    #[test]
    fn buckets_are_utc_months() {
        assert_eq!(Bucket::of_ms(0).to_string(), "1970-01");
        // 2026-11-30T23:59:59.999Z and one millisecond later.
        let end_of_nov = 1_796_083_199_999;
        assert_eq!(Bucket::of_ms(end_of_nov).to_string(), "2026-11");
        assert_eq!(Bucket::of_ms(end_of_nov + 1).to_string(), "2026-12");
        assert!(Bucket::of_ms(end_of_nov) < Bucket::of_ms(end_of_nov + 1));
        assert_eq!(
            Bucket::parse("2026-12"),
            Some(Bucket {
                year: 2026,
                month: 12
            })
        );
        assert_eq!(Bucket::parse("2026-13"), None);
        assert_eq!(Bucket::parse("2026-1"), None);
    }
}
