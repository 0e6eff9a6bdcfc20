//! Join tokens: `<claims>.<signature>`, unpadded base64url, Ed25519 over the claim bytes.
//!
//! The router signs one per Route answer; the reflector verifies it at a view's first JOIN.
//! Verification is split from the admission decision: [`Verifier::verify`] checks the
//! signature and decodes the claims (cheap, done once per connection); the session then
//! compares the claims with the JOIN ([`JoinClaims::check_join`]), because only it knows
//! whether the view was already admitted (then an expired token is fine).

use std::collections::HashMap;
use std::sync::Arc;

use aws_lc_rs::signature::Ed25519KeyPair;
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use ed25519_dalek::{Signature, Signer as _, SigningKey, VerifyingKey};
use prost::Message as _;

pub use crate::token_proto::JoinClaims;

/// Longest token accepted; anything longer is refused before decoding.
pub const MAX_TOKEN_LEN: usize = 1024;

/// Why a token was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    /// No token in the URL.
    #[error("no join token in the URL")]
    Missing,
    /// Not a token at all (shape, base64, protobuf).
    #[error("malformed join token: {0}")]
    Malformed(&'static str),
    /// Signed by a key this reflector does not know.
    #[error("join token signed by unknown key {0:?}")]
    UnknownKey(String),
    /// The signature does not match the claims.
    #[error("join token signature invalid")]
    BadSignature,
    /// Expired before the first JOIN.
    #[error("join token expired")]
    Expired,
    /// Issued for another app or shard.
    #[error("join token is for {field} {expected:?}, the JOIN says {actual:?}")]
    WrongShard {
        /// `appId` or `name`.
        field: &'static str,
        /// What the token names.
        expected: String,
        /// What the JOIN says.
        actual: String,
    },
}

impl TokenError {
    /// A short label for metrics and logs.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Missing => "missing_token",
            Self::Malformed(_) | Self::UnknownKey(_) | Self::BadSignature => "invalid_token",
            Self::Expired => "expired_token",
            Self::WrongShard { .. } => "wrong_shard",
        }
    }
}

/// A signing key with its id.
#[derive(Clone)]
pub struct Signer {
    key_id: String,
    public: [u8; 32],
    key: SigningBackend,
}

/// Who computes signatures. Ed25519 signatures are deterministic (RFC 8032), so both give
/// the same bytes; the router signs one per Route, and aws-lc's assembly does it in about
/// half the time of ed25519-dalek on x86-64 (`cargo bench -p refleet-api --bench token`).
#[derive(Clone)]
enum SigningBackend {
    AwsLc(Arc<Ed25519KeyPair>),
    /// If aws-lc ever refused a seed (it accepts every 32-byte one).
    Dalek(Box<SigningKey>),
}

impl std::fmt::Debug for Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Signer")
            .field("key_id", &self.key_id)
            .finish_non_exhaustive()
    }
}

impl Signer {
    /// A signer from a 32-byte Ed25519 secret key.
    pub fn new(key_id: impl Into<String>, secret: &[u8; 32]) -> Self {
        let dalek = SigningKey::from_bytes(secret);
        let public = dalek.verifying_key().to_bytes();
        let key = match Ed25519KeyPair::from_seed_and_public_key(secret, &public) {
            Ok(pair) => SigningBackend::AwsLc(Arc::new(pair)),
            Err(_) => SigningBackend::Dalek(Box::new(dalek)),
        };
        Self {
            key_id: key_id.into(),
            public,
            key,
        }
    }

    /// The key id tokens carry.
    pub fn key_id(&self) -> &str {
        &self.key_id
    }

    /// The raw public key reflectors verify with.
    pub fn public_key(&self) -> [u8; 32] {
        self.public
    }

    /// Signs `claims` (its `key_id` is set to this key's).
    pub fn sign(&self, mut claims: JoinClaims) -> String {
        claims.key_id.clone_from(&self.key_id);
        let bytes = claims.encode_to_vec();
        let mut out = B64.encode(&bytes);
        out.push('.');
        match &self.key {
            SigningBackend::AwsLc(pair) => B64.encode_string(pair.sign(&bytes), &mut out),
            SigningBackend::Dalek(key) => B64.encode_string(key.sign(&bytes).to_bytes(), &mut out),
        }
        out
    }
}

