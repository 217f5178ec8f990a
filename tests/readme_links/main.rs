//! The documentation's links hold, and the README's code stays compiled (no broker needed).
//!
//! For README.md and every `.md` file under `docs/`:
//! * each relative link or image points at a file or folder of this repository (never outside
//!   it: no `../shared`, no absolute local path, no `file:` URL);
//! * each `#anchor`, in the same file or as `file.md#anchor`, is the GitHub slug of a heading
//!   of that file;
//! * each external link is a well formed `http(s)://host/...` URL (not fetched);
//! * no reference-style link names an undefined reference;
//! * each repository path a code span names (`reliable-core/tests/outbox.rs`, `docs/bench/`)
//!   exists.
//!
//! For README.md also: every fenced Rust block is tagged `rust` or `rust,no_run`, never `ignore`
//! (the facade's `ReadmeDoctests` compiles them), and no fence or indented block is untagged,
//! since rustdoc would compile that as Rust too.
//!
//! For the code, manifests and scripts: each `docs/....md` they name exists, and none names
//! `../shared` (design notes live in this repository).

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

mod markdown;

use markdown::{anchors, bad_url, percent_decode, resolve, scan, slug, Link};

/// The repository root (the facade crate is at the top of the workspace).
fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// README.md and every Markdown file under docs/, relative to the root, sorted.
fn documents() -> Vec<PathBuf> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
        let entries = fs::read_dir(dir).unwrap_or_else(|e| panic!("reading {dir:?}: {e}"));
        for entry in entries {
            let path = entry.expect("a directory entry").path();
            if path.is_dir() {
                walk(&path, out);
            } else if path.extension().is_some_and(|x| x == "md") {
                out.push(path);
            }
        }
    }
    let root = root();
    let mut docs = vec![root.join("README.md")];
    walk(&root.join("docs"), &mut docs);
    docs.sort();
    docs.iter()
        .map(|p| p.strip_prefix(&root).expect("under the root").to_path_buf())
        .collect()
}

/// Every problem with the links of `doc`, a path relative to the root.
fn link_problems(
    doc: &Path,
    text: &str,
    anchors_of: &mut BTreeMap<PathBuf, Vec<String>>,
) -> Vec<String> {
    let root = root();
    let dir = doc.parent().unwrap_or(Path::new(""));
    anchors_of.insert(doc.to_path_buf(), anchors(text));
    let scanned = scan(text);
    let mut problems = Vec::new();
    let mut report =
        |line: usize, what: String| problems.push(format!("{}:{line}: {what}", doc.display()));
    for (line, reference) in &scanned.undefined_refs {
        report(
            *line,
            format!("reference link `[{reference}]` has no definition"),
        );
    }
    for Link { line, target } in &scanned.links {
        let target = target.trim();
        if target.starts_with("http://") || target.starts_with("https://") {
            if let Some(why) = bad_url(target) {
                report(*line, format!("`{target}` {why}"));
            }
            continue;
        }
        if let Some(address) = target.strip_prefix("mailto:") {
            if !address.contains('@') {
                report(*line, format!("`{target}` is not an e-mail address"));
            }
            continue;
        }
        if target.is_empty() {
            report(*line, "empty link".to_string());
            continue;
        }
        if target.contains("://") || target.starts_with("file:") {
            report(
                *line,
                format!("`{target}`: only http(s) links may leave the repository"),
            );
            continue;
        }
        if target.starts_with('/') || target.starts_with('~') {
            report(
                *line,
                format!(
                    "`{target}` is an absolute path; link relative to {}",
                    doc.display()
                ),
            );
            continue;
        }
        let (path, anchor) = match target.split_once('#') {
            Some((path, anchor)) => (path, Some(anchor)),
            None => (target, None),
        };
        let path = percent_decode(path.split('?').next().unwrap_or_default());
        let file = if path.is_empty() {
            doc.to_path_buf()
        } else {
            match resolve(dir, &path) {
                Some(file) => file,
                None => {
                    report(*line, format!("`{target}` points outside the repository"));
                    continue;
                }
            }
        };
        if !root.join(&file).exists() {
            report(
                *line,
                format!("`{target}`: {} does not exist", file.display()),
            );
            continue;
        }
        let Some(anchor) = anchor else { continue };
        if file.extension().is_none_or(|x| x != "md") {
            continue; // anchors into source files (`#L10`) are GitHub's line marks, not headings
        }
        let known = anchors_of.entry(file.clone()).or_insert_with(|| {
            let text = fs::read_to_string(root.join(&file))
                .unwrap_or_else(|e| panic!("reading {}: {e}", file.display()));
            anchors(&text)
        });
        let anchor = percent_decode(anchor);
        if !known.contains(&anchor) {
            report(
                *line,
                format!(
                    "`{target}`: {} has no heading with the anchor `#{anchor}`",
                    file.display()
                ),
            );
        }
    }
    problems
}

