//! Seeding: the four plans, the demo tenant (assistant and sandbox channel), and any tenant an
//! operator declares with `parley seed --tenant`. Every operation is idempotent.

use serde::Serialize;
use uuid::Uuid;

use super::{DEFAULT_MAX_DOCUMENTS, DEFAULT_MAX_STORAGE_BYTES, DEFAULT_MONTHLY_MESSAGES, PgStore, StoreError};

const MIB: i64 = 1024 * 1024;

/// The seeded plans: code (also the pipeline tier), name, monthly messages (`None` = unlimited),
/// documents, storage.
const PLANS: [(&str, &str, Option<i64>, i32, i64); 4] = [
    ("starter", "Starter", Some(1_000), DEFAULT_MAX_DOCUMENTS, DEFAULT_MAX_STORAGE_BYTES),
    ("pro", "Pro", Some(10_000), 500, 500 * MIB),
    ("business", "Business", Some(50_000), 2_000, 2_048 * MIB),
    ("enterprise", "Enterprise", None, 10_000, 10_240 * MIB),
];

pub const DEMO_TENANT: &str = "demo";
pub const DEMO_PHONE_NUMBER_ID: &str = "PARLEY_DEMO";
pub const DEMO_DISPLAY_PHONE_NUMBER: &str = "+15550000000";

const PROVIDERS: [&str; 3] = ["meta", "360dialog", "sandbox"];

/// A tenant to create or update, with its default assistant and one channel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SeedTenant {
    pub name: String,
    /// The channel's `phone_number_id`.
    pub phone_number_id: String,
    /// A plan code; `None`: no plan (the base pipeline and the default limits).
    pub plan: Option<String>,
    /// Overrides the monthly message limit.
    pub monthly_messages: Option<i64>,
    /// `meta`, `360dialog` or `sandbox`.
    pub provider: String,
}

/// What `seed_tenant` wrote, printed as JSON by `parley seed`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SeededTenant {
    pub tenant_id: Uuid,
    pub channel_id: Uuid,
    pub assistant_id: Uuid,
    pub plan: Option<String>,
    /// The pipeline tier the tenant runs (`None`: the base pipeline).
    pub tier: Option<String>,
    /// The effective monthly limit (`None`: unlimited).
    pub monthly_message_limit: Option<i64>,
    pub phone_number_id: String,
    pub provider: String,
}

/// What `seed_defaults` left in place.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SeedReport {
    /// Every plan code in the database.
    pub plans: Vec<String>,
    pub demo: SeededTenant,
}

/// The default assistant's instructions for a new tenant (French, the users' language; the
/// assistant answers in the user's).
fn default_system_prompt(tenant: &str) -> String {
    format!(
        "Tu es l'assistant virtuel de « {tenant} » sur WhatsApp. Réponds de façon courtoise, claire et \
         concise, dans la langue de ton interlocuteur. Appuie-toi sur les informations fournies ; si tu ne \
         connais pas la réponse, dis-le simplement et propose de transmettre la question à l'équipe."
    )
}

const DEMO_SYSTEM_PROMPT: &str = "Tu es l'assistant de démonstration de Parley sur WhatsApp. Réponds de façon \
     courtoise, claire et concise, dans la langue de ton interlocuteur. Appuie-toi sur la base de connaissances \
     fournie ; si tu ne connais pas la réponse, dis-le simplement.";

impl PgStore {
    /// Creates the plans that are missing (an operator's changes to existing ones are kept) and
    /// the demo tenant: no plan (the base pipeline) with a monthly limit of
    /// [`DEFAULT_MONTHLY_MESSAGES`], a default assistant, and the sandbox channel
    /// `PARLEY_DEMO`.
    pub async fn seed_defaults(&self) -> Result<SeedReport, StoreError> {
        let mut tx = self.pool.begin().await?;
        for (code, name, monthly, documents, storage) in PLANS {
            sqlx::query(
                "INSERT INTO plans (code, name, monthly_message_limit, tier, max_documents, max_storage_bytes)
                 VALUES ($1, $2, $3, $1, $4, $5)
                 ON CONFLICT (code) DO NOTHING",
            )
            .bind(code)
            .bind(name)
            .bind(monthly)
            .bind(documents)
            .bind(storage)
            .execute(&mut *tx)
            .await?;
        }
        let plans: Vec<String> = sqlx::query_scalar("SELECT code FROM plans ORDER BY code").fetch_all(&mut *tx).await?;
        tx.commit().await?;

        let demo = self
            .upsert_tenant(
                &SeedTenant {
                    name: DEMO_TENANT.into(),
                    phone_number_id: DEMO_PHONE_NUMBER_ID.into(),
                    plan: None,
                    monthly_messages: Some(DEFAULT_MONTHLY_MESSAGES),
                    provider: "sandbox".into(),
                },
                DEMO_SYSTEM_PROMPT,
                Some(DEMO_DISPLAY_PHONE_NUMBER),
            )
            .await?;
        Ok(SeedReport { plans, demo })
    }

