//! Bearer JWTs for the admin APIs: minting (`parley token`) and verification (HS256 with
//! JWT_SECRET, `exp` required), and the role check that the admin endpoints run.
//!
//! Claims: `sub` (who), `role` (`admin`, `super-admin`, or anything else, which the admin API
//! refuses with 403), `tenant` (the tenant an admin is scoped to; absent for a super-admin),
//! `iat` and `exp` (Unix seconds).

use std::time::Duration;

use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation, errors::ErrorKind};
use poem_openapi::{SecurityScheme, auth::Bearer};
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};

pub const ROLE_ADMIN: &str = "admin";
pub const ROLE_SUPER_ADMIN: &str = "super-admin";
/// The roles allowed on `/api/v1/admin/*`.
pub const ADMIN_ROLES: &[&str] = &[ROLE_ADMIN, ROLE_SUPER_ADMIN];

/// The subject of tokens minted by `parley token`.
pub const CLI_SUBJECT: &str = "parley-cli";

/// Tolerated clock skew between the machine that minted a token and the one checking it.
const LEEWAY_SECONDS: u64 = 30;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    pub sub: String,
    pub role: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenant: Option<String>,
    #[serde(default)]
    pub iat: u64,
    pub exp: u64,
}

impl Claims {
    /// Claims valid from now for `ttl`.
    pub fn new(sub: &str, role: &str, tenant: Option<&str>, ttl: Duration) -> Self {
        let now = jsonwebtoken::get_current_timestamp();
        Self {
            sub: sub.to_owned(),
            role: role.to_owned(),
            tenant: tenant.map(str::to_owned),
            iat: now,
            exp: now.saturating_add(ttl.as_secs()),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error("the role must not be empty")]
    EmptyRole,
    #[error("the lifetime must be at least one second")]
    NoLifetime,
    #[error("cannot sign the token: {0}")]
    Sign(#[from] jsonwebtoken::errors::Error),
}

/// Mints a token for `role` (and `tenant`), valid for `ttl`: what `parley token` prints.
pub fn mint_token(
    secret: &SecretString,
    role: &str,
    tenant: Option<&str>,
    ttl: Duration,
) -> Result<String, TokenError> {
    if role.trim().is_empty() {
        return Err(TokenError::EmptyRole);
    }
    if ttl.as_secs() == 0 {
        return Err(TokenError::NoLifetime);
    }
    sign(secret, &Claims::new(CLI_SUBJECT, role.trim(), tenant, ttl))
}

/// Signs any claims (HS256).
pub fn sign(secret: &SecretString, claims: &Claims) -> Result<String, TokenError> {
    let key = EncodingKey::from_secret(secret.expose_secret().as_bytes());
    Ok(jsonwebtoken::encode(&Header::new(Algorithm::HS256), claims, &key)?)
}

/// Why a request was not let in. The texts are the `error` of the answer: short, and never the
/// token or the secret.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthFailure {
    #[error("missing bearer token")]
    Missing,
    #[error("token expired")]
    Expired,
    #[error("invalid token")]
    Invalid,
    #[error("role `{0}` may not use this endpoint")]
    Forbidden(String),
    #[error("this endpoint needs a token scoped to a tenant: mint one with `parley token --role admin --tenant ID`")]
    NoTenant,
}

impl AuthFailure {
    /// 401 for a missing, invalid or expired token; 403 for a valid token of the wrong role.
    pub fn is_forbidden(&self) -> bool {
        matches!(self, Self::Forbidden(_) | Self::NoTenant)
    }
}

/// Verifies a token: signature, algorithm, `exp` (and `nbf` when present).
pub fn verify_token(secret: &SecretString, token: &str) -> Result<Claims, AuthFailure> {
    let mut validation = Validation::new(Algorithm::HS256);
    validation.leeway = LEEWAY_SECONDS;
    validation.validate_nbf = true;
    validation.set_required_spec_claims(&["exp", "sub"]);
    let key = DecodingKey::from_secret(secret.expose_secret().as_bytes());
    match jsonwebtoken::decode::<Claims>(token, &key, &validation) {
        Ok(data) => Ok(data.claims),
        Err(e) if matches!(e.kind(), ErrorKind::ExpiredSignature) => Err(AuthFailure::Expired),
        Err(_) => Err(AuthFailure::Invalid),
    }
}

/// `Authorization: Bearer <JWT>`, as the OpenAPI document describes it.
#[derive(SecurityScheme)]
#[oai(ty = "bearer", bearer_format = "JWT")]
pub struct JwtBearer(pub Bearer);

/// The bearer token of a request, or its absence: endpoints decide between 401 and 403 themselves
/// and answer in JSON, rather than leaving a missing header to the framework's plain-text 401.
#[derive(SecurityScheme)]
pub enum BearerAuth {
    Jwt(JwtBearer),
    #[oai(fallback)]
    Missing,
}

/// Verifies the request's token and that its role is one of `roles`.
pub fn authorize(secret: &SecretString, auth: &BearerAuth, roles: &[&str]) -> Result<Claims, AuthFailure> {
    let BearerAuth::Jwt(JwtBearer(bearer)) = auth else {
        return Err(AuthFailure::Missing);
    };
    let claims = verify_token(secret, &bearer.token)?;
    if roles.contains(&claims.role.as_str()) { Ok(claims) } else { Err(AuthFailure::Forbidden(claims.role)) }
}

/// [`authorize`], and the token must name its tenant (`tenant` claim): the tenant's id or name.
pub fn authorize_tenant(
    secret: &SecretString,
    auth: &BearerAuth,
    roles: &[&str],
) -> Result<(Claims, String), AuthFailure> {
    let claims = authorize(secret, auth, roles)?;
    match claims.tenant.as_deref().map(str::trim) {
        Some(tenant) if !tenant.is_empty() => {
            let tenant = tenant.to_owned();
            Ok((claims, tenant))
        }
        _ => Err(AuthFailure::NoTenant),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secret() -> SecretString {
        SecretString::from("0123456789abcdef0123456789abcdef-test".to_owned())
    }

    fn bearer(token: String) -> BearerAuth {
        BearerAuth::Jwt(JwtBearer(Bearer { token }))
    }

    #[test]
    fn a_minted_admin_token_verifies_with_its_claims() {
        let token = mint_token(&secret(), "admin", Some("tenant-1"), Duration::from_secs(3600)).unwrap();
        let claims = verify_token(&secret(), &token).unwrap();
        assert_eq!(claims.role, "admin");
        assert_eq!(claims.tenant.as_deref(), Some("tenant-1"));
        assert_eq!(claims.sub, CLI_SUBJECT);
        assert_eq!(claims.exp - claims.iat, 3600);
        assert!(authorize(&secret(), &bearer(token), ADMIN_ROLES).is_ok());
    }

    #[test]
    fn expired_forged_and_missing_tokens_are_unauthorized() {
        let mut old = Claims::new("someone", "admin", None, Duration::from_secs(60));
        old.exp = old.iat.saturating_sub(3600);
        let expired = sign(&secret(), &old).unwrap();
        assert_eq!(verify_token(&secret(), &expired), Err(AuthFailure::Expired));

        let other = SecretString::from("another-secret-of-at-least-32-characters".to_owned());
        let forged = mint_token(&other, "admin", None, Duration::from_secs(60)).unwrap();
        assert_eq!(verify_token(&secret(), &forged), Err(AuthFailure::Invalid));
        assert_eq!(verify_token(&secret(), "not.a.jwt"), Err(AuthFailure::Invalid));
        assert_eq!(authorize(&secret(), &BearerAuth::Missing, ADMIN_ROLES), Err(AuthFailure::Missing));
    }

    #[test]
    fn a_valid_token_of_another_role_is_forbidden() {
        let token = mint_token(&secret(), "user", None, Duration::from_secs(60)).unwrap();
        let failure = authorize(&secret(), &bearer(token), ADMIN_ROLES).unwrap_err();
        assert!(failure.is_forbidden());
        assert_eq!(failure.to_string(), "role `user` may not use this endpoint");
    }

    #[test]
    fn a_tenant_endpoint_refuses_a_token_without_tenant_with_the_fix() {
        let without = mint_token(&secret(), "admin", None, Duration::from_secs(60)).unwrap();
        let failure = authorize_tenant(&secret(), &bearer(without), ADMIN_ROLES).unwrap_err();
        assert!(failure.is_forbidden());
        assert!(failure.to_string().contains("parley token --role admin --tenant ID"), "{failure}");
        let with = mint_token(&secret(), "admin", Some("Boutique"), Duration::from_secs(60)).unwrap();
        assert_eq!(authorize_tenant(&secret(), &bearer(with), ADMIN_ROLES).unwrap().1, "Boutique");
    }

    #[test]
    fn minting_refuses_an_empty_role_or_no_lifetime() {
        assert!(matches!(mint_token(&secret(), " ", None, Duration::from_secs(60)), Err(TokenError::EmptyRole)));
        assert!(matches!(mint_token(&secret(), "admin", None, Duration::ZERO), Err(TokenError::NoLifetime)));
    }
}
