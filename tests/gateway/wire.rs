//! The gateway on the wire: no delayed-ACK stalls on a keep-alive connection (the response
//! head and body, and each chunk of a stream, are separate writes), and cleartext HTTP/2 with
//! prior knowledge as well as HTTP/1.1.
//!
//! The upstream here is written like a typical Python server (`http.server`, no
//! `TCP_NODELAY`): the status line and headers in one write, the body in another. With
//! Nagle's algorithm on a socket of the gateway, the second of two writes waits for the
//! peer's delayed ACK, about 40 ms on Linux: 20 requests would take 0.8 s.
//!
//! Wall-clock bounds: this machine is shared and loaded, so the margins are generous (a stall
//! is 40 ms; the margin over the upstream's own delay is 15 ms).

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, StatusCode, Version};
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::{json, Value};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use super::support::within;
use super::{chat, test_config, Gateway, TempConfig};

/// How long the split-write upstream waits before the first chunk of a stream.
const FIRST_CHUNK_DELAY: Duration = Duration::from_millis(10);
/// What the first chunk may take over the upstream's own delay (a stall is 40 ms).
const MARGIN: Duration = Duration::from_millis(15);

/// Starts an OpenAI-shaped upstream that answers like Python's `http.server`: keep-alive
/// HTTP/1.1, the head and the body in separate writes, Nagle's algorithm on. Streams
/// (`"stream": true`) send their head, wait [`FIRST_CHUNK_DELAY`], then send three chunks.
async fn start_split_upstream() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(split_connection(stream));
        }
    });
    addr
}

/// One connection of the split-write upstream: requests until the client closes. Over TCP,
/// or TLS (`https.rs`).
pub(super) async fn split_connection<S: AsyncRead + AsyncWrite + Unpin>(mut stream: S) {
    let mut buf = Vec::new();
    loop {
        let Some(head_end) = read_head(&mut stream, &mut buf).await else {
            return;
        };
        let head = String::from_utf8_lossy(&buf[..head_end]).to_ascii_lowercase();
        let length: usize = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length:"))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0);
        while buf.len() < head_end + length {
            let mut chunk = [0u8; 4096];
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
        let body: Value =
            serde_json::from_slice(&buf[head_end..head_end + length]).unwrap_or(Value::Null);
        buf.drain(..head_end + length);
        let ok = if body["stream"] == true {
            split_stream(&mut stream, &body).await
        } else {
            split_json(&mut stream, &body).await
        };
        if ok.is_err() {
            return;
        }
    }
}

/// Reads until the end of a request head; its length, or `None` at EOF.
async fn read_head<S: AsyncRead + Unpin>(stream: &mut S, buf: &mut Vec<u8>) -> Option<usize> {
    loop {
        if let Some(at) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            return Some(at + 4);
        }
        let mut chunk = [0u8; 4096];
        match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => return None,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

async fn split_json<S: AsyncWrite + Unpin>(stream: &mut S, body: &Value) -> std::io::Result<()> {
    let answer = json!({"id": "py-1", "object": "chat.completion", "model": body["model"],
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "word"},
            "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 2, "completion_tokens": 1, "total_tokens": 3}})
    .to_string();
    let head = format!(
        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
        answer.len()
    );
    stream.write_all(head.as_bytes()).await?;
    stream.flush().await?;
    stream.write_all(answer.as_bytes()).await
}

async fn split_stream<S: AsyncWrite + Unpin>(stream: &mut S, body: &Value) -> std::io::Result<()> {
    stream
        .write_all(
            b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n\
              transfer-encoding: chunked\r\n\r\n",
        )
        .await?;
    stream.flush().await?;
    tokio::time::sleep(FIRST_CHUNK_DELAY).await;
    let chunk = |data: &str| {
        let event = format!("data: {data}\n\n");
        format!("{:x}\r\n{event}\r\n", event.len())
    };
    let delta = json!({"id": "py-1", "object": "chat.completion.chunk", "model": body["model"],
        "choices": [{"index": 0, "delta": {"role": "assistant", "content": "word"},
            "finish_reason": null}]});
    let usage = json!({"id": "py-1", "object": "chat.completion.chunk", "model": body["model"],
        "choices": [], "usage": {"prompt_tokens": 2, "completion_tokens": 1, "total_tokens": 3}});
    for event in [delta.to_string(), usage.to_string(), "[DONE]".to_owned()] {
        stream.write_all(chunk(&event).as_bytes()).await?;
        stream.flush().await?;
    }
    stream.write_all(b"0\r\n\r\n").await?;
    stream.flush().await
}

/// A gateway with one model on `upstream` (with `model_extra` lines) and one key, `k`.
pub(super) fn gateway_in_front_of(upstream: &str, model_extra: &str) -> (Gateway, TempConfig) {
    let cfg = TempConfig::new(&format!(
        "[models.py]\nupstream = \"{upstream}\"\n{model_extra}\n[tiers.free]\nrpm = 100000\n\
         tpm = 100000000\n[keys]\nk = {{ user = \"u\", tier = \"free\" }}\n"
    ));
    let gw = Gateway::start(&["--config", cfg.path()]);
    (gw, cfg)
}

/// One keep-alive HTTP/1.1 connection to `addr`: every request goes over it.
pub(super) async fn keep_alive(addr: SocketAddr) -> http1::SendRequest<Full<Bytes>> {
    let stream = TcpStream::connect(addr).await.unwrap();
    stream.set_nodelay(true).unwrap();
    let (sender, conn) = http1::handshake(TokioIo::new(stream)).await.unwrap();
    tokio::spawn(conn);
    sender
}

pub(super) fn post(addr: SocketAddr, body: &Value) -> Request<Full<Bytes>> {
    Request::post("/v1/chat/completions")
        .header("host", addr.to_string())
        .header("authorization", "Bearer k")
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.to_string())))
        .unwrap()
}

