//! The fleet as `GET /v1/status` returns it, and as the fleet view shows it: one data
//! structure for both backends. `refleet up` builds it from its own fleet loop
//! ([`crate::local::fleet::Fleet::status`]); the operator from what its router knows
//! ([`from_router`]), since a replica's router holds every published plan and every report.

use std::collections::{BTreeMap, HashMap};

use serde::Serialize;

use crate::crd::ShardPhase;
use crate::router::snapshot::FleetSnapshot;
use refleet_core::planner::{ReflectorState, Seconds, ShardRecord, split_session_key};

/// The fleet as `GET /v1/status` returns it.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Status {
    /// The files base URL of the (first) pool.
    pub files_url: Option<String>,
    /// Each region's gateway (pools with `gateway.enabled`): the URL clients join.
    pub gateways: Vec<GatewayView>,
    /// Every region of every pool, with its reflectors.
    pub regions: Vec<RegionView>,
    /// Every shard with its placement.
    pub shards: Vec<ShardView>,
    /// The most recent planner decisions, oldest first.
    pub decisions: Vec<DecisionView>,
}

/// One region's gateway.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct GatewayView {
    /// Region name.
    pub region: String,
    /// Its base URL (`http://127.0.0.1:PORT/`); Route answers it followed by the token.
    pub url: String,
}

/// One region.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RegionView {
    /// Pool id (`namespace/name`).
    pub pool: String,
    /// Region name.
    pub name: String,
    /// Reflectors accepting shards the planner wants.
    pub desired: u32,
    /// Its reflectors.
    pub reflectors: Vec<ReflectorView>,
}

/// One reflector.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ReflectorView {
    /// Name (`local-a-1`).
    pub name: String,
    /// `Starting`, `Ready` or `Draining`.
    pub state: &'static str,
    /// Its process id, while it runs.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pid: Option<u32>,
    /// CPU it used since the previous tick, in percent of one core (`refleet up` only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cpu_percent: Option<f64>,
    /// Its resident memory in bytes (`refleet up` only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rss_bytes: Option<u64>,
    /// The box URL clients join (`http://127.0.0.1:PORT/`), once ready.
    pub url: Option<String>,
    /// The pool's files base URL.
    pub files_url: String,
    /// Users connected to it.
    pub users: u32,
    /// Shards placed on it.
    pub shards: Vec<String>,
}

/// One shard.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ShardView {
    /// Namespace of its Session.
    pub namespace: String,
    /// Name of its Session object.
    pub session: String,
    /// appId.
    pub app_id: String,
    /// The Croquet session name (shard 0's name).
    pub session_name: String,
    /// Shard name: what clients pass as `name` to `Session.join`.
    pub name: String,
    /// Shard number.
    pub index: u32,
    /// Region.
    pub region: String,
    /// Reflector hosting it (`None` while pending).
    pub reflector: Option<String>,
    /// Box URL of that reflector.
    pub url: Option<String>,
    /// The files base URL.
    pub files_url: Option<String>,
    /// Connected users.
    pub users: u32,
    /// The Session's hard cap of users per shard (`maxUsersPerShard`).
    pub max_users: u32,
    /// Users at which the shard stops taking new ones (`scaleUpThreshold` × the cap).
    pub threshold_users: u32,
    /// `Pending`, `Open`, `Full` or `Closing`.
    pub phase: ShardPhase,
}

/// A planner decision, for the status.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct DecisionView {
    /// When (seconds since refleet up started).
    pub at: Seconds,
    /// The decision and its reason.
    pub decision: String,
}

/// The name a reflector state has in the status.
pub fn state_name(s: ReflectorState) -> &'static str {
    match s {
        ReflectorState::Starting => "Starting",
        ReflectorState::Ready => "Ready",
        ReflectorState::Draining => "Draining",
    }
}

/// Users at which a shard of cap `max_users` stops taking new ones.
pub fn threshold_users(max_users: u32, threshold: f64) -> u32 {
    u32::try_from(crate::router::pick::threshold_load(max_users, threshold)).unwrap_or(u32::MAX)
}

