//! The live dashboard: `GET /dashboard`, one page compiled into the binary
//! (`dashboard/page.html`: inline CSS and JavaScript, nothing fetched from elsewhere), which
//! polls `GET /dashboard/data` once a second and draws the last five minutes as inline SVG.
//!
//! | route | what |
//! |---|---|
//! | `GET /dashboard` | the page for a signed-in browser, else the sign-in form |
//! | `POST /dashboard` | the sign-in form's target (`key=ADMIN_KEY`): a session cookie and a redirect to the page, or the form again (401) |
//! | `POST /dashboard/sign-out` | ends the session |
//! | `GET /dashboard/data` | the numbers, as JSON (session cookie or `Authorization: Bearer ADMIN_KEY`; 401 JSON without) |
//!
//! The two forms answer 403 to a post from another site (`access::cross_site`); a sign-in
//! ends the session the browser presented. An address that presents too many wrong admin
//! keys gets 429 for a while (`access::Guesses`; `/metrics` counts its own). The address is
//! the TCP peer's, or behind a trusted reverse proxy (`[server] trusted_proxies`) the
//! client's it appended to `X-Forwarded-For` (`access::Proxies`); behind NAT or an untrusted
//! proxy all the clients share one count. A sign-in whose key was checked against a
//! configuration a reload replaced meanwhile (the form still arriving) opens no session: 409
//! and the form, to sign in again (`access::Sessions::open`).
//!
//! All of them answer 404 while `[server] admin_keys` is empty. The numbers: per model,
//! requests per second, tokens per minute against its `tpm`, in flight against its
//! `concurrent` (the bucket's current limit, so an adaptive capacity shows as it moves),
//! refusals by the rule that refused; per tier, the most any of the top callers of the tier
//! uses of each limit; the users with the most tokens (their API keys masked); refusals by
//! rule, those decided before the request had a model apart (`unrouted_refusals`: in no
//! model's counts). The totals come from the same
//! observer hooks as `/metrics` ([`tally`]) (in flight from a guard the proxy holds until
//! the answer's body ends), the limits' use from the layer's status (as `/v1/ratelimit`,
//! [`data`]; with the store down the data still answers: `limits: null` and `store_error`),
//! who may look from [`access`].

pub(crate) mod access;
mod data;
pub(crate) mod tally;

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, LazyLock};
use std::time::{Duration, Instant};

use axum::extract::{Request, State};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use http::{header, HeaderMap, HeaderValue, StatusCode};

use crate::config::Config;
use crate::proxy::error;
use crate::server::App;

const PAGE: &str = include_str!("dashboard/page.html");
const SIGN_IN: &str = include_str!("dashboard/sign_in.html");
/// The largest sign-in form body read.
const MAX_FORM_BYTES: usize = 4096;
/// The page's content security policy: its own inline script and style, requests to this
/// origin only, nothing framed.
/// The pages' Content-Security-Policy: nothing from elsewhere, and no script but the page's
/// own inline one, allowed by its SHA-256 (computed once from the compiled-in page), so
/// that markup injected into a page could run none.
static CSP: LazyLock<HeaderValue> = LazyLock::new(|| {
    let policy = format!(
        "default-src 'none'; script-src 'sha256-{}'; style-src 'unsafe-inline'; \
         connect-src 'self'; img-src 'self' data:; form-action 'self'; \
         frame-ancestors 'none'; base-uri 'none'",
        script_sha256(PAGE)
    );
    HeaderValue::from_str(&policy).expect("a policy of ASCII")
});

/// The base64 SHA-256 of the text of `page`'s inline `<script>` (CSP Level 3 section
/// 8.4: the text between the tags, as the browser hashes it: parsed, so with its line
/// endings normalised to LF, HTML section 13.2.3.5, whatever a checkout made of the file).
/// SHA-256 is rustls' own (its `ring` provider), not another dependency.
fn script_sha256(page: &str) -> String {
    use base64::Engine as _;
    let script = page
        .split_once("<script>")
        .and_then(|(_, rest)| rest.split_once("</script>"))
        .map_or("", |(script, _)| script);
    let sha256 = rustls::crypto::ring::cipher_suite::TLS13_AES_128_GCM_SHA256
        .tls13()
        .expect("a TLS 1.3 suite")
        .common
        .hash_provider;
    let parsed = script.replace("\r\n", "\n").replace('\r', "\n");
    base64::engine::general_purpose::STANDARD.encode(sha256.hash(parsed.as_bytes()).as_ref())
}

