//! A member's session in one room, over the `Post` stream.
//!
//! [`Session::join`] runs the handshake (join, challenge, signed proof) and
//! follows a node's redirect to the node that serves the room. Afterwards
//! [`Session::post`] seals and sends, and [`Session::next`] yields events:
//! messages (verified and decrypted), post results and membership changes.
//! A post refused because the membership moved on is re-sealed for the new
//! membership and sent again, a bounded number of times.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use saferchat_consensus::{Handle, Revision, RoomId};
use saferchat_proto::chat::{
    self as pb, chat_room_client::ChatRoomClient, client_frame, server_frame,
};
use saferchat_proto::common as cpb;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;
use tonic::{Code, Streaming};

use crate::connect::{FOLLOWS_REDIRECTS_METADATA, REDIRECTS_MAX, connect, redirect_of, redirected};
use crate::crypto::{self, Position, Recipient};
use crate::device::Device;
use crate::error::ClientError;
use crate::keys::Identity;
use crate::streams::{Streams, Warning};
use saferchat_envelope::Envelope;
use saferchat_vocabulary::fingerprint_of;

/// How often a post is re-sealed for a newer membership before giving up.
const RESEAL_ATTEMPTS_MAX: u32 = 3;
/// Frames queued towards the server.
const OUT_FRAMES_MAX: usize = 64;

/// How long one join attempt (connecting, the challenge, the proof, the
/// membership) may take. A node relaying the join waits up to 15 s for the
/// room's node; this leaves room for that and a lease wait on top.
pub const JOIN_TIMEOUT: Duration = Duration::from_secs(30);

/// How to join.
#[derive(Clone, Debug, Default)]
pub struct JoinOptions {
    /// Recent messages to receive on join (0: the server's default).
    pub recent: u32,
    /// Resume after this message id instead of recent history.
    pub after_id: Option<Bytes>,
    /// The sequence number of the message `after_id` names, when this
    /// client was sent it (0: `after_id` is only a bound): the node then
    /// refuses, with FAILED_PRECONDITION, to resume after a message the
    /// room no longer holds (cut after a home failover).
    pub after_seq: u64,
    /// Receive no history at all.
    pub no_history: bool,
    /// Keep this device's state beside this key file (`KEY.state/`, see
    /// `device.rs`); `None`: an ephemeral device, nothing saved.
    pub state_beside: Option<std::path::PathBuf>,
}

/// A room's membership as the client trusts it: every key checked against
/// its handle.
#[derive(Clone, Debug, Default)]
pub struct Members {
    /// The revision.
    pub revision: Revision,
    /// Members with keys, in handle order: who a post is wrapped for.
    pub recipients: Vec<Recipient>,
    /// Every member, with their key fingerprint (empty if none yet).
    pub all: Vec<(Handle, String)>,
}

impl Members {
    /// What changed from `self` to `newer`.
    pub fn changes_to(&self, newer: &Members) -> MembershipChange {
        let before: HashMap<Handle, &String> = self.all.iter().map(|(h, f)| (*h, f)).collect();
        let after: HashMap<Handle, &String> = newer.all.iter().map(|(h, f)| (*h, f)).collect();
        MembershipChange {
            revision: newer.revision,
            added: newer
                .all
                .iter()
                .filter(|(h, _)| !before.contains_key(h))
                .cloned()
                .collect(),
            removed: self
                .all
                .iter()
                .filter(|(h, _)| !after.contains_key(h))
                .map(|(h, _)| *h)
                .collect(),
            keyed: newer
                .all
                .iter()
                .filter(|(h, f)| !f.is_empty() && before.get(h).is_some_and(|old| old.is_empty()))
                .cloned()
                .collect(),
            first_seen: Vec::new(),
        }
    }

    /// Checks a membership from the server.
    ///
    /// # Errors
    /// [`ClientError::Verify`] when a key does not hash to its member's
    /// handle (the server is lying) or a handle is malformed.
    pub fn from_pb(m: &cpb::Membership) -> Result<Members, ClientError> {
        let mut members = Members {
            revision: Revision(m.revision),
            ..Members::default()
        };
        for member in &m.members {
            let handle: Handle = member
                .user
                .parse()
                .map_err(|e| ClientError::Verify(format!("membership lists a bad handle: {e}")))?;
            if !member.public_key.is_empty() {
                let key = crypto::member_key(&handle, &member.public_key)?;
                members.recipients.push(Recipient {
                    handle,
                    key,
                    der: member.public_key.clone(),
                });
            }
            // The fingerprint is computed here, not taken from the server.
            let fingerprint = if member.public_key.is_empty() {
                String::new()
            } else {
                fingerprint_of(&member.public_key)
            };
            members.all.push((handle, fingerprint));
        }
        Ok(members)
    }
}

