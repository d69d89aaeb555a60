//! A node running inside the test process, on 127.0.0.1:0 with its data in
//! a temporary folder.

use std::net::SocketAddr;
use std::sync::Arc;

use saferchat_client::admin::Admin;
use saferchat_client::{Identity, JoinOptions, Session};
use saferchat_consensus::RoomId;
use saferchat_node::clock::{Clock, SystemClock};
use saferchat_node::config::NodeConfig;
use saferchat_node::error::NodeError;
use saferchat_node::{Listeners, run};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::ADMIN_TOKEN;

/// An in-process node.
#[derive(Debug)]
pub struct TestNode {
    /// Client address.
    pub addr: SocketAddr,
    /// The admin listener's address, when `admin_listen` was set.
    pub admin_addr: Option<SocketAddr>,
    /// The web listener's address, when `web_listen` was set.
    pub web_addr: Option<SocketAddr>,
    /// Its configuration.
    pub config: NodeConfig,
    shutdown: CancellationToken,
    task: Option<JoinHandle<Result<(), NodeError>>>,
    _data: Option<tempfile::TempDir>,
}

impl TestNode {
    /// A default node.
    pub async fn start() -> TestNode {
        TestNode::start_with(|_| {}).await
    }

    /// A node whose configuration `adjust` may change (data folder and
    /// token are set first).
    pub async fn start_with(adjust: impl FnOnce(&mut NodeConfig)) -> TestNode {
        TestNode::start_with_clock(adjust, SystemClock::new()).await
    }

    /// As [`TestNode::start_with`], with a chosen clock.
    pub async fn start_with_clock(
        adjust: impl FnOnce(&mut NodeConfig),
        clock: Arc<dyn Clock>,
    ) -> TestNode {
        let data = tempfile::tempdir().expect("tempdir");
        let mut config = NodeConfig {
            data_dir: data.path().join("data"),
            admin_token: Some(ADMIN_TOKEN.to_owned()),
            ..NodeConfig::default()
        };
        // Tests post in bursts; the limit has tests of its own.
        config.limits.posts_per_second = 0;
        adjust(&mut config);
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("address");
        let admin = match config.admin_listen {
            Some(addr) => Some(TcpListener::bind(addr).await.expect("bind admin")),
            None => None,
        };
        let admin_addr = admin.as_ref().map(|l| l.local_addr().expect("address"));
        let web = match config.web_listen {
            Some(addr) => Some(TcpListener::bind(addr).await.expect("bind web")),
            None => None,
        };
        let web_addr = web.as_ref().map(|l| l.local_addr().expect("address"));
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(run(
            config.clone(),
            Listeners {
                client: listener,
                peer: None,
                admin,
                web,
            },
            clock,
            shutdown.clone(),
        ));
        TestNode {
            addr,
            admin_addr,
            web_addr,
            config,
            shutdown,
            task: Some(task),
            _data: Some(data),
        }
    }

    /// The address for clients.
    pub fn server(&self) -> String {
        self.addr.to_string()
    }

    /// An admin client.
    pub async fn admin(&self) -> Admin {
        let address = self
            .admin_addr
            .map_or_else(|| self.server(), |a| a.to_string());
        Admin::connect(&address, ADMIN_TOKEN)
            .await
            .expect("admin connect")
    }

    /// Creates `room` with the fixture identities `members` as members.
    pub async fn room(&self, room: &str, members: &[usize]) -> Vec<Arc<Identity>> {
        let mut admin = self.admin().await;
        admin.create_chat(room).await.expect("create room");
        let mut ids = Vec::new();
        for n in members {
            let id = Arc::new(saferchat_client::test_keys::identity(*n));
            admin
                .add_user(room, &id.handle().to_string(), None)
                .await
                .expect("add member");
            ids.push(id);
        }
        ids
    }

    /// Joins `room` as `id` without history.
    pub async fn join(&self, room: &str, id: &Arc<Identity>) -> Session {
        let room = RoomId::new(room).expect("room name");
        let options = JoinOptions {
            no_history: true,
            ..JoinOptions::default()
        };
        Session::join(&self.server(), &room, Arc::clone(id), &options)
            .await
            .expect("join")
    }

    /// Stops the node and waits for it; returns its result.
    pub async fn stop(mut self) -> Result<(), NodeError> {
        self.shutdown.cancel();
        let task = self.task.take().expect("running");
        task.await.expect("node task")
    }
}

impl Drop for TestNode {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}
