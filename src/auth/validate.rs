//! Access token validation (RFC 8725, RFC 9068). Runs once per handshake (and per in-band
//! refresh), never on the delivery path.
//!
//! The header is parsed by hand before any signature work so that the algorithm comes
//! from the *key* (pinned in the key cache), never from the token alone, and so that
//! `crit`, `none`, HMAC algorithms and oversized input are refused before they cost
//! anything. `jku`, `x5u` and an embedded `jwk` are never followed.

use std::sync::Arc;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, Validation};
use serde::Deserialize;
use thiserror::Error;

use super::failure::AuthFailure;
use super::jwks::JwksCache;
use super::keys::{alg_str, KeyStore};
use super::revocation::RevocationList;
use super::scopes::{split_scope, Entitlements};

/// Algorithms accepted with asymmetric keys. `none` and HS* never are.
pub const ALLOWED_ALGS: [Algorithm; 5] =
    [Algorithm::RS256, Algorithm::PS256, Algorithm::ES256, Algorithm::ES384, Algorithm::EdDSA];

/// Why a token was refused. Each variant has a stable metric `reason` label and a
/// precise `error_description`; none of them ever includes the token.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum AuthError {
    /// No token at all.
    #[error("no access token presented")]
    Missing,
    /// Longer than the configured maximum.
    #[error("token larger than {0} bytes")]
    TooLarge(usize),
    /// Not three base64url segments, or an unreadable header.
    #[error("malformed token: {0}")]
    Malformed(&'static str),
    /// `alg` outside the allowlist.
    #[error("algorithm {0} is not allowed")]
    AlgNotAllowed(String),
    /// `crit` header present.
    #[error("critical header parameters are not supported")]
    Crit,
    /// Wrong `typ`.
    #[error("token type must be {0}")]
    BadTyp(String),
    /// No `kid` header.
    #[error("token has no kid")]
    MissingKid,
    /// `kid` not in the key set.
    #[error("unknown signing key")]
    UnknownKid,
    /// Header `alg` differs from the key's algorithm.
    #[error("algorithm does not match the signing key")]
    AlgMismatch,
    /// Signature does not verify.
    #[error("signature verification failed")]
    BadSignature,
    /// Its deadline (`exp` + `auth.expiry_grace_ms`, in milliseconds) has passed.
    #[error("token expired")]
    Expired,
    /// Before `nbf` (- leeway).
    #[error("token not yet valid")]
    NotYetValid,
    /// `iat` further in the future than the leeway: the issuer's clock (or the token) is
    /// wrong, and a lifetime measured from it would be too generous.
    #[error("token issued in the future")]
    IatInFuture,
    /// Wrong issuer.
    #[error("wrong issuer")]
    WrongIssuer,
    /// Wrong audience.
    #[error("wrong audience")]
    WrongAudience,
    /// A required claim is absent.
    #[error("missing claim {0}")]
    MissingClaim(String),
    /// A claim has the wrong JSON type.
    #[error("invalid claims: {0}")]
    BadClaims(String),
    /// `exp - min(iat, now)` exceeds the maximum lifetime.
    #[error("token lifetime exceeds {0} s")]
    LifetimeTooLong(u64),
    /// Revoked `jti` or subject.
    #[error("token revoked")]
    Revoked,
}

impl AuthError {
    /// The `reason` label of `tickgate_auth_failures_total`.
    pub fn reason(&self) -> AuthFailure {
        match self {
            AuthError::Missing => AuthFailure::Missing,
            AuthError::TooLarge(_) => AuthFailure::TooLarge,
            AuthError::Malformed(_) => AuthFailure::Malformed,
            AuthError::AlgNotAllowed(_) => AuthFailure::AlgNotAllowed,
            AuthError::Crit => AuthFailure::Crit,
            AuthError::BadTyp(_) => AuthFailure::BadTyp,
            AuthError::MissingKid => AuthFailure::MissingKid,
            AuthError::UnknownKid => AuthFailure::UnknownKid,
            AuthError::AlgMismatch => AuthFailure::AlgMismatch,
            AuthError::BadSignature => AuthFailure::BadSignature,
            AuthError::Expired => AuthFailure::Expired,
            AuthError::NotYetValid => AuthFailure::NotYetValid,
            AuthError::IatInFuture => AuthFailure::IatInFuture,
            AuthError::WrongIssuer => AuthFailure::WrongIss,
            AuthError::WrongAudience => AuthFailure::WrongAud,
            AuthError::MissingClaim(_) => AuthFailure::MissingClaim,
            AuthError::BadClaims(_) => AuthFailure::BadClaims,
            AuthError::LifetimeTooLong(_) => AuthFailure::LifetimeTooLong,
            AuthError::Revoked => AuthFailure::Revoked,
        }
    }
}

