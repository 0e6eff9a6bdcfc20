//! Who may join: join tokens and the shards' hard user caps.
//!
//! The router hands every client a signed token in the reflector URL
//! (`…/<token>/<sessionId>`). The connection verifies the signature once, at upgrade
//! ([`Admission::check_path`]); the session decides at the JOIN ([`Admission::decide`]),
//! because only it knows whether this view was admitted before: a reconnecting or rejoining
//! view passes even with an expired token (the client reuses the URL it was given), a new
//! view needs a valid, unexpired token for this appId and shard name. Refusals close with
//! 4103, which the client treats as final; a shard at its hard cap closes with 4105.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use refleet_api::token::{JoinClaims, TokenError, Verifier};

use crate::close::{self, Close};

/// The outcome of verifying a connection's token (signature and decoding only).
pub type TokenCheck = Result<JoinClaims, TokenError>;

/// Settings the operator sent for one shard.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ShardSettings {
    /// Hard user cap (0: none).
    pub max_users: u32,
    /// Whether SAVE records are kept.
    pub persistence: bool,
}

/// The admission policy of one reflector process.
#[derive(Debug, Default)]
pub struct Admission {
    required: bool,
    verifier: RwLock<Verifier>,
    shards: RwLock<HashMap<String, ShardSettings>>,
}

/// A JOIN that may proceed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Admitted {
    /// The router's reservation the view used (reported back so the router counts it).
    pub reservation: Option<u64>,
    /// The shard's hard cap as learnt from the token (0: unknown).
    pub max_users: u32,
}

/// A refused JOIN.
#[derive(Debug, Clone)]
pub struct Refusal {
    /// What the client gets.
    pub close: Close,
    /// Metric label (`missing_token`, `invalid_token`, `expired_token`, `wrong_shard`,
    /// `shard_full`).
    pub reason: &'static str,
    /// For the log line.
    pub detail: String,
}

