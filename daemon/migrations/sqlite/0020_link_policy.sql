-- Link policies: per shared mesh, per peer broker, what may leave (export) and what may
-- enter (import). No row: everything passes (the behaviour before policies).
CREATE TABLE fed_policy (
    mesh_id     TEXT NOT NULL,
    broker      TEXT NOT NULL,
    direction   TEXT NOT NULL,
    rules       TEXT NOT NULL,
    updated_at  INTEGER NOT NULL,
    PRIMARY KEY (mesh_id, broker, direction)
);
-- Multicasts a policy kept from a broker (ours on export, theirs on import), for
-- message_status; swept with delivered messages.
CREATE TABLE message_refusal (
    message_id  TEXT NOT NULL,
    mesh_id     TEXT NOT NULL,
    broker      TEXT NOT NULL,
    direction   TEXT NOT NULL,
    reason      TEXT NOT NULL,
    at          INTEGER NOT NULL,
    PRIMARY KEY (message_id, broker, direction)
);
CREATE INDEX message_refusal_at ON message_refusal (at);
