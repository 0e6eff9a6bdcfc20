//! Durable storage for everything that must outlive a reflector process.
//!
//! One object store (a local directory by default, S3 or another object store by URL in a
//! cluster, so any reflector of a pool can pick a session up) holds three kinds of object:
//!
//! ```text
//! files/<path>                                   bytes clients PUT and GET through /files/
//! uploads/<random>                               large uploads while they stream in
//! persisted/<developerId>/<appId>/<persistentId>.json   {"url": …} of the last SAVE
//! sessions/<sessionId>.json                      a stored session (the reflector's format)
//! ```
//! Every key part goes through `object_store`'s path encoding, so no client-supplied id can
//! escape its prefix.

use std::sync::Arc;

use bytes::Bytes;
use futures_util::StreamExt;
use object_store::local::LocalFileSystem;
use object_store::memory::InMemory;
use object_store::path::{Path, PathPart};
use object_store::prefix::PrefixStore;
use object_store::{ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload, WriteMultipart};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use thiserror::Error;

/// A storage failure.
#[derive(Debug, Error)]
pub enum StorageError {
    /// The storage URL could not be understood.
    #[error("invalid storage location {location:?}: {reason}")]
    BadLocation { location: String, reason: String },
    /// The object store failed.
    #[error("object store: {0}")]
    Store(#[from] object_store::Error),
    /// A stored record could not be read back.
    #[error("stored record {key} is corrupt: {source}")]
    Corrupt {
        key: String,
        #[source]
        source: serde_json::Error,
    },
    /// The store did not answer in time.
    #[error("storage did not answer within {0:?}")]
    Timeout(std::time::Duration),
    /// A write-once object exists with different bytes.
    #[error("{0} already exists with other content")]
    Conflict(String),
    /// Another host took the session over (a newer claim than the writer's): the writer's
    /// copy is stale and must not be stored.
    #[error("session {session} belongs to {owner} since epoch {epoch}; this host's copy is stale")]
    Fenced {
        session: String,
        owner: String,
        epoch: u64,
    },
}

/// Which host runs a session now: written when a host starts (or resumes) a session, read
/// before every store, so a host that lost the session (it was partitioned or presumed dead
/// while another resumed it) stops instead of overwriting the newer host's state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionOwner {
    /// Grows by one with every claim.
    pub epoch: u64,
    /// The claiming host's instance id.
    pub host: String,
}

/// What a files PUT did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PutOutcome {
    /// A new object.
    Created,
    /// The object existed already and was kept as it was (see [`OnExisting`]).
    Unchanged,
}

/// What a PUT to a files path that exists already does: files are never replaced.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnExisting {
    /// Accept only a byte-identical retry; other bytes are a [`StorageError::Conflict`]
    /// (snapshots).
    RefuseOther,
    /// Keep the stored object and report success (persisted data: its name is the hash of
    /// the plaintext, and the client encrypts with a random IV, so the same data arrives as
    /// other bytes under the same name whenever a later session persists it again).
    Keep,
}

/// Size of the parts a staged upload is written in (the smallest part S3 accepts): an
/// upload holds at most about two of them in memory.
pub const STAGE_PART_BYTES: usize = 5 << 20;

/// An upload being streamed into a staging object.
pub struct Staged {
    path: Path,
    writer: WriteMultipart,
}

impl std::fmt::Debug for Staged {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Staged").field("path", &self.path).finish()
    }
}

impl Staged {
    /// Appends bytes, waiting while a part is still being written (so memory stays bounded).
    pub async fn write(&mut self, bytes: Bytes) -> Result<(), StorageError> {
        self.writer.wait_for_capacity(1).await?;
        self.writer.put(bytes);
        Ok(())
    }

    /// Gives the upload up and removes what was written of it.
    pub async fn abort(self) {
        if let Err(e) = self.writer.abort().await {
            tracing::warn!(path = %self.path, error = %e, "aborting a staged upload failed");
        }
    }
}

#[derive(Serialize, Deserialize)]
struct PersistedRecord {
    url: String,
}

/// Handle to the configured object store.
#[derive(Debug, Clone)]
pub struct Storage {
    store: Arc<dyn ObjectStore>,
    description: String,
}

fn part(s: &str) -> PathPart<'_> {
    // An empty or dot-only id would make an empty or relative segment; keep them distinct.
    match s {
        "" => PathPart::from("%00empty"),
        "." | ".." => PathPart::from(format!("%2E{}", &s[1..])),
        _ => PathPart::from(s),
    }
}

