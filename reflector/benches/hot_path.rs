//! Micro-benchmarks of the reflector's per-message path: parsing a client frame, stamping
//! and serialising a RECV, and fanning it out to N send queues (including the writers'
//! side: taking the queued frames out again).
//!
//! `cargo bench -p refleet-reflector --bench hot_path`. Figures go to bench/README.md; they
//! are never asserted anywhere.

use std::collections::VecDeque;
use std::hint::black_box;
use std::sync::Arc;
use std::time::Duration;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use refleet_reflector::frame::{self, ClientMsg, Join, Snap, Text};
use refleet_reflector::metrics::Metrics;
use refleet_reflector::outbox::{self, Inbox};
use refleet_reflector::session::core::{Core, Settings};
use tokio::time::Instant;

const SEND: &str = r#"{"id":"bench-session","action":"SEND","args":[1732420000123,0,"eyJhIjoxLCJ0IjoxNzMyNDIwMDAwMTIzLCJzIjo0MiwicGFkIjoieHh4eHh4eHh4eCJ9",0]}"#;

fn parse(c: &mut Criterion) {
    let mut g = c.benchmark_group("parse");
    g.throughput(Throughput::Bytes(SEND.len() as u64));
    g.bench_function("SEND", |b| b.iter(|| frame::parse(black_box(SEND))));
    g.finish();
}

fn settings() -> Arc<Settings> {
    Arc::new(Settings {
        reflector_name: "bench".into(),
        default_tick: Duration::from_millis(50),
        empty_session_ttl: Duration::from_secs(10),
        rejoin_grace: Duration::from_secs(10),
        requ_messages: usize::MAX,
        max_messages: usize::MAX,
        files_base: "http://bench/files".into(),
        max_retained_bytes: usize::MAX,
    })
}

/// A session with `n` joined members, and their writers' ends.
fn session(n: usize) -> (Core, Vec<Inbox>) {
    let now = Instant::now();
    let mut core = Core::new(
        Arc::from("bench-session"),
        settings(),
        Metrics::new("bench"),
        now,
    );
    let mut inboxes = Vec::with_capacity(n);
    for i in 0..n {
        let (out, inbox) = outbox::pair(4096);
        let join = Join {
            user: Some(format!("\"view{i}\"")),
            ..Join::default()
        };
        core.join(i as u64 + 1, out, join, now);
        inboxes.push(inbox);
    }
    (core, inboxes)
}

fn reflect(c: &mut Criterion) {
    let mut g = c.benchmark_group("reflect_fan_out");
    let rest = "\"eyJhIjoxLCJ0IjoxNzMyNDIwMDAwMTIzLCJzIjo0MiwicGFkIjoieHh4eHh4eHh4eCJ9\",0";
    for n in [1usize, 10, 100] {
        g.throughput(Throughput::Elements(n as u64));
        g.bench_with_input(BenchmarkId::from_parameter(n), &n, |b, &n| {
            let (mut core, mut inboxes) = session(n);
            let mut taken: VecDeque<Text> = VecDeque::new();
            let mut count: u64 = 0;
            b.iter(|| {
                let now = Instant::now();
                core.message(
                    1,
                    ClientMsg::Send {
                        rest: rest.into(),
                        tags: None,
                    },
                    now,
                );
                for inbox in &mut inboxes {
                    inbox.try_take(&mut taken);
                    taken.clear();
                }
                count += 1;
                if count.is_multiple_of(10_000) {
                    // Keep the session's message history bounded, as clients' snapshots do.
                    core.message(
                        1,
                        ClientMsg::Snap(Snap {
                            time: count as f64,
                            seq: core.seq(),
                            // In the session's own folder, or the SNAP is refused and
                            // nothing is trimmed.
                            url: format!("http://bench/files/snapshots/bench-session/{count}"),
                            dissident: false,
                        }),
                        now,
                    );
                    core.take_effects();
                    core.flush_stats();
                }
            });
        });
    }
    g.finish();
}

criterion_group!(benches, parse, reflect);
criterion_main!(benches);
