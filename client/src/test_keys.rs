//! Fixture identities for tests (feature `test-keys`): public, test-only
//! RSA keys, so test runs never pay for key generation.

use crate::keys::Identity;

const PEMS: [&str; 16] = [
    include_str!("test_keys/key00.pem"),
    include_str!("test_keys/key01.pem"),
    include_str!("test_keys/key02.pem"),
    include_str!("test_keys/key03.pem"),
    include_str!("test_keys/key04.pem"),
    include_str!("test_keys/key05.pem"),
    include_str!("test_keys/key06.pem"),
    include_str!("test_keys/key07.pem"),
    include_str!("test_keys/key08.pem"),
    include_str!("test_keys/key09.pem"),
    include_str!("test_keys/key10.pem"),
    include_str!("test_keys/key11.pem"),
    include_str!("test_keys/key12.pem"),
    include_str!("test_keys/key13.pem"),
    include_str!("test_keys/key14.pem"),
    include_str!("test_keys/key15.pem"),
];

/// How many fixture identities exist.
pub const COUNT: usize = PEMS.len();

/// The fixture identity number `n` (0-based).
///
/// # Panics
/// If `n >= COUNT`.
pub fn identity(n: usize) -> Identity {
    Identity::from_pem(PEMS[n]).expect("fixture keys are valid")
}

/// The PEM text of fixture `n`, e.g. to write a key file for a CLI test.
///
/// # Panics
/// If `n >= COUNT`.
pub fn pem(n: usize) -> &'static str {
    PEMS[n]
}
