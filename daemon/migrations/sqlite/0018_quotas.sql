-- Quotas count what each member keeps: who wrote a skill, a stream, a state key.
ALTER TABLE skill ADD COLUMN author_member_id TEXT;
ALTER TABLE stream ADD COLUMN created_by_member TEXT;
ALTER TABLE state ADD COLUMN updated_by_member TEXT;
CREATE INDEX memory_member ON memory (mesh_id, remembered_by);
CREATE INDEX task_creator ON task (mesh_id, creator_pubkey);
CREATE INDEX task_done ON task (completed_at) WHERE completed_at IS NOT NULL;
CREATE INDEX file_uploader ON file (mesh_id, uploader_member_id);
CREATE INDEX audit_created ON audit_log (created_at);
-- Forgetting a note drops its text; the full-text index follows the row.
CREATE TRIGGER memory_fts_update AFTER UPDATE OF content, tags ON memory BEGIN
    INSERT INTO memory_fts (memory_fts, rowid, content, tags) VALUES ('delete', old.rowid, old.content, old.tags);
    INSERT INTO memory_fts (rowid, content, tags) VALUES (new.rowid, new.content, new.tags);
END;
