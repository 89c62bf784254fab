//! Throttling of password sign-ins, per account and per client network, with waits that grow
//! with each failure past the free ones, counted in the store so that every node sees the same
//! counts. Why throttling and not a lock, and the defaults: see [`crate::config::LoginConfig`].

use crate::clock::now_ms;
use crate::config::LoginConfig;
use crate::engine::Engine;
use keygate_store::LoginThrottle;
use std::net::IpAddr;

/// How often a count is read again after another node changed it under us.
const RETRIES: usize = 8;

/// The wait after the `failures`-th failure of a subject with `free` free failures: none up to
/// `free`, then `base_ms`, doubled with each further failure, at most `max_ms`.
pub fn delay_ms(failures: u32, free: u32, base_ms: u64, max_ms: u64) -> u64 {
    match failures.checked_sub(free) {
        None | Some(0) => 0,
        Some(past) => {
            let doublings = (past - 1).min(63);
            base_ms.saturating_mul(1u64 << doublings).min(max_ms)
        }
    }
}

/// The network a client address counts for: the address itself for IPv4 (and IPv4-mapped
/// IPv6), its /64 for IPv6 (one subscriber gets a whole /64, so single addresses are free).
pub fn network_of(ip: IpAddr) -> String {
    match ip {
        IpAddr::V4(v4) => v4.to_string(),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => v4.to_string(),
            None => {
                let s = v6.segments();
                format!("{:x}:{:x}:{:x}:{:x}::/64", s[0], s[1], s[2], s[3])
            }
        },
    }
}

/// Why an attempt may not be made now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// Too many failures: try again after this many milliseconds.
    Wait(u64),
    /// The store cannot be reached: the attempt is refused rather than left uncounted.
    Unavailable,
}

/// One subject's rule.
#[derive(Debug, Clone, Copy)]
struct Rule {
    free: u32,
    max_ms: u64,
}

/// A sign-in attempt that has been counted as a failure against its account and network (and
/// holds off parallel attempts meanwhile); say what came of it with [`Attempt::failed`],
/// [`Attempt::succeeded`] or [`Attempt::not_judged`].
#[derive(Debug)]
#[must_use = "say what came of the attempt"]
pub struct Attempt {
    account: String,
    network: String,
}

fn subjects(account: &str, network: &str, c: &LoginConfig) -> [(String, Rule); 2] {
    [
        (
            format!("account:{account}"),
            Rule {
                free: c.account_free_failures,
                max_ms: c.account_max_delay_ms,
            },
        ),
        (
            format!("network:{network}"),
            Rule {
                free: c.network_free_failures,
                max_ms: c.network_max_delay_ms,
            },
        ),
    ]
}

/// Starts a sign-in attempt of `account` (`tenant/email`, lower case) from `ip`: refused while
/// the account or the network must wait, else counted as a failure against both.
pub async fn begin(state: &Engine, account: &str, ip: IpAddr) -> Result<Attempt, Refused> {
    let c = &state.config.login;
    let network = network_of(ip);
    let subjects = subjects(account, &network, c);
    let store = &state.store;
    let forget_ms = i64::try_from(c.forget_after_seconds.saturating_mul(1000)).unwrap_or(i64::MAX);
    let mut counted = [false; 2];
    for _ in 0..RETRIES {
        let now = now_ms();
        let mut rows = [None; 2];
        let mut wait = 0u64;
        for (i, (subject, _)) in subjects.iter().enumerate() {
            let row = store
                .get_login_throttle(subject)
                .await
                .map_err(|e| unavailable(&e))?;
            let live = row.filter(|t| t.last_ms >= now.saturating_sub(forget_ms));
            if let Some(t) = live.filter(|t| t.next_ms > now && !counted[i]) {
                wait = wait.max(u64::try_from(t.next_ms - now).unwrap_or(0));
            }
            rows[i] = Some((row, live));
        }
        if wait > 0 {
            return Err(Refused::Wait(wait));
        }
        let mut lost = false;
        for (i, (subject, rule)) in subjects.iter().enumerate() {
            let Some((row, live)) = rows[i] else { continue };
            if counted[i] {
                continue;
            }
            let failures = live.map_or(1, |t| t.failures.saturating_add(1));
            let wait = delay_ms(failures, rule.free, c.base_delay_ms, rule.max_ms);
            let next = LoginThrottle {
                failures,
                last_ms: now,
                next_ms: now.saturating_add(i64::try_from(wait).unwrap_or(i64::MAX)),
            };
            match store
                .swap_login_throttle(subject, row.as_ref(), Some(&next))
                .await
            {
                Ok(true) => counted[i] = true,
                Ok(false) => {
                    lost = true;
                    break;
                }
                Err(e) => return Err(unavailable(&e)),
            }
        }
        if !lost {
            return Ok(Attempt {
                account: account.to_owned(),
                network,
            });
        }
    }
    // Another node keeps counting this subject: someone is trying hard.
    Err(Refused::Wait(c.base_delay_ms.max(1)))
}

