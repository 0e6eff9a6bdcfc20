//! Who may join: join tokens, the identity a session is bound to, and the shards' hard caps.
//!
//! The router hands every client a signed token in the reflector URL
//! (`…/<token>/<sessionId>`). The connection verifies the signature once, at upgrade
//! ([`Admission::check_path`]), and before a JOIN may create or look up anything it must
//! present a token for the appId and shard the JOIN names ([`Admission::precheck`]). The
//! session then decides ([`Admission::decide`]), because only it knows its binding and which
//! views it admitted before:
//!
//! - A session id belongs to the (appId, shard) of its first admitted JOIN for its whole life
//!   (the [`Binding`], stored with the session's state). A JOIN naming anything else is
//!   refused, whatever its token says, and the hard cap and persistence come from the
//!   binding, never from a later joiner.
//! - A new view needs a valid, unexpired token for the binding.
//! - A view admitted before may come back with the very token it was admitted with (the
//!   client reuses its URL), even after that token expired. Its `user` record alone proves
//!   nothing: every member sees it in `users` messages.
//!
//! Refusals close with 4103, which the client treats as final; a shard at its hard cap closes
//! with 4105.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use refleet_api::token::{JoinClaims, TokenError, Verifier};
use sha2::{Digest, Sha256};

use crate::close::{self, Close};

/// The outcome of verifying a connection's token (signature and decoding only).
pub type TokenCheck = Result<JoinClaims, TokenError>;

/// A 128-bit fingerprint of a text (the first half of its SHA-256): fixed in size whatever
/// the text's, and no way back to it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Fingerprint([u8; 16]);

/// The fingerprint of the token text a connection presented: what a returning view must show
/// again. A hash, so that stored session state holds no usable token.
pub type Proof = Fingerprint;

impl Fingerprint {
    /// The fingerprint of `text`.
    pub fn of(text: &str) -> Self {
        let digest = Sha256::digest(text.as_bytes());
        let mut out = [0u8; 16];
        out.copy_from_slice(&digest[..16]);
        Self(out)
    }

    /// Lower-case hex, for stored state.
    pub fn to_hex(self) -> String {
        self.0.iter().fold(String::with_capacity(32), |mut s, b| {
            use std::fmt::Write as _;
            let _ = write!(s, "{b:02x}");
            s
        })
    }

    /// Parses [`Proof::to_hex`]'s output: 32 hex digits, nothing else (`from_str_radix`
    /// alone would also take a sign, `+f`, for a digit).
    pub fn from_hex(hex: &str) -> Option<Self> {
        if hex.len() != 32 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
            return None;
        }
        let mut out = [0u8; 16];
        for (i, b) in out.iter_mut().enumerate() {
            *b = u8::from_str_radix(hex.get(2 * i..2 * i + 2)?, 16).ok()?;
        }
        Some(Self(out))
    }
}

/// The token a connection's URL presented.
#[derive(Debug)]
pub struct Presented {
    /// Signature and decoding.
    pub check: TokenCheck,
    /// Fingerprint of the token text.
    pub proof: Proof,
}

/// The identity a session id was admitted under, for its life.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Binding {
    /// The appId of the first admitted JOIN.
    pub app_id: String,
    /// Its shard (Croquet session name without the appId).
    pub shard: String,
    /// The hard cap the first admitted token carried (0: none).
    #[serde(default)]
    pub max_users: u32,
    /// The persistence the first admitted token claimed, when it carried one.
    #[serde(default)]
    pub persistence: Option<bool>,
}

impl Binding {
    /// Whether a JOIN for `app_id` and `shard` belongs to this session.
    pub fn admits(&self, app_id: &str, shard: &str) -> bool {
        self.app_id == app_id && self.shard == shard
    }
}

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
    /// The shard's hard cap in force (0: unknown).
    pub max_users: u32,
    /// The hard cap the view's token carried (0: none, or no valid token).
    pub token_max_users: u32,
    /// The persistence the view's token claimed, when it had a valid one.
    pub persistence: Option<bool>,
}

/// The identity a JOIN asks for: its appId and shard.
#[derive(Debug, Clone, Copy)]
pub struct Requested<'a> {
    /// The JOIN's `appId` (empty when absent).
    pub app_id: &'a str,
    /// The shard its `name` names.
    pub shard: &'a str,
}

