//! What the controllers observe: reflector pods and the load each reflector reports.
//!
//! Load comes through the small [`LoadSource`] trait. Today's implementation,
//! [`HttpLoad`], asks every ready reflector pod for `GET http://<podIP>:7070/sessions` (with
//! the report-stream secret, which `/sessions` requires from non-loopback clients); the
//! reflectors' gRPC report stream (a later piece) will implement the same trait.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use kube::ResourceExt;
use refleet_api::reflector::sessions::SessionsReport;
use refleet_core::shard::join_shard;
use serde::Deserialize;

use refleet_api::report_credential::ReportKey;

use super::pod::{LABEL_REGION, LABEL_STATE, REFLECTOR_PORT, STATE_DRAINING};
use refleet_core::planner::ReflectorState;

/// One Croquet session a reflector hosts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HostedSession {
    /// Croquet appId.
    pub app_id: String,
    /// Session (shard) name: the JOIN's name without its `<appId>/` prefix.
    pub name: String,
    /// Connected users.
    pub users: u32,
}

/// A reflector's report: the sessions it hosts.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(from = "SessionsReport")]
pub struct ReflectorLoad {
    /// Whether the reflector says it is draining.
    pub draining: bool,
    /// Hosted sessions.
    pub sessions: Vec<HostedSession>,
}

/// Keeps the sessions whose JOIN named its appId and a shard of it.
impl From<SessionsReport> for ReflectorLoad {
    fn from(report: SessionsReport) -> Self {
        let sessions = report
            .sessions
            .into_iter()
            .filter_map(|s| {
                let shard = join_shard(s.name.as_deref()?, s.app_id.as_deref()?)?.to_owned();
                Some(HostedSession {
                    app_id: s.app_id?,
                    name: shard,
                    users: s.users,
                })
            })
            .collect();
        Self {
            draining: report.draining,
            sessions,
        }
    }
}

/// Where the controllers get each reflector's load from.
pub trait LoadSource: Send + Sync + 'static {
    /// The load of reflector `pod`, or `None` when it could not be read now (the controller
    /// then keeps the figures it had). `credential`: the pod's own report credential, which a
    /// reflector asks for before it lists its sessions to anyone but loopback clients.
    fn load<'a>(
        &'a self,
        pod: &'a Pod,
        credential: Option<&'a str>,
    ) -> Pin<Box<dyn Future<Output = Option<ReflectorLoad>> + Send + 'a>>;
}

/// Reads `GET /sessions` from each reflector pod's IP.
#[derive(Clone, Debug)]
pub struct HttpLoad {
    client: reqwest::Client,
    port: u16,
}

impl HttpLoad {
    /// A load source with a short timeout, so one stuck reflector cannot stall a reconcile.
    pub fn new() -> Self {
        Self::with_port(REFLECTOR_PORT)
    }

    /// Same, on another port (tests run reflectors on loopback addresses).
    pub fn with_port(port: u16) -> Self {
        Self {
            client: reqwest::Client::builder()
                .timeout(Duration::from_secs(2))
                .no_proxy()
                .build()
                .unwrap_or_default(),
            port,
        }
    }
}

impl Default for HttpLoad {
    fn default() -> Self {
        Self::new()
    }
}

impl LoadSource for HttpLoad {
    fn load<'a>(
        &'a self,
        pod: &'a Pod,
        credential: Option<&'a str>,
    ) -> Pin<Box<dyn Future<Output = Option<ReflectorLoad>> + Send + 'a>> {
        Box::pin(async move {
            let ip = pod.status.as_ref()?.pod_ip.as_deref()?;
            let url = format!("http://{ip}:{}/sessions", self.port);
            let mut req = self.client.get(&url);
            if let Some(c) = credential {
                req = req.bearer_auth(c);
            }
            let res = req.send().await;
            match res {
                Ok(r) if r.status().is_success() => r.json().await.ok(),
                Ok(r) => {
                    tracing::debug!(pod = %pod.name_any(), status = %r.status(), "load not readable");
                    None
                }
                Err(error) => {
                    tracing::debug!(pod = %pod.name_any(), %error, "load not readable");
                    None
                }
            }
        })
    }
}

/// A load source that reports nothing (every reflector's load stays as it was).
#[derive(Clone, Copy, Debug, Default)]
pub struct NoLoad;