/// The validated identity of a connection, decoded once.
#[derive(Debug, Clone)]
pub struct Principal {
    /// `sub`.
    pub sub: String,
    /// `iss`.
    pub iss: String,
    /// `jti`, when present.
    pub jti: Option<String>,
    /// `client_id`, when present.
    pub client_id: Option<String>,
    /// `exp` (seconds since the epoch).
    pub exp: u64,
    /// `iat`, when present.
    pub iat: Option<u64>,
    /// Decoded scopes.
    pub entitlements: Entitlements,
}

impl Principal {
    /// A principal no token stands behind: reads every feed and never expires. What a
    /// benchmark-only `--insecure-no-auth` server gives each stream, and what in-memory
    /// benches and tests give the connections they add to a shard core.
    pub fn unauthenticated(sub: &str, iss: &str) -> Principal {
        Principal {
            sub: sub.to_owned(),
            iss: iss.to_owned(),
            jti: None,
            client_id: None,
            exp: u64::MAX,
            iat: None,
            entitlements: Entitlements::from_scopes(["md:read:*"]),
        }
    }
}

#[derive(Deserialize)]
struct RawHeader {
    alg: Option<serde_json::Value>,
    typ: Option<serde_json::Value>,
    kid: Option<serde_json::Value>,
    crit: Option<serde_json::Value>,
}

/// The claims this server reads, taken from the validated JSON object. jsonwebtoken
/// checks presence of the required claims first (so a missing one is `missing_claim`);
/// the types are checked here (a wrong one is `bad_claims`).
struct Claims {
    sub: String,
    iss: String,
    exp: u64,
    nbf: Option<u64>,
    iat: Option<u64>,
    jti: Option<String>,
    client_id: Option<String>,
    scope: Option<String>,
    scp: Option<Vec<String>>,
}

impl Claims {
    fn from_value(v: &serde_json::Value) -> Result<Claims, AuthError> {
        let bad = |c: &str| AuthError::BadClaims(format!("{c} has the wrong type"));
        let string = |k: &str| -> Result<Option<String>, AuthError> {
            match v.get(k) {
                None | Some(serde_json::Value::Null) => Ok(None),
                Some(serde_json::Value::String(s)) => Ok(Some(s.clone())),
                Some(_) => Err(bad(k)),
            }
        };
        let number = |k: &str| -> Result<Option<u64>, AuthError> {
            match v.get(k) {
                None | Some(serde_json::Value::Null) => Ok(None),
                Some(n) => n.as_u64().map(Some).ok_or_else(|| bad(k)),
            }
        };
        let missing = |k: &str| AuthError::MissingClaim(k.to_owned());
        let scp = match v.get("scp") {
            None | Some(serde_json::Value::Null) => None,
            Some(serde_json::Value::Array(a)) => Some(
                a.iter().map(|x| x.as_str().map(str::to_owned).ok_or_else(|| bad("scp"))).collect::<Result<_, _>>()?,
            ),
            Some(_) => return Err(bad("scp")),
        };
        Ok(Claims {
            sub: string("sub")?.ok_or_else(|| missing("sub"))?,
            iss: string("iss")?.ok_or_else(|| missing("iss"))?,
            exp: number("exp")?.ok_or_else(|| missing("exp"))?,
            nbf: number("nbf")?,
            iat: number("iat")?,
            jti: string("jti")?,
            client_id: string("client_id")?,
            scope: string("scope")?,
            scp,
        })
    }
}

