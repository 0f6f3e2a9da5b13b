//! Accepting connections without letting idle or hostile clients exhaust the server.
//!
//! - At most `max_connections` are open. When a new one arrives at the limit, the
//!   oldest connection that has not sent a byte is closed to make room (a flood of
//!   silent connections cannot lock real clients out); if every connection has spoken,
//!   the new one is refused.
//! - A connection that sends nothing within `handshake_timeout` is closed.
//! - accept(2) failing (out of file descriptors) is counted, logged at a bounded rate
//!   and retried after a pause, never in a busy loop.
//!
//! Every refusal is counted in metrics and logged (rate-limited). HTTP/2 keepalive and
//! the per-connection stream limit are set on tonic's server builder.

use super::metrics::{Metrics, Refusal};
use std::collections::BTreeMap;
use std::future::Future;
use std::os::fd::{AsRawFd, RawFd};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
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
    pub handshake_timeout: Duration,
}

struct Open {
    fd: RawFd,
    spoken: Arc<AtomicBool>,
}

/// The open connections, oldest first (ids grow).
struct Tracker {
    limits: ConnectionLimits,
    open: Mutex<BTreeMap<u64, Open>>,
    next: AtomicU64,
    metrics: Arc<Metrics>,
}

impl Tracker {
    /// Admit `stream` (closing the oldest silent connection if full), or refuse it.
    fn admit(self: &Arc<Self>, stream: TcpStream) -> Option<Conn> {
        let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        if open.len() >= self.limits.max_connections {
            let silent = open
                .iter()
                .find(|(_, c)| !c.spoken.load(Ordering::SeqCst))
                .map(|(&id, c)| (id, c.fd));
            match silent {
                Some((id, fd)) => {
                    // The victim's file descriptor is open: it is in the table, and a
                    // connection leaves the table (under this lock) before it closes.
                    // SAFETY: shutdown(2) on a socket this process owns; it stays open.
                    unsafe { libc::shutdown(fd, libc::SHUT_RDWR) };
                    open.remove(&id);
                    self.metrics.connections.dec();
                    self.metrics.refuse(
                        Refusal::SilentConnection,
                        "closed the oldest connection that had sent nothing, to admit a new one",
                    );
                }
                None => {
                    drop(open);
                    self.metrics.refuse(
                        Refusal::Connections,
                        &format!("{} connections are open", self.limits.max_connections),
                    );
                    return None;
                }
            }
        }
        let id = self.next.fetch_add(1, Ordering::SeqCst);
        let spoken = Arc::new(AtomicBool::new(false));
        open.insert(
            id,
            Open {
                fd: stream.as_raw_fd(),
                spoken: spoken.clone(),
            },
        );
        self.metrics.connections.inc();
        let info = TcpConnectInfo {
            local_addr: stream.local_addr().ok(),
            remote_addr: stream.peer_addr().ok(),
        };
        Some(Conn {
            stream,
            id,
            tracker: self.clone(),
            spoken,
            handshake: Some(Box::pin(tokio::time::sleep(self.limits.handshake_timeout))),
            info,
        })
    }

    fn remove(&self, id: u64) {
        let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        if open.remove(&id).is_some() {
            self.metrics.connections.dec();
        }
    }
}

/// One admitted connection: a TCP stream that closes itself if it stays silent.
pub struct Conn {
    stream: TcpStream,
    id: u64,
    tracker: Arc<Tracker>,
    spoken: Arc<AtomicBool>,
    handshake: Option<Pin<Box<tokio::time::Sleep>>>,
    info: TcpConnectInfo,
}

impl Drop for Conn {
    fn drop(&mut self) {
        // Leave the table before the socket closes (see Tracker::admit).
        self.tracker.remove(self.id);
    }
}

impl AsyncRead for Conn {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let read = Pin::new(&mut self.stream).poll_read(cx, buf);
        match &read {
            Poll::Ready(Ok(())) if buf.filled().len() > before && self.handshake.take().is_some() => {
                self.spoken.store(true, Ordering::SeqCst);
            }
            Poll::Pending => {
                if let Some(timer) = self.handshake.as_mut()
                    && timer.as_mut().poll(cx).is_ready()
                {
                    self.tracker.metrics.refuse(
                        Refusal::SilentConnection,
                        "closed a connection that sent nothing within the handshake timeout",
                    );
                    return Poll::Ready(Err(std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        "the client sent nothing within the handshake timeout",
                    )));
                }
            }
            _ => {}
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

/// Accept from `listener` under `limits`: the stream of admitted connections for tonic.
/// The accept loop ends (and the listening socket closes) when the stream is dropped.
pub fn incoming(
    listener: TcpListener,
    limits: ConnectionLimits,
    metrics: Arc<Metrics>,
) -> tokio_stream::wrappers::ReceiverStream<std::io::Result<Conn>> {
    let tracker = Arc::new(Tracker {
        limits,
        open: Mutex::new(BTreeMap::new()),
        next: AtomicU64::new(0),
        metrics,
    });
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
