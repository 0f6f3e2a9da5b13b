//! Helpers for tests of the gRPC server: a loopback configuration, a client, and the
//! metrics endpoint read without an HTTP client.

use biogate::client::{Client, ConnectOptions};
use biogate::server::ServerHandle;
use biogate::server::config::{Config, Role, TokenConfig};
use biogate::server::proto;
use std::path::Path;

pub const DIM: usize = 64;

pub fn config(data: &Path) -> Config {
    Config {
        data_dir: data.to_path_buf(),
        listen: "127.0.0.1:0".parse().unwrap(),
        metrics_listen: Some("127.0.0.1:0".parse().unwrap()),
        default_gallery: None,
        ..Config::default()
    }
}

pub async fn connect(h: &ServerHandle, token: Option<&str>) -> Client {
    Client::connect(&ConnectOptions {
        addr: format!("http://{}", h.addr),
        token: token.map(str::to_owned),
        ..Default::default()
    })
    .await
    .unwrap()
}

pub async fn create(c: &Client, name: &str, dtype: &str) {
    let req = proto::CreateGalleryRequest {
        name: name.into(),
        dim: DIM as u32,
        dtype: dtype.into(),
        ..Default::default()
    };
    c.raw().create_gallery(c.request(req)).await.unwrap();
}

pub async fn metrics(h: &ServerHandle) -> String {
    // A tiny HTTP/1.0 GET, to keep an HTTP client out of the dependencies.
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(h.metrics_addr.unwrap()).await.unwrap();
    s.write_all(b"GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n").await.unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    out
}

pub fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("metric {name} missing"))
}

pub fn ids(prefix: &str, n: usize) -> Vec<String> {
    (0..n).map(|i| format!("{prefix}-{i:05}")).collect()
}

/// A gate (identify), an enrollment officer (identify, enroll) and an admin.
pub fn tokens() -> Vec<TokenConfig> {
    let t = |name: &str, token: &str, roles: &[Role]| TokenConfig {
        name: name.into(),
        token: token.into(),
        roles: roles.to_vec(),
    };
    vec![
        t("gate-A12", "gate-token-0123456789", &[Role::Identify]),
        t("officer-7", "officer-token-0123456789", &[Role::Identify, Role::Enroll]),
        t("ops", "admin-token-0123456789", &[Role::Admin]),
    ]
}

/// A free loopback port.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// `biogate serve` on `port` over `data`, as a child process (for kill -9 tests).
pub fn serve_process(port: u16, data: &Path) -> std::process::Child {
    std::process::Command::new(env!("CARGO_BIN_EXE_biogate"))
        .args([
            "serve",
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--metrics-listen",
            "off",
            "--data-dir",
        ])
        .arg(data)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap()
}

/// A client of the server on `port`, once it answers.
pub async fn connect_when_up(port: u16) -> Client {
    for _ in 0..400 {
        let options = ConnectOptions {
            addr: format!("http://127.0.0.1:{port}"),
            ..Default::default()
        };
        if let Ok(c) = Client::connect(&options).await
            && c.list_galleries().await.is_ok()
        {
            return c;
        }
        tokio::time::sleep(std::time::Duration::from_millis(25)).await;
    }
    panic!("server did not come up");
}
