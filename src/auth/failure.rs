//! Why a credential was refused: the `reason` label of `tickgate_auth_failures_total`,
//! owned here so the label values are written once. Token validation ([`AuthError`]
//! through [`AuthError::reason`]), ticket redemption and the in-band `auth` step (decided
//! by the server's connection task) all count through [`AuthFailure`]; `prime_metrics`
//! exports every value at zero.
//!
//! [`AuthError`]: super::validate::AuthError
//! [`AuthError::reason`]: super::validate::AuthError::reason

use crate::metrics::Metrics;

/// One `reason` label value of `tickgate_auth_failures_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AuthFailure {
    /// No token presented.
    Missing,
    /// The token is over the size limit.
    TooLarge,
    /// Not a well-formed JWT.
    Malformed,
    /// `alg` outside the allowlist.
    AlgNotAllowed,
    /// A `crit` header.
    Crit,
    /// Wrong `typ`.
    BadTyp,
    /// No `kid` header.
    MissingKid,
    /// `kid` not in the key set.
    UnknownKid,
    /// Header `alg` differs from the key's algorithm.
    AlgMismatch,
    /// The signature does not verify.
    BadSignature,
    /// The deadline (`exp` + grace) has passed.
    Expired,
    /// Before `nbf`.
    NotYetValid,
    /// `iat` in the future.
    IatInFuture,
    /// Wrong issuer.
    WrongIss,
    /// Wrong audience.
    WrongAud,
    /// A required claim is absent.
    MissingClaim,
    /// A claim has the wrong JSON type.
    BadClaims,
    /// The lifetime exceeds the maximum.
    LifetimeTooLong,
    /// The `jti` or subject is revoked.
    Revoked,
    /// A ticket that is unknown or already used.
    BadTicket,
    /// A ticket past its lifetime.
    TicketExpired,
    /// No in-band `auth` message in time.
    InbandTimeout,
    /// The first in-band message was not `auth`.
    InbandNotAuth,
}

impl AuthFailure {
    /// Every reason, in the order the label values are primed.
    pub const ALL: [AuthFailure; 23] = [
        AuthFailure::Missing,
        AuthFailure::TooLarge,
        AuthFailure::Malformed,
        AuthFailure::AlgNotAllowed,
        AuthFailure::Crit,
        AuthFailure::BadTyp,
        AuthFailure::MissingKid,
        AuthFailure::UnknownKid,
        AuthFailure::AlgMismatch,
        AuthFailure::BadSignature,
        AuthFailure::Expired,
        AuthFailure::NotYetValid,
        AuthFailure::IatInFuture,
        AuthFailure::WrongIss,
        AuthFailure::WrongAud,
        AuthFailure::MissingClaim,
        AuthFailure::BadClaims,
        AuthFailure::LifetimeTooLong,
        AuthFailure::Revoked,
        AuthFailure::BadTicket,
        AuthFailure::TicketExpired,
        AuthFailure::InbandTimeout,
        AuthFailure::InbandNotAuth,
    ];

    /// The metric label value.
    pub const fn as_str(self) -> &'static str {
        match self {
            AuthFailure::Missing => "missing",
            AuthFailure::TooLarge => "too_large",
            AuthFailure::Malformed => "malformed",
            AuthFailure::AlgNotAllowed => "alg_not_allowed",
            AuthFailure::Crit => "crit",
            AuthFailure::BadTyp => "bad_typ",
            AuthFailure::MissingKid => "missing_kid",
            AuthFailure::UnknownKid => "unknown_kid",
            AuthFailure::AlgMismatch => "alg_mismatch",
            AuthFailure::BadSignature => "bad_signature",
            AuthFailure::Expired => "expired",
            AuthFailure::NotYetValid => "not_yet_valid",
            AuthFailure::IatInFuture => "iat_in_future",
            AuthFailure::WrongIss => "wrong_iss",
            AuthFailure::WrongAud => "wrong_aud",
            AuthFailure::MissingClaim => "missing_claim",
            AuthFailure::BadClaims => "bad_claims",
            AuthFailure::LifetimeTooLong => "lifetime_too_long",
            AuthFailure::Revoked => "revoked",
            AuthFailure::BadTicket => "bad_ticket",
            AuthFailure::TicketExpired => "ticket_expired",
            AuthFailure::InbandTimeout => "inband_timeout",
            AuthFailure::InbandNotAuth => "inband_not_auth",
        }
    }

    /// Counts one failure.
    pub(crate) fn count(self, metrics: &Metrics) {
        metrics.auth_failures.with_label_values(&[self.as_str()]).inc();
    }
}

impl std::fmt::Display for AuthFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Exports `tickgate_auth_failures_total{reason}` at zero for every reason.
pub(crate) fn prime_metrics(metrics: &Metrics) {
    for r in AuthFailure::ALL {
        metrics.auth_failures.with_label_values(&[r.as_str()]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_are_distinct_and_snake_case() {
        let labels: std::collections::HashSet<&str> = AuthFailure::ALL.iter().map(|r| r.as_str()).collect();
        assert_eq!(labels.len(), AuthFailure::ALL.len());
        assert!(labels.iter().all(|l| l.chars().all(|c| c.is_ascii_lowercase() || c == '_')));
    }
}
