//! `meter agent`: usage from a host, or from a simulated fleet, to
//! `usage.events`.
//!
//! - [`procfs`]: the /proc sampler (CPU, memory, network, disk), pure
//!   arithmetic over samples;
//! - [`sim`]: the deterministic fleet simulator (EC2/S3/RDS/CloudFront-like
//!   profiles, seeded) and the ground-truth ledger it produces;
//! - [`spool`]: the write-ahead log that keeps events and seqs across
//!   crashes and Kafka outages, and [`dropped`], what it could not keep;
//! - [`runtime`]: the spooled agent, the loop that ties them to Kafka;
//! - [`identity`]: the agent's incarnation and signing key, and [`lease`],
//!   the Kafka lease that stops a second instance of one identity;
//! - [`simulated`]: the in-memory simulated path of the demo, the benchmark
//!   and the tests (no spool);
//! - [`metrics`]: the agent's metrics and the named events that move them.

pub mod dropped;
pub mod identity;
pub mod lease;
pub mod metrics;
pub mod procfs;
pub mod runtime;
pub mod sim;
pub mod simulated;
pub mod spool;

pub use metrics::AgentMetrics;
pub use runtime::{run_agent, AgentRun, Source};
pub use sim::{SimConfig, Simulator};
pub use simulated::{run_simulated, run_simulated_observed, SimulatedRun};
