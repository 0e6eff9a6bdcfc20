//! `plan_input` and `concrete_sessions`, straight from an [`Observed`].

#![allow(clippy::unwrap_used)]

use super::*;

fn pool(image: Option<&str>) -> ObservedPool {
    let mut defaults = serde_json::json!({});
    if let Some(image) = image {
        defaults = serde_json::json!({ "image": image });
    }
    ObservedPool {
        namespace: "ns".into(),
        name: "pool".into(),
        spec: serde_json::from_value(serde_json::json!({
            "defaults": defaults,
            "regions": [{ "name": "eu" }],
            "files": { "publicURL": "https://files.test/" },
            "reflectorURL": { "template": "ws://{pod}.test/" }
        }))
        .unwrap(),
        files_url: String::new(),
    }
}

fn session(name: &str, spec: serde_json::Value) -> ObservedSession {
    let mut spec = spec;
    spec["poolRef"] = serde_json::json!({ "name": "pool" });
    spec["appId"] = serde_json::json!("app");
    ObservedSession {
        namespace: "ns".into(),
        name: name.into(),
        spec: serde_json::from_value(spec).unwrap(),
        deleted: false,
    }
}

fn host(name: &str, hosted: Option<Vec<(&str, u32)>>) -> ObservedHost {
    ObservedHost {
        name: name.into(),
        pool: "ns/pool".into(),
        region: Some("eu".into()),
        image: "img:1".into(),
        state: Some(ReflectorState::Ready),
        url: Some(format!("http://{name}/")),
        hosted: hosted.map(|h| {
            h.into_iter()
                .map(|(n, users)| HostedShard {
                    app_id: "app".into(),
                    name: n.into(),
                    users,
                })
                .collect()
        }),
    }
}

fn shard(session: &str, name: &str, reflector: &str, users: u32) -> ShardRecord {
    ShardRecord {
        session: session.into(),
        name: name.into(),
        index: parse_shard_name(name).unwrap().1,
        pool: "ns/pool".into(),
        region: "eu".into(),
        reflector: Some(reflector.into()),
        committed_users: 50,
        users,
        reserved: 0,
        phase: ShardPhase::Open,
        empty_since: None,
        moving_to: None,
        moved_at: None,
    }
}

fn observed(sessions: Vec<ObservedSession>, reflectors: Vec<ObservedHost>) -> Observed {
    Observed {
        pools: vec![pool(Some("img:1"))],
        sessions,
        reflectors,
    }
}

#[test]
fn pools_regions_and_reflectors_come_from_the_specs() {
    let obs = Observed {
        pools: vec![pool(None)],
        sessions: vec![],
        reflectors: vec![
            host("r1", None),
            ObservedHost {
                state: None,
                ..host("gone", None)
            },
            ObservedHost {
                region: None,
                ..host("unlabelled", None)
            },
        ],
    };
    let input = plan_input(&obs, &[], &ScaleHistory::new(), 7);
    assert_eq!(input.now, 7);
    assert_eq!(input.pools.len(), 1);
    assert_eq!(input.pools[0].id, "ns/pool");
    // No image anywhere: the region plans with an empty one (as the kube backend always did).
    assert_eq!(input.pools[0].regions[0].image, "");
    let names: Vec<&str> = input.reflectors.iter().map(|r| r.name.as_str()).collect();
    assert_eq!(names, ["r1"]);
    let capacity = obs.pools[0].spec.resolved_region("eu").unwrap().capacity;
    assert_eq!(input.reflectors[0].capacity, capacity);
}

#[test]
fn exact_and_pattern_sessions_become_concrete_sessions() {
    let obs = observed(
        vec![
            session("lobby", serde_json::json!({ "name": "lobby" })),
            session("rooms", serde_json::json!({ "namePattern": "room-*" })),
            ObservedSession {
                deleted: true,
                ..session("old", serde_json::json!({ "name": "old" }))
            },
        ],
        // room-a hosted with users, room-b hosted empty (not discovered), other not matching.
        vec![host(
            "r1",
            Some(vec![("room-a", 3), ("room-b", 0), ("other", 2)]),
        )],
    );
    let carried = [shard("ns/app/room-c", "room-c", "r1", 0)];
    let input = plan_input(&obs, &carried, &ScaleHistory::new(), 0);
    let keys: Vec<(&str, &str, bool)> = input
        .sessions
        .iter()
        .map(|s| (s.key.as_str(), s.name.as_str(), s.deleted))
        .collect();
    assert_eq!(
        keys,
        [
            ("ns/app/lobby", "lobby", false),
            ("ns/app/old", "old", true),
            ("ns/app/room-a", "room-a", false),
            ("ns/app/room-c", "room-c", false),
        ]
    );
    assert!(input.sessions.iter().all(|s| s.pool == "ns/pool"));
}

