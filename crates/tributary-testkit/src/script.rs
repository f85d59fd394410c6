//! What the recording upstream answers: [`Reply`] for one request, [`Script`] for all.

use std::collections::VecDeque;
use std::time::Duration;

/// One answer to one request.
///
/// ```
/// use std::time::Duration;
/// use tributary_testkit::Reply;
/// let slow_busy = Reply::status(503).retry_after("2").delay(Duration::from_millis(50));
/// # let _ = (slow_busy, Reply::hang(), Reply::reset());
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    pub(crate) kind: ReplyKind,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum ReplyKind {
    Respond {
        status: u16,
        headers: Vec<(String, String)>,
        body: String,
        delay: Duration,
    },
    Hang,
    Reset,
}

impl Reply {
    /// Answer with `status` and an empty body.
    pub fn status(status: u16) -> Self {
        Reply {
            kind: ReplyKind::Respond {
                status,
                headers: Vec::new(),
                body: String::new(),
                delay: Duration::ZERO,
            },
        }
    }

    /// `204 No Content`, what the Event API answers to a good request.
    pub fn no_content() -> Self {
        Reply::status(204)
    }

    /// Never answer: the request hangs until the client gives up or the upstream stops.
    pub fn hang() -> Self {
        Reply {
            kind: ReplyKind::Hang,
        }
    }

    /// Read the request, then reset the connection (TCP RST) without answering.
    pub fn reset() -> Self {
        Reply {
            kind: ReplyKind::Reset,
        }
    }

    /// Adds a `Retry-After` header with this exact value (seconds or an HTTP date).
    /// Ignored on [`Reply::hang`] and [`Reply::reset`].
    pub fn retry_after(self, value: impl Into<String>) -> Self {
        self.header("Retry-After", value)
    }

    /// Adds a response header. Ignored on [`Reply::hang`] and [`Reply::reset`].
    pub fn header(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        if let ReplyKind::Respond { headers, .. } = &mut self.kind {
            headers.push((name.into(), value.into()));
        }
        self
    }

    /// Sets the response body. Ignored on [`Reply::hang`] and [`Reply::reset`].
    pub fn body(mut self, text: impl Into<String>) -> Self {
        if let ReplyKind::Respond { body, .. } = &mut self.kind {
            *body = text.into();
        }
        self
    }

    /// Waits this long before answering. Ignored on [`Reply::hang`] and [`Reply::reset`].
    pub fn delay(mut self, d: Duration) -> Self {
        if let ReplyKind::Respond { delay, .. } = &mut self.kind {
            *delay = d;
        }
        self
    }

    /// The status this reply answers with, if it answers.
    pub fn status_code(&self) -> Option<u16> {
        match self.kind {
            ReplyKind::Respond { status, .. } => Some(status),
            ReplyKind::Hang | ReplyKind::Reset => None,
        }
    }
}

/// How the upstream answers every request.
///
/// For each request, in this order: a body containing the poison marker, or an event whose
/// uuid starts with the refused prefix, gets the poison reply; else the next queued reply is
/// used up; else, with a failure rate set, a seeded pseudo-random share of requests gets one
/// of the failure replies; else the default reply (`204`).
///
/// ```
/// use tributary_testkit::{Reply, Script};
/// // Two 503s, then 204s; any body containing "poison" is refused with 400 meanwhile.
/// let script = Script::new()
///     .then(Reply::status(503))
///     .then(Reply::status(503))
///     .reject_containing("poison", Reply::status(400));
/// # let _ = script;
/// ```
#[derive(Debug, Clone)]
pub struct Script {
    queue: VecDeque<Reply>,
    default: Reply,
    fail: Option<FailRate>,
    poison: Option<(Vec<u8>, Reply)>,
    uuid_prefix: Option<(String, Reply)>,
}

#[derive(Debug, Clone)]
struct FailRate {
    percent: u8,
    seed: u64,
    replies: Vec<Reply>,
}

impl Default for Script {
    fn default() -> Self {
        Script::new()
    }
}

impl Script {
    /// Answers `204` to everything.
    pub fn new() -> Self {
        Script {
            queue: VecDeque::new(),
            default: Reply::no_content(),
            fail: None,
            poison: None,
            uuid_prefix: None,
        }
    }

    /// Queues `reply` for the next request not taken by the poison rule.
    pub fn then(mut self, reply: Reply) -> Self {
        self.queue.push_back(reply);
        self
    }

    /// Queues `n` copies of `reply`.
    pub fn then_n(mut self, n: usize, reply: Reply) -> Self {
        self.queue.extend(std::iter::repeat_n(reply, n));
        self
    }

