//! Headless Chromium driven over its DevTools pipe (`--remote-debugging-pipe`: JSON
//! messages ended by a NUL byte, read from file descriptor 3 and written to 4, which a
//! `sh -c 'exec ... 3<&0 4>&1'` wrapper maps to the child's stdin and stdout): no WebSocket,
//! no crate beyond serde_json. For the dashboard's test (`dashboard.rs`).

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use base64::Engine as _;
use serde_json::{json, Value};

/// How long one DevTools command, or one awaited state of the page, may take.
pub(crate) const BROWSER_WAIT: Duration = Duration::from_secs(30);

/// A headless Chromium; killed when dropped.
pub(crate) struct Browser {
    child: Child,
    commands: ChildStdin,
    messages: mpsc::Receiver<Value>,
    next_id: u64,
    /// The page's DevTools session.
    session: String,
    _profile: TempDir,
}

/// A directory removed when dropped.
struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> Self {
        let p = std::env::temp_dir().join(format!("{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).expect("a temp dir");
        Self(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Debian's `chromium`, if installed.
pub(crate) fn chromium() -> Option<PathBuf> {
    ["/usr/bin/chromium", "/usr/bin/chromium-browser"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.is_file())
}

impl Browser {
    pub(crate) fn start(binary: &Path) -> Self {
        let profile = TempDir::new("gateway-dashboard-chromium-profile");
        let mut child = Command::new("sh")
            .arg("-c")
            // fd 3: the commands Chromium reads; fd 4: its answers and events.
            .arg(r#"exec "$0" "$@" 3<&0 4>&1 0</dev/null 1>/dev/null"#)
            .arg(binary)
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-dev-shm-usage",
                "--no-first-run",
                "--no-default-browser-check",
                "--disable-extensions",
                "--disable-background-networking",
                "--hide-scrollbars",
                "--window-size=1280,800",
                "--remote-debugging-pipe",
            ])
            .arg(format!("--user-data-dir={}", profile.0.display()))
            .arg("about:blank")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("starting chromium");
        let commands = child.stdin.take().expect("stdin");
        let mut out = child.stdout.take().expect("stdout");
        let (tx, messages) = mpsc::channel();
        std::thread::spawn(move || {
            let mut pending = Vec::new();
            let mut buf = [0u8; 65536];
            while let Ok(n) = out.read(&mut buf) {
                if n == 0 {
                    break;
                }
                pending.extend_from_slice(&buf[..n]);
                while let Some(end) = pending.iter().position(|&b| b == 0) {
                    let message: Vec<u8> = pending.drain(..=end).collect();
                    if let Ok(v) = serde_json::from_slice::<Value>(&message[..end]) {
                        if tx.send(v).is_err() {
                            return;
                        }
                    }
                }
            }
        });
        let mut b = Browser {
            child,
            commands,
            messages,
            next_id: 0,
            session: String::new(),
            _profile: profile,
        };
        let target = b.command("Target.createTarget", json!({"url": "about:blank"}), None);
        let target_id = target["targetId"].as_str().expect("a target id").to_owned();
        let attached = b.command(
            "Target.attachToTarget",
            json!({"targetId": target_id, "flatten": true}),
            None,
        );
        b.session = attached["sessionId"]
            .as_str()
            .expect("a session id")
            .to_owned();
        b
    }

    /// Sends a DevTools command (to the page's session unless `browser_level`) and waits for
    /// its answer: its `result`, or `Err` with its `error`.
    fn try_command(
        &mut self,
        method: &str,
        params: Value,
        session: Option<&str>,
    ) -> Result<Value, Value> {
        self.next_id += 1;
        let id = self.next_id;
        let mut message = json!({"id": id, "method": method, "params": params});
        if let Some(s) = session {
            message["sessionId"] = json!(s);
        }
        let mut bytes = serde_json::to_vec(&message).unwrap();
        bytes.push(0);
        self.commands
            .write_all(&bytes)
            .and_then(|()| self.commands.flush())
            .expect("writing to chromium's DevTools pipe");
        let deadline = Instant::now() + BROWSER_WAIT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let m = self.messages.recv_timeout(left).unwrap_or_else(|_| {
                panic!("chromium did not answer {method} within {BROWSER_WAIT:?}")
            });
            if m["id"] == id {
                return match m.get("error") {
                    Some(e) => Err(e.clone()),
                    None => Ok(m["result"].clone()),
                };
            }
        }
    }

    pub(crate) fn command(&mut self, method: &str, params: Value, session: Option<&str>) -> Value {
        self.try_command(method, params, session)
            .unwrap_or_else(|e| panic!("{method}: {e}"))
    }

    pub(crate) fn page(&mut self, method: &str, params: Value) -> Value {
        let session = self.session.clone();
        self.command(method, params, Some(&session))
    }

    /// The value of a JavaScript expression in the page, or `None` when it threw or the page
    /// was between documents.
    pub(crate) fn eval(&mut self, expression: &str) -> Option<Value> {
        let session = self.session.clone();
        let r = self
            .try_command(
                "Runtime.evaluate",
                json!({"expression": expression, "returnByValue": true, "awaitPromise": true}),
                Some(&session),
            )
            .ok()?;
        if r.get("exceptionDetails").is_some() {
            return None;
        }
        Some(r["result"]["value"].clone())
    }

    /// Waits (bounded) until `expression` is true in the page.
    pub(crate) fn wait_until(&mut self, expression: &str, what: &str) {
        let deadline = Instant::now() + BROWSER_WAIT;
        while self.eval(expression) != Some(Value::Bool(true)) {
            assert!(
                Instant::now() < deadline,
                "the page did not show {what} within {BROWSER_WAIT:?} ({expression}); its text: {:?}",
                self.eval("document.body && document.body.innerText")
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    pub(crate) fn viewport(&mut self, width: u32, height: u32, mobile: bool) {
        self.page(
            "Emulation.setDeviceMetricsOverride",
            json!({"width": width, "height": height, "deviceScaleFactor": 1, "mobile": mobile}),
        );
    }

    pub(crate) fn screenshot(&mut self, path: &Path) {
        let shot = self.page("Page.captureScreenshot", json!({"format": "png"}));
        let png = base64::engine::general_purpose::STANDARD
            .decode(shot["data"].as_str().expect("screenshot data"))
            .expect("base64 screenshot");
        assert!(png.starts_with(b"\x89PNG"), "a PNG");
        std::fs::write(path, png).expect("writing the screenshot");
    }
}

impl Drop for Browser {
    /// Asks Chromium to close (so that it ends its own helper processes), then kills it if
    /// it hasn't within a few seconds.
    fn drop(&mut self) {
        let close = b"{\"id\":0,\"method\":\"Browser.close\"}\0";
        let _ = self
            .commands
            .write_all(close)
            .and_then(|()| self.commands.flush());
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
