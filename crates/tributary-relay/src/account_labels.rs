//! The `account` label of the shared-relay metrics, bounded.
//!
//! The `account_id` comes from the client's body, so a hostile or buggy client could mint a
//! new label value with every request and grow `/metrics` (and the recorder's memory)
//! without end. [`AccountLabels`] gives a label of its own to every account named in a
//! `[[privacy.account]]` table, and to the first `--max-account-labels` other accounts
//! seen; every later account is counted under [`OTHER`].

use std::collections::HashSet;
use std::sync::Mutex;

/// Accounts seen first that get a label of their own when `--max-account-labels` is not
/// set: more than most companies' projects, few enough that `/metrics` stays small.
pub const DEFAULT_MAX_ACCOUNT_LABELS: usize = 100;

/// The label value of every account past the bound.
pub const OTHER: &str = "other";

/// The longest `account_id` (not configured) that gets a label of its own: Optimizely's
/// are 10 to 12 digits; anything much longer is not an account id and may be anything a
/// client put there.
pub const MAX_LABEL_LEN: usize = 32;

/// Whether an unconfigured `account_id` may be a label value: short, and only
/// `[0-9A-Za-z_-]`, so a client cannot put an email or arbitrary text into `/metrics`.
fn labelable(account: &str) -> bool {
    !account.is_empty()
        && account.len() <= MAX_LABEL_LEN
        && account
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// Which `account_id` values are metric labels: the configured ones, then the first
/// `max_seen` others.
///
/// ```
/// use tributary_relay::account_labels::AccountLabels;
/// let labels = AccountLabels::new(["777".to_owned()], 1);
/// assert_eq!(labels.label("1"), "1"); // the first other account seen
/// assert_eq!(labels.label("2"), "other"); // past the bound
/// assert_eq!(labels.label("777"), "777"); // named in a [[privacy.account]] table
/// assert_eq!(labels.label("1"), "1"); // a labelled account keeps its label
/// ```
#[derive(Debug)]
pub struct AccountLabels {
    configured: HashSet<String>,
    max_seen: usize,
    seen: Mutex<HashSet<String>>,
}

impl AccountLabels {
    /// Labels for the `configured` accounts, and for the first `max_seen` others.
    pub fn new(configured: impl IntoIterator<Item = String>, max_seen: usize) -> AccountLabels {
        AccountLabels {
            configured: configured.into_iter().collect(),
            max_seen,
            seen: Mutex::new(HashSet::new()),
        }
    }

    /// The label value to count `account` under: itself, or [`OTHER`] once the bound is
    /// reached by other accounts, or when it is longer than [`MAX_LABEL_LEN`] or holds a
    /// character outside `[0-9A-Za-z_-]` (configured accounts are labelled whatever they
    /// are). An account whose id is `other` is counted with them.
    pub fn label(&self, account: &str) -> String {
        if self.configured.contains(account) {
            return account.to_owned();
        }
        if !labelable(account) {
            return OTHER.to_owned();
        }
        let mut seen = self
            .seen
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if seen.contains(account) {
            return account.to_owned();
        }
        if seen.len() < self.max_seen {
            seen.insert(account.to_owned());
            return account.to_owned();
        }
        OTHER.to_owned()
    }
}

impl Default for AccountLabels {
    /// No configured account, [`DEFAULT_MAX_ACCOUNT_LABELS`] others.
    fn default() -> AccountLabels {
        AccountLabels::new([], DEFAULT_MAX_ACCOUNT_LABELS)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_accounts_keep_their_label_and_the_rest_are_other() {
        let labels = AccountLabels::new(["cfg-a".to_owned(), "cfg-b".to_owned()], 3);
        let distinct: Vec<String> = (0..1_000)
            .map(|i| labels.label(&format!("client-{i}")))
            .collect::<HashSet<_>>()
            .into_iter()
            .collect();
        assert_eq!(distinct.len(), 4, "three accounts and other: {distinct:?}");
        for i in 0..3 {
            assert_eq!(labels.label(&format!("client-{i}")), format!("client-{i}"));
        }
        assert_eq!(labels.label("client-3"), OTHER);
        // Configured accounts are labelled however many others came first, and do not
        // use up the bound.
        assert_eq!(labels.label("cfg-a"), "cfg-a");
        assert_eq!(labels.label("cfg-b"), "cfg-b");
        assert_eq!(labels.label("client-999"), OTHER);
    }

    #[test]
    fn a_zero_bound_labels_only_the_configured_accounts() {
        let labels = AccountLabels::new(["cfg".to_owned()], 0);
        assert_eq!(labels.label("anyone"), OTHER);
        assert_eq!(labels.label("cfg"), "cfg");
    }

    #[test]
    fn odd_account_ids_are_other_and_use_up_no_label() {
        let labels = AccountLabels::new([], 1);
        for odd in ["user@example.com", "a b", "", &"9".repeat(33), "é"] {
            assert_eq!(labels.label(odd), OTHER, "{odd:?}");
        }
        assert_eq!(labels.label(&"9".repeat(32)), "9".repeat(32));
        assert_eq!(labels.label("Team_a-1"), OTHER, "the one label is taken");
    }
}
