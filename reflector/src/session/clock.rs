//! A session's teatime: integer milliseconds that never go backwards.

use tokio::time::Instant;

/// Teatime of one session, advanced from a monotonic clock and scaled.
#[derive(Debug, Clone)]
pub struct Clock {
    origin: Instant,
    base: u64,
    scale: f64,
    last: u64,
}

/// Bounds of the time scale a client may request.
pub const MIN_SCALE: f64 = 1.0 / 64.0;
/// Upper bound of the time scale.
pub const MAX_SCALE: f64 = 64.0;

impl Clock {
    /// A clock that reads `start` now.
    pub fn starting_at(start: u64, now: Instant) -> Self {
        Self {
            origin: now,
            base: start,
            scale: 1.0,
            last: start,
        }
    }

    /// The time at `now`; never less than any earlier reading.
    pub fn read(&mut self, now: Instant) -> u64 {
        let elapsed = now.saturating_duration_since(self.origin).as_secs_f64() * 1000.0;
        let t = self.base + (elapsed * self.scale).floor() as u64;
        if t > self.last {
            self.last = t;
        }
        self.last
    }

    /// Changes the scale without a jump: time continues from its current value.
    pub fn set_scale(&mut self, scale: f64, now: Instant) {
        let t = self.read(now);
        self.origin = now;
        self.base = t;
        self.scale = scale.clamp(MIN_SCALE, MAX_SCALE);
    }

    /// The current scale.
    pub fn scale(&self) -> f64 {
        self.scale
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn time_advances_scaled_and_never_goes_back() {
        let t0 = Instant::now();
        let mut c = Clock::starting_at(1000, t0);
        assert_eq!(c.read(t0), 1000);
        assert_eq!(c.read(t0 + Duration::from_millis(250)), 1250);
        // An earlier instant cannot move time back.
        assert_eq!(c.read(t0 + Duration::from_millis(100)), 1250);
        c.set_scale(2.0, t0 + Duration::from_millis(250));
        assert_eq!(c.read(t0 + Duration::from_millis(350)), 1450);
        c.set_scale(1000.0, t0 + Duration::from_millis(350));
        assert_eq!(c.scale(), MAX_SCALE);
    }
}
