-- API keys (server-to-server credentials) and revoked JWTs.

-- 0001 created a placeholder `api_keys` table that nothing ever wrote:
-- replaced by this one.
DROP INDEX IF EXISTS api_keys_prefix;
DROP TABLE IF EXISTS api_keys;

-- A key is shown once, at creation; only the SHA-256 of its secret part is
-- kept. `scopes` is space-separated.
CREATE TABLE api_keys (
    id          TEXT PRIMARY KEY,
    tenant_id   TEXT NOT NULL,
    name        TEXT NOT NULL,
    secret_hash TEXT NOT NULL,
    scopes      TEXT NOT NULL,
    tier        TEXT NOT NULL,
    created_at  BIGINT NOT NULL,
    revoked_at  BIGINT
);

CREATE INDEX api_keys_by_tenant ON api_keys (tenant_id, id);

-- JWTs revoked before they expire, by `jti`; a row can go once
-- `expires_at` (Unix ms) has passed.
CREATE TABLE revoked_tokens (
    jti        TEXT PRIMARY KEY,
    expires_at BIGINT NOT NULL,
    revoked_at BIGINT NOT NULL
);
