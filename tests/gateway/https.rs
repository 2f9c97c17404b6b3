//! The gateway in front of HTTPS upstreams, and on a Redis that speaks TLS only.
//!
//! Each test makes a CA and a certificate it signs for `localhost` and `127.0.0.1` (rcgen),
//! writes the CA's PEM into a temp dir, and starts real TLS servers with them: an
//! OpenAI-shaped upstream (rustls + hyper, this file's parent's handler) on a loopback port,
//! offering HTTP/2 and HTTP/1.1 by ALPN or HTTP/1.1 only, counting the TCP connections it
//! accepts and recording the HTTP version of each request; and, with the `redis` feature, a
//! `redis-server --port 0 --tls-port PORT`. The gateway is the real binary. Every wait is
//! bounded.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Router;
use bytes::Bytes;
use http::{Request, Version};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair, KeyUsagePurpose,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio::task::{JoinHandle, JoinSet};
use tokio_rustls::TlsAcceptor;

use super::support::{self, within};
use super::{
    assert_openai_error, chat, client, rule_state, run_to_exit, upstream, Answer, Gateway,
    HttpClient, Seen, TempConfig, Upstream,
};

// ─── A CA and a server certificate, made here ────────────────────────────────────────────

/// A CA made for the test and a certificate it signed for `localhost` and `127.0.0.1`; the
/// CA's certificate and the server's certificate and key are PEM files in a temp dir,
/// removed when dropped.
struct TestPki {
    dir: PathBuf,
    server_cert: CertificateDer<'static>,
    server_key: Vec<u8>,
}

impl TestPki {
    fn new() -> Self {
        static N: AtomicUsize = AtomicUsize::new(0);
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "gateway test CA");
        ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().unwrap()).unwrap();

        let key = KeyPair::generate().unwrap();
        let mut params =
            CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()]).unwrap();
        params
            .distinguished_name
            .push(DnType::CommonName, "localhost");
        let cert = params.signed_by(&key, &ca).unwrap();

        let dir = std::env::temp_dir().join(format!(
            "gateway-https-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("ca.pem"), ca.pem()).unwrap();
        std::fs::write(dir.join("server.pem"), cert.pem()).unwrap();
        std::fs::write(dir.join("server-key.pem"), key.serialize_pem()).unwrap();
        Self {
            dir,
            server_cert: cert.der().clone(),
            server_key: key.serialize_der(),
        }
    }

    /// The CA's certificate (PEM), for a model's `ca_file`.
    fn ca_file(&self) -> PathBuf {
        self.dir.join("ca.pem")
    }

    fn file(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// A TLS server configuration with the server certificate, offering `alpn`.
    fn server_config(&self, alpn: &[&[u8]]) -> Arc<rustls::ServerConfig> {
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.server_key.clone()));
        let mut config = rustls::ServerConfig::builder()
            .with_no_client_auth()
            .with_single_cert(vec![self.server_cert.clone()], key)
            .unwrap();
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        Arc::new(config)
    }
}

impl Drop for TestPki {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn path_str(p: &Path) -> &str {
    p.to_str().expect("utf-8 temp path")
}

// ─── The TLS upstream ────────────────────────────────────────────────────────────────────

const H2_AND_H1: &[&[u8]] = &[b"h2", b"http/1.1"];
const H1_ONLY: &[&[u8]] = &[b"http/1.1"];

/// The OpenAI-shaped upstream of `tests/gateway.rs` behind TLS; stopped when dropped.
struct TlsUpstream {
    addr: SocketAddr,
    up: Upstream,
    /// TCP connections accepted (a failed handshake counts too).
    connections: Arc<AtomicUsize>,
    task: JoinHandle<()>,
}

impl TlsUpstream {
    async fn start(pki: &TestPki, alpn: &[&[u8]]) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let up = Upstream {
            seen: Arc::default(),
            release: Arc::new(Semaphore::new(0)),
        };
        let app = Router::new().fallback(upstream).with_state(up.clone());
        let acceptor = TlsAcceptor::from(pki.server_config(alpn));
        let connections = Arc::new(AtomicUsize::new(0));
        let accepted = Arc::clone(&connections);
        let task = tokio::spawn(async move {
            // Dropped with the task: every connection ends with it.
            let mut open = JoinSet::new();
            while let Ok((tcp, _)) = listener.accept().await {
                accepted.fetch_add(1, Ordering::SeqCst);
                while open.try_join_next().is_some() {}
                let (acceptor, app) = (acceptor.clone(), app.clone());
                open.spawn(async move {
                    // A client that rejects the certificate ends the handshake.
                    let Ok(Ok(tls)) =
                        tokio::time::timeout(support::WAIT, acceptor.accept(tcp)).await
                    else {
                        return;
                    };
                    let _ = auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(tls), TowerToHyperService::new(app))
                        .await;
                });
            }
        });
        Self {
            addr,
            up,
            connections,
            task,
        }
    }

    /// `https://localhost:PORT/v1`
    fn url(&self) -> String {
        format!("https://localhost:{}/v1", self.addr.port())
    }

    fn connections(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }

    fn seen(&self) -> Vec<Seen> {
        self.up.seen.lock().unwrap().clone()
    }
}

