//! The operator's own Secrets in its namespace: the join-token signing key (keys `kid`,
//! `signing-key`) and the report key (key `token`), each read, or created with a fresh random
//! value when it does not exist. Used by `refleet operator` ([`crate::cli::routing`] and
//! [`crate::cli::operator`]); `refleet up` makes its keys in memory.

use std::collections::BTreeMap;

use anyhow::Context as _;
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use kube::api::PostParams;
use kube::{Api, Client};
use refleet_api::report_credential::ReportKey;
use refleet_api::token::Signer;

/// Reads or creates the signing key Secret.
pub async fn signing_key(client: &Client, namespace: &str, name: &str) -> anyhow::Result<Signer> {
    let fresh = || {
        let secret: [u8; 32] = rand::random();
        let kid = format!("k{:08x}", rand::random::<u32>());
        BTreeMap::from([
            ("kid".to_owned(), ByteString(kid.into_bytes())),
            ("signing-key".to_owned(), ByteString(secret.to_vec())),
        ])
    };
    let data =
        read_or_create_secret(client, namespace, name, "the join-token signing key", fresh).await?;
    let kid = data
        .get("kid")
        .map(|b| String::from_utf8_lossy(&b.0).trim().to_owned())
        .unwrap_or_default();
    let key = data
        .get("signing-key")
        .map(|b| b.0.clone())
        .unwrap_or_default();
    let secret: [u8; 32] = key.as_slice().try_into().map_err(|_| {
        anyhow::anyhow!("Secret {namespace}/{name}: signing-key must be 32 raw bytes")
    })?;
    anyhow::ensure!(!kid.is_empty(), "Secret {namespace}/{name}: kid is empty");
    Ok(Signer::new(kid, &secret))
}

/// Reads or creates the report key Secret (key `token`).
pub async fn report_key(client: &Client, namespace: &str, name: &str) -> anyhow::Result<ReportKey> {
    // Text, so that it can be typed or copied like any other Secret value.
    let fresh = || BTreeMap::from([("token".to_owned(), ByteString(random_hex(32).into_bytes()))]);
    let data = read_or_create_secret(client, namespace, name, "the report key", fresh).await?;
    let token = data
        .get("token")
        .map(|b| b.0.as_slice())
        .unwrap_or_default();
    // A value typed by hand often ends with a newline; it is not part of the key.
    ReportKey::new(token.trim_ascii())
        .with_context(|| format!("Secret {namespace}/{name}, key token"))
}

/// The data of Secret `namespace/name`, created with `fresh()` when it does not exist. Safe
/// with several replicas starting at once: whoever loses the create reads the winner's.
async fn read_or_create_secret(
    client: &Client,
    namespace: &str,
    name: &str,
    what: &str,
    fresh: impl Fn() -> BTreeMap<String, ByteString>,
) -> anyhow::Result<BTreeMap<String, ByteString>> {
    let api: Api<Secret> = Api::namespaced(client.clone(), namespace);
    for _ in 0..3 {
        if let Some(s) = api
            .get_opt(name)
            .await
            .with_context(|| format!("reading Secret {namespace}/{name}"))?
        {
            return Ok(s.data.unwrap_or_default());
        }
        let data = fresh();
        let object = Secret {
            metadata: kube::api::ObjectMeta {
                name: Some(name.to_owned()),
                labels: Some(BTreeMap::from([(
                    "app.kubernetes.io/name".to_owned(),
                    "refleet".to_owned(),
                )])),
                ..Default::default()
            },
            data: Some(data.clone()),
            ..Default::default()
        };
        match api.create(&PostParams::default(), &object).await {
            Ok(_) => {
                tracing::info!(secret = %name, "created {what}");
                return Ok(data);
            }
            // Another replica created it first: read theirs.
            Err(kube::Error::Api(e)) if e.code == 409 => continue,
            Err(e) => return Err(e).with_context(|| format!("creating Secret {namespace}/{name}")),
        }
    }
    anyhow::bail!("Secret {namespace}/{name} kept changing while being read")
}

fn random_hex(bytes: usize) -> String {
    (0..bytes)
        .map(|_| format!("{:02x}", rand::random::<u8>()))
        .collect()
}
