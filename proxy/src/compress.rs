//! Response compression (a route's `compress`): the coding is chosen in the policy from
//! the request's `Accept-Encoding` q-values (ties broken by the route's order), and a
//! response is compressed only when it can be — status 200, no `Content-Encoding`, a
//! listed content type, at least `min_size` when its length is known, no
//! `Cache-Control: no-transform`, not a range — streaming, chunk by chunk, with
//! Pingora's encoders (flate2, brotli, zstd). `Vary: Accept-Encoding` goes on every
//! response that could have been compressed; a compressed one loses its
//! `Content-Length` and `Accept-Ranges`, and its `ETag` becomes weak.

use http::header::{
    HeaderValue, ACCEPT_RANGES, CACHE_CONTROL, CONTENT_ENCODING, CONTENT_LENGTH, CONTENT_RANGE,
    CONTENT_TYPE, ETAG, VARY,
};
use pingora::http::ResponseHeader;
use pingora::protocols::http::compression::{Algorithm, Encode};
use rampart_config::Compress;

/// A coding Rampart compresses with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Coding {
    /// `zstd` (RFC 8878).
    Zstd,
    /// `br` (RFC 7932).
    Br,
    /// `gzip`.
    Gzip,
}

impl Coding {
    /// The `Content-Encoding` token (and the metrics label).
    #[must_use]
    pub fn token(self) -> &'static str {
        match self {
            Coding::Zstd => "zstd",
            Coding::Br => "br",
            Coding::Gzip => "gzip",
        }
    }

    fn of(token: &str) -> Option<Coding> {
        // Read once per Accept-Encoding item of every request on the route: compared
        // in place, not lower-cased into a new string.
        [
            ("zstd", Coding::Zstd),
            ("br", Coding::Br),
            ("gzip", Coding::Gzip),
            ("x-gzip", Coding::Gzip),
        ]
        .into_iter()
        .find(|(t, _)| token.eq_ignore_ascii_case(t))
        .map(|(_, c)| c)
    }
}

/// A route's compression, ready for serving.
#[derive(Debug)]
pub struct CompressRt {
    /// Codings offered, in the route's order of preference.
    order: Vec<Coding>,
    /// Media types compressed, lowercase (`type/*` matches the type).
    types: Vec<String>,
    min_size: u64,
    levels: rampart_config::CompressLevels,
}

impl CompressRt {
    /// The route's settings (validated: known codings, levels in range).
    #[must_use]
    pub fn new(c: &Compress) -> Self {
        Self {
            order: c.algorithms.iter().filter_map(|a| Coding::of(a)).collect(),
            types: c.types.iter().map(|t| t.to_ascii_lowercase()).collect(),
            min_size: c.min_size.0,
            levels: c.levels,
        }
    }

    /// The coding for a request: the client's most preferred (highest q) among the
    /// route's, ties to the route's order; `None` for HEAD and range requests and
    /// when the client accepts none.
    #[must_use]
    pub fn choose(&self, req: &http::request::Parts) -> Option<Coding> {
        if req.method == http::Method::HEAD || req.headers.contains_key(http::header::RANGE) {
            return None;
        }
        let mut listed: Vec<(Coding, f32)> = Vec::new();
        let mut any = None;
        for value in req.headers.get_all(http::header::ACCEPT_ENCODING) {
            let Ok(value) = value.to_str() else { continue };
            for item in value.split(',') {
                let mut parts = item.split(';');
                let token = parts.next().unwrap_or("").trim();
                let q = parts
                    .filter_map(|p| p.trim().strip_prefix("q=").or(p.trim().strip_prefix("Q=")))
                    .find_map(|q| q.trim().parse::<f32>().ok())
                    .unwrap_or(1.0)
                    .clamp(0.0, 1.0);
                if token == "*" {
                    any = Some(q);
                } else if let Some(c) = Coding::of(token) {
                    listed.push((c, q));
                }
            }
        }
        let mut best: Option<(Coding, f32)> = None;
        for &c in &self.order {
            let q = listed
                .iter()
                .find(|(l, _)| *l == c)
                .map(|(_, q)| *q)
                .or(any)
                .unwrap_or(0.0);
            if q > 0.0 && best.is_none_or(|(_, b)| q > b) {
                best = Some((c, q));
            }
        }
        best.map(|(c, _)| c)
    }