/// The public keys a reflector accepts, by key id.
#[derive(Clone, Debug, Default)]
pub struct Verifier {
    keys: HashMap<String, VerifyingKey>,
}

/// A bad entry in a key list.
#[derive(Debug, thiserror::Error)]
#[error("bad token key {entry:?}: {why}")]
pub struct KeyListError {
    entry: String,
    why: &'static str,
}

impl Verifier {
    /// Adds a raw 32-byte public key under `key_id`.
    pub fn insert(&mut self, key_id: &str, public_key: &[u8]) -> Result<(), KeyListError> {
        let bad = |why| KeyListError {
            entry: key_id.to_owned(),
            why,
        };
        let raw: &[u8; 32] = public_key
            .try_into()
            .map_err(|_| bad("public key is not 32 bytes"))?;
        let key = VerifyingKey::from_bytes(raw).map_err(|_| bad("not an Ed25519 public key"))?;
        self.keys.insert(key_id.to_owned(), key);
        Ok(())
    }

    /// Parses `kid=base64url-public-key,kid2=…` (the reflector's `--token-keys`).
    pub fn parse_list(list: &str) -> Result<Self, KeyListError> {
        let mut v = Self::default();
        for entry in list.split(',').map(str::trim).filter(|e| !e.is_empty()) {
            let bad = |why| KeyListError {
                entry: entry.to_owned(),
                why,
            };
            let (kid, key) = entry
                .split_once('=')
                .ok_or_else(|| bad("expected kid=key"))?;
            let raw = B64
                .decode(key.trim())
                .map_err(|_| bad("key is not base64url"))?;
            v.insert(kid.trim(), &raw)?;
        }
        Ok(v)
    }

    /// Formats keys as `--token-keys` expects them.
    pub fn format_key(key_id: &str, public_key: &[u8]) -> String {
        format!("{key_id}={}", B64.encode(public_key))
    }

    /// Whether no key is known.
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// Checks the signature and decodes the claims. Expiry and the JOIN are checked later.
    pub fn verify(&self, token: &str) -> Result<JoinClaims, TokenError> {
        if token.is_empty() {
            return Err(TokenError::Missing);
        }
        if token.len() > MAX_TOKEN_LEN {
            return Err(TokenError::Malformed("too long"));
        }
        let (claims_b64, sig_b64) = token
            .split_once('.')
            .ok_or(TokenError::Malformed("no signature part"))?;
        let bytes = B64
            .decode(claims_b64)
            .map_err(|_| TokenError::Malformed("claims not base64url"))?;
        let sig = B64
            .decode(sig_b64)
            .map_err(|_| TokenError::Malformed("signature not base64url"))?;
        let sig =
            Signature::from_slice(&sig).map_err(|_| TokenError::Malformed("signature length"))?;
        let claims = JoinClaims::decode(bytes.as_slice())
            .map_err(|_| TokenError::Malformed("claims not decodable"))?;
        let key = self
            .keys
            .get(&claims.key_id)
            .ok_or_else(|| TokenError::UnknownKey(claims.key_id.clone()))?;
        key.verify_strict(&bytes, &sig)
            .map_err(|_| TokenError::BadSignature)?;
        Ok(claims)
    }
}

impl JoinClaims {
    /// Whether these (verified) claims admit a first JOIN with `app_id` and `name` at
    /// `now_unix` seconds.
    pub fn check_join(&self, app_id: &str, name: &str, now_unix: i64) -> Result<(), TokenError> {
        if now_unix >= self.expires_at {
            return Err(TokenError::Expired);
        }
        self.check_identity(app_id, name)
    }

