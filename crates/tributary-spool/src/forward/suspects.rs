//! Suspects: payloads whose isolation the budget cut short, remembered for the next cycle.

use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::sync::Mutex;

use super::lock;
use crate::Payload;

/// Most payloads remembered as suspect; past it the memory starts over (a forgotten
/// suspect costs a larger first request next time, nothing else).
pub(super) const SUSPECTS_CAPACITY: usize = 100_000;

/// Payloads whose isolation the budget cut short, by content, with the size of the group
/// they were left in: the next cycle sends them in batches no larger than that.
///
/// Kept in memory by content, not by spool id, so it works the same over SQLite and SQS;
/// lost on a restart, which only makes the next first request larger.
pub struct Suspects {
    hints: Mutex<HashMap<u64, usize>>,
    capacity: usize,
}

impl Suspects {
    pub(super) fn new(capacity: usize) -> Self {
        Suspects {
            hints: Mutex::new(HashMap::new()),
            capacity,
        }
    }

    fn key(p: &Payload) -> u64 {
        let mut h = std::collections::hash_map::DefaultHasher::new();
        p.route.hash(&mut h);
        p.header.hash(&mut h);
        p.visitors.hash(&mut h);
        h.finish()
    }

    pub(super) fn remember(&self, p: &Payload, group: usize) {
        let mut hints = lock(&self.hints);
        if hints.len() >= self.capacity {
            hints.clear();
        }
        let e = hints.entry(Self::key(p)).or_insert(group);
        *e = (*e).min(group);
    }

    pub(super) fn take(&self, p: &Payload) -> Option<usize> {
        let mut hints = lock(&self.hints);
        if hints.is_empty() {
            return None;
        }
        hints.remove(&Self::key(p))
    }
}
