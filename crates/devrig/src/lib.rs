//! Local services for outbox-relay's tests, demo and benchmark: a private PostgreSQL
//! cluster (`wal_level=logical`), a tansu Kafka-compatible broker and a RabbitMQ node, each
//! on free loopback ports, each stopped when its value is dropped or the process exits.
//!
//! Nothing here depends on a system service. Binaries are found as follows:
//! PostgreSQL from `PG_BINDIR`, else the newest `/usr/lib/postgresql/*/bin`; tansu from
//! `TANSU_BIN`, else `.tools/bin/tansu` in the workspace, else `tansu` on `PATH`.
//! `scripts/install-deps` installs both.

#![allow(unsafe_code)]

use std::io;
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Mutex, Once};
use std::time::{Duration, Instant};

/// A free TCP port on 127.0.0.1, as the kernel hands it out.
pub fn free_port() -> io::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// `N` distinct free ports: each is held until all are found, so that the kernel cannot
/// hand out one of them twice (as [`free_port`] called `N` times may).
pub fn free_ports<const N: usize>() -> io::Result<[u16; N]> {
    let mut listeners = Vec::with_capacity(N);
    let mut ports = [0; N];
    for port in &mut ports {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        *port = listener.local_addr()?.port();
        listeners.push(listener);
    }
    Ok(ports)
}

