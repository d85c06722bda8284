//! The error reference page, `GET /v1/errors`: docs/errors.md, embedded in
//! the binary and rendered once as HTML, each code's heading carrying the
//! code as its `id`, so that a problem's `type` (`/v1/errors#<code>`) leads
//! to the entry that says what causes it and what to do.

use pulldown_cmark::{html, Options, Parser};
use std::sync::OnceLock;

const SOURCE: &str = include_str!("../../docs/errors.md");

/// The page (rendered on first use).
pub fn page() -> &'static str {
    static PAGE: OnceLock<String> = OnceLock::new();
    PAGE.get_or_init(render)
}

fn render() -> String {
    // `## code` headings get the code as their anchor; links between the
    // documents (`api.md#...`) have no page here and lose their target.
    let md: String = SOURCE
        .lines()
        .map(|l| match l.strip_prefix("## ") {
            Some(code) if code.bytes().all(|b| b.is_ascii_lowercase() || b == b'_') => {
                format!("## {code} {{#{code}}}\n")
            }
            _ => format!("{l}\n"),
        })
        .collect();
    let mut body = String::with_capacity(md.len() * 2);
    html::push_html(
        &mut body,
        Parser::new_ext(&md, Options::ENABLE_TABLES | Options::ENABLE_HEADING_ATTRIBUTES),
    );
    format!(
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
         <title>pdvault error codes</title>\
         <style>body{{font:16px/1.5 system-ui,sans-serif;max-width:52rem;margin:2rem auto;padding:0 1rem}}\
         table{{border-collapse:collapse}}td,th{{border:1px solid #ccc;padding:.2rem .5rem}}\
         code,pre{{background:#f4f4f4}}pre{{padding:.5rem;overflow-x:auto}}</style></head>\
         <body>\n{body}</body></html>\n"
    )
}

#[cfg(test)]
mod tests {
    /// Every code the API documents has its entry (an anchor) on the page.
    #[test]
    fn every_problem_code_has_its_entry() {
        let page = super::page();
        for code in crate::http::apidoc::PROBLEM_CODES {
            assert!(
                page.contains(&format!("id=\"{code}\"")),
                "no entry for {code} on /v1/errors"
            );
        }
    }
}
