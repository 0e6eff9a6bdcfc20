//! The protocol state of one session: ordering and fan-out, driving the parts that keep
//! the rest.
//!
//! `Core` is driven by its session task with one call per client message, connection change
//! or timer. It does no I/O: frames go into the members' [`Outbox`]es without waiting, and
//! storage work comes out as [`Effect`]s the task carries out. That keeps the whole protocol
//! testable with plain function calls.
//!
//! `Core` itself owns what orders a session: its clock, sequence numbers, timeline, ticks,
//! the stamping of every reflected message and its fan-out, SNAP and SAVE checks, drain and
//! the persistence identity. Each of the other parts has one job, and tests of its own:
//!
//! - [`super::members`]: who is in the session (Waiting, Active, Leaving, Ghost, Closing)
//!   and the `users` news about them;
//! - [`super::retained`]: the messages a joining client gets, their bytes, and the snapshot
//!   they follow;
//! - [`super::tallies`]: open TUTTI tallies and the recently completed ones;
//! - [`super::debounce`]: debounced SEND keys;
//! - [`super::chunk`]: `_CHUNK` splitting of long frames.
//!
//! The parts hold plain values inline in `Core` (no boxes, no locks), so reflecting a message
//! costs what it did when they were `Core`'s own fields.

use std::fmt::Write as _;
use std::sync::Arc;
use std::time::Duration;

use rand::Rng;
use serde_json::value::RawValue;
use tokio::time::Instant;

pub use super::chunk::CHUNK_SIZE;
use super::clock::Clock;
use super::debounce::{Debounce, MAX_DEBOUNCE};
pub use super::debounce::{MAX_DEBOUNCE_KEY, MAX_DEBOUNCE_KEYS};
use super::files_scope;
pub use super::members::USERS_INTERVAL;
use super::members::{Disconnected, Members, State};
pub use super::retained::seq_after;
use super::retained::{Kind, Retained};
use super::stored::{STORED_SESSION_FORMAT, SnapshotRef, StoredSession};
pub use super::tallies::{MAX_OPEN_TALLIES, TALLY_INTERVAL};
use super::tallies::{Refused, Tallies};
use crate::close;
use crate::frame::{self, ClientMsg, Join, Text, json_string};
use crate::metrics::Metrics;
use crate::outbox::{Outbox, SendError};

/// Identifies one WebSocket connection.
pub type ConnId = u64;

/// First sequence number of a new session: the counter wraps after 16 messages on purpose.
pub const INITIAL_SEQ: u32 = 0xFFFF_FFF0;
/// The longest leave delay a client may ask for.
const MAX_LEAVE_DELAY: Duration = Duration::from_secs(60);
/// The shortest tick interval a client may ask for: the client itself clamps its ticks per
/// second to 60 (1000/60 ≈ 16.7 ms), and a shorter interval only multiplies the TICKs the
/// session sends every member (a 1 ms request made about 475 a second).
pub const MIN_TICK: Duration = Duration::from_millis(16);
/// The longest tick interval a client may ask for: the client's own floor of 1/30 ticks per
/// second. Longer silences would also run into the client's 45 s PULSE and 50 s
/// "reflector has gone away" timers.
pub const MAX_TICK: Duration = Duration::from_secs(30);

/// Settings every session of a reflector shares.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Reported to clients in SYNC as `reflector`.
    pub reflector_name: String,
    pub default_tick: Duration,
    pub empty_session_ttl: Duration,
    pub rejoin_grace: Duration,
    pub requ_messages: usize,
    pub max_messages: usize,
    /// Public files base URL (no trailing slash): SNAP and SAVE URLs must lie under the
    /// session's own prefix there.
    pub files_base: String,
    /// Bytes of retained messages at which SENDs are dropped.
    pub max_retained_bytes: usize,
}

/// Storage work a session asks its task to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Effect {
    /// Record the URL of newly persisted data under the session's persistence key.
    SavePersisted {
        developer_id: String,
        app_id: String,
        persistent_id: String,
        url: String,
    },
    /// A snapshot was accepted: older snapshots next to it may be pruned.
    PruneSnapshots { url: String },
}

/// What [`Core::flush_stats`] counted since the previous flush (for the load report).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Flushed {
    /// Messages reflected.
    pub reflected: u64,
    /// Bytes queued to clients.
    pub bytes: u64,
    /// Members that left.
    pub leaves: u64,
}

/// Counters accumulated during a batch and added to the shared metrics once.
#[derive(Debug, Default)]
struct Stats {
    deliveries: u64,
    bytes: u64,
    drops: u64,
    slow: u64,
    reflected: u64,
    ticks: u64,
    joins: u64,
    leaves: u64,
    users_delta: i64,
}

/// The persistence identity a session learned from its first JOIN.
#[derive(Debug, Clone, Default)]
pub struct Identity {
    pub name: Option<String>,
    pub app_id: Option<String>,
    pub persistent_id: Option<String>,
    pub developer_id: Option<String>,
    pub code_hash: Option<String>,
}

fn random_timeline() -> String {
    const DIGITS: &[u8] = b"0123456789abcdefghijklmnopqrstuvwxyz";
    let mut rng = rand::rng();
    (0..12)
        .map(|_| DIGITS[rng.random_range(0..DIGITS.len())] as char)
        .collect()
}

/// Retained messages as a stored record holds them.
pub(crate) fn stored_messages<'a>(args: impl Iterator<Item = &'a str>) -> Vec<Box<RawValue>> {
    args.filter_map(|m| RawValue::from_string(m.to_owned()).ok())
        .collect()
}

/// Formats a JSON number the way JavaScript prints it for the values clients send.
pub(super) fn js_number(out: &mut String, v: f64) {
    if v.is_finite() && v.fract() == 0.0 && v.abs() < 9.0e15 {
        let _ = write!(out, "{}", v as i64);
    } else if v.is_finite() {
        let _ = write!(out, "{v}");
    } else {
        out.push_str("null");
    }
}

