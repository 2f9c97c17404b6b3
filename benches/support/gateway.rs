//! The example gateway as a process of its own, for the benches that drive it whole: the
//! release binary (built if needed), started on a configuration file, its address and the
//! built-in mock's URL read from its banner, killed when dropped.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// The gateway binary: the path in the environment variable `env_var` when set, or
/// `target/release/examples/gateway`, built now if needed.
pub(crate) fn gateway_binary(env_var: &str) -> Result<PathBuf, String> {
    if let Some(path) = std::env::var_os(env_var) {
        return Ok(PathBuf::from(path));
    }
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    // target/<profile>/deps/<bench>-<hash>
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .ok_or("the bench runs from target/<profile>/deps/")?;
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.args([
        "build",
        "--release",
        "--example",
        "gateway",
        "--manifest-path",
    ])
    .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("Cargo.toml"))
    .stdout(Stdio::null());
    // The package's variables cargo gives this bench would rerun the build scripts that
    // watch them (ring's) and rebuild everything above them: not passed on.
    for (name, _) in std::env::vars_os() {
        let Some(n) = name.to_str() else { continue };
        if ["CARGO_PKG_", "CARGO_MANIFEST_", "CARGO_BIN_"]
            .iter()
            .any(|p| n.starts_with(p))
            || [
                "CARGO_CRATE_NAME",
                "CARGO_PRIMARY_PACKAGE",
                "CARGO_TARGET_TMPDIR",
                "OUT_DIR",
            ]
            .contains(&n)
        {
            cmd.env_remove(&name);
        }
    }
    let status = cmd.status().map_err(|e| format!("running cargo: {e}"))?;
    if !status.success() {
        return Err("`cargo build --release --example gateway` failed".into());
    }
    let bin = profile_dir
        .join("examples")
        .join(format!("gateway{}", std::env::consts::EXE_SUFFIX));
    if bin.is_file() {
        Ok(bin)
    } else {
        Err(format!("no gateway binary at {}", bin.display()))
    }
}

/// A gateway process, killed when dropped.
pub(crate) struct Gateway {
    child: Child,
    pub(crate) addr: SocketAddr,
    /// The built-in mock's base URL (`http://127.0.0.1:PORT/v1`).
    pub(crate) mock: String,
    config: PathBuf,
}

impl Drop for Gateway {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.config);
    }
}

pub(crate) fn start_gateway(bin: &Path, config: &str) -> Result<Gateway, String> {
    let path = std::env::temp_dir().join(format!("gateway-bench-{}.toml", std::process::id()));
    std::fs::write(&path, config).map_err(|e| e.to_string())?;
    let mut child = Command::new(bin)
        .arg("--config")
        .arg(&path)
        .env("RUST_LOG", "error")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("starting {}: {e}", bin.display()))?;
    let stdout = child.stdout.take().ok_or("no stdout")?;
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            let _ = tx.send(line);
            // Keeps draining, so the gateway never blocks on a full pipe.
        }
    });
    let mut gw = Gateway {
        child,
        addr: "127.0.0.1:0".parse().expect("an address"),
        mock: String::new(),
        config: path,
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    let (mut addr, mut mock) = (None, None);
    while addr.is_none() || mock.is_none() {
        let left = deadline.saturating_duration_since(Instant::now());
        let line = rx
            .recv_timeout(left)
            .map_err(|_| "the gateway printed no address and mock URL within 30 s")?;
        if let Some(a) = line.split("listening on http://").nth(1) {
            addr = a.trim().parse().ok();
        }
        if let Some(m) = line.split("built-in mock model at ").nth(1) {
            mock = m.split_whitespace().next().map(str::to_owned);
        }
    }
    gw.addr = addr.expect("checked");
    gw.mock = mock.expect("checked");
    Ok(gw)
}
