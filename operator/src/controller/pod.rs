//! Reflector pods and their per-pod Services, built from a pool's resolved region settings.
//!
//! Pure functions: the controller server-side-applies what they return. Pods are named
//! `<pool>-<region>-<n>` with the lowest free `n`, so a retried reconcile re-applies the
//! same object instead of creating a duplicate.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use k8s_openapi::api::core::v1::{
    Capabilities, Container, ContainerPort, EmptyDirVolumeSource, EnvVar, HTTPGetAction, Pod,
    PodSecurityContext, PodSpec, Probe, SeccompProfile, SecurityContext, Service, ServicePort,
    ServiceSpec, Volume, VolumeMount,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::{Resource, ResourceExt};
use refleet_api::reflector::launch::{LaunchSpec, Setting};

use crate::crd::{ReflectorPool, ResolvedRegion};

/// Label: the pool a reflector pod belongs to.
pub const LABEL_POOL: &str = "refleet.dev/pool";
/// Label: the region of a reflector pod.
pub const LABEL_REGION: &str = "refleet.dev/region";
/// Label: the pod's own name (what a per-pod Service selects).
pub const LABEL_POD: &str = "refleet.dev/pod";
/// Label set to `draining` once a reflector must take no new shards.
pub const LABEL_STATE: &str = "refleet.dev/state";
/// Value of [`LABEL_STATE`] on a draining reflector.
pub const STATE_DRAINING: &str = "draining";
/// Annotation: Unix time by which a draining reflector must have stored its shards.
pub const ANNOTATION_DRAIN_DEADLINE: &str = "refleet.dev/drain-deadline";
/// The reflector's HTTP/WebSocket port inside the pod.
pub const REFLECTOR_PORT: u16 = 7070;
/// Name of the reflector container.
pub const CONTAINER: &str = "reflector";
/// UID the reflector runs as (the image does not need root).
pub const RUN_AS_USER: i64 = 65532;
/// Extra seconds on top of the drain grace so the reflector can store state and exit.
pub const TERMINATION_SLACK_SECONDS: i64 = 30;

/// Name of reflector `index` of `region` in `pool`.
pub fn pod_name(pool: &str, region: &str, index: u32) -> String {
    format!("{pool}-{region}-{index}")
}

/// The labels every reflector pod of `pool`/`region` carries (what the controller selects).
pub fn selector_labels(pool: &str, region: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        (LABEL_POOL.to_owned(), pool.to_owned()),
        (LABEL_REGION.to_owned(), region.to_owned()),
    ])
}

/// An owner reference making `pool` the controller of a pod.
pub fn owner_ref(pool: &ReflectorPool) -> Option<OwnerReference> {
    pool.controller_owner_ref(&())
}

