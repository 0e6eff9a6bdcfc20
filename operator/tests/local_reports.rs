//! `refleet up`'s launcher with real `refleet-reflector` children: each child gets its own
//! report credential (in its environment, not on its command line) and the report stream
//! accepts it as exactly that reflector.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use refleet_api::reflector::launch::LaunchSpec;
use refleet_api::report_credential::ReportKey;
use refleet_operator::local::config::ChildLogs;
use refleet_operator::local::launcher::{Launcher, ProcessLauncher, ProcessSettings, StartRequest};
use refleet_operator::router::metrics::{REPORT_REFUSALS, RouterMetrics};
use refleet_operator::router::reports::{self, ReportHub};
use refleet_operator::router::{Router, RouterConfig};

mod support;
use support::reflector_binary;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_child_reports_under_its_own_credential() {
    let router = Router::new(
        RouterConfig::default(),
        None,
        RouterMetrics::new(&prometheus::Registry::new()),
    );
    let key = ReportKey::new(&[9; 32]).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let report_url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(reports::serve(
        listener,
        ReportHub::new(router.clone(), Some(key.clone())),
        std::future::pending(),
    ));
    let dir = std::env::temp_dir().join(format!("refleet-local-reports-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut launcher = ProcessLauncher::new(ProcessSettings {
        binary: reflector_binary(),
        host: "127.0.0.1".into(),
        launch: LaunchSpec {
            report_url: Some(report_url),
            ..LaunchSpec::default()
        },
        logs: ChildLogs::Files,
        log_dir: dir.join("logs"),
        report_key: Some(key),
        sessions_http: refleet_operator::local::launcher::sessions_client(),
    });
    for (name, region) in [("local-a-1", "local-a"), ("local-b-1", "local-b")] {
        launcher
            .start(StartRequest {
                name: name.into(),
                region: region.into(),
                storage: dir.join("storage").display().to_string(),
                files_url: "http://127.0.0.1:1/files".into(),
                drain_timeout: Duration::from_secs(1),
            })
            .unwrap();
    }
    // Both children's streams are accepted, each in its own region.
    tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            let live = router.live_streams();
            if live.get("local-a") == Some(&1) && live.get("local-b") == Some(&1) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .expect("both children report");
    for reason in REPORT_REFUSALS {
        assert_eq!(router.metrics.report_refusals(reason), 0, "{reason}");
    }
    // The credential is in the child's environment, never on its command line.
    for (name, pid) in launcher.pids() {
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap();
        let cmdline = String::from_utf8_lossy(&cmdline);
        assert!(!cmdline.contains("report-token"), "{name}: {cmdline}");
        let environ = std::fs::read(format!("/proc/{pid}/environ")).unwrap();
        assert!(
            String::from_utf8_lossy(&environ).contains(&format!("REFLEET_REPORT_TOKEN={name}.")),
            "{name}"
        );
    }
    for name in ["local-a-1", "local-b-1"] {
        launcher.kill(name);
    }
    let _ = std::fs::remove_dir_all(&dir);
}