impl Drop for TlsUpstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

// ─── The gateway's configuration and requests ────────────────────────────────────────────

/// Models on the TLS upstreams: `azure-style` (key in `api-key`), `bearer` (key in
/// `Authorization: Bearer`) and `h2-off` (`http2 = false`) on `h2_url`, `h1-only` on
/// `h1_url`, all trusting `ca`; and `untrusted` on `h2_url` without it.
fn https_config(h2_url: &str, h1_url: &str, ca: &Path) -> String {
    let ca = path_str(ca);
    format!(
        r#"
listen = "127.0.0.1:0"

[limiter]
default_output_tokens = 100

[models.azure-style]
upstream = "{h2_url}"
ca_file = "{ca}"
api_key = "sk-azure-secret"
api_key_header = "api-key"
timeout_secs = 5

[models.bearer]
upstream = "{h2_url}"
ca_file = "{ca}"
api_key = "sk-bearer-secret"
timeout_secs = 5

[models.h1-only]
upstream = "{h1_url}"
ca_file = "{ca}"
api_key = "sk-h1-secret"
timeout_secs = 5

[models.h2-off]
upstream = "{h2_url}"
ca_file = "{ca}"
api_key = "sk-h1-secret"
http2 = false
timeout_secs = 5

[models.untrusted]
upstream = "{h2_url}"
api_key = "sk-untrusted-secret"
timeout_secs = 5

[tiers.pro]
rpm = 600
tpm = 200000
concurrent = 20

[keys]
pro-a = {{ user = "carol", tier = "pro" }}
"#
    )
}

/// POSTs `body` to `/v1/chat/completions` as `pro-a`, with the client's own credentials in
/// the other headers upstreams read keys from.
async fn post(c: &HttpClient, gw: &Gateway, body: &Value) -> http::Response<hyper::body::Incoming> {
    let req = Request::builder()
        .method("POST")
        .uri(gw.url("/v1/chat/completions"))
        .header("authorization", "Bearer pro-a")
        .header("api-key", "client-own-key")
        .header("x-api-key", "client-own-key")
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.to_string())))
        .unwrap();
    within("a chat request", c.request(req)).await.unwrap()
}

/// [`post`], read to the end.
async fn post_read(c: &HttpClient, gw: &Gateway, body: &Value) -> Answer {
    let (parts, body) = post(c, gw, body).await.into_parts();
    let body = within("the response body", body.collect())
        .await
        .unwrap()
        .to_bytes();
    Answer {
        status: parts.status,
        headers: parts.headers,
        body,
    }
}

