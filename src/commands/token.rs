//! `parley token`: mints a bearer JWT for the admin API, signed with JWT_SECRET. `--tenant` (an id
//! or a name) scopes it to a tenant, as the knowledge endpoints require.

use std::{process::ExitCode, time::Duration};

use parley::{http::auth::mint_token, settings::Settings};

pub fn run(role: &str, tenant: Option<&str>, ttl: Option<Duration>) -> ExitCode {
    let settings = match Settings::from_env() {
        Ok(s) => s,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(2);
        }
    };
    match mint_token(&settings.jwt_secret, role, tenant, ttl.unwrap_or(settings.jwt_expires_in)) {
        Ok(token) => {
            println!("{token}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("parley token: {e}");
            ExitCode::FAILURE
        }
    }
}
