//! The reflector under test: one the bench starts itself (`--spawn`), or one already running
//! (`--url`, with `--reflector-pid` for its CPU and memory).

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context as _, bail};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

use crate::procstat::Proc;

/// How long a spawned reflector may take to print its address.
const START_TIMEOUT: Duration = Duration::from_secs(30);

/// A reflector to send load to.
#[derive(Debug)]
pub struct Target {
    /// WebSocket base URL ending in `/`; the session id is appended.
    pub ws_base: String,
    /// The reflector process, when known.
    pub pid: Option<u32>,
    child: Option<Child>,
    /// Storage directory and log file of a spawned reflector.
    pub scratch: Option<PathBuf>,
}

impl Target {
    /// Uses a running reflector.
    pub fn external(url: &str, pid: Option<u32>) -> anyhow::Result<Self> {
        let mut base = url.trim().to_string();
        if let Some(rest) = base.strip_prefix("http://") {
            base = format!("ws://{rest}");
        }
        if !base.starts_with("ws://") {
            bail!("--url must be ws://HOST:PORT/PATH/ or the box URL http://HOST:PORT/");
        }
        if !base.ends_with('/') {
            base.push('/');
        }
        // A box URL (no path) gets the client's `reflector/` segment.
        if base.matches('/').count() == 3 {
            base.push_str("reflector/");
        }
        Ok(Target {
            ws_base: base,
            pid,
            child: None,
            scratch: None,
        })
    }

    /// Starts `binary --listen 127.0.0.1:0 --storage <scratch> <extra...>` and waits for the
    /// `box:` line it prints.
    pub async fn spawn(binary: &str, extra: &[String]) -> anyhow::Result<Self> {
        let scratch = scratch_dir("refleet-bench");
        std::fs::create_dir_all(&scratch).context("creating the reflector's scratch directory")?;
        let log = std::fs::File::create(scratch.join("reflector.log"))
            .context("creating the reflector log file")?;
        let listen = "127.0.0.1:0";
        let (child, box_url) = start(binary, listen, &scratch.join("storage"), log, extra)
            .await
            .with_context(|| format!("see {}", scratch.join("reflector.log").display()))?;
        let pid = child.id();
        let mut t = Target::external(&box_url, pid)?;
        t.child = Some(child);
        t.scratch = Some(scratch);
        Ok(t)
    }

    /// The process to sample, if known.
    pub fn proc(&self) -> Option<Proc> {
        self.pid.map(Proc::Pid)
    }

    /// The reflector's base URL (`http://HOST:PORT/`), what a gateway connects to.
    pub fn box_url(&self) -> String {
        let host = self
            .ws_base
            .trim_start_matches("ws://")
            .split('/')
            .next()
            .unwrap_or_default();
        format!("http://{host}/")
    }

    /// Stops a spawned reflector and removes its storage (its log is kept).
    pub async fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.start_kill();
            let _ = tokio::time::timeout(Duration::from_secs(5), child.wait()).await;
        }
        if let Some(dir) = &self.scratch {
            let _ = std::fs::remove_dir_all(dir.join("storage"));
        }
    }
}

/// Starts `binary --listen <listen> --storage <storage> <extra...>` with stderr to `log`, waits
/// up to [`START_TIMEOUT`] for the `box:` line it prints and returns the child with its box URL
/// (ending in `/`). Its stdout keeps being drained so it never blocks on a full pipe.
pub(crate) async fn start(
    binary: &str,
    listen: &str,
    storage: &std::path::Path,
    log: std::fs::File,
    extra: &[String],
) -> anyhow::Result<(Child, String)> {
    let mut child = Command::new(binary)
        .arg("--listen")
        .arg(listen)
        .arg("--storage")
        .arg(storage)
        .args(extra)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(log)
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("starting {binary}"))?;
    let stdout = child.stdout.take().context("reflector stdout")?;
    let mut lines = BufReader::new(stdout).lines();
    let found = tokio::time::timeout(START_TIMEOUT, async {
        while let Ok(Some(line)) = lines.next_line().await {
            if let Some(url) = refleet_api::reflector::launch::parse_banner(&line) {
                return Some(url.to_string());
            }
        }
        None
    })
    .await;
    let Ok(Some(mut box_url)) = found else {
        let _ = child.start_kill();
        bail!("{binary} did not print its box URL within {START_TIMEOUT:?}");
    };
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    if !box_url.ends_with('/') {
        box_url.push('/');
    }
    Ok((child, box_url))
}

