//! `refleet operator` as a real child process, so a test can SIGKILL a leader the way a node
//! loss or the OOM killer would (no Lease release, no goodbye on any stream); and a stand-in
//! for the chart's leader-selecting Services (`refleet.dev/leader=true`): a TCP forwarder
//! that sends every new connection to the replica holding the Lease now.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use kube::Client;
use tokio::net::{TcpListener, TcpStream};

use super::fixtures::lease_holder;

/// A port free on 127.0.0.1 now.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn loopback(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// Whether a started child listens on its ports.
enum Listening {
    Yes,
    /// It exited because a port it was given had been taken meanwhile.
    PortTaken,
    /// It exited for another reason, or did not listen in time: the test will tell.
    Unknown,
}

/// One `refleet operator` process watching one namespace, with its Lease there.
pub struct OperatorProcess {
    pub identity: String,
    /// `/metrics` and `/healthz`.
    pub metrics: SocketAddr,
    /// The router (gRPC, gRPC-Web and JSON).
    pub router: SocketAddr,
    /// The report stream.
    pub report: SocketAddr,
    /// Its log (stderr), kept for a failing test to read.
    pub log: PathBuf,
    child: Option<std::process::Child>,
}

impl OperatorProcess {
    /// Starts `refleet operator` for `ns` with a 4 s Lease; reflector pods it creates report to
    /// `report_url` (a [`LeaderService`] in front of every replica).
    pub fn start(kubeconfig: &Path, ns: &str, identity: &str, report_url: &str) -> Self {
        Self::start_with(kubeconfig, ns, identity, report_url, &[])
    }

    /// [`OperatorProcess::start`] with more `refleet operator` flags. The ports are picked
    /// free and then handed to the child, so another process may take one in between: a
    /// child that exits on `Address already in use` is started again on fresh ports.
    pub fn start_with(
        kubeconfig: &Path,
        ns: &str,
        identity: &str,
        report_url: &str,
        extra: &[&str],
    ) -> Self {
        let mut attempt = 0;
        loop {
            attempt += 1;
            let mut op = Self::spawn(kubeconfig, ns, identity, report_url, extra);
            match op.wait_listening(Duration::from_secs(20)) {
                Listening::Yes | Listening::Unknown => return op,
                Listening::PortTaken if attempt < 5 => op.kill(),
                Listening::PortTaken => panic!("refleet operator: ports taken 5 times"),
            }
        }
    }

    fn spawn(
        kubeconfig: &Path,
        ns: &str,
        identity: &str,
        report_url: &str,
        extra: &[&str],
    ) -> Self {
        let (metrics, router, report) = (
            loopback(free_port()),
            loopback(free_port()),
            loopback(free_port()),
        );
        let log = std::env::temp_dir().join(format!(
            "refleet-operator-{}-{identity}.log",
            std::process::id()
        ));
        let child = std::process::Command::new(env!("CARGO_BIN_EXE_refleet"))
            .arg("operator")
            .args(["--namespaces", ns, "--lease-namespace", ns])
            .args(["--identity", identity])
            .args(["--lease-duration", "4s", "--lease-renew-before", "1s"])
            .args(["--resync", "1s", "--status-counts-every", "2s"])
            .arg(format!("--metrics-listen={metrics}"))
            .arg(format!("--router-listen={router}"))
            .arg(format!("--report-listen={report}"))
            .arg(format!("--reflector-report-url={report_url}"))
            .args(["--report-secret", "refleet-report-key"])
            .args(["--join-tokens=false", "--route-rate-limit=100000"])
            .args(extra)
            .env("KUBECONFIG", kubeconfig)
            .env("RUST_LOG", "info")
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("spawning refleet operator");
        Self {
            identity: identity.to_owned(),
            metrics,
            router,
            report,
            log,
            child: Some(child),
        }
    }