/// Waits until `condition` holds, checking every 20 ms, or fails after `timeout`.
pub fn wait_until(timeout: Duration, what: &str, mut condition: impl FnMut() -> bool) -> io::Result<()> {
    let deadline = Instant::now() + timeout;
    while !condition() {
        if Instant::now() > deadline {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("timed out after {timeout:?} waiting for {what}"),
            ));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

fn port_open(port: u16) -> bool {
    TcpStream::connect_timeout(&([127, 0, 0, 1], port).into(), Duration::from_millis(200)).is_ok()
}

// ---------------------------------------------------------------------------
// Cleanup at exit: processes and directories that shared (static) services own.

static CLEANUP: Mutex<Vec<Cleanup>> = Mutex::new(Vec::new());
static REGISTER_AT_EXIT: Once = Once::new();

enum Cleanup {
    Process {
        pid: u32,
        signal: i32,
    },
    /// A process group (a server whose script starts children), killed whole.
    Group {
        pgid: u32,
    },
    Directory(PathBuf),
}

extern "C" fn clean_up_at_exit() {
    let Ok(mut items) = CLEANUP.lock() else { return };
    for item in items.iter() {
        match item {
            Cleanup::Process { pid, signal } => kill(*pid, *signal),
            Cleanup::Group { pgid } => unsafe {
                libc::kill(-(*pgid as libc::pid_t), libc::SIGKILL);
            },
            Cleanup::Directory(_) => {}
        }
    }
    for item in items.iter() {
        if let Cleanup::Process { pid, .. } = item {
            reap(*pid, Duration::from_secs(5));
        }
    }
    for item in items.drain(..) {
        if let Cleanup::Directory(path) = item {
            let _ = std::fs::remove_dir_all(path);
        }
    }
}

fn register(item: Cleanup) {
    REGISTER_AT_EXIT.call_once(|| unsafe {
        libc::atexit(clean_up_at_exit);
    });
    if let Ok(mut items) = CLEANUP.lock() {
        items.push(item);
    }
}

fn unregister_pid(pid: u32) {
    if let Ok(mut items) = CLEANUP.lock() {
        items.retain(|item| !matches!(item, Cleanup::Process { pid: p, .. } | Cleanup::Group { pgid: p } if *p == pid));
    }
}

fn unregister_dir(path: &Path) {
    if let Ok(mut items) = CLEANUP.lock() {
        items.retain(|item| !matches!(item, Cleanup::Directory(p) if p == path));
    }
}

/// Sends `signal` to `pid`.
pub fn kill(pid: u32, signal: i32) {
    unsafe {
        libc::kill(pid as libc::pid_t, signal);
    }
}

/// Waits (bounded) for a child process to exit, collecting its status.
fn reap(pid: u32, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    loop {
        let mut status = 0;
        let done = unsafe { libc::waitpid(pid as libc::pid_t, &mut status, libc::WNOHANG) };
        if done != 0 || Instant::now() > deadline {
            return;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn scratch_dir(kind: &str) -> io::Result<PathBuf> {
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!("outbox-relay-{kind}-{}-{n}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

// ---------------------------------------------------------------------------
// PostgreSQL

/// A private PostgreSQL cluster. Superuser `postgres`, password authentication over TCP.
pub struct Postgres {
    pub port: u16,
    pub password: String,
    dir: PathBuf,
    bindir: PathBuf,
    owner: Option<(u32, u32)>,
    child: Option<Child>,
}

impl Postgres {
    /// Runs initdb in a fresh directory and starts the server on a free port.
    pub fn start() -> io::Result<Postgres> {
        Self::start_with(&[])
    }

    /// As [`start`](Self::start), with extra `name=value` server settings.
    pub fn start_with(settings: &[&str]) -> io::Result<Postgres> {
        Self::start_configured(&Options {
            settings,
            ..Options::default()
        })
    }

    /// As [`start`](Self::start), configured by `options`.
    pub fn start_configured(options: &Options<'_>) -> io::Result<Postgres> {
        let settings = options.settings;
        let bindir = match options.major {
            Some(major) => pg_bindir_for(major)?,
            None => pg_bindir()?,
        };
        let dir = scratch_dir("pg")?;
        let owner = postgres_owner()?;
        let password = format!("pw{}", std::process::id());
        let pwfile = dir.join("pwfile");
        std::fs::write(&pwfile, &password)?;
        let data = dir.join("data");
        std::fs::create_dir_all(&data)?;
        if let Some((uid, gid)) = owner {
            for path in [&dir, &data, &pwfile] {
                std::os::unix::fs::chown(path, Some(uid), Some(gid))?;
            }
        }
        let mut initdb = Command::new(bindir.join("initdb"));
        initdb
            .arg("-D")
            .arg(&data)
            .args([
                "-U",
                "postgres",
                "-E",
                "UTF8",
                "--no-sync",
                "--auth-local=trust",
                "--auth-host=scram-sha-256",
            ])
            .arg(format!("--pwfile={}", pwfile.display()))
            .stdout(Stdio::null());
        as_owner(&mut initdb, owner);
        run_tool(&mut initdb, "initdb")?;
        // In the file rather than on the command line, so `settings` (later lines win)
        // can override it, e.g. to test a server without logical decoding.
        let mut extra = String::from("wal_level = logical\n");
        for setting in settings {
            extra.push_str(setting);
            extra.push('\n');
        }
        if let Some(tls) = options.tls {
            for (name, contents) in [
                ("server.crt", tls.server_cert.as_str()),
                ("server.key", tls.server_key.as_str()),
                ("root.crt", tls.ca_cert.as_str()),
            ] {
                let path = data.join(name);
                std::fs::write(&path, contents)?;
                use std::os::unix::fs::PermissionsExt;
                std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
                if let Some((uid, gid)) = owner {
                    std::os::unix::fs::chown(&path, Some(uid), Some(gid))?;
                }
            }
            extra.push_str(
                "ssl = on\nssl_cert_file = 'server.crt'\nssl_key_file = 'server.key'\nssl_ca_file = 'root.crt'\n",
            );
        }
        if let Some(hba) = options.hba {
            std::fs::write(data.join("pg_hba.conf"), hba)?;
        }
        std::fs::write(data.join("postgresql.auto.conf"), extra)?;
        register(Cleanup::Directory(dir.clone()));
        let mut postgres = Postgres {
            port: free_port()?,
            password,
            dir,
            bindir,
            owner,
            child: None,
        };
        postgres.launch()?;
        Ok(postgres)
    }

    fn launch(&mut self) -> io::Result<()> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("postgres.log"))?;
        if let Some((uid, gid)) = self.owner {
            std::os::unix::fs::chown(self.dir.join("postgres.log"), Some(uid), Some(gid))?;
        }
        let mut command = Command::new(self.bindir.join("postgres"));
        command
            .arg("-D")
            .arg(self.dir.join("data"))
            .arg("-p")
            .arg(self.port.to_string())
            .arg("-c")
            .arg(format!("unix_socket_directories={}", self.dir.display()))
            .args([
                "-c",
                "listen_addresses=127.0.0.1",
                "-c",
                "max_replication_slots=200",
                "-c",
                "max_wal_senders=200",
                "-c",
                "max_connections=500",
                "-c",
                "fsync=off",
                "-c",
                "full_page_writes=off",
                "-c",
                "shared_buffers=256MB",
                "-c",
                "max_wal_size=4GB",
                "-c",
                "log_min_messages=warning",
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log);
        as_owner(&mut command, self.owner);
        let child = command.spawn()?;
        register(Cleanup::Process {
            pid: child.id(),
            signal: libc::SIGQUIT,
        });
        self.child = Some(child);
        let port = self.port;
        let isready = client_tool(&self.bindir, "pg_isready")?;
        wait_until(Duration::from_secs(60), "PostgreSQL to accept connections", || {
            Command::new(&isready)
                .args(["-q", "-h", "127.0.0.1", "-p", &port.to_string()])
                .status()
                .is_ok_and(|s| s.success())
        })
        .map_err(|e| io::Error::other(format!("{e}; log: {}", self.log_tail())))
    }

    /// A connection URL for `database` as the superuser.
    pub fn url(&self, database: &str) -> String {
        format!(
            "postgres://postgres:{}@127.0.0.1:{}/{database}",
            self.password, self.port
        )
    }

    /// A connection URL for `database` as the superuser over the Unix socket (trusted
    /// locally, also on a server that refuses TCP connections without TLS).
    pub fn socket_url(&self, database: &str) -> String {
        let dir = self.dir.display().to_string().replace('/', "%2F");
        format!("postgres://postgres@{dir}:{}/{database}", self.port)
    }

    /// The postmaster's process id.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Fast shutdown (like `pg_ctl stop -m fast`), waiting for the server to exit.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            kill(child.id(), libc::SIGINT);
            let _ = child.wait();
            unregister_pid(child.id());
        }
    }

    /// Immediate shutdown (`pg_ctl stop -m immediate`): the server dies as in a crash.
    pub fn crash(&mut self) {
        if let Some(mut child) = self.child.take() {
            kill(child.id(), libc::SIGQUIT);
            let _ = child.wait();
            unregister_pid(child.id());
        }
    }

    /// The server's major version (from its `postgres --version`).
    pub fn major(&self) -> io::Result<u32> {
        major_of(&self.bindir)
    }

    /// A streaming standby of `primary`, from a base backup taken over `primary`'s Unix
    /// socket, following it through the physical slot `slot` (created by the backup), with
    /// extra `settings` (e.g. `sync_replication_slots = on`). It runs the same binaries.
    pub fn start_standby(primary: &Postgres, slot: &str, settings: &[&str]) -> io::Result<Postgres> {
        let dir = scratch_dir("pg-standby")?;
        let data = dir.join("data");
        let owner = primary.owner;
        if let Some((uid, gid)) = owner {
            std::os::unix::fs::chown(&dir, Some(uid), Some(gid))?;
        }
        register(Cleanup::Directory(dir.clone()));
        let conninfo = format!(
            "host={} port={} user=postgres dbname=postgres",
            primary.dir.display(),
            primary.port
        );
        let mut backup = Command::new(client_tool(&primary.bindir, "pg_basebackup")?);
        backup
            .arg("-D")
            .arg(&data)
            .args(["-R", "-X", "stream", "-C", "-S", slot, "-d", &conninfo])
            .stdout(Stdio::null());
        as_owner(&mut backup, owner);
        run_tool(&mut backup, "pg_basebackup")?;
        // After the copied settings and -R's lines: later lines win.
        let mut extra = std::fs::read_to_string(data.join("postgresql.auto.conf"))?;
        extra.push_str(&format!(
            "primary_conninfo = '{conninfo}'\nprimary_slot_name = '{slot}'\n"
        ));
        for setting in settings {
            extra.push_str(setting);
            extra.push('\n');
        }
        std::fs::write(data.join("postgresql.auto.conf"), extra)?;
        let mut standby = Postgres {
            port: free_port()?,
            password: primary.password.clone(),
            dir,
            bindir: primary.bindir.clone(),
            owner,
            child: None,
        };
        standby.launch()?;
        Ok(standby)
    }

    /// Promotes a standby (`pg_ctl promote`), waiting until it accepts writes.
    pub fn promote(&self) -> io::Result<()> {
        let mut promote = Command::new(self.bindir.join("pg_ctl"));
        promote
            .args(["promote", "-w", "-D"])
            .arg(self.dir.join("data"))
            .stdout(Stdio::null());
        as_owner(&mut promote, self.owner);
        run_tool(&mut promote, "pg_ctl promote")
    }

    /// Stops and starts the server on the same port and data (`pg_ctl restart -m fast`).
    pub fn restart(&mut self) -> io::Result<()> {
        self.stop();
        self.launch()
    }

    /// The last lines of the server log, for error messages.
    pub fn log_tail(&self) -> String {
        let log = std::fs::read_to_string(self.dir.join("postgres.log")).unwrap_or_default();
        let lines: Vec<&str> = log.lines().rev().take(20).collect();
        lines.into_iter().rev().collect::<Vec<_>>().join("\n")
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        if let Some(child) = self.child.take() {
            kill(child.id(), libc::SIGQUIT);
            reap(child.id(), Duration::from_secs(5));
            unregister_pid(child.id());
        }
        let _ = std::fs::remove_dir_all(&self.dir);
        unregister_dir(&self.dir);
    }
}

/// How to start a [`Postgres`].
#[derive(Default)]
pub struct Options<'a> {
    /// Extra `name=value` server settings (later lines win).
    pub settings: &'a [&'a str],
    /// The whole pg_hba.conf, instead of initdb's.
    pub hba: Option<&'a str>,
    /// Serve TLS with these files (and verify client certificates against its CA).
    pub tls: Option<&'a Certificates>,
    /// The major version to run (see [`pg_bindir_for`]); default: `PG_BINDIR`, else the
    /// newest Debian one.
    pub major: Option<u32>,
}

/// A test certificate authority and what it signed: a server certificate for
/// `localhost` (not for 127.0.0.1, so that verify-full by address fails on the name), a
/// client certificate, an expired server certificate, and a second, unrelated CA.
pub struct Certificates {
    pub ca_cert: String,
    pub server_cert: String,
    pub server_key: String,
    pub expired_server_cert: String,
    pub expired_server_key: String,
    pub client_cert: String,
    pub client_key: String,
    pub other_ca_cert: String,
}

impl Certificates {
    /// Generates everything; the client certificate's common name is `client_user`.
    pub fn generate(client_user: &str) -> io::Result<Certificates> {
        use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
        let failed = |e: rcgen::Error| io::Error::other(format!("cannot generate a test certificate: {e}"));
        let ca = |name: &str| -> io::Result<(String, Issuer<'static, KeyPair>)> {
            let key = KeyPair::generate().map_err(failed)?;
            let mut params = CertificateParams::new(Vec::<String>::new()).map_err(failed)?;
            params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            params.distinguished_name.push(DnType::CommonName, name);
            let cert = params.self_signed(&key).map_err(failed)?;
            Ok((cert.pem(), Issuer::new(params, key)))
        };
        let (ca_cert, issuer) = ca("outbox-relay test CA")?;
        let (other_ca_cert, _) = ca("some other CA")?;
        let leaf = |names: Vec<String>, common_name: &str, expired: bool| -> io::Result<(String, String)> {
            let key = KeyPair::generate().map_err(failed)?;
            let mut params = CertificateParams::new(names).map_err(failed)?;
            params.distinguished_name.push(DnType::CommonName, common_name);
            if expired {
                params.not_before = rcgen::date_time_ymd(2001, 1, 1);
                params.not_after = rcgen::date_time_ymd(2002, 1, 1);
            }
            let cert = params.signed_by(&key, &issuer).map_err(failed)?;
            Ok((cert.pem(), key.serialize_pem()))
        };
        let (server_cert, server_key) = leaf(vec!["localhost".into()], "localhost", false)?;
        let (expired_server_cert, expired_server_key) = leaf(vec!["localhost".into()], "localhost", true)?;
        let (client_cert, client_key) = leaf(Vec::new(), client_user, false)?;
        Ok(Certificates {
            ca_cert,
            server_cert,
            server_key,
            expired_server_cert,
            expired_server_key,
            client_cert,
            client_key,
            other_ca_cert,
        })
    }

    /// The same certificates, serving the expired server certificate.
    pub fn with_expired_server(&self) -> Certificates {
        Certificates {
            ca_cert: self.ca_cert.clone(),
            server_cert: self.expired_server_cert.clone(),
            server_key: self.expired_server_key.clone(),
            expired_server_cert: self.expired_server_cert.clone(),
            expired_server_key: self.expired_server_key.clone(),
            client_cert: self.client_cert.clone(),
            client_key: self.client_key.clone(),
            other_ca_cert: self.other_ca_cert.clone(),
        }
    }

    /// Writes the files a client needs (`ca.crt`, `other-ca.crt`, `client.crt`,
    /// `client.key`, the key readable by its owner alone) into `dir`.
    pub fn write_client_files(&self, dir: &Path) -> io::Result<()> {
        use std::os::unix::fs::PermissionsExt;
        std::fs::create_dir_all(dir)?;
        std::fs::write(dir.join("ca.crt"), &self.ca_cert)?;
        std::fs::write(dir.join("other-ca.crt"), &self.other_ca_cert)?;
        std::fs::write(dir.join("client.crt"), &self.client_cert)?;
        std::fs::write(dir.join("client.key"), &self.client_key)?;
        std::fs::set_permissions(dir.join("client.key"), std::fs::Permissions::from_mode(0o600))
    }
}

/// Where PostgreSQL's server programs are.
pub fn pg_bindir() -> io::Result<PathBuf> {
    if let Some(dir) = std::env::var_os("PG_BINDIR") {
        return Ok(PathBuf::from(dir));
    }
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let version = entry.file_name().to_str()?.parse().ok()?;
            let bin = entry.path().join("bin");
            bin.join("postgres").exists().then_some((version, bin))
        })
        .collect();
    versions.sort();
    versions.pop().map(|(_, bin)| bin).ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::NotFound,
            "no PostgreSQL server found: run scripts/install-deps or set PG_BINDIR",
        )
    })
}

