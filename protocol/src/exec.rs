//! `execute_code` (the seed's roadmap; a meshd extension): a member runs a short program
//! in a sandbox on the broker's host. Answered with one `execute_result` (echoing
//! `_reqId`); with `stream: true`, `execute_output` frames carry stdout and stderr as
//! they are written, before the result.

use serde::{Deserialize, Serialize};

/// Longest program accepted, bytes.
pub const MAX_CODE: usize = 256 * 1024;
/// Most input files.
pub const MAX_FILES: usize = 16;
/// Most bytes of input files together (and of stdin).
pub const MAX_INPUT: usize = 4 * 1024 * 1024;
/// Most arguments, and longest argument.
pub const MAX_ARGS: usize = 64;
const MAX_ARG: usize = 4096;

/// A language the broker may run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lang {
    /// `python3`.
    Python,
    /// `node`.
    Node,
    /// `bash`.
    Bash,
}

impl Lang {
    /// Wire spelling.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Python => "python",
            Self::Node => "node",
            Self::Bash => "bash",
        }
    }

    /// The file the program is written to inside the sandbox.
    pub const fn file_name(self) -> &'static str {
        match self {
            Self::Python => "main.py",
            Self::Node => "main.js",
            Self::Bash => "main.sh",
        }
    }
}

/// An input file: written into the run's scratch directory before it starts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InputFile {
    /// A plain file name (no directories).
    pub name: String,
    /// Its bytes.
    pub content: Vec<u8>,
}

/// An `execute_code` request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// Language.
    pub lang: Lang,
    /// The program.
    pub code: String,
    /// Standard input.
    pub stdin: Vec<u8>,
    /// Arguments after the program.
    pub args: Vec<String>,
    /// Files written before the run.
    pub files: Vec<InputFile>,
    /// Files the run writes that the answer brings back (plain names).
    pub outputs: Vec<String>,
    /// Send output as it comes (`execute_output`).
    pub stream: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileBody {
    name: String,
    /// Base64 (standard alphabet).
    content: String,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Body {
    lang: String,
    code: String,
    #[serde(default)]
    stdin: Option<String>,
    #[serde(default)]
    args: Vec<String>,
    #[serde(default)]
    files: Vec<FileBody>,
    #[serde(default)]
    outputs: Vec<String>,
    #[serde(default)]
    stream: bool,
}

/// Whether `name` is a plain file name a run may use: no directory, no dot-only name,
/// printable, short.
pub fn plain_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 128
        && name != "."
        && name != ".."
        && !name.contains('/')
        && !name.chars().any(char::is_control)
}

/// Decodes an `execute_code` body (also the MCP tool's arguments).
///
/// # Errors
/// An unknown language, a program or input over its bound, a file name with a
/// directory in it, or bad base64.
pub fn decode(text: &str) -> Result<Request, serde_json::Error> {
    use base64::Engine as _;
    use serde::de::Error as _;
    let b: Body = serde_json::from_str(text)?;
    let lang = match b.lang.as_str() {
        "python" | "python3" => Lang::Python,
        "node" | "javascript" | "js" => Lang::Node,
        "bash" | "sh" => Lang::Bash,
        other => {
            return Err(serde_json::Error::custom(format!(
                "lang {other:?} is not one of python, node, bash"
            )));
        }
    };
    if b.code.len() > MAX_CODE {
        return Err(serde_json::Error::custom("code is longer than 256 KiB"));
    }
    if b.args.len() > MAX_ARGS || b.args.iter().any(|a| a.len() > MAX_ARG || a.contains('\0')) {
        return Err(serde_json::Error::custom(
            "at most 64 arguments of at most 4096 bytes, without NUL",
        ));
    }
    if b.files.len() > MAX_FILES || b.outputs.len() > MAX_FILES {
        return Err(serde_json::Error::custom("at most 16 files in and 16 out"));
    }
    let stdin = b.stdin.unwrap_or_default().into_bytes();
    let mut total = stdin.len();
    let mut files = Vec::with_capacity(b.files.len());
    for f in b.files {
        if !plain_name(&f.name) || f.name == lang.file_name() {
            return Err(serde_json::Error::custom(format!(
                "{:?} is not a plain file name (or is the program's own)",
                f.name
            )));
        }
        let content = base64::engine::general_purpose::STANDARD
            .decode(f.content.as_bytes())
            .map_err(|e| serde_json::Error::custom(format!("file {:?}: {e}", f.name)))?;
        total += content.len();
        files.push(InputFile {
            name: f.name,
            content,
        });
    }
    if total > MAX_INPUT {
        return Err(serde_json::Error::custom("stdin and files exceed 4 MiB"));
    }
    if let Some(bad) = b.outputs.iter().find(|n| !plain_name(n)) {
        return Err(serde_json::Error::custom(format!(
            "{bad:?} is not a plain file name"
        )));
    }
    Ok(Request {
        lang,
        code: b.code,
        stdin,
        args: b.args,
        files,
        outputs: b.outputs,
        stream: b.stream,
    })
}

