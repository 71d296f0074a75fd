//! The module layering, checked on the source: no import cycle between top-level modules
//! of `src/`, and no lower module importing `proxy` or `server` (README, Architecture).
//!
//! Every `crate::a::...` path (in `use` trees, `{a, b::c}` groups included, and inline) and
//! every `super::` path that climbs out of its top-level module counts as an edge from the
//! file's top-level module to `a`. Comments, and `#[cfg(test)]` modules and `tests.rs`
//! files, are left out: a test importing its parent is no cycle in the design. `lib.rs`
//! (which wires everything) and `main.rs` (the binary) are not modules of the layering.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Modules below `proxy` and `server`: they never import either.
const LOWER: &[&str] = &[
    "acl",
    "cache",
    "connect",
    "config",
    "metrics",
    "access_log",
    "error",
    "limit",
    "state",
    "tracker",
    "net",
    "relay",
];

/// Each edge between top-level modules with the files that make it.
type Graph = BTreeMap<String, BTreeMap<String, BTreeSet<String>>>;

#[test]
fn no_import_cycles_between_top_level_modules() {
    let graph = graph();
    let cycles = strongly_connected(&graph);
    let mut report = String::new();
    for cycle in &cycles {
        report.push_str(&format!("cycle: {}\n", cycle.join(" <-> ")));
        for from in cycle {
            for (to, files) in &graph[from] {
                if cycle.contains(to) {
                    for file in files {
                        report.push_str(&format!("    {from} -> {to}  ({file})\n"));
                    }
                }
            }
        }
    }
    assert!(cycles.is_empty(), "import cycles in src/:\n{report}");
}

#[test]
fn lower_modules_never_import_proxy_or_server() {
    let graph = graph();
    let mut wrong = Vec::new();
    for lower in LOWER {
        for upper in ["proxy", "server"] {
            if let Some(files) = graph.get(*lower).and_then(|to| to.get(upper)) {
                for file in files {
                    wrong.push(format!("{lower} -> {upper}  ({file})"));
                }
            }
        }
    }
    assert!(
        wrong.is_empty(),
        "lower modules import upper ones:\n{}",
        wrong.join("\n")
    );
    // The list names real modules, so that a rename cannot empty the check.
    let modules = top_level_modules(&src());
    for lower in LOWER {
        assert!(modules.contains(*lower), "no module {lower} in src/");
    }
}

/// The checker itself, on small inputs.
#[test]
fn paths_are_read_as_rustc_reads_them() {
    let text = r##"
        //! See [`crate::proxy::Proxy`]: only a comment.
        use crate::{acl::Host, cache};
        use crate::metrics::{self, Metrics};
        use super::super::limit::Limits;
        fn f() { let _ = crate::error::ProxyError::Closed; let s = "crate::server"; }
        fn g<'a>(c: char) -> bool { c == '"' || c == '\'' }
        const T: &str = r#"crate::proxy "quoted""#;
        fn h() { crate::access_log::flush(); }
        #[cfg(test)]
        mod tests { use crate::state::Snapshot; }
    "##;
    let got = referenced_modules(text, &["connect".into(), "upstream".into()]);
    let want: BTreeSet<String> = ["acl", "cache", "metrics", "limit", "error", "access_log"]
        .into_iter()
        .map(String::from)
        .collect();
    assert_eq!(got, want);
    let graph: Graph = [("a", "b"), ("b", "c"), ("c", "a"), ("c", "d")]
        .into_iter()
        .fold(Graph::new(), |mut g, (x, y)| {
            g.entry(x.into()).or_default().entry(y.into()).or_default();
            g.entry(y.into()).or_default();
            g
        });
    assert_eq!(strongly_connected(&graph), vec![vec!["a", "b", "c"]]);
}

fn src() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

/// `a` for `src/a.rs` and `src/a/mod.rs`.
fn top_level_modules(src: &Path) -> BTreeSet<String> {
    std::fs::read_dir(src)
        .unwrap()
        .filter_map(|e| {
            let path = e.unwrap().path();
            let name = path.file_stem()?.to_str()?.to_owned();
            let is_module = if path.is_dir() {
                path.join("mod.rs").exists()
            } else {
                path.extension().is_some_and(|e| e == "rs") && name != "lib" && name != "main"
            };
            is_module.then_some(name)
        })
        .collect()
}

