//! The client IP, trusting the one forwarding header its proxies write, and only from them.

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use http::Extensions;

use super::cidr::{mask, IpNet};
use super::forwarding::ForwardingHeader;
use super::{Key, KeyExtractor, RequestView};

/// The peer's socket address, as a request extension. Servers that don't use axum's
/// `ConnectInfo` (plain hyper, custom acceptors) insert it per connection; [`client_ip`]
/// also reads a bare [`SocketAddr`] extension and, with the `axum` feature, axum's
/// `ConnectInfo<SocketAddr>`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerAddr(pub SocketAddr);

type PeerFn = Arc<dyn Fn(&Extensions) -> Option<IpAddr> + Send + Sync>;

/// The client's IP address. See [`client_ip`].
#[derive(Clone)]
pub struct ClientIp {
    trusted: Vec<IpNet>,
    errors: Vec<String>,
    ipv6_prefix: u8,
    peer: Option<PeerFn>,
    header: ForwardingHeader,
}

/// Keys by the client's IP address.
///
/// The client is the peer of the connection, unless the peer is a trusted proxy
/// ([`ClientIp::trust_proxy`]). Then the forwarding chain of the one header the proxies write
/// ([`ClientIp::forwarding_header`]: `X-Forwarded-For` by default, or `Forwarded`, RFC 7239)
/// is walked from the right, skipping trusted proxies, and the first untrusted address is the
/// client. The other header is ignored: behind a proxy that only appends `X-Forwarded-For`, a
/// `Forwarded: for=6.6.6.6` is the client's own words. Headers from an untrusted peer are
/// ignored too, so a client can't pick its own bucket. All lines of the header form one
/// list, read element by element on the raw bytes: a client's non-ASCII byte or junk spoils
/// its own element, not the address its proxy appended after it.
///
/// An element that isn't an address where the client's should be (`unknown`, an obfuscated
/// identifier, junk) keys the request as `unknown via <proxy>`, `<proxy>` being the trusted
/// hop that reported it: one bucket per trusted proxy for every client it couldn't name.
/// Not the proxy's own bucket (a client that could land there would share, and could
/// exhaust, the budget of the proxy's own requests), and not the element's bytes (whoever
/// writes them could mint a key per request): a client that can write that element could
/// already name any trusted proxy in its place, so this adds no key it couldn't pick
/// before. A trusted proxy that appends the client's address always writes it, so an
/// ordinary client never lands there; those that do are limited together.
///
/// IPv6 clients are keyed by their /64 network by default (one host usually holds a whole
/// /64); see [`ClientIp::ipv6_prefix`].
///
/// The peer address comes from [`PeerAddr`] or [`SocketAddr`] in the request extensions, or
/// axum's `ConnectInfo<SocketAddr>` with the `axum` feature, or a function of yours
/// ([`ClientIp::peer_from`], e.g. for tonic's `TcpConnectInfo`).
///
/// # Examples
///
/// ```
/// use http::Request;
/// use tower_llm_ratelimit::key::{client_ip, KeyExtractor, PeerAddr, RequestView};
///
/// let ip = client_ip().trust_proxy("10.0.0.0/8");
/// let mut req = Request::builder()
///     .header("x-forwarded-for", "203.0.113.7, 10.1.1.1")
///     .body(())
///     .unwrap();
/// req.extensions_mut().insert(PeerAddr("10.0.0.2:5000".parse().unwrap()));
/// let key = ip.extract(&RequestView::from_request(&req)).unwrap();
/// assert_eq!(key.to_string(), "203.0.113.7");
/// ```
pub fn client_ip() -> ClientIp {
    ClientIp {
        trusted: Vec::new(),
        errors: Vec::new(),
        ipv6_prefix: 64,
        peer: None,
        header: ForwardingHeader::XForwardedFor,
    }
}

impl ClientIp {
    /// Trusts forwarding headers set by peers in `cidr` (`"10.0.0.0/8"`, `"::1"`). A bad
    /// value is reported by [`crate::RateLimitLayerBuilder::build`].
    pub fn trust_proxy(mut self, cidr: &str) -> Self {
        match cidr.parse() {
            Ok(net) => self.trusted.push(net),
            Err(e) => self.errors.push(e),
        }
        self
    }

