//! A TCP proxy the test controls: forwards connections to an upstream address and can, on
//! command, stop carrying bytes without closing anything (a silent network, loss-matrix row
//! L12), carry them again, or reset every connection.
//!
//! * [`Proxy::blackhole`]: every connection, open or new, stops carrying bytes in both
//!   directions. No FIN, no RST: the sockets stay open. What a peer sends meanwhile is held
//!   (up to [`HOLD_BYTES`] per direction, then TCP back-pressure), as unacknowledged segments
//!   wait for a dead link to heal: delivered if the link heals, dropped if their sender resets
//!   its connection first. A connection accepted during the blackhole is held without
//!   connecting upstream. A close or a reset reaches the other side only after the restore.
//! * [`Proxy::restore`]: bytes flow again, the held ones first; held connections connect
//!   upstream.
//! * [`Proxy::cut`]: resets (RST) every open connection at once; later connections work.
//!
//! Bounded: at most [`HOLD_BYTES`] of buffer per direction and connection, and at most
//! [`MAX_CONNECTIONS`] connections at once (more are reset on accept). Everything stops when the
//! [`Proxy`] is dropped.
//!
//! ```no_run
//! # async fn run() -> std::io::Result<()> {
//! use reliable_test_support::proxy::Proxy;
//!
//! let proxy = Proxy::start("127.0.0.1:5672".parse().unwrap()).await?;
//! let url = proxy.url_for("amqp://guest:guest@127.0.0.1:5672/%2f");
//! // ... connect a client to `url` ...
//! proxy.blackhole();
//! tokio::time::sleep(std::time::Duration::from_secs(8)).await;
//! proxy.restore();
//! println!("{:?}", proxy.stats());
//! # let _ = url;
//! # Ok(()) }
//! ```

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::{JoinHandle, JoinSet};

/// The most connections a proxy carries at once; more are reset when accepted.
pub const MAX_CONNECTIONS: usize = 256;

/// Bytes read at most per read, per direction and connection.
const BUFFER_BYTES: usize = 16 * 1024;

/// Bytes held at most per direction and connection during a blackhole; then the proxy stops
/// reading and the peer's kernel holds the rest.
pub const HOLD_BYTES: usize = 1024 * 1024;

/// What the proxy does with bytes right now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Link {
    /// Bytes flow (false: blackholed).
    flowing: bool,
    /// Bumped by every [`Proxy::cut`]; a connection opened under an older value is reset.
    cuts: u64,
}

/// Byte and connection counters of a [`Proxy`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ProxyStats {
    /// Bytes forwarded from clients to the upstream.
    pub to_upstream: u64,
    /// Bytes forwarded from the upstream to clients.
    pub from_upstream: u64,
    /// Connections accepted since the start.
    pub accepted: u64,
    /// Connections open now (held ones included).
    pub open: usize,
    /// Connections reset by [`Proxy::cut`].
    pub cut: u64,
}

#[derive(Debug, Default)]
struct Counters {
    to_upstream: AtomicU64,
    from_upstream: AtomicU64,
    accepted: AtomicU64,
    open: AtomicUsize,
    cut: AtomicU64,
}

/// A TCP proxy on 127.0.0.1 in front of one upstream address; see the [module docs](self).
#[derive(Debug)]
pub struct Proxy {
    addr: SocketAddr,
    upstream: SocketAddr,
    link: watch::Sender<Link>,
    counters: Arc<Counters>,
    accept: JoinHandle<()>,
}

impl Drop for Proxy {
    fn drop(&mut self) {
        // The accept task owns every connection task: aborting it drops them all.
        self.accept.abort();
    }
}

impl Proxy {
    /// Listens on `127.0.0.1:0` and forwards every connection to `upstream`. Must be called
    /// inside a tokio runtime, which runs the proxy's tasks.
    pub async fn start(upstream: SocketAddr) -> io::Result<Self> {
        let listener = TcpListener::bind(("127.0.0.1", 0)).await?;
        let addr = listener.local_addr()?;
        let (link, _) = watch::channel(Link {
            flowing: true,
            cuts: 0,
        });
        let counters = Arc::new(Counters::default());
        let accept = tokio::spawn(accept_loop(
            listener,
            upstream,
            link.clone(),
            counters.clone(),
        ));
        Ok(Self {
            addr,
            upstream,
            link,
            counters,
            accept,
        })
    }

