//! Handles: a user's name, derived from their key.

use std::fmt;
use std::str::FromStr;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use sha2::{Digest, Sha256};

use crate::ParseError;

/// Length of a handle in its textual form.
pub const HANDLE_CHARS: usize = 43;

/// A user's handle: SHA-256 over the big-endian bytes of their RSA modulus.
///
/// Written as 43 characters of unpadded base64url. Because it is a hash of
/// the key, a server cannot substitute another key for a handle without the
/// client noticing.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Handle([u8; 32]);

impl Handle {
    /// The handle of an RSA modulus given as big-endian bytes without
    /// leading zeros.
    pub fn of_modulus(modulus_be: &[u8]) -> Handle {
        let start = modulus_be
            .iter()
            .position(|b| *b != 0)
            .unwrap_or(modulus_be.len());
        Handle(Sha256::digest(&modulus_be[start..]).into())
    }

    /// The raw 32 bytes.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// Builds a handle from its raw bytes.
    pub fn from_bytes(bytes: [u8; 32]) -> Handle {
        Handle(bytes)
    }
}

impl FromStr for Handle {
    type Err = ParseError;

    fn from_str(s: &str) -> Result<Handle, ParseError> {
        if s.len() != HANDLE_CHARS {
            return Err(ParseError::Handle);
        }
        let raw = URL_SAFE_NO_PAD.decode(s).map_err(|_| ParseError::Handle)?;
        let bytes: [u8; 32] = raw.try_into().map_err(|_| ParseError::Handle)?;
        // Reject non-canonical spellings (stray low bits in the last
        // character) so that one handle has exactly one textual form.
        if URL_SAFE_NO_PAD.encode(bytes) != s {
            return Err(ParseError::Handle);
        }
        Ok(Handle(bytes))
    }
}

impl fmt::Display for Handle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&URL_SAFE_NO_PAD.encode(self.0))
    }
}

impl fmt::Debug for Handle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Handle({self})")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn handles_round_trip_and_reject_bad_text() {
        let h = Handle::of_modulus(&[7, 1, 2, 3]);
        let text = h.to_string();
        assert_eq!(text.len(), HANDLE_CHARS);
        assert_eq!(text.parse::<Handle>(), Ok(h));
        assert_eq!(
            "BpB1m-4nZG6rMyPRVO8m7AbPvpjU7YUZIFy4ab1ve4M"
                .parse::<Handle>()
                .map(|h| h.to_string())
                .as_deref(),
            Ok("BpB1m-4nZG6rMyPRVO8m7AbPvpjU7YUZIFy4ab1ve4M")
        );
        for bad in [
            "",
            "short",
            "BpB1m-4nZG6rMyPRVO8m7AbPvpjU7YUZIFy4ab1ve4", // 42
            "BpB1m-4nZG6rMyPRVO8m7AbPvpjU7YUZIFy4ab1ve4M=",
            "BpB1m+4nZG6rMyPRVO8m7AbPvpjU7YUZIFy4ab1ve4M", // not url-safe
            "BpB1m-4nZG6rMyPRVO8m7AbPvpjU7YUZIFy4ab1ve4N", // stray low bits
        ] {
            assert_eq!(bad.parse::<Handle>(), Err(ParseError::Handle), "{bad:?}");
        }
    }

    #[test]
    fn leading_zero_bytes_do_not_change_the_handle() {
        assert_eq!(
            Handle::of_modulus(&[0, 0, 9, 8]),
            Handle::of_modulus(&[9, 8])
        );
    }
}
