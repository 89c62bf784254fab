//! `keygate scan PATH…`: finds keys of this deployment's format in files — by prefix, kind,
//! length and CRC32 checksum, offline — and reports each one's status without printing it.

use keygate_core::KeyFormat;
use std::path::{Path, PathBuf};

/// A key found in a file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    /// Where.
    pub path: PathBuf,
    /// 1-based line.
    pub line: usize,
    /// The key (kept in memory only, to look it up; never printed).
    pub key: String,
}

/// Files larger than this are skipped (logs and dumps; keys live in source and config).
const MAX_FILE_BYTES: u64 = 20 * 1024 * 1024;
/// Directories never entered.
const SKIP_DIRS: &[&str] = &[".git", "node_modules", "target", ".hg", ".svn"];

/// Walks `roots`, calling `progress` with the number of files read so far.
pub fn scan(
    format: &KeyFormat,
    roots: &[PathBuf],
    mut progress: impl FnMut(u64),
) -> Result<Vec<Finding>, String> {
    let mut out = Vec::new();
    let mut files = 0u64;
    let mut since_report = 0u32;
    let mut stack: Vec<PathBuf> = roots.to_vec();
    while let Some(p) = stack.pop() {
        let meta = std::fs::symlink_metadata(&p).map_err(|e| format!("{}: {e}", p.display()))?;
        if meta.is_dir() {
            let skip = p
                .file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| SKIP_DIRS.contains(&n));
            if skip && !roots.contains(&p) {
                continue;
            }
            let mut entries: Vec<PathBuf> = std::fs::read_dir(&p)
                .map_err(|e| format!("{}: {e}", p.display()))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .collect();
            // Reverse-sorted onto the stack: files come out in name order.
            entries.sort();
            entries.reverse();
            stack.extend(entries);
        } else if meta.is_file() && meta.len() <= MAX_FILE_BYTES {
            files += 1;
            since_report += 1;
            if since_report == 200 {
                since_report = 0;
                progress(files);
            }
            if let Ok(bytes) = std::fs::read(&p) {
                out.extend(scan_bytes(format, &p, &bytes));
            }
        }
    }
    progress(files);
    Ok(out)
}

/// Keys in one file's contents (binary files are read too: a key in a compiled bundle leaks
/// just the same).
pub fn scan_bytes(format: &KeyFormat, path: &Path, bytes: &[u8]) -> Vec<Finding> {
    let needle = format!("{}_", format.prefix());
    let len = format.key_len();
    let n = needle.as_bytes();
    let mut out = Vec::new();
    let mut line = 1usize;
    let mut last = 0usize;
    let mut i = 0usize;
    while i + len <= bytes.len() {
        if bytes[i..].starts_with(n)
            && (i == 0 || !(bytes[i - 1].is_ascii_alphanumeric() || bytes[i - 1] == b'_'))
            && bytes
                .get(i + len)
                .is_none_or(|b| !(b.is_ascii_alphanumeric() || *b == b'_'))
        {
            if let Ok(candidate) = std::str::from_utf8(&bytes[i..i + len]) {
                if format.parse(candidate).is_ok() {
                    line += bytes[last..i].iter().filter(|&&b| b == b'\n').count();
                    last = i;
                    out.push(Finding {
                        path: path.to_owned(),
                        line,
                        key: candidate.to_owned(),
                    });
                    i += len;
                    continue;
                }
            }
        }
        i += 1;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_checksummed_keys_on_their_lines_only() {
        let f = KeyFormat::new("kg").expect("format");
        let key = f.generate(keygate_core::Kind::Sk, |b| b.fill(7));
        let mut fake = key.clone();
        fake.pop();
        fake.push(if key.ends_with('A') { 'B' } else { 'A' });
        let text = format!("first\nTOKEN={key}\nbad={fake}\nx{key}\n\"{key}\",{key}\n");
        let found = scan_bytes(&f, Path::new("f"), text.as_bytes());
        let lines: Vec<usize> = found.iter().map(|x| x.line).collect();
        // Line 3 has a wrong checksum, line 4 a key glued to a word.
        assert_eq!(lines, vec![2, 5, 5]);
        assert!(found.iter().all(|x| x.key == key));
    }
}