/// Where `scripts/install-deps` puts PostgreSQL majors besides Debian's: a system
/// directory when it runs as root (the postgres user must reach the programs), else
/// `.tools/pg` in the workspace; each holds `<major>/bin`.
fn installed_roots() -> [PathBuf; 3] {
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    [
        workspace.join(".tools/pg"),
        PathBuf::from("/usr/local/lib/outbox-relay/pg"),
        PathBuf::from("/usr/lib/postgresql"),
    ]
}

/// The server programs of PostgreSQL `major`: installed by `scripts/install-deps` (see
/// [`installed_roots`]), or Debian's `/usr/lib/postgresql/<major>/bin`.
pub fn pg_bindir_for(major: u32) -> io::Result<PathBuf> {
    installed_roots()
        .into_iter()
        .map(|root| root.join(major.to_string()).join("bin"))
        .find(|dir| dir.join("postgres").exists())
        .ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::NotFound,
                format!("no PostgreSQL {major}: run TEST_PG_MAJORS={major} scripts/install-deps"),
            )
        })
}

/// The newest PostgreSQL from Debian's packages: built with OpenSSL, so the one that
/// serves TLS (the embedded builds of 18 have no OpenSSL).
pub fn debian_major() -> io::Result<u32> {
    std::fs::read_dir("/usr/lib/postgresql")?
        .flatten()
        .filter(|entry| entry.path().join("bin/postgres").exists())
        .filter_map(|entry| entry.file_name().to_str()?.parse().ok())
        .max()
        .ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::NotFound,
                "no Debian PostgreSQL: run scripts/install-deps",
            )
        })
}

