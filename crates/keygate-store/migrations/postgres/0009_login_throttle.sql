-- Failed password sign-ins per subject (an account, a client network), shared by every node:
-- the count, the last failure and the earliest time of the next attempt (see [login]).
CREATE TABLE login_throttle (
    subject  TEXT PRIMARY KEY,
    failures BIGINT NOT NULL,
    last_at  BIGINT NOT NULL,
    next_at  BIGINT NOT NULL
);
CREATE INDEX login_throttle_last ON login_throttle (last_at);
