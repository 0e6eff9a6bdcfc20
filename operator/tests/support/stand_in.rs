//! A kubelet stand-in running real `refleet-reflector` processes for the reflector pods of
//! a namespace on a real apiserver, and the protocol-level clients and watches the kube
//! tests use against them.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use k8s_openapi::api::core::v1::Pod;
use kube::api::{ListParams, Patch, PatchParams, PostParams};
use kube::{Api, Client, ResourceExt};
use refleet_api::reflector::launch::{self, LaunchSpec, Setting};
use refleet_operator::crd::{Session, ShardPhase};
use serde_json::{Value, json};
use tokio::io::AsyncBufReadExt;
use tokio_tungstenite::tungstenite::Message;

use super::{eventually, reflector_binary};

/// The reflector processes a test started, by pod; all killed on drop.
#[derive(Default)]
pub struct Reflectors {
    pub children: Mutex<HashMap<String, tokio::process::Child>>,
}

impl Drop for Reflectors {
    fn drop(&mut self) {
        let mut children = self.children.lock().unwrap_or_else(|p| p.into_inner());
        for child in children.values_mut() {
            let _ = child.start_kill();
        }
    }
}

/// How the kubelet stand-in ends pods.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Termination {
    /// Pods stay unbound, so a deleted pod is gone at once (its process keeps running).
    Immediate,
    /// Pods are bound to a node, so a deleted pod terminates as under a kubelet: SIGTERM to
    /// its reflector (which drains within `drain`), removed once the process has exited.
    Graceful { drain: Duration },
}

/// Binds `name` to the stand-in node: deleting it then waits for the "kubelet".
pub async fn bind(pods: &Api<Pod>, name: &str) {
    let binding = json!({
        "apiVersion": "v1", "kind": "Binding", "metadata": {"name": name},
        "target": {"apiVersion": "v1", "kind": "Node", "name": "standin"}
    });
    pods.create_subresource::<Value, Value>("binding", name, &PostParams::default(), &binding)
        .await
        .unwrap();
}

/// A deleted, bound pod: SIGTERM its reflector once, and remove the pod when it has exited.
pub async fn terminate(
    pods: &Api<Pod>,
    reflectors: &Reflectors,
    name: &str,
    signalled: &mut Vec<String>,
) {
    let exited = {
        let mut children = reflectors.children.lock().unwrap();
        match children.get_mut(name) {
            Some(child) => {
                if !signalled.iter().any(|n| n == name) {
                    if let Some(pid) = child.id() {
                        let _ = nix::sys::signal::kill(
                            nix::unistd::Pid::from_raw(i32::try_from(pid).unwrap()),
                            nix::sys::signal::Signal::SIGTERM,
                        );
                    }
                    signalled.push(name.to_owned());
                }
                child.try_wait().ok().flatten().is_some()
            }
            None => true,
        }
    };
    if exited {
        reflectors.children.lock().unwrap().remove(name);
        let _ = pods
            .delete(name, &kube::api::DeleteParams::default().grace_period(0))
            .await;
    }
}

/// Starts a reflector on `addr` with the report-stream part of its pod's environment
/// (`env`), and returns once it prints its `box:` line.
pub async fn start_reflector(
    bin: &Path,
    addr: SocketAddr,
    storage: &Path,
    env: Vec<(String, String)>,
    drain: Duration,
) -> tokio::process::Child {
    let mut child = tokio::process::Command::new(bin)
        .args(
            LaunchSpec {
                listen: Some(addr),
                storage: Some(storage.to_str().unwrap().to_owned()),
                region: Some("eu".into()),
                drain_timeout: Some(drain),
                ..LaunchSpec::default()
            }
            .to_args(),
        )
        .envs(env)
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("spawning refleet-reflector");
    let stdout = child.stdout.take().unwrap();
    let mut lines = tokio::io::BufReader::new(stdout).lines();
    let ready = tokio::time::timeout(Duration::from_secs(20), async {
        while let Ok(Some(line)) = lines.next_line().await {
            if launch::parse_banner(&line).is_some() {
                return true;
            }
        }
        false
    })
    .await;
    assert_eq!(ready, Ok(true), "reflector on {addr} did not start");
    // Keep reading its stdout so it never blocks on a full pipe.
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    child
}

