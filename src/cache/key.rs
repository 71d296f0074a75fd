//! Cache keys and the request side of cache decisions: the method-independent URL key,
//! `Vary`-selected variant keys, the client's own conditional headers, and the RFC 9211
//! `Cache-Status` value.

use http::header::{self, HeaderMap, HeaderName, HeaderValue};

use super::VarySpec;
use super::policy::{http_date, weak_eq};

/// `Cache-Status` (RFC 9211).
pub const CACHE_STATUS: HeaderName = HeaderName::from_static("cache-status");

/// The cache's name in `Cache-Status`.
const CACHE_NAME: &str = "kalmar";

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

/// Why a stale stored response was served without validation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StaleWhy {
    /// Within `stale-while-revalidate`: `kalmar; hit; detail=stale-while-revalidate`.
    WhileRevalidate,
    /// The origin answered 5xx within `stale-if-error`:
    /// `kalmar; fwd=stale; fwd-status=<n>; detail=stale-if-error`.
    OriginError(u16),
    /// The origin could not be reached: `kalmar; fwd=stale; detail=origin-unreachable`.
    Unreachable,
}

/// The `Cache-Status` member for one response.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    /// `kalmar; hit`
    Hit,
    /// A stale stored response served as it is.
    Stale(StaleWhy),
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
            Status::Stale(StaleWhy::WhileRevalidate) => {
                HeaderValue::from_static("kalmar; hit; detail=stale-while-revalidate")
            }
            Status::Stale(StaleWhy::OriginError(status)) => HeaderValue::from_str(&format!(
                "{CACHE_NAME}; fwd=stale; fwd-status={status}; detail=stale-if-error"
            ))
            .unwrap_or_else(|_| HeaderValue::from_static("kalmar")),
            Status::Stale(StaleWhy::Unreachable) => {
                HeaderValue::from_static("kalmar; fwd=stale; detail=origin-unreachable")
            }
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

    /// Whether a stored 2xx response with `headers` answers this request with 304
    /// (If-None-Match by weak comparison; If-Modified-Since against Last-Modified, or the
    /// Date when there is none, RFC 9111 4.3.2).
    pub fn not_modified(&self, headers: &HeaderMap) -> bool {
        if let Some(inm) = &self.if_none_match {
            let Ok(inm) = inm.to_str() else { return false };
            let Some(etag) = headers.get(header::ETAG) else {
                return inm.trim() == "*";
            };
            return inm
                .split(',')
                .map(str::trim)
                .any(|tag| tag == "*" || weak_eq(tag.as_bytes(), etag.as_bytes()));
        }
        let Some(since) = self.if_modified_since.as_ref().and_then(http_date) else {
            return false;
        };
        headers
            .get(header::LAST_MODIFIED)
            .or_else(|| headers.get(header::DATE))
            .and_then(http_date)
            .is_some_and(|modified| modified <= since)
    }
}

/// Requests the cache does not handle and forwards untouched: the conditionals it does not
/// evaluate (a `Range` is answered from a fresh stored response, else forwarded too).
pub fn bypasses(headers: &HeaderMap) -> bool {
    headers.contains_key(header::IF_MATCH) || headers.contains_key(header::IF_UNMODIFIED_SINCE)
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

/// The request headers kept with a stored response: only those its `Vary` names (the key
/// already selects by them; cookies and credentials are never stored unless `Vary` names
/// them).
pub fn stored_request_headers(headers: &HeaderMap, vary: &[HeaderName]) -> HeaderMap {
    let mut kept = HeaderMap::with_capacity(vary.len());
    for name in vary {
        for v in headers.get_all(name) {
            kept.append(name.clone(), v.clone());
        }
    }
    kept
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::cache::test_headers as headers;

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
            (&[("if-none-match", "W/\"v1\", \"x\"")], true),
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
        assert_eq!(kept["accept-language"], "de");
        assert!(!kept.contains_key("cookie") && !kept.contains_key("authorization"));
        assert_eq!(kept.len(), 1);
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
