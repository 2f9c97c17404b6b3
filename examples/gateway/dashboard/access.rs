//! Who may see the dashboard: admin keys (`[server] admin_keys`), compared in constant time,
//! and the browser sessions the sign-in form opens.
//!
//! A browser can't send a bearer header when it navigates, so the form trades the key for a
//! session: a random 256-bit token (from the operating system's generator) in an HttpOnly,
//! `SameSite=Strict` cookie scoped to `/dashboard`. The token is not the key and says
//! nothing of it; the server keeps each session's key and expiry, at most [`MAX_SESSIONS`]
//! of them (the one closest to expiring makes room), and a session ends when its key is no
//! longer configured (a reload removed it).
//!
//! Guesses are bounded: an address that presents [`MAX_GUESSES`] wrong admin keys (the form
//! or a bearer on the data; `/metrics` counts its own, so that a dashboard guesser doesn't
//! lock the scraper out) within [`GUESS_WINDOW`] is answered 429 for the rest of that
//! window, whatever key it presents ([`Guesses`]); the log says so once per window, not
//! once per guess. A key is counted before it is compared and given back when right, under
//! one lock, so keys sent at once from one address can't outrun the count. The address is
//! the TCP peer's ([`Peer`]; an IPv6 one by its /64), unless the peer is a trusted reverse
//! proxy (`[server] trusted_proxies`, [`Proxies`]): then it is the right-most address of
//! `X-Forwarded-For` that isn't a trusted proxy's, the one the proxies saw. Behind NAT, or an
//! untrusted proxy, all the clients share one count.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use subtle::ConstantTimeEq;
use tower_llm_ratelimit::key::{client_ip, ClientIp, KeyExtractor, RequestView};

/// Sessions kept at once.
pub(crate) const MAX_SESSIONS: usize = 256;
/// How long a session lasts after its sign-in.
pub(crate) const SESSION_TTL: Duration = Duration::from_secs(12 * 3600);
/// The shortest admin key the configuration takes.
pub(crate) const MIN_ADMIN_KEY_LEN: usize = 16;
/// The session cookie's name.
pub(crate) const COOKIE: &str = "gateway_dashboard";

/// Wrong admin keys an address may present within [`GUESS_WINDOW`].
pub(crate) const MAX_GUESSES: u32 = 20;
/// The window of [`MAX_GUESSES`], from an address's first wrong key.
pub(crate) const GUESS_WINDOW: Duration = Duration::from_secs(15 * 60);
/// Addresses tracked at once (past it, the one whose window started first makes room, an
/// address not blocked before one that is).
const MAX_PEERS: usize = 4_096;

/// The TCP peer's address, put on each request by the server (`serve.rs`); the client's is
/// [`Proxies::client`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Peer(pub(crate) IpAddr);

impl Peer {
    /// The address of a request; `None` if the server did not set one (a server that
    /// isn't `serve.rs`'s: the guess limit then has no address to count by).
    pub(crate) fn of(extensions: &http::Extensions) -> Option<IpAddr> {
        extensions.get::<Peer>().map(|p| p.0)
    }
}

/// The reverse proxies trusted to name the client in `X-Forwarded-For` (`[server]
/// trusted_proxies`). The library's client-IP extractor does the work
/// ([`tower_llm_ratelimit::key::client_ip`]: its CIDR parsing and its walk of the header from
/// the right, skipping trusted hops), reading the peer from [`Peer`].
#[derive(Debug, Clone, Default)]
pub(crate) struct Proxies(Option<ClientIp>);

impl Proxies {
    /// Trusts each of `cidrs` (checked by [`trusted_proxy_problem`]); none: the peer is the
    /// client, whatever the headers say.
    pub(crate) fn new(cidrs: &[String]) -> Self {
        if cidrs.is_empty() {
            return Self(None);
        }
        let ip = client_ip()
            .trust_proxies(cidrs.iter().map(String::as_str))
            // Every address as itself: `counted_as` groups IPv6 ones by /64.
            .ipv6_prefix(128)
            .peer_from(Peer::of);
        Self(Some(ip))
    }