    /// Waits until the child accepts connections on its three ports, or exits.
    fn wait_listening(&mut self, within: Duration) -> Listening {
        let deadline = std::time::Instant::now() + within;
        while std::time::Instant::now() < deadline {
            let exited = self
                .child
                .as_mut()
                .is_some_and(|c| c.try_wait().ok().flatten().is_some());
            if exited {
                let log = std::fs::read_to_string(&self.log).unwrap_or_default();
                return if log.contains("Address already in use") {
                    Listening::PortTaken
                } else {
                    Listening::Unknown
                };
            }
            if [self.metrics, self.router, self.report]
                .iter()
                .all(|a| std::net::TcpStream::connect(a).is_ok())
            {
                return Listening::Yes;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Listening::Unknown
    }

    pub async fn metrics_text(&self) -> Option<String> {
        reqwest::get(format!("http://{}/metrics", self.metrics))
            .await
            .ok()?
            .text()
            .await
            .ok()
    }

    /// The value of the unlabelled or fully labelled series `series` (e.g.
    /// `refleet_router_moves_in_flight`), when this instance answers.
    pub async fn metric(&self, series: &str) -> Option<f64> {
        let text = self.metrics_text().await?;
        text.lines()
            .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
            .and_then(|v| v.trim().parse().ok())
    }

    /// SIGKILL, and reap it.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGTERM (the operator releases its Lease), and reap it.
    pub fn terminate(&mut self) {
        if let Some(mut child) = self.child.take() {
            let pid = nix::unistd::Pid::from_raw(i32::try_from(child.id()).unwrap());
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
            let _ = child.wait();
        }
    }

    /// The end of its log, to print when an assertion about it fails.
    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }
}

impl Drop for OperatorProcess {
    fn drop(&mut self) {
        self.kill();
        // A failing test keeps the log: what the operator did is what explains most failures.
        if std::thread::panicking() {
            eprintln!("operator log kept: {}", self.log.display());
        } else {
            let _ = std::fs::remove_file(&self.log);
        }
    }
}

/// Forwards each new TCP connection to the replica whose identity holds the Lease in `ns`
/// at that moment (a connection made while no live replica leads is closed at once, and
/// the caller retries, as with a Service without ready endpoints). While the apiserver is
/// unreachable it keeps forwarding to the last holder, as kube-proxy keeps its rules.
pub struct LeaderService {
    pub addr: SocketAddr,
    replicas: Arc<Mutex<HashMap<String, SocketAddr>>>,
    task: tokio::task::JoinHandle<()>,
}

impl LeaderService {
    pub async fn start(admin: Client, ns: &str) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let replicas: Arc<Mutex<HashMap<String, SocketAddr>>> = Arc::default();
        let ns = ns.to_owned();
        let task = {
            let replicas = replicas.clone();
            tokio::spawn(async move {
                let last: Arc<Mutex<Option<String>>> = Arc::default();
                while let Ok((mut inbound, _)) = listener.accept().await {
                    let (admin, ns, replicas, last) =
                        (admin.clone(), ns.clone(), replicas.clone(), last.clone());
                    tokio::spawn(async move {
                        // With the apiserver unreachable, keep the last endpoint (as
                        // kube-proxy keeps a Service's rules).
                        let holder = match lease_holder(&admin, &ns).await {
                            Some(h) => {
                                *last.lock().unwrap() = Some(h.clone());
                                h
                            }
                            None if apiserver_down(&admin).await => {
                                let Some(h) = last.lock().unwrap().clone() else {
                                    return;
                                };
                                h
                            }
                            None => return,
                        };
                        let Some(target) = replicas.lock().unwrap().get(&holder).copied() else {
                            return;
                        };
                        let connect = TcpStream::connect(target);
                        let Ok(Ok(mut outbound)) =
                            tokio::time::timeout(Duration::from_secs(2), connect).await
                        else {
                            return;
                        };
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    });
                }
            })
        };
        Self {
            addr,
            replicas,
            task,
        }
    }

    /// Replica `identity` serves on `addr`.
    pub fn add(&self, identity: &str, addr: SocketAddr) {
        self.replicas
            .lock()
            .unwrap()
            .insert(identity.to_owned(), addr);
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

impl Drop for LeaderService {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Whether the apiserver does not answer at all (not: answers that no one leads).
async fn apiserver_down(admin: &Client) -> bool {
    admin.apiserver_version().await.is_err()
}

/// Sends `signal` to process `pid` (e.g. SIGSTOP / SIGCONT to a reflector).
pub fn signal(pid: u32, signal: nix::sys::signal::Signal) {
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(i32::try_from(pid).unwrap()),
        signal,
    );
}
