//! `move` mode: live shard moves under load, measured from the clients.
//!
//! Against a running `refleet up` (or router + gateway) with moves on: every client asks the
//! router where to join (`GET /v1/route`), joins through the region's gateway and sends at a
//! steady rate; after `--move-after` the bench asks for every shard to move (`POST
//! /v1/moves`); a client closed with 4003 reconnects at once to the same URL (as the real
//! client does), JOINs again as the same user and carries on. Per client it records the gap
//! from the last message it received before the close to the first one after its rejoin; at
//! the end every receiver's log is checked against what every sender sent (loss, duplicates,
//! each sender's order) and whether the rejoin stayed on the same timeline (no reboot).

use std::collections::HashMap;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use futures_util::{SinkExt, StreamExt};
use serde::Serialize;
use tokio::sync::watch;
use tokio_tungstenite::tungstenite::Message;

use crate::wire::{self, Frame, Payload, Stamp};

/// What to run.
#[derive(Debug, Clone)]
pub struct MoveSpec {
    /// refleet up's (or the router's) HTTP base URL, ending in `/`.
    pub fleet: String,
    /// Namespace of the Sessions.
    pub namespace: String,
    /// Session names: one shard each (`lobby`, or `room-0` … of a pattern Session).
    pub sessions: Vec<String>,
    /// Clients per session.
    pub clients: usize,
    /// SENDs per second per client.
    pub rate: f64,
    /// How long clients send.
    pub duration: Duration,
    /// When, after sending starts, the moves are asked for.
    pub move_after: Duration,
    /// How long to wait for the last deliveries after sending stops.
    pub drain: Duration,
}

/// The figures of one run.
#[derive(Debug, Clone, Serialize)]
pub struct MoveReport {
    pub shards: usize,
    pub clients: usize,
    /// Moves asked for and accepted (202).
    pub moves_asked: usize,
    /// From the first move asked to the last client's first message after its rejoin, ms.
    pub all_rejoined_ms: Option<f64>,
    /// Clients that were moved (closed with 4003 and rejoined).
    pub moved_clients: usize,
    /// Per moved client: last message before the close → first after the rejoin, ms.
    pub gap_p50_ms: f64,
    pub gap_p99_ms: f64,
    pub gap_max_ms: f64,
    /// Messages a receiver never got, duplicated, or got out of its sender's order.
    pub lost: u64,
    pub duplicated: u64,
    pub reordered: u64,
    /// Rejoins that landed on another timeline (the client would rebuild its model).
    pub rebooted: u64,
    /// Reconnect attempts refused before one got through (e.g. 503 while moving).
    pub refused_reconnects: u64,
    pub sent: u64,
}

impl MoveReport {
    /// Nothing lost, duplicated, reordered or rebooted, and every moved client back.
    pub fn passed(&self) -> bool {
        self.lost == 0
            && self.duplicated == 0
            && self.reordered == 0
            && self.rebooted == 0
            && self.moved_clients > 0
    }
}

impl std::fmt::Display for MoveReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "move: {} shard(s), {} clients, {} moves asked, {} clients moved",
            self.shards, self.clients, self.moves_asked, self.moved_clients
        )?;
        writeln!(
            f,
            "  client gap (last message before the close → first after the rejoin): p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms",
            self.gap_p50_ms, self.gap_p99_ms, self.gap_max_ms
        )?;
        if let Some(ms) = self.all_rejoined_ms {
            writeln!(
                f,
                "  first move asked → every moved client receiving again: {ms:.0} ms"
            )?;
        }
        write!(
            f,
            "  sent {}; lost {}, duplicated {}, reordered {}, rebooted {}; refused reconnects {}",
            self.sent,
            self.lost,
            self.duplicated,
            self.reordered,
            self.rebooted,
            self.refused_reconnects
        )
    }
}

#[derive(serde::Deserialize)]
#[serde(rename_all = "camelCase")]
struct Routed {
    shard: String,
    reflector_url: String,
    app_id: String,
}

