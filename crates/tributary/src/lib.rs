//! Tributary: the event pipeline of a feature-experimentation SDK.
//!
//! User events (impressions and conversions) go in; Optimizely Event API v1 requests come
//! out, batched, size-limited and delivered with retries.
//!
//! It does not bucket users or evaluate flags: it records the decisions an SDK (or your own
//! code) made. And unless told otherwise (`HttpDispatcher::builder().endpoint(...)`), the
//! HTTP dispatcher posts to the production Event API, `https://logx.optimizely.com/v1/events`.
//!
//! **Which factory do I want?** [`UserEventFactory`]: from a datafile and a decision (or a
//! conversion) to one [`UserEvent`]; that is the one applications call. [`EventFactory`]:
//! from many user events to Event API request bodies; the processor calls it for you.
//!
//! From a datafile to delivered events: `examples/from_datafile.rs`.
//!
//! ```text
//! UserEvent -> EventProcessor::process() -> bounded queue -> batcher thread
//!           -> EventFactory -> LogEvent -> LOG_EVENT listeners -> EventDispatcher
//! ```
//!
//! - [`event`]: the user events and their context.
//! - [`user_event_factory`]: [`UserEventFactory`], one user event from a datafile
//!   ([`ProjectConfig`]) and a decision or conversion.
//! - [`EventFactory`]: many user events to [`LogEvent`]s of at most 3.5 MB each (the payload
//!   builder the processor uses).
//! - [`payload`]: the Event API `EventBatch` as typed values; [`raw`]: as bytes, and the one
//!   writer of request bodies ([`raw::write_body`]).
//! - [`processor`]: [`BatchEventProcessor`] (batches on its own threads) and
//!   [`ForwardingEventProcessor`].
//! - [`dispatcher`]: the [`EventDispatcher`] trait; with the `http` feature (default),
//!   `dispatcher::transport` (the async `HttpTransport`) and `dispatcher::http` (the sync
//!   `HttpDispatcher`).
//! - [`isolate`]: finding the visitors a destination refuses; [`retry`]: [`RetryPolicy`].
//! - [`bridge`]: [`RuntimeBridge`](bridge::RuntimeBridge), how sync dispatchers call async
//!   code on a private runtime.
//!
//! Cargo features: `http` (default) brings the HTTP dispatcher and reqwest; without it,
//! give the processor your own dispatcher.
//!
//! ```
//! use std::sync::Arc;
//! use tributary::{Conversion, EventContext, EventFactory, UserEvent, UserEventKind};
//!
//! let ctx = Arc::new(EventContext::new("12133785640", "21537940595", "131"));
//! let event = UserEvent::new(ctx, "user-1", vec![], UserEventKind::Conversion(Conversion {
//!     event_id: "21549340108".into(), event_key: "purchase".into(),
//!     revenue: Some(4200), value: Some(3.5), tags: None,
//! }));
//! let log_events = EventFactory::new().create_log_events(&[event]).into_result().unwrap();
//! assert_eq!(log_events[0].url, "https://logx.optimizely.com/v1/events");
//! ```

// The docs link the HTTP dispatcher; built without the `http` feature, those links have no target.
#![cfg_attr(not(feature = "http"), allow(rustdoc::broken_intra_doc_links))]

pub mod bridge;
pub mod datafile;
pub mod dispatcher;
pub mod event;
pub mod factory;
pub mod isolate;
pub mod log_event;
pub mod notification;
pub mod payload;
pub mod processor;
pub mod raw;
pub mod retry;
pub mod user_event_factory;
pub mod validate;
mod visitor_json;

pub use datafile::{DatafileError, ProjectConfig};
#[cfg(feature = "http")]
pub use dispatcher::http::HttpDispatcher;
#[cfg(feature = "http")]
pub use dispatcher::transport::{HttpConfig, HttpDispatcherError, HttpTransport};
pub use dispatcher::{DispatchDeadline, DispatchError, EventDispatcher};
pub use event::{
    AttributeValue, CompactString, Conversion, EventContext, Impression, Region, UserEvent,
    UserEventKind, VisitorAttribute,
};
pub use factory::{EventFactory, FactoryOutput, OversizedEvent};
pub use log_event::LogEvent;
pub use notification::{ListenerId, NotificationCenter, NotificationType};
pub use payload::{Decision, DecisionMetadata, EventBatch, Snapshot, SnapshotEvent, Visitor};
pub use processor::{
    BatchEventProcessor, BatchEventProcessorBuilder, BuildError, CloseReport, EventProcessor,
    ForwardingEventProcessor, ProcessError, ProcessorStats,
};
pub use raw::{MAX_PAYLOAD_BYTES, OversizedVisitor, RawBatch, RawBatchError};
pub use retry::RetryPolicy;
pub use user_event_factory::{EventBuildError, ImpressionRequest, NO_ATTRIBUTES, UserEventFactory};

/// The `client_name` this crate sends unless told otherwise.
pub const CLIENT_NAME: &str = "tributary";
/// The `client_version` this crate sends unless told otherwise.
pub const CLIENT_VERSION: &str = env!("CARGO_PKG_VERSION");

/// The README's examples, compiled as doctests so they cannot go stale.
#[doc = include_str!("../../../README.md")]
#[cfg(doctest)]
pub struct ReadmeDoctests;
