//! The local fleet's configuration: one multi-document YAML stream holding `ReflectorPool`
//! and `Session` objects (the CRD kinds, `refleet.dev/v1alpha1`) plus at most one
//! `LocalFleet` document with the settings only the local backend has.
//!
//! Every document is checked as the API server would check it (the CRDs' schema types and
//! CEL rules), then across documents (a Session's pool exists, its regions are the pool's).
//! Errors name the document (`document 3 (Session "lobby")`) and the field.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::PathBuf;

use kube::CustomResourceExt;
use serde::Deserialize;
use serde_json::Value;
use thiserror::Error;

use crate::crd::{GROUP, ReflectorPool, ReflectorPoolSpec, Session, SessionSpec, VERSION};

/// The configuration `refleet up` runs without `--config` (also `examples/local-fleet.yaml`).
pub const DEFAULT_CONFIG: &str = include_str!("../../../examples/local-fleet.yaml");

/// Image name given to the planner when the pool names none: the local backend runs the
/// reflector binary, so images only matter for telling reflector generations apart.
pub const LOCAL_IMAGE: &str = "refleet-reflector";

/// A configuration problem, naming the document and the field.
#[derive(Debug, Error)]
pub enum ConfigError {
    /// The text is not a YAML stream.
    #[error("the config is not valid YAML: {0}")]
    Yaml(#[source] Box<serde_saphyr::Error>),
    /// One document is wrong.
    #[error("document {index} ({what}): {message}")]
    Document {
        /// 1-based position in the stream.
        index: usize,
        /// Kind and name, e.g. `Session "lobby"`.
        what: String,
        /// What is wrong, starting with the field path when there is one.
        message: String,
    },
    /// Something is missing from the whole stream.
    #[error("{0}")]
    Stream(String),
}

/// Settings only the local backend has (`kind: LocalFleet`, under `spec`).
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LocalSettings {
    /// Address of refleet up's own HTTP server (`/files/`, `/v1/status`, and the router: gRPC, `/v1/route`, `/v1/shards`).
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,
    /// Storage (unless the pool sets `storage.url`) and reflector logs live here.
    #[serde(default = "default_data_dir")]
    pub data_dir: PathBuf,
    /// The `refleet-reflector` binary (default: see [`crate::cli::up`]).
    #[serde(default)]
    pub reflector_binary: Option<PathBuf>,
    /// Host the reflectors listen on (each on its own free port).
    #[serde(default = "default_reflector_host")]
    pub reflector_host: String,
    /// How often the reflectors are observed and the planner runs, in milliseconds.
    #[serde(default = "default_report_interval_millis")]
    pub report_interval_millis: u64,
    /// Extra arguments for every reflector.
    #[serde(default)]
    pub reflector_args: Vec<String>,
    /// Where the reflectors' stderr goes.
    #[serde(default)]
    pub child_logs: ChildLogs,
    /// Largest upload the files endpoint accepts, in bytes.
    #[serde(default = "default_max_upload_bytes")]
    pub max_upload_bytes: usize,
    /// Whether Route hands out signed join tokens and the reflectors require them for a
    /// view's first JOIN (close 4103 without). Default true.
    #[serde(default = "default_true")]
    pub join_tokens: bool,
    /// How long a join token (and the router's reservation) is valid, in seconds.
    #[serde(default = "default_token_ttl_seconds")]
    pub token_ttl_seconds: u64,
    /// Unused reservations one client address may hold per Session (the operator's
    /// `--max-reservations-per-client`). Default 0, off: on one machine every client is the
    /// same loopback address.
    #[serde(default)]
    pub reservations_per_client: u32,
    /// Share of a Session's free places that clients without an API key may hold reserved
    /// together (the operator's `--anonymous-reservation-share`). Default 1, off.
    #[serde(default = "default_anonymous_share")]
    pub anonymous_reservation_share: f64,
}

fn default_anonymous_share() -> f64 {
    1.0
}

fn default_true() -> bool {
    true
}

fn default_token_ttl_seconds() -> u64 {
    60
}

impl Default for LocalSettings {
    fn default() -> Self {
        Self {
            listen: default_listen(),
            data_dir: default_data_dir(),
            reflector_binary: None,
            reflector_host: default_reflector_host(),
            report_interval_millis: default_report_interval_millis(),
            reflector_args: Vec::new(),
            child_logs: ChildLogs::default(),
            max_upload_bytes: default_max_upload_bytes(),
            join_tokens: true,
            token_ttl_seconds: default_token_ttl_seconds(),
            reservations_per_client: 0,
            anonymous_reservation_share: default_anonymous_share(),
        }
    }
}

/// Where a reflector child's stderr goes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
pub enum ChildLogs {
    /// `<dataDir>/logs/<reflector>.log`.
    #[default]
    Files,
    /// refleet up's own stderr.
    Inherit,
}

fn default_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 7080))
}
fn default_data_dir() -> PathBuf {
    PathBuf::from("refleet-local")
}
fn default_reflector_host() -> String {
    "127.0.0.1".to_owned()
}
fn default_report_interval_millis() -> u64 {
    1000
}
fn default_max_upload_bytes() -> usize {
    64 * 1024 * 1024
}

