//! Portcullis black-box integration tests: each module drives real gateways over real sockets.
mod support;

mod accounts;
mod admin;
mod adversarial;
mod auth;
mod browser;
mod cli;
mod differential;
mod faults;
mod fuzz_corpus;
mod hardening;
mod layout;
mod mail;
mod ops;
mod pages;
mod pg;
mod promises;
mod proxy;
mod relay;
mod reload;
mod review;
mod selftest;
mod store;
mod two_factor;
