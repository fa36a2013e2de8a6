//! gRPC connection backoff.
//!
//! This is the algorithm of gRPC's `connection-backoff.md`, per connection:
//!
//! ```text
//! ConnectWithBackoff()
//!   current_backoff = INITIAL_BACKOFF
//!   current_deadline = now() + INITIAL_BACKOFF
//!   while (TryConnect(Max(current_deadline, now() + MIN_CONNECT_TIMEOUT)) != SUCCESS)
//!     SleepUntil(current_deadline)
//!     current_backoff = Min(current_backoff * MULTIPLIER, MAX_BACKOFF)
//!     current_deadline = now() + current_backoff + UniformRandom(-JITTER * current_backoff, JITTER * current_backoff)
//! ```
//!
//! The first attempt is immediate; the delay only grows after failures and goes back to
//! `initial` as soon as a connection succeeds ([`Backoff::reset`]). The jitter keeps a fleet of
//! clients that lost the same server from reconnecting in lockstep.

use std::time::Duration;

/// Settings of gRPC connection backoff, applied to every connection of a pool.
///
/// The defaults are gRPC's: initial 1 s, multiplier 1.6, jitter ±20 %, maximum 120 s and a
/// minimum connect timeout of 20 s.
#[derive(Clone, Debug, PartialEq)]
pub struct BackoffConfig {
    /// Delay after the first failure. Defaults to 1 s.
    pub initial: Duration,
    /// Factor applied to the delay after each further failure. Defaults to 1.6.
    pub multiplier: f64,
    /// Relative jitter: each delay is spread uniformly over `delay * (1 ± jitter)`. Defaults to 0.2.
    pub jitter: f64,
    /// Upper bound of the delay (before jitter). Defaults to 120 s.
    pub max: Duration,
    /// The least time one connection attempt is given, whatever the current delay.
    /// Defaults to 20 s.
    pub min_connect_timeout: Duration,
}

impl Default for BackoffConfig {
    fn default() -> Self {
        Self {
            initial: Duration::from_secs(1),
            multiplier: 1.6,
            jitter: 0.2,
            max: Duration::from_secs(120),
            min_connect_timeout: Duration::from_secs(20),
        }
    }
}

impl BackoffConfig {
    /// Checks that the numbers make sense; used by the pool builder.
    pub(crate) fn validate(&self) -> Result<(), String> {
        if self.initial.is_zero() {
            return Err("backoff: initial delay must be greater than zero".into());
        }
        if !(self.multiplier.is_finite() && self.multiplier >= 1.0) {
            return Err(format!(
                "backoff: multiplier must be a finite number >= 1.0, got {}",
                self.multiplier
            ));
        }
        if !(self.jitter.is_finite() && (0.0..1.0).contains(&self.jitter)) {
            return Err(format!(
                "backoff: jitter must be in [0, 1), got {}",
                self.jitter
            ));
        }
        if self.max < self.initial {
            return Err(format!(
                "backoff: max ({:?}) must not be below initial ({:?})",
                self.max, self.initial
            ));
        }
        if self.min_connect_timeout.is_zero() {
            return Err("backoff: min_connect_timeout must be greater than zero".into());
        }
        Ok(())
    }
}

/// The backoff state of one connection.
#[derive(Debug)]
pub(crate) struct Backoff {
    config: BackoffConfig,
    /// The current delay before jitter.
    current: Duration,
    rng: FastRng,
}

impl Backoff {
    pub(crate) fn new(config: BackoffConfig, seed: u64) -> Self {
        Self {
            current: config.initial,
            config,
            rng: FastRng::new(seed),
        }
    }

    /// How long one connection attempt may take: `max(current delay, min_connect_timeout)`.
    pub(crate) fn connect_timeout(&self) -> Duration {
        self.current.max(self.config.min_connect_timeout)
    }

