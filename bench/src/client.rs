//! One simulated client: a WebSocket that JOINs a session, waits for its SYNC and for its
//! own view in a `users` message (as the real client does), then sends bench messages at a
//! steady rate while checking and timing everything it receives.
//!
//! A client is one task that owns its socket and alternates between reading and writing
//! (no split halves, no second task); it writes in small batches (feed, then one flush).

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use hdrhistogram::Histogram;
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

use crate::check::{Faults, Tracker};
use crate::wire::{self, Frame, Payload, Stamp};

/// Largest latency recorded, µs (larger values are clamped).
pub const MAX_LATENCY_US: u64 = 60_000_000;
/// How long connecting plus the WebSocket handshake may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// The client sends a PULSE when it has sent nothing for this long.
const PULSE_EVERY: Duration = Duration::from_secs(20);
/// How long a stalled client reads its backlog after the run to see how it ended.
const STALL_DRAIN: Duration = Duration::from_secs(5);
/// Most messages sent in one batch.
const MAX_BATCH: u64 = 512;

/// A name unique to this run, for session ids and users: a reflector keeps what earlier
/// runs left (a view id stays bound to the token it first joined with).
pub fn run_tag() -> String {
    let ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis());
    format!("bench-{}-{ms}", std::process::id())
}

/// A new latency histogram (µs, 3 significant figures).
pub fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, MAX_LATENCY_US, 3).expect("constant histogram bounds are valid")
}

/// The run's phase, broadcast to every client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Connecting and joining; nothing is sent.
    Joining,
    /// Send from `start` until `end`.
    Go { start: Instant, end: Instant },
    /// Record tick lateness from `start` until `end` (idle mode).
    Measure { start: Instant, end: Instant },
    /// Close and report.
    Stop,
}

/// State shared by every client of a run and its coordinator.
#[derive(Debug)]
pub struct Shared {
    /// Clock base of the stamps in payloads.
    pub base: Instant,
    /// Messages each client sent (final once it counted in `done_sending`).
    pub sent: Vec<AtomicU64>,
    /// Distinct bench messages each client received.
    pub received: Vec<AtomicU64>,
    /// Clients that finished sending (or ended).
    pub done_sending: AtomicUsize,
    /// Clients that ended early (closed by the server or failed).
    pub ended: Vec<std::sync::atomic::AtomicBool>,
    /// Tick lateness of the sampled clients during a measure window, µs.
    pub ticks: Mutex<Histogram<u64>>,
}

impl Shared {
    /// Shared state for `n` clients.
    pub fn new(n: usize) -> Arc<Self> {
        Arc::new(Shared {
            base: Instant::now(),
            sent: (0..n).map(|_| AtomicU64::new(0)).collect(),
            received: (0..n).map(|_| AtomicU64::new(0)).collect(),
            done_sending: AtomicUsize::new(0),
            ended: (0..n)
                .map(|_| std::sync::atomic::AtomicBool::new(false))
                .collect(),
            ticks: Mutex::new(histogram()),
        })
    }

    fn now_ns(&self) -> u64 {
        self.base.elapsed().as_nanos() as u64
    }
}

/// Everything one client needs to know.
#[derive(Debug, Clone)]
pub struct Spec {
    /// Global index.
    pub idx: usize,
    /// Full WebSocket URL including the session id.
    pub url: String,
    /// The session id as a JSON string (with quotes).
    pub session_json: String,
    /// Reflector address to connect to.
    pub server: SocketAddr,
    /// Local address to bind (`127.0.0.x`, port 0).
    pub source: Ipv4Addr,
    /// Messages per second to send while the phase is `Go`.
    pub rate: f64,
    /// Offset of this client's first message, so clients do not send in lockstep.
    pub offset: Duration,
    /// Payload size, bytes.
    pub payload_bytes: usize,
    /// Tick interval requested in JOIN, ms.
    pub tick_ms: u32,
    /// Global index of the session's first client and the session's client count.
    pub first_sender: u32,
    pub senders: usize,
    /// Stops reading once sending starts (slow-consumer mode).
    pub stall: bool,
    /// Sends a SNAP every this many RECVs, and on REQU (0: never).
    pub snapshot_every: u64,
    /// Records tick lateness in measure windows.
    pub sample_ticks: bool,
    /// Shortest pause between two send batches.
    pub batch_interval: Duration,
    /// WebSocket read buffer, bytes.
    pub read_buffer: usize,
}