/// The reflector pod `name` of `region` in `pool`.
pub fn reflector_pod(pool: &ReflectorPool, region: &ResolvedRegion, name: &str) -> Pod {
    let pool_name = pool.name_any();
    let namespace = pool.namespace().unwrap_or_default();
    let spec = &pool.spec;
    let mut labels = selector_labels(&pool_name, &region.name);
    labels.extend([
        (
            "app.kubernetes.io/name".to_owned(),
            "refleet-reflector".to_owned(),
        ),
        ("app.kubernetes.io/instance".to_owned(), pool_name.clone()),
        (
            "app.kubernetes.io/component".to_owned(),
            "reflector".to_owned(),
        ),
        ("app.kubernetes.io/part-of".to_owned(), "refleet".to_owned()),
        (
            "app.kubernetes.io/managed-by".to_owned(),
            "refleet-operator".to_owned(),
        ),
        (LABEL_POD.to_owned(), name.to_owned()),
    ]);
    let drain = i64::from(spec.drain_grace_period_seconds);
    let launch = LaunchSpec {
        listen: Some(SocketAddr::from(([0, 0, 0, 0], REFLECTOR_PORT))),
        region: Some(region.name.clone()),
        reflector_name: Some(name.to_owned()),
        public_url: Some(spec.reflector_url.render(name, &region.name, &namespace)),
        files_url: Some(spec.files.public_url.clone()),
        storage: Some(
            spec.storage
                .as_ref()
                .map_or_else(|| "file:///data".to_owned(), |s| s.url.clone()),
        ),
        drain_timeout: Some(Duration::from_secs(u64::from(
            spec.drain_grace_period_seconds,
        ))),
        ..LaunchSpec::default()
    };
    let mut env = env_vars(&launch);
    // The pool's and region's own entries win over the built-in ones.
    for var in &region.env {
        env.retain(|e| e.name != var.name);
        env.push(var.clone());
    }
    let env_from = spec
        .storage
        .as_ref()
        .and_then(|s| s.credentials_secret_ref.as_ref())
        .map(|secret| {
            vec![k8s_openapi::api::core::v1::EnvFromSource {
                secret_ref: Some(k8s_openapi::api::core::v1::SecretEnvSource {
                    name: secret.name.clone(),
                    optional: Some(false),
                }),
                ..Default::default()
            }]
        });
    let probe = |path: &str, period: i32| Probe {
        http_get: Some(HTTPGetAction {
            path: Some(path.to_owned()),
            port: IntOrString::String("http".to_owned()),
            ..Default::default()
        }),
        period_seconds: Some(period),
        ..Default::default()
    };
    Pod {
        metadata: ObjectMeta {
            name: Some(name.to_owned()),
            namespace: Some(namespace),
            labels: Some(labels),
            owner_references: owner_ref(pool).map(|o| vec![o]),
            ..Default::default()
        },
        spec: Some(PodSpec {
            containers: vec![Container {
                name: CONTAINER.to_owned(),
                image: region.image.clone(),
                env: Some(env),
                env_from,
                resources: region.resources.clone(),
                ports: Some(vec![ContainerPort {
                    name: Some("http".to_owned()),
                    container_port: i32::from(REFLECTOR_PORT),
                    protocol: Some("TCP".to_owned()),
                    ..Default::default()
                }]),
                readiness_probe: Some(probe("/readyz", 2)),
                liveness_probe: Some(probe("/healthz", 10)),
                security_context: Some(SecurityContext {
                    allow_privilege_escalation: Some(false),
                    read_only_root_filesystem: Some(true),
                    run_as_non_root: Some(true),
                    run_as_user: Some(RUN_AS_USER),
                    run_as_group: Some(RUN_AS_USER),
                    capabilities: Some(Capabilities {
                        drop: Some(vec!["ALL".to_owned()]),
                        ..Default::default()
                    }),
                    seccomp_profile: Some(runtime_default_seccomp()),
                    ..Default::default()
                }),
                volume_mounts: Some(vec![
                    VolumeMount {
                        name: "data".to_owned(),
                        mount_path: "/data".to_owned(),
                        ..Default::default()
                    },
                    VolumeMount {
                        name: "tmp".to_owned(),
                        mount_path: "/tmp".to_owned(),
                        ..Default::default()
                    },
                ]),
                working_dir: Some("/data".to_owned()),
                ..Default::default()
            }],
            // The root filesystem is read-only: local storage and temporary files go to
            // emptyDirs.
            volumes: Some(vec![
                Volume {
                    name: "data".to_owned(),
                    empty_dir: Some(EmptyDirVolumeSource::default()),
                    ..Default::default()
                },
                Volume {
                    name: "tmp".to_owned(),
                    empty_dir: Some(EmptyDirVolumeSource::default()),
                    ..Default::default()
                },
            ]),
            security_context: Some(PodSecurityContext {
                run_as_non_root: Some(true),
                run_as_user: Some(RUN_AS_USER),
                run_as_group: Some(RUN_AS_USER),
                fs_group: Some(RUN_AS_USER),
                seccomp_profile: Some(runtime_default_seccomp()),
                ..Default::default()
            }),
            termination_grace_period_seconds: Some(drain + TERMINATION_SLACK_SECONDS),
            node_selector: region.node_selector.clone(),
            affinity: region.affinity.clone(),
            tolerations: region.tolerations.clone(),
            automount_service_account_token: Some(false),
            enable_service_links: Some(false),
            ..Default::default()
        }),
        status: None,
    }
}

/// Gives `pod` its own report credential. Any credential the pool's env set is dropped, and
/// so is a token file (the reflector would prefer it), so a pool cannot hand its pods
/// another reflector's identity.
pub fn set_report_credential(pod: &mut Pod, credential: String) {
    let Some(c) = pod.spec.as_mut().and_then(|s| s.containers.first_mut()) else {
        return;
    };
    let env = c.env.get_or_insert_with(Vec::new);
    env.retain(|e| {
        e.name != Setting::ReportToken.env() && e.name != Setting::ReportTokenFile.env()
    });
    env.extend(env_vars(&LaunchSpec {
        report_token: Some(credential),
        ..LaunchSpec::default()
    }));
}