/// `text` safe inside an HTML element.
fn escape_html(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// What the dashboard keeps for the process's life (reloads keep it, as they keep the
/// metrics): its counts and its sessions.
#[derive(Debug, Default)]
pub(crate) struct Board {
    pub(crate) tally: tally::Tally,
    pub(crate) sessions: access::Sessions,
    /// Wrong admin keys by address, on the dashboard (the form, the data).
    pub(crate) guesses: access::Guesses,
    /// Wrong admin keys by address on `/metrics`: a count of its own, so that a dashboard
    /// guesser behind the scraper's address (a proxy, NAT) doesn't lock Prometheus out.
    pub(crate) metrics_guesses: access::Guesses,
    /// Data answers served: a page shows the number of the answer it drew.
    pub(crate) served: AtomicU64,
}

impl Board {
    /// Takes a sample every second, for as long as the process runs.
    pub(crate) fn start_sampling(self: &Arc<Self>) {
        let board = Arc::clone(self);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
            loop {
                tick.tick().await;
                board.tally.sample(data::unix_ms());
            }
        });
    }
}

/// The dashboard's part of a configuration. Its `Debug` shows how many admin keys, never
/// one.
#[derive(Clone, Default)]
pub(crate) struct Settings {
    admin_keys: Arc<[String]>,
    metrics_requires_admin: bool,
    /// Who names the client for the guess limit (`[server] trusted_proxies`).
    pub(crate) proxies: access::Proxies,
    /// Each configured tier's limits, by name (`rpm`, `tpm`, ...).
    tiers: Arc<BTreeMap<String, BTreeMap<&'static str, u64>>>,
    /// The sessions' generation of these admin keys (`access::Sessions::open`).
    generation: u64,
}

impl std::fmt::Debug for Settings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Settings")
            .field(
                "admin_keys",
                &format_args!("[{} redacted]", self.admin_keys.len()),
            )
            .field("metrics_requires_admin", &self.metrics_requires_admin)
            .field("proxies", &self.proxies)
            .field("tiers", &self.tiers)
            .field("generation", &self.generation)
            .finish()
    }
}

impl Settings {
    /// `generation`: the sessions' generation these admin keys are in force for
    /// (`access::Sessions::generation`).
    pub(crate) fn new(cfg: &Config, generation: u64) -> Self {
        Self {
            generation,
            admin_keys: cfg.server.admin_keys.clone().into(),
            metrics_requires_admin: cfg.server.metrics_requires_admin,
            proxies: access::Proxies::new(&cfg.server.trusted_proxies),
            tiers: Arc::new(
                cfg.tiers
                    .iter()
                    .map(|(name, t)| {
                        let limits = t.limits().into_iter().filter_map(|(l, v)| Some((l, v?)));
                        (name.clone(), limits.collect())
                    })
                    .collect(),
            ),
        }
    }

    /// The sessions' generation these admin keys are in force for.
    pub(crate) fn generation(&self) -> u64 {
        self.generation
    }

    fn on(&self) -> bool {
        !self.admin_keys.is_empty()
    }
}

/// What is wrong with an admin key, if anything (for `Config::problems`).
pub(crate) fn admin_key_problem(key: &str) -> Option<String> {
    if key.len() < access::MIN_ADMIN_KEY_LEN {
        Some(format!(
            "an admin key must have at least {} characters, this one has {}",
            access::MIN_ADMIN_KEY_LEN,
            key.len()
        ))
    } else if !key.bytes().all(|b| b.is_ascii_graphic()) {
        Some("an admin key must be printable ASCII without spaces".into())
    } else {
        None
    }
}

pub(crate) fn routes() -> Router<Arc<App>> {
    Router::new()
        .route("/dashboard", get(page).post(sign_in))
        .route("/dashboard/sign-out", post(sign_out))
        .route("/dashboard/data", get(data))
}

/// `None` when `/metrics` may be answered; else the 401 (or 429 for an address that
/// guessed too many keys).
pub(crate) fn metrics_guard(
    app: &App,
    headers: &HeaderMap,
    peer: Option<IpAddr>,
) -> Option<Response> {
    let s = &app.dashboard;
    if !s.metrics_requires_admin {
        return None;
    }
    let message = "/metrics needs an admin key: `Authorization: Bearer <admin key>`.";
    let Some(key) = access::bearer(headers) else {
        return Some(unauthorized(message));
    };
    let guess = match guess(&app.metrics.board.metrics_guesses, peer) {
        Ok(g) => g,
        Err(r) => return Some(*r),
    };
    if access::is_admin(&s.admin_keys, key) {
        guess.correct();
        None
    } else {
        wrong_key("/metrics", peer, &guess);
        Some(unauthorized(message))
    }
}

/// The 403 for a form posted from another site.
fn cross_site_refused() -> Response {
    error(
        StatusCode::FORBIDDEN,
        "invalid_request_error",
        Some("cross_site_request"),
        None,
        "The dashboard's forms take posts from the dashboard's own page only.",
    )
}

