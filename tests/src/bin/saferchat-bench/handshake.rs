//! A join handshake driven by hand, with a timestamp at every step, to
//! show where the time of a join goes (the typed `Session::join` only
//! gives the total).

use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context as _, bail};
use bytes::Bytes;
use saferchat_client::Identity;
use saferchat_client::connect::connect;
use saferchat_consensus::RoomId;
use saferchat_envelope::challenge::{NONCE_BYTES, join_signing_input};
use saferchat_proto::chat::{
    self as pb, chat_room_client::ChatRoomClient, client_frame, server_frame,
};
use serde::Serialize;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

/// Milliseconds spent in each step of one join.
#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct JoinSteps {
    /// TCP + HTTP/2 connection.
    pub connect_ms: f64,
    /// Join sent → Challenge received (membership read on the node).
    pub challenge_ms: f64,
    /// The client's RSA-PSS signature over the challenge.
    pub sign_ms: f64,
    /// Proof sent → Joined received (signature check, key registration
    /// on a first join, attach to the room).
    pub joined_ms: f64,
}

fn ms(t: Instant) -> f64 {
    t.elapsed().as_secs_f64() * 1e3
}

/// Joins `room` as `me` on a new connection, timing each step; the
/// session is closed afterwards.
///
/// # Errors
/// When the node refuses or the stream breaks.
pub async fn timed_join(
    address: &str,
    room: &RoomId,
    me: &Arc<Identity>,
) -> anyhow::Result<JoinSteps> {
    let mut steps = JoinSteps::default();
    let t = Instant::now();
    let channel = connect(address).await?;
    steps.connect_ms = ms(t);
    let (out, rx) = mpsc::channel(4);
    let frame = |f| pb::ClientFrame { frame: Some(f) };
    let t = Instant::now();
    out.send(frame(client_frame::Frame::Join(pb::Join {
        chat: room.to_string(),
        user: me.handle().to_string(),
        no_history: true,
        ..pb::Join::default()
    })))
    .await?;
    let mut inbound = ChatRoomClient::new(channel)
        .post(ReceiverStream::new(rx))
        .await?
        .into_inner();
    let Some(pb::ServerFrame {
        frame: Some(server_frame::Frame::Challenge(challenge)),
    }) = inbound.message().await?
    else {
        bail!("expected a challenge");
    };
    steps.challenge_ms = ms(t);
    let nonce: [u8; NONCE_BYTES] = challenge
        .nonce
        .as_ref()
        .try_into()
        .context("challenge length")?;
    let t = Instant::now();
    let signature = me.sign(&join_signing_input(room, &me.handle(), &nonce))?;
    steps.sign_ms = ms(t);
    let t = Instant::now();
    out.send(frame(client_frame::Frame::Proof(pb::Proof {
        public_key: me.public_der().clone(),
        signature: Bytes::from(signature),
    })))
    .await?;
    let Some(pb::ServerFrame {
        frame: Some(server_frame::Frame::Joined(_)),
    }) = inbound.message().await?
    else {
        bail!("expected joined");
    };
    steps.joined_ms = ms(t);
    Ok(steps)
}
