//! The simulated reflectors: one per reflector pod the operator created and kwok made
//! Running/Ready. Each opens the real report stream (`refleet.report.v1.Reports/Report`) with
//! the credential from its own pod's environment, reports its shards' users about once a
//! second and at once on change (as `refleet-reflector` does: 1 s interval, 100 ms minimum
//! gap), and applies the instructions that come back (token keys, shard settings, drain).
//!
//! No WebSocket, no Croquet session: a user "joins" by being added to the shard's count on
//! the reflector Route named, with the reservation id read from the join token it got (the
//! token is verified with the keys the operator sent on the stream, as a reflector would).

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use refleet_api::reconnect::Backoff;
use refleet_api::report::{
    Capacity, Instruction, ReflectorReport, ReflectorState, ShardLoad, instruction::Kind,
    reports_client::ReportsClient,
};
use refleet_api::token::Verifier;
use serde::Serialize;
use tokio::sync::{Notify, mpsc, watch};
use tonic::metadata::MetadataValue;

/// How often a reflector reports when nothing changes (the reflector's default).
const INTERVAL: Duration = Duration::from_secs(1);
/// Least time between two reports (the reflector's `MIN_GAP`).
const MIN_GAP: Duration = Duration::from_millis(100);
/// How long an empty shard stays in the reports (the reflector's empty-session TTL).
const EMPTY_TTL: Duration = Duration::from_secs(10);

/// Locks a mutex, going on with the data of a panicked holder (counters stay usable).
pub fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// What the fleet counted; all monotonic except `streams_open`.
#[derive(Default)]
pub struct FleetStats {
    pub reflectors_started: AtomicU64,
    pub reflectors_gone: AtomicU64,
    /// Users on a reflector when its pod was deleted (not cut off): a real reflector's
    /// clients would have been disconnected. The operator should only delete empty ones.
    pub users_on_deleted: AtomicU64,
    pub streams_open: AtomicU64,
    pub stream_opens: AtomicU64,
    pub stream_failures: AtomicU64,
    pub reports_sent: AtomicU64,
    pub joins: AtomicU64,
    pub leaves: AtomicU64,
    /// Joins that took a shard past its hard cap (a real reflector would close them with 4105).
    pub joins_over_cap: AtomicU64,
    /// Joins whose token did not verify (unknown key, bad signature).
    pub bad_tokens: AtomicU64,
    /// Joins to a reflector that is gone or cut off.
    pub joins_to_lost: AtomicU64,
    pub drains: AtomicU64,
    pub hand_offs: AtomicU64,
}

/// Distinct shards that ever went over their hard cap.
#[derive(Default)]
pub struct OverCap(Mutex<BTreeMap<(String, String), OverCapShard>>);

/// A shard that took more users than its cap: where, when first, and by how much.
#[derive(Debug, Clone, Serialize)]
pub struct OverCapShard {
    pub app: String,
    pub shard: String,
    pub reflector: String,
    /// Seconds since the simulator started when its cap was first passed.
    pub first_at_s: f64,
    pub max_users: u32,
    pub peak: u32,
    pub joins_over: u32,
}

#[derive(Debug, Default)]
struct ShardSim {
    users: u32,
    joins: u32,
    leaves: u32,
    peak: u32,
    admitted: Vec<u64>,
    max_users: u32,
    empty_since: Option<tokio::time::Instant>,
}

/// One simulated reflector process.
pub struct SimReflector {
    pub name: String,
    pub region: String,
    token: String,
    capacity: Capacity,
    shards: Mutex<HashMap<(String, String), ShardSim>>,
    changed: Notify,
    draining: AtomicBool,
    /// Cut off (its node is NotReady): reports stop, users are disconnected.
    cut: AtomicBool,
    /// Flips to true when the reflector is gone (pod deleted) or cut off: its users reconnect.
    gone: watch::Sender<bool>,
    /// When its process started (its pod was Ready): a Route sent after this found it up.
    pub started: tokio::time::Instant,
}

impl SimReflector {
    /// A receiver that sees `true` once this reflector is gone.
    pub fn gone(&self) -> watch::Receiver<bool> {
        self.gone.subscribe()
    }

