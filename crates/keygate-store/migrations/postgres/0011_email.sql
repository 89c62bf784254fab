-- Email and account members. An account made by sign-up with `[signup] verify_email` is
-- unverified until its owner opens the link sent to them (earlier tenants count as verified).
-- A password reset ends the sessions its user started before it (`sessions_from`, Unix ms).
-- One-use links (verification, password reset, invitation) are kept as the SHA-256 of their
-- token only. A removed user keeps their row (their keys and events name it), marked
-- `removed_at`; an invitation of the same address later brings it back.
ALTER TABLE tenants ADD COLUMN verified BIGINT NOT NULL DEFAULT 1;
ALTER TABLE users ADD COLUMN sessions_from BIGINT NOT NULL DEFAULT 0;
ALTER TABLE users ADD COLUMN removed_at BIGINT;
CREATE TABLE email_tokens (
    hash TEXT PRIMARY KEY,
    purpose TEXT NOT NULL,
    tenant_id TEXT NOT NULL,
    user_id TEXT,
    email TEXT NOT NULL,
    role TEXT,
    created_at BIGINT NOT NULL,
    expires_at BIGINT NOT NULL,
    used_at BIGINT
);
CREATE INDEX email_tokens_expires ON email_tokens (expires_at);
