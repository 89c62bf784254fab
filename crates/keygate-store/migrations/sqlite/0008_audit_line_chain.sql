-- Blocks shipped from now on hold their events' lines exactly as each node wrote them, chained
-- over those bytes, so the shipper neither parses events into fields nor encodes them again
-- (see keygate-core/src/audit.rs). `chain` holds the hash before the block's first event,
-- then each event's (32 bytes each). Blocks without it are of the earlier format: each line a
-- whole event carrying its own hashes.
ALTER TABLE audit_blocks ADD COLUMN chain BLOB;
