//! Hostile connections against a real server on loopback: floods of silent
//! connections, of connections that send one byte, of connections that send the HTTP/2
//! preface and SETTINGS and nothing more, and of slow requests (headers sent, body
//! never), each at 1.1x and 10x the connection limit from one address, while a real
//! client from another address connects and measures its latency. And the handshake
//! deadline: a connection that makes no request in time is closed whatever it sent.
#![cfg(feature = "server")]

mod common;

use biogate::server::proto;
use biogate::server::{ServerHandle, start};
use common::server::{DIM, config, connect, create, ids, metric, metrics};
use common::{random_rows, rng};
use std::net::SocketAddr;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// What a hostile connection sends.
#[derive(Clone, Copy, Debug)]
enum Attack {
    Silent,
    OneByte,
    PrefaceOnly,
    SlowRequest,
}

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// An HTTP/2 frame header and payload.
fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = payload.len() as u32;
    let mut f = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
    f.extend_from_slice(&stream.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// HEADERS (END_HEADERS, not END_STREAM) of a unary call whose body never comes:
/// HPACK literals without indexing, no Huffman.
fn slow_request_headers() -> Vec<u8> {
    let mut block = Vec::new();
    for (name, value) in [
        (":method", "POST"),
        (":scheme", "http"),
        (":path", "/biogate.v1.Biogate/ListGalleries"),
        (":authority", "biogate"),
        ("content-type", "application/grpc"),
        ("te", "trailers"),
    ] {
        block.push(0x00);
        block.push(name.len() as u8);
        block.extend_from_slice(name.as_bytes());
        block.push(value.len() as u8);
        block.extend_from_slice(value.as_bytes());
    }
    frame(0x1, 0x4, 1, &block)
}

/// A connection from `ip` (another loopback address than the real client's).
async fn connect_from(ip: &str, to: SocketAddr) -> Option<TcpStream> {
    let socket = tokio::net::TcpSocket::new_v4().ok()?;
    socket.bind(format!("{ip}:0").parse().unwrap()).ok()?;
    socket.connect(to).await.ok()
}

async fn hostile(attack: Attack, to: SocketAddr) -> Option<TcpStream> {
    let mut s = connect_from("127.0.0.2", to).await?;
    let bytes = match attack {
        Attack::Silent => Vec::new(),
        Attack::OneByte => b"P".to_vec(),
        Attack::PrefaceOnly => [PREFACE, &frame(0x4, 0, 0, &[])].concat(),
        Attack::SlowRequest => [PREFACE, &frame(0x4, 0, 0, &[]), &slow_request_headers()].concat(),
    };
    if !bytes.is_empty() {
        let _ = s.write_all(&bytes).await;
    }
    Some(s)
}

async fn server(max_connections: usize, handshake_ms: u64) -> (tempfile::TempDir, ServerHandle, Vec<f32>) {
    let data = tempfile::tempdir().unwrap();
    let mut cfg = config(data.path());
    cfg.max_connections = max_connections;
    cfg.handshake_timeout_ms = handshake_ms;
    cfg.backend = biogate::engine::BackendChoice::Cpu;
    let h = start(cfg).await.unwrap();
    let c = connect(&h, None).await;
    create(&c, "g", "f32").await;
    let rows = random_rows(&mut rng(3), 50, DIM);
    c.enroll("g", &rows, DIM, &ids("s", 50)).await.unwrap();
    drop(c);
    (data, h, rows)
}

fn percentile(mut ms: Vec<f64>, p: f64) -> f64 {
    ms.sort_by(f64::total_cmp);
    ms[((ms.len() as f64 * p).ceil() as usize).clamp(1, ms.len()) - 1]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn floods_at_1_1x_and_10x_the_limit_leave_real_clients_in_and_fast() {
    const LIMIT: usize = 16;
    for attack in [
        Attack::OneByte,
        Attack::PrefaceOnly,
        Attack::SlowRequest,
        Attack::Silent,
    ] {
        for times in [1.1, 10.0] {
            let (_data, h, rows) = server(LIMIT, 60_000).await;
            let mut flood = Vec::new();
            for _ in 0..(LIMIT as f64 * times).ceil() as usize {
                flood.extend(hostile(attack, h.addr).await);
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
            // A real client gets in (several times) and answers stay fast.
            let mut latencies = Vec::new();
            for round in 0..4 {
                let c = tokio::time::timeout(Duration::from_secs(5), connect(&h, None))
                    .await
                    .unwrap_or_else(|_| panic!("{attack:?} x{times}: a real client was locked out (round {round})"));
                for i in 0..50 {
                    let probe = &rows[(i % 50) * DIM..(i % 50 + 1) * DIM];
                    let t = Instant::now();
                    let r = c.identify("g", probe, DIM, 1, None).await;
                    latencies.push(t.elapsed().as_secs_f64() * 1e3);
                    let r = r.unwrap_or_else(|e| panic!("{attack:?} x{times}: {e}"));
                    assert_eq!(r[0].candidates[0].subject, format!("s-{:05}", i % 50));
                }
                // More hostile connections between rounds.
                for _ in 0..LIMIT {
                    flood.extend(hostile(attack, h.addr).await);
                }
            }
            let p99 = percentile(latencies, 0.99);
            eprintln!("{attack:?} at {times}x the connection limit: real client p99 {p99:.2} ms");
            assert!(p99 < 50.0, "{attack:?} x{times}: p99 {p99:.1} ms");
            let m = metrics(&h).await;
            assert!(metric(&m, "biogate_connections") <= LIMIT as f64, "{m}");
            drop(flood);
            h.shutdown().await.unwrap();
        }
    }
}

/// Read until the server closes the connection; how long that took.
async fn closed_within(mut s: TcpStream, limit: Duration) -> Option<Duration> {
    let t = Instant::now();
    tokio::time::timeout(limit, async {
        let mut buf = [0u8; 256];
        while let Ok(n) = s.read(&mut buf).await
            && n > 0
        {}
    })
    .await
    .ok()
    .map(|()| t.elapsed())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_that_makes_no_request_in_time_is_closed_whatever_it_sent() {
    let (_data, h, _) = server(64, 300).await;
    for attack in [Attack::Silent, Attack::OneByte, Attack::PrefaceOnly] {
        let s = hostile(attack, h.addr).await.unwrap();
        let took = closed_within(s, Duration::from_secs(5)).await;
        assert!(took.is_some(), "{attack:?}: left open past the handshake timeout");
    }
    let m = metrics(&h).await;
    assert!(
        metric(&m, "biogate_refused_total{reason=\"idle_connection\"}") >= 2.0,
        "{m}"
    );
    // A connection that made a request stays open past the deadline.
    let c = connect(&h, None).await;
    tokio::time::sleep(Duration::from_millis(700)).await;
    c.list_galleries().await.unwrap();
    h.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_address_cannot_take_every_connection() {
    // Connections that all made requests (slow ones) from one address: it holds at
    // most a quarter of the limit, and another address still gets in.
    let (_data, h, _) = server(16, 60_000).await;
    let mut flood = Vec::new();
    for _ in 0..40 {
        flood.extend(hostile(Attack::SlowRequest, h.addr).await);
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let c = tokio::time::timeout(Duration::from_secs(5), connect(&h, None))
        .await
        .expect("another address gets in");
    c.list_galleries().await.unwrap();
    let m = metrics(&h).await;
    assert!(
        metric(&m, "biogate_refused_total{reason=\"address_limit\"}") >= 1.0,
        "{m}"
    );
    assert!(metric(&m, "biogate_connections") <= 16.0, "{m}");
    let _ = proto::ListGalleriesRequest {};
    drop(flood);
    h.shutdown().await.unwrap();
}
