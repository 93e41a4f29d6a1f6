//! cacheclear's proofs that run: `cacheclear demo` (the flash sale, zero config) and
//! `cacheclear bench pipeline` / `cacheclear bench kafka` (the measured figures in README).
//!
//! Both start private PostgreSQL, Redis and (for the bus) tansu instances from the installed
//! binaries through `cacheclear-harness`, unless given URLs; this crate is why the `cacheclear`
//! binary links the harness at all, and its feature `lab` (on by default) can leave it out of a
//! production build (`cargo build --release -p cacheclear --no-default-features`).
//!
//! The source runs through [`cacheclear_source_postgres::Pipeline`] here exactly as in
//! `cacheclear run`.

#![warn(missing_docs, unreachable_pub, rust_2018_idioms)]

pub mod bench;
pub mod demo;