/// The major versions whose server programs are installed (see [`installed_roots`]).
pub fn installed_majors() -> Vec<u32> {
    let mut majors: Vec<u32> = installed_roots()
        .iter()
        .flat_map(|dir| std::fs::read_dir(dir).into_iter().flatten().flatten())
        .filter(|entry| entry.path().join("bin/postgres").exists())
        .filter_map(|entry| entry.file_name().to_str()?.parse().ok())
        .collect();
    majors.sort_unstable();
    majors.dedup();
    majors
}

fn major_of(bindir: &Path) -> io::Result<u32> {
    let output = Command::new(bindir.join("postgres")).arg("--version").output()?;
    let text = String::from_utf8_lossy(&output.stdout);
    text.split_whitespace()
        .find_map(|word| word.split('.').next()?.parse().ok())
        .ok_or_else(|| io::Error::other(format!("cannot read the version from {text:?}")))
}

/// A client program (`pg_isready`, `pg_basebackup`): from `bindir`, else from the newest
/// installed PostgreSQL that has it (the embedded builds ship only the server). Newer
/// clients work with older servers.
fn client_tool(bindir: &Path, name: &str) -> io::Result<PathBuf> {
    if bindir.join(name).exists() {
        return Ok(bindir.join(name));
    }
    installed_majors()
        .into_iter()
        .rev()
        .filter_map(|major| pg_bindir_for(major).ok())
        .map(|dir| dir.join(name))
        .find(|path| path.exists())
        .ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::NotFound,
                format!("no {name} found: run scripts/install-deps"),
            )
        })
}