/// A client's milliseconds as a duration in `0..=max`: negative, NaN and infinite values are
/// zero, anything too large for a `Duration` is `max` (a client's number never panics).
fn millis(v: f64, max: Duration) -> Duration {
    if v.is_finite() && v > 0.0 {
        Duration::try_from_secs_f64(v / 1000.0).map_or(max, |d| d.min(max))
    } else {
        Duration::ZERO
    }
}

/// The state of one session.
#[derive(Debug)]
pub struct Core {
    id: Arc<str>,
    id_json: String,
    recv_prefix: String,
    clock: Clock,
    seq: u32,
    timeline: String,
    tick: Duration,
    delay_ms: u64,
    tove: Option<String>,
    identity: Identity,
    leave_delay: Duration,
    retained: Retained,
    persisted_url: Option<String>,
    members: Members,
    tallies: Tallies,
    debounce: Debounce,
    next_tick: Instant,
    empty_since: Option<Instant>,
    initialised: bool,
    draining: bool,
    dropped_sends: u64,
    effects: Vec<Effect>,
    stats: Stats,
    settings: Arc<Settings>,
    metrics: Metrics,
}

impl Core {
    /// A new, empty session.
    pub fn new(id: Arc<str>, settings: Arc<Settings>, metrics: Metrics, now: Instant) -> Self {
        let id_json = json_string(&id);
        let recv_prefix = format!("{{\"id\":{id_json},\"action\":\"RECV\",\"args\":");
        Self {
            clock: Clock::starting_at(0, now),
            seq: INITIAL_SEQ,
            timeline: random_timeline(),
            tick: settings.default_tick,
            delay_ms: 0,
            tove: None,
            identity: Identity::default(),
            leave_delay: Duration::ZERO,
            retained: Retained::default(),
            persisted_url: None,
            members: Members::default(),
            tallies: Tallies::default(),
            debounce: Debounce::default(),
            next_tick: now + settings.default_tick,
            empty_since: Some(now),
            initialised: false,
            draining: false,
            dropped_sends: 0,
            effects: Vec::new(),
            stats: Stats::default(),
            id,
            id_json,
            recv_prefix,
            settings,
            metrics,
        }
    }

    /// The session id.
    pub fn id(&self) -> &Arc<str> {
        &self.id
    }

    /// The timeline of this incarnation.
    pub fn timeline(&self) -> &str {
        &self.timeline
    }

    /// Sequence number of the last reflected message.
    pub fn seq(&self) -> u32 {
        self.seq
    }

    /// Whether the first JOIN (or a restore) has set the session up.
    pub fn is_initialised(&self) -> bool {
        self.initialised
    }

    /// The identity from the first JOIN.
    pub fn identity(&self) -> &Identity {
        &self.identity
    }

    /// Learns the persistence identity from the first JOIN before storage look-ups.
    pub fn identity_from(join: &Join) -> Identity {
        Identity {
            name: join.name.clone(),
            app_id: join.app_id.clone(),
            persistent_id: join.persistent_id.clone(),
            developer_id: join.developer_id.clone(),
            code_hash: join.code_hash.clone(),
        }
    }

    /// Sets the persisted-data URL found at session start.
    pub fn set_persisted_url(&mut self, url: String) {
        self.persisted_url = Some(url);
    }

    /// Storage work requested since the last call.
    pub fn take_effects(&mut self) -> Vec<Effect> {
        std::mem::take(&mut self.effects)
    }

    /// Whether any member has an open connection.
    pub fn has_connections(&self) -> bool {
        self.members.has_connections()
    }

    /// Whether this user record (a view) was admitted to the session before and has not
    /// left: a reconnect or a rejoin after a resume.
    pub fn is_member(&self, user: Option<&str>) -> bool {
        user.is_some_and(|u| self.members.admitted(u).is_some())
    }

    /// Members counted in `users` (everything but connections still waiting for SYNC).
    pub fn member_count(&self) -> usize {
        self.members.count()
    }

    /// Whether the session was closed for a drain.
    pub fn is_draining(&self) -> bool {
        self.draining
    }

    // === restore and store ===

    /// Continues a stored session: same timeline, time, sequence numbers and messages. Its
    /// former members become ghosts that their users can claim by joining again.
    pub fn restore(&mut self, stored: StoredSession, now: Instant) {
        self.clock = Clock::starting_at(stored.time, now);
        if stored.scale > 0.0 && stored.scale != 1.0 {
            self.clock.set_scale(stored.scale, now);
        }
        self.seq = stored.seq;
        self.timeline = stored.timeline;
        if stored.tick_ms > 0 {
            // Sessions stored before the clamp may carry any interval.
            self.tick = Duration::from_millis(stored.tick_ms).clamp(MIN_TICK, MAX_TICK);
        }
        self.delay_ms = stored.delay_ms;
        self.tove = stored.tove;
        self.identity = Identity {
            name: stored.name,
            app_id: stored.app_id,
            persistent_id: stored.persistent_id,
            developer_id: stored.developer_id,
            code_hash: stored.code_hash,
        };
        self.leave_delay = Duration::from_millis(stored.leave_delay_ms).min(MAX_LEAVE_DELAY);
        self.persisted_url = stored.persisted_url;
        self.retained = Retained::restore(
            &self.recv_prefix,
            stored.messages.iter().map(|m| &**m),
            stored.snapshot,
        );
        self.tallies = Tallies::restore(stored.completed_tallies);
        let grace = self.settings.rejoin_grace.max(self.leave_delay);
        for user in stored.users {
            self.members.add_ghost(Arc::from(user.get()), now + grace);
            self.stats.users_delta += 1;
        }
        self.empty_since = if self.members.is_empty() {
            Some(now)
        } else {
            None
        };
        self.initialised = true;
    }