/// The time rules of a token, all in milliseconds of the wall clock.
///
/// - `exp`: refused once `exp * 1000 + expiry_grace_ms` (the *deadline*, the same instant a
///   live connection is closed with 4001) is reached; the leeway does not apply to it.
/// - `nbf`, `iat`: refused when more than `leeway_s` in the future (clock skew between the
///   issuer and this server).
/// - lifetime: `exp - min(iat, now)` must not exceed `max_lifetime_s` (without `iat`,
///   `exp - now`), so a future `iat` within the leeway cannot stretch it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TimeRules {
    /// Clock-skew slack for `nbf` and `iat`, seconds.
    pub leeway_s: u64,
    /// Slack after `exp`, milliseconds.
    pub expiry_grace_ms: u64,
    /// Longest accepted lifetime, seconds.
    pub max_lifetime_s: u64,
}

impl TimeRules {
    /// The rules of an `[auth]` section.
    pub fn from_config(auth: &crate::config::AuthConfig) -> TimeRules {
        TimeRules {
            leeway_s: auth.leeway_s,
            expiry_grace_ms: auth.expiry_grace_ms,
            max_lifetime_s: auth.max_lifetime_s,
        }
    }

    /// The instant (ms since the epoch) after which a token with this `exp` is dead.
    pub fn deadline_ms(&self, exp: u64) -> u64 {
        exp.saturating_mul(1000).saturating_add(self.expiry_grace_ms)
    }

    /// Whether a token with this `exp` is dead at `now_ms`.
    pub fn is_past_deadline(&self, exp: u64, now_ms: u64) -> bool {
        now_ms >= self.deadline_ms(exp)
    }

    /// Checks `exp`, `nbf`, `iat` and the lifetime at `now_ms`.
    pub fn check(&self, exp: u64, nbf: Option<u64>, iat: Option<u64>, now_ms: u64) -> Result<(), AuthError> {
        if self.is_past_deadline(exp, now_ms) {
            return Err(AuthError::Expired);
        }
        let horizon_ms = now_ms.saturating_add(self.leeway_s.saturating_mul(1000));
        if nbf.is_some_and(|n| n.saturating_mul(1000) > horizon_ms) {
            return Err(AuthError::NotYetValid);
        }
        if iat.is_some_and(|i| i.saturating_mul(1000) > horizon_ms) {
            return Err(AuthError::IatInFuture);
        }
        let now_s = now_ms / 1000;
        let issued = iat.map_or(now_s, |i| i.min(now_s));
        if exp.saturating_sub(issued) > self.max_lifetime_s {
            return Err(AuthError::LifetimeTooLong(self.max_lifetime_s));
        }
        Ok(())
    }
}

/// Milliseconds since the epoch, by the wall clock.
fn now_ms() -> u64 {
    tickgate_proto::now_ns() / 1_000_000
}

/// Validation settings plus the key cache.
#[derive(Debug, Clone)]
pub struct Validator {
    keys: Arc<KeyStore>,
    /// Asked for a refetch when a token names an unknown `kid` (external issuer only).
    jwks: Option<Arc<JwksCache>>,
    revocations: Arc<RevocationList>,
    issuer: String,
    audience: String,
    times: TimeRules,
    max_token_bytes: usize,
    required_typ: String,
}

impl Validator {
    /// A validator for tokens of `issuer` meant for `audience`.
    pub fn new(keys: Arc<KeyStore>, issuer: String, audience: String, auth: &crate::config::AuthConfig) -> Validator {
        // A revocation must outlive every token it can refuse: one issued (by its `iat`, up
        // to the leeway ahead) now lives at most `max_lifetime_s`, plus the grace after exp.
        let remember_s = auth.max_lifetime_s + auth.leeway_s + auth.expiry_grace_ms.div_ceil(1000);
        let revocations = Arc::new(RevocationList::new(auth.max_revocations, remember_s));
        Validator {
            keys,
            jwks: None,
            revocations,
            issuer,
            audience,
            times: TimeRules::from_config(auth),
            max_token_bytes: auth.max_token_bytes,
            required_typ: auth.required_typ.clone(),
        }
    }