    /// The address clients connect to.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The address the proxy forwards to.
    pub fn upstream(&self) -> SocketAddr {
        self.upstream
    }

    /// `url` (`scheme://[userinfo@]host[:port][/path][?query]`) with its host and port
    /// replaced by the proxy's.
    pub fn url_for(&self, url: &str) -> String {
        let (scheme, rest) = url.split_once("://").unwrap_or(("amqp", url));
        let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
        let (authority, tail) = rest.split_at(end);
        let userinfo = authority.rfind('@').map_or("", |at| &authority[..=at]);
        format!("{scheme}://{userinfo}{}{tail}", self.addr)
    }

    /// Stops carrying bytes on every connection, open or new, without closing any.
    pub fn blackhole(&self) {
        self.link.send_modify(|l| l.flowing = false);
    }

    /// Carries bytes again: what was held goes first.
    pub fn restore(&self) {
        self.link.send_modify(|l| l.flowing = true);
    }

    /// Whether the proxy is blackholed now.
    pub fn is_blackholed(&self) -> bool {
        !self.link.borrow().flowing
    }

    /// Resets (RST) every connection open now, held ones included. Later connections are
    /// carried as usual (or held, while blackholed).
    pub fn cut(&self) {
        self.link.send_modify(|l| l.cuts += 1);
    }

    /// The counters so far.
    pub fn stats(&self) -> ProxyStats {
        let c = &self.counters;
        ProxyStats {
            to_upstream: c.to_upstream.load(Ordering::Relaxed),
            from_upstream: c.from_upstream.load(Ordering::Relaxed),
            accepted: c.accepted.load(Ordering::Relaxed),
            open: c.open.load(Ordering::Relaxed),
            cut: c.cut.load(Ordering::Relaxed),
        }
    }
}

async fn accept_loop(
    listener: TcpListener,
    upstream: SocketAddr,
    link: watch::Sender<Link>,
    counters: Arc<Counters>,
) {
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let Ok((client, _)) = accepted else {
                    // Out of file descriptors or similar: try again shortly, never spin.
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                };
                counters.accepted.fetch_add(1, Ordering::Relaxed);
                if connections.len() >= MAX_CONNECTIONS {
                    reset(&client);
                    continue;
                }
                connections.spawn(connection(client, upstream, link.subscribe(), counters.clone()));
            }
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
}

/// Closes `stream` with a reset (RST) instead of a FIN when it is dropped.
fn reset(stream: &TcpStream) {
    let _ = stream.set_zero_linger();
}

/// Counts an open connection for as long as it lives.
struct OpenGuard(Arc<Counters>);

impl OpenGuard {
    fn new(counters: Arc<Counters>) -> Self {
        counters.open.fetch_add(1, Ordering::Relaxed);
        Self(counters)
    }
}

impl Drop for OpenGuard {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::Relaxed);
    }
}

/// What a wait on the link ended with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Wait {
    /// The link carries bytes.
    Flowing,
    /// The connection was cut (or the proxy is gone).
    Cut,
}

/// Waits until the link carries bytes, or the connection (opened under `cuts`) is cut.
async fn flowing(link: &mut watch::Receiver<Link>, cuts: u64) -> Wait {
    match link.wait_for(|l| l.flowing || l.cuts != cuts).await {
        Ok(l) if l.cuts == cuts => Wait::Flowing,
        // Err: the proxy is gone, and this task is about to be aborted with it.
        _ => Wait::Cut,
    }
}

/// Waits until the connection (opened under `cuts`) is cut.
async fn cut(mut link: watch::Receiver<Link>, cuts: u64) {
    let _ = link.wait_for(|l| l.cuts != cuts).await;
}

/// Why a connection ended: [`Proxy::cut`].
#[derive(Debug)]
struct CutByProxy;

impl std::fmt::Display for CutByProxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("connection cut by the proxy")
    }
}

impl std::error::Error for CutByProxy {}

/// The error a cut ends a direction with.
fn cut_error() -> io::Error {
    io::Error::new(io::ErrorKind::ConnectionReset, CutByProxy)
}