/// What one client saw.
#[derive(Default)]
struct Seen {
    /// Per sender: the counters received, in arrival order.
    by_sender: HashMap<u32, Vec<u64>>,
    /// Per move: last arrival before the close and first after the rejoin.
    gaps: Vec<(Instant, Option<Instant>)>,
    rebooted: u64,
    refused: u64,
    sent: u64,
}

/// Runs the mode.
pub async fn run(spec: &MoveSpec) -> anyhow::Result<MoveReport> {
    let http = reqwest::Client::new();
    // Session ids and users of this run only: a view id is bound to the token it joined with.
    let tag = crate::client::run_tag();
    let (phase_tx, phase) = watch::channel(false);
    let base = Instant::now();
    let mut tasks = Vec::new();
    let mut shards = HashMap::new();
    for (s, session) in spec.sessions.iter().enumerate() {
        for c in 0..spec.clients {
            let index = u32::try_from(s * spec.clients + c)?;
            let url = format!(
                "{}v1/route?namespace={}&session={}&userId={tag}-{index}",
                spec.fleet, spec.namespace, session
            );
            let routed: Routed = http
                .get(&url)
                .send()
                .await
                .with_context(|| format!("GET {url}"))?
                .error_for_status()
                .with_context(|| format!("GET {url}"))?
                .json()
                .await?;
            shards.insert(session.clone(), routed.shard.clone());
            // Route answers the box URL (http…); the client opens a WebSocket there.
            let box_url = routed.reflector_url.replacen("http", "ws", 1);
            let ws_url = format!("{box_url}{tag}-{session}");
            let spec = spec.clone();
            let phase = phase.clone();
            let tag = tag.clone();
            tasks.push(tokio::spawn(async move {
                client(index, &tag, ws_url, routed, spec, phase, base).await
            }));
        }
    }
    // Everyone joined (a client's first SYNC) before sending starts: give them a moment.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let _ = phase_tx.send(true);
    tokio::time::sleep(spec.move_after).await;
    let asked_at = Instant::now();
    let mut moves_asked = 0;
    for (session, shard) in &shards {
        let res = http
            .post(format!("{}v1/moves", spec.fleet))
            .json(&serde_json::json!({"namespace": spec.namespace, "session": session, "shard": shard}))
            .send()
            .await?;
        if res.status() == reqwest::StatusCode::ACCEPTED {
            moves_asked += 1;
        } else {
            eprintln!(
                "move of {shard}: HTTP {} {}",
                res.status(),
                res.text().await.unwrap_or_default()
            );
        }
    }
    tokio::time::sleep(spec.duration.saturating_sub(spec.move_after)).await;
    let _ = phase_tx.send(false);
    let mut seen = Vec::new();
    for t in tasks {
        seen.push(t.await??);
    }
    Ok(report(&seen, moves_asked, asked_at, shards.len()))
}

