//! The module layers point only down: the lower modules (storage, credentials, policy, headers, config, keys,
//! clock, mail, sessions…) refer to nothing above them, and none of them speaks hyper. Read from the sources'
//! own `crate::` paths, so a new upward import fails here, not in a later refactoring.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Each lower module and its layer; a module may use only modules of a lower layer (and itself). Everything not
/// listed (gateway, router, portal, proxy, admin, cli, server, respond, notify, metrics, demo) is above them all.
const LAYERS: &[(&str, u8)] = &[
    ("files", 0),
    ("clock", 0),
    ("audit", 0),
    ("body", 0),
    ("normalize", 0),
    ("keys", 1),
    ("config", 1),
    ("pages", 1),
    ("tls", 1),
    ("store", 2),
    ("mail", 2),
    ("credentials", 3),
    ("signin", 3),
    ("policy", 3),
    ("headers", 3),
    ("notify", 3),
    ("metrics", 3),
    ("client", 4),
    ("session", 4),
    ("accounts", 4),
    ("respond", 5),
];

fn layer(module: &str) -> Option<u8> {
    LAYERS.iter().find(|(m, _)| *m == module).map(|(_, l)| *l)
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// The top-level module a source file belongs to (`src/store/postgres.rs` → `store`).
fn top_module(src: &Path, file: &Path) -> String {
    let rel = file.strip_prefix(src).unwrap();
    let first = rel.components().next().unwrap().as_os_str().to_string_lossy().to_string();
    first.trim_end_matches(".rs").to_string()
}

/// The crate modules a file's code names (`crate::x`, `use crate::{x, y}`), comments and unit tests left out.
fn references(code: &str) -> Vec<String> {
    let code = code.split("#[cfg(test)]").next().unwrap_or(code);
    let code: String = code.lines().map(|l| l.split("//").next().unwrap_or("")).collect::<Vec<_>>().join("\n");
    let mut refs = Vec::new();
    let ident = |s: &str| s.chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect::<String>();
    for (i, _) in code.match_indices("crate::") {
        let rest = &code[i + "crate::".len()..];
        if let Some(list) = rest.strip_prefix('{') {
            let list = &list[..list.find('}').unwrap_or(list.len())];
            refs.extend(list.split(',').map(|p| ident(p.trim())).filter(|s| !s.is_empty()));
        } else {
            refs.push(ident(rest));
        }
    }
    refs
}

#[test]
fn lower_layers_import_nothing_above_them_and_no_hyper() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let mut wrong: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut checked = 0;
    for f in &files {
        let me = top_module(&src, f);
        let Some(mine) = layer(&me) else { continue };
        checked += 1;
        let code = std::fs::read_to_string(f).unwrap();
        let name = f.strip_prefix(&src).unwrap().display().to_string();
        for r in references(&code) {
            if r == me || r == "Body" || r == "BoxError" {
                continue;
            }
            match layer(&r) {
                Some(l) if l < mine => {}
                _ => wrong.entry(name.clone()).or_default().push(format!("crate::{r}")),
            }
        }
        let body = code.split("#[cfg(test)]").next().unwrap_or(&code);
        if body.contains("hyper::") {
            wrong.entry(name).or_default().push("hyper::".into());
        }
    }
    assert!(checked >= 20, "only {checked} lower-layer files found under {}", src.display());
    assert!(wrong.is_empty(), "imports that point up (or sideways) from a lower layer: {wrong:#?}");
}

#[test]
fn the_reference_reader_sees_every_form_of_crate_path() {
    let code = "use crate::config::Config;\nuse crate::{gateway::Gateway, store};\nlet x = crate::portal::owns(a);\n\
                // crate::router in a comment\n#[cfg(test)]\nmod tests { use crate::cli; }";
    assert_eq!(references(code), ["config", "gateway", "store", "portal"]);
}

/// The top-level modules each file of `src/` names, by module (`lib.rs` left out: it only declares them).
fn module_graph(src: &Path) -> BTreeMap<String, std::collections::BTreeSet<String>> {
    let mut files = Vec::new();
    rust_files(src, &mut files);
    let modules: std::collections::BTreeSet<String> =
        files.iter().map(|f| top_module(src, f)).filter(|m| m != "lib" && m != "main").collect();
    let mut graph: BTreeMap<String, std::collections::BTreeSet<String>> = BTreeMap::new();
    for f in &files {
        let me = top_module(src, f);
        if !modules.contains(&me) {
            continue;
        }
        let refs = references(&std::fs::read_to_string(f).unwrap());
        let entry = graph.entry(me.clone()).or_default();
        entry.extend(refs.into_iter().filter(|r| *r != me && modules.contains(r)));
    }
    graph
}

/// A cycle in `graph`, if there is one (a depth-first search that meets a module still on its path).
fn find_cycle(graph: &BTreeMap<String, std::collections::BTreeSet<String>>) -> Option<Vec<String>> {
    fn visit(
        m: &str,
        graph: &BTreeMap<String, std::collections::BTreeSet<String>>,
        path: &mut Vec<String>,
        done: &mut std::collections::BTreeSet<String>,
    ) -> Option<Vec<String>> {
        if let Some(at) = path.iter().position(|p| p == m) {
            let mut cycle = path[at..].to_vec();
            cycle.push(m.to_string());
            return Some(cycle);
        }
        if done.contains(m) {
            return None;
        }
        path.push(m.to_string());
        for next in graph.get(m).into_iter().flatten() {
            if let Some(c) = visit(next, graph, path, done) {
                return Some(c);
            }
        }
        path.pop();
        done.insert(m.to_string());
        None
    }
    let mut done = std::collections::BTreeSet::new();
    graph.keys().find_map(|m| visit(m, graph, &mut Vec::new(), &mut done))
}

/// No two modules of `src/` reach each other, whatever their layer: the top layer (gateway, router, portal,
/// admin, proxy, server, cli) included.
#[test]
fn no_import_cycle_in_src() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let graph = module_graph(&src);
    assert!(graph.len() >= 25, "only {} modules found under {}", graph.len(), src.display());
    assert_eq!(find_cycle(&graph), None, "an import cycle between top-level modules of src/");
}

/// Each file of `src/` stays readable in one sitting: a file that grows past this is split along its seams.
#[test]
fn no_file_in_src_is_over_600_lines() {
    let mut files = Vec::new();
    rust_files(&Path::new(env!("CARGO_MANIFEST_DIR")).join("src"), &mut files);
    assert!(files.len() >= 60, "only {} files found", files.len());
    let long: Vec<String> = files
        .iter()
        .map(|f| (f, std::fs::read_to_string(f).unwrap().lines().count()))
        .filter(|(_, n)| *n > 600)
        .map(|(f, n)| format!("{} ({n} lines)", f.display()))
        .collect();
    assert!(long.is_empty(), "files over 600 lines: {long:?}");
}

#[test]
fn the_cycle_finder_finds_cycles() {
    let graph = |edges: &[(&str, &str)]| {
        let mut g: BTreeMap<String, std::collections::BTreeSet<String>> = BTreeMap::new();
        for (a, b) in edges {
            g.entry(a.to_string()).or_default().insert(b.to_string());
            g.entry(b.to_string()).or_default();
        }
        g
    };
    assert_eq!(find_cycle(&graph(&[("a", "b"), ("b", "c")])), None);
    let cycle = find_cycle(&graph(&[("a", "b"), ("b", "c"), ("c", "a")])).unwrap();
    assert_eq!((cycle.len(), cycle.first(), cycle.last()), (4, cycle.last(), cycle.first()), "{cycle:?}");
}
