//! Cache keys and the request side of cache decisions: the method-independent URL key,
//! `Vary`-selected variant keys, the request as `http-cache-semantics` sees it, the client's
//! own conditional headers, and the RFC 9211 `Cache-Status` value.

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Uri};
use http_cache_semantics::RequestLike;

use super::VarySpec;

/// `Cache-Status` (RFC 9211).
pub const CACHE_STATUS: HeaderName = HeaderName::from_static("cache-status");

/// The cache's name in `Cache-Status`.
const CACHE_NAME: &str = "kalmar";

/// Stored and looked up as a GET: a stored GET response also answers HEAD (RFC 9110 9.3.2).
static GET: Method = Method::GET;

/// A request as `http-cache-semantics` sees it: the canonical URL (the key), GET, and the
/// request headers (without `Host`: the URL already names the authority).
pub struct CacheRequest<'a> {
    pub url: &'a str,
    pub headers: &'a HeaderMap,
}

/// How the response is described in `Cache-Status` when it was not a plain hit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Forward {
    /// No stored response (`fwd=miss`).
    Miss,
    /// A stored response, for other `Vary` values (`fwd=vary-miss`).
    VaryMiss,
    /// A stored response, stale (`fwd=stale`).
    Stale,
    /// A fresh stored response the request's own directives refused (`fwd=request`).
    Request,
    /// Not a request the cache handles: Range, If-Match, ... (`fwd=bypass`).
    Bypass,
    /// A method the cache does not serve (`fwd=method`).
    Method,
}

/// The `Cache-Status` member for one response.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    /// `kalmar; hit`
    Hit,
    /// `kalmar; fwd=<why>[; fwd-status=<n>][; stored][; collapsed]`
    Forwarded {
        fwd: Forward,
        fwd_status: Option<u16>,
        stored: bool,
        collapsed: bool,
    },
}

/// The client's own conditional headers, evaluated by the cache against a stored
/// response (RFC 9110 13.1.2, 13.1.3; If-None-Match wins).
#[derive(Debug, Default)]
pub struct Conditionals {
    if_none_match: Option<HeaderValue>,
    if_modified_since: Option<HeaderValue>,
}

// === impl CacheRequest ===

impl RequestLike for CacheRequest<'_> {
    fn uri(&self) -> Uri {
        self.url.parse().unwrap_or_default()
    }

    fn is_same_uri(&self, other: &Uri) -> bool {
        other == self.url
    }

    fn method(&self) -> &Method {
        &GET
    }

    fn headers(&self) -> &HeaderMap {
        self.headers
    }
}

// === impl Forward ===

impl Forward {
    pub fn as_str(self) -> &'static str {
        match self {
            Forward::Miss => "miss",
            Forward::VaryMiss => "vary-miss",
            Forward::Stale => "stale",
            Forward::Request => "request",
            Forward::Bypass => "bypass",
            Forward::Method => "method",
        }
    }
}

// === impl Status ===

impl Status {
    pub fn forwarded(fwd: Forward) -> Status {
        Status::Forwarded {
            fwd,
            fwd_status: None,
            stored: false,
            collapsed: false,
        }
    }

    pub fn to_header(self) -> HeaderValue {
        match self {
            Status::Hit => HeaderValue::from_static("kalmar; hit"),
            Status::Forwarded {
                fwd,
                fwd_status,
                stored,
                collapsed,
            } => {
                let mut s = format!("{CACHE_NAME}; fwd={}", fwd.as_str());
                if let Some(status) = fwd_status {
                    s.push_str(&format!("; fwd-status={status}"));
                }
                if stored {
                    s.push_str("; stored");
                }
                if collapsed {
                    s.push_str("; collapsed");
                }
                HeaderValue::from_str(&s).unwrap_or_else(|_| HeaderValue::from_static("kalmar"))
            }
        }
    }
}

// === impl Conditionals ===

impl Conditionals {
    /// Move the client's If-None-Match / If-Modified-Since out of `headers`.
    pub fn take(headers: &mut HeaderMap) -> Conditionals {
        Conditionals {
            if_none_match: headers.remove(header::IF_NONE_MATCH),
            if_modified_since: headers.remove(header::IF_MODIFIED_SINCE),
        }
    }

