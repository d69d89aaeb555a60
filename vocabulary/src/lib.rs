//! The nouns saferchat's crates share: which room, which user, which key,
//! which revision of a room's membership, and the limits on each.
//!
//! # Why a crate of its own
//!
//! The envelope crate validates posts against these types and limits, and
//! the consensus crate replicates them. Before this crate existed the
//! envelope crate depended on the consensus crate just to name them, which
//! pulled the Paxos register, leases and the partition log into every user
//! of the envelope format. Now both depend on this crate and neither on the
//! other; the consensus crate re-exports everything here at its old paths
//! (`saferchat_consensus::RoomId`, `saferchat_consensus::room::ROOM_MEMBERS_MAX`,
//! ...) so that its users need not care where a noun is defined.
//!
//! # Layout
//!
//! - [`room`]: [`RoomId`] and the limits of a room (name length, members).
//! - [`handle`]: [`Handle`], a user's name derived from their key.
//! - [`key`]: [`PublicKey`] and its display fingerprint.
//! - [`certificate`]: [`CertificateFingerprint`], what a client pins a
//!   node's TLS certificate by.
//! - [`revision`]: [`Revision`], the counter of membership changes.
//! - [`membership`]: [`Membership`], what a room's membership says at one
//!   revision, read-only. A trait rather than a struct because the value
//!   that carries a membership is the consensus crate's `RoomState`, the
//!   per-room Paxos register, which also holds register bookkeeping
//!   (whether the room was created, the ids of recently applied changes for
//!   deduplicating retries) that belongs with Paxos, not here.
//!
//! # What this crate never does
//!
//! No I/O, no keys, no cryptography beyond SHA-256 (a handle *is* a hash):
//! only values, their validation, and their textual forms.

pub mod certificate;
pub mod handle;
pub mod key;
pub mod membership;
pub mod revision;
pub mod room;

pub use certificate::CertificateFingerprint;
pub use handle::{HANDLE_CHARS, Handle};
pub use key::{PUBLIC_KEY_BYTES_MAX, PublicKey, fingerprint_of};
pub use membership::Membership;
pub use revision::Revision;
pub use room::{ROOM_MEMBERS_MAX, ROOM_NAME_BYTES_MAX, RoomId};

/// Why a name or handle could not be parsed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    /// Room names are 1 to 64 bytes of `A-Z a-z 0-9 . _ -`, not starting
    /// with `.` or `-`.
    #[error(
        "room name must be 1-{ROOM_NAME_BYTES_MAX} characters of A-Z a-z 0-9 . _ - and not start with . or -"
    )]
    RoomName,
    /// A handle is 43 characters of unpadded base64url encoding 32 bytes.
    #[error(
        "a user handle is {HANDLE_CHARS} characters of unpadded base64url (SHA-256 of the RSA modulus)"
    )]
    Handle,
    /// A certificate fingerprint is `sha256:` and 64 hex digits.
    #[error(
        "a certificate fingerprint is sha256: and 64 hex digits (SHA-256 of the certificate's DER, pairs may be separated by ':')"
    )]
    CertificateFingerprint,
}
