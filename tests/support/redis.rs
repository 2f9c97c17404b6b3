//! Real `redis-server` processes for the tests: one node, or a 3-primary cluster (with a
//! replica per primary for failover tests), on free loopback ports, stopped when dropped.
//! Nothing here touches a Redis already running on the machine (6379 or any other port in
//! use).
//!
//! When `redis-server` or `redis-cli` is not on `PATH`: with `CI` set the harness panics
//! with a message (CI must install them: `.ci/run` does), otherwise the test prints why and
//! is skipped.

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// How long a server may take to start answering.
const START: Duration = Duration::from_secs(10);

/// The port of a Redis the tests must never touch.
const DEFAULT_REDIS_PORT: u16 = 6379;

/// A free loopback port (bound, then released for the server to take); never 6379.
pub(crate) fn free_port() -> u16 {
    loop {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .expect("no free loopback port");
        if port != DEFAULT_REDIS_PORT {
            return port;
        }
    }
}

/// True when the binaries exist; otherwise panics under CI, or explains and returns false.
pub(crate) fn available() -> bool {
    // The servers, and redis-cli to set up clusters and read the servers' state.
    let found = ["redis-server", "redis-cli"].iter().all(|bin| {
        Command::new(bin)
            .arg("--version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    });
    if !found {
        if std::env::var_os("CI").is_some() {
            panic!("redis-server or redis-cli is not on PATH; .ci/run must install them (apt-get install -y redis-server)");
        }
        eprintln!(
            "skipped: redis-server or redis-cli is not on PATH (apt-get install -y redis-server)"
        );
    }
    found
}

/// The files of a TLS-only server: its certificate and key, and the CA that signed it (PEM).
#[derive(Debug, Clone)]
pub(crate) struct RedisTls {
    pub(crate) cert: PathBuf,
    pub(crate) key: PathBuf,
    pub(crate) ca: PathBuf,
}

/// One `redis-server` process.
pub(crate) struct RedisServer {
    pub(crate) port: u16,
    child: Option<Child>,
    dir: PathBuf,
    extra: Vec<String>,
    /// TLS only (`--port 0 --tls-port PORT`), when set.
    tls: Option<RedisTls>,
}

impl RedisServer {
    /// Starts a server on a free port; `None` when redis-server is missing (outside CI).
    pub(crate) fn start() -> Option<Self> {
        Self::start_with(&[])
    }

    /// Starts a server with extra `redis-server` arguments. A free port can be taken by
    /// another process between finding it and the server binding it: then the server exits
    /// and the start is retried on another port.
    pub(crate) fn start_with(extra: &[&str]) -> Option<Self> {
        Self::start_inner(extra, None)
    }

    /// Starts a server that speaks TLS only (no client certificate asked), with `tls`'s
    /// certificate and key.
    pub(crate) fn start_tls(tls: RedisTls) -> Option<Self> {
        Self::start_inner(&[], Some(tls))
    }

    fn start_inner(extra: &[&str], tls: Option<RedisTls>) -> Option<Self> {
        if !available() {
            return None;
        }
        for _ in 0..5 {
            let port = free_port();
            let dir = std::env::temp_dir().join(format!("tlr-redis-{}-{port}", std::process::id()));
            std::fs::create_dir_all(&dir).expect("temp dir");
            let mut extra: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
            if extra.iter().any(|a| a == "--cluster-enabled") {
                // The bus port is the port + 10000 by default: past 65535 for a high port.
                extra.extend(["--cluster-port".to_owned(), free_port().to_string()]);
            }
            let mut server = Self {
                port,
                child: None,
                dir,
                extra,
                tls: tls.clone(),
            };
            if server.try_spawn() {
                return Some(server);
            }
        }
        panic!("redis-server could not start on a free port in 5 attempts");
    }

    /// `redis://127.0.0.1:PORT`, or `rediss://localhost:PORT` for a TLS server.
    pub(crate) fn url(&self) -> String {
        match self.tls {
            None => format!("redis://127.0.0.1:{}", self.port),
            Some(_) => format!("rediss://localhost:{}", self.port),
        }
    }

    /// Starts the process on `self.port`; panics when it can't (restarts keep their port).
    fn spawn(&mut self) {
        assert!(
            self.try_spawn(),
            "redis-server could not start again on port {}",
            self.port
        );
    }

    /// Starts the process and waits until it answers; false when it exited (port taken).
    fn try_spawn(&mut self) -> bool {
        assert_ne!(
            self.port, DEFAULT_REDIS_PORT,
            "never touch the Redis on 6379"
        );
        let port = self.port.to_string();
        let mut cmd = Command::new("redis-server");
        match &self.tls {
            None => cmd.args(["--port", &port]),
            Some(tls) => cmd
                .args([
                    "--port",
                    "0",
                    "--tls-port",
                    &port,
                    "--tls-auth-clients",
                    "no",
                ])
                .arg("--tls-cert-file")
                .arg(&tls.cert)
                .arg("--tls-key-file")
                .arg(&tls.key),
        };
        let child = cmd
            .args(["--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no", "--protected-mode", "no"])
            .arg("--dir")
            .arg(&self.dir)
            .args(&self.extra)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawning redis-server");
        self.child = Some(child);
        self.wait_until_ready()
    }

    /// Waits until the server answers, and checks that it is this process answering (not
    /// another server that took the port first). False when the process exited.
    fn wait_until_ready(&mut self) -> bool {
        let deadline = Instant::now() + START;
        while Instant::now() < deadline {
            let child = self.child.as_mut().expect("spawned");
            if let Ok(Some(_)) = child.try_wait() {
                self.child = None;
                return false;
            }
            let pid = child.id().to_string();
            // Another server answering means ours will fail to bind and exit: keep waiting.
            let ours = self.cli(&["INFO", "server"]).is_some_and(|info| {
                info.lines()
                    .any(|l| l.trim() == format!("process_id:{pid}"))
            });
            if ours {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!(
            "redis-server on port {} did not start within {START:?}",
            self.port
        );
    }

    /// Runs `redis-cli` against this server; its stdout, or `None` if it failed.
    pub(crate) fn cli(&self, args: &[&str]) -> Option<String> {
        let mut cmd = Command::new("redis-cli");
        cmd.args(["-h", "127.0.0.1", "-p", &self.port.to_string()]);
        if let Some(tls) = &self.tls {
            cmd.args(["--tls", "--cacert"]).arg(&tls.ca);
        }
        let out = cmd.args(args).output().ok()?;
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Every key on this server (`KEYS *`: test servers hold a handful).
    pub(crate) fn keys(&self) -> Vec<String> {
        self.cli(&["KEYS", "*"])
            .unwrap_or_default()
            .lines()
            .filter(|l| !l.is_empty())
            .map(str::to_owned)
            .collect()
    }

    /// Kills the server (a crash, for fault tests).
    pub(crate) fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Freezes the process (SIGSTOP): connections stay open, commands wait unanswered, as
    /// with a server stalled by a long command or a swapping host.
    pub(crate) fn pause(&self) {
        self.signal("-STOP");
    }

    /// Lets a paused process run again (SIGCONT): it answers what waited, in order.
    pub(crate) fn resume(&self) {
        self.signal("-CONT");
    }

    fn signal(&self, signal: &str) {
        let pid = self
            .child
            .as_ref()
            .expect("server running")
            .id()
            .to_string();
        let status = Command::new("kill")
            .args([signal, &pid])
            .status()
            .expect("kill runs");
        assert!(status.success(), "kill {signal} {pid}");
    }

    /// Starts it again on the same port.
    pub(crate) fn restart(&mut self) {
        self.stop();
        self.spawn();
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A Redis Cluster of 3 primaries, with or without a replica each.
pub(crate) struct RedisCluster {
    pub(crate) nodes: Vec<RedisServer>,
}

/// How long a failover may take: the node timeout, the election, and a loaded machine.
pub(crate) const FAILOVER: Duration = Duration::from_secs(30);

impl RedisCluster {
    /// 3 primaries, no replicas.
    pub(crate) fn start() -> Option<Self> {
        Self::create(0, "2000")
    }

    /// 3 primaries with one replica each, and a node timeout of 1 s, so that a replica is
    /// promoted within about 2 s of its primary's death.
    pub(crate) fn start_with_replicas() -> Option<Self> {
        Self::create(1, "1000")
    }

    fn create(replicas: usize, node_timeout_ms: &str) -> Option<Self> {
        if !available() {
            return None;
        }
        let mut nodes = Vec::new();
        for _ in 0..3 * (1 + replicas) {
            nodes.push(RedisServer::start_with(&[
                "--cluster-enabled",
                "yes",
                "--cluster-node-timeout",
                node_timeout_ms,
            ])?);
        }
        let addrs: Vec<String> = nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port))
            .collect();
        let out = Command::new("redis-cli")
            .args(["--cluster", "create"])
            .args(&addrs)
            .args(["--cluster-replicas", &replicas.to_string(), "--cluster-yes"])
            .output()
            .expect("redis-cli --cluster create");
        assert!(
            out.status.success(),
            "redis-cli --cluster create failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let cluster = Self { nodes };
        // Every node sees the whole cluster, and every replica is linked to its primary.
        cluster.wait_for("the cluster to become ready", START, |c| {
            c.nodes.iter().all(|n| {
                n.cli(&["CLUSTER", "INFO"]).is_some_and(|i| {
                    i.contains("cluster_state:ok")
                        && i.contains(&format!("cluster_known_nodes:{}", c.nodes.len()))
                })
            }) && (0..c.nodes.len())
                .filter(|&i| c.role(i).as_deref() == Some("slave"))
                .count()
                == 3 * replicas
                && c.nodes.iter().all(|n| {
                    n.cli(&["INFO", "replication"]).is_some_and(|i| {
                        !i.contains("role:slave") || i.contains("master_link_status:up")
                    })
                })
        });
        Some(cluster)
    }

    pub(crate) fn urls(&self) -> Vec<String> {
        self.nodes.iter().map(RedisServer::url).collect()
    }

    /// `master` or `slave` (the first line of `ROLE`); `None` when the node doesn't answer.
    pub(crate) fn role(&self, node: usize) -> Option<String> {
        let out = self.nodes[node].cli(&["ROLE"])?;
        out.lines().next().map(|l| l.trim().to_owned())
    }

    /// The index of the node that serves `key`'s slot as a primary now.
    pub(crate) fn primary_of(&self, key: &str) -> usize {
        let live = self.live_node();
        let slot: u16 = live
            .cli(&["CLUSTER", "KEYSLOT", key])
            .and_then(|s| s.trim().parse().ok())
            .expect("CLUSTER KEYSLOT");
        let nodes = live.cli(&["CLUSTER", "NODES"]).expect("CLUSTER NODES");
        for line in nodes.lines() {
            let fields: Vec<&str> = line.split_whitespace().collect();
            if fields.len() < 8 || !fields[2].contains("master") || fields[2].contains("fail") {
                continue;
            }
            let serves = fields[8..].iter().any(|range| {
                let (lo, hi) = range.split_once('-').unwrap_or((range, range));
                matches!((lo.parse::<u16>(), hi.parse::<u16>()), (Ok(lo), Ok(hi)) if (lo..=hi).contains(&slot))
            });
            if serves {
                return self.index_of(fields[1]);
            }
        }
        panic!("no primary serves slot {slot} of {key:?}:\n{nodes}");
    }

    /// The index of the replica of the primary `node`.
    pub(crate) fn replica_of(&self, node: usize) -> usize {
        let id = self.nodes[node]
            .cli(&["CLUSTER", "MYID"])
            .expect("CLUSTER MYID");
        let id = id.trim();
        let nodes = self.nodes[node]
            .cli(&["CLUSTER", "NODES"])
            .expect("CLUSTER NODES");
        nodes
            .lines()
            .map(|l| l.split_whitespace().collect::<Vec<_>>())
            .find(|f| f.len() > 3 && f[2].contains("slave") && f[3] == id)
            .map(|f| self.index_of(f[1]))
            .unwrap_or_else(|| panic!("node {node} has no replica:\n{nodes}"))
    }

    /// Waits until the replica `replica` has received everything its primary `primary` had
    /// written when this was called: its processed offset reaches the primary's.
    pub(crate) fn wait_caught_up(&self, primary: usize, replica: usize) {
        let offset = |node: usize, field: &str| -> Option<u64> {
            let info = self.nodes[node].cli(&["INFO", "replication"])?;
            info.lines()
                .find_map(|l| l.trim().strip_prefix(field)?.parse().ok())
        };
        let written = offset(primary, "master_repl_offset:").expect("the primary's offset");
        self.wait_for("the replica to catch up", START, |_| {
            offset(replica, "slave_repl_offset:").is_some_and(|got| got >= written)
        });
    }

    /// Kills the node (a crash: no shutdown, no failover handshake).
    pub(crate) fn kill(&mut self, node: usize) {
        self.nodes[node].stop();
    }

    /// Waits until `replica` has been promoted and every live node knows it: each sees the
    /// cluster whole again and lists the replica as a primary.
    pub(crate) fn wait_promoted(&self, replica: usize) {
        let port = format!(":{}@", self.nodes[replica].port);
        self.wait_for("the replica to be promoted", FAILOVER, |c| {
            c.role(replica).as_deref() == Some("master")
                && c.nodes.iter().filter(|n| n.child.is_some()).all(|n| {
                    n.cli(&["CLUSTER", "INFO"])
                        .is_some_and(|i| i.contains("cluster_state:ok"))
                        && n.cli(&["CLUSTER", "NODES"]).is_some_and(|nodes| {
                            nodes.lines().any(|l| {
                                let f: Vec<&str> = l.split_whitespace().collect();
                                f.len() > 2 && f[1].contains(&port) && f[2].contains("master")
                            })
                        })
                })
        });
    }

    /// A node that answers (the first one not killed).
    fn live_node(&self) -> &RedisServer {
        self.nodes
            .iter()
            .find(|n| n.child.is_some())
            .expect("a live node")
    }

    /// The index of the node at `addr` (`127.0.0.1:port@busport`, as `CLUSTER NODES` says).
    fn index_of(&self, addr: &str) -> usize {
        let port: u16 = addr
            .split(['@', ','])
            .next()
            .and_then(|a| a.rsplit_once(':'))
            .and_then(|(_, p)| p.parse().ok())
            .unwrap_or_else(|| panic!("no port in {addr:?}"));
        self.nodes
            .iter()
            .position(|n| n.port == port)
            .unwrap_or_else(|| panic!("no node on port {port}"))
    }

    fn wait_for(&self, what: &str, limit: Duration, mut done: impl FnMut(&Self) -> bool) {
        let deadline = Instant::now() + limit;
        while !done(self) {
            assert!(Instant::now() < deadline, "{what}: not within {limit:?}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}
