//! One run of a program in a bubblewrap sandbox, with the limits of `[sandbox]`.
//!
//! What the program sees: a read-only `/usr` (with `/bin`, `/lib`, `/lib64`, `/sbin`
//! linked into it), fresh `/proc` and `/dev`, a private `/tmp` and a private `/work`
//! (its current directory) — both tmpfs of `scratch_mb` — holding the program and its
//! input files, and nothing else of the host: no `/etc`, no `/home`, no meshd data
//! directory, no sockets. It runs in new PID, network (no interface but loopback), IPC,
//! UTS, cgroup and user namespaces, as uid/gid 65534 — when meshd runs as root, bwrap
//! itself is started as uid/gid 65534, so that is the program's uid on the host too;
//! when meshd runs as its own user, the program is that user outside the namespace — with every capability dropped, a new
//! session (no terminal), and two seccomp filters: one refuses the calls a sandbox
//! never needs (namespaces, mounts, ptrace, kernel modules, keyrings, bpf, …), one
//! answers `clone3` with ENOSYS so the C library falls back to `clone`, whose namespace
//! flags the first filter can see and refuse.
//!
//! Limits: RLIMIT_CPU (SIGXCPU, then SIGKILL a second later), RLIMIT_DATA (memory),
//! RLIMIT_NPROC, RLIMIT_FSIZE, RLIMIT_CORE 0, RLIMIT_NOFILE; the scratch tmpfs size (the
//! disk); the wall time (the whole sandbox is killed: bwrap dies, and with it PID 1 of
//! the namespace and everything under it); and the output kept.

use std::collections::BTreeMap;
use std::io::{Read as _, Write as _};
use std::os::fd::{AsRawFd, FromRawFd as _, OwnedFd, RawFd};
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use meshd_config::Sandbox as Limits;
use meshd_protocol::exec::{Lang, Request};
use tokio::io::AsyncReadExt as _;

