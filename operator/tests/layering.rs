//! The module layering of every crate in the workspace, read from the source.
//!
//! For each crate's library (`src/lib.rs` and the `mod x;` it declares) this builds the graph of
//! top-level modules: `x` depends on `y` when a file under `src/x` (or `src/x.rs`) names
//! `crate::y` (a path or a `use crate::{y, ..}` group) or reaches `y` through enough `super::`
//! segments to climb out of `x`. Comments and string literals are skipped, so a doc link is not
//! a dependency. Then:
//!
//! - no crate may have a cycle between its top-level modules (the failure names the cycle and
//!   one line for each of its edges);
//! - the operator's modules keep the layer order stated in `operator/src/lib.rs`.
//!
//! Plain text parsing, no parser dependency: the crates are formatted by rustfmt and the paths
//! it looks for are plain.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// An edge `from -> to` and where it was first seen (`file:line`).
type Graph = BTreeMap<String, BTreeMap<String, String>>;

/// The top-level modules a crate's `src/lib.rs` declares with `mod x;`.
fn top_modules(src: &Path) -> BTreeSet<String> {
    let lib = std::fs::read_to_string(src.join("lib.rs")).unwrap();
    let code = strip(&lib);
    let mut modules = BTreeSet::new();
    for line in code.lines() {
        let words: Vec<&str> = line.split_whitespace().collect();
        if let Some(i) = words.iter().position(|w| *w == "mod")
            && let Some(name) = words.get(i + 1).and_then(|w| w.strip_suffix(';'))
        {
            modules.insert(name.to_string());
        }
    }
    modules
}

/// The source with comments and string/char literals blanked out (newlines kept, so line
/// numbers still match).
fn strip(text: &str) -> String {
    let c: Vec<char> = text.chars().collect();
    let mut out = String::with_capacity(text.len());
    let mut i = 0;
    let blank = |out: &mut String, ch: char| out.push(if ch == '\n' { '\n' } else { ' ' });
    while i < c.len() {
        let next = c.get(i + 1).copied();
        if c[i] == '/' && next == Some('/') {
            while i < c.len() && c[i] != '\n' {
                i += 1;
            }
        } else if c[i] == '/' && next == Some('*') {
            let mut depth = 0;
            while i < c.len() {
                if c[i] == '/' && c.get(i + 1) == Some(&'*') {
                    depth += 1;
                    i += 2;
                } else if c[i] == '*' && c.get(i + 1) == Some(&'/') {
                    depth -= 1;
                    i += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    blank(&mut out, c[i]);
                    i += 1;
                }
            }
        } else if c[i] == 'r'
            && (next == Some('"') || next == Some('#'))
            && (i == 0 || !(c[i - 1].is_alphanumeric() || c[i - 1] == '_'))
        {
            // Raw string r"..." / r#"..."#.
            let mut j = i + 1;
            let mut hashes = 0;
            while c.get(j) == Some(&'#') {
                hashes += 1;
                j += 1;
            }
            if c.get(j) != Some(&'"') {
                out.push(c[i]);
                i += 1;
                continue;
            }
            j += 1;
            loop {
                if j >= c.len() {
                    break;
                }
                if c[j] == '"' && (1..=hashes).all(|k| c.get(j + k) == Some(&'#')) {
                    j += 1 + hashes;
                    break;
                }
                blank(&mut out, c[j]);
                j += 1;
            }
            i = j;
        } else if c[i] == '"' {
            i += 1;
            while i < c.len() && c[i] != '"' {
                if c[i] == '\\' {
                    i += 1;
                }
                if i < c.len() {
                    blank(&mut out, c[i]);
                }
                i += 1;
            }
            i += 1;
        } else if c[i] == '\'' && (next == Some('\\') || c.get(i + 2) == Some(&'\'')) {
            // A char literal ('x' or '\n'); a lifetime ('a) has no closing quote.
            i += 1;
            while i < c.len() && c[i] != '\'' {
                if c[i] == '\\' {
                    i += 1;
                }
                i += 1;
            }
            i += 1;
        } else {
            out.push(c[i]);
            i += 1;
        }
    }
    out
}

