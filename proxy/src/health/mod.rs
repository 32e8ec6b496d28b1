//! Endpoint health: the per-endpoint state shared by balancers, passive ejection and
//! the active checker ([`checker`]), which probes endpoints on their pool's schedule.

pub mod checker;
mod state;

pub use state::{ms_at, now_ms, EjectPolicy, EndpointState, InflightGuard};
