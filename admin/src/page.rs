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
    "setInterval(async()=>{try{const r=await fetch(location.pathname+'?body',{credentials:'same-origin'});\
if(r.ok){document.getElementById('body').innerHTML=await r.text();}}catch(e){}},3000);";

/// Certificates closer than this many days to their expiry are marked on both dashboards.
pub const WARN_DAYS: i64 = 14;

/// Whole days from `now` to `not_after` (Unix seconds; negative once expired), and
/// whether that is under [`WARN_DAYS`].
#[must_use]
pub fn days_left(not_after: i64, now: i64) -> (i64, bool) {
    let days = (not_after - now).div_euclid(86_400);
    (days, days < WARN_DAYS)
}

/// A whole dashboard page titled `title` around `body`.
#[must_use]
pub fn page(title: &str, subtitle: &str, body: &Markup) -> Markup {
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                title { (title) }
                style { (PreEscaped(STYLE)) }
            }
            body {
                header { h1 { (title) } span class="note" { (subtitle) " · refreshes every 3 s" } }
                main id="body" { (body) }
                script { (PreEscaped(SCRIPT)) }
            }
        }
    }
}
