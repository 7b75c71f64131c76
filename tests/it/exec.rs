//! `execute_code` (`features::exec`): honest runs in python, node and bash with stdin,
//! args, files in and out and streamed output; escapes that must fail; who may run and
//! how often; and a broker that cannot sandbox refusing to start.
//!
//! The sandbox needs bubblewrap and namespaces. Where the host cannot make them these
//! tests say so and pass — unless `MESHD_TEST_REQUIRE_SANDBOX=1` (set by `.ci/run`),
//! where they fail.

use std::time::Duration;

use base64::Engine as _;
use meshd_protocol::invite::Role;
use meshd_tests::{Backend, Client, TestBroker};
use serde_json::{Value, json};

/// A broker with `[sandbox]` enabled (tight limits so the escape tests end quickly), or
/// `None` when this host cannot sandbox and the test may skip.
async fn sandboxed(
    tweak: impl FnOnce(&mut meshd_config::Sandbox),
) -> anyhow::Result<Option<TestBroker>> {
    let r = TestBroker::start_with(Backend::Sqlite, |c| {
        c.sandbox.enabled = true;
        c.sandbox.wall_time = Duration::from_secs(3);
        c.sandbox.cpu_time = Duration::from_secs(1);
        c.sandbox.memory_mb = 128;
        c.sandbox.processes = 32;
        c.sandbox.scratch_mb = 16;
        c.sandbox.file_size_mb = 8;
        c.sandbox.output_kb = 64;
        tweak(&mut c.sandbox);
    })
    .await;
    match r {
        Ok(b) => Ok(Some(b)),
        Err(e) if e.to_string().contains("sandbox") => {
            if std::env::var_os("MESHD_TEST_REQUIRE_SANDBOX").is_some() {
                anyhow::bail!("the sandbox is required here: {e}");
            }
            eprintln!("SKIPPED: this host cannot make sandboxes ({e})");
            Ok(None)
        }
        Err(e) => Err(e),
    }
}

async fn client(broker: &TestBroker, role: Role) -> anyhow::Result<Client> {
    let mesh = broker.create_mesh("run").await?;
    let m = broker.enroll_as(&mesh, "coder", role).await?;
    broker.connect(&m).await
}