/// The status from what the operator's router knows: every published pool's regions and
/// reflectors, every shard with the users its reflectors report now. A reflector that
/// reports draining shows as `Draining` before the next plan says so. `desired` is not the
/// router's to know: it shows the reflectors that take shards (neither draining nor gone).
/// No pids and no planner decisions (those stay in the controllers' events).
pub fn from_router(snap: &FleetSnapshot) -> Status {
    // Grouped once: looking each reflector's shards up among all of them was quadratic, a
    // quarter of the leader at ~3 000 reflectors and ~70 000 shards (run G4, docs/scale.md).
    let mut on: HashMap<&str, Vec<&ShardRecord>> = HashMap::new();
    for s in &snap.shards {
        if let Some(r) = s.reflector.as_deref() {
            on.entry(r).or_default().push(s);
        }
    }
    let mut regions = Vec::new();
    for pool in &snap.pools {
        let files_url = snap
            .defs
            .iter()
            .find(|d| d.pool == pool.id)
            .map(|d| d.files_url.clone())
            .unwrap_or_default();
        for region in &pool.regions {
            let reflectors: Vec<ReflectorView> = snap
                .reflectors
                .iter()
                .filter(|r| r.pool == pool.id && r.region == region.name)
                .map(|r| {
                    let reported = snap.reported.get(&r.name);
                    let state = if reported.is_some_and(|l| l.draining) {
                        ReflectorState::Draining
                    } else {
                        r.state
                    };
                    let hosted = on.get(r.name.as_str()).map_or(&[][..], Vec::as_slice);
                    ReflectorView {
                        name: r.name.clone(),
                        state: state_name(state),
                        pid: None,
                        cpu_percent: None,
                        rss_bytes: None,
                        url: snap.urls.get(&r.name).cloned(),
                        files_url: files_url.clone(),
                        users: reported
                            .map_or_else(|| hosted.iter().map(|s| s.users).sum(), |l| l.users),
                        shards: hosted.iter().map(|s| s.name.clone()).collect(),
                    }
                })
                .collect();
            regions.push(RegionView {
                pool: pool.id.clone(),
                name: region.name.clone(),
                desired: reflectors
                    .iter()
                    .filter(|r| r.state != "Draining")
                    .count()
                    .try_into()
                    .unwrap_or(u32::MAX),
                reflectors,
            });
        }
    }
    let sessions: BTreeMap<&str, _> = snap.sessions.iter().map(|s| (s.key.as_str(), s)).collect();
    let shards = snap
        .shards
        .iter()
        .map(|sh| {
            let (namespace, app_id, name) = split_session_key(&sh.session).unwrap_or_default();
            let input = sessions.get(sh.session.as_str());
            let (max_users, threshold) = input.map_or((0, 0), |s| {
                let p = &s.policy;
                (
                    p.max_users_per_shard,
                    threshold_users(p.max_users_per_shard, p.scale_up_threshold),
                )
            });
            ShardView {
                namespace: namespace.to_owned(),
                session: name.to_owned(),
                app_id: app_id.to_owned(),
                session_name: input.map_or_else(|| name.to_owned(), |s| s.name.clone()),
                name: sh.name.clone(),
                index: sh.index,
                region: sh.region.clone(),
                reflector: sh.reflector.clone(),
                url: sh
                    .reflector
                    .as_ref()
                    .and_then(|r| snap.urls.get(r))
                    .cloned(),
                files_url: snap
                    .defs
                    .iter()
                    .find(|d| d.pool == sh.pool)
                    .map(|d| d.files_url.clone()),
                users: sh.users,
                max_users,
                threshold_users: threshold,
                phase: sh.phase,
            }
        })
        .collect();
    let mut gateways: Vec<GatewayView> = snap
        .gateways
        .iter()
        .map(|(region, url)| GatewayView {
            region: region.clone(),
            url: url.clone(),
        })
        .collect();
    gateways.sort_by(|a, b| a.region.cmp(&b.region));
    Status {
        files_url: snap.defs.first().map(|d| d.files_url.clone()),
        gateways,
        regions,
        shards,
        decisions: Vec::new(),
    }
}

/// One region `a` with one Ready reflector `a-1` holding `users` users and listing
/// `shards`: the status the view's unit tests start from.
#[cfg(test)]
pub(crate) fn one_reflector(users: u32, shards: &[&str]) -> Status {
    Status {
        regions: vec![RegionView {
            pool: "default/p".into(),
            name: "a".into(),
            desired: 1,
            reflectors: vec![ReflectorView {
                name: "a-1".into(),
                state: "Ready",
                pid: None,
                cpu_percent: None,
                rss_bytes: None,
                url: None,
                files_url: String::new(),
                users,
                shards: shards.iter().map(|s| (*s).to_owned()).collect(),
            }],
        }],
        ..Status::default()
    }
}