    /// Trusts each of `cidrs`.
    pub fn trust_proxies<'a>(self, cidrs: impl IntoIterator<Item = &'a str>) -> Self {
        cidrs.into_iter().fold(self, Self::trust_proxy)
    }

    /// Groups IPv6 clients by their first `prefix` bits (default 64; 128 keys each address).
    pub fn ipv6_prefix(mut self, prefix: u8) -> Self {
        self.ipv6_prefix = prefix;
        self
    }

    /// Reads the client address from `header`, the one your trusted proxies write (default
    /// [`ForwardingHeader::XForwardedFor`]); the other header is ignored, whatever it says.
    ///
    /// ```
    /// use http::Request;
    /// use tower_llm_ratelimit::key::{
    ///     client_ip, ForwardingHeader, KeyExtractor, PeerAddr, RequestView,
    /// };
    ///
    /// let ip = client_ip()
    ///     .trust_proxy("10.0.0.0/8")
    ///     .forwarding_header(ForwardingHeader::Forwarded);
    /// let mut req = Request::builder()
    ///     .header("forwarded", "for=203.0.113.7;proto=https")
    ///     // Not what the proxy writes: the client's own, ignored.
    ///     .header("x-forwarded-for", "6.6.6.6")
    ///     .body(())
    ///     .unwrap();
    /// req.extensions_mut().insert(PeerAddr("10.0.0.2:5000".parse().unwrap()));
    /// let key = ip.extract(&RequestView::from_request(&req)).unwrap();
    /// assert_eq!(key.to_string(), "203.0.113.7");
    /// ```
    pub fn forwarding_header(mut self, header: ForwardingHeader) -> Self {
        self.header = header;
        self
    }

    /// Reads the peer address with `f` instead of the built-in extension types.
    pub fn peer_from(
        mut self,
        f: impl Fn(&Extensions) -> Option<IpAddr> + Send + Sync + 'static,
    ) -> Self {
        self.peer = Some(Arc::new(f));
        self
    }

    fn peer_ip(&self, ext: &Extensions) -> Option<IpAddr> {
        if let Some(f) = &self.peer {
            return f(ext);
        }
        if let Some(PeerAddr(a)) = ext.get::<PeerAddr>() {
            return Some(a.ip());
        }
        if let Some(a) = ext.get::<SocketAddr>() {
            return Some(a.ip());
        }
        #[cfg(feature = "axum")]
        if let Some(axum::extract::ConnectInfo(a)) =
            ext.get::<axum::extract::ConnectInfo<SocketAddr>>()
        {
            return Some(a.ip());
        }
        None
    }

    fn is_trusted(&self, ip: IpAddr) -> bool {
        self.trusted.iter().any(|n| n.contains(ip))
    }

    /// The client for a request from `peer`.
    fn client(&self, req: &RequestView<'_>, peer: IpAddr) -> Client {
        let mut hop = peer.to_canonical();
        if !self.is_trusted(hop) {
            return Client::Ip(hop);
        }
        for entry in self.header.entries_from_the_right(req.headers()) {
            match entry {
                Some(ip) if self.is_trusted(ip) => hop = ip,
                Some(ip) => return Client::Ip(ip),
                None => return Client::Unknown { via: hop },
            }
        }
        hop.into()
    }
}

/// Who a request comes from.
enum Client {
    Ip(IpAddr),
    /// The trusted proxy `via` gave something else than an address for its client.
    Unknown {
        via: IpAddr,
    },
}

impl From<IpAddr> for Client {
    fn from(ip: IpAddr) -> Self {
        Self::Ip(ip)
    }
}

impl fmt::Debug for ClientIp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientIp")
            .field("trusted", &self.trusted)
            .field("header", &self.header)
            .field("ipv6_prefix", &self.ipv6_prefix)
            .field("custom_peer", &self.peer.is_some())
            .finish()
    }
}

impl KeyExtractor for ClientIp {
    fn extract(&self, req: &RequestView<'_>) -> Option<Key> {
        let peer = self.peer_ip(req.extensions())?;
        Some(match self.client(req, peer) {
            Client::Ip(ip @ IpAddr::V6(_)) if self.ipv6_prefix < 128 => Key::from(format!(
                "{}/{}",
                mask(ip, self.ipv6_prefix),
                self.ipv6_prefix
            )),
            Client::Ip(ip) => Key::from(ip.to_string()),
            Client::Unknown { via } => Key::from(format!("unknown via {via}")),
        })
    }

