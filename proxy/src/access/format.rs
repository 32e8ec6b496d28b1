//! Access log lines: JSON (one object per line), logfmt, and the combined format of
//! nginx and Apache. Field names are [`rampart_config::ACCESS_LOG_FIELDS`]; a field
//! without a value (no upstream for a 404) is left out of JSON and logfmt and written
//! `-` in the combined format.

use std::fmt::Write as _;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

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
    /// When the request arrived (wall clock).
    pub at: SystemTime,
    /// From arrival to the end.
    pub duration: Duration,
}

/// A field's value. Numbers, times, ids and addresses are written by hand rather than
/// through `std::fmt` (a profile of the logging path had formatting machinery as its
/// largest part), and need no escaping.
#[derive(Clone, Copy)]
enum Value<'a> {
    /// Text that may need escaping.
    Str(&'a str),
    Num(u64),
    /// A duration in milliseconds with three decimals (microseconds).
    Ms(Duration),
    Bool(bool),
    /// RFC 3339, UTC, milliseconds.
    Time(SystemTime),
    /// 32 lowercase hex digits.
    TraceId(u128),
    Ip(IpAddr),
    Addr(SocketAddr),
}

impl Value<'_> {
    /// Whether the value is written as a JSON string (in quotes).
    fn quoted(self) -> bool {
        matches!(
            self,
            Value::Str(_) | Value::Time(_) | Value::TraceId(_) | Value::Ip(_) | Value::Addr(_)
        )
    }

    /// Writes a value that needs no escaping (any but [`Value::Str`]).
    fn write_plain(self, out: &mut String) {
        match self {
            Value::Str(s) => out.push_str(s),
            Value::Num(n) => push_u64(out, n),
            Value::Ms(d) => push_ms(out, d),
            Value::Bool(b) => out.push_str(if b { "true" } else { "false" }),
            Value::Time(t) => push_rfc3339(out, t),
            Value::TraceId(id) => crate::policy::trace::push_hex(out, &id.to_be_bytes()),
            Value::Ip(ip) => push_ip(out, ip),
            Value::Addr(addr) => {
                if addr.is_ipv6() {
                    out.push('[');
                    push_ip(out, addr.ip());
                    out.push(']');
                } else {
                    push_ip(out, addr.ip());
                }
                out.push(':');
                push_u64(out, u64::from(addr.port()));
            }
        }
    }
}

fn push_u64(out: &mut String, n: u64) {
    out.push_str(itoa::Buffer::new().format(n));
}

/// `d` in milliseconds with three decimals: `0.230`, `12.005`.
fn push_ms(out: &mut String, d: Duration) {
    let us = u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
    push_u64(out, us / 1000);
    out.push('.');
    push_digits(out, us % 1000, 3);
}

/// `n` as exactly `width` decimal digits (zero-padded; `n` < 10^width).
fn push_digits(out: &mut String, n: u64, width: u32) {
    let mut div = 10u64.pow(width - 1);
    while div > 0 {
        // A digit: the cast cannot truncate.
        #[allow(clippy::cast_possible_truncation)]
        out.push(char::from(b'0' + (n / div % 10) as u8));
        div /= 10;
    }
}

fn push_ip(out: &mut String, ip: IpAddr) {
    match ip {
        IpAddr::V4(v4) => {
            for (i, octet) in v4.octets().into_iter().enumerate() {
                if i > 0 {
                    out.push('.');
                }
                out.push_str(itoa::Buffer::new().format(octet));
            }
        }
        IpAddr::V6(v6) => {
            let _ = write!(out, "{v6}");
        }
    }
}

/// `2026-12-06T22:23:00.123Z`. The date and time of day are formatted once per second
/// and thread, the milliseconds per line.
fn push_rfc3339(out: &mut String, at: SystemTime) {
    thread_local! {
        static SECOND: std::cell::RefCell<(u64, String)> = const { std::cell::RefCell::new((u64::MAX, String::new())) };
    }
    let d = at.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs();
    SECOND.with_borrow_mut(|(cached, s)| {
        if *cached == secs {
            return out.push_str(s);
        }
        s.clear();
        let (y, m, day) = civil_from_days(secs / 86_400);
        let rem = secs % 86_400;
        push_digits(s, y % 10_000, 4);
        s.push('-');
        push_digits(s, m, 2);
        s.push('-');
        push_digits(s, day, 2);
        s.push('T');
        push_digits(s, rem / 3600, 2);
        s.push(':');
        push_digits(s, rem % 3600 / 60, 2);
        s.push(':');
        push_digits(s, rem % 60, 2);
        *cached = secs;
        out.push_str(s);
    });
    out.push('.');
    push_digits(out, u64::from(d.subsec_millis()), 3);
    out.push('Z');
}