/// A refused JOIN.
#[derive(Debug, Clone)]
pub struct Refusal {
    /// What the client gets.
    pub close: Close,
    /// Metric label (`missing_token`, `invalid_token`, `expired_token`, `wrong_shard`,
    /// `wrong_session`, `view_taken`, `shard_full`).
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

/// The refusal of a JOIN that names another identity than its session's binding.
pub fn wrong_session(binding: &Binding, req: Requested<'_>) -> Refusal {
    Refusal {
        close: close::BAD_API_KEY.with_reason("session belongs to another app or shard"),
        reason: "wrong_session",
        detail: format!(
            "session is bound to {}/{}, the JOIN names {}/{}",
            binding.app_id, binding.shard, req.app_id, req.shard
        ),
    }
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
    /// (`token_claim`: the binding's), else on, the Session default.
    pub fn persistence(&self, shard: &str, token_claim: Option<bool>) -> bool {
        self.shard(shard)
            .map(|s| s.persistence)
            .or(token_claim)
            .unwrap_or(true)
    }

    /// Verifies the token in a WebSocket path. `None` when tokens are not required and the
    /// path carries nothing that looks like one.
    pub fn check_path(&self, path: &str) -> Option<Arc<Presented>> {
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
        Some(Arc::new(Presented {
            check,
            proof: Proof::of(segment),
        }))
    }

    /// What a JOIN must show before it may create a session or make it look anything up:
    /// with tokens required, a validly signed token for the appId and shard it names
    /// (expired is still fine here: an admitted view may come back with it; the session
    /// checks expiry for new views).
    pub fn precheck(
        &self,
        presented: Option<&Presented>,
        req: Requested<'_>,
    ) -> Result<(), Refusal> {
        if !self.required {
            return Ok(());
        }
        match presented.map(|p| &p.check) {
            Some(Ok(claims)) => claims
                .check_identity(req.app_id, req.shard)
                .map_err(|e| refuse_token(&e)),
            Some(Err(e)) => Err(refuse_token(e)),
            None => Err(refuse_token(&TokenError::Missing)),
        }
    }

    /// Whether a returning view proves it is the one admitted with `admitted`: with tokens
    /// required, by presenting the same token again; without, there is nothing to prove.
    pub fn proves(&self, admitted: Option<Proof>, presented: Option<&Presented>) -> bool {
        !self.required || admitted.is_some_and(|a| presented.is_some_and(|p| p.proof == a))
    }

    /// Decides a JOIN into a session bound to `binding` (`None`: this is its first).
    /// `known_view`: the view was admitted before and proved it ([`Admission::proves`]);
    /// `users`: members now; `now_unix`: wall-clock seconds.
    pub fn decide(
        &self,
        presented: Option<&Presented>,
        req: Requested<'_>,
        binding: Option<&Binding>,
        known_view: bool,
        users: usize,
        now_unix: i64,
    ) -> Result<Admitted, Refusal> {
        if let Some(b) = binding
            && !b.admits(req.app_id, req.shard)
        {
            return Err(wrong_session(b, req));
        }
        if known_view {
            return Ok(Admitted::default());
        }
        let claims = match presented.map(|p| &p.check) {
            Some(Ok(c)) => match c.check_join(req.app_id, req.shard, now_unix) {
                Ok(()) => Some(c),
                Err(e) if self.required => return Err(refuse_token(&e)),
                Err(_) => None,
            },
            Some(Err(e)) if self.required => return Err(refuse_token(e)),
            None if self.required => return Err(refuse_token(&TokenError::Missing)),
            _ => None,
        };
        // The binding's cap, not the joiner's: a later token cannot raise it.
        let cap = binding
            .map(|b| b.max_users)
            .or_else(|| claims.map(|c| c.max_users))
            .filter(|&m| m > 0)
            .or_else(|| {
                self.shard(req.shard)
                    .map(|s| s.max_users)
                    .filter(|&m| m > 0)
            });
        if let Some(cap) = cap
            && users >= cap as usize
        {
            return Err(Refusal {
                close: close::SESSION_FULL,
                reason: "shard_full",
                detail: format!("shard {:?} is at its cap of {cap} users", req.shard),
            });
        }
        Ok(Admitted {
            reservation: claims.map(|c| c.reservation_id).filter(|&r| r != 0),
            max_users: cap.unwrap_or(0),
            token_max_users: claims.map_or(0, |c| c.max_users),
            persistence: claims.map(|c| c.persistence),
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

    fn req<'a>(app_id: &'a str, shard: &'a str) -> Requested<'a> {
        Requested { app_id, shard }
    }

    fn binding(shard: &str, max_users: u32) -> Binding {
        Binding {
            app_id: "app".into(),
            shard: shard.into(),
            max_users,
            persistence: None,
        }
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
    fn proofs_round_trip_and_differ_per_token() {
        let (s, a) = setup(true);
        let p1 = a
            .check_path(&format!("/{}/sid", token(&s, "x", 100)))
            .unwrap()
            .proof;
        let p2 = a
            .check_path(&format!("/{}/sid", token(&s, "x", 101)))
            .unwrap()
            .proof;
        assert_ne!(p1, p2);
        assert_eq!(Proof::from_hex(&p1.to_hex()), Some(p1));
        assert_eq!(Proof::from_hex("zz"), None);
        assert_eq!(Proof::from_hex(&"é".repeat(16)), None);
        // Found by the `join` fuzz target: a sign passed for a digit.
        assert_eq!(Proof::from_hex("f57acac41e+3392aef60f8e5d3bfd52f"), None);
        assert_eq!(Proof::from_hex(&"+f".repeat(16)), None);
    }

    #[test]
    fn required_tokens_admit_only_matching_unexpired_first_joins() {
        let (s, a) = setup(true);
        let path = format!("/{}/sid", token(&s, "lobby~1", 100));
        let presented = a.check_path(&path).unwrap();
        let ok = a
            .decide(Some(&presented), req("app", "lobby~1"), None, false, 0, 50)
            .unwrap();
        assert_eq!(
            ok,
            Admitted {
                reservation: Some(7),
                max_users: 2,
                token_max_users: 2,
                persistence: Some(false),
            }
        );
        let refuse = |p: Option<&Presented>, app, name, now| {
            a.decide(p, req(app, name), None, false, 0, now)
                .unwrap_err()
        };
        assert_eq!(
            refuse(Some(&presented), "app", "lobby~1", 100).reason,
            "expired_token"
        );
        assert_eq!(
            refuse(Some(&presented), "app", "lobby~2", 50).reason,
            "wrong_shard"
        );
        assert_eq!(
            refuse(Some(&presented), "other", "lobby~1", 50).reason,
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
        // A view admitted before (and proven) passes whatever its token's expiry.
        assert!(
            a.decide(
                Some(&presented),
                req("app", "lobby~1"),
                None,
                true,
                5,
                1_000
            )
            .is_ok()
        );
    }

    #[test]
    fn the_precheck_wants_a_signed_token_for_what_the_join_names_expired_or_not() {
        let (s, a) = setup(true);
        let expired = a
            .check_path(&format!("/{}/sid", token(&s, "x", 1)))
            .unwrap();
        assert!(a.precheck(Some(&expired), req("app", "x")).is_ok());
        assert_eq!(
            a.precheck(Some(&expired), req("app", "y"))
                .unwrap_err()
                .reason,
            "wrong_shard"
        );
        assert_eq!(
            a.precheck(None, req("app", "x")).unwrap_err().reason,
            "missing_token"
        );
        let (_, open) = setup(false);
        assert!(open.precheck(None, req("app", "x")).is_ok());
    }

    #[test]
    fn a_bound_session_refuses_other_identities_and_keeps_its_cap() {
        let (s, a) = setup(true);
        let other_app = a
            .check_path(&format!(
                "/{}/sid",
                s.sign(JoinClaims {
                    app_id: "attacker".into(),
                    shard: "public".into(),
                    expires_at: 100,
                    max_users: 1000,
                    ..JoinClaims::default()
                })
            ))
            .unwrap();
        let bound = binding("lobby", 2);
        let r = a
            .decide(
                Some(&other_app),
                req("attacker", "public"),
                Some(&bound),
                false,
                0,
                50,
            )
            .unwrap_err();
        assert_eq!((r.reason, r.close.code), ("wrong_session", 4103));
        // Even a known view cannot switch identity.
        assert_eq!(
            a.decide(
                Some(&other_app),
                req("attacker", "public"),
                Some(&bound),
                true,
                0,
                50
            )
            .unwrap_err()
            .reason,
            "wrong_session"
        );
        // A later token with a higher cap does not raise the binding's.
        let generous = a
            .check_path(&format!(
                "/{}/sid",
                s.sign(JoinClaims {
                    app_id: "app".into(),
                    shard: "lobby".into(),
                    expires_at: 100,
                    max_users: 1000,
                    ..JoinClaims::default()
                })
            ))
            .unwrap();
        assert_eq!(
            a.decide(
                Some(&generous),
                req("app", "lobby"),
                Some(&bound),
                false,
                2,
                50
            )
            .unwrap_err()
            .reason,
            "shard_full"
        );
    }

    #[test]
    fn returning_views_prove_themselves_with_their_token_only_when_tokens_are_required() {
        let (s, a) = setup(true);
        let first = a
            .check_path(&format!("/{}/sid", token(&s, "x", 100)))
            .unwrap();
        let other = a
            .check_path(&format!("/{}/sid", token(&s, "x", 99)))
            .unwrap();
        assert!(a.proves(Some(first.proof), Some(&first)));
        assert!(!a.proves(Some(first.proof), Some(&other)));
        assert!(!a.proves(Some(first.proof), None));
        assert!(!a.proves(None, Some(&first)));
        let (_, open) = setup(false);
        assert!(open.proves(None, None));
    }

    #[test]
    fn the_cap_holds_with_or_without_required_tokens() {
        let (s, a) = setup(true);
        let presented = a
            .check_path(&format!("/{}/sid", token(&s, "x", 100)))
            .unwrap();
        let r = a
            .decide(Some(&presented), req("app", "x"), None, false, 2, 50)
            .unwrap_err();
        assert_eq!((r.reason, r.close.code), ("shard_full", 4105));
        let (_, open) = setup(false);
        assert!(open.check_path("/plain/sid").is_none());
        assert!(
            open.decide(None, req("app", "y"), None, false, 1_000, 0)
                .is_ok()
        );
        open.set_shard(
            "y",
            ShardSettings {
                max_users: 3,
                persistence: true,
            },
        );
        assert_eq!(
            open.decide(None, req("app", "y"), None, false, 3, 0)
                .unwrap_err()
                .reason,
            "shard_full"
        );
        // Without the requirement a bad token is ignored rather than refused.
        let junk = open.check_path("/a.b/sid").unwrap();
        assert!(
            open.decide(Some(&junk), req("app", "z"), None, false, 0, 0)
                .is_ok()
        );
    }
}
