//! Which stored-data URLs a session may name in SNAP and SAVE.
//!
//! A client announces where it uploaded a snapshot (SNAP) or persisted data (SAVE) as a full
//! URL, and the reflector records that URL, hands it to late joiners and the next session,
//! and prunes old snapshots next to it. Any member can send any URL, so without a check one
//! session could point another app's persistence record at its own data, or make the
//! retention pruning delete another session's snapshots. A URL is accepted only when it is
//! on this reflector's files base and under the prefix of the identity the session was
//! admitted under:
//!
//! ```text
//! snapshot   <files>/apps/<appId>/snap/<codeHash>/<persistentId>.<sessionId>/<file>
//!            <files>/snapshots/<sessionId>/<file>                (clients without an apiKey)
//! persisted  <files>/apps/<appId>/<persistentId>/save/<dataHash>
//! ```

use super::core::Identity;
use refleet_files::endpoint::valid_segments;

/// Why a SNAP or SAVE URL was not accepted (metric label values).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutOfScope {
    /// Not under this reflector's files base.
    ForeignBase,
    /// Under the files base, but not a well-formed files path.
    BadPath,
    /// A files path, but not under this session's own prefix.
    ForeignPrefix,
    /// The session has no appId or persistentId to scope the URL with.
    NoIdentity,
}

impl OutOfScope {
    /// The metric label of this reason (one of `metrics::STORED_URL_REASONS`).
    pub fn label(self) -> &'static str {
        match self {
            Self::ForeignBase => "foreign_base",
            Self::BadPath => "bad_path",
            Self::ForeignPrefix => "foreign_prefix",
            Self::NoIdentity => "no_identity",
        }
    }
}

/// The files path of `url` (the part after `<files_base>/`), split into checked segments.
fn files_path<'u>(files_base: &str, url: &'u str) -> Result<Vec<&'u str>, OutOfScope> {
    let rest = url
        .strip_prefix(files_base)
        .and_then(|r| r.strip_prefix('/'))
        .ok_or(OutOfScope::ForeignBase)?;
    let segments: Vec<&str> = rest.split('/').collect();
    valid_segments(&segments).map_err(|_| OutOfScope::BadPath)?;
    Ok(segments)
}

/// Checks a SNAP URL; on success returns its files path (the key pruning works next to).
pub fn snapshot_path(
    files_base: &str,
    identity: &Identity,
    session_id: &str,
    url: &str,
) -> Result<String, OutOfScope> {
    let segments = files_path(files_base, url)?;
    let own = match segments.as_slice() {
        ["snapshots", sid, _file] => *sid == session_id,
        ["apps", app, "snap", code, folder, _file] => {
            let (Some(my_app), Some(my_pid)) = (&identity.app_id, &identity.persistent_id) else {
                return Err(OutOfScope::NoIdentity);
            };
            let code_ok = identity.code_hash.as_deref().is_none_or(|c| c == *code);
            *app == my_app.as_str()
                && code_ok
                && folder.split_once('.') == Some((my_pid.as_str(), session_id))
        }
        _ => false,
    };
    if own {
        Ok(segments.join("/"))
    } else {
        Err(OutOfScope::ForeignPrefix)
    }
}

/// Checks a SAVE URL against the session's persistence prefix.
pub fn persisted_path(files_base: &str, identity: &Identity, url: &str) -> Result<(), OutOfScope> {
    let (Some(my_app), Some(my_pid)) = (&identity.app_id, &identity.persistent_id) else {
        return Err(OutOfScope::NoIdentity);
    };
    match files_path(files_base, url)?.as_slice() {
        ["apps", app, pid, "save", _hash] if *app == my_app.as_str() && *pid == my_pid.as_str() => {
            Ok(())
        }
        _ => Err(OutOfScope::ForeignPrefix),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: &str = "http://h:1/files";

    fn me() -> Identity {
        Identity {
            app_id: Some("io.app".into()),
            persistent_id: Some("PID".into()),
            code_hash: Some("CODE".into()),
            ..Identity::default()
        }
    }

    #[test]
    fn only_the_sessions_own_snapshot_folder_is_accepted() {
        let ok = format!("{BASE}/apps/io.app/snap/CODE/PID.SID/0000000010_5.H");
        assert_eq!(
            snapshot_path(BASE, &me(), "SID", &ok).as_deref(),
            Ok("apps/io.app/snap/CODE/PID.SID/0000000010_5.H")
        );
        let keyless = format!("{BASE}/snapshots/SID/0000000010_5-H.snap");
        assert!(snapshot_path(BASE, &me(), "SID", &keyless).is_ok());
        for (url, why) in [
            (
                format!("{BASE}/apps/com.victim/snap/CODE/PID.SID/0000000010_5.H"),
                OutOfScope::ForeignPrefix,
            ),
            (
                format!("{BASE}/apps/io.app/snap/CODE/PID.OTHER/0000000010_5.H"),
                OutOfScope::ForeignPrefix,
            ),
            (
                format!("{BASE}/apps/io.app/snap/OTHER/PID.SID/0000000010_5.H"),
                OutOfScope::ForeignPrefix,
            ),
            (
                format!("{BASE}/apps/io.app/PID/save/H"),
                OutOfScope::ForeignPrefix,
            ),
            (
                format!("{BASE}/snapshots/OTHER/x.snap"),
                OutOfScope::ForeignPrefix,
            ),
            (
                "http://elsewhere/files/apps/io.app/snap/CODE/PID.SID/1_1.H".into(),
                OutOfScope::ForeignBase,
            ),
            (
                format!("{BASE}x/apps/io.app/snap/CODE/PID.SID/1_1.H"),
                OutOfScope::ForeignBase,
            ),
            (
                format!("{BASE}/apps/io.app/snap/CODE/PID.SID/../../x"),
                OutOfScope::BadPath,
            ),
        ] {
            assert_eq!(snapshot_path(BASE, &me(), "SID", &url), Err(why), "{url}");
        }
    }

    #[test]
    fn only_the_sessions_own_persistence_prefix_is_accepted() {
        assert_eq!(
            persisted_path(BASE, &me(), &format!("{BASE}/apps/io.app/PID/save/H")),
            Ok(())
        );
        for url in [
            format!("{BASE}/apps/com.victim/PID/save/H"),
            format!("{BASE}/apps/io.app/OTHER/save/H"),
            format!("{BASE}/apps/io.app/PID/save/H/more"),
        ] {
            assert_eq!(
                persisted_path(BASE, &me(), &url),
                Err(OutOfScope::ForeignPrefix),
                "{url}"
            );
        }
        assert_eq!(
            persisted_path(
                BASE,
                &Identity::default(),
                &format!("{BASE}/apps/io.app/PID/save/H")
            ),
            Err(OutOfScope::NoIdentity)
        );
    }
}