/// PostgreSQL refuses to run as root: when we are root, run it as the `postgres` user.
fn postgres_owner() -> io::Result<Option<(u32, u32)>> {
    user_owner("postgres")
}

/// When we are root, the (uid, gid) of the system user `name` to run a server as.
fn user_owner(name: &str) -> io::Result<Option<(u32, u32)>> {
    if unsafe { libc::geteuid() } != 0 {
        return Ok(None);
    }
    let c_name = std::ffi::CString::new(name).map_err(io::Error::other)?;
    let entry = unsafe { libc::getpwnam(c_name.as_ptr()) };
    if entry.is_null() {
        return Err(io::Error::new(
            io::ErrorKind::NotFound,
            format!("running as root but there is no '{name}' user to run its server as"),
        ));
    }
    let (uid, gid) = unsafe { ((*entry).pw_uid, (*entry).pw_gid) };
    Ok(Some((uid, gid)))
}

fn as_owner(command: &mut Command, owner: Option<(u32, u32)>) {
    use std::os::unix::process::CommandExt;
    if let Some((uid, gid)) = owner {
        command.uid(uid).gid(gid);
        command.env("HOME", "/tmp");
    }
}

// ---------------------------------------------------------------------------
// tansu

/// A tansu broker with in-memory storage.
pub struct Broker {
    pub port: u16,
    dir: PathBuf,
    child: Option<Child>,
}

