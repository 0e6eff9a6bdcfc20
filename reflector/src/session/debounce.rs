//! Debounced SENDs: a SEND tagged with a `msgID` and a window is reflected at most once per
//! window (the client's `pollForSnapshot` uses it so that every client's poll makes one).
//!
//! Clients choose the keys and windows, so both are bounded: keys longer than
//! [`MAX_DEBOUNCE_KEY`] and keys past [`MAX_DEBOUNCE_KEYS`] are not remembered (their SENDs
//! are reflected undebounced), and windows are clamped to [`MAX_DEBOUNCE`].

use std::collections::HashMap;
use std::time::Duration;

use tokio::time::Instant;

/// The longest debounce window a SEND's tags may ask for.
pub const MAX_DEBOUNCE: Duration = Duration::from_secs(3600);
/// Longest `msgID` a debounce is kept for; longer ones are reflected without debouncing (the
/// client's only one is `pollForSnapshot`).
pub const MAX_DEBOUNCE_KEY: usize = 128;
/// Debounce keys remembered per session; past it, expired ones are pruned and new keys go
/// undebounced.
pub const MAX_DEBOUNCE_KEYS: usize = 64;

/// When each debounced key was last reflected, and its window.
#[derive(Debug, Default)]
pub(crate) struct Debounce {
    keys: HashMap<String, (Instant, Duration)>,
}

impl Debounce {
    /// Whether a SEND with this key falls within the window of the last one reflected.
    pub fn holds(&self, id: &str, now: Instant) -> bool {
        self.keys
            .get(id)
            .is_some_and(|(last, window)| now.saturating_duration_since(*last) < *window)
    }

    /// Remembers a reflected debounced SEND's key, within [`MAX_DEBOUNCE_KEYS`].
    pub fn remember(&mut self, id: String, window: Duration, now: Instant) {
        if self.keys.len() >= MAX_DEBOUNCE_KEYS && !self.keys.contains_key(&id) {
            self.keys
                .retain(|_, (last, w)| now.saturating_duration_since(*last) < *w);
            if self.keys.len() >= MAX_DEBOUNCE_KEYS {
                return;
            }
        }
        self.keys.insert(id, (now, window));
    }

    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    #[cfg(test)]
    pub fn contains(&self, id: &str) -> bool {
        self.keys.contains_key(id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_holds_for_its_window_only() {
        let now = Instant::now();
        let mut d = Debounce::default();
        assert!(!d.holds("k", now));
        d.remember("k".into(), Duration::from_secs(5), now);
        assert!(d.holds("k", now + Duration::from_millis(4999)));
        assert!(!d.holds("k", now + Duration::from_secs(5)));
        assert!(!d.holds("other", now));
    }

    #[test]
    fn keys_are_bounded_and_expired_ones_make_room() {
        let now = Instant::now();
        let mut d = Debounce::default();
        for i in 0..MAX_DEBOUNCE_KEYS + 10 {
            d.remember(format!("k{i}"), Duration::from_secs(5), now);
        }
        assert_eq!(d.len(), MAX_DEBOUNCE_KEYS);
        assert!(
            !d.contains(&format!("k{MAX_DEBOUNCE_KEYS}")),
            "past the bound: not kept"
        );
        // A known key is refreshed even when the map is full.
        d.remember(
            "k0".into(),
            Duration::from_secs(5),
            now + Duration::from_secs(1),
        );
        assert!(d.holds("k0", now + Duration::from_secs(5)));
        // Once the windows passed, a new key prunes the expired ones.
        d.remember(
            "fresh".into(),
            Duration::from_secs(5),
            now + Duration::from_secs(5),
        );
        assert_eq!(d.len(), 2, "k0 (refreshed) and fresh");
    }
}
