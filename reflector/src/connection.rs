//! One task per WebSocket connection: read, check, parse, forward; and its writer.
//!
//! The reader enforces the per-connection limits (frame size, message rate, JOIN and idle
//! timeouts), answers PING itself and forwards session messages to the session's task. The
//! writer drains the connection's [`Outbox`], feeding frames and flushing once per batch.
//! When either side closes, the reader keeps reading until the client's side of the close
//! arrives, so a drain never loses a message the client had already sent.

use std::collections::VecDeque;
use std::future::Future;
use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use axum::extract::ws::{CloseFrame, Message, WebSocket};
use futures_util::stream::SplitSink;
use futures_util::{SinkExt, StreamExt};
use governor::{Quota, RateLimiter};
use tokio::sync::mpsc::error::TrySendError;
use tokio::time::Instant;

use crate::admission::{Presented, Requested};
use crate::close::{self, Close};
use crate::frame::{self, ClientMsg, Text};
use crate::metrics::Metrics;
use crate::outbox::{self, Batch, Inbox, Outbox};
use crate::session::core::ConnId;
use crate::session::registry::{Refused, Registry};
use crate::session::{Command, SessionHandle};
use refleet_api::reflector::config::Limits;

static NEXT_CONN: AtomicU64 = AtomicU64::new(1);

/// How long to wait for the client's side of a close.
const CLOSE_WAIT: Duration = Duration::from_secs(5);
/// A batch at least this long is written without first yielding for more.
const WRITE_BATCH: usize = 64;
/// How long a client that stopped reading gets to take its close frame.
const URGENT_CLOSE_WAIT: Duration = Duration::from_secs(1);
/// Unknown actions logged per connection (then only counted).
const UNKNOWN_LOG_LIMIT: u32 = 5;

/// The session id of a WebSocket request: the last segment of its path.
pub fn session_id_from_path(path: &str) -> &str {
    path.rsplit('/').next().unwrap_or("")
}

/// Serves one upgraded WebSocket until it is closed.
///
/// The socket is split before the returned future is built, so the future (which lives as
/// long as the connection, in every idle connection's task) does not keep room for it; the
/// rarely taken paths are boxed for the same reason.
pub fn serve(
    socket: WebSocket,
    session_id: Arc<str>,
    token: Option<Arc<Presented>>,
    peer: SocketAddr,
    registry: Arc<Registry>,
    limits: Arc<Limits>,
) -> impl Future<Output = ()> + Send + 'static {
    let (sink, stream) = socket.split();
    let metrics = &registry.context().metrics;
    metrics.connections.inc();
    metrics.connections_total.inc();
    let conn = NEXT_CONN.fetch_add(1, Ordering::Relaxed);
    registry.connection_opened(conn, peer.ip());
    let (out, inbox) = outbox::bounded(
        outbox::Bounds {
            frames: limits.send_queue,
            bytes: limits.max_queued_bytes,
        },
        Some(metrics.send_queue_peak.clone()),
    );
    let writer = tokio::spawn(write_loop(sink, inbox, registry.clone()));
    let reader = Reader {
        conn,
        session_id,
        token,
        peer,
        registry,
        limits,
        out,
        joined: None,
        refused: false,
        unknown_logged: 0,
    };
    async move {
        let mut reader = reader;
        reader.run(stream).await;
        let registry = reader.registry.clone();
        if let Some(h) = reader.joined.take()
            && let Err(TrySendError::Full(cmd)) = h.tx.try_send(Command::Closed { conn })
        {
            let _ = Box::pin(h.tx.send(cmd)).await;
        }
        // The session drops its copy of the outbox once it handled Closed; ours goes here.
        drop(reader);
        if Box::pin(tokio::time::timeout(Duration::from_secs(2), writer))
            .await
            .is_err()
        {
            tracing::debug!(conn, "writer did not finish in time");
        }
        registry.connection_closed(conn);
        registry.context().metrics.connections.dec();
    }
}

struct Reader {
    conn: ConnId,
    session_id: Arc<str>,
    /// The connection's verified join token (checked by the session at JOIN).
    token: Option<Arc<Presented>>,
    peer: SocketAddr,
    registry: Arc<Registry>,
    limits: Arc<Limits>,
    out: Outbox,
    joined: Option<SessionHandle>,
    /// This connection refused the client's input and closed: ignore what follows.
    refused: bool,
    unknown_logged: u32,
}

