//! Outgoing email (`[smtp]`), through lettre, and the one-use links it carries.
//!
//! A link's token is 32 random bytes (base62); the store keeps its SHA-256 only, and spends it
//! with one conditional update, so a link works once, until it expires, and a copy of the
//! database gives no working link. Sending happens in a task of its own: an answer never
//! waits on the SMTP server (nor tells by its time whether an email went out).

use crate::config::SmtpConfig;
use keygate_core::access::Role;
use keygate_core::{TenantId, UserId};
use keygate_store::{EmailPurpose, EmailToken};
use lettre::message::header::ContentType;
use lettre::message::Mailbox;
use lettre::{AsyncSmtpTransport, AsyncTransport, Message, Tokio1Executor};
use std::time::Duration;

/// How long keygate waits on the SMTP server for one message.
const SEND_TIMEOUT: Duration = Duration::from_secs(20);

/// The configured SMTP server and sender.
#[derive(Clone)]
pub struct Mailer {
    transport: AsyncSmtpTransport<Tokio1Executor>,
    from: Mailbox,
}

impl std::fmt::Debug for Mailer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Mailer").field("from", &self.from).finish()
    }
}

impl Mailer {
    /// The mailer `[smtp]` describes; `None` when no URL is set.
    pub fn new(c: &SmtpConfig) -> Result<Option<Self>, String> {
        if c.url.is_empty() {
            return Ok(None);
        }
        let transport = AsyncSmtpTransport::<Tokio1Executor>::from_url(&c.url)
            .map_err(|e| format!("url: {e}"))?
            .timeout(Some(SEND_TIMEOUT))
            .build();
        let from = c
            .from
            .parse::<Mailbox>()
            .map_err(|e| format!("from {:?}: {e}", c.from))?;
        Ok(Some(Self { transport, from }))
    }

    /// Sends a plain-text message to `to` in a task of its own; a failure is logged (with the
    /// purpose, never the body, which may hold a link).
    pub fn send_later(&self, to: &str, subject: &str, body: String, what: &'static str) {
        let to = match to.parse::<Mailbox>() {
            Ok(m) => m,
            Err(e) => {
                tracing::warn!("{what} email not sent: the address does not parse: {e}");
                return;
            }
        };
        let message = Message::builder()
            .from(self.from.clone())
            .to(to)
            .subject(subject)
            .header(ContentType::TEXT_PLAIN)
            .body(body);
        let message = match message {
            Ok(m) => m,
            Err(e) => {
                tracing::warn!("{what} email not sent: {e}");
                return;
            }
        };
        let transport = self.transport.clone();
        tokio::spawn(async move {
            match transport.send(message).await {
                Ok(_) => tracing::info!("{what} email sent"),
                Err(e) => tracing::error!("{what} email not sent: {e}"),
            }
        });
    }
}

/// The SHA-256 of a link's token, hex: what the store keeps and looks up (as for OAuth codes
/// and refresh tokens).
pub use keygate_oauth::token_hash;

/// A new one-use link's token (shown once, in the email) and its record.
#[derive(Debug)]
pub struct NewLink<'a> {
    /// What it is for.
    pub purpose: EmailPurpose,
    /// The account.
    pub tenant_id: &'a TenantId,
    /// The user it acts for.
    pub user_id: Option<&'a UserId>,
    /// Where it is sent.
    pub email: &'a str,
    /// For an invitation, the role it gives.
    pub role: Option<Role>,
    /// How long it works, ms.
    pub ttl_ms: i64,
}

impl NewLink<'_> {
    /// The token and what the store keeps of it.
    pub fn make(&self, now_ms: i64) -> (String, EmailToken) {
        let token = crate::ids::random_base62(43);
        let record = EmailToken {
            hash: token_hash(&token),
            purpose: self.purpose,
            tenant_id: self.tenant_id.clone(),
            user_id: self.user_id.cloned(),
            email: self.email.to_owned(),
            role: self.role,
            created_at_ms: now_ms,
            expires_at_ms: now_ms.saturating_add(self.ttl_ms),
        };
        (token, record)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_link_is_stored_as_the_hash_of_a_long_random_token() {
        let t = TenantId::from("tnt_1");
        let link = NewLink {
            purpose: EmailPurpose::Reset,
            tenant_id: &t,
            user_id: None,
            email: "a@example.com",
            role: None,
            ttl_ms: 1_800_000,
        };
        let (a, ra) = link.make(1_000);
        let (b, _) = link.make(1_000);
        assert_ne!(a, b);
        assert_eq!(a.len(), 43);
        assert_eq!(ra.hash, token_hash(&a));
        assert_eq!(ra.hash.len(), 64);
        assert!(!ra.hash.contains(&a));
        assert_eq!(ra.expires_at_ms, 1_801_000);
    }

    #[test]
    fn the_smtp_url_and_sender_are_checked() {
        let c = |url: &str, from: &str| SmtpConfig {
            url: url.into(),
            from: from.into(),
        };
        assert!(Mailer::new(&c("", "x")).expect("no mailer").is_none());
        assert!(
            Mailer::new(&c("smtp://127.0.0.1:2525", "keygate <a@b.example>"))
                .expect("ok")
                .is_some()
        );
        assert!(Mailer::new(&c("ftp://127.0.0.1", "a@b.example")).is_err());
        assert!(Mailer::new(&c("smtp://127.0.0.1:2525", "not an address")).is_err());
        let shown = format!(
            "{:?}",
            c("smtps://me:hunter2@hunter2@mail.example:465", "a@b")
        );
        assert!(!shown.contains("hunter2"), "{shown}");
        assert!(shown.contains("mail.example:465"), "{shown}");
    }
}
