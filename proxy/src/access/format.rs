//! Access log lines: JSON (one object per line), logfmt, and the combined format of
//! nginx and Apache. Field names are [`rampart_config::ACCESS_LOG_FIELDS`]; a field
//! without a value (no upstream for a 404) is left out of JSON and logfmt and written
//! `-` in the combined format.

use std::fmt::Write as _;
use std::net::IpAddr;
use std::time::{Duration, UNIX_EPOCH};

use rampart_config::AccessLogFormat;

use super::{AccessLogRt, Arrival, Outcome};
use crate::edge::Scheme;
use crate::generation::Generation;

/// One finished request, ready to format.
pub struct Record<'a> {
    /// What arrived.
    pub arrival: &'a Arrival,
    /// How it ended.
    pub outcome: &'a Outcome<'a>,
    /// The generation that served it (route and pool names).
    pub generation: &'a Generation,
    /// The listener's scheme.
    pub scheme: Scheme,
    /// The connection's peer.
    pub peer: Option<IpAddr>,
    /// From arrival to the end.
    pub duration: Duration,
}

/// A field's value.
enum Value<'a> {
    /// Text that may need escaping.
    Str(&'a str),
    /// Text written as it formats (addresses, ids, times): nothing to escape, and no
    /// string allocated for it.
    Plain(&'a dyn std::fmt::Display),
    Num(u64),
    Ms(f64),
    Bool(bool),
}

/// Writes the record's line in `log`'s format, ending in `\n`, to `out` (cleared first).
pub fn line(log: &AccessLogRt, r: &Record<'_>, out: &mut String) {
    out.clear();
    match log.format {
        AccessLogFormat::Json => json(log, r, out),
        AccessLogFormat::Logfmt => logfmt(log, r, out),
        AccessLogFormat::Combined => combined(log, r, out),
    }
    out.push('\n');
}

/// Calls `f` with every field that has a value and is kept, in the documented order.
fn fields(log: &AccessLogRt, r: &Record<'_>, mut f: impl FnMut(&str, Value<'_>)) {
    let (a, o) = (r.arrival, r.outcome);
    // The fields come in the order of ACCESS_LOG_FIELDS: the n-th call is field n, so
    // whether it is kept is one bit test, not a search of the names per field and line.
    let mut n = 0;
    let mut put = |name: &str, v: Option<Value<'_>>| {
        debug_assert_eq!(rampart_config::ACCESS_LOG_FIELDS[n], name);
        let kept = log.fields & (1 << n) != 0;
        n += 1;
        if let (Some(v), true) = (v, kept) {
            f(name, v);
        }
    };
    let time = Rfc3339(a.at);
    put("time", Some(Value::Plain(&time)));
    let request_id = o.request_id.map(String::from_utf8_lossy);
    put("request_id", request_id.as_deref().map(Value::Str));
    let trace_id = o.trace.map(|t| TraceId(t.trace_id));
    put("trace_id", trace_id.as_ref().map(|t| Value::Plain(t)));
    put("client", a.client.as_ref().map(|c| Value::Plain(c)));
    put("peer", r.peer.as_ref().map(|p| Value::Plain(p)));
    put("method", Some(Value::Str(a.method.as_str())));
    put("scheme", Some(Value::Str(r.scheme.as_str())));
    put("host", Some(Value::Str(&a.host)));
    put("path", Some(Value::Str(&a.path)));
    put("query", a.query.as_deref().map(Value::Str));
    put("protocol", Some(Value::Str(a.protocol)));
    put("status", Some(Value::Num(u64::from(o.status))));
    put("bytes_received", a.body_len.map(Value::Num));
    put("bytes_sent", o.bytes_sent.map(Value::Num));
    put("duration_ms", Some(Value::Ms(ms(r.duration))));
    put(
        "upstream",
        o.upstream.map(|(p, i)| Value::Plain(&p.endpoints[i].addr)),
    );
    put(
        "upstream_status",
        o.upstream_status.map(|s| Value::Num(u64::from(s))),
    );
    put(
        "upstream_connect_ms",
        o.upstream_connect.map(|d| Value::Ms(ms(d))),
    );
    put(
        "upstream_ttfb_ms",
        o.upstream_ttfb.map(|d| Value::Ms(ms(d))),
    );
    put(
        "route",
        o.route
            .map(|i| Value::Str(r.generation.routes[i].name.as_str())),
    );
    put("pool", o.upstream.map(|(p, _)| Value::Str(p.name.as_str())));
    put(
        "attempts",
        (o.attempts > 0).then_some(Value::Num(u64::from(o.attempts))),
    );
    put("fast_path", Some(Value::Bool(o.fast_path)));
    put("tls_version", o.tls.map(|t| Value::Str(t.version)));
    put("tls_cipher", o.tls.map(|t| Value::Str(t.cipher)));
    put(
        "tls_sni",
        o.tls.and_then(|t| t.sni.as_deref()).map(Value::Str),
    );
    put("tls_resumed", o.tls.map(|t| Value::Bool(t.resumed)));
    put("error", o.error.map(Value::Str));
    if log.has("headers") {
        for (name, value) in log.headers.iter().zip(&a.headers) {
            if let Some(v) = value {
                f(
                    &format!("header_{}", name.as_str().replace('-', "_")),
                    Value::Str(v),
                );
            }
        }
    }
}