/// Something that happened in the room.
// A message is most events and is moved once, to its reader: boxing it
// would cost an allocation per message for nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
pub enum Event {
    /// A message, verified and decrypted — or why it could not be.
    Message(Message),
    /// One of our posts is durably stored.
    Accepted {
        /// Our sequence number.
        seq: u64,
        /// The server's id.
        id: Bytes,
        /// Server time, Unix ms.
        time_ms: i64,
        /// The message's sequence number in the room (a retried post gets
        /// its original one).
        room_seq: u64,
    },
    /// One of our posts was refused.
    Rejected {
        /// Our sequence number.
        seq: u64,
        /// The gRPC code.
        code: Code,
        /// The server's message.
        message: String,
    },
    /// The membership changed.
    Membership(MembershipChange),
}

/// How a room's membership moved between two revisions this session saw.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MembershipChange {
    /// The new revision.
    pub revision: Revision,
    /// New members, with their key fingerprint (empty until they join).
    pub added: Vec<(Handle, String)>,
    /// Members no longer in the room.
    pub removed: Vec<Handle>,
    /// Members who registered their key (joined for the first time).
    pub keyed: Vec<(Handle, String)>,
    /// Keys this device had never seen, in any room: compare them with
    /// their owners.
    pub first_seen: Vec<(Handle, String)>,
}

/// A received message.
#[derive(Debug)]
pub struct Message {
    /// Server id (UUIDv7 bytes).
    pub id: Bytes,
    /// Server time, Unix ms.
    pub time_ms: i64,
    /// The room's gapless sequence number of the message (0 for messages
    /// stored before the server numbered them).
    pub seq: u64,
    /// Stored before we joined (history) or live.
    pub history: bool,
    /// The verified sender and body, or why it must not be shown.
    pub content: Result<crypto::Plain, ClientError>,
    /// What the sender's stream and membership checks found (`streams.rs`).
    pub warnings: Vec<Warning>,
}

/// A joined session taken apart by [`Session::into_raw`].
#[derive(Debug)]
pub struct RawSession {
    /// Frames to the node (posts only, after joining). Dropping it ends
    /// the client's half of the stream; the node keeps delivering.
    pub out: mpsc::Sender<pb::ClientFrame>,
    /// Frames from the node: deliveries, post results, membership.
    pub inbound: Streaming<pb::ServerFrame>,
    /// The membership as of joining.
    pub members: Members,
    /// The connection the stream runs on (keep it to keep the connection).
    pub channel: Channel,
    /// The session token for History and Members.
    pub token: String,
}

struct Pending {
    body: Vec<u8>,
    attempts: u32,
    /// Its place in this device's stream, kept when it is re-sealed.
    position: Position,
    /// The envelope bytes last sent: what a retry of an unknown outcome
    /// sends again, byte for byte.
    sent: Bytes,
}

/// An open session.
pub struct Session {
    room: RoomId,
    me: Arc<Identity>,
    members: Members,
    /// Every key ever seen for a handle (they never change), so that
    /// messages from members who left still verify.
    keys: HashMap<Handle, rsa::PublicKey>,
    token: String,
    address: String,
    out: mpsc::Sender<pb::ClientFrame>,
    inbound: Streaming<pb::ServerFrame>,
    pending: HashMap<u64, Pending>,
    next_seq: u64,
    /// The durability level the next posts ask for.
    durability: pb::Durability,
    queued: VecDeque<Event>,
    /// A deliveries frame taken from the stream and not yet decrypted, and
    /// its decryption once started: kept here so that a `next` dropped
    /// mid-way (by a `select!`) loses nothing and the next call resumes.
    stashed: Option<pb::Deliveries>,
    decrypting: Option<tokio::task::JoinHandle<Vec<Message>>>,
    channel: Channel,
    /// The node the session was first opened on, before any redirect: in
    /// a cluster spanning datacenters, one in the client's own, which
    /// answers history from its copy. Its channel is opened on the first
    /// read that needs it.
    dialed: String,
    dialed_channel: tokio::sync::OnceCell<Channel>,
    /// The highest room sequence number this session has seen: at
    /// joining, delivered, or acknowledged. History reads ask for a copy
    /// that holds it (`HistoryRequest.min_seq`).
    seen_seq: u64,
    device: Device,
    streams: Streams,
    /// Keys first seen when joining, for [`Session::take_first_seen`].
    first_seen: Vec<(Handle, String)>,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Session({} in {})", self.me.handle(), self.room)
    }
}

