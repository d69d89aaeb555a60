//! TLS on the client listener, with real node and CLI processes: a
//! self-signed certificate the CLI pins, a certificate from a CA the CLI
//! is given, and every way a connection could end up in plaintext or with
//! the wrong server, which must fail with a reason instead.

use std::path::{Path, PathBuf};
use std::process::Command;

use saferchat_tests::process::{NodeProcess, cli_with_env, fails, fixture_key, ok};

/// The certificate fingerprint the node logged at start.
fn logged_fingerprint(node: &NodeProcess) -> String {
    node.log_text()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|v| {
            v["fields"]["message"]
                .as_str()
                .is_some_and(|m| m.starts_with("client TLS certificate"))
        })
        .and_then(|v| v["fields"]["fingerprint"].as_str().map(str::to_owned))
        .expect("the node logs its certificate's fingerprint")
}

fn https(node: &NodeProcess) -> String {
    format!("https://{}", node.server())
}

fn pinned(fingerprint: &str) -> [(&'static str, &str); 1] {
    [("SAFERCHAT_TLS_PIN", fingerprint)]
}

#[test]
fn two_users_chat_over_tls_to_a_pinned_self_signed_node_and_the_pin_survives_a_restart() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (alice, alice_handle) = fixture_key(dir.path(), "alice", 0);
    let (bob, bob_handle) = fixture_key(dir.path(), "bob", 1);
    let mut node = NodeProcess::start(
        &dir.path().join("node"),
        &[("SAFERCHAT_TLS_SELF_SIGNED", "true")],
    );
    let fingerprint = logged_fingerprint(&node);
    let pin = pinned(&fingerprint);
    let server = https(&node);
    let admin = |args: &[&str]| ok(&cli_with_env(&server, None, args, None, &pin));
    admin(&["admin", "create-chat", "team"]);
    admin(&["admin", "add-user", "team", &alice_handle]);
    admin(&["admin", "add-user", "team", &bob_handle]);
    // Bob's first join registers his key, so that Alice's post is
    // encrypted for him too.
    ok(&cli_with_env(
        &server,
        Some(&bob),
        &["history", "team"],
        None,
        &pin,
    ));
    let sent = ok(&cli_with_env(
        &server,
        Some(&alice),
        &["send", "team", "over", "tls"],
        None,
        &pin,
    ));
    assert!(sent.starts_with("sent "), "{sent}");
    // A second process with Alice's key: the same device, message 2,
    // naming message 1 (state beside the key file).
    ok(&cli_with_env(
        &server,
        Some(&alice),
        &["send", "team", "and", "again"],
        None,
        &pin,
    ));
    assert!(alice.with_extension("pem.state").join("device").exists());

    node.stop();
    node.restart();
    assert_eq!(
        logged_fingerprint(&node),
        fingerprint,
        "the self-signed certificate is made once and reused"
    );
    let history = cli_with_env(
        &https(&node),
        Some(&bob),
        &["history", "team", "--limit", "10"],
        None,
        &pin,
    );
    let shown = ok(&history);
    assert!(
        shown.contains("over tls") && shown.contains("and again") && !shown.contains("!!"),
        "{shown}\n{}",
        String::from_utf8_lossy(&history.stderr)
    );
}

#[test]
fn a_tls_address_never_falls_back_to_plaintext_or_to_another_certificate() {
    let dir = tempfile::tempdir().expect("tempdir");
    let tls_node = NodeProcess::start(
        &dir.path().join("tls"),
        &[("SAFERCHAT_TLS_SELF_SIGNED", "true")],
    );
    let plain_node = NodeProcess::start(&dir.path().join("plain"), &[]);
    let fingerprint = logged_fingerprint(&tls_node);
    let create = ["admin", "create-chat", "team"];

    // Another certificate than the pinned one: refused, and said so.
    let other = "sha256:".to_owned() + &"ab".repeat(32);
    let e = fails(&cli_with_env(
        &https(&tls_node),
        None,
        &create,
        None,
        &pinned(&other),
    ));
    assert!(
        e.contains("is not the pinned one") && e.contains(&fingerprint),
        "{e}"
    );
    // No pin: the public CAs, which did not sign a self-signed certificate.
    let e = fails(&cli_with_env(&https(&tls_node), None, &create, None, &[]));
    assert!(e.contains("certificate"), "{e}");
    // A plaintext address to the TLS node: no answer in plaintext.
    let e = fails(&cli_with_env(&tls_node.server(), None, &create, None, &[]));
    assert!(e.contains("use https://"), "{e}");
    // A pin with a plaintext address: refused before dialling.
    let e = fails(&cli_with_env(
        &plain_node.server(),
        None,
        &create,
        None,
        &pinned(&fingerprint),
    ));
    assert!(e.contains("refusing plaintext"), "{e}");
    // https:// to a plaintext node: a failed handshake, not plaintext.
    let e = fails(&cli_with_env(
        &https(&plain_node),
        None,
        &create,
        None,
        &pinned(&fingerprint),
    ));
    assert!(e.contains("cannot connect"), "{e}");
    // A malformed pin is a usage error.
    let e = fails(&cli_with_env(
        &https(&tls_node),
        None,
        &create,
        None,
        &pinned("sha256:1234"),
    ));
    assert!(e.contains("64 hex digits"), "{e}");
    // Nothing above created the room on either node.
    for (server, pin) in [
        (https(&tls_node), fingerprint.as_str()),
        (plain_node.server(), ""),
    ] {
        let env: Vec<(&str, &str)> = if pin.is_empty() {
            Vec::new()
        } else {
            vec![("SAFERCHAT_TLS_PIN", pin)]
        };
        let rooms = ok(&cli_with_env(&server, None, &["admin", "list"], None, &env));
        assert!(!rooms.contains("team"), "{rooms}");
    }
}