    /// Creates or updates the tenant `req.name` (its plan and monthly override are set to what
    /// `req` says), gives it a default assistant if it has none, and creates or updates its
    /// channel. A `phone_number_id` that belongs to another tenant is refused: moving a number
    /// would leave its conversations with the old tenant.
    pub async fn seed_tenant(&self, req: &SeedTenant) -> Result<SeededTenant, StoreError> {
        self.upsert_tenant(req, &default_system_prompt(req.name.trim()), None).await
    }

    async fn upsert_tenant(
        &self,
        req: &SeedTenant,
        system_prompt: &str,
        display_phone_number: Option<&str>,
    ) -> Result<SeededTenant, StoreError> {
        let name = req.name.trim();
        let phone_number_id = req.phone_number_id.trim();
        if name.is_empty() {
            return Err(StoreError::Invalid("the tenant name is empty".into()));
        }
        if phone_number_id.is_empty() {
            return Err(StoreError::Invalid("the phone_number_id is empty".into()));
        }
        if !PROVIDERS.contains(&req.provider.as_str()) {
            return Err(StoreError::Invalid(format!(
                "unknown provider {:?}; expected one of: {}",
                req.provider,
                PROVIDERS.join(", ")
            )));
        }
        if req.monthly_messages.is_some_and(|n| n < 0) {
            return Err(StoreError::Invalid("the monthly message limit cannot be negative".into()));
        }

        let mut tx = self.pool.begin().await?;
        let plan: Option<(Uuid, Option<i64>, Option<String>)> = match &req.plan {
            None => None,
            Some(code) => {
                let found = sqlx::query_as("SELECT id, monthly_message_limit, tier FROM plans WHERE code = $1")
                    .bind(code)
                    .fetch_optional(&mut *tx)
                    .await?;
                if found.is_none() {
                    let known: Vec<String> =
                        sqlx::query_scalar("SELECT code FROM plans ORDER BY code").fetch_all(&mut *tx).await?;
                    let known =
                        if known.is_empty() { "none (run `parley seed` first)".into() } else { known.join(", ") };
                    return Err(StoreError::Invalid(format!("unknown plan {code:?}; known plans: {known}")));
                }
                found
            }
        };

        let tenant_id: Uuid = sqlx::query_scalar(
            "INSERT INTO tenants (name, plan_id, monthly_message_limit_override) VALUES ($1, $2, $3)
             ON CONFLICT (name) DO UPDATE SET
                 plan_id = EXCLUDED.plan_id,
                 monthly_message_limit_override = EXCLUDED.monthly_message_limit_override,
                 updated_at = now()
             RETURNING id",
        )
        .bind(name)
        .bind(plan.as_ref().map(|p| p.0))
        .bind(req.monthly_messages)
        .fetch_one(&mut *tx)
        .await?;

        // An existing default assistant is kept as the tenant may have edited it.
        sqlx::query(
            "INSERT INTO assistants (tenant_id, name, system_prompt, is_default) VALUES ($1, 'Assistant', $2, true)
             ON CONFLICT (tenant_id) WHERE is_default DO NOTHING",
        )
        .bind(tenant_id)
        .bind(system_prompt)
        .execute(&mut *tx)
        .await?;
        let assistant_id: Uuid = sqlx::query_scalar("SELECT id FROM assistants WHERE tenant_id = $1 AND is_default")
            .bind(tenant_id)
            .fetch_one(&mut *tx)
            .await?;

        let channel_id: Option<Uuid> = sqlx::query_scalar(
            "INSERT INTO channels (tenant_id, provider, phone_number_id, display_phone_number)
             VALUES ($1, $2, $3, $4)
             ON CONFLICT (phone_number_id) DO UPDATE SET
                 provider = EXCLUDED.provider,
                 display_phone_number = COALESCE(EXCLUDED.display_phone_number, channels.display_phone_number)
             WHERE channels.tenant_id = EXCLUDED.tenant_id
             RETURNING id",
        )
        .bind(tenant_id)
        .bind(&req.provider)
        .bind(phone_number_id)
        .bind(display_phone_number)
        .fetch_optional(&mut *tx)
        .await?;
        let Some(channel_id) = channel_id else {
            let owner: String = sqlx::query_scalar(
                "SELECT t.name FROM channels c JOIN tenants t ON t.id = c.tenant_id WHERE c.phone_number_id = $1",
            )
            .bind(phone_number_id)
            .fetch_one(&mut *tx)
            .await?;
            return Err(StoreError::Invalid(format!(
                "phone_number_id {phone_number_id:?} already belongs to tenant {owner:?}"
            )));
        };
        tx.commit().await?;

        let (plan_limit, tier) =
            plan.map(|(_, limit, tier)| (limit, tier)).unwrap_or((Some(DEFAULT_MONTHLY_MESSAGES), None));
        Ok(SeededTenant {
            tenant_id,
            channel_id,
            assistant_id,
            plan: req.plan.clone(),
            tier,
            monthly_message_limit: req.monthly_messages.or(plan_limit),
            phone_number_id: phone_number_id.to_owned(),
            provider: req.provider.clone(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::testing::TestDatabase;

    fn tenant(name: &str, pnid: &str, plan: Option<&str>, monthly: Option<i64>) -> SeedTenant {
        SeedTenant {
            name: name.into(),
            phone_number_id: pnid.into(),
            plan: plan.map(Into::into),
            monthly_messages: monthly,
            provider: "meta".into(),
        }
    }

    #[tokio::test]
    async fn seeding_twice_keeps_the_same_rows_four_plans_and_the_demo_tenant() {
        let db = TestDatabase::create().await;
        let store = PgStore::new(db.pool.clone());

        let first = store.seed_defaults().await.unwrap();
        let second = store.seed_defaults().await.unwrap();

        assert_eq!(first, second);
        assert_eq!(first.plans, ["business", "enterprise", "pro", "starter"]);
        let counts: (i64, i64, i64, i64) = sqlx::query_as(
            "SELECT (SELECT count(*) FROM plans), (SELECT count(*) FROM tenants),
                    (SELECT count(*) FROM assistants), (SELECT count(*) FROM channels)",
        )
        .fetch_one(&db.pool)
        .await
        .unwrap();
        assert_eq!(counts, (4, 1, 1, 1));

        let demo = store.resolve_channel(DEMO_PHONE_NUMBER_ID).await.unwrap().expect("demo channel");
        assert_eq!(demo.channel.provider, "sandbox");
        assert_eq!(demo.tenant.tier, None, "the demo runs the base pipeline");
        assert_eq!(demo.tenant.monthly_message_limit, Some(1000));
        assert!(demo.tenant.assistant.system_prompt.contains("Parley"));
        let display: Option<String> =
            sqlx::query_scalar("SELECT display_phone_number FROM channels").fetch_one(&db.pool).await.unwrap();
        assert_eq!(display.as_deref(), Some(DEMO_DISPLAY_PHONE_NUMBER));

        let plans: Vec<(String, Option<String>, i32, i64)> =
            sqlx::query_as("SELECT code, tier, max_documents, max_storage_bytes FROM plans ORDER BY code")
                .fetch_all(&db.pool)
                .await
                .unwrap();
        for (code, tier, documents, storage) in &plans {
            assert_eq!(tier.as_deref(), Some(code.as_str()));
            assert!(*documents >= 100 && *storage >= 50 * MIB, "{code}");
        }
        let limits: Vec<Option<i64>> =
            sqlx::query_scalar("SELECT monthly_message_limit FROM plans ORDER BY monthly_message_limit NULLS LAST")
                .fetch_all(&db.pool)
                .await
                .unwrap();
        assert_eq!(limits, [Some(1_000), Some(10_000), Some(50_000), None], "enterprise is unlimited");
        db.drop_database().await;
    }

    #[tokio::test]
    async fn a_tenant_without_plan_runs_the_base_pipeline_with_a_thousand_messages() {
        let db = TestDatabase::create().await;
        let store = PgStore::new(db.pool.clone());
        store.seed_defaults().await.unwrap();

        let seeded = store.seed_tenant(&tenant("Boutique", "PNID-B", None, None)).await.unwrap();
        assert_eq!(seeded.plan, None);
        assert_eq!(seeded.tier, None);
        assert_eq!(seeded.monthly_message_limit, Some(1000));
        let json = serde_json::to_value(&seeded).unwrap();
        assert_eq!(json["tenant_id"], seeded.tenant_id.to_string());
        assert_eq!(json["channel_id"], seeded.channel_id.to_string());

        let ctx = store.resolve_channel("PNID-B").await.unwrap().unwrap();
        assert_eq!(ctx.tenant.tier, None);
        assert_eq!(ctx.tenant.monthly_message_limit, Some(1000));
        assert_eq!(ctx.channel.provider, "meta");

        let again = store.seed_tenant(&tenant("Boutique", "PNID-B", None, None)).await.unwrap();
        assert_eq!(again, seeded, "idempotent");
        db.drop_database().await;
    }

    #[tokio::test]
    async fn a_tenant_on_the_enterprise_plan_or_with_its_own_limit() {
        let db = TestDatabase::create().await;
        let store = PgStore::new(db.pool.clone());
        store.seed_defaults().await.unwrap();

        let seeded = store.seed_tenant(&tenant("Grand Compte", "PNID-E", Some("enterprise"), None)).await.unwrap();
        assert_eq!(seeded.plan.as_deref(), Some("enterprise"));
        assert_eq!(seeded.tier.as_deref(), Some("enterprise"));
        assert_eq!(seeded.monthly_message_limit, None);
        let ctx = store.resolve_channel("PNID-E").await.unwrap().unwrap();
        assert_eq!(ctx.tenant.tier.as_deref(), Some("enterprise"));
        assert_eq!(ctx.tenant.monthly_message_limit, None);

        // Re-seeding the same tenant changes its plan and limit, keeps its ids.
        let moved = store.seed_tenant(&tenant("Grand Compte", "PNID-E", Some("starter"), Some(42))).await.unwrap();
        assert_eq!(
            (moved.tenant_id, moved.channel_id, moved.assistant_id),
            (seeded.tenant_id, seeded.channel_id, seeded.assistant_id)
        );
        assert_eq!(moved.monthly_message_limit, Some(42));
        let ctx = store.resolve_channel("PNID-E").await.unwrap().unwrap();
        assert_eq!(ctx.tenant.tier.as_deref(), Some("starter"));
        assert_eq!(ctx.tenant.monthly_message_limit, Some(42));
        db.drop_database().await;
    }

    #[tokio::test]
    async fn unknown_plan_provider_or_a_number_of_another_tenant_are_refused_clearly() {
        let db = TestDatabase::create().await;
        let store = PgStore::new(db.pool.clone());
        store.seed_defaults().await.unwrap();

        let error = store.seed_tenant(&tenant("X", "PNID-X", Some("gold"), None)).await.unwrap_err();
        assert!(matches!(error, StoreError::Invalid(_)));
        assert_eq!(error.to_string(), "unknown plan \"gold\"; known plans: business, enterprise, pro, starter");

        let error = store.seed_tenant(&SeedTenant { provider: "twilio".into(), ..tenant("X", "P", None, None) }).await;
        assert!(error.unwrap_err().to_string().contains("meta, 360dialog, sandbox"));

        let error = store.seed_tenant(&tenant("X", DEMO_PHONE_NUMBER_ID, None, None)).await.unwrap_err();
        assert!(error.to_string().contains("already belongs to tenant \"demo\""), "{error}");

        let count: i64 = sqlx::query_scalar("SELECT count(*) FROM tenants").fetch_one(&db.pool).await.unwrap();
        assert_eq!(count, 1, "a refused seed writes nothing");
        db.drop_database().await;
    }
}
