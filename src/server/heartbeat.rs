//! The WebSocket heartbeat that stream and publisher connections both run (the shared
//! loop, `session::ws::drive`, polls it): [`Heartbeat`], a ping every
//! `server.heartbeat_ms`, and the [`Beat`] verdict "timed out" once no pong came for two
//! intervals.

use std::time::Duration;

use tokio::time::{Instant, Interval, MissedTickBehavior};

/// What a heartbeat tick asks of the connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Beat {
    /// Send a ping.
    Ping,
    /// No pong for two intervals: close the connection (1008) and count it.
    TimedOut,
}

/// A connection's heartbeat state.
#[derive(Debug)]
pub(crate) struct Heartbeat {
    ticker: Interval,
    every: Duration,
    last_pong: Instant,
}

impl Heartbeat {
    /// The first ping is due one interval from now.
    pub(crate) fn new(every: Duration) -> Heartbeat {
        let mut ticker = tokio::time::interval_at(Instant::now() + every, every);
        // After a stall, one ping rather than a burst of the missed ones.
        ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
        Heartbeat { ticker, every, last_pong: Instant::now() }
    }

    /// Waits for the next interval (cancel-safe, for `select!`).
    pub(crate) async fn tick(&mut self) -> Beat {
        self.ticker.tick().await;
        if self.last_pong.elapsed() > self.every * 2 {
            Beat::TimedOut
        } else {
            Beat::Ping
        }
    }

    /// The peer answered.
    pub(crate) fn pong(&mut self) {
        self.last_pong = Instant::now();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn pings_every_interval_and_times_out_after_two_without_a_pong() {
        let mut hb = Heartbeat::new(Duration::from_secs(10));
        let start = Instant::now();
        assert_eq!(hb.tick().await, Beat::Ping);
        assert_eq!(start.elapsed(), Duration::from_secs(10));
        hb.pong();
        assert_eq!(hb.tick().await, Beat::Ping); // 10 s since the pong
        assert_eq!(hb.tick().await, Beat::Ping); // 20 s: two intervals, not more
        assert_eq!(hb.tick().await, Beat::TimedOut); // 30 s
    }
}