fn read<T>(l: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    l.read().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn write<T>(l: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    l.write().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// The path segment before the session id, where the router puts the token.
pub fn token_segment(path: &str) -> &str {
    let mut it = path.rsplit('/');
    it.next();
    it.next().unwrap_or("")
}

impl Admission {
    /// A policy: with `required`, a new view needs a valid token; keys come from
    /// `--token-keys` and later from the operator.
    pub fn new(required: bool, verifier: Verifier) -> Arc<Self> {
        Arc::new(Self {
            required,
            verifier: RwLock::new(verifier),
            shards: RwLock::default(),
        })
    }

    /// Whether tokens are required.
    pub fn required(&self) -> bool {
        self.required
    }

    /// Replaces the accepted keys (rotation).
    pub fn set_keys(&self, verifier: Verifier) {
        *write(&self.verifier) = verifier;
    }

    /// Records the operator's settings for a shard.
    pub fn set_shard(&self, shard: &str, settings: ShardSettings) {
        write(&self.shards).insert(shard.to_owned(), settings);
    }

    /// The settings known for a shard.
    pub fn shard(&self, shard: &str) -> Option<ShardSettings> {
        read(&self.shards).get(shard).copied()
    }

    /// Whether a shard keeps persistent data (SAVE records and their look-up): the
    /// operator's shard settings when it sent some, else the router's token claim
    /// (`token_claim`: the first admitted token's), else on, the Session default.
    pub fn persistence(&self, shard: &str, token_claim: Option<bool>) -> bool {
        self.shard(shard)
            .map(|s| s.persistence)
            .or(token_claim)
            .unwrap_or(true)
    }

    /// Verifies the token in a WebSocket path. `None` when tokens are not required and the
    /// path carries nothing that looks like one.
    pub fn check_path(&self, path: &str) -> Option<Arc<TokenCheck>> {
        let segment = token_segment(path);
        if !self.required && !segment.contains('.') {
            return None;
        }
        // Tokens always hold a '.'; any other segment is just a path prefix of the URL.
        let check = if !segment.contains('.') {
            Err(TokenError::Missing)
        } else {
            read(&self.verifier).verify(segment)
        };
        Some(Arc::new(check))
    }

    /// Decides a JOIN. `known_view`: the view was admitted to this session before;
    /// `users`: members now; `now_unix`: wall-clock seconds.
    pub fn decide(
        &self,
        check: Option<&TokenCheck>,
        app_id: &str,
        name: &str,
        known_view: bool,
        users: usize,
        now_unix: i64,
    ) -> Result<Admitted, Refusal> {
        if known_view {
            return Ok(Admitted::default());
        }
        let claims = match check {
            Some(Ok(c)) => match c.check_join(app_id, name, now_unix) {
                Ok(()) => Some(c),
                Err(e) if self.required => return Err(refuse_token(&e)),
                Err(_) => None,
            },
            Some(Err(e)) if self.required => return Err(refuse_token(e)),
            None if self.required => return Err(refuse_token(&TokenError::Missing)),
            _ => None,
        };
        let cap = claims
            .map(|c| c.max_users)
            .filter(|&m| m > 0)
            .or_else(|| self.shard(name).map(|s| s.max_users).filter(|&m| m > 0));
        if let Some(cap) = cap
            && users >= cap as usize
        {
            return Err(Refusal {
                close: close::SESSION_FULL,
                reason: "shard_full",
                detail: format!("shard {name:?} is at its cap of {cap} users"),
            });
        }
        Ok(Admitted {
            reservation: claims.map(|c| c.reservation_id).filter(|&r| r != 0),
            max_users: cap.unwrap_or(0),
        })
    }
}

fn refuse_token(e: &TokenError) -> Refusal {
    Refusal {
        close: close::BAD_API_KEY.with_reason(e.to_string()),
        reason: e.reason(),
        detail: e.to_string(),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use refleet_api::token::Signer;

    fn setup(required: bool) -> (Signer, Arc<Admission>) {
        let signer = Signer::new("k1", &[3; 32]);
        let mut v = Verifier::default();
        v.insert("k1", &signer.public_key()).unwrap();
        (signer, Admission::new(required, v))
    }

    fn token(s: &Signer, shard: &str, exp: i64) -> String {
        s.sign(JoinClaims {
            app_id: "app".into(),
            shard: shard.into(),
            persistence: false,
            expires_at: exp,
            key_id: String::new(),
            max_users: 2,
            reservation_id: 7,
        })
    }

    #[test]
    fn persistence_comes_from_the_operator_then_the_token_then_defaults_on() {
        let (_, a) = setup(false);
        assert!(a.persistence("lobby", None));
        assert!(!a.persistence("lobby", Some(false)));
        a.set_shard(
            "lobby",
            ShardSettings {
                max_users: 10,
                persistence: true,
            },
        );
        assert!(
            a.persistence("lobby", Some(false)),
            "the operator's settings win"
        );
        assert!(!a.persistence("other", Some(false)));
    }

    #[test]
    fn the_token_is_the_segment_before_the_session_id() {
        assert_eq!(token_segment("/r/abc.def/0123"), "abc.def");
        assert_eq!(token_segment("/0123"), "");
        assert_eq!(token_segment("0123"), "");
    }

    #[test]
    fn required_tokens_admit_only_matching_unexpired_first_joins() {
        let (s, a) = setup(true);
        let path = format!("/{}/sid", token(&s, "lobby~1", 100));
        let check = a.check_path(&path).unwrap();
        let ok = a
            .decide(Some(&check), "app", "lobby~1", false, 0, 50)
            .unwrap();
        assert_eq!(
            ok,
            Admitted {
                reservation: Some(7),
                max_users: 2
            }
        );
        let refuse = |c: Option<&TokenCheck>, app, name, now| {
            a.decide(c, app, name, false, 0, now).unwrap_err()
        };
        assert_eq!(
            refuse(Some(&check), "app", "lobby~1", 100).reason,
            "expired_token"
        );
        assert_eq!(
            refuse(Some(&check), "app", "lobby~2", 50).reason,
            "wrong_shard"
        );
        assert_eq!(
            refuse(Some(&check), "other", "lobby~1", 50).reason,
            "wrong_shard"
        );
        let missing = a.check_path("/sid").unwrap();
        assert_eq!(
            refuse(Some(&missing), "app", "lobby~1", 50).reason,
            "missing_token"
        );
        let forged = a
            .check_path(&format!(
                "/{}/sid",
                token(&Signer::new("k1", &[4; 32]), "lobby~1", 100)
            ))
            .unwrap();
        let r = refuse(Some(&forged), "app", "lobby~1", 50);
        assert_eq!((r.reason, r.close.code), ("invalid_token", 4103));
        // A view admitted before passes whatever its token says now.
        assert!(
            a.decide(Some(&check), "app", "lobby~1", true, 5, 1_000)
                .is_ok()
        );
    }

    #[test]
    fn the_cap_holds_with_or_without_required_tokens() {
        let (s, a) = setup(true);
        let check = a
            .check_path(&format!("/{}/sid", token(&s, "x", 100)))
            .unwrap();
        let r = a
            .decide(Some(&check), "app", "x", false, 2, 50)
            .unwrap_err();
        assert_eq!((r.reason, r.close.code), ("shard_full", 4105));
        let (_, open) = setup(false);
        assert!(open.check_path("/plain/sid").is_none());
        assert!(open.decide(None, "app", "y", false, 1_000, 0).is_ok());
        open.set_shard(
            "y",
            ShardSettings {
                max_users: 3,
                persistence: true,
            },
        );
        assert_eq!(
            open.decide(None, "app", "y", false, 3, 0)
                .unwrap_err()
                .reason,
            "shard_full"
        );
        // Without the requirement a bad token is ignored rather than refused.
        let junk = open.check_path("/a.b/sid").unwrap();
        assert!(open.decide(Some(&junk), "app", "z", false, 0, 0).is_ok());
    }
}
