//! A tidy test, like rust-analyzer's: `ARCHITECTURE.md` names files and code, and this test
//! fails as soon as a name it uses no longer exists, so the map cannot drift from the code
//! again. It also holds the two documents that a newcomer reads first to their size.
//!
//! Every inline code span of `ARCHITECTURE.md` (text between single backticks, outside fenced
//! blocks) is classified by the first rule that fits:
//!
//! 1. **Config key**: `[section]` or `[section] key`: `[section]` must occur in
//!    `docs/configuration.md` and `key` as a word there.
//! 2. **Not a name**: a span with a space, `=`, a quote, `<`, `>` or `*`, or one that starts
//!    with `-` or a digit (`503 UNAVAILABLE`, `-D warnings`, `200`): skipped.
//! 3. **Path**: a span with `/` that ends in `.rs`, `.md`, `.toml`, `.sh` or `.conf`, or that
//!    starts with `crates/`, `docs/`, `bench/`, `scripts/`, `fuzz/`, `tests/` or `.ci/`: it must
//!    exist relative to the workspace root. Other spans with `/` (`/v1/auth`, an HTTP path) are
//!    skipped.
//! 4. **File name**: a span without `/` ending in one of those extensions (`held.rs`): a file of
//!    that name must exist somewhere under the workspace root.
//! 5. **Dotted config key**: `section.key` whose `[section]` is in `docs/configuration.md`:
//!    checked as in rule 1. Other dotted spans are skipped.
//! 6. **Crate name**: `keygate` or `keygate-…`: `crates/<name>` must be a directory.
//! 7. **Identifier**: a Rust path (`authorize`, `Holds`, `AuditLog::append`, `audit_methods!`,
//!    `lookup()`): every `::` segment must occur as a whole word in some `crates/**/*.rs` other
//!    than this file.
//! 8. Anything else is skipped.
//!
//! Beyond the spans: every directory in `crates/` has a `### \`crates/<name>\`` heading in the
//! code map, `ARCHITECTURE.md` stays under 9,000 bytes and `README.md` under 250 lines.

use std::fs;
use std::path::{Path, PathBuf};

const ROOT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../..");
const ARCHITECTURE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../ARCHITECTURE.md");
const EXTENSIONS: [&str; 5] = [".rs", ".md", ".toml", ".sh", ".conf"];
const TOP_DIRS: [&str; 7] = [
    "crates/", "docs/", "bench/", "scripts/", "fuzz/", "tests/", ".ci/",
];

fn read(path: &Path) -> String {
    fs::read_to_string(path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
}

/// Every file under `dir`, skipping `target`, `node_modules` and hidden directories.
fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let name = entry.file_name().to_string_lossy().into_owned();
        if path.is_dir() {
            if name != "target" && name != "node_modules" && !name.starts_with('.') {
                walk(&path, out);
            }
        } else {
            out.push(path);
        }
    }
}

/// The inline code spans of `md`, outside fenced blocks.
fn code_spans(md: &str) -> Vec<String> {
    let mut prose = String::new();
    let mut fenced = false;
    for line in md.lines() {
        if line.trim_start().starts_with("```") {
            fenced = !fenced;
        } else if !fenced {
            prose.push_str(line);
            prose.push('\n');
        }
    }
    prose
        .split('`')
        .skip(1)
        .step_by(2)
        .map(|s| s.replace('\n', " ").trim().to_owned())
        .collect()
}

fn is_word_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'_'
}

/// Whether `word` occurs in `text` with no identifier character on either side.
fn has_word(text: &str, word: &str) -> bool {
    let bytes = text.as_bytes();
    text.match_indices(word).any(|(i, _)| {
        let before = i.checked_sub(1).map(|j| bytes[j]);
        let after = bytes.get(i + word.len()).copied();
        !before.is_some_and(is_word_byte) && !after.is_some_and(is_word_byte)
    })
}

