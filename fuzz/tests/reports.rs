//! Fuzz target `reports`: the `refleet.report.v1` stream as the operator's router receives
//! it. Each input is one stream: an identity from the credential (or none: an open stream),
//! then up to six `ReflectorReport`s, each decoded with prost from arbitrary or damaged
//! bytes or generated field by field, handled exactly as `ReportHub::report` handles them:
//! `reports::StreamState::take` (the identity check, the sequence check,
//! `Router::observe_report` and the shard settings to send), then `Router::live_streams` and
//! `Router::shard_settings` for every reported shard.
//!
//! Also target `shard_names`: the operator's shard and session-key names
//! (`refleet_core::shard::shard_name` / `parse_shard_name`, `planner::session_key` /
//! `planner::split_session_key`).
//!
//! Properties (reports): no panic (including from overflow in a debug build); prost
//! round-trips every generated report; a report without a reflector is refused with
//! INVALID_ARGUMENT; any other refusal is PERMISSION_DENIED with one of the documented
//! reasons; a stream accepts only reports for the reflector and region its credential names,
//! and an open stream binds to its first report's reflector only in a region of a published
//! pool, then holds to it; shard settings of a published shard are its Session's.
//! Properties (names): `parse_shard_name(shard_name(n, i)) == (n, i)` for session names
//! without `~`; what `parse_shard_name` accepts is the canonical spelling
//! (`shard_name(parse_shard_name(s)) == s`); session keys split back into their parts.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::sync::Arc;

use prost::Message as _;
use refleet_api::report::{Capacity as ReportCapacity, HandOffResult, ReflectorReport, ShardLoad};
use refleet_api::report_credential::ReflectorIdentity;
use refleet_core::planner::{
    ObservedReflector, PlanInput, PoolInput, ReflectorState, RegionInput, ShardRecord, session_key,
    split_session_key,
};
use refleet_core::shard::{parse_shard_name, shard_name};
use refleet_fuzz::{Arbitrary, Unstructured, mutate, word};
use refleet_operator::crd::{Capacity, PlacementStrategy, SessionSpec, ShardPhase};
use refleet_operator::router::metrics::RouterMetrics;
use refleet_operator::router::reports::{StreamState, Taken};
use refleet_operator::router::{FleetView, Router, RouterConfig, SessionDef};

type R<T> = arbitrary::Result<T>;

const POOL: &str = "default/pool";
const REFLECTORS: &[&str] = &["r-eu", "r-us", "", "r-eu.x", "other"];
const REGIONS: &[&str] = &["eu", "us", "", "mars"];
const APPS: &[&str] = &["app", "other", ""];
const SHARDS: &[&str] = &["lobby", "lobby~1", "lobby~2", "arena", "", "x"];
const REASONS: &[&str] = &["other_reflector", "wrong_region", "unknown_region"];

fn session(name: &str, cap: u32, persistence: bool) -> SessionDef {
    let spec: SessionSpec = serde_json::from_value(serde_json::json!({
        "poolRef": {"name": "pool"}, "appId": "app", "name": name,
        "maxUsersPerShard": cap, "scaleUpThreshold": 0.8, "maxShards": 4, "minShards": 0,
        "persistence": persistence,
    }))
    .unwrap();
    SessionDef {
        namespace: "default".into(),
        spec,
        pool: POOL.into(),
        files_url: "http://files.test/files".into(),
    }
}

fn shard(session: &str, index: u32, reflector: &str, region: &str) -> ShardRecord {
    ShardRecord {
        session: session_key("default", "app", session),
        name: shard_name(session, index),
        index,
        pool: POOL.into(),
        region: region.into(),
        reflector: Some(reflector.into()),
        committed_users: 0,
        users: 0,
        reserved: 0,
        phase: ShardPhase::Open,
        empty_since: None,
        moving_to: None,
        moved_at: None,
    }
}