impl Reader {
    async fn run(&mut self, mut stream: futures_util::stream::SplitStream<WebSocket>) {
        let started = Instant::now();
        let mut last_activity = started;
        let mut close_started: Option<Instant> = None;
        if self.session_id.is_empty() || self.session_id.len() > 512 {
            self.refuse(
                close::OUTDATED_PROTOCOL.with_reason("no session id in URL"),
                "missing or oversized session id",
            );
        }
        let limiter = RateLimiter::direct(
            Quota::per_second(NonZeroU32::new(self.limits.rate_limit).unwrap_or(NonZeroU32::MIN))
                .allow_burst(NonZeroU32::new(self.limits.rate_burst).unwrap_or(NonZeroU32::MIN)),
        );
        let sleep = tokio::time::sleep(self.limits.join_timeout);
        tokio::pin!(sleep);
        let closing = self.out.closing_signal();
        loop {
            if close_started.is_none() && self.out.is_closing() {
                close_started = Some(Instant::now());
            }
            let deadline = match close_started {
                Some(t) => t + CLOSE_WAIT,
                None if self.joined.is_none() => (started + self.limits.join_timeout)
                    .min(last_activity + self.limits.idle_timeout),
                None => last_activity + self.limits.idle_timeout,
            };
            if sleep.deadline() != deadline {
                sleep.as_mut().reset(deadline);
            }
            tokio::select! {
                item = stream.next() => {
                    let Some(item) = item else { break };
                    last_activity = Instant::now();
                    match item {
                        Ok(Message::Text(text)) => self.text(text, &limiter).await,
                        Ok(Message::Binary(_)) => {
                            self.refuse(close::MALFORMED.with_reason("binary frames are not supported"), "binary frame");
                        }
                        Ok(Message::Ping(_) | Message::Pong(_)) => {}
                        Ok(Message::Close(_)) => break,
                        Err(e) => {
                            if let Some((close, why)) = read_error_close(e) {
                                self.refuse(close, why);
                                // The stream cannot be read past this error; give the writer a
                                // moment to send the close frame.
                                tokio::time::sleep(Duration::from_millis(100)).await;
                            }
                            break;
                        }
                    }
                }
                () = closing.closing(), if close_started.is_none() => {}
                () = &mut sleep => {
                    let now = Instant::now();
                    if now < deadline {
                        continue;
                    }
                    if close_started.is_some() {
                        break;
                    } else if self.joined.is_none() && now >= started + self.limits.join_timeout {
                        self.refuse(close::NEVER_JOINED, "no JOIN in time");
                    } else {
                        self.refuse(close::INACTIVE, "no frame within the idle timeout");
                    }
                }
            }
        }
    }

    /// Closes because of the client's input (after what is already queued) and logs why.
    fn refuse(&mut self, close: Close, why: &str) {
        if !self.out.is_closing() {
            tracing::warn!(conn = self.conn, session = %self.session_id, peer = %self.peer, code = close.code, reason = %close.reason, why, "closing connection");
        }
        self.refused = true;
        self.out.close(close);
    }

