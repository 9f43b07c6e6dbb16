//! Refresh tokens: opaque, stored as hashes, rotated on each use (being built).