#[test]
fn load_comes_from_the_reporting_reflector_and_unknown_hosted_shards_are_adopted() {
    let obs = observed(
        vec![session("lobby", serde_json::json!({ "name": "lobby" }))],
        vec![
            // r1 reports lobby with 4 users and shard 1 the plan does not know.
            host("r1", Some(vec![("lobby", 4), ("lobby~1", 2)])),
            // r2 did not report: its shard keeps the users it had.
            host("r2", None),
        ],
    );
    let carried = [
        shard("ns/app/lobby", "lobby", "r1", 9),
        shard("ns/app/lobby", "lobby~2", "r2", 5),
    ];
    let input = plan_input(&obs, &carried, &ScaleHistory::new(), 0);
    let users: Vec<(&str, Option<&str>, u32)> = input
        .shards
        .iter()
        .map(|s| (s.name.as_str(), s.reflector.as_deref(), s.users))
        .collect();
    assert_eq!(
        users,
        [
            ("lobby", Some("r1"), 4),
            ("lobby~2", Some("r2"), 5),
            ("lobby~1", Some("r1"), 2),
        ]
    );
    let adopted = &input.shards[2];
    assert_eq!(adopted.phase, ShardPhase::Open);
    assert_eq!(adopted.region, "eu");
    assert_eq!(adopted.session, "ns/app/lobby");
}

#[test]
fn a_new_leader_learns_hosted_shards_from_the_report_stream_and_waits_for_silent_ones() {
    // A new leader: r1's /sessions could not be read but its stream reports a room of a
    // pattern Session that no status records; r2 neither reads nor reports; r3 was read.
    let mut obs = observed(
        vec![session(
            "rooms",
            serde_json::json!({ "namePattern": "room-*" }),
        )],
        vec![
            host("r1", None),
            host("r2", None),
            host("r3", Some(vec![])),
            ObservedHost {
                state: Some(ReflectorState::Starting),
                ..host("r4", None)
            },
            ObservedHost {
                state: Some(ReflectorState::Draining),
                ..host("r5", None)
            },
        ],
    );
    let reports = HashMap::from([
        ("r1".to_owned(), vec![("app".into(), "room-7".into(), 12)]),
        // A stream's report never replaces what the backend read itself.
        ("r3".to_owned(), vec![("app".into(), "room-9".into(), 1)]),
    ]);
    obs.take_reports(reports);
    let mut input = plan_input(&obs, &[], &ScaleHistory::new(), 100);
    let shards: Vec<(&str, Option<&str>, u32)> = input
        .shards
        .iter()
        .map(|s| (s.name.as_str(), s.reflector.as_deref(), s.users))
        .collect();
    assert_eq!(shards, [("room-7", Some("r1"), 12)]);
    let unreported: Vec<(&str, bool)> = input
        .reflectors
        .iter()
        .map(|r| (r.name.as_str(), r.unreported))
        .collect();
    // A starting reflector hosts nothing yet and is never waited for; a draining one may
    // still host shards, so it is (it must not be removed as empty meanwhile).
    assert_eq!(
        unreported,
        [
            ("r1", false),
            ("r2", true),
            ("r3", false),
            ("r4", false),
            ("r5", true)
        ]
    );
    // Within the wait r2 stays unreported; once it has passed, the plan alone decides.
    let mut unheard = HashMap::from([("r2".to_owned(), 100 - REPORT_WAIT + 1)]);
    let mut waiting = input.clone();
    settle_unreported(&mut waiting, &mut unheard);
    assert!(waiting.reflectors[1].unreported);
    unheard.insert("r2".to_owned(), 100 - REPORT_WAIT);
    unheard.insert("r5".to_owned(), 100 - REPORT_WAIT);
    settle_unreported(&mut input, &mut unheard);
    assert!(input.reflectors.iter().all(|r| !r.unreported));
}