fn report(
    seen: &[(u32, usize, Seen)],
    moves_asked: usize,
    asked_at: Instant,
    shards: usize,
) -> MoveReport {
    // What each sender sent, by session.
    let sent: HashMap<u32, u64> = seen.iter().map(|(i, _, s)| (*i, s.sent)).collect();
    let (mut lost, mut duplicated, mut reordered) = (0, 0, 0);
    for (_, session, s) in seen {
        for (sender, session_of, _) in seen {
            if session_of != session {
                continue;
            }
            let got = s.by_sender.get(sender).map(Vec::as_slice).unwrap_or(&[]);
            let want = sent.get(sender).copied().unwrap_or(0);
            let mut distinct = got.to_vec();
            distinct.sort_unstable();
            distinct.dedup();
            duplicated += (got.len() - distinct.len()) as u64;
            lost += want.saturating_sub(distinct.len() as u64);
            reordered += got.windows(2).filter(|w| w[1] < w[0]).count() as u64;
        }
    }
    let mut gaps: Vec<f64> = Vec::new();
    let mut last_back: Option<Instant> = None;
    let mut moved = 0;
    for (_, _, s) in seen {
        if let Some((before, after)) = s.gaps.first() {
            moved += 1;
            if let Some(after) = after {
                gaps.push(after.duration_since(*before).as_secs_f64() * 1000.0);
                last_back = Some(last_back.map_or(*after, |l: Instant| l.max(*after)));
            }
        }
    }
    gaps.sort_by(f64::total_cmp);
    let pick = |q: f64| {
        if gaps.is_empty() {
            0.0
        } else {
            gaps[((gaps.len() - 1) as f64 * q).round() as usize]
        }
    };
    MoveReport {
        shards,
        clients: seen.len(),
        moves_asked,
        all_rejoined_ms: last_back.map(|t| t.duration_since(asked_at).as_secs_f64() * 1000.0),
        moved_clients: moved,
        gap_p50_ms: pick(0.5),
        gap_p99_ms: pick(0.99),
        gap_max_ms: gaps.last().copied().unwrap_or(0.0),
        lost,
        duplicated,
        reordered,
        rebooted: seen.iter().map(|(_, _, s)| s.rebooted).sum(),
        refused_reconnects: seen.iter().map(|(_, _, s)| s.refused).sum(),
        sent: sent.values().sum(),
    }
}

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// Connects and JOINs as `user`; the socket and the SYNC's seq, timeline and messages.
async fn join(
    url: &str,
    session: &str,
    routed: &Routed,
    user: &str,
    refused: &mut u64,
) -> anyhow::Result<(Ws, Synced)> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match tokio_tungstenite::connect_async(url).await {
            Ok((mut ws, _)) => {
                let join = serde_json::json!({
                    "id": session, "action": "JOIN",
                    "args": {
                        "name": format!("{}/{}", routed.app_id, routed.shard),
                        "apiKey": "none", "appId": routed.app_id, "persistentId": "bench",
                        "developerId": "unknown_dev_id", "version": 1, "user": user,
                        "ticks": {"tick": 1000, "delay": 0}, "tove": "t", "leaveDelay": 5000,
                    }
                });
                ws.send(Message::text(join.to_string())).await?;
                while let Some(msg) = ws.next().await {
                    let Message::Text(t) = msg? else { continue };
                    if matches!(wire::parse(&t), Ok(Frame::Sync)) {
                        return Ok((ws, sync_parts(&t)?));
                    }
                }
                *refused += 1;
            }
            Err(_) => *refused += 1,
        }
        anyhow::ensure!(Instant::now() < deadline, "{user}: no rejoin within 30 s");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// What a rejoin needs of a SYNC.
struct Synced {
    seq: u32,
    timeline: String,
    /// The messages it carries: seq and payload text.
    messages: Vec<(u32, String)>,
}

/// A SYNC's seq, timeline, and the bench payloads of its messages with their seqs.
fn sync_parts(text: &str) -> anyhow::Result<Synced> {
    let v: serde_json::Value = serde_json::from_str(text)?;
    let args = &v["args"];
    let seq = u32::try_from(args["seq"].as_u64().unwrap_or(0))?;
    let timeline = args["timeline"].as_str().unwrap_or_default().to_owned();
    let messages = args["messages"]
        .as_array()
        .map(|m| {
            m.iter()
                .filter_map(|m| {
                    let s = u32::try_from(m[1].as_u64()?).ok()?;
                    Some((s, m[2].as_str()?.to_owned()))
                })
                .collect()
        })
        .unwrap_or_default();
    Ok(Synced {
        seq,
        timeline,
        messages,
    })
}

