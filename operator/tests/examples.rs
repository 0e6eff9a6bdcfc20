//! The examples in `examples/` are real: every file is explained and listed in
//! `examples/README.md`; `refleet up` configs parse with the local config loader; every
//! cluster object parses with the operator's (or k8s-openapi's) own types without losing a
//! field, passes the CRDs' CEL rules and refers only to things that exist; the exposure
//! recipes route every reflector name the operator can create to that reflector's Service;
//! and a real kube-apiserver with the CRDs installed accepts every object (strict field
//! validation, no warnings), stores the same specs the operator's types read, admits the
//! reflector pods the operator would build for each pool under the namespace's Pod Security
//! level, and mutates them as the hostPort recipe says.
//!
//! The apiserver test skips (with a message) when scripts/kube-local has not been built,
//! unless `REFLEET_REQUIRE_KUBE=1`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

use k8s_openapi::api::admissionregistration::v1::{
    MutatingAdmissionPolicy, MutatingAdmissionPolicyBinding,
};
use k8s_openapi::api::core::v1::{Namespace, Pod, Service};
use k8s_openapi::api::networking::v1::Ingress;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::api::{Patch, PatchParams, PostParams, ValidationDirective};
use kube::core::{DynamicObject, GroupVersionKind, Resource};
use kube::{Api, Client, CustomResourceExt};
use refleet_operator::controller::pod::{
    REFLECTOR_PORT, pod_name, reflector_pod, reflector_service,
};
use refleet_operator::crd::{ReflectorPool, Session};
use refleet_operator::local::config::{DEFAULT_CONFIG, LocalConfig};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};

mod support;

// === Reading the examples ===

fn examples_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples")
}

/// One YAML document of an example file.
#[derive(Clone, Debug)]
struct Doc {
    file: String,
    index: usize,
    value: Value,
}

impl Doc {
    fn kind(&self) -> &str {
        self.value["kind"].as_str().unwrap_or_default()
    }
    fn name(&self) -> &str {
        self.value["metadata"]["name"].as_str().unwrap_or_default()
    }
    fn namespace(&self) -> Option<&str> {
        self.value["metadata"]["namespace"].as_str()
    }
    fn what(&self) -> String {
        format!(
            "{} document {} ({} {:?})",
            self.file,
            self.index,
            self.kind(),
            self.name()
        )
    }
}

/// Every `*.yaml` file of examples/ with its text, sorted by name.
fn example_files() -> Vec<(String, String)> {
    let mut files: Vec<(String, String)> = std::fs::read_dir(examples_dir())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml" || e == "yml"))
        .map(|p| {
            (
                p.file_name().unwrap().to_string_lossy().into_owned(),
                std::fs::read_to_string(&p).unwrap(),
            )
        })
        .collect();
    files.sort();
    assert!(files.len() >= 6, "examples/ holds too few files: {files:?}");
    files
}

fn parse_docs(file: &str, text: &str) -> Vec<Doc> {
    let values: Vec<Value> = serde_saphyr::from_multiple(text)
        .unwrap_or_else(|e| panic!("{file} is not a YAML stream: {e}"));
    values
        .into_iter()
        .enumerate()
        .filter(|(_, v)| !v.is_null())
        .map(|(i, value)| Doc {
            file: file.to_owned(),
            index: i + 1,
            value,
        })
        .collect()
}

/// Whether a file is a `refleet up` config (it has a LocalFleet document).
fn is_local(docs: &[Doc]) -> bool {
    docs.iter().any(|d| d.kind() == "LocalFleet")
}

/// Every document of every cluster example (files without a LocalFleet document).
fn cluster_docs() -> Vec<Doc> {
    example_files()
        .iter()
        .map(|(file, text)| parse_docs(file, text))
        .filter(|docs| !is_local(docs))
        .flatten()
        .collect()
}

fn typed<T: DeserializeOwned>(doc: &Doc) -> T {
    serde_path_to_error::deserialize(&doc.value)
        .unwrap_or_else(|e| panic!("{}: {}: {}", doc.what(), e.path(), e.inner()))
}