/// Waits (bounded) until `pro-a`'s `user-tpm` has `want` remaining: the request's charge
/// settled to the usage the upstream reported.
async fn tpm_becomes(c: &HttpClient, gw: &Gateway, want: u64) {
    let deadline = Instant::now() + support::WAIT;
    loop {
        let state = rule_state(c, gw, "pro-a", "user-tpm").await;
        if state["remaining"] == want {
            return;
        }
        assert!(Instant::now() < deadline, "user-tpm: {state}, want {want}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The header `name` of a request the upstream saw.
fn header<'a>(seen: &'a Seen, name: &str) -> Option<&'a str> {
    seen.headers.get(name).map(|v| v.to_str().unwrap())
}

/// What every request an upstream saw must show of credentials: the model's, never the
/// client's.
fn assert_credentials(seen: &Seen, name: &str, value: &str) {
    assert_eq!(header(seen, name), Some(value), "{:?}", seen.headers);
    for other in ["authorization", "api-key", "x-api-key"] {
        if other != name {
            assert_eq!(header(seen, other), None, "{:?}", seen.headers);
        }
    }
    let client_secret = |v: &http::HeaderValue| {
        let v = String::from_utf8_lossy(v.as_bytes());
        v.contains("client-own-key") || v.contains("pro-a")
    };
    assert!(
        !seen.headers.values().any(client_secret),
        "{:?}",
        seen.headers
    );
}

// ─── The tests ───────────────────────────────────────────────────────────────────────────

/// JSON and streamed completions through an HTTPS upstream that offers h2: HTTP/2, a private
/// CA from `ca_file`, the key in `api-key` or `Authorization: Bearer`, usage settled, one
/// TLS connection per client for every request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_upstream_speaks_http2_trusts_its_ca_file_and_sends_the_models_key() {
    let pki = TestPki::new();
    let h2 = TlsUpstream::start(&pki, H2_AND_H1).await;
    let cfg = TempConfig::new(&https_config(&h2.url(), &h2.url(), &pki.ca_file()));
    let gw = Gateway::start(&["--config", cfg.path()]);
    assert!(
        gw.banner
            .contains(&format!("azure-style      -> {}", h2.url())),
        "{}",
        gw.banner
    );
    let c = client();

    // A JSON completion: through, usage settled (2 prompt words + 5 completion tokens).
    let a = post_read(&c, &gw, &chat("azure-style", "hello there", 5)).await;
    assert_eq!(a.status, 200, "{:?}", a.body);
    assert_eq!(a.json()["usage"]["total_tokens"], 7, "{}", a.json());
    tpm_becomes(&c, &gw, 200_000 - 7).await;
    let seen = h2.seen();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].version, Version::HTTP_2);
    assert_eq!(seen[0].path, "/v1/chat/completions");
    assert_credentials(&seen[0], "api-key", "sk-azure-secret");
    assert_eq!(h2.connections(), 1);

    // A stream: the first chunk comes through while the upstream holds the rest.
    let body = json!({"model": "azure-style", "stream": true, "test_hold": true,
        "max_tokens": 5, "messages": [{"role": "user", "content": "one two three"}]});
    let r = post(&c, &gw, &body).await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-type"], "text/event-stream");
    let mut stream = r.into_body();
    let first = within("the first SSE chunk", stream.frame())
        .await
        .expect("a frame")
        .expect("no error")
        .into_data()
        .expect("data");
    let first = String::from_utf8_lossy(&first).into_owned();
    assert!(
        first.starts_with("data: ") && !first.contains("[DONE]"),
        "{first}"
    );
    h2.up.release.add_permits(1);
    let mut text = first;
    while let Some(frame) = within("the rest of the stream", stream.frame()).await {
        if let Ok(data) = frame.expect("stream error").into_data() {
            text.push_str(&String::from_utf8_lossy(&data));
        }
    }
    assert!(text.ends_with("data: [DONE]\n\n"), "{text}");
    assert!(text.contains(r#""total_tokens":8"#), "{text}");
    tpm_becomes(&c, &gw, 200_000 - 7 - 8).await;

    // More requests, one after another and then at once: all on the first connection.
    for i in 0..4 {
        let a = post_read(&c, &gw, &chat("azure-style", "again", 1)).await;
        assert_eq!(a.status, 200, "request {i}: {:?}", a.body);
    }
    let at_once: Vec<_> = (0..4)
        .map(|_| {
            let (c, gw_url) = (c.clone(), gw.url("/v1/chat/completions"));
            tokio::spawn(async move {
                let req = Request::builder()
                    .method("POST")
                    .uri(gw_url)
                    .header("authorization", "Bearer pro-a")
                    .body(Full::new(Bytes::from(
                        chat("azure-style", "together", 1).to_string(),
                    )))
                    .unwrap();
                let r = within("a concurrent request", c.request(req))
                    .await
                    .unwrap();
                let status = r.status();
                within("its body", r.into_body().collect()).await.unwrap();
                status
            })
        })
        .collect();
    for t in at_once {
        assert_eq!(t.await.unwrap(), 200);
    }
    assert_eq!(h2.connections(), 1, "every request on one TLS connection");

    // The default credential header, on the same upstream: a model with a `ca_file` has a
    // client (and a connection) of its own.
    let a = post_read(&c, &gw, &chat("bearer", "hi", 2)).await;
    assert_eq!(a.status, 200, "{:?}", a.body);
    let seen = h2.seen();
    assert_eq!(seen.len(), 11);
    assert!(seen.iter().all(|s| s.version == Version::HTTP_2));
    for s in &seen[..10] {
        assert_credentials(s, "api-key", "sk-azure-secret");
    }
    assert_credentials(&seen[10], "authorization", "Bearer sk-bearer-secret");
    assert_eq!(h2.connections(), 2);
}

/// An upstream that offers only http/1.1 by ALPN is spoken to in HTTP/1.1, JSON and streams,
/// on one kept-alive TLS connection; so is one that offers h2 to a model with `http2 =
/// false`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_upstream_offering_only_http1_gets_http1_on_one_kept_connection() {
    let pki = TestPki::new();
    let h2 = TlsUpstream::start(&pki, H2_AND_H1).await;
    let h1 = TlsUpstream::start(&pki, H1_ONLY).await;
    let cfg = TempConfig::new(&https_config(&h2.url(), &h1.url(), &pki.ca_file()));
    let gw = Gateway::start(&["--config", cfg.path()]);
    let c = client();
    for i in 0..3 {
        let a = post_read(&c, &gw, &chat("h1-only", "hello there", 5)).await;
        assert_eq!(a.status, 200, "request {i}: {:?}", a.body);
        assert_eq!(a.json()["usage"]["total_tokens"], 7, "{}", a.json());
    }
    let body = json!({"model": "h1-only", "stream": true, "max_tokens": 3,
        "messages": [{"role": "user", "content": "one two"}]});
    let a = post_read(&c, &gw, &body).await;
    assert_eq!(a.status, 200);
    let text = String::from_utf8_lossy(&a.body);
    assert!(text.ends_with("data: [DONE]\n\n"), "{text}");
    tpm_becomes(&c, &gw, 200_000 - 3 * 7 - 5).await;

    let seen = h1.seen();
    assert_eq!(seen.len(), 4);
    for s in &seen {
        assert_eq!(s.version, Version::HTTP_11);
        assert_credentials(s, "authorization", "Bearer sk-h1-secret");
    }
    assert_eq!(
        h1.connections(),
        1,
        "every request on one kept-alive connection"
    );

    assert!(h2.seen().is_empty());
    for _ in 0..2 {
        let a = post_read(&c, &gw, &chat("h2-off", "hi", 1)).await;
        assert_eq!(a.status, 200, "{:?}", a.body);
    }
    let seen = h2.seen();
    assert_eq!(seen.len(), 2);
    for s in &seen {
        assert_eq!(s.version, Version::HTTP_11);
        assert_credentials(s, "authorization", "Bearer sk-h1-secret");
    }
    assert_eq!(h2.connections(), 1);
}

