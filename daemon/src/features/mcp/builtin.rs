//! The broker's own MCP server, `meshd`: tools served by the broker itself rather than
//! by a peer, so a Claude peer reaches broker features through the MCP proxy it already
//! uses (`mcp_list` shows the server; `mcp_call` with `serverName: "meshd"` is answered
//! here). The name is reserved: no peer may register a server called `meshd`.

use meshd_protocol::broker::McpServerEntry;
use meshd_protocol::client::McpTool;

use crate::Ctx;
use crate::hub::{ConnId, MeshHub};

/// The reserved server name.
pub(crate) const NAME: &str = "meshd";

/// The JSON Schema of `search_peers`' arguments.
const SEARCH_SCHEMA: &str = r#"{"type":"object","properties":{"query":{"type":"string","description":"Free text: names, groups, roles, skills, summaries, profile fields (typos tolerated)"},"filters":{"type":"object","properties":{"group":{"type":"string"},"role":{"type":"string"},"status":{"type":"string","enum":["idle","working","dnd","offline"]},"broker":{"type":"string"},"peerType":{"type":"string"},"online":{"type":"boolean"}},"additionalProperties":false},"limit":{"type":"integer","minimum":1,"maximum":50}},"additionalProperties":false}"#;

/// The JSON Schema of `execute_code`'s arguments.
const EXEC_SCHEMA: &str = r#"{"type":"object","required":["lang","code"],"properties":{"lang":{"type":"string","enum":["python","node","bash"]},"code":{"type":"string"},"stdin":{"type":"string"},"args":{"type":"array","items":{"type":"string"}},"files":{"type":"array","items":{"type":"object","required":["name","content"],"properties":{"name":{"type":"string"},"content":{"type":"string","description":"base64"}}}},"outputs":{"type":"array","items":{"type":"string"},"description":"files to bring back"}}}"#;

const LOG_SCHEMA: &str = r#"{"type":"object","required":["message"],"properties":{"level":{"type":"string","enum":["debug","info","warn","error"]},"message":{"type":"string"},"data":{"type":"object"}}}"#;
const LOGS_SCHEMA: &str = r#"{"type":"object","properties":{"query":{"type":"string","description":"full text over message and data"},"peer":{"type":"string"},"level":{"type":"string","enum":["debug","info","warn","error"],"description":"at least this severe"},"last":{"type":"integer","minimum":1,"maximum":500}}}"#;
const REPORT_SCHEMA: &str = r#"{"type":"object","properties":{"timeframe":{"type":"string","description":"15m, 1h, 24h, 7d (default 24h, at most 30d)"}}}"#;

/// The server as `mcp_list` shows it.
pub(crate) fn entry() -> McpServerEntry {
    McpServerEntry {
        name: NAME.to_owned(),
        description: "Tools served by the broker itself".to_owned(),
        hosted_by: "broker".to_owned(),
        tools: vec![McpTool {
            name: "search_peers".to_owned(),
            description: "Ranked search over the mesh's peers and members, with filters and the reason for each match".to_owned(),
            input_schema: serde_json::value::RawValue::from_string(SEARCH_SCHEMA.to_owned()).ok(),
        },
        McpTool {
            name: "execute_code".to_owned(),
            description: "Run a python, node or bash program in a sandbox on the broker (no network, limited time and memory); returns stdout, stderr, exit code, time and memory".to_owned(),
            input_schema: serde_json::value::RawValue::from_string(EXEC_SCHEMA.to_owned()).ok(),
        },
        McpTool {
            name: "mesh_log".to_owned(),
            description: "Write a structured log entry to the mesh's log".to_owned(),
            input_schema: serde_json::value::RawValue::from_string(LOG_SCHEMA.to_owned()).ok(),
        },
        McpTool {
            name: "mesh_logs".to_owned(),
            description: "Search the mesh's log by text, peer and level, newest first".to_owned(),
            input_schema: serde_json::value::RawValue::from_string(LOGS_SCHEMA.to_owned()).ok(),
        },
        McpTool {
            name: "mesh_report".to_owned(),
            description: "A timeframe of the mesh summed up: messages, delivery times, errors, busiest peers, tasks, schedules".to_owned(),
            input_schema: serde_json::value::RawValue::from_string(REPORT_SCHEMA.to_owned()).ok(),
        }],
        online: true,
        offline_since: None,
        persistent: true,
    }
}

/// Who calls a tool: its member key and connection (what it may see), member id and
/// whether it is a mesh admin.
pub(crate) struct Caller<'a> {
    pub(crate) member_pubkey: &'a str,
    pub(crate) conn: ConnId,
    pub(crate) member_id: &'a str,
    pub(crate) name: &'a str,
    pub(crate) admin: bool,
}

/// Runs `tool` for `caller`.
pub(crate) async fn call(
    ctx: &Ctx,
    mesh: &MeshHub,
    caller: Caller<'_>,
    tool: &str,
    args: &str,
) -> Result<serde_json::Value, String> {
    match tool {
        "search_peers" => {
            crate::features::search::tool(ctx, mesh, (caller.member_pubkey, caller.conn), args)
                .await
        }
        "mesh_log" | "mesh_logs" | "mesh_report" => {
            let who = crate::features::telemetry::Writer {
                member_id: caller.member_id,
                member_pubkey: caller.member_pubkey,
                name: caller.name,
                pubkey: caller.member_pubkey,
            };
            crate::features::telemetry::tool(ctx, &mesh.row.id, &who, tool, args).await
        }
        "execute_code" => {
            crate::features::exec::tool(ctx, &mesh.row.id, caller.member_id, caller.admin, args)
                .await
        }
        _ => Err(format!("the {NAME} server has no tool \"{tool}\"")),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_tool_schemas_are_json() {
        let e = super::entry();
        for t in e.tools {
            let schema = t.input_schema.expect("a schema");
            let v: serde_json::Value = serde_json::from_str(schema.get()).expect("valid JSON");
            assert_eq!(v["type"], "object");
        }
    }
}
