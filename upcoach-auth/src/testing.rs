//! Conformance suites every backend of this crate passes (feature `testing`).

pub mod deletion;
pub mod flow;
pub mod refresh;
pub mod users;
