//! A hostile server: a gRPC `ChatRoom` written for these tests that speaks
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

/// What the fake server does once a client has joined.
enum Behaviour {
    /// Lies: sends this script of sealed envelopes, one delivery per frame.
    Script(Mutex<Option<Vec<Bytes>>>),
    /// Answers the first post UNAVAILABLE ("it may still commit") and
    /// accepts the next, keeping every envelope it was sent. (Found by the
    /// chaos harness: an UNAVAILABLE rejection is an unknown outcome, not a
    /// refusal, so a client must send the same bytes again.)
    Flaky(Arc<Mutex<Vec<Bytes>>>),
}

/// A `ChatRoom` written for these tests: it takes any join and shows
/// `members`, then behaves as told.
struct Fake {
    members: cpb::Membership,
    behaviour: Behaviour,
}

type Out = mpsc::Sender<Result<pb::ServerFrame, Status>>;

async fn send(out: &Out, f: server_frame::Frame) {
    let _ = out.send(Ok(pb::ServerFrame { frame: Some(f) })).await;
}

/// Join, challenge, proof (not even checked: this server lies anyway),
/// joined. False when the client did not start with a join.
async fn handshake(inbound: &mut Streaming<pb::ClientFrame>, out: &Out) -> bool {
    let Ok(Some(pb::ClientFrame {
        frame: Some(client_frame::Frame::Join(_)),
    })) = inbound.message().await
    else {
        return false;
    };
    let nonce = Bytes::from(vec![7u8; 32]);
    send(out, server_frame::Frame::Challenge(pb::Challenge { nonce })).await;
    let _ = inbound.message().await;
    let joined = pb::Joined {
        revision: REVISION,
        session: "fake".into(),
        session_expires_ms: i64::MAX,
        last_seq: 0,
    };
    send(out, server_frame::Frame::Joined(joined)).await;
    true
}

async fn play_script(script: Vec<Bytes>, out: &Out) {
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
        send(out, server_frame::Frame::Deliveries(deliveries)).await;
    }
}

async fn flaky(inbound: &mut Streaming<pb::ClientFrame>, out: &Out, posts: &Mutex<Vec<Bytes>>) {
    while let Ok(Some(pb::ClientFrame {
        frame: Some(client_frame::Frame::Post(post)),
    })) = inbound.message().await
    {
        let first = {
            let mut posts = posts.lock().expect("lock");
            posts.push(post.envelope.clone());
            posts.len() == 1
        };
        let outcome = if first {
            pb::post_result::Outcome::Rejected(pb::Rejected {
                code: tonic::Code::Unavailable as i32,
                message: "leadership moved before the post committed; it may still commit".into(),
                membership: None,
            })
        } else {
            pb::post_result::Outcome::Accepted(pb::Accepted {
                id: Bytes::from(vec![1u8; 16]),
                time_ms: 1,
                seq: 1,
            })
        };
        let result = pb::PostResult {
            client_seq: post.client_seq,
            outcome: Some(outcome),
        };
        send(out, server_frame::Frame::Result(result)).await;
    }
}

#[tonic::async_trait]
impl ChatRoom for Fake {
    type PostStream = ReceiverStream<Result<pb::ServerFrame, Status>>;
    type HistoryStream = ReceiverStream<Result<pb::HistoryPage, Status>>;

    async fn post(
        &self,
        request: Request<Streaming<pb::ClientFrame>>,
    ) -> Result<Response<Self::PostStream>, Status> {
        let mut inbound = request.into_inner();
        let (out, rx) = mpsc::channel(64);
        let script = match &self.behaviour {
            Behaviour::Script(script) => Some(
                script
                    .lock()
                    .expect("lock")
                    .take()
                    .ok_or_else(|| Status::unavailable("one session per test"))?,
            ),
            Behaviour::Flaky(_) => None,
        };
        let posts = match &self.behaviour {
            Behaviour::Flaky(posts) => Some(Arc::clone(posts)),
            Behaviour::Script(_) => None,
        };
        tokio::spawn(async move {
            if !handshake(&mut inbound, &out).await {
                return;
            }
            if let Some(script) = script {
                play_script(script, &out).await;
            }
            if let Some(posts) = posts {
                flaky(&mut inbound, &out, &posts).await;
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

/// Serves `fake` on a loopback port; returns its address.
async fn serve(fake: Fake) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let address = listener.local_addr().expect("address").to_string();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(ChatRoomServer::new(fake))
            .serve_with_incoming(TcpListenerStream::new(listener)),
    );
    address
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
    let address = serve(Fake {
        members: bob_is_shown,
        behaviour: Behaviour::Script(Mutex::new(Some(script))),
    })
    .await;
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

#[tokio::test]
async fn an_unavailable_rejection_is_retried_with_the_same_bytes() {
    let alice = Arc::new(saferchat_client::test_keys::identity(0));
    let bob = saferchat_client::test_keys::identity(1);
    let posts = Arc::new(Mutex::new(Vec::new()));
    let address = serve(Fake {
        members: membership(&[&alice, &bob]),
        behaviour: Behaviour::Flaky(Arc::clone(&posts)),
    })
    .await;
    let room = RoomId::new("team").unwrap();
    let options = JoinOptions {
        no_history: true,
        ..JoinOptions::default()
    };
    let mut session = Session::join(&address, &room, alice, &options)
        .await
        .expect("join");
    let seq = session.post(b"once only").await.expect("post");
    let outcome = loop {
        match session.next().await.expect("event").expect("open") {
            Event::Accepted { seq: s, .. } if s == seq => break Ok(()),
            Event::Rejected {
                seq: s, message, ..
            } if s == seq => break Err(message),
            _ => {}
        }
    };
    assert_eq!(outcome, Ok(()), "accepted after the retry");
    let posts = posts.lock().expect("lock");
    assert_eq!(posts.len(), 2, "one retry");
    assert_eq!(
        posts[0], posts[1],
        "the same envelope bytes, not a new seal"
    );
}
