//! Markdown as GitHub reads it, through pulldown-cmark: heading anchors, links, code blocks
//! and code spans, and the small parsers the checks need (paths, `%XX`, URLs).

use std::collections::HashMap;
use std::path::{Component, Path, PathBuf};

use pulldown_cmark::{BrokenLink, CodeBlockKind, Event, LinkType, Options, Parser, Tag, TagEnd};

fn options() -> Options {
    Options::ENABLE_TABLES | Options::ENABLE_STRIKETHROUGH | Options::ENABLE_TASKLISTS
}

/// GitHub's anchor for a heading's text: lower case; letters, digits, `-` and `_` kept, spaces
/// turned into `-`, everything else dropped.
pub fn slug(text: &str) -> String {
    text.chars()
        .filter_map(|c| match c {
            ' ' => Some('-'),
            c if c.is_alphanumeric() || c == '-' || c == '_' => Some(c),
            _ => None,
        })
        .flat_map(char::to_lowercase)
        .collect()
}

/// Every anchor the headings of `text` produce, with GitHub's `-1`, `-2` suffixes on repeats.
pub fn anchors(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut seen: HashMap<String, usize> = HashMap::new();
    let mut heading: Option<String> = None;
    for event in Parser::new_ext(text, options()) {
        match event {
            Event::Start(Tag::Heading { .. }) => heading = Some(String::new()),
            Event::End(TagEnd::Heading(_)) => {
                let base = slug(&heading.take().unwrap_or_default());
                let n = seen.entry(base.clone()).or_insert(0);
                out.push(if *n == 0 {
                    base.clone()
                } else {
                    format!("{base}-{n}")
                });
                *n += 1;
            }
            Event::Text(t) | Event::Code(t) => {
                if let Some(h) = heading.as_mut() {
                    h.push_str(&t);
                }
            }
            _ => {}
        }
    }
    out
}

/// A link found in a document, with its 1-based line.
pub struct Link {
    pub line: usize,
    pub target: String,
}

/// What one document holds: its links and images, its code blocks' info strings (with line;
/// `None` for an indented block), its inline code spans, and reference links whose reference
/// is not defined.
pub struct Scan {
    pub links: Vec<Link>,
    pub code_blocks: Vec<(usize, Option<String>)>,
    pub code_spans: Vec<(usize, String)>,
    pub undefined_refs: Vec<(usize, String)>,
}

fn line_of(text: &str, offset: usize) -> usize {
    text[..offset].matches('\n').count() + 1
}

/// `href="..."` and `src="..."` values of raw HTML.
fn html_targets(html: &str) -> Vec<String> {
    let mut out = Vec::new();
    for attr in ["href=\"", "src=\""] {
        let mut rest = html;
        while let Some(at) = rest.find(attr) {
            rest = &rest[at + attr.len()..];
            if let Some(end) = rest.find('"') {
                out.push(rest[..end].to_string());
                rest = &rest[end..];
            }
        }
    }
    out
}

pub fn scan(text: &str) -> Scan {
    let mut broken = Vec::new();
    let mut links = Vec::new();
    let mut code_blocks = Vec::new();
    let mut code_spans = Vec::new();
    let callback = |link: BrokenLink<'_>| {
        // `[text]` alone is ordinary prose when no reference matches; `[text][ref]` and
        // `[text][]` are meant as links.
        if !matches!(
            link.link_type,
            LinkType::Shortcut | LinkType::ShortcutUnknown
        ) {
            broken.push((link.span.start, link.reference.to_string()));
        }
        None
    };
    let parser = Parser::new_with_broken_link_callback(text, options(), Some(callback));
    for (event, range) in parser.into_offset_iter() {
        let line = line_of(text, range.start);
        match event {
            Event::Start(Tag::Link { dest_url, .. })
            | Event::Start(Tag::Image { dest_url, .. }) => links.push(Link {
                line,
                target: dest_url.to_string(),
            }),
            Event::Start(Tag::CodeBlock(kind)) => code_blocks.push((
                line,
                match kind {
                    CodeBlockKind::Fenced(info) => Some(info.to_string()),
                    CodeBlockKind::Indented => None,
                },
            )),
            Event::Code(code) => code_spans.push((line, code.to_string())),
            Event::Html(html) | Event::InlineHtml(html) => links.extend(
                html_targets(&html)
                    .into_iter()
                    .map(|target| Link { line, target }),
            ),
            _ => {}
        }
    }
    let undefined_refs = broken
        .into_iter()
        .map(|(offset, reference)| (line_of(text, offset), reference))
        .collect();
    Scan {
        links,
        code_blocks,
        code_spans,
        undefined_refs,
    }
}

/// `%XX` escapes decoded (a link to `a%20b.md` names `a b.md`).
pub fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = bytes
            .get(i + 1..i + 3)
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match (bytes[i], hex) {
            (b'%', Some(b)) => {
                out.push(b);
                i += 3;
            }
            (b, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// `base/rel` with `.` and `..` resolved lexically; `None` when `..` climbs above the root.
pub fn resolve(base: &Path, rel: &str) -> Option<PathBuf> {
    let mut parts: Vec<String> = base
        .components()
        .map(|c| c.as_os_str().to_string_lossy().into_owned())
        .collect();
    for component in Path::new(rel).components() {
        match component {
            Component::CurDir => {}
            Component::ParentDir => {
                parts.pop()?;
            }
            Component::Normal(name) => parts.push(name.to_string_lossy().into_owned()),
            Component::RootDir | Component::Prefix(_) => return None,
        }
    }
    Some(parts.iter().collect())
}

/// Why an external URL is not well formed, if it is not.
pub fn bad_url(url: &str) -> Option<&'static str> {
    let rest = url
        .strip_prefix("https://")
        .or_else(|| url.strip_prefix("http://"))?;
    let host = rest.split(['/', '?', '#']).next().unwrap_or_default();
    let host = host.rsplit('@').next().unwrap_or_default();
    let name = host.split(':').next().unwrap_or_default();
    if url
        .chars()
        .any(|c| c.is_whitespace() || c == '`' || c == '<' || c == '>')
    {
        Some("contains whitespace, a backtick or an angle bracket")
    } else if name.is_empty() {
        Some("has no host")
    } else if !(name.contains('.') || name == "localhost")
        || name.starts_with('.')
        || name.ends_with('.')
        || name.contains("..")
    {
        Some("has no valid host name")
    } else if !name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.')
    {
        Some("has characters a host name cannot hold")
    } else {
        None
    }
}