fn protocol(what: &str) -> ClientError {
    ClientError::Protocol(what.into())
}

async fn next_frame(
    inbound: &mut Streaming<pb::ServerFrame>,
) -> Result<server_frame::Frame, ClientError> {
    match inbound.message().await? {
        Some(pb::ServerFrame { frame: Some(f) }) => Ok(f),
        Some(_) => Err(protocol("empty frame")),
        None => Err(protocol("the server closed the session")),
    }
}

/// [`Session::judge`] without the saving: each message's stream and
/// membership checks, in the order given.
fn judge(streams: &mut Streams, messages: &mut [Message], live: bool) {
    for m in messages.iter_mut() {
        let Ok(plain) = &m.content else { continue };
        let verdict = streams.observe(
            plain.sender,
            plain.revision,
            plain.chain.as_ref(),
            plain.hash,
            live,
        );
        if verdict.show {
            m.warnings = verdict.warnings;
        } else {
            m.content = Err(ClientError::Verify(Warning::Replayed.to_string()));
        }
    }
}

impl Session {
    /// Joins `room` as `me` on the node at `address` (following redirects).
    ///
    /// # Errors
    /// The server's status (NOT_FOUND, PERMISSION_DENIED, …) or a
    /// connection or verification failure.
    pub async fn join(
        address: &str,
        room: &RoomId,
        me: Arc<Identity>,
        options: &JoinOptions,
    ) -> Result<Session, ClientError> {
        let first = address.to_owned();
        let mut address = address.to_owned();
        for _ in 0..=REDIRECTS_MAX {
            // A node that accepts the connection but never answers (it is
            // stalled, or waits on something of its own) must not hold the
            // caller for ever: each attempt is bounded, and the caller
            // tries again or elsewhere.
            let attempt = async {
                let channel = connect(&address).await?;
                Session::join_on(channel, &address, room, Arc::clone(&me), options).await
            };
            let joined = tokio::time::timeout(JOIN_TIMEOUT, attempt)
                .await
                .unwrap_or_else(|_| {
                    Err(ClientError::Status(tonic::Status::deadline_exceeded(
                        format!("{address} did not complete the join within {JOIN_TIMEOUT:?}"),
                    )))
                });
            match joined {
                Err(ClientError::Status(status)) => match redirect_of(&status) {
                    Some(next) => address = redirected(&address, &next),
                    None => return Err(ClientError::Status(status)),
                },
                other => {
                    return other.map(|mut session| {
                        session.dialed = first.clone();
                        session
                    });
                }
            }
        }
        Err(protocol("too many redirects"))
    }

