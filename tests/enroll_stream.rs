//! Enroll streams as real clients send them: many small messages, each its own HTTP/2
//! DATA frame, against a disk whose log fsyncs are slow (what got grpcio's stream
//! cut with GOAWAY `too_many_data_frames`); and a stream the client abandons part way,
//! which is answered and audited with exactly what was made durable, naming the
//! gallery.
#![cfg(feature = "server")]

mod common;

use biogate::client::pack;
use biogate::server::proto;
use biogate::server::start_with;
use biogate::storage::{FaultHook, Op, Storage};
use common::server::{config, connect};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;
use tokio_stream::StreamExt;

/// A disk whose log fsyncs take `0` (the server's other writes are not slowed).
struct SlowLogSyncs(Duration);

impl FaultHook for SlowLogSyncs {
    fn before(&self, op: Op, path: &Path) -> Option<std::io::Error> {
        if op == Op::Sync && path.to_string_lossy().contains("wal-") {
            std::thread::sleep(self.0);
        }
        None
    }
}

const SMALL_DIM: usize = 8;

fn message(i: usize) -> proto::EnrollRequest {
    let template: Vec<f32> = (0..SMALL_DIM).map(|d| ((i * 7 + d * 3) % 11) as f32 + 1.0).collect();
    proto::EnrollRequest {
        gallery: "g".into(),
        subject: format!("s-{i:06}"),
        templates: vec![pack(&template)],
        ..Default::default()
    }
}

fn audit_lines(data: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(data.join("audit.log"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

async fn slow_disk_server(data: &Path, sync: Duration) -> biogate::server::ServerHandle {
    let storage = Storage::with_faults(Arc::new(SlowLogSyncs(sync)));
    start_with(config(data), storage).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_thousand_small_messages_to_a_slow_disk_are_all_enrolled() {
    let data = tempfile::tempdir().unwrap();
    let h = slow_disk_server(data.path(), Duration::from_millis(100)).await;
    let c = connect(&h, None).await;
    c.create_gallery("g", SMALL_DIM as u32, "f32").await.unwrap();
    // Each message yields first, so the client sends it as a DATA frame of its own
    // (about 60 bytes), as grpcio does.
    let stream = tokio_stream::iter(0..20_000).then(|i| async move {
        tokio::task::yield_now().await;
        message(i)
    });
    let r = c.raw().enroll(c.request(stream)).await.unwrap().into_inner();
    assert_eq!((r.subjects, r.templates), (20_000, 20_000));
    assert_eq!(c.get_gallery("g").await.unwrap().subjects, 20_000);
    h.shutdown().await.unwrap();
    // The final audit line names the gallery and counts every template.
    let lines = audit_lines(data.path());
    let done = lines
        .iter()
        .find(|l| l["method"] == "Enroll" && l["phase"] == "done")
        .expect("a done line");
    assert_eq!(
        (&done["outcome"], &done["gallery"]),
        (&"ok".into(), &"g".into()),
        "{done}"
    );
    assert_eq!(done["count"], 20_000);
}

/// An HTTP/2 frame.
fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = payload.len() as u32;
    let mut f = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
    f.extend_from_slice(&stream.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// The start of an Enroll call on stream 1 (HPACK literals, no Huffman).
fn enroll_call_headers() -> Vec<u8> {
    let mut block = Vec::new();
    for (name, value) in [
        (":method", "POST"),
        (":scheme", "http"),
        (":path", "/biogate.v1.Biogate/Enroll"),
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_cut_off_part_way_is_audited_with_what_was_made_durable() {
    use prost::Message;
    use tokio::io::AsyncWriteExt;
    let data = tempfile::tempdir().unwrap();
    let h = slow_disk_server(data.path(), Duration::from_millis(1)).await;
    let c = connect(&h, None).await;
    c.create_gallery("g", SMALL_DIM as u32, "f32").await.unwrap();
    // A client that sends 300 messages of an Enroll stream, each its own DATA frame,
    // and then its connection drops (no end of stream, no reset).
    let mut s = tokio::net::TcpStream::connect(h.addr).await.unwrap();
    let mut bytes = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    bytes.extend(frame(0x4, 0, 0, &[]));
    bytes.extend(enroll_call_headers());
    for i in 0..300 {
        let encoded = message(i).encode_to_vec();
        let mut grpc = vec![0u8];
        grpc.extend_from_slice(&(encoded.len() as u32).to_be_bytes());
        grpc.extend(encoded);
        bytes.extend(frame(0x0, 0, 1, &grpc));
    }
    assert!(bytes.len() < 65_535, "within HTTP/2's initial window");
    s.write_all(&bytes).await.unwrap();
    for _ in 0..200 {
        if c.get_gallery("g").await.unwrap().subjects == 300 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert_eq!(c.get_gallery("g").await.unwrap().subjects, 300);
    drop(s);
    tokio::time::sleep(Duration::from_millis(300)).await;
    h.shutdown().await.unwrap();
    let lines = audit_lines(data.path());
    let done = lines
        .iter()
        .find(|l| l["method"] == "Enroll" && l["phase"] == "done")
        .expect("a done line");
    assert_eq!(done["outcome"], "ABORTED", "{done}");
    assert_eq!(done["gallery"], "g", "{done}");
    assert_eq!(done["count"], 300, "{done}");
    assert_eq!(done["subjects"].as_array().unwrap().len(), 300, "{done}");
    assert!(
        done["error"]
            .as_str()
            .unwrap()
            .contains("300 subjects (300 templates) from earlier messages are enrolled"),
        "{done}"
    );
}