/// A model without the `ca_file` its upstream's certificate needs: the handshake fails, the
/// request is answered 502 in OpenAI's shape (not a hang, not a crash), and nothing reaches
/// the upstream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn untrusted_upstream_certificate_is_a_502() {
    let pki = TestPki::new();
    let h2 = TlsUpstream::start(&pki, H2_AND_H1).await;
    let cfg = TempConfig::new(&https_config(&h2.url(), &h2.url(), &pki.ca_file()));
    let gw = Gateway::start(&["--config", cfg.path()]);
    let c = client();
    let a = post_read(&c, &gw, &chat("untrusted", "hello", 5)).await;
    assert_openai_error(&a, 502, "upstream_unreachable");
    let message = a.json()["error"]["message"].as_str().unwrap().to_owned();
    assert!(message.contains("certificate"), "{message}");
    assert!(h2.seen().is_empty(), "{:?}", h2.seen());
    assert!(h2.connections() >= 1, "the gateway did try");
    // Its tokens are refunded (as for every failed request), and the gateway serves on.
    tpm_becomes(&c, &gw, 200_000).await;
    let a = post_read(&c, &gw, &chat("azure-style", "hello", 5)).await;
    assert_eq!(a.status, 200, "{:?}", a.body);
}

/// Bad `ca_file`s and `api_key_header`s stop the gateway with exit code 2 and a message
/// naming the field, at start-up and with `--check-config`; a good HTTPS model passes.
#[test]
fn bad_ca_file_and_api_key_header_are_config_errors() {
    let pki = TestPki::new();
    let not_pem = pki.file("not-pem.txt");
    std::fs::write(&not_pem, "just some text\n").unwrap();
    let bad_der = pki.file("bad-der.pem");
    std::fs::write(
        &bad_der,
        "-----BEGIN CERTIFICATE-----\nAAECAwQFBgcICQ==\n-----END CERTIFICATE-----\n",
    )
    .unwrap();
    let missing = pki.file("missing.pem");
    let model = |lines: &str| {
        format!(
            "[models.m]\n{lines}\n[tiers.free]\nrpm = 10\n\
             [keys]\nk = {{ user = \"u\", tier = \"free\" }}\n"
        )
    };
    let https = "upstream = \"https://localhost:1/v1\"";
    let ca = |p: &Path| format!("ca_file = \"{}\"", path_str(p));

    // Valid: an HTTPS upstream with the CA file and an `api-key` header.
    let good = TempConfig::new(&model(&format!(
        "{https}\n{}\napi_key = \"k\"\napi_key_header = \"api-key\"",
        ca(&pki.ca_file())
    )));
    let (code, out, err) = run_to_exit(&["--check-config", "--config", good.path()]);
    assert_eq!(code, Some(0), "{out}{err}");

    let cases: Vec<(String, Vec<&str>)> = vec![
        (
            model(&format!("{https}\n{}", ca(&missing))),
            vec!["`models.m.ca_file`", "can't read", "missing.pem"],
        ),
        (
            model(&format!("{https}\n{}", ca(&not_pem))),
            vec!["`models.m.ca_file`", "no PEM certificate"],
        ),
        (
            model(&format!("{https}\n{}", ca(&bad_der))),
            vec!["`models.m.ca_file`", "not a valid X.509 certificate"],
        ),
        (
            model(&format!(
                "upstream = \"http://127.0.0.1:1/v1\"\n{}",
                ca(&pki.ca_file())
            )),
            vec!["`models.m.ca_file`", "https:// upstreams only"],
        ),
        (
            model(&format!(
                "{https}\napi_key = \"k\"\napi_key_header = \"bad header\""
            )),
            vec!["`models.m.api_key_header`", "not a valid header name"],
        ),
        (
            model(&format!(
                "{https}\napi_key = \"k\"\napi_key_header = \"content-length\""
            )),
            vec!["`models.m.api_key_header`", "writes it itself"],
        ),
        (
            model(&format!("{https}\napi_key_header = \"api-key\"")),
            vec!["`models.m.api_key_header`", "set api_key or api_key_env"],
        ),
        (
            format!(
                "[server]\nforward_headers = [\"x-upstream-key\"]\n{}",
                model(&format!(
                    "{https}\napi_key = \"k\"\napi_key_header = \"x-upstream-key\""
                ))
            ),
            vec!["`server.forward_headers[0]`", "model `m`"],
        ),
    ];
    for (text, wants) in cases {
        let cfg = TempConfig::new(&text);
        for args in [
            &["--check-config", "--config", cfg.path()][..],
            &["--config", cfg.path(), "--listen", "127.0.0.1:0"][..],
        ] {
            let (code, _, err) = run_to_exit(args);
            assert_eq!(code, Some(2), "{args:?}, config:\n{text}\nstderr:\n{err}");
            for want in &wants {
                assert!(
                    err.contains(want),
                    "{want:?} not in the error of {args:?} for:\n{text}\n---\n{err}"
                );
            }
        }
    }
}