/// A ReflectorPool of the local config.
#[derive(Clone, Debug, PartialEq)]
pub struct LocalPool {
    /// `metadata.namespace` (default `default`).
    pub namespace: String,
    /// `metadata.name`.
    pub name: String,
    /// The spec (with `files`, `reflectorURL` and an image filled in when absent).
    pub spec: ReflectorPoolSpec,
    /// `files.publicURL` as written, if it was: otherwise refleet up's own `/files/`.
    pub files_url: Option<String>,
}

impl LocalPool {
    /// The planner's pool id, `namespace/name` as in a cluster.
    pub fn id(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

/// A Session of the local config.
#[derive(Clone, Debug, PartialEq)]
pub struct LocalSession {
    /// `metadata.namespace` (default `default`).
    pub namespace: String,
    /// `metadata.name`.
    pub name: String,
    /// The spec.
    pub spec: SessionSpec,
}

/// A parsed and checked local configuration.
#[derive(Clone, Debug, PartialEq)]
pub struct LocalConfig {
    /// The LocalFleet settings (defaults when the stream has none).
    pub settings: LocalSettings,
    /// Every ReflectorPool, in stream order.
    pub pools: Vec<LocalPool>,
    /// Every Session, in stream order.
    pub sessions: Vec<LocalSession>,
}

impl LocalConfig {
    /// The embedded default configuration.
    pub fn embedded() -> Result<Self, ConfigError> {
        Self::parse(DEFAULT_CONFIG)
    }

    /// Parses and checks a multi-document YAML stream.
    pub fn parse(text: &str) -> Result<Self, ConfigError> {
        let docs: Vec<Value> =
            serde_saphyr::from_multiple(text).map_err(|e| ConfigError::Yaml(Box::new(e)))?;
        let mut settings: Option<LocalSettings> = None;
        let mut pools: Vec<LocalPool> = Vec::new();
        let mut sessions: Vec<(usize, LocalSession)> = Vec::new();
        for (i, doc) in docs.into_iter().enumerate() {
            let index = i + 1;
            if doc.is_null() {
                continue; // an empty document (e.g. a trailing `---`)
            }
            let Doc {
                kind,
                name,
                namespace,
                mut spec,
            } = Doc::read(index, &doc)?;
            let what = format!("{kind} {name:?}");
            let fail = |message: String| ConfigError::Document {
                index,
                what: what.clone(),
                message,
            };
            match kind.as_str() {
                "LocalFleet" => {
                    if settings.is_some() {
                        return Err(fail("a second LocalFleet document; keep one".into()));
                    }
                    settings = Some(typed(&spec).map_err(fail)?);
                }
                "ReflectorPool" => {
                    let files_url = spec
                        .pointer("/files/publicURL")
                        .and_then(Value::as_str)
                        .map(str::to_owned);
                    fill_local_pool_defaults(&mut spec);
                    cel(ReflectorPool::crd(), "ReflectorPool", &name, &spec).map_err(&fail)?;
                    let spec: ReflectorPoolSpec = typed(&spec).map_err(&fail)?;
                    if pools
                        .iter()
                        .any(|p| p.name == name && p.namespace == namespace)
                    {
                        return Err(fail("a second ReflectorPool with this name".into()));
                    }
                    pools.push(LocalPool {
                        namespace,
                        name,
                        spec,
                        files_url,
                    });
                }
                "Session" => {
                    cel(Session::crd(), "Session", &name, &spec).map_err(&fail)?;
                    let spec: SessionSpec = typed(&spec).map_err(&fail)?;
                    if sessions
                        .iter()
                        .any(|(_, s)| s.name == name && s.namespace == namespace)
                    {
                        return Err(fail("a second Session with this name".into()));
                    }
                    sessions.push((
                        index,
                        LocalSession {
                            namespace,
                            name,
                            spec,
                        },
                    ));
                }
                other => {
                    return Err(fail(format!(
                        "kind: unknown kind {other:?}; expected ReflectorPool, Session or LocalFleet"
                    )));
                }
            }
        }
        if pools.is_empty() {
            return Err(ConfigError::Stream(
                "the config has no ReflectorPool document; a local fleet needs one".into(),
            ));
        }
        // Rules that need two objects: in a cluster they set a Degraded condition; locally
        // the config is refused, since nothing else would show it.
        for (index, s) in &sessions {
            let fail = |message: String| ConfigError::Document {
                index: *index,
                what: format!("Session {:?}", s.name),
                message,
            };
            let Some(pool) = pools
                .iter()
                .find(|p| p.name == s.spec.pool_ref.name && p.namespace == s.namespace)
            else {
                return Err(fail(format!(
                    "spec.poolRef.name: no ReflectorPool {:?} in namespace {:?}",
                    s.spec.pool_ref.name, s.namespace
                )));
            };
            let known: BTreeSet<&str> = pool.spec.regions.iter().map(|r| r.name.as_str()).collect();
            if let Some(unknown) = s.spec.regions.iter().find(|r| !known.contains(r.as_str())) {
                return Err(fail(format!(
                    "spec.regions: pool {:?} has no region {unknown:?} (it has {})",
                    pool.name,
                    known.into_iter().collect::<Vec<_>>().join(", ")
                )));
            }
        }
        Ok(Self {
            settings: settings.unwrap_or_default(),
            pools,
            sessions: sessions.into_iter().map(|(_, s)| s).collect(),
        })
    }
}

/// The envelope of one document.
struct Doc {
    kind: String,
    name: String,
    namespace: String,
    spec: Value,
}

impl Doc {
    fn read(index: usize, doc: &Value) -> Result<Self, ConfigError> {
        let kind = doc.get("kind").and_then(Value::as_str).unwrap_or_default();
        let name = doc
            .pointer("/metadata/name")
            .and_then(Value::as_str)
            .unwrap_or_default();
        let what = if kind.is_empty() {
            "no kind".to_owned()
        } else {
            format!("{kind} {name:?}")
        };
        let fail = |message: &str| ConfigError::Document {
            index,
            what: what.clone(),
            message: message.to_owned(),
        };
        if !doc.is_object() {
            return Err(fail(
                "a document must be a mapping with apiVersion, kind, metadata and spec",
            ));
        }
        if kind.is_empty() {
            return Err(fail("kind: missing (ReflectorPool, Session or LocalFleet)"));
        }
        let api_version = format!("{GROUP}/{VERSION}");
        if doc.get("apiVersion").and_then(Value::as_str) != Some(api_version.as_str()) {
            return Err(fail(&format!("apiVersion: must be {api_version}")));
        }
        if name.is_empty() && kind != "LocalFleet" {
            return Err(fail("metadata.name: missing"));
        }
        let namespace = doc
            .pointer("/metadata/namespace")
            .and_then(Value::as_str)
            .unwrap_or("default");
        let spec = match doc.get("spec") {
            Some(spec) if spec.is_object() => spec.clone(),
            None if kind == "LocalFleet" => Value::Object(Default::default()),
            _ => return Err(fail("spec: missing or not a mapping")),
        };
        Ok(Self {
            kind: kind.to_owned(),
            name: name.to_owned(),
            namespace: namespace.to_owned(),
            spec,
        })
    }
}

/// Fields a cluster needs and the local backend does not: filled in so the spec is valid.
fn fill_local_pool_defaults(spec: &mut Value) {
    let Some(obj) = spec.as_object_mut() else {
        return;
    };
    obj.entry("files")
        .or_insert_with(|| serde_json::json!({ "publicURL": "http://refleet-up.local/files" }));
    obj.entry("reflectorURL")
        .or_insert_with(|| serde_json::json!({ "template": "http://{pod}/" }));
    // refleet up serves each region's gateway on a loopback port of its own.
    if let Some(gateway) = obj.get_mut("gateway").and_then(Value::as_object_mut) {
        gateway
            .entry("publicURL")
            .or_insert_with(|| Value::String("http://refleet-up.local/{region}/".into()));
    }
    let defaults = obj
        .entry("defaults")
        .or_insert_with(|| Value::Object(Default::default()));
    if let Some(defaults) = defaults.as_object_mut() {
        defaults
            .entry("image")
            .or_insert_with(|| Value::String(LOCAL_IMAGE.into()));
    }
}

/// Deserializes `spec`, naming the field path of the first error (`spec.maxUsersPerShard: …`).
fn typed<T: serde::de::DeserializeOwned>(spec: &Value) -> Result<T, String> {
    serde_path_to_error::deserialize(spec).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        if path == "." {
            format!("spec: {inner}")
        } else {
            format!("spec.{path}: {inner}")
        }
    })
}

/// Runs the CRD's CEL rules on the object, as the API server would.
fn cel(
    crd: k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition,
    kind: &str,
    name: &str,
    spec: &Value,
) -> Result<(), String> {
    let object = serde_json::json!({
        "apiVersion": format!("{GROUP}/{VERSION}"), "kind": kind,
        "metadata": {"name": name}, "spec": spec,
    });
    let violations = crate::crdgen::cel_violations(&crd, &object).unwrap_or_default();
    if violations.is_empty() {
        return Ok(());
    }
    Err(violations
        .into_iter()
        .map(|(path, message)| {
            let path = if path.is_empty() { "spec" } else { &path };
            format!("{path}: {message}")
        })
        .collect::<Vec<_>>()
        .join("; "))
}
