-- Whether an identity's address still receives mail: Sign in with Apple's private relay
-- can be turned off and on by the person (email-disabled / email-enabled notifications).
ALTER TABLE user_identities ADD COLUMN email_deliverable BOOLEAN NOT NULL DEFAULT true;
