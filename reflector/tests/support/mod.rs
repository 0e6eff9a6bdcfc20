//! A reflector on port 0 and a protocol-level WebSocket client for the integration tests.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::time::Duration;

use clap::Parser;
use futures_util::{SinkExt, StreamExt};
use refleet_reflector::{Config, Reflector};
use serde_json::{Value, json};
use tokio::net::TcpStream;
use tokio::sync::oneshot;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

/// A running reflector.
pub struct TestReflector {
    pub addr: SocketAddr,
    pub storage: String,
    registry: std::sync::Arc<refleet_reflector::session::registry::Registry>,
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
}

/// Starts a reflector on 127.0.0.1:0 with `storage` and extra flags.
pub async fn start_with(storage: &str, extra: &[&str]) -> TestReflector {
    start_on("127.0.0.1:0", storage, extra).await
}

pub async fn start_on(listen: &str, storage: &str, extra: &[&str]) -> TestReflector {
    // RUST_LOG=refleet_reflector=debug shows the reflector's side of a failing test.
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
    let mut args = vec![
        "refleet-reflector",
        "--listen",
        listen,
        "--storage",
        storage,
    ];
    args.extend_from_slice(extra);
    if !extra.contains(&"--drain-timeout") {
        // Tests end with clients still connected; don't wait the production default for them.
        args.extend_from_slice(&["--drain-timeout", "300ms"]);
    }
    let config = Config::parse_from(args);
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let reflector = Reflector::new(&config, addr).expect("reflector");
    let registry = reflector.registry().clone();
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        reflector
            .serve(listener, async move {
                let _ = stopped.await;
            })
            .await
            .expect("serve");
    });
    TestReflector {
        addr,
        storage: storage.to_string(),
        registry,
        stop: Some(stop),
        task,
    }
}

impl TestReflector {
    pub fn registry(&self) -> &refleet_reflector::session::registry::Registry {
        &self.registry
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    pub fn files_base(&self) -> String {
        format!("http://{}/files", self.addr)
    }

    /// Starts the drain (as SIGTERM does) and waits until the reflector has stopped.
    pub async fn drain_and_stop(mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        tokio::time::timeout(Duration::from_secs(30), self.task)
            .await
            .expect("drained in time")
            .expect("task");
    }

    /// Starts the drain without waiting.
    pub fn begin_drain(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
    }

    pub async fn metrics(&self) -> String {
        reqwest::get(self.url("/metrics"))
            .await
            .expect("GET /metrics")
            .text()
            .await
            .expect("text")
    }
}

/// Value of one metric sample line (`name{labels}`), 0 when absent.
pub fn metric(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| {
            l.strip_prefix(series)
                .and_then(|rest| rest.trim().parse::<f64>().ok())
        })
        .unwrap_or(0.0)
}

/// A protocol-level client.
pub struct Client {
    pub ws: WebSocketStream<MaybeTlsStream<TcpStream>>,
    pub session: String,
}

/// What a read produced.
#[derive(Debug)]
pub enum Event {
    Frame(Value),
    Closed(u16, String),
}

pub const STEP: Duration = Duration::from_secs(5);

impl Client {
    pub async fn connect(r: &impl Target, session: &str) -> Client {
        Self::connect_path(r, &format!("/reflector/{session}"), session).await
    }

    pub async fn connect_path(r: &impl Target, path: &str, session: &str) -> Client {
        let (ws, _) = tokio_tungstenite::connect_async(format!("ws://{}{path}", r.addr()))
            .await
            .expect("connect");
        Client {
            ws,
            session: session.to_string(),
        }
    }

    /// Connects from the local address `from` (a loopback address other than 127.0.0.1
    /// plays a second client machine).
    pub async fn connect_from(r: &impl Target, session: &str, from: std::net::IpAddr) -> Client {
        let socket = tokio::net::TcpSocket::new_v4().expect("socket");
        socket
            .bind(std::net::SocketAddr::new(from, 0))
            .expect("bind the client address");
        let tcp = socket.connect(r.addr()).await.expect("connect");
        let (ws, _) = tokio_tungstenite::client_async(
            format!("ws://{}/reflector/{session}", r.addr()),
            MaybeTlsStream::Plain(tcp),
        )
        .await
        .expect("handshake");
        Client {
            ws,
            session: session.to_string(),
        }
    }

    pub fn join_args(user: &str) -> Value {
        json!({
            "name": "io.refleet.test/room", "apiKey": "none", "appId": "io.refleet.test",
            "persistentId": "pid-1", "developerId": "unknown_dev_id", "version": 1, "user": user,
            "ticks": {"tick": 1000, "delay": 0}, "tove": "TOVE", "codeHash": "code1", "sdk": "1.1.0"
        })
    }

    pub async fn send_json(&mut self, v: Value) {
        self.ws
            .send(Message::text(v.to_string()))
            .await
            .expect("send");
    }

    pub async fn send_text(&mut self, t: &str) {
        self.ws
            .send(Message::text(t.to_string()))
            .await
            .expect("send");
    }

    /// JOINs with `args` and returns the SYNC args.
    pub async fn join_with(&mut self, args: Value) -> Value {
        let id = self.session.clone();
        self.send_json(json!({"id": id, "action": "JOIN", "args": args}))
            .await;
        let sync = self.next_action("SYNC").await;
        sync["args"].clone()
    }

    pub async fn join(&mut self, user: &str) -> Value {
        self.join_with(Self::join_args(user)).await
    }

    pub async fn send_msg(&mut self, payload: &str) {
        let id = self.session.clone();
        self.send_json(json!({"id": id, "action": "SEND", "args": [0, 0, payload, 0]}))
            .await;
    }