    /// Everything needed to resume this session elsewhere or later.
    pub fn to_stored(&mut self, now: Instant, wall_ms: u64) -> StoredSession {
        let mut stored = self.stored_without_messages(now, wall_ms);
        stored.messages = stored_messages(self.retained.args());
        stored
    }

    /// A checkpoint: the state as [`Core::to_stored`] has it, with the messages still shared
    /// (they become the record's off the session's task, with [`stored_messages`]).
    pub(crate) fn checkpoint(
        &mut self,
        now: Instant,
        wall_ms: u64,
    ) -> (StoredSession, Vec<super::retained::ArgsRef>) {
        let mut stored = self.stored_without_messages(now, wall_ms);
        stored.clean = false;
        (stored, self.retained.shared_args())
    }

    fn stored_without_messages(&mut self, now: Instant, wall_ms: u64) -> StoredSession {
        let time = self.clock.read(now);
        let users = self.members.stored_users();
        StoredSession {
            format: STORED_SESSION_FORMAT,
            session_id: self.id.to_string(),
            timeline: self.timeline.clone(),
            time,
            seq: self.seq,
            tick_ms: self.tick.as_millis() as u64,
            delay_ms: self.delay_ms,
            scale: self.clock.scale(),
            tove: self.tove.clone(),
            name: self.identity.name.clone(),
            app_id: self.identity.app_id.clone(),
            persistent_id: self.identity.persistent_id.clone(),
            developer_id: self.identity.developer_id.clone(),
            code_hash: self.identity.code_hash.clone(),
            leave_delay_ms: self.leave_delay.as_millis() as u64,
            snapshot: self.retained.snapshot().cloned(),
            persisted_url: self.persisted_url.clone(),
            messages: Vec::new(),
            completed_tallies: self.tallies.completed().cloned().collect(),
            users,
            stored_at_ms: wall_ms,
            binding: None,
            views: Default::default(),
            view_keys: Default::default(),
            clean: true,
        }
    }

    /// Leaves the stored timeline for a new one: after a resume from a checkpoint, clients
    /// may have seen messages the checkpoint lacks, and a new timeline makes every client
    /// rebuild from the same state instead of some continuing a history that forked.
    pub fn fresh_timeline(&mut self) {
        self.timeline = random_timeline();
    }

    /// Whether storing this session is worth it (it has anything a client could resume).
    pub fn has_state(&self) -> bool {
        !self.retained.is_empty() || self.retained.snapshot().is_some() || self.seq != INITIAL_SEQ
    }

    // === clients ===

    /// A connection's JOIN: answered with SYNC at once (storage look-ups happened before).
    pub fn join(&mut self, conn: ConnId, out: Outbox, join: Join, now: Instant) {
        if self.draining {
            out.close(close::RECONNECT.with_reason("session is moving, reconnect"));
            return;
        }
        if !self.initialised {
            self.identity = Self::identity_from(&join);
            self.tove = join.tove.clone();
            self.apply_ticks(join.tick_ms, join.delay_ms, join.scale, now);
            self.initialised = true;
        }
        if let Some(ld) = join.leave_delay_ms {
            self.leave_delay = millis(ld, MAX_LEAVE_DELAY);
        }
        let user: Option<Arc<str>> = join.user.map(Arc::from);
        let existing = user.as_deref().and_then(|u| self.members.admitted(u));
        let sync = self.sync_frame(now);
        let index = match existing {
            Some(i) => {
                self.members.reconnect(i, conn, out);
                tracing::debug!(session = %self.id, conn, "member rejoined");
                i
            }
            None => self.members.add(conn, out, user.clone()),
        };
        self.empty_since = None;
        let delivered = self.send_chunked(index, &sync);
        self.members.activate(index);
        if existing.is_none() {
            self.stats.users_delta += 1;
            if let Some(u) = user {
                self.members.queue_joined(u, now);
            }
        } else {
            self.members.wake_users(now);
        }
        self.stats.joins += 1;
        if !delivered {
            tracing::warn!(session = %self.id, conn, "SYNC did not fit the send queue");
        }
    }

    /// A connection ended (the client closed it, it dropped, or the reflector closed it).
    pub fn closed(&mut self, conn: ConnId, now: Instant) {
        let Some(i) = self.members.by_conn(conn) else {
            return;
        };
        let gone = self
            .members
            .disconnect(i, self.leave_delay, self.draining, now);
        if gone == Disconnected::LeavesNow {
            self.remove_member(i, now);
        }
        if self.members.is_empty() {
            self.empty_since = Some(now);
        }
    }

    fn remove_member(&mut self, i: usize, now: Instant) {
        self.members.remove(i, now);
        self.stats.users_delta -= 1;
        self.stats.leaves += 1;
        if self.members.is_empty() {
            self.empty_since = Some(now);
        }
    }