#[test]
fn every_link_and_anchor_in_the_docs_resolves_inside_the_repository() {
    let mut anchors_of = BTreeMap::new();
    let mut problems = Vec::new();
    let docs = documents();
    assert!(
        docs.len() >= 2,
        "README.md and docs/design.md at least: {docs:?}"
    );
    let mut links = 0;
    for doc in &docs {
        let text = fs::read_to_string(root().join(doc)).expect("a readable document");
        links += scan(&text).links.len();
        problems.extend(link_problems(doc, &text, &mut anchors_of));
    }
    assert!(
        links > 10,
        "the scan found only {links} links: is the parser set up right?"
    );
    assert!(
        problems.is_empty(),
        "broken links:\n{}",
        problems.join("\n")
    );
}

/// Every README code block rustdoc would compile but that is not a plain `rust` or
/// `rust,no_run` block, and how many Rust blocks there are.
fn code_block_problems(text: &str) -> (Vec<String>, usize) {
    let mut problems = Vec::new();
    let mut rust = 0;
    for (line, info) in scan(text).code_blocks {
        let Some(info) = info else {
            problems.push(format!(
                "README.md:{line}: an indented code block is compiled as Rust by rustdoc; use a fenced block with a language"
            ));
            continue;
        };
        let tags: Vec<&str> = info
            .split([',', ' ', '\t'])
            .filter(|t| !t.is_empty())
            .collect();
        match tags.first() {
            None => problems.push(format!(
                "README.md:{line}: a fence without a language is compiled as Rust by rustdoc; tag it (`sh`, `text`, `rust,no_run`)"
            )),
            Some(&"rust") => {
                rust += 1;
                if !(tags == ["rust"] || tags == ["rust", "no_run"]) {
                    problems.push(format!(
                        "README.md:{line}: ```{info}: README Rust blocks are `rust` or `rust,no_run`, compiled by `ReadmeDoctests` in src/lib.rs (never `ignore`)"
                    ));
                }
            }
            Some(tag) if ["ignore", "no_run", "should_panic", "compile_fail"].contains(tag) => {
                problems.push(format!(
                    "README.md:{line}: ```{info}: start a Rust block with `rust` (`rust,no_run`)"
                ))
            }
            Some(_) => {}
        }
    }
    (problems, rust)
}

