//! The module graph of every crate in the workspace, read from the sources' `crate::` and
//! `super::` paths: no module may take part in a cycle (sibling modules or top-level
//! layers that import each other), and `metrics` depends on nothing above it. A parent
//! and its own submodules may refer to each other (that is how a module exposes its
//! parts); everything else must form layers.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// `(module path, source)` of every `.rs` file under `src`, tests modules cut off.
fn modules(src: &Path) -> BTreeMap<String, String> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
        for e in std::fs::read_dir(dir).expect("readable source folder").flatten() {
            let p = e.path();
            if p.is_dir() {
                walk(&p, out);
            } else if p.extension().is_some_and(|x| x == "rs") {
                out.push(p);
            }
        }
    }
    let mut files = Vec::new();
    walk(src, &mut files);
    let mut out = BTreeMap::new();
    for f in files {
        let rel = f.strip_prefix(src).expect("under src").with_extension("");
        let mut parts: Vec<String> = rel.iter().map(|c| c.to_string_lossy().into_owned()).collect();
        if matches!(parts.last().map(String::as_str), Some("mod" | "lib" | "main")) {
            parts.pop();
        }
        let text = std::fs::read_to_string(&f).expect("readable source file");
        // Unit tests may reach anywhere; only the code that ships is layered.
        let code = text.split("#[cfg(test)]").next().unwrap_or("");
        let code: String = code.lines().filter(|l| !l.trim_start().starts_with("//")).collect::<Vec<_>>().join("\n");
        out.insert(parts.join("::"), code);
    }
    out
}

/// Paths that follow `prefix` in `code`, with `prefix::{a::b, c}` groups expanded.
fn paths_after(code: &str, prefix: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = code;
    while let Some(i) = rest.find(prefix) {
        let before = rest[..i].chars().next_back();
        rest = &rest[i + prefix.len()..];
        if before.is_some_and(|c| c.is_alphanumeric() || c == '_') {
            continue;
        }
        if let Some(group) = rest.strip_prefix('{') {
            let mut depth = 1;
            let end = group
                .char_indices()
                .find(|&(_, c)| {
                    depth += match c {
                        '{' => 1,
                        '}' => -1,
                        _ => 0,
                    };
                    depth == 0
                })
                .map_or(group.len(), |(j, _)| j);
            for item in group[..end].split(',') {
                out.push(ident_path(item.trim()));
            }
        } else {
            out.push(ident_path(rest));
        }
    }
    out
}

/// The leading `a::b::c` of `s`.
fn ident_path(s: &str) -> String {
    let end = s.find(|c: char| !(c.is_alphanumeric() || c == '_' || c == ':')).unwrap_or(s.len());
    s[..end].trim_end_matches(':').to_string()
}

/// Module-level dependency edges of one crate, parent/child pairs left out.
fn edges(mods: &BTreeMap<String, String>) -> BTreeMap<String, BTreeSet<String>> {
    let resolve = |path: &str| -> Option<String> {
        let parts: Vec<&str> = path.split("::").filter(|p| !p.is_empty()).collect();
        (1..=parts.len()).rev().map(|n| parts[..n].join("::")).find(|c| mods.contains_key(c))
    };
    let related = |a: &str, b: &str| a == b || a.starts_with(&format!("{b}::")) || b.starts_with(&format!("{a}::"));
    let mut g: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (m, code) in mods {
        let here: Vec<&str> = if m.is_empty() { vec![] } else { m.split("::").collect() };
        let mut targets = Vec::new();
        for p in paths_after(code, "crate::") {
            targets.extend(resolve(&p));
        }
        // `super::super::x` from a::b::c is a::x.
        for p in paths_after(code, "super::") {
            let mut ups = 1;
            let mut p = p.as_str();
            while let Some(r) = p.strip_prefix("super::") {
                ups += 1;
                p = r;
            }
            if ups > here.len() {
                continue;
            }
            let mut full: Vec<&str> = here[..here.len() - ups].to_vec();
            full.extend(p.split("::"));
            targets.extend(resolve(&full.join("::")));
        }
        for t in targets {
            if !related(m, &t) && !m.is_empty() && !t.is_empty() {
                g.entry(m.clone()).or_default().insert(t);
            }
        }
    }
    g
}

