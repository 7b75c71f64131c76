//! One module per feature: its client-frame handlers (as methods of the session,
//! `crate::session::Session`). Each feature's store queries are in `crate::store`, its
//! federation replication in `crate::fed`.

pub mod audit;
pub mod clock;
pub mod contexts;
pub mod files;
pub mod mcp;
pub mod memory;
pub mod mesh_info;
pub mod messages;
pub mod presence;
pub mod relay;
pub mod schedule;
pub mod skills;
pub mod state;
pub mod streams;
pub mod tasks;
pub mod webhooks;
