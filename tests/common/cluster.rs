//! A cluster on loopback for tests: a three-member etcd cluster, `biogate serve --etcd`
//! shard servers and `biogate router`, each a real process that a test can kill -9 and
//! start again.

use super::server::free_port;
use biogate::client::{Client, ConnectOptions};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Whether etcd can be run here; without it the cluster tests skip, unless
/// `BIOGATE_REQUIRE_ETCD=1` (CI installs etcd and sets it).
pub fn etcd_available() -> bool {
    let found = Command::new("etcd")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !found {
        assert!(
            std::env::var("BIOGATE_REQUIRE_ETCD").as_deref() != Ok("1"),
            "BIOGATE_REQUIRE_ETCD=1 but no etcd on PATH (Debian: apt-get install etcd-server)"
        );
        eprintln!("no etcd on PATH: skipping the cluster test");
    }
    found
}

fn kill(child: &mut Option<Child>) {
    if let Some(mut c) = child.take() {
        let _ = c.kill();
        let _ = c.wait();
    }
}

/// Three etcd members on free loopback ports.
pub struct Etcd {
    dir: PathBuf,
    client_ports: Vec<u16>,
    peer_ports: Vec<u16>,
    members: Vec<Option<Child>>,
}

impl Etcd {
    pub fn start(dir: &Path) -> Etcd {
        let client_ports: Vec<u16> = (0..3).map(|_| free_port()).collect();
        let peer_ports: Vec<u16> = (0..3).map(|_| free_port()).collect();
        let mut etcd = Etcd {
            dir: dir.to_path_buf(),
            client_ports,
            peer_ports,
            members: vec![None, None, None],
        };
        for i in 0..3 {
            etcd.start_member(i);
        }
        etcd
    }

    /// The client URLs, as `--etcd` takes them.
    pub fn urls(&self) -> String {
        self.client_ports
            .iter()
            .map(|p| format!("http://127.0.0.1:{p}"))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Start member `i` (again: it rejoins with its data).
    pub fn start_member(&mut self, i: usize) {
        let cluster: Vec<String> = self
            .peer_ports
            .iter()
            .enumerate()
            .map(|(j, p)| format!("e{j}=http://127.0.0.1:{p}"))
            .collect();
        let client = format!("http://127.0.0.1:{}", self.client_ports[i]);
        let peer = format!("http://127.0.0.1:{}", self.peer_ports[i]);
        let data = self.dir.join(format!("e{i}"));
        let state = if data.exists() { "existing" } else { "new" };
        let child = Command::new("etcd")
            .args(["--name", &format!("e{i}"), "--data-dir"])
            .arg(&data)
            .args(["--listen-client-urls", &client, "--advertise-client-urls", &client])
            .args(["--listen-peer-urls", &peer, "--initial-advertise-peer-urls", &peer])
            .args([
                "--initial-cluster",
                &cluster.join(","),
                "--initial-cluster-state",
                state,
            ])
            .args(["--initial-cluster-token", "biogate-test"])
            .args(["--heartbeat-interval", "50", "--election-timeout", "500"])
            .args(["--logger", "zap", "--log-level", "error"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("starting etcd");
        self.members[i] = Some(child);
    }

    /// kill -9 member `i`.
    pub fn kill_member(&mut self, i: usize) {
        kill(&mut self.members[i]);
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        for m in &mut self.members {
            kill(m);
        }
    }
}

/// A `biogate serve --etcd` process.
pub struct Node {
    pub name: String,
    pub port: u16,
    data: PathBuf,
    etcd: String,
    store: String,
    args: Vec<String>,
    child: Option<Child>,
}

impl Node {
    pub fn start(name: &str, root: &Path, etcd: &Etcd) -> Node {
        Node::start_with(name, root, etcd, &[])
    }

    /// With more `serve` flags (e.g. `--checkpoint-every 3`).
    pub fn start_with(name: &str, root: &Path, etcd: &Etcd, args: &[&str]) -> Node {
        let mut n = Node {
            name: name.to_owned(),
            port: free_port(),
            data: root.join(name),
            etcd: etcd.urls(),
            store: format!("file://{}", root.join("objects").display()),
            args: args.iter().map(|a| a.to_string()).collect(),
            child: None,
        };
        n.restart();
        n
    }

    /// What the node logged (INFO and up), across restarts.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.data.with_extension("log")).unwrap_or_default()
    }

    /// Start it (again, on the same port and data).
    pub fn restart(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.data.with_extension("log"))
            .unwrap();
        self.child = Some(
            Command::new(env!("CARGO_BIN_EXE_biogate"))
                .args([
                    "serve",
                    "--etcd",
                    &self.etcd,
                    "--store",
                    &self.store,
                    "--node",
                    &self.name,
                ])
                .args([
                    "--listen",
                    &format!("127.0.0.1:{}", self.port),
                    "--metrics-listen",
                    "off",
                ])
                .arg("--data-dir")
                .arg(&self.data)
                .args(&self.args)
                .arg("-v")
                .stdout(Stdio::null())
                .stderr(log)
                .spawn()
                .unwrap(),
        );
    }

    pub fn kill9(&mut self) {
        kill(&mut self.child);
    }

    pub async fn client(&self) -> Client {
        connect_when_up(self.port).await
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        kill(&mut self.child);
    }
}

/// A `biogate router` process.
pub struct Router {
    pub port: u16,
    etcd: String,
    child: Option<Child>,
}

impl Router {
    pub fn start(etcd: &Etcd) -> Router {
        let mut r = Router {
            port: free_port(),
            etcd: etcd.urls(),
            child: None,
        };
        r.restart();
        r
    }

    pub fn restart(&mut self) {
        self.child = Some(
            Command::new(env!("CARGO_BIN_EXE_biogate"))
                .args([
                    "router",
                    "--etcd",
                    &self.etcd,
                    "--listen",
                    &format!("127.0.0.1:{}", self.port),
                ])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap(),
        );
    }

    pub fn kill9(&mut self) {
        kill(&mut self.child);
    }

    pub async fn client(&self) -> Client {
        connect_when_up(self.port).await
    }
}

impl Drop for Router {
    fn drop(&mut self) {
        kill(&mut self.child);
    }
}

/// A client of whatever answers on `port`, once it does.
pub async fn connect_when_up(port: u16) -> Client {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let options = ConnectOptions {
            addr: format!("http://127.0.0.1:{port}"),
            ..Default::default()
        };
        if let Ok(c) = Client::connect(&options).await
            && c.list_galleries().await.is_ok()
        {
            return c;
        }
        assert!(Instant::now() < deadline, "nothing answered on port {port}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Wait until `ready` holds, polling every 50 ms, for at most `within`.
pub async fn eventually<F, Fut>(within: Duration, what: &str, mut ready: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + within;
    while !ready().await {
        assert!(Instant::now() < deadline, "not within {within:?}: {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