async fn client(
    index: u32,
    tag: &str,
    url: String,
    routed: Routed,
    spec: MoveSpec,
    mut phase: watch::Receiver<bool>,
    base: Instant,
) -> anyhow::Result<(u32, usize, Seen)> {
    let session_index = index as usize / spec.clients.max(1);
    let session = format!("{tag}-{}", spec.sessions[session_index]);
    let user = format!("{tag}-{index}");
    let mut seen = Seen::default();
    let mut refused = 0;
    let (mut ws, first) = join(&url, &session, &routed, &user, &mut refused).await?;
    let (mut last_seq, timeline) = (first.seq, first.timeline);
    let session_json = serde_json::to_string(&session)?;
    let gap = Duration::from_secs_f64(1.0 / spec.rate.max(0.001));
    // Spread over one interval, so the session's messages are even in time and a gap is
    // measured to within a few ms, not to the send interval.
    let mut next_send = tokio::time::Instant::now() + gap.mul_f64(f64::from(index % 1000) / 1000.0);
    let mut last_arrival = Instant::now();
    let mut counter = 0u64;
    let mut started = false;
    let mut stop_at: Option<tokio::time::Instant> = None;
    loop {
        let sending = *phase.borrow();
        if sending {
            started = true;
        } else if started && stop_at.is_none() {
            stop_at = Some(tokio::time::Instant::now() + spec.drain);
        }
        let wake = match stop_at {
            Some(s) => s,
            None if sending => next_send,
            None => tokio::time::Instant::now() + Duration::from_secs(3600),
        };
        tokio::select! {
            msg = ws.next() => {
                let closed = match msg {
                    Some(Ok(Message::Text(t))) => {
                        if let Ok(Frame::Recv { seq, payload: Payload::Bench(stamp), .. }) = wire::parse(&t) {
                            last_seq = seq;
                            record(&mut seen, stamp, &mut last_arrival);
                        } else if let Ok(Frame::Recv { seq, .. }) = wire::parse(&t) {
                            last_seq = seq;
                        }
                        false
                    }
                    Some(Ok(Message::Close(_))) | None | Some(Err(_)) => true,
                    Some(Ok(_)) => false,
                };
                if closed {
                    let before = last_arrival;
                    // Our side of the close first: the source waits for its clients to go
                    // before it stores, as real clients do at once.
                    // Our reply to the server's close goes out now (tungstenite queued it when
                    // it read the close): the source waits for its clients to go before it
                    // stores, and real clients answer at once.
                    let _ = ws.flush().await;
                    let (again, synced) = join(&url, &session, &routed, &user, &mut refused).await?;
                    let mut old = std::mem::replace(&mut ws, again);
                    // Finishes the old socket's close in the background; the new one carries on.
                    tokio::spawn(async move {
                        let _ = old.close(None).await;
                        while old.next().await.is_some() {}
                    });
                    if synced.timeline != timeline {
                        seen.rebooted += 1;
                    }
                    seen.gaps.push((before, None));
                    for (s, text) in synced.messages {
                        if wire::seq_after(last_seq, s)
                            && let Some(stamp) = wire::read_payload(&text)
                        {
                            record(&mut seen, stamp, &mut last_arrival);
                        }
                    }
                    last_seq = synced.seq;
                }
            }
            () = tokio::time::sleep_until(wake) => {
                if stop_at.is_some_and(|s| s <= tokio::time::Instant::now()) {
                    break;
                }
                if sending {
                    let stamp = Stamp { sender: index, counter, sent_ns: base.elapsed().as_nanos() as u64 };
                    if ws.send(Message::text(wire::send_frame(&session_json, stamp, 64))).await.is_ok() {
                        counter += 1;
                    }
                    next_send += gap;
                }
            }
            _ = phase.changed() => {}
        }
    }
    seen.sent = counter;
    seen.refused = refused;
    let _ = ws.close(None).await;
    Ok((index, session_index, seen))
}

fn record(seen: &mut Seen, stamp: Stamp, last_arrival: &mut Instant) {
    let now = Instant::now();
    if let Some(g) = seen.gaps.last_mut()
        && g.1.is_none()
    {
        g.1 = Some(now);
    }
    *last_arrival = now;
    seen.by_sender
        .entry(stamp.sender)
        .or_default()
        .push(stamp.counter);
}