/// A `rediss://` store: the gateway keeps its counters in a Redis that speaks TLS only,
/// trusting the CA that `SSL_CERT_FILE` names; a CA it doesn't trust keeps it from starting.
#[cfg(feature = "redis")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rediss_store_over_tls() {
    use super::support::redis::{RedisServer, RedisTls};
    use super::{run_to_exit_with_env, start_upstream, test_config};

    let pki = TestPki::new();
    let Some(redis) = RedisServer::start_tls(RedisTls {
        cert: pki.file("server.pem"),
        key: pki.file("server-key.pem"),
        ca: pki.ca_file(),
    }) else {
        return; // redis-server is not installed (outside CI): skipped, said why.
    };
    let url = redis.url();
    assert!(url.starts_with("rediss://localhost:"), "{url}");
    let (up_server, _up) = start_upstream().await;
    let cfg = TempConfig::new(&test_config(&up_server.url(), ""));
    let ca = pki.ca_file();
    let gw = Gateway::start_with_env(
        &["--config", cfg.path(), "--redis", &url],
        &[("SSL_CERT_FILE", path_str(&ca))],
    );
    assert!(
        gw.banner.contains("store:  redis rediss://"),
        "{}",
        gw.banner
    );
    let c = client();
    let a = post_read(&c, &gw, &chat("test-model", "hello there", 5)).await;
    assert_eq!(a.status, 200, "{:?}", a.body);
    let deadline = Instant::now() + support::WAIT;
    loop {
        let tpm = rule_state(&c, &gw, "pro-a", "user-tpm").await;
        if tpm["remaining"] == 200_000 - 7 {
            break;
        }
        assert!(Instant::now() < deadline, "not settled in Redis: {tpm}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let keys = redis.keys();
    assert!(
        keys.iter().any(|k| k.starts_with("llm-gateway")),
        "no counter in the TLS Redis: {keys:?}"
    );
    drop(gw);

    // Another CA: the server's certificate doesn't verify, the gateway can't start (after
    // its 10 s of retries).
    let other = TestPki::new();
    let other_ca = other.ca_file();
    let (code, _, err) = run_to_exit_with_env(
        &[
            "--config",
            cfg.path(),
            "--redis",
            &url,
            "--listen",
            "127.0.0.1:0",
        ],
        &[("SSL_CERT_FILE", path_str(&other_ca))],
    );
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("could not connect to Redis"), "{err}");
}

