//! keygate's HTTP server: startup, the management, verify and forward-auth routes, the
//! gateway, the OAuth and dashboard pages. It parses HTTP and calls the engine
//! (`keygate-engine`), which holds every rule and background task; it must never let an
//! answer leave before its decision's audit line is written (see `Engine::settle`, and
//! `held` for forward-auth answers held on their connection).
#![forbid(unsafe_code)]

pub mod cors;
pub mod dashboard;
pub mod error;
pub mod gateway;
pub mod headers;
pub mod held;
pub mod metrics;
pub mod openapi;
pub mod proxy;
pub mod routes;
pub mod server;
pub mod startup;
pub mod state;
pub mod telemetry;
pub mod views;

pub use keygate_engine::Config;
pub use startup::Application;
