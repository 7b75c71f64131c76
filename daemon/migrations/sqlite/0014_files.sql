-- Stored files (POST /upload, get_file, list_files, file_status, delete_file,
-- grant_file_access). The bytes live under <data_dir>/files/<mesh_id>/<id>; rows here.
CREATE TABLE file (
    id                 TEXT PRIMARY KEY,
    mesh_id            TEXT NOT NULL,
    name               TEXT NOT NULL,
    size_bytes         INTEGER NOT NULL,
    mime_type          TEXT,
    -- SHA-256 of the stored bytes (hex), recorded at upload and served as the ETag.
    sha256             TEXT NOT NULL,
    tags               TEXT NOT NULL,
    persistent         INTEGER NOT NULL,
    encrypted          INTEGER NOT NULL,
    -- The key that may grant access to an encrypted file (its uploader's by default).
    owner_pubkey       TEXT NOT NULL,
    uploader_member_id TEXT NOT NULL,
    uploaded_by_name   TEXT NOT NULL,
    -- NULL: the whole mesh; else a member or session key, @group or *.
    target_spec        TEXT,
    uploaded_at        INTEGER NOT NULL,
    expires_at         INTEGER,
    deleted_at         INTEGER
);
CREATE INDEX file_mesh ON file (mesh_id, uploaded_at);
CREATE INDEX file_expiry ON file (expires_at) WHERE expires_at IS NOT NULL AND deleted_at IS NULL;

CREATE TABLE file_access (
    file_id      TEXT NOT NULL,
    peer_pubkey  TEXT NOT NULL,
    peer_name    TEXT NOT NULL,
    accessed_at  INTEGER NOT NULL
);
CREATE INDEX file_access_file ON file_access (file_id, accessed_at);

-- The file key of an encrypted file, sealed for one peer key.
CREATE TABLE file_key (
    file_id      TEXT NOT NULL,
    peer_pubkey  TEXT NOT NULL,
    sealed_key   TEXT NOT NULL,
    granted_at   INTEGER NOT NULL,
    granted_by   TEXT NOT NULL,
    PRIMARY KEY (file_id, peer_pubkey)
);
