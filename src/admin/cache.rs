//! The cache's admin routes, added to the admin listener: `POST /cache/purge?url=<URL>`
//! drops every stored variant of one URL (canonicalised as the proxy does, so that the
//! spelling in the query does not matter), `POST /cache/clear` drops everything.

use std::sync::Arc;

use http::{Method, StatusCode};

use super::{AdminResponse, BoxFuture, ExtraRoutes, text};
use crate::cache::Cache;
use crate::proxy::target::Target;

/// The cache's admin routes: `POST /cache/purge?url=<URL>` and `POST /cache/clear`.
pub fn routes(cache: Option<Arc<Cache>>) -> ExtraRoutes {
    Arc::new(move |req: &http::request::Parts| {
        let path = req.uri.path();
        if path != "/cache/purge" && path != "/cache/clear" {
            return None;
        }
        let answer = if req.method != Method::POST {
            let mut resp = text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n");
            resp.headers_mut()
                .insert(http::header::ALLOW, http::HeaderValue::from_static("POST"));
            resp
        } else if let Some(cache) = &cache {
            if path == "/cache/clear" {
                cache.clear();
                text(StatusCode::OK, "cleared\n")
            } else {
                purge(cache, req.uri.query().unwrap_or_default())
            }
        } else {
            text(StatusCode::NOT_FOUND, "the cache is disabled\n")
        };
        Some(Box::pin(async move { answer }) as BoxFuture<AdminResponse>)
    })
}

/// `url=<percent-encoded absolute http URL>`: the URL is canonicalised as the proxy does.
fn purge(cache: &Cache, query: &str) -> AdminResponse {
    let Some(raw) = query
        .split('&')
        .find_map(|pair| pair.strip_prefix("url="))
        .map(percent_decode)
    else {
        return text(StatusCode::BAD_REQUEST, "missing url=<URL>\n");
    };
    let target = raw
        .parse::<http::Uri>()
        .ok()
        .and_then(|uri| Target::from_request(&http::Method::GET, &uri).ok());
    let Some(target) = target else {
        return text(
            StatusCode::BAD_REQUEST,
            format!("{raw:?} is not an absolute http:// URL\n"),
        );
    };
    let url = target.log_target();
    match cache.purge(&url) {
        0 => text(StatusCode::NOT_FOUND, format!("not cached: {url}\n")),
        n => text(StatusCode::OK, format!("purged {n} from {url}\n")),
    }
}

/// `%XX` and `+` decoding of one query value (invalid escapes are kept as they are).
fn percent_decode(value: &str) -> String {
    let bytes = value.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => {
                let hex = |b: u8| (b as char).to_digit(16);
                match (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                    (Some(hi), Some(lo)) => {
                        out.push((hi * 16 + lo) as u8);
                        i += 2;
                    }
                    _ => out.push(b'%'),
                }
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::percent_decode;

    #[test]
    fn query_values_decode_leniently() {
        for (raw, want) in [
            (
                "http%3A%2F%2Fexample.com%2Fa%3Fb%3D1",
                "http://example.com/a?b=1",
            ),
            ("a+b", "a b"),
            ("100%", "100%"),
            ("%zz%4", "%zz%4"),
            ("%C3%A9", "\u{e9}"),
            ("", ""),
        ] {
            assert_eq!(percent_decode(raw), want, "{raw}");
        }
    }
}
