-- Identities a user unlinked, so a later sign-in of one links back to that user only
-- explicitly (an unlink sticks), never by its address alone. Only a hash of provider and
-- subject (SHA-256 of provider, 0x00, subject) is kept; linking the identity again, or
-- erasing it at the person's request, removes the row.
CREATE TABLE unlinked_identities (
    user_id       UUID NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    subject_hash  BYTEA NOT NULL,
    unlinked_at   TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (subject_hash, user_id)
);
