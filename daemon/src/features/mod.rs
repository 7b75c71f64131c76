//! One module per feature: its client-frame handlers (as methods of the session,
//! `crate::session::Session`), its store queries (`<feature>/store.rs`), its running
//! state and tasks if any (`<feature>/engine.rs`), and for replicated features how a
//! peer broker's frames are applied, its part of a link's catch-up, and how its changes
//! are sent (`impl Fed`). `crate::fed` and the session's dispatch only name them.

pub mod apikeys;
pub mod audit;
pub mod bridges;
pub mod clock;
pub mod contexts;
pub mod dashboard;
pub mod exec;
pub mod files;
pub mod invites;
pub mod mcp;
pub mod memory;
pub mod mesh_info;
pub mod messages;
pub mod moderation;
pub mod people;
pub mod presence;
pub mod relay;
pub mod schedule;
pub mod search;
pub mod shares;
pub mod signals;
pub mod skills;
pub mod spatial;
pub mod state;
pub mod streams;
pub mod tags;
pub mod tasks;
pub mod telemetry;
pub mod topics;
pub mod vault;
pub mod watch;
pub mod webapp;
pub mod webhooks;