    /// Joins over an existing channel; a redirect is not followed but
    /// returned as the error ([`redirect_of`] reads it).
    ///
    /// # Errors
    /// As [`Session::join`].
    pub async fn join_on(
        channel: Channel,
        address: &str,
        room: &RoomId,
        me: Arc<Identity>,
        options: &JoinOptions,
    ) -> Result<Session, ClientError> {
        let (out, rx) = mpsc::channel(OUT_FRAMES_MAX);
        let send = |frame| pb::ClientFrame { frame: Some(frame) };
        out.send(send(client_frame::Frame::Join(pb::Join {
            chat: room.to_string(),
            user: me.handle().to_string(),
            recent: options.recent,
            after_id: options.after_id.clone().unwrap_or_default(),
            no_history: options.no_history,
            after_seq: options.after_seq,
        })))
        .await
        .map_err(|_| protocol("session closed"))?;
        let mut client = ChatRoomClient::new(channel.clone())
            .max_decoding_message_size(2 * saferchat_envelope::ENVELOPE_BYTES_MAX);
        let mut request = tonic::Request::new(ReceiverStream::new(rx));
        request.metadata_mut().insert(
            FOLLOWS_REDIRECTS_METADATA,
            tonic::metadata::MetadataValue::from_static("1"),
        );
        let mut inbound = client.post(request).await?.into_inner();
        let server_frame::Frame::Challenge(challenge) = next_frame(&mut inbound).await? else {
            return Err(protocol("expected a challenge"));
        };
        let nonce: [u8; saferchat_envelope::challenge::NONCE_BYTES] = challenge
            .nonce
            .as_ref()
            .try_into()
            .map_err(|_| protocol("challenge has the wrong length"))?;
        // RSA signing takes milliseconds: keep it off the async workers.
        let input = saferchat_envelope::challenge::join_signing_input(room, &me.handle(), &nonce);
        let signer = Arc::clone(&me);
        let signature = tokio::task::spawn_blocking(move || signer.sign(&input))
            .await
            .map_err(|e| ClientError::Crypto(format!("signing task: {e}")))??;
        out.send(send(client_frame::Frame::Proof(pb::Proof {
            public_key: me.public_der().clone(),
            signature: Bytes::from(signature),
        })))
        .await
        .map_err(|_| protocol("session closed"))?;
        let server_frame::Frame::Joined(joined) = next_frame(&mut inbound).await? else {
            return Err(protocol("expected joined"));
        };
        let device = match &options.state_beside {
            Some(key) => Device::beside(key)?,
            None => Device::ephemeral(),
        };
        let streams = device.streams(room)?;
        let mut session = Session {
            device,
            streams,
            first_seen: Vec::new(),
            room: room.clone(),
            me,
            members: Members::default(),
            keys: HashMap::new(),
            token: joined.session,
            address: address.to_owned(),
            out,
            inbound,
            pending: HashMap::new(),
            next_seq: 1,
            durability: pb::Durability::Local,
            queued: VecDeque::new(),
            stashed: None,
            decrypting: None,
            channel,
            dialed: address.to_owned(),
            dialed_channel: tokio::sync::OnceCell::new(),
            seen_seq: joined.last_seq,
        };
        session.refresh_members().await?;
        if session.members.revision.0 < joined.revision {
            return Err(protocol("members older than the join"));
        }
        Ok(session)
    }

    /// Fetches the membership with every key (the unary Members call: large
    /// answers never travel on the long-lived stream).
    ///
    /// # Errors
    /// The server's status, or a key that does not hash to its handle.
    pub async fn refresh_members(&mut self) -> Result<bool, ClientError> {
        let mut client =
            ChatRoomClient::new(self.channel.clone()).max_decoding_message_size(4 * 1024 * 1024);
        let membership = client
            .members(pb::MembersRequest {
                chat: self.room.to_string(),
                session: self.token.clone(),
            })
            .await?
            .into_inner();
        self.set_members(&membership)
    }

    /// Whether a delivery comes from a sender whose key is not known yet
    /// (cheap: a protobuf decode, no crypto).
    fn unknown_sender(&self, sealed: &Bytes) -> bool {
        use prost::Message as _;
        saferchat_proto::envelope::Sealed::decode(sealed.clone())
            .ok()
            .and_then(|s| s.sender.parse::<Handle>().ok())
            .is_some_and(|sender| !self.keys.contains_key(&sender))
    }

    /// Who this session is.
    pub fn identity(&self) -> &Arc<Identity> {
        &self.me
    }

    /// The room.
    pub fn room(&self) -> &RoomId {
        &self.room
    }

    /// The membership as last heard.
    pub fn members(&self) -> &Members {
        &self.members
    }

    /// The session token for History and Members.
    pub fn token(&self) -> &str {
        &self.token
    }

    /// The node this session is connected to.
    pub fn address(&self) -> &str {
        &self.address
    }

    /// The node the session was first opened on, before any redirect
    /// (history is read there: see [`crate::history::read`]).
    pub fn dialed(&self) -> &str {
        &self.dialed
    }

    /// A channel to [`Session::dialed`]: the session's own when no
    /// redirect was followed, else one opened on first use and kept.
    ///
    /// # Errors
    /// A connection failure.
    pub async fn dialed_channel(&self) -> Result<Channel, ClientError> {
        if self.dialed == self.address {
            return Ok(self.channel.clone());
        }
        self.dialed_channel
            .get_or_try_init(|| connect(&self.dialed))
            .await
            .cloned()
    }

