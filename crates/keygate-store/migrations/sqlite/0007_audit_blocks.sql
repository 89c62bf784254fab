-- Audit events are stored in blocks: one row per node per shipped batch (up to ~1,000 events),
-- the events as JSON lines, so shipping costs one insert per batch instead of one per event
-- (see keygate-store/src/audit.rs). `audit_block_refs` says which blocks mention a tenant
-- (`t:`), key (`k:`), user (`u:`), lifecycle action (`a:`) or refusal code (`c:`), so a
-- filtered query reads only those blocks. The rows of `audit_events` are moved into blocks
-- by the store when it starts; the table stays, empty, for nodes of the previous version.
CREATE TABLE audit_blocks (
    node       TEXT NOT NULL,
    first_seq  BIGINT NOT NULL,
    last_seq   BIGINT NOT NULL,
    min_id     TEXT NOT NULL,
    max_id     TEXT NOT NULL,
    events     BLOB NOT NULL,
    PRIMARY KEY (node, first_seq)
);
-- Covering min_id too, so a page deep in the log skips newer blocks without reading them.
CREATE INDEX audit_blocks_max_id ON audit_blocks (max_id, min_id);

CREATE TABLE audit_block_refs (
    ref        TEXT NOT NULL,
    max_id     TEXT NOT NULL,
    node       TEXT NOT NULL,
    first_seq  BIGINT NOT NULL,
    min_id     TEXT NOT NULL,
    PRIMARY KEY (ref, max_id, min_id, node, first_seq)
);
CREATE INDEX audit_block_refs_block ON audit_block_refs (node, first_seq, ref);
