-- Persistent MCP server registrations (mcp_register with persistent: true). They
-- survive their host's disconnect and a broker restart, offline until a session of the
-- hosting member connects again. Non-persistent registrations live in memory only.
CREATE TABLE mcp_server (
    mesh_id        TEXT NOT NULL,
    name           TEXT NOT NULL,
    member_id      TEXT NOT NULL,
    member_pubkey  TEXT NOT NULL,
    hosted_by      TEXT NOT NULL,
    description    TEXT NOT NULL,
    -- JSON array of {name, description, inputSchema?}.
    tools          TEXT NOT NULL,
    registered_at  INTEGER NOT NULL,
    -- When the host's last session left (NULL while it is connected).
    offline_since  INTEGER,
    PRIMARY KEY (mesh_id, name)
);
