//! Fuzz target `files_path`: the reflector's files paths (`files::valid_segments`,
//! `files::classify`, split on `/` as the endpoint does) and the scoping of SNAP and SAVE URLs
//! to a session's own prefix (`files_scope::snapshot_path`, `files_scope::persisted_path`).
//!
//! Inputs: arbitrary text; paths and URLs assembled from the files base, the session's own
//! identity, another identity's, traversal and encoding tricks, then damaged byte by byte.
//!
//! Properties: no panic; an accepted path has 1–16 segments of `[A-Za-z0-9._~=+@-]`, none
//! empty, `.` or `..`, so it is relative, never climbs and names no other directory than it
//! spells; a path built from such segments is accepted; `classify` gives back the parts the
//! path was built from; an accepted SNAP URL is this reflector's files base, `/`, and the
//! returned path, which is one of the session's own two snapshot folders (its appId, code
//! hash when known, `<persistentId>.<sessionId>`, or the keyless `snapshots/<sessionId>`);
//! an accepted SAVE URL is under `apps/<appId>/<persistentId>/save/`; and each refusal is
//! the documented reason (another base, a bad path, another prefix, no identity).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Component, Path};

use refleet_files::endpoint::{Upload, classify, valid_segments};
use refleet_fuzz::{Arbitrary, Unstructured, mutate, word};
use refleet_reflector::session::core::Identity;
use refleet_reflector::session::files_scope::{OutOfScope, persisted_path, snapshot_path};

type R<T> = arbitrary::Result<T>;

const BASES: &[&str] = &["http://h:1/files", "https://files.example/f", "http://h:1"];
const PIECES: &[&str] = &[
    "apps",
    "snap",
    "save",
    "snapshots",
    "io.app",
    "PID",
    "SID",
    "CODE",
    "PID.SID",
    "com.victim",
    "OTHER",
    "PID.OTHER",
    "..",
    ".",
    "",
    "%2e%2e",
    "a..b",
    "0000000010_5.H",
    "x.snap",
    "H",
    "~",
    "@",
    "=+",
    "a b",
    "é",
    "\\",
    "?q",
    "#f",
];
const CHARSET: &[u8] = b"ABCXYZabcxyz0189._~=+@-";

fn identity(u: &mut Unstructured<'_>) -> R<Identity> {
    let pick = |u: &mut Unstructured<'_>, words: &[&str]| -> R<Option<String>> {
        Ok(if u.ratio(7u8, 8u8)? {
            Some(word(u, words)?)
        } else {
            None
        })
    };
    Ok(Identity {
        app_id: pick(u, &["io.app", "com.victim", "", "a.b"])?,
        persistent_id: pick(u, &["PID", "OTHER", "", "P.Q"])?,
        code_hash: pick(u, &["CODE", "OTHER", ""])?,
        ..Identity::default()
    })
}

/// A segment the path rules allow (1..=40 bytes of the allowed characters, not `.`/`..`).
fn good_segment(u: &mut Unstructured<'_>) -> R<String> {
    let n = u.int_in_range(1..=40usize)?;
    let mut s: String = (0..n)
        .map(|_| u.choose(CHARSET).map(|&b| b as char))
        .collect::<R<_>>()?;
    if s == "." || s == ".." {
        s.push('x');
    }
    Ok(s)
}

/// The files path after the base: pieces that may belong to `me` or someone else.
fn files_path(u: &mut Unstructured<'_>, me: &Identity, sid: &str) -> R<String> {
    let mine = [
        me.app_id.clone().unwrap_or_default(),
        me.persistent_id.clone().unwrap_or_default(),
        me.code_hash.clone().unwrap_or_default(),
        format!("{}.{sid}", me.persistent_id.as_deref().unwrap_or_default()),
        sid.to_owned(),
    ];
    let shape: &[&str] = match u.int_in_range(0..=3u8)? {
        0 => &["apps", "*", "snap", "*", "*", "*"],
        1 => &["apps", "*", "*", "save", "*"],
        2 => &["snapshots", "*", "*"],
        _ => &[],
    };
    let n = if shape.is_empty() {
        u.int_in_range(0..=18usize)?
    } else {
        shape.len()
    };
    let mut segs = Vec::with_capacity(n);
    for i in 0..n {
        let fixed = shape
            .get(i)
            .filter(|s| **s != "*" && u.ratio(15u8, 16u8).unwrap_or(true));
        segs.push(match (fixed, u.int_in_range(0..=3u8)?) {
            (Some(s), _) => (*s).to_owned(),
            (None, 0 | 1) => u.choose(&mine)?.clone(),
            (None, 2) => word(u, PIECES)?,
            (None, _) => good_segment(u)?,
        });
    }
    Ok(segs.join("/"))
}

fn check_accepted_path(path: &str, segs: &[&str]) {
    assert!((1..=16).contains(&segs.len()), "{path:?}");
    for s in segs {
        assert!(!s.is_empty() && *s != "." && *s != "..", "{path:?}");
        assert!(
            s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"._~=+@-".contains(&b)),
            "{path:?}"
        );
    }
    // As a filesystem or object-store path: relative, plain names only, the same names.
    let comps: Vec<Component<'_>> = Path::new(path).components().collect();
    assert_eq!(comps.len(), segs.len(), "{path:?}");
    assert!(
        comps.iter().all(|c| matches!(c, Component::Normal(_))),
        "{path:?}"
    );
}