    /// One message from a joined connection.
    pub fn message(&mut self, conn: ConnId, msg: ClientMsg, now: Instant) {
        match msg {
            ClientMsg::Send { rest, tags } => {
                let debounce = tags
                    .and_then(|t| Some((t.msg_id?, millis(t.debounce?, MAX_DEBOUNCE))))
                    .filter(|(id, _)| id.len() <= MAX_DEBOUNCE_KEY);
                if let Some((id, _)) = &debounce
                    && self.debounce.holds(id, now)
                {
                    tracing::debug!(session = %self.id, msg_id = %id, "debounced SEND dropped");
                    return;
                }
                if !self.reflect(&rest, now, Kind::Client) {
                    self.refuse_send(conn);
                    return;
                }
                if let Some((id, window)) = debounce {
                    self.debounce.remember(id, window, now);
                }
            }
            ClientMsg::Tutti(t) => self.tutti(conn, *t, now),
            ClientMsg::Snap(s) => {
                let scope = files_scope::snapshot_path(
                    &self.settings.files_base,
                    &self.identity,
                    &self.id,
                    &s.url,
                );
                if self.stored_url_allowed(conn, "SNAP", &s.url, scope.map(|_| ())) {
                    self.snap(s);
                }
            }
            ClientMsg::Save(s) => {
                let scope =
                    files_scope::persisted_path(&self.settings.files_base, &self.identity, &s.url);
                // A session without appId/persistentId is closed with 4101 by `save`.
                let scope = scope.or_else(|e| match e {
                    files_scope::OutOfScope::NoIdentity => Ok(()),
                    e => Err(e),
                });
                if self.stored_url_allowed(conn, "SAVE", &s.url, scope) {
                    self.save(conn, s);
                }
            }
            ClientMsg::Ticks(t) => self.apply_ticks(t.tick_ms, t.delay_ms, t.scale, now),
            // Connection-level actions never reach the session.
            ClientMsg::Join(_)
            | ClientMsg::Ping(_)
            | ClientMsg::Pulse
            | ClientMsg::Log
            | ClientMsg::Unknown(_) => {}
        }
    }

    fn apply_ticks(
        &mut self,
        tick: Option<f64>,
        delay: Option<f64>,
        scale: Option<f64>,
        now: Instant,
    ) {
        if let Some(t) = tick
            && t > 0.0
        {
            self.tick = millis(t, MAX_TICK).max(MIN_TICK);
            self.next_tick = now + self.tick;
        }
        if let Some(d) = delay
            && d > 0.0
        {
            // Held messages ("cheat beats") are not implemented; the value is kept for resume.
            self.delay_ms = d as u64;
        }
        if let Some(s) = scale
            && s > 0.0
        {
            self.clock.set_scale(s, now);
        }
    }

    fn refuse_send(&mut self, conn: ConnId) {
        self.dropped_sends += 1;
        if self.dropped_sends % 100 != 1 {
            return;
        }
        tracing::warn!(session = %self.id, retained = self.retained.len(), "message buffer full: SEND dropped until a snapshot arrives");
        let info = format!(
            "{{\"id\":{},\"action\":\"INFO\",\"args\":{{\"code\":\"SNAPSHOT_NEEDED\",\"msg\":\"too many messages since the last snapshot; messages are being dropped\",\"options\":{{\"level\":\"error\",\"only\":\"once\"}}}}}}",
            self.id_json
        );
        let requ = self.requ_frame();
        if let Some(out) = self.members.outbox_of(conn) {
            let _ = out.try_send(requ);
            let _ = out.try_send(Text::from(info));
        }
    }

    /// "Please snapshot" for this session's clients.
    fn requ_frame(&self) -> Text {
        Text::from(format!("{{\"id\":{},\"action\":\"REQU\"}}", self.id_json))
    }

    // === reflecting ===

    /// Stamps and fans out one message whose array starts with `rest` after time and seq.
    /// Returns false when the message buffer is full (meta messages always pass).
    fn reflect(&mut self, rest: &str, now: Instant, kind: Kind) -> bool {
        if !self.retained.admits(
            kind,
            rest.len(),
            self.settings.max_messages,
            self.settings.max_retained_bytes,
        ) {
            return false;
        }
        let time = self.clock.read(now);
        self.seq = self.seq.wrapping_add(1);
        let mut frame = String::with_capacity(self.recv_prefix.len() + rest.len() + 28);
        frame.push_str(&self.recv_prefix);
        let start = frame.len();
        frame.push('[');
        frame.push_str(itoa::Buffer::new().format(time));
        frame.push(',');
        frame.push_str(itoa::Buffer::new().format(self.seq));
        frame.push(',');
        frame.push_str(rest);
        frame.push(']');
        let end = frame.len();
        frame.push('}');
        let text = Text::from(frame);
        self.fan_out(&text, false);
        self.retained.push(text, start..end, self.seq);
        self.stats.reflected += 1;
        self.next_tick = now + self.tick;
        let retained = self.retained.len();
        if retained >= self.settings.requ_messages
            && (retained - self.settings.requ_messages).is_multiple_of(1000)
        {
            let requ = self.requ_frame();
            self.fan_out(&requ, false);
        }
        true
    }

    /// Sends one frame to every active member; with `tick`, only to those with nothing queued.
    fn fan_out(&mut self, text: &Text, tick: bool) {
        let len = text.len() as u64;
        for m in self.members.iter_mut() {
            if m.state != State::Active {
                continue;
            }
            let Some(out) = &m.out else { continue };
            if tick && !out.is_idle() {
                continue;
            }
            match out.try_send(text.clone()) {
                Ok(()) => {
                    self.stats.deliveries += 1;
                    self.stats.bytes += len;
                    if tick {
                        self.stats.ticks += 1;
                    }
                }
                Err(SendError::Full) => {
                    self.stats.drops += 1;
                    self.stats.slow += 1;
                    out.close_now(close::UNRESPONSIVE);
                    tracing::info!(session = %self.id, conn = ?m.conn, "client too slow, disconnected");
                    m.out = None;
                }
                Err(SendError::Gone) => m.out = None,
            }
        }
    }

    /// Sends a SYNC to one member, in `_CHUNK` pieces when needed. Only the frame bound of its
    /// queue applies: the byte bound would make a session with more retained bytes than that
    /// impossible to join, and a SYNC is bounded by `--max-retained-bytes` instead.
    fn send_chunked(&mut self, index: usize, text: &str) -> bool {
        let Some(out) = self.members.get(index).out.clone() else {
            return false;
        };
        for p in super::chunk::pieces(text, CHUNK_SIZE) {
            let len = p.len() as u64;
            if out.try_send_sync(Text::from(p)).is_err() {
                out.close_now(close::UNRESPONSIVE);
                self.members.get_mut(index).out = None;
                return false;
            }
            self.stats.deliveries += 1;
            self.stats.bytes += len;
        }
        true
    }