/// The delayed-ACK stall of `wire.rs`, beneath TLS: an HTTPS upstream written like Python's
/// `http.server` (Nagle's algorithm on, a response's head and body in separate writes, so
/// separate TLS records) answers 20 keep-alive requests without a ~40 ms stall each, because
/// the gateway's TCP beneath TLS acknowledges at once (`TCP_QUICKACK`). A wall-clock bound,
/// as generous as `wire.rs`'s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_upstream_that_splits_its_writes_doesnt_stall() {
    use super::wire::{gateway_in_front_of, keep_alive, post, send, split_connection};

    let pki = TestPki::new();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let acceptor = TlsAcceptor::from(pki.server_config(H1_ONLY));
    let server = tokio::spawn(async move {
        let mut open = JoinSet::new();
        while let Ok((tcp, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            open.spawn(async move {
                if let Ok(Ok(tls)) = tokio::time::timeout(support::WAIT, acceptor.accept(tcp)).await
                {
                    split_connection(tls).await;
                }
            });
        }
    });
    let ca = pki.ca_file();
    let (gw, _cfg) = gateway_in_front_of(
        &format!("https://localhost:{port}/v1"),
        &format!("ca_file = \"{}\"", path_str(&ca)),
    );
    let mut sender = keep_alive(gw.addr).await;
    let body = chat("py", "Hello there", 1);
    // One request first: the TLS connection upstream is opened outside the measured time.
    let first = send(&mut sender, post(gw.addr, &body)).await;
    assert!(
        String::from_utf8_lossy(&first).contains("\"usage\""),
        "{first:?}"
    );
    let start = Instant::now();
    for _ in 0..20 {
        let answer = send(&mut sender, post(gw.addr, &body)).await;
        assert!(!answer.is_empty());
    }
    let took = start.elapsed();
    server.abort();
    assert!(
        took < Duration::from_millis(400),
        "20 keep-alive requests took {took:?}: a stall of ~40 ms each (delayed ACK) is 0.8 s; \
         stderr:\n{}",
        gw.stderr()
    );
}
