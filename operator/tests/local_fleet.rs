//! The local backend's observe → plan → act loop, driven by a fake launcher: reflectors
//! start, become ready, report users; the loop opens shards and reflectors as load rises and
//! drains them when it falls, exactly as the planner decides.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;

use refleet_core::planner::Decision;
use refleet_operator::crd::ShardPhase;
use refleet_operator::local::config::LocalConfig;
use refleet_operator::local::fleet::{Fleet, PoolRuntime, Status};
use refleet_operator::local::launcher::{
    LaunchError, Launcher, Observed, ReportedSession, StartRequest,
};

/// Reflectors that exist only in memory; the test decides when they are ready, what load
/// they report and when they exit.
#[derive(Default)]
struct FakeLauncher {
    children: BTreeMap<String, Observed>,
    started: Vec<StartRequest>,
    drained: Vec<String>,
}

impl FakeLauncher {
    fn ready_all(&mut self) {
        for (name, o) in &mut self.children {
            if *o == Observed::Starting {
                *o = Observed::Running {
                    url: format!("http://127.0.0.1/{name}/"),
                    sessions: Some(Vec::new()),
                };
            }
        }
    }

    fn set_users(&mut self, reflector: &str, shard: &str, users: u32) {
        let Some(Observed::Running {
            sessions: Some(sessions),
            ..
        }) = self.children.get_mut(reflector)
        else {
            panic!("{reflector} is not running");
        };
        sessions.retain(|s| s.name.as_deref() != Some(&format!("io.x/{shard}")));
        sessions.push(ReportedSession {
            session_id: format!("sid-{shard}"),
            name: Some(format!("io.x/{shard}")),
            app_id: Some("io.x".into()),
            persistent_id: Some("pid".into()),
            users,
            peers: vec![],
        });
    }

    fn exit_drained(&mut self) {
        for name in &self.drained {
            if let Some(o) = self.children.get_mut(name) {
                *o = Observed::Exited {
                    success: true,
                    detail: "exit status: 0".into(),
                };
            }
        }
    }
}

impl Launcher for FakeLauncher {
    fn start(&mut self, req: StartRequest) -> Result<(), LaunchError> {
        self.children.insert(req.name.clone(), Observed::Starting);
        self.started.push(req);
        Ok(())
    }
    fn drain(&mut self, name: &str) {
        self.drained.push(name.to_owned());
    }
    fn kill(&mut self, name: &str) {
        self.children.insert(
            name.to_owned(),
            Observed::Exited {
                success: false,
                detail: "signal: 9".into(),
            },
        );
    }
    async fn observe(&mut self) -> BTreeMap<String, Observed> {
        self.children.clone()
    }
    fn forget(&mut self, name: &str) {
        self.children.remove(name);
    }
}

/// One region; a reflector carries one shard of 4 users; shard threshold 3 users.
const CONFIG: &str = "apiVersion: refleet.dev/v1alpha1
kind: ReflectorPool
metadata: {name: p}
spec:
  defaults:
    capacity: {sessions: 10, users: 4}
    minReflectors: 1
    maxReflectors: 3
    warmBuffer: 0
  regions: [{name: r1}]
  scaleDownCooldownSeconds: 5
  drainGracePeriodSeconds: 3
---
apiVersion: refleet.dev/v1alpha1
kind: Session
metadata: {name: lobby}
spec:
  poolRef: {name: p}
  appId: io.x
  name: lobby
  maxUsersPerShard: 4
  scaleUpThreshold: 0.75
  closeIdleShardsAfterSeconds: 2
";

fn fleet() -> Fleet<FakeLauncher> {
    let config = LocalConfig::parse(CONFIG).unwrap();
    let pools = config
        .pools
        .into_iter()
        .map(|pool| PoolRuntime {
            pool,
            storage: "/tmp/shared-storage".into(),
            files_url: "http://127.0.0.1:7080/files".into(),
        })
        .collect();
    Fleet::new(FakeLauncher::default(), pools, config.sessions)
}

fn placement(status: &Status) -> Vec<(String, Option<String>, ShardPhase)> {
    status
        .shards
        .iter()
        .map(|s| (s.name.clone(), s.reflector.clone(), s.phase))
        .collect()
}

fn reflectors(status: &Status) -> Vec<(String, &'static str)> {
    status
        .regions
        .iter()
        .flat_map(|r| r.reflectors.iter())
        .map(|r| (r.name.clone(), r.state))
        .collect()
}

