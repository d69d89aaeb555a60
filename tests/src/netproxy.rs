//! A TCP proxy for one directed link between two nodes, which a test can
//! block (a network partition), heal, or slow down (a fixed one-way delay,
//! as between datacenters).
//!
//! Blocking closes the link's connections and refuses new ones; a node sees
//! what it would see on a real partition: broken streams and failed
//! reconnects. Delay holds every chunk of bytes for the set time from the
//! moment it arrived, preserving order.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

/// Bytes read at once.
const CHUNK_BYTES: usize = 64 * 1024;
/// Chunks held back per direction while delayed.
const CHUNKS_IN_FLIGHT_MAX: usize = 4096;

/// The link's state.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Link {
    /// Forward, after this one-way delay.
    Open {
        /// One-way delay in milliseconds.
        delay_ms: u64,
    },
    /// Drop everything.
    Blocked,
}

/// One proxied link.
#[derive(Debug, Clone)]
pub struct Proxy {
    /// Where the sending node connects.
    pub addr: SocketAddr,
    target: Arc<Mutex<Option<SocketAddr>>>,
    link: watch::Sender<Link>,
}

impl Proxy {
    /// Starts a proxy on 127.0.0.1:0 with no target yet (connections are
    /// refused until [`Proxy::set_target`]).
    pub async fn start() -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let addr = listener.local_addr().expect("address");
        let target = Arc::new(Mutex::new(None));
        let (link, _) = watch::channel(Link::Open { delay_ms: 0 });
        let proxy = Proxy { addr, target, link };
        tokio::spawn(accept(listener, proxy.clone()));
        proxy
    }

    /// Where to forward to.
    pub fn set_target(&self, target: SocketAddr) {
        *self.target.lock().expect("lock") = Some(target);
    }

    /// Sets the link's state; blocking also cuts live connections.
    pub fn set(&self, link: Link) {
        self.link.send_replace(link);
    }

    /// The link's state.
    pub fn state(&self) -> Link {
        *self.link.borrow()
    }
}

async fn accept(listener: TcpListener, proxy: Proxy) {
    loop {
        let Ok((inbound, _)) = listener.accept().await else {
            return;
        };
        let target = *proxy.target.lock().expect("lock");
        let link = proxy.link.subscribe();
        if *link.borrow() == Link::Blocked {
            drop(inbound);
            continue;
        }
        let Some(target) = target else {
            drop(inbound);
            continue;
        };
        tokio::spawn(async move {
            let Ok(outbound) = TcpStream::connect(target).await else {
                return;
            };
            let _ = inbound.set_nodelay(true);
            let _ = outbound.set_nodelay(true);
            let (in_read, in_write) = inbound.into_split();
            let (out_read, out_write) = outbound.into_split();
            let up = tokio::spawn(pump(in_read, out_write, link.clone()));
            let down = tokio::spawn(pump(out_read, in_write, link));
            let _ = tokio::join!(up, down);
        });
    }
}

/// Copies one direction, holding each chunk for the link's delay; ends
/// (closing both halves) when either side closes or the link is blocked.
async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mut link: watch::Receiver<Link>,
) {
    let (tx, mut rx) = mpsc::channel::<(Instant, Vec<u8>)>(CHUNKS_IN_FLIGHT_MAX);
    let mut blocked = link.clone();
    let writer = tokio::spawn(async move {
        while let Some((arrived, chunk)) = rx.recv().await {
            let delay_ms = match *blocked.borrow_and_update() {
                Link::Open { delay_ms } => delay_ms,
                Link::Blocked => return,
            };
            tokio::time::sleep_until(arrived + Duration::from_millis(delay_ms)).await;
            if *blocked.borrow() == Link::Blocked || to.write_all(&chunk).await.is_err() {
                return;
            }
        }
        let _ = to.shutdown().await;
    });
    let mut buf = vec![0u8; CHUNK_BYTES];
    loop {
        tokio::select! {
            read = from.read(&mut buf) => match read {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if tx.send((Instant::now(), buf[..n].to_vec())).await.is_err() {
                        break;
                    }
                }
            },
            changed = link.changed() => {
                if changed.is_err() || *link.borrow() == Link::Blocked {
                    writer.abort();
                    return;
                }
            }
        }
    }
    drop(tx);
    let _ = writer.await;
}