/// What a client reports when it ends.
#[derive(Debug)]
pub struct Outcome {
    /// Global index.
    pub idx: usize,
    /// Whether it was the stalled client.
    pub stalled: bool,
    /// Latency of received bench messages, µs.
    pub latency: Option<Histogram<u64>>,
    /// Integrity checks (finish them with the senders' totals).
    pub tracker: Tracker,
    /// Close code the server sent, if it closed the connection.
    pub close_code: Option<u16>,
    /// Why it failed, if it did.
    pub error: Option<String>,
    /// INFO frames received (e.g. SNAPSHOT_NEEDED when SENDs are being dropped).
    pub infos: u64,
    /// RECVs with a payload the bench did not send.
    pub foreign: u64,
    /// Frames received.
    pub frames: u64,
    /// How a stalled client's connection ended.
    pub stall_end: Option<String>,
}

impl Outcome {
    /// The faults given the per-sender totals of the client's session.
    pub fn faults(&self, sent: &[Option<u64>]) -> Faults {
        self.tracker.finish(sent)
    }
}

/// Opens the TCP connection from `source` and does the WebSocket handshake.
pub async fn connect(
    url: &str,
    server: SocketAddr,
    source: Ipv4Addr,
    read_buffer: usize,
) -> anyhow::Result<WebSocketStream<TcpStream>> {
    let socket = TcpSocket::new_v4()?;
    socket.bind(SocketAddr::new(IpAddr::V4(source), 0))?;
    let stream = socket.connect(server).await?;
    stream.set_nodelay(true)?;
    let config = WebSocketConfig::default()
        .read_buffer_size(read_buffer)
        .write_buffer_size(0)
        .max_write_buffer_size(16 << 20);
    let request = url.into_client_request()?;
    let (ws, _) =
        tokio_tungstenite::client_async_with_config(request, stream, Some(config)).await?;
    Ok(ws)
}

/// Runs one client until the phase is `Stop` or its connection ends. `ready` gets its index
/// once it is joined (SYNC received and its own view announced).
pub async fn run(
    spec: Spec,
    shared: Arc<Shared>,
    mut phase_rx: watch::Receiver<Phase>,
    ready: mpsc::UnboundedSender<(usize, bool)>,
    deadline: Instant,
) -> Outcome {
    let mut c = Client {
        view_id: format!("b{:07}", spec.idx),
        tracker: Tracker::new(spec.first_sender, spec.senders),
        latency: (!spec.stall && spec.rate > 0.0).then(histogram),
        outcome_error: None,
        close_code: None,
        synced: false,
        joined: false,
        sent: 0,
        done_sending: false,
        infos: 0,
        foreign: 0,
        frames: 0,
        recvs_since_snap: 0,
        last_time: 0,
        last_seq: 0,
        last_tick: None,
        chunks: String::new(),
        stall_end: None,
        spec,
        shared,
    };
    let mut announced = false;
    let result =
        tokio::time::timeout_at(deadline, c.drive(&mut phase_rx, &ready, &mut announced)).await;
    if result.is_err() {
        c.outcome_error
            .get_or_insert_with(|| "client deadline passed".to_string());
    }
    if !announced {
        let _ = ready.send((c.spec.idx, false));
    }
    c.finish_sending();
    if c.close_code.is_some() || c.outcome_error.is_some() {
        c.shared.ended[c.spec.idx].store(true, Ordering::Release);
    }
    Outcome {
        idx: c.spec.idx,
        stalled: c.spec.stall,
        latency: c.latency,
        tracker: c.tracker,
        close_code: c.close_code,
        error: c.outcome_error,
        infos: c.infos,
        foreign: c.foreign,
        frames: c.frames,
        stall_end: c.stall_end,
    }
}

struct Client {
    spec: Spec,
    shared: Arc<Shared>,
    view_id: String,
    tracker: Tracker,
    latency: Option<Histogram<u64>>,
    outcome_error: Option<String>,
    close_code: Option<u16>,
    synced: bool,
    joined: bool,
    sent: u64,
    done_sending: bool,
    infos: u64,
    foreign: u64,
    frames: u64,
    recvs_since_snap: u64,
    last_time: u64,
    last_seq: u32,
    last_tick: Option<Instant>,
    chunks: String,
    stall_end: Option<String>,
}

/// What the loop should do after handling a frame.
enum Next {
    Continue,
    Ended,
}

