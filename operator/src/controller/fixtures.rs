//! Test fixtures: pools and sessions as the API server would return them.

#![allow(clippy::unwrap_used)]

use kube::api::ObjectMeta;

use crate::crd::{ReflectorPool, ReflectorPoolSpec, Session, SessionSpec, ShardPhase};
use refleet_core::planner::ShardRecord;

/// Pool `name` in `namespace` with `regions` (image `refleet-reflector:1`, default sizes).
pub fn pool(namespace: &str, name: &str, regions: &[&str]) -> ReflectorPool {
    let spec: ReflectorPoolSpec = serde_json::from_value(serde_json::json!({
        "defaults": { "image": "refleet-reflector:1" },
        "regions": regions.iter().map(|r| serde_json::json!({"name": r})).collect::<Vec<_>>(),
        "files": { "publicURL": "https://files.test/" },
        "reflectorURL": { "template": "ws://{pod}.{region}.{namespace}.test/" }
    }))
    .unwrap();
    ReflectorPool {
        metadata: meta(namespace, name),
        spec,
        status: None,
    }
}

/// Exact-name Session `name` of app `app` in `namespace`, served by `pool`.
pub fn session(namespace: &str, name: &str, pool: &str) -> Session {
    let spec: SessionSpec = serde_json::from_value(serde_json::json!({
        "poolRef": { "name": pool }, "appId": "app", "name": name
    }))
    .unwrap();
    Session {
        metadata: meta(namespace, name),
        spec,
        status: None,
    }
}

/// Metadata of a stored object: name, namespace, a uid and generation 1.
fn meta(namespace: &str, name: &str) -> ObjectMeta {
    ObjectMeta {
        name: Some(name.to_owned()),
        namespace: Some(namespace.to_owned()),
        uid: Some(format!("uid-{name}")),
        generation: Some(1),
        ..Default::default()
    }
}

/// Shard `name` (`<session>` or `<session>~N`) of planner session `key`, in `phase` with
/// `users`, on reflector `r` of region `region` in pool `pool` (cap 10).
pub fn shard(
    key: &str,
    name: &str,
    (pool, region): (&str, &str),
    users: u32,
    phase: ShardPhase,
) -> ShardRecord {
    ShardRecord {
        session: key.into(),
        name: name.into(),
        index: refleet_core::shard::parse_shard_name(name)
            .expect("a shard name")
            .1,
        pool: pool.into(),
        region: region.into(),
        reflector: Some("r".into()),
        committed_users: 10,
        users,
        reserved: 0,
        phase,
        empty_since: None,
        moving_to: None,
        moved_at: None,
    }
}

/// A load source that remembers which pod each read was for and the credential it
/// presented, and reads nothing.
#[derive(Default)]
pub struct Recording(pub std::sync::Mutex<Vec<(String, Option<String>)>>);

impl super::observe::LoadSource for Recording {
    fn load<'a>(
        &'a self,
        pod: &'a k8s_openapi::api::core::v1::Pod,
        credential: Option<&'a str>,
    ) -> std::pin::Pin<
        Box<dyn std::future::Future<Output = Option<super::observe::ReflectorLoad>> + Send + 'a>,
    > {
        use kube::ResourceExt;
        self.0
            .lock()
            .unwrap()
            .push((pod.name_any(), credential.map(str::to_owned)));
        Box::pin(async { None })
    }
}
