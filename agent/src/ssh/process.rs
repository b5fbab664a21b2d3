//! Starting a user's program as an OS login, the way login(1) and OpenSSH's privilege separation
//! do it, and signalling it without ever hitting a recycled pid.
//!
//! - Everything that needs NSS (the passwd entry, the supplementary groups, the `tty` group) is
//!   resolved in the parent; between fork and exec the child makes only async-signal-safe system
//!   calls: `setsid`, `TIOCSCTTY`, `setgroups` → `setgid` → `setuid`, a check that root cannot be
//!   regained, `chdir` to the home (after the drop, so a home the login cannot enter falls back to
//!   `/` as in OpenSSH), and `close_range(CLOSE_RANGE_CLOEXEC)` so that no descriptor of the agent
//!   survives the exec.
//! - PTYs are opened close-on-exec (master and slave); the slave belongs to the login, group
//!   `tty`, mode 0620, as OpenSSH's `pty_setowner` leaves it.
//! - [`ProcessGroup`] is the only way to signal a session's processes: it forgets the pid before
//!   the child is reaped, so a signal from the client can never reach a process group that reused
//!   the number.

use std::ffi::CString;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::process::Stdio;
use std::sync::{Arc, Mutex};

use nix::fcntl::OFlag;
use nix::sys::signal::Signal;
use nix::unistd::{Gid, Pid, Uid};
use russh::Sig;

/// Where Debian, Fedora and Arch keep OpenSSH's SFTP server.
const SFTP_SERVERS: &[&str] = &[
    "/usr/lib/openssh/sftp-server",
    "/usr/libexec/openssh/sftp-server",
    "/usr/lib/ssh/sftp-server",
    "/usr/libexec/sftp-server",
];

/// `close_range(2)` flag: mark the range close-on-exec instead of closing it (Linux 5.11), which
/// keeps the standard library's own exec-error pipe working.
const CLOSE_RANGE_CLOEXEC: libc::c_uint = 1 << 2;

/// An OS login, resolved in the parent (NSS lookups are not safe between fork and exec).
#[derive(Debug, Clone)]
pub struct Login {
    pub name: String,
    pub uid: Uid,
    pub gid: Gid,
    /// Supplementary groups, as `initgroups` would set them.
    pub groups: Vec<Gid>,
    pub home: std::path::PathBuf,
    pub shell: String,
}

impl Login {
    /// Looks `name` up; `None` if the node has no such login.
    pub fn resolve(name: &str) -> anyhow::Result<Option<Login>> {
        let Some(user) = nix::unistd::User::from_name(name)? else {
            return Ok(None);
        };
        let cname = CString::new(name)?;
        let groups = nix::unistd::getgrouplist(&cname, user.gid)?;
        let shell = user.shell.to_string_lossy().into_owned();
        Ok(Some(Login {
            name: name.to_string(),
            uid: user.uid,
            gid: user.gid,
            groups,
            home: user.dir,
            shell: if shell.is_empty() {
                "/bin/sh".to_string()
            } else {
                shell
            },
        }))
    }
}

/// What to run.
pub enum Program<'a> {
    /// The login's shell as a login shell.
    Shell,
    /// `shell -c COMMAND`.
    Command(&'a str),
    /// The system's sftp-server.
    Sftp,
}

/// A terminal the client asked for: TERM, columns, rows.
#[derive(Debug, Clone)]
pub struct PtySpec {
    pub term: String,
    pub cols: u16,
    pub rows: u16,
}

/// How the program's I/O reaches the agent.
pub enum Io {
    /// The PTY master (close-on-exec).
    Pty(OwnedFd),
    /// stdin, stdout and stderr are pipes on the `Child`.
    Pipes,
}

/// A started program.
pub struct Spawned {
    pub child: tokio::process::Child,
    pub io: Io,
    pub group: Arc<ProcessGroup>,
}

