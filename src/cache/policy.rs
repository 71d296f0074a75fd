//! The RFC 9111 rules for one stored response, as a shared cache: whether a response may be
//! stored (section 3), its age and freshness lifetime (4.2), whether a stored response
//! answers a request as it is, after validation, or stale (4, 4.2.4, RFC 5861), the
//! validation request (4.3.1), and how a 304 or a HEAD response updates it (3.2, 4.3.4,
//! 4.3.5). Directive names are case-insensitive; dates are HTTP-dates in any of the three
//! formats of RFC 9110 5.6.7, anything else is invalid.
//!
//! ```text
//! current_age = max(response_time - Date, Age + response_time - request_time) + (now - response_time)
//! lifetime    = s-maxage | max-age | Expires - Date | 10% of (Date - Last-Modified) (heuristic)
//! ```

use std::time::{Duration, SystemTime};

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, StatusCode};
use serde::{Deserialize, Serialize};

/// `Cache-Control` directives of one message: names lower-cased, values unquoted, in order.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Directives(Vec<(String, Option<String>)>);

/// Delta-seconds beyond what a cache can represent count as this (RFC 9111 1.2.2).
const DELTA_MAX: u64 = 1 << 31;

/// Status codes whose responses are heuristically cacheable (RFC 9110 15.1).
const HEURISTIC_STATUSES: &[u16] = &[200, 203, 204, 300, 301, 308, 404, 405, 410, 414, 501];

/// Status codes whose caching rules Kalmar implements (for `must-understand`, RFC 9111 5.2.2.3).
const UNDERSTOOD_STATUSES: &[u16] = &[
    200, 203, 204, 300, 301, 302, 303, 307, 308, 404, 405, 410, 414, 501,
];

/// Hop-by-hop fields, never stored nor taken from a 304 (RFC 9110 7.6.1, RFC 9111 3.1).
const HOP_BY_HOP: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

/// One stored response's head and timing, with the request headers that matter for reuse.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Policy {
    #[serde(with = "status_serde")]
    status: StatusCode,
    /// Every field the origin sent except hop-by-hop ones; `Date` added when missing.
    #[serde(with = "headers_serde")]
    headers: HeaderMap,
    /// The request fields the response's `Vary` names (and an `Authorization` marker).
    #[serde(with = "headers_serde")]
    request: HeaderMap,
    request_time: SystemTime,
    response_time: SystemTime,
}

/// What a stored response can do for a request (RFC 9111 4).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reuse {
    /// Fresh (or stale as the client's `max-stale` allows): serve it.
    Fresh,
    /// Stale within `stale-while-revalidate`: serve it, revalidate in the background.
    StaleWhileRevalidate,
    /// Must be validated with the origin first; `why` says what asked for it.
    Validate(ValidateWhy),
}

/// Why a stored response must be validated before use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ValidateWhy {
    /// It is stale.
    Stale,
    /// It is fresh, but the request (`no-cache`, `max-age`, `min-fresh`) or the response
    /// (`no-cache`) asks for validation.
    Asked,
}

// === impl Directives ===

impl Directives {
    /// The directives of every `Cache-Control` line of `headers`.
    pub fn of(headers: &HeaderMap) -> Directives {
        let mut out = Vec::new();
        for value in headers.get_all(header::CACHE_CONTROL) {
            let Ok(value) = value.to_str() else { continue };
            for item in split_list(value) {
                let (name, val) = match item.split_once('=') {
                    Some((n, v)) => (n, Some(unquote(v.trim()))),
                    None => (item, None),
                };
                let name = name.trim();
                if !name.is_empty() {
                    out.push((name.to_ascii_lowercase(), val));
                }
            }
        }
        Directives(out)
    }

    pub fn has(&self, name: &str) -> bool {
        self.0.iter().any(|(n, _)| n == name)
    }

    /// The first occurrence's argument.
    pub fn value(&self, name: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(n, _)| n == name)
            .and_then(|(_, v)| v.as_deref())
    }

    /// The first occurrence's delta-seconds: None when absent, `Some(None)` when invalid.
    pub fn seconds(&self, name: &str) -> Option<Option<u64>> {
        let (_, value) = self.0.iter().find(|(n, _)| n == name)?;
        Some(value.as_deref().and_then(delta_seconds))
    }

    /// The field names a qualified directive (`no-cache="a, b"`) lists, lower-cased.
    fn field_names(&self, name: &str) -> Vec<String> {
        self.value(name)
            .map(|v| {
                v.split(',')
                    .map(|n| n.trim().to_ascii_lowercase())
                    .filter(|n| !n.is_empty())
                    .collect()
            })
            .unwrap_or_default()
    }
}

