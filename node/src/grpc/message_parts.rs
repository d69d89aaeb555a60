//! Peer messages too large for one frame, cut into parts and joined again.
//!
//! A partition handover carries every room of the partition in one message:
//! a sealed replica's answer and the mover's transfer must each be taken
//! whole (`saferchat_consensus::handover`), and a partition of many large
//! rooms outgrows the frame the peer listener decodes. Rather than make
//! the consensus core page its messages (and argue again that a half-taken
//! transfer is safe), the transport cuts such a message into parts, each
//! sent in a frame of its own, and the receiver joins them before it
//! decodes anything: the core still sees one message, whole or not at all.
//! gRPC has no way to stream one message in pieces, hence these few lines.
//!
//! The parts of a message leave the link's queue as one item, so they
//! arrive in order with nothing between them: a receiver holds at most one
//! message being joined per stream, and refuses a stream that breaks that
//! order. A stream that breaks loses the message being joined, as it loses
//! whatever else was queued; the handover resends.

use bytes::Bytes;
use prost::Message as _;
use saferchat_proto::peer as pb;

/// The size of every part but the last.
pub const PART_BYTES: usize = 4 * 1024 * 1024;
/// The largest frame sent in parts: what a receiver buffers at most per
/// stream while it joins. A partition's membership state beyond this
/// cannot move (about 800,000 room memberships with 2048-bit keys).
pub const SPLIT_FRAME_BYTES_MAX: usize = 256 * 1024 * 1024;
/// The largest message sent in parts: the frame around it adds a field
/// tag and a length (at most 6 bytes) to [`SPLIT_FRAME_BYTES_MAX`]'s share.
pub const SPLIT_MESSAGE_BYTES_MAX: usize = SPLIT_FRAME_BYTES_MAX - 16;
/// The most parts one message can have.
const PARTS_MAX: usize = SPLIT_FRAME_BYTES_MAX / PART_BYTES;
const _: () = assert!(PARTS_MAX * PART_BYTES == SPLIT_FRAME_BYTES_MAX);

/// Cuts `frame` (one message, `from` 0) into parts numbered `message`, of
/// [`PART_BYTES`] each but the last.
///
/// # Panics
/// When the frame is larger than [`SPLIT_FRAME_BYTES_MAX`]: the sender
/// checks that before it encodes.
pub fn split(message: u64, frame: &pb::PeerFrame) -> Vec<pb::MessagePart> {
    split_in(message, frame, PART_BYTES)
}

/// [`split`] into parts of `part_bytes` (at most [`PART_BYTES`]; more when
/// the frame would otherwise need more parts than a receiver joins): a
/// test build cuts small messages into several parts with it.
///
/// # Panics
/// As [`split`].
pub fn split_in(message: u64, frame: &pb::PeerFrame, part_bytes: usize) -> Vec<pb::MessagePart> {
    let bytes = Bytes::from(frame.encode_to_vec());
    assert!(
        bytes.len() <= SPLIT_FRAME_BYTES_MAX,
        "split frame too large"
    );
    let part = part_bytes
        .clamp(1, PART_BYTES)
        .max(bytes.len().div_ceil(PARTS_MAX));
    let count = bytes.len().div_ceil(part).max(1);
    (0..count)
        .map(|index| pb::MessagePart {
            message,
            index: index as u32,
            count: count as u32,
            piece: bytes.slice(index * part..((index + 1) * part).min(bytes.len())),
        })
        .collect()
}

/// The message being joined on one stream.
#[derive(Debug, Default)]
pub struct Joining {
    current: Option<Partial>,
}

#[derive(Debug)]
struct Partial {
    message: u64,
    count: u32,
    next: u32,
    bytes: Vec<u8>,
}

impl Joining {
    /// Takes the next part received; the frame the parts make once this
    /// was the last.
    ///
    /// # Errors
    /// A description of what is wrong with the part (the caller ends the
    /// stream): out of order, of another message before this one is
    /// whole, too large, or joining into something that is not a frame of
    /// one message.
    pub fn push(&mut self, part: pb::MessagePart) -> Result<Option<pb::PeerFrame>, String> {
        let partial = match self.current.take() {
            None => {
                if part.index != 0 {
                    return Err(format!(
                        "part {} of message {} without the parts before it",
                        part.index, part.message
                    ));
                }
                if part.count == 0 || part.count as usize > PARTS_MAX {
                    return Err(format!(
                        "message {} in {} parts (1 to {PARTS_MAX})",
                        part.message, part.count
                    ));
                }
                Partial {
                    message: part.message,
                    count: part.count,
                    next: 0,
                    bytes: Vec::new(),
                }
            }
            Some(partial) => {
                if part.message != partial.message
                    || part.index != partial.next
                    || part.count != partial.count
                {
                    return Err(format!(
                        "part {}/{} of message {} while part {}/{} of message {} was due",
                        part.index,
                        part.count,
                        part.message,
                        partial.next,
                        partial.count,
                        partial.message
                    ));
                }
                partial
            }
        };
        let Partial {
            message,
            count,
            next,
            mut bytes,
        } = partial;
        // With at most PARTS_MAX parts, this bounds the whole too.
        if part.piece.len() > PART_BYTES {
            return Err(format!(
                "message {message}: a part of {} bytes is too large",
                part.piece.len()
            ));
        }
        bytes.extend_from_slice(&part.piece);
        if next + 1 < count {
            self.current = Some(Partial {
                message,
                count,
                next: next + 1,
                bytes,
            });
            return Ok(None);
        }
        let frame = pb::PeerFrame::decode(bytes.as_slice())
            .map_err(|e| format!("message {message}: its parts make no frame: {e}"))?;
        if frame.part.is_some() {
            return Err(format!("message {message}: a part inside a part"));
        }
        Ok(Some(frame))
    }

