//! Fuzz target `token`: join-token parsing and checks (`refleet_api::token`):
//! `Verifier::verify`, `Verifier::parse_list`, `JoinClaims::check_join`.
//!
//! Inputs: arbitrary text; genuine tokens signed at start-up (several claims, the router's key,
//! a forged key under the same id, an unknown key id) damaged byte by byte or spliced
//! together; tokens signed for generated claims (1 input in 16: signing costs more than
//! everything else); key lists, valid and damaged.
//!
//! Properties: no panic; the documented refusals (empty → `Missing`, over 1024 bytes or
//! without a `.` → `Malformed`); a token verifies only if it is, byte for byte, one the
//! router's key signed, and then gives back exactly the claims signed (no other spelling of
//! a signed token is accepted: base64 and signature are canonical); sign then verify
//! round-trips any claims (with the key id set) short enough to fit; `check_join` is expiry
//! then identity, exactly; a formatted key list parses back to a verifier that accepts the
//! same tokens.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use refleet_api::token::{JoinClaims, MAX_TOKEN_LEN, Signer, TokenError, Verifier};
use refleet_fuzz::{Arbitrary, Unstructured, mutate, word};

type R<T> = arbitrary::Result<T>;

struct World {
    router: Signer,
    verifier: Verifier,
    /// Signed tokens, their claims, and whether the router's key signed them.
    tokens: Vec<(String, JoinClaims, bool)>,
}

fn claims(u: &mut Unstructured<'_>) -> R<JoinClaims> {
    Ok(JoinClaims {
        app_id: word(u, &["app", "com.example.chat", ""])?,
        shard: word(u, &["lobby", "lobby~2", ""])?,
        persistence: u.arbitrary()?,
        expires_at: i64::arbitrary(u)?,
        key_id: String::new(),
        max_users: u.arbitrary()?,
        reservation_id: u.arbitrary()?,
    })
}

fn world() -> World {
    let router = Signer::new("k1", &[3; 32]);
    let forged = Signer::new("k1", &[4; 32]);
    let unknown = Signer::new("k2", &[5; 32]);
    let mut verifier = Verifier::default();
    verifier.insert("k1", &router.public_key()).unwrap();
    let mut tokens = Vec::new();
    let mut seed = refleet_fuzz::Rng::new(1);
    for i in 0..48 {
        let mut bytes = [0u8; 64];
        seed.fill(&mut bytes);
        let mut c = claims(&mut Unstructured::new(&bytes)).unwrap();
        let signer = [&router, &router, &forged, &unknown][i % 4];
        c.key_id = signer.key_id().to_owned();
        tokens.push((signer.sign(c.clone()), c, i % 4 < 2));
    }
    World {
        router,
        verifier,
        tokens,
    }
}

fn check_verify(w: &World, token: &str) {
    match w.verifier.verify(token) {
        Ok(c) => {
            let genuine = w.tokens.iter().find(|t| t.0 == token);
            let Some((_, signed, true)) = genuine else {
                panic!("{token:?} verified as {c:?} but the router never signed it");
            };
            assert_eq!(&c, signed);
        }
        Err(e) => {
            if token.is_empty() {
                assert_eq!(e, TokenError::Missing);
            } else if token.len() > MAX_TOKEN_LEN {
                assert_eq!(e, TokenError::Malformed("too long"));
            } else if !token.contains('.') {
                assert_eq!(e, TokenError::Malformed("no signature part"));
            }
            assert!(
                ["missing_token", "invalid_token"].contains(&e.reason()),
                "{token:?}: {e:?}"
            );
        }
    }
}

fn one(u: &mut Unstructured<'_>, w: &World) -> R<()> {
    match u.int_in_range(0..=15u8)? {
        0 | 1 => check_verify(w, <&str>::arbitrary(u)?),
        2..=9 => {
            let t = &u.choose(&w.tokens)?.0;
            check_verify(w, &mutate(u, t)?);
        }
        10 | 11 => {
            // Claims of one token with the signature of another.
            let (a, b) = (&u.choose(&w.tokens)?.0, &u.choose(&w.tokens)?.0);
            let (ca, _) = a.split_once('.').unwrap();
            let (_, sb) = b.split_once('.').unwrap();
            check_verify(w, &format!("{ca}.{sb}"));
        }
        12 | 13 => {
            // A genuine token verifies; the expiry and identity checks are exactly that.
            let (t, c, genuine) = u.choose(&w.tokens)?;
            check_verify(w, t);
            if *genuine {
                let app = word(u, &["app", "com.example.chat", "", &c.app_id])?;
                let shard = word(u, &["lobby", "lobby~2", "", &c.shard])?;
                let now = match u.int_in_range(0..=2u8)? {
                    0 => c.expires_at.saturating_sub(1),
                    1 => c.expires_at,
                    _ => i64::arbitrary(u)?,
                };
                let got = c.check_join(&app, &shard, now);
                let want = if now >= c.expires_at {
                    Err("expired_token")
                } else if app != c.app_id || shard != c.shard {
                    Err("wrong_shard")
                } else {
                    Ok(())
                };
                assert_eq!(got.map_err(|e| e.reason()), want);
            }
        }
        14 => {
            // Key lists: a formatted one round-trips; damaged ones never panic.
            let kid = word(u, &["k1", "k 2", "", "a=b"])?;
            let list = Verifier::format_key(&kid, &w.router.public_key());
            if !kid.contains([',', '=']) && kid.trim() == kid {
                let v = Verifier::parse_list(&list).unwrap_or_else(|e| panic!("{list:?}: {e}"));
                assert!(!v.is_empty());
                if kid == "k1" {
                    let genuine = w.tokens.iter().find(|t| t.2).expect("a genuine token");
                    assert_eq!(v.verify(&genuine.0).as_ref(), Ok(&genuine.1));
                }
            }
            let _ = Verifier::parse_list(&mutate(u, &list)?);
            let _ = Verifier::parse_list(<&str>::arbitrary(u)?);
        }
        _ => {
            // Sign then verify round-trips any claims that fit.
            let mut c = JoinClaims {
                app_id: String::arbitrary(u)?,
                shard: String::arbitrary(u)?,
                ..claims(u)?
            };
            let token = w.router.sign(c.clone());
            c.key_id = w.router.key_id().to_owned();
            match w.verifier.verify(&token) {
                Ok(got) => assert_eq!(got, c),
                Err(e) => {
                    assert!(token.len() > MAX_TOKEN_LEN, "{token:?}: {e}");
                    assert_eq!(e, TokenError::Malformed("too long"));
                }
            }
        }
    }
    Ok(())
}

#[test]
fn fuzz_token() {
    let w = world();
    refleet_fuzz::run("token", 400, |u| one(u, &w));
}