#[tokio::test]
async fn the_first_tick_starts_a_reflector_with_shared_storage_and_the_pool_files_url() {
    let mut f = fleet();
    f.tick(0).await;
    let l = f.launcher_mut();
    assert_eq!(l.started.len(), 1);
    let req = &l.started[0];
    assert_eq!((req.name.as_str(), req.region.as_str()), ("r1-1", "r1"));
    assert_eq!(req.storage, "/tmp/shared-storage");
    assert_eq!(req.files_url, "http://127.0.0.1:7080/files");
    assert_eq!(req.drain_timeout.as_secs(), 3);
    let status = f.status();
    assert_eq!(
        placement(&status),
        [("lobby".into(), None, ShardPhase::Pending)]
    );
    assert_eq!(reflectors(&status), [("r1-1".into(), "Starting")]);
    // A second tick while it starts does not start another.
    f.tick(1).await;
    assert_eq!(f.launcher_mut().started.len(), 1);
}

#[tokio::test]
async fn load_past_the_threshold_opens_a_shard_and_a_reflector_then_both_drain_away() {
    let mut f = fleet();
    f.tick(0).await;
    f.launcher_mut().ready_all();
    f.tick(1).await;
    let status = f.status();
    assert_eq!(
        placement(&status),
        [("lobby".into(), Some("r1-1".into()), ShardPhase::Open)]
    );
    assert_eq!(
        status.shards[0].url.as_deref(),
        Some("http://127.0.0.1/r1-1/")
    );

    // Three users reach the threshold (0.75 × 4): a second shard opens; the reflector holds
    // one shard's worth of users, so the shard waits for a second reflector.
    f.launcher_mut().set_users("r1-1", "lobby", 3);
    let decisions = f.tick(2).await;
    assert!(
        decisions
            .iter()
            .any(|d| matches!(d, Decision::OpenShard { shard, .. } if shard == "lobby~1")),
        "{decisions:?}"
    );
    assert_eq!(f.launcher_mut().started.len(), 2);
    assert_eq!(
        placement(&f.status()),
        [
            ("lobby".into(), Some("r1-1".into()), ShardPhase::Full),
            ("lobby~1".into(), None, ShardPhase::Pending)
        ]
    );
    f.launcher_mut().ready_all();
    f.tick(3).await;
    assert_eq!(
        placement(&f.status()),
        [
            ("lobby".into(), Some("r1-1".into()), ShardPhase::Full),
            ("lobby~1".into(), Some("r1-2".into()), ShardPhase::Open)
        ]
    );

    // Everyone leaves: the idle extra shard closes and goes, then the empty reflector drains
    // (after the cool-down since the scale-up) and is forgotten once its process exits.
    f.launcher_mut().set_users("r1-1", "lobby", 0);
    let mut drained_at = None;
    for now in 4..30 {
        f.tick(now).await;
        if drained_at.is_none() && !f.launcher_mut().drained.is_empty() {
            drained_at = Some(now);
            f.launcher_mut().exit_drained();
        }
    }
    let drained_at = drained_at.expect("a reflector drained");
    assert!(
        drained_at >= 2 + 5,
        "drained at {drained_at}, before the cool-down"
    );
    assert_eq!(f.launcher_mut().drained, ["r1-2"]);
    let status = f.status();
    assert_eq!(
        placement(&status),
        [("lobby".into(), Some("r1-1".into()), ShardPhase::Open)]
    );
    assert_eq!(reflectors(&status), [("r1-1".into(), "Ready")]);
    assert_eq!(f.launcher_mut().started.len(), 2, "no flapping");
}

#[tokio::test]
async fn a_reflector_that_dies_is_replaced_and_its_shard_reopened() {
    let mut f = fleet();
    f.tick(0).await;
    f.launcher_mut().ready_all();
    f.tick(1).await;
    f.launcher_mut().kill("r1-1");
    f.tick(2).await;
    let l = f.launcher_mut();
    assert_eq!(l.started.len(), 2, "a replacement starts");
    assert!(
        !l.children.contains_key("r1-1"),
        "the dead one is forgotten"
    );
    l.ready_all();
    f.tick(3).await;
    assert_eq!(
        placement(&f.status()),
        [("lobby".into(), Some("r1-2".into()), ShardPhase::Open)]
    );
}

#[tokio::test]
async fn shutdown_drains_every_reflector_and_waits_for_them() {
    let mut f = fleet();
    f.tick(0).await;
    f.launcher_mut().ready_all();
    f.tick(1).await;
    f.shutdown(std::time::Duration::from_millis(300)).await;
    let l = f.launcher_mut();
    assert_eq!(l.drained, ["r1-1"]);
    // It did not exit by itself within the timeout, so it was killed.
    assert!(matches!(
        l.children.get("r1-1"),
        Some(Observed::Exited { success: false, .. })
    ));
}

#[test]
fn a_reported_session_maps_to_its_shard_by_the_join_name() {
    let s = ReportedSession {
        session_id: "x".into(),
        name: Some("io.x/lobby~2".into()),
        app_id: Some("io.x".into()),
        persistent_id: None,
        users: 1,
        peers: vec![],
    };
    assert_eq!(s.shard(), Some("lobby~2"));
    let other_app = ReportedSession {
        app_id: Some("io.y".into()),
        ..s.clone()
    };
    assert_eq!(other_app.shard(), None);
}