    /// The delay to wait after a failed attempt; grows the next one.
    pub(crate) fn next_delay(&mut self) -> Duration {
        let base = self.current;
        let spread = base.as_secs_f64() * self.config.jitter;
        // Uniform in [-spread, +spread].
        let offset = (self.rng.next_f64() * 2.0 - 1.0) * spread;
        let delay = Duration::from_secs_f64((base.as_secs_f64() + offset).max(0.0));
        let grown = base.as_secs_f64() * self.config.multiplier;
        self.current = Duration::from_secs_f64(grown.min(self.config.max.as_secs_f64()));
        delay
    }

    /// A connection succeeded: start again from the initial delay.
    pub(crate) fn reset(&mut self) {
        self.current = self.config.initial;
    }
}

/// A tiny xorshift generator: jitter and the picker's random start need spread, not secrecy,
/// and this keeps a `rand` dependency out of the crate.
#[derive(Debug, Clone)]
pub(crate) struct FastRng(u64);

impl FastRng {
    pub(crate) fn new(seed: u64) -> Self {
        // xorshift must never hold zero.
        Self(seed | 1)
    }

    /// A seed that differs between processes and calls.
    pub(crate) fn random_seed() -> u64 {
        use std::hash::{BuildHasher, Hasher};
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u64(0x9e37_79b9_7f4a_7c15);
        h.finish()
    }

    pub(crate) fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }

    /// Uniform in [0, 1).
    pub(crate) fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn grows_by_multiplier_until_max_then_resets() {
        let config = BackoffConfig {
            jitter: 0.0,
            ..BackoffConfig::default()
        };
        let mut b = Backoff::new(config, 7);
        let delays: Vec<f64> = (0..14).map(|_| b.next_delay().as_secs_f64()).collect();
        assert!((delays[0] - 1.0).abs() < 1e-9);
        assert!((delays[1] - 1.6).abs() < 1e-9);
        assert!((delays[2] - 2.56).abs() < 1e-9);
        assert!((delays[13] - 120.0).abs() < 1e-9, "capped: {delays:?}");
        b.reset();
        assert!((b.next_delay().as_secs_f64() - 1.0).abs() < 1e-9);
    }

    #[test]
    fn connect_timeout_is_at_least_the_minimum() {
        let mut b = Backoff::new(BackoffConfig::default(), 1);
        assert_eq!(b.connect_timeout(), Duration::from_secs(20));
        for _ in 0..20 {
            b.next_delay();
        }
        assert_eq!(b.connect_timeout(), Duration::from_secs(120));
    }

    #[test]
    fn validate_rejects_nonsense() {
        let bad = [
            BackoffConfig {
                initial: Duration::ZERO,
                ..Default::default()
            },
            BackoffConfig {
                multiplier: 0.5,
                ..Default::default()
            },
            BackoffConfig {
                multiplier: f64::NAN,
                ..Default::default()
            },
            BackoffConfig {
                jitter: 1.0,
                ..Default::default()
            },
            BackoffConfig {
                max: Duration::from_millis(1),
                ..Default::default()
            },
            BackoffConfig {
                min_connect_timeout: Duration::ZERO,
                ..Default::default()
            },
        ];
        for config in bad {
            assert!(config.validate().is_err(), "{config:?}");
        }
        assert!(BackoffConfig::default().validate().is_ok());
    }

    proptest! {
        /// Every delay stays within `[base * (1 - jitter), min(base, max) * (1 + jitter)]`.
        #[test]
        fn delays_respect_jitter_and_cap(seed in any::<u64>(), jitter in 0.0f64..0.99, steps in 1usize..40) {
            let config = BackoffConfig { jitter, ..BackoffConfig::default() };
            let mut b = Backoff::new(config.clone(), seed);
            let mut base = config.initial.as_secs_f64();
            for _ in 0..steps {
                let d = b.next_delay().as_secs_f64();
                prop_assert!(d >= base * (1.0 - jitter) - 1e-9, "{d} < {base}");
                prop_assert!(d <= base * (1.0 + jitter) + 1e-9, "{d} > {base}");
                prop_assert!(d <= config.max.as_secs_f64() * (1.0 + jitter) + 1e-9);
                base = (base * config.multiplier).min(config.max.as_secs_f64());
            }
        }
    }
}
