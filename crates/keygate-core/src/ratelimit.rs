//! Sliding-window rate limiting: the two-window weighted counter (as in Cloudflare's and
//! Unkey's limiters). The previous fixed window's count is weighted by how much of it still
//! overlaps the sliding window, so there is no burst of 2× the limit at a window edge, and the
//! state is three numbers per key.

use crate::InvalidInput;
use serde::{Deserialize, Serialize};

/// A limit of `limit` requests per `window_seconds`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct RateLimit {
    /// Requests allowed per window (at least 1).
    pub limit: u32,
    /// Window length in seconds (1 second to 1 day).
    pub window_seconds: u32,
}

impl RateLimit {
    /// Checks the bounds: `limit` ≥ 1, `window_seconds` in 1..=86400.
    pub fn new(limit: u32, window_seconds: u32) -> Result<Self, InvalidInput> {
        if limit == 0 {
            return Err(InvalidInput::new("rate_limit.limit must be at least 1"));
        }
        if window_seconds == 0 || window_seconds > 86_400 {
            return Err(InvalidInput::new(
                "rate_limit.window_seconds must be between 1 and 86400",
            ));
        }
        Ok(Self {
            limit,
            window_seconds,
        })
    }

    fn window_ms(&self) -> i64 {
        i64::from(self.window_seconds) * 1000
    }
}

/// Counter state for one key: the start of the current fixed window and two counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct WindowState {
    /// Start of the current fixed window, in Unix milliseconds (aligned to the window length).
    pub start_ms: i64,
    /// Requests counted in the previous window.
    pub prev: u64,
    /// Requests counted in the current window.
    pub curr: u64,
}

/// The outcome of one rate-limit check, with what the response headers need.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateDecision {
    /// Whether the request is within the limit (and was counted).
    pub allowed: bool,
    /// The configured limit.
    pub limit: u32,
    /// Requests left in the sliding window after this one.
    pub remaining: u32,
    /// Seconds until the current fixed window ends (the `t` of the `RateLimit` header).
    pub reset_seconds: u32,
    /// When refused: seconds to wait before a retry can succeed (`Retry-After`), at least 1.
    pub retry_after_seconds: u32,
    /// The window length, for `RateLimit-Policy`.
    pub window_seconds: u32,
}

impl WindowState {
    /// Rolls the windows forward to `now_ms`.
    fn roll(&mut self, window_ms: i64, now_ms: i64) {
        let start = now_ms - now_ms.rem_euclid(window_ms);
        if start == self.start_ms {
            return;
        }
        self.prev = if start - self.start_ms == window_ms {
            self.curr
        } else {
            0
        };
        self.curr = 0;
        self.start_ms = start;
    }

    /// The weighted count at `now_ms` (after `roll`).
    fn estimate(&self, window_ms: i64, now_ms: i64) -> f64 {
        let elapsed = (now_ms - self.start_ms) as f64;
        let w = window_ms as f64;
        self.prev as f64 * ((w - elapsed) / w) + self.curr as f64
    }

    /// Checks a request of weight `cost` at `now_ms`; counts it if allowed.
    pub fn check(&mut self, rl: &RateLimit, now_ms: i64, cost: u32) -> RateDecision {
        // A call stamped before the current window (a node whose clock is behind, or a request
        // that waited for the lock behind a later one) counts in the current window: rolling
        // the window back would wipe its count and let the limit through again.
        let now_ms = now_ms.max(self.start_ms);
        let w = rl.window_ms();
        self.roll(w, now_ms);
        let limit = f64::from(rl.limit);
        let cost_f = f64::from(cost.max(1));
        let est = self.estimate(w, now_ms);
        let allowed = est + cost_f <= limit;
        if allowed {
            self.curr += u64::from(cost.max(1));
        }
        let used = self.estimate(w, now_ms).ceil();
        let remaining = (limit - used).max(0.0) as u32;
        let reset_ms = self.start_ms + w - now_ms;
        let reset_seconds = ceil_secs(reset_ms);
        let retry_after_seconds = if allowed {
            0
        } else {
            ceil_secs(self.wait_ms(w, now_ms, limit - cost_f)).max(1)
        };
        RateDecision {
            allowed,
            limit: rl.limit,
            remaining,
            reset_seconds,
            retry_after_seconds,
            window_seconds: rl.window_seconds,
        }
    }

