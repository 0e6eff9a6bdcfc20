//! A real kube-apiserver + etcd for the integration tests (via scripts/kube-local), one per
//! test, on free ports; plus the small waiting and set-up helpers the tests share.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

pub mod fixtures;
pub mod operator_process;
pub mod stand_in;

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Namespace;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Patch, PatchParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Api, Client, Config};
use refleet_operator::crd::all_crds;
use serde_json::json;

/// Stops the apiserver and etcd (and removes their state) when dropped.
pub struct KubeLocal {
    dir: PathBuf,
    repo: PathBuf,
    base: u16,
}

impl KubeLocal {
    /// Stops the kube-apiserver alone (etcd and its data stay), as in an apiserver outage.
    pub fn stop_apiserver(&self) {
        let pid_file = self.dir.join("apiserver.pid");
        let pid: i32 = std::fs::read_to_string(&pid_file)
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        let pid = nix::unistd::Pid::from_raw(pid);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
        // Reaped by init (start.sh ran it with nohup in the background); wait until gone.
        let deadline = Instant::now() + Duration::from_secs(10);
        while nix::sys::signal::kill(pid, None).is_ok() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = std::fs::remove_file(pid_file);
    }

    /// Starts the kube-apiserver again on the same port and etcd; returns once it is ready.
    pub fn start_apiserver(&self) {
        let out = Command::new(self.repo.join("scripts/kube-local/start.sh"))
            .env("REFLEET_KUBE_DIR", &self.dir)
            .env("APISERVER_PORT", self.base.to_string())
            .env("ETCD_PORT", (self.base + 1).to_string())
            .output()
            .expect("running start.sh");
        assert!(
            out.status.success(),
            "start.sh failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

impl Drop for KubeLocal {
    fn drop(&mut self) {
        let _ = Command::new(self.repo.join("scripts/kube-local/stop.sh"))
            .arg("--clean")
            .env("REFLEET_KUBE_DIR", &self.dir)
            .status();
    }
}

pub fn port_free(port: u16) -> bool {
    std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, port)).is_ok()
}

/// A base port with `base..base+3` free (apiserver, etcd client, etcd peer), derived from
/// the pid and `salt` so concurrent test processes and tests pick different ones.
pub fn free_base(salt: u32) -> u16 {
    let pid = std::process::id();
    for attempt in 0..500u32 {
        let slot = (pid.wrapping_mul(7) + salt * 4099 + attempt * 97) % 8000;
        let base = u16::try_from(22000 + slot * 4).unwrap();
        if (base..base + 3).all(port_free) {
            return base;
        }
    }
    panic!("no free ports for kube-apiserver/etcd");
}

/// Starts a kube-apiserver + etcd of this test (`tag`); `None` when the binaries are missing.
pub fn start_kube(tag: &str, salt: u32) -> Option<(KubeLocal, PathBuf)> {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf();
    let cache = std::env::var("REFLEET_KUBE_CACHE").map_or_else(
        |_| PathBuf::from(std::env::var("HOME").unwrap_or_default()).join(".cache/refleet/kube"),
        PathBuf::from,
    );
    let have = ["etcd", "kube-apiserver"]
        .iter()
        .all(|b| cache.join("bin").join(b).exists());
    if !have {
        if std::env::var("REFLEET_REQUIRE_KUBE").as_deref() == Ok("1") {
            panic!("kube-apiserver/etcd missing under {}", cache.display());
        }
        eprintln!("SKIP: kube-apiserver/etcd not built (scripts/kube-local/build.sh)");
        return None;
    }
    let base = free_base(salt);
    let dir = std::env::temp_dir().join(format!("refleet-kube-test-{}-{tag}", std::process::id()));
    let out = Command::new(repo.join("scripts/kube-local/start.sh"))
        .env("REFLEET_KUBE_DIR", &dir)
        .env("APISERVER_PORT", base.to_string())
        .env("ETCD_PORT", (base + 1).to_string())
        .output()
        .expect("running start.sh");
    let guard = KubeLocal { dir, repo, base };
    assert!(
        out.status.success(),
        "start.sh failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let kubeconfig = PathBuf::from(String::from_utf8(out.stdout).unwrap().trim());
    Some((guard, kubeconfig))
}

/// The admin `Config` of a started apiserver.
pub async fn config(kubeconfig: &Path) -> Config {
    let kc = Kubeconfig::read_from(kubeconfig).unwrap();
    Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
        .await
        .unwrap()
}

/// An admin client (system:masters) of a started apiserver.
pub async fn admin_client(kubeconfig: &Path) -> Client {
    Client::try_from(config(kubeconfig).await).unwrap()
}

pub async fn eventually<F, Fut, T>(what: &str, timeout: Duration, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let start = Instant::now();
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(start.elapsed() < timeout, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Installs the CRDs (waiting until Established) and creates namespace `ns`.
pub async fn prepare(admin: &Client, ns: &str) {
    let crds: Api<CustomResourceDefinition> = Api::all(admin.clone());
    for (_, crd) in all_crds() {
        let name = crd.metadata.name.clone().unwrap();
        crds.patch(
            &name,
            &PatchParams::apply("refleet-test").force(),
            &Patch::Apply(&crd),
        )
        .await
        .unwrap();
        eventually(
            &format!("{name} Established"),
            Duration::from_secs(30),
            || {
                let crds = crds.clone();
                let name = name.clone();
                async move {
                    let c = crds.get(&name).await.ok()?;
                    c.status?
                        .conditions?
                        .iter()
                        .any(|c| c.type_ == "Established" && c.status == "True")
                        .then_some(())
                }
            },
        )
        .await;
    }
    Api::<Namespace>::all(admin.clone())
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({"metadata": {"name": ns}})).unwrap(),
        )
        .await
        .unwrap();
}

/// The `refleet-reflector` binary of this build, built first when it is missing.
pub fn reflector_binary() -> PathBuf {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let target =
        std::env::var("CARGO_TARGET_DIR").map_or_else(|_| repo.join("target"), PathBuf::from);
    let bin = target.join("debug/refleet-reflector");
    if !bin.exists() {
        let status = Command::new(env!("CARGO"))
            .args(["build", "-p", "refleet-reflector"])
            .current_dir(repo)
            .status()
            .expect("cargo build -p refleet-reflector");
        assert!(status.success(), "building refleet-reflector failed");
    }
    bin
}
