//! The example gateway as a process of its own, for the benches that drive it whole
//! (`benches/http.rs`, `benches/overload.rs`): the release binary (built if needed, found
//! where cargo says it put it), started on a configuration file, its address and the built-in
//! mock's URL read from its banner, its stderr kept (the last lines) to tell why it didn't
//! start, its configuration rewritten and reloaded by SIGHUP on demand, killed when dropped.

use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// How long building the gateway may take (usually already built).
const BUILD: Duration = Duration::from_secs(15 * 60);
/// How long the gateway may take to print its banner.
const START: Duration = Duration::from_secs(30);
/// How long a gateway whose stdout closed may take to exit.
const EXIT: Duration = Duration::from_secs(5);
/// The lines of the gateway's stderr kept.
const STDERR_LINES: usize = 20;

/// The gateway binary: the path in the environment variable `env_var` when one is named and
/// set, or `cargo build --release --example gateway` (a no-op when it is up to date) and the
/// executable cargo reports, wherever the target directory is (`CARGO_TARGET_DIR`,
/// `--target`, a config's `build.target-dir`).
pub(crate) fn gateway_binary(env_var: Option<&str>) -> Result<PathBuf, String> {
    if let Some(path) = env_var.and_then(std::env::var_os) {
        return Ok(PathBuf::from(path));
    }
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.args([
        "build",
        "--release",
        "--example",
        "gateway",
        "--message-format=json-render-diagnostics",
        "--manifest-path",
    ])
    .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("Cargo.toml"))
    .stdin(Stdio::null())
    .stdout(Stdio::piped());
    // The package's variables cargo gives this bench (`CARGO_PKG_NAME`, ...) would rerun the
    // build scripts that watch them (ring's) and rebuild everything above them: not passed on.
    for (name, _) in std::env::vars_os() {
        let Some(n) = name.to_str() else { continue };
        let per_crate = ["CARGO_PKG_", "CARGO_MANIFEST_", "CARGO_BIN_"]
            .iter()
            .any(|p| n.starts_with(p))
            || [
                "CARGO_CRATE_NAME",
                "CARGO_PRIMARY_PACKAGE",
                "CARGO_TARGET_TMPDIR",
                "OUT_DIR",
            ]
            .contains(&n);
        if per_crate {
            cmd.env_remove(&name);
        }
    }
    let mut child = cmd.spawn().map_err(|e| format!("running cargo: {e}"))?;
    let stdout = child.stdout.take().ok_or("no stdout from cargo")?;
    // Cargo's JSON messages, read as they come (a full pipe would stall the build): the
    // gateway example's artifact names its executable.
    let reader = std::thread::spawn(move || {
        let mut exe = None;
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            let Ok(msg) = serde_json::from_str::<serde_json::Value>(&line) else {
                continue;
            };
            let is_gateway = msg["reason"] == "compiler-artifact"
                && msg["target"]["name"] == "gateway"
                && msg["target"]["kind"]
                    .as_array()
                    .is_some_and(|k| k.iter().any(|k| k == "example"));
            if is_gateway {
                if let Some(path) = msg["executable"].as_str() {
                    exe = Some(PathBuf::from(path));
                }
            }
        }
        exe
    });
    let deadline = Instant::now() + BUILD;
    let status = loop {
        if let Some(s) = child.try_wait().map_err(|e| e.to_string())? {
            break s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return Err(format!("building it took over {BUILD:?}"));
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let exe = reader.join().map_err(|_| "reading cargo's output failed")?;
    if !status.success() {
        return Err("`cargo build --release --example gateway` failed".into());
    }
    match exe {
        Some(bin) if bin.is_file() => Ok(bin),
        Some(bin) => Err(format!("no gateway binary at {}", bin.display())),
        None => Err("cargo reported no executable for the gateway example".into()),
    }
}

/// A gateway process, killed when dropped.
pub(crate) struct Gateway {
    child: Child,
    pub(crate) addr: SocketAddr,
    /// The built-in mock's base URL (`http://127.0.0.1:PORT/v1`), when a model uses it.
    pub(crate) mock: Option<String>,
    config: PathBuf,
    stderr: Arc<Mutex<VecDeque<String>>>,
    stderr_reader: Option<JoinHandle<()>>,
}

impl Gateway {
    pub(crate) fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Rewrites the gateway's configuration file with `config` and sends it SIGHUP (`kill
    /// -HUP`): it reloads the file (see `examples/gateway/reload.rs`). Returns once the
    /// signal is sent; whether the reload was applied shows in its metrics
    /// (`gateway_config_reloads_total`).
    pub(crate) fn reload(&self, config: &str) -> Result<(), String> {
        std::fs::write(&self.config, config)
            .map_err(|e| format!("{}: {e}", self.config.display()))?;
        let status = Command::new("kill")
            .args(["-HUP", &self.pid().to_string()])
            .stdin(Stdio::null())
            .status()
            .map_err(|e| format!("running kill -HUP: {e}"))?;
        if status.success() {
            Ok(())
        } else {
            Err(format!("kill -HUP {} failed: {status}", self.pid()))
        }
    }

    /// The last lines the gateway wrote to stderr.
    fn stderr_tail(&self) -> String {
        let lines = self.stderr.lock().unwrap_or_else(|e| e.into_inner());
        if lines.is_empty() {
            return "(nothing on stderr)".into();
        }
        lines.iter().map(|l| format!("\n  {l}")).collect()
    }

    /// Why the gateway didn't start, from a process whose stdout closed: its exit status
    /// (waited for up to [`EXIT`]) and its last lines on stderr.
    fn exited(&mut self) -> String {
        let deadline = Instant::now() + EXIT;
        let status: Option<ExitStatus> = loop {
            match self.child.try_wait() {
                Ok(Some(s)) => break Some(s),
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20));
                }
                _ => break None,
            }
        };
        let Some(status) = status else {
            return format!(
                "the gateway closed its stdout without printing its address; its last lines \
                 on stderr:{}",
                self.stderr_tail()
            );
        };
        // Its stderr is closed too: every line is read.
        if let Some(reader) = self.stderr_reader.take() {
            let _ = reader.join();
        }
        format!(
            "the gateway exited ({status}) without printing its address; its last lines on \
             stderr:{}",
            self.stderr_tail()
        )
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.config);
    }
}

