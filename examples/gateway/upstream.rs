//! A model's upstream: where its requests go, the client that takes them there, and the
//! credential the gateway adds. [`Clients::route`] builds it from the model's `[models.*]`
//! table.
//!
//! - **Transport.** `http://` upstreams are plain TCP, `https://` ones TLS 1.2 or 1.3 by
//!   rustls with its `ring` provider (no OpenSSL), speaking HTTP/2 or HTTP/1.1 as the server
//!   chooses by ALPN. The TCP beneath is `tcp.rs`'s (`TCP_NODELAY`, `TCP_QUICKACK`).
//!   Connections are pooled: one upstream connection serves request after request (HTTP/1.1
//!   keep-alive) or many at once (HTTP/2), so the TLS handshake is paid once per connection.
//!   Over HTTP/2 every request to one origin shares one connection (RFC 9113 section 9.1),
//!   and past the server's limit of concurrent streams (often 100 to 256) requests wait for
//!   a stream to end: hyper's pool opens no second connection (hyperium/hyper#3623). A model
//!   whose streams outnumber that sets `http2 = false`: HTTP/1.1, a connection per request
//!   in flight.
//! - **Trust.** Mozilla's root certificates, compiled in (the `webpki-roots` crate): the same
//!   roots on every machine, none needed from the system (a distroless or scratch image has
//!   none), renewed with the binary. A model's `ca_file` adds the PEM certificates it holds
//!   (a private CA) to those roots, for that model only: it gets a client (and connection
//!   pool) of its own. A certificate that doesn't verify fails the request with a 502.
//! - **Credential.** The model's key goes in `Authorization: Bearer <key>`, or as it is in the
//!   header its `api_key_header` names (Azure OpenAI's `api-key`). It is marked sensitive:
//!   HTTP/2's header compression never stores it. The client's own credentials never reach
//!   the upstream (`forward.rs`).

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use http::header::{self, HeaderName, HeaderValue};
use hyper_rustls::{HttpsConnector, HttpsConnectorBuilder};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;
use rustls::RootCertStore;

use crate::config::{ModelConfig, Upstream};
use crate::tcp;

/// An upstream HTTP client: plain HTTP or HTTPS, pooled connections.
pub(crate) type HttpClient = Client<HttpsConnector<tcp::Connector>, Body>;

/// Where one model's requests go.
#[derive(Debug)]
pub(crate) struct ModelRoute {
    pub(crate) name: Arc<str>,
    /// `http://host:port` or `https://host:port`
    pub(crate) origin: String,
    /// The upstream's base path (`/v1`).
    pub(crate) path: String,
    /// The header carrying the upstream's key and its value (`authorization: Bearer <key>`,
    /// or the model's `api_key_header`), if the model has a key.
    pub(crate) credential: Option<(HeaderName, HeaderValue)>,
    /// The shared client, or the model's own when it has a `ca_file`.
    pub(crate) client: HttpClient,
    pub(crate) timeout: Duration,
    /// How long the upstream's response body may go without a frame.
    pub(crate) stream_idle_timeout: Duration,
}

/// The upstream clients: two shared by every model that trusts the built-in roots (one
/// connection pool each: HTTP/2 or HTTP/1.1 by ALPN, and HTTP/1.1 only for `http2 =
/// false`), and one per model with a `ca_file`, made by [`Clients::route`]. Cloning shares
/// the pools.
#[derive(Debug, Clone)]
pub(crate) struct Clients {
    shared: HttpClient,
    shared_http1: HttpClient,
}

