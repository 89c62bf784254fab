-- Alerts (one row per incident: `dedupe` is unique) and the networks and origins each key was
-- seen from (to tell a first use from a new place).
CREATE TABLE alerts (
    id         TEXT PRIMARY KEY,
    tenant_id  TEXT NOT NULL,
    key_id     TEXT,
    kind       TEXT NOT NULL,
    dedupe     TEXT NOT NULL UNIQUE,
    message    TEXT NOT NULL,
    data       TEXT NOT NULL,
    at         BIGINT NOT NULL
);
CREATE INDEX alerts_tenant ON alerts (tenant_id, id);

CREATE TABLE key_sightings (
    key_id      TEXT NOT NULL,
    kind        TEXT NOT NULL,
    value       TEXT NOT NULL,
    first_seen  BIGINT NOT NULL,
    PRIMARY KEY (key_id, kind, value)
);
