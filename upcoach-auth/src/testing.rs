//! Conformance suites every backend of this crate passes (feature `testing`).

pub mod flow;
pub mod refresh;
pub mod users;