fn of_kind<T: DeserializeOwned>(docs: &[Doc], kind: &str) -> Vec<(Doc, T)> {
    docs.iter()
        .filter(|d| d.kind() == kind)
        .map(|d| (d.clone(), typed(d)))
        .collect()
}

// === Files and their explanations ===

#[test]
fn every_example_is_explained_in_comments_and_listed_in_the_readme() {
    let readme = std::fs::read_to_string(examples_dir().join("README.md")).unwrap();
    for (file, text) in example_files() {
        let header = text.lines().take_while(|l| l.starts_with('#')).count();
        assert!(
            header >= 3,
            "{file} must open with a comment explaining it ({header} comment lines)"
        );
        assert!(
            readme.contains(&format!("]({file})")),
            "examples/README.md must link {file}"
        );
    }
    // And the README names no example that does not exist.
    let files: BTreeSet<String> = example_files().into_iter().map(|(f, _)| f).collect();
    for link in readme.split("](").skip(1) {
        let target = link.split(')').next().unwrap();
        if target.ends_with(".yaml") && !target.contains('/') {
            assert!(
                files.contains(target),
                "examples/README.md links missing {target}"
            );
        }
    }
}

#[test]
fn local_examples_parse_with_the_local_config_loader() {
    let mut local = 0;
    for (file, text) in example_files() {
        if is_local(&parse_docs(&file, &text)) {
            LocalConfig::parse(&text).unwrap_or_else(|e| panic!("{file}: {e}"));
            local += 1;
        }
    }
    assert!(local >= 1, "no LocalFleet example");
    // The embedded default of `refleet up` is examples/local-fleet.yaml itself.
    let text = std::fs::read_to_string(examples_dir().join("local-fleet.yaml")).unwrap();
    assert_eq!(text, DEFAULT_CONFIG);
}

// === Cluster objects, checked without a cluster ===

/// Checks that every value written in `written` survives in `typed` (the same object after
/// a round trip through its Rust type): a field the type does not know, or a value it reads
/// differently, is reported with its path.
fn check_kept(written: &Value, typed: &Value, path: &str, lost: &mut Vec<String>) {
    match (written, typed) {
        (Value::Object(w), Value::Object(t)) => {
            for (k, v) in w {
                match t.get(k) {
                    Some(tv) => check_kept(v, tv, &format!("{path}.{k}"), lost),
                    None if v.is_null() => {}
                    None => lost.push(format!("{path}.{k}")),
                }
            }
        }
        (Value::Array(w), Value::Array(t)) if w.len() == t.len() => {
            for (i, (wv, tv)) in w.iter().zip(t).enumerate() {
                check_kept(wv, tv, &format!("{path}[{i}]"), lost);
            }
        }
        (Value::Number(w), Value::Number(t)) if w.as_f64() == t.as_f64() => {}
        (w, t) if w == t => {}
        _ => lost.push(format!("{path}: {written} became {typed}")),
    }
}

fn round_trip<T: DeserializeOwned + Serialize>(doc: &Doc) -> Vec<String> {
    let value: T = typed(doc);
    let back = serde_json::to_value(&value).unwrap();
    let mut lost = Vec::new();
    check_kept(&doc.value, &back, "", &mut lost);
    lost
}

fn cel_errors(
    crd: k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition,
    doc: &Doc,
) -> Vec<String> {
    refleet_operator::crdgen::cel_violations(&crd, &doc.value)
        .expect("the CRD has a schema")
        .into_iter()
        .map(|(_, message)| message)
        .collect()
}