    fn report(&self, sequence: u64) -> ReflectorReport {
        let now = tokio::time::Instant::now();
        let mut shards = lock(&self.shards);
        shards.retain(|_, s| s.users > 0 || s.empty_since.is_none_or(|t| now - t < EMPTY_TTL));
        let loads = shards
            .iter_mut()
            .map(|((app, shard), s)| {
                let load = ShardLoad {
                    session_id: format!("sim-{app}-{shard}"),
                    shard: shard.clone(),
                    app_id: app.clone(),
                    users: s.users,
                    joins: s.joins,
                    leaves: s.leaves,
                    peak_users: s.peak.max(s.users),
                    messages_per_second: 0.0,
                    bytes_per_second: 0.0,
                    admitted_reservations: std::mem::take(&mut s.admitted),
                    max_users: s.max_users,
                };
                s.joins = 0;
                s.leaves = 0;
                s.peak = s.users;
                load
            })
            .collect();
        ReflectorReport {
            reflector: self.name.clone(),
            region: self.region.clone(),
            public_url: format!("ws://{}.sim/", self.name),
            state: if self.draining.load(Ordering::Relaxed) {
                ReflectorState::Draining
            } else {
                ReflectorState::Ready
            } as i32,
            capacity: Some(self.capacity),
            shards: loads,
            sequence,
            version: "sim".to_owned(),
            pool: String::new(),
            hand_offs: Vec::new(),
        }
    }
}

/// Every simulated reflector, and what they share: the token keys, the report endpoints.
pub struct Fleet {
    reflectors: Mutex<HashMap<String, Arc<SimReflector>>>,
    verifier: RwLock<Verifier>,
    /// The operators' report-stream addresses (`http://host:port`). Only the leader accepts
    /// streams; trying each in turn stands in for the Service that selects the leader pod.
    report_addrs: Vec<String>,
    leader_hint: AtomicUsize,
    pub stats: FleetStats,
    pub over_cap: OverCap,
    born: tokio::time::Instant,
}

/// Why a join did not happen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JoinError {
    /// The reflector is gone or cut off (the user reconnects through Route).
    Lost,
    /// The token did not verify.
    BadToken,
}

impl Fleet {
    pub fn new(report_addrs: Vec<String>) -> Arc<Self> {
        Arc::new(Self {
            reflectors: Mutex::new(HashMap::new()),
            verifier: RwLock::new(Verifier::default()),
            report_addrs,
            leader_hint: AtomicUsize::new(0),
            stats: FleetStats::default(),
            over_cap: OverCap::default(),
            born: tokio::time::Instant::now(),
        })
    }

    pub fn has(&self, pod: &str) -> bool {
        lock(&self.reflectors).contains_key(pod)
    }

    pub fn count(&self) -> usize {
        lock(&self.reflectors).len()
    }

    pub fn names(&self) -> Vec<String> {
        lock(&self.reflectors).keys().cloned().collect()
    }

    /// Starts a reflector for pod `name` with its report credential `token`.
    pub fn start(self: &Arc<Self>, name: &str, region: &str, token: String, capacity: Capacity) {
        let mut all = lock(&self.reflectors);
        if all.contains_key(name) {
            return;
        }
        let (gone, _) = watch::channel(false);
        let r = Arc::new(SimReflector {
            name: name.to_owned(),
            region: region.to_owned(),
            token,
            capacity,
            shards: Mutex::new(HashMap::new()),
            changed: Notify::new(),
            draining: AtomicBool::new(false),
            cut: AtomicBool::new(false),
            gone,
            started: tokio::time::Instant::now(),
        });
        all.insert(name.to_owned(), r.clone());
        drop(all);
        self.stats
            .reflectors_started
            .fetch_add(1, Ordering::Relaxed);
        tokio::spawn(self.clone().report_loop(r));
    }

    /// The pod is gone: its reflector stops, its users are disconnected.
    pub fn remove(&self, name: &str) {
        if let Some(r) = lock(&self.reflectors).remove(name) {
            r.gone.send_replace(true);
            self.stats.reflectors_gone.fetch_add(1, Ordering::Relaxed);
            if !r.cut.load(Ordering::Relaxed) {
                let users: u64 = lock(&r.shards).values().map(|s| u64::from(s.users)).sum();
                self.stats
                    .users_on_deleted
                    .fetch_add(users, Ordering::Relaxed);
            }
        }
    }