fn unavailable(e: &dyn std::fmt::Display) -> Refused {
    tracing::error!("sign-in throttle: the store is unavailable: {e}");
    Refused::Unavailable
}

impl Attempt {
    /// The password was wrong: the failure stays counted, and the wait it brings starts now
    /// (after the check), so the caller waits all of it whatever the check took.
    pub async fn failed(self, state: &Engine) {
        let c = &state.config.login;
        let now = now_ms();
        for (subject, rule) in subjects(&self.account, &self.network, c) {
            let wait = |t: &LoginThrottle| {
                let ms = delay_ms(t.failures, rule.free, c.base_delay_ms, rule.max_ms);
                now.saturating_add(i64::try_from(ms).unwrap_or(i64::MAX))
            };
            change(state, &subject, |t| {
                Some(LoginThrottle {
                    next_ms: t.next_ms.max(wait(&t)),
                    ..t
                })
            })
            .await;
        }
    }

    /// The password was right: the account's failures are forgotten, and this attempt no
    /// longer counts against the network (whose earlier failures stay).
    pub async fn succeeded(self, state: &Engine) {
        let [(account, _), (network, _)] =
            subjects(&self.account, &self.network, &state.config.login);
        change(state, &account, |_| None).await;
        change(state, &network, give_back).await;
    }

    /// The password could not be checked (hashing busy, store down): the attempt counts for
    /// nothing.
    pub async fn not_judged(self, state: &Engine) {
        for (subject, _) in subjects(&self.account, &self.network, &state.config.login) {
            change(state, &subject, give_back).await;
        }
    }
}

/// One failure fewer; the wait already set stays.
fn give_back(t: LoginThrottle) -> Option<LoginThrottle> {
    match t.failures {
        0 | 1 => None,
        n => Some(LoginThrottle {
            failures: n - 1,
            ..t
        }),
    }
}

/// Applies `f` to `subject`'s count, again if another node changed it meanwhile.
async fn change(state: &Engine, subject: &str, f: impl Fn(LoginThrottle) -> Option<LoginThrottle>) {
    for _ in 0..RETRIES {
        let row = match state.store.get_login_throttle(subject).await {
            Ok(Some(row)) => row,
            Ok(None) => return,
            Err(e) => {
                tracing::warn!("sign-in throttle: could not update {subject}: {e}");
                return;
            }
        };
        match state
            .store
            .swap_login_throttle(subject, Some(&row), f(row).as_ref())
            .await
        {
            Ok(true) => return,
            Ok(false) => continue,
            Err(e) => {
                tracing::warn!("sign-in throttle: could not update {subject}: {e}");
                return;
            }
        }
    }
}

/// The message of a refused attempt.
pub fn refusal_message(r: Refused) -> String {
    match r {
        Refused::Wait(ms) => format!(
            "Too many failed sign-ins. Try again in {} seconds.",
            ms.div_ceil(1000).max(1)
        ),
        Refused::Unavailable => "Try again in a moment.".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn the_wait_doubles_past_the_free_failures_up_to_the_cap() {
        let waits: Vec<u64> = (0..=12).map(|f| delay_ms(f, 5, 1_000, 30_000)).collect();
        assert_eq!(
            waits,
            [0, 0, 0, 0, 0, 0, 1_000, 2_000, 4_000, 8_000, 16_000, 30_000, 30_000]
        );
        assert_eq!(delay_ms(u32::MAX, 0, u64::MAX, u64::MAX), u64::MAX);
        assert_eq!(delay_ms(3, 0, 0, 10), 0);
    }

    proptest! {
        #[test]
        fn the_wait_never_shrinks_with_more_failures_and_never_passes_the_cap(
            f in 0u32..200, free in 0u32..50, base in 0u64..100_000, max in 0u64..10_000_000,
        ) {
            let (a, b) = (delay_ms(f, free, base, max), delay_ms(f + 1, free, base, max));
            prop_assert!(a <= b);
            prop_assert!(b <= max);
        }
    }

    #[test]
    fn an_ipv6_client_counts_for_its_64() {
        let a = network_of("2001:db8:1:2:aaaa::1".parse().expect("ip"));
        let b = network_of("2001:db8:1:2:ffff:1:2:3".parse().expect("ip"));
        assert_eq!(a, b);
        assert_eq!(a, "2001:db8:1:2::/64");
        assert_ne!(a, network_of("2001:db8:1:3::1".parse().expect("ip")));
        assert_eq!(
            network_of("::ffff:203.0.113.9".parse().expect("ip")),
            "203.0.113.9"
        );
        assert_eq!(
            network_of("203.0.113.9".parse().expect("ip")),
            "203.0.113.9"
        );
    }
}
