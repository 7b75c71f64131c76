//! One module per feature: its client-frame handlers (as methods of the session,
//! `crate::session::Session`). Each feature's store queries are in `crate::store`, its
//! federation replication in `crate::fed`.

pub(crate) mod audit;
pub(crate) mod clock;
pub(crate) mod contexts;
pub(crate) mod files;
pub(crate) mod mcp;
pub(crate) mod memory;
pub(crate) mod mesh_info;
pub(crate) mod messages;
pub(crate) mod presence;
pub(crate) mod relay;
pub(crate) mod schedule;
pub(crate) mod skills;
pub(crate) mod state;
pub(crate) mod streams;
pub(crate) mod tasks;
pub(crate) mod webhooks;
