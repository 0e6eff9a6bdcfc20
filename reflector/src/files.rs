//! The files endpoint: snapshots and persisted data, uploaded and downloaded by clients.
//!
//! The client builds these URLs itself (`<files base>/apps/<appId>/snap/…` and
//! `<files base>/apps/<appId>/<persistentId>/save/<hash>`) and shares them through the
//! session, so every client of a session must reach the same files base. Downloads are open
//! to anyone who has the URL (the contents are end-to-end encrypted); uploads are accepted
//! only under the path of a session that has a client on this reflector right now, snapshots
//! only once, and only up to `--max-upload-bytes`.

use std::sync::Arc;

use axum::body::Body;
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::response::Response;
use bytes::Bytes;
use futures_util::TryStreamExt;
use futures_util::future::BoxFuture;

use crate::metrics::Metrics;
use crate::registry::Registry;
use crate::storage::{PutOutcome, Storage, StorageError};

const MAX_SEGMENTS: usize = 16;
const MAX_SEGMENT_LEN: usize = 256;

/// Checks a files path: 1–16 segments of `[A-Za-z0-9._~=+@-]`, none `.` or `..`.
pub fn valid_segments(segments: &[&str]) -> Result<(), &'static str> {
    if segments.is_empty() || segments.len() > MAX_SEGMENTS {
        return Err("path must have between 1 and 16 segments");
    }
    for s in segments {
        if s.is_empty() || *s == "." || *s == ".." {
            return Err("empty, '.' or '..' path segment");
        }
        if s.len() > MAX_SEGMENT_LEN {
            return Err("path segment too long");
        }
        if !s
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._~=+@-".contains(&b))
        {
            return Err("path segment with a character outside [A-Za-z0-9._~=+@-]");
        }
    }
    Ok(())
}

/// What an upload path is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Upload<'a> {
    /// `apps/<appId>/snap/<codeHash>/<persistentId>.<sessionId>/<time>_<seq>.<hash>` (write-once).
    Snapshot {
        app_id: &'a str,
        persistent_id: &'a str,
        session_id: &'a str,
    },
    /// `snapshots/<sessionId>/<file>` (clients without an apiKey; write-once).
    KeylessSnapshot { session_id: &'a str },
    /// `apps/<appId>/<persistentId>/save/<hash>` (hash-addressed, may be written again).
    Persisted {
        app_id: &'a str,
        persistent_id: &'a str,
    },
}

/// Recognises the upload paths the client uses.
pub fn classify<'a>(segments: &[&'a str]) -> Option<Upload<'a>> {
    match segments {
        ["apps", app_id, "snap", _code, folder, _file] => {
            let (persistent_id, session_id) = folder.split_once('.')?;
            Some(Upload::Snapshot {
                app_id,
                persistent_id,
                session_id,
            })
        }
        ["apps", app_id, persistent_id, "save", _hash] => Some(Upload::Persisted {
            app_id,
            persistent_id,
        }),
        ["snapshots", session_id, _file] => Some(Upload::KeylessSnapshot { session_id }),
        _ => None,
    }
}

/// Decides whether an upload may be stored: whether a session with a connected client owns
/// its path. A reflector asks its own session registry; `refleet up` asks its whole fleet.
pub trait UploadGate: Send + Sync + std::fmt::Debug + 'static {
    /// Whether `upload` belongs to a session that has a connected client right now.
    fn allows<'a>(&'a self, upload: &'a Upload<'a>) -> BoxFuture<'a, bool>;
}

impl UploadGate for Registry {
    fn allows<'a>(&'a self, upload: &'a Upload<'a>) -> BoxFuture<'a, bool> {
        let allowed = match upload {
            Upload::Snapshot {
                app_id,
                persistent_id,
                session_id,
            } => self.has_live(app_id, persistent_id, Some(session_id)),
            Upload::Persisted {
                app_id,
                persistent_id,
            } => self.has_live(app_id, persistent_id, None),
            Upload::KeylessSnapshot { session_id } => self.is_live(session_id),
        };
        Box::pin(std::future::ready(allowed))
    }
}

/// Everything the files endpoint needs.
#[derive(Debug, Clone)]
pub struct Files {
    pub storage: Storage,
    /// Who may upload.
    pub gate: Arc<dyn UploadGate>,
    pub metrics: Metrics,
    pub max_upload_bytes: usize,
}

fn cors(mut res: Response) -> Response {
    let h = res.headers_mut();
    h.insert(
        header::ACCESS_CONTROL_ALLOW_ORIGIN,
        HeaderValue::from_static("*"),
    );
    h.insert(
        header::ACCESS_CONTROL_ALLOW_METHODS,
        HeaderValue::from_static("GET, HEAD, PUT, OPTIONS"),
    );
    h.insert(
        header::ACCESS_CONTROL_ALLOW_HEADERS,
        HeaderValue::from_static("*"),
    );
    h.insert(
        header::ACCESS_CONTROL_MAX_AGE,
        HeaderValue::from_static("86400"),
    );
    res
}

fn plain(status: StatusCode, text: &str) -> Response {
    let mut res = Response::new(Body::from(format!("{text}\n")));
    *res.status_mut() = status;
    res.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    res
}

impl Files {
    /// Handles a request for `path` (the part after `/files/`).
    pub async fn handle(
        &self,
        method: &Method,
        path: &str,
        headers: &HeaderMap,
        body: Body,
    ) -> Response {
        let res = self.route(method, path, headers, body).await;
        self.metrics
            .files_request(method.as_str(), res.status().as_u16());
        if res.status().is_client_error() || res.status().is_server_error() {
            tracing::info!(method = %method, path, status = res.status().as_u16(), "files request refused");
        } else {
            tracing::debug!(method = %method, path, status = res.status().as_u16(), "files request");
        }
        cors(res)
    }

