//! `refleet up --demo DIR`: the files of one directory at `/demo/`, so that a browser demo
//! (a page, the client's bundle, the route helper) shares an origin with `/v1/route` and
//! `/files/`. Read-only, no directory listing; `/demo/` is `index.html`. Only normal path
//! segments are served: `..`, hidden names and anything not a regular file answer 404.

use std::path::{Component, Path, PathBuf};

use axum::extract::State;
use axum::http::{StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;

/// The `/demo/` routes for `dir` (absolute).
pub fn app(dir: PathBuf) -> axum::Router {
    axum::Router::new()
        .route(
            "/demo",
            get(|| async { axum::response::Redirect::permanent("/demo/") }),
        )
        .route("/demo/", get(file))
        .route("/demo/{*path}", get(file))
        .with_state(dir)
}

/// The file `uri` names under `dir`, or `None` for anything but plain names.
fn resolve(dir: &Path, uri: &Uri) -> Option<PathBuf> {
    let rest = uri.path().strip_prefix("/demo/")?;
    let rest = if rest.is_empty() { "index.html" } else { rest };
    let mut path = dir.to_path_buf();
    for part in Path::new(rest).components() {
        match part {
            Component::Normal(name) if !name.to_string_lossy().starts_with('.') => {
                path.push(name);
            }
            _ => return None,
        }
    }
    Some(path)
}

fn content_type(path: &Path) -> &'static str {
    match path.extension().and_then(|e| e.to_str()) {
        Some("html") => "text/html; charset=utf-8",
        Some("js" | "mjs") => "text/javascript; charset=utf-8",
        Some("css") => "text/css; charset=utf-8",
        Some("json" | "map") => "application/json",
        Some("svg") => "image/svg+xml",
        Some("png") => "image/png",
        _ => "application/octet-stream",
    }
}

async fn file(State(dir): State<PathBuf>, uri: Uri) -> Response {
    let not_found = || (StatusCode::NOT_FOUND, "not found\n").into_response();
    let Some(path) = resolve(&dir, &uri) else {
        return not_found();
    };
    // Symlinks are followed (a demo dir may link the installed client bundle).
    match tokio::fs::metadata(&path).await {
        Ok(m) if m.is_file() => {}
        _ => return not_found(),
    }
    match tokio::fs::read(&path).await {
        Ok(bytes) => (
            [
                (header::CONTENT_TYPE, content_type(&path)),
                (header::CACHE_CONTROL, "no-cache"),
                (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            ],
            bytes,
        )
            .into_response(),
        Err(e) => {
            tracing::debug!(path = %path.display(), error = %e, "demo file not read");
            not_found()
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn uri(s: &str) -> Uri {
        s.parse().unwrap()
    }

    #[test]
    fn only_plain_names_under_the_directory_resolve() {
        let dir = Path::new("/srv/demo");
        assert_eq!(
            resolve(dir, &uri("/demo/")).unwrap(),
            Path::new("/srv/demo/index.html")
        );
        assert_eq!(
            resolve(dir, &uri("/demo/lib/client.min.js")).unwrap(),
            Path::new("/srv/demo/lib/client.min.js")
        );
        for bad in [
            "/demo/../etc/passwd",
            "/demo/lib/../../x",
            "/demo/.git/config",
            "/demo//etc/passwd",
        ] {
            let got = resolve(dir, &uri(bad));
            assert!(
                got.as_ref().is_none_or(|p| p.starts_with(dir)),
                "{bad} resolved to {got:?}"
            );
            assert!(
                got.as_ref()
                    .is_none_or(|p| !p.to_string_lossy().contains("..")),
                "{bad}: {got:?}"
            );
        }
        assert!(resolve(dir, &uri("/demo/../etc/passwd")).is_none());
        assert!(resolve(dir, &uri("/demo/.git/config")).is_none());
        assert_eq!(
            content_type(Path::new("a.mjs")),
            "text/javascript; charset=utf-8"
        );
    }
}
