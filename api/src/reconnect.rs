//! How a client of the operator's streams waits between reconnect attempts.
//!
//! Every reflector loses its report stream at the same moment when the leading operator
//! dies, and a new leader opens no shard before every ready reflector has reported again
//! (the catch-up, docs/scale.md). So the waits are short (at most [`Backoff::MAX`]) and each
//! is drawn between half and all of the current back-off: reflectors cut off together do
//! not come back in step, and the last of them is back within about [`Backoff::MAX`] of the
//! new leader being reachable. While no leader is reachable the report Service has no
//! endpoint and an attempt is refused at once, so short waits cost little.

use std::time::Duration;

/// Doubling back-off with jitter; see the module docs.
#[derive(Debug, Clone)]
pub struct Backoff {
    current: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Self::new()
    }
}

impl Backoff {
    /// The first wait's upper bound.
    pub const MIN: Duration = Duration::from_millis(250);
    /// The longest wait.
    pub const MAX: Duration = Duration::from_secs(2);

    /// A back-off at [`Self::MIN`].
    pub fn new() -> Self {
        Self { current: Self::MIN }
    }

    /// Starts again from [`Self::MIN`] (after a stream that lasted).
    pub fn reset(&mut self) {
        self.current = Self::MIN;
    }

    /// The next wait, `draw` (in `0..=1`, a uniform random number) of the way from half the
    /// current back-off to all of it; then doubles the back-off up to [`Self::MAX`].
    pub fn next_wait(&mut self, draw: f64) -> Duration {
        let wait = self.current / 2 + self.current.mul_f64(draw.clamp(0.0, 1.0) / 2.0);
        self.current = (self.current * 2).min(Self::MAX);
        wait
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn waits_double_up_to_the_cap_between_half_and_all_of_the_back_off() {
        let mut b = Backoff::new();
        let lows: Vec<u128> = (0..6).map(|_| b.next_wait(0.0).as_millis()).collect();
        assert_eq!(lows, [125, 250, 500, 1000, 1000, 1000]);
        let mut b = Backoff::new();
        let highs: Vec<u128> = (0..6).map(|_| b.next_wait(1.0).as_millis()).collect();
        assert_eq!(highs, [250, 500, 1000, 2000, 2000, 2000]);
        assert_eq!(b.next_wait(7.0), Duration::from_secs(2), "draw clamped");
        b.reset();
        assert_eq!(b.next_wait(0.5).as_millis(), 187);
    }
}
