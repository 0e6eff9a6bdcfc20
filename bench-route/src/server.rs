//! The router under test: `refleet up` started by the bench (`--spawn`), or one started
//! elsewhere (`--url`).

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, bail};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, Command};
use tokio::time::Instant;

/// A `refleet up` this bench started; stopped (SIGTERM, then SIGKILL) on [`Spawned::stop`].
#[derive(Debug)]
pub struct Spawned {
    child: Child,
    /// Its base URL (`http://127.0.0.1:PORT/`).
    pub url: String,
    /// Its pid.
    pub pid: u32,
    /// Its scratch directory (data dir, stdout/stderr logs).
    pub dir: PathBuf,
}

impl Spawned {
    /// Starts `binary up --config CONFIG --listen 127.0.0.1:0 --data-dir <scratch>` and waits
    /// for the `refleet: URL` line. Its stderr goes to `<scratch>/refleet-up.log`.
    pub async fn start(binary: &Path, config: &Path, nice: Option<i32>) -> anyhow::Result<Self> {
        let dir = refleet_bench::target::scratch_dir("refleet-route-bench");
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let log = std::fs::File::create(dir.join("refleet-up.log"))?;
        let mut cmd = match nice {
            Some(n) => {
                let mut c = Command::new("nice");
                c.arg("-n").arg(n.to_string()).arg(binary);
                c
            }
            None => Command::new(binary),
        };
        cmd.arg("up")
            .arg("--config")
            .arg(config)
            .arg("--listen")
            .arg("127.0.0.1:0")
            .arg("--data-dir")
            .arg(dir.join("data"))
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(log))
            .kill_on_drop(true);
        let mut child = cmd
            .spawn()
            .with_context(|| format!("starting {}", binary.display()))?;
        let pid = child.id().context("refleet up exited at once")?;
        let stdout = child.stdout.take().context("no stdout")?;
        let mut lines = BufReader::new(stdout).lines();
        let url = tokio::time::timeout(Duration::from_secs(30), async {
            while let Some(line) = lines.next_line().await? {
                if let Some(u) = line.strip_prefix("refleet: ") {
                    return Ok::<_, anyhow::Error>(u.trim().to_owned());
                }
            }
            bail!("refleet up ended before printing its URL")
        })
        .await
        .context("refleet up did not print its URL within 30 s")??;
        // Keep draining stdout (the status table) so the child never blocks on a full pipe.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        Ok(Self {
            child,
            url,
            pid,
            dir,
        })
    }

    /// SIGTERM (refleet up drains its reflectors and exits), SIGKILL after `timeout`.
    pub async fn stop(mut self, timeout: Duration) {
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(self.pid.to_string())
            .status()
            .await;
        if tokio::time::timeout(timeout, self.child.wait())
            .await
            .is_err()
        {
            let _ = self.child.kill().await;
        }
    }
}

/// `host:port` of an `http://host:port/...` URL.
pub fn authority(url: &str) -> anyhow::Result<&str> {
    let rest = url
        .strip_prefix("http://")
        .context("only http:// URLs (h2c) are supported")?;
    Ok(rest.split('/').next().unwrap_or(rest))
}

/// `GET path` over HTTP/1.0; returns the body of a 200 answer.
pub async fn http_get(base: &str, path: &str) -> anyhow::Result<String> {
    let host = authority(base)?;
    let mut s = tokio::net::TcpStream::connect(host).await?;
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: {host}\r\n\r\n").as_bytes())
        .await?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).await?;
    let text = String::from_utf8_lossy(&buf);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .context("malformed HTTP answer")?;
    if !head.starts_with("HTTP/1.1 200") && !head.starts_with("HTTP/1.0 200") {
        bail!("GET {path}: {}", head.lines().next().unwrap_or_default());
    }
    Ok(body.to_owned())
}

/// Waits until refleet up's `/v1/status` shows every region at its desired reflector count
/// with every reflector Ready and every shard placed (at least one reflector), then one more
/// tick so the router has the published view.
pub async fn wait_ready(base: &str, timeout: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    let mut last;
    loop {
        match http_get(base, "/v1/status").await {
            Ok(body) => {
                let ready = status_ready(&body);
                if ready {
                    tokio::time::sleep(Duration::from_millis(1_200)).await;
                    return Ok(());
                }
                last = body;
            }
            Err(e) => last = e.to_string(),
        }
        if Instant::now() >= deadline {
            bail!("the fleet was not ready within {timeout:?}; last status: {last}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Whether a `/v1/status` body shows a ready fleet.
pub fn status_ready(body: &str) -> bool {
    let Ok(v) = serde_json::from_str::<serde_json::Value>(body) else {
        return false;
    };
    let empty = Vec::new();
    let regions = v["regions"].as_array().unwrap_or(&empty);
    let mut any = false;
    for r in regions {
        let refl = r["reflectors"].as_array().unwrap_or(&empty);
        let desired = r["desired"].as_u64().unwrap_or(0);
        if (refl.len() as u64) < desired || refl.iter().any(|x| x["state"] != "Ready") {
            return false;
        }
        any |= !refl.is_empty();
    }
    let shards = v["shards"].as_array().unwrap_or(&empty);
    any && shards.iter().all(|s| s["reflector"].is_string())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn readiness_of_a_status_body() {
        let ok = r#"{"regions":[{"desired":1,"reflectors":[{"state":"Ready"}]}],"shards":[{"reflector":"a-1"}]}"#;
        assert!(status_ready(ok));
        let starting =
            r#"{"regions":[{"desired":1,"reflectors":[{"state":"Starting"}]}],"shards":[]}"#;
        assert!(!status_ready(starting));
        let unplaced = r#"{"regions":[{"desired":1,"reflectors":[{"state":"Ready"}]}],"shards":[{"reflector":null}]}"#;
        assert!(!status_ready(unplaced));
        assert!(!status_ready(r#"{"regions":[],"shards":[]}"#));
        assert_eq!(
            authority("http://127.0.0.1:7080/").unwrap(),
            "127.0.0.1:7080"
        );
    }
}