    /// Whether a message is half joined.
    pub fn is_joining(&self) -> bool {
        self.current.is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(bytes: usize) -> pb::PeerFrame {
        pb::PeerFrame {
            handover: vec![pb::HandoverMessage {
                partition: 7,
                body: Some(pb::handover_message::Body::Transfer(pb::HandoverTransfer {
                    ballot: Some(pb::Ballot {
                        epoch: 3,
                        round: 0,
                        node: 2,
                    }),
                    rooms: (0..bytes / 1000)
                        .map(|i| pb::TransferredRoom {
                            room: format!("room-{i:06}-{}", "x".repeat(980)),
                            value: None,
                        })
                        .collect(),
                })),
            }],
            ..pb::PeerFrame::default()
        }
    }

    fn join(parts: Vec<pb::MessagePart>) -> Result<Vec<pb::PeerFrame>, String> {
        let mut joining = Joining::default();
        let mut out = Vec::new();
        for part in parts {
            out.extend(joining.push(part)?);
        }
        assert!(!joining.is_joining());
        Ok(out)
    }

    #[test]
    fn a_split_frame_joins_back_to_itself() {
        for size in [
            10,
            PART_BYTES - 500,
            PART_BYTES + 1,
            3 * PART_BYTES + 17_000,
        ] {
            let whole = frame(size);
            let parts = split(9, &whole);
            assert_eq!(parts.len(), whole.encoded_len().div_ceil(PART_BYTES));
            assert!(parts.iter().all(|p| p.piece.len() <= PART_BYTES));
            assert_eq!(join(parts).unwrap(), vec![whole]);
        }
    }

    #[test]
    fn small_parts_join_too_and_never_exceed_the_count_a_receiver_takes() {
        let whole = frame(20_000);
        let parts = split_in(3, &whole, 1_000);
        assert_eq!(parts.len(), whole.encoded_len().div_ceil(1_000));
        assert_eq!(join(parts).unwrap(), vec![whole]);
        let large = frame(PART_BYTES);
        let parts = split_in(4, &large, 1);
        assert_eq!(parts.len(), PARTS_MAX);
        assert_eq!(join(parts).unwrap(), vec![large]);
    }

    #[test]
    fn messages_join_one_after_another() {
        let (a, b) = (frame(PART_BYTES * 2), frame(PART_BYTES + 5_000));
        let mut parts = split(1, &a);
        parts.extend(split(2, &b));
        assert_eq!(join(parts).unwrap(), vec![a, b]);
    }

    #[test]
    fn parts_out_of_order_or_interleaved_are_refused() {
        let parts = split(1, &frame(PART_BYTES * 3));
        assert_eq!(parts.len(), 3);
        let mut swapped = parts.clone();
        swapped.swap(1, 2);
        assert!(join(swapped).unwrap_err().contains("was due"));
        assert!(
            join(parts[1..].to_vec())
                .unwrap_err()
                .contains("without the parts before it")
        );
        let mut interleaved = parts.clone();
        interleaved.insert(1, split(2, &frame(PART_BYTES * 2))[0].clone());
        assert!(join(interleaved).unwrap_err().contains("message 2"));
        let mut recounted = parts.clone();
        recounted[1].count = 4;
        assert!(join(recounted).is_err());
    }

    #[test]
    fn absurd_counts_sizes_and_contents_are_refused() {
        let mut part = split(1, &frame(10)).remove(0);
        part.count = 0;
        assert!(join(vec![part.clone()]).is_err());
        part.count = PARTS_MAX as u32 + 1;
        assert!(join(vec![part.clone()]).is_err());
        part.count = 1;
        part.piece = Bytes::from(vec![0u8; PART_BYTES + 1]);
        assert!(join(vec![part.clone()]).unwrap_err().contains("too large"));
        part.piece = Bytes::from_static(&[0xff, 0xff, 0xff]);
        assert!(join(vec![part.clone()]).unwrap_err().contains("no frame"));
        let nested = pb::PeerFrame {
            part: Some(split(5, &frame(10)).remove(0)),
            ..pb::PeerFrame::default()
        };
        part.piece = Bytes::from(nested.encode_to_vec());
        assert!(
            join(vec![part])
                .unwrap_err()
                .contains("a part inside a part")
        );
    }
}
