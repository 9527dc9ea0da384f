//! A private PostgreSQL cluster for a test: `initdb` in a temporary directory, `pg_ctl start`
//! on a free loopback port (trust authentication, loopback only), stopped and removed on
//! drop. initdb refuses to run as root: as root (CI), the cluster runs as the system user
//! `tsa-test`, created once with `useradd --system`. A missing PostgreSQL fails the test with
//! what to install; nothing is skipped.
//!
//! [`Cluster::start_tls`]: the same with `ssl = on` (a certificate for 127.0.0.1 and
//! localhost from a test CA made with rcgen) and TCP connections over TLS only (`hostssl`
//! lines; the test's own administration goes through the Unix socket).
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;

use tsa::archive::postgres::PostgresStore;
use tsa::archive::record::StoredRecord;
use tsa::archive::store::ArchiveStore;

const USER: &str = "tsa-test";

pub struct Cluster {
    dir: tempfile::TempDir,
    bin: PathBuf,
    pub port: u16,
    /// `hostssl` only: [`Cluster::client`] goes through the Unix socket.
    tls: bool,
}

/// The role of [`Cluster::start_tls`] that logs in with a client certificate (`cert`): the
/// certificate's CN.
pub const CERT_USER: &str = "tsa_cert";
/// The role of [`Cluster::start_tls`] that logs in with a password (`scram-sha-256`).
pub const SCRAM_USER: &str = "tsa_scram";

/// The test PKI of a TLS cluster (PEM files).
pub struct Pki {
    /// The CA that signs the server's certificate and [`Pki::client_certificate`].
    pub ca: PathBuf,
    /// Another CA, which signs nothing the cluster uses.
    pub other_ca: PathBuf,
    /// CN = [`CERT_USER`], for `cert` authentication.
    pub client_certificate: PathBuf,
    pub client_key: PathBuf,
}

/// The directory holding initdb and pg_ctl: Debian's `/usr/lib/postgresql/<version>/bin`
/// (the newest), else the PATH's.
fn bin_dir() -> PathBuf {
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let v = e.file_name().to_str()?.parse().ok()?;
            let bin = e.path().join("bin");
            bin.join("initdb").exists().then_some((v, bin))
        })
        .collect();
    versions.sort();
    if let Some((_, bin)) = versions.pop() {
        return bin;
    }
    let found = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .unwrap_or_default()
        .into_iter()
        .find(|d| d.join("initdb").exists() && d.join("pg_ctl").exists());
    found.unwrap_or_else(|| {
        panic!(
            "PostgreSQL is not installed (no initdb/pg_ctl): scripts/test.sh installs it \
             (apt-get install postgresql); these tests do not skip"
        )
    })
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

fn uid_of(user: &str) -> Option<(u32, u32)> {
    let id = |flag: &str| -> Option<u32> {
        let out = Command::new("id").args([flag, user]).output().ok()?;
        if !out.status.success() {
            return None;
        }
        String::from_utf8_lossy(&out.stdout).trim().parse().ok()
    };
    Some((id("-u")?, id("-g")?))
}

