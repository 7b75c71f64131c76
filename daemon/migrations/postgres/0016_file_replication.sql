-- Files of a shared mesh held by another broker: their metadata is replicated here (the
-- bytes stay with the holding broker, which hands out download URLs). NULL: held here.
ALTER TABLE file ADD COLUMN home_broker TEXT;
ALTER TABLE file ADD COLUMN uploader_pubkey TEXT;