    /// The highest room sequence number this session has seen (at
    /// joining, delivered or acknowledged); 0 for none.
    pub fn seen_seq(&self) -> u64 {
        self.seen_seq
    }

    /// The underlying channel (for History and Members calls).
    pub fn channel(&self) -> Channel {
        self.channel.clone()
    }

    /// The key of any member ever seen.
    pub fn key_of(&self, handle: &Handle) -> Option<rsa::PublicKey> {
        self.keys.get(handle).cloned()
    }

    /// Takes a membership from the server unless it is older than the one
    /// held (frames from different paths may arrive out of order).
    /// Returns whether the membership moved forward.
    ///
    /// A membership that moves forward queues an [`Event::Membership`]
    /// with what changed, except the first one of the session (see
    /// [`Session::take_first_seen`] for the keys it showed).
    fn set_members(&mut self, m: &cpb::Membership) -> Result<bool, ClientError> {
        let members = Members::from_pb(m)?;
        self.streams.saw_membership(
            members.revision,
            crypto::membership_hash(&self.room, members.revision, &members.recipients),
        );
        for r in &members.recipients {
            self.keys.entry(r.handle).or_insert_with(|| r.key.clone());
        }
        // The same revision again (a refresh) has the keys already looked
        // up: skip the device file.
        let seen_before = members.revision == self.members.revision && members.revision.0 > 0;
        let first_seen = if seen_before {
            Vec::new()
        } else {
            self.device.first_seen(
                &members
                    .recipients
                    .iter()
                    .map(|r| (r.handle, fingerprint_of(&r.der)))
                    .collect::<Vec<_>>(),
            )?
        };
        let newer = members.revision > self.members.revision;
        if newer && self.members.revision.0 > 0 {
            let mut change = self.members.changes_to(&members);
            change.first_seen = first_seen;
            self.queued.push_back(Event::Membership(change));
        } else {
            self.first_seen.extend(first_seen);
        }
        if members.revision >= self.members.revision {
            self.members = members;
        }
        Ok(newer)
    }

    /// Keys seen for the first time by this device when the session
    /// joined (every member's, on a device's first join): compare them
    /// with their owners ([`crate::verify`]).
    pub fn take_first_seen(&mut self) -> Vec<(Handle, String)> {
        std::mem::take(&mut self.first_seen)
    }

    /// Seals `body` as this device's next message in the room.
    fn seal_next(&mut self, body: &[u8]) -> Result<(Envelope, Position), ClientError> {
        let (me, room, members) = (&self.me, &self.room, &self.members);
        self.device.seal_next(room, |position| {
            crypto::seal_at(
                me,
                room,
                members.revision,
                &members.recipients,
                body,
                position,
                crypto::now_ms(),
            )
        })
    }

    /// Seals `body` again at its `position` for the current membership.
    fn reseal(&mut self, body: &[u8], position: &Position) -> Result<Envelope, ClientError> {
        let envelope = crypto::seal_at(
            &self.me,
            &self.room,
            self.members.revision,
            &self.members.recipients,
            body,
            position,
            crypto::now_ms(),
        )?;
        self.device.resealed(&self.room, position, &envelope)?;
        Ok(envelope)
    }

    /// Seals `body` for the current members without posting it: post the
    /// bytes with [`Session::send_raw`], and post the same bytes again
    /// (on this or a new session) when the acknowledgement was lost — the
    /// node answers a retry with the original id and sequence number and
    /// stores nothing new.
    ///
    /// # Errors
    /// Empty or oversized bodies.
    pub fn seal(&self, body: &[u8]) -> Result<Bytes, ClientError> {
        Ok(crypto::seal(
            &self.me,
            &self.room,
            self.members.revision,
            &self.members.recipients,
            body,
        )?
        .encode())
    }

    /// The durability level the following posts ask for (`Local`, the
    /// default: a majority of the room's replicas in its home datacenter;
    /// `CrossDatacenter`: one other datacenter's majority as well, before
    /// the acknowledgement).
    pub fn set_durability(&mut self, durability: pb::Durability) {
        self.durability = durability;
    }

    /// The durability level the following posts ask for.
    pub fn durability(&self) -> pb::Durability {
        self.durability
    }

