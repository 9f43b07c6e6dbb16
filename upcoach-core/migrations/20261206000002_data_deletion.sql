-- Data-deletion requests (Facebook's data deletion request callback): one row per
-- request, found by the confirmation code the person follows it with. The person is
-- kept only as subject_hash, the SHA-256 of "provider NUL subject" (32 bytes; never the
-- subject itself). It is unique: a retried callback finds the request it made, and two
-- concurrent ones make one (INSERT … ON CONFLICT (subject_hash)). Rows are kept 90 days
-- after requested_at; the store purges older ones, oldest first, as it records new ones.
CREATE TABLE data_deletion_requests (
    code          TEXT PRIMARY KEY,
    provider      TEXT NOT NULL,
    subject_hash  BYTEA NOT NULL,
    status        TEXT NOT NULL,
    outcome       TEXT,
    requested_at  TIMESTAMPTZ NOT NULL,
    completed_at  TIMESTAMPTZ,
    CONSTRAINT data_deletion_requests_subject_hash_key UNIQUE (subject_hash),
    CONSTRAINT data_deletion_requests_subject_hash_len CHECK (octet_length(subject_hash) = 32),
    -- 16 random bytes, base64url without padding.
    CONSTRAINT data_deletion_requests_code_shape CHECK (code ~ '^[A-Za-z0-9_-]{22}$'),
    -- Pending, or completed with an outcome and a time; nothing in between.
    CONSTRAINT data_deletion_requests_status CHECK (
        (status = 'pending' AND outcome IS NULL AND completed_at IS NULL)
        OR (status = 'completed'
            AND outcome IN ('identity_removed', 'nothing_found')
            AND completed_at IS NOT NULL)
    )
);
-- The purge by age.
CREATE INDEX idx_data_deletion_requests_requested_at ON data_deletion_requests (requested_at);
