-- Accounts: when a tenant's plan started and when its trial ends (NULL: not on a trial), how
-- many months of the account its pool was refilled for; a user's role and whether their email
-- is verified. Earlier tenants began their plan when they were made; earlier users are
-- members whose address counts as verified.
ALTER TABLE tenants ADD COLUMN plan_started_at BIGINT NOT NULL DEFAULT 0;
UPDATE tenants SET plan_started_at = created_at;
ALTER TABLE tenants ADD COLUMN trial_ends_at BIGINT;
ALTER TABLE tenants ADD COLUMN refilled_months BIGINT NOT NULL DEFAULT 0;
CREATE INDEX tenants_trial_ends ON tenants (trial_ends_at) WHERE trial_ends_at IS NOT NULL;
ALTER TABLE users ADD COLUMN role TEXT NOT NULL DEFAULT 'member';
ALTER TABLE users ADD COLUMN verified BIGINT NOT NULL DEFAULT 1;
CREATE INDEX users_email ON users (email);
-- One account per address: of two sign-ups with one address at once, the second fails.
CREATE UNIQUE INDEX users_owner_email ON users (email) WHERE role = 'owner';
