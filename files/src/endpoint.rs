//! The files endpoint: snapshots and persisted data, uploaded and downloaded by clients.
//!
//! The client builds these URLs itself (`<files base>/apps/<appId>/snap/…` and
//! `<files base>/apps/<appId>/<persistentId>/save/<hash>`) and shares them through the
//! session, so every client of a session must reach the same files base. Downloads are open
//! to anyone who has the URL (the contents are end-to-end encrypted).
//!
//! The unmodified client sends no credential with an upload, and the hashes in its file
//! names are over the plaintext (it encrypts with a random IV), so the server cannot check
//! them. An upload is therefore accepted only under the path of a session that has an
//! admitted member connected from the uploader's address right now, every file is written
//! once, and bodies are streamed with a size cap, an idle timeout and a cap on concurrent
//! uploads per address and in total.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::response::Response;
use bytes::{Bytes, BytesMut};
use futures_util::future::BoxFuture;
use futures_util::{StreamExt, TryStreamExt};

use crate::metrics::FilesMetrics;
use crate::storage::{OnExisting, PutOutcome, STAGE_PART_BYTES, Staged, Storage, StorageError};
use crate::upload_slots::{Busy, UploadSlots};

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
    /// `apps/<appId>/<persistentId>/save/<hash>` (named by the plaintext's hash; the first
    /// upload is kept).
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

/// Decides whether an upload may be stored: whether a session owning its path has an
/// admitted member connected from the uploader's address. A reflector asks its own session
/// registry; `refleet up` asks its whole fleet.
pub trait UploadGate: Send + Sync + std::fmt::Debug + 'static {
    /// Whether `upload` from `peer` belongs to a session that has an admitted member
    /// connected from `peer` right now.
    fn allows<'a>(&'a self, upload: &'a Upload<'a>, peer: IpAddr) -> BoxFuture<'a, bool>;
}

/// Limits on uploads.
#[derive(Debug, Clone)]
pub struct UploadLimits {
    /// Largest upload (`--max-upload-bytes`).
    pub max_bytes: usize,
    /// Longest wait for the next piece of a body (`--upload-idle-timeout`).
    pub idle_timeout: Duration,
    /// Uploads read at once (`--max-uploads`).
    pub max_total: usize,
    /// Uploads read at once from one address (`--max-uploads-per-peer`).
    pub max_per_peer: usize,
}

/// Everything the files endpoint needs.
#[derive(Debug, Clone)]
pub struct Files {
    storage: Storage,
    /// Who may upload.
    gate: Arc<dyn UploadGate>,
    metrics: FilesMetrics,
    limits: UploadLimits,
    slots: Arc<UploadSlots>,
}