    async fn text(
        &mut self,
        text: axum::extract::ws::Utf8Bytes,
        limiter: &governor::DefaultDirectRateLimiter,
    ) {
        let metrics = &self.registry.context().metrics;
        metrics.bytes_received_total.inc_by(text.len() as u64);
        if self.refused {
            return;
        }
        if text.len() > self.limits.max_frame_bytes {
            self.refuse(close::TOO_BIG, "frame over the size limit");
            return;
        }
        if limiter.check().is_err() {
            self.refuse(close::RATE_LIMITED, "message rate limit exceeded");
            return;
        }
        let msg = match frame::parse(text.as_str()) {
            Ok(m) => m,
            Err(e) => {
                let close = e.close();
                self.refuse(close, &e.to_string());
                return;
            }
        };
        metrics.received(msg.action());
        match msg {
            // Boxed: a JOIN happens once per connection, and its future is larger than the
            // rest of the reader's.
            ClientMsg::Join(join) => Box::pin(self.join(join)).await,
            ClientMsg::Ping(args) => {
                let pong = Text::from(format!("{{\"action\":\"PONG\",\"args\":{args}}}"));
                if self.out.try_send(pong).is_err() && !self.out.is_closing() {
                    self.out.close_now(close::UNRESPONSIVE);
                }
            }
            ClientMsg::Pulse => {}
            ClientMsg::Log => {
                tracing::debug!(conn = self.conn, session = %self.session_id, "client LOG")
            }
            ClientMsg::Unknown(action) => {
                if self.unknown_logged < UNKNOWN_LOG_LIMIT {
                    self.unknown_logged += 1;
                    tracing::info!(conn = self.conn, session = %self.session_id, action = %action, "unknown action ignored");
                }
            }
            msg => match &self.joined {
                Some(h) => {
                    let cmd = Command::Message {
                        conn: self.conn,
                        msg,
                    };
                    // Waiting (back-pressure from a busy session) is the rare case: box it.
                    let sent = match h.tx.try_send(cmd) {
                        Ok(()) => true,
                        Err(TrySendError::Full(cmd)) => Box::pin(h.tx.send(cmd)).await.is_ok(),
                        Err(TrySendError::Closed(_)) => false,
                    };
                    if !sent {
                        self.refuse(
                            close::RECONNECT.with_reason("session restarting, reconnect"),
                            "session gone",
                        );
                    }
                }
                None => {
                    let why = format!("{} before JOIN", msg.action());
                    self.refuse(close::UNKNOWN_SESSION.with_reason(why.clone()), &why);
                }
            },
        }
    }

    async fn join(&mut self, join: Box<frame::Join>) {
        if self.joined.is_some() {
            tracing::debug!(conn = self.conn, session = %self.session_id, "second JOIN on one connection ignored");
            return;
        }
        // Before the JOIN may start (or touch) a session: the token for what it names.
        let req = Requested {
            app_id: join.app_id.as_deref().unwrap_or(""),
            shard: crate::session::shard_of(&join),
        };
        if let Err(r) = self
            .registry
            .context()
            .admission
            .precheck(self.token.as_deref(), req)
        {
            self.registry.context().metrics.join_refusals(r.reason);
            self.refuse(r.close, &r.detail);
            return;
        }
        if self.registry.is_fenced(req.app_id, req.shard) {
            self.registry.context().metrics.join_refusals("shard_moved");
            self.refuse(
                close::RECONNECT.with_reason("session moved to another reflector, reconnect"),
                "shard handed off: JOIN refused",
            );
            return;
        }
        let mut join = join;
        // A session that is just ending closes its queue; the next look-up starts a fresh one.
        for _ in 0..3 {
            let handle = match self.registry.join(&self.session_id) {
                Ok(h) => h,
                Err(Refused::Draining) => {
                    self.refuse(
                        close::RECONNECT.with_reason("reflector draining, reconnect"),
                        "draining: new session refused",
                    );
                    return;
                }
            };
            match handle
                .tx
                .send(Command::Join {
                    conn: self.conn,
                    out: self.out.clone(),
                    join,
                    token: self.token.clone(),
                })
                .await
            {
                Ok(()) => {
                    tracing::debug!(conn = self.conn, session = %self.session_id, peer = %self.peer, "joined");
                    self.joined = Some(handle);
                    return;
                }
                Err(tokio::sync::mpsc::error::SendError(Command::Join { join: j, .. })) => join = j,
                Err(_) => return,
            }
        }
        self.refuse(
            close::RECONNECT.with_reason("session restarting, reconnect"),
            "session kept ending during JOIN",
        );
    }
}

