-- keygate schema, SQLite. Timestamps are Unix milliseconds (INTEGER).
CREATE TABLE tenants (
    id          TEXT PRIMARY KEY,
    name        TEXT NOT NULL,
    plan        TEXT NOT NULL,
    -- pool balance as withdrawn by nodes; NULL = unlimited
    credits     INTEGER,
    last_grant  INTEGER NOT NULL DEFAULT 0,
    created_at  INTEGER NOT NULL
);

CREATE TABLE users (
    id            TEXT PRIMARY KEY,
    tenant_id     TEXT NOT NULL REFERENCES tenants(id),
    email         TEXT NOT NULL,
    name          TEXT,
    plan          TEXT NOT NULL,
    password_hash TEXT,
    created_at    INTEGER NOT NULL,
    UNIQUE (tenant_id, email)
);

-- A key and its rotation successors share one family: one budget, one rate window.
CREATE TABLE key_families (
    id          TEXT PRIMARY KEY,
    budget      INTEGER,
    -- credits withdrawn from the budget (spent, or leased to a node and not yet returned)
    spent       INTEGER NOT NULL DEFAULT 0,
    last_grant  INTEGER NOT NULL DEFAULT 0
);

CREATE TABLE keys (
    id              TEXT PRIMARY KEY,
    family_id       TEXT NOT NULL REFERENCES key_families(id),
    tenant_id       TEXT NOT NULL REFERENCES tenants(id),
    user_id         TEXT REFERENCES users(id),
    kind            TEXT NOT NULL,
    name            TEXT NOT NULL,
    hash            BLOB NOT NULL UNIQUE,
    display         TEXT NOT NULL,
    scopes          TEXT NOT NULL,
    allowed_ips     TEXT NOT NULL,
    allowed_origins TEXT NOT NULL,
    rate_limit      INTEGER,
    rate_window     INTEGER,
    expires_at      INTEGER,
    rotation_days   INTEGER,
    metadata        TEXT NOT NULL,
    status          TEXT NOT NULL,
    rotated_from    TEXT,
    rotated_to      TEXT,
    created_at      INTEGER NOT NULL,
    updated_at      INTEGER NOT NULL,
    last_used_at    INTEGER,
    revoked_at      INTEGER
);

CREATE INDEX keys_tenant_id ON keys (tenant_id, id);
