//! The readable table `refleet up` prints on stdout whenever the fleet changes.

use std::fmt::Write;

use super::fleet::Status;

/// Renders the fleet: every region's reflectors with the URL to join, then every shard.
pub fn render(status: &Status) -> String {
    let mut out = String::new();
    let reflectors: usize = status.regions.iter().map(|r| r.reflectors.len()).sum();
    let _ = writeln!(
        out,
        "== fleet: {} regions, {} reflectors, {} shards; files: {}",
        status.regions.len(),
        reflectors,
        status.shards.len(),
        status.files_url.as_deref().unwrap_or("-"),
    );
    let mut rows = vec![[
        "REGION".to_owned(),
        "REFLECTOR".to_owned(),
        "STATE".to_owned(),
        "USERS".to_owned(),
        "SHARDS".to_owned(),
        "BOX URL".to_owned(),
    ]];
    for region in &status.regions {
        if region.reflectors.is_empty() {
            rows.push([
                region.name.clone(),
                "-".into(),
                "-".into(),
                "-".into(),
                "-".into(),
                "-".into(),
            ]);
        }
        for r in &region.reflectors {
            rows.push([
                region.name.clone(),
                r.name.clone(),
                r.state.to_owned(),
                r.users.to_string(),
                if r.shards.is_empty() {
                    "-".into()
                } else {
                    r.shards.join(",")
                },
                r.url.clone().unwrap_or_else(|| "-".into()),
            ]);
        }
    }
    table(&mut out, &rows);
    if !status.shards.is_empty() {
        let mut rows = vec![[
            "SHARD".to_owned(),
            "SESSION".to_owned(),
            "APP".to_owned(),
            "PHASE".to_owned(),
            "USERS".to_owned(),
            "REFLECTOR".to_owned(),
        ]];
        for s in &status.shards {
            rows.push([
                s.name.clone(),
                format!("{}/{}", s.namespace, s.session),
                s.app_id.clone(),
                format!("{:?}", s.phase),
                s.users.to_string(),
                s.reflector.clone().unwrap_or_else(|| "(pending)".into()),
            ]);
        }
        table(&mut out, &rows);
    }
    out
}

fn table<const N: usize>(out: &mut String, rows: &[[String; N]]) {
    let mut widths = [0usize; N];
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    for row in rows {
        let mut line = String::new();
        for (i, (cell, w)) in row.iter().zip(widths).enumerate() {
            if i + 1 == N {
                line.push_str(cell);
            } else {
                let _ = write!(line, "{cell:<w$}  ");
            }
        }
        let _ = writeln!(out, "{}", line.trim_end());
    }
}
