//! The `json` format: one object per line, the fields of [`super::fields`] in order.

use super::AccessRecord;
use super::fields;
use super::text::*;

/// Writes `{"a":1,"b":...` with the commas in the right places.
struct JsonObject<'a> {
    out: &'a mut Vec<u8>,
    first: bool,
}

pub(super) fn write_json(rec: &AccessRecord, out: &mut Vec<u8>) {
    let mut o = JsonObject::new(out);
    let (secs, micros) = unix_parts(rec.time);
    o.key(fields::TIME);
    o.out.push(b'"');
    put_rfc3339_millis(o.out, secs, micros / 1000);
    o.out.push(b'"');
    o.key(fields::DURATION_MS);
    let us = u64::try_from(rec.duration.as_micros()).unwrap_or(u64::MAX);
    push_u64(o.out, us / 1000);
    o.out.push(b'.');
    push_padded(o.out, us % 1000, 3);
    o.str(fields::REQUEST_ID, &rec.request_id);
    o.key(fields::CLIENT);
    push_quoted_socket(o.out, rec.client);
    o.str(fields::METHOD, rec.method.as_str());
    o.str(fields::TARGET, &rec.target);
    o.key(fields::STATUS);
    push_u64(o.out, u64::from(rec.status));
    o.key(fields::BYTES_FROM_CLIENT);
    push_u64(o.out, rec.bytes_from_client);
    o.key(fields::BYTES_TO_CLIENT);
    push_u64(o.out, rec.bytes_to_client);
    o.key(fields::RESOLVED);
    match rec.resolved {
        Some(addr) => push_quoted_socket(o.out, addr),
        None => o.null(),
    }
    o.opt_str(fields::ERROR, rec.error.map(|e| e.as_str()));
    o.opt_str(fields::SOURCE, rec.source_name.as_deref());
    o.key(fields::LABELS);
    match &rec.labels {
        Some(labels) => {
            o.out.push(b'{');
            for (i, (k, v)) in labels.iter().enumerate() {
                if i > 0 {
                    o.out.push(b',');
                }
                json_string(o.out, k.as_bytes());
                o.out.push(b':');
                json_string(o.out, v.as_bytes());
            }
            o.out.push(b'}');
        }
        None => o.null(),
    }
    o.opt_str(fields::RULE, rec.rule.as_deref());
    o.str(fields::VERDICT, rec.verdict_str());
    o.str(fields::REASON, rec.reason_str());
    o.str(fields::ROUTE, rec.route.as_str());
    o.opt_str(fields::CACHE, rec.cache.map(|c| c.as_str()));
    o.opt_header(fields::CONTENT_TYPE, rec.content_type.as_ref());
    o.opt_header(fields::USER_AGENT, rec.user_agent.as_ref());
    o.opt_header(fields::REFERER, rec.referer.as_ref());
    o.str(fields::HTTP_VERSION, version_str(rec.http_version));
    o.opt_str(fields::SNI, rec.sni.as_deref());
    o.key(fields::ALPN);
    match &rec.alpn {
        Some(names) => {
            o.out.push(b'[');
            for (i, name) in names.iter().enumerate() {
                if i > 0 {
                    o.out.push(b',');
                }
                json_string(o.out, name.as_bytes());
            }
            o.out.push(b']');
        }
        None => o.null(),
    }
    let pod = rec.pod.as_deref();
    o.opt_str(fields::POD, pod.map(|p| p.full_name()));
    o.opt_str(fields::NAMESPACE, pod.map(|p| &*p.namespace));
    o.opt_str(fields::SERVICE_ACCOUNT, pod.map(|p| &*p.service_account));
    o.opt_str(fields::NODE, rec.node.as_deref());
    o.out.push(b'}');
}

// === impl JsonObject ===

impl<'a> JsonObject<'a> {
    fn new(out: &'a mut Vec<u8>) -> Self {
        out.push(b'{');
        JsonObject { out, first: true }
    }

    /// Field names are plain ASCII constants: no escaping needed.
    fn key(&mut self, key: &str) {
        if !self.first {
            self.out.push(b',');
        }
        self.first = false;
        self.out.push(b'"');
        self.out.extend_from_slice(key.as_bytes());
        self.out.extend_from_slice(b"\":");
    }

    fn null(&mut self) {
        self.out.extend_from_slice(b"null");
    }

    fn str(&mut self, key: &str, value: &str) {
        self.key(key);
        json_string(self.out, value.as_bytes());
    }

    fn opt_str(&mut self, key: &str, value: Option<&str>) {
        match value {
            Some(v) => self.str(key, v),
            None => {
                self.key(key);
                self.null();
            }
        }
    }

    fn opt_header(&mut self, key: &str, value: Option<&http::HeaderValue>) {
        match value {
            Some(v) => {
                self.key(key);
                json_string(self.out, v.as_bytes());
            }
            None => {
                self.key(key);
                self.null();
            }
        }
    }
}

/// A JSON string: `"` and `\` escaped, control bytes as `\n`/`\u00XX`, invalid UTF-8 as U+FFFD.
pub(super) fn json_string(out: &mut Vec<u8>, bytes: &[u8]) {
    out.push(b'"');
    // Fast path (nearly every value): plain ASCII, nothing to escape. `fold` rather than `any`
    // so that the check vectorizes.
    let plain = !bytes.iter().fold(false, |dirty, &b| {
        dirty | !(0x20..0x7f).contains(&b) | (b == b'"') | (b == b'\\')
    });
    if plain {
        out.extend_from_slice(bytes);
        out.push(b'"');
        return;
    }
    for chunk in bytes.utf8_chunks() {
        let valid = chunk.valid().as_bytes();
        let mut run = 0;
        for (i, &b) in valid.iter().enumerate() {
            let escape: &[u8] = match b {
                b'"' => b"\\\"",
                b'\\' => b"\\\\",
                b'\n' => b"\\n",
                b'\r' => b"\\r",
                b'\t' => b"\\t",
                0..0x20 | 0x7f => &[
                    b'\\',
                    b'u',
                    b'0',
                    b'0',
                    HEX_LOWER[usize::from(b >> 4)],
                    HEX_LOWER[usize::from(b & 0xf)],
                ],
                _ => continue,
            };
            out.extend_from_slice(&valid[run..i]);
            out.extend_from_slice(escape);
            run = i + 1;
        }
        out.extend_from_slice(&valid[run..]);
        if !chunk.invalid().is_empty() {
            out.extend_from_slice("\u{FFFD}".as_bytes());
        }
    }
    out.push(b'"');
}