fn one(u: &mut Unstructured<'_>) -> R<()> {
    // The endpoint: any text after `/files/`, split on '/'.
    let path = match u.int_in_range(0..=2u8)? {
        0 => <&str>::arbitrary(u)?.to_owned(),
        1 => {
            let me = identity(u)?;
            let path = files_path(u, &me, "SID")?;
            mutate(u, &path)?
        }
        _ => {
            let n = u.int_in_range(1..=16usize)?;
            let segs: Vec<String> = (0..n).map(|_| good_segment(u)).collect::<R<_>>()?;
            let path = segs.join("/");
            let split: Vec<&str> = path.split('/').collect();
            assert_eq!(valid_segments(&split), Ok(()), "{path:?} is a valid path");
            path
        }
    };
    let segs: Vec<&str> = path.split('/').collect();
    if valid_segments(&segs).is_ok() {
        check_accepted_path(&path, &segs);
        match classify(&segs) {
            Some(Upload::Snapshot {
                app_id,
                persistent_id,
                session_id,
            }) => {
                assert_eq!(segs.len(), 6);
                assert_eq!((segs[0], segs[1], segs[2]), ("apps", app_id, "snap"));
                assert_eq!(segs[4], format!("{persistent_id}.{session_id}"));
                assert!(!persistent_id.contains('.'));
            }
            Some(Upload::Persisted {
                app_id,
                persistent_id,
            }) => assert_eq!(
                (segs.len(), segs[0], segs[1], segs[2], segs[3]),
                (5, "apps", app_id, persistent_id, "save")
            ),
            Some(Upload::KeylessSnapshot { session_id }) => {
                assert_eq!((segs.len(), segs[0], segs[1]), (3, "snapshots", session_id));
            }
            None => {}
        }
    }

    // SNAP and SAVE URLs against one session's identity.
    let base = *u.choose(BASES)?;
    let me = identity(u)?;
    let sid = word(u, &["SID", "OTHER", "S.ID", ""])?;
    let url = match u.int_in_range(0..=4u8)? {
        0 => <&str>::arbitrary(u)?.to_owned(),
        1 => {
            let url = format!("{base}/{}", files_path(u, &me, &sid)?);
            mutate(u, &url)?
        }
        2 => format!("{}/{}", u.choose(BASES)?, files_path(u, &me, &sid)?),
        _ => format!("{base}/{}", files_path(u, &me, &sid)?),
    };
    let rest = url.strip_prefix(base).and_then(|r| r.strip_prefix('/'));
    let rest_segs: Option<Vec<&str>> = rest.map(|r| r.split('/').collect());
    let bad_path = rest_segs
        .as_ref()
        .is_some_and(|s| valid_segments(s).is_err());

    match snapshot_path(base, &me, &sid, &url) {
        Ok(p) => {
            assert_eq!(Some(p.as_str()), rest, "{url:?} kept as {p:?}");
            let segs: Vec<&str> = p.split('/').collect();
            check_accepted_path(&p, &segs);
            match segs.as_slice() {
                ["snapshots", s, _file] => assert_eq!(*s, sid),
                ["apps", app, "snap", code, folder, _file] => {
                    assert_eq!(Some(*app), me.app_id.as_deref(), "{url:?}");
                    if let Some(c) = &me.code_hash {
                        assert_eq!(code, c, "{url:?}");
                    }
                    let pid = me.persistent_id.as_deref().expect("accepted without a pid");
                    assert_eq!(*folder, format!("{pid}.{sid}"), "{url:?}");
                }
                _ => panic!("{url:?} accepted as a snapshot path {p:?}"),
            }
        }
        Err(why) => match rest {
            None => assert_eq!(why, OutOfScope::ForeignBase, "{url:?}"),
            Some(_) if bad_path => assert_eq!(why, OutOfScope::BadPath, "{url:?}"),
            Some(_) => assert!(
                [OutOfScope::ForeignPrefix, OutOfScope::NoIdentity].contains(&why),
                "{url:?}: {why:?}"
            ),
        },
    }

    match persisted_path(base, &me, &url) {
        Ok(()) => {
            let segs = rest_segs.expect("accepted under another base");
            check_accepted_path(rest.unwrap_or_default(), &segs);
            assert_eq!(segs.len(), 5, "{url:?}");
            assert_eq!(
                (segs[0], Some(segs[1]), Some(segs[2]), segs[3]),
                (
                    "apps",
                    me.app_id.as_deref(),
                    me.persistent_id.as_deref(),
                    "save"
                ),
                "{url:?}"
            );
        }
        Err(why) => {
            let no_identity = me.app_id.is_none() || me.persistent_id.is_none();
            let want = if no_identity {
                OutOfScope::NoIdentity
            } else if rest.is_none() {
                OutOfScope::ForeignBase
            } else if bad_path {
                OutOfScope::BadPath
            } else {
                OutOfScope::ForeignPrefix
            };
            assert_eq!(why, want, "{url:?}");
        }
    }
    Ok(())
}

#[test]
fn fuzz_files_path() {
    refleet_fuzz::run("files_path", 20_000, one);
}