#[test]
fn cluster_examples_parse_with_the_operators_types_without_losing_a_field() {
    let docs = cluster_docs();
    let mut kinds = BTreeSet::new();
    for doc in &docs {
        assert_eq!(
            doc.value["metadata"]["name"].as_str().map(str::is_empty),
            Some(false),
            "{}: metadata.name",
            doc.what()
        );
        let lost = match doc.kind() {
            "ReflectorPool" => {
                let errors = cel_errors(ReflectorPool::crd(), doc);
                assert!(errors.is_empty(), "{}: {errors:?}", doc.what());
                round_trip::<ReflectorPool>(doc)
            }
            "Session" => {
                let errors = cel_errors(Session::crd(), doc);
                assert!(errors.is_empty(), "{}: {errors:?}", doc.what());
                round_trip::<Session>(doc)
            }
            "Namespace" => round_trip::<Namespace>(doc),
            "Service" => round_trip::<Service>(doc),
            "Ingress" => round_trip::<Ingress>(doc),
            "MutatingAdmissionPolicy" => round_trip::<MutatingAdmissionPolicy>(doc),
            "MutatingAdmissionPolicyBinding" => round_trip::<MutatingAdmissionPolicyBinding>(doc),
            other => panic!(
                "{}: kind {other} is not checked by this test; add it here",
                doc.what()
            ),
        };
        assert!(
            lost.is_empty(),
            "{}: fields the type does not keep: {lost:?}",
            doc.what()
        );
        if doc.kind() != "Namespace" && !doc.kind().starts_with("MutatingAdmission") {
            assert!(
                doc.namespace().is_some(),
                "{}: set metadata.namespace",
                doc.what()
            );
        }
        kinds.insert(doc.kind().to_owned());
    }
    for kind in [
        "ReflectorPool",
        "Session",
        "Service",
        "Ingress",
        "Namespace",
    ] {
        assert!(kinds.contains(kind), "no example has a {kind}");
    }
}

fn pools(docs: &[Doc]) -> Vec<(Doc, ReflectorPool)> {
    of_kind(docs, "ReflectorPool")
}

#[test]
fn cluster_examples_refer_only_to_what_exists() {
    let docs = cluster_docs();
    let pools = pools(&docs);
    let namespaces: BTreeSet<String> = docs
        .iter()
        .filter(|d| d.kind() == "Namespace")
        .map(|d| d.name().to_owned())
        .collect();
    // Every namespaced object's namespace is created by its own file, so each file
    // applies on its own.
    for doc in &docs {
        if let Some(ns) = doc.namespace() {
            assert!(
                docs.iter()
                    .any(|d| d.file == doc.file && d.kind() == "Namespace" && d.name() == ns),
                "{}: its file does not create namespace {ns}",
                doc.what()
            );
        }
    }
    assert!(!namespaces.is_empty());
    for (doc, session) in of_kind::<Session>(&docs, "Session") {
        let ns = doc.namespace().unwrap();
        let pool = pools
            .iter()
            .find(|(d, _)| d.namespace() == Some(ns) && d.name() == session.spec.pool_ref.name)
            .unwrap_or_else(|| {
                panic!(
                    "{}: no example defines ReflectorPool {}/{}",
                    doc.what(),
                    ns,
                    session.spec.pool_ref.name
                )
            });
        for region in &session.spec.regions {
            assert!(
                pool.1.spec.regions.iter().any(|r| &r.name == region),
                "{}: pool {} has no region {region}",
                doc.what(),
                pool.0.name()
            );
        }
    }
    for (doc, pool) in &pools {
        // The storage Secret is created by hand (credentials stay out of examples): the
        // file says how.
        if let Some(secret) = pool
            .spec
            .storage
            .as_ref()
            .and_then(|s| s.credentials_secret_ref.as_ref())
        {
            let text = std::fs::read_to_string(examples_dir().join(&doc.file)).unwrap();
            assert!(
                text.contains(&format!("create secret generic {}", secret.name)),
                "{}: say how to create the Secret {}",
                doc.what(),
                secret.name
            );
        }
        // Reflectors serve files under /files; the examples use no rewrite.
        let files = &pool.spec.files.public_url;
        let uri: http::Uri = files.parse().unwrap();
        assert!(
            uri.path().trim_end_matches('/').ends_with("/files") && !files.contains("{pod}"),
            "{}: files.publicURL {files} must be a stable URL ending in /files",
            doc.what()
        );
        // Some Service of the examples serves those files: it selects the pool's reflector
        // pods and targets their `http` port.
        let region = pool.spec.resolved_regions().remove(0);
        let pod = reflector_pod(pool, &region, &pod_name(doc.name(), &region.name, 0));
        let labels = pod.metadata.labels.clone().unwrap();
        let serving = of_kind::<Service>(&docs, "Service")
            .into_iter()
            .any(|(d, svc)| {
                let spec = svc.spec.unwrap();
                d.namespace() == doc.namespace()
                    && spec
                        .selector
                        .unwrap_or_default()
                        .iter()
                        .all(|(k, v)| labels.get(k) == Some(v))
                    && spec.ports.unwrap_or_default().iter().any(|p| {
                        p.target_port == Some(IntOrString::String("http".into()))
                            || p.target_port == Some(IntOrString::Int(i32::from(REFLECTOR_PORT)))
                    })
            });
        assert!(
            serving,
            "{}: no Service serves the pool's files",
            doc.what()
        );
    }
}