/// Split a list field on the commas outside quoted strings (RFC 9110 5.6.1).
fn split_list(value: &str) -> impl Iterator<Item = &str> {
    let mut items = Vec::new();
    let (mut start, mut quoted, mut escaped) = (0, false, false);
    for (i, c) in value.char_indices() {
        match c {
            _ if escaped => escaped = false,
            '\\' if quoted => escaped = true,
            '"' => quoted = !quoted,
            ',' if !quoted => {
                items.push(&value[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    items.push(&value[start..]);
    items.into_iter().map(str::trim).filter(|s| !s.is_empty())
}

fn unquote(v: &str) -> String {
    match v.strip_prefix('"').and_then(|v| v.strip_suffix('"')) {
        Some(inner) => {
            let mut out = String::with_capacity(inner.len());
            let mut chars = inner.chars();
            while let Some(c) = chars.next() {
                if c == '\\' {
                    if let Some(next) = chars.next() {
                        out.push(next);
                    }
                } else {
                    out.push(c);
                }
            }
            out
        }
        None => v.to_owned(),
    }
}

/// `1*DIGIT`, saturating at 2^31 (RFC 9111 1.2.2); anything else is invalid.
fn delta_seconds(v: &str) -> Option<u64> {
    if v.is_empty() || !v.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some(v.parse::<u64>().unwrap_or(DELTA_MAX).min(DELTA_MAX))
}

/// An HTTP-date (IMF-fixdate, RFC 850 or asctime); None for anything else. Names in the
/// wrong case (`thu`, `AUG`, `gmt`) are accepted, as most caches do; the layout is not
/// relaxed (two spaces where one belongs make it invalid).
pub fn http_date(v: &HeaderValue) -> Option<SystemTime> {
    let v = v.to_str().ok()?.trim();
    httpdate::parse_http_date(v).ok().or_else(|| {
        let mut canonical = String::with_capacity(v.len());
        let mut word_start = true;
        for c in v.chars() {
            if c.is_ascii_alphabetic() {
                canonical.push(if word_start {
                    c.to_ascii_uppercase()
                } else {
                    c.to_ascii_lowercase()
                });
                word_start = false;
            } else {
                canonical.push(c);
                word_start = true;
            }
        }
        let canonical = canonical.replace("Gmt", "GMT");
        (canonical != v)
            .then(|| httpdate::parse_http_date(&canonical).ok())
            .flatten()
    })
}

/// The single value of a field that must appear once; None when absent or repeated.
fn single<'a>(headers: &'a HeaderMap, name: &HeaderName) -> Option<&'a HeaderValue> {
    let mut all = headers.get_all(name).iter();
    let first = all.next()?;
    all.next().is_none().then_some(first)
}

/// Whether `headers` carry a hop-by-hop field or one the `Connection` header names.
fn is_hop_by_hop(name: &HeaderName, connection: &[String]) -> bool {
    HOP_BY_HOP.contains(&name.as_str()) || connection.iter().any(|c| c == name.as_str())
}

fn connection_names(headers: &HeaderMap) -> Vec<String> {
    headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|n| n.trim().to_ascii_lowercase())
        .filter(|n| !n.is_empty())
        .collect()
}

/// `headers` without hop-by-hop fields.
fn end_to_end(headers: &HeaderMap) -> HeaderMap {
    let connection = connection_names(headers);
    let mut out = HeaderMap::with_capacity(headers.len());
    for (name, value) in headers {
        if !is_hop_by_hop(name, &connection) {
            out.append(name.clone(), value.clone());
        }
    }
    out
}

/// Whether a response to a request with `request` headers may be stored (RFC 9111 3):
/// a GET, a final status other than 206/304, no `no-store` (unless `must-understand` with
/// a status Kalmar understands), not `private`, `Authorization` only with `public`,
/// `s-maxage` or `must-revalidate`, and explicit freshness, `public` or a heuristically
/// cacheable status.
pub fn storable(
    method: &Method,
    request: &HeaderMap,
    status: StatusCode,
    response: &HeaderMap,
) -> bool {
    if method != Method::GET
        || status.is_informational()
        || status == StatusCode::PARTIAL_CONTENT
        || status == StatusCode::NOT_MODIFIED
    {
        return false;
    }
    let req = Directives::of(request);
    let res = Directives::of(response);
    if req.has("no-store") {
        return false;
    }
    let understood = UNDERSTOOD_STATUSES.contains(&status.as_u16());
    if res.has("must-understand") {
        if !understood {
            return false;
        }
    } else if res.has("no-store") {
        return false;
    }
    if res.has("private") {
        return false;
    }
    if request.contains_key(header::AUTHORIZATION)
        && !(res.has("public") || res.has("s-maxage") || res.has("must-revalidate"))
    {
        return false;
    }
    res.has("public")
        || res.has("max-age")
        || res.has("s-maxage")
        || response.contains_key(header::EXPIRES)
        || HEURISTIC_STATUSES.contains(&status.as_u16())
}

// === impl Policy ===

impl Policy {
    /// The policy of a response received at `response_time` for a request sent at
    /// `request_time`; `request` are the request headers kept with it.
    pub fn new(
        status: StatusCode,
        response: &HeaderMap,
        request: HeaderMap,
        request_time: SystemTime,
        response_time: SystemTime,
    ) -> Policy {
        let mut headers = end_to_end(response);
        if single(&headers, &header::DATE)
            .and_then(http_date)
            .is_none()
        {
            // RFC 9110 6.6.1: a recipient records when a message without a Date arrived.
            headers.insert(header::DATE, date_value(response_time));
        }
        Policy {
            status,
            headers,
            request,
            request_time: request_time.min(response_time),
            response_time,
        }
    }

    pub fn status(&self) -> StatusCode {
        self.status
    }

    /// The stored response header fields.
    pub fn headers(&self) -> &HeaderMap {
        &self.headers
    }

    /// The stored request header fields (for `Vary` matching).
    pub fn request_headers(&self) -> &HeaderMap {
        &self.request
    }

    fn date(&self) -> SystemTime {
        single(&self.headers, &header::DATE)
            .and_then(http_date)
            .unwrap_or(self.response_time)
    }

    /// `Age` as received: the first member of a list, ignored when not a number (RFC 9111 5.1).
    fn age_value(&self) -> Duration {
        let secs = self
            .headers
            .get_all(header::AGE)
            .iter()
            .next()
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split(',').next())
            .and_then(|v| delta_seconds(v.trim()))
            .unwrap_or(0);
        Duration::from_secs(secs)
    }

    /// The current age (RFC 9111 4.2.3).
    pub fn age(&self, now: SystemTime) -> Duration {
        let apparent = self
            .response_time
            .duration_since(self.date())
            .unwrap_or_default();
        let delay = self
            .response_time
            .duration_since(self.request_time)
            .unwrap_or_default();
        let initial = apparent.max(self.age_value() + delay);
        initial + now.duration_since(self.response_time).unwrap_or_default()
    }

    /// The freshness lifetime (RFC 9111 4.2.1, 4.2.2); invalid values give zero (stale).
    pub fn lifetime(&self, heuristic_fraction: f32) -> Duration {
        let cc = Directives::of(&self.headers);
        if let Some(s) = cc.seconds("s-maxage").or_else(|| cc.seconds("max-age")) {
            return Duration::from_secs(s.unwrap_or(0));
        }
        if self.headers.contains_key(header::EXPIRES) {
            // Invalid or repeated Expires: already expired (RFC 9111 5.3).
            return single(&self.headers, &header::EXPIRES)
                .and_then(http_date)
                .and_then(|expires| expires.duration_since(self.date()).ok())
                .unwrap_or_default();
        }
        let heuristic = HEURISTIC_STATUSES.contains(&self.status.as_u16()) || cc.has("public");
        if !heuristic {
            return Duration::ZERO;
        }
        single(&self.headers, &header::LAST_MODIFIED)
            .and_then(http_date)
            .and_then(|lm| self.date().duration_since(lm).ok())
            .map(|since| since.mul_f32(heuristic_fraction))
            .unwrap_or_default()
    }

    /// Time left before it turns stale.
    pub fn time_to_live(&self, now: SystemTime, heuristic_fraction: f32) -> Duration {
        self.lifetime(heuristic_fraction)
            .saturating_sub(self.age(now))
    }

    /// Whether it has a validator a conditional request can use.
    pub fn has_validator(&self) -> bool {
        self.headers.contains_key(header::ETAG) || self.headers.contains_key(header::LAST_MODIFIED)
    }

    /// Stale responses may never be served (`must-revalidate`, `proxy-revalidate`,
    /// `s-maxage`, `no-cache`: RFC 9111 5.2.2.2, 5.2.2.8, 5.2.2.10, 5.2.2.4).
    fn forbids_stale(cc: &Directives) -> bool {
        ["must-revalidate", "proxy-revalidate", "s-maxage"]
            .iter()
            .any(|d| cc.has(d))
            || (cc.has("no-cache") && cc.value("no-cache").is_none())
    }

    /// What this stored response can do for a request with `request` headers at `now`.
    pub fn reuse(&self, request: &HeaderMap, now: SystemTime, heuristic_fraction: f32) -> Reuse {
        let req = Directives::of(request);
        let res = Directives::of(&self.headers);
        let pragma_no_cache = !request.contains_key(header::CACHE_CONTROL)
            && request
                .get_all(header::PRAGMA)
                .iter()
                .filter_map(|v| v.to_str().ok())
                .any(|v| v.to_ascii_lowercase().contains("no-cache"));
        let age = self.age(now);
        let lifetime = self.lifetime(heuristic_fraction);
        let asked = req.has("no-cache")
            || pragma_no_cache
            || (res.has("no-cache") && res.value("no-cache").is_none())
            || req
                .seconds("max-age")
                .is_some_and(|max| max.is_none_or(|max| age > Duration::from_secs(max)))
            || req.seconds("min-fresh").is_some_and(|min| {
                lifetime.saturating_sub(age) < Duration::from_secs(min.unwrap_or(0))
            });
        if lifetime > age {
            return if asked {
                Reuse::Validate(ValidateWhy::Asked)
            } else {
                Reuse::Fresh
            };
        }
        if asked || Self::forbids_stale(&res) {
            return Reuse::Validate(ValidateWhy::Stale);
        }
        let staleness = age - lifetime;
        if let Some(max_stale) = req.seconds("max-stale") {
            // A bare max-stale accepts any staleness.
            let within = match (max_stale, req.value("max-stale")) {
                (Some(max), _) => staleness <= Duration::from_secs(max),
                (None, None) => true,
                (None, Some(_)) => false,
            };
            if within {
                return Reuse::Fresh;
            }
        }
        if res
            .seconds("stale-while-revalidate")
            .flatten()
            .is_some_and(|window| staleness <= Duration::from_secs(window))
        {
            return Reuse::StaleWhileRevalidate;
        }
        Reuse::Validate(ValidateWhy::Stale)
    }

    /// Whether a stale copy may answer when the origin failed (`status` None: no response
    /// at all, i.e. disconnected, RFC 9111 4.2.4) or answered with a 5xx within the
    /// response's or the request's `stale-if-error` window (RFC 5861 4).
    pub fn serve_stale_on_error(
        &self,
        request: &HeaderMap,
        status: Option<StatusCode>,
        now: SystemTime,
        heuristic_fraction: f32,
    ) -> bool {
        let res = Directives::of(&self.headers);
        if Self::forbids_stale(&res) {
            return false;
        }
        let req = Directives::of(request);
        let staleness = self
            .age(now)
            .saturating_sub(self.lifetime(heuristic_fraction));
        let window = [&req, &res]
            .iter()
            .filter_map(|cc| cc.seconds("stale-if-error").flatten())
            .max();
        let within = window.is_some_and(|w| staleness <= Duration::from_secs(w));
        match status {
            None => within || window.is_none(),
            Some(status) => status.is_server_error() && within,
        }
    }

    /// The validators for a conditional request about this response (RFC 9111 4.3.1).
    pub fn validators(&self) -> HeaderMap {
        let mut out = HeaderMap::new();
        if let Some(etag) = self.headers.get(header::ETAG) {
            out.insert(header::IF_NONE_MATCH, etag.clone());
        }
        if let Some(lm) = single(&self.headers, &header::LAST_MODIFIED) {
            out.insert(header::IF_MODIFIED_SINCE, lm.clone());
        }
        out
    }

    /// The stored header fields as served: qualified `no-cache="..."` fields left out
    /// (RFC 9111 5.2.2.4), `Age` set to the current age.
    pub fn served_headers(&self, now: SystemTime) -> HeaderMap {
        let mut headers = self.headers.clone();
        for name in Directives::of(&self.headers).field_names("no-cache") {
            headers.remove(name.as_str());
        }
        headers.insert(header::AGE, HeaderValue::from(self.age(now).as_secs()));
        headers
    }

    /// The stored response updated by a 304 received at `response_time` for a validation
    /// sent at `request_time` (RFC 9111 4.3.4, 3.2). Kalmar keeps one response per key and
    /// the 304 answers the conditional request it made for that very response, so the 304
    /// selects it even when it carries no validator (Python's http.server) or a new one
    /// (as in Squid, Traffic Server and Varnish); the new validator is stored with it.
    pub fn not_modified(
        &self,
        response: &HeaderMap,
        request_time: SystemTime,
        response_time: SystemTime,
    ) -> Policy {
        self.updated(response, request_time, response_time)
    }

    /// A stored GET response refreshed by a 200 answer to HEAD, or None when that answer
    /// shows it changed (RFC 9111 4.3.5): differing validators or Content-Length.
    pub fn head_update(
        &self,
        response: &HeaderMap,
        request_time: SystemTime,
        response_time: SystemTime,
    ) -> Option<Policy> {
        for name in [header::ETAG, header::LAST_MODIFIED, header::CONTENT_LENGTH] {
            if let Some(new) = response.get(&name)
                && self.headers.get(&name) != Some(new)
            {
                return None;
            }
        }
        Some(self.updated(response, request_time, response_time))
    }

    /// The stored fields replaced by those of `response` (RFC 9111 3.2), except
    /// hop-by-hop ones and Content-Length; its timing is the new exchange's.
    fn updated(
        &self,
        response: &HeaderMap,
        request_time: SystemTime,
        response_time: SystemTime,
    ) -> Policy {
        let fresh = end_to_end(response);
        let mut headers = self.headers.clone();
        for name in fresh.keys() {
            if *name != header::CONTENT_LENGTH {
                headers.remove(name);
            }
        }
        for (name, value) in &fresh {
            if *name != header::CONTENT_LENGTH {
                headers.append(name.clone(), value.clone());
            }
        }
        // Age and Date describe the new exchange: a 304 without them leaves none of the old.
        if !fresh.contains_key(header::AGE) {
            headers.remove(header::AGE);
        }
        if !fresh.contains_key(header::DATE) {
            headers.insert(header::DATE, date_value(response_time));
        }
        Policy {
            status: self.status,
            headers,
            request: self.request.clone(),
            request_time: request_time.min(response_time),
            response_time,
        }
    }

    /// Approximate bytes of the stored heads.
    pub fn head_size(&self) -> usize {
        [&self.headers, &self.request]
            .iter()
            .flat_map(|h| h.iter())
            .map(|(n, v)| n.as_str().len() + v.len() + 32)
            .sum()
    }
}

/// `Date` for `t`, as an IMF-fixdate.
fn date_value(t: SystemTime) -> HeaderValue {
    HeaderValue::from_str(&httpdate::fmt_http_date(t)).unwrap_or(HeaderValue::from_static(""))
}

/// Weak entity-tag comparison (RFC 9110 8.8.3.2).
pub fn weak_eq(a: &[u8], b: &[u8]) -> bool {
    let opaque = |t: &[u8]| t.strip_prefix(b"W/").unwrap_or(t).to_vec();
    opaque(a.trim_ascii()) == opaque(b.trim_ascii())
}

mod status_serde {
    use http::StatusCode;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(status: &StatusCode, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u16(status.as_u16())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<StatusCode, D::Error> {
        StatusCode::from_u16(u16::deserialize(d)?).map_err(serde::de::Error::custom)
    }
}

/// A header map as a list of `[name, value bytes]` pairs (values need not be UTF-8).
mod headers_serde {
    use http::{HeaderMap, HeaderName, HeaderValue};
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(headers: &HeaderMap, s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(headers.iter().map(|(n, v)| (n.as_str(), v.as_bytes())))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<HeaderMap, D::Error> {
        let pairs = Vec::<(String, Vec<u8>)>::deserialize(d)?;
        let mut headers = HeaderMap::with_capacity(pairs.len());
        for (name, value) in pairs {
            let name = HeaderName::from_bytes(name.as_bytes()).map_err(serde::de::Error::custom)?;
            let value = HeaderValue::from_bytes(&value).map_err(serde::de::Error::custom)?;
            headers.append(name, value);
        }
        Ok(headers)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::cache::test_headers as headers;

    fn at(secs: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000 + secs)
    }

    fn date(secs: u64) -> String {
        httpdate::fmt_http_date(at(secs))
    }

    fn policy(pairs: &[(&str, &str)]) -> Policy {
        Policy::new(
            StatusCode::OK,
            &headers(pairs),
            HeaderMap::new(),
            at(0),
            at(0),
        )
    }

    #[test]
    fn directives_are_case_insensitive_and_quoted_strings_opaque() {
        let cc = Directives::of(&headers(&[
            (
                "cache-control",
                "Max-Age=60, extension=\"max-age=3600, no-store\"",
            ),
            ("cache-control", "NO-CACHE=\"Set-Cookie, a\", max-age=\"5\""),
        ]));
        assert_eq!(cc.seconds("max-age"), Some(Some(60)));
        assert!(!cc.has("no-store"));
        assert_eq!(cc.field_names("no-cache"), ["set-cookie", "a"]);
        for bad in ["1.5", "a100", "100a", "", "-1"] {
            assert_eq!(delta_seconds(bad), None, "{bad}");
        }
        assert_eq!(delta_seconds("99999999999999999999"), Some(DELTA_MAX));
    }

    #[test]
    fn freshness_lifetime_follows_rfc_9111() {
        let d = date(1000);
        let (lm, later) = (date(0), date(1100));
        let cases: &[(&[(&str, &str)], u64)] = &[
            (&[("cache-control", "max-age=60")], 60),
            (&[("cache-control", "MAX-AGE=60")], 60),
            (&[("cache-control", "max-age=60, s-maxage=5")], 5),
            (&[("cache-control", "max-age=abc")], 0),
            (&[("date", &d), ("expires", &later)], 100),
            (&[("date", &d), ("expires", &later), ("expires", &later)], 0),
            (&[("date", &d), ("expires", "0")], 0),
            // names in the wrong case are still the date
            (
                &[("date", &d), ("expires", "tue, 14 NOV 2023 22:31:40 gmt")],
                100,
            ),
            // two spaces: not an HTTP-date, so already expired
            (
                &[("date", &d), ("expires", "Thu, 18  Aug  2050 02:01:18 GMT")],
                0,
            ),
            // heuristic: 10% of the time since Last-Modified
            (&[("date", &d), ("last-modified", &lm)], 100),
        ];
        for (pairs, secs) in cases {
            assert_eq!(policy(pairs).lifetime(0.1).as_secs(), *secs, "{pairs:?}");
        }
        // RFC 850 and asctime are valid HTTP-dates too.
        let rfc850 = "Tuesday, 14-Nov-23 22:31:40 GMT";
        let asctime = "Tue Nov 14 22:31:40 2023";
        assert_eq!(
            httpdate::fmt_http_date(at(1100)),
            "Tue, 14 Nov 2023 22:31:40 GMT"
        );
        for expires in [rfc850, asctime] {
            assert_eq!(
                policy(&[("date", &d), ("expires", expires)])
                    .lifetime(0.1)
                    .as_secs(),
                100,
                "{expires}"
            );
        }
        // heuristic only for statuses that allow it, or with `public`
        let gone = |cc: &str| {
            Policy::new(
                StatusCode::from_u16(599).unwrap(),
                &headers(&[("date", &d), ("last-modified", &lm), ("cache-control", cc)]),
                HeaderMap::new(),
                at(1000),
                at(1000),
            )
            .lifetime(0.1)
            .as_secs()
        };
        assert_eq!((gone("x"), gone("public")), (0, 100));
    }

    #[test]
    fn age_is_the_first_member_and_ignored_when_invalid() {
        let d = date(0);
        assert_eq!(
            policy(&[("date", &d), ("age", "7200, 0")])
                .age(at(0))
                .as_secs(),
            7200
        );
        assert_eq!(
            policy(&[("date", &d), ("age", "7200;foo=bar")])
                .age(at(10))
                .as_secs(),
            10
        );
        assert_eq!(
            policy(&[("date", &d), ("age", "-5")]).age(at(0)).as_secs(),
            0
        );
        // apparent age from an old Date
        assert_eq!(policy(&[("date", &date(0))]).age(at(0)), Duration::ZERO);
        let old = Policy::new(
            StatusCode::OK,
            &headers(&[("date", &d)]),
            HeaderMap::new(),
            at(50),
            at(50),
        );
        assert_eq!(old.age(at(60)).as_secs(), 60);
    }

    #[test]
    fn storable_responses() {
        let get = Method::GET;
        let none = HeaderMap::new();
        let auth = headers(&[("authorization", "Basic x")]);
        type Case<'a> = (&'a HeaderMap, u16, &'a [(&'a str, &'a str)], bool);
        let cases: &[Case] = &[
            (&none, 200, &[], true),
            (&none, 200, &[("cache-control", "No-Store")], false),
            (&none, 200, &[("cache-control", "private")], false),
            (
                &none,
                200,
                &[("cache-control", "max-age=60, no-store, must-understand")],
                true,
            ),
            (
                &none,
                599,
                &[("cache-control", "max-age=60, no-store, must-understand")],
                false,
            ),
            (&none, 500, &[("cache-control", "max-age=60")], true),
            (
                &none,
                500,
                &[("last-modified", "Sun, 06 Nov 1994 08:49:37 GMT")],
                false,
            ),
            (&none, 206, &[("cache-control", "max-age=60")], false),
            (&auth, 200, &[("cache-control", "max-age=60")], false),
            (&auth, 200, &[("cache-control", "max-age=60, public")], true),
            (
                &none,
                200,
                &[("set-cookie", "a=b"), ("cache-control", "max-age=60")],
                true,
            ),
        ];
        for (req, status, res, expected) in cases {
            let status = StatusCode::from_u16(*status).unwrap();
            assert_eq!(
                storable(&get, req, status, &headers(res)),
                *expected,
                "{status} {res:?}"
            );
        }
        assert!(!storable(
            &Method::HEAD,
            &none,
            StatusCode::OK,
            &HeaderMap::new()
        ));
    }

    #[test]
    fn reuse_decisions() {
        let d = date(0);
        let p = |cc: &str| policy(&[("date", &d), ("cache-control", cc), ("etag", "\"a\"")]);
        let req = |cc: &str| headers(&[("cache-control", cc)]);
        let none = HeaderMap::new();
        assert_eq!(p("max-age=60").reuse(&none, at(10), 0.1), Reuse::Fresh);
        assert_eq!(
            p("max-age=60").reuse(&none, at(61), 0.1),
            Reuse::Validate(ValidateWhy::Stale)
        );
        assert_eq!(
            p("max-age=60, No-Cache").reuse(&none, at(1), 0.1),
            Reuse::Validate(ValidateWhy::Asked)
        );
        assert_eq!(
            p("no-cache").reuse(&none, at(1), 0.1),
            Reuse::Validate(ValidateWhy::Stale)
        );
        assert_eq!(
            p("max-age=60").reuse(&req("no-cache"), at(1), 0.1),
            Reuse::Validate(ValidateWhy::Asked)
        );
        assert_eq!(
            p("max-age=60").reuse(&req("max-age=5"), at(10), 0.1),
            Reuse::Validate(ValidateWhy::Asked)
        );
        assert_eq!(
            p("max-age=60").reuse(&req("min-fresh=55"), at(10), 0.1),
            Reuse::Validate(ValidateWhy::Asked)
        );
        assert_eq!(
            p("max-age=60").reuse(&req("max-stale"), at(100), 0.1),
            Reuse::Fresh
        );
        assert_eq!(
            p("max-age=60").reuse(&req("max-stale=10"), at(100), 0.1),
            Reuse::Validate(ValidateWhy::Stale)
        );
        assert_eq!(
            p("max-age=60, must-revalidate").reuse(&req("max-stale"), at(100), 0.1),
            Reuse::Validate(ValidateWhy::Stale)
        );
        assert_eq!(
            p("max-age=1, stale-while-revalidate=10").reuse(&none, at(5), 0.1),
            Reuse::StaleWhileRevalidate
        );
        assert_eq!(
            p("max-age=1, stale-while-revalidate=10").reuse(&none, at(20), 0.1),
            Reuse::Validate(ValidateWhy::Stale)
        );
        // pragma counts only without Cache-Control in the request
        let pragma = headers(&[("pragma", "no-cache")]);
        assert_eq!(
            p("max-age=60").reuse(&pragma, at(1), 0.1),
            Reuse::Validate(ValidateWhy::Asked)
        );
    }

    #[test]
    fn stale_on_error() {
        let d = date(0);
        let p = |cc: &str| policy(&[("date", &d), ("cache-control", cc)]);
        let none = HeaderMap::new();
        let s503 = Some(StatusCode::SERVICE_UNAVAILABLE);
        assert!(p("max-age=2").serve_stale_on_error(&none, None, at(5), 0.1));
        assert!(!p("max-age=2").serve_stale_on_error(&none, s503, at(5), 0.1));
        assert!(p("max-age=2, stale-if-error=60").serve_stale_on_error(&none, s503, at(5), 0.1));
        assert!(!p("max-age=2, stale-if-error=1").serve_stale_on_error(&none, s503, at(5), 0.1));
        assert!(!p("max-age=2, stale-if-error=1").serve_stale_on_error(&none, None, at(5), 0.1));
        assert!(!p("max-age=2, stale-if-error=60").serve_stale_on_error(
            &none,
            Some(StatusCode::NOT_FOUND),
            at(5),
            0.1
        ));
        for cc in [
            "max-age=2, must-revalidate",
            "max-age=2, proxy-revalidate",
            "max-age=2, no-cache",
            "s-maxage=2",
        ] {
            assert!(!p(cc).serve_stale_on_error(&none, None, at(5), 0.1), "{cc}");
        }
        let asks = headers(&[("cache-control", "stale-if-error=60")]);
        assert!(p("max-age=2").serve_stale_on_error(&asks, s503, at(5), 0.1));
    }

    #[test]
    fn not_modified_updates_the_stored_head() {
        let stored = Policy::new(
            StatusCode::OK,
            &headers(&[
                ("date", &date(0)),
                ("etag", "\"v1\""),
                ("cache-control", "max-age=1"),
                ("content-length", "5"),
                ("x-a", "1"),
                ("age", "30"),
            ]),
            HeaderMap::new(),
            at(0),
            at(0),
        );
        let p = stored.not_modified(
            &headers(&[
                ("date", &date(100)),
                ("etag", "\"v2\""),
                ("cache-control", "max-age=60"),
                ("x-a", "2"),
                ("content-length", "0"),
                ("connection", "x-b"),
                ("x-b", "hop"),
            ]),
            at(100),
            at(100),
        );
        assert_eq!(p.headers()["x-a"], "2");
        assert_eq!(p.headers()["etag"], "\"v2\"");
        assert_eq!(p.headers()["content-length"], "5");
        assert!(!p.headers().contains_key("x-b") && !p.headers().contains_key("age"));
        assert_eq!(p.reuse(&HeaderMap::new(), at(110), 0.1), Reuse::Fresh);
        // a 304 without Date or validators (Python's http.server sends no validator):
        // the arrival time becomes the Date, the stored validators stay
        let p = stored.not_modified(&HeaderMap::new(), at(200), at(200));
        assert_eq!(p.headers()["date"], date(200).as_str());
        assert_eq!(p.headers()["etag"], "\"v1\"");
    }

    #[test]
    fn head_updates_only_a_matching_entry() {
        let stored = policy(&[
            ("date", &date(0)),
            ("etag", "\"v1\""),
            ("content-length", "5"),
            ("x-a", "1"),
        ]);
        let updated = stored.head_update(
            &headers(&[("etag", "\"v1\""), ("content-length", "5"), ("x-a", "2")]),
            at(5),
            at(5),
        );
        assert_eq!(updated.unwrap().headers()["x-a"], "2");
        assert!(
            stored
                .head_update(&headers(&[("content-length", "6")]), at(5), at(5))
                .is_none()
        );
        assert!(
            stored
                .head_update(&headers(&[("etag", "\"v2\"")]), at(5), at(5))
                .is_none()
        );
    }

    #[test]
    fn stored_and_served_heads() {
        let p = Policy::new(
            StatusCode::OK,
            &headers(&[
                ("connection", "close, x-hop"),
                ("x-hop", "1"),
                ("transfer-encoding", "chunked"),
                ("set-cookie", "a=b"),
                ("cache-control", "no-cache=\"x-secret\", max-age=60"),
                ("x-secret", "s"),
            ]),
            HeaderMap::new(),
            at(0),
            at(0),
        );
        let served = p.served_headers(at(7));
        assert_eq!(served["set-cookie"], "a=b");
        assert_eq!(served["age"], "7");
        assert!(served["date"].to_str().unwrap().ends_with(" GMT"));
        for gone in ["connection", "x-hop", "transfer-encoding", "x-secret"] {
            assert!(!served.contains_key(gone), "{gone}");
        }
        let json = serde_json::to_string(&p).unwrap();
        let back: Policy = serde_json::from_str(&json).unwrap();
        assert_eq!(back.headers(), p.headers());
    }
}
