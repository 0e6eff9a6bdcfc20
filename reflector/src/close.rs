//! Close codes the reflector sends, one place for all of them.
//!
//! The real client reconnects by itself after any code below 4100 (and after network
//! drops such as 1006) and gives up for good at 4100 and above, so "try again" situations
//! use the 40xx range and bad input that would fail again the same way uses 41xx.
//! The values 4000–4121 are the upstream reflector's; 4104 and 4105 are Refleet's own.

use std::borrow::Cow;

/// A WebSocket close the reflector initiates: a code and a short human-readable reason.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Close {
    /// The WebSocket close code.
    pub code: u16,
    /// The reason text sent with the close frame (shown by the client next to the code).
    pub reason: Cow<'static, str>,
}

impl Close {
    const fn fixed(code: u16, reason: &'static str) -> Self {
        Self {
            code,
            reason: Cow::Borrowed(reason),
        }
    }

    /// The same code with a more specific reason (kept short: close reasons are ≤ 123 bytes).
    pub fn with_reason(mut self, reason: impl Into<String>) -> Self {
        let mut reason: String = reason.into();
        if reason.len() > 120 {
            let mut cut = 120;
            while !reason.is_char_boundary(cut) {
                cut -= 1;
            }
            reason.truncate(cut);
        }
        self.reason = Cow::Owned(reason);
        self
    }

    /// Whether the real client reconnects by itself after this close.
    pub fn client_reconnects(&self) -> bool {
        self.code < 4100 && self.code != 1000
    }

    /// A bounded label for metrics.
    pub fn label(&self) -> &'static str {
        match self.code {
            1000 => "normal",
            1002 => "protocol_error",
            1007 => "invalid_payload",
            1009 => "too_big",
            4000 => "unknown_session",
            4001 => "unresponsive",
            4002 => "inactive",
            4003 => "reconnect",
            4100 => "outdated_protocol",
            4101 => "bad_app_id",
            4102 => "malformed",
            4103 => "bad_api_key",
            4104 => "rate_limited",
            4105 => "session_full",
            4109 => "internal",
            4121 => "never_joined",
            _ => "other",
        }
    }
}

/// A message for a session that does not exist here, or a SEND/TUTTI/… before JOIN (reconnect).
pub const UNKNOWN_SESSION: Close = Close::fixed(4000, "unknown session");
/// The client could not keep up: its send queue overflowed (reconnect).
pub const UNRESPONSIVE: Close = Close::fixed(4001, "client unresponsive");
/// No frame from the client within the idle timeout (reconnect).
pub const INACTIVE: Close = Close::fixed(4002, "client inactive");
/// The reflector is draining or the session is being torn down: reconnect, state is kept.
pub const RECONNECT: Close = Close::fixed(4003, "please reconnect");
/// No session id in the URL, or a JOIN without `version` (fatal).
pub const OUTDATED_PROTOCOL: Close = Close::fixed(4100, "outdated protocol");
/// SAVE in a session without appId/persistentId (fatal).
pub const BAD_APP_ID: Close = Close::fixed(4101, "bad appId");
/// A frame that is not a JSON object, a binary frame, or wrongly typed fields (fatal).
pub const MALFORMED: Close = Close::fixed(4102, "malformed message");
/// A JOIN without an `apiKey` property (fatal).
pub const BAD_API_KEY: Close = Close::fixed(4103, "bad apiKey");
/// More messages per second than `--rate-limit` allows (fatal; Refleet-specific).
pub const RATE_LIMITED: Close = Close::fixed(4104, "message rate limit exceeded");
/// The session has reached its hard user cap (fatal; Refleet-specific).
pub const SESSION_FULL: Close = Close::fixed(4105, "session full");
/// An internal error while handling a message (fatal).
pub const INTERNAL: Close = Close::fixed(4109, "unknown error");
/// Connected for too long without a JOIN (fatal).
pub const NEVER_JOINED: Close = Close::fixed(4121, "client never joined");
/// A frame larger than `--max-frame-bytes` (standard WebSocket "message too big").
pub const TOO_BIG: Close = Close::fixed(1009, "message too big");
/// A text frame that is not UTF-8 (standard WebSocket "invalid frame payload data").
pub const INVALID_PAYLOAD: Close = Close::fixed(1007, "text frame is not valid UTF-8");
/// A frame that breaks the WebSocket framing rules (standard WebSocket "protocol error").
pub const PROTOCOL_ERROR: Close = Close::fixed(1002, "WebSocket protocol error");

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reconnect_codes_are_below_4100_and_fatal_ones_above() {
        for c in [
            UNKNOWN_SESSION,
            UNRESPONSIVE,
            INACTIVE,
            RECONNECT,
            TOO_BIG,
            INVALID_PAYLOAD,
            PROTOCOL_ERROR,
        ] {
            assert!(c.client_reconnects(), "{c:?}");
            assert_ne!(c.label(), "other");
        }
        for c in [
            OUTDATED_PROTOCOL,
            BAD_APP_ID,
            MALFORMED,
            BAD_API_KEY,
            RATE_LIMITED,
            SESSION_FULL,
            INTERNAL,
            NEVER_JOINED,
        ] {
            assert!(!c.client_reconnects(), "{c:?}");
            assert_ne!(c.label(), "other");
        }
    }

    #[test]
    fn long_reasons_are_cut_on_a_char_boundary() {
        let c = MALFORMED.with_reason("é".repeat(100));
        assert!(c.reason.len() <= 120);
        assert_eq!(c.code, 4102);
    }
}