fn ms(d: Duration) -> f64 {
    (d.as_secs_f64() * 1_000_000.0).round() / 1000.0
}

/// A time as RFC 3339 with milliseconds, UTC (`2026-12-06T22:23:00.123Z`), written
/// without allocating.
struct Rfc3339(std::time::SystemTime);

impl std::fmt::Display for Rfc3339 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let d = self.0.duration_since(UNIX_EPOCH).unwrap_or_default();
        let secs = d.as_secs();
        let (y, m, day) = civil_from_days(secs / 86_400);
        let rem = secs % 86_400;
        write!(
            f,
            "{y:04}-{m:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
            rem / 3600,
            rem % 3600 / 60,
            rem % 60,
            d.subsec_millis()
        )
    }
}

/// A trace id as 32 lowercase hex digits.
struct TraceId(u128);

impl std::fmt::Display for TraceId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:032x}", self.0)
    }
}

fn json(log: &AccessLogRt, r: &Record<'_>, out: &mut String) {
    out.push('{');
    let mut first = true;
    fields(log, r, |name, v| {
        if !first {
            out.push(',');
        }
        first = false;
        json_str(out, name);
        out.push(':');
        match v {
            Value::Str(s) => json_str(out, s),
            Value::Plain(d) => {
                let _ = write!(out, "\"{d}\"");
            }
            Value::Num(n) => {
                let _ = write!(out, "{n}");
            }
            Value::Ms(m) => {
                let _ = write!(out, "{m}");
            }
            Value::Bool(b) => out.push_str(if b { "true" } else { "false" }),
        }
    });
    out.push('}');
}

/// `s` as a JSON string (quotes, backslashes and control characters escaped).
fn json_str(out: &mut String, s: &str) {
    out.push('"');
    // Most values need no escaping: copied whole.
    if !s
        .bytes()
        .any(|b| b == b'"' || b == b'\\' || b < 0x20 || b == 0x7f)
    {
        out.push_str(s);
        out.push('"');
        return;
    }
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 || c == '\u{7f}' => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

fn logfmt(log: &AccessLogRt, r: &Record<'_>, out: &mut String) {
    let mut first = true;
    fields(log, r, |name, v| {
        if !first {
            out.push(' ');
        }
        first = false;
        out.push_str(name);
        out.push('=');
        match v {
            Value::Str(s) => logfmt_str(out, s),
            Value::Plain(d) => {
                let _ = write!(out, "{d}");
            }
            Value::Num(n) => {
                let _ = write!(out, "{n}");
            }
            Value::Ms(m) => {
                let _ = write!(out, "{m}");
            }
            Value::Bool(b) => out.push_str(if b { "true" } else { "false" }),
        }
    });
}

/// A logfmt value: bare when it is a simple token, else quoted as a JSON string.
fn logfmt_str(out: &mut String, s: &str) {
    let bare = !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_graphic() && c != '"' && c != '=' && c != '\\');
    if bare {
        out.push_str(s);
    } else {
        json_str(out, s);
    }
}

