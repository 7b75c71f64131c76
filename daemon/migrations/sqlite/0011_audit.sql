-- Append-only audit log: per mesh, a SHA-256 chain over canonical (sorted-key) JSON of
-- each entry, every entry signed with the broker's ed25519 audit key.
CREATE TABLE audit_log (
    mesh_id          TEXT NOT NULL,
    seq              INTEGER NOT NULL,
    event_type       TEXT NOT NULL,
    actor_member_id  TEXT,
    actor            TEXT NOT NULL,
    payload          TEXT NOT NULL,
    prev_hash        TEXT NOT NULL,
    hash             TEXT NOT NULL,
    sig              TEXT NOT NULL,
    created_at       INTEGER NOT NULL,
    PRIMARY KEY (mesh_id, seq)
);