    /// The pod is being deleted: the reflector drains (reports Draining, keeps its users).
    pub fn drain(&self, name: &str) {
        if let Some(r) = lock(&self.reflectors).get(name)
            && !r.draining.swap(true, Ordering::Relaxed)
        {
            r.changed.notify_one();
        }
    }

    /// Cuts off every reflector of `region` (its nodes went NotReady): reports stop and the
    /// users are disconnected, as in a region outage.
    pub fn cut_region(&self, region: &str) -> usize {
        let all = lock(&self.reflectors);
        let mut n = 0;
        for r in all.values().filter(|r| r.region == region) {
            r.cut.store(true, Ordering::Relaxed);
            r.gone.send_replace(true);
            r.changed.notify_one();
            n += 1;
        }
        n
    }

    pub fn reflector(&self, name: &str) -> Option<Arc<SimReflector>> {
        lock(&self.reflectors).get(name).cloned()
    }

    /// A user joins shard `shard` of `app` on reflector `pod` with join token `token`. Returns
    /// the reflector (to watch for its end) on success.
    pub fn join(
        &self,
        pod: &str,
        app: &str,
        shard: &str,
        token: &str,
    ) -> Result<Arc<SimReflector>, JoinError> {
        let claims = {
            let v = self
                .verifier
                .read()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            v.verify(token)
        };
        let claims = match claims {
            Ok(c) if c.app_id == app && c.shard == shard => c,
            _ => {
                self.stats.bad_tokens.fetch_add(1, Ordering::Relaxed);
                return Err(JoinError::BadToken);
            }
        };
        let Some(r) = self.reflector(pod) else {
            self.stats.joins_to_lost.fetch_add(1, Ordering::Relaxed);
            return Err(JoinError::Lost);
        };
        if r.cut.load(Ordering::Relaxed) {
            self.stats.joins_to_lost.fetch_add(1, Ordering::Relaxed);
            return Err(JoinError::Lost);
        }
        {
            let mut shards = lock(&r.shards);
            let s = shards
                .entry((app.to_owned(), shard.to_owned()))
                .or_default();
            if claims.max_users > 0 {
                s.max_users = claims.max_users;
            }
            s.users += 1;
            s.joins += 1;
            s.peak = s.peak.max(s.users);
            s.empty_since = None;
            if claims.reservation_id != 0 {
                s.admitted.push(claims.reservation_id);
            }
            // Counted, not refused: the router must never send more than the cap.
            if s.max_users > 0 && s.users > s.max_users {
                self.stats.joins_over_cap.fetch_add(1, Ordering::Relaxed);
                let mut over = lock(&self.over_cap.0);
                let e = over
                    .entry((app.to_owned(), shard.to_owned()))
                    .or_insert_with(|| OverCapShard {
                        app: app.to_owned(),
                        shard: shard.to_owned(),
                        reflector: pod.to_owned(),
                        first_at_s: self.born.elapsed().as_secs_f64(),
                        max_users: s.max_users,
                        peak: 0,
                        joins_over: 0,
                    });
                e.peak = e.peak.max(s.users);
                e.joins_over += 1;
            }
        }
        self.stats.joins.fetch_add(1, Ordering::Relaxed);
        r.changed.notify_one();
        Ok(r)
    }

    /// A user leaves (a no-op when the reflector already ended).
    pub fn leave(&self, r: &SimReflector, app: &str, shard: &str) {
        if *r.gone.borrow() {
            return;
        }
        let mut shards = lock(&r.shards);
        if let Some(s) = shards.get_mut(&(app.to_owned(), shard.to_owned())) {
            s.users = s.users.saturating_sub(1);
            s.leaves += 1;
            if s.users == 0 {
                s.empty_since = Some(tokio::time::Instant::now());
            }
        }
        drop(shards);
        self.stats.leaves.fetch_add(1, Ordering::Relaxed);
        r.changed.notify_one();
    }

    pub fn over_cap_shards(&self) -> usize {
        lock(&self.over_cap.0).len()
    }

