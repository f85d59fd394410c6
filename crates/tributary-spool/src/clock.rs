//! Time as the spool sees it: the wall clock read once, then carried forward by the
//! monotonic clock.
//!
//! Leases, retry delays and retention are stored as wall-clock milliseconds, because they
//! must mean something to the next process that opens the spool. But the wall clock can
//! step (NTP, an operator, a VM resumed): read on every lease, a step forward of an hour
//! would expire every lease at once and deliver everything in flight twice, and a step back
//! would hide released payloads for as long as the step.
//!
//! So a spool reads the wall clock once, when it opens, and from then on adds the monotonic
//! time elapsed: a step while it runs changes nothing. Across restarts the
//! spool keeps the latest time it wrote, and a new process never starts its clock before
//! it, so a clock stepped back between two runs cannot hide payloads either (they become
//! visible no later than their delay after the restart). A clock stepped forward between
//! two runs is taken as time that passed: leases of the dead process expire, which is what
//! they are for, and retention counts the step.
//!
//! [`TimeSource`] lets tests step the clocks ([`ManualTime`]).

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Where a spool reads the time: a wall clock and a monotonic one.
pub trait TimeSource: Send + Sync + 'static {
    /// Milliseconds since the Unix epoch; may step.
    fn wall_ms(&self) -> i64;
    /// Time since an arbitrary fixed start; never goes back.
    fn monotonic(&self) -> Duration;
}

/// The operating system's clocks.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemTimeSource;

fn process_start() -> Instant {
    static START: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    *START.get_or_init(Instant::now)
}

impl TimeSource for SystemTimeSource {
    fn wall_ms(&self) -> i64 {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
    }

    fn monotonic(&self) -> Duration {
        process_start().elapsed()
    }
}

/// Clocks a test sets by hand: [`ManualTime::step_wall`] is an NTP step,
/// [`ManualTime::advance`] is time passing (both clocks move).
///
/// ```
/// use std::time::Duration;
/// use tributary_spool::clock::{ManualTime, TimeSource};
/// let t = ManualTime::new(1_000_000);
/// t.advance(Duration::from_secs(1));
/// t.step_wall(-3_600_000);
/// assert_eq!(t.wall_ms(), 1_000_000 + 1_000 - 3_600_000);
/// assert_eq!(t.monotonic(), Duration::from_secs(1));
/// ```
#[derive(Debug, Default)]
pub struct ManualTime {
    wall_ms: AtomicI64,
    mono_ns: AtomicU64,
}

impl ManualTime {
    /// Wall clock at `wall_ms`, monotonic clock at zero.
    pub fn new(wall_ms: i64) -> ManualTime {
        ManualTime {
            wall_ms: AtomicI64::new(wall_ms),
            mono_ns: AtomicU64::new(0),
        }
    }

    /// Time passes: both clocks move by `d`.
    pub fn advance(&self, d: Duration) {
        let ns = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        self.mono_ns.fetch_add(ns, Ordering::SeqCst);
        let ms = i64::try_from(d.as_millis()).unwrap_or(i64::MAX);
        self.wall_ms.fetch_add(ms, Ordering::SeqCst);
    }

    /// The wall clock steps by `ms` (negative: back); the monotonic clock does not move.
    pub fn step_wall(&self, ms: i64) {
        self.wall_ms.fetch_add(ms, Ordering::SeqCst);
    }
}

impl TimeSource for ManualTime {
    fn wall_ms(&self) -> i64 {
        self.wall_ms.load(Ordering::SeqCst)
    }

    fn monotonic(&self) -> Duration {
        Duration::from_nanos(self.mono_ns.load(Ordering::SeqCst))
    }
}

/// A shareable [`TimeSource`], as given to a spool's configuration.
#[derive(Clone)]
pub struct Clock(Arc<dyn TimeSource>);

impl Clock {
    /// The operating system's clocks.
    pub fn system() -> Clock {
        Clock(Arc::new(SystemTimeSource))
    }

    /// Any time source (a [`ManualTime`] in tests).
    pub fn from_source(source: Arc<dyn TimeSource>) -> Clock {
        Clock(source)
    }

    #[cfg(feature = "sqlite")]
    pub(crate) fn source(&self) -> &dyn TimeSource {
        &*self.0
    }
}

impl Default for Clock {
    fn default() -> Self {
        Clock::system()
    }
}

impl std::fmt::Debug for Clock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Clock")
    }
}

impl PartialEq for Clock {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}

impl Eq for Clock {}

/// The spool's time: the wall clock read once at `open` (never before `floor_ms`, the
/// latest time the spool wrote), carried forward by the monotonic clock.
#[cfg(feature = "sqlite")]
#[derive(Debug, Clone)]
pub(crate) struct SpoolClock {
    clock: Clock,
    anchor_ms: i64,
    anchor_mono: Duration,
}

#[cfg(feature = "sqlite")]
impl SpoolClock {
    pub(crate) fn new(clock: Clock, floor_ms: i64) -> SpoolClock {
        let source = clock.source();
        let wall = source.wall_ms();
        let anchor_mono = source.monotonic();
        if wall < floor_ms {
            tracing::warn!(
                behind_ms = floor_ms - wall,
                "the wall clock is behind the latest time this spool wrote; counting from that time instead"
            );
        }
        SpoolClock {
            anchor_ms: wall.max(floor_ms),
            anchor_mono,
            clock,
        }
    }

    /// Milliseconds since the Unix epoch, as this spool counts them.
    pub(crate) fn now_ms(&self) -> i64 {
        let elapsed = self
            .clock
            .source()
            .monotonic()
            .saturating_sub(self.anchor_mono);
        self.anchor_ms
            .saturating_add(i64::try_from(elapsed.as_millis()).unwrap_or(i64::MAX))
    }
}

#[cfg(all(test, feature = "sqlite"))]
mod tests {
    use super::*;

    #[test]
    fn steps_of_the_wall_clock_do_not_move_a_running_spool_clock() {
        let t = Arc::new(ManualTime::new(10_000_000));
        let clock = SpoolClock::new(Clock::from_source(t.clone()), 0);
        t.advance(Duration::from_millis(500));
        t.step_wall(86_400_000);
        assert_eq!(clock.now_ms(), 10_000_500);
        t.step_wall(-2 * 86_400_000);
        t.advance(Duration::from_millis(500));
        assert_eq!(clock.now_ms(), 10_001_000);
    }

    #[test]
    fn a_new_clock_never_starts_before_the_floor() {
        let t = Arc::new(ManualTime::new(5_000));
        assert_eq!(
            SpoolClock::new(Clock::from_source(t.clone()), 9_000).now_ms(),
            9_000
        );
        assert_eq!(
            SpoolClock::new(Clock::from_source(t), 1_000).now_ms(),
            5_000
        );
    }
}
