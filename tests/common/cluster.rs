//! A cluster on loopback for tests: a three-member etcd cluster, `biogate serve --etcd`
//! shard servers and `biogate router`, each a real process that a test can kill -9 and
//! start again.

use super::server::free_port;
use biogate::client::Client;
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
        // Until every member listens, a port it is about to take looks free to
        // free_port() (a node or router given it would make that member exit).
        let deadline = Instant::now() + Duration::from_secs(20);
        for port in etcd.client_ports.iter().chain(&etcd.peer_ports) {
            while std::net::TcpStream::connect(("127.0.0.1", *port)).is_err() {
                assert!(Instant::now() < deadline, "etcd did not listen on {port}");
                std::thread::sleep(Duration::from_millis(20));
            }
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

    /// The members' client ports.
    pub fn client_ports(&self) -> &[u16] {
        &self.client_ports
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

/// A biogate process on a loopback port that a test can kill -9 and start again.
pub struct Process {
    pub port: u16,
    args: Vec<String>,
    /// Environment variables it starts with.
    env: Vec<(String, String)>,
    /// Where its stderr goes (appended across restarts); None: nowhere.
    log: Option<PathBuf>,
    child: Option<Child>,
    /// A folder of its own (a router's `--data-dir`), kept across restarts.
    dir: Option<tempfile::TempDir>,
}

impl Process {
    /// `biogate ARGS --listen 127.0.0.1:PORT` on a free port.
    fn start(args: Vec<String>, env: Vec<(String, String)>, log: Option<PathBuf>) -> Process {
        let mut p = Process {
            port: free_port(),
            args,
            env,
            log,
            child: None,
            dir: None,
        };
        p.restart();
        p
    }

    /// Start it (again, on the same port and with the same flags).
    pub fn restart(&mut self) {
        let stderr = match &self.log {
            Some(path) => Stdio::from(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)
                    .unwrap(),
            ),
            None => Stdio::null(),
        };
        self.child = Some(
            Command::new(biogate_bin())
                .args(&self.args)
                .args(["--listen", &format!("127.0.0.1:{}", self.port)])
                .envs(self.env.iter().map(|(k, v)| (k, v)))
                .stdout(Stdio::null())
                .stderr(stderr)
                .spawn()
                .unwrap(),
        );
    }

    pub fn kill9(&mut self) {
        kill(&mut self.child);
    }

    /// Send signal `name` (STOP, CONT, ...) to the running process.
    pub fn signal(&self, name: &str) {
        if let Some(c) = &self.child {
            let ok = Command::new("kill")
                .args([format!("-{name}"), c.id().to_string()])
                .status()
                .unwrap()
                .success();
            assert!(ok, "kill -{name} {}", c.id());
        }
    }

    pub async fn client(&self) -> Client {
        connect_when_up(self.port).await
    }

    /// Its audit log (a router's, in its `--data-dir`), whole lines.
    pub fn audit_log(&self) -> String {
        let dir = self.dir.as_ref().expect("a process with a folder");
        std::fs::read_to_string(dir.path().join("audit.log")).unwrap_or_default()
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        kill(&mut self.child);
    }
}

/// A `biogate serve --etcd` process, its data and log under the cluster's folder.
pub struct Node {
    pub name: String,
    log: PathBuf,
    process: Process,
}

impl Node {
    /// Node `name` of the cluster in `etcd`, with more `serve` flags (e.g.
    /// `--checkpoint-every 3`).
    pub fn start(name: &str, root: &Path, etcd: &Etcd, more: &[&str]) -> Node {
        Node::start_via(name, root, &etcd.urls(), more)
    }

    /// As [`Node::start`], reaching etcd at `etcd_urls` (proxies a test can cut).
    pub fn start_via(name: &str, root: &Path, etcd_urls: &str, more: &[&str]) -> Node {
        Node::start_with_env(name, root, etcd_urls, more, &[])
    }

    /// As [`Node::start_via`], with environment variables (fault injection).
    pub fn start_with_env(name: &str, root: &Path, etcd_urls: &str, more: &[&str], env: &[(&str, &str)]) -> Node {
        let store = format!("file://{}", root.join("objects").display());
        let data = root.join(name);
        let mut args: Vec<String> = ["serve", "--etcd", etcd_urls, "--store", &store, "--node", name]
            .iter()
            .map(|a| a.to_string())
            .collect();
        args.extend([
            "--metrics-listen".into(),
            "off".into(),
            "-v".into(),
            "--data-dir".into(),
        ]);
        args.push(data.display().to_string());
        args.extend(more.iter().map(|a| a.to_string()));
        let log = data.with_extension("log");
        Node {
            name: name.to_owned(),
            log: log.clone(),
            process: Process::start(
                args,
                env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
                Some(log),
            ),
        }
    }

    /// What the node logged (INFO and up), across restarts.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn restart(&mut self) {
        self.process.restart();
    }

    pub fn kill9(&mut self) {
        self.process.kill9();
    }

    /// Stop the process where it is (SIGSTOP): a node that is slow, not gone.
    pub fn pause(&self) {
        self.process.signal("STOP");
    }

    pub fn resume(&self) {
        self.process.signal("CONT");
    }

    pub async fn client(&self) -> Client {
        self.process.client().await
    }

    pub fn port(&self) -> u16 {
        self.process.port
    }
}

