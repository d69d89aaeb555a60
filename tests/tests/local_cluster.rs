//! `deploy/local-cluster.sh`, as the README uses it: start three nodes in
//! two datacenters, administer the cluster through any node with the
//! written token, add a fourth node through the cluster map, stop it.

use std::path::PathBuf;
use std::process::Command;

use saferchat_tests::process;

fn script() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace")
        .join("deploy/local-cluster.sh")
}

fn run(args: &[&str]) -> std::process::Output {
    Command::new("bash")
        .arg(script())
        .args(args)
        .env(
            "SAFERCHAT_NODE_BIN",
            saferchat_tests::bin::path("saferchat-node"),
        )
        .env("SAFERCHAT_CLI_BIN", saferchat_tests::bin::path("saferchat"))
        .output()
        .expect("run local-cluster.sh")
}

#[test]
fn starts_serves_and_stops_a_cluster() {
    let dir = tempfile::tempdir().unwrap();
    let cluster = dir.path().join("cluster");
    let cluster_arg = cluster.to_str().unwrap();
    let started = run(&[
        "start",
        "--nodes",
        "3",
        "--datacenters",
        "2",
        "--dir",
        cluster_arg,
    ]);
    let stdout = String::from_utf8_lossy(&started.stdout).into_owned();
    assert!(
        started.status.success(),
        "start failed: {stdout}{}",
        String::from_utf8_lossy(&started.stderr)
    );
    // node ID dc DC client HOST:PORT, one line per node.
    let nodes: Vec<(String, String, String)> = stdout
        .lines()
        .map(|line| {
            let f: Vec<&str> = line.split(' ').collect();
            assert_eq!(
                (f.len(), f[0], f[2], f[4]),
                (6, "node", "dc", "client"),
                "{line}"
            );
            (f[1].to_owned(), f[3].to_owned(), f[5].to_owned())
        })
        .collect();
    let expected = [("1", "dc1"), ("2", "dc2"), ("3", "dc1")];
    assert_eq!(nodes.len(), 3, "{stdout}");
    for ((id, dc, _), (want_id, want_dc)) in nodes.iter().zip(expected) {
        assert_eq!((id.as_str(), dc.as_str()), (want_id, want_dc));
    }
    let token = cluster.join("admin.token");
    let mode =
        std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&token).unwrap().permissions());
    assert_eq!(mode & 0o777, 0o600);

    // A second start on the same folder is refused while it runs.
    let again = run(&["start", "--nodes", "3", "--dir", cluster_arg]);
    assert!(!again.status.success());

    let written = std::fs::read_to_string(&token).unwrap();
    let admin = |server: &str, args: &[&str]| {
        let mut all = vec!["admin", "--token", written.trim()];
        all.extend_from_slice(args);
        process::ok(&process::cli(server, None, &all, None))
    };
    let created = admin(&nodes[0].2, &["create-chat", "local"]);
    assert!(created.contains("created room local"), "{created}");
    // Node 3 stores the room once it has applied the commit, which need
    // not be before the create returned (a quorum accepted it).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let listed = admin(&nodes[2].2, &["list"]);
        if listed.contains("local") {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "node 3 never listed the room: {listed}"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }

    // A fourth node joins through the map and serves at once.
    let joined = run(&[
        "join",
        "--id",
        "4",
        "--datacenter",
        "dc2",
        "--dir",
        cluster_arg,
    ]);
    let line = String::from_utf8_lossy(&joined.stdout).trim().to_owned();
    assert!(
        joined.status.success(),
        "join failed: {line}{}",
        String::from_utf8_lossy(&joined.stderr)
    );
    let f: Vec<&str> = line.split(' ').collect();
    assert_eq!(
        (f.len(), f[0], f[1], f[2], f[3], f[4]),
        (6, "node", "4", "dc", "dc2", "client")
    );
    let members = admin(f[5], &["members", "local"]);
    assert!(members.contains("forwarded to a replica"), "{members}");
    let listed = admin(f[5], &["list"]);
    assert!(listed.contains("local"), "{listed}");
    let status = process::ok(&process::cli(
        f[5],
        None,
        &["cluster", "--token", written.trim(), "status"],
        None,
    ));
    assert!(status.contains("epoch 2"), "{status}");
    assert!(status.contains("node 4  dc2  joining"), "{status}");

    let stopped = run(&["stop", "--dir", cluster_arg]);
    assert!(stopped.status.success());
    assert_eq!(
        String::from_utf8_lossy(&stopped.stdout).trim(),
        "stopped 4 node(s)"
    );
    for n in 1..=4 {
        assert!(!cluster.join(format!("n{n}.pid")).exists());
    }
}