impl Broker {
    pub fn start() -> io::Result<Broker> {
        Self::start_on(free_port()?)
    }

    /// Starts on a given port (for example one a relay was already told about).
    pub fn start_on(port: u16) -> io::Result<Broker> {
        let dir = scratch_dir("tansu")?;
        register(Cleanup::Directory(dir.clone()));
        let mut broker = Broker { port, dir, child: None };
        broker.launch()?;
        Ok(broker)
    }

    fn launch(&mut self) -> io::Result<()> {
        let binary = tansu_binary()?;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("tansu.log"))?;
        let url = format!("tcp://127.0.0.1:{}", self.port);
        let child = Command::new(&binary)
            .args(["broker", "--listener-url", &url, "--advertised-listener-url", &url])
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .map_err(|e| io::Error::new(e.kind(), format!("cannot start {}: {e}", binary.display())))?;
        register(Cleanup::Process {
            pid: child.id(),
            signal: libc::SIGKILL,
        });
        self.child = Some(child);
        let port = self.port;
        wait_until(Duration::from_secs(30), "tansu to listen", || port_open(port))
    }

    pub fn bootstrap_servers(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Freezes the broker (SIGSTOP): connections stay open, nothing is answered.
    pub fn pause(&self) {
        if let Some(pid) = self.pid() {
            kill(pid, libc::SIGSTOP);
        }
    }

    /// Thaws a paused broker (SIGCONT).
    pub fn resume(&self) {
        if let Some(pid) = self.pid() {
            kill(pid, libc::SIGCONT);
        }
    }

    /// Kills the broker; its in-memory data is gone.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
            unregister_pid(child.id());
        }
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        self.resume();
        self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
        unregister_dir(&self.dir);
    }
}

