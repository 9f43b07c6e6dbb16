-- The foundation schema: users and their provider identities, refresh tokens, and the
-- three audit tables. Every name is unqualified so the schema in `search_path` (one per
-- test) receives it.

-- Users. Identity is (provider, subject) in user_identities, never the e-mail address,
-- so email is neither unique nor a key here.
CREATE TABLE users (
    id              UUID PRIMARY KEY,
    email           TEXT,
    email_verified  BOOLEAN NOT NULL DEFAULT FALSE,
    name            TEXT,
    roles           TEXT[] NOT NULL DEFAULT ARRAY['user']::TEXT[],
    created_at      TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at      TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE INDEX idx_users_email ON users (lower(email));

-- One row per way to sign in: a provider's subject linked to one of our users.
CREATE TABLE user_identities (
    provider        TEXT NOT NULL,
    subject         TEXT NOT NULL,
    user_id         UUID NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    email           TEXT,
    email_verified  BOOLEAN NOT NULL DEFAULT FALSE,
    linked_at       TIMESTAMPTZ NOT NULL DEFAULT now(),
    CONSTRAINT user_identities_provider_subject_key UNIQUE (provider, subject)
);
CREATE INDEX idx_user_identities_user_id ON user_identities (user_id);

-- Refresh tokens, stored only as a SHA-256 hash. A family is one sign-in session; each
-- rotation adds a row whose parent is the token it replaced.
CREATE TABLE refresh_tokens (
    token_hash         BYTEA PRIMARY KEY,
    family_id          UUID NOT NULL,
    parent_hash        BYTEA,
    user_id            UUID NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    issued_at          TIMESTAMPTZ NOT NULL,
    expires_at         TIMESTAMPTZ NOT NULL,
    family_expires_at  TIMESTAMPTZ NOT NULL,
    rotated_at         TIMESTAMPTZ,
    revoked_at         TIMESTAMPTZ
);
CREATE INDEX idx_refresh_tokens_family_id ON refresh_tokens (family_id);
CREATE INDEX idx_refresh_tokens_user_id ON refresh_tokens (user_id);

-- Audit tables. Ids are made by the writer (UUIDv7) so a retried batch never makes two
-- rows. user_id has no foreign key: an audit row must be writable for any user id (a
-- failed sign-in, a user deleted later) and must never block on the users table.
CREATE TABLE security_events (
    id          UUID PRIMARY KEY,
    user_id     UUID,
    event_type  TEXT NOT NULL,
    platform    TEXT,
    details     JSONB NOT NULL DEFAULT '{}'::JSONB,
    ip_address  INET,
    user_agent  TEXT,
    created_at  TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE INDEX idx_security_events_user_id ON security_events (user_id);
CREATE INDEX idx_security_events_created_at ON security_events (created_at);
CREATE INDEX idx_security_events_type_created_at ON security_events (event_type, created_at);

CREATE TABLE websocket_events (
    id          UUID PRIMARY KEY,
    user_id     UUID,
    event_type  TEXT NOT NULL,
    metadata    JSONB NOT NULL DEFAULT '{}'::JSONB,
    created_at  TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE INDEX idx_websocket_events_user_id ON websocket_events (user_id);
CREATE INDEX idx_websocket_events_created_at ON websocket_events (created_at);

CREATE TABLE system_alerts (
    id          TEXT PRIMARY KEY,
    level       TEXT NOT NULL CHECK (level IN ('info', 'warning', 'critical')),
    message     TEXT NOT NULL,
    source      TEXT NOT NULL,
    metadata    JSONB NOT NULL DEFAULT '{}'::JSONB,
    created_at  TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE INDEX idx_system_alerts_level ON system_alerts (level);
CREATE INDEX idx_system_alerts_created_at ON system_alerts (created_at);