impl LoadSource for NoLoad {
    fn load<'a>(
        &'a self,
        _pod: &'a Pod,
        _credential: Option<&'a str>,
    ) -> Pin<Box<dyn Future<Output = Option<ReflectorLoad>> + Send + 'a>> {
        Box::pin(async { None })
    }
}

/// The state of a reflector pod: draining once marked or being deleted, ready when its
/// Ready condition is true, starting otherwise. `None` for a pod that ended (it no longer
/// counts as a reflector).
pub fn pod_state(pod: &Pod) -> Option<ReflectorState> {
    let phase = pod.status.as_ref().and_then(|s| s.phase.as_deref());
    if matches!(phase, Some("Succeeded" | "Failed")) {
        return None;
    }
    if pod.metadata.deletion_timestamp.is_some()
        || pod.labels().get(LABEL_STATE).map(String::as_str) == Some(STATE_DRAINING)
    {
        return Some(ReflectorState::Draining);
    }
    let ready = pod
        .status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"));
    Some(if ready {
        ReflectorState::Ready
    } else {
        ReflectorState::Starting
    })
}

/// The region label of a reflector pod.
pub fn pod_region(pod: &Pod) -> Option<&str> {
    pod.labels().get(LABEL_REGION).map(String::as_str)
}

/// The image of a reflector pod's container.
pub fn pod_image(pod: &Pod) -> String {
    pod.spec
        .as_ref()
        .and_then(|s| s.containers.first())
        .and_then(|c| c.image.clone())
        .unwrap_or_default()
}

/// Loads by reflector pod name, for the pods whose load could be read.
pub type LoadByPod = HashMap<String, ReflectorLoad>;

/// Reads the load of every ready or draining pod of `pods`, concurrently, presenting each
/// pod's own report credential minted from `key` (the same credential its pod spec carries).
pub async fn read_loads<'a>(
    source: &dyn LoadSource,
    pods: impl IntoIterator<Item = &'a Pod>,
    key: Option<&ReportKey>,
) -> LoadByPod {
    let reads = pods
        .into_iter()
        .filter(|p| {
            matches!(
                pod_state(p),
                Some(ReflectorState::Ready | ReflectorState::Draining)
            )
        })
        .map(|p| async move {
            let credential = key.and_then(|k| {
                let region = p.labels().get(LABEL_REGION)?;
                k.credential(&p.name_any(), region).ok()
            });
            (p.name_any(), source.load(p, credential.as_deref()).await)
        });
    futures_util::future::join_all(reads)
        .await
        .into_iter()
        .filter_map(|(name, load)| load.map(|l| (name, l)))
        .collect()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn reads_the_reflectors_sessions_report() {
        let load: ReflectorLoad = serde_json::from_value(serde_json::json!({
            "region": "eu", "draining": false,
            "sessions": [
                {"sessionId": "s1", "name": "app/lobby", "appId": "app", "persistentId": "p", "users": 3},
                {"sessionId": "s2", "name": "app/lobby~1", "appId": "app", "persistentId": "p", "users": 1},
                {"sessionId": "s3", "name": null, "appId": null, "persistentId": null, "users": 0},
                {"sessionId": "s4", "name": "other/x", "appId": "app", "persistentId": "p", "users": 2}
            ]
        }))
        .unwrap();
        assert_eq!(
            load.sessions,
            vec![
                HostedSession {
                    app_id: "app".into(),
                    name: "lobby".into(),
                    users: 3
                },
                HostedSession {
                    app_id: "app".into(),
                    name: "lobby~1".into(),
                    users: 1
                },
            ]
        );
    }

    #[tokio::test]
    async fn each_pods_load_is_read_with_its_own_report_credential() {
        let pod: Pod = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "arena-eu-0", "labels": {LABEL_REGION: "eu"}},
            "status": {"phase": "Running", "podIP": "10.0.0.1",
                       "conditions": [{"type": "Ready", "status": "True"}]}
        }))
        .unwrap();
        let key = ReportKey::new(&[7; 32]).unwrap();
        let source = super::super::fixtures::Recording::default();
        read_loads(&source, [&pod], Some(&key)).await;
        read_loads(&source, [&pod], None).await;
        let want = key.credential("arena-eu-0", "eu").unwrap();
        assert_eq!(
            *source.0.lock().unwrap(),
            vec![
                ("arena-eu-0".to_owned(), Some(want)),
                ("arena-eu-0".to_owned(), None)
            ]
        );
    }
}
