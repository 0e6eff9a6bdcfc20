//! Report-stream credentials: each reflector's own proof of who it is.
//!
//! The operator keeps one root key and derives from it a credential per reflector:
//! `<reflector>.<region>.<mac>`, where `mac` is unpadded base64url HMAC-SHA256 of the
//! reflector's name and region under the root key. A reflector presents its credential as
//! `authorization: Bearer <credential>` when it opens its report stream; the operator
//! recomputes the MAC and so learns, without any table, which reflector (and region) the
//! stream speaks for. Holding one credential proves one reflector, never another, and the
//! root key never leaves the operator.

use aws_lc_rs::hmac;
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;

/// Fewest bytes a root key may have.
pub const MIN_ROOT_KEY_BYTES: usize = 16;
/// Longest credential accepted; anything longer is refused before any work.
pub const MAX_CREDENTIAL_LEN: usize = 512;
/// Longest reflector name (a Kubernetes object name).
const MAX_NAME: usize = 253;
/// Longest region name (a DNS label).
const MAX_REGION: usize = 63;
/// Domain separation: a MAC made for anything else never verifies as a credential.
const CONTEXT: &[u8] = b"refleet-report-v1";

/// Why a credential could not be minted or was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CredentialError {
    /// The root key is too short to be a secret.
    #[error("report root key has {0} bytes; at least {MIN_ROOT_KEY_BYTES} are needed")]
    ShortKey(usize),
    /// A reflector or region name that cannot be carried in a credential.
    #[error("{field} {value:?} cannot be named in a report credential: {why}")]
    BadName {
        /// `reflector` or `region`.
        field: &'static str,
        /// The name.
        value: String,
        /// What is wrong with it.
        why: &'static str,
    },
    /// Not shaped like a credential (e.g. the old shared secret).
    #[error("malformed report credential: {0}")]
    Malformed(&'static str),
    /// Well formed, but not minted with this root key.
    #[error("report credential not issued by this operator")]
    BadMac,
}

impl CredentialError {
    /// A short label for metrics and logs.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::ShortKey(_) | Self::BadName { .. } => "unmintable",
            Self::Malformed(_) => "malformed_credential",
            Self::BadMac => "bad_credential",
        }
    }
}

/// Who a verified credential speaks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReflectorIdentity {
    /// The reflector's name (pod name, or local process name).
    pub reflector: String,
    /// The region the operator assigned it.
    pub region: String,
}

/// The operator's root key: mints and checks per-reflector credentials.
#[derive(Clone)]
pub struct ReportKey {
    key: hmac::Key,
}

impl std::fmt::Debug for ReportKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ReportKey(..)")
    }
}

impl ReportKey {
    /// A key from the root secret's bytes.
    pub fn new(root: &[u8]) -> Result<Self, CredentialError> {
        if root.len() < MIN_ROOT_KEY_BYTES {
            return Err(CredentialError::ShortKey(root.len()));
        }
        Ok(Self {
            key: hmac::Key::new(hmac::HMAC_SHA256, root),
        })
    }

    /// The credential of reflector `reflector` in `region`.
    pub fn credential(&self, reflector: &str, region: &str) -> Result<String, CredentialError> {
        check_name("reflector", reflector, MAX_NAME, false)?;
        check_name("region", region, MAX_REGION, true)?;
        let tag = hmac::sign(&self.key, &message(reflector, region));
        Ok(format!("{reflector}.{region}.{}", B64.encode(tag.as_ref())))
    }

    /// The identity `credential` proves, if this key minted it (constant-time MAC check).
    pub fn verify(&self, credential: &str) -> Result<ReflectorIdentity, CredentialError> {
        if credential.len() > MAX_CREDENTIAL_LEN {
            return Err(CredentialError::Malformed("too long"));
        }
        // The MAC and the region contain no dots; the reflector name may.
        let (rest, mac) = credential
            .rsplit_once('.')
            .ok_or(CredentialError::Malformed(
                "expected <reflector>.<region>.<mac>",
            ))?;
        let (reflector, region) = rest.rsplit_once('.').ok_or(CredentialError::Malformed(
            "expected <reflector>.<region>.<mac>",
        ))?;
        if reflector.is_empty() || region.is_empty() {
            return Err(CredentialError::Malformed("empty reflector or region"));
        }
        let mac = B64
            .decode(mac)
            .map_err(|_| CredentialError::Malformed("mac is not base64url"))?;
        hmac::verify(&self.key, &message(reflector, region), &mac)
            .map_err(|_| CredentialError::BadMac)?;
        Ok(ReflectorIdentity {
            reflector: reflector.to_owned(),
            region: region.to_owned(),
        })
    }
}

/// What the MAC covers. Names hold no NUL (checked at minting), so the split is unambiguous.
fn message(reflector: &str, region: &str) -> Vec<u8> {
    let mut m = Vec::with_capacity(CONTEXT.len() + reflector.len() + region.len() + 2);
    m.extend_from_slice(CONTEXT);
    m.push(0);
    m.extend_from_slice(reflector.as_bytes());
    m.push(0);
    m.extend_from_slice(region.as_bytes());
    m
}

fn check_name(
    field: &'static str,
    value: &str,
    max: usize,
    no_dots: bool,
) -> Result<(), CredentialError> {
    let bad = |why| {
        Err(CredentialError::BadName {
            field,
            value: value.to_owned(),
            why,
        })
    };
    if value.is_empty() {
        return bad("empty");
    }
    if value.len() > max {
        return bad("too long");
    }
    // Visible ASCII only: the credential travels in an HTTP/2 header.
    if !value.bytes().all(|b| b.is_ascii_graphic()) {
        return bad("only visible ASCII characters are allowed");
    }
    if no_dots && value.contains('.') {
        return bad("no '.' allowed");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn key(b: u8) -> ReportKey {
        ReportKey::new(&[b; 32]).unwrap()
    }

    #[test]
    fn a_credential_proves_its_reflector_and_region_and_nothing_else() {
        let k = key(1);
        let c = k.credential("arena.v2-eu-0", "eu").unwrap();
        assert!(c.starts_with("arena.v2-eu-0.eu."), "{c}");
        assert_eq!(
            k.verify(&c).unwrap(),
            ReflectorIdentity {
                reflector: "arena.v2-eu-0".into(),
                region: "eu".into()
            }
        );
        // Renamed or moved to another region: the MAC no longer matches.
        let mac = c.rsplit_once('.').unwrap().1;
        assert_eq!(
            k.verify(&format!("arena-eu-1.eu.{mac}")),
            Err(CredentialError::BadMac)
        );
        assert_eq!(
            k.verify(&format!("arena.v2-eu-0.us.{mac}")),
            Err(CredentialError::BadMac)
        );
        // Another operator's key.
        assert_eq!(key(2).verify(&c), Err(CredentialError::BadMac));
    }

    #[test]
    fn bad_input_is_refused_with_a_reason_never_a_panic() {
        let k = key(1);
        for bad in [
            "",
            "s3cret",
            ".eu.abc",
            "r..abc",
            "r.eu.!!!",
            &"x".repeat(600),
        ] {
            let e = k.verify(bad).unwrap_err();
            assert_eq!(e.reason(), "malformed_credential", "{bad:?}: {e}");
        }
        assert!(matches!(
            ReportKey::new(b"short"),
            Err(CredentialError::ShortKey(5))
        ));
        for (name, region) in [("", "eu"), ("a b", "eu"), ("r", "e.u"), ("r", "")] {
            assert_eq!(
                k.credential(name, region).unwrap_err().reason(),
                "unmintable"
            );
        }
    }
}