    fn sync_frame(&mut self, now: Instant) -> String {
        let time = self.clock.read(now);
        let body = self.retained.bytes() + self.retained.len();
        let mut s = String::with_capacity(body + 512);
        let url = match (self.retained.snapshot(), &self.persisted_url) {
            (Some(snap), _) => snap.url.as_str(),
            (None, Some(p)) => p.as_str(),
            (None, None) => "",
        };
        let _ = write!(
            s,
            "{{\"id\":{},\"action\":\"SYNC\",\"args\":{{\"url\":{},\"messages\":[",
            self.id_json,
            json_string(url)
        );
        for (i, m) in self.retained.args().enumerate() {
            if i > 0 {
                s.push(',');
            }
            s.push_str(m);
        }
        let _ = write!(s, "],\"time\":{time},\"seq\":{}", self.seq);
        if let Some(tove) = &self.tove {
            let _ = write!(s, ",\"tove\":{tove}");
        }
        let _ = write!(
            s,
            ",\"reflector\":{},\"timeline\":{},\"flags\":{{}}",
            json_string(&self.settings.reflector_name),
            json_string(&self.timeline)
        );
        if let Some(snap) = self.retained.snapshot() {
            s.push_str(",\"snapshotTime\":");
            js_number(&mut s, snap.time);
            let _ = write!(s, ",\"snapshotSeq\":{}", snap.seq);
        } else if self.persisted_url.is_some() {
            s.push_str(",\"persisted\":true");
        }
        s.push_str("}}");
        s
    }

    // === users ===

    fn flush_users(&mut self, now: Instant) {
        if let Some(payload) = self.members.take_users() {
            self.reflect(&frame::with_size(&payload), now, Kind::Users);
        }
    }

    // === tallies ===

    fn tutti(&mut self, conn: ConnId, t: frame::Tutti, now: Instant) {
        if !self.tallies.is_open(&t.key) {
            let time = self.clock.read(now) as f64;
            match self.tallies.may_open(&t.key, t.send_time, time) {
                Ok(()) => {}
                Err(Refused::LateOrRepeated) => {
                    tracing::debug!(session = %self.id, key = %t.key, "late or repeated TUTTI ignored");
                    return;
                }
                Err(Refused::TooMany) => {
                    tracing::debug!(session = %self.id, key = %t.key, "too many open tallies: TUTTI ignored");
                    return;
                }
            }
            // The first message is a client's message like a SEND's: within the limits.
            if let Some(first) = &t.first_msg
                && !self.reflect(first, now, Kind::Client)
            {
                self.refuse_send(conn);
                return;
            }
            let expecting = self.members.active_count();
            self.tallies.open(
                t.key.clone(),
                t.send_time,
                expecting,
                t.wants_vote,
                t.tally_target,
                now,
            );
        }
        if self.tallies.vote(&t.key, t.payload, t.wants_vote) {
            self.complete_tally(&t.key, now);
        }
    }

    fn complete_tally(&mut self, key: &str, now: Instant) {
        let time = self.clock.read(now) as f64;
        let Some(tally) = self.tallies.close(key, time) else {
            return;
        };
        if let Some(payload) = tally.result(key) {
            self.reflect(&frame::with_size(&payload), now, Kind::Tally);
        }
    }

    // === snapshots and persistence ===

    /// Whether a SNAP or SAVE from `conn` may be recorded: it must come from an admitted,
    /// connected member and name a URL under the session's own prefix (`scope`).
    fn stored_url_allowed(
        &self,
        conn: ConnId,
        action: &'static str,
        url: &str,
        scope: Result<(), files_scope::OutOfScope>,
    ) -> bool {
        let member = self.members.is_active_conn(conn);
        let reason = match (member, scope) {
            (true, Ok(())) => return true,
            (false, _) => "not_member",
            (true, Err(e)) => e.label(),
        };
        self.metrics.stored_url_refused(action, reason);
        tracing::warn!(session = %self.id, conn, action, reason, url, "stored-data URL ignored");
        false
    }

    fn snap(&mut self, s: frame::Snap) {
        if s.dissident || !self.retained.is_newer(s.time) {
            tracing::debug!(session = %self.id, time = s.time, seq = s.seq, "snapshot ignored");
            self.metrics.snapshot(false);
            return;
        }
        let (time, seq) = (s.time, s.seq);
        self.effects
            .push(Effect::PruneSnapshots { url: s.url.clone() });
        self.retained.set_snapshot(SnapshotRef {
            url: s.url,
            time: s.time,
            seq: s.seq,
        });
        tracing::info!(session = %self.id, time, seq, retained = self.retained.len(), "snapshot accepted");
        self.metrics.snapshot(true);
        self.dropped_sends = 0;
    }

    fn save(&mut self, conn: ConnId, s: frame::Save) {
        let (Some(app_id), Some(persistent_id)) = (
            self.identity.app_id.clone(),
            self.identity.persistent_id.clone(),
        ) else {
            if let Some(out) = self.members.outbox_of(conn) {
                out.close(close::BAD_APP_ID);
            }
            return;
        };
        if s.dissident {
            return;
        }
        let developer_id = self
            .identity
            .developer_id
            .clone()
            .unwrap_or_else(|| "unknown_dev_id".into());
        self.effects.push(Effect::SavePersisted {
            developer_id,
            app_id,
            persistent_id,
            url: s.url,
        });
    }

    // === time ===

    /// The earliest instant at which [`Core::on_timers`] has work.
    pub fn next_deadline(&self) -> Option<Instant> {
        let mut next: Option<Instant> = None;
        let mut consider = |t: Instant| next = Some(next.map_or(t, |n: Instant| n.min(t)));
        if self.members.any_active() {
            consider(self.next_tick);
        }
        if let Some(t) = self.members.users_due() {
            consider(t);
        }
        if let Some(t) = self.tallies.next_due() {
            consider(t);
        }
        if let Some(t) = self.members.next_expiry() {
            consider(t);
        }
        if let Some(t) = self.end_due() {
            consider(t);
        }
        next
    }