/// A fresh scratch directory path for a spawned server: `$TMPDIR/<prefix>-<pid>-<unix ms>`.
pub fn scratch_dir(prefix: &str) -> std::path::PathBuf {
    std::env::temp_dir().join(format!(
        "{prefix}-{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis())
    ))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn box_and_ws_urls_become_a_websocket_base() {
        let t = Target::external("http://127.0.0.1:9/", None).unwrap();
        assert_eq!(t.ws_base, "ws://127.0.0.1:9/reflector/");
        let t = Target::external("ws://127.0.0.1:9/reflector", None).unwrap();
        assert_eq!(t.ws_base, "ws://127.0.0.1:9/reflector/");
        assert!(Target::external("ftp://x", None).is_err());
    }
}

/// A `refleet gateway` in front of a spawned reflector (`--front gateway|both`), every
/// shard placed on that reflector, with a join token the bench's clients carry.
#[derive(Debug)]
pub struct Gateway {
    /// WebSocket base URL with the token segment, ending in `/`; the session id is appended.
    pub ws_base: String,
    /// The gateway process.
    pub pid: Option<u32>,
    child: Child,
}

impl Gateway {
    /// Starts `refleet gateway --static-reflector <reflector>` on 127.0.0.1 and waits for
    /// the `gateway:` line it prints.
    pub async fn spawn(
        refleet: &str,
        reflector_box: &str,
        log: std::fs::File,
    ) -> anyhow::Result<Self> {
        let signer = refleet_api::token::Signer::new("bench", &rand_seed());
        let keys = refleet_api::token::Verifier::format_key(signer.key_id(), &signer.public_key());
        // The reflector does not require tokens in the bench; the gateway checks this one's
        // signature on every upgrade, as it would any client's.
        let token = signer.sign(refleet_api::token::JoinClaims {
            app_id: "io.refleet.bench".into(),
            shard: "room".into(),
            expires_at: i64::MAX / 2,
            ..Default::default()
        });
        let mut child = Command::new(refleet)
            .args(["gateway", "--region", "bench", "--listen", "127.0.0.1:0"])
            .args([
                "--metrics-listen",
                "127.0.0.1:0",
                "--max-connections",
                "1000000",
            ])
            .arg("--static-reflector")
            .arg(reflector_box)
            .arg("--token-keys")
            .arg(keys)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting {refleet} gateway"))?;
        let stdout = child.stdout.take().context("gateway stdout")?;
        let mut lines = BufReader::new(stdout).lines();
        let found = tokio::time::timeout(START_TIMEOUT, async {
            while let Ok(Some(line)) = lines.next_line().await {
                if let Some(url) = line.strip_prefix("gateway: ") {
                    return Some(url.trim().to_string());
                }
            }
            None
        })
        .await;
        let Ok(Some(url)) = found else {
            let _ = child.start_kill();
            bail!("{refleet} gateway did not print its URL within {START_TIMEOUT:?}");
        };
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        let base = url.trim_end_matches('/').replacen("http://", "ws://", 1);
        Ok(Self {
            ws_base: format!("{base}/{token}/"),
            pid: child.id(),
            child,
        })
    }

    /// The process to sample.
    pub fn proc(&self) -> Option<Proc> {
        self.pid.map(Proc::Pid)
    }

    /// Stops the gateway.
    pub async fn stop(&mut self) {
        let _ = self.child.start_kill();
        let _ = self.child.wait().await;
    }
}

/// A signing seed that differs per run (no `rand` dependency for one key).
fn rand_seed() -> [u8; 32] {
    use std::hash::{BuildHasher as _, RandomState};
    let mut seed = [0u8; 32];
    for (i, chunk) in seed.chunks_mut(8).enumerate() {
        let v = RandomState::new().hash_one((i, std::time::SystemTime::now()));
        chunk.copy_from_slice(&v.to_le_bytes());
    }
    seed
}
