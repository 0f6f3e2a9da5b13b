//! biogate: exact 1:N biometric identification over a memory-mapped gallery.
//!
//! The types a user needs: [`gallery::Gallery`] (the on-disk store and its writer),
//! [`gallery::Snapshot`] (what searches read), [`engine::Engine`] (searches a snapshot
//! with a backend), and [`template::Dtype`] (how rows are stored).
//!
//! Features: `gpu` (the wgpu backend), `server` (the gRPC server and client), `cluster`
//! (shard servers on etcd and object storage, and the router), `report` (DET plots),
//! `cli` (the binary; all of them). The engine and the store build with none
//! (`--no-default-features`).

pub mod bench;
#[cfg(feature = "server")]
pub mod bench_grpc;
#[cfg(feature = "server")]
pub mod client;
#[cfg(feature = "cluster")]
pub mod cluster;
pub mod dedup;
#[cfg(feature = "server")]
pub mod encounters;
pub mod engine;
pub mod error;
pub mod eval;
pub mod gallery;
pub mod npy;
#[cfg(feature = "report")]
pub mod report;
#[cfg(feature = "server")]
pub mod server;
pub mod storage;
pub mod synth;
pub mod template;
pub mod time_text;

pub use engine::{Candidate, Engine, ProbeResult, SearchParams};
pub use error::{Error, Result};
pub use gallery::{Enrollment, Gallery, Snapshot};
pub use template::Dtype;