/// Strongly connected components with more than one member (Tarjan, iterative enough for
/// a few dozen modules).
fn cycles(g: &BTreeMap<String, BTreeSet<String>>) -> Vec<Vec<String>> {
    struct T<'a> {
        g: &'a BTreeMap<String, BTreeSet<String>>,
        index: BTreeMap<&'a str, usize>,
        low: BTreeMap<&'a str, usize>,
        stack: Vec<&'a str>,
        on: BTreeSet<&'a str>,
        out: Vec<Vec<String>>,
    }
    fn visit<'a>(t: &mut T<'a>, v: &'a str) {
        let i = t.index.len();
        t.index.insert(v, i);
        t.low.insert(v, i);
        t.stack.push(v);
        t.on.insert(v);
        if let Some(ws) = t.g.get(v) {
            for w in ws {
                if !t.index.contains_key(w.as_str()) {
                    visit(t, w);
                    let lw = t.low[w.as_str()];
                    let lv = t.low.get_mut(v).expect("visited");
                    *lv = (*lv).min(lw);
                } else if t.on.contains(w.as_str()) {
                    let iw = t.index[w.as_str()];
                    let lv = t.low.get_mut(v).expect("visited");
                    *lv = (*lv).min(iw);
                }
            }
        }
        if t.low[v] == t.index[v] {
            let mut comp = Vec::new();
            while let Some(w) = t.stack.pop() {
                t.on.remove(w);
                comp.push(w.to_string());
                if w == v {
                    break;
                }
            }
            if comp.len() > 1 {
                comp.sort();
                t.out.push(comp);
            }
        }
    }
    let mut t = T { g, index: BTreeMap::new(), low: BTreeMap::new(), stack: vec![], on: BTreeSet::new(), out: vec![] };
    let nodes: BTreeSet<&str> = g.keys().map(String::as_str).chain(g.values().flatten().map(String::as_str)).collect();
    for v in nodes {
        if !t.index.contains_key(v) {
            visit(&mut t, v);
        }
    }
    t.out
}

/// The same graph with every module folded into its top-level module.
fn top_level(g: &BTreeMap<String, BTreeSet<String>>) -> BTreeMap<String, BTreeSet<String>> {
    let top = |m: &str| m.split("::").next().unwrap_or(m).to_string();
    let mut out: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (a, bs) in g {
        for b in bs {
            if top(a) != top(b) {
                out.entry(top(a)).or_default().insert(top(b));
            }
        }
    }
    out
}

fn crate_sources() -> Vec<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut srcs = vec![root.join("src")];
    for e in std::fs::read_dir(root.join("crates")).expect("crates folder").flatten() {
        srcs.push(e.path().join("src"));
    }
    srcs
}

#[test]
fn no_module_takes_part_in_a_cycle() {
    let mut found = Vec::new();
    for src in crate_sources() {
        let g = edges(&modules(&src));
        for c in cycles(&g) {
            found.push(format!("{}: modules {c:?}", src.display()));
        }
        for c in cycles(&top_level(&g)) {
            found.push(format!("{}: top-level modules {c:?}", src.display()));
        }
    }
    assert!(found.is_empty(), "module cycles:\n{}", found.join("\n"));
}

#[test]
fn metrics_depends_on_nothing_above_it() {
    let g = edges(&modules(&Path::new(env!("CARGO_MANIFEST_DIR")).join("src")));
    let up = g.get("metrics").cloned().unwrap_or_default();
    assert!(up.is_empty(), "metrics imports {up:?}");
}

/// The checker itself: a planted cycle is found, in braces and through `super::`.
#[test]
fn the_checker_finds_a_planted_cycle() {
    let mut mods = BTreeMap::new();
    mods.insert("a".to_string(), "use crate::{b::X, c};".to_string());
    mods.insert("b".to_string(), "fn f() { crate::c::g() }".to_string());
    mods.insert("c".to_string(), String::new());
    mods.insert("c::d".to_string(), "use super::super::a::Y;".to_string());
    let g = edges(&mods);
    assert_eq!(g["a"], ["b".to_string(), "c".to_string()].into_iter().collect());
    // c::d -> a -> {b, c} and b -> c is no cycle between modules (c itself imports
    // nothing) ...
    assert!(cycles(&g).is_empty(), "{:?}", cycles(&g));
    // ... but folded to the top level, c -> a -> b -> c is one.
    assert_eq!(cycles(&top_level(&g)), vec![vec!["a".to_string(), "b".to_string(), "c".to_string()]]);
    // Two siblings that import each other.
    mods.insert("e::f".to_string(), "use super::g;".to_string());
    mods.insert("e::g".to_string(), "use crate::e::f::Z;".to_string());
    assert_eq!(cycles(&edges(&mods)), vec![vec!["e::f".to_string(), "e::g".to_string()]]);
}
