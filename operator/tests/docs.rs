//! The platform-team documentation: `docs/crd-reference.md` is what `refleet crds
//! --reference` generates from the CRDs (golden test), and every relative link in `docs/`
//! and `examples/README.md` points at a file that exists.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};

use refleet_operator::crdgen;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

#[test]
fn committed_crd_reference_matches_the_crds() {
    let want = crdgen::render_reference().unwrap();
    let have = std::fs::read_to_string(repo().join("docs/crd-reference.md")).unwrap_or_default();
    assert!(
        have == want,
        "docs/crd-reference.md is out of date: run \
         `cargo run -p refleet-operator --bin refleet -- crds --reference docs/crd-reference.md`"
    );
}

#[test]
fn crd_reference_documents_every_spec_field_with_its_description() {
    let reference = crdgen::render_reference().unwrap();
    for field in [
        "spec.defaults.capacity.users",
        "spec.regions[].name",
        "spec.reflectorURL.template",
        "spec.reflectorURL.perPodService",
        "spec.files.publicURL",
        "spec.storage.credentialsSecretRef.name",
        "spec.drainGracePeriodSeconds",
        "spec.namePattern",
        "spec.scaleUpThreshold",
        "spec.persistence",
        "status.shards[].state",
    ] {
        let row = reference
            .lines()
            .find(|l| l.starts_with(&format!("| `{field}` |")))
            .unwrap_or_else(|| panic!("no row for {field}"));
        let description = row.trim_end_matches(" |").rsplit(" | ").next().unwrap();
        assert!(description.len() > 10, "{field} has no description: {row}");
    }
    // Kubernetes types are named, not expanded.
    assert!(reference.contains("| `spec.defaults.affinity` | core/v1 Affinity |"));
    assert!(!reference.contains("nodeAffinity"));
    // Every CEL rule is listed with its message.
    assert!(reference.contains("| `spec` | set exactly one of name or namePattern |"));
}

/// Every relative link target (`](target)`) in a Markdown text, with its `#anchor`; code
/// blocks and code spans are not links.
fn relative_links(text: &str) -> Vec<String> {
    let mut prose = String::new();
    let mut fenced = false;
    for line in text.lines() {
        if line.trim_start().starts_with("```") {
            fenced = !fenced;
            continue;
        }
        if fenced {
            continue;
        }
        for (i, part) in line.split('`').enumerate() {
            if i % 2 == 0 {
                prose.push_str(part);
            }
        }
        prose.push('\n');
    }
    prose
        .split("](")
        .skip(1)
        .filter_map(|rest| rest.split(')').next())
        .map(str::to_owned)
        .filter(|t| !t.is_empty() && !t.contains("://") && !t.starts_with("mailto:"))
        .collect()
}

/// The anchors GitHub gives a Markdown page's headings: lowercase, spaces to `-`, other
/// punctuation dropped.
fn anchors(text: &str) -> Vec<String> {
    let mut fenced = false;
    let mut out = Vec::new();
    for line in text.lines() {
        if line.trim_start().starts_with("```") {
            fenced = !fenced;
        }
        if fenced || !line.starts_with('#') {
            continue;
        }
        let title = line.trim_start_matches('#').trim();
        out.push(
            title
                .chars()
                .filter_map(|c| match c {
                    ' ' => Some('-'),
                    c if c.is_alphanumeric() || c == '-' || c == '_' => {
                        Some(c.to_ascii_lowercase())
                    }
                    _ => None,
                })
                .collect(),
        );
    }
    out
}

#[test]
fn relative_links_in_the_docs_resolve() {
    let mut pages: Vec<PathBuf> = std::fs::read_dir(repo().join("docs"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "md"))
        .collect();
    pages.push(repo().join("examples/README.md"));
    pages.sort();
    assert!(pages.len() >= 6, "{pages:?}");
    let mut broken = Vec::new();
    for page in &pages {
        let text = std::fs::read_to_string(page).unwrap();
        for link in relative_links(&text) {
            let (file, anchor) = match link.split_once('#') {
                Some((file, anchor)) => (file.to_owned(), Some(anchor.to_owned())),
                None => (link.clone(), None),
            };
            let target = if file.is_empty() {
                page.clone()
            } else {
                page.parent().unwrap().join(&file)
            };
            if !target.exists() {
                broken.push(format!("{}: {link}", page.display()));
            } else if let Some(anchor) = anchor
                && target.is_file()
                && !anchors(&std::fs::read_to_string(&target).unwrap()).contains(&anchor)
            {
                broken.push(format!("{}: {link} (no such heading)", page.display()));
            }
        }
    }
    assert!(broken.is_empty(), "broken links: {broken:#?}");
}
