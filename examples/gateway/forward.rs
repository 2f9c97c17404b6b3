//! Which of a client's request headers go upstream: an allowlist.
//!
//! The upstream gets `content-type`, `accept`, `user-agent` and `openai-beta` from the
//! client, the names listed in `[server] forward_headers`, and the model's own credentials
//! (`Authorization: Bearer <api_key>` from its `[models.*]` table, or the key alone in the
//! model's `api_key_header`, see `upstream.rs`); nothing else. A client
//! can't pick the organization or project the gateway's key bills (`OpenAI-Organization`,
//! `OpenAI-Project`), pass its own key (`Authorization`, `api-key`, `x-api-key`) or cookies,
//! or ask for a compressed answer (the usage is read from the response bytes). The framing
//! headers (`content-length`, `host`, ...) are the gateway's own.

use http::header::{self, HeaderMap, HeaderName, HeaderValue};

/// Forwarded whatever the configuration says: what OpenAI-compatible servers read to
/// understand a request.
const ALWAYS: [HeaderName; 4] = [
    header::CONTENT_TYPE,
    header::ACCEPT,
    header::USER_AGENT,
    HeaderName::from_static("openai-beta"),
];

/// Never forwarded, even when configured: credentials and billing scopes (the upstream's come
/// from the model's configuration), and [`FRAMING`].
const NEVER: [&str; 7] = [
    "authorization",
    "proxy-authorization",
    "cookie",
    "api-key",
    "x-api-key",
    "openai-organization",
    "openai-project",
];

/// Headers that describe the client's connection or message framing (RFC 9110 section
/// 7.6.1), or its encoding: the gateway writes them itself.
const FRAMING: [&str; 11] = [
    "accept-encoding",
    "host",
    "content-length",
    "transfer-encoding",
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "upgrade",
    "expect",
];

/// A name of `[server] forward_headers`, checked.
pub(crate) fn configured(name: &str) -> Result<HeaderName, String> {
    let parsed = HeaderName::from_bytes(name.as_bytes())
        .map_err(|_| format!("{name:?} is not a valid header name"))?;
    if NEVER.contains(&parsed.as_str()) || is_framing(&parsed) {
        return Err(format!(
            "`{parsed}` is never forwarded: the upstream's credentials come from the model's \
             `api_key`, and the gateway writes the connection's headers itself"
        ));
    }
    Ok(parsed)
}

/// True for the headers the gateway writes itself (connection, framing, encoding).
pub(crate) fn is_framing(name: &HeaderName) -> bool {
    FRAMING.contains(&name.as_str())
}

/// The headers a request sends upstream.
#[derive(Debug, Clone)]
pub(crate) struct Forward {
    names: Vec<HeaderName>,
}

impl Forward {
    /// [`ALWAYS`] plus the configured names (checked by the configuration's validation; a
    /// name that fails [`configured`] is left out).
    pub(crate) fn new(configured_names: &[String]) -> Self {
        let mut names = ALWAYS.to_vec();
        for n in configured_names {
            if let Ok(n) = configured(n) {
                if !names.contains(&n) {
                    names.push(n);
                }
            }
        }
        Self { names }
    }

    /// The allowed headers of `client`, plus the model's credential header.
    pub(crate) fn upstream_headers(
        &self,
        client: &HeaderMap,
        credential: Option<&(HeaderName, HeaderValue)>,
    ) -> HeaderMap {
        let mut out = HeaderMap::with_capacity(self.names.len() + 1);
        for name in &self.names {
            for value in client.get_all(name) {
                out.append(name.clone(), value.clone());
            }
        }
        if let Some((name, value)) = credential {
            out.insert(name.clone(), value.clone());
        }
        out
    }
}
