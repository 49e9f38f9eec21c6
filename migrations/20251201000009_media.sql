-- Inbound media (image, audio, video, document, sticker): the provider's media id, where the file
-- is kept in object storage, and what it is; or why it could not be fetched. NULL for messages
-- without a file, and for files not fetched (the sandbox has no media API).

ALTER TABLE messages
    ADD COLUMN media_id         text,
    -- The object storage key: `media/<tenant>/<provider message id>`.
    ADD COLUMN media_key        text,
    ADD COLUMN media_mime_type  text,
    ADD COLUMN media_bytes      bigint CHECK (media_bytes >= 0),
    -- Hex SHA-256 of the stored bytes.
    ADD COLUMN media_sha256     text,
    -- Set when the file could not be fetched or stored: `too_large`, `sha256_mismatch`, a provider
    -- code; the user was answered from the caption or a placeholder.
    ADD COLUMN media_error      text;
