//! One module per feature: its client-frame handlers (as methods of the session,
//! `crate::session::Session`). Each feature's store queries are in `crate::store`, its
//! federation replication in `crate::fed`.

mod audit;
mod clock;
mod contexts;
mod files;
mod mcp;
mod memory;
mod mesh_info;
mod messages;
mod presence;
mod relay;
mod schedule;
mod skills;
mod state;
mod streams;
mod tasks;
mod webhooks;
