-- Spillway schema, version 1, SQLite.
--
-- Kept in step with migrations/postgres/0001_init.sql: same tables, columns,
-- names and indexes; only the column types differ (STRICT tables take
-- INTEGER, REAL and TEXT). docs/storage.md says which query each index
-- serves.
--
-- No foreign keys: the persister replays records from its journal in any
-- order (a message may land before its conversation), so integrity is kept
-- by the code and every delete is explicit.
--
-- Times are Unix milliseconds. Ids are text (UUIDv7 for conversations and
-- messages, so sorting by id is sorting by creation time).

CREATE TABLE tenants (
    id         TEXT    NOT NULL PRIMARY KEY,
    name       TEXT    NOT NULL,
    created_at INTEGER NOT NULL
) STRICT;

CREATE TABLE users (
    tenant_id  TEXT    NOT NULL,
    id         TEXT    NOT NULL,
    kind       TEXT    NOT NULL CHECK (kind IN ('user', 'visitor')),
    created_at INTEGER NOT NULL,
    PRIMARY KEY (tenant_id, id)
) STRICT;

-- Not used yet: the API key issue fills it.
CREATE TABLE api_keys (
    id         TEXT    NOT NULL PRIMARY KEY,
    tenant_id  TEXT    NOT NULL,
    prefix     TEXT    NOT NULL,
    hash       TEXT    NOT NULL,
    name       TEXT    NOT NULL,
    scopes     TEXT    NOT NULL,
    created_at INTEGER NOT NULL,
    revoked_at INTEGER
) STRICT;
CREATE INDEX api_keys_prefix ON api_keys (prefix);

CREATE TABLE conversations (
    id         TEXT    NOT NULL PRIMARY KEY,
    tenant_id  TEXT    NOT NULL,
    user_id    TEXT    NOT NULL,
    title      TEXT,
    metadata   TEXT    NOT NULL,
    created_at INTEGER NOT NULL,
    updated_at INTEGER NOT NULL
) STRICT;
CREATE INDEX conversations_owner ON conversations (tenant_id, user_id, id);

CREATE TABLE messages (
    id                TEXT    NOT NULL PRIMARY KEY,
    conversation_id   TEXT    NOT NULL,
    tenant_id         TEXT    NOT NULL,
    user_id           TEXT    NOT NULL,
    role              TEXT    NOT NULL,
    content           TEXT    NOT NULL,
    status            TEXT    NOT NULL CHECK (status IN ('complete', 'aborted', 'failed')),
    model             TEXT,
    provider          TEXT,
    prompt_tokens     INTEGER,
    completion_tokens INTEGER,
    cost_usd          REAL,
    usage_estimated   INTEGER NOT NULL CHECK (usage_estimated IN (0, 1)),
    client_message_id TEXT,
    generation_id     TEXT,
    created_at        INTEGER NOT NULL
) STRICT;
CREATE INDEX messages_conversation ON messages (conversation_id, id);
CREATE INDEX messages_owner ON messages (tenant_id, user_id, id);
CREATE UNIQUE INDEX messages_client_message_id ON messages (conversation_id, client_message_id)
    WHERE client_message_id IS NOT NULL;

CREATE TABLE usage_daily (
    day               TEXT    NOT NULL,
    tenant_id         TEXT    NOT NULL,
    user_id           TEXT    NOT NULL,
    model             TEXT    NOT NULL,
    provider          TEXT    NOT NULL,
    messages          INTEGER NOT NULL,
    prompt_tokens     INTEGER NOT NULL,
    completion_tokens INTEGER NOT NULL,
    cost_usd          REAL    NOT NULL,
    PRIMARY KEY (day, tenant_id, user_id, model, provider)
) STRICT;
CREATE INDEX usage_daily_owner ON usage_daily (tenant_id, user_id, day);

CREATE TABLE tombstones (
    kind       TEXT    NOT NULL CHECK (kind IN ('conversation', 'user')),
    id         TEXT    NOT NULL,
    deleted_at INTEGER NOT NULL,
    PRIMARY KEY (kind, id)
) STRICT;