    /// The client's address for the guess limit: the peer's ([`Peer::of`]), or behind a
    /// trusted proxy the right-most untrusted address of `X-Forwarded-For`. A proxy that
    /// wrote something else than an address there (`unknown`, junk) counts its unnamed
    /// clients under its own address, one count for them all.
    pub(crate) fn client<B>(&self, req: &http::Request<B>) -> Option<IpAddr> {
        let peer = Peer::of(req.extensions())?;
        let Some(ip) = &self.0 else {
            return Some(peer);
        };
        let key = ip.extract(&RequestView::from_request(req))?.to_string();
        // The extractor's key is an address, or `unknown via <the proxy>`.
        key.parse()
            .ok()
            .or_else(|| key.strip_prefix("unknown via ")?.parse().ok())
            .or(Some(peer))
    }
}

/// What is wrong with a `trusted_proxies` entry, if anything (for `Config::problems`): the
/// library's own CIDR parser says.
pub(crate) fn trusted_proxy_problem(cidr: &str) -> Option<String> {
    client_ip().trust_proxy(cidr).validate().err()
}

/// What a peer's guesses are counted under: an IPv4 address (an IPv4-mapped IPv6 one as
/// its IPv4), an IPv6 address's /64 (a host is commonly given a whole /64, and could
/// otherwise take a new address for each guess).
fn counted_as(peer: IpAddr) -> IpAddr {
    match peer {
        IpAddr::V4(_) => peer,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(Ipv6Addr::from(u128::from(v6) & !u128::from(u64::MAX))),
        },
    }
}

/// Wrong admin keys by address (an IPv6 one by its /64): at most [`MAX_GUESSES`] in a
/// [`GUESS_WINDOW`].
///
/// A key is counted as a guess *before* it is compared ([`Guesses::attempt`], under one
/// lock), and given back only when it was right ([`Reservation::correct`]): requests from
/// one address that arrive together can't all pass a check made before any of them was
/// counted.
#[derive(Debug, Default)]
pub(crate) struct Guesses {
    by_peer: Mutex<HashMap<IpAddr, (Instant, u32)>>,
}

/// A guess counted by [`Guesses::attempt`]: it stays counted (a wrong key) unless
/// [`Reservation::correct`] gives it back.
#[derive(Debug)]
#[must_use = "a reservation is a counted guess: give it back with `correct` if the key was right"]
pub(crate) struct Reservation<'a> {
    /// `None`: counted nowhere ([`Reservation::uncounted`]).
    guesses: Option<&'a Guesses>,
    peer: IpAddr,
    /// The start of the window the guess was counted in.
    start: Instant,
    /// Guesses in that window, this one included.
    n: u32,
}

impl Reservation<'_> {
    /// A guess counted nowhere, for a request without an address (no [`Peer`]).
    pub(crate) fn uncounted() -> Self {
        Reservation {
            guesses: None,
            peer: IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            start: Instant::now(),
            n: 0,
        }
    }

    /// Guesses of the address in its window, this one included; 0 when uncounted.
    pub(crate) fn n(&self) -> u32 {
        self.n
    }

    /// The key was right: the guess is not counted.
    pub(crate) fn correct(self) {
        let Some(guesses) = self.guesses else {
            return;
        };
        let mut by_peer = guesses.by_peer.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((start, n)) = by_peer.get_mut(&self.peer) {
            // A window started since is not this guess's.
            if *start == self.start {
                *n = n.saturating_sub(1);
            }
        }
    }
}

