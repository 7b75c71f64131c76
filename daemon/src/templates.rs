//! Mesh templates (`meshd mesh create NAME --template T`): the five claudemesh templates'
//! groups (with the roles clients use in them), suggested roles and initial shared-state
//! keys. The reference CLI only printed a template; meshd creates its state keys and
//! records its groups and roles with the mesh.

use serde::Serialize;

/// One template.
#[derive(Debug, Clone, Copy, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Template {
    /// Name (`--template NAME`).
    pub name: &'static str,
    /// What it is for.
    pub description: &'static str,
    /// Groups and the roles used in each.
    pub groups: &'static [Group],
    /// Initial shared-state keys and values (JSON text).
    pub state_keys: &'static [(&'static str, &'static str)],
    /// Roles members take.
    pub suggested_roles: &'static [&'static str],
    /// A hint for the sessions' prompts.
    pub prompt_hint: &'static str,
}

/// A template group.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Group {
    /// Name (`@name`).
    pub name: &'static str,
    /// Roles used in it.
    pub roles: &'static [&'static str],
}

const fn g(name: &'static str, roles: &'static [&'static str]) -> Group {
    Group { name, roles }
}

/// Every template, by name.
pub const TEMPLATES: &[Template] = &[
    Template {
        name: "dev-team",
        description: "Software team: frontend, backend, devops and QA groups",
        groups: &[
            g("frontend", &["lead", "member"]),
            g("backend", &["lead", "member"]),
            g("devops", &["lead", "member"]),
            g("qa", &["lead", "member"]),
        ],
        state_keys: &[
            ("sprint", r#""current""#),
            ("deploy-frozen", "false"),
            ("pr-queue", "[]"),
        ],
        suggested_roles: &["lead", "member", "reviewer"],
        prompt_hint: "Coordinate through @frontend, @backend and @devops; check the sprint and deploy-frozen keys before changing anything.",
    },
    Template {
        name: "research",
        description: "Research team: analysis, writing and data groups",
        groups: &[
            g("analysis", &["lead", "analyst"]),
            g("writing", &["lead", "writer", "reviewer"]),
            g("data", &["engineer", "analyst"]),
        ],
        state_keys: &[
            ("research-topic", r#""""#),
            ("phase", r#""exploration""#),
            ("findings-count", "0"),
        ],
        suggested_roles: &["lead", "analyst", "writer", "reviewer"],
        prompt_hint: "Share findings with the mesh and look for earlier ones before starting; the phase key says where the work is.",
    },
    Template {
        name: "ops-incident",
        description: "Incident response: on-call, comms and engineering groups",
        groups: &[
            g("oncall", &["primary", "secondary"]),
            g("comms", &["lead", "scribe"]),
            g("engineering", &["lead", "responder"]),
        ],
        state_keys: &[
            ("incident-status", r#""investigating""#),
            ("severity", r#""unknown""#),
            ("commander", r#""""#),
            ("timeline", "[]"),
        ],
        suggested_roles: &["commander", "primary-oncall", "scribe", "responder"],
        prompt_hint: "Incident mode: send with priority now, keep incident-status current; the commander coordinates and the scribe keeps the timeline.",
    },
    Template {
        name: "simulation",
        description: "Simulation with personas, observers and a control group (pairs with the clock)",
        groups: &[
            g("personas", &["admin", "user", "customer"]),
            g("observers", &["monitor", "analyst"]),
            g("control", &["orchestrator"]),
        ],
        state_keys: &[
            ("clock-speed", r#""x1""#),
            ("sim-status", r#""paused""#),
            ("tick-count", "0"),
            ("scenario", r#""""#),
        ],
        suggested_roles: &["orchestrator", "persona", "monitor"],
        prompt_hint: "Simulation mode: act as your persona in simulated time (the mesh clock) and report to @observers.",
    },
    Template {
        name: "personal",
        description: "One person's sessions sharing focus and todos",
        groups: &[],
        state_keys: &[("focus", r#""""#), ("todos", "[]")],
        suggested_roles: &[],
        prompt_hint: "Personal workspace: keep focus and todos in the shared state.",
    },
];

/// A template by name.
pub fn find(name: &str) -> Option<&'static Template> {
    TEMPLATES.iter().find(|t| t.name == name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_values_are_json_and_names_unique() {
        for t in TEMPLATES {
            for (k, v) in t.state_keys {
                assert!(
                    serde_json::from_str::<serde_json::Value>(v).is_ok(),
                    "{}/{k}",
                    t.name
                );
            }
            assert_eq!(TEMPLATES.iter().filter(|o| o.name == t.name).count(), 1);
        }
        assert!(find("dev-team").is_some() && find("nope").is_none());
    }
}