    /// Milliseconds from `now_ms` until the weighted count drops to `target` or below.
    fn wait_ms(&self, window_ms: i64, now_ms: i64, target: f64) -> i64 {
        let w = window_ms as f64;
        let curr = self.curr as f64;
        let prev = self.prev as f64;
        if target < 0.0 {
            // The cost alone exceeds the limit: it can never pass; answer one window.
            return window_ms;
        }
        if curr <= target && prev > 0.0 {
            // Within this window the previous window's weight decays: solve
            // prev * (w - d) / w + curr <= target for d.
            let d = w * (1.0 - (target - curr) / prev);
            let at = self.start_ms as f64 + d.max(0.0);
            return (at - now_ms as f64).ceil() as i64;
        }
        // Wait for the next window, where the current count becomes the decaying one.
        let d = if curr > 0.0 {
            w * (1.0 - target / curr)
        } else {
            0.0
        };
        let at = (self.start_ms + window_ms) as f64 + d.max(0.0);
        (at - now_ms as f64).ceil() as i64
    }
}

fn ceil_secs(ms: i64) -> u32 {
    let ms = ms.max(0);
    u32::try_from((ms + 999) / 1000).unwrap_or(u32::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_late_call_counts_in_the_current_window_and_does_not_roll_it_back() {
        let rl = RateLimit::new(3, 60).expect("valid");
        let mut s = WindowState::default();
        // The new window (from 60 s) has its three calls.
        for _ in 0..3 {
            assert!(s.check(&rl, 120_000, 1).allowed);
        }
        // A call stamped 1 ms before the window (a clock behind): refused, and the count stays.
        assert!(!s.check(&rl, 119_999, 1).allowed);
        assert!(!s.check(&rl, 120_001, 1).allowed);
    }

    #[test]
    fn fourth_request_of_three_per_minute_is_refused() {
        let rl = RateLimit::new(3, 60).expect("valid");
        let mut s = WindowState::default();
        let t = 1_700_000_010_000;
        for i in 0..3 {
            let d = s.check(&rl, t + i, 1);
            assert!(d.allowed);
            assert_eq!(d.remaining, 2 - i as u32);
        }
        let d = s.check(&rl, t + 5, 1);
        assert!(!d.allowed);
        assert!(d.retry_after_seconds >= 1 && d.retry_after_seconds <= 120);
    }

    #[test]
    fn retry_after_is_honest() {
        // Whatever the timing, waiting Retry-After seconds makes the next request pass.
        let rl = RateLimit::new(5, 10).expect("valid");
        for offset in [0i64, 1_000, 4_321, 9_999] {
            let mut s = WindowState::default();
            let t = 1_700_000_000_000 + offset;
            for _ in 0..5 {
                assert!(s.check(&rl, t, 1).allowed);
            }
            let d = s.check(&rl, t, 1);
            assert!(!d.allowed);
            let later = t + i64::from(d.retry_after_seconds) * 1000;
            let mut s2 = s;
            assert!(s2.check(&rl, later, 1).allowed, "offset {offset}");
            // and not much earlier (within one second granularity)
            let mut s3 = s;
            if d.retry_after_seconds > 1 {
                assert!(!s3.check(&rl, later - 1500, 1).allowed, "offset {offset}");
            }
        }
    }

    #[test]
    fn no_double_burst_at_window_edge() {
        let rl = RateLimit::new(10, 60).expect("valid");
        let mut s = WindowState::default();
        // A multiple of 60 000: the start of a fixed window.
        let start = 1_700_000_040_000;
        assert_eq!(start % 60_000, 0);
        for _ in 0..10 {
            assert!(s.check(&rl, start + 59_000, 1).allowed);
        }
        // just after the edge, the previous window still weighs ~98 %.
        assert!(!s.check(&rl, start + 60_100, 1).allowed);
    }

    #[test]
    fn bounds() {
        assert!(RateLimit::new(0, 60).is_err());
        assert!(RateLimit::new(1, 0).is_err());
        assert!(RateLimit::new(1, 86_401).is_err());
    }
}