impl Guesses {
    /// Counts a guess from `peer` before its key is compared: the guess, or how long `peer`
    /// must wait if it used up its [`MAX_GUESSES`] (then nothing is counted).
    pub(crate) fn attempt(&self, peer: IpAddr, now: Instant) -> Result<Reservation<'_>, Duration> {
        let peer = counted_as(peer);
        let mut by_peer = self.by_peer.lock().unwrap_or_else(|e| e.into_inner());
        let (start, n) = match by_peer.get_mut(&peer) {
            Some((start, n)) if *start + GUESS_WINDOW > now => {
                if *n >= MAX_GUESSES {
                    return Err(*start + GUESS_WINDOW - now);
                }
                *n += 1;
                (*start, *n)
            }
            Some(entry) => {
                *entry = (now, 1);
                (now, 1)
            }
            None => {
                if by_peer.len() >= MAX_PEERS {
                    by_peer.retain(|_, (start, _)| *start + GUESS_WINDOW > now);
                    if by_peer.len() >= MAX_PEERS {
                        // The oldest address still guessing makes room, so that a flood
                        // of new addresses unblocks no one; all blocked: the oldest.
                        let evicted = by_peer
                            .iter()
                            .min_by_key(|(_, (start, n))| (*n >= MAX_GUESSES, *start))
                            .map(|(p, _)| *p);
                        if let Some(evicted) = evicted {
                            by_peer.remove(&evicted);
                        }
                    }
                }
                by_peer.insert(peer, (now, 1));
                (now, 1)
            }
        };
        Ok(Reservation {
            guesses: Some(self),
            peer,
            start,
            n,
        })
    }
}

/// Whether `candidate` is one of `keys`. Each comparison takes the same time whatever the
/// bytes (`subtle`), and every key is compared, so the time tells nothing of a key's
/// content (only, as any comparison, whether the lengths are equal).
pub(crate) fn is_admin(keys: &[String], candidate: &str) -> bool {
    let mut found = subtle::Choice::from(0);
    for key in keys {
        found |= key.as_bytes().ct_eq(candidate.as_bytes());
    }
    found.into()
}

struct Session {
    admin_key: String,
    expires: Instant,
}

/// Never the admin key.
impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("admin_key", &"[redacted]")
            .field("expires", &self.expires)
            .finish()
    }
}

/// The open sessions' tokens are secrets too: their `Debug` shows how many.
impl std::fmt::Debug for Sessions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let open = self.open.lock().map_or(0, |o| o.tokens.len());
        f.debug_struct("Sessions").field("open", &open).finish()
    }
}

/// The open sessions, by token.
#[derive(Default)]
pub(crate) struct Sessions {
    open: Mutex<Open>,
}

#[derive(Default)]
struct Open {
    tokens: HashMap<String, Session>,
    /// How many times [`Sessions::retain_keys`] ran: a key checked against the admin keys
    /// of an older configuration opens no session ([`Sessions::open`]). In the lock with
    /// the sessions, so that a session opens either before a `retain_keys` (which ends it)
    /// or after (which refuses it).
    generation: u64,
}

/// Why [`Sessions::open`] opened nothing.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum NotOpened {
    /// The key was checked against a configuration a reload has replaced: it may be a key
    /// the reload removed.
    Stale,
    /// The operating system gave no random bytes.
    NoRandom,
}

impl Sessions {
    /// The current generation of the admin keys: the one a configuration built now and
    /// in force without a reload checks keys for (a reload's is the next one, see
    /// [`Sessions::retain_keys`]).
    pub(crate) fn generation(&self) -> u64 {
        self.open
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .generation
    }

    /// Opens a session for `admin_key`, checked against the admin keys of the configuration
    /// of generation `checked`: its token. Refused when `checked` is older than the current
    /// generation (a reload since may have removed the key).
    pub(crate) fn open(
        &self,
        admin_key: &str,
        checked: u64,
        now: Instant,
    ) -> Result<String, NotOpened> {
        let mut bytes = [0u8; 32];
        getrandom::fill(&mut bytes).map_err(|_| NotOpened::NoRandom)?;
        let mut token = String::with_capacity(64);
        for b in bytes {
            let _ = write!(token, "{b:02x}");
        }
        let mut guard = self.open.lock().unwrap_or_else(|e| e.into_inner());
        if checked < guard.generation {
            return Err(NotOpened::Stale);
        }
        let open = &mut guard.tokens;
        open.retain(|_, s| s.expires > now);
        if open.len() >= MAX_SESSIONS {
            if let Some(oldest) = open
                .iter()
                .min_by_key(|(_, s)| s.expires)
                .map(|(t, _)| t.clone())
            {
                open.remove(&oldest);
            }
        }
        open.insert(
            token.clone(),
            Session {
                admin_key: admin_key.to_owned(),
                expires: now + SESSION_TTL,
            },
        );
        Ok(token)
    }