/// Each reflector waits for its reports from the first plan that could not hear it, not
/// from when the backend started planning, and a report starts its next wait afresh.
#[test]
fn each_reflector_waits_for_its_reports_from_when_they_stopped() {
    let unreported_at = |now: Seconds, silent: &[&str], unheard: &mut HashMap<String, Seconds>| {
        let hosts = ["r1", "r2"]
            .map(|name| host(name, (!silent.contains(&name)).then(Vec::new)))
            .to_vec();
        let mut input = plan_input(&observed(vec![], hosts), &[], &ScaleHistory::new(), now);
        settle_unreported(&mut input, unheard);
        input
            .reflectors
            .iter()
            .filter(|r| r.unreported)
            .map(|r| r.name.clone())
            .collect::<Vec<_>>()
    };
    let mut unheard = HashMap::new();
    // A backend planning since t = 0 (both silent at first, both heard at t = 10).
    assert_eq!(unreported_at(0, &["r1", "r2"], &mut unheard), ["r1", "r2"]);
    assert!(unreported_at(10, &[], &mut unheard).is_empty());
    assert!(unheard.is_empty(), "heard: forgotten");
    // r2 falls silent at t = 600, long after the backend started: it waits in full.
    assert_eq!(unreported_at(600, &["r2"], &mut unheard), ["r2"]);
    assert_eq!(
        unreported_at(600 + REPORT_WAIT - 1, &["r2"], &mut unheard),
        ["r2"]
    );
    assert!(unreported_at(600 + REPORT_WAIT, &["r2"], &mut unheard).is_empty());
    // Heard once, then silent again: a new wait.
    assert!(unreported_at(700, &[], &mut unheard).is_empty());
    assert_eq!(unreported_at(701, &["r2"], &mut unheard), ["r2"]);
    assert_eq!(unheard, HashMap::from([("r2".to_owned(), 701)]));
}

#[test]
fn hosted_shards_of_unknown_sessions_are_not_adopted() {
    let obs = observed(vec![], vec![host("r1", Some(vec![("lobby", 4)]))]);
    let input = plan_input(&obs, &[], &ScaleHistory::new(), 0);
    assert!(input.sessions.is_empty());
    assert!(input.shards.is_empty());
}

#[test]
fn the_router_view_carries_the_plan_sessions_with_files_urls_and_reflector_urls() {
    let mut obs = observed(
        vec![
            session("lobby", serde_json::json!({ "name": "lobby" })),
            ObservedSession {
                spec: SessionSpec {
                    pool_ref: crate::crd::PoolRef {
                        name: "missing".into(),
                    },
                    ..session("elsewhere", serde_json::json!({ "name": "x" })).spec
                },
                ..session("elsewhere", serde_json::json!({ "name": "x" }))
            },
        ],
        vec![
            host("r1", Some(vec![])),
            ObservedHost {
                url: None,
                ..host("r2", Some(vec![]))
            },
        ],
    );
    obs.pools[0].files_url = "https://files.test/".into();
    let input = plan_input(&obs, &[], &ScaleHistory::new(), 0);
    let plan = refleet_core::planner::plan(&input);
    assert!(
        !plan.shards.is_empty(),
        "the exact-name session opens shard 0"
    );
    let view = fleet_view(&obs, input, &plan);
    assert_eq!(view.input.shards, plan.shards);
    assert_eq!(view.input.history, plan.history);
    let defs: Vec<(&str, &str)> = view
        .sessions
        .iter()
        .map(|s| (s.pool.as_str(), s.files_url.as_str()))
        .collect();
    assert_eq!(
        defs,
        [("ns/pool", "https://files.test/"), ("ns/missing", "")]
    );
    assert_eq!(view.urls.len(), 1);
    assert_eq!(view.urls["r1"], "http://r1/");
}

mod summaries {
    use crate::crd::Reason;
    use crate::fleet::{About, Level, summarize};
    use refleet_core::planner::{Decision, OpenReason, RemoveReason, ScaleDirection};