/// How long a refused client should wait before trying again.
const RETRY_AFTER_SECS: &str = "1";

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
    /// A files endpoint on `storage`, uploads gated by `gate`.
    pub fn new(
        storage: Storage,
        gate: Arc<dyn UploadGate>,
        metrics: FilesMetrics,
        limits: UploadLimits,
    ) -> Self {
        let slots = UploadSlots::new(
            limits.max_total,
            limits.max_per_peer,
            Some(metrics.uploads_in_progress.clone()),
        );
        Self {
            storage,
            gate,
            metrics,
            limits,
            slots,
        }
    }

    /// Handles a request from `peer` for `path` (the part after `/files/`).
    pub async fn handle(
        &self,
        method: &Method,
        path: &str,
        headers: &HeaderMap,
        body: Body,
        peer: IpAddr,
    ) -> Response {
        let res = self.route(method, path, headers, body, peer).await;
        self.metrics.request(method.as_str(), res.status().as_u16());
        if res.status().is_client_error() || res.status().is_server_error() {
            tracing::info!(method = %method, path, %peer, status = res.status().as_u16(), "files request refused");
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
        peer: IpAddr,
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
            Method::PUT => self.upload(&segments, headers, body, peer).await,
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
                    self.metrics.bytes(false, size);
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

    async fn upload(
        &self,
        segments: &[&str],
        headers: &HeaderMap,
        body: Body,
        peer: IpAddr,
    ) -> Response {
        let Some(kind) = classify(segments) else {
            return plain(
                StatusCode::FORBIDDEN,
                "uploads are accepted only at snapshot and persisted-data paths",
            );
        };
        let _slot = match self.slots.try_take(peer) {
            Ok(slot) => slot,
            Err(busy) => {
                let (status, text) = match busy {
                    Busy::Peer => (
                        StatusCode::TOO_MANY_REQUESTS,
                        "too many uploads from this address at once (--max-uploads-per-peer)",
                    ),
                    Busy::Total => (
                        StatusCode::SERVICE_UNAVAILABLE,
                        "too many uploads at once (--max-uploads)",
                    ),
                };
                let mut res = plain(status, text);
                res.headers_mut().insert(
                    header::RETRY_AFTER,
                    HeaderValue::from_static(RETRY_AFTER_SECS),
                );
                return res;
            }
        };
        if !self.gate.allows(&kind, peer).await {
            return plain(
                StatusCode::FORBIDDEN,
                "no session with a member connected from this address owns this path",
            );
        }
        let declared = headers
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if declared.is_some_and(|n| n > self.limits.max_bytes as u64) {
            return too_large();
        }
        let on_existing = match kind {
            Upload::Persisted { .. } => OnExisting::Keep,
            Upload::Snapshot { .. } | Upload::KeylessSnapshot { .. } => OnExisting::RefuseOther,
        };
        let (outcome, size) = match self.receive(body).await {
            Ok(Received::Whole(bytes)) => {
                let size = bytes.len() as u64;
                (
                    self.storage.put_file(segments, bytes, on_existing).await,
                    size,
                )
            }
            Ok(Received::Staged(staged, size)) => (
                self.storage
                    .publish_staged(staged, segments, on_existing)
                    .await,
                size,
            ),
            Err(refusal) => return refusal,
        };
        match outcome {
            Ok(PutOutcome::Created) => {
                self.metrics.bytes(true, size);
                plain(StatusCode::CREATED, "stored")
            }
            Ok(PutOutcome::Unchanged) => plain(StatusCode::OK, "already stored"),
            Err(StorageError::Conflict(_)) => plain(
                StatusCode::CONFLICT,
                "files are write-once: this snapshot exists with other content",
            ),
            Err(e) => storage_failure(&e),
        }
    }

    /// Reads an upload body: whole when it is small, streamed into a staging object once it
    /// outgrows one part. Enforces the size cap and the idle timeout as the bytes arrive.
    async fn receive(&self, body: Body) -> Result<Received, Response> {
        let mut stream = body.into_data_stream();
        let mut buffered = BytesMut::new();
        let mut staged: Option<Staged> = None;
        let mut size: usize = 0;
        loop {
            let chunk = match tokio::time::timeout(self.limits.idle_timeout, stream.next()).await {
                Ok(Some(Ok(chunk))) => chunk,
                Ok(None) => break,
                Ok(Some(Err(e))) => {
                    tracing::debug!(error = %e, "upload body failed");
                    abort(staged).await;
                    return Err(plain(StatusCode::BAD_REQUEST, "upload body ended early"));
                }
                Err(_) => {
                    abort(staged).await;
                    return Err(plain(
                        StatusCode::REQUEST_TIMEOUT,
                        "upload body stalled (--upload-idle-timeout)",
                    ));
                }
            };
            size = size.saturating_add(chunk.len());
            if size > self.limits.max_bytes {
                abort(staged).await;
                return Err(too_large());
            }
            if let Some(s) = staged.as_mut() {
                if let Err(e) = s.write(chunk).await {
                    abort(staged).await;
                    return Err(storage_failure(&e));
                }
                continue;
            }
            buffered.extend_from_slice(&chunk);
            if buffered.len() > STAGE_PART_BYTES {
                let mut s = match self.storage.stage().await {
                    Ok(s) => s,
                    Err(e) => return Err(storage_failure(&e)),
                };
                if let Err(e) = s.write(buffered.split().freeze()).await {
                    s.abort().await;
                    return Err(storage_failure(&e));
                }
                staged = Some(s);
            }
        }
        Ok(match staged {
            Some(s) => Received::Staged(s, size as u64),
            None => Received::Whole(buffered.freeze()),
        })
    }
}

/// A complete upload body.
enum Received {
    /// Small enough to have been kept in memory.
    Whole(Bytes),
    /// Streamed into a staging object (its size).
    Staged(Staged, u64),
}

async fn abort(staged: Option<Staged>) {
    if let Some(s) = staged {
        s.abort().await;
    }
}

fn too_large() -> Response {
    plain(
        StatusCode::PAYLOAD_TOO_LARGE,
        "upload larger than --max-upload-bytes",
    )
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
