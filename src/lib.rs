//! pdvault: an encrypted personal-data vault.
//!
//! `vault` is the core (no HTTP in it); `http` is a thin adapter over it and
//! `cli` the operator's front end, built on `client`, the typed HTTPS client
//! that services calling the vault use too. The key hierarchy is in `keyring` (KEK
//! epochs), `storage` (wrapped data keys, ciphertexts) and `crypto`.
//! `unsafe` code is denied everywhere but in `secmem` (key pages).

#![deny(unsafe_code)]

pub mod audit;
pub mod cli;
pub mod client;
pub mod config;
pub mod crypto;
pub mod devkeys;
pub mod error;
pub mod events;
pub mod faults;
pub mod fields;
pub mod fsutil;
pub mod http;
pub mod keyring;
pub mod ledger;
pub mod metrics;
pub mod policy;
pub mod progress;
pub mod ratelimit;
pub mod receipt;
pub mod release;
pub mod runtime;
pub mod scheduler;
pub mod secmem;
pub mod storage;
pub mod tokens;
pub mod vault;