/// Appends the record's line in `log`'s format, ending in `\n`, to `out`.
pub fn line(log: &AccessLogRt, r: &Record<'_>, out: &mut String) {
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
    put("time", Some(Value::Time(r.at)));
    let request_id = o.request_id.map(super::lossy);
    put("request_id", request_id.as_deref().map(Value::Str));
    put("trace_id", o.trace.map(|t| Value::TraceId(t.trace_id)));
    put("client", a.client.map(Value::Ip));
    put("peer", r.peer.map(Value::Ip));
    put("method", Some(Value::Str(a.method.as_str())));
    put("scheme", Some(Value::Str(r.scheme.as_str())));
    put("host", Some(Value::Str(a.host())));
    put("path", Some(Value::Str(a.path())));
    put("query", a.query().map(Value::Str));
    put("protocol", Some(Value::Str(a.protocol)));
    put("status", Some(Value::Num(u64::from(o.status))));
    put("bytes_received", a.body_len.map(Value::Num));
    put("bytes_sent", o.bytes_sent.map(Value::Num));
    put("duration_ms", Some(Value::Ms(r.duration)));
    put(
        "upstream",
        o.upstream.map(|(p, i)| Value::Addr(p.endpoints[i].addr)),
    );
    put(
        "upstream_status",
        o.upstream_status.map(|s| Value::Num(u64::from(s))),
    );
    put("upstream_connect_ms", o.upstream_connect.map(Value::Ms));
    put("upstream_ttfb_ms", o.upstream_ttfb.map(Value::Ms));
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

fn json(log: &AccessLogRt, r: &Record<'_>, out: &mut String) {
    out.push('{');
    let mut first = true;
    fields(log, r, |name, v| {
        if !first {
            out.push(',');
        }
        first = false;
        // Field names are plain identifiers.
        out.push('"');
        out.push_str(name);
        out.push_str("\":");
        match v {
            Value::Str(s) => json_str(out, s),
            v if v.quoted() => {
                out.push('"');
                v.write_plain(out);
                out.push('"');
            }
            v => v.write_plain(out),
        }
    });
    out.push('}');
}

/// Bytes a JSON string escapes: quote, backslash, control characters and DEL.
const JSON_ESCAPED: [bool; 256] = {
    let mut t = [false; 256];
    let mut b = 0;
    while b < 0x20 {
        t[b] = true;
        b += 1;
    }
    t[b'"' as usize] = true;
    t[b'\\' as usize] = true;
    t[0x7f] = true;
    t
};

/// `s` as a JSON string (quotes, backslashes and control characters escaped).
pub(crate) fn json_str(out: &mut String, s: &str) {
    out.push('"');
    // Most values need no escaping: checked by table, copied whole.
    if !s.bytes().any(|b| JSON_ESCAPED[usize::from(b)]) {
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
            v => v.write_plain(out),
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
    out.push_str(&clf_time(r.at));
    out.push_str("] \"");
    out.push_str(a.method.as_str());
    out.push(' ');
    clf_escape(out, a.path());
    if let Some(q) = a.query() {
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
fn clf_time(at: SystemTime) -> String {
    // (Combined only.)
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    let secs = at.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
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
    fn times_ids_numbers_and_addresses_are_written_as_logs_expect() {
        let plain = |v: Value<'_>| {
            let mut s = String::new();
            v.write_plain(&mut s);
            s
        };
        let at = UNIX_EPOCH + Duration::from_millis(1_796_600_000_123);
        assert_eq!(plain(Value::Time(at)), "2026-12-06T23:33:20.123Z");
        // The same second again (cached), then the next day.
        let later = at + Duration::from_millis(5);
        assert_eq!(plain(Value::Time(later)), "2026-12-06T23:33:20.128Z");
        let next = at + Duration::from_secs(86_400) - Duration::from_millis(123);
        assert_eq!(plain(Value::Time(next)), "2026-12-07T23:33:20.000Z");
        assert_eq!(plain(Value::TraceId(0xab)), format!("{:0>32}", "ab"));
        assert_eq!(
            plain(Value::TraceId(u128::MAX - 1)),
            format!("{:032x}", u128::MAX - 1)
        );
        assert_eq!(plain(Value::Ms(Duration::from_micros(230))), "0.230");
        assert_eq!(plain(Value::Ms(Duration::from_micros(12_005))), "12.005");
        assert_eq!(plain(Value::Ms(Duration::from_nanos(999))), "0.000");
        assert_eq!(plain(Value::Num(0)), "0");
        assert_eq!(plain(Value::Num(1_234_567)), "1234567");
        let v4: IpAddr = "203.0.113.7".parse().unwrap();
        assert_eq!(plain(Value::Ip(v4)), "203.0.113.7");
        let v6: SocketAddr = "[2001:db8::1]:8443".parse().unwrap();
        assert_eq!(plain(Value::Addr(v6)), "[2001:db8::1]:8443");
        let a: SocketAddr = "10.0.0.2:80".parse().unwrap();
        assert_eq!(plain(Value::Addr(a)), "10.0.0.2:80");
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
