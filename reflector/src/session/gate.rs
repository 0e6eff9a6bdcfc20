//! A session's door: the identity it was admitted under and the views it let in.
//!
//! The policy (what a token must say) is [`crate::admission`]'s; this keeps what one session
//! must remember to apply it: its [`Binding`], and for every admitted view the [`Proof`] it
//! came with, so that a returning view can be told from someone who copied its `user`
//! record out of a `users` message. Both are stored with the session's state, so they hold
//! across a restart. Views are known by the fingerprint of their user record, so what one
//! costs does not grow with the record (a JOIN may carry up to a frame's worth of it).

use std::collections::HashMap;

use super::stored::StoredSession;
use crate::admission::{Admission, Admitted, Binding, Fingerprint, Presented, Proof, Requested};

/// What one session remembers about admission.
#[derive(Debug, Default)]
pub(crate) struct Gate {
    binding: Option<Binding>,
    /// Admitted views by the fingerprint of their user record (JSON text), with the proof
    /// they were admitted with (`None` when they came without a token to a reflector that
    /// does not require one).
    views: HashMap<Fingerprint, Option<Proof>>,
    /// The session's stored state has been looked for (and restored when found).
    pub resumed: bool,
    /// The session is set up: resumed, or persisted data looked up for its first admitted
    /// JOIN.
    pub loaded: bool,
    /// This host's claim on the session in storage (0: not claimed); its stores present it.
    pub epoch: u64,
}

impl Gate {
    /// The identity the session is bound to, once it admitted a JOIN (or was restored).
    pub fn binding(&self) -> Option<&Binding> {
        self.binding.as_ref()
    }

    /// Whether `view` (the fingerprint of a JOIN's user record, see [`view_of`]) was
    /// admitted before and proves it with `presented`. `member`: the core still counts it as
    /// a member (e.g. a ghost of a resumed session).
    pub fn known(
        &self,
        admission: &Admission,
        view: Option<Fingerprint>,
        member: bool,
        presented: Option<&Presented>,
    ) -> bool {
        let Some(view) = view else { return false };
        let admitted = self.views.get(&view);
        if admitted.is_none() && !member {
            return false;
        }
        admission.proves(admitted.copied().flatten(), presented)
    }

    /// Whether `view` was admitted with a token other than the one `presented`: someone who
    /// read its user record in a `users` message, or a client of the same shard that must
    /// not take over another's membership.
    pub fn taken(
        &self,
        admission: &Admission,
        view: Option<Fingerprint>,
        presented: Option<&Presented>,
    ) -> bool {
        let Some(Some(proof)) = view.and_then(|v| self.views.get(&v)) else {
            return false;
        };
        !admission.proves(Some(*proof), presented)
    }

    /// Records an admitted JOIN; the first one binds the session. Beyond its `members`, it
    /// remembers up to `former` views (`--former-views`), then forgets half of them: a view
    /// that left long ago must show a fresh token.
    pub fn admit(
        &mut self,
        view: Option<Fingerprint>,
        presented: Option<&Presented>,
        admitted: Admitted,
        req: Requested<'_>,
        members: usize,
        former: usize,
    ) {
        self.binding.get_or_insert_with(|| Binding {
            app_id: req.app_id.to_owned(),
            shard: req.shard.to_owned(),
            max_users: admitted.token_max_users,
            persistence: admitted.persistence,
        });
        if let Some(view) = view {
            if self.views.len() >= former.saturating_add(members).max(1) {
                // Keep the map bounded by forgetting half of it, whichever views those are: a
                // forgotten view only needs a fresh token to come back.
                let keep = former / 2;
                let mut n = 0;
                self.views.retain(|_, _| {
                    n += 1;
                    n <= keep
                });
            }
            self.views.insert(view, presented.map(|p| p.proof));
        }
    }

    /// Takes the binding and admitted views of a stored session. Records written before
    /// bindings were stored are bound to the identity they were stored under.
    pub fn restore(&mut self, stored: &StoredSession) {
        self.binding = stored.binding.clone().or_else(|| {
            let app_id = stored.app_id.clone()?;
            let name = stored.name.as_deref()?;
            let shard = refleet_core::shard::join_shard(name, &app_id).unwrap_or(name);
            Some(Binding {
                shard: shard.to_owned(),
                app_id,
                max_users: 0,
                persistence: None,
            })
        });
        // Records of earlier versions name views by their user record itself.
        let legacy = stored
            .views
            .iter()
            .map(|(user, proof)| (Fingerprint::of(user), Proof::from_hex(proof)));
        let keyed = stored
            .view_keys
            .iter()
            .filter_map(|(key, proof)| Some((Fingerprint::from_hex(key)?, Proof::from_hex(proof))));
        self.views = legacy.chain(keyed).collect();
    }

    /// Writes the binding and admitted views into a record about to be stored.
    pub fn fill(&self, stored: &mut StoredSession) {
        stored.binding.clone_from(&self.binding);
        stored.view_keys = self
            .views
            .iter()
            .filter_map(|(u, p)| Some((u.to_hex(), p.as_ref()?.to_hex())))
            .collect();
    }
}