fn is_cut(e: &io::Error) -> bool {
    e.get_ref().is_some_and(|inner| inner.is::<CutByProxy>())
}

/// Carries one client connection until both directions end, an error, or a cut.
async fn connection(
    mut client: TcpStream,
    upstream: SocketAddr,
    mut link: watch::Receiver<Link>,
    counters: Arc<Counters>,
) {
    let _open = OpenGuard::new(counters.clone());
    let cuts = link.borrow().cuts;
    // A connection accepted during a blackhole is held: no upstream connection until the
    // restore.
    let server = match flowing(&mut link, cuts).await {
        Wait::Flowing => tokio::select! {
            server = TcpStream::connect(upstream) => server,
            () = cut(link.clone(), cuts) => Err(cut_error()),
        },
        Wait::Cut => Err(cut_error()),
    };
    let mut server = match server {
        Ok(server) => server,
        Err(e) => {
            if is_cut(&e) {
                counters.cut.fetch_add(1, Ordering::Relaxed);
            }
            reset(&client);
            return;
        }
    };
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let ended = {
        // Borrowed halves: unlike owned ones they send no FIN when dropped, so a reset below
        // is a reset and nothing else.
        let (client_read, client_write) = client.split();
        let (server_read, server_write) = server.split();
        let up = pump(
            client_read,
            server_write,
            link.clone(),
            cuts,
            &counters.to_upstream,
        );
        let down = pump(
            server_read,
            client_write,
            link.clone(),
            cuts,
            &counters.from_upstream,
        );
        // The first error (a reset, a cut) ends both directions.
        tokio::try_join!(up, down)
    };
    if let Err(e) = ended {
        if is_cut(&e) {
            counters.cut.fetch_add(1, Ordering::Relaxed);
        }
        reset(&client);
        reset(&server);
    }
}

/// Copies `from` to `to` until `from` ends (the end is passed on as a FIN), an error, or a
/// cut.
///
/// During a blackhole it goes on reading, up to [`HOLD_BYTES`], but forwards nothing: a
/// silent network acknowledges nothing, so what a peer sends then is still the peer's. If
/// the link heals, it is delivered (as TCP retransmission would); if the peer resets its
/// connection first, it is dropped with it (as the peer's kernel drops unacknowledged data),
/// and the reset reaches the other side when the link heals.
async fn pump(
    mut from: impl AsyncRead + Unpin,
    mut to: impl AsyncWrite + Unpin,
    mut link: watch::Receiver<Link>,
    cuts: u64,
    forwarded: &AtomicU64,
) -> io::Result<()> {
    let mut buf = vec![0u8; BUFFER_BYTES];
    let mut held: Vec<u8> = Vec::new();
    let mut ended = false;
    loop {
        let now = *link.borrow_and_update();
        if now.cuts != cuts {
            return Err(cut_error());
        }
        if now.flowing {
            if !held.is_empty() {
                tokio::select! {
                    written = to.write_all(&held) => written?,
                    () = cut(link.clone(), cuts) => return Err(cut_error()),
                }
                forwarded.fetch_add(held.len() as u64, Ordering::Relaxed);
                held.clear();
            }
            if ended {
                to.shutdown().await?;
                return Ok(());
            }
        } else if ended || held.len() >= HOLD_BYTES {
            // Nothing more to read until the link heals: the peer's bytes wait in its kernel.
            if link.changed().await.is_err() {
                return Err(cut_error());
            }
            continue;
        }
        // While blackholed, never hold more than HOLD_BYTES.
        let room = if now.flowing {
            BUFFER_BYTES
        } else {
            BUFFER_BYTES.min(HOLD_BYTES - held.len())
        };
        let read = tokio::select! {
            read = from.read(&mut buf[..room]) => read,
            changed = link.changed() => match changed {
                Ok(()) => continue,
                Err(_) => return Err(cut_error()),
            },
        };
        match read {
            Ok(0) => ended = true,
            Ok(n) => held.extend_from_slice(&buf[..n]),
            Err(e) => {
                if !link.borrow().flowing {
                    held.clear();
                    if flowing(&mut link, cuts).await == Wait::Cut {
                        return Err(cut_error());
                    }
                }
                return Err(e);
            }
        }
    }
}

#[cfg(test)]
mod tests;
