//! `.adaptive_limit(max)`: a concurrency limit that finds itself from the
//! latency calls show, after TCP Vegas as Netflix's concurrency-limits
//! applies it to requests.
//!
//! The limiter keeps the no-load latency: the lowest seen. From a call's
//! latency `rtt` it estimates the calls queued at the other end, `queue =
//! limit · (1 − no_load / rtt)`: with no queue, latency stays at its floor;
//! past the server's capacity, every call more waits in its queue and raises
//! `rtt`. With `lg = max(1, log10(limit))`:
//!
//! - `queue ≤ lg`: far below the knee, the limit grows by `6 · lg`;
//! - `queue < 2 · lg`: near it, the limit grows by `lg`;
//! - `queue > 4 · lg`: past it, the limit shrinks by `lg`;
//! - a dropped call (a timeout or a panic) halves it;
//! - in between it stays.
//!
//! (Netflix's Vegas allows a queue of `3 · lg` to `6 · lg`; a smaller one
//! keeps latency nearer the floor when the knee is low: a server that
//! serves 8 at once settles at 11–13 calls rather than 15.)
//!
//! The limit does not grow while fewer than half of it run (the map is not
//! using what it has: nothing is learnt about more). It stays within
//! `1..=max`. It moves at most once a round trip, as TCP's window does: it
//! decides once per round of `limit` calls, from their mean latency, and
//! after a change it does not read the calls that were running when it was
//! made (they started under the old limit). A drop does not wait for the
//! round's end.
//!
//! A floor learnt once would take a server that got slower for good for a
//! congested one forever. So every `PROBE_EVERY · limit` samples the limiter
//! probes, as Envoy's adaptive concurrency filter does: it holds the limit
//! at a quarter for `2 · limit` samples (the calls started before the probe
//! end within the first half), takes the lowest latency they show as the
//! new floor, and goes back to the limit it had.

use std::time::Duration;

/// Samples between probes, per unit of the limit.
const PROBE_EVERY: u64 = 300;

/// The adaptive limit of one map.
#[derive(Debug)]
pub(crate) struct Limiter {
    limit: f64,
    max: f64,
    /// The lowest latency seen since the last probe.
    no_load: Option<Duration>,
    /// Samples since the last probe.
    samples: u64,
    probe: Option<Probe>,
    /// Samples still to come from calls that started before the last
    /// change: they tell nothing of it.
    stale: usize,
    /// The samples of this round.
    round: Round,
}

/// The samples since the last decision: one decision per round of `limit`
/// samples, from their mean latency.
#[derive(Debug, Default)]
struct Round {
    samples: u64,
    /// Their latencies, summed, in seconds.
    latency: f64,
    /// The most calls that ran at once when one of them ended.
    in_flight: usize,
}

/// A probe of the no-load latency under way.
#[derive(Debug)]
struct Probe {
    /// The limit to go back to.
    resume: f64,
    samples_left: u64,
    lowest: Duration,
}

impl Limiter {
    /// Starts at `start` (at least 1), never above `max`.
    pub(crate) fn new(start: usize, max: usize) -> Self {
        let max = max.max(1) as f64;
        Limiter {
            limit: (start.max(1) as f64).min(max),
            max,
            no_load: None,
            samples: 0,
            probe: None,
            stale: 0,
            round: Round::default(),
        }
    }

    /// The limit now: calls that may run at once.
    pub(crate) fn limit(&self) -> usize {
        // At most `max`, which came from a `usize`.
        self.limit as usize
    }

    /// A call ended after `latency` (from the moment it held its permit),
    /// `dropped` if it timed out or panicked, with `in_flight` calls
    /// running (it included). Returns the new limit if it changed.
    pub(crate) fn observe(
        &mut self,
        latency: Duration,
        dropped: bool,
        in_flight: usize,
    ) -> Option<usize> {
        let before = self.limit();
        self.step(latency, dropped, in_flight);
        let after = self.limit();
        if after == before {
            return None;
        }
        // The calls running now started under the old limit.
        self.stale = in_flight.saturating_sub(1);
        Some(after)
    }