/// The Service in front of one reflector pod (when `reflectorURL.perPodService` is set),
/// named like the pod and owned by it, so it goes away with the pod.
pub fn reflector_service(pod: &Pod) -> Service {
    let name = pod.name_any();
    let owner = pod.controller_owner_ref(&()).map(|mut o| {
        o.controller = Some(false);
        o.block_owner_deletion = None;
        o
    });
    let mut labels = pod.labels().clone();
    labels.remove(LABEL_STATE);
    Service {
        metadata: ObjectMeta {
            name: Some(name.clone()),
            namespace: pod.namespace(),
            labels: Some(labels),
            owner_references: owner.map(|o| vec![o]),
            ..Default::default()
        },
        spec: Some(ServiceSpec {
            selector: Some(BTreeMap::from([(LABEL_POD.to_owned(), name)])),
            ports: Some(vec![ServicePort {
                name: Some("http".to_owned()),
                port: i32::from(REFLECTOR_PORT),
                target_port: Some(IntOrString::String("http".to_owned())),
                protocol: Some("TCP".to_owned()),
                ..Default::default()
            }]),
            ..Default::default()
        }),
        status: None,
    }
}

fn runtime_default_seccomp() -> SeccompProfile {
    SeccompProfile {
        type_: "RuntimeDefault".to_owned(),
        ..Default::default()
    }
}

/// The reflector's environment variables for `launch`.
pub fn env_vars(launch: &LaunchSpec) -> Vec<EnvVar> {
    launch
        .to_env()
        .into_iter()
        .map(|(name, value)| env(name, value))
        .collect()
}