impl Clients {
    pub(crate) fn new() -> Self {
        let roots = || RootCertStore::from_iter(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
        Self {
            shared: client(roots(), true),
            shared_http1: client(roots(), false),
        }
    }

    /// Model `name`'s route, from its configuration (validated). `mock_url` is the built-in
    /// mock model's base URL (`http://127.0.0.1:PORT/v1`) when it runs. An error is a
    /// configuration problem naming the field.
    pub(crate) fn route(
        &self,
        name: &str,
        m: &ModelConfig,
        mock_url: Option<&str>,
    ) -> Result<ModelRoute, String> {
        let (origin, path) = match m.upstream() {
            Upstream::Http { origin, path } => (origin, path),
            Upstream::Mock => {
                let (origin, path) = mock_url
                    .and_then(|url| url.rsplit_once("/v1"))
                    .ok_or_else(|| format!("model `{name}`: the mock model is not running"))?;
                (origin.to_owned(), format!("{path}/v1"))
            }
        };
        let client = match (&m.ca_file, m.http2) {
            (None, true) => self.shared.clone(),
            (None, false) => self.shared_http1.clone(),
            (Some(file), http2) => {
                let mut roots = ca_certificates(file)
                    .map_err(|e| format!("field `models.{name}.ca_file`: {e}"))?;
                roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
                client(roots, http2)
            }
        };
        Ok(ModelRoute {
            name: name.into(),
            origin,
            path,
            credential: credential(name, m)?,
            client,
            timeout: m.timeout(),
            stream_idle_timeout: m.stream_idle_timeout(),
        })
    }
}

/// rustls' cryptography from the `ring` crate, which builds with a C compiler alone
/// (`aws-lc-rs`, rustls' other provider, needs cmake and builds much longer). rustls 0.23.48
/// deprecates it for lacking post-quantum key exchange: connections use X25519 or ECDHE over
/// P-256/P-384, with no hybrid ML-KEM.
#[allow(deprecated)]
fn ring() -> CryptoProvider {
    rustls::crypto::ring::default_provider()
}

/// Makes [`ring`] the process's default TLS provider, which the Redis client's `rediss://`
/// connections take; the upstream clients name it themselves. Call once, at start-up.
pub(crate) fn install_crypto_provider() {
    // Err: a provider is installed already, which is as good.
    let _ = ring().install_default();
}

/// A client trusting `roots`, over `tcp.rs`'s connector, offering HTTP/2 by ALPN if `http2`.
fn client(roots: RootCertStore, http2: bool) -> HttpClient {
    let tls = rustls::ClientConfig::builder_with_provider(Arc::new(ring()))
        .with_safe_default_protocol_versions()
        .expect("ring implements TLS 1.2 and 1.3")
        .with_root_certificates(roots)
        .with_no_client_auth();
    // ALPN offers h2 then http/1.1 (or http/1.1 alone); `http://` URLs go through without
    // TLS, in HTTP/1.1.
    let builder = HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http()
        .enable_http1();
    let connector = if http2 {
        builder.enable_http2().wrap_connector(tcp::connector())
    } else {
        builder.wrap_connector(tcp::connector())
    };
    Client::builder(TokioExecutor::new())
        .pool_idle_timeout(Duration::from_secs(30))
        .build(connector)
}

/// The certificates of a PEM file, as trust anchors: every `CERTIFICATE` section (other
/// sections, such as a key, are skipped); at least one, each a valid X.509 certificate.
pub(crate) fn ca_certificates(file: &Path) -> Result<RootCertStore, String> {
    let shown = file.display();
    let sections = CertificateDer::pem_file_iter(file).map_err(|e| match e {
        rustls::pki_types::pem::Error::Io(e) => format!("can't read {shown}: {e}"),
        e => format!("{shown}: {e}"),
    })?;
    let mut roots = RootCertStore::empty();
    for (i, cert) in sections.enumerate() {
        let cert = cert.map_err(|e| format!("{shown} is not a valid PEM file: {e}"))?;
        roots.add(cert).map_err(|e| {
            format!(
                "{shown}: certificate {} is not a valid X.509 certificate: {e}",
                i + 1
            )
        })?;
    }
    if roots.is_empty() {
        return Err(format!(
            "{shown} holds no PEM certificate (-----BEGIN CERTIFICATE-----)"
        ));
    }
    Ok(roots)
}

/// A name for `api_key_header`, checked: a header name the gateway doesn't write itself.
pub(crate) fn credential_header(name: &str) -> Result<HeaderName, String> {
    let parsed = HeaderName::from_bytes(name.as_bytes()).map_err(|_| {
        format!(
            "{} is not a valid header name",
            crate::config::masked_value(name)
        )
    })?;
    if crate::forward::is_framing(&parsed) {
        return Err(format!(
            "`{parsed}` describes the connection or the message: the gateway writes it itself"
        ));
    }
    Ok(parsed)
}

/// The header a model's upstream gets its key in, and its value: `authorization: Bearer
/// <key>` by default, the key alone in the model's `api_key_header`. `None` without a key.
pub(crate) fn credential(
    name: &str,
    m: &ModelConfig,
) -> Result<Option<(HeaderName, HeaderValue)>, String> {
    let Some(key) = m.upstream_key() else {
        return Ok(None);
    };
    let (header, value) = match &m.api_key_header {
        None => (header::AUTHORIZATION, format!("Bearer {key}")),
        Some(h) => (
            credential_header(h)
                .map_err(|e| format!("field `models.{name}.api_key_header`: {e}"))?,
            key,
        ),
    };
    let field = if m.api_key.is_some() {
        "api_key"
    } else {
        "api_key_env"
    };
    let mut value = HeaderValue::try_from(value)
        .map_err(|_| format!("field `models.{name}.{field}`: not a valid header value"))?;
    value.set_sensitive(true);
    Ok(Some((header, value)))
}
