//! keygate's engine: everything a node does except speak HTTP. The decision pipeline and the
//! key cache ([`engine`]), the change feed between nodes, key issuance ([`issue`]), webhooks,
//! alerts, automatic rotation, OAuth signing keys, sign-in throttling, the audit log's
//! shipper, and the supervisor every background task runs under.
//!
//! It must never let a decision's answer be given before its audit line is written: a
//! decision comes back as [`engine::Decided`] (the answer and its audit ticket) and is
//! settled by [`Engine::settle`]. It depends on no HTTP server (axum, hyper); its only
//! network client is the webhook sender.
#![forbid(unsafe_code)]

pub mod accounts;
pub mod alerts;
pub mod audit;
pub mod clock;
pub mod config;
pub mod engine;
pub mod ids;
pub mod issue;
pub mod login;
pub mod mail;
pub mod metrics;
pub mod oauth;
pub mod origins;
pub mod request_id;
pub mod rotation;
pub mod supervisor;
pub mod tasks;
pub mod webhooks;

pub use config::Config;
pub use engine::Engine;