    fn step(&mut self, latency: Duration, dropped: bool, in_flight: usize) {
        if let Some(probe) = &mut self.probe {
            probe.lowest = probe.lowest.min(latency);
            probe.samples_left -= 1;
            if probe.samples_left == 0 {
                self.no_load = Some(probe.lowest);
                self.limit = probe.resume;
                self.probe = None;
            }
            return;
        }
        self.samples += 1;
        if self.samples >= PROBE_EVERY.saturating_mul(self.limit() as u64) {
            self.samples = 0;
            self.probe = Some(Probe {
                resume: self.limit,
                samples_left: 2 * self.limit() as u64,
                lowest: Duration::MAX,
            });
            self.limit = (self.limit / 4.0).max(1.0);
            self.round = Round::default();
            return;
        }
        let no_load = match self.no_load {
            Some(no_load) if no_load <= latency => no_load,
            // A new floor: nothing queues behind this call.
            _ => {
                self.no_load = Some(latency);
                latency
            }
        };
        if self.stale > 0 {
            self.stale -= 1;
            return;
        }
        let lg = self.limit.log10().max(1.0);
        let next = if dropped {
            self.round = Round::default();
            self.limit / 2.0
        } else {
            let round = &mut self.round;
            round.samples += 1;
            round.latency += latency.as_secs_f64();
            round.in_flight = round.in_flight.max(in_flight);
            if round.samples < self.limit() as u64 {
                return;
            }
            let round = std::mem::take(&mut self.round);
            if (round.in_flight as f64) * 2.0 < self.limit {
                return;
            }
            let mean = round.latency / round.samples as f64;
            let ratio = if mean > 0.0 {
                no_load.as_secs_f64() / mean
            } else {
                1.0
            };
            let queue = self.limit * (1.0 - ratio);
            if queue <= lg {
                self.limit + 6.0 * lg
            } else if queue < 2.0 * lg {
                self.limit + lg
            } else if queue > 4.0 * lg {
                self.limit - lg
            } else {
                return;
            }
        };
        self.limit = next.clamp(1.0, self.max);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    /// A server that serves `capacity` calls at once in `service` each and
    /// queues the rest: the latency a call sees with `limit` of them sent.
    fn knee(limit: usize, capacity: usize, service: Duration) -> Duration {
        service.mul_f64((limit as f64 / capacity as f64).max(1.0))
    }

    /// Runs `samples` calls against the knee, every call of the limit busy.
    fn settle(limiter: &mut Limiter, capacity: usize, samples: usize) -> Vec<usize> {
        (0..samples)
            .map(|_| {
                let limit = limiter.limit();
                limiter.observe(knee(limit, capacity, 10 * MS), false, limit);
                limiter.limit()
            })
            .collect()
    }

    #[test]
    fn the_limit_grows_to_just_past_the_knee_and_stays_there() {
        let mut limiter = Limiter::new(1, 256);
        let path = settle(&mut limiter, 32, 20_000);
        let last = &path[1_000..];
        let there = last
            .iter()
            .filter(|&&limit| (32..=42).contains(&limit))
            .count();
        assert!(there * 100 >= last.len() * 95, "{:?}", &path[..200]);
        assert!(last.iter().all(|&limit| limit <= 42), "{:?}", &path[..200]);
    }

    #[test]
    fn the_limit_follows_the_knee_down_when_capacity_drops() {
        let mut limiter = Limiter::new(1, 256);
        settle(&mut limiter, 32, 2_000);
        let path = settle(&mut limiter, 8, 20_000);
        // Within a couple of thousand calls (one decision a round), then
        // there, but for its probes.
        let last = &path[2_000..];
        let there = last
            .iter()
            .filter(|&&limit| (8..=13).contains(&limit))
            .count();
        assert!(there * 100 >= last.len() * 95, "{:?}", &path[..200]);
        assert!(last.iter().all(|&limit| limit <= 13), "{:?}", &path[..200]);
    }

    #[test]
    fn the_limit_never_leaves_one_to_max() {
        let mut limiter = Limiter::new(300, 4);
        assert_eq!(limiter.limit(), 4, "starts at most at max");
        for _ in 0..100 {
            limiter.observe(MS, false, 4);
        }
        assert_eq!(limiter.limit(), 4);
        for _ in 0..100 {
            limiter.observe(MS, true, 4);
        }
        assert_eq!(limiter.limit(), 1);
        let mut zero = Limiter::new(0, 0);
        assert_eq!(zero.limit(), 1);
        zero.observe(Duration::ZERO, false, 1);
        zero.observe(Duration::MAX, false, 1);
        assert_eq!(zero.limit(), 1);
    }

    #[test]
    fn timeouts_and_panics_shrink_the_limit() {
        let mut limiter = Limiter::new(100, 256);
        assert_eq!(limiter.observe(10 * MS, true, 100), Some(50));
        for _ in 0..99 {
            assert_eq!(limiter.observe(10 * MS, true, 100), None, "one cut a round");
        }
        assert_eq!(limiter.observe(10 * MS, true, 100), Some(25));
    }

    #[test]
    fn an_idle_map_learns_nothing_about_a_higher_limit() {
        let mut limiter = Limiter::new(10, 256);
        for _ in 0..10 {
            limiter.observe(10 * MS, false, 10);
        }
        let grown = limiter.limit();
        assert!(grown > 10, "a busy round grows it");
        for _ in 0..100 {
            assert_eq!(limiter.observe(10 * MS, false, 2), None);
        }
        assert_eq!(limiter.limit(), grown);
    }

    #[test]
    fn a_probe_relearns_the_floor_of_a_server_that_got_slower() {
        let mut limiter = Limiter::new(4, 4);
        limiter.observe(MS, false, 4);
        // Slower for good: without a probe, every sample would look queued.
        let path: Vec<usize> = (0..5_000)
            .map(|_| {
                limiter.observe(20 * MS, false, 4);
                limiter.limit()
            })
            .collect();
        assert_eq!(path.last(), Some(&4), "{:?}", &path[path.len() - 20..]);
    }
}
