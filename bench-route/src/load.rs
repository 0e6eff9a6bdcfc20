//! The three measurements: sustained lookups, a burst for one session, and the time from a
//! session passing its threshold to a new shard being routable.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use rand::SeedableRng;
use rand::rngs::SmallRng;
use rand_distr::Distribution;
use refleet_api::routing::routing_client::RoutingClient;
use refleet_api::routing::{ListShardsRequest, RouteRequest, ShardInfo};
use serde::Serialize;
use tokio::time::Instant;

use crate::stats::{Errors, Latency, Summary};
use crate::transport::Connection;

/// A Route client over one HTTP/2 connection.
pub type Client = RoutingClient<Connection>;

/// Opens `n` HTTP/2 (h2c) connections to the router at `url` (`http://host:port`).
pub async fn connect(url: &str, n: usize) -> anyhow::Result<Vec<Client>> {
    let origin: http::Uri = url.trim_end_matches('/').parse().context("router URL")?;
    let authority = origin
        .authority()
        .filter(|_| origin.scheme_str() == Some("http"))
        .with_context(|| format!("router URL {url}: expected http://host:port"))?
        .to_string();
    let mut out = Vec::with_capacity(n);
    for _ in 0..n.max(1) {
        let conn = Connection::open(&authority).await?;
        out.push(RoutingClient::with_origin(conn, origin.clone()));
    }
    Ok(out)
}

/// Which session the calls ask for.
#[derive(Debug, Clone, Serialize)]
pub struct Target {
    /// Namespace of the Session.
    pub namespace: String,
    /// Session name.
    pub session: String,
    /// Preferred region (empty: none).
    pub region: String,
}

impl Target {
    fn request(&self, user_id: String) -> RouteRequest {
        RouteRequest {
            namespace: self.namespace.clone(),
            session: self.session.clone(),
            preferred_region: self.region.clone(),
            user_id,
        }
    }

    /// The session's shards as the router lists them.
    pub async fn list(&self, client: &mut Client) -> Result<Vec<ShardInfo>, tonic::Status> {
        Ok(client
            .list_shards(ListShardsRequest {
                namespace: self.namespace.clone(),
                session: self.session.clone(),
            })
            .await?
            .into_inner()
            .shards)
    }
}

// === sustained rate ===

/// Settings of a sustained-rate run.
#[derive(Debug, Clone, Serialize)]
pub struct RateOptions {
    /// Offered calls per second, over all callers.
    pub rate: f64,
    /// Measured span.
    #[serde(with = "secs")]
    pub duration: Duration,
    /// Unmeasured span before it (same load).
    #[serde(with = "secs")]
    pub warmup: Duration,
    /// Concurrent callers (each on its own schedule), spread over the connections.
    pub concurrency: usize,
    /// Distinct user ids the calls cycle through (0: anonymous calls, each reserves a place).
    pub users: u64,
    /// When calls are sent.
    pub arrivals: Arrivals,
    /// Seed of the Poisson arrivals (the same seed gives the same schedule).
    pub seed: u64,
}

/// How a rate run spaces its calls.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Arrivals {
    /// Calls arrive as from many independent clients: exponential gaps at the offered rate,
    /// timed by a pacer thread. `--concurrency` caps the calls in flight; a call that finds
    /// the cap reached waits and shows up as send lag.
    Poisson,
    /// Calls arrive evenly spaced (1/rate apart), timed by a pacer thread; cap as for
    /// `poisson`.
    Even,
    /// `--concurrency` callers, each sleeping on Tokio's timer until its next slot. Tokio's
    /// timer ticks in whole milliseconds, so calls leave in clumps of rate/1000 at each tick:
    /// a harsher load than independent clients make (sessions 2 and 3 measured this way).
    Callers,
}

/// What a sustained-rate run measured.
#[derive(Debug, Clone, Serialize)]
pub struct RateReport {
    /// Offered calls per second.
    pub offered_per_s: f64,
    /// Calls answered per second in the measured span.
    pub achieved_per_s: f64,
    /// Calls in the measured span.
    pub calls: u64,
    /// Answered OK.
    pub ok: u64,
    /// Failed calls by code.
    pub errors: Errors,
    /// Answer time from the moment the call was sent.
    pub latency: Summary,
    /// Answer time from the moment the schedule wanted it sent (includes the bench's own lag).
    pub latency_from_schedule: Summary,
    /// How late calls were sent against their schedule (tokio timers tick in 1 ms).
    pub send_lag: Summary,
    /// Calls sent more than 5 ms late.
    pub late_sends: u64,
    /// OK answers per shard.
    pub shards: BTreeMap<String, u64>,
}

