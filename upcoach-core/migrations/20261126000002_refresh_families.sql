-- Refresh-token families: one row per sign-in session. The row is what serializes the
-- family's changes: a rotation locks it (SELECT … FOR UPDATE) before it exchanges a
-- token, and a revocation updates it, so a revocation waits for a rotation in flight
-- and every later rotation sees the revocation. Without it, a revocation's
-- `UPDATE refresh_tokens … WHERE family_id = …` under READ COMMITTED could miss a child
-- inserted by a rotation committing at the same moment.
CREATE TABLE refresh_families (
    family_id      UUID PRIMARY KEY,
    user_id        UUID NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    created_at     TIMESTAMPTZ NOT NULL,
    expires_at     TIMESTAMPTZ NOT NULL,
    revoked_at     TIMESTAMPTZ,
    revoke_reason  TEXT
);
CREATE INDEX idx_refresh_families_user_id ON refresh_families (user_id);
CREATE INDEX idx_refresh_families_expires_at ON refresh_families (expires_at);

-- Families for any tokens written before this table existed.
INSERT INTO refresh_families (family_id, user_id, created_at, expires_at, revoked_at, revoke_reason)
SELECT family_id,
       (array_agg(user_id ORDER BY issued_at))[1],
       min(issued_at),
       max(family_expires_at),
       max(revoked_at),
       CASE WHEN max(revoked_at) IS NULL THEN NULL ELSE 'admin' END
FROM refresh_tokens
GROUP BY family_id;

ALTER TABLE refresh_tokens
    ADD CONSTRAINT refresh_tokens_family_id_fkey
    FOREIGN KEY (family_id) REFERENCES refresh_families (family_id) ON DELETE CASCADE;

-- The sibling and child checks of a rotation look tokens up by parent; the purge by
-- expiry.
CREATE INDEX idx_refresh_tokens_parent_hash ON refresh_tokens (parent_hash);
CREATE INDEX idx_refresh_tokens_expires_at ON refresh_tokens (expires_at);
