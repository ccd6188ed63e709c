//! The processor's core: decode, validate, deduplicate and aggregate usage
//! events into event-time windows, with no I/O.
//!
//! Guarantee of this crate: every record given to [`Engine::process`] ends as
//! exactly one of aggregated, duplicate or dead-lettered (with a reason), and
//! [`Engine::flush`] emits, for every window changed since the previous
//! flush, one new revision carrying the window's running totals. The Kafka
//! service (`meter-processor`) decides when output and offsets become durable.

mod auth;
mod cold;
mod dedup;
mod engine;
mod keys;
pub mod state;

pub use auth::AgentRegistry;
pub use cold::ColdState;
pub use dedup::SeqTracker;
pub use engine::{Counters, Engine, EngineConfig, Input, Outcome, Rules, SharedIdentity};
pub use keys::{AgentKeys, Verdict};
pub use state::StateChange;
