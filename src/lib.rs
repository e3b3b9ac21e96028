//! ferry: a reverse-proxy load balancer with nginx's upstream semantics.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod balance;
pub mod config;
pub mod ewma;
pub mod peer;