    /// The next frame or close, within `STEP`.
    pub async fn next(&mut self) -> Event {
        loop {
            let item = tokio::time::timeout(STEP, self.ws.next())
                .await
                .expect("a frame in time");
            match item {
                Some(Ok(Message::Text(t))) => {
                    return Event::Frame(serde_json::from_str(&t).expect("json frame"));
                }
                Some(Ok(Message::Close(Some(CloseFrame { code, reason })))) => {
                    return Event::Closed(code.into(), reason.to_string());
                }
                Some(Ok(Message::Close(None))) | None => return Event::Closed(1005, String::new()),
                Some(Ok(_)) => continue,
                Some(Err(e)) => return Event::Closed(1006, e.to_string()),
            }
        }
    }

    /// The next text frame as sent (no JSON parsing), skipping TICKs.
    pub async fn next_raw(&mut self) -> String {
        loop {
            let item = tokio::time::timeout(STEP, self.ws.next())
                .await
                .expect("a frame in time");
            match item {
                Some(Ok(Message::Text(t))) if !t.contains("\"action\":\"TICK\"") => {
                    return t.to_string();
                }
                Some(Ok(Message::Text(_))) => {}
                Some(Ok(Message::Close(_))) | None => panic!("closed while waiting for a frame"),
                Some(Ok(_)) => {}
                Some(Err(e)) => panic!("read error {e}"),
            }
        }
    }

    /// The next frame with `action`, skipping others (TICKs, RECVs, …).
    pub async fn next_action(&mut self, action: &str) -> Value {
        let deadline = tokio::time::Instant::now() + 3 * STEP;
        loop {
            assert!(
                tokio::time::Instant::now() < deadline,
                "no {action} in time"
            );
            match self.next().await {
                Event::Frame(v) if v["action"] == action => return v,
                Event::Frame(_) => continue,
                Event::Closed(code, reason) => {
                    panic!("closed {code} {reason} while waiting for {action}")
                }
            }
        }
    }

    /// The next RECV's args (skipping TICKs).
    pub async fn next_recv(&mut self) -> Value {
        self.next_action("RECV").await["args"].clone()
    }

    /// The next RECV whose payload is a client string (skipping users/tally messages).
    pub async fn next_client_recv(&mut self) -> Value {
        let deadline = tokio::time::Instant::now() + 3 * STEP;
        loop {
            assert!(
                tokio::time::Instant::now() < deadline,
                "no client message in time"
            );
            let r = self.next_recv().await;
            if r[2].is_string() {
                return r;
            }
        }
    }

    /// The next `users` meta message payload.
    pub async fn next_users(&mut self) -> Value {
        let deadline = tokio::time::Instant::now() + 3 * STEP;
        loop {
            assert!(
                tokio::time::Instant::now() < deadline,
                "no users message in time"
            );
            let r = self.next_recv().await;
            if r[2]["what"] == "users" {
                return r[2].clone();
            }
        }
    }

    /// Reads until the server closes; returns the code.
    pub async fn expect_close(&mut self) -> u16 {
        loop {
            if let Event::Closed(code, _) = self.next().await {
                return code;
            }
        }
    }

    pub async fn close(mut self) {
        let _ = self.ws.close(None).await;
        let _ = tokio::time::timeout(Duration::from_secs(2), async {
            while self.ws.next().await.is_some() {}
        })
        .await;
    }
}

/// An HTTP client whose connections come from the local address `from`.
pub fn http_from(from: std::net::IpAddr) -> reqwest::Client {
    reqwest::Client::builder()
        .local_address(from)
        .build()
        .expect("http client")
}

/// A fresh temporary storage directory (kept for the test's lifetime by the returned guard).
pub fn temp_storage() -> (tempfile::TempDir, String) {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().to_string_lossy().to_string();
    (dir, path)
}

/// The address of a reflector running in another process.
pub struct TestReflectorAddr(pub SocketAddr);

/// Anything a client can connect to.
pub trait Target {
    fn addr(&self) -> SocketAddr;
}

impl Target for TestReflector {
    fn addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Target for TestReflectorAddr {
    fn addr(&self) -> SocketAddr {
        self.0
    }
}

/// A child process, killed and reaped when dropped (a test's reflector or helper server).
pub struct Killed(pub std::process::Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts the `refleet-reflector` binary in its own process on 127.0.0.1:0 with `args` and
/// `envs` (its stderr to `stderr`); returns it and the address its start-up banner names.
pub fn start_process(
    args: &[&str],
    envs: &[(&str, &str)],
    stderr: std::process::Stdio,
) -> (Killed, TestReflectorAddr) {
    use std::io::BufRead as _;
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_refleet-reflector"))
        .args(["--listen", "127.0.0.1:0"])
        .args(args)
        .envs(envs.iter().copied())
        .stdout(std::process::Stdio::piped())
        .stderr(stderr)
        .spawn()
        .expect("start refleet-reflector");
    let stdout = child.stdout.take().unwrap();
    let line = std::io::BufReader::new(stdout)
        .lines()
        .next()
        .expect("a line")
        .expect("stdout");
    let base = refleet_api::reflector::launch::parse_banner(&line)
        .expect("banner")
        .trim_end_matches('/')
        .to_string();
    let addr = base.strip_prefix("http://").unwrap().parse().unwrap();
    (Killed(child), TestReflectorAddr(addr))
}

/// The payload strings of a SYNC's messages, in order.
pub fn payloads(sync: &Value) -> Vec<String> {
    sync["messages"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|m| m[2].as_str().map(String::from))
        .collect()
}