    /// Users per region on live reflectors, now.
    pub fn users_by_region(&self) -> HashMap<String, u64> {
        let mut out = HashMap::new();
        for r in lock(&self.reflectors).values() {
            let n: u64 = lock(&r.shards).values().map(|s| u64::from(s.users)).sum();
            *out.entry(r.region.clone()).or_default() += n;
        }
        out
    }

    /// The biggest shards (users) now: `(app, shard, users, max_users)`.
    pub fn shard_sizes(&self) -> Vec<(String, String, u32, u32)> {
        let mut out = Vec::new();
        for r in lock(&self.reflectors).values() {
            for ((app, shard), s) in lock(&r.shards).iter() {
                out.push((app.clone(), shard.clone(), s.users, s.max_users));
            }
        }
        out
    }

    fn apply(&self, r: &SimReflector, instruction: Instruction) {
        match instruction.kind {
            Some(Kind::TokenKeys(keys)) => {
                let mut v = Verifier::default();
                for k in keys.keys {
                    if let Err(error) = v.insert(&k.key_id, &k.public_key) {
                        tracing::warn!(%error, "bad token key from the operator");
                    }
                }
                *self
                    .verifier
                    .write()
                    .unwrap_or_else(std::sync::PoisonError::into_inner) = v;
            }
            Some(Kind::ShardSettings(s)) => {
                let mut shards = lock(&r.shards);
                for ((_, name), sim) in shards.iter_mut() {
                    if *name == s.shard {
                        sim.max_users = s.max_users;
                    }
                }
            }
            Some(Kind::Drain(_)) => {
                self.stats.drains.fetch_add(1, Ordering::Relaxed);
                r.draining.store(true, Ordering::Relaxed);
                r.changed.notify_one();
            }
            Some(Kind::HandOff(_) | Kind::Accept(_)) => {
                // Moves are off in the simulated pool; counted in case the planner asks.
                self.stats.hand_offs.fetch_add(1, Ordering::Relaxed);
            }
            None => {}
        }
    }

    /// Keeps `r`'s report stream open until it is gone. Stands in for the Service that
    /// selects the leader pod: each round tries every operator address, starting with the
    /// one that accepted last, and only a round in which none accepted backs off. (A shared
    /// hint flipped on each refusal, as before, sent half the retries to a dead replica after
    /// a failover, so the last of 550 streams took ~20 s to find the new leader, where a
    /// Service steers the next connection to it at once.)
    async fn report_loop(self: Arc<Self>, r: Arc<SimReflector>) {
        let mut gone = r.gone();
        let mut sequence = 0u64;
        // The reflector's own back-off, so the catch-up after a failover is what a real
        // fleet would see.
        let mut backoff = Backoff::new();
        let n = self.report_addrs.len().max(1);
        loop {
            let first = self.leader_hint.load(Ordering::Relaxed);
            let mut long_lived = false;
            for k in 0..n {
                if *gone.borrow() {
                    return;
                }
                let i = (first + k) % n;
                let started = tokio::time::Instant::now();
                let outcome = tokio::select! {
                    o = self.stream(&r, &self.report_addrs[i], &mut sequence) => o,
                    _ = gone.wait_for(|g| *g) => return,
                };
                self.stats.stream_failures.fetch_add(1, Ordering::Relaxed);
                if outcome.opened && !outcome.refused {
                    self.leader_hint.store(i, Ordering::Relaxed);
                    long_lived = started.elapsed() > Duration::from_secs(10);
                    // It was the leader; it ended the stream (lost the Lease, or died): the
                    // next round starts with the other replicas.
                    break;
                }
            }
            if long_lived {
                backoff.reset();
            }
            tokio::time::sleep(backoff.next_wait(rand::random::<f64>())).await;
        }
    }

