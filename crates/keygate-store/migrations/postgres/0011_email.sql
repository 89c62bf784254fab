-- Email. An account made by sign-up with `[signup] verify_email` is unverified until its
-- owner opens the link sent to them (earlier tenants count as verified). A password reset
-- ends the sessions its user started before it (`sessions_from`, Unix ms). One-use links
-- (verification, password reset, invitation) are kept as the SHA-256 of their token only.
ALTER TABLE tenants ADD COLUMN verified BIGINT NOT NULL DEFAULT 1;
ALTER TABLE users ADD COLUMN sessions_from BIGINT NOT NULL DEFAULT 0;
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