fn is_identifier(segment: &str) -> bool {
    let mut chars = segment.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// What a code span names, by the rules of the module documentation.
#[derive(Debug, PartialEq, Eq)]
enum Name<'a> {
    Config {
        section: &'a str,
        key: Option<&'a str>,
    },
    Path(&'a str),
    BareFile(&'a str),
    Crate(&'a str),
    Identifier(Vec<&'a str>),
    Skipped,
}

fn classify<'a>(span: &'a str, config_doc: &str) -> Name<'a> {
    if let Some(rest) = span.strip_prefix('[') {
        if let Some((section, key)) = rest.split_once(']') {
            let key = key.trim();
            let plain = |s: &str| s.bytes().all(|b| b.is_ascii_lowercase() || b == b'_');
            if !section.is_empty() && plain(&section.replace('.', "")) && plain(key) {
                let key = (!key.is_empty()).then_some(key);
                return Name::Config { section, key };
            }
        }
    }
    if span.is_empty()
        || span.contains([' ', '=', '"', '\'', '<', '>', '*'])
        || span.starts_with('-')
        || span.starts_with(|c: char| c.is_ascii_digit())
    {
        return Name::Skipped;
    }
    let has_extension = EXTENSIONS.iter().any(|e| span.ends_with(e));
    if span.contains('/') {
        return if has_extension || TOP_DIRS.iter().any(|d| span.starts_with(d)) {
            Name::Path(span)
        } else {
            Name::Skipped
        };
    }
    if has_extension {
        return Name::BareFile(span);
    }
    if let Some((section, key)) = span.rsplit_once('.') {
        return if config_doc.contains(&format!("[{section}]")) {
            Name::Config {
                section,
                key: Some(key),
            }
        } else {
            Name::Skipped
        };
    }
    if span == "keygate" || span.starts_with("keygate-") {
        return Name::Crate(span);
    }
    let path = span
        .strip_suffix("()")
        .or_else(|| span.strip_suffix('!'))
        .unwrap_or(span);
    let segments: Vec<&str> = path.split("::").collect();
    if segments.iter().all(|s| is_identifier(s)) {
        Name::Identifier(segments)
    } else {
        Name::Skipped
    }
}

#[test]
fn architecture_md_names_only_paths_and_code_that_exist() {
    let root = Path::new(ROOT);
    let architecture = read(Path::new(ARCHITECTURE));
    let config_doc = read(&root.join("docs/configuration.md"));
    let this_file = fs::canonicalize(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/architecture.rs"
    ))
    .ok();

    let mut files = Vec::new();
    walk(root, &mut files);
    let file_names: Vec<String> = files
        .iter()
        .filter_map(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
        .collect();
    let mut rust = Vec::new();
    walk(&root.join("crates"), &mut rust);
    let sources: String = rust
        .iter()
        .filter(|p| p.extension().is_some_and(|e| e == "rs"))
        .filter(|p| fs::canonicalize(p).ok() != this_file)
        .map(|p| read(p))
        .collect::<Vec<_>>()
        .join("\n");

    let mut problems = Vec::new();
    let mut checked = 0;
    for span in code_spans(&architecture) {
        let name = classify(&span, &config_doc);
        let missing = match &name {
            Name::Skipped => continue,
            Name::Config { section, key } => {
                !config_doc.contains(&format!("[{section}]"))
                    || key.is_some_and(|k| !has_word(&config_doc, k))
            }
            Name::Path(p) => !root.join(p.trim_end_matches('/')).exists(),
            Name::BareFile(f) => !file_names.iter().any(|n| n == f),
            Name::Crate(c) => !root.join("crates").join(c).is_dir(),
            Name::Identifier(segments) => segments.iter().any(|s| !has_word(&sources, s)),
        };
        checked += 1;
        if missing {
            problems.push(format!("`{span}` ({name:?})"));
        }
    }
    assert!(
        checked > 50,
        "only {checked} names checked: is the span parser broken?"
    );
    assert!(
        problems.is_empty(),
        "ARCHITECTURE.md names what does not exist (fix the map, or the name):\n  {}",
        problems.join("\n  ")
    );
}

#[test]
fn every_crate_has_a_heading_in_the_code_map() {
    let root = Path::new(ROOT);
    let architecture = read(Path::new(ARCHITECTURE));
    let mut missing = Vec::new();
    for entry in fs::read_dir(root.join("crates"))
        .into_iter()
        .flatten()
        .flatten()
    {
        if entry.path().is_dir() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let heading = format!("### `crates/{name}`");
            if !architecture.lines().any(|l| l.trim_end() == heading) {
                missing.push(heading);
            }
        }
    }
    assert!(
        missing.is_empty(),
        "ARCHITECTURE.md's code map lacks: {missing:?}"
    );
}

#[test]
fn the_first_two_documents_stay_short() {
    let root = Path::new(ROOT);
    let architecture = fs::metadata(ARCHITECTURE)
        .map(|m| m.len())
        .unwrap_or(u64::MAX);
    assert!(
        architecture < 9_000,
        "ARCHITECTURE.md is {architecture} bytes; keep it under 9,000 (move detail to docs/)"
    );
    let readme = read(&root.join("README.md")).lines().count();
    assert!(
        readme < 250,
        "README.md is {readme} lines; keep it under 250 (move detail to docs/)"
    );
}

#[test]
fn the_rules_classify_as_documented() {
    let config = "[proxy]\ntrusted = []\n[cache]\nttl_seconds = 300\n";
    assert_eq!(
        classify("[proxy] trusted", config),
        Name::Config {
            section: "proxy",
            key: Some("trusted")
        }
    );
    assert_eq!(
        classify("cache.ttl_seconds", config),
        Name::Config {
            section: "cache",
            key: Some("ttl_seconds")
        }
    );
    assert_eq!(classify("request.decided", config), Name::Skipped);
    assert_eq!(classify("503 UNAVAILABLE", config), Name::Skipped);
    assert_eq!(classify("/v1/auth", config), Name::Skipped);
    assert_eq!(classify("-D", config), Name::Skipped);
    assert_eq!(
        classify("crates/keygate-server/src/held.rs", config),
        Name::Path("crates/keygate-server/src/held.rs")
    );
    assert_eq!(classify("docs/", config), Name::Path("docs/"));
    assert_eq!(classify("held.rs", config), Name::BareFile("held.rs"));
    assert_eq!(
        classify("keygate-core", config),
        Name::Crate("keygate-core")
    );
    assert_eq!(
        classify("AuditLog::append", config),
        Name::Identifier(vec!["AuditLog", "append"])
    );
    assert_eq!(
        classify("audit_methods!", config),
        Name::Identifier(vec!["audit_methods"])
    );
    assert!(has_word("fn authorize(", "authorize"));
    assert!(!has_word("fn authorize_inner(", "authorize"));
}
