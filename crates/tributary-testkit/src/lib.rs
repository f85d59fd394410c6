//! Test support for Tributary.
//!
//! [`RecordingUpstream`] is a real HTTP server on `127.0.0.1` (free port) that stands in for
//! the Event API or a relay: it records every request and answers from a programmable
//! [`Script`] (status codes, `Retry-After`, slow or hung answers, dropped connections, a
//! seeded failure rate, rejection of "poison" payloads). It runs on its own thread and tokio
//! runtime, so synchronous and asynchronous tests use it the same way, and it stops when
//! dropped.
//!
//! ```
//! use std::time::Duration;
//! use tributary_testkit::{RecordingUpstream, Reply, Script};
//!
//! let upstream = RecordingUpstream::start_with(Script::new().then(Reply::status(503)));
//! // ... point a client at upstream.url() ...
//! # let _ = upstream.url();
//! assert!(!upstream.wait_for(|reqs| reqs.len() == 1, Duration::from_millis(10)));
//! ```
//!
//! [`event_uuids`] and [`delivered_uuids`] read Event API bodies
//! (`visitors[].snapshots[].events[].uuid`) so end-to-end tests can check "every event
//! exactly once" without caring how events were batched.

pub mod lambda;
pub mod moto;
mod payload;
mod script;
mod upstream;

pub use lambda::{Invocation, LambdaRuntimeApi};
pub use moto::{MOTO_ACCOUNT, MOTO_REGION, MotoServer, find_moto_server};
pub use payload::{delivered_uuids, event_uuids, visitor_ids};
pub use script::{Reply, Script};
pub use upstream::{Answer, RecordedRequest, RecordingUpstream};
