//! One-time, short-lived flow state: authorization flows and login codes (being built).
