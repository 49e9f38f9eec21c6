//! Inbound media on the message row: where the file a user sent is kept (object key, type, size,
//! checksum), or why it could not be fetched.

use super::{PgStore, StoreError, parse_id};

/// A file stored for an inbound message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredMedia {
    pub media_id: String,
    pub object_key: String,
    pub mime_type: String,
    pub bytes: u64,
    pub sha256: String,
}

/// The media columns of an inbound message.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct InboundMedia {
    pub media_id: Option<String>,
    pub media_key: Option<String>,
    pub media_mime_type: Option<String>,
    pub media_bytes: Option<i64>,
    pub media_sha256: Option<String>,
    pub media_error: Option<String>,
}

impl PgStore {
    /// Records the stored file on the inbound message `provider_message_id` of `channel_id`.
    /// Returns whether the row exists.
    pub async fn record_inbound_media(
        &self,
        channel_id: &str,
        provider_message_id: &str,
        media: &StoredMedia,
    ) -> Result<bool, StoreError> {
        let channel = parse_id("channel", channel_id)?;
        let bytes = i64::try_from(media.bytes).map_err(|_| StoreError::Invalid("media size out of range".into()))?;
        let updated = sqlx::query(
            "UPDATE messages SET media_id = $3, media_key = $4, media_mime_type = $5, media_bytes = $6,
                                 media_sha256 = $7, media_error = NULL, updated_at = now()
             WHERE channel_id = $1 AND provider_message_id = $2 AND direction = 'inbound'",
        )
        .bind(channel)
        .bind(provider_message_id)
        .bind(&media.media_id)
        .bind(&media.object_key)
        .bind(&media.mime_type)
        .bind(bytes)
        .bind(&media.sha256)
        .execute(self.pool())
        .await?;
        Ok(updated.rows_affected() > 0)
    }

    /// Records why the file of an inbound message could not be fetched or stored (`reason`: a
    /// short code, never a secret).
    pub async fn record_inbound_media_failure(
        &self,
        channel_id: &str,
        provider_message_id: &str,
        media_id: &str,
        reason: &str,
    ) -> Result<bool, StoreError> {
        let channel = parse_id("channel", channel_id)?;
        let updated = sqlx::query(
            "UPDATE messages SET media_id = $3, media_error = $4, updated_at = now()
             WHERE channel_id = $1 AND provider_message_id = $2 AND direction = 'inbound' AND media_key IS NULL",
        )
        .bind(channel)
        .bind(provider_message_id)
        .bind(media_id)
        .bind(reason)
        .execute(self.pool())
        .await?;
        Ok(updated.rows_affected() > 0)
    }

    /// The media columns of an inbound message, `None` when there is no such message.
    pub async fn inbound_media(
        &self,
        channel_id: &str,
        provider_message_id: &str,
    ) -> Result<Option<InboundMedia>, StoreError> {
        let channel = parse_id("channel", channel_id)?;
        Ok(sqlx::query_as::<_, InboundMedia>(
            "SELECT media_id, media_key, media_mime_type, media_bytes, media_sha256, media_error FROM messages
             WHERE channel_id = $1 AND provider_message_id = $2 AND direction = 'inbound'",
        )
        .bind(channel)
        .bind(provider_message_id)
        .fetch_optional(self.pool())
        .await?)
    }
}

#[cfg(test)]
mod tests {
    use chrono::Utc;
    use engine::ids::PhoneNumber;

    use super::*;
    use crate::store::{NewInbound, SeedTenant, testing::TestDatabase};

    #[tokio::test]
    async fn stored_file_and_failure_are_recorded_on_the_inbound_row() {
        let db = TestDatabase::create().await;
        let store = PgStore::new(db.pool.clone());
        store
            .seed_tenant(&SeedTenant {
                name: "media".into(),
                phone_number_id: "MEDIA_PHONE".into(),
                plan: None,
                monthly_messages: None,
                provider: "meta".into(),
            })
            .await
            .unwrap();
        let ctx = store.resolve_channel("MEDIA_PHONE").await.unwrap().unwrap();
        for wamid in ["wamid.IMG", "wamid.BIG"] {
            let inbound = NewInbound {
                provider_message_id: wamid.into(),
                from: PhoneNumber::new("33612345678"),
                contact_name: None,
                message_type: "image".into(),
                text: None,
                sent_at: Utc::now(),
                job_id: format!("job-{wamid}"),
            };
            store.record_inbound(&ctx, &inbound).await.unwrap();
        }
        let channel = ctx.channel.id.as_str();
        let stored = StoredMedia {
            media_id: "M1".into(),
            object_key: "media/t/wamid.IMG".into(),
            mime_type: "image/jpeg".into(),
            bytes: 42,
            sha256: "ab".into(),
        };

        assert!(store.record_inbound_media(channel, "wamid.IMG", &stored).await.unwrap());
        assert!(store.record_inbound_media_failure(channel, "wamid.BIG", "M2", "too_large").await.unwrap());
        assert!(
            !store.record_inbound_media_failure(channel, "wamid.IMG", "M1", "late").await.unwrap(),
            "a stored file wins"
        );
        assert!(!store.record_inbound_media(channel, "wamid.NONE", &stored).await.unwrap());

        let img = store.inbound_media(channel, "wamid.IMG").await.unwrap().expect("row");
        assert_eq!(img.media_key.as_deref(), Some("media/t/wamid.IMG"));
        assert_eq!(img.media_mime_type.as_deref(), Some("image/jpeg"));
        assert_eq!(img.media_bytes, Some(42));
        assert_eq!(img.media_error, None);
        let big = store.inbound_media(channel, "wamid.BIG").await.unwrap().expect("row");
        assert_eq!(
            (big.media_id.as_deref(), big.media_key, big.media_error.as_deref()),
            (Some("M2"), None, Some("too_large"))
        );
        assert_eq!(store.inbound_media(channel, "wamid.NONE").await.unwrap(), None);
        db.drop_database().await;
    }
}