impl Client {
    async fn drive(
        &mut self,
        phase_rx: &mut watch::Receiver<Phase>,
        ready: &mpsc::UnboundedSender<(usize, bool)>,
        announced: &mut bool,
    ) {
        let connected = tokio::time::timeout(
            CONNECT_TIMEOUT,
            connect(
                &self.spec.url,
                self.spec.server,
                self.spec.source,
                self.spec.read_buffer,
            ),
        )
        .await;
        let mut ws = match connected {
            Ok(Ok(ws)) => ws,
            Ok(Err(e)) => {
                self.outcome_error = Some(format!("connect: {e}"));
                return;
            }
            Err(_) => {
                self.outcome_error = Some("connect: timed out".to_string());
                return;
            }
        };
        let join = wire::join_frame(
            self.spec.session_json.trim_matches('"'),
            &self.view_id,
            self.spec.tick_ms,
        );
        if let Err(e) = ws.send(Message::Text(join.into())).await {
            self.outcome_error = Some(format!("sending JOIN: {e}"));
            return;
        }
        let mut phase = *phase_rx.borrow_and_update();
        let mut last_write = Instant::now();
        loop {
            if !*announced && self.synced && self.joined {
                *announced = true;
                let _ = ready.send((self.spec.idx, true));
            }
            if phase == Phase::Stop {
                break;
            }
            if self.spec.stall
                && let Phase::Go { .. } = phase
            {
                // Stop reading and sending: the reflector's queue for us fills up.
                if phase_rx.changed().await.is_err() {
                    break;
                }
                phase = *phase_rx.borrow_and_update();
                continue;
            }
            let wake = self.next_wake(phase, last_write);
            tokio::select! {
                changed = phase_rx.changed() => {
                    if changed.is_err() { break; }
                    phase = *phase_rx.borrow_and_update();
                }
                item = ws.next() => {
                    match item {
                        Some(Ok(Message::Text(text))) => {
                            self.frames += 1;
                            if let Next::Ended = self.text(text.as_str(), phase, &mut ws).await {
                                break;
                            }
                        }
                        Some(Ok(Message::Close(frame))) => {
                            self.close_code = Some(frame.map_or(1005, |f| u16::from(f.code)));
                            break;
                        }
                        Some(Ok(_)) => {}
                        Some(Err(e)) => {
                            self.outcome_error = Some(format!("read: {e}"));
                            break;
                        }
                        None => {
                            self.outcome_error = Some("connection closed without a close frame".to_string());
                            break;
                        }
                    }
                }
                () = tokio::time::sleep_until(wake) => {
                    if let Err(e) = self.write_due(phase, &mut ws, &mut last_write).await {
                        self.outcome_error = Some(format!("write: {e}"));
                        break;
                    }
                }
            }
        }
        if self.spec.stall && self.close_code.is_none() && self.outcome_error.is_none() {
            // Read what is left (bounded) to learn whether the reflector cut us off.
            let mut backlog = 0u64;
            let end = tokio::time::timeout(STALL_DRAIN, async {
                loop {
                    match ws.next().await {
                        Some(Ok(Message::Close(frame))) => {
                            let code = frame.map_or(1005, |f| u16::from(f.code));
                            self.close_code = Some(code);
                            return format!("closed by the reflector with {code}");
                        }
                        Some(Ok(_)) => backlog += 1,
                        Some(Err(e)) => return format!("connection failed: {e}"),
                        None => return "connection dropped by the reflector".to_string(),
                    }
                }
            })
            .await
            .unwrap_or_else(|_| format!("still open {STALL_DRAIN:?} after the run"));
            self.stall_end = Some(format!("{end} ({backlog} frames were still buffered)"));
            return;
        }
        let _ = tokio::time::timeout(Duration::from_secs(1), ws.close(None)).await;
    }

    /// When the loop should next wake up to write something.
    fn next_wake(&mut self, phase: Phase, last_write: Instant) -> Instant {
        let pulse = last_write + PULSE_EVERY;
        match phase {
            Phase::Go { start, end } if self.spec.rate > 0.0 && self.joined => {
                let due = start
                    + self.spec.offset
                    + Duration::from_secs_f64(self.sent as f64 / self.spec.rate);
                if due >= end {
                    self.finish_sending();
                    return pulse;
                }
                due.max(last_write + self.spec.batch_interval).min(pulse)
            }
            Phase::Go { .. } => {
                self.finish_sending();
                pulse
            }
            _ => pulse,
        }
    }

    fn finish_sending(&mut self) {
        if !self.done_sending {
            self.done_sending = true;
            self.shared.sent[self.spec.idx].store(self.sent, Ordering::Release);
            self.shared.done_sending.fetch_add(1, Ordering::AcqRel);
        }
    }

