//! Credentials out of errors, logs and `Debug` views (invariant 8): the one parser every crate
//! of the workspace uses for connection strings.
//!
//! The parsers behind the adapters disagree on where a password ends (the `url` crate, used by
//! lapin and redis, ends the authority at the first `/`, `?` or `#` and the userinfo at the last
//! `@` before it; tokio-postgres ends the userinfo at the first `@`), and a password may hold
//! unencoded `/ ? # @ : %`. So the rules below mask a superset of what any of them reads as a
//! secret, and mask more rather than less when a string is ambiguous:
//!
//! - **URLs** (`scheme://…`: amqp, amqps, redis, rediss, redis+unix, unix, postgres,
//!   postgresql, …). The userinfo ends at the **last** `@` of the whole string. Its password
//!   (after the first `:`) is masked; its user is kept unless it holds one of `/ ? # & =` (then
//!   it is no plain user name and is masked too). The cost of the rule: a `@` in a path or query
//!   (`?application_name=a@b`) hides everything before it. Without any `@`, an authority that is
//!   not a list of `host[:port]` (e.g. `user:secret`) is masked with everything after it.
//! - **Query parameters**: after every `?` or `&`, the value of a secret key ([`is_secret_key`]:
//!   `password`, redis's `pass`, …) is masked up to the next `&`.
//! - **Key-value strings** (libpq's `host=h password='a b'`), read as tokio-postgres reads them
//!   (spaces around `=`, quoted values, `\` escapes): secret values are masked, and from the
//!   first place the string stops parsing everything is masked.
//! - **Anything else** with a `@` (`user:secret@host`, a Kafka bootstrap list holding
//!   credentials): everything before the last `@` is masked. Strings without `://`, `=` or `@`
//!   (`b1:9092,b2:9092`) hold no credentials and are returned as they are.
//!
//! ```
//! use reliable_core::redact::{host_and_path, redact_url, Scrubber};
//!
//! let url = "postgres://app:pa/ss@db:5432/shop?password=qs9";
//! assert_eq!(redact_url(url), "postgres://app:***@db:5432/shop?password=***");
//! assert_eq!(redact_url("host=db password='a b'"), "host=db password=***");
//! assert_eq!(host_and_path(url), Some(("db:5432", "/shop")));
//!
//! let mut scrubber = Scrubber::default();
//! scrubber.add_secrets_of(url);
//! assert_eq!(scrubber.scrub("login pa/ss refused"), "login *** refused");
//! ```

use std::fmt;
use std::ops::Range;

/// What every secret is replaced with.
pub const MASK: &str = "***";

/// Whether a setting or parameter called `name` holds a secret: its lower-cased name contains
/// `pass` (password, passphrase, redis's `pass`), `secret`, `sasl.username`,
/// `sasl.oauthbearer.config` or `key.pem`.
pub fn is_secret_key(name: &str) -> bool {
    const MARKERS: &[&str] = &[
        "pass",
        "secret",
        "sasl.username",
        "sasl.oauthbearer.config",
        "key.pem",
    ];
    let name = name.to_ascii_lowercase();
    MARKERS.iter().any(|m| name.contains(m))
}

/// `connection` (a URL, a key-value string or a bare address) with every secret replaced by
/// [`MASK`], by the rules of the [module docs](self).
pub fn redact_url(connection: &str) -> String {
    let mut out = String::with_capacity(connection.len());
    let mut shown = 0;
    for range in masks(connection) {
        out.push_str(&connection[shown..range.start]);
        out.push_str(MASK);
        shown = range.end;
    }
    out.push_str(&connection[shown..]);
    out
}

/// The parts of `connection` that [`redact_url`] masks, as written (not decoded), e.g. to
/// [`Scrubber::add`] them.
pub fn secrets(connection: &str) -> Vec<&str> {
    masks(connection)
        .into_iter()
        .map(|r| &connection[r])
        .filter(|s| !s.is_empty())
        .collect()
}

/// A URL's userinfo (`user:password`): everything between `://` and the last `@`, as
/// written. `None` for a string that is no `scheme://` URL or has no `@`.
pub fn userinfo(url: &str) -> Option<&str> {
    let rest = &url[rest_start(url)?..];
    rest.rfind('@').map(|at| &rest[..at])
}

