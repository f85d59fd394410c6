//! Conservation: what a spool was given must equal what it delivered, dead-lettered, purged
//! and still holds. The SQLite spool keeps these sums durably, in the same transaction as
//! every change, so they survive restarts and crashes and can be checked at any time.

use serde::Serialize;

/// Where everything a spool accepted went, for payloads or for events (visitors).
///
/// `delivered` and `purged` only grow; `dead` and `pending` are what the spool holds now.
///
/// ```
/// use tributary_spool::Ledger;
/// let l = Ledger { accepted: 10, delivered: 6, dead: 1, purged: 1, pending: 2 };
/// assert_eq!(l.settled_and_held(), 10);
/// ```
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Ledger {
    /// Appended by clients. (An operator's retry of a dead letter moves it from `dead` back
    /// to `pending`; it accepts nothing new.)
    pub accepted: u64,
    /// Taken by the upstream (acknowledged with a 2xx).
    pub delivered: u64,
    /// In the dead letters now.
    pub dead: u64,
    /// Deleted from the dead letters by an operator.
    pub purged: u64,
    /// Waiting or being delivered.
    pub pending: u64,
}

impl Ledger {
    /// `delivered + dead + purged + pending`.
    pub fn settled_and_held(&self) -> u64 {
        self.delivered
            .saturating_add(self.dead)
            .saturating_add(self.purged)
            .saturating_add(self.pending)
    }
}

/// The durable totals of a spool.
///
/// Events balance exactly: `accepted = delivered + dead + purged + pending`. Payloads do
/// too once the parts isolation created are counted: a client payload whose refused
/// visitor became a dead letter of its own while the rest was delivered is two payloads
/// from then on, so `accepted + split = delivered + dead + purged + pending`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct SpoolTotals {
    /// Payloads (stored rows).
    pub payloads: Ledger,
    /// Events (visitors).
    pub events: Ledger,
    /// Extra payloads created by splitting a payload during isolation.
    pub split_payloads: u64,
}

impl SpoolTotals {
    /// What does not balance; empty when everything does.
    pub fn imbalances(&self) -> Vec<String> {
        let mut out = Vec::new();
        let e = &self.events;
        if e.accepted != e.settled_and_held() {
            out.push(format!(
                "events: accepted {} != delivered {} + dead {} + purged {} + pending {}",
                e.accepted, e.delivered, e.dead, e.purged, e.pending
            ));
        }
        let p = &self.payloads;
        let left = p.accepted.saturating_add(self.split_payloads);
        if left != p.settled_and_held() {
            out.push(format!(
                "payloads: accepted {} + split {} != delivered {} + dead {} + purged {} + pending {}",
                p.accepted, self.split_payloads, p.delivered, p.dead, p.purged, p.pending
            ));
        }
        out
    }
}

/// The totals and a row-by-row count of what the spool holds, side by side.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct SpoolAudit {
    /// The durable totals.
    pub totals: SpoolTotals,
    /// Pending payloads and events, and dead payloads and events, counted from the rows.
    pub counted: Counted,
    /// Everything that does not add up; empty when the spool balances.
    pub problems: Vec<String>,
}

/// What a spool holds, counted from its rows.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Counted {
    /// Pending payloads.
    pub pending: u64,
    /// Events in them.
    pub pending_events: u64,
    /// Dead letters.
    pub dead: u64,
    /// Events in them.
    pub dead_events: u64,
}

impl SpoolAudit {
    /// An audit of `totals` against `counted`.
    pub fn new(totals: SpoolTotals, counted: Counted) -> SpoolAudit {
        let mut problems = totals.imbalances();
        let pairs = [
            ("pending payloads", totals.payloads.pending, counted.pending),
            (
                "pending events",
                totals.events.pending,
                counted.pending_events,
            ),
            ("dead payloads", totals.payloads.dead, counted.dead),
            ("dead events", totals.events.dead, counted.dead_events),
        ];
        for (what, kept, rows) in pairs {
            if kept != rows {
                problems.push(format!("{what}: totals say {kept}, the rows hold {rows}"));
            }
        }
        SpoolAudit {
            totals,
            counted,
            problems,
        }
    }

    /// Whether everything adds up.
    pub fn is_balanced(&self) -> bool {
        self.problems.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn imbalances_are_named() {
        let mut t = SpoolTotals {
            payloads: Ledger {
                accepted: 3,
                delivered: 2,
                dead: 2,
                purged: 0,
                pending: 0,
            },
            events: Ledger {
                accepted: 20,
                delivered: 18,
                dead: 2,
                purged: 0,
                pending: 0,
            },
            split_payloads: 1,
        };
        assert!(t.imbalances().is_empty());
        t.events.delivered = 17;
        let problems = t.imbalances();
        assert_eq!(problems.len(), 1);
        assert!(
            problems[0].starts_with("events: accepted 20"),
            "{problems:?}"
        );
        let audit = SpoolAudit::new(t, Counted::default());
        assert!(!audit.is_balanced());
        assert!(
            audit
                .problems
                .iter()
                .any(|p| p.starts_with("dead payloads"))
        );
    }
}
