//! Byte ranges answered from a stored complete response (RFC 9110 14): a single range is
//! answered with 206 and `Content-Range`, an unsatisfiable one with 416; several ranges, a
//! range in another unit or one that does not parse get the whole response (a server may
//! ignore `Range`, RFC 9110 14.2), as does an `If-Range` that does not match (13.1.5).

use http::header::{self, HeaderMap, HeaderValue};

use super::policy::http_date;

/// How a stored response of `len` bytes answers a request's `Range`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RangeAnswer {
    /// The whole response (no `Range`, or one to ignore).
    Full,
    /// Bytes `start..=end`.
    Partial { start: u64, end: u64 },
    /// 416, with `Content-Range: bytes */len`.
    Unsatisfiable,
}

/// The answer for `request` from a stored response with `stored` headers and `len` bytes.
pub fn answer(request: &HeaderMap, stored: &HeaderMap, len: u64) -> RangeAnswer {
    let Some(range) = request.get(header::RANGE).and_then(|v| v.to_str().ok()) else {
        return RangeAnswer::Full;
    };
    if let Some(if_range) = request.get(header::IF_RANGE)
        && !if_range_matches(if_range, stored)
    {
        return RangeAnswer::Full;
    }
    let Some(spec) = range.trim().strip_prefix("bytes=") else {
        return RangeAnswer::Full;
    };
    let spec = spec.trim();
    if spec.contains(',') {
        return RangeAnswer::Full;
    }
    let Some((first, last)) = spec.split_once('-') else {
        return RangeAnswer::Full;
    };
    let number = |s: &str| {
        let s = s.trim();
        (!s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()))
            .then(|| s.parse::<u64>().ok())
            .flatten()
    };
    let open_end = last.trim().is_empty();
    match (first.trim().is_empty(), number(first), number(last)) {
        // bytes=-N: the last N bytes
        (true, _, Some(n)) => {
            if n == 0 || len == 0 {
                RangeAnswer::Unsatisfiable
            } else {
                RangeAnswer::Partial {
                    start: len.saturating_sub(n),
                    end: len - 1,
                }
            }
        }
        (false, Some(start), last) if last.is_some() || open_end => {
            if let Some(end) = last
                && end < start
            {
                return RangeAnswer::Full;
            }
            if start >= len {
                return RangeAnswer::Unsatisfiable;
            }
            RangeAnswer::Partial {
                start,
                end: last.map_or(len - 1, |end| end.min(len - 1)),
            }
        }
        _ => RangeAnswer::Full,
    }
}

/// `If-Range`: an entity tag matches the stored one by strong comparison; a date matches
/// the stored `Last-Modified` exactly.
fn if_range_matches(if_range: &HeaderValue, stored: &HeaderMap) -> bool {
    let value = if_range.as_bytes().trim_ascii();
    if value.starts_with(b"\"") || value.starts_with(b"W/") {
        return !value.starts_with(b"W/")
            && stored
                .get(header::ETAG)
                .is_some_and(|etag| etag.as_bytes().trim_ascii() == value);
    }
    match (
        http_date(if_range),
        stored.get(header::LAST_MODIFIED).and_then(http_date),
    ) {
        (Some(a), Some(b)) => a == b,
        _ => false,
    }
}

/// `Content-Range` for bytes `start..=end` of `len`, or `*/len` when unsatisfiable.
pub fn content_range(answer: RangeAnswer, len: u64) -> Option<HeaderValue> {
    let value = match answer {
        RangeAnswer::Full => return None,
        RangeAnswer::Partial { start, end } => format!("bytes {start}-{end}/{len}"),
        RangeAnswer::Unsatisfiable => format!("bytes */{len}"),
    };
    HeaderValue::from_str(&value).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (n, v) in pairs {
            h.insert(*n, HeaderValue::from_static(v));
        }
        h
    }

    #[test]
    fn single_ranges_of_a_stored_response() {
        let stored = req(&[
            ("etag", "\"v1\""),
            ("last-modified", "Sun, 06 Nov 1994 08:49:37 GMT"),
        ]);
        let p = |start, end| RangeAnswer::Partial { start, end };
        let cases: &[(&[(&'static str, &'static str)], RangeAnswer)] = &[
            (&[], RangeAnswer::Full),
            (&[("range", "bytes=0-1")], p(0, 1)),
            (&[("range", "bytes=1-")], p(1, 10)),
            (&[("range", "bytes=-1")], p(10, 10)),
            (&[("range", "bytes=-50")], p(0, 10)),
            (&[("range", "bytes=5-500")], p(5, 10)),
            (&[("range", "bytes=11-")], RangeAnswer::Unsatisfiable),
            (&[("range", "bytes=-0")], RangeAnswer::Unsatisfiable),
            (&[("range", "bytes=3-2")], RangeAnswer::Full),
            (&[("range", "bytes=0-1, 3-4")], RangeAnswer::Full),
            (&[("range", "items=0-1")], RangeAnswer::Full),
            (&[("range", "bytes=a-1")], RangeAnswer::Full),
            (&[("range", "bytes=0-1"), ("if-range", "\"v1\"")], p(0, 1)),
            (
                &[("range", "bytes=0-1"), ("if-range", "W/\"v1\"")],
                RangeAnswer::Full,
            ),
            (
                &[("range", "bytes=0-1"), ("if-range", "\"v2\"")],
                RangeAnswer::Full,
            ),
            (
                &[
                    ("range", "bytes=0-1"),
                    ("if-range", "Sun, 06 Nov 1994 08:49:37 GMT"),
                ],
                p(0, 1),
            ),
            (
                &[
                    ("range", "bytes=0-1"),
                    ("if-range", "Sun, 06 Nov 1994 08:49:38 GMT"),
                ],
                RangeAnswer::Full,
            ),
        ];
        for (request, expected) in cases {
            assert_eq!(answer(&req(request), &stored, 11), *expected, "{request:?}");
        }
        assert_eq!(content_range(p(0, 1), 11).unwrap(), "bytes 0-1/11");
        assert_eq!(
            content_range(RangeAnswer::Unsatisfiable, 11).unwrap(),
            "bytes */11"
        );
    }
}
