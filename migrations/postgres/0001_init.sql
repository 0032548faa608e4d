-- Spillway schema, version 1, PostgreSQL.
--
-- Kept in step with migrations/sqlite/0001_init.sql: same tables, columns,
-- names and indexes; only the column types differ. docs/storage.md says
-- which query each index serves.
--
-- No foreign keys: the persister replays records from its journal in any
-- order (a message may land before its conversation), so integrity is kept
-- by the code and every delete is explicit.
--
-- Times are Unix milliseconds. Ids are text (UUIDv7 for conversations and
-- messages, so sorting by id is sorting by creation time). Text columns use
-- COLLATE "C" where they are sorted or ranged over, so the order is the
-- byte order SQLite uses too, whatever the database's locale.

CREATE TABLE tenants (
    id         TEXT   NOT NULL PRIMARY KEY,
    name       TEXT   NOT NULL,
    created_at BIGINT NOT NULL
);

CREATE TABLE users (
    tenant_id  TEXT   NOT NULL,
    id         TEXT   NOT NULL,
    kind       TEXT   NOT NULL CHECK (kind IN ('user', 'visitor')),
    created_at BIGINT NOT NULL,
    PRIMARY KEY (tenant_id, id)
);

-- Not used yet: the API key issue fills it.
CREATE TABLE api_keys (
    id         TEXT   NOT NULL PRIMARY KEY,
    tenant_id  TEXT   NOT NULL,
    prefix     TEXT   NOT NULL,
    hash       TEXT   NOT NULL,
    name       TEXT   NOT NULL,
    scopes     TEXT   NOT NULL,
    created_at BIGINT NOT NULL,
    revoked_at BIGINT
);
CREATE INDEX api_keys_prefix ON api_keys (prefix);

CREATE TABLE conversations (
    id         TEXT COLLATE "C" NOT NULL PRIMARY KEY,
    tenant_id  TEXT   NOT NULL,
    user_id    TEXT   NOT NULL,
    title      TEXT,
    metadata   TEXT   NOT NULL,
    created_at BIGINT NOT NULL,
    updated_at BIGINT NOT NULL
);
CREATE INDEX conversations_owner ON conversations (tenant_id, user_id, id);

CREATE TABLE messages (
    id                TEXT COLLATE "C" NOT NULL PRIMARY KEY,
    conversation_id   TEXT    NOT NULL,
    tenant_id         TEXT    NOT NULL,
    user_id           TEXT    NOT NULL,
    role              TEXT    NOT NULL,
    content           TEXT    NOT NULL,
    status            TEXT    NOT NULL CHECK (status IN ('complete', 'aborted', 'failed')),
    model             TEXT,
    provider          TEXT,
    prompt_tokens     BIGINT,
    completion_tokens BIGINT,
    cost_usd          DOUBLE PRECISION,
    usage_estimated   BOOLEAN NOT NULL,
    client_message_id TEXT,
    generation_id     TEXT,
    created_at        BIGINT  NOT NULL
);
CREATE INDEX messages_conversation ON messages (conversation_id, id);
CREATE INDEX messages_owner ON messages (tenant_id, user_id, id);
CREATE UNIQUE INDEX messages_client_message_id ON messages (conversation_id, client_message_id)
    WHERE client_message_id IS NOT NULL;

CREATE TABLE usage_daily (
    day               TEXT COLLATE "C" NOT NULL,
    tenant_id         TEXT   NOT NULL,
    user_id           TEXT   NOT NULL,
    model             TEXT   NOT NULL,
    provider          TEXT   NOT NULL,
    messages          BIGINT NOT NULL,
    prompt_tokens     BIGINT NOT NULL,
    completion_tokens BIGINT NOT NULL,
    cost_usd          DOUBLE PRECISION NOT NULL,
    PRIMARY KEY (day, tenant_id, user_id, model, provider)
);
CREATE INDEX usage_daily_owner ON usage_daily (tenant_id, user_id, day);

CREATE TABLE tombstones (
    kind       TEXT   NOT NULL CHECK (kind IN ('conversation', 'user')),
    id         TEXT   NOT NULL,
    deleted_at BIGINT NOT NULL,
    PRIMARY KEY (kind, id)
);