    /// Makes [`Validator::validate_async`] wait for a refetch of this JWKS cache when a
    /// token names a `kid` the cache does not hold.
    pub fn with_jwks(mut self, jwks: Arc<JwksCache>) -> Validator {
        self.jwks = Some(jwks);
        self
    }

    /// The time rules applied to every token.
    pub fn times(&self) -> &TimeRules {
        &self.times
    }

    /// Validates like [`Validator::validate`], except that a token with an unknown `kid`
    /// waits (at most `issuer.jwks_timeout_ms`) for the one shared refetch of the JWKS and
    /// is validated again against the new set: an issuer that starts signing with a key it
    /// published after our last fetch is accepted on first use. When an unknown-kid
    /// refetch already ran within `issuer.jwks_cooldown_s`, it is refused at once. Tokens
    /// with a known `kid` never wait.
    pub async fn validate_async(&self, token: &str) -> Result<Principal, AuthError> {
        match self.validate(token) {
            Err(AuthError::UnknownKid) => match &self.jwks {
                Some(jwks) if jwks.refetch_for_unknown_kid().await => self.validate(token),
                _ => Err(AuthError::UnknownKid),
            },
            other => other,
        }
    }

    /// The revocation list consulted after every successful validation.
    pub fn revocations(&self) -> &Arc<RevocationList> {
        &self.revocations
    }

    /// The key cache this validator reads.
    pub fn keys(&self) -> &Arc<KeyStore> {
        &self.keys
    }

    /// The expected issuer.
    pub fn issuer(&self) -> &str {
        &self.issuer
    }

    /// Validates a compact JWS access token.
    pub fn validate(&self, token: &str) -> Result<Principal, AuthError> {
        if token.is_empty() {
            return Err(AuthError::Missing);
        }
        if token.len() > self.max_token_bytes {
            return Err(AuthError::TooLarge(self.max_token_bytes));
        }
        let mut parts = token.split('.');
        let (Some(h), Some(p), Some(sig), None) = (parts.next(), parts.next(), parts.next(), parts.next()) else {
            return Err(AuthError::Malformed("expected three dot-separated segments"));
        };
        let b64 = |seg: &str| seg.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
        if h.is_empty() || !b64(h) {
            return Err(AuthError::Malformed("header must be non-empty base64url"));
        }
        let header_json = URL_SAFE_NO_PAD.decode(h).map_err(|_| AuthError::Malformed("header is not base64url"))?;
        let header: RawHeader =
            serde_json::from_slice(&header_json).map_err(|_| AuthError::Malformed("header is not a JSON object"))?;
        if header.crit.is_some() {
            return Err(AuthError::Crit);
        }
        let alg_name = match &header.alg {
            Some(serde_json::Value::String(a)) => a.as_str(),
            _ => return Err(AuthError::Malformed("header alg must be a string")),
        };
        let alg = ALLOWED_ALGS
            .iter()
            .copied()
            .find(|a| alg_name == alg_str(*a))
            .ok_or_else(|| AuthError::AlgNotAllowed(sanitize(alg_name)))?;
        if !self.required_typ.is_empty() {
            let ok = match &header.typ {
                Some(serde_json::Value::String(t)) => typ_matches(t, &self.required_typ),
                _ => false,
            };
            if !ok {
                return Err(AuthError::BadTyp(self.required_typ.clone()));
            }
        }
        // Only now the other segments: an `alg: none` token with an empty signature is
        // reported as the algorithm attack it is, not as a formatting problem.
        if p.is_empty() || sig.is_empty() || !b64(p) || !b64(sig) {
            return Err(AuthError::Malformed("payload and signature must be non-empty base64url"));
        }
        let kid = match &header.kid {
            Some(serde_json::Value::String(k)) => k.as_str(),
            None => return Err(AuthError::MissingKid),
            _ => return Err(AuthError::Malformed("header kid must be a string")),
        };
        let Some(key) = self.keys.get(kid) else {
            return Err(AuthError::UnknownKid);
        };
        if key.alg != alg {
            return Err(AuthError::AlgMismatch);
        }

        let mut v = Validation::new(alg);
        // The times are checked below, in milliseconds ([`TimeRules`]): jsonwebtoken's
        // whole-second check would accept a token up to a second past `exp`, and would
        // apply the clock-skew leeway to `exp` too.
        v.validate_nbf = false;
        v.validate_exp = false;
        v.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);
        v.set_issuer(&[self.issuer.as_str()]);
        v.set_audience(&[self.audience.as_str()]);
        let data = jsonwebtoken::decode::<serde_json::Value>(token, &key.key, &v).map_err(|e| {
            // jsonwebtoken reports a required claim of the wrong type (`"exp": "123"`) as
            // missing. The signature is verified by then, so look at the payload to tell
            // the two apart.
            if let ErrorKind::MissingRequiredClaim(c) = e.kind() {
                let present = URL_SAFE_NO_PAD
                    .decode(p)
                    .ok()
                    .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
                    .is_some_and(|v| v.get(c).is_some_and(|x| !x.is_null()));
                if present {
                    return AuthError::BadClaims(format!("{} has the wrong type", sanitize(c)));
                }
            }
            map_jwt_error(e)
        })?;
        if !data.claims.is_object() {
            return Err(AuthError::BadClaims("claims must be a JSON object".into()));
        }
        let c = Claims::from_value(&data.claims)?;

