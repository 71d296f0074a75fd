//! Header rewriting in both directions: hop-by-hop removal (RFC 9110 7.6.1), `Via`,
//! `X-Forwarded-For`, and stripping headers that must never cross the proxy.

use std::net::IpAddr;

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use smallvec::SmallVec;

use crate::config::ForwardedFor;
use crate::error::ERROR_HEADER;

/// Hop-by-hop headers that never cross a proxy, whatever `Connection` says.
const HOP_BY_HOP: [HeaderName; 8] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::UPGRADE,
];

/// What the request-side rewrite needs to know.
pub struct RequestRewrite<'a> {
    pub via: Option<&'a HeaderValue>,
    pub forwarded_for: ForwardedFor,
    pub client_ip: IpAddr,
    /// Canonical `host[:port]` of the target; replaces any Host the client sent (RFC 9112 3.2.2).
    pub host: &'a str,
    /// `proxy.request_id_header` and this request's id, when the header is configured.
    pub request_id: Option<(&'a HeaderName, &'a str)>,
}

/// Remove hop-by-hop headers, including every header named in `Connection`.
/// `Transfer-Encoding` goes too: hyper re-frames the body on the other side.
///
/// This runs twice per request, so it makes one pass over the names present and removes
/// only what is there, without allocating (a map holds a dozen headers; the fixed list
/// alone would cost ten hash lookups).
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let mut found: SmallVec<[HeaderName; 4]> = SmallVec::new();
    let mut lists_names = false;
    for name in headers.keys() {
        if *name == header::CONNECTION || *name == HOP_BY_HOP[2] {
            lists_names = true;
        }
        if *name == header::TRANSFER_ENCODING || HOP_BY_HOP.contains(name) {
            found.push(name.clone());
        }
    }
    if lists_names {
        // Connection: keep-alive, X-Secret  ->  X-Secret goes too (`keep-alive` already
        // does). `remove` takes the token as written: no lower-cased copy is allocated.
        let mut named: SmallVec<[String; 2]> = SmallVec::new();
        for value in headers
            .get_all(header::CONNECTION)
            .iter()
            .chain(headers.get_all(&HOP_BY_HOP[2]).iter())
        {
            let Ok(value) = value.to_str() else { continue };
            for token in value.split(',').map(str::trim) {
                if !token.is_empty() && !is_listed_hop_by_hop(token) {
                    named.push(token.to_owned());
                }
            }
        }
        for token in &named {
            // An invalid name finds nothing (no panic): there is no such header to remove.
            headers.remove(token.as_str());
        }
    }
    for name in &found {
        headers.remove(name);
    }
}

/// `close` and `keep-alive` are the usual `Connection` tokens: no header to look up.
fn is_listed_hop_by_hop(token: &str) -> bool {
    token.eq_ignore_ascii_case("close")
        || HOP_BY_HOP
            .iter()
            .any(|name| token.eq_ignore_ascii_case(name.as_str()))
}

/// Rewrite a request's headers for the next hop.
pub fn rewrite_request(headers: &mut HeaderMap, rw: &RequestRewrite<'_>) {
    strip_hop_by_hop(headers);
    // Most clients already send exactly the canonical Host, once: kept. Anything else (a
    // different host, none, or several) is replaced by the one canonical value.
    let mut sent = headers.get_all(header::HOST).iter();
    let canonical = matches!(
        (sent.next(), sent.next()),
        (Some(host), None) if host.as_bytes() == rw.host.as_bytes()
    );
    if !canonical && let Ok(host) = HeaderValue::from_str(rw.host) {
        headers.insert(header::HOST, host);
    }
    match rw.forwarded_for {
        ForwardedFor::Off => {}
        ForwardedFor::Delete => {
            headers.remove("x-forwarded-for");
        }
        ForwardedFor::On => append_list(
            headers,
            HeaderName::from_static("x-forwarded-for"),
            &rw.client_ip.to_string(),
        ),
    }
    if let Some(via) = rw.via {
        append_value(headers, header::VIA, via);
    }
    if let Some((name, id)) = rw.request_id
        && let Ok(value) = HeaderValue::from_str(id)
    {
        headers.insert(name.clone(), value);
    }
}

/// Rewrite a response's headers for the client.
pub fn rewrite_response(headers: &mut HeaderMap, via: Option<&HeaderValue>) {
    strip_hop_by_hop(headers);
    // Only Kalmar itself may say that Kalmar failed.
    headers.remove(ERROR_HEADER);
    if let Some(via) = via {
        append_value(headers, header::VIA, via);
    }
}