    /// The answer once the queue is used up (default `204`).
    pub fn default_reply(mut self, reply: Reply) -> Self {
        self.default = reply;
        self
    }

    /// Answers `reply` to `percent`% of the requests that reach the default, picked by a
    /// pseudo-random sequence seeded with `seed`: the same seed fails the same request
    /// numbers on every run.
    pub fn fail_rate(self, percent: u8, seed: u64, reply: Reply) -> Self {
        self.fail_mix(percent, seed, vec![reply])
    }

    /// Like [`Script::fail_rate`], each failing request getting one of `replies` (picked by
    /// the same seeded sequence): a 503 here, a reset connection there.
    pub fn fail_mix(mut self, percent: u8, seed: u64, replies: Vec<Reply>) -> Self {
        self.fail = Some(FailRate {
            percent: percent.min(100),
            seed,
            replies,
        });
        self
    }

    /// Answers `reply` to any request holding an event whose `uuid` starts with `prefix`,
    /// the way the Event API refuses a whole request for one bad event.
    pub fn reject_uuid_prefix(mut self, prefix: impl Into<String>, reply: Reply) -> Self {
        self.uuid_prefix = Some((prefix.into(), reply));
        self
    }

    /// Answers `reply` (typically `Reply::status(400)`) to any request whose (decompressed)
    /// body contains `marker`, whatever else is scripted: a poison visitor.
    pub fn reject_containing(mut self, marker: impl AsRef<[u8]>, reply: Reply) -> Self {
        self.poison = Some((marker.as_ref().to_vec(), reply));
        self
    }

    /// Picks the reply for request number `seq` (0-based) with this body.
    pub(crate) fn next_reply(&mut self, seq: u64, body: &[u8]) -> Reply {
        if let Some((marker, reply)) = &self.poison
            && contains(body, marker)
        {
            return reply.clone();
        }
        if let Some((prefix, reply)) = &self.uuid_prefix
            && crate::event_uuids(body)
                .iter()
                .any(|u| u.starts_with(prefix.as_str()))
        {
            return reply.clone();
        }
        if let Some(reply) = self.queue.pop_front() {
            return reply;
        }
        if let Some(f) = &self.fail
            && let roll = splitmix64(f.seed ^ splitmix64(seq))
            && roll % 100 < u64::from(f.percent)
            && !f.replies.is_empty()
        {
            let pick = (roll / 100) as usize % f.replies.len();
            return f.replies[pick].clone();
        }
        self.default.clone()
    }
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    needle.is_empty() || haystack.windows(needle.len()).any(|w| w == needle)
}

/// A well-mixed 64-bit hash (SplitMix64's finaliser): deterministic and dependency-free.
fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn order_is_poison_queue_failrate_default() {
        let mut s = Script::new()
            .then(Reply::status(500))
            .reject_containing("bad", Reply::status(400));
        assert_eq!(s.next_reply(0, b"a bad body").status_code(), Some(400));
        assert_eq!(s.next_reply(1, b"ok").status_code(), Some(500));
        assert_eq!(s.next_reply(2, b"ok").status_code(), Some(204));
    }

    #[test]
    fn a_refused_uuid_prefix_refuses_the_whole_request() {
        let mut s = Script::new().reject_uuid_prefix("00", Reply::status(400));
        let body = br#"{"visitors":[{"snapshots":[{"events":[{"uuid":"ab"},{"uuid":"00f"}]}]}]}"#;
        assert_eq!(s.next_reply(0, body).status_code(), Some(400));
        let good = br#"{"visitors":[{"snapshots":[{"events":[{"uuid":"0a"}]}]}]}"#;
        assert_eq!(s.next_reply(1, good).status_code(), Some(204));
    }

    #[test]
    fn a_failure_mix_uses_every_reply() {
        let mut s = Script::new().fail_mix(50, 3, vec![Reply::status(503), Reply::reset()]);
        let answers: Vec<_> = (0..400)
            .map(|i| s.next_reply(i, b"").status_code())
            .collect();
        assert!(answers.contains(&Some(503)));
        assert!(answers.contains(&None));
        assert!(answers.contains(&Some(204)));
    }

    #[test]
    fn fail_rate_is_deterministic_and_near_the_rate() {
        let mut a = Script::new().fail_rate(30, 7, Reply::status(503));
        let mut b = a.clone();
        let fa: Vec<_> = (0..1000)
            .map(|i| a.next_reply(i, b"").status_code())
            .collect();
        let fb: Vec<_> = (0..1000)
            .map(|i| b.next_reply(i, b"").status_code())
            .collect();
        assert_eq!(fa, fb);
        let failed = fa.iter().filter(|s| **s == Some(503)).count();
        assert!((230..370).contains(&failed), "{failed}");
    }
}