// ---------------------------------------------------------------------------
// RabbitMQ

/// A private RabbitMQ node (Debian's `rabbitmq-server`) with its own ports (AMQP,
/// distribution, epmd) and data directory; user `guest`/`guest` on loopback. Durable
/// exchanges, queues and persistent messages survive [`restart`](Self::restart).
pub struct RabbitMq {
    pub port: u16,
    dist_port: u16,
    epmd_port: u16,
    dir: PathBuf,
    owner: Option<(u32, u32)>,
    /// The node's own epmd, leader of the process group the node runs in: an epmd the
    /// VM started itself would daemonize and outlive every kill.
    epmd: Option<Child>,
    child: Option<Child>,
}

impl RabbitMq {
    pub fn start() -> io::Result<RabbitMq> {
        let dir = scratch_dir("rabbitmq")?;
        register(Cleanup::Directory(dir.clone()));
        let owner = user_owner("rabbitmq")?;
        if let Some((uid, gid)) = owner {
            std::os::unix::fs::chown(&dir, Some(uid), Some(gid))?;
        }
        // Distinct: an epmd on the AMQP port would pass for the broker listening.
        let [port, dist_port, epmd_port] = free_ports()?;
        let mut node = RabbitMq {
            port,
            dist_port,
            epmd_port,
            dir,
            owner,
            epmd: None,
            child: None,
        };
        node.launch()?;
        Ok(node)
    }

    /// `amqp://guest:guest@127.0.0.1:<port>/%2f`
    pub fn url(&self) -> String {
        format!("amqp://guest:guest@127.0.0.1:{}/%2f", self.port)
    }

    fn command(&self, program: &str) -> io::Result<Command> {
        let path = rabbitmq_bindir()?.join(program);
        let mut command = Command::new(path);
        let dir = &self.dir;
        command
            .env("HOME", dir)
            .env("RABBITMQ_NODENAME", format!("devrig{}@localhost", self.port))
            .env("RABBITMQ_NODE_IP_ADDRESS", "127.0.0.1")
            .env("RABBITMQ_NODE_PORT", self.port.to_string())
            .env("RABBITMQ_DIST_PORT", self.dist_port.to_string())
            .env("ERL_EPMD_PORT", self.epmd_port.to_string())
            .env("RABBITMQ_MNESIA_BASE", dir.join("mnesia"))
            .env("RABBITMQ_LOG_BASE", dir.join("log"))
            .env("RABBITMQ_ENABLED_PLUGINS_FILE", dir.join("enabled_plugins"))
            .env("RABBITMQ_CONFIG_FILE", dir.join("rabbitmq"))
            .env("RABBITMQ_ADVANCED_CONFIG_FILE", dir.join("advanced.config"))
            .env("RABBITMQ_CONF_ENV_FILE", dir.join("rabbitmq-env.conf"))
            .env("RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS", "-start_epmd false");
        if let Some((uid, gid)) = self.owner {
            use std::os::unix::process::CommandExt;
            command.uid(uid).gid(gid);
        }
        Ok(command)
    }

