//! The generated CRDs: `crds/` matches the Rust types (golden test), the YAML stream parses
//! back, and the CEL rules reject bad objects with the intended messages.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;

use kube::CustomResourceExt;
use refleet_operator::crd::{ReflectorPool, Session};
use refleet_operator::crdgen;
use serde_json::{Value, json};

fn crds_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../crds")
}

#[test]
fn committed_crds_match_the_rust_types() {
    let mut stale = Vec::new();
    for (file, yaml) in crdgen::render_all().unwrap() {
        let path = crds_dir().join(file);
        let committed = std::fs::read_to_string(&path).unwrap_or_default();
        if committed != crdgen::render_file(&yaml) {
            stale.push(file);
        }
    }
    assert!(
        stale.is_empty(),
        "crds/ is out of date ({stale:?}): run `cargo run -p refleet-operator --bin refleet -- crds --write crds/`"
    );
}

#[test]
fn crds_stream_holds_every_crd_as_its_own_document() {
    let stream = crdgen::render_stream().unwrap();
    let docs: Vec<Value> = serde_saphyr::from_multiple(&stream).unwrap();
    let names: Vec<&str> = docs
        .iter()
        .map(|d| d["metadata"]["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        ["reflectorpools.refleet.dev", "sessions.refleet.dev"]
    );
    for doc in &docs {
        assert_eq!(doc["spec"]["scope"], "Namespaced");
        let version = &doc["spec"]["versions"][0];
        assert_eq!(version["name"], "v1alpha1");
        assert!(version["subresources"]["status"].is_object());
        assert!(
            version["additionalPrinterColumns"]
                .as_array()
                .unwrap()
                .len()
                >= 4
        );
    }
}

/// The CEL messages a `Session` with this spec gets (empty when it is accepted).
fn session_errors(spec: Value) -> Vec<String> {
    let object = json!({"apiVersion": "refleet.dev/v1alpha1", "kind": "Session",
        "metadata": {"name": "s"}, "spec": spec});
    cel_errors(&Session::crd(), &object)
}

fn pool_errors(spec: Value) -> Vec<String> {
    let object = json!({"apiVersion": "refleet.dev/v1alpha1", "kind": "ReflectorPool",
        "metadata": {"name": "p"}, "spec": spec});
    cel_errors(&ReflectorPool::crd(), &object)
}

fn cel_errors(
    crd: &k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition,
    object: &Value,
) -> Vec<String> {
    refleet_operator::crdgen::cel_violations(crd, object)
        .expect("the CRD has a schema")
        .into_iter()
        .map(|(_, message)| message)
        .collect()
}

fn session(extra: Value) -> Value {
    let mut spec = json!({"poolRef": {"name": "pool"}, "appId": "com.example.chat"});
    for (k, v) in extra.as_object().unwrap() {
        spec[k] = v.clone();
    }
    spec
}

#[test]
fn a_plain_session_is_accepted() {
    assert_eq!(
        session_errors(session(json!({"name": "lobby"}))),
        Vec::<String>::new()
    );
    assert_eq!(
        session_errors(session(
            json!({"namePattern": "room-*", "scaleUpThreshold": 1.0})
        )),
        Vec::<String>::new()
    );
}

#[test]
fn session_needs_exactly_one_of_name_and_name_pattern() {
    let want = vec!["set exactly one of name or namePattern".to_owned()];
    assert_eq!(session_errors(session(json!({}))), want);
    assert_eq!(
        session_errors(session(json!({"name": "a", "namePattern": "b-*"}))),
        want
    );
}

#[test]
fn session_threshold_must_be_in_zero_one() {
    let want = vec!["scaleUpThreshold must be greater than 0 and at most 1".to_owned()];
    for bad in [0.0, -0.5, 1.01] {
        assert_eq!(
            session_errors(session(json!({"name": "a", "scaleUpThreshold": bad}))),
            want,
            "threshold {bad}"
        );
    }
}

#[test]
fn session_min_shards_must_not_exceed_max_shards() {
    assert_eq!(
        session_errors(session(
            json!({"name": "a", "minShards": 3, "maxShards": 2})
        )),
        vec!["minShards must not exceed maxShards".to_owned()]
    );
    // The default maxShards (10) applies before the rule runs.
    assert_eq!(
        session_errors(session(json!({"name": "a", "minShards": 11}))),
        vec!["minShards must not exceed maxShards".to_owned()]
    );
}

#[test]
fn session_names_must_not_contain_a_tilde() {
    assert_eq!(
        session_errors(session(json!({"name": "room~2"}))),
        vec!["name must not contain '~': it separates a session's name from its shard number (room~2)".to_owned()]
    );
    assert_eq!(
        session_errors(session(json!({"namePattern": "room~*"}))),
        vec!["namePattern must not contain '~': it separates a session's name from its shard number (room~2)".to_owned()]
    );
    assert_eq!(
        session_errors(session(json!({"namePattern": "room"}))),
        vec!["namePattern needs a '*' wildcard; use name for a single session".to_owned()]
    );
}

fn pool(extra: Value) -> Value {
    let mut spec = json!({
        "defaults": {"image": "refleet-reflector:1"},
        "regions": [{"name": "eu"}, {"name": "us"}],
        "files": {"publicURL": "https://files.example.com/"},
        "reflectorURL": {"template": "wss://{pod}.{region}.example.com/"}
    });
    for (k, v) in extra.as_object().unwrap() {
        spec[k] = v.clone();
    }
    spec
}

#[test]
fn a_plain_pool_is_accepted() {
    assert_eq!(pool_errors(pool(json!({}))), Vec::<String>::new());
}

#[test]
fn pool_min_reflectors_must_not_exceed_max_in_defaults_and_regions() {
    let want = vec!["minReflectors must not exceed maxReflectors".to_owned()];
    assert_eq!(
        pool_errors(pool(
            json!({"defaults": {"image": "i", "minReflectors": 5, "maxReflectors": 2}})
        )),
        want
    );
    assert_eq!(
        pool_errors(pool(
            json!({"regions": [{"name": "eu", "minReflectors": 3, "maxReflectors": 1}]})
        )),
        want
    );
}

#[test]
fn pool_region_names_are_unique_and_every_region_has_an_image() {
    assert_eq!(
        pool_errors(pool(json!({"regions": [{"name": "eu"}, {"name": "eu"}]}))),
        vec!["region names must be unique within the pool".to_owned()]
    );
    assert_eq!(
        pool_errors(pool(
            json!({"defaults": {}, "regions": [{"name": "eu", "image": "i"}, {"name": "us"}]})
        )),
        vec![
            "every region needs a reflector image: set spec.defaults.image or regions[].image"
                .to_owned()
        ]
    );
}

#[test]
fn pool_reflector_url_template_needs_the_pod_placeholder() {
    assert_eq!(
        pool_errors(pool(
            json!({"reflectorURL": {"template": "wss://reflectors.example.com/"}})
        )),
        vec![
            "reflectorURL.template must contain {pod}: every reflector needs its own URL"
                .to_owned()
        ]
    );
}

#[test]
fn growth_buffer_seconds_is_bounded_and_described_in_defaults_and_regions() {
    let crd = serde_json::to_value(ReflectorPool::crd()).unwrap();
    let spec = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"];
    for field in [
        &spec["defaults"]["properties"]["growthBufferSeconds"],
        &spec["regions"]["items"]["properties"]["growthBufferSeconds"],
    ] {
        assert_eq!(field["maximum"], json!(600.0), "{field}");
        assert_eq!(field["minimum"], json!(0.0), "{field}");
        let description = field["description"].as_str().unwrap_or_default();
        assert!(description.contains("warmBuffer"), "{description}");
    }
}
