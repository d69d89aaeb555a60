//! Revisions: the counter of a room's membership changes.

use std::fmt;

/// The revision of a room's membership: the number of committed changes.
///
/// Every change that alters the membership produces the next revision; a
/// change that alters nothing (an idempotent add, a read) keeps it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Revision(pub u64);

impl Revision {
    /// The highest revision a room can reach: 2^62, unreachable in practice
    /// and a bound that keeps `+ 1` from overflowing and absurd peer frames
    /// out (the consensus crate bounds `Ballot::ROUND_MAX` the same way).
    pub const MAX: Revision = Revision(1 << 62);

    /// Whether the revision is within [`Revision::MAX`].
    pub fn is_sane(self) -> bool {
        self <= Self::MAX
    }

    /// The revision after this one.
    ///
    /// # Panics
    /// At [`Revision::MAX`]; the consensus crate's `apply` refuses changes
    /// there first.
    pub fn next(self) -> Revision {
        assert!(self < Self::MAX, "revision {self} is exhausted");
        Revision(self.0 + 1)
    }
}

impl fmt::Display for Revision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn revisions_count_up_to_the_bound() {
        assert_eq!(Revision::default().next(), Revision(1));
        assert_eq!(Revision(Revision::MAX.0 - 1).next(), Revision::MAX);
        assert!(Revision::MAX.is_sane());
        assert!(!Revision(Revision::MAX.0 + 1).is_sane());
        assert!(!Revision(u64::MAX).is_sane());
    }

    #[test]
    #[should_panic(expected = "exhausted")]
    fn the_last_revision_has_no_successor() {
        let _ = Revision::MAX.next();
    }
}