/// Stands in for the kubelet: every reflector pod of `ns` gets a reflector process on its
/// own loopback address `127.0.0.(10+i)` and `port`, then a Running/Ready status with that
/// podIP. Returns each pod's address as it goes. Each pod stores under its own folder of
/// `storage`, unless `shared` (a pool's object store, which moves need).
pub async fn kubelet(
    pods: Api<Pod>,
    reflectors: Arc<Reflectors>,
    addrs: Arc<Mutex<HashMap<String, SocketAddr>>>,
    port: u16,
    storage: PathBuf,
    shared: bool,
    termination: Termination,
) {
    let bin = reflector_binary();
    let mut signalled = Vec::new();
    loop {
        let list = pods.list(&ListParams::default()).await;
        for pod in list.into_iter().flat_map(|l| l.items) {
            let name = pod.name_any();
            if pod.metadata.deletion_timestamp.is_some() {
                if termination != Termination::Immediate {
                    terminate(&pods, &reflectors, &name, &mut signalled).await;
                }
                continue;
            }
            if addrs.lock().unwrap().contains_key(&name) {
                continue;
            }
            let drain = match termination {
                Termination::Immediate => Duration::from_secs(1),
                Termination::Graceful { drain } => {
                    bind(&pods, &name).await;
                    drain
                }
            };
            let i = u8::try_from(addrs.lock().unwrap().len()).unwrap();
            let ip = Ipv4Addr::new(127, 0, 0, 10 + i);
            let addr = SocketAddr::from((ip, port));
            let env = pod
                .spec
                .iter()
                .flat_map(|s| s.containers[0].env.iter().flatten())
                .filter(|e| {
                    [
                        Setting::ReportUrl,
                        Setting::ReportToken,
                        Setting::ReflectorName,
                    ]
                    .iter()
                    .any(|s| s.env() == e.name)
                })
                .map(|e| (e.name.clone(), e.value.clone().unwrap_or_default()))
                .collect();
            let dir = if shared {
                storage.clone()
            } else {
                storage.join(&name)
            };
            let child = start_reflector(&bin, addr, &dir, env, drain).await;
            reflectors
                .children
                .lock()
                .unwrap()
                .insert(name.clone(), child);
            let status = json!({"status": {
                "phase": "Running", "podIP": ip.to_string(),
                "conditions": [{"type": "Ready", "status": "True"}]
            }});
            pods.patch_status(&name, &PatchParams::default(), &Patch::Merge(&status))
                .await
                .unwrap();
            addrs.lock().unwrap().insert(name, addr);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// A running kubelet stand-in for one namespace: the reflector processes it started and
/// each started pod's address. Stops (and kills its reflectors) when dropped.
pub struct StandIn {
    /// The port every reflector listens on, each on its own loopback address.
    pub port: u16,
    pub reflectors: Arc<Reflectors>,
    pub addrs: Arc<Mutex<HashMap<String, SocketAddr>>>,
    task: tokio::task::JoinHandle<()>,
}

impl StandIn {
    /// Runs [`kubelet`] for `ns`, on a port free on this machine now.
    pub fn start(
        admin: &Client,
        ns: &str,
        storage: PathBuf,
        shared: bool,
        termination: Termination,
    ) -> Self {
        let port = std::net::TcpListener::bind("127.0.0.10:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let reflectors = Arc::new(Reflectors::default());
        let addrs = Arc::new(Mutex::new(HashMap::new()));
        let task = tokio::spawn(kubelet(
            Api::namespaced(admin.clone(), ns),
            reflectors.clone(),
            addrs.clone(),
            port,
            storage,
            shared,
            termination,
        ));
        Self {
            port,
            reflectors,
            addrs,
            task,
        }
    }

    /// The process id of pod `name`'s reflector.
    pub fn pid(&self, name: &str) -> u32 {
        self.reflectors.children.lock().unwrap()[name].id().unwrap()
    }
}

impl Drop for StandIn {
    fn drop(&mut self) {
        self.task.abort();
    }
}

pub type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// A protocol-level client: connects to `ws://addr/reflector/<id>`, JOINs as `user` under
/// `<app>/<name>` and waits for SYNC. Returns the socket (the caller keeps it open).
pub async fn join(addr: SocketAddr, id: &str, app: &str, name: &str, user: &str) -> Ws {
    join_sync(addr, id, app, name, user).await.0
}

/// [`join`], also returning the SYNC's `args` (timeline, seq, time, …).
pub async fn join_sync(
    addr: SocketAddr,
    id: &str,
    app: &str,
    name: &str,
    user: &str,
) -> (Ws, Value) {
    let (mut ws, _) = tokio_tungstenite::connect_async(format!("ws://{addr}/reflector/{id}"))
        .await
        .expect("connect");
    let args = json!({
        "name": format!("{app}/{name}"), "apiKey": "none", "appId": app,
        "persistentId": format!("pid-{name}"), "developerId": "unknown_dev_id", "version": 1,
        "user": user, "ticks": {"tick": 1000, "delay": 0}, "tove": "TOVE",
        "codeHash": "code1", "sdk": "1.1.0"
    });
    ws.send(Message::text(
        json!({"id": id, "action": "JOIN", "args": args}).to_string(),
    ))
    .await
    .expect("send JOIN");
    let sync = tokio::time::timeout(Duration::from_secs(10), async {
        while let Some(msg) = ws.next().await {
            if let Ok(Message::Text(t)) = msg {
                let v: Value = serde_json::from_str(&t).unwrap_or_default();
                if v["action"] == "SYNC" {
                    return v["args"].clone();
                }
            }
        }
        panic!("{user}: closed before SYNC");
    })
    .await
    .expect("SYNC in time");
    (ws, sync)
}

/// Keeps reading `ws` (TICKs etc.) so the reflector never sees a stuck client.
pub fn keep_reading(mut ws: Ws) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move { while let Some(Ok(_)) = ws.next().await {} })
}

pub fn tempfile_dir() -> PathBuf {
    let dir = std::env::temp_dir().join(format!("refleet-kube-fleet-{}-data", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// The address the kubelet stand-in gave pod `name`, once it started it.
pub async fn address_of(addrs: &Mutex<HashMap<String, SocketAddr>>, name: &str) -> SocketAddr {
    eventually(
        "the reflector's address",
        Duration::from_secs(20),
        || async move { addrs.lock().unwrap().get(name).copied() },
    )
    .await
}

/// Whether `ws` is closed by the server with `code` within `timeout`.
pub async fn closed_with(mut ws: Ws, code: u16, timeout: Duration) -> bool {
    tokio::time::timeout(timeout, async {
        while let Some(msg) = ws.next().await {
            match msg {
                Ok(Message::Close(Some(f))) => return u16::from(f.code) == code,
                Ok(_) => {}
                Err(_) => return false,
            }
        }
        false
    })
    .await
    .unwrap_or(false)
}

pub async fn events_with_reason(admin: &Client, ns: &str, reason: &str) -> Vec<String> {
    let events: Api<k8s_openapi::api::events::v1::Event> = Api::namespaced(admin.clone(), ns);
    events
        .list(&ListParams::default())
        .await
        .map(|l| {
            l.items
                .into_iter()
                .filter(|e| e.reason.as_deref() == Some(reason))
                .map(|e| e.note.unwrap_or_default())
                .collect()
        })
        .unwrap_or_default()
}

/// Records the `movingTo` of shard `shard` from the first status version that shows it
/// Moving, reading every version the apiserver writes (a watch), not samples of them.
pub async fn record_moving_to(
    sessions: Api<Session>,
    shard: &'static str,
    out: Arc<Mutex<Option<String>>>,
) {
    use kube::runtime::{WatchStreamExt, watcher};
    let config = watcher::Config::default().fields(&format!("metadata.name={shard}"));
    let mut stream = std::pin::pin!(watcher(sessions, config).applied_objects());
    while let Some(event) = stream.next().await {
        let Ok(session) = event else { continue };
        let Some(status) = session.status else {
            continue;
        };
        if let Some(s) = status
            .shards
            .iter()
            .find(|s| s.name == shard && s.state == ShardPhase::Moving)
        {
            let mut out = out.lock().unwrap();
            if out.is_none() {
                *out = s.moving_to.clone();
            }
        }
    }
}
