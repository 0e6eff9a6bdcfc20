//! Fuzz target `report_credential`: the report-stream credential
//! (`refleet_api::report_credential`): `ReportKey::credential` and `ReportKey::verify`.
//!
//! Inputs: arbitrary text; credentials minted at start-up for names with and without dots,
//! damaged byte by byte, with parts swapped between credentials, or under another key;
//! generated reflector and region names to mint.
//!
//! Properties: no panic; a credential verifies only if it is, byte for byte, one this key
//! minted, and then names exactly the reflector and region it was minted for (another key's,
//! a renamed or re-regioned one, another spelling of the MAC: refused); mint then verify
//! round-trips; minting refuses exactly the names the rules exclude (empty, too long, not
//! visible ASCII, a dot in the region), and every refusal carries its documented reason.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use refleet_api::report_credential::{
    CredentialError, MAX_CREDENTIAL_LEN, ReflectorIdentity, ReportKey,
};
use refleet_fuzz::{Arbitrary, Unstructured, mutate, word};

type R<T> = arbitrary::Result<T>;

const NAMES: &[&str] = &[
    "arena-eu-0",
    "arena.v2-eu-0",
    "r",
    "a.b.c",
    "x",
    "arena-eu-1",
];
const REGIONS: &[&str] = &["eu", "us", "e", "eu-west-1"];

struct World {
    key: ReportKey,
    other: ReportKey,
    /// Credentials this key minted, and who for.
    minted: Vec<(String, ReflectorIdentity)>,
    /// Credentials another key minted.
    foreign: Vec<String>,
}

fn world() -> World {
    let key = ReportKey::new(&[1; 32]).unwrap();
    let other = ReportKey::new(&[2; 32]).unwrap();
    let mut minted = Vec::new();
    let mut foreign = Vec::new();
    for n in NAMES {
        for r in REGIONS {
            minted.push((
                key.credential(n, r).unwrap(),
                ReflectorIdentity {
                    reflector: (*n).into(),
                    region: (*r).into(),
                },
            ));
            foreign.push(other.credential(n, r).unwrap());
        }
    }
    World {
        key,
        other,
        minted,
        foreign,
    }
}

/// Whether minting must accept `name` (`max` bytes, dots allowed or not).
fn mintable(name: &str, max: usize, dots: bool) -> bool {
    !name.is_empty()
        && name.len() <= max
        && name.bytes().all(|b| b.is_ascii_graphic())
        && (dots || !name.contains('.'))
}

fn check_verify(w: &World, credential: &str) {
    match w.key.verify(credential) {
        Ok(id) => {
            let minted = w.minted.iter().find(|m| m.0 == credential);
            match minted {
                Some((_, who)) => assert_eq!(&id, who),
                // Minted during this run by the round-trip case: it must be the same text.
                None => assert_eq!(
                    w.key.credential(&id.reflector, &id.region).as_deref(),
                    Ok(credential),
                    "{credential:?} verified as {id:?} but is not what the key mints"
                ),
            }
        }
        Err(e) => {
            assert!(
                ["malformed_credential", "bad_credential"].contains(&e.reason()),
                "{credential:?}: {e:?}"
            );
            if credential.len() > MAX_CREDENTIAL_LEN {
                assert_eq!(e, CredentialError::Malformed("too long"));
            }
            if w.minted.iter().any(|m| m.0 == credential) {
                panic!("minted credential {credential:?} refused: {e:?}");
            }
        }
    }
}

fn one(u: &mut Unstructured<'_>, w: &World) -> R<()> {
    match u.int_in_range(0..=7u8)? {
        0 => check_verify(w, <&str>::arbitrary(u)?),
        1..=3 => {
            let c = &u.choose(&w.minted)?.0;
            check_verify(w, &mutate(u, c)?);
        }
        4 => {
            // Another operator's credential, or parts of two credentials spliced.
            let f = u.choose(&w.foreign)?;
            assert_eq!(w.key.verify(f), Err(CredentialError::BadMac));
            let a = &u.choose(&w.minted)?.0;
            let b = &u.choose(&w.minted)?.0;
            let (name_a, _) = a.rsplit_once('.').unwrap();
            let (_, mac_b) = b.rsplit_once('.').unwrap();
            check_verify(w, &format!("{name_a}.{mac_b}"));
        }
        5 => {
            let (c, who) = u.choose(&w.minted)?;
            assert_eq!(w.key.verify(c).as_ref(), Ok(who));
            assert!(w.other.verify(c).is_err());
        }
        _ => {
            // Mint for generated names: refused exactly by the rules, else round-trips.
            let reflector = word(u, NAMES)?;
            let region = word(u, REGIONS)?;
            let ok = mintable(&reflector, 253, true) && mintable(&region, 63, false);
            match w.key.credential(&reflector, &region) {
                Ok(c) => {
                    assert!(ok, "minted for {reflector:?} in {region:?}");
                    assert_eq!(
                        w.key.verify(&c),
                        Ok(ReflectorIdentity {
                            reflector: reflector.clone(),
                            region: region.clone()
                        })
                    );
                    check_verify(w, &mutate(u, &c)?);
                }
                Err(e) => {
                    assert!(!ok, "refused to mint for {reflector:?} in {region:?}: {e}");
                    assert_eq!(e.reason(), "unmintable");
                }
            }
        }
    }
    Ok(())
}

#[test]
fn fuzz_report_credential() {
    let w = world();
    refleet_fuzz::run("report_credential", 20_000, |u| one(u, &w));
}