fn run(lang: &str, code: &str) -> Value {
    json!({"type": "execute_code", "lang": lang, "code": code})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn honest_runs_in_three_languages() -> anyhow::Result<()> {
    let Some(broker) = sandboxed(|_| {}).await? else {
        return Ok(());
    };
    let mut c = client(&broker, Role::Member).await?;
    let b64 = base64::engine::general_purpose::STANDARD;
    // Python: stdin, args, an input file in, an output file back.
    let mut f = run(
        "python",
        "import sys, os\n\
         data = open('in.txt').read()\n\
         line = sys.stdin.read().strip()\n\
         open('out.txt', 'w').write(data.upper() + line)\n\
         print('args', sys.argv[1:], 'uid', os.getuid())\n\
         print('oops', file=sys.stderr)\n\
         sys.exit(3)",
    );
    f["stdin"] = json!("from stdin");
    f["args"] = json!(["a", "b c"]);
    f["files"] = json!([{"name": "in.txt", "content": b64.encode("hello ")}]);
    f["outputs"] = json!(["out.txt", "missing.txt"]);
    let r = c.request(f).await?;
    assert_eq!(r["type"], "execute_result", "{r}");
    assert_eq!(r["exitCode"], 3, "{r}");
    assert_eq!(r["stdout"], "args ['a', 'b c'] uid 65534\n", "{r}");
    assert_eq!(r["stderr"], "oops\n", "{r}");
    assert_eq!(r["files"][0]["name"], "out.txt");
    let out = b64.decode(r["files"][0]["content"].as_str().unwrap_or_default())?;
    assert_eq!(out, b"HELLO from stdin");
    assert!(r["files"][1].get("content").is_none(), "{r}");
    assert!(r["maxRssKb"].as_u64() > Some(1000), "{r}");
    assert!(r["timeMs"].as_u64().is_some() && r["cpuMs"].as_u64().is_some());
    // Node and bash.
    let r = c.request(run("node", "console.log(6 * 7)")).await?;
    assert_eq!(
        (r["exitCode"].as_i64(), r["stdout"].as_str()),
        (Some(0), Some("42\n")),
        "{r}"
    );
    let r = c.request(run("bash", "echo \"$((1+2)) $0\"")).await?;
    assert_eq!(r["stdout"], "3 main.sh\n", "{r}");
    // Streaming: output frames before the result, with the request's id.
    let mut f = run(
        "python",
        "import time\nfor i in range(3):\n    print(i, flush=True)\n    time.sleep(0.2)",
    );
    f["stream"] = json!(true);
    f["_reqId"] = json!("s1");
    c.send(f).await?;
    let mut streamed = String::new();
    loop {
        let v =
            c.ws.expect_within("output or result", meshd_tests::patience(), |v| {
                v["_reqId"] == "s1"
            })
            .await?;
        if v["type"] == "execute_output" {
            assert_eq!(v["stream"], "stdout");
            streamed.push_str(v["data"].as_str().unwrap_or_default());
            continue;
        }
        assert_eq!(v["type"], "execute_result", "{v}");
        assert_eq!(v["stdout"], "0\n1\n2\n");
        break;
    }
    assert_eq!(streamed, "0\n1\n2\n");
    // Output past the limit is cut and said so.
    let r = c.request(run("python", "print('x' * 200000)")).await?;
    assert_eq!(r["truncated"], true, "{}", r["truncated"]);
    assert_eq!(r["stdout"].as_str().map(str::len), Some(64 * 1024));
    // The broker's MCP server runs code too.
    let r = c
        .request(
            json!({"type": "mcp_call", "serverName": "meshd", "toolName": "execute_code",
            "args": {"lang": "bash", "code": "echo via mcp"}}),
        )
        .await?;
    assert_eq!(r["result"]["stdout"], "via mcp\n", "{r}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn escapes_fail() -> anyhow::Result<()> {
    let Some(broker) = sandboxed(|_| {}).await? else {
        return Ok(());
    };
    let mut c = client(&broker, Role::Member).await?;
    let data_dir = broker.config.data_dir.display().to_string();
    let pid = std::process::id();
    let port = broker.addr.port();
    // Read meshd's data directory, key files and the host's secrets.
    let r = c
        .request(run(
            "python",
            &format!(
                "import os\n\
                 seen = []\n\
                 for p in ['{data_dir}', '{data_dir}/audit.key', '/etc/shadow', '/root', '/home', '/proc/1/root/etc']:\n\
                 \x20   try:\n\
                 \x20       seen.append((p, os.listdir(p) if os.path.isdir(p) else open(p,'rb').read(16)))\n\
                 \x20   except Exception as e:\n\
                 \x20       pass\n\
                 print('SEEN', seen)\n\
                 print('ROOT', sorted(os.listdir('/')))"
            ),
        ))
        .await?;
    let out = r["stdout"].as_str().unwrap_or_default();
    assert!(
        out.contains("SEEN []"),
        "something outside was readable: {r}"
    );
    assert!(out.contains("ROOT ['bin', 'dev', 'lib"), "{r}");
    assert!(
        !out.contains("'etc'") && !out.contains("'home'") && !out.contains("'root'"),
        "{r}"
    );
    // The network: meshd's own port, and anything else.
    let r = c
        .request(run(
            "python",
            &format!(
                "import socket\n\
                 for addr in [('127.0.0.1', {port}), ('1.1.1.1', 53)]:\n\
                 \x20   try:\n\
                 \x20       socket.create_connection(addr, timeout=1); print('CONNECTED', addr)\n\
                 \x20   except Exception as e:\n\
                 \x20       print('refused', type(e).__name__)"
            ),
        ))
        .await?;
    assert!(
        !r["stdout"]
            .as_str()
            .unwrap_or_default()
            .contains("CONNECTED"),
        "{r}"
    );
    // Signal meshd: not even visible.
    let r = c
        .request(run(
            "python",
            &format!(
                "import os, signal\n\
                 try:\n\
                 \x20   os.kill({pid}, signal.SIGTERM); print('SIGNALLED')\n\
                 except Exception as e:\n\
                 \x20   print(type(e).__name__)\n\
                 print(sorted(int(p) for p in os.listdir('/proc') if p.isdigit()))"
            ),
        ))
        .await?;
    assert!(
        !r["stdout"]
            .as_str()
            .unwrap_or_default()
            .contains("SIGNALLED"),
        "{r}"
    );
    // The program holds stdin, stdout and stderr only: not the broker's report pipe (it
    // could forge its own exit status and output files), not the files bwrap read.
    let r = c
        .request(run(
            "python",
            "import os\nprint(sorted(int(f) for f in os.listdir('/proc/self/fd')))",
        ))
        .await?;
    assert_eq!(r["stdout"], "[0, 1, 2, 3]\n", "3 is listdir's own: {r}");
    // New namespaces (a way to regain privileges) are refused by seccomp.
    let r = c
        .request(run(
            "python",
            "import ctypes, os\n\
             libc = ctypes.CDLL(None, use_errno=True)\n\
             print('unshare', libc.unshare(0x10000000), ctypes.get_errno())",
        ))
        .await?;
    assert_eq!(r["stdout"], "unshare -1 1\n", "EPERM: {r}");
    // Fork bomb: ends within the wall time, and the broker still serves.
    let r = c
        .request(run("bash", "bomb() { bomb | bomb & }; bomb; wait"))
        .await?;
    assert_eq!(r["type"], "execute_result", "{r}");
    assert!(r["timeMs"].as_u64() < Some(10_000), "{r}");
    // Memory past the limit: the program fails, the broker does not.
    let r = c
        .request(run(
            "python",
            "x = bytearray(512 * 1024 * 1024)\nprint('ALLOCATED')",
        ))
        .await?;
    assert!(
        !r["stdout"]
            .as_str()
            .unwrap_or_default()
            .contains("ALLOCATED"),
        "{r}"
    );
    assert!(
        r["stderr"]
            .as_str()
            .unwrap_or_default()
            .contains("MemoryError"),
        "{r}"
    );
    // Fill the disk: the scratch tmpfs (16 MiB) and the file size limit (8 MiB) stop it.
    let r = c
        .request(run(
            "python",
            "import os\n\
             n = 0\n\
             try:\n\
             \x20   for i in range(100):\n\
             \x20       with open(f'f{i}', 'wb') as f:\n\
             \x20           f.write(b'x' * 4 * 1024 * 1024)\n\
             \x20       n += 4\n\
             except Exception as e:\n\
             \x20   print(type(e).__name__, e.errno)\n\
             print('WROTE', n)",
        ))
        .await?;
    let wrote: u64 = r["stdout"]
        .as_str()
        .and_then(|s| s.split("WROTE ").nth(1))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or(u64::MAX);
    assert!(wrote <= 16, "wrote {wrote} MiB: {r}");
    assert!(
        r["stdout"].as_str().unwrap_or_default().contains("28"),
        "ENOSPC: {r}"
    );
    // One file past the size limit: SIGXFSZ.
    let r = c
        .request(run("bash", "exec head -c 12000000 /dev/zero > big"))
        .await?;
    assert_eq!(
        (r["limit"].as_str(), r["signal"].as_i64()),
        (Some("file_size"), Some(25)),
        "{r}"
    );
    // Outlive the wall time: killed at 3 s.
    let r = c
        .request(run("python", "import time\ntime.sleep(60)"))
        .await?;
    assert_eq!(r["limit"], "wall_time", "{r}");
    let t = r["timeMs"].as_u64().unwrap_or(0);
    assert!((3000..8000).contains(&t), "{r}");
    // Burn CPU past its limit.
    let r = c.request(run("python", "while True: pass")).await?;
    assert_eq!(r["limit"], "cpu_time", "{r}");
    // After all that, an honest run still works and the broker is alive.
    let r = c.request(run("bash", "echo still here")).await?;
    assert_eq!(r["stdout"], "still here\n", "{r}");
    let (status, _, _) = meshd_tests::http_with(broker.addr, "GET", "/health", &[], None).await?;
    assert_eq!(status, 200);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn who_may_run_and_how_often() -> anyhow::Result<()> {
    let Some(broker) = sandboxed(|s| {
        s.admin_only = true;
        s.runs_per_minute = 2;
    })
    .await?
    else {
        return Ok(());
    };
    let mesh = broker.create_mesh("roles").await?;
    let member = broker.enroll_as(&mesh, "member", Role::Member).await?;
    let admin = broker.enroll_as(&mesh, "admin", Role::Admin).await?;
    let mut m = broker.connect(&member).await?;
    let mut a = broker.connect(&admin).await?;
    let r = m.request(run("bash", "echo hi")).await?;
    assert_eq!(r["code"], "forbidden", "{r}");
    for _ in 0..2 {
        let r = a.request(run("bash", "echo hi")).await?;
        assert_eq!(r["stdout"], "hi\n", "{r}");
    }
    let r = a.request(run("bash", "echo hi")).await?;
    assert_eq!(r["code"], "rate_limited", "{r}");
    // Bad requests are refused with a reason.
    let r = a
        .request(json!({"type": "execute_code", "lang": "cobol", "code": ""}))
        .await?;
    assert_eq!(r["type"], "error", "{r}");
    // A broker without [sandbox] enabled says so.
    let plain = TestBroker::start(Backend::Sqlite).await?;
    let mut c = client(&plain, Role::Admin).await?;
    let r = c.request(run("bash", "echo hi")).await?;
    assert_eq!(r["code"], "not_enabled", "{r}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_that_cannot_sandbox_refuses_to_start() -> anyhow::Result<()> {
    let r = TestBroker::start_with(Backend::Sqlite, |c| {
        c.sandbox.enabled = true;
        c.sandbox.bwrap = "/nonexistent/bwrap".into();
    })
    .await;
    let e = r.err().map(|e| e.to_string()).unwrap_or_default();
    assert!(
        e.contains("sandbox") && e.contains("/nonexistent/bwrap"),
        "{e}"
    );
    Ok(())
}