    fn launch(&mut self) -> io::Result<()> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("server.log"))?;
        use std::os::unix::process::CommandExt;
        let epmd = Command::new("epmd")
            .args(["-port", &self.epmd_port.to_string()])
            .process_group(0)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log.try_clone()?)
            .spawn()
            .map_err(|e| io::Error::new(e.kind(), format!("cannot start epmd (Erlang): {e}")))?;
        let group = epmd.id();
        register(Cleanup::Group { pgid: group });
        self.epmd = Some(epmd);
        let epmd_port = self.epmd_port;
        wait_until(Duration::from_secs(10), "epmd to listen", || port_open(epmd_port))?;
        let child = self
            .command("rabbitmq-server")?
            .process_group(group as i32)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .map_err(|e| io::Error::new(e.kind(), format!("cannot start rabbitmq-server: {e}")))?;
        self.child = Some(child);
        let port = self.port;
        wait_until(Duration::from_secs(90), "RabbitMQ to listen", || port_open(port)).map_err(|e| {
            let log = std::fs::read_to_string(self.dir.join("server.log")).unwrap_or_default();
            io::Error::new(e.kind(), format!("{e}; its output:\n{log}"))
        })
    }

    /// The Erlang VM's process (the script's child), for CPU figures.
    pub fn beam_pid(&self) -> Option<u32> {
        let home = self.dir.to_string_lossy().into_owned();
        std::fs::read_dir("/proc").ok()?.flatten().find_map(|entry| {
            let pid: u32 = entry.file_name().to_str()?.parse().ok()?;
            let cmdline = std::fs::read(entry.path().join("cmdline")).ok()?;
            let cmdline = String::from_utf8_lossy(&cmdline);
            (cmdline.contains("beam.smp") && cmdline.contains(&home)).then_some(pid)
        })
    }

    /// Stops the node and its epmd (their whole process group) and waits for them to be
    /// gone.
    pub fn stop(&mut self) {
        if let Some(mut epmd) = self.epmd.take() {
            unsafe {
                libc::kill(-(epmd.id() as libc::pid_t), libc::SIGKILL);
            }
            let _ = epmd.wait();
            if let Some(mut child) = self.child.take() {
                let _ = child.wait();
            }
            unregister_pid(epmd.id());
            let port = self.port;
            let _ = wait_until(Duration::from_secs(10), "RabbitMQ to stop listening", || {
                !port_open(port)
            });
        }
    }

    /// Kills the node and starts it again on the same ports and data: what was durable
    /// and confirmed is still there.
    pub fn restart(&mut self) -> io::Result<()> {
        self.stop();
        self.launch()
    }
}

impl Drop for RabbitMq {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
        unregister_dir(&self.dir);
    }
}

/// Where RabbitMQ's scripts are: `RABBITMQ_BINDIR`, else Debian's.
pub fn rabbitmq_bindir() -> io::Result<PathBuf> {
    if let Some(dir) = std::env::var_os("RABBITMQ_BINDIR") {
        return Ok(PathBuf::from(dir));
    }
    let debian = PathBuf::from("/usr/lib/rabbitmq/bin");
    if debian.join("rabbitmq-server").exists() {
        return Ok(debian);
    }
    Err(io::Error::new(
        io::ErrorKind::NotFound,
        "no rabbitmq-server: run scripts/install-deps or set RABBITMQ_BINDIR",
    ))
}

/// Runs a PostgreSQL tool to its end; a failure carries what it printed on stderr.
fn run_tool(command: &mut Command, name: &str) -> io::Result<()> {
    let output = command.output()?;
    if output.status.success() {
        return Ok(());
    }
    Err(io::Error::other(format!(
        "{name} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    )))
}

/// Where the tansu binary is.
pub fn tansu_binary() -> io::Result<PathBuf> {
    if let Some(path) = std::env::var_os("TANSU_BIN") {
        return Ok(PathBuf::from(path));
    }
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let local = workspace.join(".tools/bin/tansu");
    if local.exists() {
        return Ok(local);
    }
    let on_path = std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>());
    for dir in on_path {
        if dir.join("tansu").exists() {
            return Ok(dir.join("tansu"));
        }
    }
    Err(io::Error::new(
        io::ErrorKind::NotFound,
        "no tansu binary: run scripts/install-deps or set TANSU_BIN",
    ))
}
