//! A hostile server: a gRPC `ChatRoom` written for this test that speaks
//! the protocol but lies. It relays real envelopes sealed by Alice to Bob,
//! and replays one, drops one, delivers one late, and shows Alice a member
//! list with a ghost that Bob is not shown. Bob's client is the real one
//! (`Session` over gRPC), and must say what happened each time.

use std::sync::{Arc, Mutex};

use bytes::Bytes;
use saferchat_client::crypto::{self, Recipient};
use saferchat_client::device::Device;
use saferchat_client::streams::Warning;
use saferchat_client::{Event, Identity, JoinOptions, Message, Session};
use saferchat_consensus::{Revision, RoomId};
use saferchat_envelope::Envelope;
use saferchat_envelope::sealed::Fanout;
use saferchat_proto::chat::chat_room_server::{ChatRoom, ChatRoomServer};
use saferchat_proto::chat::{self as pb, client_frame, server_frame};
use saferchat_proto::common as cpb;
use tokio::sync::mpsc;
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use tonic::{Request, Response, Status, Streaming};

const REVISION: u64 = 3;

/// The lying server: after Bob's join it sends `script`, one delivery
/// per frame, and shows him `members`.
struct Hostile {
    members: cpb::Membership,
    script: Mutex<Option<Vec<Bytes>>>,
}

#[tonic::async_trait]
impl ChatRoom for Hostile {
    type PostStream = ReceiverStream<Result<pb::ServerFrame, Status>>;
    type HistoryStream = ReceiverStream<Result<pb::HistoryPage, Status>>;

    async fn post(
        &self,
        request: Request<Streaming<pb::ClientFrame>>,
    ) -> Result<Response<Self::PostStream>, Status> {
        let mut inbound = request.into_inner();
        let script = self
            .script
            .lock()
            .expect("lock")
            .take()
            .ok_or_else(|| Status::unavailable("one session per test"))?;
        let (out, rx) = mpsc::channel(64);
        tokio::spawn(async move {
            let frame = |f| Ok(pb::ServerFrame { frame: Some(f) });
            let Ok(Some(pb::ClientFrame {
                frame: Some(client_frame::Frame::Join(_)),
            })) = inbound.message().await
            else {
                return;
            };
            let challenge = pb::Challenge {
                nonce: Bytes::from(vec![7u8; 32]),
            };
            let _ = out
                .send(frame(server_frame::Frame::Challenge(challenge)))
                .await;
            // The proof is not even checked: this server lies anyway.
            let _ = inbound.message().await;
            let joined = pb::Joined {
                revision: REVISION,
                session: "hostile".into(),
                session_expires_ms: i64::MAX,
            };
            let _ = out.send(frame(server_frame::Frame::Joined(joined))).await;
            for (i, sealed) in script.into_iter().enumerate() {
                let delivery = pb::Delivery {
                    id: Bytes::from(vec![u8::try_from(i).unwrap(); 16]),
                    time_ms: 1_767_225_600_000,
                    sealed,
                    seq: i as u64 + 1,
                };
                let deliveries = pb::Deliveries {
                    items: vec![delivery],
                    history: false,
                };
                let _ = out
                    .send(frame(server_frame::Frame::Deliveries(deliveries)))
                    .await;
            }
            // Keep the stream open until the client leaves.
            while let Ok(Some(_)) = inbound.message().await {}
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn history(
        &self,
        _: Request<pb::HistoryRequest>,
    ) -> Result<Response<Self::HistoryStream>, Status> {
        Err(Status::unimplemented("no history here"))
    }

    async fn members(
        &self,
        _: Request<pb::MembersRequest>,
    ) -> Result<Response<cpb::Membership>, Status> {
        Ok(Response::new(self.members.clone()))
    }
}

fn membership(ids: &[&Identity]) -> cpb::Membership {
    cpb::Membership {
        chat: "team".into(),
        revision: REVISION,
        members: ids
            .iter()
            .map(|id| cpb::Member {
                user: id.handle().to_string(),
                public_key: id.public_der().clone(),
                fingerprint: id.fingerprint(),
            })
            .collect(),
    }
}

/// Bob's view of `script` through a real session with the hostile
/// server: each message's text (or why it was not shown) and warnings.
async fn bob_reads(
    bob: Arc<Identity>,
    bob_is_shown: cpb::Membership,
    script: Vec<Bytes>,
) -> Vec<(Result<String, String>, Vec<Warning>)> {
    let count = script.len();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let address = listener.local_addr().expect("address").to_string();
    let server = Hostile {
        members: bob_is_shown,
        script: Mutex::new(Some(script)),
    };
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(ChatRoomServer::new(server))
            .serve_with_incoming(TcpListenerStream::new(listener)),
    );
    let room = RoomId::new("team").unwrap();
    let mut session = Session::join(&address, &room, bob, &JoinOptions::default())
        .await
        .expect("join the hostile server");
    let mut seen = Vec::new();
    while seen.len() < count {
        if let Some(Event::Message(Message {
            content, warnings, ..
        })) = session.next().await.expect("event")
        {
            let content = content
                .map(|p| String::from_utf8(p.body).unwrap())
                .map_err(|e| e.to_string());
            seen.push((content, warnings));
        }
    }
    seen
}

fn sealed_for(envelope: &Envelope, id: &Identity) -> Bytes {
    Fanout::new(envelope)
        .sealed_for_recipient(&id.handle())
        .expect("wrapped for them")
}

#[tokio::test]
async fn an_honest_client_reports_replays_drops_reordering_and_a_ghost_member() {
    let alice = saferchat_client::test_keys::identity(0);
    let bob = Arc::new(saferchat_client::test_keys::identity(1));
    let carol = saferchat_client::test_keys::identity(2);
    let room = RoomId::new("team").unwrap();
    let mut device = Device::ephemeral();
    let mut post = |text: &str, recipients: &[Recipient]| {
        device
            .seal_next(&room, |p| {
                crypto::seal_at(
                    &alice,
                    &room,
                    Revision(REVISION),
                    recipients,
                    text.as_bytes(),
                    p,
                    1_767_225_600_000,
                )
            })
            .expect("seal")
            .0
    };
    let honest = [Recipient::of(&alice), Recipient::of(&bob)];
    // Alice was shown a ghost, Carol, for her last message.
    let with_ghost = [
        Recipient::of(&alice),
        Recipient::of(&bob),
        Recipient::of(&carol),
    ];
    let sent = [
        post("one", &honest),
        post("two", &honest),
        post("three", &honest),
        post("four", &honest),
        post("five, to a room with a ghost", &with_ghost),
    ];
    let s = |i: usize| sealed_for(&sent[i], &bob);
    // one, two, two again, four (three dropped), three (late), five.
    let script = vec![s(0), s(1), s(1), s(3), s(2), s(4)];
    let seen = bob_reads(Arc::clone(&bob), membership(&[&alice, &bob]), script).await;

    assert_eq!(seen[0], (Ok("one".into()), vec![]));
    assert_eq!(seen[1], (Ok("two".into()), vec![]));
    let replay = seen[2].0.as_ref().expect_err("a replay is not shown");
    assert!(replay.contains("replay"), "{replay}");
    assert_eq!(
        seen[3],
        (Ok("four".into()), vec![Warning::Gap { missing: 1 }])
    );
    assert_eq!(
        seen[4],
        (Ok("three".into()), vec![Warning::OutOfOrder { newest: 4 }])
    );
    assert_eq!(
        seen[5],
        (
            Ok("five, to a room with a ghost".into()),
            vec![Warning::MembershipDiffers {
                revision: Revision(REVISION)
            }]
        )
    );
}