/// Reads `from` line by line to its end, each line to `line` (the pipe never fills: the
/// gateway never blocks on it).
fn drain(
    from: impl Read + Send + 'static,
    mut line: impl FnMut(String) + Send + 'static,
) -> JoinHandle<()> {
    std::thread::spawn(move || {
        for l in BufReader::new(from).lines() {
            let Ok(l) = l else { break };
            line(l);
        }
    })
}

/// Starts `bin` on the configuration `config` (written to a temporary file), with `env`
/// added to its environment; returns once its banner is printed (its address, and the
/// mock's URL if a model uses the mock), or why it didn't start.
pub(crate) fn start_gateway(
    bin: &Path,
    config: &str,
    env: &[(&str, &str)],
) -> Result<Gateway, String> {
    static STARTED: AtomicUsize = AtomicUsize::new(0);
    let path = std::env::temp_dir().join(format!(
        "gateway-bench-{}-{}.toml",
        std::process::id(),
        STARTED.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::write(&path, config).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut child = Command::new(bin)
        .arg("--config")
        .arg(&path)
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("starting {}: {e}", bin.display()))?;
    let stdout = child.stdout.take().ok_or("no stdout")?;
    let stderr_pipe = child.stderr.take().ok_or("no stderr")?;
    let (tx, rx) = mpsc::channel();
    drain(stdout, move |l| {
        let _ = tx.send(l);
    });
    let stderr = Arc::new(Mutex::new(VecDeque::new()));
    let kept = Arc::clone(&stderr);
    let stderr_reader = drain(stderr_pipe, move |l| {
        let mut lines = kept.lock().unwrap_or_else(|e| e.into_inner());
        if lines.len() == STDERR_LINES {
            lines.pop_front();
        }
        lines.push_back(l);
    });
    let mut gw = Gateway {
        child,
        addr: "127.0.0.1:0".parse().expect("an address"),
        mock: None,
        config: path,
        stderr,
        stderr_reader: Some(stderr_reader),
    };
    let deadline = Instant::now() + START;
    let mut addr = None;
    // The banner: the address first, the models (the mock's URL among them), then the keys.
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let line = match rx.recv_timeout(left) {
            Ok(line) => line,
            Err(mpsc::RecvTimeoutError::Disconnected) => return Err(gw.exited()),
            Err(mpsc::RecvTimeoutError::Timeout) => {
                return Err(format!(
                    "the gateway printed no banner within {START:?}; its last lines on \
                     stderr:{}",
                    gw.stderr_tail()
                ))
            }
        };
        if let Some(a) = line.split("listening on http://").nth(1) {
            addr = Some(
                a.trim()
                    .parse()
                    .map_err(|e| format!("the gateway's address {a:?}: {e}"))?,
            );
        }
        if let Some(m) = line.split("built-in mock model at ").nth(1) {
            gw.mock = m
                .split_whitespace()
                .next()
                .filter(|u| u.starts_with("http"))
                .map(str::to_owned);
        }
        if let (Some(a), true) = (addr, line.trim_start().starts_with("API keys")) {
            gw.addr = a;
            return Ok(gw);
        }
    }
}
