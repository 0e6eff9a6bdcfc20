//! Against a real kube-apiserver + etcd (scripts/kube-local): the CRDs install and become
//! Established, a CEL rule rejects a bad Session with its message, and the operator —
//! impersonating a ServiceAccount bound to exactly the chart's rules (the ClusterRole, and
//! the Role of its own namespace) — creates a pool's reflector pod and gives a Session its
//! shard, status and Events, with no Forbidden; cannot write Leases outside its own
//! namespace; creates the report key Secret once (never the chart) and gives the pod only its
//! own report credential, which a restarted operator still accepts.
//!
//! Skips (with a message) when the binaries are missing, unless `REFLEET_REQUIRE_KUBE=1`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Namespace, Pod, Secret, ServiceAccount};
use k8s_openapi::api::events::v1::Event;
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, PolicyRule, Role, RoleBinding};
use kube::api::{ListParams, Patch, PatchParams, PostParams};
use kube::{Api, Client};
use refleet_api::report_credential::{ReflectorIdentity, ReportKey};
use refleet_operator::cli::operator::{LogFormat, OperatorArgs, serve};
use refleet_operator::cli::routing::{Routing, RoutingArgs};
use refleet_operator::controller::observe::NoLoad;
use refleet_operator::crd::{ReflectorPool, Session};
use serde_json::json;

mod support;
use support::{config, eventually, prepare, start_kube};

const REPORT_SECRET: &str = "refleet-report-key";