async fn write_loop(
    mut sink: SplitSink<WebSocket, Message>,
    mut inbox: Inbox,
    registry: Arc<Registry>,
) {
    let metrics = &registry.context().metrics;
    let watch = inbox.watch();
    let mut batch: VecDeque<Text> = VecDeque::new();
    while let Some(next) = inbox.recv_batch(&mut batch).await {
        match next {
            Batch::Frames => {}
            Batch::Close(c) => {
                send_close(&mut sink, &c, metrics, CLOSE_WAIT).await;
                return;
            }
            Batch::Urgent(c) => {
                send_close(&mut sink, &c, metrics, URGENT_CLOSE_WAIT).await;
                return;
            }
        }
        let written = tokio::select! {
            biased;
            c = watch.urgent_close() => {
                // The client stopped reading; don't wait long for a socket that may never drain.
                send_close(&mut sink, &c, metrics, URGENT_CLOSE_WAIT).await;
                return;
            }
            ok = write_batch(&mut sink, &mut inbox, &mut batch) => ok,
        };
        if !written {
            // Writing fails once the client's close arrived: its answer is still owed.
            break;
        }
    }
    answer_close(&mut sink).await;
}

/// The close owed to a client whose frame the WebSocket layer could not read, and why; `None`
/// when the connection itself failed (reset, I/O error), so no close frame can be sent.
fn read_error_close(e: axum::Error) -> Option<(Close, &'static str)> {
    let e = e.into_inner().downcast::<tungstenite::Error>().ok()?;
    match *e {
        tungstenite::Error::Capacity(_) => Some((close::TOO_BIG, "frame over the size limit")),
        // The socket is intact after these, so the client can be told what was wrong
        // (RFC 6455 §7.4.1) instead of seeing its connection drop.
        tungstenite::Error::Utf8(_) => Some((close::INVALID_PAYLOAD, "text frame not UTF-8")),
        tungstenite::Error::Protocol(
            tungstenite::error::ProtocolError::ResetWithoutClosingHandshake,
        ) => None,
        tungstenite::Error::Protocol(_) => {
            Some((close::PROTOCOL_ERROR, "WebSocket protocol violation"))
        }
        _ => None,
    }
}

/// Ends a connection the reflector did not close itself: the reader saw the client's close
/// frame (or the end of the stream) and every sender is gone. The WebSocket layer queued the
/// answer to a client's close when it read it, but only a write sends it, so without this
/// the client sees its connection drop (1006) instead of the close handshake it started
/// (RFC 6455 §5.5.1). On a connection that is already gone this fails at once.
async fn answer_close(sink: &mut SplitSink<WebSocket, Message>) {
    if Box::pin(tokio::time::timeout(URGENT_CLOSE_WAIT, sink.close()))
        .await
        .is_err()
    {
        tracing::debug!("client did not take the answer to its close in time");
    }
}

/// Feeds every frame of `batch` (and what the session adds meanwhile), then flushes once.
async fn write_batch(
    sink: &mut SplitSink<WebSocket, Message>,
    inbox: &mut Inbox,
    batch: &mut VecDeque<Text>,
) -> bool {
    let mut yielded = batch.len() >= WRITE_BATCH;
    let mut bytes = 0;
    loop {
        while let Some(text) = batch.pop_front() {
            bytes += text.len();
            if sink.feed(Message::Text(text)).await.is_err() {
                return false;
            }
        }
        if yielded {
            break;
        }
        // Let the session finish fanning out its batch so that one write carries several
        // frames instead of one syscall per frame.
        yielded = true;
        tokio::task::yield_now().await;
        if !inbox.try_take(batch) {
            break;
        }
    }
    let flushed = sink.flush().await.is_ok();
    // Only now: until the socket took them, these bytes are held for this client.
    inbox.written(bytes);
    flushed
}

/// Sends a close frame, waiting at most `wait` (boxed: it happens once per connection).
async fn send_close(
    sink: &mut SplitSink<WebSocket, Message>,
    c: &Close,
    metrics: &Metrics,
    wait: Duration,
) {
    metrics.closed(c.label());
    let frame = CloseFrame {
        code: c.code,
        reason: c.reason.to_string().into(),
    };
    let _ = Box::pin(tokio::time::timeout(
        wait,
        sink.send(Message::Close(Some(frame))),
    ))
    .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_session_id_is_the_last_path_segment() {
        assert_eq!(session_id_from_path("/reflector/abc"), "abc");
        assert_eq!(session_id_from_path("/abc"), "abc");
        assert_eq!(session_id_from_path("/p/token/abc"), "abc");
        assert_eq!(session_id_from_path("/reflector/"), "");
    }
}
