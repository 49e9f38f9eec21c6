//! `parley simulate`: posts a correctly signed, Meta-shaped webhook for one text message and, with
//! the sandbox sender, waits for the reply and prints it.

use std::{process::ExitCode, time::Duration};

use parley::{
    settings::{Settings, WhatsAppProvider},
    store::{self, PgStore},
    whatsapp::{meta_signature, signature::META_SIGNATURE_HEADER},
};
use serde_json::json;

pub struct SimulateArgs {
    pub text: String,
    pub from: String,
    pub id: Option<String>,
    pub phone_number_id: String,
    pub url: Option<String>,
    pub timeout: Duration,
}

pub fn run(args: SimulateArgs) -> ExitCode {
    let settings = match Settings::from_env() {
        Ok(s) => s,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(2);
        }
    };
    let Ok(rt) = tokio::runtime::Builder::new_current_thread().enable_all().build() else {
        return ExitCode::FAILURE;
    };
    rt.block_on(simulate(settings, args))
}

async fn simulate(settings: Settings, args: SimulateArgs) -> ExitCode {
    let wamid = args.id.unwrap_or_else(|| format!("wamid.sim-{}", uuid::Uuid::now_v7()));
    let url = args.url.unwrap_or_else(|| format!("http://127.0.0.1:{}/api/v1/whatsapp/webhook", settings.port));
    let now = chrono::Utc::now().timestamp();
    let body = json!({
        "object": "whatsapp_business_account",
        "entry": [{
            "id": "PARLEY_SIMULATE",
            "changes": [{
                "field": "messages",
                "value": {
                    "messaging_product": "whatsapp",
                    "metadata": { "display_phone_number": "15550000000", "phone_number_id": args.phone_number_id },
                    "contacts": [{ "profile": { "name": "Simulation" }, "wa_id": args.from }],
                    "messages": [{
                        "from": args.from,
                        "id": wamid,
                        "timestamp": now.to_string(),
                        "type": "text",
                        "text": { "body": args.text }
                    }]
                }
            }]
        }]
    })
    .to_string();
    let mut request = reqwest::Client::new().post(&url).header("content-type", "application/json");
    if let Some(secret) = &settings.whatsapp_app_secret {
        request = request.header(META_SIGNATURE_HEADER, meta_signature(secret, body.as_bytes()));
    }
    let response = match request.body(body).send().await {
        Ok(r) => r,
        Err(e) => {
            eprintln!("parley simulate: cannot reach {url}: {e} (is `parley serve` running?)");
            return ExitCode::FAILURE;
        }
    };
    let status = response.status();
    let text = response.text().await.unwrap_or_default();
    if !status.is_success() {
        eprintln!("parley simulate: the webhook answered {status}: {text}");
        return ExitCode::FAILURE;
    }
    eprintln!("sent {wamid}: webhook answered {status} {text}");
    if settings.whatsapp_provider != WhatsAppProvider::Sandbox {
        eprintln!("(the reply goes out through {}; nothing to wait for here)", settings.whatsapp_provider.as_str());
        return ExitCode::SUCCESS;
    }
    let store = match store::connect(&settings.database_url).await {
        Ok(pool) => PgStore::new(pool),
        Err(e) => {
            eprintln!("parley simulate: cannot read the reply from PostgreSQL: {e}");
            return ExitCode::FAILURE;
        }
    };
    let deadline = tokio::time::Instant::now() + args.timeout;
    loop {
        match store.outbound_reply_to(&args.phone_number_id, &wamid).await {
            Ok(Some(reply)) if reply.status != "pending" => {
                if reply.status == "failed" {
                    eprintln!("parley simulate: the reply failed ({})", reply.error_code.unwrap_or_default());
                    return ExitCode::FAILURE;
                }
                println!("{}", reply.text);
                return ExitCode::SUCCESS;
            }
            Ok(_) => {}
            Err(e) => eprintln!("parley simulate: {e}"),
        }
        if tokio::time::Instant::now() >= deadline {
            eprintln!(
                "parley simulate: no reply within {}s (a duplicate id, a rate limit or quota notice already sent, or no worker running?)",
                args.timeout.as_secs()
            );
            return ExitCode::FAILURE;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
