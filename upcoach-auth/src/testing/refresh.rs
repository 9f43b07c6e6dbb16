//! The conformance suite of the refresh store (being built).