#[derive(Default)]
struct WorkerTally {
    latency: Latency,
    corrected: Latency,
    lag: Latency,
    late: u64,
    calls: u64,
    ok: u64,
    errors: Errors,
    shards: BTreeMap<String, u64>,
    last_done: Option<Instant>,
}

impl WorkerTally {
    fn merge(&mut self, t: Self) {
        self.latency.merge(&t.latency);
        self.corrected.merge(&t.corrected);
        self.lag.merge(&t.lag);
        self.late += t.late;
        self.calls += t.calls;
        self.ok += t.ok;
        self.errors.merge(&t.errors);
        for (k, v) in t.shards {
            *self.shards.entry(k).or_insert(0) += v;
        }
        self.last_done = self.last_done.max(t.last_done);
    }

    /// Counts one call scheduled at `sched`, sent at `sent`, answered at `done`.
    fn record(
        &mut self,
        sched: Instant,
        sent: Instant,
        done: Instant,
        result: Result<String, tonic::Status>,
    ) {
        self.calls += 1;
        self.latency.record(done - sent);
        self.corrected.record(done - sched);
        let lag = sent.saturating_duration_since(sched);
        self.lag.record(lag);
        if lag > Duration::from_millis(5) {
            self.late += 1;
        }
        self.last_done = Some(done);
        match result {
            Ok(shard) => {
                self.ok += 1;
                *self.shards.entry(shard).or_insert(0) += 1;
            }
            Err(s) => self.errors.add(&s),
        }
    }
}

/// Offers `rate` calls/s for `duration` after `warmup`, open loop: a slow answer does not
/// hold back later sends (except through the in-flight cap), and lateness shows up in
/// `send_lag` and in the latency from the schedule.
pub async fn rate(clients: &[Client], target: &Target, o: &RateOptions) -> RateReport {
    let start = Instant::now() + Duration::from_millis(100);
    let measure_from = start + o.warmup;
    let end = measure_from + o.duration;
    let window = Window {
        start,
        measure_from,
        end,
    };
    let run = Run {
        clients,
        target,
        o,
        window,
    };
    let all = match o.arrivals {
        Arrivals::Callers => rate_callers(run).await,
        Arrivals::Even | Arrivals::Poisson => rate_paced(run).await,
    };
    let span = all
        .last_done
        .map_or(o.duration, |d| d.saturating_duration_since(measure_from))
        .max(o.duration);
    RateReport {
        offered_per_s: o.rate,
        achieved_per_s: all.calls as f64 / span.as_secs_f64(),
        calls: all.calls,
        ok: all.ok,
        errors: all.errors,
        latency: all.latency.summary(),
        latency_from_schedule: all.corrected.summary(),
        send_lag: all.lag.summary(),
        late_sends: all.late,
        shards: all.shards,
    }
}

/// A rate run's span: calls from `start`, measured from `measure_from`, none due at `end`.
#[derive(Clone, Copy)]
struct Window {
    start: Instant,
    measure_from: Instant,
    end: Instant,
}

/// What a rate run drives, and when.
#[derive(Clone, Copy)]
struct Run<'a> {
    clients: &'a [Client],
    target: &'a Target,
    o: &'a RateOptions,
    window: Window,
}

fn user_id(users: u64, k: u64) -> String {
    if users > 0 {
        format!("user-{}", k % users)
    } else {
        String::new()
    }
}