fn graph() -> Graph {
    let src = src();
    let modules = top_level_modules(&src);
    let mut files = Vec::new();
    collect_rs(&src, &mut files);
    let mut graph = Graph::new();
    for module in &modules {
        graph.entry(module.clone()).or_default();
    }
    for file in files {
        let rel = file.strip_prefix(&src).unwrap();
        let mut path: Vec<String> = rel
            .with_extension("")
            .components()
            .map(|c| c.as_os_str().to_string_lossy().into_owned())
            .collect();
        if path.last().is_some_and(|l| l == "mod") {
            path.pop();
        }
        if path.last().is_some_and(|l| l == "tests")
            || path.len() == 1 && !modules.contains(&path[0])
        {
            continue; // tests.rs, lib.rs, main.rs
        }
        let from = path[0].clone();
        let text = std::fs::read_to_string(&file).unwrap();
        for to in referenced_modules(&text, &path) {
            if to != from && modules.contains(&to) {
                graph
                    .entry(from.clone())
                    .or_default()
                    .entry(to)
                    .or_default()
                    .insert(rel.display().to_string());
            }
        }
    }
    graph
}

fn collect_rs(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            collect_rs(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The top-level modules that `text`, the source of module `path` (`["connect", "pool"]`),
/// refers to outside its own tree.
fn referenced_modules(text: &str, path: &[String]) -> BTreeSet<String> {
    let code = without_tests(&without_comments_and_strings(text));
    let mut out = BTreeSet::new();
    let bytes = code.as_bytes();
    let word_start =
        |i: usize| i == 0 || !(bytes[i - 1].is_ascii_alphanumeric() || bytes[i - 1] == b'_');
    let mut i = 0;
    while i < code.len() {
        let rest = &code[i..];
        if word_start(i) && rest.starts_with("crate::") {
            firsts(&rest["crate::".len()..], &mut out);
            i += "crate::".len();
        } else if word_start(i) && rest.starts_with("super::") {
            // `super::` from a module file climbs one level per `super`.
            let mut level = path.len();
            let mut after = rest;
            while let Some(r) = after.strip_prefix("super::") {
                level = level.saturating_sub(1);
                after = r.trim_start();
            }
            if level == 0 {
                firsts(after, &mut out);
            }
            i += rest.len() - after.len();
        } else {
            i += rest.chars().next().map_or(1, char::len_utf8);
        }
    }
    out
}

/// The first path segment after `crate::`: one name, or each item of a `{...}` group.
fn firsts(after: &str, out: &mut BTreeSet<String>) {
    let ident = |s: &str| -> String {
        s.trim_start()
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect()
    };
    let Some(group) = after.trim_start().strip_prefix('{') else {
        let name = ident(after);
        if !name.is_empty() {
            out.insert(name);
        }
        return;
    };
    let (mut depth, mut start) = (0usize, 0usize);
    for (i, c) in group.char_indices() {
        match c {
            '{' => depth += 1,
            '}' if depth == 0 => {
                out.insert(ident(&group[start..i]));
                break;
            }
            '}' => depth -= 1,
            ',' if depth == 0 => {
                out.insert(ident(&group[start..i]));
                start = i + 1;
            }
            _ => {}
        }
    }
    out.remove("");
    out.remove("self");
}

/// `text` with comments removed and string and char literals emptied (newlines kept).
fn without_comments_and_strings(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '/' if chars.peek() == Some(&'/') => {
                for c in chars.by_ref() {
                    if c == '\n' {
                        out.push('\n');
                        break;
                    }
                }
            }
            '/' if chars.peek() == Some(&'*') => {
                let mut previous = ' ';
                for c in chars.by_ref() {
                    if previous == '*' && c == '/' {
                        break;
                    }
                    previous = c;
                }
            }
            'r' if chars.peek() == Some(&'#') => {
                // r#"..."# (the only raw-string form with quotes inside worth handling)
                chars.next();
                if chars.peek() == Some(&'"') {
                    chars.next();
                    let mut previous = ' ';
                    for c in chars.by_ref() {
                        if previous == '"' && c == '#' {
                            break;
                        }
                        previous = c;
                    }
                    out.push_str("\"\"");
                } else {
                    out.push_str("r#");
                }
            }
            '\'' => {
                // A char literal ('x', '\n', '"') is skipped; a lifetime ('a) is kept.
                let mut ahead = chars.clone();
                match (ahead.next(), ahead.next()) {
                    (Some('\\'), _) => {
                        chars.next();
                        chars.next();
                        for c in chars.by_ref() {
                            if c == '\'' {
                                break;
                            }
                        }
                    }
                    (Some(_), Some('\'')) => {
                        chars.next();
                        chars.next();
                    }
                    _ => out.push(c),
                }
            }
            '"' => {
                out.push('"');
                let mut escaped = false;
                for c in chars.by_ref() {
                    if c == '"' && !escaped {
                        break;
                    }
                    escaped = c == '\\' && !escaped;
                }
                out.push('"');
            }
            _ => out.push(c),
        }
    }
    out
}

