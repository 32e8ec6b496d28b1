//! Error pages of the operator's own (`[error_pages]`, a route's `error_pages`): the
//! body of the proxy's error answers in the form the client's `Accept` chose, with
//! `{status}`, `{title}`, `{detail}` and `{request_id}` filled in, escaped for that
//! form; and the upstream statuses whose responses are replaced by them (`intercept`).

use std::sync::Arc;

use anyhow::Context as _;
use bytes::Bytes;
use rampart_config::{ErrorPages, PageSource};

use super::answer::Style;

/// Largest page accepted.
const MAX_PAGE: usize = 1024 * 1024;

/// A route's error pages, loaded.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct ErrorPagesRt {
    html: Option<String>,
    json: Option<String>,
    text: Option<String>,
    /// Upstream statuses replaced by the page.
    pub intercept: Vec<u16>,
}

impl ErrorPagesRt {
    /// The pages of a route or pool that has `own` ones, merged with the global
    /// `global` ([`ErrorPagesRt::build`]); `None` when it has none of its own.
    ///
    /// # Errors
    /// A page file that cannot be read, is not UTF-8 or is over 1 MiB.
    pub fn own(
        own: Option<&ErrorPages>,
        global: Option<&ErrorPages>,
    ) -> anyhow::Result<Option<Arc<Self>>> {
        match own {
            Some(own) => Self::build(Some(own), global),
            None => Ok(None),
        }
    }

    /// The pages of a route with `own` over the global `global`, form by form (the
    /// route's `intercept` when it has pages, else the global one). `None` when
    /// neither has any.
    ///
    /// # Errors
    /// A page file that cannot be read, is not UTF-8 or is over 1 MiB.
    pub fn build(
        own: Option<&ErrorPages>,
        global: Option<&ErrorPages>,
    ) -> anyhow::Result<Option<Arc<Self>>> {
        if own.is_none() && global.is_none() {
            return Ok(None);
        }
        let pick = |f: fn(&ErrorPages) -> &Option<PageSource>, form: &str| {
            let source = own
                .and_then(|p| f(p).as_ref())
                .or_else(|| global.and_then(|p| f(p).as_ref()));
            source
                .map(|s| load(s).with_context(|| format!("error_pages.{form}")))
                .transpose()
        };
        Ok(Some(Arc::new(Self {
            html: pick(|p| &p.html, "html")?,
            json: pick(|p| &p.json, "json")?,
            text: pick(|p| &p.text, "text")?,
            intercept: own
                .or(global)
                .map(|p| p.intercept.clone())
                .unwrap_or_default(),
        })))
    }

    /// The page for an error answer in `style`, if there is one: its Content-Type
    /// is the form's.
    #[must_use]
    pub fn render(
        &self,
        style: Style,
        status: u16,
        title: &str,
        detail: &str,
        id: Option<&str>,
    ) -> Option<Bytes> {
        let (page, escape): (&str, fn(&str) -> String) = match style {
            Style::Html => (self.html.as_deref()?, html_escape),
            Style::Json => (self.json.as_deref()?, json_escape),
            Style::Text => (self.text.as_deref()?, str::to_string),
            Style::Grpc => return None,
        };
        let mut out = String::with_capacity(page.len() + 64);
        let mut rest = page;
        while let Some(at) = rest.find('{') {
            out.push_str(&rest[..at]);
            let tail = &rest[at..];
            let (value, len) = if tail.starts_with("{status}") {
                (status.to_string(), "{status}".len())
            } else if tail.starts_with("{title}") {
                (escape(title), "{title}".len())
            } else if tail.starts_with("{detail}") {
                (escape(detail), "{detail}".len())
            } else if tail.starts_with("{request_id}") {
                (escape(id.unwrap_or("")), "{request_id}".len())
            } else {
                ("{".to_string(), 1)
            };
            out.push_str(&value);
            rest = &tail[len..];
        }
        out.push_str(rest);
        Some(Bytes::from(out))
    }
}

fn load(source: &PageSource) -> anyhow::Result<String> {
    let text = match source {
        PageSource::Inline(text) => text.clone(),
        PageSource::File(path) => {
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?
        }
    };
    anyhow::ensure!(
        text.len() <= MAX_PAGE,
        "the page is {} bytes; keep it under 1 MiB (link images and styles instead of inlining them)",
        text.len()
    );
    Ok(text)
}

fn html_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// The inside of a JSON string.
fn json_escape(s: &str) -> String {
    let quoted = serde_json::to_string(s).unwrap_or_default();
    quoted
        .get(1..quoted.len().saturating_sub(1))
        .unwrap_or("")
        .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inline(s: &str) -> Option<PageSource> {
        Some(PageSource::Inline(s.to_string()))
    }

    #[test]
    fn a_route_page_wins_form_by_form_and_values_are_escaped_for_the_form() {
        let global = ErrorPages {
            html: inline("<h1>{status} {title}</h1><p>{detail}</p><small>{request_id}</small>"),
            json: inline(
                "{\"status\": {status}, \"id\": \"{request_id}\", \"detail\": \"{detail}\"}",
            ),
            text: None,
            intercept: vec![502],
        };
        let own = ErrorPages {
            text: inline("sorry ({status}) {x} {"),
            ..ErrorPages::default()
        };
        let pages = ErrorPagesRt::build(Some(&own), Some(&global))
            .unwrap()
            .unwrap();
        assert!(
            pages.intercept.is_empty(),
            "the route's intercept list applies"
        );
        let html = pages
            .render(Style::Html, 502, "Bad Gateway", "a <b> & c", Some("r-1"))
            .unwrap();
        assert_eq!(
            html,
            "<h1>502 Bad Gateway</h1><p>a &lt;b&gt; &amp; c</p><small>r-1</small>"
        );
        let json = pages
            .render(Style::Json, 503, "t", "say \"hi\"\n", Some("r-2"))
            .unwrap();
        let v: serde_json::Value = serde_json::from_slice(&json).unwrap();
        assert_eq!(v["detail"], "say \"hi\"\n");
        assert_eq!(v["status"], 503);
        assert_eq!(
            pages.render(Style::Text, 404, "t", "d", None).unwrap(),
            "sorry (404) {x} {"
        );
        assert_eq!(pages.render(Style::Grpc, 503, "t", "d", None), None);
        assert_eq!(ErrorPagesRt::build(None, None).unwrap(), None);
    }

    #[test]
    fn a_missing_or_huge_page_is_an_error_that_names_it() {
        let missing = ErrorPages {
            html: Some(PageSource::File("/nonexistent/rampart.html".into())),
            ..ErrorPages::default()
        };
        let e = format!(
            "{:#}",
            ErrorPagesRt::build(Some(&missing), None).unwrap_err()
        );
        assert!(
            e.contains("error_pages.html: reading /nonexistent/rampart.html"),
            "{e}"
        );
        let huge = ErrorPages {
            text: inline(&"x".repeat(MAX_PAGE + 1)),
            ..ErrorPages::default()
        };
        let e = format!("{:#}", ErrorPagesRt::build(None, Some(&huge)).unwrap_err());
        assert!(e.contains("under 1 MiB"), "{e}");
    }
}
