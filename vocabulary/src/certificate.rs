//! A server certificate's fingerprint, which a client can pin.
//!
//! A node serving TLS with a certificate no public CA signed (the
//! self-signed one it makes for development) logs this fingerprint; the
//! CLI accepts exactly that certificate when given it. The text form is
//! `sha256:` and 64 lowercase hex digits of SHA-256 over the certificate's
//! DER. Parsing also takes uppercase and `:`-separated pairs, as
//! `openssl x509 -noout -fingerprint -sha256` prints them.

use std::fmt;
use std::str::FromStr;

use sha2::{Digest, Sha256};

use crate::ParseError;

/// The prefix naming the hash.
const PREFIX: &str = "sha256:";

/// SHA-256 of a certificate's DER.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct CertificateFingerprint([u8; 32]);

impl CertificateFingerprint {
    /// The fingerprint of a DER-encoded certificate.
    pub fn of(der: &[u8]) -> CertificateFingerprint {
        CertificateFingerprint(Sha256::digest(der).into())
    }
}

impl fmt::Display for CertificateFingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(PREFIX)?;
        self.0.iter().try_for_each(|b| write!(f, "{b:02x}"))
    }
}

impl FromStr for CertificateFingerprint {
    type Err = ParseError;

    fn from_str(text: &str) -> Result<CertificateFingerprint, ParseError> {
        let text = text.trim();
        let hex = match text.get(..PREFIX.len()) {
            Some(p) if p.eq_ignore_ascii_case(PREFIX) => &text[PREFIX.len()..],
            _ => text,
        };
        let digits: Vec<u8> = hex.bytes().filter(|b| *b != b':').collect();
        if digits.len() != 64 {
            return Err(ParseError::CertificateFingerprint);
        }
        let mut out = [0u8; 32];
        for (byte, pair) in out.iter_mut().zip(digits.chunks(2)) {
            let pair = std::str::from_utf8(pair).map_err(|_| ParseError::CertificateFingerprint)?;
            *byte = u8::from_str_radix(pair, 16).map_err(|_| ParseError::CertificateFingerprint)?;
        }
        Ok(CertificateFingerprint(out))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_round_trips_and_openssl_form_parses() {
        let f = CertificateFingerprint::of(b"certificate");
        let text = f.to_string();
        assert!(
            text.starts_with("sha256:") && text.len() == 7 + 64,
            "{text}"
        );
        assert_eq!(text.parse::<CertificateFingerprint>(), Ok(f));
        let openssl: Vec<String> = text.as_bytes()[7..]
            .chunks(2)
            .map(|p| std::str::from_utf8(p).unwrap().to_uppercase())
            .collect();
        assert_eq!(openssl.join(":").parse::<CertificateFingerprint>(), Ok(f));
        assert_eq!(format!("SHA256:{}", &text[7..]).parse(), Ok(f));
    }

    #[test]
    fn junk_is_refused() {
        let good = CertificateFingerprint::of(b"x").to_string();
        for junk in [
            "",
            "sha256:",
            &good[..good.len() - 1],
            &format!("{good}0"),
            &format!("{}g", &good[..good.len() - 1]),
            "sha1:0123",
            &format!("{}é", &good[..good.len() - 2]),
        ] {
            assert!(junk.parse::<CertificateFingerprint>().is_err(), "{junk}");
        }
    }
}
