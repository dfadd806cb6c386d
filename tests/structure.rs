//! The source tree's shape, read from its files: inside every folder of `src/`, imports run one
//! way. A folder's `mod.rs` may use its children; a child never reaches back into its `mod.rs`
//! (for types, helpers or a `use super::*`), and no two children use each other, directly or
//! through others. A newcomer can then read any folder from its leaves up.
//!
//! Paths are read from the text: every `crate::…`, `super::…` and `self::…` path, `use` trees
//! expanded, test modules (`#[cfg(test)]` to the file's end) left out, since their `super` is
//! the file itself.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};

/// A source file and its module path (`["broker", "groups", "dispatch"]`).
struct SourceFile {
    path: PathBuf,
    module: Vec<String>,
    text: String,
}

fn source_files(root: &Path) -> Vec<SourceFile> {
    let mut out = Vec::new();
    let mut dirs = vec![root.to_path_buf()];
    while let Some(dir) = dirs.pop() {
        for entry in fs::read_dir(&dir).expect("read src") {
            let path = entry.expect("dir entry").path();
            if path.is_dir() {
                dirs.push(path);
                continue;
            }
            if path.extension().is_none_or(|e| e != "rs") {
                continue;
            }
            let rel = path.strip_prefix(root).expect("under src");
            let mut module: Vec<String> = rel
                .with_extension("")
                .iter()
                .map(|c| c.to_string_lossy().into_owned())
                .collect();
            if module.last().is_some_and(|l| l == "mod") {
                module.pop();
            }
            if module == ["lib"] || module == ["main"] {
                module.clear();
            }
            let text = fs::read_to_string(&path).expect("read source");
            out.push(SourceFile { path, module, text });
        }
    }
    out
}

/// A file's non-test code (up to its `#[cfg(test)]`) without comments, string and character
/// literals.
fn code(text: &str) -> String {
    let body = match text.find("#[cfg(test)]") {
        Some(i) => &text[..i],
        None => text,
    };
    let c: Vec<char> = body.chars().collect();
    let mut out = String::new();
    let mut i = 0;
    while i < c.len() {
        let at = |k: usize| c.get(i + k).copied().unwrap_or(' ');
        if at(0) == '/' && at(1) == '/' {
            while i < c.len() && c[i] != '\n' {
                i += 1;
            }
        } else if at(0) == '\'' && at(2) == '\'' {
            i += 3;
        } else if at(0) == '\'' && at(1) == '\\' && at(3) == '\'' {
            i += 4;
        } else if at(0) == 'r' && (at(1) == '"' || at(1) == '#' && at(2) == '"') {
            let hashes = if at(1) == '#' { 1 } else { 0 };
            i += 2 + hashes;
            while i < c.len() && !(c[i] == '"' && (hashes == 0 || c.get(i + 1) == Some(&'#'))) {
                i += 1;
            }
            i += 1 + hashes;
            out.push_str("\"\"");
        } else if at(0) == '"' {
            i += 1;
            while i < c.len() && c[i] != '"' {
                i += if c[i] == '\\' { 2 } else { 1 };
            }
            i += 1;
            out.push_str("\"\"");
        } else {
            out.push(c[i]);
            i += 1;
        }
    }
    out
}

fn is_ident(c: char) -> bool {
    c.is_alphanumeric() || c == '_'
}

/// A `use` tree without whitespace and without its renames (`a::B as C` is `a::B`).
fn without_renames(tree: &str) -> String {
    let mut out = String::new();
    let mut words = tree.split_whitespace();
    while let Some(word) = words.next() {
        if word == "as" {
            // The new name goes; the punctuation after it (`,`, `}`) stays.
            let rest = words.next().unwrap_or("");
            out.push_str(rest.trim_start_matches(is_ident));
        } else {
            out.push_str(word);
        }
    }
    out
}