#[test]
fn readme_rust_blocks_are_compiled_doctests() {
    let text = fs::read_to_string(root().join("README.md")).expect("README.md");
    let (problems, rust) = code_block_problems(&text);
    assert!(rust > 0, "no Rust block found in README.md");
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

#[test]
fn ignored_and_untagged_blocks_are_refused() {
    let text = "```rust,no_run\nfn a() {}\n```\n\n```rust\nfn b() {}\n```\n\n```sh\nls\n```\n\n\
                ```rust,ignore\nx\n```\n\n```ignore\nx\n```\n\n```\nx\n```\n\ntext\n\n    indented\n";
    let (problems, rust) = code_block_problems(text);
    assert_eq!(rust, 3, "{problems:?}");
    assert_eq!(problems.len(), 4, "{problems:?}");
    assert!(problems[0].contains("rust,ignore"), "{problems:?}");
}

#[test]
fn slugs_follow_github() {
    assert_eq!(slug("Proof under faults"), "proof-under-faults");
    assert_eq!(
        slug("Auditing a live system: reliable doctor"),
        "auditing-a-live-system-reliable-doctor"
    );
    assert_eq!(
        slug("How a publish is answered (no future per message)"),
        "how-a-publish-is-answered-no-future-per-message"
    );
    assert_eq!(
        slug("Known broker limitation: fresh quorum queues and kill -9 (RabbitMQ 3.10)"),
        "known-broker-limitation-fresh-quorum-queues-and-kill--9-rabbitmq-310"
    );
    assert_eq!(
        anchors("# A `b_c`\n\n## A b_c\n\n```text\n# not a heading\n```\n"),
        ["a-b_c", "a-b_c-1"]
    );
}

#[test]
fn the_checks_catch_what_they_are_for() {
    let doc = Path::new("README.md");
    let text = "# Top\n\n[a](#top) [b](#nope) [c](../shared/x.md) [d](/etc/passwd) \
                [e](docs/design.md#nope) [f](docs/missing.md) [g](https://) [h][undefined] \
                [i](https://docs.rs/redb) [j](docs/design.md)\n";
    let problems = link_problems(doc, text, &mut BTreeMap::new());
    let joined = problems.join("\n");
    for bad in [
        "#nope`",
        "../shared",
        "/etc/passwd",
        "design.md#nope",
        "missing.md",
        "`https://`",
        "undefined",
    ] {
        assert!(joined.contains(bad), "{bad} not reported in:\n{joined}");
    }
    assert_eq!(problems.len(), 7, "{joined}");
}

/// The repository's own top-level entries that a path in the docs may start with (not the
/// build output, not the scripts' hidden data folders; `.ci` is part of the repository).
fn top_level() -> Vec<String> {
    fs::read_dir(root())
        .expect("the repository root")
        .map(|e| {
            e.expect("an entry")
                .file_name()
                .to_string_lossy()
                .into_owned()
        })
        .filter(|name| name == ".ci" || !(name.starts_with('.') || name == "target"))
        .collect()
}

/// `a/{b,c}.rs` as `a/b.rs` and `a/c.rs` (one brace group); other paths as they are.
fn expand(path: &str) -> Vec<String> {
    match (path.find('{'), path.find('}')) {
        (Some(open), Some(close)) if open < close => path[open + 1..close]
            .split(',')
            .map(|alt| format!("{}{alt}{}", &path[..open], &path[close + 1..]))
            .collect(),
        _ => vec![path.to_string()],
    }
}

#[test]
fn paths_the_docs_name_in_code_exist() {
    let root = root();
    let top = top_level();
    let mut problems = Vec::new();
    for doc in documents() {
        let text = fs::read_to_string(root.join(&doc)).expect("a readable document");
        for (line, span) in scan(&text).code_spans {
            let Some((first, rest)) = span.split_once('/') else {
                continue;
            };
            let last = rest.rsplit('/').next().unwrap_or_default();
            // A file (`x.rs`), a folder (`x/`) or a glob; `crate/feature` names are not paths.
            let is_path = span.ends_with('/') || last.contains('.') || span.contains('*');
            if span.contains(char::is_whitespace) || !top.iter().any(|t| t == first) || !is_path {
                continue;
            }
            for path in expand(&span) {
                // A glob is checked up to its folder.
                let path = match path.find('*') {
                    Some(star) => path[..star]
                        .rsplit_once('/')
                        .map_or("", |(dir, _)| dir)
                        .to_string(),
                    None => path,
                };
                if !root.join(&path).exists() {
                    problems.push(format!(
                        "{}:{line}: `{span}`: {path} does not exist",
                        doc.display()
                    ));
                }
            }
        }
    }
    assert!(
        problems.is_empty(),
        "paths named in the docs:\n{}",
        problems.join("\n")
    );
}

/// Every file of the workspace's code, manifests and scripts (not build output, not hidden
/// data folders), except this test, which names broken paths on purpose.
fn code_files() -> Vec<PathBuf> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
        for entry in fs::read_dir(dir).unwrap_or_else(|e| panic!("reading {dir:?}: {e}")) {
            let path = entry.expect("an entry").path();
            let name = path
                .file_name()
                .unwrap_or_default()
                .to_string_lossy()
                .into_owned();
            if path.is_dir() {
                if name == ".ci" || !(name.starts_with('.') || name == "target") {
                    walk(&path, out);
                }
            } else if name.ends_with(".rs") || name.ends_with(".toml") || !name.contains('.') {
                out.push(path);
            }
        }
    }
    let mut out = Vec::new();
    walk(&root(), &mut out);
    out.retain(|p| !p.starts_with(root().join("tests/readme_links")));
    out
}

#[test]
fn design_notes_the_code_names_are_in_the_repository() {
    let root = root();
    let mut problems = Vec::new();
    let mut named = 0;
    for file in code_files() {
        // A file that is not UTF-8 text names no design note.
        let Ok(text) = fs::read_to_string(&file) else {
            continue;
        };
        let shown = file
            .strip_prefix(&root)
            .unwrap_or(&file)
            .display()
            .to_string();
        for (n, line) in text.lines().enumerate() {
            if line.contains("../shared") {
                problems.push(format!(
                    "{shown}:{}: names ../shared, outside the repository",
                    n + 1
                ));
            }
            for (at, _) in line.match_indices("docs/") {
                let before = line[..at].chars().next_back();
                if before.is_some_and(|c| c.is_alphanumeric() || c == '_' || c == '-' || c == '.') {
                    continue; // part of a longer name
                }
                let path: String = line[at..]
                    .chars()
                    .take_while(|c| c.is_alphanumeric() || "_./-".contains(*c))
                    .collect();
                let path = path.trim_end_matches('.');
                named += usize::from(path.ends_with(".md"));
                if path.ends_with(".md") && !root.join(path).exists() {
                    problems.push(format!("{shown}:{}: {path} does not exist", n + 1));
                }
            }
        }
    }
    assert!(
        named > 0,
        "no `docs/*.md` named in the code: is the scan looking?"
    );
    assert!(
        problems.is_empty(),
        "design notes named in the code:\n{}",
        problems.join("\n")
    );
}