/// A URL's `host[:port]` (a comma-separated list for multi-host URLs) and path, without
/// userinfo, query or fragment: `amqp://u:p@h:5672/v?x=1` gives `("h:5672", "/v")`.
/// `None` for a string that is no `scheme://` URL, or when [`redact_url`] masks any of them
/// (the host cannot be told from the credentials).
pub fn host_and_path(url: &str) -> Option<(&str, &str)> {
    let start = rest_start(url)?;
    let host_start = url[start..].rfind('@').map_or(start, |at| start + at + 1);
    let host_end = end_of(url, host_start, &['/', '?', '#']);
    let path_end = end_of(url, host_end, &['?', '#']);
    let shown = masks(url)
        .iter()
        .all(|m| m.end < host_start || m.start >= path_end || m.is_empty());
    shown.then(|| (&url[host_start..host_end], &url[host_end..path_end]))
}

/// Removes known secrets, and their percent-decoded forms, from text that goes into errors
/// and logs, e.g. a driver's message that may quote the password it was given.
#[derive(Clone, Default)]
pub struct Scrubber {
    /// Longest first, so a secret containing another is replaced whole.
    secrets: Vec<String>,
}

impl fmt::Debug for Scrubber {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Scrubber({} secret(s))", self.secrets.len())
    }
}

impl Scrubber {
    /// Scrubs `secret` (and its percent-decoded form) from now on; empty secrets are ignored.
    pub fn add(&mut self, secret: &str) {
        for s in [secret.to_owned(), percent_decode(secret)] {
            if !s.is_empty() && !self.secrets.contains(&s) {
                self.secrets.push(s);
            }
        }
        self.secrets.sort_by_key(|s| std::cmp::Reverse(s.len()));
    }

    /// Scrubs every one of the [`secrets`] of `connection` from now on.
    pub fn add_secrets_of(&mut self, connection: &str) {
        for secret in secrets(connection) {
            self.add(secret);
        }
    }

    /// `text` with every known secret replaced by [`MASK`].
    pub fn scrub(&self, text: &str) -> String {
        let mut out = text.to_owned();
        for s in &self.secrets {
            if out.contains(s.as_str()) {
                out = out.replace(s.as_str(), MASK);
            }
        }
        out
    }
}

/// Where a `scheme://` URL's rest begins (after `//`), if `s` is one. The scheme follows
/// RFC 3986 (a letter, then letters, digits, `+`, `-`, `.`).
fn rest_start(s: &str) -> Option<usize> {
    let (scheme, _) = s.split_once("://")?;
    let mut chars = scheme.chars();
    let valid = chars.next()?.is_ascii_alphabetic()
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'));
    valid.then_some(scheme.len() + 3)
}

/// The index of the first of `stops` in `s` at or after `from`, or the end of `s`.
fn end_of(s: &str, from: usize, stops: &[char]) -> usize {
    s[from..].find(stops).map_or(s.len(), |n| from + n)
}

/// The byte ranges of `s` to mask, sorted, overlapping and touching ones merged.
fn masks(s: &str) -> Vec<Range<usize>> {
    let mut masks = Vec::new();
    if let Some(start) = rest_start(s) {
        url_masks(s, start, &mut masks);
    } else if s.contains('=') {
        key_value_masks(s, &mut masks);
    } else if let Some(at) = s.rfind('@') {
        masks.push(0..at);
    }
    masks.sort_by_key(|r| r.start);
    let mut merged: Vec<Range<usize>> = Vec::with_capacity(masks.len());
    for r in masks {
        match merged.last_mut() {
            Some(last) if r.start <= last.end => last.end = last.end.max(r.end),
            _ => merged.push(r),
        }
    }
    merged
}

