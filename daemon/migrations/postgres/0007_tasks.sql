-- Tasks (create_task / claim_task / complete_task / list_tasks).
CREATE TABLE task (
    id            TEXT PRIMARY KEY,
    mesh_id       TEXT NOT NULL,
    title         TEXT NOT NULL,
    assignee      TEXT,
    claimed_by    TEXT,
    priority      TEXT NOT NULL,
    status        TEXT NOT NULL CHECK (status IN ('open', 'claimed', 'done')),
    tags          TEXT NOT NULL,
    result        TEXT,
    created_by    TEXT,
    created_at    BIGINT NOT NULL,
    claimed_at    BIGINT,
    completed_at  BIGINT,
    -- Creation order within the mesh (newest first in lists, even within a millisecond).
    seq           BIGINT NOT NULL
);
CREATE INDEX task_mesh_seq ON task (mesh_id, seq);