/// An output file brought back.
#[derive(Debug, Clone, Serialize)]
pub struct OutputFile {
    /// Its name.
    pub name: String,
    /// Its bytes, base64 (absent when it was not written).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub content: Option<String>,
    /// Its size, bytes.
    pub size: u64,
}

/// `execute_result`.
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "type", rename = "execute_result", rename_all = "camelCase")]
pub struct Finished {
    /// Exit code (absent when killed by a signal).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i32>,
    /// The signal that ended it, if one did.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub signal: Option<i32>,
    /// Which limit ended it: `wall_time`, `cpu_time`, `memory`, `file_size`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub limit: Option<&'static str>,
    /// Standard output (UTF-8, invalid bytes replaced).
    pub stdout: String,
    /// Standard error.
    pub stderr: String,
    /// Whether stdout or stderr was cut at the output limit.
    pub truncated: bool,
    /// Wall time, milliseconds.
    pub time_ms: u64,
    /// CPU time (user + system), milliseconds.
    pub cpu_ms: u64,
    /// Peak resident memory, KiB.
    pub max_rss_kb: u64,
    /// Files asked for in `outputs`.
    pub files: Vec<OutputFile>,
    /// Correlation id.
    #[serde(rename = "_reqId", skip_serializing_if = "Option::is_none")]
    pub req_id: Option<String>,
}

/// `execute_output` (with `stream: true`).
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "type", rename = "execute_output", rename_all = "camelCase")]
pub struct Output {
    /// `stdout` or `stderr`.
    pub stream: &'static str,
    /// The bytes written (UTF-8, invalid bytes replaced).
    pub data: String,
    /// Correlation id of the request.
    #[serde(rename = "_reqId", skip_serializing_if = "Option::is_none")]
    pub req_id: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_run_names_a_known_language_and_plain_files() {
        let r = decode(
            r#"{"type":"execute_code","lang":"python","code":"print(1)","stdin":"x","args":["a"],
                "files":[{"name":"in.txt","content":"aGk="}],"outputs":["out.txt"],"stream":true}"#,
        )
        .unwrap();
        assert_eq!(r.lang, Lang::Python);
        assert_eq!(r.files[0].content, b"hi");
        assert!(r.stream);
        for bad in [
            r#"{"lang":"cobol","code":""}"#,
            r#"{"lang":"bash"}"#,
            r#"{"lang":"bash","code":"","files":[{"name":"../x","content":""}]}"#,
            r#"{"lang":"bash","code":"","files":[{"name":"main.sh","content":""}]}"#,
            r#"{"lang":"bash","code":"","files":[{"name":"a","content":"!!"}]}"#,
            r#"{"lang":"bash","code":"","outputs":["/etc/passwd"]}"#,
            r#"{"lang":"bash","code":"","args":["a\u0000b"]}"#,
        ] {
            assert!(decode(bad).is_err(), "{bad}");
        }
    }
}
