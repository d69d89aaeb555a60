//! Opening a sealed delivery (the per-recipient trimmed envelope a client
//! receives) never panics.

use bytes::Bytes;
use saferchat_vocabulary::Handle;

fn main() {
    let recipient = Handle::of_modulus(&[0xb0; 256]);
    afl::fuzz!(|data: &[u8]| {
        let _ = saferchat_envelope::sealed::open(Bytes::copy_from_slice(data), &recipient);
    });
}
