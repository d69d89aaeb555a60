//! Packing deliveries into frames, bounded in count *and* bytes, and
//! sealing stored messages for one recipient. Shared by live delivery, the
//! history replayed on join and the History call.

use saferchat_consensus::Handle;
use saferchat_envelope::Envelope;
use saferchat_envelope::sealed::Fanout;
use saferchat_proto::chat as pb;

use crate::storage::StoredMessage;

/// Most deliveries in one frame.
pub const FRAME_ITEMS_MAX: usize = 64;
/// Most bytes of sealed envelopes in one frame (a frame may exceed it only
/// by its last item), far below what clients accept (1 MiB). Small because
/// a stream's encode buffer keeps the capacity of the largest frame it ever
/// sent for the rest of the session.
pub const FRAME_BYTES_MAX: usize = 64 * 1024;

/// Splits deliveries, in order, into frames of at most
/// [`FRAME_ITEMS_MAX`] items and about [`FRAME_BYTES_MAX`] bytes.
pub fn pack(items: impl IntoIterator<Item = pb::Delivery>) -> Vec<Vec<pb::Delivery>> {
    let mut frames = Vec::new();
    let mut current: Vec<pb::Delivery> = Vec::new();
    let mut bytes = 0;
    for item in items {
        let size = item.sealed.len() + item.id.len() + 16;
        if !current.is_empty()
            && (current.len() == FRAME_ITEMS_MAX || bytes + size > FRAME_BYTES_MAX)
        {
            frames.push(std::mem::take(&mut current));
            bytes = 0;
        }
        bytes += size;
        current.push(item);
    }
    if !current.is_empty() {
        frames.push(current);
    }
    frames
}

/// The delivery of a stored message to `user`, if it was wrapped for them
/// (messages from before they joined were not).
pub fn seal_stored(message: &StoredMessage, user: &Handle) -> Option<pb::Delivery> {
    let envelope = match Envelope::decode(message.envelope.clone()) {
        Ok(e) => e,
        Err(e) => {
            tracing::error!(room = %message.room, id = %message.id, error = %e, "stored envelope does not decode");
            return None;
        }
    };
    Some(pb::Delivery {
        id: bytes::Bytes::copy_from_slice(&message.id.to_bytes()),
        time_ms: message.id.time_ms(),
        sealed: Fanout::new(&envelope).sealed_for_recipient(user)?,
        seq: message.seq,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn item(len: usize) -> pb::Delivery {
        pb::Delivery {
            id: bytes::Bytes::from(vec![0; 16]),
            time_ms: 0,
            sealed: bytes::Bytes::from(vec![1; len]),
            seq: 0,
        }
    }

    #[test]
    fn frames_are_bounded_in_items_and_bytes_and_keep_order() {
        assert!(pack(Vec::new()).is_empty());
        let small = pack((0..130).map(|_| item(100)));
        assert_eq!(
            small.iter().map(Vec::len).collect::<Vec<_>>(),
            vec![64, 64, 2]
        );
        let big = pack((0..20).map(|i| item(60_000 + i)));
        assert!(big.len() > 2);
        for frame in &big {
            let bytes: usize = frame.iter().map(|d| d.sealed.len()).sum();
            assert!(bytes <= FRAME_BYTES_MAX, "{bytes}");
        }
        let sizes: Vec<usize> = big.into_iter().flatten().map(|d| d.sealed.len()).collect();
        assert_eq!(sizes, (0..20).map(|i| 60_000 + i).collect::<Vec<_>>());
        // One oversized item still gets its own frame.
        assert_eq!(pack([item(FRAME_BYTES_MAX * 2)]).len(), 1);
    }
}