/// A CA and a certificate it signed for `localhost` and 127.0.0.1, written
/// into `dir`: (ca.pem, server.pem, server.key).
fn ca_and_server_certificate(dir: &Path, ca_name: &str) -> (PathBuf, PathBuf, PathBuf) {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
    let ca_key = KeyPair::generate().expect("CA key");
    let mut ca = CertificateParams::new(Vec::<String>::new()).expect("CA params");
    ca.distinguished_name.push(DnType::CommonName, ca_name);
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_cert = ca.self_signed(&ca_key).expect("CA certificate");
    let issuer = Issuer::new(ca, ca_key);
    let key = KeyPair::generate().expect("server key");
    let params = CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()])
        .expect("server params");
    let cert = params.signed_by(&key, &issuer).expect("server certificate");
    let paths = (
        dir.join(format!("{ca_name}.pem")),
        dir.join(format!("{ca_name}-server.pem")),
        dir.join(format!("{ca_name}-server.key")),
    );
    std::fs::write(&paths.0, ca_cert.pem()).expect("write CA");
    std::fs::write(&paths.1, cert.pem()).expect("write certificate");
    std::fs::write(&paths.2, key.serialize_pem()).expect("write key");
    paths
}

#[test]
fn a_certificate_from_a_ca_is_checked_against_that_ca_and_the_name_dialled() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (ca, cert, key) = ca_and_server_certificate(dir.path(), "good-ca");
    let (other_ca, _, _) = ca_and_server_certificate(dir.path(), "other-ca");
    let (cert, key) = (cert.display().to_string(), key.display().to_string());
    let node = NodeProcess::start(
        &dir.path().join("node"),
        &[("SAFERCHAT_TLS_CERT", &cert), ("SAFERCHAT_TLS_KEY", &key)],
    );
    let ca = ca.display().to_string();
    let port = node.addr.port();
    for server in [
        format!("https://127.0.0.1:{port}"),
        format!("https://localhost:{port}"),
    ] {
        let out = ok(&cli_with_env(
            &server,
            None,
            &["admin", "list"],
            None,
            &[("SAFERCHAT_TLS_CA", &ca)],
        ));
        assert!(!out.contains("error"), "{out}");
    }
    let other_ca = other_ca.display().to_string();
    let e = fails(&cli_with_env(
        &https(&node),
        None,
        &["admin", "list"],
        None,
        &[("SAFERCHAT_TLS_CA", &other_ca)],
    ));
    assert!(e.contains("certificate"), "{e}");
}

#[test]
#[ignore = "needs grpcurl: run scripts/test.sh or set GRPCURL"]
fn grpcurl_reaches_a_tls_node_with_its_certificate() {
    let dir = tempfile::tempdir().expect("tempdir");
    let node = NodeProcess::start(
        &dir.path().join("node"),
        &[("SAFERCHAT_TLS_SELF_SIGNED", "true")],
    );
    let cert = node.data_dir.join("tls").join("server.pem");
    let bin = saferchat_tests::bin::grpcurl()
        .expect("grpcurl not found: run scripts/test.sh (installs it) or set GRPCURL");
    let out = Command::new(&bin)
        .args([
            "-cacert",
            &cert.display().to_string(),
            &node.server(),
            "list",
        ])
        .output()
        .expect("run grpcurl");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && text.contains("server.grpc.chat.ChatRoom"),
        "{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let plain = Command::new(&bin)
        .args(["-plaintext", &node.server(), "list"])
        .output()
        .expect("run grpcurl");
    assert!(!plain.status.success(), "no plaintext on a TLS listener");
}
