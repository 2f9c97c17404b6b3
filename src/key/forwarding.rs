//! Reading the forwarding chain a trusted proxy wrote: `X-Forwarded-For` or `Forwarded`
//! (RFC 7239), element by element, on the raw header bytes.
//!
//! Every line of the header is one list, in order (RFC 9110 section 5.3). Each element is
//! read on its own: a byte that isn't ASCII, or an element that isn't an address, spoils
//! that element only, never the line it sits on (a client controls the start of the line
//! its proxy appends to). The list is split on every comma, quoted or not: a proxy writes
//! no comma inside an element, and a quote-aware split would let a client's unbalanced `"`
//! swallow the elements its proxy appended after it.

use std::net::{IpAddr, SocketAddr};

use http::HeaderMap;

/// The forwarding header a trusted proxy writes; [`crate::key::ClientIp`] reads that one and
/// ignores the other entirely (a client can send either).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ForwardingHeader {
    /// `X-Forwarded-For: client, proxy1, proxy2` (the default: nginx's
    /// `$proxy_add_x_forwarded_for`, most load balancers).
    #[default]
    XForwardedFor,
    /// `Forwarded: for=client, for=proxy1` (RFC 7239): the `for=` parameter of each element.
    Forwarded,
}

/// One entry of the chain: an address, or something else (`unknown`, an obfuscated
/// identifier, bytes that aren't an address).
pub(super) type Entry = Option<IpAddr>;

impl ForwardingHeader {
    /// The chain's entries from the right (the nearest proxy's first), empty elements left
    /// out (RFC 9110 section 5.6.1).
    pub(super) fn entries_from_the_right(
        self,
        headers: &HeaderMap,
    ) -> impl Iterator<Item = Entry> + '_ {
        let name = match self {
            Self::XForwardedFor => "x-forwarded-for",
            Self::Forwarded => "forwarded",
        };
        headers
            .get_all(name)
            .iter()
            .flat_map(|line| line.as_bytes().split(|&b| b == b','))
            .rev()
            .map(trim)
            .filter(|element| !element.is_empty())
            .map(move |element| match self {
                Self::XForwardedFor => parse_node(element),
                Self::Forwarded => forwarded_for(element),
            })
    }
}

/// Strips optional whitespace (RFC 9110 section 5.6.3).
fn trim(mut s: &[u8]) -> &[u8] {
    while let [b' ' | b'\t', rest @ ..] = s {
        s = rest;
    }
    while let [rest @ .., b' ' | b'\t'] = s {
        s = rest;
    }
    s
}

/// The `for=` node of one `Forwarded` element (RFC 7239 section 4), if it is an address.
fn forwarded_for(element: &[u8]) -> Entry {
    element.split(|&b| b == b';').find_map(|pair| {
        let at = pair.iter().position(|&b| b == b'=')?;
        let (name, value) = (trim(&pair[..at]), &pair[at + 1..]);
        name.eq_ignore_ascii_case(b"for")
            .then(|| parse_node(value))?
    })
}

/// An address from a forwarding entry: `1.2.3.4`, `1.2.3.4:80`, `::1`, `[::1]`, `"[::1]:80"`
/// (RFC 7239 section 6).
fn parse_node(node: &[u8]) -> Entry {
    let s = std::str::from_utf8(trim(node)).ok()?.trim_matches('"');
    if let Ok(ip) = s.parse::<IpAddr>() {
        return Some(ip.to_canonical());
    }
    if let Ok(sa) = s.parse::<SocketAddr>() {
        return Some(sa.ip().to_canonical());
    }
    s.strip_prefix('[')?
        .strip_suffix(']')?
        .parse::<IpAddr>()
        .ok()
        .map(|ip| ip.to_canonical())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entries(header: ForwardingHeader, lines: &[&[u8]]) -> Vec<Entry> {
        let mut headers = HeaderMap::new();
        let name = match header {
            ForwardingHeader::XForwardedFor => "x-forwarded-for",
            ForwardingHeader::Forwarded => "forwarded",
        };
        for line in lines {
            headers.append(name, http::HeaderValue::from_bytes(line).unwrap());
        }
        header.entries_from_the_right(&headers).collect()
    }

    #[test]
    fn elements_are_read_one_by_one_from_the_right() {
        let ip = |s: &str| Some(s.parse::<IpAddr>().unwrap());
        let got = entries(
            ForwardingHeader::XForwardedFor,
            &[b"1.1.1.1, \xc3(", b" ,2.2.2.2:80\t, [::1] ,"],
        );
        assert_eq!(got, vec![ip("::1"), ip("2.2.2.2"), None, ip("1.1.1.1")]);
        let got = entries(
            ForwardingHeader::Forwarded,
            &[br#"for="[2001:db8::1]:4711";proto=https, by=1.1.1.1;FOR = 3.3.3.3"#],
        );
        assert_eq!(got, vec![ip("3.3.3.3"), ip("2001:db8::1")]);
        // A quote the client left open doesn't hide what the proxy appended.
        let got = entries(ForwardingHeader::Forwarded, &[br#"for="x, for=4.4.4.4"#]);
        assert_eq!(got, vec![ip("4.4.4.4"), None]);
        let got = entries(ForwardingHeader::Forwarded, &[b"for=unknown, proto=http"]);
        assert_eq!(got, vec![None, None]);
    }
}