    /// When an empty session may be ended.
    pub fn end_due(&self) -> Option<Instant> {
        let keep = self
            .settings
            .empty_session_ttl
            .max(self.leave_delay + Duration::from_secs(2));
        self.empty_since.map(|t| t + keep)
    }

    /// Runs every timer that is due: leaves, users batches, tallies, ticks.
    pub fn on_timers(&mut self, now: Instant) {
        let mut from = 0;
        while let Some(i) = self.members.next_expired(from, now) {
            self.remove_member(i, now);
            from = i;
        }
        for key in self.tallies.due(now) {
            self.complete_tally(&key, now);
        }
        if self.members.users_due().is_some_and(|t| t <= now) {
            self.flush_users(now);
        }
        if self.next_tick <= now {
            if self.members.any_active() {
                let time = self.clock.read(now);
                let tick = Text::from(format!(
                    "{{\"id\":{},\"action\":\"TICK\",\"args\":{time}}}",
                    self.id_json
                ));
                self.fan_out(&tick, true);
            }
            self.next_tick = now + self.tick;
        }
    }

    /// Closes every client for a drain: pending users and tallies are reflected first, then
    /// each client gets 4003 after what is queued for it. Messages still arriving are
    /// stamped and kept (they will be in the SYNC the clients get when they return).
    pub fn begin_drain(&mut self, now: Instant) {
        self.close_all(now, "reflector draining, reconnect");
    }

    /// Closes every client for a hand-off of the session to another reflector: as a drain,
    /// with a reason that says so.
    pub fn begin_hand_off(&mut self, now: Instant) {
        self.close_all(now, "session moving to another reflector, reconnect");
    }

    fn close_all(&mut self, now: Instant, reason: &'static str) {
        self.flush_users(now);
        for key in self.tallies.keys() {
            self.complete_tally(&key, now);
        }
        self.draining = true;
        self.members.close_for_drain(reason);
    }

    /// The hand-off failed (its state could not be stored): the session carries on here,
    /// and the clients closed for it rejoin as members within the rejoin grace.
    pub fn abort_hand_off(&mut self, now: Instant) {
        self.draining = false;
        let grace = self.settings.rejoin_grace.max(self.leave_delay);
        self.members.reopen_closing(now + grace);
        if self.members.is_empty() {
            self.empty_since = Some(now);
        }
    }

    /// Completes whatever is still open before the state is stored.
    pub fn settle(&mut self, now: Instant) {
        for key in self.tallies.keys() {
            self.complete_tally(&key, now);
        }
    }

    /// Adds the counters of the last batch to the shared metrics.
    pub fn flush_stats(&mut self) -> Flushed {
        let s = std::mem::take(&mut self.stats);
        let flushed = Flushed {
            reflected: s.reflected,
            bytes: s.bytes,
            leaves: s.leaves,
        };
        let m = &self.metrics;
        if s.deliveries > 0 {
            m.deliveries_total.inc_by(s.deliveries);
            m.bytes_sent_total.inc_by(s.bytes);
        }
        if s.reflected > 0 {
            m.messages_reflected_total.inc_by(s.reflected);
        }
        if s.ticks > 0 {
            m.ticks_total.inc_by(s.ticks);
        }
        if s.drops > 0 {
            m.send_queue_drops_total.inc_by(s.drops);
            m.slow_client_disconnects_total.inc_by(s.slow);
        }
        if s.joins > 0 {
            m.joins_total.inc_by(s.joins);
        }
        if s.leaves > 0 {
            m.leaves_total.inc_by(s.leaves);
        }
        if s.users_delta != 0 {
            m.users.add(s.users_delta);
        }
        flushed
    }

    /// Forgets every member for the metrics when the session leaves memory.
    pub fn release(&mut self) {
        self.flush_stats();
        self.metrics.users.sub(self.member_count() as i64);
        self.members.clear();
    }
}