    async fn route(
        &self,
        method: &Method,
        path: &str,
        headers: &HeaderMap,
        body: Body,
    ) -> Response {
        if *method == Method::OPTIONS {
            return plain(StatusCode::NO_CONTENT, "");
        }
        let segments: Vec<&str> = path.split('/').collect();
        if let Err(why) = valid_segments(&segments) {
            return plain(StatusCode::BAD_REQUEST, why);
        }
        match *method {
            Method::GET | Method::HEAD => self.download(&segments, *method == Method::HEAD).await,
            Method::PUT => self.upload(&segments, headers, body).await,
            _ => {
                let mut res = plain(
                    StatusCode::METHOD_NOT_ALLOWED,
                    "files support GET, HEAD, PUT and OPTIONS",
                );
                res.headers_mut().insert(
                    header::ALLOW,
                    HeaderValue::from_static("GET, HEAD, PUT, OPTIONS"),
                );
                res
            }
        }
    }

    async fn download(&self, segments: &[&str], head_only: bool) -> Response {
        let immutable = matches!(
            classify(segments),
            Some(Upload::Snapshot { .. } | Upload::KeylessSnapshot { .. })
        );
        let (size, body) = if head_only {
            match self.storage.head_file(segments).await {
                Ok(Some(size)) => (size, Body::empty()),
                Ok(None) => return plain(StatusCode::NOT_FOUND, "no such file"),
                Err(e) => return storage_failure(&e),
            }
        } else {
            match self.storage.get_file(segments).await {
                Ok(Some((size, got))) => {
                    self.metrics.files_bytes(false, size);
                    (
                        size,
                        Body::from_stream(got.into_stream().map_err(std::io::Error::other)),
                    )
                }
                Ok(None) => return plain(StatusCode::NOT_FOUND, "no such file"),
                Err(e) => return storage_failure(&e),
            }
        };
        let mut res = Response::new(body);
        let h = res.headers_mut();
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/octet-stream"),
        );
        h.insert(header::CONTENT_LENGTH, HeaderValue::from(size));
        h.insert(
            header::CACHE_CONTROL,
            HeaderValue::from_static(if immutable {
                "public, max-age=31536000, immutable"
            } else {
                "no-cache"
            }),
        );
        res
    }

    async fn upload(&self, segments: &[&str], headers: &HeaderMap, body: Body) -> Response {
        let Some(kind) = classify(segments) else {
            return plain(
                StatusCode::FORBIDDEN,
                "uploads are accepted only at snapshot and persisted-data paths",
            );
        };
        let allowed = self.gate.allows(&kind).await;
        if !allowed {
            return plain(
                StatusCode::FORBIDDEN,
                "no session with a connected client on this reflector owns this path",
            );
        }
        let declared = headers
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if declared.is_some_and(|n| n > self.max_upload_bytes as u64) {
            return plain(
                StatusCode::PAYLOAD_TOO_LARGE,
                "upload larger than --max-upload-bytes",
            );
        }
        let bytes: Bytes = match axum::body::to_bytes(body, self.max_upload_bytes).await {
            Ok(b) => b,
            Err(_) => {
                return plain(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "upload larger than --max-upload-bytes",
                );
            }
        };
        let size = bytes.len() as u64;
        let write_once = !matches!(kind, Upload::Persisted { .. });
        match self.storage.put_file(segments, bytes, write_once).await {
            Ok(PutOutcome::Created) => {
                self.metrics.files_bytes(true, size);
                plain(StatusCode::CREATED, "stored")
            }
            Ok(PutOutcome::Replaced) => {
                self.metrics.files_bytes(true, size);
                plain(StatusCode::OK, "replaced")
            }
            Ok(PutOutcome::Unchanged) => plain(StatusCode::OK, "already stored"),
            Err(StorageError::Conflict(_)) => {
                plain(StatusCode::CONFLICT, "snapshots are write-once")
            }
            Err(e) => storage_failure(&e),
        }
    }
}

fn storage_failure(e: &StorageError) -> Response {
    tracing::error!(error = %e, "files storage error");
    plain(StatusCode::SERVICE_UNAVAILABLE, "storage unavailable")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hostile_paths_are_rejected() {
        for p in ["", "a//b", "../x", "a/./b", "a/%2e%2e/b", "a/b c", "a/\\b"] {
            let segs: Vec<&str> = p.split('/').collect();
            assert!(valid_segments(&segs).is_err(), "{p:?}");
        }
        let ok: Vec<&str> = "apps/io.refleet.x/snap/h/p.s/0000006733_4294967292.cS-_"
            .split('/')
            .collect();
        assert!(valid_segments(&ok).is_ok());
    }

    #[test]
    fn client_upload_paths_are_recognised() {
        let snap: Vec<&str> = "apps/io.app/snap/CODE/PID.SID/0000000001_5.H"
            .split('/')
            .collect();
        assert_eq!(
            classify(&snap),
            Some(Upload::Snapshot {
                app_id: "io.app",
                persistent_id: "PID",
                session_id: "SID"
            })
        );
        let save: Vec<&str> = "apps/io.app/PID/save/H".split('/').collect();
        assert_eq!(
            classify(&save),
            Some(Upload::Persisted {
                app_id: "io.app",
                persistent_id: "PID"
            })
        );
        let keyless: Vec<&str> = "snapshots/SID/0000000001_5-H.snap".split('/').collect();
        assert_eq!(
            classify(&keyless),
            Some(Upload::KeylessSnapshot { session_id: "SID" })
        );
        let other: Vec<&str> = "apps/io.app/other".split('/').collect();
        assert_eq!(classify(&other), None);
    }
}
