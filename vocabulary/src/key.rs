//! Members' public keys, as opaque bytes with a display fingerprint.

use std::fmt;

use bytes::Bytes;
use sha2::{Digest, Sha256};

/// Largest public key (SubjectPublicKeyInfo DER) a member may register. An
/// RSA-2048 key is 294 bytes; 4096-bit keys would still fit.
pub const PUBLIC_KEY_BYTES_MAX: usize = 1024;

/// A member's public key as SubjectPublicKeyInfo DER. Opaque here: the node
/// checks that it parses and hashes to the member's handle before it
/// proposes registering it (the consensus crate's `Change::RegisterKey`).
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct PublicKey(Bytes);

impl PublicKey {
    /// Wraps DER bytes.
    ///
    /// # Panics
    /// If the key is empty or longer than [`PUBLIC_KEY_BYTES_MAX`]; callers
    /// validate input before building one.
    pub fn new(der: Bytes) -> PublicKey {
        assert!(!der.is_empty() && der.len() <= PUBLIC_KEY_BYTES_MAX);
        PublicKey(der)
    }

    /// The DER bytes.
    pub fn der(&self) -> &Bytes {
        &self.0
    }

    /// A short, human-comparable fingerprint: the first 16 bytes of
    /// SHA-256 over the DER, as eight groups of four hex digits.
    pub fn fingerprint(&self) -> String {
        fingerprint_of(&self.0)
    }
}

/// The display fingerprint of SubjectPublicKeyInfo DER bytes.
pub fn fingerprint_of(der: &[u8]) -> String {
    let digest = Sha256::digest(der);
    digest[..16]
        .chunks(2)
        .map(|pair| format!("{:02x}{:02x}", pair[0], pair[1]))
        .collect::<Vec<_>>()
        .join(" ")
}

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PublicKey({})", self.fingerprint())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprints_are_eight_groups_of_sha256() {
        // SHA-256("abc") = ba7816bf 8f01cfea 414140de 5dae2223 ...
        let key = PublicKey::new(Bytes::from_static(b"abc"));
        assert_eq!(key.fingerprint(), "ba78 16bf 8f01 cfea 4141 40de 5dae 2223");
        assert_eq!(
            format!("{key:?}"),
            format!("PublicKey({})", key.fingerprint())
        );
    }

    #[test]
    #[should_panic]
    fn keys_over_the_limit_are_refused() {
        let _ = PublicKey::new(Bytes::from(vec![1; PUBLIC_KEY_BYTES_MAX + 1]));
    }
}