    /// Put them back (the request goes to the origin as the client sent it).
    pub fn restore(&mut self, headers: &mut HeaderMap) {
        if let Some(v) = self.if_none_match.take() {
            headers.insert(header::IF_NONE_MATCH, v);
        }
        if let Some(v) = self.if_modified_since.take() {
            headers.insert(header::IF_MODIFIED_SINCE, v);
        }
    }

    pub fn is_empty(&self) -> bool {
        self.if_none_match.is_none() && self.if_modified_since.is_none()
    }

    /// Whether a stored 2xx response with `headers` answers this request with 304.
    pub fn not_modified(&self, headers: &HeaderMap) -> bool {
        if let Some(inm) = &self.if_none_match {
            let Ok(inm) = inm.to_str() else { return false };
            let Some(etag) = headers.get(header::ETAG).and_then(|v| v.to_str().ok()) else {
                return inm.trim() == "*";
            };
            return inm
                .split(',')
                .map(str::trim)
                .any(|tag| tag == "*" || weak_eq(tag, etag));
        }
        let Some(since) = self
            .if_modified_since
            .as_ref()
            .and_then(|v| v.to_str().ok())
            .and_then(|v| httpdate::parse_http_date(v).ok())
        else {
            return false;
        };
        headers
            .get(header::LAST_MODIFIED)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| httpdate::parse_http_date(v).ok())
            .is_some_and(|modified| modified <= since)
    }
}

/// Weak entity-tag comparison (RFC 9110 8.8.3.2).
fn weak_eq(a: &str, b: &str) -> bool {
    let opaque = |t: &str| t.trim().strip_prefix("W/").unwrap_or(t.trim()).to_owned();
    opaque(a) == opaque(b)
}

/// Requests the cache does not handle and forwards untouched: ranges and the conditionals
/// it does not evaluate.
pub fn bypasses(headers: &HeaderMap) -> bool {
    headers.contains_key(header::RANGE)
        || headers.contains_key(header::IF_MATCH)
        || headers.contains_key(header::IF_UNMODIFIED_SINCE)
        || headers.contains_key(header::IF_RANGE)
}

/// Whether the request's `Cache-Control` carries `directive`.
pub fn request_directive(headers: &HeaderMap, directive: &str) -> bool {
    headers
        .get_all(header::CACHE_CONTROL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|d| d.trim().eq_ignore_ascii_case(directive))
}

/// The response's `Vary` names, lowercased; `Err(())` for `Vary: *` (never served).
#[allow(clippy::result_unit_err)]
pub fn vary_names(headers: &HeaderMap) -> Result<Vec<HeaderName>, ()> {
    let mut names = Vec::new();
    for item in headers
        .get_all(header::VARY)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|s| !s.is_empty())
    {
        if item == "*" {
            return Err(());
        }
        if let Ok(name) = HeaderName::from_bytes(item.to_ascii_lowercase().as_bytes())
            && !names.contains(&name)
        {
            names.push(name);
        }
    }
    names.sort_by(|a, b| a.as_str().cmp(b.as_str()));
    Ok(names)
}

/// The key of the variant of `url` that `headers` select under `spec`.
pub fn variant_key(url: &str, spec: &VarySpec, headers: &HeaderMap) -> String {
    let mut key = format!("{url}\0{}", spec.generation);
    for name in &spec.names {
        key.push('\0');
        key.push_str(name.as_str());
        key.push('=');
        for (i, v) in headers.get_all(name).iter().enumerate() {
            if i > 0 {
                key.push(',');
            }
            key.push_str(&String::from_utf8_lossy(v.as_bytes()));
        }
    }
    key
}

/// The request headers kept with a stored response: those `Vary` names (to match later
/// requests), `Cache-Control`, and `Authorization` as a marker only (RFC 9111 3.5 is
/// decided by its presence; its value is never stored unless `Vary` names it).
pub fn stored_request_headers(headers: &HeaderMap, vary: &[HeaderName]) -> HeaderMap {
    let mut kept = HeaderMap::with_capacity(vary.len() + 2);
    for name in vary {
        for v in headers.get_all(name) {
            kept.append(name.clone(), v.clone());
        }
    }
    if headers.contains_key(header::AUTHORIZATION) && !kept.contains_key(header::AUTHORIZATION) {
        kept.insert(header::AUTHORIZATION, HeaderValue::from_static("[present]"));
    }
    for v in headers.get_all(header::CACHE_CONTROL) {
        kept.append(header::CACHE_CONTROL, v.clone());
    }
    kept
}