/// Counts a guess from `peer` in `guesses` before its key is compared
/// ([`access::Guesses::attempt`]):
/// the guess, to give back if the key is right, or the 429 for an address that presented
/// too many wrong admin keys.
fn guess(
    guesses: &access::Guesses,
    peer: Option<IpAddr>,
) -> Result<access::Reservation<'_>, Box<Response>> {
    // `serve.rs` puts the client's address on every request; without it (another server)
    // there is nothing to count by: not limited.
    debug_assert!(
        peer.is_some(),
        "a request without its Peer (serve.rs sets it)"
    );
    let Some(peer) = peer else {
        return Ok(access::Reservation::uncounted());
    };
    let wait = match guesses.attempt(peer, Instant::now()) {
        Ok(guess) => return Ok(guess),
        Err(wait) => wait,
    };
    let mut r = error(
        StatusCode::TOO_MANY_REQUESTS,
        "invalid_request_error",
        Some("too_many_admin_key_guesses"),
        None,
        format!(
            "Too many wrong admin keys from this address: try again in {} s.",
            wait.as_secs() + 1
        ),
    );
    if let Ok(v) = HeaderValue::from_str(&(wait.as_secs() + 1).to_string()) {
        r.headers_mut().insert(header::RETRY_AFTER, v);
    }
    Err(Box::new(r))
}

/// Logs a wrong admin key from `peer` on `place` (`dashboard` or `/metrics`; already
/// counted by `guess`): the first of its window and the one that used its guesses up (not
/// every one: a guesser would fill the log).
fn wrong_key(place: &str, peer: Option<IpAddr>, guess: &access::Reservation<'_>) {
    let n = guess.n();
    let Some(peer) = peer else {
        tracing::warn!(
            "{place}: a wrong admin key from a request without an address (not counted)"
        );
        return;
    };
    if n == 1 {
        tracing::warn!(%peer, "{place}: a wrong admin key (more from this address are counted, not logged)");
    } else if n == access::MAX_GUESSES {
        tracing::warn!(
            %peer,
            guesses = n,
            window = ?access::GUESS_WINDOW,
            "{place}: too many wrong admin keys from this address: refused (429) until its window ends"
        );
    }
}

fn not_found(path: &str) -> Response {
    error(
        StatusCode::NOT_FOUND,
        "invalid_request_error",
        Some("unknown_url"),
        None,
        format!("Unknown request URL: {path}."),
    )
}

fn unauthorized(message: &str) -> Response {
    let mut r = error(
        StatusCode::UNAUTHORIZED,
        "invalid_request_error",
        Some("invalid_admin_key"),
        None,
        message,
    );
    r.headers_mut()
        .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    r
}

/// Headers of every HTML answer: not cached, not framed, nothing loaded from elsewhere.
/// `Referrer-Policy: same-origin`: no referrer to other sites, and the page's own forms
/// carry its `Origin` (with `no-referrer`, a browser without Fetch Metadata sends
/// `Origin: null`, which `access::cross_site` refuses).
fn html(status: StatusCode, body: String) -> Response {
    let mut r = (status, Html(body)).into_response();
    let h = r.headers_mut();
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(header::CONTENT_SECURITY_POLICY, CSP.clone());
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("same-origin"),
    );
    r
}

fn sign_in_form(status: StatusCode, problem: Option<&str>) -> Response {
    let problem = problem.map_or(String::new(), |p| {
        format!(
            "<p class=\"problem\" id=\"problem\" role=\"alert\">{}</p>",
            escape_html(p)
        )
    });
    html(status, SIGN_IN.replace("<!--PROBLEM-->", &problem))
}

fn signed_in(app: &App, headers: &HeaderMap) -> bool {
    access::session_cookies(headers).any(|t| {
        app.metrics
            .board
            .sessions
            .valid(t, &app.dashboard.admin_keys, Instant::now())
    })
}

async fn page(State(app): State<Arc<App>>, headers: HeaderMap) -> Response {
    if !app.dashboard.on() {
        return not_found("GET /dashboard");
    }
    if signed_in(&app, &headers) {
        html(StatusCode::OK, PAGE.to_owned())
    } else {
        sign_in_form(StatusCode::OK, None)
    }
}

