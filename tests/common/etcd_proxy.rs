//! TCP proxies in front of etcd's members for one node, which a test can cut (every
//! connection closed, new ones refused: the node is partitioned from etcd) or stall
//! (requests reach etcd, answers are held back until the stall ends: a client that
//! times out cannot know whether its write took effect).

use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};

/// What the proxies do with traffic.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Mode {
    Pass = 0,
    Cut = 1,
    StallAnswers = 2,
}

/// One proxy per etcd member, all switched together.
pub struct EtcdProxy {
    ports: Vec<u16>,
    mode: Arc<AtomicU8>,
}

fn mode_of(m: &AtomicU8) -> Mode {
    match m.load(Ordering::SeqCst) {
        1 => Mode::Cut,
        2 => Mode::StallAnswers,
        _ => Mode::Pass,
    }
}

impl EtcdProxy {
    /// Proxies to the members listening on `targets` (loopback ports), passing traffic.
    pub async fn start(targets: &[u16]) -> EtcdProxy {
        let mode = Arc::new(AtomicU8::new(Mode::Pass as u8));
        let mut ports = Vec::new();
        for &target in targets {
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            ports.push(listener.local_addr().unwrap().port());
            tokio::spawn(accept(listener, target, mode.clone()));
        }
        EtcdProxy { ports, mode }
    }

    /// The proxies' URLs, as `--etcd` takes them.
    pub fn urls(&self) -> String {
        self.ports
            .iter()
            .map(|p| format!("http://127.0.0.1:{p}"))
            .collect::<Vec<_>>()
            .join(",")
    }

    pub fn set(&self, mode: Mode) {
        self.mode.store(mode as u8, Ordering::SeqCst);
    }
}

async fn accept(listener: TcpListener, target: u16, mode: Arc<AtomicU8>) {
    while let Ok((inbound, _)) = listener.accept().await {
        if mode_of(&mode) == Mode::Cut {
            continue; // dropped: closed at once
        }
        let mode = mode.clone();
        tokio::spawn(async move {
            let Ok(outbound) = TcpStream::connect(("127.0.0.1", target)).await else {
                return; // the member is down: so is this connection
            };
            let _ = inbound.set_nodelay(true);
            let _ = outbound.set_nodelay(true);
            let (from_client, to_client) = inbound.into_split();
            let (from_etcd, to_etcd) = outbound.into_split();
            // Either direction ending closes both.
            tokio::select! {
                _ = pump(from_client, to_etcd, mode.clone(), false) => {}
                _ = pump(from_etcd, to_client, mode, true) => {}
            }
        });
    }
}

/// Copy bytes until either side closes or the proxy is cut; answers wait out a stall.
async fn pump(mut from: OwnedReadHalf, mut to: OwnedWriteHalf, mode: Arc<AtomicU8>, answers: bool) {
    let mut buf = vec![0u8; 64 << 10];
    loop {
        let n = match tokio::time::timeout(Duration::from_millis(50), from.read(&mut buf)).await {
            Err(_) => {
                if mode_of(&mode) == Mode::Cut {
                    return;
                }
                continue;
            }
            Ok(Ok(0)) | Ok(Err(_)) => return,
            Ok(Ok(n)) => n,
        };
        loop {
            match mode_of(&mode) {
                Mode::Cut => return,
                Mode::StallAnswers if answers => tokio::time::sleep(Duration::from_millis(20)).await,
                _ => break,
            }
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}