/// Approximate bytes of a header block in memory.
pub fn head_size(headers: &HeaderMap) -> usize {
    headers
        .iter()
        .map(|(n, v)| n.as_str().len() + v.len() + 32)
        .sum()
}

/// Whether the response carries a validator (so a stale copy can be revalidated).
pub fn has_validator(headers: &HeaderMap) -> bool {
    headers.contains_key(header::ETAG) || headers.contains_key(header::LAST_MODIFIED)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (n, v) in pairs {
            h.append(
                HeaderName::from_bytes(n.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        h
    }

    #[test]
    fn conditionals_follow_rfc_9110() {
        let stored = headers(&[
            ("etag", "\"v1\""),
            ("last-modified", "Sun, 06 Nov 1994 08:49:37 GMT"),
        ]);
        let cases: &[(&[(&str, &str)], bool)] = &[
            (&[("if-none-match", "\"v1\"")], true),
            (&[("if-none-match", "W/\"v1\"")], true),
            (&[("if-none-match", "\"v0\", \"v1\"")], true),
            (&[("if-none-match", "*")], true),
            (&[("if-none-match", "\"v2\"")], false),
            // If-None-Match wins over If-Modified-Since
            (
                &[
                    ("if-none-match", "\"v2\""),
                    ("if-modified-since", "Sun, 06 Nov 1994 08:49:37 GMT"),
                ],
                false,
            ),
            (
                &[("if-modified-since", "Sun, 06 Nov 1994 08:49:37 GMT")],
                true,
            ),
            (
                &[("if-modified-since", "Sat, 05 Nov 1994 08:49:37 GMT")],
                false,
            ),
            (&[("if-modified-since", "garbage")], false),
            (&[], false),
        ];
        for (request, expected) in cases {
            let mut h = headers(request);
            let cond = Conditionals::take(&mut h);
            assert!(h.is_empty());
            assert_eq!(cond.not_modified(&stored), *expected, "{request:?}");
        }
    }

    #[test]
    fn vary_names_and_variant_keys() {
        assert_eq!(vary_names(&headers(&[("vary", "*")])), Err(()));
        let names = vary_names(&headers(&[
            ("vary", "Accept-Language, accept"),
            ("vary", "X-A"),
        ]))
        .unwrap();
        let names: Vec<&str> = names.iter().map(|n| n.as_str()).collect();
        assert_eq!(names, ["accept", "accept-language", "x-a"]);

        let spec = VarySpec {
            generation: 7,
            names: vec![HeaderName::from_static("accept-language")],
        };
        let de = variant_key("http://a/b", &spec, &headers(&[("accept-language", "de")]));
        let none = variant_key("http://a/b", &spec, &HeaderMap::new());
        assert_eq!(de, "http://a/b\u{0}7\u{0}accept-language=de");
        assert_ne!(de, none);
    }

    #[test]
    fn stored_request_keeps_only_what_matching_needs() {
        let h = headers(&[
            ("authorization", "Bearer secret"),
            ("cookie", "session=1"),
            ("accept-language", "de"),
            ("cache-control", "max-age=5"),
        ]);
        let kept = stored_request_headers(&h, &[HeaderName::from_static("accept-language")]);
        assert_eq!(kept["authorization"], "[present]");
        assert_eq!(kept["accept-language"], "de");
        assert!(!kept.contains_key("cookie"));
        assert_eq!(kept.len(), 3);
    }

    #[test]
    fn cache_status_values() {
        assert_eq!(Status::Hit.to_header(), "kalmar; hit");
        let s = Status::Forwarded {
            fwd: Forward::Stale,
            fwd_status: Some(304),
            stored: true,
            collapsed: false,
        };
        assert_eq!(s.to_header(), "kalmar; fwd=stale; fwd-status=304; stored");
        assert_eq!(
            Status::forwarded(Forward::Method).to_header(),
            "kalmar; fwd=method"
        );
    }
}