/// Expands a `use` tree (`a::{b, c::{d, e}}`) into its paths.
fn expand(tree: &str) -> Vec<String> {
    let tree = without_renames(tree);
    let Some(open) = tree.find('{') else {
        return vec![tree];
    };
    let prefix = &tree[..open];
    let inner = &tree[open + 1..tree.rfind('}').unwrap_or(tree.len())];
    let mut parts = Vec::new();
    let (mut depth, mut start) = (0, 0);
    for (i, c) in inner.char_indices() {
        match c {
            '{' => depth += 1,
            '}' => depth -= 1,
            ',' if depth == 0 => {
                parts.push(&inner[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    parts.push(&inner[start..]);
    parts
        .into_iter()
        .filter(|p| !p.is_empty())
        .flat_map(expand)
        .map(|p| {
            if p == "self" {
                prefix.trim_end_matches("::").to_string()
            } else {
                format!("{prefix}{p}")
            }
        })
        .collect()
}

/// Every path a file's code names that starts at `crate`, `super` or `self`, made absolute.
fn paths(file: &SourceFile) -> Vec<Vec<String>> {
    let code = code(&file.text);
    let mut raw = Vec::new();
    // `use` trees first (they may hold braces), then paths anywhere else.
    let mut rest = code.as_str();
    let mut others = String::new();
    while let Some(i) = rest.find("use ") {
        let line = rest[..i].rsplit('\n').next().unwrap_or("").trim();
        let at_word = line.is_empty() || line.starts_with("pub");
        others.push_str(&rest[..i]);
        if !at_word {
            others.push_str("use ");
            rest = &rest[i + 4..];
            continue;
        }
        let end = rest[i..].find(';').map_or(rest.len(), |e| i + e);
        raw.extend(expand(&rest[i + 4..end]));
        rest = &rest[end..];
    }
    others.push_str(rest);
    let chars: Vec<char> = others.chars().collect();
    let mut i = 0;
    while i < chars.len() {
        let starts = ["crate::", "super::", "self::"]
            .iter()
            .find(|s| starts_with_at(&chars, i, s));
        match starts {
            Some(_) if i == 0 || !is_ident(chars[i - 1]) && chars[i - 1] != ':' => {
                let mut j = i;
                while j < chars.len() && (is_ident(chars[j]) || chars[j] == ':') {
                    j += 1;
                }
                raw.push(chars[i..j].iter().collect());
                i = j;
            }
            _ => i += 1,
        }
    }
    raw.into_iter()
        .filter_map(|p| absolute(&file.module, &p))
        .collect()
}

fn starts_with_at(chars: &[char], i: usize, s: &str) -> bool {
    s.chars()
        .enumerate()
        .all(|(k, c)| chars.get(i + k) == Some(&c))
}

fn absolute(module: &[String], path: &str) -> Option<Vec<String>> {
    let mut segments = path.split("::").filter(|s| !s.is_empty());
    let mut out: Vec<String> = match segments.next()? {
        "crate" => Vec::new(),
        "super" => module[..module.len().checked_sub(1)?].to_vec(),
        "self" => module.to_vec(),
        _ => return None,
    };
    for s in segments {
        if s == "super" {
            out.pop();
        } else {
            out.push(s.to_string());
        }
    }
    Some(out)
}

/// Per folder (module path), its children's uses of each other and of the folder's own file:
/// `(from child, to child or "mod.rs")`, with the file that does it.
fn arrows(
    files: &[SourceFile],
    root: &Path,
) -> BTreeMap<Vec<String>, BTreeSet<(String, String, String)>> {
    let mut out: BTreeMap<Vec<String>, BTreeSet<(String, String, String)>> = BTreeMap::new();
    for file in files {
        for path in paths(file) {
            // Every folder that holds both the file and the path's target.
            for depth in 0..file.module.len() {
                let folder = &file.module[..depth];
                let from = &file.module[depth];
                if path.len() < depth || path[..depth] != *folder {
                    continue;
                }
                let dir = folder.iter().fold(root.to_path_buf(), |d, s| d.join(s));
                if !dir.is_dir() {
                    continue;
                }
                let target = match path.get(depth) {
                    Some(t) if dir.join(format!("{t}.rs")).is_file() || dir.join(t).is_dir() => {
                        t.clone()
                    }
                    // An item of the folder's own file, or a glob of it.
                    Some(_) => "mod.rs".to_string(),
                    None => continue,
                };
                if target != *from {
                    let shown = file.path.strip_prefix(root).unwrap_or(&file.path);
                    out.entry(folder.to_vec()).or_default().insert((
                        from.clone(),
                        target,
                        shown.display().to_string(),
                    ));
                }
            }
        }
    }
    out
}

/// Whether child `a` uses child `b`, directly or through others.
fn reaches(edges: &BTreeSet<(String, String, String)>, a: &str, b: &str) -> bool {
    let mut seen = BTreeSet::new();
    let mut stack = vec![a];
    while let Some(n) = stack.pop() {
        for (_, m, _) in edges.iter().filter(|(f, _, _)| f == n) {
            if m == b {
                return true;
            }
            if seen.insert(m.as_str()) {
                stack.push(m);
            }
        }
    }
    false
}

/// Folders whose children share one state by design, with the reason. `storage/partition`: the
/// handle, its inbox, the writer and the writer pool are one state machine around `Shared` (a
/// pool serves partitions that hold their pool; the writer publishes into the state the handle
/// reads), kept in `mod.rs` so that the group-commit path stays one read. Splitting it is work of
/// its own, to be done with the log layer's replication changes.
const SHARED_STATE_FOLDERS: &[&str] = &["storage/partition"];

#[test]
fn imports_inside_every_folder_run_one_way() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let files = source_files(&root);
    let mut problems = Vec::new();
    for (folder, edges) in arrows(&files, &root) {
        if SHARED_STATE_FOLDERS.contains(&folder.join("/").as_str()) {
            continue;
        }
        let name = if folder.is_empty() {
            "src".to_string()
        } else {
            format!("src/{}", folder.join("/"))
        };
        for (from, to, file) in edges.iter().filter(|(_, to, _)| to == "mod.rs") {
            problems.push(format!("{name}: {file} ({from}) reaches back into {to}"));
        }
        for (from, to, file) in edges
            .iter()
            .filter(|(f, t, _)| t != "mod.rs" && reaches(&edges, t, f))
        {
            problems.push(format!(
                "{name}: {file} ({from}) uses {to}, which uses it back"
            ));
        }
    }
    assert!(
        problems.is_empty(),
        "{} back arrows:\n{}",
        problems.len(),
        problems.join("\n")
    );
}

#[test]
fn the_reader_sees_paths_the_way_rustc_does() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    for folder in SHARED_STATE_FOLDERS {
        assert!(
            root.join(folder).is_dir(),
            "{folder} is not a folder any more"
        );
    }
    let file = SourceFile {
        path: PathBuf::from("broker/groups/dispatch.rs"),
        module: vec!["broker".into(), "groups".into(), "dispatch".into()],
        text: "use super::{state::*, Weak};\nuse crate::broker::{self, error::{Error as E, Result}};\n\
               use super::clock as time;\n\
               fn f() { super::super::topic::key(); x::y(); }\n\
               #[cfg(test)]\nmod tests { use super::*; }\n"
            .into(),
    };
    let mut got = paths(&file);
    got.sort();
    let want: Vec<Vec<String>> = [
        "broker",
        "broker/error/Error",
        "broker/error/Result",
        "broker/groups/Weak",
        "broker/groups/clock",
        "broker/groups/state/*",
        "broker/topic/key",
    ]
    .iter()
    .map(|p| p.split('/').map(String::from).collect())
    .collect();
    assert_eq!(got, want);
}
