//! A `std::hash::Hasher` whose output is fixed forever: SHA-256 of the
//! bytes written, first 8 bytes big endian.
//!
//! `hashring` places nodes and keys with `std::hash`; its default hasher is
//! Rust's `DefaultHasher`, whose algorithm the standard library may change
//! in any release. Placement must agree between every binary of a cluster,
//! including two versions during a rolling upgrade, so the ring uses this
//! hasher, and the keys hashed through it ([`crate::ring`]'s virtual nodes
//! and partition keys) write explicit big-endian bytes rather than relying
//! on derived `Hash` impls (whose byte layout is not a stable contract
//! either).

use std::hash::{BuildHasher, Hasher};

use sha2::{Digest, Sha256};

/// Builds [`StableHasher`]s.
#[derive(Clone, Copy, Debug, Default)]
pub struct StableHash;

impl BuildHasher for StableHash {
    type Hasher = StableHasher;

    fn build_hasher(&self) -> StableHasher {
        StableHasher(Sha256::new())
    }
}

/// SHA-256 over everything written; [`Hasher::finish`] takes the first 8
/// bytes, big endian.
#[derive(Clone, Debug)]
pub struct StableHasher(Sha256);

impl Hasher for StableHasher {
    fn write(&mut self, bytes: &[u8]) {
        self.0.update(bytes);
    }

    fn finish(&self) -> u64 {
        let digest = self.0.clone().finalize();
        u64::from_be_bytes(digest[..8].try_into().expect("8 bytes"))
    }
}

/// The first 8 bytes (big endian) of SHA-256 over `parts`, concatenated.
pub fn hash_bytes(parts: &[&[u8]]) -> u64 {
    let mut hasher = StableHash.build_hasher();
    for part in parts {
        hasher.write(part);
    }
    hasher.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn is_sha256_truncated() {
        // SHA-256("abc") = ba7816bf 8f01cfea ...
        assert_eq!(hash_bytes(&[b"abc"]), 0xba78_16bf_8f01_cfea);
        assert_eq!(hash_bytes(&[b"a", b"bc"]), 0xba78_16bf_8f01_cfea);
    }
}
