//! `parley migrate` and `parley seed`.

use std::process::ExitCode;

use parley::{
    settings::Settings,
    store::{self, PgStore, SeedTenant},
};

fn runtime() -> Option<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(|e| eprintln!("parley: {e}")).ok()
}

fn settings() -> Result<Settings, ExitCode> {
    Settings::from_env().map_err(|e| {
        eprintln!("{e}");
        ExitCode::from(2)
    })
}

pub fn migrate() -> ExitCode {
    let settings = match settings() {
        Ok(s) => s,
        Err(code) => return code,
    };
    let Some(rt) = runtime() else { return ExitCode::FAILURE };
    rt.block_on(async {
        match store::connect(&settings.database_url).await {
            Ok(pool) => match store::migrate(&pool).await {
                Ok(()) => {
                    println!("migrations applied");
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("parley migrate: {e}");
                    ExitCode::FAILURE
                }
            },
            Err(e) => {
                eprintln!("parley migrate: {e}");
                ExitCode::FAILURE
            }
        }
    })
}

pub struct SeedArgs {
    pub tenant: Option<String>,
    pub phone_number_id: Option<String>,
    pub plan: Option<String>,
    pub monthly_messages: Option<i64>,
    pub provider: Option<String>,
}

pub fn seed(args: SeedArgs) -> ExitCode {
    let settings = match settings() {
        Ok(s) => s,
        Err(code) => return code,
    };
    let Some(rt) = runtime() else { return ExitCode::FAILURE };
    rt.block_on(async {
        let pool = match store::connect(&settings.database_url).await {
            Ok(p) => p,
            Err(e) => {
                eprintln!("parley seed: {e}");
                return ExitCode::FAILURE;
            }
        };
        if let Err(e) = store::migrate(&pool).await {
            eprintln!("parley seed: {e}");
            return ExitCode::FAILURE;
        }
        let store = PgStore::new(pool);
        let result = match (args.tenant, args.phone_number_id) {
            (None, None) => match store.seed_defaults().await {
                Ok(report) => {
                    // The demo tenant answers questions from a small sample knowledge base.
                    let events = std::sync::Arc::new(engine::events::JsonLinesSink::new(
                        Box::new(std::io::stderr()),
                        engine::events::Level::Warn,
                    ));
                    let embedder = match parley::providers::build(&settings, events) {
                        Ok(p) => p.embedder,
                        Err(e) => {
                            eprintln!("parley seed: {e}");
                            return ExitCode::FAILURE;
                        }
                    };
                    match parley::knowledge::seed_sample(&store, embedder.as_ref(), report.demo.tenant_id).await {
                        Ok(outcomes) => {
                            for (name, outcome) in outcomes {
                                eprintln!("sample knowledge {name}: {}", outcome.summary());
                            }
                        }
                        Err(e) => {
                            eprintln!("parley seed: cannot load the sample knowledge: {e}");
                            return ExitCode::FAILURE;
                        }
                    }
                    Ok(serde_json::to_value(report).unwrap_or_default())
                }
                Err(e) => Err(e),
            },
            (Some(name), Some(phone_number_id)) => {
                let req = SeedTenant {
                    name,
                    phone_number_id,
                    plan: args.plan,
                    monthly_messages: args.monthly_messages,
                    provider: args.provider.unwrap_or_else(|| settings.whatsapp_provider.as_str().to_owned()),
                };
                store.seed_tenant(&req).await.map(|r| serde_json::to_value(r).unwrap_or_default())
            }
            _ => {
                eprintln!("parley seed: --tenant and --phone-number-id go together");
                return ExitCode::from(2);
            }
        };
        match result {
            Ok(json) => {
                println!("{}", serde_json::to_string_pretty(&json).unwrap_or_default());
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("parley seed: {e}");
                ExitCode::FAILURE
            }
        }
    })
}