/// The key a JOIN's user record (JSON text) is remembered by: computed once per JOIN, since
/// a record may be up to a frame long.
pub fn view_of(user: Option<&str>) -> Option<Fingerprint> {
    user.map(Fingerprint::of)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    const REQ: Requested<'static> = Requested {
        app_id: "io.refleet.test",
        shard: "lobby",
    };

    fn admit(
        gate: &mut Gate,
        user: &str,
        presented: Option<&Presented>,
        members: usize,
        former: usize,
    ) {
        gate.admit(
            view_of(Some(user)),
            presented,
            Admitted::default(),
            REQ,
            members,
            former,
        );
    }

    fn known(
        gate: &Gate,
        admission: &Admission,
        user: &str,
        presented: Option<&Presented>,
    ) -> bool {
        gate.known(admission, view_of(Some(user)), false, presented)
    }

    fn taken(gate: &Gate, admission: &Admission, user: &str, presented: &Presented) -> bool {
        gate.taken(admission, view_of(Some(user)), Some(presented))
    }

    fn presented(token: &str) -> Presented {
        Presented {
            check: Err(refleet_api::token::TokenError::Missing),
            proof: Proof::of(token),
        }
    }

    fn stored(views: serde_json::Value) -> StoredSession {
        serde_json::from_value(serde_json::json!({
            "format": 1, "session_id": "s", "timeline": "t", "time": 0, "seq": 0,
            "tick_ms": 100, "delay_ms": 0, "scale": 1.0, "leave_delay_ms": 0,
            "completed_tallies": [], "users": [], "stored_at_ms": 0, "views": views,
        }))
        .unwrap()
    }

    #[test]
    fn former_views_stay_within_the_limit_while_views_churn() {
        let mut gate = Gate::default();
        let open = Admission::new(false, Default::default());
        for i in 0..10_000 {
            admit(&mut gate, &format!("{{\"id\":\"v{i}\"}}"), None, 3, 64);
            assert!(
                gate.views.len() <= 64 + 3,
                "{} views at {i}",
                gate.views.len()
            );
        }
        // The newest view is always remembered; all but a few of the old ones are forgotten
        // (which ones stay depends on the map's order).
        assert!(known(&gate, &open, "{\"id\":\"v9999\"}", None));
        let old_known = (0..5_000)
            .filter(|i| known(&gate, &open, &format!("{{\"id\":\"v{i}\"}}"), None))
            .count();
        assert!(
            old_known <= 64 + 3,
            "{old_known} of the first 5 000 still known"
        );
        assert!(gate.views.len() >= 32, "half is kept: {}", gate.views.len());
    }

    #[test]
    fn with_no_former_views_only_the_latest_is_remembered() {
        let mut gate = Gate::default();
        for i in 0..100 {
            admit(&mut gate, &format!("v{i}"), None, 0, 0);
            assert!(gate.views.len() <= 1);
        }
    }

    #[test]
    fn views_with_huge_user_records_are_stored_as_fixed_size_fingerprints() {
        let required = Admission::new(true, Default::default());
        let mut gate = Gate::default();
        let record =
            |i: usize| format!("{{\"id\":\"v{i}\",\"data\":\"{}\"}}", "x".repeat(64 << 10));
        for i in 0..50 {
            admit(
                &mut gate,
                &record(i),
                Some(&presented(&format!("token-{i}"))),
                0,
                1024,
            );
        }
        let mut out = stored(serde_json::json!({}));
        gate.fill(&mut out);
        let json = serde_json::to_string(&out).unwrap();
        // 50 entries of two 32-digit hex strings, not 50 × 64 KiB of user records.
        assert!(json.len() < 50 * 100 + 1000, "{} bytes stored", json.len());
        assert_eq!(out.view_keys.len(), 50);
        // Restored elsewhere, a view is known with its own token and taken with another.
        let mut back = Gate::default();
        back.restore(&serde_json::from_str(&json).unwrap());
        let own = presented("token-7");
        let other = presented("token-8");
        assert!(known(&back, &required, &record(7), Some(&own)));
        assert!(!known(&back, &required, &record(7), Some(&other)));
        assert!(taken(&back, &required, &record(7), &other));
        assert!(!known(&back, &required, &record(99), Some(&own)));
    }

    #[test]
    fn records_of_earlier_versions_keyed_by_user_record_still_restore() {
        let required = Admission::new(true, Default::default());
        let proof = Proof::of("token-a").to_hex();
        let mut gate = Gate::default();
        gate.restore(&stored(serde_json::json!({ "\"view-1\"": proof })));
        assert!(known(
            &gate,
            &required,
            "\"view-1\"",
            Some(&presented("token-a"))
        ));
        assert!(taken(&gate, &required, "\"view-1\"", &presented("token-b")));
        // Written back in the new form only.
        let mut out = stored(serde_json::json!({}));
        gate.fill(&mut out);
        let json = serde_json::to_value(&out).unwrap();
        assert!(json.get("views").is_none(), "{json}");
        assert_eq!(out.view_keys.len(), 1);
    }
}
