//! A read-only view of a room's membership at one revision.

use std::sync::Arc;

use crate::{Handle, PublicKey, Revision};

/// What a room's membership says at one revision: who may post, and for
/// whom a post must wrap its content key.
///
/// The consensus crate's `RoomState` (the value of the per-room Paxos
/// register) implements it; code that only checks posts against a
/// membership, like the envelope crate's `check_membership`, takes any
/// `Membership` and so does not depend on Paxos. See the crate
/// documentation for why this is a trait and not the value itself.
pub trait Membership {
    /// The revision this membership is at.
    fn revision(&self) -> Revision;

    /// The key `handle` registered, or `None` when `handle` is not a
    /// member or is a member that has not registered a key yet.
    fn key_of(&self, handle: &Handle) -> Option<&PublicKey>;

    /// The members that have registered a key, in strictly increasing
    /// handle order: the recipients every post at [`Membership::revision`]
    /// must wrap its content key for.
    fn recipients(&self) -> impl Iterator<Item = (&Handle, &PublicKey)>;
}

/// Deref coercion does not reach through a generic parameter, so callers
/// holding `&&State` would otherwise have to dereference by hand.
impl<M: Membership> Membership for &M {
    fn revision(&self) -> Revision {
        (**self).revision()
    }

    fn key_of(&self, handle: &Handle) -> Option<&PublicKey> {
        (**self).key_of(handle)
    }

    fn recipients(&self) -> impl Iterator<Item = (&Handle, &PublicKey)> {
        (**self).recipients()
    }
}

/// Memberships are shared as `Arc`s between the node's lease views and its
/// room actors; this lets them pass `&Arc<State>` where a membership is
/// expected, as they could when the check took the concrete state.
impl<M: Membership> Membership for Arc<M> {
    fn revision(&self) -> Revision {
        (**self).revision()
    }

    fn key_of(&self, handle: &Handle) -> Option<&PublicKey> {
        (**self).key_of(handle)
    }

    fn recipients(&self) -> impl Iterator<Item = (&Handle, &PublicKey)> {
        (**self).recipients()
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use bytes::Bytes;

    use super::*;

    struct Members(Revision, BTreeMap<Handle, Option<PublicKey>>);

    impl Membership for Members {
        fn revision(&self) -> Revision {
            self.0
        }

        fn key_of(&self, handle: &Handle) -> Option<&PublicKey> {
            self.1.get(handle)?.as_ref()
        }

        fn recipients(&self) -> impl Iterator<Item = (&Handle, &PublicKey)> {
            self.1
                .iter()
                .filter_map(|(h, k)| k.as_ref().map(|k| (h, k)))
        }
    }

    fn revision_and_recipients(m: &impl Membership) -> (Revision, Vec<Handle>) {
        (m.revision(), m.recipients().map(|(h, _)| *h).collect())
    }

    #[test]
    fn references_and_arcs_read_through() {
        let (a, b) = (Handle::of_modulus(b"a"), Handle::of_modulus(b"b"));
        let key = PublicKey::new(Bytes::from_static(b"key"));
        let members = Members(
            Revision(3),
            BTreeMap::from([(a, Some(key.clone())), (b, None)]),
        );
        let expected = (Revision(3), vec![a]);
        assert_eq!(revision_and_recipients(&members), expected);
        assert_eq!(revision_and_recipients(&&members), expected);
        let shared = Arc::new(members);
        assert_eq!(revision_and_recipients(&shared), expected);
        assert_eq!(shared.key_of(&a), Some(&key));
        assert_eq!(shared.key_of(&b), None);
        assert_eq!(shared.key_of(&Handle::of_modulus(b"c")), None);
    }
}
