//! W3C trace context (`traceparent`, <https://www.w3.org/TR/trace-context/>): every
//! request gets a trace, continued from the client's `traceparent` when the client is
//! trusted (`forwarding.trace_context`) and started otherwise. The proxy is one hop of
//! the trace: the upstream gets a `traceparent` naming the proxy's own span as parent,
//! and the access log records the trace id. `tracestate` passes through unchanged.

use http::HeaderMap;
use rampart_config::TraceContext;

/// A request's place in a trace.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Trace {
    /// The trace (never zero).
    pub trace_id: u128,
    /// The client's span this request continues, if it continued one.
    pub parent_id: Option<u64>,
    /// The proxy's span for this request (never zero): the upstream's parent.
    pub span_id: u64,
    /// The trace flags (bit 0: sampled).
    pub flags: u8,
}

impl Trace {
    /// The trace of a request with `headers`: continued when `continue_it` and the
    /// request carries a valid `traceparent` (its sampled flag kept), started
    /// otherwise — sampled with probability `sample` (by trace id), or always when
    /// spans are not exported (`None`: the services behind decide).
    #[must_use]
    pub fn of(headers: &HeaderMap, continue_it: bool, sample: Option<f64>) -> Self {
        let span_id = nonzero_u64();
        match headers
            .get("traceparent")
            .filter(|_| continue_it)
            .and_then(|v| parse(v.as_bytes()))
        {
            Some((trace_id, parent, flags)) => Trace {
                trace_id,
                parent_id: Some(parent),
                span_id,
                flags,
            },
            None => {
                let trace_id = loop {
                    let id = rand::random::<u128>();
                    if id != 0 {
                        break id;
                    }
                };
                Trace {
                    trace_id,
                    parent_id: None,
                    span_id,
                    flags: u8::from(sample.is_none_or(|r| sampled_by_ratio(trace_id, r))),
                }
            }
        }
    }

    /// Whether the trace is sampled (flag bit 0).
    #[must_use]
    pub fn sampled(&self) -> bool {
        self.flags & 1 == 1
    }

    /// The `traceparent` for the upstream: this trace, the proxy's span as parent.
    #[must_use]
    pub fn header(&self) -> String {
        let mut s = String::with_capacity(55);
        s.push_str("00-");
        push_hex(&mut s, &self.trace_id.to_be_bytes());
        s.push('-');
        push_hex(&mut s, &self.span_id.to_be_bytes());
        s.push('-');
        push_hex(&mut s, &[self.flags]);
        s
    }
}

/// Appends `bytes` as lowercase hex digits, two per byte (trace and span ids: built per
/// request, so without `std::fmt`).
pub(crate) fn push_hex(out: &mut String, bytes: &[u8]) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    for &b in bytes {
        out.push(char::from(HEX[usize::from(b >> 4)]));
        out.push(char::from(HEX[usize::from(b & 0xf)]));
    }
}

/// Whether a request from a peer that is (or is not) a trusted proxy continues its
/// client's trace under `setting`; `None` when the proxy leaves trace context alone.
#[must_use]
pub fn continues(setting: TraceContext, trusted_peer: bool) -> Option<bool> {
    match setting {
        TraceContext::Off => None,
        TraceContext::Always => Some(true),
        TraceContext::Trusted => Some(trusted_peer),
    }
}

/// OpenTelemetry's trace-id ratio: the trace's low 63 bits against `ratio` of their
/// range, so that every proxy decides the same for one trace id.
#[must_use]
pub fn sampled_by_ratio(trace_id: u128, ratio: f64) -> bool {
    #[allow(
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        clippy::cast_precision_loss
    )]
    let bound = (ratio.clamp(0.0, 1.0) * (1u64 << 63) as f64) as u64;
    #[allow(clippy::cast_possible_truncation)]
    let low = (trace_id as u64) >> 1;
    low < bound
}

fn nonzero_u64() -> u64 {
    loop {
        let id = rand::random::<u64>();
        if id != 0 {
            return id;
        }
    }
}