/// The `rules:` of one of the chart's RBAC templates (plain YAML after `rules:`; template
/// lines dropped, and the inline values, the Secrets' names of a release `refleet`, filled in).
fn chart_rules(template: &str) -> Vec<PolicyRule> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../charts/refleet/templates")
        .join(template);
    let text = std::fs::read_to_string(path).unwrap();
    let start = text.find("\nrules:\n").expect("rules: in the template") + 1;
    let rules: String = text[start..]
        .lines()
        .filter(|l| !l.trim_start().starts_with("{{"))
        .map(|l| {
            l.replace(
                r#"{{ include "refleet.joinTokenSecret" . | quote }}"#,
                r#""refleet-join-token""#,
            )
            .replace(
                r#"{{ include "refleet.reportSecret" . | quote }}"#,
                &format!("{REPORT_SECRET:?}"),
            )
        })
        .collect::<Vec<_>>()
        .join("\n");
    assert!(
        !rules.contains("{{"),
        "an unexpected template value in {template}"
    );
    #[derive(serde::Deserialize)]
    struct Rules {
        rules: Vec<PolicyRule>,
    }
    let parsed: Rules = serde_saphyr::from_str(&rules).unwrap();
    parsed.rules
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_with_chart_rbac_runs_pools_and_sessions_on_a_real_apiserver() {
    let Some((_kube, kubeconfig)) = start_kube("controllers", 0) else {
        return;
    };
    let started = Instant::now();
    refleet_operator::controller::install_crypto_provider();
    let admin_config = config(&kubeconfig).await;
    let admin = Client::try_from(admin_config.clone()).unwrap();

    // CRDs install and become Established.
    let ns = "refleet-it";
    prepare(&admin, ns).await;

    // A CEL rule rejects a bad Session with its message.
    let sessions: Api<Session> = Api::namespaced(admin.clone(), ns);
    let bad: Session = serde_json::from_value(json!({
        "apiVersion": "refleet.dev/v1alpha1", "kind": "Session",
        "metadata": {"name": "bad"},
        "spec": {"poolRef": {"name": "arena"}, "appId": "app", "name": "lobby", "scaleUpThreshold": 1.5}
    }))
    .unwrap();
    let err = eventually("the CEL rule to apply", Duration::from_secs(20), || {
        let sessions = sessions.clone();
        let bad = bad.clone();
        async move { sessions.create(&PostParams::default(), &bad).await.err() }
    })
    .await;
    assert!(
        err.to_string()
            .contains("scaleUpThreshold must be greater than 0 and at most 1"),
        "{err}"
    );

    // The chart's RBAC, bound to a ServiceAccount the operator impersonates: the ClusterRole
    // cluster-wide, the own-namespace Role in the release namespace (not the watched one).
    let release_ns = "refleet-it-system";
    Api::<Namespace>::all(admin.clone())
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({"metadata": {"name": release_ns}})).unwrap(),
        )
        .await
        .unwrap();
    let sa: Api<ServiceAccount> = Api::namespaced(admin.clone(), release_ns);
    sa.create(
        &PostParams::default(),
        &serde_json::from_value(json!({"metadata": {"name": "refleet-operator"}})).unwrap(),
    )
    .await
    .unwrap();
    let subjects =
        json!([{"kind": "ServiceAccount", "name": "refleet-operator", "namespace": release_ns}]);
    let role = ClusterRole {
        metadata: serde_json::from_value(json!({"name": "refleet-it-operator"})).unwrap(),
        rules: Some(chart_rules("clusterrole.yaml")),
        ..Default::default()
    };
    Api::<ClusterRole>::all(admin.clone())
        .create(&PostParams::default(), &role)
        .await
        .unwrap();
    let binding: ClusterRoleBinding = serde_json::from_value(json!({
        "metadata": {"name": "refleet-it-operator"},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "refleet-it-operator"},
        "subjects": subjects
    }))
    .unwrap();
    Api::<ClusterRoleBinding>::all(admin.clone())
        .create(&PostParams::default(), &binding)
        .await
        .unwrap();
    let self_role = Role {
        metadata: serde_json::from_value(json!({"name": "refleet-it-operator-self"})).unwrap(),
        rules: Some(chart_rules("role.yaml")),
    };
    Api::<Role>::namespaced(admin.clone(), release_ns)
        .create(&PostParams::default(), &self_role)
        .await
        .unwrap();
    let self_binding: RoleBinding = serde_json::from_value(json!({
        "metadata": {"name": "refleet-it-operator-self"},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "refleet-it-operator-self"},
        "subjects": subjects
    }))
    .unwrap();
    Api::<RoleBinding>::namespaced(admin.clone(), release_ns)
        .create(&PostParams::default(), &self_binding)
        .await
        .unwrap();
    let mut op_config = admin_config.clone();
    op_config.auth_info.impersonate = Some(format!(
        "system:serviceaccount:{release_ns}:refleet-operator"
    ));
    let operator = Client::try_from(op_config).unwrap();

    // Leases only in its own namespace: a Lease in a watched namespace (or any other) is
    // Forbidden, so a compromised operator cannot take over another controller's election.
    let lease: Lease =
        serde_json::from_value(json!({"metadata": {"name": "someone-elses-election"}})).unwrap();
    for other in [ns, "default"] {
        let err = Api::<Lease>::namespaced(operator.clone(), other)
            .create(&PostParams::default(), &lease)
            .await
            .expect_err("a Lease outside the release namespace must be Forbidden");
        assert!(
            matches!(&err, kube::Error::Api(e) if e.code == 403),
            "{other}: {err}"
        );
    }

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let metrics_addr = listener.local_addr().unwrap();
    let args = OperatorArgs {
        namespaces: vec![ns.to_owned()],
        lease_name: "refleet-operator".to_owned(),
        lease_namespace: Some(release_ns.to_owned()),
        identity: Some("it-0".to_owned()),
        lease_duration: Duration::from_secs(6).into(),
        lease_renew_before: Duration::from_secs(2).into(),
        metrics_listen: metrics_addr,
        resync: Duration::from_secs(1).into(),
        status_counts_every: Duration::from_secs(2).into(),
        min_sync_interval: Duration::from_secs(1).into(),
        log_format: LogFormat::Text,
        routing: routing_args(),
    };
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let op = tokio::spawn(serve(
        operator.clone(),
        args,
        listener,
        Arc::new(NoLoad),
        async move {
            let _ = stop_rx.await;
        },
    ));

    // A pool and a Session.
    let pools: Api<ReflectorPool> = Api::namespaced(admin.clone(), ns);
    let pool: ReflectorPool = serde_json::from_value(json!({
        "apiVersion": "refleet.dev/v1alpha1", "kind": "ReflectorPool",
        "metadata": {"name": "arena"},
        "spec": {
            "defaults": {"image": "refleet-reflector:it", "warmBuffer": 0},
            "regions": [{"name": "eu"}],
            "files": {"publicURL": "http://files.test/"},
            "reflectorURL": {"template": "ws://{pod}.test/"},
            "drainGracePeriodSeconds": 5
        }
    }))
    .unwrap();
    pools.create(&PostParams::default(), &pool).await.unwrap();
    let session: Session = serde_json::from_value(json!({
        "apiVersion": "refleet.dev/v1alpha1", "kind": "Session",
        "metadata": {"name": "lobby"},
        "spec": {"poolRef": {"name": "arena"}, "appId": "app", "name": "lobby"}
    }))
    .unwrap();
    sessions
        .create(&PostParams::default(), &session)
        .await
        .unwrap();

    // The pool gets its pod; the test stands in for the kubelet and marks it ready.
    let pods: Api<Pod> = Api::namespaced(admin.clone(), ns);
    let pod = eventually("the reflector pod", Duration::from_secs(30), || {
        let pods = pods.clone();
        async move { pods.get_opt("arena-eu-0").await.ok().flatten() }
    })
    .await;
    assert_eq!(
        pod.metadata.owner_references.clone().unwrap()[0].kind,
        "ReflectorPool"
    );
    // The operator created the report key Secret, and the pod holds only its own credential.
    let secrets: Api<Secret> = Api::namespaced(admin.clone(), release_ns);
    let root = secrets.get(REPORT_SECRET).await.unwrap().data.unwrap()["token"]
        .0
        .clone();
    let credentials: Vec<String> = pod.spec.as_ref().unwrap().containers[0]
        .env
        .iter()
        .flatten()
        .filter(|e| e.name.starts_with("REFLEET_REPORT_TOKEN"))
        .map(|e| e.value.clone().unwrap())
        .collect();
    assert_eq!(credentials.len(), 1, "{credentials:?}");
    let credential = credentials[0].clone();
    assert_eq!(
        ReportKey::new(&root).unwrap().verify(&credential),
        Ok(ReflectorIdentity {
            reflector: "arena-eu-0".into(),
            region: "eu".into()
        })
    );
    let status = json!({"status": {
        "phase": "Running", "podIP": "127.0.0.1",
        "conditions": [{"type": "Ready", "status": "True"}]
    }});
    pods.patch_status(
        "arena-eu-0",
        &PatchParams::default(),
        &Patch::Merge(&status),
    )
    .await
    .unwrap();

    // The Session gets its shard, status and conditions.
    let placed = eventually("the session's shard", Duration::from_secs(30), || {
        let sessions = sessions.clone();
        async move {
            let s = sessions.get("lobby").await.ok()?;
            let st = s.status?;
            let ready = st
                .conditions
                .iter()
                .any(|c| c.type_ == "Ready" && c.status == "True");
            (ready && st.shards.first()?.reflector == "arena-eu-0").then_some(st)
        }
    })
    .await;
    assert_eq!(placed.shards[0].name, "lobby");
    assert_eq!(placed.observed_generation, Some(1));
    let pool_status = eventually("the pool's status", Duration::from_secs(30), || {
        let pools = pools.clone();
        async move {
            let p = pools.get("arena").await.ok()?;
            let st = p.status?;
            (st.regions.first()?.ready == 1).then_some(st)
        }
    })
    .await;
    assert_eq!(pool_status.regions[0].used.sessions, 1);

    // Events for the decisions.
    let events: Api<Event> = Api::namespaced(admin.clone(), ns);
    eventually("a ShardOpened Event", Duration::from_secs(10), || {
        let events = events.clone();
        async move {
            let list = events.list(&ListParams::default()).await.ok()?;
            list.items
                .iter()
                .any(|e| e.reason.as_deref() == Some("ShardOpened"))
                .then_some(())
        }
    })
    .await;

    // Nothing was Forbidden, and the operator says it leads.
    let body = reqwest::get(format!("http://{metrics_addr}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    // Error series exist from start-up at 0: none may have counted a Forbidden.
    assert!(
        body.lines()
            .filter(|l| l.contains("error=\"forbidden\""))
            .all(|l| l.ends_with(" 0")),
        "{body}"
    );
    assert!(body.contains("refleet_operator_leader 1"), "{body}");

    let _ = stop_tx.send(());
    tokio::time::timeout(Duration::from_secs(20), op)
        .await
        .expect("operator stops")
        .unwrap()
        .unwrap();
    // A restarted operator reads the same key (no new Secret, no new credentials): running
    // reflectors' streams stay accepted.
    let restarted = Routing::start(
        operator,
        routing_args(),
        release_ns,
        &prometheus::Registry::new(),
        std::future::ready(()),
    )
    .await
    .unwrap();
    assert_eq!(
        restarted
            .report_key
            .unwrap()
            .credential("arena-eu-0", "eu")
            .unwrap(),
        credential
    );
    assert_eq!(
        secrets.get(REPORT_SECRET).await.unwrap().data.unwrap()["token"].0,
        root
    );
    eprintln!("kube test took {:?}", started.elapsed());
}

/// Routing as the chart sets it up: reflectors report, with credentials from the report key.
fn routing_args() -> RoutingArgs {
    RoutingArgs {
        report_secret: Some(REPORT_SECRET.to_owned()),
        reflector_report_url: Some("http://refleet-report.test:8081".to_owned()),
        ..RoutingArgs::loopback()
    }
}
