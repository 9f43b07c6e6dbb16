//! The conformance suite of the users store (being built).
