//! The chat protocol by hand, for tests that must send what a well-behaved
//! client never would.

use std::sync::Arc;

use bytes::Bytes;
use saferchat_client::Identity;
use saferchat_consensus::RoomId;
use saferchat_proto::chat::{
    self as pb, chat_room_client::ChatRoomClient, client_frame::Frame, server_frame,
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Streaming;

/// One raw `Post` stream.
#[derive(Debug)]
pub struct Raw {
    /// Frames to the server.
    pub tx: mpsc::Sender<pb::ClientFrame>,
    /// Frames from the server.
    pub rx: Streaming<pb::ServerFrame>,
}

impl Raw {
    /// Opens a stream and sends `first`.
    pub async fn open(server: &str, first: Frame) -> Raw {
        let channel = saferchat_client::connect::connect(server)
            .await
            .expect("connect");
        let mut client = ChatRoomClient::new(channel).max_decoding_message_size(64 * 1024 * 1024);
        let (tx, out) = mpsc::channel(64);
        tx.send(pb::ClientFrame { frame: Some(first) })
            .await
            .expect("send");
        let rx = client
            .post(ReceiverStream::new(out))
            .await
            .expect("post call")
            .into_inner();
        Raw { tx, rx }
    }

    /// Sends a frame.
    pub async fn send(&self, frame: Frame) {
        // The server may already have ended the stream; tests look at rx.
        let _ = self.tx.send(pb::ClientFrame { frame: Some(frame) }).await;
    }

    /// The next frame, or the status the stream ended with.
    pub async fn next(&mut self) -> Result<server_frame::Frame, tonic::Status> {
        match self.rx.message().await? {
            Some(pb::ServerFrame { frame: Some(f) }) => Ok(f),
            Some(_) => panic!("empty server frame"),
            None => Err(tonic::Status::ok("stream ended")),
        }
    }

    /// The status the stream ends with, skipping frames.
    pub async fn end(&mut self) -> tonic::Status {
        loop {
            if let Err(status) = self.next().await {
                return status;
            }
        }
    }

    /// Asks to join `room` as `user` and waits for the server's challenge.
    pub async fn challenged(server: &str, room: &str, user: &str) -> (Raw, pb::Challenge) {
        let mut raw = Raw::open(server, join_frame(room, user)).await;
        match raw.next().await.expect("challenge") {
            server_frame::Frame::Challenge(c) => (raw, c),
            other => panic!("expected a challenge, got {other:?}"),
        }
    }

    /// Joins `room` as `id` with a correct proof; returns the Joined frame.
    pub async fn join(server: &str, room: &str, id: &Arc<Identity>) -> (Raw, pb::Joined) {
        let (mut raw, c) = Raw::challenged(server, room, &id.handle().to_string()).await;
        raw.send(proof_frame(room, id, &c.nonce)).await;
        match raw.next().await.expect("joined") {
            server_frame::Frame::Joined(j) => (raw, j),
            other => panic!("expected joined, got {other:?}"),
        }
    }

    /// Posts raw envelope bytes.
    pub async fn post(&self, seq: u64, envelope: Bytes) {
        self.send(Frame::Post(pb::Post {
            client_seq: seq,
            envelope,
            ..pb::Post::default()
        }))
        .await;
    }

    /// The next post result, skipping deliveries and membership frames.
    pub async fn result(&mut self) -> pb::PostResult {
        loop {
            match self.next().await {
                Ok(server_frame::Frame::Result(r)) => return r,
                Ok(_) => {}
                Err(status) => panic!("stream ended before a post result: {status:?}"),
            }
        }
    }
}

/// A Join frame without history.
pub fn join_frame(room: &str, user: &str) -> Frame {
    Frame::Join(pb::Join {
        chat: room.to_owned(),
        user: user.to_owned(),
        no_history: true,
        ..pb::Join::default()
    })
}

/// A correct Proof for `nonce`.
pub fn proof_frame(room: &str, id: &Identity, nonce: &[u8]) -> Frame {
    let room = RoomId::new(room).expect("room");
    let nonce: [u8; 32] = nonce.try_into().expect("32-byte nonce");
    let input = saferchat_envelope::challenge::join_signing_input(&room, &id.handle(), &nonce);
    Frame::Proof(pb::Proof {
        public_key: id.public_der().clone(),
        signature: Bytes::from(id.sign(&input).expect("sign")),
    })
}

/// The rejection of a post result, if it was rejected.
pub fn rejected(r: &pb::PostResult) -> Option<&pb::Rejected> {
    match &r.outcome {
        Some(pb::post_result::Outcome::Rejected(x)) => Some(x),
        _ => None,
    }
}