fn append_value(headers: &mut HeaderMap, name: HeaderName, value: &HeaderValue) {
    match headers.get(&name).and_then(|v| v.to_str().ok()) {
        Some(existing) => {
            if let Ok(v) = HeaderValue::from_str(&format!(
                "{existing}, {}",
                value.to_str().unwrap_or_default()
            )) {
                headers.insert(name, v);
            }
        }
        None => {
            headers.insert(name, value.clone());
        }
    }
}

fn append_list(headers: &mut HeaderMap, name: HeaderName, item: &str) {
    if let Ok(v) = HeaderValue::from_str(item) {
        append_value(headers, name, &v);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strips_hop_by_hop_and_connection_named() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, X-Secret"),
        );
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert(
            header::PROXY_AUTHORIZATION,
            HeaderValue::from_static("Basic Zm9vOmJhcg=="),
        );
        h.insert(
            header::TRANSFER_ENCODING,
            HeaderValue::from_static("chunked"),
        );
        h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        h.insert("x-keep", HeaderValue::from_static("yes"));
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1, "{h:?}");
        assert!(h.contains_key("x-keep"));
    }

    #[test]
    fn strips_names_listed_in_either_connection_header() {
        let mut h = HeaderMap::new();
        h.append(header::CONNECTION, HeaderValue::from_static("close, X-A"));
        h.append(header::CONNECTION, HeaderValue::from_static(" x-b ,,"));
        h.insert(
            "proxy-connection",
            HeaderValue::from_static("X-C, bad name"),
        );
        for name in ["x-a", "x-b", "x-c", "x-d"] {
            h.insert(name, HeaderValue::from_static("1"));
        }
        h.insert(header::TE, HeaderValue::from_static("trailers"));
        strip_hop_by_hop(&mut h);
        let left: Vec<_> = h.keys().map(HeaderName::as_str).collect();
        assert_eq!(left, ["x-d"]);
    }

    #[test]
    fn host_is_replaced_only_when_it_differs() {
        let rw = RequestRewrite {
            via: None,
            forwarded_for: ForwardedFor::Off,
            client_ip: "127.0.0.2".parse().unwrap(),
            host: "example.com:8080",
            request_id: None,
        };
        let sent_hosts: [&[&'static str]; 4] = [
            &[],
            &["example.com:8080"],
            &["Example.com:8080"],
            &["example.com:8080", "evil.example"],
        ];
        for sent in sent_hosts {
            let mut h = HeaderMap::new();
            for host in sent {
                h.append(header::HOST, HeaderValue::from_static(host));
            }
            rewrite_request(&mut h, &rw);
            assert_eq!(h.get_all(header::HOST).iter().count(), 1);
            assert_eq!(h[header::HOST], "example.com:8080");
        }
    }

    #[test]
    fn request_rewrite() {
        let via = HeaderValue::from_static("1.1 kalmar");
        let mut h = HeaderMap::new();
        h.insert(header::HOST, HeaderValue::from_static("evil.example"));
        h.insert(header::VIA, HeaderValue::from_static("1.0 other"));
        h.insert("x-forwarded-for", HeaderValue::from_static("10.0.0.1"));
        let rw = RequestRewrite {
            via: Some(&via),
            forwarded_for: ForwardedFor::On,
            client_ip: "127.0.0.2".parse().unwrap(),
            host: "example.com:8080",
            request_id: None,
        };
        rewrite_request(&mut h, &rw);
        assert_eq!(h[header::HOST], "example.com:8080");
        assert_eq!(h[header::VIA], "1.0 other, 1.1 kalmar");
        assert_eq!(h["x-forwarded-for"], "10.0.0.1, 127.0.0.2");

        let rw = RequestRewrite {
            forwarded_for: ForwardedFor::Delete,
            via: None,
            ..rw
        };
        rewrite_request(&mut h, &rw);
        assert!(!h.contains_key("x-forwarded-for"));
    }

    #[test]
    fn response_loses_kalmar_error_from_upstream() {
        let mut h = HeaderMap::new();
        h.insert(ERROR_HEADER, HeaderValue::from_static("forged"));
        rewrite_response(&mut h, None);
        assert!(!h.contains_key(ERROR_HEADER));
    }
}