/// `client - - [06/Dec/2026:22:23:00 +0000] "GET /path?q HTTP/1.1" 200 123 "referer" "agent"`.
fn combined(log: &AccessLogRt, r: &Record<'_>, out: &mut String) {
    let (a, o) = (r.arrival, r.outcome);
    match a.client.or(r.peer) {
        Some(ip) => {
            let _ = write!(out, "{ip}");
        }
        None => out.push('-'),
    }
    out.push_str(" - - [");
    out.push_str(&clf_time(a));
    out.push_str("] \"");
    out.push_str(a.method.as_str());
    out.push(' ');
    clf_escape(out, &a.path);
    if let Some(q) = &a.query {
        out.push('?');
        clf_escape(out, q);
    }
    out.push(' ');
    out.push_str(a.protocol);
    let _ = write!(out, "\" {} ", o.status);
    match o.bytes_sent {
        Some(n) => {
            let _ = write!(out, "{n}");
        }
        None => out.push('-'),
    }
    for h in [http::header::REFERER, http::header::USER_AGENT] {
        let value = log
            .headers
            .iter()
            .position(|n| *n == h)
            .and_then(|i| a.headers[i].as_deref());
        out.push_str(" \"");
        clf_escape(out, value.unwrap_or("-"));
        out.push('"');
    }
}

/// Escapes quotes, backslashes and control characters as nginx does (`\xHH`).
fn clf_escape(out: &mut String, s: &str) {
    for c in s.chars() {
        if c == '"' || c == '\\' || (c as u32) < 0x20 || c == '\u{7f}' {
            let _ = write!(out, "\\x{:02X}", c as u32);
        } else {
            out.push(c);
        }
    }
}

/// `06/Dec/2026:22:23:00 +0000`.
fn clf_time(a: &Arrival) -> String {
    // (Combined only.)
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    let secs = a.at.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let (y, m, d) = civil_from_days(secs / 86_400);
    let rem = secs % 86_400;
    format!(
        "{d:02}/{}/{y}:{:02}:{:02}:{:02} +0000",
        MONTHS[(m - 1) as usize],
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// Year, month (1–12) and day of the Unix day `days` (Howard Hinnant's algorithm).
fn civil_from_days(days: u64) -> (u64, u64, u64) {
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + u64::from(m <= 2);
    (y, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn days_become_dates() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(20_428), (2025, 12, 6));
        assert_eq!(civil_from_days(11_016), (2000, 2, 29));
    }

    #[test]
    fn times_and_ids_are_written_as_logs_expect() {
        let at = UNIX_EPOCH + Duration::from_millis(1_796_600_000_123);
        assert_eq!(Rfc3339(at).to_string(), "2026-12-06T23:33:20.123Z");
        assert_eq!(TraceId(0xab).to_string(), format!("{:0>32}", "ab"));
    }

    #[test]
    fn strings_are_escaped() {
        let mut s = String::new();
        json_str(&mut s, "a\"b\\c\n\u{1}");
        assert_eq!(s, r#""a\"b\\c\n\u0001""#);
        let mut s = String::new();
        logfmt_str(&mut s, "plain");
        logfmt_str(&mut s, " with space");
        assert_eq!(s, r#"plain" with space""#);
        let mut s = String::new();
        clf_escape(&mut s, "a\"b");
        assert_eq!(s, r"a\x22b");
    }
}
