//! Join-token costs: the router signs one per Route, a reflector verifies one per new view.
//!
//! `cargo bench -p refleet-api --bench token`

use std::hint::black_box;

use criterion::{Criterion, criterion_group, criterion_main};
use refleet_api::token::{JoinClaims, Signer, Verifier};

fn claims() -> JoinClaims {
    JoinClaims {
        app_id: "com.example.chat".into(),
        shard: "lobby~12".into(),
        persistence: true,
        expires_at: 1_800_000_000,
        key_id: String::new(),
        max_users: 100,
        reservation_id: 1 << 40,
    }
}

fn tokens(c: &mut Criterion) {
    let signer = Signer::new("k1", &[9; 32]);
    let mut verifier = Verifier::default();
    verifier
        .insert("k1", &signer.public_key())
        .unwrap_or_else(|e| panic!("{e}"));
    let token = signer.sign(claims());
    c.bench_function("sign", |b| b.iter(|| signer.sign(black_box(claims()))));
    c.bench_function("verify", |b| b.iter(|| verifier.verify(black_box(&token))));
}

criterion_group!(benches, tokens);
criterion_main!(benches);