    /// Whether these (verified) claims name `app_id` and shard `name`, whatever their expiry:
    /// enough to let a view that was admitted with this very token back in, and to spend a
    /// storage look-up on it.
    pub fn check_identity(&self, app_id: &str, name: &str) -> Result<(), TokenError> {
        if self.app_id != app_id {
            return Err(TokenError::WrongShard {
                field: "appId",
                expected: self.app_id.clone(),
                actual: app_id.to_owned(),
            });
        }
        if self.shard != name {
            return Err(TokenError::WrongShard {
                field: "name",
                expected: self.shard.clone(),
                actual: name.to_owned(),
            });
        }
        Ok(())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn claims() -> JoinClaims {
        JoinClaims {
            app_id: "com.example.chat".into(),
            shard: "lobby~2".into(),
            persistence: true,
            expires_at: 1_000,
            key_id: String::new(),
            max_users: 10,
            reservation_id: 42,
        }
    }

    fn pair(kid: &str, seed: u8) -> (Signer, Verifier) {
        let s = Signer::new(kid, &[seed; 32]);
        let mut v = Verifier::default();
        v.insert(kid, &s.public_key()).unwrap();
        (s, v)
    }

    use aws_lc_rs::signature::KeyPair as _;

    #[test]
    fn both_signing_backends_give_the_same_verifiable_token() {
        for seed in [0u8, 7, 255] {
            let secret = [seed; 32];
            let fast = Signer::new("k", &secret);
            assert!(matches!(fast.key, SigningBackend::AwsLc(_)));
            if let SigningBackend::AwsLc(pair) = &fast.key {
                assert_eq!(pair.public_key().as_ref(), fast.public_key());
            }
            let slow = Signer {
                key: SigningBackend::Dalek(Box::new(SigningKey::from_bytes(&secret))),
                ..fast.clone()
            };
            let token = fast.sign(claims());
            assert_eq!(token, slow.sign(claims()));
            let mut v = Verifier::default();
            v.insert("k", &fast.public_key()).unwrap();
            assert_eq!(v.verify(&token).unwrap().reservation_id, 42);
        }
    }

    #[test]
    fn a_signed_token_verifies_and_admits_its_join_only() {
        let (s, v) = pair("k1", 7);
        let token = s.sign(claims());
        assert!(
            token
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c)),
            "{token}"
        );
        let c = v.verify(&token).unwrap();
        assert_eq!(c.key_id, "k1");
        assert_eq!(c.check_join("com.example.chat", "lobby~2", 999), Ok(()));
        assert_eq!(
            c.check_join("com.example.chat", "lobby~2", 1_000),
            Err(TokenError::Expired)
        );
        assert_eq!(
            c.check_join("com.example.chat", "lobby~1", 10)
                .unwrap_err()
                .reason(),
            "wrong_shard"
        );
        assert_eq!(
            c.check_join("com.other", "lobby~2", 10)
                .unwrap_err()
                .reason(),
            "wrong_shard"
        );
    }

    #[test]
    fn forged_tampered_and_foreign_tokens_are_refused() {
        let (s, v) = pair("k1", 7);
        let token = s.sign(claims());
        // Another key claiming the same id.
        let forged = Signer::new("k1", &[8; 32]).sign(claims());
        assert_eq!(v.verify(&forged), Err(TokenError::BadSignature));
        // Claims changed after signing (a later expiry).
        let mut longer = claims();
        longer.expires_at = 9_999;
        longer.key_id = "k1".into();
        let (_, sig) = token.split_once('.').unwrap();
        let tampered = format!("{}.{sig}", B64.encode(longer.encode_to_vec()));
        assert_eq!(v.verify(&tampered), Err(TokenError::BadSignature));
        assert_eq!(
            v.verify(&Signer::new("k9", &[7; 32]).sign(claims())),
            Err(TokenError::UnknownKey("k9".into()))
        );
        assert_eq!(v.verify(""), Err(TokenError::Missing));
        for junk in ["abc", "a.b", "!!.??", &"x".repeat(MAX_TOKEN_LEN + 1)] {
            assert!(
                matches!(v.verify(junk), Err(TokenError::Malformed(_))),
                "{junk}"
            );
        }
    }

    #[test]
    fn key_lists_parse_and_rotate() {
        let (old, _) = pair("old", 1);
        let (new, _) = pair("new", 2);
        let list = format!(
            "{},{}",
            Verifier::format_key("old", &old.public_key()),
            Verifier::format_key("new", &new.public_key())
        );
        let v = Verifier::parse_list(&list).unwrap();
        assert!(v.verify(&old.sign(claims())).is_ok());
        assert!(v.verify(&new.sign(claims())).is_ok());
        assert!(Verifier::parse_list("nokey").is_err());
        assert!(Verifier::parse_list("k=@@@").is_err());
        assert!(Verifier::parse_list("k=AAAA").is_err());
        assert!(Verifier::parse_list("").unwrap().is_empty());
    }
}