/// The unprivileged user the cluster runs as, when this process is root.
fn cluster_user() -> (u32, u32) {
    static CREATE: Mutex<()> = Mutex::new(());
    let _once = CREATE.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(ids) = uid_of(USER) {
        return ids;
    }
    let out = Command::new("useradd")
        .args([
            "--system",
            "--no-create-home",
            "--shell",
            "/usr/sbin/nologin",
            USER,
        ])
        .output()
        .expect("useradd");
    uid_of(USER).unwrap_or_else(|| {
        panic!(
            "cannot create the system user {USER} for PostgreSQL (initdb refuses root): {}",
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

impl Cluster {
    fn command(&self, program: &str) -> Command {
        let path = self.bin.join(program);
        if is_root() {
            let mut c = Command::new("runuser");
            c.args(["-u", USER, "--"]).arg(path);
            c
        } else {
            Command::new(path)
        }
    }

    fn run(&self, program: &str, args: &[&str]) {
        let out = self
            .command(program)
            .args(args)
            .output()
            .unwrap_or_else(|e| panic!("{program}: {e}"));
        assert!(
            out.status.success(),
            "{program} {args:?} failed: {}{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            std::fs::read_to_string(self.dir.path().join("log")).unwrap_or_default()
        );
    }

    fn data(&self) -> String {
        self.dir.path().join("data").display().to_string()
    }

    /// A new cluster, started.
    pub fn start() -> Cluster {
        let cluster = Self::init(false);
        cluster.start_again();
        cluster
    }

    /// A new cluster with TLS, started: TCP connections only over TLS; [`CERT_USER`] by its
    /// client certificate, [`SCRAM_USER`] by password, anyone else trusted.
    pub fn start_tls() -> (Cluster, Pki) {
        use rcgen::{
            BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose,
            IsCa, KeyPair, KeyUsagePurpose,
        };
        let cluster = Self::init(true);
        let ca_params = |name: &str| {
            let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
            params.distinguished_name.push(DnType::CommonName, name);
            params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
            params
        };
        let ca = CertifiedIssuer::self_signed(
            ca_params("tsa test database CA"),
            KeyPair::generate().unwrap(),
        )
        .unwrap();
        let other =
            CertifiedIssuer::self_signed(ca_params("another CA"), KeyPair::generate().unwrap())
                .unwrap();
        let leaf = |names: Vec<String>, cn: &str, usage| {
            let key = KeyPair::generate().unwrap();
            let mut params = CertificateParams::new(names).unwrap();
            params.distinguished_name.push(DnType::CommonName, cn);
            params.extended_key_usages = vec![usage];
            let cert = params.signed_by(&key, &ca).unwrap();
            (cert.pem(), key.serialize_pem())
        };
        let (server_cert, server_key) = leaf(
            vec!["127.0.0.1".into(), "localhost".into()],
            "localhost",
            ExtendedKeyUsagePurpose::ServerAuth,
        );
        let (client_cert, client_key) =
            leaf(vec![], CERT_USER, ExtendedKeyUsagePurpose::ClientAuth);

        // The server's files in the data directory, the cluster user's (the key 0600, as
        // PostgreSQL demands).
        let data = PathBuf::from(cluster.data());
        for (name, text) in [
            ("server.crt", server_cert.as_str()),
            ("server.key", server_key.as_str()),
            ("ca.crt", ca.pem().as_str()),
        ] {
            let path = data.join(name);
            std::fs::write(&path, text).unwrap();
            std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o600))
                .unwrap();
            if is_root() {
                let (uid, gid) = cluster_user();
                std::os::unix::fs::chown(&path, Some(uid), Some(gid)).unwrap();
            }
        }
        let mut conf = std::fs::OpenOptions::new()
            .append(true)
            .open(data.join("postgresql.conf"))
            .unwrap();
        std::io::Write::write_all(
            &mut conf,
            b"\nssl = on\nssl_cert_file = 'server.crt'\nssl_key_file = 'server.key'\n\
              ssl_ca_file = 'ca.crt'\n",
        )
        .unwrap();
        std::fs::write(
            data.join("pg_hba.conf"),
            format!(
                "local all all trust\n\
                 hostssl all {CERT_USER} 127.0.0.1/32 cert\n\
                 hostssl all {SCRAM_USER} 127.0.0.1/32 scram-sha-256\n\
                 hostssl all all 127.0.0.1/32 trust\n"
            ),
        )
        .unwrap();

        // What the TSA reads, beside the data directory.
        let dir = cluster.path();
        let pki = Pki {
            ca: dir.join("ca.pem"),
            other_ca: dir.join("other-ca.pem"),
            client_certificate: dir.join("client.pem"),
            client_key: dir.join("client-key.pem"),
        };
        std::fs::write(&pki.ca, ca.pem()).unwrap();
        std::fs::write(&pki.other_ca, other.pem()).unwrap();
        std::fs::write(&pki.client_certificate, client_cert).unwrap();
        std::fs::write(&pki.client_key, client_key).unwrap();
        // The service's keys must be private to it, as libpq's own must.
        std::fs::set_permissions(
            &pki.client_key,
            std::os::unix::fs::PermissionsExt::from_mode(0o600),
        )
        .unwrap();
        cluster.start_again();
        (cluster, pki)
    }

    /// initdb, not started.
    fn init(tls: bool) -> Cluster {
        let bin = bin_dir();
        let dir = tempfile::Builder::new()
            .prefix("tsa-pg-")
            .tempdir()
            .unwrap();
        if is_root() {
            let (uid, gid) = cluster_user();
            std::os::unix::fs::chown(dir.path(), Some(uid), Some(gid)).unwrap();
        }
        let [port] = crate::ports::tcp::<1>();
        let cluster = Cluster {
            dir,
            bin,
            port,
            tls,
        };
        let data = cluster.data();
        cluster.run(
            "initdb",
            &[
                "-D",
                &data,
                "-U",
                "postgres",
                "-A",
                "trust",
                "-E",
                "UTF8",
                "--no-sync",
                "--locale=C",
            ],
        );
        cluster
    }

    /// `pg_ctl start` on the cluster's data directory and port (after [`Cluster::stop`]).
    pub fn start_again(&self) {
        let socket = self.dir.path().display().to_string();
        let options = format!(
            "-c listen_addresses=127.0.0.1 -p {} -k {socket} -c max_connections=100",
            self.port
        );
        let log = self.dir.path().join("log").display().to_string();
        self.run(
            "pg_ctl",
            &[
                "-D",
                &self.data(),
                "-o",
                &options,
                "-l",
                &log,
                "-w",
                "-t",
                "60",
                "start",
            ],
        );
    }

    /// `pg_ctl stop -m fast`: the server ends every session and stops (an outage).
    pub fn stop(&self) {
        self.run("pg_ctl", &["-D", &self.data(), "-m", "fast", "-w", "stop"]);
    }

    /// A client on `database`, as `psql` would be (through the Unix socket on a TLS
    /// cluster).
    pub fn client(&self, database: &str) -> postgres::Client {
        let url = match self.tls {
            true => format!(
                "host={} port={} user=postgres dbname={database}",
                self.dir.path().display(),
                self.port
            ),
            false => self.url(database),
        };
        postgres::Client::connect(&url, postgres::NoTls).expect("connect to the test cluster")
    }

    /// `key=value` connection settings for `database`.
    pub fn url(&self, database: &str) -> String {
        format!(
            "host=127.0.0.1 port={} user=postgres dbname={database} connect_timeout=10",
            self.port
        )
    }

    /// Creates a database.
    pub fn create_database(&self, name: &str) {
        self.client("postgres")
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .unwrap();
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let data = self.data();
        let _ = self
            .command("pg_ctl")
            .args(["-D", &data, "-m", "immediate", "-w", "stop"])
            .output();
    }
}

/// Every record of `instance_id`'s chain in `store`, in chain order.
pub fn all_records(store: &mut PostgresStore, instance_id: u32) -> Vec<StoredRecord> {
    let mut records = Vec::new();
    store
        .for_each_record(instance_id, 1, &mut |r| {
            records.push(r);
            Ok(true)
        })
        .unwrap();
    records
}