/// The backend (Service name, port) an Ingress of `namespace` sends `uri` to, following
/// the Ingress rules: matching host (exact, or `*.` one label), then the longest matching
/// path (`Prefix` matches whole path segments).
fn ingress_backend(
    ingresses: &[(Doc, Ingress)],
    namespace: &str,
    uri: &http::Uri,
) -> Option<(String, String)> {
    let host = uri.host()?;
    let path = uri.path();
    let mut best: Option<(usize, String, String)> = None;
    for (doc, ing) in ingresses {
        if doc.namespace() != Some(namespace) {
            continue;
        }
        for rule in ing.spec.as_ref()?.rules.iter().flatten() {
            let matches_host = match rule.host.as_deref() {
                None => true,
                Some(h) if h.starts_with("*.") => host
                    .split_once('.')
                    .is_some_and(|(_, rest)| rest == &h[2..]),
                Some(h) => h == host,
            };
            if !matches_host {
                continue;
            }
            for p in rule.http.iter().flat_map(|h| &h.paths) {
                let rule_path = p.path.as_deref().unwrap_or("/");
                let hit = match p.path_type.as_str() {
                    "Exact" => path == rule_path,
                    _ => {
                        let prefix = rule_path.trim_end_matches('/');
                        prefix.is_empty()
                            || path == prefix
                            || path.starts_with(&format!("{prefix}/"))
                    }
                };
                if hit
                    && best
                        .as_ref()
                        .is_none_or(|(len, _, _)| rule_path.len() > *len)
                {
                    let svc = p.backend.service.as_ref()?;
                    let port = svc.port.as_ref()?;
                    let port = port
                        .name
                        .clone()
                        .or(port.number.map(|n| n.to_string()))
                        .unwrap_or_default();
                    best = Some((rule_path.len(), svc.name.clone(), port));
                }
            }
        }
    }
    best.map(|(_, svc, port)| (svc, port))
}

fn public_url(pod: &Pod) -> String {
    pod.spec.as_ref().unwrap().containers[0]
        .env
        .iter()
        .flatten()
        .find(|e| e.name == "REFLEET_PUBLIC_URL")
        .and_then(|e| e.value.clone())
        .unwrap()
}

/// What a client connects to: the URL the reflector reports (its REFLEET_PUBLIC_URL) plus
/// the join token, as Route answers (`Router::answer`), plus the session id the client
/// appends.
fn client_url(pod: &Pod) -> String {
    format!("{}TOKEN.SIGNATURE/0123abcd", public_url(pod))
}

