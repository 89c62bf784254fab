//! keygate's HTTP server: configuration, startup, the management, verify and forward-auth
//! routes, and the pipeline they share. Only this crate knows HTTP; it must never let an answer
//! leave before its decision's audit line is written (see `state::Inner::settle`).
//!
//! It still holds the engine beside HTTP — the pipeline and caches (`state`), the change feed,
//! webhooks, alerts, rotation, key issuance (`issue`) — which is to move to a crate of its own.
#![forbid(unsafe_code)]

pub mod alerts;
pub mod audit;
pub mod config;
pub mod cors;
pub mod dashboard;
pub mod error;
pub mod gateway;
pub mod headers;
pub mod held;
pub mod ids;
pub mod issue;
pub mod login;
pub mod metrics;
pub mod oauth;
pub mod openapi;
pub mod proxy;
pub mod rotation;
pub mod routes;
pub mod server;
pub mod startup;
pub mod state;
pub mod supervisor;
pub mod telemetry;
pub mod views;
pub mod webhooks;

pub use config::Config;
pub use startup::Application;