fn is_ident(ch: char) -> bool {
    ch.is_alphanumeric() || ch == '_'
}

fn ident_at(c: &[char], mut i: usize) -> String {
    while c.get(i).is_some_and(|ch| ch.is_whitespace()) {
        i += 1;
    }
    c[i..].iter().take_while(|ch| is_ident(**ch)).collect()
}

/// The top-level modules a `crate::{...}` group starting at `i` (just after `{`) names.
fn group_heads(c: &[char], mut i: usize) -> Vec<String> {
    let mut heads = vec![ident_at(c, i)];
    let mut depth = 0;
    while i < c.len() {
        match c[i] {
            '{' => depth += 1,
            '}' if depth == 0 => break,
            '}' => depth -= 1,
            ',' if depth == 0 => heads.push(ident_at(c, i + 1)),
            _ => {}
        }
        i += 1;
    }
    heads
}

/// The top-level modules one file (at module depth `depth`: 1 for `src/x.rs` and
/// `src/x/mod.rs`, 2 for `src/x/y.rs`, ...) names, with the line of each.
fn references(code: &str, depth: usize) -> Vec<(String, usize)> {
    let c: Vec<char> = code.chars().collect();
    let mut found = Vec::new();
    let mut line = 1;
    // Brace depths at which an inline `mod name {` opened: each adds one to the module depth.
    let mut inline_mods: Vec<usize> = Vec::new();
    let mut braces = 0usize;
    let mut i = 0;
    while i < c.len() {
        let at_word = i == 0 || !(is_ident(c[i - 1]) || c[i - 1] == '$');
        match c[i] {
            '\n' => line += 1,
            '{' => braces += 1,
            '}' => {
                braces = braces.saturating_sub(1);
                if inline_mods.last() == Some(&braces) {
                    inline_mods.pop();
                }
            }
            _ => {}
        }
        let rest = || c[i..].iter().take(64).collect::<String>();
        if at_word && c[i] == 'm' && rest().starts_with("mod ") {
            let name = ident_at(&c, i + 4);
            let mut j = i + 4 + name.len();
            while c.get(j).is_some_and(|ch| ch.is_whitespace()) {
                j += 1;
            }
            if c.get(j) == Some(&'{') {
                inline_mods.push(braces);
            }
        }
        if at_word && c[i] == 'c' && rest().starts_with("crate::") {
            let after = i + "crate::".len();
            if c.get(after) == Some(&'{') {
                for head in group_heads(&c, after + 1) {
                    found.push((head, line));
                }
            } else {
                found.push((ident_at(&c, after), line));
            }
        }
        if at_word && c[i] == 's' && rest().starts_with("super::") {
            let mut ups = 0;
            let mut j = i;
            while c[j..].iter().take(7).collect::<String>() == "super::" {
                ups += 1;
                j += 7;
            }
            if ups == depth + inline_mods.len() {
                if c.get(j) == Some(&'{') {
                    for head in group_heads(&c, j + 1) {
                        found.push((head, line));
                    }
                } else {
                    found.push((ident_at(&c, j), line));
                }
            }
            i = j;
            continue;
        }
        i += 1;
    }
    found
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The graph of a crate's top-level modules, from the files under `src/`.
fn module_graph(krate: &str) -> Graph {
    let src = repo().join(krate).join("src");
    let modules = top_modules(&src);
    let mut graph: Graph = modules
        .iter()
        .map(|m| (m.clone(), BTreeMap::new()))
        .collect();
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    files.sort();
    for file in files {
        let rel = file.strip_prefix(&src).unwrap();
        let parts: Vec<String> = rel
            .with_extension("")
            .iter()
            .map(|p| p.to_string_lossy().into_owned())
            .collect();
        let top = parts[0].clone();
        if !modules.contains(&top) {
            continue; // lib.rs, main.rs and files of other targets.
        }
        let depth = parts.len() - usize::from(parts.last().is_some_and(|p| p == "mod"));
        let code = strip(&std::fs::read_to_string(&file).unwrap());
        for (to, line) in references(&code, depth) {
            if to != top && modules.contains(&to) {
                let at = format!("{krate}/src/{}:{line}", rel.display());
                graph.get_mut(&top).unwrap().entry(to).or_insert(at);
            }
        }
    }
    graph
}

/// A cycle in the graph (as the list of its modules, first repeated at the end), if any.
fn find_cycle(graph: &Graph) -> Option<Vec<String>> {
    fn visit(
        graph: &Graph,
        node: &str,
        path: &mut Vec<String>,
        done: &mut BTreeSet<String>,
    ) -> Option<Vec<String>> {
        if let Some(start) = path.iter().position(|n| n == node) {
            let mut cycle = path[start..].to_vec();
            cycle.push(node.to_string());
            return Some(cycle);
        }
        if done.contains(node) {
            return None;
        }
        path.push(node.to_string());
        for next in graph[node].keys() {
            if let Some(cycle) = visit(graph, next, path, done) {
                return Some(cycle);
            }
        }
        path.pop();
        done.insert(node.to_string());
        None
    }
    let mut done = BTreeSet::new();
    graph
        .keys()
        .find_map(|node| visit(graph, node, &mut Vec::new(), &mut done))
}

fn describe(graph: &Graph, cycle: &[String]) -> String {
    let edges: Vec<String> = cycle
        .windows(2)
        .map(|w| format!("  {} -> {} ({})", w[0], w[1], graph[&w[0]][&w[1]]))
        .collect();
    format!("{}\n{}", cycle.join(" -> "), edges.join("\n"))
}

fn render(graph: &Graph) -> String {
    graph
        .iter()
        .map(|(m, deps)| {
            let deps: Vec<&str> = deps.keys().map(String::as_str).collect();
            format!("  {m} -> {}", deps.join(", "))
        })
        .collect::<Vec<_>>()
        .join("\n")
}

#[test]
fn no_crate_has_a_cycle_between_its_top_level_modules() {
    for krate in [
        "api",
        "core",
        "reflector",
        "operator",
        "bench",
        "bench-route",
    ] {
        let graph = module_graph(krate);
        if let Some(cycle) = find_cycle(&graph) {
            panic!(
                "{krate}: cycle between top-level modules: {}\nthe graph:\n{}",
                describe(&graph, &cycle),
                render(&graph)
            );
        }
    }
}

/// The operator's layers, bottom first, as stated in `operator/src/lib.rs`: a module may
/// depend only on modules in lower layers, never on one in its own layer or above.
const OPERATOR_LAYERS: &[&[&str]] = &[
    &["crd"],
    &["crdgen"],
    &["router", "metrics", "secrets"],
    &["fleet", "gateway", "view"],
    &["controller", "local"],
    &["cli"],
];

#[test]
fn operator_modules_depend_only_on_lower_layers() {
    let graph = module_graph("operator");
    let layer_of = |m: &str| {
        OPERATOR_LAYERS
            .iter()
            .position(|layer| layer.contains(&m))
            .unwrap_or_else(|| panic!("operator module `{m}` has no layer in OPERATOR_LAYERS"))
    };
    let mut wrong = Vec::new();
    for layer in OPERATOR_LAYERS {
        for m in *layer {
            assert!(
                graph.contains_key(*m),
                "OPERATOR_LAYERS names `{m}`, which is no module"
            );
        }
    }
    for (from, deps) in &graph {
        for (to, at) in deps {
            if layer_of(to) >= layer_of(from) {
                wrong.push(format!("  {from} -> {to} ({at})"));
            }
        }
    }
    assert!(
        wrong.is_empty(),
        "operator modules that depend on their own or a higher layer \
         (layers, bottom first: {OPERATOR_LAYERS:?}):\n{}\nthe graph:\n{}",
        wrong.join("\n"),
        render(&graph)
    );
}

/// The operator's pure layers name no kube API machinery: the router, the metrics and the
/// backends' shared `fleet` layer take plain data (the CRDs' value types included) and are
/// tested without a cluster. (The planner is in `refleet-core`, which has no kube dependency
/// at all: `the_crate_graph_keeps_its_layers` checks.)
#[test]
fn router_metrics_and_fleet_name_no_kube_types() {
    let src = repo().join("operator/src");
    let mut files = Vec::new();
    for module in ["router", "fleet"] {
        rust_files(&src.join(module), &mut files);
    }
    files.push(src.join("metrics.rs"));
    let mut wrong = Vec::new();
    for file in files {
        let code = strip(&std::fs::read_to_string(&file).unwrap());
        for (n, line) in code.lines().enumerate() {
            if ["kube::", "k8s_openapi::", "kube_runtime::"]
                .iter()
                .any(|path| line.contains(path))
            {
                wrong.push(format!("  {}:{}", file.display(), n + 1));
            }
        }
    }
    assert!(
        wrong.is_empty(),
        "kube types in a pure layer:\n{}",
        wrong.join("\n")
    );
}

#[test]
fn the_parser_sees_the_paths_it_is_meant_to() {
    let code = strip(
        "use crate::a::X;\nuse crate::{b, c::{D, E}};\n// crate::f\nlet s = \"crate::g\";\n\
         mod tests {\n    use super::super::h::I;\n}\n$crate::j\nfn f<'a>(x: &'a str) -> char { 'k' }\n\
         let y = crate::l::m();\n",
    );
    let mut seen: Vec<String> = references(&code, 1).into_iter().map(|(m, _)| m).collect();
    seen.sort();
    assert_eq!(seen, ["a", "b", "c", "h", "l"]);
}

/// The workspace's crates, bottom first, as `refleet-core`'s docs draw them: a crate may
/// depend (normal or build dependencies) only on crates of lower layers. The benches sit on
/// top and may use anything below.
const CRATE_LAYERS: &[&[&str]] = &[
    &["refleet-core"],
    &["refleet-api"],
    &["refleet-files"],
    &["refleet-reflector", "refleet-operator"],
    &["refleet-bench", "refleet-fuzz"],
    &["refleet-route-bench", "refleet-scale-bench"],
];

/// The crate graph from `cargo metadata`: each workspace crate and the workspace crates its
/// normal and build dependencies name.
fn crate_graph() -> BTreeMap<String, BTreeSet<String>> {
    let out = std::process::Command::new(env!("CARGO"))
        .args([
            "metadata",
            "--format-version",
            "1",
            "--no-deps",
            "--offline",
        ])
        .current_dir(repo())
        .output()
        .expect("cargo metadata");
    assert!(out.status.success(), "cargo metadata failed");
    let meta: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let packages = meta["packages"].as_array().unwrap();
    let names: BTreeSet<String> = packages
        .iter()
        .map(|p| p["name"].as_str().unwrap().to_owned())
        .collect();
    packages
        .iter()
        .map(|p| {
            let deps = p["dependencies"]
                .as_array()
                .unwrap()
                .iter()
                .filter(|d| d["kind"].as_str() != Some("dev"))
                .map(|d| d["name"].as_str().unwrap().to_owned())
                .filter(|d| names.contains(d))
                .collect();
            (p["name"].as_str().unwrap().to_owned(), deps)
        })
        .collect()
}

#[test]
fn the_crate_graph_keeps_its_layers() {
    let graph = crate_graph();
    let layer_of = |c: &str| {
        CRATE_LAYERS
            .iter()
            .position(|layer| layer.contains(&c))
            .unwrap_or_else(|| panic!("workspace crate `{c}` has no layer in CRATE_LAYERS"))
    };
    let mut wrong = Vec::new();
    for (krate, deps) in &graph {
        for dep in deps {
            if layer_of(dep) >= layer_of(krate) {
                wrong.push(format!("  {krate} -> {dep}"));
            }
        }
    }
    assert!(
        wrong.is_empty(),
        "crates that depend on their own or a higher layer (bottom first: {CRATE_LAYERS:?}):\n{}\nthe graph: {graph:?}",
        wrong.join("\n")
    );
    // The pure core names no kube, no runtime and no I/O crate at all.
    let core = std::fs::read_to_string(repo().join("core/Cargo.toml")).unwrap();
    for banned in [
        "kube",
        "k8s-openapi",
        "tokio",
        "object_store",
        "axum",
        "tonic",
    ] {
        assert!(
            !core
                .lines()
                .any(|l| l.starts_with(&format!("{banned} "))
                    || l.starts_with(&format!("{banned}."))),
            "refleet-core depends on {banned}"
        );
    }
}
