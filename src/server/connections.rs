//! Accepting connections without letting idle or hostile clients exhaust the server.
//!
//! A connection is *silent* until it sends a byte, *spoken* until it makes its first
//! request (an HTTP/2 stream reaching a service: [`Connections::layer`] marks it), and
//! *active* from then on.
//!
//! - At most `max_connections` are open, and at most `max_connections_per_address` from
//!   one IP address. When a new connection arrives at a limit, the oldest connection
//!   that has made no request (silent or spoken, of that address for the per-address
//!   limit) is closed to make room: neither a flood of silent connections nor one of
//!   connections that send a byte, or the HTTP/2 preface and nothing else, can lock real
//!   clients out. If every connection has made a request, the new one is refused.
//! - A connection that has not made its first request within `handshake_timeout` of
//!   opening is closed, whatever it sent meanwhile (the deadline covers the TLS
//!   handshake, the preface and the first request).
//! - accept(2) failing (out of file descriptors) is counted, logged at a bounded rate
//!   and retried after a pause, never in a busy loop.
//!
//! Every refusal is counted in metrics and logged (rate-limited). HTTP/2 keepalive and
//! the per-connection stream limit are set on tonic's server builder.

use super::metrics::{Metrics, Refusal};
use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::{AsRawFd, RawFd};
use std::pin::Pin;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tonic::transport::server::{Connected, TcpConnectInfo};

/// The limits, from the server's configuration.
#[derive(Clone, Copy, Debug)]
pub struct ConnectionLimits {
    pub max_connections: usize,
    /// Most connections from one IP address.
    pub max_per_address: usize,
    /// From accept to the first request.
    pub handshake_timeout: Duration,
}

/// What a connection has done so far.
const SILENT: u8 = 0;
const SPOKEN: u8 = 1;
const ACTIVE: u8 = 2;

struct Open {
    fd: RawFd,
    state: Arc<AtomicU8>,
    ip: Option<IpAddr>,
    peer: Option<SocketAddr>,
}

/// The open connections, oldest first (ids grow), with an index by peer address (for
/// marking a connection active from a request) and a count per IP.
#[derive(Default)]
struct Table {
    open: BTreeMap<u64, Open>,
    by_peer: HashMap<SocketAddr, u64>,
    per_ip: HashMap<IpAddr, usize>,
}

impl Table {
    fn remove(&mut self, id: u64) -> Option<Open> {
        let gone = self.open.remove(&id)?;
        if let Some(peer) = gone.peer
            && self.by_peer.get(&peer) == Some(&id)
        {
            self.by_peer.remove(&peer);
        }
        if let Some(ip) = gone.ip
            && let Some(n) = self.per_ip.get_mut(&ip)
        {
            *n -= 1;
            if *n == 0 {
                self.per_ip.remove(&ip);
            }
        }
        Some(gone)
    }

    /// The oldest connection (of `ip`, if given) that has made no request: silent
    /// ones first, then spoken ones.
    fn evictable(&self, ip: Option<IpAddr>) -> Option<(u64, u8)> {
        let candidates = || {
            self.open
                .iter()
                .filter(move |(_, c)| ip.is_none() || c.ip == ip)
                .map(|(&id, c)| (id, c.state.load(Ordering::SeqCst)))
        };
        candidates()
            .find(|&(_, s)| s == SILENT)
            .or_else(|| candidates().find(|&(_, s)| s == SPOKEN))
    }
}

/// The server's connections: admission at accept, and the mark a request leaves.
struct Tracker {
    limits: ConnectionLimits,
    table: Mutex<Table>,
    next: AtomicU64,
    metrics: Arc<Metrics>,
}