#[test]
fn ingress_recipes_route_every_reflector_name_the_operator_can_create_to_its_service() {
    let docs = cluster_docs();
    let ingresses: Vec<(Doc, Ingress)> = of_kind(&docs, "Ingress");
    let services: Vec<(Doc, Service)> = of_kind(&docs, "Service");
    let mut covered = BTreeSet::new();
    for (doc, pool) in pools(&docs) {
        let ns = doc.namespace().unwrap();
        let first = pool.spec.resolved_regions().remove(0);
        let probe = reflector_pod(&pool, &first, &pod_name(doc.name(), &first.name, 0));
        let probe_uri: http::Uri = client_url(&probe).parse().unwrap();
        if ingress_backend(&ingresses, ns, &probe_uri).is_none() {
            continue; // exposed another way (see the recipe's comments)
        }
        covered.insert(format!("{ns}/{}", doc.name()));
        assert!(
            pool.spec.reflector_url.per_pod_service,
            "{}: the Ingress routes to per-pod Services: set reflectorURL.perPodService",
            doc.what()
        );
        for region in pool.spec.resolved_regions() {
            // Lowest free index: at most maxReflectors accepting plus as many draining
            // during a roll-over.
            for n in 0..2 * region.max_reflectors {
                let name = pod_name(doc.name(), &region.name, n);
                let pod = reflector_pod(&pool, &region, &name);
                let url = client_url(&pod);
                let uri: http::Uri = url.parse().unwrap();
                let (svc, port) = ingress_backend(&ingresses, ns, &uri)
                    .unwrap_or_else(|| panic!("{}: nothing routes {url}", doc.what()));
                assert_eq!(svc, name, "{}: {url} goes to the wrong Service", doc.what());
                let service = reflector_service(&pod);
                let ports = service.spec.unwrap().ports.unwrap();
                assert!(
                    ports
                        .iter()
                        .any(|p| p.name.as_deref() == Some(port.as_str())
                            || p.port.to_string() == port),
                    "{}: Service {name} has no port {port}",
                    doc.what()
                );
            }
        }
        // The files URL reaches a Service of the examples that selects the pool's pods.
        let files: http::Uri = format!(
            "{}/apps/com.example/x/save/hash",
            pool.spec.files.public_url.trim_end_matches('/')
        )
        .parse()
        .unwrap();
        let (svc, _) = ingress_backend(&ingresses, ns, &files)
            .unwrap_or_else(|| panic!("{}: nothing routes the files URL", doc.what()));
        let (_, service) = services
            .iter()
            .find(|(d, _)| d.namespace() == Some(ns) && d.name() == svc)
            .unwrap_or_else(|| {
                panic!("{}: files Service {svc} is not in the examples", doc.what())
            });
        let labels = probe.metadata.labels.clone().unwrap();
        let selector = service.spec.as_ref().unwrap().selector.clone().unwrap();
        assert!(
            selector.iter().all(|(k, v)| labels.get(k) == Some(v)),
            "{}: files Service {svc} does not select the pool's reflector pods",
            doc.what()
        );
    }
    assert_eq!(
        covered,
        BTreeSet::from(["games/arena".to_owned(), "games/plaza".to_owned()]),
        "pools exposed by the Ingress recipes"
    );
    // No public route reaches a reflector's own endpoints (the Ingresses forward paths
    // unchanged, so these would arrive as they are).
    for (doc, ing) in &ingresses {
        let ns = doc.namespace().unwrap();
        for rule in ing.spec.as_ref().unwrap().rules.iter().flatten() {
            let host = rule
                .host
                .clone()
                .unwrap_or_else(|| "any.example.com".into());
            let host = host.replace('*', "wildcard");
            for path in ["/metrics", "/sessions", "/healthz", "/readyz"] {
                let uri: http::Uri = format!("https://{host}{path}").parse().unwrap();
                assert_eq!(
                    ingress_backend(&ingresses, ns, &uri),
                    None,
                    "{}: {uri} is public",
                    doc.what()
                );
            }
        }
    }
}

