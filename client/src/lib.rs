//! The saferchat client: end-to-end crypto, a typed client, the CLI.
//!
//! # Layout
//!
//! - [`keys`]: a user's RSA-2048 identity, its handle and key file.
//! - [`crypto`]: sealing a message for every member (envelope v1.1) and
//!   opening one: verify, unwrap, check the key commitment, decrypt — in
//!   that order.
//! - [`session`]: joining a room and talking in it.
//! - [`streams`]: a recipient's checks on each sender device's stream
//!   (gaps, replays, reordering, forks, differing member lists).
//! - [`device`]: this installation's device id and state, beside the key.
//! - [`verify`]: safety numbers and room fingerprints to compare out of band.
//! - [`admin`]: the admin face.
//! - [`history`]: stored messages through the History call.
//! - [`connect`]: channels and redirects.
//! - [`test_keys`] (feature `test-keys`): fixture identities for tests.
//!
//! Private keys and plaintext never leave this crate's process: the server
//! receives public keys, signatures and ciphertext only.

pub mod admin;
pub mod connect;
pub mod crypto;
pub mod device;
pub mod error;
pub mod history;
pub mod keys;
pub mod session;
pub mod streams;
#[cfg(any(test, feature = "test-keys"))]
pub mod test_keys;
pub mod verify;

pub use error::ClientError;
pub use keys::Identity;
pub use session::{Event, JoinOptions, Members, Message, Session};
