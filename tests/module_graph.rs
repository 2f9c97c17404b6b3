//! The crate's modules import each other one way (see the map in `src/lib.rs`): this reads
//! every `crate::` path in `src/**/*.rs` (code and unit tests; comments and doc links are
//! skipped), maps each to the top-level module it names, and checks that the graph of
//! top-level modules has no circle and that the lower modules never reach up.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::Path;

/// Who must not import whom, besides "no circle": the limiter knows nothing of the layer,
/// the service or the settlement; the lower modules know none of those nor the limiter.
const MUST_NOT_IMPORT: &[(&[&str], &[&str])] = &[
    (
        &["limiter"],
        &["layer", "service", "settle", "future", "body"],
    ),
    (
        &[
            "algorithm",
            "capacity",
            "rule",
            "key",
            "cost",
            "store",
            "headers",
            "clock",
            "tier",
            "observe",
            "reject",
        ],
        &["limiter", "layer", "service", "settle", "future", "body"],
    ),
    // Pure arithmetic: no HTTP, no store, no rules.
    (&["algorithm"], &["rule", "key", "store", "clock"]),
];

type Graph = BTreeMap<String, BTreeSet<String>>;

#[test]
fn modules_import_one_way() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let graph = graph(&src);
    for must in ["limiter", "layer", "service", "settle", "algorithm", "rule"] {
        assert!(graph.contains_key(must), "no module `{must}` in {src:?}");
    }
    if let Some(circle) = find_circle(&graph) {
        panic!(
            "modules import each other in a circle: {}",
            circle.join(" -> ")
        );
    }
    for (from, forbidden) in MUST_NOT_IMPORT {
        for f in *from {
            for t in *forbidden {
                assert!(
                    !graph[*f].contains(*t),
                    "`{f}` imports `{t}`; the arrow must point the other way"
                );
            }
        }
    }
    // The arrows this layout exists for.
    for (f, t) in [
        ("layer", "limiter"),
        ("service", "limiter"),
        ("settle", "limiter"),
        ("rule", "algorithm"),
    ] {
        assert!(
            graph[f].contains(t),
            "`{f}` no longer imports `{t}`: update this test"
        );
    }
}

/// The top-level modules (from `lib.rs`) and, for each, the others its files name.
fn graph(src: &Path) -> Graph {
    let lib = strip_comments(&fs::read_to_string(src.join("lib.rs")).expect("read lib.rs"));
    let modules: BTreeSet<String> = lib
        .lines()
        .filter_map(|l| {
            let l = l.trim().strip_prefix("pub ").unwrap_or(l.trim());
            Some(l.strip_prefix("mod ")?.trim_end_matches(';').to_owned())
        })
        .collect();
    // `pub use module::{A, B};` at the root: `crate::A` is `module`'s.
    let mut root_names = BTreeMap::new();
    for item in lib.split(';') {
        let Some(used) = item.trim().strip_prefix("pub use ") else {
            continue;
        };
        let used: String = used.split_whitespace().collect();
        let (module, names) = used.split_once("::").expect("`pub use module::Name`");
        for name in names.trim_matches(|c| c == '{' || c == '}').split(',') {
            if !name.is_empty() {
                root_names.insert(name.to_owned(), module.to_owned());
            }
        }
    }
    let mut graph: Graph = modules
        .iter()
        .map(|m| (m.clone(), BTreeSet::new()))
        .collect();
    let mut files = Vec::new();
    rust_files(src, &mut files);
    for file in files {
        let rel = file.strip_prefix(src).unwrap();
        let first = rel.iter().next().unwrap().to_str().unwrap();
        let from = first.trim_end_matches(".rs");
        if from == "lib" {
            continue;
        }
        assert!(
            modules.contains(from),
            "{rel:?} is not in a module of lib.rs"
        );
        let text = strip_comments(&fs::read_to_string(&file).unwrap());
        for (path, line) in crate_paths(&text) {
            let head = &path[0];
            let to = if modules.contains(head) {
                head
            } else {
                root_names.get(head).unwrap_or_else(|| {
                    panic!("{rel:?}: `crate::{head}` ({line:?}) is neither a module nor re-exported at the root")
                })
            };
            if to != from {
                graph.get_mut(from).unwrap().insert(to.clone());
            }
        }
    }
    graph
}

fn rust_files(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
    for entry in fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The text without `//` comments (doc comments included; `://` in a URL string is kept).
fn strip_comments(text: &str) -> String {
    text.lines()
        .map(|l| {
            let mut from = 0;
            while let Some(i) = l[from..].find("//") {
                let at = from + i;
                if at > 0 && l.as_bytes()[at - 1] == b':' {
                    from = at + 2;
                    continue;
                }
                return &l[..at];
            }
            l
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// Every `crate::a::b` path (`$crate` excluded), with a grouped `use crate::{a, b::c}`
/// expanded to each of its members; each with the line it starts on.
fn crate_paths(text: &str) -> Vec<(Vec<String>, String)> {
    let mut out = Vec::new();
    let mut rest = text;
    while let Some(i) = rest.find("crate::") {
        let before = rest[..i].chars().next_back();
        let line = rest[..i].rsplit('\n').next().unwrap_or("").to_owned()
            + rest[i..].split('\n').next().unwrap_or("");
        rest = &rest[i + "crate::".len()..];
        if before.is_some_and(|c| c == '$' || c.is_alphanumeric() || c == '_') {
            continue;
        }
        if let Some(group) = rest.strip_prefix('{') {
            let end = group.find('}').expect("a closed `use crate::{...}` group");
            for member in group[..end].split(',') {
                let member = member.trim();
                if !member.is_empty() {
                    out.push((segments(member), line.clone()));
                }
            }
        } else {
            out.push((segments(rest), line));
        }
    }
    out
}

/// `a::b::C` at the start of `s`, as its identifier segments.
fn segments(s: &str) -> Vec<String> {
    let mut segs = Vec::new();
    let mut s = s;
    loop {
        let end = s
            .find(|c: char| !(c.is_alphanumeric() || c == '_'))
            .unwrap_or(s.len());
        if end == 0 {
            break;
        }
        segs.push(s[..end].to_owned());
        match s[end..].strip_prefix("::") {
            Some(next) => s = next,
            None => break,
        }
    }
    segs
}

/// A circle in `graph`, as the modules along it, if there is one (depth-first search).
fn find_circle(graph: &Graph) -> Option<Vec<String>> {
    fn visit<'a>(
        graph: &'a Graph,
        node: &'a str,
        path: &mut Vec<&'a str>,
        done: &mut BTreeSet<&'a str>,
    ) -> Option<Vec<String>> {
        if let Some(start) = path.iter().position(|n| *n == node) {
            let mut circle: Vec<String> = path[start..].iter().map(|n| n.to_string()).collect();
            circle.push(node.to_owned());
            return Some(circle);
        }
        if done.contains(node) {
            return None;
        }
        path.push(node);
        for next in &graph[node] {
            if let Some(c) = visit(graph, next, path, done) {
                return Some(c);
            }
        }
        path.pop();
        done.insert(node);
        None
    }
    let mut done = BTreeSet::new();
    graph
        .keys()
        .find_map(|n| visit(graph, n, &mut Vec::new(), &mut done))
}