/// Sends `req` on the connection; the response body, after a 200.
pub(super) async fn send(
    sender: &mut http1::SendRequest<Full<Bytes>>,
    req: Request<Full<Bytes>>,
) -> Bytes {
    within("a request through the gateway", async {
        std::future::poll_fn(|cx| sender.poll_ready(cx))
            .await
            .unwrap();
        let resp = sender.send_request(req).await.unwrap();
        let status = resp.status();
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(status, StatusCode::OK, "{body:?}");
        body
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_keep_alive_requests_through_the_gateway_dont_stall() {
    let upstream = start_split_upstream().await;
    let (gw, _cfg) = gateway_in_front_of(&format!("http://{upstream}/v1"), "");
    let mut sender = keep_alive(gw.addr).await;
    let body = chat("py", "Hello there", 1);
    // One request first: the gateway's pooled upstream connection is opened outside the
    // measured time.
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
    assert!(
        took < Duration::from_millis(400),
        "20 keep-alive requests took {took:?}: a stall of ~40 ms each (delayed ACK) is 0.8 s; \
         stderr:\n{}",
        gw.stderr()
    );
}

/// Reads one response with a `content-length` from `stream`: its status line.
async fn read_response(stream: &mut TcpStream, buf: &mut Vec<u8>) -> String {
    let head_end = read_head(stream, buf).await.expect("a response head");
    let head = String::from_utf8_lossy(&buf[..head_end]).to_ascii_lowercase();
    let length: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no content-length in {head}"));
    while buf.len() < head_end + length {
        let mut chunk = [0u8; 4096];
        let n = stream.read(&mut chunk).await.unwrap();
        assert!(n > 0, "closed mid-body");
        buf.extend_from_slice(&chunk[..n]);
    }
    buf.drain(..head_end + length);
    head.lines().next().unwrap_or_default().to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_splits_its_writes_doesnt_stall_either() {
    let upstream = start_split_upstream().await;
    let (gw, _cfg) = gateway_in_front_of(&format!("http://{upstream}/v1"), "");
    // Like a client without TCP_NODELAY that writes a request's head, then its body.
    let mut stream = TcpStream::connect(gw.addr).await.unwrap();
    let body = chat("py", "Hello there", 1).to_string();
    let head = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nhost: gw\r\nauthorization: Bearer k\r\n\
         content-type: application/json\r\ncontent-length: {}\r\n\r\n",
        body.len()
    );
    let mut buf = Vec::new();
    let mut one = async || {
        stream.write_all(head.as_bytes()).await.unwrap();
        stream.flush().await.unwrap();
        stream.write_all(body.as_bytes()).await.unwrap();
        read_response(&mut stream, &mut buf).await
    };
    let status = within("the first request", one()).await;
    assert_eq!(status, "http/1.1 200 ok");
    let start = Instant::now();
    for _ in 0..20 {
        let status = within("a request with split writes", one()).await;
        assert_eq!(status, "http/1.1 200 ok");
    }
    let took = start.elapsed();
    assert!(
        took < Duration::from_millis(400),
        "20 keep-alive requests took {took:?} (a delayed-ACK stall each is 0.8 s)"
    );
}

/// The time from sending a streaming request to its first chunk holding `marker`.
async fn first_chunk(
    sender: &mut http1::SendRequest<Full<Bytes>>,
    req: Request<Full<Bytes>>,
    marker: &str,
) -> Duration {
    within("a stream's first chunk", async {
        std::future::poll_fn(|cx| sender.poll_ready(cx))
            .await
            .unwrap();
        let start = Instant::now();
        let resp = sender.send_request(req).await.unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        let mut body = resp.into_body();
        let mut seen = String::new();
        let at = loop {
            let frame = body
                .frame()
                .await
                .expect("the stream ended before its first chunk")
                .unwrap();
            if let Some(data) = frame.data_ref() {
                seen.push_str(&String::from_utf8_lossy(data));
                if seen.contains(marker) {
                    break start.elapsed();
                }
            }
        };
        // Drain the rest, so the connection can carry the next request.
        let _ = body.collect().await;
        at
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_streams_first_chunk_comes_with_the_upstreams() {
    let upstream = start_split_upstream().await;
    let (gw, _cfg) = gateway_in_front_of(&format!("http://{upstream}/v1"), "");
    let mut sender = keep_alive(gw.addr).await;
    let mut body = chat("py", "Hello there", 1);
    body["stream"] = json!(true);
    // Several streams on one connection, as an SDK sends them; the first opens the
    // gateway's upstream connection. The best of them must come within the margin (one
    // stream may be descheduled on a loaded machine; a stall would hit every one).
    let mut times = Vec::new();
    for _ in 0..5 {
        times.push(first_chunk(&mut sender, post(gw.addr, &body), "\"word\"").await);
    }
    let best = times[1..].iter().min().copied().unwrap();
    assert!(
        best < FIRST_CHUNK_DELAY + MARGIN,
        "first chunks after {times:?}; the upstream sends it after {FIRST_CHUNK_DELAY:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_mock_models_first_token_comes_without_a_stall() {
    let cfg = TempConfig::new(
        "[mock]\ntoken_delay_ms = 10\n[models.m]\nupstream = \"mock\"\n[tiers.free]\n\
         rpm = 100000\n[keys]\nk = { user = \"u\", tier = \"free\" }\n",
    );
    let gw = Gateway::start(&["--config", cfg.path()]);
    let mut sender = keep_alive(gw.addr).await;
    let mut body = chat("m", "Hello there", 2);
    body["stream"] = json!(true);
    let mut times = Vec::new();
    for _ in 0..5 {
        // The mock's first token ("Hello") follows its role chunk by `token_delay_ms`.
        times.push(first_chunk(&mut sender, post(gw.addr, &body), "Hello").await);
    }
    let best = times[1..].iter().min().copied().unwrap();
    assert!(
        best < Duration::from_millis(10) + MARGIN,
        "first tokens after {times:?}; the mock sends the first after 10 ms"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http2_prior_knowledge_client_gets_answers() {
    let gw = Gateway::start(&[]);
    let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build_http();
    let health = within(
        "GET /healthz over HTTP/2",
        client.request(
            Request::get(gw.url("/healthz"))
                .body(Full::new(Bytes::new()))
                .unwrap(),
        ),
    )
    .await
    .unwrap_or_else(|e| panic!("HTTP/2 request failed: {e}; stderr:\n{}", gw.stderr()));
    assert_eq!(health.status(), StatusCode::OK);
    assert_eq!(health.version(), Version::HTTP_2);
    // A proxied request, limited and settled, over the same connection.
    let req = Request::post(gw.url("/v1/chat/completions"))
        .header("authorization", "Bearer demo-free")
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(
            chat("mock-gpt", "Hello there", 4).to_string(),
        )))
        .unwrap();
    let resp = within("a chat completion over HTTP/2", client.request(req))
        .await
        .unwrap();
    assert_eq!(resp.version(), Version::HTTP_2);
    let status = resp.status();
    let limit = resp.headers().get("x-ratelimit-limit-requests").cloned();
    let body = within("its body", resp.into_body().collect())
        .await
        .unwrap()
        .to_bytes();
    assert_eq!(status, StatusCode::OK, "{body:?}");
    assert!(limit.is_some(), "rate-limit headers over HTTP/2");
    let answer: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(answer["usage"]["completion_tokens"], 4, "{answer}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stops_inside_the_http2_preface_is_disconnected() {
    // Telling HTTP/1 from HTTP/2 waits for the preface's bytes: that wait has the header
    // deadline too (1 s here).
    let cfg = TempConfig::new(&format!(
        "{}\n[server]\nheader_timeout_secs = 1\n",
        test_config("http://127.0.0.1:9", "")
    ));
    let gw = Gateway::start(&["--config", cfg.path()]);
    for first in [&b""[..], b"PRI * HTTP/2"] {
        let mut stream = TcpStream::connect(gw.addr).await.unwrap();
        stream.write_all(first).await.unwrap();
        let start = Instant::now();
        let mut rest = Vec::new();
        // A reset ends the read as well as an EOF.
        let _ = within(
            "the gateway closing the connection",
            stream.read_to_end(&mut rest),
        )
        .await;
        assert!(rest.is_empty(), "{:?}", String::from_utf8_lossy(&rest));
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "closed after {:?}",
            start.elapsed()
        );
    }
}