/// A router with one published pool: regions eu and us, a reflector in each, two Sessions.
fn router() -> Arc<Router> {
    let capacity = Capacity {
        sessions: 4,
        users: 400,
    };
    let region = |n: &str| RegionInput {
        name: n.into(),
        image: "img".into(),
        capacity,
        min_reflectors: 1,
        max_reflectors: 1,
        warm_buffer: 0,
        growth_buffer_seconds: 0,
    };
    let reflector = |n: &str, r: &str| ObservedReflector {
        name: n.into(),
        pool: POOL.into(),
        region: r.into(),
        image: "img".into(),
        capacity,
        state: ReflectorState::Ready,
        unreported: false,
    };
    let r = Router::new(
        RouterConfig::default(),
        None,
        RouterMetrics::new(&prometheus::Registry::new()),
    );
    r.publish(
        "local",
        FleetView {
            input: PlanInput {
                pools: vec![PoolInput {
                    id: POOL.into(),
                    placement: PlacementStrategy::Pack,
                    regions: vec![region("eu"), region("us")],
                    cooldown: 60,
                    drain_grace: 30,
                    moves: Default::default(),
                }],
                reflectors: vec![reflector("r-eu", "eu"), reflector("r-us", "us")],
                shards: vec![
                    shard("lobby", 0, "r-eu", "eu"),
                    shard("lobby", 1, "r-eu", "eu"),
                    shard("arena", 0, "r-us", "us"),
                ],
                ..PlanInput::default()
            },
            sessions: vec![session("lobby", 10, true), session("arena", 3, false)],
            urls: HashMap::from([
                ("r-eu".into(), "ws://eu.test/".into()),
                ("r-us".into(), "ws://us.test/".into()),
            ]),
            gateways: HashMap::new(),
        },
    );
    r
}

fn shard_load(u: &mut Unstructured<'_>) -> R<ShardLoad> {
    Ok(ShardLoad {
        session_id: word(u, &["sid", ""])?,
        shard: word(u, SHARDS)?,
        app_id: word(u, APPS)?,
        users: u.arbitrary()?,
        joins: u.arbitrary()?,
        leaves: u.arbitrary()?,
        peak_users: u.arbitrary()?,
        messages_per_second: u.arbitrary()?,
        bytes_per_second: u.arbitrary()?,
        admitted_reservations: Vec::<u64>::arbitrary(u)?,
        max_users: u.arbitrary()?,
    })
}

fn report(u: &mut Unstructured<'_>, seq: &mut u64) -> R<ReflectorReport> {
    let n = u.int_in_range(0..=5usize)?;
    *seq = match u.int_in_range(0..=3u8)? {
        0 => u.arbitrary()?,
        1 => seq.saturating_sub(1),
        _ => seq.saturating_add(1),
    };
    Ok(ReflectorReport {
        reflector: word(u, REFLECTORS)?,
        region: word(u, REGIONS)?,
        public_url: word(u, &["ws://eu.test/", "ws://evil/"])?,
        state: u.int_in_range(-1..=3)?,
        capacity: if u.arbitrary()? {
            Some(ReportCapacity {
                max_sessions: u.arbitrary()?,
                max_users: u.arbitrary()?,
            })
        } else {
            None
        },
        shards: (0..n).map(|_| shard_load(u)).collect::<R<_>>()?,
        sequence: *seq,
        version: word(u, &["0.1.0", ""])?,
        pool: word(u, &[POOL, ""])?,
        hand_offs: (0..u.int_in_range(0..=2usize)?)
            .map(|_| hand_off(u))
            .collect::<R<_>>()?,
    })
}

/// An outcome of a hand-off the router may or may not have asked for, of any shard.
fn hand_off(u: &mut Unstructured<'_>) -> R<HandOffResult> {
    Ok(HandOffResult {
        move_id: u.int_in_range(0..=3u64)?,
        app_id: word(u, APPS)?,
        shard: word(u, SHARDS)?,
        stored: u.arbitrary()?,
        error: word(u, &["", "disk full"])?,
    })
}