/// `version-traceid-parentid-flags` → (trace id, parent id, flags). Version `00` is
/// exactly 55 characters; a later version may append `-…` fields, which are ignored
/// (the spec's forward compatibility). Lowercase hex only; all-zero ids, version `ff`
/// and anything malformed are refused (the trace is then started afresh).
#[must_use]
pub fn parse(value: &[u8]) -> Option<(u128, u64, u8)> {
    if value.len() < 55 || (value.len() > 55 && (value[..2] == *b"00" || value[55] != b'-')) {
        return None;
    }
    let version = hex(&value[0..2])?;
    if version == "ff" || value[2] != b'-' || value[35] != b'-' || value[52] != b'-' {
        return None;
    }
    let trace_id = u128::from_str_radix(hex(&value[3..35])?, 16).ok()?;
    let parent_id = u64::from_str_radix(hex(&value[36..52])?, 16).ok()?;
    let flags = u8::from_str_radix(hex(&value[53..55])?, 16).ok()?;
    (trace_id != 0 && parent_id != 0).then_some((trace_id, parent_id, flags))
}

/// `b` as text when it is lowercase hex only.
fn hex(b: &[u8]) -> Option<&str> {
    b.iter()
        .all(|c| c.is_ascii_digit() || (b'a'..=b'f').contains(c))
        .then(|| std::str::from_utf8(b).ok())
        .flatten()
}

#[cfg(test)]
mod tests {
    use super::*;

    const VALID: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn valid_traceparents_parse() {
        assert_eq!(
            parse(VALID.as_bytes()),
            Some((
                0x4bf9_2f35_77b3_4da6_a3ce_929d_0e0e_4736,
                0x00f0_67aa_0ba9_02b7,
                1
            ))
        );
        // A later version with more fields: the known ones are read.
        let future = "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00-extra";
        assert!(parse(future.as_bytes()).is_some());
    }

    #[test]
    fn malformed_traceparents_are_refused() {
        for bad in [
            "",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-0",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-x",
            "00_4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e473g-00f067aa0ba902b7-01",
        ] {
            assert_eq!(parse(bad.as_bytes()), None, "{bad}");
        }
    }

    #[test]
    fn a_continued_trace_keeps_its_id_and_gets_a_span_of_the_proxy() {
        let mut headers = HeaderMap::new();
        headers.insert("traceparent", VALID.parse().unwrap());
        let t = Trace::of(&headers, true, Some(0.0));
        assert_eq!(t.trace_id, 0x4bf9_2f35_77b3_4da6_a3ce_929d_0e0e_4736);
        assert_eq!(t.parent_id, Some(0x00f0_67aa_0ba9_02b7));
        let h = t.header();
        assert!(h.starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-"), "{h}");
        assert!(h.ends_with("-01"));
        assert_ne!(
            &h[36..52],
            "00f067aa0ba902b7",
            "the upstream's parent is the proxy"
        );
        assert_eq!(parse(h.as_bytes()).map(|p| p.1), Some(t.span_id));

        // Not trusted: a new trace, the client's ignored.
        let t = Trace::of(&headers, false, None);
        assert_ne!(t.trace_id, 0x4bf9_2f35_77b3_4da6_a3ce_929d_0e0e_4736);
        assert_eq!(t.parent_id, None);
        assert_eq!(t.header().len(), 55);
        assert!(t.sampled(), "started without an exporter: sampled");
    }

    #[test]
    fn the_ratio_samples_its_share_and_a_parent_decides_for_its_trace() {
        let headers = HeaderMap::new();
        let sampled = (0..10_000)
            .filter(|_| Trace::of(&headers, false, Some(0.25)).sampled())
            .count();
        assert!(
            (2_000..3_000).contains(&sampled),
            "{sampled} of 10000 at 0.25"
        );
        assert!(!Trace::of(&headers, false, Some(0.0)).sampled());
        assert!(Trace::of(&headers, false, Some(1.0)).sampled());
        // A continued trace keeps its parent's decision, whatever the ratio.
        let mut h = HeaderMap::new();
        h.insert("traceparent", VALID.parse().unwrap());
        assert!(Trace::of(&h, true, Some(0.0)).sampled());
        let unsampled = VALID.replace("-01", "-00");
        h.insert("traceparent", unsampled.parse().unwrap());
        assert!(!Trace::of(&h, true, Some(1.0)).sampled());
    }
}