    /// Whether `resp` may be compressed (whoever asked): then it varies with
    /// `Accept-Encoding`.
    #[must_use]
    pub fn eligible(&self, resp: &ResponseHeader) -> bool {
        let h = &resp.headers;
        if resp.status != http::StatusCode::OK
            || h.contains_key(CONTENT_ENCODING)
            || h.contains_key(CONTENT_RANGE)
        {
            return false;
        }
        let no_transform = h.get_all(CACHE_CONTROL).iter().any(|v| {
            v.to_str().is_ok_and(|v| {
                v.split(',')
                    .any(|d| d.trim().eq_ignore_ascii_case("no-transform"))
            })
        });
        if no_transform {
            return false;
        }
        let small = h
            .get(CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok())
            .is_some_and(|n| n < self.min_size);
        if small {
            return false;
        }
        let Some(media) = h.get(CONTENT_TYPE).and_then(|v| v.to_str().ok()) else {
            return false;
        };
        let media = media
            .split(';')
            .next()
            .unwrap_or("")
            .trim()
            .to_ascii_lowercase();
        self.types.iter().any(|t| match t.strip_suffix("/*") {
            Some(top) => media.split('/').next() == Some(top),
            None => *t == media,
        })
    }

    /// Rewrites an eligible response's head for `coding` and returns its encoder.
    pub fn apply(
        &self,
        resp: &mut ResponseHeader,
        coding: Coding,
    ) -> Option<Box<dyn Encode + Send + Sync>> {
        let encoder = match coding {
            Coding::Zstd => Algorithm::Zstd.compressor(self.levels.zstd)?,
            // Pingora's brotli encoder flushes at the end but never finishes the stream
            // (no last meta-block): a strict decoder refuses it.
            Coding::Br => Box::new(BrotliEncoder::new(self.levels.br)),
            Coding::Gzip => Algorithm::Gzip.compressor(self.levels.gzip)?,
        };
        resp.remove_header(&CONTENT_LENGTH);
        resp.remove_header(&ACCEPT_RANGES);
        let weak = resp
            .headers
            .get(ETAG)
            .filter(|e| !e.as_bytes().starts_with(b"W/"))
            .and_then(|e| HeaderValue::from_bytes(&[b"W/", e.as_bytes()].concat()).ok());
        if let Some(weak) = weak {
            let _ = resp.insert_header(ETAG, weak);
        }
        let _ = resp.insert_header(CONTENT_ENCODING, coding.token());
        Some(encoder)
    }
}

/// A streaming brotli encoder that finishes its stream at the end.
struct BrotliEncoder {
    writer: Option<brotli::CompressorWriter<Vec<u8>>>,
    total_in: usize,
    total_out: usize,
    took: std::time::Duration,
}

impl BrotliEncoder {
    fn new(level: u32) -> Self {
        Self {
            // 4 KiB buffer, a 2^19 window (as Pingora's).
            writer: Some(brotli::CompressorWriter::new(Vec::new(), 4096, level, 19)),
            total_in: 0,
            total_out: 0,
            took: std::time::Duration::ZERO,
        }
    }
}

impl Encode for BrotliEncoder {
    fn encode(&mut self, input: &[u8], end: bool) -> pingora::Result<bytes::Bytes> {
        use std::io::Write as _;
        let start = std::time::Instant::now();
        let Some(writer) = self.writer.as_mut() else {
            return Ok(bytes::Bytes::new());
        };
        self.total_in += input.len();
        writer
            .write_all(input)
            .map_err(|e| pingora::Error::because(pingora::ErrorType::InternalError, "brotli", e))?;
        let out = if end {
            self.writer
                .take()
                .map(brotli::CompressorWriter::into_inner)
                .unwrap_or_default()
        } else {
            std::mem::take(writer.get_mut())
        };
        self.total_out += out.len();
        self.took += start.elapsed();
        Ok(out.into())
    }

    fn stat(&self) -> (&'static str, usize, usize, std::time::Duration) {
        ("br", self.total_in, self.total_out, self.took)
    }
}