async fn sign_in(State(app): State<Arc<App>>, req: Request) -> Response {
    if !app.dashboard.on() {
        return not_found("POST /dashboard");
    }
    if access::cross_site(req.headers(), req.uri()) {
        return cross_site_refused();
    }
    let peer = app.dashboard.proxies.client(&req);
    // A sign-in starts afresh: the session the browser presents (if any) ends.
    for t in access::session_cookies(req.headers()) {
        app.metrics.board.sessions.close(t);
    }
    // Unauthenticated: read within the body deadline, as the API's bodies (`proxy.rs`), so
    // that a slow sender can't hold a connection open.
    let reading = axum::body::to_bytes(req.into_body(), MAX_FORM_BYTES);
    let body = match tokio::time::timeout(app.body_timeout, reading).await {
        Ok(Ok(b)) => b,
        Ok(Err(_)) => {
            return sign_in_form(
                StatusCode::PAYLOAD_TOO_LARGE,
                Some("The form was too large."),
            )
        }
        Err(_) => {
            let mut r = sign_in_form(
                StatusCode::REQUEST_TIMEOUT,
                Some("The form did not arrive in time."),
            );
            // The rest of the body may still be on its way: this connection can't carry
            // another request.
            r.headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
            return r;
        }
    };
    // Counted once the form is here and before its key is compared, so that forms sent
    // together from one address can't all pass a check made before any was counted.
    let guess = match guess(&app.metrics.board.guesses, peer) {
        Ok(g) => g,
        Err(r) => return *r,
    };
    let key = access::form_key(&body).unwrap_or_default();
    if !access::is_admin(&app.dashboard.admin_keys, &key) {
        wrong_key("dashboard", peer, &guess);
        return sign_in_form(StatusCode::UNAUTHORIZED, Some("That is not an admin key."));
    }
    guess.correct();
    let sessions = &app.metrics.board.sessions;
    let token = match sessions.open(&key, app.dashboard.generation, Instant::now()) {
        Ok(token) => token,
        // The configuration was reloaded while the form was read: the key may be gone.
        Err(access::NotOpened::Stale) => {
            return sign_in_form(
                StatusCode::CONFLICT,
                Some("The configuration was reloaded meanwhile; sign in again."),
            )
        }
        Err(access::NotOpened::NoRandom) => {
            return sign_in_form(
                StatusCode::SERVICE_UNAVAILABLE,
                Some("No session could be opened (no random bytes); try again."),
            )
        }
    };
    let mut r = StatusCode::SEE_OTHER.into_response();
    let h = r.headers_mut();
    h.insert(header::LOCATION, HeaderValue::from_static("/dashboard"));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    if let Ok(v) = HeaderValue::from_str(&access::set_cookie(&token)) {
        h.insert(header::SET_COOKIE, v);
    }
    r
}

async fn sign_out(State(app): State<Arc<App>>, req: Request) -> Response {
    if !app.dashboard.on() {
        return not_found("POST /dashboard/sign-out");
    }
    let headers = req.headers();
    if access::cross_site(headers, req.uri()) {
        return cross_site_refused();
    }
    for t in access::session_cookies(headers) {
        app.metrics.board.sessions.close(t);
    }
    let mut r = StatusCode::SEE_OTHER.into_response();
    let h = r.headers_mut();
    h.insert(header::LOCATION, HeaderValue::from_static("/dashboard"));
    if let Ok(v) = HeaderValue::from_str(&access::clear_cookie()) {
        h.insert(header::SET_COOKIE, v);
    }
    r
}

async fn data(State(app): State<Arc<App>>, req: Request) -> Response {
    if !app.dashboard.on() {
        return not_found("GET /dashboard/data");
    }
    let headers = req.headers();
    let peer = app.dashboard.proxies.client(&req);
    let by_bearer = match access::bearer(headers) {
        Some(key) => {
            let guess = match guess(&app.metrics.board.guesses, peer) {
                Ok(g) => g,
                Err(r) => return *r,
            };
            let right = access::is_admin(&app.dashboard.admin_keys, key);
            if right {
                guess.correct();
            } else {
                wrong_key("dashboard", peer, &guess);
            }
            right
        }
        None => false,
    };
    if !by_bearer && !signed_in(&app, headers) {
        return unauthorized(
            "The dashboard's data needs a session (sign in at /dashboard) or \
             `Authorization: Bearer <admin key>`.",
        );
    }
    let mut r = Json(data::numbers(&app).await).into_response();
    r.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_script_hash_is_over_the_text_a_browser_parses() {
        let lf = script_sha256("<p>\n<script>let a = 1;\nlet b = 2;\n</script>\n");
        // A checkout with CRLF endings: a browser hashes the parsed text, newlines as LF.
        assert_eq!(
            script_sha256("<p>\r\n<script>let a = 1;\r\nlet b = 2;\r\n</script>\r\n"),
            lf
        );
        assert_eq!(
            script_sha256("<script>let a = 1;\rlet b = 2;\r</script>"),
            lf
        );
        assert_ne!(
            script_sha256("<script>let a = 2;\nlet b = 2;\n</script>"),
            lf
        );
        // SHA-256 of the empty text.
        assert_eq!(
            script_sha256("<script></script>"),
            "47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU="
        );
    }
}