    #[test]
    fn a_shard_opened_outside_its_preferred_regions_gives_a_warning_then_the_opening() {
        let s = summarize(&Decision::OpenShard {
            session: "ns/app/lobby".into(),
            shard: "lobby~1".into(),
            region: "us".into(),
            reflector: None,
            reason: OpenReason::AllShardsAtThreshold,
            fell_back_from: vec!["eu".into()],
        });
        let got: Vec<(&str, &str, Level, &str)> = s
            .iter()
            .map(|s| (s.reason, s.action, s.level, s.note.as_str()))
            .collect();
        assert_eq!(
            got,
            [
                (
                    "RegionFull",
                    "PlaceShard",
                    Level::Warning,
                    "regions eu are full; shard lobby~1 opens in us"
                ),
                (
                    "ShardOpened",
                    "ShardOpened",
                    Level::Normal,
                    "shard lobby~1 opened in region us; waiting for a reflector"
                ),
            ]
        );
        assert!(
            s.iter()
                .all(|s| s.event && s.about == About::Session("ns/app/lobby".into()))
        );
    }

    #[test]
    fn lost_shards_warn_held_scaling_is_routine_and_degraded_sessions_post_no_event_per_plan() {
        let lost = summarize(&Decision::RemoveShard {
            session: "k".into(),
            shard: "s".into(),
            reason: RemoveReason::ReflectorGone,
        });
        assert_eq!(
            (lost[0].reason, lost[0].level),
            ("ShardLost", Level::Warning)
        );
        let held = summarize(&Decision::ScaleHeld {
            pool: "ns/pool".into(),
            region: "eu".into(),
            direction: ScaleDirection::Down,
            until: 30,
        });
        assert_eq!(held[0].about, About::Pool("ns/pool".into()));
        assert_eq!(held[0].level, Level::Routine);
        assert!(!held[0].event);
        let removed = summarize(&Decision::RemoveReflector {
            reflector: "eu-1".into(),
        });
        assert_eq!(removed[0].about, About::Reflector("eu-1".into()));
        assert_eq!(removed[0].note, "reflector eu-1 removed");
        let degraded = summarize(&Decision::SessionDegraded {
            session: "k".into(),
            reason: Reason::PoolNotFound,
            message: "no pool".into(),
        });
        assert_eq!(degraded[0].reason, Reason::PoolNotFound.as_str());
        assert!(!degraded[0].event);
    }
}

#[test]
fn session_gauges_count_open_shards_and_all_users_per_session_object_of_the_pool() {
    let mut other_pool = session("other", serde_json::json!({ "name": "other" }));
    other_pool.spec.pool_ref.name = "elsewhere".into();
    let obs = observed(
        vec![
            session("lobby", serde_json::json!({ "name": "lobby" })),
            session("rooms", serde_json::json!({ "namePattern": "room-*" })),
            session("idle", serde_json::json!({ "name": "idle" })),
            other_pool,
        ],
        vec![],
    );
    let mut closing = shard("ns/app/lobby", "lobby~1", "r1", 2);
    closing.phase = ShardPhase::Closing;
    let shards = [
        shard("ns/app/lobby", "lobby", "r1", 5),
        closing,
        shard("ns/app/room-a", "room-a", "r1", 1),
        shard("ns/app/room-b", "room-b", "r1", 3),
        shard("ns/app/other", "other", "r1", 9),
    ];
    let gauges = session_gauges(&obs, "ns/pool", &shards);
    let got: Vec<(&str, u32, u64)> = gauges
        .iter()
        .map(|(ns, name, open, users)| {
            assert_eq!(ns, "ns");
            (name.as_str(), *open, *users)
        })
        .collect();
    assert_eq!(got, [("lobby", 1, 7), ("rooms", 2, 4), ("idle", 0, 0)]);
}

/// Session objects whose keys sit next to each other in key order: an exact name, a pattern
/// whose prefix is also a prefix of other apps' and names' keys, another namespace.
fn neighbours() -> Vec<ObservedSession> {
    let mut other_ns = session("lobby-b", serde_json::json!({ "name": "lobby" }));
    other_ns.namespace = "ns-b".into();
    let mut other_app = session("rooms-x", serde_json::json!({ "namePattern": "room-*" }));
    other_app.spec.app_id = "app-x".into();
    vec![
        session("lobby", serde_json::json!({ "name": "lobby" })),
        session("rooms", serde_json::json!({ "namePattern": "room-*" })),
        other_ns,
        other_app,
        session("room-a", serde_json::json!({ "name": "room-a" })),
    ]
}