    /// Sends already-encoded envelope bytes as post `seq` (benchmarks and
    /// tests of bad input).
    ///
    /// # Errors
    /// When the session is closed.
    pub async fn send_raw(&mut self, seq: u64, envelope: Bytes) -> Result<(), ClientError> {
        self.out
            .send(pb::ClientFrame {
                frame: Some(client_frame::Frame::Post(pb::Post {
                    client_seq: seq,
                    envelope,
                    durability: self.durability.into(),
                })),
            })
            .await
            .map_err(|_| protocol("session closed"))
    }

    /// Seals `body` for the current members and posts it; returns its
    /// sequence number (see [`Event::Accepted`]).
    ///
    /// # Errors
    /// Empty or oversized bodies, or a closed session.
    pub async fn post(&mut self, body: &[u8]) -> Result<u64, ClientError> {
        let seq = self.next_seq;
        self.next_seq += 1;
        let (envelope, position) = self.seal_next(body)?;
        let sent = envelope.encode();
        self.send_raw(seq, sent.clone()).await?;
        self.pending.insert(
            seq,
            Pending {
                body: body.to_vec(),
                attempts: 0,
                position,
                sent,
            },
        );
        Ok(seq)
    }

    /// Runs the stream and membership checks over messages in the order
    /// they are shown (`live`: as delivered, else history read on
    /// request), adds their warnings, withholds replays, and saves what
    /// was seen.
    ///
    /// # Errors
    /// The device's state file cannot be written.
    pub fn judge(&mut self, messages: &mut [Message], live: bool) -> Result<(), ClientError> {
        judge(&mut self.streams, messages, live);
        self.device.save_streams(&self.room, &self.streams)
    }

    /// The next event, or `None` when the server ended the session
    /// cleanly.
    ///
    /// Safe to drop mid-way (as a `select!` branch that lost) as far as
    /// deliveries go: a frame taken from the stream is kept, with its
    /// decryption, until a later call hands out its messages. (A dropped
    /// call can still lose a membership refresh, which the next unknown
    /// sender repeats, and a re-sealed retry of a stale post.)
    ///
    /// # Errors
    /// The status the server ended the session with (e.g.
    /// RESOURCE_EXHAUSTED for a reader that fell behind, PERMISSION_DENIED
    /// after removal).
    pub async fn next(&mut self) -> Result<Option<Event>, ClientError> {
        loop {
            if let Some(event) = self.queued.pop_front() {
                return Ok(Some(event));
            }
            // Awaiting a join handle is cancel-safe: the handle stays.
            if let Some(handle) = self.decrypting.as_mut() {
                let messages = handle
                    .await
                    .map_err(|e| ClientError::Crypto(format!("decryption task: {e}")))?;
                self.decrypting = None;
                let mut messages = messages;
                let live = !messages.first().is_some_and(|m| m.history);
                self.judge(&mut messages, live)?;
                self.queued.extend(messages.into_iter().map(Event::Message));
                continue;
            }
            if let Some(d) = self.stashed.take() {
                // A sender who joined since our last look: learn their key
                // before verifying (the frame stays stashed meanwhile).
                let d = if d.items.iter().any(|i| self.unknown_sender(&i.sealed)) {
                    self.stashed = Some(d);
                    self.refresh_members().await?;
                    self.stashed.take().expect("stashed above")
                } else {
                    d
                };
                self.start_decrypting(d);
                continue;
            }
            let Some(frame) = self.inbound.message().await? else {
                return Ok(None);
            };
            let Some(frame) = frame.frame else { continue };
            match frame {
                server_frame::Frame::Deliveries(d) => self.stashed = Some(d),
                server_frame::Frame::Result(r) => self.on_result(r).await?,
                server_frame::Frame::MembershipChanged(changed) => {
                    if changed.revision > self.members.revision.0 {
                        self.refresh_members().await?;
                    }
                }
                server_frame::Frame::Challenge(_) | server_frame::Frame::Joined(_) => {
                    return Err(protocol("unexpected handshake frame"));
                }
            }
        }
    }

    /// Opens a frame's deliveries off the async workers (each open costs
    /// an RSA decryption: milliseconds).
    fn start_decrypting(&mut self, d: pb::Deliveries) {
        if let Some(newest) = d.items.iter().map(|item| item.seq).max() {
            self.seen_seq = self.seen_seq.max(newest);
        }
        let me = Arc::clone(&self.me);
        let room = self.room.clone();
        let keys = self.keys.clone();
        let history = d.history;
        self.decrypting = Some(tokio::task::spawn_blocking(move || {
            d.items
                .into_iter()
                .map(|item| Message {
                    content: crypto::open(&me, &room, item.sealed, |h| keys.get(h).cloned()),
                    id: item.id,
                    time_ms: item.time_ms,
                    seq: item.seq,
                    history,
                    warnings: Vec::new(),
                })
                .collect::<Vec<_>>()
        }));
    }

