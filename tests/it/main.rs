//! Portcullis black-box integration tests (see /work/notes/CONTRACT.md).
mod support;

mod admin;
mod adversarial;
mod auth;
mod browser;
mod cli;
mod faults;
mod fuzz_corpus;
mod mail;
mod ops;
mod pages;
mod pg;
mod proxy;
mod relay;
mod reload;
mod selftest;
mod two_factor;
