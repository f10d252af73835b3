//! Portcullis: a two-factor authentication gateway in front of web applications.
//!
//! A request flows request → [`policy`] → [`session`] → [`portal`] (the gateway's own pages) or [`proxy`]
//! (the application). [`run`] serves on an already-bound listener so tests can start a real gateway on port 0.
//!
//! # Layout
//!
//! Layers, lowest first; a module uses only modules of lower layers (checked by the `layout` integration test):
//!
//! | layer | modules | what |
//! |---|---|---|
//! | 0 | [`files`], [`clock`], [`audit`], [`body`], [`normalize`] | private files, injected time, audit events, the body type, path/host normal forms |
//! | 1 | [`keys`], [`config`], [`pages`], [`tls`] | derived keys; the TOML configuration; templates; TLS settings |
//! | 2 | [`store`], [`mail`] | users, sessions, tokens, counters (redb or PostgreSQL); outgoing mail |
//! | 3 | [`credentials`], [`signin`], [`policy`], [`headers`], [`notify`], [`metrics`] | passwords, TOTP, recovery codes, the lockout rule; the sign-in state machine; the access decision; header rules; security notices; metrics |
//! | 4 | [`client`], [`session`], [`accounts`] | who sent a request; the [`session::Sessions`] service; every account operation, for web, admin and CLI |
//! | 5 | [`respond`] | refusals as HTTP responses, in one place |
//! | 6 | [`gateway`], [`router`], [`portal`], [`proxy`], [`admin`], [`server`], [`start`], [`cli`], [`demo`] | the shared state, the request flow, pages, proxy paths, admin pages, listeners, start-up and background tasks, commands |
//!
//! Within layer 6, the proxy paths read the state through [`proxy::State`], which the request flow ([`router`])
//! implements for the gateway: no two modules import each other (the layout test fails on any cycle). This file
//! only declares the modules and re-exports what a caller starts with.

#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod accounts;
pub mod admin;
pub mod audit;
pub mod body;
pub mod cli;
pub mod client;
pub mod clock;
pub mod config;
pub mod credentials;
pub mod demo;
pub mod files;
pub mod gateway;
pub mod headers;
pub mod keys;
pub mod mail;
pub mod metrics;
pub mod normalize;
pub mod notify;
pub mod pages;
pub mod policy;
pub mod portal;
pub mod proxy;
pub mod respond;
pub mod router;
pub mod server;
pub mod session;
pub mod signin;
pub mod start;
pub mod store;
pub mod tls;

pub use body::{Body, BoxError};
pub use gateway::Error;
pub use start::{run, run_with_clock};