/// A pacer thread decides when each call is due (Tokio's timer cannot: it ticks in
/// milliseconds) and hands the slots to one task that keeps up to `concurrency` calls in
/// flight.
async fn rate_paced(run: Run<'_>) -> WorkerTally {
    let (clients, target, o, w) = (run.clients, run.target, run.o, run.window);
    let (start, measure_from, end) = (w.start, w.measure_from, w.end);
    let (tx, mut slots) = tokio::sync::mpsc::unbounded_channel::<(u64, Instant)>();
    let schedule = Schedule::new(o.arrivals, o.rate, o.seed);
    let (start_std, end_std) = (start.into_std(), end.into_std());
    let pacer = std::thread::Builder::new()
        .name("pacer".into())
        .spawn(move || schedule.run(start_std, end_std, &tx));
    let mut all = WorkerTally::default();
    if pacer.is_err() {
        all.errors
            .add(&tonic::Status::internal("could not start the pacer thread"));
        return all;
    }
    let cap = o.concurrency.max(1);
    let call = |(k, sched): (u64, Instant)| {
        let mut client = clients[(k % clients.len() as u64) as usize].clone();
        let request = target.request(user_id(o.users, k));
        async move {
            let sent = Instant::now();
            let result = client.route(request).await;
            (
                sched,
                sent,
                Instant::now(),
                result.map(|r| r.into_inner().shard),
            )
        }
    };
    let mut in_flight = FuturesUnordered::new();
    let mut waiting = VecDeque::new();
    let mut pacing = true;
    while pacing || !in_flight.is_empty() {
        tokio::select! {
            Some((sched, sent, done, result)) = in_flight.next(), if !in_flight.is_empty() => {
                if sched >= measure_from {
                    all.record(sched, sent, done, result);
                }
                if let Some(slot) = waiting.pop_front() {
                    in_flight.push(call(slot));
                }
            }
            slot = slots.recv(), if pacing => match slot {
                Some(slot) if in_flight.len() < cap => in_flight.push(call(slot)),
                Some(slot) => waiting.push_back(slot),
                None => pacing = false,
            },
        }
    }
    all
}

/// When the calls of a paced run are due.
struct Schedule {
    /// Even gaps: this one. Poisson: the mean of `exp`.
    mean: Duration,
    /// Exponential gaps at the rate, for Poisson arrivals.
    exp: Option<rand_distr::Exp<f64>>,
    rng: SmallRng,
}

impl Schedule {
    fn new(arrivals: Arrivals, rate: f64, seed: u64) -> Self {
        let rate = rate.max(0.001);
        Self {
            mean: Duration::from_secs_f64(1.0 / rate),
            exp: match arrivals {
                Arrivals::Poisson => rand_distr::Exp::new(rate).ok(),
                Arrivals::Even | Arrivals::Callers => None,
            },
            rng: SmallRng::seed_from_u64(seed),
        }
    }

    /// Time to the next call.
    fn gap(&mut self) -> Duration {
        self.exp.map_or(self.mean, |exp| {
            Duration::from_secs_f64(exp.sample(&mut self.rng))
        })
    }

    /// Sends each call's (number, due time) on `tx` when it is due, from `start` to `end`.
    /// A late wake-up sends every call that came due meanwhile, each with its own due time.
    fn run(
        mut self,
        start: std::time::Instant,
        end: std::time::Instant,
        tx: &tokio::sync::mpsc::UnboundedSender<(u64, Instant)>,
    ) {
        let mut next = start;
        let mut k = 0u64;
        while next < end {
            let now = std::time::Instant::now();
            if next > now {
                std::thread::sleep(next - now);
            }
            let now = std::time::Instant::now();
            while next <= now && next < end {
                if tx.send((k, Instant::from_std(next))).is_err() {
                    return;
                }
                k += 1;
                next += self.gap();
            }
        }
    }
}

/// `concurrency` callers, each on a fixed schedule of its own, sleeping on Tokio's timer.
async fn rate_callers(run: Run<'_>) -> WorkerTally {
    let (clients, target, o, w) = (run.clients, run.target, run.o, run.window);
    let (start, measure_from, end) = (w.start, w.measure_from, w.end);
    let conc = o.concurrency.max(1);
    let interval = Duration::from_secs_f64(conc as f64 / o.rate.max(0.001));
    let target = Arc::new(target.clone());
    let mut tasks = Vec::with_capacity(conc);
    for w in 0..conc {
        let mut client = clients[w % clients.len()].clone();
        let target = target.clone();
        let offset = interval.mul_f64(w as f64 / conc as f64);
        let users = o.users;
        tasks.push(tokio::spawn(async move {
            let mut t = WorkerTally::default();
            let mut k: u64 = 0;
            loop {
                let sched = start + offset + interval.mul_f64(k as f64);
                if sched >= end {
                    break;
                }
                tokio::time::sleep_until(sched).await;
                let user = user_id(users, w as u64 + k * conc as u64);
                let sent = Instant::now();
                let result = client.route(target.request(user)).await;
                let done = Instant::now();
                k += 1;
                if sched >= measure_from {
                    t.record(sched, sent, done, result.map(|r| r.into_inner().shard));
                }
            }
            t
        }));
    }
    let mut all = WorkerTally::default();
    for task in tasks {
        if let Ok(t) = task.await {
            all.merge(t);
        }
    }
    all
}