/// Starts `program` as `login` with a clean environment plus `env`.
pub fn spawn(
    login: &Login,
    program: Program<'_>,
    pty: Option<&PtySpec>,
    env: &[(String, String)],
) -> anyhow::Result<Spawned> {
    let me = nix::unistd::geteuid();
    if !me.is_root() && me != login.uid {
        anyhow::bail!(
            "the agent runs as uid {me} and cannot start sessions as {}",
            login.name
        );
    }
    let mut cmd = match program {
        Program::Sftp => {
            let server = SFTP_SERVERS
                .iter()
                .find(|p| std::path::Path::new(p).exists())
                .ok_or_else(|| {
                    anyhow::anyhow!("no sftp-server on this node (install openssh-sftp-server)")
                })?;
            std::process::Command::new(server)
        }
        Program::Command(c) => {
            let mut cmd = std::process::Command::new(&login.shell);
            cmd.arg("-c").arg(c);
            cmd
        }
        Program::Shell => {
            let mut cmd = std::process::Command::new(&login.shell);
            let base = login.shell.rsplit('/').next().unwrap_or("sh");
            cmd.arg0(format!("-{base}"));
            cmd
        }
    };
    let path = if login.uid.is_root() {
        "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
    } else {
        "/usr/local/bin:/usr/bin:/bin"
    };
    cmd.env_clear()
        .env("HOME", &login.home)
        .env("USER", &login.name)
        .env("LOGNAME", &login.name)
        .env("SHELL", &login.shell)
        .env("PATH", path);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let io = match pty {
        Some(spec) => {
            let (master, slave) = open_pty(spec, login)?;
            cmd.env("TERM", &spec.term);
            cmd.stdin(Stdio::from(slave.try_clone()?))
                .stdout(Stdio::from(slave.try_clone()?))
                .stderr(Stdio::from(slave));
            Io::Pty(master)
        }
        None => {
            cmd.stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped());
            Io::Pipes
        }
    };
    let drop_to = me
        .is_root()
        .then(|| (login.groups.clone(), login.gid, login.uid));
    let home = CString::new(login.home.as_os_str().as_encoded_bytes())?;
    let controlling_tty = pty.is_some();
    // SAFETY: the closure makes only async-signal-safe system calls on memory prepared before
    // the fork; it allocates nothing and takes no lock.
    unsafe {
        cmd.pre_exec(move || child_setup(controlling_tty, drop_to.as_ref(), &home));
    }
    let mut cmd = tokio::process::Command::from(cmd);
    cmd.kill_on_drop(false);
    let child = cmd.spawn()?;
    let pid = child
        .id()
        .map(|p| Pid::from_raw(p as i32))
        .ok_or_else(|| anyhow::anyhow!("the session's process vanished at once"))?;
    Ok(Spawned {
        child,
        io,
        group: Arc::new(ProcessGroup {
            pid: Mutex::new(Some(pid)),
        }),
    })
}

/// Runs in the child between fork and exec: new session (and controlling terminal), privilege
/// drop, home directory, and every inherited descriptor above stderr marked close-on-exec.
fn child_setup(
    controlling_tty: bool,
    drop_to: Option<&(Vec<Gid>, Gid, Uid)>,
    home: &CString,
) -> std::io::Result<()> {
    nix::unistd::setsid()?;
    // SAFETY: plain system calls on descriptors and memory this process owns.
    unsafe {
        if controlling_tty && libc::ioctl(0, libc::TIOCSCTTY as _, 0) < 0 {
            return Err(std::io::Error::last_os_error());
        }
        if let Some((groups, gid, uid)) = drop_to {
            nix::unistd::setgroups(groups)?;
            nix::unistd::setgid(*gid)?;
            nix::unistd::setuid(*uid)?;
            // As OpenSSH's permanently_set_uid: a dropped process must not get root back.
            if !uid.is_root() && libc::setuid(0) == 0 {
                return Err(std::io::Error::other("could regain root after the drop"));
            }
        }
        if libc::chdir(home.as_ptr()) != 0 {
            libc::chdir(c"/".as_ptr());
        }
        let marked = libc::syscall(
            libc::SYS_close_range,
            3 as libc::c_uint,
            libc::c_uint::MAX,
            CLOSE_RANGE_CLOEXEC,
        );
        if marked != 0 {
            // Kernels before 5.11: every descriptor the limit allows, one by one.
            let mut limit = libc::rlimit {
                rlim_cur: 0,
                rlim_max: 0,
            };
            let top = if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 {
                limit.rlim_cur.min(1 << 20) as libc::c_int
            } else {
                1024
            };
            for fd in 3..top {
                libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC);
            }
        }
    }
    Ok(())
}

/// Opens a PTY pair, both ends close-on-exec, sized as asked, the slave owned by `login`.
fn open_pty(spec: &PtySpec, login: &Login) -> anyhow::Result<(OwnedFd, OwnedFd)> {
    let master = nix::pty::posix_openpt(OFlag::O_RDWR | OFlag::O_NOCTTY | OFlag::O_CLOEXEC)?;
    nix::pty::grantpt(&master)?;
    nix::pty::unlockpt(&master)?;
    let name = CString::new(nix::pty::ptsname_r(&master)?)?;
    // SAFETY: open(2) on a valid C string; the result is checked before use.
    let slave = unsafe {
        let fd = libc::open(
            name.as_ptr(),
            libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC,
        );
        if fd < 0 {
            return Err(std::io::Error::last_os_error().into());
        }
        OwnedFd::from_raw_fd(fd)
    };
    let master = OwnedFd::from(master);
    set_window_size(&master, spec.cols, spec.rows);
    if nix::unistd::geteuid().is_root() {
        // OpenSSH's pty_setowner: the login's terminal, writable by group tty (for write(1)).
        let (group, mode) = match nix::unistd::Group::from_name("tty") {
            Ok(Some(tty)) => (tty.gid, 0o620),
            _ => (login.gid, 0o600),
        };
        nix::unistd::fchown(&slave, Some(login.uid), Some(group))?;
        nix::sys::stat::fchmod(&slave, nix::sys::stat::Mode::from_bits_truncate(mode))?;
    }
    Ok((master, slave))
}