#[test]
fn hostport_recipe_advertises_the_nodes_address_and_selects_the_pools_pods() {
    let docs = cluster_docs();
    let (doc, pool) = pools(&docs)
        .into_iter()
        .find(|(d, _)| d.file == "exposure-hostport.yaml")
        .unwrap();
    let region = pool.spec.resolved_regions().remove(0);
    let pod = reflector_pod(&pool, &region, &pod_name(doc.name(), &region.name, 0));
    let env = pod.spec.as_ref().unwrap().containers[0]
        .env
        .clone()
        .unwrap();
    let at = |name: &str| {
        let found: Vec<usize> = env
            .iter()
            .enumerate()
            .filter(|(_, e)| e.name == name)
            .map(|(i, _)| i)
            .collect();
        assert_eq!(found.len(), 1, "{name} once in {env:?}");
        found[0]
    };
    let (ip, url) = (at("REFLEET_NODE_IP"), at("REFLEET_PUBLIC_URL"));
    assert!(
        ip < url,
        "$(REFLEET_NODE_IP) only expands when defined before"
    );
    let field = env[ip]
        .value_from
        .as_ref()
        .unwrap()
        .field_ref
        .as_ref()
        .unwrap();
    assert_eq!(field.field_path, "status.hostIP");
    assert_eq!(
        env[url].value.as_deref(),
        Some("ws://$(REFLEET_NODE_IP):7070/")
    );
    let labels = pod.metadata.labels.clone().unwrap();
    let policy: MutatingAdmissionPolicy = of_kind(&docs, "MutatingAdmissionPolicy")
        .into_iter()
        .map(|(_, p)| p)
        .next()
        .unwrap();
    let selector = policy
        .spec
        .unwrap()
        .match_constraints
        .unwrap()
        .object_selector
        .unwrap()
        .match_labels
        .unwrap();
    assert!(selector.iter().all(|(k, v)| labels.get(k) == Some(v)));
    let binding: MutatingAdmissionPolicyBinding = of_kind(&docs, "MutatingAdmissionPolicyBinding")
        .into_iter()
        .map(|(_, b)| b)
        .next()
        .unwrap();
    let ns_selector = binding
        .spec
        .unwrap()
        .match_resources
        .unwrap()
        .namespace_selector
        .unwrap()
        .match_labels
        .unwrap();
    assert_eq!(
        ns_selector,
        BTreeMap::from([(
            "kubernetes.io/metadata.name".to_owned(),
            doc.namespace().unwrap().to_owned()
        )])
    );
}

// === A real kube-apiserver ===

/// Server-side applies one object (strict field validation); returns the stored object and
/// the apiserver's Warning headers.
async fn apply(client: &Client, doc: &Doc) -> (Value, Vec<String>) {
    let (group, version) = match doc.value["apiVersion"].as_str().unwrap().split_once('/') {
        Some((g, v)) => (g.to_owned(), v.to_owned()),
        None => (
            String::new(),
            doc.value["apiVersion"].as_str().unwrap().to_owned(),
        ),
    };
    let gvk = GroupVersionKind::gvk(&group, &version, doc.kind());
    let (ar, _) = support::eventually(
        &format!("{} to be served", doc.kind()),
        Duration::from_secs(30),
        || async { kube::discovery::pinned_kind(client, &gvk).await.ok() },
    )
    .await;
    let url = DynamicObject::url_path(&ar, doc.namespace());
    let params = PatchParams {
        field_validation: Some(ValidationDirective::Strict),
        ..PatchParams::apply(&format!("example-{}", doc.file.trim_end_matches(".yaml")))
    };
    let request = kube::core::Request::new(url)
        .patch(doc.name(), &params, &Patch::Apply(&doc.value))
        .unwrap();
    send(client, request, &doc.what()).await
}

/// Creates `object` with dryRun=All; returns what the apiserver would store and its warnings.
async fn dry_run_create<K: Resource<DynamicType = ()> + Serialize>(
    client: &Client,
    object: &K,
    what: &str,
) -> (Value, Vec<String>) {
    let url = K::url_path(&(), object.meta().namespace.as_deref());
    let params = PostParams {
        dry_run: true,
        ..PostParams::default()
    };
    let request = kube::core::Request::new(url)
        .create(&params, serde_json::to_vec(object).unwrap())
        .unwrap();
    send(client, request, what).await
}

