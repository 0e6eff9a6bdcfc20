//! The pools, Sessions and Lease look-ups the kube tests share.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Patch, PatchParams, PostParams};
use kube::{Api, Client};
use refleet_operator::crd::{ReflectorPool, Session};
use serde_json::json;

use super::eventually;

pub async fn lease_holder(admin: &Client, ns: &str) -> Option<String> {
    let lease = Api::<Lease>::namespaced(admin.clone(), ns)
        .get_opt("refleet-operator")
        .await
        .ok()??;
    lease.spec?.holder_identity
}

pub fn pool(name: &str) -> ReflectorPool {
    serde_json::from_value(json!({
        "apiVersion": "refleet.dev/v1alpha1", "kind": "ReflectorPool",
        "metadata": {"name": name},
        "spec": {
            "defaults": {"image": "refleet-reflector:it", "warmBuffer": 0},
            "regions": [{"name": "eu"}],
            "files": {"publicURL": "http://files.test/"},
            "reflectorURL": {"template": "ws://{pod}.test/"},
            "drainGracePeriodSeconds": 5
        }
    }))
    .unwrap()
}

pub async fn wait_pod(pods: &Api<Pod>, name: &str, timeout: Duration) -> Pod {
    eventually(&format!("pod {name}"), timeout, || {
        let pods = pods.clone();
        async move { pods.get_opt(name).await.ok().flatten() }
    })
    .await
}

/// Creates Session `session` (named `lobby`) and waits for its shard 0 to be placed; the
/// reflector's name.
pub async fn create_and_place(sessions: &Api<Session>, session: &Session) -> String {
    sessions
        .create(&PostParams::default(), session)
        .await
        .unwrap();
    eventually("shard 0 placed", Duration::from_secs(30), || {
        let sessions = sessions.clone();
        async move {
            let st = sessions.get("lobby").await.ok()?.status?;
            let shard = st.shards.iter().find(|s| s.name == "lobby")?;
            (!shard.reflector.is_empty()).then(|| shard.reflector.clone())
        }
    })
    .await
}

/// Pool `arena` with the gateway and moves on.
pub fn moving_pool() -> ReflectorPool {
    let mut arena = pool("arena");
    arena.spec.gateway.enabled = true;
    arena.spec.gateway.public_url = Some("wss://gw-{region}.test/".into());
    arena.spec.moves.enabled = true;
    arena
}

/// Creates `arena` and Session `lobby` in it (one shard of up to `max_users` users), and
/// waits for the shard to be placed: the Sessions API and the shard's reflector.
pub async fn start_lobby(
    admin: &Client,
    ns: &str,
    arena: &ReflectorPool,
    max_users: u32,
) -> (Api<Session>, String) {
    Api::<ReflectorPool>::namespaced(admin.clone(), ns)
        .create(&PostParams::default(), arena)
        .await
        .unwrap();
    let sessions: Api<Session> = Api::namespaced(admin.clone(), ns);
    let session: Session = serde_json::from_value(json!({
        "apiVersion": "refleet.dev/v1alpha1", "kind": "Session",
        "metadata": {"name": "lobby"},
        "spec": {"poolRef": {"name": "arena"}, "appId": "app", "name": "lobby",
                 "maxUsersPerShard": max_users, "minShards": 1, "maxShards": 1}
    }))
    .unwrap();
    let reflector = create_and_place(&sessions, &session).await;
    (sessions, reflector)
}

/// Asks for shard `shard` of Session `lobby` to move, as an operator would by hand (the
/// `refleet.dev/move-shard` annotation).
pub async fn ask_move(sessions: &Api<Session>, shard: &str) {
    sessions
        .patch(
            "lobby",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"annotations": {"refleet.dev/move-shard": shard}}})),
        )
        .await
        .unwrap();
}
