//! Starting, observing and stopping reflectors: the [`Launcher`] trait, and
//! [`ProcessLauncher`], which runs each reflector as a `refleet-reflector` child process on
//! its own loopback port. Tests drive the fleet loop with a fake launcher instead.

use std::collections::BTreeMap;
use std::future::Future;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use refleet_api::reflector::launch::{self, LaunchSpec, Setting};
use refleet_api::reflector::sessions::{SessionSummary, SessionsReport};
use refleet_api::report_credential::{CredentialError, ReportKey};
use thiserror::Error;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::watch;

use super::config::ChildLogs;

/// What a new reflector needs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StartRequest {
    /// Unique reflector name (`local-a-1`), also given as `--reflector-name`.
    pub name: String,
    /// Its region (`--region`).
    pub region: String,
    /// Shared storage of the pool (`--storage`).
    pub storage: String,
    /// The pool's stable files base URL (`--files-url`).
    pub files_url: String,
    /// How long it serves live sessions once drained (`--drain-timeout`).
    pub drain_timeout: Duration,
}

/// One session a reflector reports on `/sessions`: the reflector's own type.
pub type ReportedSession = SessionSummary;

/// A reflector as its launcher sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Observed {
    /// Started, not accepting connections yet.
    Starting,
    /// Accepting connections at `url`; `sessions` is `None` when `/sessions` did not answer.
    Running {
        /// Its box URL (`http://127.0.0.1:PORT/`).
        url: String,
        /// Its sessions, if it answered.
        sessions: Option<Vec<ReportedSession>>,
    },
    /// The process has ended.
    Exited {
        /// It exited with status 0.
        success: bool,
        /// Exit status, for logs.
        detail: String,
    },
}

/// A launcher failure.
#[derive(Debug, Error)]
pub enum LaunchError {
    /// The reflector could not be started.
    #[error("starting reflector {name}: {source}")]
    Spawn {
        /// Reflector name.
        name: String,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// Its report credential could not be minted (its name or region).
    #[error("reflector {name}: {source}")]
    Credential {
        /// Reflector name.
        name: String,
        /// Cause.
        #[source]
        source: CredentialError,
    },
}

/// Starts, observes, drains and kills reflectors. The fleet loop uses only this, so it can
/// be tested without processes.
pub trait Launcher: Send {
    /// Starts a reflector; it reports [`Observed::Starting`] until it accepts connections.
    fn start(&mut self, req: StartRequest) -> Result<(), LaunchError>;
    /// Asks a reflector to drain (SIGTERM): it refuses new sessions, serves the live ones
    /// until they end or its drain timeout, stores them and exits.
    fn drain(&mut self, name: &str);
    /// Ends a reflector at once (SIGKILL), e.g. one that overran its drain deadline.
    fn kill(&mut self, name: &str);
    /// Every reflector started and not yet forgotten, by name.
    fn observe(&mut self) -> impl Future<Output = BTreeMap<String, Observed>> + Send;
    /// Forgets an exited reflector.
    fn forget(&mut self, name: &str);
    /// Its operating-system process id, when it is a running process (shown in the status,
    /// so a person or a test can signal it).
    fn pid(&self, _name: &str) -> Option<u32> {
        None
    }
}

// === impl ProcessLauncher ===

/// How to run `refleet-reflector` children.
#[derive(Clone, Debug)]
pub struct ProcessSettings {
    /// The binary.
    pub binary: PathBuf,
    /// Host to listen on; the port is picked by the child (`--listen HOST:0`).
    pub host: String,
    /// What every child is given (report stream, join-token keys, extra arguments); each
    /// child's own settings are added from its [`StartRequest`].
    pub launch: LaunchSpec,
    /// Where their stderr goes.
    pub logs: ChildLogs,
    /// Directory for log files (with [`ChildLogs::Files`]).
    pub log_dir: PathBuf,
    /// Mints each child's own report credential, given in its environment
    /// (`REFLEET_REPORT_TOKEN`, which only this user can read), never on its command line.
    pub report_key: Option<ReportKey>,
    /// The client for `/sessions` polls (see [`sessions_client`]).
    pub sessions_http: reqwest::Client,
}

struct ChildProc {
    child: Child,
    /// The box URL once printed.
    url: watch::Receiver<Option<String>>,
    exited: Option<(bool, String)>,
    /// Its report credential, which also lets refleet up read its `/sessions`.
    credential: Option<String>,
}

/// Runs reflectors as child processes (killed if refleet up itself is dropped).
pub struct ProcessLauncher {
    settings: ProcessSettings,
    children: BTreeMap<String, ChildProc>,
    http: reqwest::Client,
}

impl ProcessLauncher {
    /// A launcher with no children yet.
    pub fn new(settings: ProcessSettings) -> Self {
        let http = settings.sessions_http.clone();
        Self {
            settings,
            children: BTreeMap::new(),
            http,
        }
    }

    /// Process ids of the children still running, by name.
    pub fn pids(&self) -> BTreeMap<String, u32> {
        self.children
            .iter()
            .filter_map(|(n, c)| c.child.id().map(|pid| (n.clone(), pid)))
            .collect()
    }
}

impl Launcher for ProcessLauncher {
    fn pid(&self, name: &str) -> Option<u32> {
        self.children.get(name).and_then(|c| c.child.id())
    }