impl Storage {
    /// Opens a storage location: a directory path, `file://`, `memory://`, `s3://bucket/prefix`
    /// (credentials and endpoint from the AWS_* environment) or another object store URL.
    pub fn open(location: &str) -> Result<Self, StorageError> {
        let bad = |reason: String| StorageError::BadLocation {
            location: location.to_string(),
            reason,
        };
        let store: Arc<dyn ObjectStore> = if location == "memory://" || location == "memory:" {
            Arc::new(InMemory::new())
        } else if let Some(rest) = location.strip_prefix("file://") {
            Arc::new(Self::local(rest).map_err(|e| bad(e.to_string()))?)
        } else if location.starts_with("s3://") || location.starts_with("s3a://") {
            let url =
                url_parts(location).ok_or_else(|| bad("expected s3://bucket[/prefix]".into()))?;
            let s3 = object_store::aws::AmazonS3Builder::from_env()
                .with_url(format!("s3://{}", url.0))
                .build()
                .map_err(|e| bad(e.to_string()))?;
            prefixed(Arc::new(s3), &url.1)
        } else if location.contains("://") {
            let url = url::Url::parse(location).map_err(|e| bad(e.to_string()))?;
            let (store, prefix) = object_store::parse_url_opts(
                &url,
                std::env::vars().map(|(k, v)| (k.to_ascii_lowercase(), v)),
            )
            .map_err(|e| bad(e.to_string()))?;
            prefixed(Arc::from(store), prefix.as_ref())
        } else {
            Arc::new(Self::local(location).map_err(|e| bad(e.to_string()))?)
        };
        Ok(Self {
            store,
            description: location.to_string(),
        })
    }

    fn local(dir: &str) -> std::io::Result<LocalFileSystem> {
        std::fs::create_dir_all(dir)?;
        LocalFileSystem::new_with_prefix(dir)
            .map(|fs| fs.with_automatic_cleanup(true))
            .map_err(std::io::Error::other)
    }

    /// The location as configured (for logs).
    pub fn description(&self) -> &str {
        &self.description
    }

    fn file_path(segments: &[&str]) -> Path {
        Path::from_iter(
            std::iter::once(PathPart::from("files")).chain(segments.iter().map(|s| part(s))),
        )
    }