#[test]
fn grouped_shards_give_each_session_object_exactly_the_shards_governs_gives_it() {
    let sessions = neighbours();
    let shards = [
        shard("ns/app/lobby", "lobby", "r1", 1),
        shard("ns/app/lobby", "lobby~1", "r1", 2),
        shard("ns/app/lobby-2", "lobby-2", "r1", 3),
        shard("ns/app/room-a", "room-a", "r1", 4),
        shard("ns/app/room-b", "room-b~2", "r2", 5),
        shard("ns/app/roomy", "roomy", "r2", 6),
        shard("ns/app-x/room-c", "room-c", "r2", 7),
        shard("ns/apps/room-d", "room-d", "r2", 8),
        shard("ns-b/app/lobby", "lobby", "r3", 9),
        shard("ns-bb/app/lobby", "lobby", "r3", 10),
    ];
    let grouped = by_session::shards(&shards);
    let users_of = |s: &ObservedSession| -> Vec<u32> {
        grouped
            .governed(&s.namespace, &s.spec)
            .flat_map(|(_, of_key)| of_key.iter().map(|sh| sh.users))
            .collect()
    };
    let scanned = |s: &ObservedSession| -> Vec<u32> {
        shards
            .iter()
            .filter(|sh| s.governs(&sh.session))
            .map(|sh| sh.users)
            .collect()
    };
    let got: Vec<Vec<u32>> = sessions.iter().map(users_of).collect();
    assert_eq!(
        got,
        [vec![1, 2], vec![4, 5], vec![9], vec![7], vec![4]],
        "lobby, rooms, lobby in ns-b, rooms of app-x, room-a"
    );
    assert_eq!(got, sessions.iter().map(scanned).collect::<Vec<_>>());
}

#[test]
fn a_key_belongs_to_the_first_session_object_that_governs_it() {
    let sessions = neighbours();
    let owners = by_session::owners(&sessions);
    let of = |key: &str| owners.of(key, |i| &sessions[i].spec);
    assert_eq!(of("ns/app/lobby"), Some(0));
    // Both "rooms" (1) and "room-a" (4) govern room-a: the first wins, as in
    // concrete_sessions.
    assert_eq!(of("ns/app/room-a"), Some(1));
    assert_eq!(of("ns/app/room-z"), Some(1));
    assert_eq!(of("ns-b/app/lobby"), Some(2));
    assert_eq!(of("ns/app-x/room-c"), Some(3));
    assert_eq!(of("ns/app/roomy"), None);
    assert_eq!(of("ns/app/room-a~1"), None, "a shard name is not a session");
    assert_eq!(of("ns-bb/app/lobby"), None);
    assert_eq!(of("garbage"), None);
    // The same answer as the first object whose governs says yes.
    for key in [
        "ns/app/lobby",
        "ns/app/room-a",
        "ns-b/app/lobby",
        "ns/app-x/room-c",
    ] {
        assert_eq!(
            of(key),
            sessions.iter().position(|s| s.governs(key)),
            "{key}"
        );
    }
}

#[test]
fn a_session_object_reports_the_earliest_degradation_of_its_sessions() {
    use refleet_core::planner::{Decision, Plan, Reason};
    let degraded = |session: &str, message: &str| Decision::SessionDegraded {
        session: session.into(),
        reason: Reason::CapacityExhausted,
        message: message.into(),
    };
    let plan = Plan {
        decisions: vec![
            degraded("ns/app/room-b", "first of rooms"),
            degraded("ns/app/room-a", "second of rooms"),
            degraded("ns/app/room-a", "a later one for room-a"),
            degraded("ns/app/lobby-2", "not lobby's"),
        ],
        ..Plan::default()
    };
    let grouped = by_session::degraded(&plan);
    let first = |s: &ObservedSession| {
        grouped
            .governed(&s.namespace, &s.spec)
            .map(|(_, d)| *d)
            .min_by_key(|(order, _, _)| *order)
            .map(|(_, _, message)| message)
    };
    let sessions = neighbours();
    assert_eq!(first(&sessions[0]), None);
    assert_eq!(first(&sessions[1]), Some("first of rooms"));
    assert_eq!(first(&sessions[4]), Some("second of rooms"));
}