/// `code` without its `#[cfg(test)] mod name { ... }` blocks.
fn without_tests(code: &str) -> String {
    let mut out = String::new();
    let mut rest = code;
    while let Some(at) = rest.find("#[cfg(test)]") {
        out.push_str(&rest[..at]);
        let after = rest[at + "#[cfg(test)]".len()..].trim_start();
        let after_vis = after.strip_prefix("pub ").unwrap_or(after).trim_start();
        let Some(module) = after_vis.strip_prefix("mod ") else {
            out.push_str("#[cfg(test)]");
            rest = &rest[at + "#[cfg(test)]".len()..];
            continue;
        };
        let Some(open) = module.find(['{', ';']) else {
            break;
        };
        if module.as_bytes()[open] == b';' {
            rest = &module[open + 1..];
            continue;
        }
        let mut depth = 0usize;
        let mut end = module.len();
        for (i, c) in module[open..].char_indices() {
            match c {
                '{' => depth += 1,
                '}' => {
                    depth -= 1;
                    if depth == 0 {
                        end = open + i + 1;
                        break;
                    }
                }
                _ => {}
            }
        }
        rest = &module[end..];
    }
    out.push_str(rest);
    out
}

/// Tarjan's strongly connected components with more than one module, each sorted.
fn strongly_connected(graph: &Graph) -> Vec<Vec<String>> {
    struct State<'a> {
        graph: &'a Graph,
        index: BTreeMap<&'a str, usize>,
        low: BTreeMap<&'a str, usize>,
        stack: Vec<&'a str>,
        on_stack: BTreeSet<&'a str>,
        out: Vec<Vec<String>>,
    }
    fn visit<'a>(s: &mut State<'a>, v: &'a str) {
        let n = s.index.len();
        s.index.insert(v, n);
        s.low.insert(v, n);
        s.stack.push(v);
        s.on_stack.insert(v);
        let graph = s.graph;
        for w in graph[v].keys().map(String::as_str) {
            if !s.index.contains_key(w) {
                visit(s, w);
                let low = s.low[v].min(s.low[w]);
                s.low.insert(v, low);
            } else if s.on_stack.contains(w) {
                let low = s.low[v].min(s.index[w]);
                s.low.insert(v, low);
            }
        }
        if s.low[v] == s.index[v] {
            let mut component = Vec::new();
            while let Some(w) = s.stack.pop() {
                s.on_stack.remove(w);
                component.push(w.to_owned());
                if w == v {
                    break;
                }
            }
            if component.len() > 1 {
                component.sort();
                s.out.push(component);
            }
        }
    }
    let mut state = State {
        graph,
        index: BTreeMap::new(),
        low: BTreeMap::new(),
        stack: Vec::new(),
        on_stack: BTreeSet::new(),
        out: Vec::new(),
    };
    for v in graph.keys() {
        if !state.index.contains_key(v.as_str()) {
            visit(&mut state, v);
        }
    }
    state.out
}
