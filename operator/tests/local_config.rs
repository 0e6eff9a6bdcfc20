//! The local fleet config: the embedded default parses, and bad documents are refused with
//! errors naming the document and the field.
#![allow(clippy::unwrap_used)]

use refleet_operator::local::config::{ChildLogs, ConfigError, DEFAULT_CONFIG, LocalConfig};

const POOL: &str = "apiVersion: refleet.dev/v1alpha1
kind: ReflectorPool
metadata: {name: p}
spec:
  regions: [{name: r1}, {name: r2}]
";

fn with_session(session_spec: &str) -> String {
    format!(
        "{POOL}---\napiVersion: refleet.dev/v1alpha1\nkind: Session\nmetadata: {{name: lobby}}\nspec:\n  poolRef: {{name: p}}\n  appId: io.x\n{session_spec}"
    )
}

fn error(text: &str) -> String {
    let err = LocalConfig::parse(text).unwrap_err();
    err.to_string()
}

#[test]
fn embedded_default_config_runs_two_regions_and_one_session() {
    let config = LocalConfig::embedded().unwrap();
    assert_eq!(config.pools.len(), 1);
    let regions: Vec<&str> = config.pools[0]
        .spec
        .regions
        .iter()
        .map(|r| r.name.as_str())
        .collect();
    assert_eq!(regions, ["local-a", "local-b"]);
    assert_eq!(config.sessions.len(), 1);
    assert_eq!(config.sessions[0].spec.name.as_deref(), Some("lobby"));
    assert_eq!(config.settings.child_logs, ChildLogs::Files);
    // No files URL in the example: refleet up serves /files itself.
    assert_eq!(config.pools[0].files_url, None);
}

#[test]
fn example_file_is_the_embedded_default() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../examples/local-fleet.yaml");
    assert_eq!(std::fs::read_to_string(path).unwrap(), DEFAULT_CONFIG);
}

#[test]
fn a_minimal_config_gets_defaults_for_everything_local() {
    let config = LocalConfig::parse(&with_session("  name: lobby\n")).unwrap();
    assert_eq!(config.settings.listen.to_string(), "127.0.0.1:7080");
    assert_eq!(config.pools[0].namespace, "default");
    assert_eq!(config.pools[0].id(), "default/p");
    assert_eq!(config.sessions[0].spec.max_users_per_shard, 100);
}

#[test]
fn a_wrongly_typed_field_names_the_document_and_the_field() {
    let msg = error(&with_session("  name: lobby\n  maxUsersPerShard: lots\n"));
    assert!(
        msg.starts_with("document 2 (Session \"lobby\"): spec.maxUsersPerShard:"),
        "{msg}"
    );
}

#[test]
fn the_crds_cel_rules_apply_to_local_documents() {
    let msg = error(&with_session("  name: lobby\n  scaleUpThreshold: 1.5\n"));
    assert!(
        msg.starts_with("document 2 (Session \"lobby\"): spec"),
        "{msg}"
    );
    assert!(msg.contains("scaleUpThreshold"), "{msg}");
    let msg = error(&with_session("  name: lo~bby\n"));
    assert!(msg.contains('~'), "{msg}");
    let msg = error(&with_session("  maxShards: 2\n"));
    assert!(
        msg.contains("name"),
        "exactly one of name/namePattern: {msg}"
    );
}

#[test]
fn a_session_must_refer_to_a_pool_and_regions_it_has() {
    let text = with_session("  name: lobby\n").replace("poolRef: {name: p}", "poolRef: {name: q}");
    let msg = error(&text);
    assert!(
        msg.starts_with(
            "document 2 (Session \"lobby\"): spec.poolRef.name: no ReflectorPool \"q\""
        ),
        "{msg}"
    );
    let msg = error(&with_session("  name: lobby\n  regions: [r1, mars]\n"));
    assert!(
        msg.contains("spec.regions: pool \"p\" has no region \"mars\" (it has r1, r2)"),
        "{msg}"
    );
}

#[test]
fn unknown_kinds_api_versions_and_settings_are_refused() {
    let msg = error(&format!(
        "{POOL}---\napiVersion: refleet.dev/v1alpha1\nkind: Gadget\nmetadata: {{name: g}}\nspec: {{}}\n"
    ));
    assert!(
        msg.starts_with("document 2 (Gadget \"g\"): kind: unknown kind"),
        "{msg}"
    );
    let msg = error(&POOL.replace("v1alpha1", "v1"));
    assert!(
        msg.starts_with(
            "document 1 (ReflectorPool \"p\"): apiVersion: must be refleet.dev/v1alpha1"
        ),
        "{msg}"
    );
    let msg = error(&format!(
        "apiVersion: refleet.dev/v1alpha1\nkind: LocalFleet\nspec:\n  listn: 1\n---\n{POOL}"
    ));
    assert!(
        msg.starts_with("document 1 (LocalFleet \"\"): spec"),
        "{msg}"
    );
    assert!(msg.contains("listn"), "{msg}");
    let msg = error(&format!(
        "apiVersion: refleet.dev/v1alpha1\nkind: LocalFleet\nspec:\n  listen: nowhere\n---\n{POOL}"
    ));
    assert!(msg.contains("spec.listen:"), "{msg}");
}

#[test]
fn a_config_needs_a_pool_and_valid_yaml() {
    let err =
        LocalConfig::parse("apiVersion: refleet.dev/v1alpha1\nkind: LocalFleet\n").unwrap_err();
    assert!(matches!(err, ConfigError::Stream(_)), "{err}");
    let err = LocalConfig::parse("a: [1, 2\n").unwrap_err();
    assert!(matches!(err, ConfigError::Yaml(_)), "{err}");
    let msg = error(&format!("{POOL}---\n{POOL}"));
    assert!(
        msg.starts_with("document 2 (ReflectorPool \"p\"): a second ReflectorPool"),
        "{msg}"
    );
}
