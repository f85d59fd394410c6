//! [`NotificationCenter`]: listeners told about each request before it is dispatched
//! (the SDKs' `LOG_EVENT` notification).
//!
//! A `LOG_EVENT` listener is called **once per [`LogEvent`], before the dispatcher is called**,
//! whatever the dispatch then does: it is not called again for the dispatcher's retries, and
//! being called does not mean the request was delivered. Listeners run on the processor's
//! dispatch thread ([`BatchEventProcessor`](crate::BatchEventProcessor)) or the caller's
//! thread ([`ForwardingEventProcessor`](crate::ForwardingEventProcessor)), one after another
//! in the order they were added; a slow listener delays dispatch. A listener that panics is
//! caught, logged, and does not stop the processor or the other listeners.

use std::fmt;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use crate::log_event::LogEvent;

/// The kinds of notification. Only `LOG_EVENT` concerns the event pipeline.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum NotificationType {
    /// A request is about to be dispatched (`LOG_EVENT` in the SDKs).
    LogEvent,
}

/// Identifies a listener for [`NotificationCenter::remove_notification_listener`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ListenerId(u64);

impl fmt::Display for ListenerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

type LogEventListener = Arc<dyn Fn(&LogEvent) + Send + Sync>;

#[derive(Clone)]
struct Entry {
    id: ListenerId,
    kind: NotificationType,
    listener: LogEventListener,
}

/// A registry of notification listeners, shared (through an [`Arc`]) by processors.
///
/// Adding and removing take a lock; notifying does not hold it while listeners run, so a
/// listener may add or remove listeners (the change applies from the next notification).
///
/// ```
/// use std::sync::Arc;
/// use std::sync::atomic::{AtomicUsize, Ordering};
/// use tributary::NotificationCenter;
///
/// let center = NotificationCenter::new();
/// let seen = Arc::new(AtomicUsize::new(0));
/// let counter = seen.clone();
/// let id = center.add_log_event_listener(move |log_event| {
///     counter.fetch_add(log_event.visitor_count(), Ordering::Relaxed);
/// });
/// assert!(center.remove_notification_listener(id));
/// assert!(!center.remove_notification_listener(id));
/// ```
#[derive(Default)]
pub struct NotificationCenter {
    next_id: AtomicU64,
    // Copy-on-write: notifying clones the Arc and releases the lock before calling anyone.
    listeners: RwLock<Arc<Vec<Entry>>>,
}

impl fmt::Debug for NotificationCenter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NotificationCenter")
            .field("listeners", &self.snapshot().len())
            .finish()
    }
}

impl NotificationCenter {
    /// An empty center.
    pub fn new() -> Self {
        Self::default()
    }

    fn snapshot(&self) -> Arc<Vec<Entry>> {
        // A poisoned lock only means a panic happened while the list was being replaced,
        // and replacing is a single assignment: the list itself is intact.
        self.listeners
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn update(&self, f: impl FnOnce(&mut Vec<Entry>)) {
        let mut guard = self.listeners.write().unwrap_or_else(|e| e.into_inner());
        let mut list = Vec::clone(&guard);
        f(&mut list);
        *guard = Arc::new(list);
    }

    /// Adds a `LOG_EVENT` listener, called with each request before it is dispatched.
    /// Returns an id to remove it with.
    pub fn add_log_event_listener(
        &self,
        listener: impl Fn(&LogEvent) + Send + Sync + 'static,
    ) -> ListenerId {
        let id = ListenerId(self.next_id.fetch_add(1, Ordering::Relaxed));
        let entry = Entry {
            id,
            kind: NotificationType::LogEvent,
            listener: Arc::new(listener),
        };
        self.update(|list| list.push(entry));
        id
    }

    /// Removes the listener `id`. Returns whether there was one.
    pub fn remove_notification_listener(&self, id: ListenerId) -> bool {
        let mut found = false;
        self.update(|list| {
            let before = list.len();
            list.retain(|e| e.id != id);
            found = list.len() != before;
        });
        found
    }

    /// Removes every listener of `kind`.
    pub fn clear_notification_listeners(&self, kind: NotificationType) {
        self.update(|list| list.retain(|e| e.kind != kind));
    }

    /// Removes every listener.
    pub fn clear_all_notification_listeners(&self) {
        self.update(Vec::clear);
    }

    /// How many listeners of `kind` there are.
    pub fn listener_count(&self, kind: NotificationType) -> usize {
        self.snapshot().iter().filter(|e| e.kind == kind).count()
    }

    /// Calls every `LOG_EVENT` listener with `log_event`, in the order they were added.
    /// Returns how many panicked; each panic is caught and logged.
    pub fn send_log_event(&self, log_event: &LogEvent) -> usize {
        let list = self.snapshot();
        let mut panicked = 0;
        for entry in list.iter().filter(|e| e.kind == NotificationType::LogEvent) {
            if catch_unwind(AssertUnwindSafe(|| (entry.listener)(log_event))).is_err() {
                panicked += 1;
                tracing::error!(
                    listener = %entry.id,
                    "LOG_EVENT listener panicked; the panic was contained and dispatch goes on"
                );
            }
        }
        panicked
    }
}