    async fn write_due(
        &mut self,
        phase: Phase,
        ws: &mut WebSocketStream<TcpStream>,
        last_write: &mut Instant,
    ) -> Result<(), tokio_tungstenite::tungstenite::Error> {
        let now = Instant::now();
        let mut batch = 0;
        if let Phase::Go { start, end } = phase
            && self.spec.rate > 0.0
            && !self.done_sending
            && self.joined
        {
            let until = now.min(end);
            let elapsed = until
                .saturating_duration_since(start + self.spec.offset)
                .as_secs_f64();
            let due_total = if until >= start + self.spec.offset {
                (elapsed * self.spec.rate).floor() as u64 + 1
            } else {
                0
            };
            while self.sent < due_total && batch < MAX_BATCH {
                let stamp = Stamp {
                    sender: self.spec.idx as u32,
                    counter: self.sent,
                    sent_ns: self.shared.now_ns(),
                };
                let frame =
                    wire::send_frame(&self.spec.session_json, stamp, self.spec.payload_bytes);
                ws.feed(Message::Text(frame.into())).await?;
                self.sent += 1;
                batch += 1;
            }
        }
        if batch == 0 && now >= *last_write + PULSE_EVERY {
            ws.feed(Message::Text(wire::PULSE.into())).await?;
            batch += 1;
        }
        if batch > 0 {
            ws.flush().await?;
            *last_write = now;
        }
        Ok(())
    }

    async fn text(
        &mut self,
        text: &str,
        phase: Phase,
        ws: &mut WebSocketStream<TcpStream>,
    ) -> Next {
        if let Some(rest) = text.strip_prefix("_CHUNK") {
            // `_CHUNK` + first flag + last flag + slice (only ever seen on big SYNCs).
            if rest.len() < 2 {
                self.outcome_error = Some("malformed _CHUNK frame".to_string());
                return Next::Ended;
            }
            if rest.starts_with('1') {
                self.chunks.clear();
            }
            self.chunks.push_str(&rest[2..]);
            if rest.as_bytes()[1] != b'1' {
                return Next::Continue;
            }
            let whole = std::mem::take(&mut self.chunks);
            return Box::pin(self.text(&whole, phase, ws)).await;
        }
        let frame = match wire::parse(text) {
            Ok(f) => f,
            Err(e) => {
                self.outcome_error = Some(format!(
                    "{e}: {}",
                    text.chars().take(200).collect::<String>()
                ));
                return Next::Ended;
            }
        };
        match frame {
            Frame::Recv { time, seq, payload } => {
                if self.synced {
                    self.tracker.seq(seq);
                }
                self.last_time = time;
                self.last_seq = seq;
                self.last_tick = None;
                match payload {
                    Payload::Bench(stamp) => {
                        if self.tracker.message(stamp.sender, stamp.counter) {
                            self.shared.received[self.spec.idx]
                                .store(self.tracker.unique, Ordering::Relaxed);
                            if let Some(h) = &mut self.latency {
                                let now = self.shared.now_ns();
                                h.saturating_record(now.saturating_sub(stamp.sent_ns) / 1000);
                            }
                        }
                    }
                    Payload::Meta(m) => {
                        if !self.joined
                            && m.contains("\"users\"")
                            && m.contains(&format!("\"{}\"", self.view_id))
                        {
                            self.joined = true;
                        }
                    }
                    Payload::Foreign(_) => self.foreign += 1,
                }
                if self.spec.snapshot_every > 0 {
                    self.recvs_since_snap += 1;
                    if self.recvs_since_snap >= self.spec.snapshot_every {
                        return self.snap(ws).await;
                    }
                }
            }
            Frame::Tick { .. } => {
                let now = Instant::now();
                if self.spec.sample_ticks
                    && let Phase::Measure { start, end } = phase
                    && now >= start
                    && now < end
                    && let Some(prev) = self.last_tick
                {
                    let gap = now.duration_since(prev).as_micros() as u64;
                    let late = gap.saturating_sub(u64::from(self.spec.tick_ms) * 1000);
                    if let Ok(mut h) = self.shared.ticks.lock() {
                        h.saturating_record(late.max(1));
                    }
                }
                self.last_tick = Some(now);
            }
            Frame::Sync => match wire::parse_sync(text) {
                Ok(s) => {
                    self.synced = true;
                    self.last_seq = s.seq;
                    self.last_time = s.time;
                    self.tracker.synced(s.seq);
                }
                Err(e) => {
                    self.outcome_error = Some(format!("SYNC: {e}"));
                    return Next::Ended;
                }
            },
            Frame::Other("INFO") => self.infos += 1,
            Frame::Other("REQU") if self.spec.snapshot_every > 0 => return self.snap(ws).await,
            Frame::Other(_) => {}
        }
        Next::Continue
    }

    /// Announces a snapshot at the last RECV, so the reflector trims its buffer.
    async fn snap(&mut self, ws: &mut WebSocketStream<TcpStream>) -> Next {
        self.recvs_since_snap = 0;
        let frame = wire::snap_frame(&self.spec.session_json, self.last_time, self.last_seq);
        if let Err(e) = ws.send(Message::Text(frame.into())).await {
            self.outcome_error = Some(format!("sending SNAP: {e}"));
            return Next::Ended;
        }
        Next::Continue
    }
}
