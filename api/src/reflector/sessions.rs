//! The body of the reflector's `GET /sessions`: one type for the reflector that writes it and
//! for its readers (the operator's controllers and `refleet up`).

use std::net::IpAddr;

use refleet_core::shard::join_shard;

/// The body of `GET /sessions`. Reading is lenient: absent fields take defaults.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SessionsReport {
    /// The reflector's region.
    #[serde(default)]
    pub region: String,
    /// Whether it is draining (takes no new sessions).
    #[serde(default)]
    pub draining: bool,
    /// Its sessions in memory, busiest first.
    #[serde(default)]
    pub sessions: Vec<SessionSummary>,
}

/// What `/sessions` reports about one session in memory.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SessionSummary {
    /// The Croquet session id (last URL path segment).
    pub session_id: String,
    /// The JOIN's `name` (`<appId>/<session name>`), when known.
    #[serde(default)]
    pub name: Option<String>,
    /// The JOIN's appId, when known.
    #[serde(default)]
    pub app_id: Option<String>,
    /// The JOIN's persistentId, when known.
    #[serde(default)]
    pub persistent_id: Option<String>,
    /// Members: connected users plus those within their leave delay.
    #[serde(default)]
    pub users: u32,
    /// Addresses of the admitted members connected now: `refleet up` accepts an upload into
    /// this session only from one of them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub peers: Vec<IpAddr>,
}

impl SessionSummary {
    /// The shard name: the JOIN name without its `<appId>/` prefix (without a known appId,
    /// whatever follows the first `/`).
    pub fn shard(&self) -> Option<&str> {
        let name = self.name.as_deref()?;
        match self.app_id.as_deref() {
            Some(app) => join_shard(name, app),
            None => name.split_once('/').map(|(_, shard)| shard),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_summary_names_its_shard_and_reading_is_lenient() {
        let report: SessionsReport = serde_json::from_str(
            r#"{"sessions": [{"sessionId": "s1", "name": "com.ex/lobby~1", "appId": "com.ex", "users": 2}]}"#,
        )
        .expect("lenient");
        assert_eq!(report.region, "");
        assert_eq!(report.sessions[0].shard(), Some("lobby~1"));
        let keyless = SessionSummary {
            app_id: None,
            ..report.sessions[0].clone()
        };
        assert_eq!(keyless.shard(), Some("lobby~1"));
    }
}