// === burst ===

/// What a burst should end with.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Expect {
    /// Number of shards the session has afterwards.
    pub shards: Option<u32>,
    /// Reservations on every shard.
    pub per_shard: Option<u32>,
}

/// A shard as ListShards showed it after a burst.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct ShardRow {
    /// Shard name.
    pub shard: String,
    /// Reflector.
    pub reflector: String,
    /// Users reported.
    pub users: u32,
    /// Pending reservations.
    pub reserved: u32,
    /// Cap.
    pub max_users: u32,
    /// Phase.
    pub state: String,
}

/// What a burst measured.
#[derive(Debug, Clone, Serialize)]
pub struct BurstReport {
    /// Calls released at once.
    pub calls: u64,
    /// Answered OK.
    pub ok: u64,
    /// Failed calls by code.
    pub errors: Errors,
    /// Time from the release to each answer.
    pub latency: Summary,
    /// Release to the last answer, ms.
    pub wall_ms: f64,
    /// OK answers per shard.
    pub answers: BTreeMap<String, u64>,
    /// ListShards afterwards.
    pub listed: Vec<ShardRow>,
    /// Whether the result matched `Expect` (and no shard went over its cap).
    pub problems: Vec<String>,
}

/// Releases `calls` Route calls for one session at the same instant (all are in flight
/// before the release), then lists the session's shards and checks them.
pub async fn burst(
    clients: &[Client],
    target: &Target,
    calls: usize,
    expect: Expect,
) -> anyhow::Result<BurstReport> {
    // Every call is built first and sent at its first poll, all driven by this one task:
    // no task per call to spawn, park on a barrier and wake at the release.
    let mut in_flight: FuturesUnordered<_> = (0..calls)
        .map(|i| {
            let mut client = clients[i % clients.len()].clone();
            let request = target.request(String::new());
            async move {
                let result = client.route(request).await;
                (result.map(|r| r.into_inner().shard), Instant::now())
            }
        })
        .collect();
    let t0 = Instant::now();
    let mut latency = Latency::new();
    let mut errors = Errors::default();
    let mut answers = BTreeMap::new();
    let mut ok = 0;
    while let Some((result, done)) = in_flight.next().await {
        latency.record(done - t0);
        match result {
            Ok(shard) => {
                ok += 1;
                *answers.entry(shard).or_insert(0) += 1;
            }
            Err(s) => errors.add(&s),
        }
    }
    let wall_ms = t0.elapsed().as_secs_f64() * 1000.0;
    let mut client = clients[0].clone();
    let listed = target
        .list(&mut client)
        .await
        .context("ListShards after the burst")?;
    let mut problems = check_shards(&listed, &answers, expect);
    if errors.total() > 0 {
        problems.push(format!("{} calls failed: {errors}", errors.total()));
    }
    Ok(BurstReport {
        calls: calls as u64,
        ok,
        errors,
        latency: latency.summary(),
        wall_ms,
        answers,
        listed: listed
            .iter()
            .map(|s| ShardRow {
                shard: s.shard.clone(),
                reflector: s.reflector.clone(),
                users: s.users,
                reserved: s.reserved,
                max_users: s.max_users,
                state: s.state.clone(),
            })
            .collect(),
        problems,
    })
}