    fn start(&mut self, req: StartRequest) -> Result<(), LaunchError> {
        let s = &self.settings;
        let spawn_err = |source| LaunchError::Spawn {
            name: req.name.clone(),
            source,
        };
        let credential = s
            .report_key
            .as_ref()
            .map(|k| k.credential(&req.name, &req.region))
            .transpose()
            .map_err(|source| LaunchError::Credential {
                name: req.name.clone(),
                source,
            })?;
        let stderr = match s.logs {
            ChildLogs::Inherit => Stdio::inherit(),
            ChildLogs::Files => {
                std::fs::create_dir_all(&s.log_dir).map_err(spawn_err)?;
                let path = s.log_dir.join(format!("{}.log", req.name));
                let file = std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)
                    .map_err(spawn_err)?;
                Stdio::from(file)
            }
        };
        let listen = format!("{}:0", s.host).parse().map_err(|e| {
            spawn_err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!("reflector host {:?}: {e}", s.host),
            ))
        })?;
        let spec = LaunchSpec {
            listen: Some(listen),
            region: Some(req.region.clone()),
            reflector_name: Some(req.name.clone()),
            storage: Some(req.storage.clone()),
            files_url: Some(req.files_url.clone()),
            drain_timeout: Some(req.drain_timeout),
            report_token: credential,
            ..s.launch.clone()
        };
        let mut cmd = Command::new(&s.binary);
        // The credential is not among the arguments (`to_args` leaves it out).
        cmd.args(spec.to_args())
            // The reflector would prefer a token file over its own credential.
            .env_remove(Setting::ReportTokenFile.env())
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(stderr)
            .kill_on_drop(true);
        if let Some(c) = &spec.report_token {
            cmd.env(Setting::ReportToken.env(), c);
        }
        let mut child = cmd.spawn().map_err(spawn_err)?;
        let (tx, rx) = watch::channel(None);
        if let Some(stdout) = child.stdout.take() {
            let name = req.name.clone();
            tokio::spawn(async move {
                let mut lines = BufReader::new(stdout).lines();
                while let Ok(Some(line)) = lines.next_line().await {
                    if let Some(url) = launch::parse_banner(&line) {
                        let url = url.to_owned();
                        tracing::debug!(reflector = %name, %url, "reflector accepts connections");
                        tx.send_replace(Some(url));
                    }
                }
            });
        }
        tracing::info!(reflector = %req.name, region = %req.region, pid = child.id(), "reflector started");
        self.children.insert(
            req.name,
            ChildProc {
                child,
                url: rx,
                exited: None,
                credential: spec.report_token.clone(),
            },
        );
        Ok(())
    }

    fn drain(&mut self, name: &str) {
        let Some(c) = self.children.get_mut(name) else {
            return;
        };
        if let Some(pid) = c.child.id().and_then(|pid| i32::try_from(pid).ok()) {
            let pid = nix::unistd::Pid::from_raw(pid);
            if let Err(error) = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM) {
                tracing::warn!(reflector = name, %pid, %error, "SIGTERM failed");
            }
        }
    }

    fn kill(&mut self, name: &str) {
        if let Some(c) = self.children.get_mut(name)
            && let Err(error) = c.child.start_kill()
        {
            tracing::warn!(reflector = name, %error, "SIGKILL failed");
        }
    }

    async fn observe(&mut self) -> BTreeMap<String, Observed> {
        let mut polls = Vec::new();
        let mut out = BTreeMap::new();
        for (name, c) in &mut self.children {
            if c.exited.is_none()
                && let Ok(Some(status)) = c.child.try_wait()
            {
                c.exited = Some((status.success(), status.to_string()));
            }
            if let Some((success, detail)) = &c.exited {
                out.insert(
                    name.clone(),
                    Observed::Exited {
                        success: *success,
                        detail: detail.clone(),
                    },
                );
                continue;
            }
            match c.url.borrow().clone() {
                None => {
                    out.insert(name.clone(), Observed::Starting);
                }
                Some(url) => polls.push((name.clone(), url, c.credential.clone())),
            }
        }
        let http = &self.http;
        let fetched = futures_util::future::join_all(polls.into_iter().map(
            |(name, url, credential)| async move {
                let sessions = fetch_sessions(http, &url, credential.as_deref()).await;
                (name, Observed::Running { url, sessions })
            },
        ))
        .await;
        out.extend(fetched);
        out
    }

    fn forget(&mut self, name: &str) {
        self.children.remove(name);
    }
}

/// A client for reflectors' `/sessions` with a short timeout.
pub fn sessions_client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_millis(800))
        .build()
        .unwrap_or_default()
}

/// `GET <url>sessions`, or `None` when the reflector does not answer properly.
/// A reflector's `/sessions`, presenting its report `credential` when known (a reflector
/// answers `/sessions` only with it, or to a loopback client).
pub async fn fetch_sessions(
    http: &reqwest::Client,
    url: &str,
    credential: Option<&str>,
) -> Option<Vec<ReportedSession>> {
    let endpoint = format!("{}/sessions", url.trim_end_matches('/'));
    let mut req = http.get(&endpoint);
    if let Some(c) = credential {
        req = req.bearer_auth(c);
    }
    let res = match req.send().await {
        Ok(res) if res.status().is_success() => res,
        Ok(res) => {
            tracing::debug!(%endpoint, status = res.status().as_u16(), "sessions not available");
            return None;
        }
        Err(error) => {
            tracing::debug!(%endpoint, %error, "sessions not available");
            return None;
        }
    };
    match res.json::<SessionsReport>().await {
        Ok(report) => Some(report.sessions),
        Err(error) => {
            tracing::warn!(%endpoint, %error, "unreadable /sessions answer");
            None
        }
    }
}