    /// Whether `token` is an open session whose key is still one of `keys`.
    pub(crate) fn valid(&self, token: &str, keys: &[String], now: Instant) -> bool {
        let open = &mut self.open.lock().unwrap_or_else(|e| e.into_inner()).tokens;
        let Some(session) = open.get(token) else {
            return false;
        };
        if session.expires <= now || !is_admin(keys, &session.admin_key) {
            open.remove(token);
            return false;
        }
        true
    }

    /// Ends the sessions whose admin key is not one of `keys` (a reload removed it): a key
    /// added again later opens no session of before. Starts the next generation: a key
    /// checked against an older configuration opens no session any more. Returns it.
    pub(crate) fn retain_keys(&self, keys: &[String]) -> u64 {
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        open.tokens.retain(|_, s| is_admin(keys, &s.admin_key));
        open.generation += 1;
        open.generation
    }

    /// Ends the session `token`, if open.
    pub(crate) fn close(&self, token: &str) {
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        open.tokens.remove(token);
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.open.lock().unwrap().tokens.len()
    }
}

/// The values of the session cookie in the `Cookie` headers (RFC 6265 section 5.4:
/// `name=value` pairs separated by `; `): a browser may send several of the name (from
/// other paths or hosts), so each is a candidate; at most [`MAX_SESSION_COOKIES`].
pub(crate) fn session_cookies(headers: &http::HeaderMap) -> impl Iterator<Item = &str> {
    headers
        .get_all(http::header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .filter(|(name, _)| *name == COOKIE)
        .map(|(_, value)| value)
        .take(MAX_SESSION_COOKIES)
}

/// Session cookies of one request looked at.
const MAX_SESSION_COOKIES: usize = 8;

/// Whether a request to a dashboard form comes from another site (CSRF): a
/// `Sec-Fetch-Site` other than `same-origin` or `none` (typed by the user); from a browser
/// that sends none, an `Origin` that is not this gateway (`Host`, or the URI's authority in
/// HTTP/2), `null` included. (`Sec-Fetch-Site` decides alone when present; the pages'
/// `Referrer-Policy: same-origin` lets a browser send their own `Origin` with their forms,
/// where `no-referrer` would make it `null`.) A
/// request with neither header (curl, a script) is not a browser's cross-site post.
pub(crate) fn cross_site(headers: &http::HeaderMap, uri: &http::Uri) -> bool {
    if let Some(site) = headers.get("sec-fetch-site") {
        return !matches!(site.to_str(), Ok("same-origin" | "none"));
    }
    let Some(origin) = headers.get(http::header::ORIGIN) else {
        return false;
    };
    let host = headers
        .get(http::header::HOST)
        .and_then(|h| h.to_str().ok())
        .or_else(|| uri.authority().map(http::uri::Authority::as_str));
    let authority = origin
        .to_str()
        .ok()
        .and_then(|o| o.split_once("://"))
        .map(|(_, a)| a);
    match (authority, host) {
        (Some(a), Some(h)) => !a.eq_ignore_ascii_case(h),
        _ => true,
    }
}

/// The `Set-Cookie` value of a new session (RFC 6265 section 4.1; `SameSite`:
/// draft-ietf-httpbis-rfc6265bis). No `Secure`: the gateway speaks plain HTTP to its
/// clients (put TLS in front of it for a dashboard reached over a network).
pub(crate) fn set_cookie(token: &str) -> String {
    format!(
        "{COOKIE}={token}; HttpOnly; SameSite=Strict; Path=/dashboard; Max-Age={}",
        SESSION_TTL.as_secs()
    )
}

/// The `Set-Cookie` value that removes the session cookie.
pub(crate) fn clear_cookie() -> String {
    format!("{COOKIE}=; HttpOnly; SameSite=Strict; Path=/dashboard; Max-Age=0")
}

/// The bearer token of an `Authorization` header, if any.
pub(crate) fn bearer(headers: &http::HeaderMap) -> Option<&str> {
    let value = headers.get(http::header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
}

/// The `key` field of an `application/x-www-form-urlencoded` body (WHATWG URL standard,
/// section 5.1: `+` is a space, `%XX` a byte).
pub(crate) fn form_key(body: &[u8]) -> Option<String> {
    body.split(|&b| b == b'&').find_map(|pair| {
        let value = pair.strip_prefix(b"key=")?;
        let mut out = Vec::with_capacity(value.len());
        let mut i = 0;
        while i < value.len() {
            match value[i] {
                b'+' => out.push(b' '),
                b'%' if i + 2 < value.len() => {
                    let hex = std::str::from_utf8(&value[i + 1..i + 3]).ok()?;
                    out.push(u8::from_str_radix(hex, 16).ok()?);
                    i += 2;
                }
                b => out.push(b),
            }
            i += 1;
        }
        String::from_utf8(out).ok()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guesses_are_counted_before_compared_and_given_back_when_right() {
        let g = Guesses::default();
        let peer: IpAddr = "192.0.2.1".parse().unwrap();
        let now = Instant::now();
        // Right keys cost nothing.
        for _ in 0..3 * MAX_GUESSES {
            g.attempt(peer, now).unwrap().correct();
        }
        // Pending guesses count: MAX of them held at once, the next is refused.
        let held: Vec<_> = (0..MAX_GUESSES)
            .map(|_| g.attempt(peer, now).unwrap())
            .collect();
        assert_eq!(held.last().map(Reservation::n), Some(MAX_GUESSES));
        assert_eq!(g.attempt(peer, now).unwrap_err(), GUESS_WINDOW);
        // One of them right: room for one more.
        let mut held = held.into_iter();
        held.next().unwrap().correct();
        let _wrong = g.attempt(peer, now).unwrap();
        assert!(g.attempt(peer, now).is_err());
        // Many threads at once: exactly MAX get through.
        let g = Guesses::default();
        let through = std::sync::atomic::AtomicU32::new(0);
        std::thread::scope(|s| {
            for _ in 0..8 {
                s.spawn(|| {
                    for _ in 0..MAX_GUESSES {
                        if g.attempt(peer, now).is_ok() {
                            through.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        }
                    }
                });
            }
        });
        assert_eq!(through.into_inner(), MAX_GUESSES);
    }

    /// Uses up `peer`'s guesses at `now`.
    fn use_up(g: &Guesses, peer: IpAddr, now: Instant) {
        for _ in 0..MAX_GUESSES {
            let _wrong = g.attempt(peer, now).unwrap();
        }
        assert!(g.attempt(peer, now).is_err(), "{peer} blocked");
    }

    #[test]
    fn a_window_ends_and_starts_afresh() {
        let g = Guesses::default();
        let peer: IpAddr = "192.0.2.1".parse().unwrap();
        let t0 = Instant::now();
        use_up(&g, peer, t0);
        let almost = t0 + GUESS_WINDOW - Duration::from_secs(1);
        assert_eq!(g.attempt(peer, almost).unwrap_err(), Duration::from_secs(1));
        let fresh = g.attempt(peer, t0 + GUESS_WINDOW).unwrap();
        assert_eq!(fresh.n(), 1);
    }

    #[test]
    fn addresses_apart_count_apart_and_a_64_counts_as_one() {
        let g = Guesses::default();
        let t0 = Instant::now();
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        use_up(&g, ip("192.0.2.1"), t0);
        assert!(g.attempt(ip("192.0.2.2"), t0).is_ok());
        // An IPv4 client reached over an IPv6 socket is the same client.
        assert!(g.attempt(ip("::ffff:192.0.2.1"), t0).is_err());
        // An IPv6 host has a /64 of its own to pick from: one count for the /64.
        use_up(&g, ip("2001:db8:0:1::1"), t0);
        assert!(g
            .attempt(ip("2001:db8:0:1:ffff:ffff:ffff:ffff"), t0)
            .is_err());
        assert!(g.attempt(ip("2001:db8:0:1:1234::9"), t0).is_err());
        assert!(g.attempt(ip("2001:db8:0:2::1"), t0).is_ok());
    }

    #[test]
    fn a_full_map_evicts_an_address_that_is_not_blocked() {
        let g = Guesses::default();
        let t0 = Instant::now();
        let blocked: IpAddr = "198.51.100.1".parse().unwrap();
        // The first (oldest) address is blocked; the others have one wrong key each.
        use_up(&g, blocked, t0);
        for i in 1..MAX_PEERS as u32 {
            let peer = IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + i));
            let _wrong = g.attempt(peer, t0 + Duration::from_secs(1)).unwrap();
        }
        assert_eq!(g.by_peer.lock().unwrap().len(), MAX_PEERS);
        let newcomer: IpAddr = "203.0.113.7".parse().unwrap();
        let _wrong = g.attempt(newcomer, t0 + Duration::from_secs(2)).unwrap();
        assert_eq!(g.by_peer.lock().unwrap().len(), MAX_PEERS);
        assert!(
            g.attempt(blocked, t0 + Duration::from_secs(3)).is_err(),
            "the blocked address was kept"
        );
        // Once their windows end, entries make room before any eviction.
        let later = t0 + GUESS_WINDOW + Duration::from_secs(3);
        let _wrong = g.attempt("203.0.113.8".parse().unwrap(), later).unwrap();
        assert_eq!(g.by_peer.lock().unwrap().len(), 1);
    }

    #[test]
    fn a_request_without_a_peer_has_no_address_and_an_uncounted_guess_counts_nothing() {
        let mut extensions = http::Extensions::new();
        assert_eq!(Peer::of(&extensions), None);
        let peer: IpAddr = "192.0.2.9".parse().unwrap();
        extensions.insert(Peer(peer));
        assert_eq!(Peer::of(&extensions), Some(peer));
        let uncounted = Reservation::uncounted();
        assert_eq!(uncounted.n(), 0);
        uncounted.correct();
    }

    #[test]
    fn behind_a_trusted_proxy_the_client_is_the_right_most_untrusted_forwarded_address() {
        let req = |peer: &str, xff: &[&str]| {
            let mut b = http::Request::builder();
            for v in xff {
                b = b.header("x-forwarded-for", *v);
            }
            let mut r = b.body(()).unwrap();
            r.extensions_mut().insert(Peer(peer.parse().unwrap()));
            r
        };
        let ip = |s: &str| Some(s.parse::<IpAddr>().unwrap());
        let none = Proxies::new(&[]);
        assert_eq!(
            none.client(&req("10.0.0.1", &["203.0.113.7"])),
            ip("10.0.0.1")
        );
        let trusted = Proxies::new(&["10.0.0.0/8".into(), "::1/128".into()]);
        // Untrusted peer: its header is its own words.
        assert_eq!(
            trusted.client(&req("192.0.2.1", &["203.0.113.7"])),
            ip("192.0.2.1")
        );
        // Trusted: the client's claim and trusted hops are skipped, lines joined.
        let chain = ["6.6.6.6, 203.0.113.7", "10.1.1.1"];
        assert_eq!(trusted.client(&req("10.0.0.1", &chain)), ip("203.0.113.7"));
        // An IPv6 client as itself (the guesses group it by /64).
        let v6 = ["2001:db8::1:2"];
        assert_eq!(trusted.client(&req("::1", &v6)), ip("2001:db8::1:2"));
        // No header, or all of it trusted: the left-most trusted hop.
        assert_eq!(trusted.client(&req("10.0.0.1", &[])), ip("10.0.0.1"));
        assert_eq!(
            trusted.client(&req("10.0.0.1", &["10.9.9.9"])),
            ip("10.9.9.9")
        );
        // A proxy that couldn't name its client: its unnamed clients count under it.
        let junk = ["203.0.113.7, unknown, 10.2.2.2"];
        assert_eq!(trusted.client(&req("10.0.0.1", &junk)), ip("10.2.2.2"));
        // No peer: nothing to count by.
        let mut bare = http::Request::new(());
        bare.headers_mut()
            .insert("x-forwarded-for", "203.0.113.7".parse().unwrap());
        assert_eq!(trusted.client(&bare), None);
        assert_eq!(trusted_proxy_problem("10.0.0.0/8"), None);
        assert!(trusted_proxy_problem("10.0.0.0/33")
            .unwrap()
            .contains("10.0.0.0/33"));
    }

    #[test]
    fn admin_keys_match_whole() {
        let keys = vec![
            "adm-0123456789abcdef".to_owned(),
            "other-admin-key-42".into(),
        ];
        assert!(is_admin(&keys, "adm-0123456789abcdef"));
        assert!(is_admin(&keys, "other-admin-key-42"));
        assert!(!is_admin(&keys, "adm-0123456789abcde"));
        assert!(!is_admin(&keys, "adm-0123456789abcdeF"));
        assert!(!is_admin(&keys, ""));
        assert!(!is_admin(&[], "adm-0123456789abcdef"));
    }

    #[test]
    fn sessions_expire_end_with_their_key_and_are_bounded() {
        let keys = vec!["adm-0123456789abcdef".to_owned()];
        let s = Sessions::default();
        let now = Instant::now();
        let t = s.open(&keys[0], 0, now).unwrap();
        assert_eq!(t.len(), 64);
        assert!(!t.contains("adm-"));
        assert!(s.valid(&t, &keys, now));
        assert!(!s.valid("not-a-session", &keys, now));
        assert!(!s.valid(&t, &keys, now + SESSION_TTL));
        let t = s.open(&keys[0], 0, now).unwrap();
        assert!(!s.valid(&t, &["another-admin-key-1".to_owned()], now));
        assert!(!s.valid(&t, &keys, now), "ended with its key");
        for _ in 0..MAX_SESSIONS + 10 {
            s.open(&keys[0], 0, now).unwrap();
        }
        assert_eq!(s.len(), MAX_SESSIONS);
        let t = s.open(&keys[0], 0, now).unwrap();
        s.close(&t);
        assert!(!s.valid(&t, &keys, now));
    }

    /// A sign-in whose key was checked against a configuration a reload has since replaced
    /// (its form read while the reload removed the key) opens no session.
    #[test]
    fn a_key_checked_before_a_reload_opens_no_session() {
        let key = "adm-0123456789abcdef";
        let s = Sessions::default();
        let now = Instant::now();
        let checked = s.generation();
        s.retain_keys(&[]);
        assert_eq!(s.open(key, checked, now), Err(NotOpened::Stale));
        assert_eq!(s.len(), 0);
        let current = s.generation();
        assert_eq!(current, checked + 1);
        assert!(s.open(key, current, now).is_ok());
        // The configuration a reload is applying (its generation is the next one) already
        // serves before its `retain_keys`: its keys are the ones kept.
        assert!(s.open(key, current + 1, now).is_ok());
        assert_eq!(s.len(), 2);
    }

    #[test]
    fn debug_shows_no_key_or_token() {
        let s = Sessions::default();
        let key = "adm-test-0123456789abcdef";
        let t = s.open(key, 0, Instant::now()).unwrap();
        let sessions: Vec<String> = s
            .open
            .lock()
            .unwrap()
            .tokens
            .values()
            .map(|v| format!("{v:?}"))
            .collect();
        let shown = format!("{s:?} {sessions:?}");
        assert!(!shown.contains(key) && !shown.contains(&t), "{shown}");
    }

    #[test]
    fn cookies_bearers_and_forms_are_read() {
        let mut h = http::HeaderMap::new();
        h.insert(
            "cookie",
            "a=b; gateway_dashboard=abc; c=d; gateway_dashboard=xyz"
                .parse()
                .unwrap(),
        );
        h.insert("authorization", "Bearer  tok ".parse().unwrap());
        assert_eq!(session_cookies(&h).collect::<Vec<_>>(), ["abc", "xyz"]);
        assert_eq!(bearer(&h), Some("tok"));
        assert_eq!(form_key(b"x=1&key=a%2Bb+c%25"), Some("a+b c%".to_owned()));
        assert_eq!(form_key(b"key=%zz"), None);
        assert_eq!(form_key(b"key=%4"), Some("%4".to_owned()));
        assert_eq!(form_key(b"nokey=1"), None);
        let c = set_cookie("abc");
        for flag in ["HttpOnly", "SameSite=Strict", "Path=/dashboard"] {
            assert!(c.contains(flag), "{c}");
        }
    }
}
