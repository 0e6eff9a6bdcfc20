//! A short smoke run against the real reflector must be clean: every client receives every
//! message of its session, in order, once.
//!
//! The reflector binary comes from `REFLEET_REFLECTOR_BIN`, else the workspace's
//! `target/debug/refleet-reflector`, which is built with `cargo build -p refleet-reflector`
//! when it is missing.
#![allow(clippy::unwrap_used)]

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use refleet_bench::load::{self, Endpoint};
use refleet_bench::modes::smoke_spec;
use refleet_bench::target::Target;

fn reflector_bin() -> PathBuf {
    if let Ok(p) = std::env::var("REFLEET_REFLECTOR_BIN") {
        return PathBuf::from(p);
    }
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let target_dir = std::env::var("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| root.join("target"));
    let bin = target_dir.join("debug").join("refleet-reflector");
    if !bin.exists() {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_string());
        let status = Command::new(cargo)
            .args(["build", "-p", "refleet-reflector"])
            .current_dir(&root)
            .status()
            .unwrap();
        assert!(status.success(), "building refleet-reflector failed");
    }
    bin
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_smoke_run_against_the_reflector_is_clean() {
    let bin = reflector_bin();
    let mut target = Target::spawn(bin.to_str().unwrap(), &[]).await.unwrap();
    let ep = Endpoint::resolve(&target.ws_base, target.proc())
        .await
        .unwrap();
    let spec = smoke_spec(Duration::from_secs(2), 8192);
    let report = tokio::time::timeout(Duration::from_secs(60), load::run(&ep, "smoke", &spec))
        .await
        .unwrap();
    target.stop().await;
    let report = report.unwrap();
    println!("{report}");
    assert!(report.is_clean(), "{report}");
    assert!(report.sent >= 200, "{report}");
    assert_eq!(report.deliveries, report.sent * 3);
    assert!(report.faults.lost == 0 && report.faults.reordered == 0);
    assert!(report.reflector.is_some());
}

#[test]
fn the_smoke_command_passes_against_the_reflector() {
    let bin = reflector_bin();
    let out = Command::new(env!("CARGO_BIN_EXE_refleet-bench"))
        .arg("--spawn")
        .arg(&bin)
        .args(["smoke", "--duration", "1s"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    println!("{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success());
    assert!(stdout.contains("lost 0, duplicated 0, reordered 0"));
}

#[test]
fn the_bench_exits_non_zero_when_nothing_answers() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    drop(listener);
    let out = Command::new(env!("CARGO_BIN_EXE_refleet-bench"))
        .args(["--url", &format!("ws://{addr}/reflector/")])
        .args([
            "fixed",
            "--sessions",
            "1",
            "--clients",
            "2",
            "--duration",
            "1s",
            "--join-timeout",
            "3s",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
}
