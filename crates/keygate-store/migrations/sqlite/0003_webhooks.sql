-- Webhook endpoints per tenant and the stored delivery queue (retried across restarts).
CREATE TABLE webhook_endpoints (
    id               TEXT PRIMARY KEY,
    tenant_id        TEXT NOT NULL REFERENCES tenants(id),
    url              TEXT NOT NULL,
    -- the signing secret (whsec_…): needed in clear to sign, unlike API keys
    secret           TEXT NOT NULL,
    events           TEXT NOT NULL,
    enabled          BIGINT NOT NULL,
    disabled_reason  TEXT,
    created_at       BIGINT NOT NULL
);
CREATE INDEX webhook_endpoints_tenant ON webhook_endpoints (tenant_id, id);

CREATE TABLE webhook_deliveries (
    id            TEXT PRIMARY KEY,
    endpoint_id   TEXT NOT NULL,
    tenant_id     TEXT NOT NULL,
    event_id      TEXT NOT NULL,
    event_type    TEXT NOT NULL,
    payload       TEXT NOT NULL,
    attempts      BIGINT NOT NULL,
    status        TEXT NOT NULL,
    next_at       BIGINT NOT NULL,
    last_status   BIGINT,
    last_error    TEXT,
    created_at    BIGINT NOT NULL,
    delivered_at  BIGINT
);
CREATE INDEX webhook_deliveries_due ON webhook_deliveries (status, next_at);
CREATE INDEX webhook_deliveries_endpoint ON webhook_deliveries (endpoint_id, id);