impl Tracker {
    fn lock(&self) -> std::sync::MutexGuard<'_, Table> {
        self.table.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Close connection `id` to make room (it made no request), counting why.
    fn evict(&self, table: &mut Table, id: u64, state: u8, why: &str) {
        if let Some(victim) = table.remove(id) {
            // The victim's file descriptor is open: it was in the table, and a
            // connection leaves the table (under this lock) before it closes.
            // SAFETY: shutdown(2) on a socket this process owns; it stays open.
            unsafe { libc::shutdown(victim.fd, libc::SHUT_RDWR) };
            self.metrics.connections.dec();
            let reason = if state == SILENT {
                Refusal::SilentConnection
            } else {
                Refusal::IdleConnection
            };
            self.metrics.refuse(reason, why);
        }
    }

    /// Admit `stream` (closing the oldest connection that made no request if a limit
    /// is reached), or refuse it.
    fn admit(self: &Arc<Self>, stream: TcpStream) -> Option<Conn> {
        let peer = stream.peer_addr().ok();
        let ip = peer.map(|p| p.ip());
        let mut table = self.lock();
        if let Some(ip) = ip
            && table.per_ip.get(&ip).copied().unwrap_or(0) >= self.limits.max_per_address
        {
            match table.evictable(Some(ip)) {
                Some((id, state)) => self.evict(
                    &mut table,
                    id,
                    state,
                    "closed the oldest connection of an address at its limit that had made no request",
                ),
                None => {
                    drop(table);
                    self.metrics.refuse(
                        Refusal::AddressLimit,
                        &format!(
                            "{ip} holds {} connections, each of which has made requests",
                            self.limits.max_per_address
                        ),
                    );
                    return None;
                }
            }
        }
        if table.open.len() >= self.limits.max_connections {
            match table.evictable(None) {
                Some((id, state)) => self.evict(
                    &mut table,
                    id,
                    state,
                    "closed the oldest connection that had made no request, to admit a new one",
                ),
                None => {
                    drop(table);
                    self.metrics.refuse(
                        Refusal::Connections,
                        &format!("{} connections are open", self.limits.max_connections),
                    );
                    return None;
                }
            }
        }
        let id = self.next.fetch_add(1, Ordering::SeqCst);
        let state = Arc::new(AtomicU8::new(SILENT));
        table.open.insert(
            id,
            Open {
                fd: stream.as_raw_fd(),
                state: state.clone(),
                ip,
                peer,
            },
        );
        if let Some(peer) = peer {
            table.by_peer.insert(peer, id);
        }
        if let Some(ip) = ip {
            *table.per_ip.entry(ip).or_default() += 1;
        }
        drop(table);
        self.metrics.connections.inc();
        let info = TcpConnectInfo {
            local_addr: stream.local_addr().ok(),
            remote_addr: peer,
        };
        Some(Conn {
            stream,
            id,
            tracker: self.clone(),
            state,
            handshake: Some(Box::pin(tokio::time::sleep(self.limits.handshake_timeout))),
            info,
        })
    }

    /// The connection from `peer` made a request.
    fn mark_active(&self, peer: SocketAddr) {
        let table = self.lock();
        if let Some(c) = table.by_peer.get(&peer).and_then(|id| table.open.get(id)) {
            c.state.store(ACTIVE, Ordering::SeqCst);
        }
    }

    fn remove(&self, id: u64) {
        if self.lock().remove(id).is_some() {
            self.metrics.connections.dec();
        }
    }
}

/// The accepted connections of one listener, bounded as the module docs say.
#[derive(Clone)]
pub struct Connections {
    tracker: Arc<Tracker>,
}

impl Connections {
    pub fn new(limits: ConnectionLimits, metrics: Arc<Metrics>) -> Connections {
        Connections {
            tracker: Arc::new(Tracker {
                limits: ConnectionLimits {
                    max_per_address: limits.max_per_address.max(1),
                    ..limits
                },
                table: Mutex::new(Table::default()),
                next: AtomicU64::new(0),
                metrics,
            }),
        }
    }