        let now_ms = now_ms();
        self.times.check(c.exp, c.nbf, c.iat, now_ms)?;
        let now = now_ms / 1000;
        let entitlements = match (&c.scope, &c.scp) {
            (Some(s), _) => Entitlements::from_scopes(split_scope(s)),
            (None, Some(list)) => Entitlements::from_scopes(list.iter().map(String::as_str)),
            (None, None) => Entitlements::default(),
        };
        if self.revocations.is_revoked(&c.sub, c.jti.as_deref(), c.iat, now) {
            return Err(AuthError::Revoked);
        }
        Ok(Principal {
            sub: c.sub,
            iss: c.iss,
            jti: c.jti,
            client_id: c.client_id,
            exp: c.exp,
            iat: c.iat,
            entitlements,
        })
    }
}

/// RFC 9068 allows `at+jwt` and its full media type `application/at+jwt`, case-insensitive.
fn typ_matches(typ: &str, required: &str) -> bool {
    let t = typ.strip_prefix("application/").unwrap_or(typ);
    let r = required.strip_prefix("application/").unwrap_or(required);
    t.eq_ignore_ascii_case(r)
}

/// A short, printable excerpt of attacker-controlled text for an error description.
fn sanitize(s: &str) -> String {
    s.chars().take(16).filter(|c| c.is_ascii_alphanumeric() || *c == '-' || *c == '_').collect()
}

