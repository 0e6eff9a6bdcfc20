//! The three measurements: sustained lookups, a burst for one session, and the time from a
//! session passing its threshold to a new shard being routable.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use refleet_api::routing::routing_client::RoutingClient;
use refleet_api::routing::{ListShardsRequest, RouteRequest, ShardInfo};
use serde::Serialize;
use tokio::time::Instant;
use tonic::transport::{Channel, Endpoint};

use crate::stats::{Errors, Latency, Summary};

/// A Route client over one HTTP/2 connection.
pub type Client = RoutingClient<Channel>;

/// Opens `n` HTTP/2 (h2c) connections to the router at `url`.
pub async fn connect(url: &str, n: usize) -> anyhow::Result<Vec<Client>> {
    let mut out = Vec::with_capacity(n);
    for _ in 0..n.max(1) {
        let channel = Endpoint::from_shared(url.trim_end_matches('/').to_owned())
            .context("router URL")?
            .tcp_nodelay(true)
            .connect_timeout(Duration::from_secs(5))
            .connect()
            .await
            .with_context(|| format!("connecting to the router at {url}"))?;
        out.push(RoutingClient::new(channel));
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

/// Offers `rate` calls/s from `concurrency` callers, each on a fixed schedule (open loop:
/// a slow answer delays only its own caller's next call, and shows up in `send_lag`).
pub async fn rate(clients: &[Client], target: &Target, o: &RateOptions) -> RateReport {
    let conc = o.concurrency.max(1);
    let interval = Duration::from_secs_f64(conc as f64 / o.rate.max(0.001));
    let start = Instant::now() + Duration::from_millis(100);
    let measure_from = start + o.warmup;
    let end = measure_from + o.duration;
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
                let user = if users > 0 {
                    format!("user-{}", (w as u64 + k * conc as u64) % users)
                } else {
                    String::new()
                };
                let sent = Instant::now();
                let result = client.route(target.request(user)).await;
                let done = Instant::now();
                k += 1;
                if sched < measure_from {
                    continue;
                }
                t.calls += 1;
                t.latency.record(done - sent);
                t.corrected.record(done - sched);
                let lag = sent.saturating_duration_since(sched);
                t.lag.record(lag);
                if lag > Duration::from_millis(5) {
                    t.late += 1;
                }
                t.last_done = Some(done);
                match result {
                    Ok(r) => {
                        t.ok += 1;
                        *t.shards.entry(r.into_inner().shard).or_insert(0) += 1;
                    }
                    Err(s) => t.errors.add(&s),
                }
            }
            t
        }));
    }
    let mut all = WorkerTally::default();
    for task in tasks {
        let Ok(t) = task.await else { continue };
        all.latency.merge(&t.latency);
        all.corrected.merge(&t.corrected);
        all.lag.merge(&t.lag);
        all.late += t.late;
        all.calls += t.calls;
        all.ok += t.ok;
        all.errors.merge(&t.errors);
        for (k, v) in t.shards {
            *all.shards.entry(k).or_insert(0) += v;
        }
        all.last_done = all.last_done.max(t.last_done);
    }
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
    let barrier = Arc::new(tokio::sync::Barrier::new(calls + 1));
    let (go_tx, go_rx) = tokio::sync::watch::channel(None::<Instant>);
    let target = Arc::new(target.clone());
    let mut tasks = Vec::with_capacity(calls);
    for i in 0..calls {
        let mut client = clients[i % clients.len()].clone();
        let target = target.clone();
        let barrier = barrier.clone();
        let mut go = go_rx.clone();
        tasks.push(tokio::spawn(async move {
            let req = target.request(String::new());
            barrier.wait().await;
            let t0 = loop {
                if let Some(t0) = *go.borrow_and_update() {
                    break t0;
                }
                if go.changed().await.is_err() {
                    return None;
                }
            };
            let result = client.route(req).await;
            Some((result.map(|r| r.into_inner().shard), Instant::now() - t0))
        }));
    }
    barrier.wait().await;
    let t0 = Instant::now();
    let _ = go_tx.send(Some(t0));
    let mut latency = Latency::new();
    let mut errors = Errors::default();
    let mut answers = BTreeMap::new();
    let mut ok = 0;
    for task in tasks {
        let Ok(Some((result, took))) = task.await else {
            continue;
        };
        latency.record(took);
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
