-- OAuth 2.0 authorization server: clients, single-use codes, grants (token families), rotating
-- refresh tokens, revoked access tokens, remembered consent, signing keys and server secrets.
CREATE TABLE oauth_clients (
    id             TEXT PRIMARY KEY,
    tenant_id      TEXT NOT NULL REFERENCES tenants(id),
    name           TEXT NOT NULL,
    client_type    TEXT NOT NULL,
    -- SHA-256 (hex) of the client secret; NULL for public clients
    secret_hash    TEXT,
    redirect_uris  TEXT NOT NULL,
    scopes         TEXT NOT NULL,
    created_at     BIGINT NOT NULL
);
CREATE INDEX oauth_clients_tenant ON oauth_clients (tenant_id, id);

-- One row per authorization code, by the hash of the code. used_at is set by the one
-- exchange that wins; grant_id names the grant it started (revoked if the code comes back).
CREATE TABLE oauth_codes (
    hash           TEXT PRIMARY KEY,
    client_id      TEXT NOT NULL,
    tenant_id      TEXT NOT NULL,
    user_id        TEXT NOT NULL,
    redirect_uri   TEXT NOT NULL,
    challenge      TEXT NOT NULL,
    scope          TEXT NOT NULL,
    created_at     BIGINT NOT NULL,
    expires_at     BIGINT NOT NULL,
    used_at        BIGINT,
    grant_id       TEXT
);

-- A grant is one token family: every access and refresh token issued from one code (or one
-- client_credentials call). Revoking it refuses all of them.
CREATE TABLE oauth_grants (
    id              TEXT PRIMARY KEY,
    client_id       TEXT NOT NULL,
    tenant_id       TEXT NOT NULL,
    user_id         TEXT,
    scope           TEXT NOT NULL,
    created_at      BIGINT NOT NULL,
    expires_at      BIGINT NOT NULL,
    revoked_at      BIGINT,
    revoked_reason  TEXT
);
CREATE INDEX oauth_grants_client ON oauth_grants (client_id);

CREATE TABLE oauth_refresh_tokens (
    hash        TEXT PRIMARY KEY,
    grant_id    TEXT NOT NULL,
    created_at  BIGINT NOT NULL,
    used_at     BIGINT
);
CREATE INDEX oauth_refresh_tokens_grant ON oauth_refresh_tokens (grant_id);

-- Access tokens revoked one by one (RFC 7009), kept until they would have expired anyway.
CREATE TABLE oauth_revoked_tokens (
    jti         TEXT PRIMARY KEY,
    grant_id    TEXT NOT NULL,
    expires_at  BIGINT NOT NULL
);

CREATE TABLE oauth_consents (
    user_id     TEXT NOT NULL,
    client_id   TEXT NOT NULL,
    scope       TEXT NOT NULL,
    created_at  BIGINT NOT NULL,
    PRIMARY KEY (user_id, client_id, scope)
);

-- JWT signing keys. The private key is PKCS#8 (base64); the public half stays published in
-- the JWKS until the tokens it signed have expired.
CREATE TABLE oauth_signing_keys (
    kid          TEXT PRIMARY KEY,
    alg          TEXT NOT NULL,
    private_key  TEXT NOT NULL,
    public_x     TEXT NOT NULL,
    created_at   BIGINT NOT NULL,
    retired_at   BIGINT
);

-- Secrets every node must share (the HMAC key of login sessions and CSRF tokens).
CREATE TABLE server_secrets (
    name        TEXT PRIMARY KEY,
    value       TEXT NOT NULL,
    created_at  BIGINT NOT NULL
);
