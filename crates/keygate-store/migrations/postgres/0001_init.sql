-- keygate schema, PostgreSQL (same shape as the SQLite one). Timestamps are Unix milliseconds.
CREATE TABLE tenants (
    id          TEXT PRIMARY KEY,
    name        TEXT NOT NULL,
    plan        TEXT NOT NULL,
    -- pool balance as withdrawn by nodes; NULL = unlimited
    credits     BIGINT,
    last_grant  BIGINT NOT NULL DEFAULT 0,
    created_at  BIGINT NOT NULL
);

CREATE TABLE users (
    id            TEXT PRIMARY KEY,
    tenant_id     TEXT NOT NULL REFERENCES tenants(id),
    email         TEXT NOT NULL,
    name          TEXT,
    plan          TEXT NOT NULL,
    password_hash TEXT,
    created_at    BIGINT NOT NULL,
    UNIQUE (tenant_id, email)
);

-- A key and its rotation successors share one family: one budget, one rate window.
CREATE TABLE key_families (
    id          TEXT PRIMARY KEY,
    budget      BIGINT,
    -- credits withdrawn from the budget (spent, or leased to a node and not yet returned)
    spent       BIGINT NOT NULL DEFAULT 0,
    last_grant  BIGINT NOT NULL DEFAULT 0
);

CREATE TABLE keys (
    id              TEXT PRIMARY KEY,
    family_id       TEXT NOT NULL REFERENCES key_families(id),
    tenant_id       TEXT NOT NULL REFERENCES tenants(id),
    user_id         TEXT REFERENCES users(id),
    kind            TEXT NOT NULL,
    name            TEXT NOT NULL,
    hash            BYTEA NOT NULL UNIQUE,
    display         TEXT NOT NULL,
    scopes          TEXT NOT NULL,
    allowed_ips     TEXT NOT NULL,
    allowed_origins TEXT NOT NULL,
    rate_limit      BIGINT,
    rate_window     BIGINT,
    expires_at      BIGINT,
    rotation_days   BIGINT,
    metadata        TEXT NOT NULL,
    status          TEXT NOT NULL,
    rotated_from    TEXT,
    rotated_to      TEXT,
    created_at      BIGINT NOT NULL,
    updated_at      BIGINT NOT NULL,
    last_used_at    BIGINT,
    revoked_at      BIGINT
);

CREATE INDEX keys_tenant_id ON keys (tenant_id, id);
