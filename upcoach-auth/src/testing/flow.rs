//! The conformance suite of the flow store (being built).