fn env(name: &str, value: String) -> EnvVar {
    EnvVar {
        name: name.to_owned(),
        value: Some(value),
        value_from: None,
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::controller::fixtures;

    #[test]
    fn reflector_pod_follows_the_region_settings_and_restricted_pod_security() {
        let pool = fixtures::pool("games", "arena", &["eu", "us"]);
        let region = pool.spec.resolved_region("eu").unwrap();
        let pod = reflector_pod(&pool, &region, &pod_name("arena", "eu", 0));
        assert_eq!(pod.name_any(), "arena-eu-0");
        let labels = pod.labels();
        assert_eq!(labels[LABEL_POOL], "arena");
        assert_eq!(labels[LABEL_REGION], "eu");
        assert_eq!(labels["app.kubernetes.io/name"], "refleet-reflector");
        let owner = &pod.metadata.owner_references.as_ref().unwrap()[0];
        assert_eq!(
            (owner.kind.as_str(), owner.name.as_str()),
            ("ReflectorPool", "arena")
        );
        assert_eq!(owner.controller, Some(true));
        let spec = pod.spec.as_ref().unwrap();
        assert_eq!(spec.termination_grace_period_seconds, Some(300 + 30));
        let c = &spec.containers[0];
        assert_eq!(c.image.as_deref(), Some("refleet-reflector:1"));
        // Restricted Pod Security, on the pod and on the container.
        let sc = c.security_context.as_ref().unwrap();
        assert_eq!(sc.allow_privilege_escalation, Some(false));
        assert_eq!(sc.read_only_root_filesystem, Some(true));
        assert_eq!(sc.run_as_non_root, Some(true));
        assert_eq!(
            (sc.run_as_user, sc.run_as_group),
            (Some(65532), Some(65532))
        );
        assert_eq!(sc.seccomp_profile.as_ref().unwrap().type_, "RuntimeDefault");
        assert_eq!(
            sc.capabilities.as_ref().unwrap().drop.as_deref(),
            Some(&["ALL".to_owned()][..])
        );
        assert!(sc.capabilities.as_ref().unwrap().add.is_none());
        assert!(sc.privileged.is_none());
        let psc = spec.security_context.as_ref().unwrap();
        assert_eq!(psc.run_as_non_root, Some(true));
        assert_eq!(
            (psc.run_as_user, psc.run_as_group),
            (Some(65532), Some(65532))
        );
        assert_eq!(
            psc.seccomp_profile.as_ref().unwrap().type_,
            "RuntimeDefault"
        );
        assert!(spec.host_network.is_none() && spec.host_pid.is_none());
        // The read-only root filesystem leaves /data and /tmp writable, both emptyDirs.
        let volumes = spec.volumes.as_ref().unwrap();
        assert!(volumes.iter().all(|v| v.empty_dir.is_some()));
        let mounts: Vec<_> = c
            .volume_mounts
            .iter()
            .flatten()
            .map(|m| (m.name.as_str(), m.mount_path.as_str()))
            .collect();
        assert_eq!(mounts, [("data", "/data"), ("tmp", "/tmp")]);
        assert!(
            mounts
                .iter()
                .all(|(name, _)| volumes.iter().any(|v| v.name == *name))
        );
        let path = |p: &Option<Probe>| {
            p.as_ref()
                .unwrap()
                .http_get
                .as_ref()
                .unwrap()
                .path
                .clone()
                .unwrap()
        };
        assert_eq!(path(&c.readiness_probe), "/readyz");
        assert_eq!(path(&c.liveness_probe), "/healthz");
        let env: BTreeMap<_, _> = c
            .env
            .iter()
            .flatten()
            .map(|e| (e.name.as_str(), e.value.clone().unwrap()))
            .collect();
        assert_eq!(env["REFLEET_REGION"], "eu");
        assert_eq!(env["REFLEET_PUBLIC_URL"], "ws://arena-eu-0.eu.games.test/");
        assert_eq!(env["REFLEET_DRAIN_TIMEOUT"], "300s");
    }

    #[test]
    fn a_pods_report_credential_replaces_any_the_pool_sets() {
        let mut pool = fixtures::pool("games", "arena", &["eu"]);
        pool.spec.defaults.env = Some(vec![
            env(Setting::ReportToken.env(), "someone-else".into()),
            env("REFLEET_REPORT_TOKEN_FILE", "/elsewhere".into()),
        ]);
        let region = pool.spec.resolved_region("eu").unwrap();
        let mut pod = reflector_pod(&pool, &region, "arena-eu-0");
        set_report_credential(&mut pod, "arena-eu-0.eu.mac".into());
        let env = pod.spec.unwrap().containers[0].env.clone().unwrap();
        let report: Vec<_> = env
            .iter()
            .filter(|e| e.name.starts_with("REFLEET_REPORT_TOKEN"))
            .map(|e| (e.name.as_str(), e.value.as_deref().unwrap()))
            .collect();
        assert_eq!(report, [(Setting::ReportToken.env(), "arena-eu-0.eu.mac")]);
    }

    /// What the reflector makes of a pod's environment, parsed by its own `Config` (this
    /// replaces the chart tests' scan of this file for `REFLEET_…` names).
    #[test]
    fn the_reflector_reads_the_pods_environment_as_intended() {
        let mut pool = fixtures::pool("games", "arena", &["eu"]);
        pool.spec.defaults.env = Some(vec![env("AWS_REGION", "eu-west-1".into())]);
        let region = pool.spec.resolved_region("eu").unwrap();
        let mut pod = reflector_pod(&pool, &region, "arena-eu-0");
        // What the reconcile adds: the routing settings, then the pod's credential.
        let routing = LaunchSpec {
            report_url: Some("http://refleet-report.refleet-system.svc:8081".into()),
            require_join_token: true,
            token_keys: Some("k1=AAAA".into()),
            ..LaunchSpec::default()
        };
        let c = &mut pod.spec.as_mut().unwrap().containers[0];
        c.env.as_mut().unwrap().extend(env_vars(&routing));
        set_report_credential(&mut pod, "arena-eu-0.eu.mac".into());
        let env = pod.spec.unwrap().containers[0].env.clone().unwrap();
        let config = refleet_api::reflector::launch::config_from_env(
            env.iter()
                .map(|e| (e.name.as_str(), e.value.as_deref().unwrap())),
        )
        .unwrap();
        assert_eq!(
            config.listen,
            SocketAddr::from(([0, 0, 0, 0], REFLECTOR_PORT))
        );
        assert_eq!(config.region, "eu");
        assert_eq!(config.reflector_name, "arena-eu-0");
        assert_eq!(
            config.public_url.as_deref(),
            Some("ws://arena-eu-0.eu.games.test/")
        );
        assert_eq!(config.files_url, Some(pool.spec.files.public_url.clone()));
        assert_eq!(config.storage, "file:///data");
        assert_eq!(
            Duration::from(config.drain_timeout),
            Duration::from_secs(300)
        );
        assert_eq!(config.report_url, routing.report_url);
        assert!(config.require_join_token);
        assert_eq!(config.token_keys, "k1=AAAA");
        assert_eq!(config.report_token.as_deref(), Some("arena-eu-0.eu.mac"));
        assert_eq!(config.report_token_file, None);
    }

    #[test]
    fn per_pod_service_selects_exactly_its_pod() {
        let pool = fixtures::pool("games", "arena", &["eu"]);
        let region = pool.spec.resolved_region("eu").unwrap();
        let pod = reflector_pod(&pool, &region, "arena-eu-3");
        let svc = reflector_service(&pod);
        assert_eq!(svc.name_any(), "arena-eu-3");
        let selector = svc.spec.unwrap().selector.unwrap();
        assert_eq!(selector[LABEL_POD], "arena-eu-3");
    }
}