/// Adds `Accept-Encoding` to the response's `Vary` unless it is there (or `*` is).
pub fn add_vary(resp: &mut ResponseHeader) {
    let present = resp.headers.get_all(VARY).iter().any(|v| {
        v.to_str().is_ok_and(|v| {
            v.split(',').any(|t| {
                let t = t.trim();
                t == "*" || t.eq_ignore_ascii_case("accept-encoding")
            })
        })
    });
    if !present {
        let _ = resp.append_header(VARY, "Accept-Encoding");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(accept: &str) -> http::request::Parts {
        let mut b = http::Request::get("/");
        if !accept.is_empty() {
            b = b.header("accept-encoding", accept);
        }
        b.body(()).unwrap().into_parts().0
    }

    #[test]
    fn the_coding_follows_the_q_values_then_the_routes_order() {
        let c = CompressRt::new(&Compress::default()); // zstd, br, gzip
        let choose = |a: &str| c.choose(&request(a)).map(Coding::token);
        assert_eq!(choose("gzip, deflate, br, zstd"), Some("zstd"));
        assert_eq!(choose("gzip, deflate, br"), Some("br"));
        assert_eq!(choose("gzip;q=1.0, br;q=0.5"), Some("gzip"));
        assert_eq!(choose("br;q=0, gzip;q=0.1"), Some("gzip"));
        assert_eq!(choose("*"), Some("zstd"));
        assert_eq!(choose("*;q=0.5, zstd;q=0"), Some("br"));
        assert_eq!(choose("identity"), None);
        assert_eq!(choose("gzip;q=0"), None);
        assert_eq!(choose(""), None);
        let gzip_only = CompressRt::new(&Compress {
            algorithms: vec!["gzip".into()],
            ..Compress::default()
        });
        assert_eq!(
            gzip_only
                .choose(&request("br, zstd, gzip;q=0.1"))
                .map(Coding::token),
            Some("gzip")
        );
        let mut head = request("gzip");
        head.method = http::Method::HEAD;
        assert_eq!(c.choose(&head), None);
        let mut range = request("gzip");
        range
            .headers
            .insert("range", HeaderValue::from_static("bytes=0-9"));
        assert_eq!(c.choose(&range), None);
    }

    fn response(headers: &[(&'static str, &'static str)]) -> ResponseHeader {
        let mut r = ResponseHeader::build(200, None).unwrap();
        for (k, v) in headers {
            r.append_header(*k, *v).unwrap();
        }
        r
    }

    #[test]
    fn only_what_may_be_compressed_is() {
        let c = CompressRt::new(&Compress::default());
        assert!(c.eligible(&response(&[("content-type", "text/html; charset=utf-8")])));
        assert!(c.eligible(&response(&[
            ("content-type", "TEXT/CSS"),
            ("content-length", "5000")
        ])));
        for bad in [
            &[("content-type", "image/png")][..],
            &[("content-type", "text/html"), ("content-length", "100")],
            &[("content-type", "text/html"), ("content-encoding", "br")],
            &[
                ("content-type", "text/html"),
                ("cache-control", "public, no-transform"),
            ],
            &[
                ("content-type", "text/html"),
                ("content-range", "bytes 0-9/100"),
            ],
            &[],
        ] {
            assert!(!c.eligible(&response(bad)), "{bad:?}");
        }
        let mut partial = response(&[("content-type", "text/html")]);
        partial.set_status(206).unwrap();
        assert!(!c.eligible(&partial));
        let wild = CompressRt::new(&Compress {
            types: vec!["text/*".into()],
            ..Compress::default()
        });
        assert!(wild.eligible(&response(&[("content-type", "text/x-anything")])));
        assert!(!wild.eligible(&response(&[("content-type", "application/json")])));
    }

    #[test]
    fn a_compressed_head_loses_its_length_and_ranges_and_weakens_its_etag() {
        let c = CompressRt::new(&Compress::default());
        let mut r = response(&[
            ("content-type", "text/html"),
            ("content-length", "5000"),
            ("accept-ranges", "bytes"),
            ("etag", "\"abc\""),
            ("vary", "Origin"),
        ]);
        let mut enc = c.apply(&mut r, Coding::Gzip).unwrap();
        add_vary(&mut r);
        add_vary(&mut r);
        assert_eq!(r.headers["content-encoding"], "gzip");
        assert_eq!(r.headers["etag"], "W/\"abc\"");
        assert!(r.headers.get("content-length").is_none());
        assert!(r.headers.get("accept-ranges").is_none());
        let vary: Vec<_> = r.headers.get_all("vary").iter().collect();
        assert_eq!(vary, ["Origin", "Accept-Encoding"]);
        // The encoder streams: two chunks and the end decode to the input.
        let mut out = enc.encode(b"hello ", false).unwrap().to_vec();
        out.extend_from_slice(&enc.encode(b"world", true).unwrap());
        let mut text = String::new();
        use std::io::Read as _;
        flate2::read::GzDecoder::new(&out[..])
            .read_to_string(&mut text)
            .unwrap();
        assert_eq!(text, "hello world");
    }

    #[test]
    fn every_encoder_finishes_a_stream_its_decoder_reads() {
        use std::io::Read as _;
        let c = CompressRt::new(&Compress::default());
        let text = "streamed text, ".repeat(2000);
        for coding in [Coding::Gzip, Coding::Br, Coding::Zstd] {
            let mut r = response(&[("content-type", "text/plain")]);
            let mut enc = c.apply(&mut r, coding).unwrap();
            let mut out = Vec::new();
            for chunk in text.as_bytes().chunks(7000) {
                out.extend_from_slice(&enc.encode(chunk, false).unwrap());
            }
            out.extend_from_slice(&enc.encode(b"", true).unwrap());
            let mut back = String::new();
            match coding {
                Coding::Gzip => {
                    flate2::read::GzDecoder::new(&out[..])
                        .read_to_string(&mut back)
                        .unwrap();
                }
                Coding::Br => {
                    brotli::Decompressor::new(&out[..], 4096)
                        .read_to_string(&mut back)
                        .unwrap();
                }
                Coding::Zstd => {
                    back = String::from_utf8(zstd::decode_all(&out[..]).unwrap()).unwrap()
                }
            }
            assert_eq!(back, text, "{coding:?}");
            assert!(out.len() < text.len() / 10, "{coding:?}: {}", out.len());
        }
    }
}
