-- Named leases: one node at a time does a cluster-wide job (automatic rotation).
CREATE TABLE leases (
    name    TEXT PRIMARY KEY,
    holder  TEXT NOT NULL,
    until   BIGINT NOT NULL
);