impl Drop for Core {
    /// A session dropped without [`Core::release`] (its task panicked) still leaves the
    /// gauges right.
    fn drop(&mut self) {
        if !self.members.is_empty() {
            self.release();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::outbox;

    fn settings() -> Arc<Settings> {
        Arc::new(Settings {
            reflector_name: "test".into(),
            default_tick: Duration::from_millis(200),
            empty_session_ttl: Duration::from_secs(10),
            rejoin_grace: Duration::from_secs(10),
            requ_messages: 60_000,
            max_messages: 100_000,
            files_base: "http://f/files".into(),
            max_retained_bytes: usize::MAX,
        })
    }

    fn core() -> Core {
        Core::new(
            Arc::from("s"),
            settings(),
            Metrics::new("test"),
            Instant::now(),
        )
    }

    fn stored(messages: &[&str], users: &[&str]) -> StoredSession {
        StoredSession {
            format: STORED_SESSION_FORMAT,
            session_id: "s".into(),
            timeline: "tl".into(),
            time: 5000,
            seq: 7,
            tick_ms: 50,
            delay_ms: 0,
            scale: 1.0,
            tove: Some("\"T\"".into()),
            name: None,
            app_id: Some("app".into()),
            persistent_id: Some("pid".into()),
            developer_id: None,
            code_hash: None,
            leave_delay_ms: 1000,
            snapshot: None,
            persisted_url: None,
            messages: messages
                .iter()
                .map(|m| RawValue::from_string(m.to_string()).expect("raw"))
                .collect(),
            completed_tallies: vec![],
            users: users
                .iter()
                .map(|u| RawValue::from_string(u.to_string()).expect("raw"))
                .collect(),
            stored_at_ms: 0,
            binding: None,
            views: Default::default(),
            view_keys: Default::default(),
            clean: true,
        }
    }

    fn user(u: &str) -> Join {
        Join {
            user: Some(format!("\"{u}\"")),
            ..Join::default()
        }
    }

    fn frames(inbox: &mut outbox::Inbox) -> Vec<serde_json::Value> {
        let mut v = Vec::new();
        while let Some(outbox::Out::Frame(t)) = inbox.try_recv() {
            v.push(serde_json::from_str(t.as_str()).expect("json"));
        }
        v
    }

    fn users_messages(inbox: &mut outbox::Inbox) -> Vec<serde_json::Value> {
        frames(inbox)
            .into_iter()
            .filter(|f| f["args"][2]["what"] == "users")
            .map(|f| f["args"][2].clone())
            .collect()
    }

    fn send(c: &mut Core, conn: ConnId, payload: &str, tags: Option<(f64, &str)>, now: Instant) {
        c.message(
            conn,
            ClientMsg::Send {
                rest: format!("{},0", json_string(payload)).into(),
                tags: tags.map(|(d, id)| frame::Tags {
                    debounce: Some(d),
                    msg_id: Some(id.to_owned()),
                }),
            },
            now,
        );
    }

    fn core_with(max_messages: usize, max_retained_bytes: usize) -> Core {
        let mut s = (*settings()).clone();
        s.max_messages = max_messages;
        s.max_retained_bytes = max_retained_bytes;
        Core::new(
            Arc::from("s"),
            Arc::new(s),
            Metrics::new("test"),
            Instant::now(),
        )
    }

    #[test]
    fn client_numbers_become_bounded_durations_without_panicking() {
        let max = Duration::from_secs(60);
        for v in [1e300, f64::MAX, f64::INFINITY] {
            assert_eq!(
                millis(v, max),
                if v.is_finite() { max } else { Duration::ZERO }
            );
        }
        for v in [f64::NAN, -1.0, 0.0, f64::NEG_INFINITY] {
            assert_eq!(millis(v, max), Duration::ZERO);
        }
        assert_eq!(millis(1250.0, max), Duration::from_millis(1250));
        let mut c = core();
        let now = Instant::now();
        let mut j = user("v");
        j.leave_delay_ms = Some(1e300);
        j.tick_ms = Some(1e300);
        j.scale = Some(1e300);
        let (out, _inbox) = outbox::pair(64);
        c.join(1, out, j, now);
        assert_eq!(c.leave_delay, MAX_LEAVE_DELAY);
        assert_eq!(c.tick, MAX_TICK);
    }

    #[test]
    fn tick_requests_are_clamped_to_the_documented_range() {
        let now = Instant::now();
        for (asked, tick) in [
            (1.0, MIN_TICK),
            (0.001, MIN_TICK),
            (17.5, Duration::from_micros(17_500)),
            (50.0, Duration::from_millis(50)),
            (30_000.0, MAX_TICK),
            (60_000.0, MAX_TICK),
        ] {
            let mut c = core();
            let mut j = user("v");
            j.tick_ms = Some(asked);
            let (out, _inbox) = outbox::pair(64);
            c.join(1, out, j, now);
            assert_eq!(c.tick, tick, "JOIN tick {asked}");
            c.message(
                1,
                ClientMsg::Ticks(frame::Ticks {
                    tick_ms: Some(asked),
                    ..frame::Ticks::default()
                }),
                now,
            );
            assert_eq!(c.tick, tick, "TICKS tick {asked}");
        }
        let mut c = core();
        let mut s = stored(&[], &[]);
        s.tick_ms = 1;
        c.restore(s, Instant::now());
        assert_eq!(c.tick, MIN_TICK, "a stored 1 ms tick");
    }

    #[test]
    fn the_debounce_map_stays_bounded_and_ignores_dropped_and_oversized_keys() {
        let mut c = core_with(100_000, usize::MAX);
        let now = Instant::now();
        let (out, _inbox) = outbox::pair(100_000);
        c.join(1, out, user("a"), now);
        let long = "k".repeat(MAX_DEBOUNCE_KEY + 1);
        send(&mut c, 1, "p", Some((5000.0, &long)), now);
        assert_eq!(c.debounce.len(), 0, "an oversized key is not remembered");
        for i in 0..300 {
            send(&mut c, 1, "p", Some((5000.0, &format!("key{i}"))), now);
        }
        assert_eq!(c.debounce.len(), MAX_DEBOUNCE_KEYS);
        // Once their windows passed, old keys make room for new ones.
        let later = now + Duration::from_secs(6);
        send(&mut c, 1, "p", Some((5000.0, "fresh")), later);
        assert!(c.debounce.contains("fresh"));
        assert_eq!(c.debounce.len(), 1);

        // A SEND dropped for a full buffer leaves no key behind.
        let mut full = core_with(1, usize::MAX);
        let (out, _inbox) = outbox::pair(64);
        full.join(1, out, user("a"), now);
        send(&mut full, 1, "fills", None, now);
        send(&mut full, 1, "dropped", Some((5000.0, "k")), now);
        assert_eq!(full.debounce.len(), 0);
    }

    #[test]
    fn retained_bytes_are_capped_and_freed_by_a_snapshot() {
        let mut c = core_with(100_000, 1000);
        let now = Instant::now();
        let (out, _inbox) = outbox::pair(100_000);
        c.join(1, out, user("a"), now);
        let payload = "x".repeat(300);
        for _ in 0..10 {
            send(&mut c, 1, &payload, None, now);
        }
        assert_eq!(
            c.retained.len(),
            3,
            "three 300-byte messages fit in 1000 bytes"
        );
        assert!(c.retained.bytes() <= 1000);
        let last = c.seq;
        c.snap(frame::Snap {
            time: 1.0,
            seq: last,
            url: "u".into(),
            dissident: false,
        });
        assert_eq!((c.retained.len(), c.retained.bytes()), (0, 0));
        send(&mut c, 1, &payload, None, now);
        assert_eq!(c.retained.len(), 1);
    }

    #[test]
    fn tutti_first_messages_count_and_open_tallies_are_bounded() {
        let mut c = core_with(20, usize::MAX);
        let now = Instant::now();
        let (a, _a_in) = outbox::pair(100_000);
        c.join(1, a, user("a"), now);
        let (b, _b_in) = outbox::pair(100_000);
        c.join(2, b, user("b"), now);
        c.on_timers(now + USERS_INTERVAL);
        for i in 0..200 {
            c.message(
                1,
                ClientMsg::Tutti(Box::new(frame::Tutti {
                    send_time: 0.0,
                    payload: format!("v{i}"),
                    first_msg: (i < 100).then(|| format!("\"first{i}\",0")),
                    wants_vote: true,
                    tally_target: "[\"t\"]".into(),
                    key: format!("k@{i}"),
                })),
                now,
            );
        }
        assert!(c.retained.len() <= 20, "{}", c.retained.len());
        assert!(c.tallies.open_count() <= MAX_OPEN_TALLIES);
        // Their results (b never votes) come after the tally window, with little headroom.
        c.on_timers(now + TALLY_INTERVAL);
        assert!(c.retained.len() <= 21, "{}", c.retained.len());
    }

    #[test]
    fn restored_messages_keep_their_sequence_numbers_so_snapshots_trim_them() {
        let mut c = core();
        let now = Instant::now();
        c.restore(
            stored(
                &["[100,5,\"a\",0]", "[200,6,\"b\",0]", "[300,7,\"c\",0]"],
                &[],
            ),
            now,
        );
        c.snap(frame::Snap {
            time: 250.0,
            seq: 6,
            url: "u".into(),
            dissident: false,
        });
        let (out, mut inbox) = outbox::pair(16);
        c.join(1, out, user("v"), now);
        let sync = &frames(&mut inbox)[0];
        assert_eq!(sync["args"]["timeline"], "tl");
        assert_eq!(sync["args"]["seq"], 7);
        assert_eq!(
            sync["args"]["messages"],
            serde_json::json!([[300, 7, "c", 0]])
        );
        assert!(
            sync["args"]["time"].as_u64().expect("time") >= 5000,
            "time continues"
        );
    }

    #[test]
    fn a_returning_member_of_a_restored_session_is_neither_joined_nor_left() {
        let mut c = core();
        let now = Instant::now();
        c.restore(stored(&[], &["\"back\"", "\"gone\""]), now);
        let (out, mut inbox) = outbox::pair(16);
        c.join(1, out, user("back"), now);
        // Past the rejoin grace the member who did not come back is announced as left.
        c.on_timers(now + Duration::from_secs(11));
        c.on_timers(now + Duration::from_secs(12));
        let users = users_messages(&mut inbox);
        assert_eq!(users.len(), 1, "{users:?}");
        assert_eq!(users[0]["left"], serde_json::json!(["gone"]));
        assert!(users[0].get("joined").is_none());
    }

    #[test]
    fn a_leave_and_a_new_join_of_the_same_user_in_one_batch_cancel_out() {
        let mut c = core();
        let now = Instant::now();
        let (a, mut a_in) = outbox::pair(64);
        c.join(1, a, user("a"), now);
        let (b, _b_in) = outbox::pair(64);
        c.join(2, b, user("b"), now);
        c.on_timers(now + USERS_INTERVAL);
        assert_eq!(
            users_messages(&mut a_in)[0]["joined"],
            serde_json::json!(["a", "b"])
        );
        // b leaves for good (leave delay 0)...
        c.closed(2, now + USERS_INTERVAL);
        // ...and is back on a new connection before the batch is sent.
        let (b2, _b2_in) = outbox::pair(64);
        c.join(3, b2, user("b"), now + USERS_INTERVAL);
        c.on_timers(now + USERS_INTERVAL * 3);
        assert!(
            users_messages(&mut a_in).is_empty(),
            "the leave and the join cancelled out"
        );
    }

    #[test]
    fn a_view_that_drops_right_after_its_join_is_announced_when_it_comes_back() {
        let mut c = core();
        let now = Instant::now();
        let mut j = user("v");
        j.leave_delay_ms = Some(3000.0);
        let (a, _a_in) = outbox::pair(64);
        c.join(1, a, j.clone(), now);
        // The first connection drops before the users batch goes out; nobody is active.
        c.closed(1, now + Duration::from_millis(10));
        c.on_timers(now + USERS_INTERVAL);
        // Back within the leave delay: the client waits to see its own join in the model.
        let (b, mut b_in) = outbox::pair(64);
        c.join(2, b, j, now + USERS_INTERVAL * 2);
        c.on_timers(now + USERS_INTERVAL * 4);
        let users = users_messages(&mut b_in);
        assert_eq!(users.len(), 1, "{users:?}");
        assert_eq!(users[0]["joined"], serde_json::json!(["v"]));
    }

    #[test]
    fn a_full_send_queue_disconnects_only_that_client() {
        let mut c = core();
        let now = Instant::now();
        let (fast, mut fast_in) = outbox::pair(1024);
        c.join(1, fast, user("fast"), now);
        let (slow, _slow_in) = outbox::pair(16);
        c.join(2, slow, user("slow"), now);
        for i in 0..40 {
            c.message(
                1,
                ClientMsg::Send {
                    rest: format!("\"m{i}\",0").into(),
                    tags: None,
                },
                now,
            );
        }
        let got: Vec<_> = frames(&mut fast_in)
            .into_iter()
            .filter(|f| f["args"][2].is_string())
            .collect();
        assert_eq!(got.len(), 40, "the fast client got everything");
        assert_eq!(c.stats.slow, 1, "the slow one was cut off once");
    }
}
