//! A TCP proxy for one directed link between two nodes, which a test can
//! block (a network partition), heal, or slow down (a fixed one-way delay,
//! as between datacenters).
//!
//! Blocking closes the link's connections and refuses new ones; a node sees
//! what it would see on a real partition: broken streams and failed
//! reconnects. Delay holds every chunk of bytes for the set time from the
//! moment it arrived, preserving order.
//!
//! A [`Tap`] sees every byte the proxy forwards, each direction of each
//! connection as one stream: the capture of what crossed the loopback
//! between the processes, searched for plaintext that must never be on the
//! wire (a marker split across two reads is still found).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
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

/// Searches forwarded bytes for a marker.
#[derive(Debug)]
pub struct Tap {
    marker: Vec<u8>,
    bytes: AtomicU64,
    hits: AtomicU64,
    /// The first bytes around each hit, for the report.
    found: Mutex<Vec<String>>,
}

impl Tap {
    /// A tap looking for `marker` (at least 2 bytes).
    pub fn new(marker: &[u8]) -> Arc<Tap> {
        assert!(marker.len() >= 2, "a marker of at least 2 bytes");
        Arc::new(Tap {
            marker: marker.to_vec(),
            bytes: AtomicU64::new(0),
            hits: AtomicU64::new(0),
            found: Mutex::new(Vec::new()),
        })
    }

    /// Bytes seen so far.
    pub fn bytes(&self) -> u64 {
        self.bytes.load(Ordering::SeqCst)
    }

    /// Occurrences of the marker seen so far.
    pub fn hits(&self) -> u64 {
        self.hits.load(Ordering::SeqCst)
    }

    /// Up to 16 excerpts around the hits.
    pub fn found(&self) -> Vec<String> {
        self.found.lock().expect("lock").clone()
    }

    /// A scanner for one direction of one connection.
    pub fn stream(self: &Arc<Tap>) -> TapStream {
        TapStream {
            tap: Arc::clone(self),
            carry: Vec::new(),
        }
    }
}

/// One byte stream through a [`Tap`]: keeps the last `marker - 1` bytes
/// of each chunk so a marker across two chunks is found.
#[derive(Debug)]
pub struct TapStream {
    tap: Arc<Tap>,
    carry: Vec<u8>,
}

impl TapStream {
    /// Scans the next chunk of the stream.
    pub fn scan(&mut self, chunk: &[u8]) {
        let tap = &self.tap;
        tap.bytes.fetch_add(chunk.len() as u64, Ordering::SeqCst);
        let mut window = std::mem::take(&mut self.carry);
        window.extend_from_slice(chunk);
        let m = tap.marker.len();
        let mut at = 0;
        while at + m <= window.len() {
            if window[at..at + m] == tap.marker[..] {
                tap.hits.fetch_add(1, Ordering::SeqCst);
                let mut found = tap.found.lock().expect("lock");
                if found.len() < 16 {
                    let end = (at + m + 32).min(window.len());
                    found.push(String::from_utf8_lossy(&window[at..end]).into_owned());
                }
                at += m;
            } else {
                at += 1;
            }
        }
        // Starts not tried yet: the last `m - 1` bytes, less any inside a
        // hit already counted.
        let from = at.max(window.len().saturating_sub(m - 1));
        self.carry = window[from..].to_vec();
    }
}

/// One proxied link.
#[derive(Debug, Clone)]
pub struct Proxy {
    /// Where the sending node connects.
    pub addr: SocketAddr,
    target: Arc<Mutex<Option<SocketAddr>>>,
    link: watch::Sender<Link>,
    tap: Arc<Mutex<Option<Arc<Tap>>>>,
}

impl Proxy {
    /// Starts a proxy on 127.0.0.1:0 with no target yet (connections are
    /// refused until [`Proxy::set_target`]).
    pub async fn start() -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let addr = listener.local_addr().expect("address");
        let target = Arc::new(Mutex::new(None));
        let (link, _) = watch::channel(Link::Open { delay_ms: 0 });
        let proxy = Proxy {
            addr,
            target,
            link,
            tap: Arc::default(),
        };
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

    /// Scans the bytes of connections made from now on with `tap`.
    pub fn set_tap(&self, tap: Arc<Tap>) {
        *self.tap.lock().expect("lock") = Some(tap);
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
        let tap = proxy.tap.lock().expect("lock").clone();
        tokio::spawn(async move {
            let Ok(outbound) = TcpStream::connect(target).await else {
                return;
            };
            let _ = inbound.set_nodelay(true);
            let _ = outbound.set_nodelay(true);
            let (in_read, in_write) = inbound.into_split();
            let (out_read, out_write) = outbound.into_split();
            let up = tokio::spawn(pump(
                in_read,
                out_write,
                link.clone(),
                tap.as_ref().map(Tap::stream),
            ));
            let down = tokio::spawn(pump(
                out_read,
                in_write,
                link,
                tap.as_ref().map(Tap::stream),
            ));
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
    mut tap: Option<TapStream>,
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
                    if let Some(tap) = &mut tap {
                        tap.scan(&buf[..n]);
                    }
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

#[cfg(test)]
mod tests {
    use super::*;

    /// The scanner finds a marker inside a chunk, across two chunks and
    /// across three, and counts nothing that is not there.
    #[test]
    fn a_tap_finds_the_marker_wherever_the_reads_split_it() {
        let tap = Tap::new(b"canary-7");
        let mut s = tap.stream();
        s.scan(b"xx canary-7 yy");
        assert_eq!(tap.hits(), 1);
        s.scan(b"....cana");
        s.scan(b"ry-7....");
        assert_eq!(tap.hits(), 2);
        s.scan(b"c");
        s.scan(b"anary-");
        s.scan(b"7");
        assert_eq!(tap.hits(), 3);
        s.scan(b"canary-8 canary- 7 anary-7");
        assert_eq!(tap.hits(), 3);
        // Each stream is its own: a half in one does not join a half in
        // another.
        let mut other = tap.stream();
        s.scan(b"cana");
        other.scan(b"ry-7");
        assert_eq!(tap.hits(), 3);
        assert_eq!(tap.bytes(), 14 + 16 + 8 + 26 + 8);
        assert!(tap.found()[0].starts_with("canary-7 yy"));
    }

    /// Through a real proxied connection.
    #[tokio::test]
    async fn a_tapped_proxy_sees_what_crosses_it() {
        let server = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let target = server.local_addr().unwrap();
        let echo = tokio::spawn(async move {
            let (mut c, _) = server.accept().await.unwrap();
            let mut buf = vec![0u8; 64];
            let n = c.read(&mut buf).await.unwrap();
            c.write_all(&buf[..n]).await.unwrap();
        });
        let proxy = Proxy::start().await;
        proxy.set_target(target);
        let tap = Tap::new(b"secret");
        proxy.set_tap(Arc::clone(&tap));
        let mut c = TcpStream::connect(proxy.addr).await.unwrap();
        c.write_all(b"a secret").await.unwrap();
        let mut back = [0u8; 8];
        c.read_exact(&mut back).await.unwrap();
        echo.await.unwrap();
        assert_eq!(tap.hits(), 2, "once each way");
    }
}