    /// The layer (for tonic's server builder) that marks a connection active when a
    /// request arrives on it: from then on it is not closed to make room, and its
    /// handshake deadline no longer applies.
    pub fn layer(&self) -> tonic::service::InterceptorLayer<impl tonic::service::Interceptor + Clone + Send + 'static> {
        let tracker = self.tracker.clone();
        tonic::service::InterceptorLayer::new(move |request: tonic::Request<()>| {
            if let Some(peer) = request.remote_addr() {
                tracker.mark_active(peer);
            }
            Ok(request)
        })
    }

    /// Accept from `listener` under the limits: the stream of admitted connections for
    /// tonic. The accept loop ends (and the listening socket closes) when the stream is
    /// dropped.
    pub fn incoming(&self, listener: TcpListener) -> tokio_stream::wrappers::ReceiverStream<std::io::Result<Conn>> {
        let tracker = self.tracker.clone();
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        tokio::spawn(async move {
            loop {
                let accepted = tokio::select! {
                    a = listener.accept() => a,
                    _ = tx.closed() => return,
                };
                match accepted {
                    Ok((stream, _)) => {
                        let _ = stream.set_nodelay(true);
                        if let Some(conn) = tracker.admit(stream)
                            && tx.send(Ok(conn)).await.is_err()
                        {
                            return;
                        }
                    }
                    Err(e) => {
                        tracker.metrics.refuse(Refusal::Accept, &format!("accept failed: {e}"));
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                }
            }
        });
        tokio_stream::wrappers::ReceiverStream::new(rx)
    }
}

/// One admitted connection: a TCP stream that closes itself if it makes no request
/// within the handshake timeout.
pub struct Conn {
    stream: TcpStream,
    id: u64,
    tracker: Arc<Tracker>,
    state: Arc<AtomicU8>,
    handshake: Option<Pin<Box<tokio::time::Sleep>>>,
    info: TcpConnectInfo,
}

impl Drop for Conn {
    fn drop(&mut self) {
        // Leave the table before the socket closes (see Tracker::evict).
        self.tracker.remove(self.id);
    }
}

impl AsyncRead for Conn {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let read = Pin::new(&mut self.stream).poll_read(cx, buf);
        if self.handshake.is_none() {
            return read;
        }
        let state = self.state.load(Ordering::SeqCst);
        if state == ACTIVE {
            self.handshake = None;
            return read;
        }
        if matches!(read, Poll::Ready(Ok(()))) && buf.filled().len() > before && state == SILENT {
            self.state.store(SPOKEN, Ordering::SeqCst);
        }
        if let Some(timer) = self.handshake.as_mut()
            && timer.as_mut().poll(cx).is_ready()
        {
            let (reason, what) = if state == SILENT {
                (Refusal::SilentConnection, "sent nothing")
            } else {
                (Refusal::IdleConnection, "made no request")
            };
            self.tracker.metrics.refuse(
                reason,
                &format!("closed a connection that {what} within the handshake timeout"),
            );
            return Poll::Ready(Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("the client {what} within the handshake timeout"),
            )));
        }
        read
    }
}

impl AsyncWrite for Conn {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
}

impl Connected for Conn {
    type ConnectInfo = TcpConnectInfo;
    fn connect_info(&self) -> TcpConnectInfo {
        self.info.clone()
    }
}

/// Raise the soft open-file limit to the hard one, and warn if the connection limit
/// could still run the process out of descriptors.
pub fn raise_fd_limit(max_connections: usize) {
    // SAFETY: getrlimit/setrlimit with a valid struct.
    unsafe {
        let mut lim: libc::rlimit = std::mem::zeroed();
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return;
        }
        if lim.rlim_cur < lim.rlim_max {
            let raised = libc::rlimit {
                rlim_cur: lim.rlim_max,
                rlim_max: lim.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                lim = raised;
            }
        }
        let needed = max_connections as u64 + 256;
        if (lim.rlim_cur as u64) < needed {
            tracing::warn!(
                open_files = lim.rlim_cur as u64,
                max_connections,
                "the open-file limit is below max_connections + 256; lower max_connections or raise the limit"
            );
        }
    }
}
