//! The admin API of a running server (`admin_listen`), for `tickgate admin`: revoke a
//! subject or a token id, list the stream connections. Every call carries a token with the
//! `tickgate:admin` scope; the server's answer is returned as it came (JSON).

use std::time::Duration;

use serde_json::Value;

use super::ClientError;

/// Most connections [`AdminClient::connections`] collects, whatever the server holds: a
/// listing is for reading, and pages beyond this are left on the server.
pub const MAX_LISTED: usize = 100_000;

/// What is revoked.
#[derive(Debug, Clone)]
pub enum RevokeTarget {
    /// Every token of this subject.
    Sub(String),
    /// The token with this `jti`.
    Jti(String),
}

/// A client of one server's admin listener.
#[derive(Debug, Clone)]
pub struct AdminClient {
    base: String,
    token: String,
    http: reqwest::Client,
}

impl AdminClient {
    /// For the admin listener at `base` (`http://127.0.0.1:8081`) with an admin token.
    pub fn new(base: &str, token: &str) -> Result<AdminClient, ClientError> {
        let http = reqwest::Client::builder().timeout(Duration::from_secs(30)).build()?;
        Ok(AdminClient { base: base.trim_end_matches('/').to_owned(), token: token.to_owned(), http })
    }

    /// `POST /admin/revoke`: the server's answer (`streams_closed`, `cluster`, ...).
    pub async fn revoke(&self, target: &RevokeTarget) -> Result<Value, ClientError> {
        let body = match target {
            RevokeTarget::Sub(s) => serde_json::json!({ "sub": s }),
            RevokeTarget::Jti(j) => serde_json::json!({ "jti": j }),
        };
        let r =
            self.http.post(format!("{}/admin/revoke", self.base)).bearer_auth(&self.token).json(&body).send().await?;
        answer(r).await
    }

    /// `GET /admin/connections`, every page (at most [`MAX_LISTED`] entries), in session order.
    pub async fn connections(&self) -> Result<Vec<Value>, ClientError> {
        let mut all = Vec::new();
        let mut after: Option<String> = None;
        loop {
            let mut url = format!("{}/admin/connections?limit=1000", self.base);
            if let Some(a) = &after {
                url.push_str("&after=");
                url.push_str(&percent_encode(a));
            }
            let page = answer(self.http.get(url).bearer_auth(&self.token).send().await?).await?;
            if let Some(items) = page.get("connections").and_then(Value::as_array) {
                all.extend(items.iter().cloned());
            }
            after = page.get("next").and_then(Value::as_str).map(str::to_owned);
            if after.is_none() || all.len() >= MAX_LISTED {
                all.truncate(MAX_LISTED);
                return Ok(all);
            }
        }
    }
}

/// A 2xx answer's JSON, or the refusal as [`ClientError::AdminRefused`] (status and body).
async fn answer(r: reqwest::Response) -> Result<Value, ClientError> {
    let status = r.status();
    let text = r.text().await?;
    if !status.is_success() {
        return Err(ClientError::AdminRefused { status: status.as_u16(), body: text });
    }
    serde_json::from_str(&text).map_err(|e| ClientError::Control(format!("admin answer is not JSON: {e}")))
}

/// `s` as a query value: unreserved characters as they are, every other byte `%XX`.
fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn query_values_are_percent_encoded() {
        assert_eq!(super::percent_encode("s-1_a.b~"), "s-1_a.b~");
        assert_eq!(super::percent_encode("a b&c=d/é"), "a%20b%26c%3Dd%2F%C3%A9");
    }
}
