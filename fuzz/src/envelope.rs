//! Envelope decoding: never panics, and what decodes re-encodes to an
//! envelope that decodes to the same thing.

use bytes::Bytes;
use saferchat_envelope::Envelope;

fn main() {
    afl::fuzz!(|data: &[u8]| {
        if let Ok(envelope) = Envelope::decode(Bytes::copy_from_slice(data)) {
            let again = Envelope::decode(envelope.encode()).expect("a decoded envelope re-decodes");
            assert_eq!(again, envelope, "decode ∘ encode is the identity");
        }
    });
}