/// Why a run could not happen (the program's own failures are results, not errors).
#[derive(Debug, thiserror::Error)]
pub(crate) enum SandboxError {
    #[error("the host cannot create sandboxes ({0}); execute_code stays off")]
    Unavailable(String),
    #[error("{0} is not installed on this broker")]
    NoInterpreter(&'static str),
    #[error("starting the sandbox: {0}")]
    Spawn(#[from] std::io::Error),
    #[error("building the seccomp filter: {0}")]
    Seccomp(String),
}

/// The uid and gid a program runs as.
const SANDBOX_ID: u32 = 65_534;

/// The wrapper run as the sandbox's command (`$1`: the report pipe's descriptor, `$2`:
/// how many output names follow): runs the interpreter with every descriptor but 0, 1
/// and 2 closed — it cannot write the report (and so forge its own exit status or
/// files) nor keep anything bwrap was handed — then reports the exit status and the
/// requested output files on the pipe.
const WRAPPER: &str = r#"r="$1"; n="$2"; shift 2
outs=("${@:1:$n}"); shift "$n"
( for fd in /proc/self/fd/*; do d=${fd##*/}; [ "$d" -gt 2 ] && eval "exec $d>&-"; done; exec "$@" )
rc=$?
printf 'RC %s\n' "$rc" >&"$r"
for f in "${outs[@]}"; do
  if [ -f "$f" ] && [ ! -L "$f" ]; then
    printf 'FILE %s %s\n' "$(stat -c %s -- "$f")" "$f" >&"$r"
    cat -- "$f" >&"$r"
  fi
done
exit "$rc"
"#;

/// What a run produced.
#[derive(Debug, Default)]
pub(crate) struct Outcome {
    pub(crate) exit_code: Option<i32>,
    pub(crate) signal: Option<i32>,
    pub(crate) limit: Option<&'static str>,
    pub(crate) stdout: Vec<u8>,
    pub(crate) stderr: Vec<u8>,
    pub(crate) truncated: bool,
    pub(crate) wall: Duration,
    pub(crate) cpu: Duration,
    pub(crate) max_rss_kb: u64,
    pub(crate) files: Vec<(String, Option<Vec<u8>>, u64)>,
}

/// A chunk of output, for streaming.
pub(crate) type Chunk = (&'static str, Vec<u8>);

/// The sandbox, checked once at start.
#[derive(Debug)]
pub(crate) struct Sandbox {
    limits: Limits,
    bwrap: PathBuf,
    /// The two seccomp programs (raw `sock_filter` arrays).
    filters: [Vec<u8>; 2],
    as_root: bool,
    /// The cgroup (pids controller) runs are put in, when one is writable here.
    pids_cgroup: Option<PathBuf>,
}

/// A writable pids cgroup for runs: v2 (`/sys/fs/cgroup` with the pids controller) or
/// v1 (`/sys/fs/cgroup/pids`). `None` when neither can be used (not root, no
/// delegation): the process cap is then RLIMIT_NPROC alone.
fn pids_cgroup() -> Option<PathBuf> {
    let v2 = Path::new("/sys/fs/cgroup");
    if std::fs::read_to_string(v2.join("cgroup.controllers"))
        .is_ok_and(|c| c.split_whitespace().any(|x| x == "pids"))
    {
        let base = v2.join("meshd-sandbox");
        let _ = std::fs::write(v2.join("cgroup.subtree_control"), "+pids");
        std::fs::create_dir_all(&base).ok()?;
        std::fs::write(base.join("cgroup.subtree_control"), "+pids").ok()?;
        return Some(base);
    }
    let v1 = Path::new("/sys/fs/cgroup/pids");
    if v1.join("cgroup.procs").exists() {
        let base = v1.join("meshd-sandbox");
        std::fs::create_dir_all(&base).ok()?;
        return base.join("cgroup.procs").exists().then_some(base);
    }
    None
}

/// One run's pids cgroup, removed when dropped (its processes are gone by then).
struct RunCgroup(PathBuf);

impl RunCgroup {
    fn new(base: &Path, max: u64) -> Option<Self> {
        let dir = base.join(format!("run-{}", crate::ids::uuid_v4()));
        std::fs::create_dir(&dir).ok()?;
        let cg = Self(dir);
        std::fs::write(cg.0.join("pids.max"), max.to_string()).ok()?;
        Some(cg)
    }
}

impl Drop for RunCgroup {
    fn drop(&mut self) {
        // Empty once the sandbox is reaped; a straggler still exiting gets a moment.
        for _ in 0..50 {
            if std::fs::remove_dir(&self.0).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        tracing::warn!(cgroup = %self.0.display(), "a sandbox cgroup could not be removed");
    }
}

fn interpreter(lang: Lang) -> (&'static str, &'static str) {
    match lang {
        Lang::Python => ("python", "/usr/bin/python3"),
        Lang::Node => ("node", "/usr/bin/node"),
        Lang::Bash => ("bash", "/usr/bin/bash"),
    }
}

impl Sandbox {
    /// Checks that bubblewrap can make a sandbox here: runs `true` in one.
    pub(crate) fn probe(limits: &Limits) -> Result<Self, SandboxError> {
        let bwrap = which(&limits.bwrap).ok_or_else(|| {
            SandboxError::Unavailable(format!(
                "{} not found (install bubblewrap, or set sandbox.bwrap)",
                limits.bwrap.display()
            ))
        })?;
        // SAFETY: geteuid cannot fail and touches no memory.
        let as_root = unsafe { libc::geteuid() } == 0;
        let sb = Self {
            limits: limits.clone(),
            bwrap,
            filters: filters()?,
            as_root,
            pids_cgroup: pids_cgroup(),
        };
        let out = sb
            .command(&["/usr/bin/true".to_owned()], &[], &[], None)?
            .0
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .output()
            .map_err(|e| SandboxError::Unavailable(e.to_string()))?;
        if !out.status.success() {
            return Err(SandboxError::Unavailable(
                String::from_utf8_lossy(&out.stderr).trim().to_owned(),
            ));
        }
        Ok(sb)
    }

    /// The bwrap command for `argv`, with `files` (name, bytes) written into /work and
    /// `extra_fds` kept open; returns the fds the child must inherit (dropped by the
    /// caller after spawning).
    fn command(
        &self,
        argv: &[String],
        files: &[(String, &[u8])],
        extra_fds: &[RawFd],
        cgroup: Option<&RunCgroup>,
    ) -> Result<(std::process::Command, Vec<OwnedFd>), SandboxError> {
        let mut keep: Vec<OwnedFd> = Vec::new();
        let mut cmd = std::process::Command::new(&self.bwrap);
        let scratch = (self.limits.scratch_mb * 1024 * 1024).to_string();
        cmd.arg("--unshare-all");
        cmd.args([
            "--die-with-parent",
            "--new-session",
            "--ro-bind",
            "/usr",
            "/usr",
        ]);
        for (link, target) in [
            ("/bin", "usr/bin"),
            ("/sbin", "usr/sbin"),
            ("/lib", "usr/lib"),
            ("/lib64", "usr/lib64"),
            ("/lib32", "usr/lib32"),
        ] {
            if Path::new("/").join(target).is_dir() {
                cmd.args(["--symlink", target, link]);
            }
        }
        cmd.args(["--proc", "/proc", "--dev", "/dev"]);
        cmd.args(["--perms", "1777", "--size", &scratch, "--tmpfs", "/tmp"]);
        cmd.args(["--perms", "0777", "--size", &scratch, "--tmpfs", "/work"]);
        for (name, bytes) in files {
            let fd = memfd(name, bytes)?;
            cmd.args(["--perms", "0666", "--file"])
                .arg(fd.as_raw_fd().to_string())
                .arg(format!("/work/{name}"));
            keep.push(fd);
        }
        for f in &self.filters {
            let fd = memfd("seccomp", f)?;
            cmd.arg("--add-seccomp-fd").arg(fd.as_raw_fd().to_string());
            keep.push(fd);
        }
        let id = SANDBOX_ID.to_string();
        cmd.args(["--chdir", "/work", "--uid", &id, "--gid", &id]);
        cmd.args(["--hostname", "sandbox", "--cap-drop", "ALL", "--clearenv"]);
        for (k, v) in [
            ("PATH", "/usr/bin:/bin"),
            ("HOME", "/work"),
            ("TMPDIR", "/tmp"),
            ("LANG", "C.UTF-8"),
            ("PYTHONDONTWRITEBYTECODE", "1"),
        ] {
            cmd.args(["--setenv", k, v]);
        }
        cmd.arg("--").args(argv);
        let inherit: Vec<RawFd> = keep
            .iter()
            .map(AsRawFd::as_raw_fd)
            .chain(extra_fds.iter().copied())
            .collect();
        let l = self.limits.clone();
        let as_root = self.as_root;
        // The child joins its cgroup before anything else runs (a path made here: no
        // allocation after fork).
        let procs_file = cgroup.and_then(|c| {
            std::ffi::CString::new(c.0.join("cgroup.procs").as_os_str().as_encoded_bytes()).ok()
        });
        let counted = procs_file.is_some();
        // SAFETY: only async-signal-safe calls (fcntl, setrlimit) between fork and exec.
        unsafe {
            cmd.pre_exec(move || {
                for fd in &inherit {
                    if libc::fcntl(*fd, libc::F_SETFD, 0) == -1 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                let cpu = l.cpu_time.as_secs().max(1);
                set(libc::RLIMIT_CPU, cpu, cpu + 1)?;
                let mem = l.memory_mb * 1024 * 1024;
                set(libc::RLIMIT_DATA, mem, mem)?;
                let fsize = l.file_size_mb * 1024 * 1024;
                set(libc::RLIMIT_FSIZE, fsize, fsize)?;
                set(libc::RLIMIT_CORE, 0, 0)?;
                set(libc::RLIMIT_NOFILE, 256, 256)?;
                if let Some(path) = &procs_file {
                    let fd = libc::open(path.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
                    if fd == -1 || libc::write(fd, b"0".as_ptr().cast(), 1) != 1 {
                        return Err(std::io::Error::last_os_error());
                    }
                    libc::close(fd);
                }
                // The kernel counts RLIMIT_NPROC per uid (and releases counts of
                // finished sandboxes lazily), so it cannot be the exact per-run cap: with
                // a cgroup it is a backstop; without one it is the cap, with headroom
                // (and, when meshd is not root, room for meshd's own tasks).
                let procs = match (counted, as_root) {
                    (true, _) => l.processes.saturating_mul(8).max(1024),
                    (false, true) => l.processes.saturating_mul(4).max(256),
                    (false, false) => l.processes + 4096,
                };
                set(libc::RLIMIT_NPROC, procs, procs)?;
                if as_root {
                    // bwrap itself runs as uid/gid 65534 (an unprivileged user
                    // namespace), so the program is that uid on the host too.
                    let id = SANDBOX_ID;
                    if libc::setgroups(0, std::ptr::null()) == -1
                        || libc::setgid(id) == -1
                        || libc::setuid(id) == -1
                    {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                Ok(())
            });
        }
        Ok((cmd, keep))
    }

    /// Runs `req` (the program, its files, stdin and args); streams output chunks to
    /// `stream` when given. Ends within the wall time, whatever the program does.
    pub(crate) async fn run(
        &self,
        req: &Request,
        stream: Option<tokio::sync::mpsc::Sender<Chunk>>,
    ) -> Result<Outcome, SandboxError> {
        let (name, path) = interpreter(req.lang);
        if !Path::new(path).exists() {
            return Err(SandboxError::NoInterpreter(name));
        }
        let mut files: Vec<(String, &[u8])> =
            vec![(req.lang.file_name().to_owned(), req.code.as_bytes())];
        for f in &req.files {
            files.push((f.name.clone(), &f.content));
        }
        // The wrapper's report: exit status and output files.
        let (report_r, report_w) = pipe()?;
        let mut argv = vec![
            "/usr/bin/bash".to_owned(),
            "-c".to_owned(),
            WRAPPER.to_owned(),
            "wrapper".to_owned(),
            report_w.as_raw_fd().to_string(),
            req.outputs.len().to_string(),
        ];
        argv.extend(req.outputs.iter().cloned());
        argv.push(path.to_owned());
        argv.push(req.lang.file_name().to_owned());
        argv.extend(req.args.iter().cloned());
        let cgroup = self
            .pids_cgroup
            .as_deref()
            .and_then(|base| RunCgroup::new(base, self.limits.processes));
        // bwrap passes the report pipe through under its own number.
        let (mut cmd, keep) =
            self.command(&argv, &files, &[report_w.as_raw_fd()], cgroup.as_ref())?;
        cmd.stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let started = crate::time::std_instant();
        let mut child = cmd.spawn()?;
        drop(keep);
        drop(report_w);
        let pid = child.id() as libc::pid_t;
        let stdin = child.stdin.take();
        let (stdout, stderr) = (child.stdout.take(), child.stderr.take());
        // Reap (and take the resource usage of) the whole tree in a blocking thread.
        let mut waiter = tokio::task::spawn_blocking(move || {
            let mut status = 0;
            // SAFETY: rusage is plain data; all-zero is a valid value.
            let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
            // SAFETY: both pointers are to live locals; `pid` is our child, not yet
            // reaped (the `Child` is forgotten so nothing else waits for it).
            let r = unsafe { libc::wait4(pid, &raw mut status, 0, &raw mut usage) };
            std::mem::forget(child);
            (r, status, usage)
        });
        let pipes = (|| {
            let piped = || std::io::Error::other("a child pipe is missing");
            Ok::<_, std::io::Error>((
                tokio::process::ChildStdout::from_std(stdout.ok_or_else(piped)?)?,
                tokio::process::ChildStderr::from_std(stderr.ok_or_else(piped)?)?,
            ))
        })();
        let (stdout, stderr) = match pipes {
            Ok(p) => p,
            Err(e) => {
                // SAFETY: `pid` is our unreaped child.
                unsafe { libc::kill(pid, libc::SIGKILL) };
                let _ = (&mut waiter).await;
                return Err(e.into());
            }
        };
        let input = req.stdin.clone();
        let feeder = tokio::task::spawn_blocking(move || {
            if let Some(mut s) = stdin {
                // A program that never reads its input just closes the pipe.
                let _ = s.write_all(&input);
            }
        });
        let cap = usize::try_from(self.limits.output_kb * 1024).unwrap_or(usize::MAX);
        let out_task = tokio::spawn(collect(stdout, "stdout", cap, stream.clone()));
        let err_task = tokio::spawn(collect(stderr, "stderr", cap, stream));
        let report_task = tokio::task::spawn_blocking(move || {
            let mut f = std::fs::File::from(report_r);
            let mut buf = Vec::new();
            // Bounded: the files asked for, each up to the file size limit.
            let _ = (&mut f).take(64 * 1024 * 1024).read_to_end(&mut buf);
            buf
        });
        let (killed, waited) = tokio::select! {
            w = &mut waiter => (false, w),
            () = tokio::time::sleep(self.limits.wall_time) => {
                // SAFETY: `pid` is our unreaped child (it cannot be reused before
                // wait4 returns).
                unsafe { libc::kill(pid, libc::SIGKILL) };
                (true, waiter.await)
            }
        };
        let wall = crate::time::std_instant().saturating_duration_since(started);
        let (r, status, usage) = waited.map_err(|e| std::io::Error::other(e.to_string()))?;
        let _ = feeder.await;
        let (stdout, t1) = out_task.await.unwrap_or_default();
        let (stderr, t2) = err_task.await.unwrap_or_default();
        let report = report_task.await.unwrap_or_default();
        let mut o = Outcome {
            stdout,
            stderr,
            truncated: t1 || t2,
            wall,
            cpu: tv(usage.ru_utime) + tv(usage.ru_stime),
            max_rss_kb: u64::try_from(usage.ru_maxrss).unwrap_or(0),
            ..Outcome::default()
        };
        let (rc, files) = parse_report(&report);
        if killed {
            o.limit = Some("wall_time");
            o.signal = Some(libc::SIGKILL);
        } else if let Some(rc) = rc {
            if rc > 128 {
                o.signal = Some(rc - 128);
            } else {
                o.exit_code = Some(rc);
            }
        } else if r == pid && libc::WIFSIGNALED(status) {
            o.signal = Some(libc::WTERMSIG(status));
        } else if r == pid && libc::WIFEXITED(status) {
            o.exit_code = Some(libc::WEXITSTATUS(status));
        }
        if o.limit.is_none() {
            o.limit = match o.signal {
                Some(libc::SIGXCPU) => Some("cpu_time"),
                Some(libc::SIGKILL) if o.cpu >= self.limits.cpu_time => Some("cpu_time"),
                Some(libc::SIGXFSZ) => Some("file_size"),
                _ => None,
            };
        }
        o.files = req
            .outputs
            .iter()
            .map(|n| match files.iter().find(|(f, _)| f == n) {
                Some((_, bytes)) => (n.clone(), Some(bytes.clone()), bytes.len() as u64),
                None => (n.clone(), None, 0),
            })
            .collect();
        if let Some(cg) = cgroup {
            // rmdir may wait for the last exiting task: off the async threads.
            let _ = tokio::task::spawn_blocking(move || drop(cg)).await;
        }
        Ok(o)
    }
}

/// Reads a pipe to its end, keeping the first `cap` bytes; streams chunks meanwhile.
async fn collect<R: tokio::io::AsyncRead + Unpin>(
    mut r: R,
    name: &'static str,
    cap: usize,
    stream: Option<tokio::sync::mpsc::Sender<Chunk>>,
) -> (Vec<u8>, bool) {
    let mut kept = Vec::new();
    let mut truncated = false;
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        match r.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                let room = cap.saturating_sub(kept.len());
                let take = n.min(room);
                kept.extend_from_slice(&buf[..take]);
                if take < n {
                    truncated = true;
                }
                if take > 0
                    && let Some(s) = &stream
                {
                    // A slow reader of the stream loses chunks, never the result.
                    let _ = s.try_send((name, buf[..take].to_vec()));
                }
            }
        }
    }
    (kept, truncated)
}

/// The wrapper's fd-3 report: `RC n`, then `FILE size name` + bytes per file.
fn parse_report(mut b: &[u8]) -> (Option<i32>, Vec<(String, Vec<u8>)>) {
    let mut rc = None;
    let mut files = Vec::new();
    while let Some(nl) = b.iter().position(|&c| c == b'\n') {
        let line = String::from_utf8_lossy(&b[..nl]).into_owned();
        b = &b[nl + 1..];
        if let Some(n) = line.strip_prefix("RC ") {
            rc = n.trim().parse().ok();
        } else if let Some(rest) = line.strip_prefix("FILE ") {
            let Some((size, name)) = rest.split_once(' ') else {
                break;
            };
            let Ok(size) = size.parse::<usize>() else {
                break;
            };
            let take = size.min(b.len());
            files.push((name.to_owned(), b[..take].to_vec()));
            b = &b[take..];
        } else {
            break;
        }
    }
    (rc, files)
}

fn tv(t: libc::timeval) -> Duration {
    Duration::from_secs(u64::try_from(t.tv_sec).unwrap_or(0))
        + Duration::from_micros(u64::try_from(t.tv_usec).unwrap_or(0))
}

fn set(resource: libc::__rlimit_resource_t, soft: u64, hard: u64) -> std::io::Result<()> {
    let lim = libc::rlimit {
        rlim_cur: soft,
        rlim_max: hard,
    };
    // SAFETY: a pointer to a live local.
    if unsafe { libc::setrlimit(resource, &raw const lim) } == -1 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// An anonymous in-memory file holding `bytes`, positioned at its start.
fn memfd(name: &str, bytes: &[u8]) -> std::io::Result<OwnedFd> {
    let cname = std::ffi::CString::new(name.replace('\0', "")).unwrap_or_default();
    // SAFETY: a valid NUL-terminated name.
    let fd = unsafe { libc::memfd_create(cname.as_ptr(), libc::MFD_CLOEXEC) };
    if fd == -1 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: a fresh descriptor we own.
    let mut f = unsafe { std::fs::File::from_raw_fd(fd) };
    f.write_all(bytes)?;
    std::io::Seek::seek(&mut f, std::io::SeekFrom::Start(0))?;
    Ok(OwnedFd::from(f))
}

fn pipe() -> std::io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0; 2];
    // SAFETY: a pointer to two live ints.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } == -1 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: both descriptors are fresh and ours.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// `bin` as given if it has a slash, else found on PATH.
fn which(bin: &Path) -> Option<PathBuf> {
    if bin.components().count() > 1 {
        return bin.is_file().then(|| bin.to_owned());
    }
    std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .map(|d| d.join(bin))
        .find(|p| p.is_file())
}

/// The two seccomp programs: refused calls (EPERM), and `clone3` (ENOSYS).
fn filters() -> Result<[Vec<u8>; 2], SandboxError> {
    use seccompiler::{
        SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
        SeccompRule, TargetArch,
    };
    let arch = TargetArch::try_from(std::env::consts::ARCH)
        .map_err(|e| SandboxError::Seccomp(e.to_string()))?;
    let err = |e: seccompiler::BackendError| SandboxError::Seccomp(e.to_string());
    let mut denied: BTreeMap<i64, Vec<SeccompRule>> = [
        libc::SYS_ptrace,
        libc::SYS_mount,
        libc::SYS_umount2,
        libc::SYS_pivot_root,
        libc::SYS_chroot,
        libc::SYS_unshare,
        libc::SYS_setns,
        libc::SYS_kexec_load,
        libc::SYS_init_module,
        libc::SYS_finit_module,
        libc::SYS_delete_module,
        libc::SYS_bpf,
        libc::SYS_perf_event_open,
        libc::SYS_keyctl,
        libc::SYS_add_key,
        libc::SYS_request_key,
        libc::SYS_userfaultfd,
        libc::SYS_process_vm_readv,
        libc::SYS_process_vm_writev,
        libc::SYS_reboot,
        libc::SYS_swapon,
        libc::SYS_swapoff,
        libc::SYS_open_by_handle_at,
        libc::SYS_name_to_handle_at,
        libc::SYS_acct,
        libc::SYS_quotactl,
        libc::SYS_settimeofday,
        libc::SYS_clock_settime,
        libc::SYS_fsopen,
        libc::SYS_fsmount,
        libc::SYS_fsconfig,
        libc::SYS_move_mount,
        libc::SYS_open_tree,
        libc::SYS_mount_setattr,
        libc::SYS_io_uring_setup,
    ]
    .into_iter()
    .map(|nr| (nr, Vec::new()))
    .collect();
    // `clone` with any namespace flag.
    let ns_flags = [
        libc::CLONE_NEWUSER,
        libc::CLONE_NEWNS,
        libc::CLONE_NEWNET,
        libc::CLONE_NEWPID,
        libc::CLONE_NEWIPC,
        libc::CLONE_NEWUTS,
        libc::CLONE_NEWCGROUP,
    ];
    let clone_rules = ns_flags
        .iter()
        .map(|f| {
            let f = u64::try_from(*f).unwrap_or(0);
            SeccompRule::new(vec![
                SeccompCondition::new(0, SeccompCmpArgLen::Qword, SeccompCmpOp::MaskedEq(f), f)
                    .map_err(err)?,
            ])
            .map_err(err)
        })
        .collect::<Result<Vec<_>, _>>()?;
    denied.insert(libc::SYS_clone, clone_rules);
    let eperm = u32::try_from(libc::EPERM).unwrap_or(1);
    let a: seccompiler::BpfProgram = SeccompFilter::new(
        denied,
        SeccompAction::Allow,
        SeccompAction::Errno(eperm),
        arch,
    )
    .map_err(err)?
    .try_into()
    .map_err(err)?;
    let enosys = u32::try_from(libc::ENOSYS).unwrap_or(38);
    let b: seccompiler::BpfProgram = SeccompFilter::new(
        [(libc::SYS_clone3, Vec::new())].into_iter().collect(),
        SeccompAction::Allow,
        SeccompAction::Errno(enosys),
        arch,
    )
    .map_err(err)?
    .try_into()
    .map_err(err)?;
    let bytes = |p: seccompiler::BpfProgram| {
        p.iter()
            .flat_map(|i| {
                let mut v = Vec::with_capacity(8);
                v.extend_from_slice(&i.code.to_ne_bytes());
                v.push(i.jt);
                v.push(i.jf);
                v.extend_from_slice(&i.k.to_ne_bytes());
                v
            })
            .collect()
    };
    Ok([bytes(a), bytes(b)])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_report_is_parsed_within_its_bounds() {
        let (rc, files) = parse_report(b"RC 3\nFILE 2 a.txt\nhiFILE 5 b\nxy");
        assert_eq!(rc, Some(3));
        assert_eq!(
            files,
            vec![
                ("a.txt".into(), b"hi".to_vec()),
                ("b".into(), b"xy".to_vec())
            ]
        );
        assert_eq!(parse_report(b"garbage\nRC 1\n").0, None);
    }

    #[test]
    fn the_filters_compile() {
        let [a, b] = filters().expect("filters");
        assert!(a.len() > 8 * 30 && a.len() % 8 == 0);
        assert!(b.len() % 8 == 0 && !b.is_empty());
    }
}