/// Compares the shards listed after a burst with the answers and the expectation. Returns
/// every mismatch (empty: all good).
pub fn check_shards(
    listed: &[ShardInfo],
    answers: &BTreeMap<String, u64>,
    expect: Expect,
) -> Vec<String> {
    let mut problems = Vec::new();
    // Once every shard is at its threshold the planner opens one more, empty, ahead of
    // demand (its scale-out rule); at most one such standby shard is expected.
    let (holding, standby): (Vec<&ShardInfo>, Vec<&ShardInfo>) =
        listed.iter().partition(|s| s.users + s.reserved > 0);
    if let Some(n) = expect.shards
        && holding.len() != n as usize
    {
        problems.push(format!(
            "{} shards hold clients, expected {n}",
            holding.len()
        ));
    }
    if standby.len() > 1 {
        problems.push(format!(
            "{} empty shards listed, expected at most one standby",
            standby.len()
        ));
    }
    for s in listed {
        let load = s.users + s.reserved;
        if load > s.max_users {
            problems.push(format!(
                "shard {}: {} users + {} reserved is over its cap {}",
                s.shard, s.users, s.reserved, s.max_users
            ));
        }
        if let Some(p) = expect.per_shard
            && s.users + s.reserved > 0
            && s.reserved != p
        {
            problems.push(format!(
                "shard {}: {} reserved, expected {p}",
                s.shard, s.reserved
            ));
        }
        let answered = answers.get(&s.shard).copied().unwrap_or(0);
        if answered != u64::from(s.reserved) {
            problems.push(format!(
                "shard {}: {answered} answers sent clients there but it lists {} reserved",
                s.shard, s.reserved
            ));
        }
    }
    let names: BTreeSet<&str> = listed.iter().map(|s| s.shard.as_str()).collect();
    for (shard, n) in answers {
        if !names.contains(shard.as_str()) {
            problems.push(format!(
                "{n} answers name shard {shard}, which ListShards does not list"
            ));
        }
    }
    problems
}

// === time to a new shard ===

/// One threshold crossing.
#[derive(Debug, Clone, Serialize)]
pub struct OpenSample {
    /// Shards before.
    pub shards_before: usize,
    /// Calls made to fill the open shards to their threshold first.
    pub fill_calls: u64,
    /// The shard the timed call got.
    pub shard: String,
    /// Whether that shard is new (it must be).
    pub new_shard: bool,
    /// The timed call's answer time, ms.
    pub ms: f64,
    /// The timed call's error, if any.
    pub error: Option<String>,
}

/// What the time-to-new-shard run measured.
#[derive(Debug, Clone, Serialize)]
pub struct OpenReport {
    /// Every crossing.
    pub samples: Vec<OpenSample>,
    /// Over the timed calls.
    pub latency: Summary,
    /// Over the fill calls (ordinary Routes on the same connection, for comparison).
    pub fill_latency: Summary,
    /// What went wrong.
    pub problems: Vec<String>,
}

/// `samples` times: fills every open shard of the session to its threshold (sequential
/// Routes, reading the room from ListShards), then times the next Route, the one that
/// finds no room and waits for the router to open a shard.
pub async fn open_time(
    client: &Client,
    target: &Target,
    samples: usize,
) -> anyhow::Result<OpenReport> {
    let mut client = client.clone();
    let mut out = Vec::new();
    let mut latency = Latency::new();
    let mut fill_latency = Latency::new();
    let mut problems = Vec::new();
    for i in 0..samples {
        let before = target.list(&mut client).await.context("ListShards")?;
        let fill: u64 = before
            .iter()
            .filter(|s| s.state == "Open")
            .map(|s| u64::from(s.threshold_users.saturating_sub(s.users + s.reserved)))
            .sum();
        let names: BTreeSet<String> = before.iter().map(|s| s.shard.clone()).collect();
        for _ in 0..fill {
            let t = Instant::now();
            let result = client.route(target.request(String::new())).await;
            fill_latency.record(t.elapsed());
            match result {
                Ok(r) if names.contains(&r.get_ref().shard) => {}
                Ok(r) => problems.push(format!(
                    "sample {i}: a fill call already got a new shard {}",
                    r.get_ref().shard
                )),
                Err(s) => problems.push(format!("sample {i}: a fill call failed: {s}")),
            }
        }
        let t = Instant::now();
        let result = client.route(target.request(String::new())).await;
        let took = t.elapsed();
        latency.record(took);
        let (shard, error) = match result {
            Ok(r) => (r.into_inner().shard, None),
            Err(s) => (
                String::new(),
                Some(format!(
                    "{}: {}",
                    crate::stats::code_name(s.code()),
                    s.message()
                )),
            ),
        };
        let new_shard = !shard.is_empty() && !names.contains(&shard);
        if let Some(e) = &error {
            problems.push(format!("sample {i}: the timed call failed: {e}"));
        } else if !new_shard {
            problems.push(format!(
                "sample {i}: the timed call got existing shard {shard}, not a new one"
            ));
        }
        out.push(OpenSample {
            shards_before: before.len(),
            fill_calls: fill,
            shard,
            new_shard,
            ms: took.as_secs_f64() * 1000.0,
            error,
        });
    }
    Ok(OpenReport {
        samples: out,
        latency: latency.summary(),
        fill_latency: fill_latency.summary(),
        problems,
    })
}