    /// Reads a file uploaded through the files endpoint.
    pub async fn get_file(
        &self,
        segments: &[&str],
    ) -> Result<Option<(u64, object_store::GetResult)>, StorageError> {
        match self.store.get(&Self::file_path(segments)).await {
            Ok(r) => Ok(Some((r.meta.size, r))),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// Size of a stored file, if it exists.
    pub async fn head_file(&self, segments: &[&str]) -> Result<Option<u64>, StorageError> {
        match self.store.head(&Self::file_path(segments)).await {
            Ok(m) => Ok(Some(m.size)),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// Stores a file that arrived whole; every files path is written once (see
    /// [`OnExisting`] for what a second PUT to it does).
    pub async fn put_file(
        &self,
        segments: &[&str],
        body: Bytes,
        on_existing: OnExisting,
    ) -> Result<PutOutcome, StorageError> {
        let path = Self::file_path(segments);
        let opts = PutOptions {
            mode: PutMode::Create,
            ..Default::default()
        };
        match self
            .store
            .put_opts(&path, PutPayload::from_bytes(body.clone()), opts)
            .await
        {
            Ok(_) => Ok(PutOutcome::Created),
            Err(object_store::Error::AlreadyExists { .. }) => {
                self.existing(&path, on_existing, |existing| existing == body)
                    .await
            }
            Err(object_store::Error::NotImplemented { .. }) => {
                // Stores without conditional writes: check first (a narrow race is acceptable,
                // both writers upload the same content-addressed snapshot).
                if self.store.head(&path).await.is_ok() {
                    return self
                        .existing(&path, on_existing, |existing| existing == body)
                        .await;
                }
                self.store.put(&path, PutPayload::from_bytes(body)).await?;
                Ok(PutOutcome::Created)
            }
            Err(e) => Err(e.into()),
        }
    }

    async fn existing(
        &self,
        path: &Path,
        on_existing: OnExisting,
        same: impl FnOnce(Bytes) -> bool,
    ) -> Result<PutOutcome, StorageError> {
        match on_existing {
            OnExisting::Keep => Ok(PutOutcome::Unchanged),
            OnExisting::RefuseOther => {
                let existing = self.store.get(path).await?.bytes().await?;
                if same(existing) {
                    Ok(PutOutcome::Unchanged)
                } else {
                    Err(StorageError::Conflict(path.to_string()))
                }
            }
        }
    }

    /// Starts streaming a large upload into a staging object outside `files/`, to be
    /// published by [`Storage::publish_staged`] once it is complete.
    pub async fn stage(&self) -> Result<Staged, StorageError> {
        let name = format!("{:032x}", rand::random::<u128>());
        let path = Path::from_iter([PathPart::from("uploads"), PathPart::from(name.as_str())]);
        let upload = self.store.put_multipart(&path).await?;
        Ok(Staged {
            path,
            writer: WriteMultipart::new_with_chunk_size(upload, STAGE_PART_BYTES),
        })
    }

    /// Completes a staged upload and publishes it at `segments` (write-once, as
    /// [`Storage::put_file`]); the staging object is removed either way.
    pub async fn publish_staged(
        &self,
        staged: Staged,
        segments: &[&str],
        on_existing: OnExisting,
    ) -> Result<PutOutcome, StorageError> {
        let from = staged.path.clone();
        // `finish` aborts the multipart upload itself when it fails.
        staged.writer.finish().await?;
        let outcome = self
            .publish(&from, &Self::file_path(segments), on_existing)
            .await;
        if let Err(e) = self.store.delete(&from).await {
            tracing::warn!(path = %from, error = %e, "removing a staged upload failed");
        }
        outcome
    }

    async fn publish(
        &self,
        from: &Path,
        to: &Path,
        on_existing: OnExisting,
    ) -> Result<PutOutcome, StorageError> {
        match self.store.copy_if_not_exists(from, to).await {
            Ok(()) => return Ok(PutOutcome::Created),
            Err(object_store::Error::AlreadyExists { .. }) => {}
            Err(
                object_store::Error::NotSupported { .. }
                | object_store::Error::NotImplemented { .. },
            ) => {
                // S3 without a copy-if-not-exists setting: check first (the same narrow race
                // as put_file on stores without conditional writes).
                if self.store.head(to).await.is_err() {
                    self.store.copy(from, to).await?;
                    return Ok(PutOutcome::Created);
                }
            }
            Err(e) => return Err(e.into()),
        }
        match on_existing {
            OnExisting::Keep => Ok(PutOutcome::Unchanged),
            OnExisting::RefuseOther => {
                if self.same_content(from, to).await? {
                    Ok(PutOutcome::Unchanged)
                } else {
                    Err(StorageError::Conflict(to.to_string()))
                }
            }
        }
    }

    /// Compares two stored objects chunk by chunk, without holding either whole.
    async fn same_content(&self, a: &Path, b: &Path) -> Result<bool, StorageError> {
        if self.store.head(a).await?.size != self.store.head(b).await?.size {
            return Ok(false);
        }
        let mut sa = self.store.get(a).await?.into_stream();
        let mut sb = self.store.get(b).await?.into_stream();
        let (mut ca, mut cb) = (Bytes::new(), Bytes::new());
        loop {
            while ca.is_empty() {
                match sa.next().await {
                    Some(chunk) => ca = chunk?,
                    None => break,
                }
            }
            while cb.is_empty() {
                match sb.next().await {
                    Some(chunk) => cb = chunk?,
                    None => break,
                }
            }
            if ca.is_empty() || cb.is_empty() {
                return Ok(ca.is_empty() && cb.is_empty());
            }
            let n = ca.len().min(cb.len());
            if ca.split_to(n) != cb.split_to(n) {
                return Ok(false);
            }
        }
    }

    /// Deletes all but the newest `keep` snapshot files in the folder of `segments` (the
    /// snapshot just accepted). Snapshot names start with the zero-padded time, so the
    /// lexical order is the time order.
    pub async fn prune_snapshots(
        &self,
        segments: &[&str],
        keep: usize,
    ) -> Result<usize, StorageError> {
        if keep == 0 || segments.len() < 2 {
            return Ok(0);
        }
        let dir = Self::file_path(&segments[..segments.len() - 1]);
        let mut names: Vec<Path> = Vec::new();
        let mut listing = self.store.list(Some(&dir));
        while let Some(meta) = listing.next().await {
            let meta = meta?;
            // Only direct children of the snapshot folder.
            if meta
                .location
                .prefix_match(&dir)
                .is_some_and(|mut rest| rest.next().is_some() && rest.next().is_none())
            {
                names.push(meta.location);
            }
        }
        names.sort();
        let excess = names.len().saturating_sub(keep);
        for old in &names[..excess] {
            self.store.delete(old).await?;
        }
        Ok(excess)
    }

    fn persisted_path(developer: &str, app: &str, persistent: &str) -> Path {
        Path::from_iter([
            PathPart::from("persisted"),
            part(developer),
            part(app),
            part(&format!("{persistent}.json")),
        ])
    }

    /// The URL of the persisted data last saved under this key.
    pub async fn load_persisted(
        &self,
        developer: &str,
        app: &str,
        persistent: &str,
    ) -> Result<Option<String>, StorageError> {
        let rec: Option<PersistedRecord> = self
            .get_json(&Self::persisted_path(developer, app, persistent))
            .await?;
        Ok(rec.map(|r| r.url))
    }

    /// Records the URL of the newest persisted data for this key.
    pub async fn save_persisted(
        &self,
        developer: &str,
        app: &str,
        persistent: &str,
        url: &str,
    ) -> Result<(), StorageError> {
        let body = serde_json::to_vec(&PersistedRecord {
            url: url.to_string(),
        })
        .map_err(|source| StorageError::Corrupt {
            key: "persisted".into(),
            source,
        })?;
        self.store
            .put(
                &Self::persisted_path(developer, app, persistent),
                PutPayload::from(body),
            )
            .await?;
        Ok(())
    }

    fn session_path(session_id: &str) -> Path {
        Path::from_iter([
            PathPart::from("sessions"),
            part(&format!("{session_id}.json")),
        ])
    }

    fn owner_path(session_id: &str) -> Path {
        Path::from_iter([
            PathPart::from("sessions"),
            part(&format!("{session_id}.owner.json")),
        ])
    }

    /// Who runs session `session_id` now, if anyone claimed it.
    pub async fn session_owner(
        &self,
        session_id: &str,
    ) -> Result<Option<SessionOwner>, StorageError> {
        self.get_json(&Self::owner_path(session_id)).await
    }

    /// A JSON record, if there is one.
    async fn get_json<T: DeserializeOwned>(&self, path: &Path) -> Result<Option<T>, StorageError> {
        let bytes = match self.store.get(path).await {
            Ok(r) => r.bytes().await?,
            Err(object_store::Error::NotFound { .. }) => return Ok(None),
            Err(e) => return Err(e.into()),
        };
        serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|source| StorageError::Corrupt {
                key: path.to_string(),
                source,
            })
    }

    /// Claims session `session_id` for `host`: its epoch becomes one more than the last
    /// claim's. Returns the new epoch, which the host presents to [`Storage::store_owned`].
    pub async fn claim_session(&self, session_id: &str, host: &str) -> Result<u64, StorageError> {
        // An unreadable claim is replaced: it would otherwise block the session for good.
        let previous = match self.session_owner(session_id).await {
            Ok(o) => o.map_or(0, |o| o.epoch),
            Err(StorageError::Corrupt { .. }) => 0,
            Err(e) => return Err(e),
        };
        let owner = SessionOwner {
            epoch: previous + 1,
            host: host.to_owned(),
        };
        let body = serde_json::to_vec(&owner).map_err(|source| StorageError::Corrupt {
            key: session_id.to_owned(),
            source,
        })?;
        self.store
            .put(&Self::owner_path(session_id), PutPayload::from(body))
            .await?;
        Ok(owner.epoch)
    }

    /// Stores the state of session `session_id` for `host`, which claimed it at `epoch`;
    /// [`StorageError::Fenced`] (and nothing written) when another host claimed it since.
    pub async fn store_owned<T: Serialize>(
        &self,
        session_id: &str,
        state: &T,
        host: &str,
        epoch: u64,
    ) -> Result<(), StorageError> {
        let body = serde_json::to_vec(state).map_err(|source| StorageError::Corrupt {
            key: session_id.to_owned(),
            source,
        })?;
        self.store_owned_json(session_id, body, host, epoch).await
    }

    /// [`Storage::store_owned`] of a record already serialized (`body`, JSON).
    pub async fn store_owned_json(
        &self,
        session_id: &str,
        body: Vec<u8>,
        host: &str,
        epoch: u64,
    ) -> Result<(), StorageError> {
        if let Some(owner) = self.session_owner(session_id).await?
            && (owner.epoch > epoch || (owner.epoch == epoch && owner.host != host))
        {
            return Err(StorageError::Fenced {
                session: session_id.to_owned(),
                owner: owner.host,
                epoch: owner.epoch,
            });
        }
        self.store
            .put(&Self::session_path(session_id), PutPayload::from(body))
            .await?;
        Ok(())
    }

    /// The stored state of session `session_id`, if one was stored. The record's format is
    /// the caller's (the reflector's `StoredSession`); this only keeps it under its key.
    pub async fn load_session<T: DeserializeOwned>(
        &self,
        session_id: &str,
    ) -> Result<Option<T>, StorageError> {
        self.get_json(&Self::session_path(session_id)).await
    }

    /// Stores the state of session `session_id`, so that a later JOIN resumes it.
    pub async fn store_session<T: Serialize>(
        &self,
        session_id: &str,
        state: &T,
    ) -> Result<(), StorageError> {
        let body = serde_json::to_vec(state).map_err(|source| StorageError::Corrupt {
            key: session_id.to_owned(),
            source,
        })?;
        self.store
            .put(&Self::session_path(session_id), PutPayload::from(body))
            .await?;
        Ok(())
    }
}

fn prefixed(store: Arc<dyn ObjectStore>, prefix: &str) -> Arc<dyn ObjectStore> {
    let prefix = prefix.trim_matches('/');
    if prefix.is_empty() {
        store
    } else {
        Arc::new(PrefixStore::new(store, prefix))
    }
}

/// Splits `scheme://bucket/prefix` into bucket and prefix.
fn url_parts(location: &str) -> Option<(String, String)> {
    let rest = location.split_once("://")?.1;
    let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
    (!bucket.is_empty()).then(|| (bucket.to_string(), prefix.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mem() -> Storage {
        Storage::open("memory://").expect("memory store")
    }

    #[tokio::test]
    async fn a_newer_claim_fences_the_older_host_and_only_it() {
        let s = mem();
        // No claim yet: anyone may store.
        s.store_owned("sid", &1u32, "a", 0)
            .await
            .expect("unclaimed");
        let a = s.claim_session("sid", "a").await.expect("claim a");
        assert_eq!(a, 1);
        s.store_owned("sid", &2u32, "a", a)
            .await
            .expect("a owns it");
        // b resumes it: a is fenced from then on, and its write is not made.
        let b = s.claim_session("sid", "b").await.expect("claim b");
        assert_eq!(b, 2);
        let fenced = s.store_owned("sid", &3u32, "a", a).await;
        assert!(
            matches!(&fenced, Err(StorageError::Fenced { owner, epoch: 2, .. }) if owner == "b"),
            "{fenced:?}"
        );
        assert_eq!(s.load_session::<u32>("sid").await.expect("load"), Some(2));
        // Same epoch, another host (two claims raced): only the recorded host may store.
        let fenced = s.store_owned("sid", &4u32, "c", b).await;
        assert!(matches!(fenced, Err(StorageError::Fenced { .. })));
        s.store_owned("sid", &5u32, "b", b)
            .await
            .expect("b owns it");
        assert_eq!(s.load_session::<u32>("sid").await.expect("load"), Some(5));
        // Sessions are claimed one by one.
        assert_eq!(s.claim_session("other", "a").await.expect("claim"), 1);
    }

    #[tokio::test]
    async fn write_once_files_accept_identical_retries_and_refuse_changes() {
        let s = mem();
        let key = ["apps", "a", "snap", "h", "p.s", "0000000001_5.x"];
        assert_eq!(
            s.put_file(&key, Bytes::from_static(b"one"), OnExisting::RefuseOther)
                .await
                .expect("put"),
            PutOutcome::Created
        );
        assert_eq!(
            s.put_file(&key, Bytes::from_static(b"one"), OnExisting::RefuseOther)
                .await
                .expect("put"),
            PutOutcome::Unchanged
        );
        assert!(matches!(
            s.put_file(&key, Bytes::from_static(b"two"), OnExisting::RefuseOther)
                .await,
            Err(StorageError::Conflict(_))
        ));
        let (size, got) = s.get_file(&key).await.expect("get").expect("exists");
        assert_eq!(size, 3);
        assert_eq!(
            got.bytes().await.expect("bytes"),
            Bytes::from_static(b"one")
        );
    }

    #[tokio::test]
    async fn persisted_files_keep_their_first_bytes() {
        let s = mem();
        let key = ["apps", "a", "p", "save", "h"];
        assert_eq!(
            s.put_file(&key, Bytes::from_static(b"1"), OnExisting::Keep)
                .await
                .expect("put"),
            PutOutcome::Created
        );
        assert_eq!(
            s.put_file(&key, Bytes::from_static(b"22"), OnExisting::Keep)
                .await
                .expect("put"),
            PutOutcome::Unchanged
        );
        assert_eq!(s.head_file(&key).await.expect("head"), Some(1));
    }

    #[tokio::test]
    async fn staged_uploads_are_published_once() {
        let s = mem();
        let key = ["apps", "a", "snap", "c", "p.s", "0000000001_1.h"];
        let big = Bytes::from(vec![7u8; STAGE_PART_BYTES + 10]);
        let mut staged = s.stage().await.expect("stage");
        staged.write(big.slice(..100)).await.expect("write");
        staged.write(big.slice(100..)).await.expect("write");
        assert_eq!(
            s.publish_staged(staged, &key, OnExisting::RefuseOther)
                .await
                .expect("publish"),
            PutOutcome::Created
        );
        let mut again = s.stage().await.expect("stage");
        again.write(big.clone()).await.expect("write");
        assert_eq!(
            s.publish_staged(again, &key, OnExisting::RefuseOther)
                .await
                .expect("publish"),
            PutOutcome::Unchanged,
            "an identical retry"
        );
        let mut other = s.stage().await.expect("stage");
        let mut changed = big.to_vec();
        changed[STAGE_PART_BYTES + 5] = 8;
        other.write(Bytes::from(changed)).await.expect("write");
        assert!(matches!(
            s.publish_staged(other, &key, OnExisting::RefuseOther).await,
            Err(StorageError::Conflict(_))
        ));
        assert_eq!(
            s.head_file(&key).await.expect("head"),
            Some(big.len() as u64)
        );
        let leftovers = s
            .store
            .list(Some(&Path::from("uploads")))
            .collect::<Vec<_>>()
            .await;
        assert!(leftovers.is_empty(), "staging objects are removed");
    }

    #[tokio::test]
    async fn pruning_keeps_the_newest_snapshots_only() {
        let s = mem();
        for t in 1..=5 {
            let name = format!("{t:010}_{t}.h");
            s.put_file(
                &["apps", "a", "snap", "c", "p.s", &name],
                Bytes::from_static(b"x"),
                OnExisting::RefuseOther,
            )
            .await
            .expect("put");
        }
        s.put_file(
            &["apps", "a", "snap", "c", "other.s", "0000000001_1.h"],
            Bytes::from_static(b"x"),
            OnExisting::RefuseOther,
        )
        .await
        .expect("put");
        let removed = s
            .prune_snapshots(&["apps", "a", "snap", "c", "p.s", "0000000005_5.h"], 2)
            .await
            .expect("prune");
        assert_eq!(removed, 3);
        assert!(
            s.head_file(&["apps", "a", "snap", "c", "p.s", "0000000005_5.h"])
                .await
                .expect("head")
                .is_some()
        );
        assert!(
            s.head_file(&["apps", "a", "snap", "c", "p.s", "0000000004_4.h"])
                .await
                .expect("head")
                .is_some()
        );
        assert!(
            s.head_file(&["apps", "a", "snap", "c", "p.s", "0000000003_3.h"])
                .await
                .expect("head")
                .is_none()
        );
        assert!(
            s.head_file(&["apps", "a", "snap", "c", "other.s", "0000000001_1.h"])
                .await
                .expect("head")
                .is_some()
        );
    }

    #[tokio::test]
    async fn persisted_records_and_sessions_round_trip_with_hostile_ids() {
        let s = mem();
        s.save_persisted("unknown_dev_id", "../../etc", "..", "http://f/x")
            .await
            .expect("save");
        assert_eq!(
            s.load_persisted("unknown_dev_id", "../../etc", "..")
                .await
                .expect("load")
                .as_deref(),
            Some("http://f/x")
        );
        assert_eq!(
            s.load_persisted("unknown_dev_id", "other", "..")
                .await
                .expect("load"),
            None
        );
        let state = serde_json::json!({"sessionId": "a/../b", "messages": [[1, 2, "p", 0]]});
        s.store_session("a/../b", &state).await.expect("store");
        let back: serde_json::Value = s
            .load_session("a/../b")
            .await
            .expect("load")
            .expect("present");
        assert_eq!(back, state);
        assert!(
            s.load_session::<serde_json::Value>("a")
                .await
                .expect("load")
                .is_none(),
            "the hostile id stayed one key"
        );
    }

    #[test]
    fn bad_locations_are_explained() {
        let e = Storage::open("s3://").expect_err("no bucket");
        assert!(e.to_string().contains("s3://bucket"), "{e}");
    }
}