async fn send(
    client: &Client,
    request: http::Request<Vec<u8>>,
    what: &str,
) -> (Value, Vec<String>) {
    let response = client
        .send(request.map(kube::client::Body::from))
        .await
        .unwrap();
    let status = response.status();
    let warnings: Vec<String> = response
        .headers()
        .get_all("warning")
        .iter()
        .map(|v| v.to_str().unwrap_or_default().to_owned())
        .collect();
    let body = response.into_body().collect_bytes().await.unwrap();
    let body: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    assert!(status.is_success(), "{what}: HTTP {status}: {body}");
    (body, warnings)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_examples_are_accepted_by_a_real_apiserver() {
    let Some((_kube, kubeconfig)) = support::start_kube("examples", 5) else {
        return;
    };
    refleet_operator::controller::install_crypto_provider();
    let admin = support::admin_client(&kubeconfig).await;
    support::prepare(&admin, "refleet-examples").await;

    // Every object of every file, file by file as `kubectl apply --server-side -f` would.
    let docs = cluster_docs();
    let mut applied = 0;
    for doc in &docs {
        let (stored, warnings) = apply(&admin, doc).await;
        assert!(warnings.is_empty(), "{}: warnings {warnings:?}", doc.what());
        assert_eq!(stored["metadata"]["name"], json!(doc.name()));
        applied += 1;
    }
    eprintln!("applied {applied} objects from the examples");

    // The apiserver stores (with its schema defaults) exactly the specs the operator's types
    // read from the files (with their serde defaults).
    for (doc, local) in pools(&docs) {
        let api: Api<ReflectorPool> = Api::namespaced(admin.clone(), doc.namespace().unwrap());
        let stored = api.get(doc.name()).await.unwrap();
        assert_eq!(stored.spec, local.spec, "{}", doc.what());
    }
    for (doc, local) in of_kind::<Session>(&docs, "Session") {
        let api: Api<Session> = Api::namespaced(admin.clone(), doc.namespace().unwrap());
        let stored = api.get(doc.name()).await.unwrap();
        assert_eq!(stored.spec, local.spec, "{}", doc.what());
    }

    // The reflector pods (and per-pod Services) the operator would create for each pool are
    // admitted in the pool's namespace under its Pod Security labels, without warnings; in
    // the hostPort recipe's namespace the MutatingAdmissionPolicy adds the hostPort.
    for (doc, _) in pools(&docs) {
        let ns = doc.namespace().unwrap();
        let pool = Api::<ReflectorPool>::namespaced(admin.clone(), ns)
            .get(doc.name())
            .await
            .unwrap();
        for region in pool.spec.resolved_regions() {
            let name = pod_name(doc.name(), &region.name, 0);
            let pod = reflector_pod(&pool, &region, &name);
            let what = format!("{} pod {name}", doc.what());
            let expect_host_port = doc.file == "exposure-hostport.yaml";
            let (created, warnings) = support::eventually(
                &format!("{what} admitted as expected"),
                Duration::from_secs(30),
                || async {
                    let (created, warnings) = dry_run_create(&admin, &pod, &what).await;
                    let host_port =
                        created["spec"]["containers"][0]["ports"][0]["hostPort"].clone();
                    (host_port
                        == if expect_host_port {
                            json!(7070)
                        } else {
                            Value::Null
                        })
                    .then_some((created, warnings))
                },
            )
            .await;
            assert!(warnings.is_empty(), "{what}: warnings {warnings:?}");
            assert_eq!(created["metadata"]["namespace"], json!(ns));
            if pool.spec.reflector_url.per_pod_service {
                let mut svc = reflector_service(&pod);
                svc.metadata.owner_references = None; // the pod is only a dry run
                let (_, warnings) = dry_run_create(&admin, &svc, &format!("{what} Service")).await;
                assert!(warnings.is_empty(), "{what} Service: warnings {warnings:?}");
            }
        }
    }
}
