//! The client-IP extractor behind a trusted proxy, on arbitrary forwarding headers: never
//! panics, an untrusted peer is always keyed as itself whatever it sends, the answer depends
//! on the headers alone (the same request gives the same key), and the address the proxy
//! appended last to `X-Forwarded-For` is the key whatever stands before it (or in a
//! `Forwarded` header, which this proxy doesn't write).
#![no_main]

use std::net::Ipv4Addr;

use http::HeaderValue;
use libfuzzer_sys::fuzz_target;
use tower_llm_ratelimit::key::{self, KeyExtractor, PeerAddr, RequestView};

const PROXY: &str = "10.0.0.7:443";
const STRANGER: &str = "203.0.113.9:5000";

fuzz_target!(|data: &[u8]| {
    // First byte: which headers to send; the rest: their values, split at the first 0xFF.
    let Some((&flags, rest)) = data.split_first() else {
        return;
    };
    let (xff, fwd) = match rest.iter().position(|&b| b == 0xFF) {
        Some(i) => (&rest[..i], &rest[i + 1..]),
        None => (rest, &[][..]),
    };
    let extractor = key::client_ip().trust_proxies(["10.0.0.0/8", "fd00::/8"]);
    let request = |peer: &str| {
        let mut req = http::Request::new(());
        for (on, name, value) in [(flags & 1, "x-forwarded-for", xff), (flags & 2, "forwarded", fwd)] {
            if on == 0 {
                continue;
            }
            // Bytes that can't be in a header value (CR, LF, NUL) never reach a server.
            if let Ok(v) = HeaderValue::from_bytes(value) {
                req.headers_mut().append(name, v);
            }
        }
        req.extensions_mut().insert(PeerAddr(peer.parse().expect("static address")));
        req
    };

    let from_proxy = request(PROXY);
    let a = extractor.extract(&RequestView::from_request(&from_proxy));
    let b = extractor.extract(&RequestView::from_request(&from_proxy));
    assert_eq!(a, b, "the same request keys the same");
    assert!(a.is_some(), "a request with a peer address always has a key");

    // The element the proxy appended: the last non-empty one, if it is a plain address
    // outside the trusted network.
    let appended = xff
        .split(|&b| b == b',')
        .map(<[u8]>::trim_ascii)
        .rfind(|e| !e.is_empty())
        .and_then(|last| std::str::from_utf8(last).ok()?.parse::<Ipv4Addr>().ok())
        .filter(|ip| ip.octets()[0] != 10);
    if flags & 1 != 0 && HeaderValue::from_bytes(xff).is_ok() {
        if let Some(ip) = appended {
            assert_eq!(
                a.as_ref().map(|k| k.to_string()),
                Some(ip.to_string()),
                "the client the proxy saw is the key"
            );
        }
    }

    let from_stranger = request(STRANGER);
    let key = extractor.extract(&RequestView::from_request(&from_stranger));
    assert_eq!(
        key.map(|k| k.to_string()).as_deref(),
        Some("203.0.113.9"),
        "an untrusted peer can't choose its key"
    );
});