mod secs {
    use std::time::Duration;

    pub fn serialize<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_f64(d.as_secs_f64())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn even_gaps_are_exact_and_poisson_gaps_average_to_the_rate() {
        let mut even = Schedule::new(Arrivals::Even, 20_000.0, 1);
        assert_eq!(even.gap(), Duration::from_micros(50));

        let n = 200_000;
        let mut poisson = Schedule::new(Arrivals::Poisson, 20_000.0, 1);
        let gaps: Vec<f64> = (0..n).map(|_| poisson.gap().as_secs_f64()).collect();
        let mean = gaps.iter().sum::<f64>() / f64::from(n);
        assert!((mean * 1e6 - 50.0).abs() < 1.0, "mean gap {mean}");
        // Exponential: about 1 - 1/e of the gaps are shorter than the mean.
        let short = gaps.iter().filter(|g| **g < 50e-6).count() as f64 / f64::from(n);
        assert!((short - 0.632).abs() < 0.01, "{short}");
        // The same seed, the same schedule.
        let mut again = Schedule::new(Arrivals::Poisson, 20_000.0, 1);
        assert_eq!(again.gap().as_secs_f64(), gaps[0]);
    }

    fn info(name: &str, reserved: u32) -> ShardInfo {
        ShardInfo {
            shard: name.into(),
            reserved,
            max_users: 100,
            threshold_users: 80,
            state: "Full".into(),
            ..ShardInfo::default()
        }
    }

    #[test]
    fn a_right_burst_passes_and_wrong_totals_are_named() {
        let listed = vec![info("s", 80), info("s~1", 80)];
        let answers = BTreeMap::from([("s".to_owned(), 80), ("s~1".to_owned(), 80)]);
        let expect = Expect {
            shards: Some(2),
            per_shard: Some(80),
        };
        assert!(check_shards(&listed, &answers, expect).is_empty());

        // One shard too many.
        let p = check_shards(
            &listed,
            &answers,
            Expect {
                shards: Some(3),
                ..expect
            },
        );
        assert_eq!(p, vec!["2 shards hold clients, expected 3".to_owned()]);

        // One empty standby shard is fine; two are not.
        let mut with_standby = listed.clone();
        with_standby.push(info("s~2", 0));
        assert!(check_shards(&with_standby, &answers, expect).is_empty());
        with_standby.push(info("s~3", 0));
        let p = check_shards(&with_standby, &answers, expect);
        assert_eq!(
            p,
            vec!["2 empty shards listed, expected at most one standby".to_owned()]
        );

        // A shard with 81 reservations, and answers that do not match the listing.
        let listed = vec![info("s", 81), info("s~1", 79)];
        let p = check_shards(&listed, &answers, expect);
        assert_eq!(p.len(), 4, "{p:?}");
        assert!(p.iter().any(|m| m.contains("s: 81 reserved, expected 80")));

        // Over the cap, and an answer naming an unlisted shard.
        let listed = vec![info("s", 101)];
        let answers = BTreeMap::from([("s".to_owned(), 101), ("x".to_owned(), 1)]);
        let p = check_shards(&listed, &answers, Expect::default());
        assert!(p.iter().any(|m| m.contains("over its cap")), "{p:?}");
        assert!(p.iter().any(|m| m.contains("does not list")), "{p:?}");
    }
}