/// Sets a terminal's size (`TIOCSWINSZ`).
pub fn set_window_size(master: &OwnedFd, cols: u16, rows: u16) {
    let size = libc::winsize {
        ws_row: rows,
        ws_col: cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCSWINSZ reads one winsize from a valid pointer.
    unsafe {
        libc::ioctl(master.as_raw_fd(), libc::TIOCSWINSZ, &size);
    }
}

/// The process group a session's program leads (it called `setsid`, so its pid is the group's
/// id). Signals go through here; [`wait`] forgets the pid before reaping the child, so a pid that
/// the kernel recycled is never signalled.
pub struct ProcessGroup {
    pid: Mutex<Option<Pid>>,
}

impl ProcessGroup {
    /// Sends `signal` to the group if its leader has not been reaped yet.
    pub fn signal(&self, signal: Signal) {
        let pid = self.pid.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(pid) = *pid {
            // While the leader is unreaped (at worst a zombie) its pid cannot be reused, and the
            // lock keeps `wait` from reaping it meanwhile.
            let _ = nix::sys::signal::killpg(pid, signal);
        }
    }

    fn forget(&self) {
        *self.pid.lock().unwrap_or_else(|p| p.into_inner()) = None;
    }
}

/// Waits for the session's program to exit, then reaps it. The exit is observed through a pidfd
/// (which does not reap), the group forgets the pid, and only then is the child reaped. Kernels
/// without pidfds (before 5.3) reap first and forget right after.
pub async fn wait(
    child: &mut tokio::process::Child,
    group: &ProcessGroup,
) -> std::io::Result<std::process::ExitStatus> {
    if let Some(pid) = child.id()
        && let Some(pidfd) = pidfd_open(pid)
        // SAFETY: the AsyncFd owns the OwnedFd, which stays open until the AsyncFd is dropped.
        && let Ok(ready) = unsafe {
            tokio::io::unix::AsyncFd::register_with_interest(pidfd, tokio::io::Interest::READABLE)
        }
    {
        // A pidfd turns readable when the process exits (and stays so).
        let _ = ready.readable().await;
        group.forget();
        return child.wait().await;
    }
    let status = child.wait().await;
    group.forget();
    status
}

fn pidfd_open(pid: u32) -> Option<OwnedFd> {
    // SAFETY: pidfd_open takes a pid and flags; a non-negative result is a new descriptor.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
    if fd < 0 {
        return None;
    }
    // SAFETY: the kernel just returned this descriptor to us; nobody else owns it.
    let fd = unsafe { OwnedFd::from_raw_fd(fd as libc::c_int) };
    // pidfds are close-on-exec from creation.
    Some(fd)
}

/// The SSH name of a signal that ended a program.
pub fn signal_name(sig: i32) -> Sig {
    match Signal::try_from(sig) {
        Ok(Signal::SIGABRT) => Sig::ABRT,
        Ok(Signal::SIGALRM) => Sig::ALRM,
        Ok(Signal::SIGFPE) => Sig::FPE,
        Ok(Signal::SIGHUP) => Sig::HUP,
        Ok(Signal::SIGILL) => Sig::ILL,
        Ok(Signal::SIGINT) => Sig::INT,
        Ok(Signal::SIGKILL) => Sig::KILL,
        Ok(Signal::SIGPIPE) => Sig::PIPE,
        Ok(Signal::SIGQUIT) => Sig::QUIT,
        Ok(Signal::SIGSEGV) => Sig::SEGV,
        Ok(Signal::SIGTERM) => Sig::TERM,
        Ok(Signal::SIGUSR1) => Sig::USR1,
        Ok(other) => Sig::Custom(other.as_str().trim_start_matches("SIG").to_string()),
        Err(_) => Sig::Custom(sig.to_string()),
    }
}

/// The signal an SSH client asked for, if it names one.
pub fn to_signal(sig: &Sig) -> Option<Signal> {
    Some(match sig {
        Sig::ABRT => Signal::SIGABRT,
        Sig::ALRM => Signal::SIGALRM,
        Sig::FPE => Signal::SIGFPE,
        Sig::HUP => Signal::SIGHUP,
        Sig::ILL => Signal::SIGILL,
        Sig::INT => Signal::SIGINT,
        Sig::KILL => Signal::SIGKILL,
        Sig::PIPE => Signal::SIGPIPE,
        Sig::QUIT => Signal::SIGQUIT,
        Sig::SEGV => Signal::SIGSEGV,
        Sig::TERM => Signal::SIGTERM,
        Sig::USR1 => Signal::SIGUSR1,
        Sig::Custom(name) => format!("SIG{name}").parse().ok()?,
    })
}