    fn describe(&self) -> String {
        "client IP address".to_owned()
    }

    fn validate(&self) -> Result<(), String> {
        if self.ipv6_prefix > 128 {
            return Err(format!(
                "ipv6_prefix must be <= 128, got {}",
                self.ipv6_prefix
            ));
        }
        match self.errors.first() {
            Some(e) => Err(e.clone()),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::Request;

    fn key(ip: &ClientIp, peer: &str, headers: &[(&str, &str)]) -> Option<String> {
        let mut b = Request::builder();
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        let mut req = b.body(()).unwrap();
        req.extensions_mut().insert(PeerAddr(peer.parse().unwrap()));
        ip.extract(&RequestView::from_request(&req))
            .map(|k| k.to_string())
    }

    #[test]
    fn untrusted_peer_headers_are_ignored() {
        let ip = client_ip().trust_proxy("10.0.0.0/8");
        let got = key(&ip, "198.51.100.1:1", &[("x-forwarded-for", "1.2.3.4")]);
        assert_eq!(got.as_deref(), Some("198.51.100.1"));
    }

    #[test]
    fn walks_the_chain_from_the_right() {
        let ip = client_ip().trust_proxies(["10.0.0.0/8", "192.168.1.1"]);
        let xff = [
            ("x-forwarded-for", "6.6.6.6, 203.0.113.9"),
            ("x-forwarded-for", "192.168.1.1"),
        ];
        // The client forged 6.6.6.6; the first untrusted address from the right wins.
        assert_eq!(key(&ip, "10.0.0.1:1", &xff).as_deref(), Some("203.0.113.9"));
        // All trusted: the leftmost hop.
        let all = [("x-forwarded-for", "10.9.9.9, 192.168.1.1")];
        assert_eq!(key(&ip, "10.0.0.1:1", &all).as_deref(), Some("10.9.9.9"));
        // Garbage stops at the proxy that added it, in a bucket of its own.
        let junk = [("x-forwarded-for", "203.0.113.9, junk, 10.2.2.2")];
        assert_eq!(
            key(&ip, "10.0.0.1:1", &junk).as_deref(),
            Some("unknown via 10.2.2.2")
        );
    }

    #[test]
    fn forwarded_header_when_configured_and_ipv6_is_grouped() {
        let ip = client_ip()
            .trust_proxy("::1")
            .forwarding_header(ForwardingHeader::Forwarded);
        let fwd = [
            (
                "forwarded",
                r#"for="[2001:db8:cafe:1:2:3:4:5]:4711";proto=https, for=unknown"#,
            ),
            ("x-forwarded-for", "9.9.9.9"),
        ];
        // `unknown` (rightmost) stops the walk at the peer; X-Forwarded-For is not read.
        assert_eq!(
            key(&ip, "[::1]:1", &fwd).as_deref(),
            Some("unknown via ::1")
        );
        let fwd = [(
            "forwarded",
            r#"for="[2001:db8:cafe:1:2:3:4:5]:4711";proto=https"#,
        )];
        assert_eq!(
            key(&ip, "[::1]:1", &fwd).as_deref(),
            Some("2001:db8:cafe:1::/64")
        );
        let exact = ip.clone().ipv6_prefix(128);
        assert_eq!(
            key(&exact, "[::1]:1", &fwd).as_deref(),
            Some("2001:db8:cafe:1:2:3:4:5")
        );
        let xff_only = [("x-forwarded-for", "9.9.9.9")];
        assert_eq!(key(&ip, "[::1]:1", &xff_only).as_deref(), Some("::/64"));
    }

    /// A request from `peer` with raw header lines (any bytes), in order.
    fn key_raw(ip: &ClientIp, peer: &str, headers: &[(&str, &[u8])]) -> Option<String> {
        let mut req = Request::new(());
        for (k, v) in headers {
            let name = http::HeaderName::from_bytes(k.as_bytes()).unwrap();
            let value = http::HeaderValue::from_bytes(v).unwrap();
            req.headers_mut().append(name, value);
        }
        req.extensions_mut().insert(PeerAddr(peer.parse().unwrap()));
        ip.extract(&RequestView::from_request(&req))
            .map(|k| k.to_string())
    }

    #[test]
    fn only_x_forwarded_for_counts_by_default() {
        let ip = client_ip().trust_proxy("10.0.0.0/8");
        // The proxy appends X-Forwarded-For only; a `Forwarded` the client sent is its own.
        let forged = [
            ("forwarded", "for=6.6.6.6"),
            ("x-forwarded-for", "203.0.113.9"),
        ];
        assert_eq!(
            key(&ip, "10.0.0.1:1", &forged).as_deref(),
            Some("203.0.113.9")
        );
        let alone = [("forwarded", "for=6.6.6.6")];
        assert_eq!(key(&ip, "10.0.0.1:1", &alone).as_deref(), Some("10.0.0.1"));
    }

    #[test]
    fn one_bad_element_spoils_only_itself() {
        let ip = client_ip().trust_proxy("10.0.0.0/8");
        // The client sent a non-ASCII byte; the proxy appended its address to the same line.
        let one_line: [(&str, &[u8]); 1] = [("x-forwarded-for", b"\x80, 203.0.113.9")];
        assert_eq!(
            key_raw(&ip, "10.0.0.1:1", &one_line).as_deref(),
            Some("203.0.113.9")
        );
        // Or on a line of its own: the lines are one list, in order.
        let two_lines: [(&str, &[u8]); 2] = [
            ("x-forwarded-for", b"6.6.6.6, \xff\xfe"),
            ("x-forwarded-for", b"203.0.113.9, 10.1.1.1"),
        ];
        assert_eq!(
            key_raw(&ip, "10.0.0.1:1", &two_lines).as_deref(),
            Some("203.0.113.9")
        );
        let reversed: [(&str, &[u8]); 2] = [
            ("x-forwarded-for", b"203.0.113.9"),
            ("x-forwarded-for", b"6.6.6.6, 10.1.1.1"),
        ];
        assert_eq!(
            key_raw(&ip, "10.0.0.1:1", &reversed).as_deref(),
            Some("6.6.6.6")
        );
    }

    #[test]
    fn an_unreadable_client_entry_is_not_the_proxy() {
        let ip = client_ip().trust_proxy("10.0.0.0/8");
        for bad in [&b"\x80"[..], b"junk", b"unknown", b"1.2.3.4.5", b"[::1"] {
            let got = key_raw(&ip, "10.0.0.1:1", &[("x-forwarded-for", bad)]);
            assert_ne!(got.as_deref(), Some("10.0.0.1"), "{bad:?}");
            assert_eq!(got.as_deref(), Some("unknown via 10.0.0.1"), "{bad:?}");
        }
        // Behind two proxies: the one that added the entry names the bucket.
        let chain: [(&str, &[u8]); 1] = [("x-forwarded-for", b"6.6.6.6, \x80, 10.2.2.2")];
        assert_eq!(
            key_raw(&ip, "10.0.0.1:1", &chain).as_deref(),
            Some("unknown via 10.2.2.2")
        );
        // Empty list elements are no entries (RFC 9110 section 5.6.1).
        let empty = [("x-forwarded-for", " , 203.0.113.9 ,")];
        assert_eq!(
            key(&ip, "10.0.0.1:1", &empty).as_deref(),
            Some("203.0.113.9")
        );
    }

    #[test]
    fn ipv4_mapped_peers_match_v4_cidrs() {
        let ip = client_ip().trust_proxy("127.0.0.1");
        let got = key(
            &ip,
            "[::ffff:127.0.0.1]:1",
            &[("x-forwarded-for", "8.8.8.8")],
        );
        assert_eq!(got.as_deref(), Some("8.8.8.8"));
    }

    #[test]
    fn bad_cidrs_are_reported() {
        assert!(client_ip().trust_proxy("10.0.0.0/33").validate().is_err());
        assert!(client_ip().trust_proxy("nope").validate().is_err());
        assert!(client_ip().trust_proxy("10.0.0.0/8").validate().is_ok());
        assert_eq!(
            key(&client_ip(), "1.2.3.4:5", &[]).as_deref(),
            Some("1.2.3.4")
        );
    }
}