    async fn stream(&self, r: &SimReflector, addr: &str, sequence: &mut u64) -> StreamOutcome {
        let mut outcome = StreamOutcome::default();
        let channel = match tonic::transport::Endpoint::from_shared(addr.to_owned()) {
            Ok(e) => e
                .connect_timeout(Duration::from_secs(3))
                .http2_keep_alive_interval(Duration::from_secs(10))
                .keep_alive_timeout(Duration::from_secs(5)),
            Err(_) => return outcome,
        };
        let Ok(channel) = channel.connect().await else {
            return outcome;
        };
        let (tx, rx) = mpsc::channel::<ReflectorReport>(4);
        let mut request = tonic::Request::new(tokio_stream::wrappers::ReceiverStream::new(rx));
        let Ok(value) = format!("Bearer {}", r.token).parse::<MetadataValue<_>>() else {
            return outcome;
        };
        request.metadata_mut().insert("authorization", value);
        *sequence += 1;
        if tx.send(r.report(*sequence)).await.is_err() {
            return outcome;
        }
        let mut inbound = match ReportsClient::new(channel).report(request).await {
            Ok(s) => s.into_inner(),
            Err(status) => {
                outcome.refused = true;
                tracing::debug!(reflector = %r.name, %status, "report stream refused");
                return outcome;
            }
        };
        outcome.opened = true;
        let _open = OpenGuard::new(&self.stats.streams_open);
        self.stats.stream_opens.fetch_add(1, Ordering::Relaxed);
        self.stats.reports_sent.fetch_add(1, Ordering::Relaxed);
        let mut last = tokio::time::Instant::now();
        loop {
            if r.cut.load(Ordering::Relaxed) {
                // Cut off: nothing more reaches the operator; it notices after its grace.
                std::future::pending::<()>().await;
            }
            tokio::select! {
                msg = inbound.message() => match msg {
                    Ok(Some(i)) => { self.apply(r, i); continue; }
                    Ok(None) | Err(_) => return outcome,
                },
                () = tokio::time::sleep_until(last + INTERVAL) => {}
                () = r.changed.notified() => {
                    tokio::time::sleep_until(last + MIN_GAP).await;
                }
            }
            if r.cut.load(Ordering::Relaxed) {
                continue;
            }
            *sequence += 1;
            if tx.send(r.report(*sequence)).await.is_err() {
                return outcome;
            }
            self.stats.reports_sent.fetch_add(1, Ordering::Relaxed);
            last = tokio::time::Instant::now();
        }
    }

    /// A snapshot of the counters.
    pub fn snapshot(&self) -> FleetSnapshot {
        let s = &self.stats;
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        FleetSnapshot {
            reflectors: self.count() as u64,
            reflectors_started: g(&s.reflectors_started),
            reflectors_gone: g(&s.reflectors_gone),
            users_on_deleted: g(&s.users_on_deleted),
            streams_open: g(&s.streams_open),
            stream_opens: g(&s.stream_opens),
            stream_failures: g(&s.stream_failures),
            reports_sent: g(&s.reports_sent),
            joins: g(&s.joins),
            leaves: g(&s.leaves),
            joins_over_cap: g(&s.joins_over_cap),
            shards_over_cap: self.over_cap_shards() as u64,
            over_cap: lock(&self.over_cap.0).values().take(20).cloned().collect(),
            bad_tokens: g(&s.bad_tokens),
            joins_to_lost: g(&s.joins_to_lost),
            drains: g(&s.drains),
            hand_offs: g(&s.hand_offs),
        }
    }
}

/// Counts an open stream for as long as it lives (also when its future is dropped).
struct OpenGuard<'a>(&'a AtomicU64);

impl<'a> OpenGuard<'a> {
    fn new(n: &'a AtomicU64) -> Self {
        n.fetch_add(1, Ordering::Relaxed);
        Self(n)
    }
}

impl Drop for OpenGuard<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

#[derive(Default)]
struct StreamOutcome {
    opened: bool,
    refused: bool,
}

/// The fleet's counters at one moment.
#[derive(Debug, Clone, Default, Serialize)]
pub struct FleetSnapshot {
    pub reflectors: u64,
    pub reflectors_started: u64,
    pub reflectors_gone: u64,
    pub users_on_deleted: u64,
    pub streams_open: u64,
    pub stream_opens: u64,
    pub stream_failures: u64,
    pub reports_sent: u64,
    pub joins: u64,
    pub leaves: u64,
    pub joins_over_cap: u64,
    pub shards_over_cap: u64,
    /// The first 20 shards over their cap.
    pub over_cap: Vec<OverCapShard>,
    pub bad_tokens: u64,
    pub joins_to_lost: u64,
    pub drains: u64,
    pub hand_offs: u64,
}