fn map_jwt_error(e: jsonwebtoken::errors::Error) -> AuthError {
    match e.kind() {
        ErrorKind::InvalidSignature => AuthError::BadSignature,
        ErrorKind::ExpiredSignature => AuthError::Expired,
        ErrorKind::ImmatureSignature => AuthError::NotYetValid,
        ErrorKind::InvalidIssuer => AuthError::WrongIssuer,
        ErrorKind::InvalidAudience => AuthError::WrongAudience,
        ErrorKind::MissingRequiredClaim(c) => AuthError::MissingClaim(sanitize(c)),
        ErrorKind::InvalidClaimFormat(c) => AuthError::BadClaims(sanitize(c)),
        ErrorKind::Json(_) => AuthError::BadClaims("claims do not match the access token schema".into()),
        ErrorKind::Base64(_) | ErrorKind::Utf8(_) | ErrorKind::InvalidToken => {
            AuthError::Malformed("undecodable segment")
        }
        ErrorKind::InvalidAlgorithm | ErrorKind::MissingAlgorithm => AuthError::AlgMismatch,
        _ => AuthError::BadSignature,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const RULES: TimeRules = TimeRules { leeway_s: 30, expiry_grace_ms: 0, max_lifetime_s: 3600 };
    const NOW_S: u64 = 1_800_000_000;
    const NOW_MS: u64 = NOW_S * 1000 + 500;

    #[test]
    fn exp_is_checked_in_milliseconds_without_leeway() {
        // 5 s past exp with a 30 s leeway: expired (the leeway is for nbf/iat only).
        assert_eq!(RULES.check(NOW_S - 5, None, None, NOW_MS), Err(AuthError::Expired));
        // exp = the current second, 500 ms into it: expired (no whole-second rounding).
        assert_eq!(RULES.check(NOW_S, None, None, NOW_MS), Err(AuthError::Expired));
        // Exactly at the deadline: expired; one ms before: valid.
        assert_eq!(RULES.check(NOW_S, None, None, NOW_S * 1000), Err(AuthError::Expired));
        assert_eq!(RULES.check(NOW_S, None, None, NOW_S * 1000 - 1), Ok(()));
        assert_eq!(RULES.check(NOW_S + 1, None, None, NOW_MS), Ok(()));
    }

    #[test]
    fn grace_extends_the_deadline_in_milliseconds() {
        let r = TimeRules { expiry_grace_ms: 2_000, ..RULES };
        assert_eq!(r.deadline_ms(NOW_S), NOW_S * 1000 + 2_000);
        assert_eq!(r.check(NOW_S - 1, None, None, NOW_MS), Ok(()), "1.5 s past exp, within 2 s grace");
        assert_eq!(r.check(NOW_S - 2, None, None, NOW_MS), Err(AuthError::Expired), "2.5 s past exp");
        assert!(!r.is_past_deadline(NOW_S, NOW_S * 1000 + 1_999));
        assert!(r.is_past_deadline(NOW_S, NOW_S * 1000 + 2_000));
        assert!(!r.is_past_deadline(u64::MAX, NOW_MS), "saturates instead of wrapping");
    }

    #[test]
    fn nbf_and_iat_get_the_leeway() {
        let exp = NOW_S + 600;
        assert_eq!(RULES.check(exp, Some(NOW_S + 30), None, NOW_MS), Ok(()));
        assert_eq!(RULES.check(exp, Some(NOW_S + 31), None, NOW_MS), Err(AuthError::NotYetValid));
        assert_eq!(RULES.check(exp, None, Some(NOW_S + 30), NOW_MS), Ok(()));
        assert_eq!(RULES.check(exp, None, Some(NOW_S + 31), NOW_MS), Err(AuthError::IatInFuture));
        let strict = TimeRules { leeway_s: 0, ..RULES };
        assert_eq!(strict.check(exp, None, Some(NOW_S + 1), NOW_MS), Err(AuthError::IatInFuture));
        assert_eq!(strict.check(exp, None, Some(NOW_S), NOW_MS), Ok(()));
    }

    #[test]
    fn lifetime_is_measured_from_the_earlier_of_iat_and_now() {
        // iat in the future (within leeway) does not shorten the measured lifetime.
        assert_eq!(RULES.check(NOW_S + 3600, None, Some(NOW_S + 20), NOW_MS), Ok(()));
        assert_eq!(
            RULES.check(NOW_S + 3601, None, Some(NOW_S + 20), NOW_MS),
            Err(AuthError::LifetimeTooLong(3600)),
            "exp - iat is 3581 s, but exp - now is 3601 s"
        );
        // iat in the past: measured from iat.
        assert_eq!(RULES.check(NOW_S + 100, None, Some(NOW_S - 3500), NOW_MS), Ok(()));
        assert_eq!(RULES.check(NOW_S + 101, None, Some(NOW_S - 3500), NOW_MS), Err(AuthError::LifetimeTooLong(3600)));
        // No iat: measured from now.
        assert_eq!(RULES.check(NOW_S + 3600, None, None, NOW_MS), Ok(()));
        assert_eq!(RULES.check(NOW_S + 3601, None, None, NOW_MS), Err(AuthError::LifetimeTooLong(3600)));
    }

    #[test]
    fn every_reason_label_is_distinct() {
        assert_eq!(AuthError::IatInFuture.reason().as_str(), "iat_in_future");
        assert_eq!(AuthError::Expired.reason().as_str(), "expired");
    }
}
