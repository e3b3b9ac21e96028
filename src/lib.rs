//! ferry: a reverse-proxy load balancer with nginx's upstream semantics.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod accesslog;
pub mod admin;
pub mod balance;
pub mod body;
pub mod client;
pub mod config;
pub mod conn;
pub mod demo;
pub mod discovery;
pub mod ewma;
pub mod h1;
pub mod health;
pub mod metrics;
pub mod peer;
pub mod proxy;
pub mod runtime;
pub mod server;
pub mod sock;
pub mod tls;
pub mod upstream_h1;