    async fn on_result(&mut self, r: pb::PostResult) -> Result<(), ClientError> {
        let seq = r.client_seq;
        match r.outcome {
            Some(pb::post_result::Outcome::Accepted(a)) => {
                self.pending.remove(&seq);
                self.seen_seq = self.seen_seq.max(a.seq);
                self.queued.push_back(Event::Accepted {
                    seq,
                    id: a.id,
                    time_ms: a.time_ms,
                    room_seq: a.seq,
                });
            }
            Some(pb::post_result::Outcome::Rejected(rejected)) => {
                let code = Code::from_i32(rejected.code);
                if let (Code::FailedPrecondition, Some(m)) = (code, &rejected.membership) {
                    self.set_members(m)?;
                    if let Some(pending) = self.pending.get_mut(&seq)
                        && pending.attempts < RESEAL_ATTEMPTS_MAX
                    {
                        pending.attempts += 1;
                        let (body, position) = (pending.body.clone(), pending.position);
                        let envelope = self.reseal(&body, &position)?.encode();
                        if let Some(pending) = self.pending.get_mut(&seq) {
                            pending.sent = envelope.clone();
                        }
                        return self.send_raw(seq, envelope).await;
                    }
                }
                // UNAVAILABLE: the outcome is unknown (the room's leader
                // changed, or storage failed, while the post was in
                // flight). The same bytes again are stored at most once:
                // the node answers a retry with the original id.
                if code == Code::Unavailable
                    && let Some(pending) = self.pending.get_mut(&seq)
                    && pending.attempts < RESEAL_ATTEMPTS_MAX
                {
                    pending.attempts += 1;
                    let again = pending.sent.clone();
                    return self.send_raw(seq, again).await;
                }
                self.pending.remove(&seq);
                self.queued.push_back(Event::Rejected {
                    seq,
                    code,
                    message: rejected.message,
                });
            }
            None => return Err(protocol("post result without outcome")),
        }
        Ok(())
    }

    /// Gives up the typed session for its raw streams: the frame sender
    /// and the inbound `Post` stream, with nothing decrypted or verified.
    ///
    /// For load generators, which must not pay for RSA on every delivery:
    /// they post pre-sealed envelopes and read `Deliveries` frames as they
    /// come. Nothing the session had queued (events already read from the
    /// stream) is carried over, so call this right after joining. The
    /// caller takes over what [`Session::next`] did: it must keep reading
    /// `inbound` (a reader that falls behind is closed by the node) and
    /// handle membership changes itself.
    pub fn into_raw(self) -> RawSession {
        RawSession {
            out: self.out,
            inbound: self.inbound,
            members: self.members,
            channel: self.channel,
            token: self.token,
        }
    }

    /// Stops posting; the server keeps delivering until the session is
    /// dropped.
    pub fn close_posting(&mut self) {
        let (dead, _) = mpsc::channel(1);
        self.out = dead;
    }
}

/// A hostile server, played by the test: it relays real sealed envelopes
/// but replays, drops, reorders, and shows two members different member
/// lists. Bob's client runs its real checks (open, then judge) and must
/// say what happened each time.
#[cfg(test)]
mod hostile_server {
    use super::*;
    use crate::test_keys;
    use saferchat_envelope::sealed::Fanout;

    struct Room {
        room: RoomId,
        alice: Identity,
        bob: Identity,
        device: Device,
    }

    impl Room {
        fn new() -> Room {
            Room {
                room: RoomId::new("aaa").unwrap(),
                alice: test_keys::identity(0),
                bob: test_keys::identity(1),
                device: Device::ephemeral(),
            }
        }

        /// Alice's next message, sealed for `recipients` at revision 3.
        fn alice_posts(&mut self, text: &str, recipients: &[Recipient]) -> Envelope {
            let (alice, room) = (&self.alice, &self.room);
            self.device
                .seal_next(room, |p| {
                    crypto::seal_at(alice, room, Revision(3), recipients, text.as_bytes(), p, 1)
                })
                .unwrap()
                .0
        }

