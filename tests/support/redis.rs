//! Real `redis-server` processes for the tests: one node, or a 3-primary cluster, on free
//! loopback ports, stopped when dropped. Nothing here touches a Redis already running on the
//! machine (6379 or any other port in use).
//!
//! When `redis-server` is not on `PATH`: with `CI` set the harness panics with a message
//! (CI must install it: `.ci/run` does), otherwise the test prints why and is skipped.

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
    let found = Command::new("redis-server")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !found {
        if std::env::var_os("CI").is_some() {
            panic!("redis-server is not on PATH; .ci/run must install it (apt-get install -y redis-server)");
        }
        eprintln!("skipped: redis-server is not on PATH (apt-get install -y redis-server)");
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
            let mut server = Self {
                port,
                child: None,
                dir,
                extra: extra.iter().map(|s| s.to_string()).collect(),
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

/// A Redis Cluster of 3 primaries, no replicas.
pub(crate) struct RedisCluster {
    pub(crate) nodes: Vec<RedisServer>,
}

impl RedisCluster {
    pub(crate) fn start() -> Option<Self> {
        if !available() {
            return None;
        }
        let mut nodes = Vec::new();
        for _ in 0..3 {
            nodes.push(RedisServer::start_with(&[
                "--cluster-enabled",
                "yes",
                "--cluster-node-timeout",
                "2000",
            ])?);
        }
        let addrs: Vec<String> = nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port))
            .collect();
        let out = Command::new("redis-cli")
            .args(["--cluster", "create"])
            .args(&addrs)
            .args(["--cluster-replicas", "0", "--cluster-yes"])
            .output()
            .expect("redis-cli --cluster create");
        assert!(
            out.status.success(),
            "redis-cli --cluster create failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let deadline = Instant::now() + START;
        loop {
            let ok = nodes.iter().all(|n| {
                n.cli(&["CLUSTER", "INFO"])
                    .is_some_and(|i| i.contains("cluster_state:ok"))
            });
            if ok {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "cluster did not become ready within {START:?}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        Some(Self { nodes })
    }

    pub(crate) fn urls(&self) -> Vec<String> {
        self.nodes.iter().map(RedisServer::url).collect()
    }
}