/// One stream's worth of reports through the hub's checks.
fn stream(u: &mut Unstructured<'_>, router: &Router) -> R<()> {
    let credential = if u.arbitrary()? {
        Some(ReflectorIdentity {
            reflector: word(u, REFLECTORS)?,
            region: word(u, REGIONS)?,
        })
    } else {
        None
    };
    let mut state = StreamState::new(credential.clone());
    let mut attached = 0u32;
    let mut seq = 0u64;
    for _ in 0..u.int_in_range(1..=6u8)? {
        let report = match u.int_in_range(0..=3u8)? {
            // Arbitrary bytes as a protobuf message.
            0 => match ReflectorReport::decode(<&[u8]>::arbitrary(u)?) {
                Ok(r) => r,
                Err(_) => continue,
            },
            // A generated report, encoded, damaged and decoded again.
            1 => {
                let r = report(u, &mut seq)?;
                let bytes = r.encode_to_vec();
                let mut damaged = bytes.clone();
                if !damaged.is_empty() {
                    let at = u.choose_index(damaged.len())?;
                    damaged[at] ^= u8::arbitrary(u)?.max(1);
                }
                match ReflectorReport::decode(damaged.as_slice()) {
                    Ok(r) => r,
                    Err(_) => continue,
                }
            }
            // A generated report, which prost round-trips.
            _ => {
                let r = report(u, &mut seq)?;
                let back = ReflectorReport::decode(r.encode_to_vec().as_slice())
                    .expect("an encoded report decodes");
                // NaN rates compare unequal; everything else must match.
                if r.shards
                    .iter()
                    .all(|s| !s.messages_per_second.is_nan() && !s.bytes_per_second.is_nan())
                {
                    assert_eq!(back, r);
                }
                back
            }
        };
        let before = state.bound.clone();
        let counted_before = state.reflector().map(str::to_owned);
        match state.take(router, &report, |_| attached += 1) {
            Err((reason, status)) => {
                if report.reflector.is_empty() {
                    assert_eq!(status.code(), tonic::Code::InvalidArgument);
                } else {
                    assert_eq!(status.code(), tonic::Code::PermissionDenied, "{status:?}");
                    assert!(REASONS.contains(&reason), "{reason}");
                }
                assert_eq!(state.bound, before, "a refused report changed the binding");
                // The hub closes the stream on a refusal.
                break;
            }
            Ok(taken) => {
                assert!(!report.reflector.is_empty());
                let id = state
                    .bound
                    .as_ref()
                    .expect("an accepted report binds the stream");
                assert_eq!(
                    (&id.reflector, &id.region),
                    (&report.reflector, &report.region)
                );
                if let Some(c) = &credential {
                    assert_eq!(id, c, "the stream left its credential's identity");
                }
                if before.is_none() {
                    assert!(
                        ["eu", "us"].contains(&report.region.as_str()),
                        "an open stream bound to region {:?}",
                        report.region
                    );
                }
                match &taken {
                    Taken::Counted(sent) => {
                        // Only a counted report binds the stream's reflector, once.
                        assert_eq!(state.reflector(), Some(report.reflector.as_str()));
                        if counted_before.is_none() {
                            assert_eq!(attached, 1, "attached before its first counted report");
                        }
                        // What is sent is what the router answers for a reported shard.
                        for s in sent {
                            assert!(report.shards.iter().any(|r| r.shard == s.shard));
                        }
                    }
                    Taken::Stale => {
                        assert_eq!(state.reflector(), counted_before.as_deref());
                        continue;
                    }
                }
            }
        }
        let _ = router.live_streams();
        for s in report.shards.iter().filter(|s| !s.shard.is_empty()) {
            let settings = router.shard_settings(&s.app_id, &s.shard);
            let want = match (s.app_id.as_str(), s.shard.as_str()) {
                ("app", "lobby" | "lobby~1") => Some((10, true)),
                ("app", "arena") => Some((3, false)),
                _ => None,
            };
            assert_eq!(settings, want, "{}/{}", s.app_id, s.shard);
        }
    }
    Ok(())
}

#[test]
fn fuzz_reports() {
    let mut router = router();
    let mut streams = 0u32;
    refleet_fuzz::run("reports", 20_000, |u| {
        // A fresh router now and then, so random reflector names do not pile up.
        streams += 1;
        if streams.is_multiple_of(4096) {
            router = self::router();
        }
        stream(u, &router)
    });
}

fn names(u: &mut Unstructured<'_>) -> R<()> {
    let name = word(u, &["lobby", "room", "a-b", "", "x~", "~", "a~b"])?;
    let index: u32 = if u.arbitrary()? {
        u.arbitrary()?
    } else {
        u.int_in_range(0..=12)?
    };
    let rendered = shard_name(&name, index);
    if !name.contains('~') {
        assert_eq!(parse_shard_name(&rendered), Some((name.as_str(), index)));
    }
    for text in [rendered, mutate(u, &shard_name(&name, index))?] {
        if let Some((n, i)) = parse_shard_name(&text) {
            assert_eq!(shard_name(n, i), text, "{text:?} parsed as ({n:?}, {i})");
        }
    }
    let parse_any = <&str>::arbitrary(u)?;
    if let Some((n, i)) = parse_shard_name(parse_any) {
        assert_eq!(
            shard_name(n, i),
            parse_any,
            "{parse_any:?} parsed as ({n:?}, {i})"
        );
    }
    let ns = word(u, &["default", "team-a", ""])?;
    let app = word(u, &["app", "com.example", ""])?;
    let session = word(u, &["lobby", "a/b", ""])?;
    let key = session_key(&ns, &app, &session);
    if !ns.contains('/') && !app.contains('/') {
        assert_eq!(
            split_session_key(&key),
            Some((ns.as_str(), app.as_str(), session.as_str()))
        );
    }
    Ok(())
}

#[test]
fn fuzz_shard_names() {
    refleet_fuzz::run("shard_names", 20_000, names);
}
