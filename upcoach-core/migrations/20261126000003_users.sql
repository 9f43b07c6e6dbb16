-- Users and linking: one identity per provider per user (unlinking is by user and
-- provider, and the database keeps concurrent links from making a second one), and
-- identities found by e-mail address, case-insensitively, when a new identity may be
-- linked to an existing user by its address.
CREATE UNIQUE INDEX user_identities_user_provider_key ON user_identities (user_id, provider);
CREATE INDEX idx_user_identities_email ON user_identities (lower(email));
