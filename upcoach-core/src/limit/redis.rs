//! GCRA in Redis (placeholder until the backend lands).
