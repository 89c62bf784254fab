-- Audit events, chained by hash per node (see keygate-core/src/audit.rs), their shipped heads,
-- and per-minute usage rolled up from the events as they are shipped.
CREATE TABLE audit_events (
    node        TEXT NOT NULL,
    seq         BIGINT NOT NULL,
    id          TEXT NOT NULL,
    at          BIGINT NOT NULL,
    tenant_id   TEXT,
    actor       TEXT NOT NULL,
    action      TEXT NOT NULL,
    key_id      TEXT,
    user_id     TEXT,
    kind        TEXT,
    code        TEXT,
    status      BIGINT,
    method      TEXT,
    path        TEXT,
    scope       TEXT,
    ip          TEXT,
    origin      TEXT,
    credits     BIGINT,
    latency_us  BIGINT,
    request_id  TEXT,
    detail      TEXT,
    prev_hash   TEXT NOT NULL,
    hash        TEXT NOT NULL,
    PRIMARY KEY (node, seq)
);
CREATE UNIQUE INDEX audit_events_id ON audit_events (id);
CREATE INDEX audit_events_tenant ON audit_events (tenant_id, id);
CREATE INDEX audit_events_key ON audit_events (key_id, id);

-- The last event of each node's chain that reached the store (written in the same transaction).
CREATE TABLE audit_heads (
    node  TEXT PRIMARY KEY,
    seq   BIGINT NOT NULL,
    hash  TEXT NOT NULL
);

CREATE TABLE usage_minutes (
    key_id     TEXT NOT NULL,
    tenant_id  TEXT NOT NULL,
    minute     BIGINT NOT NULL,
    code       TEXT NOT NULL,
    requests   BIGINT NOT NULL,
    credits    BIGINT NOT NULL,
    PRIMARY KEY (key_id, minute, code)
);
CREATE INDEX usage_minutes_tenant ON usage_minutes (tenant_id, minute);
