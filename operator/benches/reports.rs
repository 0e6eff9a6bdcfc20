//! One report as the leader takes it, at the scale of issue #13: every reflector sends one
//! per second, so at 5 000 reflectors the leader takes 5 000 a second and any cost that
//! grows with the fleet is paid that often.
//!
//! A router with one published pool in 10 regions, every reflector reporting 20 shards of
//! a `room-*` Session, each reflector's reports counted twice already (the steady state:
//! nothing new to send, checked before timing). Each iteration is what one report stream
//! does with one report (`reports::StreamState::take`: the identity and sequence checks,
//! `Router::observe_report`, the shard settings to send), for the reflectors in turn. Its floor is decoding the same report from its protobuf
//! bytes, which tonic does for every report before the stream sees it. Sizes 100 and
//! 5 000 reflectors: per report, the cost should not grow with the fleet.
//!
//! Run with `cargo bench -p refleet-operator --bench reports`; docs/scale.md reports it.

use std::hint::black_box;
use std::sync::Arc;

use criterion::{Criterion, criterion_group, criterion_main};
use prost::Message;

use refleet_api::report::ReflectorReport;
use refleet_api::report_credential::ReflectorIdentity;
use refleet_operator::router::Router;
use refleet_operator::router::reports::{StreamState, Taken};

mod support;
use support::{REGIONS, Shape, reflector, region, report, router};

const SHAPE: Shape = Shape {
    reflectors: 0,
    shards_per_reflector: 20,
    slots: |_| 20,
    users: |_| 10,
};

/// Every reflector's stream, each having counted one report (and been sent its settings).
struct Fleet {
    router: Arc<Router>,
    streams: Vec<StreamState>,
    reports: Vec<ReflectorReport>,
    encoded: Vec<Vec<u8>>,
}

fn fleet(reflectors: usize) -> Fleet {
    let shape = Shape {
        reflectors,
        ..SHAPE
    };
    let router = router(&shape);
    let mut streams = Vec::with_capacity(reflectors);
    let mut reports = Vec::with_capacity(reflectors);
    for i in 0..reflectors {
        let mut stream = StreamState::new(Some(ReflectorIdentity {
            reflector: reflector(i),
            region: region(i % REGIONS),
        }));
        let first = report(&shape, i, 1);
        match stream.take(&router, &first, |_| {}) {
            Ok(Taken::Counted(settings)) => assert_eq!(settings.len(), shape.shards_per_reflector),
            other => panic!("the first report was not counted: {other:?}"),
        }
        // The steady state the benchmark times: counted, nothing new to send.
        let second = report(&shape, i, 2);
        match stream.take(&router, &second, |_| {}) {
            Ok(Taken::Counted(settings)) => assert!(settings.is_empty(), "{settings:?}"),
            other => panic!("the second report was not counted: {other:?}"),
        }
        streams.push(stream);
        reports.push(second);
    }
    let encoded = reports.iter().map(Message::encode_to_vec).collect();
    Fleet {
        router,
        streams,
        reports,
        encoded,
    }
}

fn bench(c: &mut Criterion) {
    let mut group = c.benchmark_group("report");
    for reflectors in [100, 5_000] {
        let mut f = fleet(reflectors);
        let mut next = 0usize;
        group.bench_function(format!("{reflectors}_reflectors/decode_alone"), |b| {
            b.iter(|| {
                next = (next + 1) % reflectors;
                ReflectorReport::decode(black_box(f.encoded[next].as_slice())).expect("decodes")
            })
        });
        group.bench_function(format!("{reflectors}_reflectors/take"), |b| {
            b.iter(|| {
                next = (next + 1) % reflectors;
                let Fleet {
                    router,
                    streams,
                    reports,
                    ..
                } = &mut f;
                let report = &mut reports[next];
                report.sequence += 1;
                streams[next].take(router, black_box(report), |_| {})
            })
        });
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