        /// What Bob's client makes of `delivered`, live.
        fn bob_receives(&self, streams: &mut Streams, delivered: &[&Envelope]) -> Vec<Message> {
            let alice_key = self.alice.public_key();
            let mut messages: Vec<Message> = delivered
                .iter()
                .map(|e| Message {
                    id: Bytes::new(),
                    time_ms: 1,
                    seq: 0,
                    history: false,
                    content: crypto::open(
                        &self.bob,
                        &self.room,
                        Fanout::new(e)
                            .sealed_for_recipient(&self.bob.handle())
                            .unwrap(),
                        |_| Some(alice_key.clone()),
                    ),
                    warnings: Vec::new(),
                })
                .collect();
            judge(streams, &mut messages, true);
            messages
        }
    }

    fn text(m: &Message) -> String {
        String::from_utf8(m.content.as_ref().unwrap().body.clone()).unwrap()
    }

    #[test]
    fn replays_drops_and_reordering_are_each_reported() {
        let mut room = Room::new();
        let members = [Recipient::of(&room.alice), Recipient::of(&room.bob)];
        let sent: Vec<Envelope> = ["one", "two", "three", "four"]
            .iter()
            .map(|t| room.alice_posts(t, &members))
            .collect();
        let mut streams = Streams::default();
        // one, two, two again (replayed), four (three dropped), three (late).
        let got = room.bob_receives(
            &mut streams,
            &[&sent[0], &sent[1], &sent[1], &sent[3], &sent[2]],
        );
        assert_eq!(
            (text(&got[0]), got[0].warnings.clone()),
            ("one".into(), vec![])
        );
        assert_eq!(
            (text(&got[1]), got[1].warnings.clone()),
            ("two".into(), vec![])
        );
        let replay = got[2].content.as_ref().unwrap_err().to_string();
        assert!(replay.contains("replay"), "{replay}");
        assert_eq!(text(&got[3]), "four");
        assert_eq!(got[3].warnings, vec![Warning::Gap { missing: 1 }]);
        assert_eq!(text(&got[4]), "three");
        assert_eq!(got[4].warnings, vec![Warning::OutOfOrder { newest: 4 }]);
    }

    #[test]
    fn a_ghost_member_shown_to_one_member_only_is_reported() {
        let mut room = Room::new();
        let carol = test_keys::identity(2);
        // The server shows Alice a room with a ghost, Carol, at revision
        // 3, and shows Bob the real one (Alice and Bob) at revision 3.
        let alice_view = [
            Recipient::of(&room.alice),
            Recipient::of(&room.bob),
            Recipient::of(&carol),
        ];
        let bob_view = [Recipient::of(&room.alice), Recipient::of(&room.bob)];
        let mut streams = Streams::default();
        streams.saw_membership(
            Revision(3),
            crypto::membership_hash(&room.room, Revision(3), &bob_view),
        );
        let e = room.alice_posts("for bob (and the ghost)", &alice_view);
        let got = room.bob_receives(&mut streams, &[&e]);
        assert_eq!(
            got[0].warnings,
            vec![Warning::MembershipDiffers {
                revision: Revision(3)
            }]
        );
        // With the same view on both sides, nothing to report.
        let honest = room.alice_posts("just us", &bob_view);
        let got = room.bob_receives(&mut streams, &[&honest]);
        assert_eq!(got[0].warnings, vec![]);
    }
}

#[cfg(test)]
mod membership_changes {
    use super::*;

    fn h(n: u8) -> Handle {
        Handle::of_modulus(&[n; 8])
    }

    fn members(revision: u64, all: &[(u8, &str)]) -> Members {
        Members {
            revision: Revision(revision),
            recipients: Vec::new(),
            all: all.iter().map(|(n, f)| (h(*n), (*f).to_owned())).collect(),
        }
    }

    #[test]
    fn added_removed_and_keyed_members_are_named() {
        let before = members(4, &[(1, "aaaa"), (2, ""), (3, "cccc")]);
        let after = members(7, &[(1, "aaaa"), (2, "bbbb"), (4, "")]);
        let change = before.changes_to(&after);
        assert_eq!(change.revision, Revision(7));
        assert_eq!(change.added, vec![(h(4), String::new())]);
        assert_eq!(change.removed, vec![h(3)]);
        assert_eq!(change.keyed, vec![(h(2), "bbbb".to_owned())]);
    }
}
