//! grpcurl, an independent client, against a live node: the calls from
//! MISSION.md verbatim (plus the admin token header), reflection, health.

use std::process::{Command, Output};

use saferchat_tests::ADMIN_TOKEN;
use saferchat_tests::process::NodeProcess;

fn grpcurl(args: &[&str]) -> Output {
    let bin = saferchat_tests::bin::grpcurl()
        .expect("grpcurl not found: run scripts/test.sh (installs it) or set GRPCURL");
    Command::new(bin).args(args).output().expect("run grpcurl")
}

fn stdout(o: &Output) -> String {
    assert!(
        o.status.success(),
        "grpcurl failed: {}\n{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

#[test]
#[ignore = "needs grpcurl: run scripts/test.sh or set GRPCURL"]
fn the_mission_calls_work_verbatim() {
    let dir = tempfile::tempdir().expect("tempdir");
    let node = NodeProcess::start(&dir.path().join("node"), &[]);
    let addr = node.server();
    let auth = format!("authorization: Bearer {ADMIN_TOKEN}");

    let list = stdout(&grpcurl(&["-plaintext", &addr, "list"]));
    for service in [
        "grpc.reflection.v1alpha.ServerReflection",
        "server.grpc.admin.Admin",
        "server.grpc.chat.ChatRoom",
        "grpc.health.v1.Health",
    ] {
        assert!(
            list.lines().any(|l| l == service),
            "{service} missing from:\n{list}"
        );
    }
    assert!(
        !list.contains("server.grpc.peer"),
        "the peer face is not on the client port:\n{list}"
    );

    let created = stdout(&grpcurl(&[
        "-H",
        &auth,
        "-d",
        r#"{"chat": "aaa", "op":"CREATE"}"#,
        "-plaintext",
        &addr,
        "server.grpc.admin.Admin/AddChat",
    ]));
    assert!(
        created.contains(r#""chat": "aaa""#) && created.contains(r#""revision": "1""#),
        "{created}"
    );

    let added = stdout(&grpcurl(&[
        "-H",
        &auth,
        "-d",
        r#"{"chat": "aaa", "op":"ADD", "user":"BpB1m-4nZG6rMyPRVO8m7AbPvpjU7YUZIFy4ab1ve4M"}"#,
        "-plaintext",
        &addr,
        "server.grpc.admin.Admin/AddUser",
    ]));
    assert!(
        added.contains(r#""revision": "2""#) && added.contains(r#""changed": true"#),
        "{added}"
    );

    let members = stdout(&grpcurl(&[
        "-H",
        &auth,
        "-d",
        r#"{"chat": "aaa"}"#,
        "-plaintext",
        &addr,
        "server.grpc.admin.Admin/Members",
    ]));
    assert!(
        members.contains("BpB1m-4nZG6rMyPRVO8m7AbPvpjU7YUZIFy4ab1ve4M"),
        "{members}"
    );

    // Without the token: a clear UNAUTHENTICATED.
    let refused = grpcurl(&[
        "-d",
        r#"{"chat": "bbb", "op":"CREATE"}"#,
        "-plaintext",
        &addr,
        "server.grpc.admin.Admin/AddChat",
    ]);
    assert!(!refused.status.success());
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(
        err.contains("Unauthenticated") && err.contains("Bearer"),
        "{err}"
    );

    // A duplicate room and a malformed handle: clear statuses.
    let dup = grpcurl(&[
        "-H",
        &auth,
        "-d",
        r#"{"chat": "aaa", "op":"CREATE"}"#,
        "-plaintext",
        &addr,
        "server.grpc.admin.Admin/AddChat",
    ]);
    assert!(String::from_utf8_lossy(&dup.stderr).contains("AlreadyExists"));
    let bad = grpcurl(&[
        "-H",
        &auth,
        "-d",
        r#"{"chat": "aaa", "op":"ADD", "user":"nope"}"#,
        "-plaintext",
        &addr,
        "server.grpc.admin.Admin/AddUser",
    ]);
    assert!(String::from_utf8_lossy(&bad.stderr).contains("InvalidArgument"));

    let described = stdout(&grpcurl(&[
        "-plaintext",
        &addr,
        "describe",
        "server.grpc.chat.ChatRoom",
    ]));
    assert!(described.contains("rpc Post ( stream .server.grpc.chat.ClientFrame ) returns ( stream .server.grpc.chat.ServerFrame )"), "{described}");

    let health = stdout(&grpcurl(&[
        "-plaintext",
        &addr,
        "grpc.health.v1.Health/Check",
    ]));
    assert!(health.contains("SERVING"), "{health}");
}
