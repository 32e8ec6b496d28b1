//! The page around both admin dashboards (proxy and controller): one look, no assets
//! fetched from anywhere, and a few lines of JavaScript that replace the body with a
//! fresh rendering (the same path with `?body`) every 3 s.

use maud::{html, Markup, PreEscaped, DOCTYPE};

const STYLE: &str = "body{font:14px system-ui,sans-serif;margin:0 2em;color:#111}\
header{display:flex;gap:1em;align-items:baseline}table{border-collapse:collapse;margin:.5em 0}\
td,th{padding:.25em .75em;border-bottom:1px solid #ddd;text-align:left;vertical-align:top}\
ul{margin:0;padding-left:1em}.ok{color:#15803d}.bad{color:#b91c1c}.note,.rule{color:#666}.rule{font-size:.9em}\
.draining{color:#b45309}code{background:#f3f4f6;padding:0 .25em}";

const SCRIPT: &str =
    "const local=()=>document.querySelectorAll('[data-unix-ms]').forEach(e=>{e.title=new Date(+e.dataset.unixMs).toLocaleString();});local();\
setInterval(async()=>{try{const r=await fetch(location.pathname+'?body',{credentials:'same-origin'});\
if(r.ok){document.getElementById('body').innerHTML=await r.text();local();}}catch(e){}},3000);";

/// A moment as "N s ago" (or min, h, days), with the local time on hover: the page's
/// script reads `data-unix-ms`. Never raw Unix seconds.
#[must_use]
pub fn when(unix_ms: u64) -> Markup {
    html! { span class="ago" data-unix-ms=(unix_ms) { (ago(unix_ms, now_ms())) } }
}

/// How long before `now_ms` the moment `unix_ms` was, in words.
#[must_use]
pub fn ago(unix_ms: u64, now_ms: u64) -> String {
    let secs = now_ms.saturating_sub(unix_ms) / 1000;
    match secs {
        0..=119 => format!("{secs} s ago"),
        120..=7199 => format!("{} min ago", secs / 60),
        7200..=172_799 => format!("{} h ago", secs / 3600),
        _ => format!("{} days ago", secs / 86_400),
    }
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// Certificates closer than this many days to their expiry are marked on both dashboards.
pub const WARN_DAYS: i64 = 14;

/// Whole days from `now` to `not_after` (Unix seconds; negative once expired), and
/// whether that is under [`WARN_DAYS`].
#[must_use]
pub fn days_left(not_after: i64, now: i64) -> (i64, bool) {
    let days = (not_after - now).div_euclid(86_400);
    (days, days < WARN_DAYS)
}

/// A whole dashboard page titled `title` around `body`, with `links` (text, path) to
/// the other dashboards served beside it.
#[must_use]
pub fn page(title: &str, subtitle: &str, links: &[(&str, &str)], body: &Markup) -> Markup {
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                title { (title) }
                style { (PreEscaped(STYLE)) }
            }
            body {
                header {
                    h1 { (title) }
                    span class="note" { (subtitle) " · refreshes every 3 s" }
                    @for (text, href) in links { a href=(href) { (text) } }
                }
                main id="body" { (body) }
                script { (PreEscaped(SCRIPT)) }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn moments_read_as_words() {
        assert_eq!(ago(1_000, 13_000), "12 s ago");
        assert_eq!(ago(0, 180_000), "3 min ago");
        assert_eq!(ago(0, 3 * 3_600_000), "3 h ago");
        assert_eq!(ago(0, 3 * 86_400_000), "3 days ago");
        assert_eq!(ago(5_000, 1_000), "0 s ago");
    }
}
