//! Ignis end-to-end tests: real servers on 127.0.0.1:0, real components built
//! from examples/ by the harness. One binary; topics are modules.

mod harness;

mod admin;
mod admission;
mod bindings;
mod cli;
mod cluster;
mod cron;
mod deploy;
mod durable;
mod http2;
mod http_limits;
mod isolation;
mod languages;
mod outbound;
mod proxy;
mod reuse;
mod serving;
mod slow_clients;
mod templates;
mod tenants;
mod tls;