/// A `biogate router` process, with more flags, its audit log in a folder of its own.
pub fn router(etcd: &Etcd, more: &[&str]) -> Process {
    router_with_env(etcd, more, &[])
}

/// A router with environment variables (fault knobs).
pub fn router_with_env(etcd: &Etcd, more: &[&str], env: &[(&str, &str)]) -> Process {
    let dir = tempfile::Builder::new().prefix("router").tempdir().unwrap();
    let mut args = vec!["router".into(), "--etcd".into(), etcd.urls(), "--data-dir".into()];
    args.push(dir.path().display().to_string());
    args.extend(more.iter().map(|a| a.to_string()));
    let env = env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
    let mut p = Process::start(args, env, None);
    p.dir = Some(dir);
    p
}

/// One cluster at a time: their timings (leases, kills) assume the two cores are theirs.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// A cluster for one test: etcd, `nodes` shard servers (n1, n2, ...) started with
/// `node_flags`, and a router, all answering. Dropped in this order: processes first,
/// then the folder, then the turn.
pub struct Cluster {
    pub nodes: Vec<Node>,
    pub router: Process,
    pub etcd: Etcd,
    pub dir: tempfile::TempDir,
    _turn: tokio::sync::MutexGuard<'static, ()>,
}

impl Cluster {
    pub async fn start(nodes: usize, node_flags: &[&str]) -> Cluster {
        Cluster::start_in(tempfile::tempdir().unwrap(), nodes, node_flags, &[]).await
    }

    /// In `dir` (which may hold a configuration file the flags name), with router flags.
    pub async fn start_in(dir: tempfile::TempDir, nodes: usize, node_flags: &[&str], router_flags: &[&str]) -> Cluster {
        let turn = ONE_AT_A_TIME.lock().await;
        let etcd = Etcd::start(&dir.path().join("etcd"));
        // Each one listening before the next port is picked: until then, its port
        // looks free to free_port() (a router given it would exit, its clients
        // talking to the node).
        let mut started = Vec::new();
        for i in 1..=nodes {
            let n = Node::start(&format!("n{i}"), dir.path(), &etcd, node_flags);
            wait_for_port(n.process.port).await;
            started.push(n);
        }
        let nodes = started;
        let router = router(&etcd, router_flags);
        wait_for_port(router.port).await;
        Cluster {
            nodes,
            router,
            etcd,
            dir,
            _turn: turn,
        }
    }

    /// Another node, as `Node::start` in this cluster.
    pub fn node(&self, name: &str, flags: &[&str]) -> Node {
        Node::start(name, self.dir.path(), &self.etcd, flags)
    }

    pub fn node_named(&self, name: &str) -> &Node {
        self.nodes.iter().find(|n| n.name == name).unwrap()
    }
}

/// A client of whatever answers on `port`, once it does.
pub use super::server::connect_when_up;

/// Wait until something listens on `port` (it may ask for a token before answering).
pub async fn wait_for_port(port: u16) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_err() {
        assert!(Instant::now() < deadline, "nothing listens on port {port}");
        tokio::time::sleep(Duration::from_millis(25)).await;
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

/// The binary the cluster runs: this build's, or `BIOGATE_TEST_BIN` (a campaign runs a
/// copy so that rebuilding the tree does not change the binary under a running campaign).
pub fn biogate_bin() -> std::path::PathBuf {
    match std::env::var_os("BIOGATE_TEST_BIN") {
        Some(path) => path.into(),
        None => env!("CARGO_BIN_EXE_biogate").into(),
    }
}