/// The masks of a URL whose rest (after `scheme://`) begins at `start`.
fn url_masks(s: &str, start: usize, masks: &mut Vec<Range<usize>>) {
    let rest = &s[start..];
    for (i, _) in rest.match_indices(['?', '&']) {
        let key_start = start + i + 1;
        let Some(eq) = s[key_start..].find('=').map(|n| key_start + n) else {
            break;
        };
        let key = &s[key_start..eq];
        if !key.contains(['?', '&', '#']) && is_secret_key(&percent_decode(key)) {
            masks.push(eq + 1..end_of(s, eq + 1, &['&']));
        }
    }
    match rest.rfind('@') {
        Some(at) => {
            let user_end = rest[..at].find(':').unwrap_or(at);
            if rest[..user_end].contains(['/', '?', '#', '&', '=']) {
                masks.push(start..start + at);
            } else if user_end < at {
                masks.push(start + user_end + 1..start + at);
            }
        }
        None => {
            let authority = &s[start..end_of(s, start, &['/', '?', '#'])];
            if !authority.split(',').all(is_host_port) {
                masks.push(start..s.len());
            }
        }
    }
}

/// Whether `entry` is `host`, `host:port` or `[v6]`, `[v6]:port` (the port all digits).
fn is_host_port(entry: &str) -> bool {
    let port = match entry.strip_prefix('[') {
        Some(v6) => match v6.split_once(']') {
            Some((_, "")) => "",
            Some((_, after)) => match after.strip_prefix(':') {
                Some(port) => port,
                None => return false,
            },
            None => return false,
        },
        None => entry.split_once(':').map_or("", |(_, port)| port),
    };
    port.bytes().all(|b| b.is_ascii_digit())
}

/// The masks of a libpq key-value string, parsed as tokio-postgres parses it.
fn key_value_masks(s: &str, masks: &mut Vec<Range<usize>>) {
    let mut i = 0;
    loop {
        i = skip_whitespace(s, i);
        if i == s.len() {
            return;
        }
        let Some((key, value)) = parameter(s, i) else {
            masks.push(i..s.len());
            return;
        };
        i = value.end;
        if is_secret_key(key) {
            masks.push(value);
        }
    }
}

/// The `key = value` parameter starting at `i`: its key and the range of its value. `None`
/// when it does not parse (a key that is no plain name, no `=`, a bad value).
fn parameter(s: &str, i: usize) -> Option<(&str, Range<usize>)> {
    let key_end = s[i..]
        .find(|c: char| c.is_whitespace() || c == '=')
        .map_or(s.len(), |n| i + n);
    let key = &s[i..key_end];
    let plain = !key.is_empty()
        && key
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'.');
    let eq = skip_whitespace(s, key_end);
    if !plain || !s[eq..].starts_with('=') {
        return None;
    }
    let start = skip_whitespace(s, eq + 1);
    Some((key, start..value_end(s, start)?))
}

/// Where the value at `start` ends: after its closing `'` when quoted, else at the next
/// whitespace; `\` escapes the next character. `None` when it is empty or unterminated.
fn value_end(s: &str, start: usize) -> Option<usize> {
    let quoted = s[start..].starts_with('\'');
    let mut chars = s[start..].char_indices().skip(usize::from(quoted));
    while let Some((n, c)) = chars.next() {
        match c {
            '\\' => {
                chars.next();
            }
            '\'' if quoted => return Some(start + n + 1),
            c if c.is_whitespace() && !quoted => return (n > 0).then_some(start + n),
            _ => {}
        }
    }
    (!quoted && start < s.len()).then_some(s.len())
}

/// The index of the first non-whitespace character of `s` at or after `from`.
fn skip_whitespace(s: &str, from: usize) -> usize {
    s[from.min(s.len())..]
        .find(|c: char| !c.is_whitespace())
        .map_or(s.len(), |n| from + n)
}

/// `%XX` escapes decoded; anything malformed is kept as it is.
fn percent_decode(s: &str) -> String {
    let hex = |b: u8| char::from(b).to_digit(16);
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if let (b'%', Some(h), Some(l)) = (
            bytes[i],
            bytes.get(i + 1).copied().and_then(hex),
            bytes.get(i + 2).copied().and_then(hex),
        ) {
            // Two hex digits make at most 255.
            out.push(u8::try_from(h * 16 + l).unwrap_or(b'%'));
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}
