//! What tests and benchmarks need to run meterline against the local stack,
//! outside the release binary (`publish = false`; the `meter` binary has
//! `meter chaos` and `meter bench` only when built with its `testkit`
//! feature, as `ops/test`, `ops/bench` and `ops/chaos` build it):
//!
//! - [`chaos`]: the fault-injection harness behind the exactly-once claim;
//! - [`bench`]: the end-to-end benchmark, every figure next to a baseline
//!   measured in the same run;
//! - [`state_bench`]: what processor state costs as history grows;
//! - [`serve_bench`]: `meter serve`'s ingestion against producing straight
//!   to Kafka, and its query latency.
//!
//! Each run works in a scope of its own (`meter_config::Config::scoped`):
//! its own topics, consumer groups and ClickHouse database.

pub mod bench;
pub mod chaos;
pub mod serve_bench;
pub mod state_bench;
