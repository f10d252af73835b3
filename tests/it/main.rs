//! Portcullis black-box integration tests (see /work/notes/CONTRACT.md).
mod support;

mod admin;
mod auth;
mod browser;
mod cli;
mod mail;
mod ops;
mod pages;
mod proxy;
mod selftest;
mod two_factor;
mod adversarial;
mod faults;
mod pg;
mod fuzz_corpus;
