//! Finding the PostgreSQL and Redis executables.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use crate::HarnessError;

/// Environment variable naming the directory that holds `initdb` and `postgres`.
pub const PG_BIN_ENV: &str = "CACHECLEAR_PG_BIN";
/// Environment variable naming the directory that holds `redis-server` (and `redis-cli`).
pub const REDIS_BIN_ENV: &str = "CACHECLEAR_REDIS_BIN";

const PG_INSTALL_CMDS: &str = "install them with `apt-get install postgresql` (Debian/Ubuntu), \
     `dnf install postgresql-server` (Fedora/RHEL) or `brew install postgresql` (macOS)";
const PG_INSTALL_HINT: &str = "install them with `apt-get install postgresql` (Debian/Ubuntu), \
     `dnf install postgresql-server` (Fedora/RHEL) or `brew install postgresql` (macOS), or set \
     CACHECLEAR_PG_BIN to the directory holding them";
const PSQL_INSTALL_HINT: &str = "install it with `apt-get install postgresql-client` \
     (Debian/Ubuntu) or `dnf install postgresql` (Fedora/RHEL), or put it next to initdb in \
     CACHECLEAR_PG_BIN";
const REDIS_INSTALL_HINT: &str = "install it with `apt-get install redis-server` (Debian/Ubuntu), \
     `dnf install redis` (Fedora/RHEL) or `brew install redis` (macOS), or set \
     CACHECLEAR_REDIS_BIN to the directory holding it";
const REDIS_INSTALL_CMDS: &str = "install it with `apt-get install redis-server` \
     (Debian/Ubuntu), `dnf install redis` (Fedora/RHEL) or `brew install redis` (macOS)";
const REDIS_CLI_INSTALL_HINT: &str = "install it with `apt-get install redis-tools` \
     (Debian/Ubuntu) or `dnf install redis` (Fedora/RHEL), or put it next to redis-server";

/// The PostgreSQL executables the harness uses, as absolute or PATH-resolved paths.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PgBinaries {
    /// Directory holding `initdb` and `postgres`.
    pub bin_dir: PathBuf,
    /// `initdb`.
    pub initdb: PathBuf,
    /// `postgres` (the server; started directly, not through `pg_ctl`).
    pub postgres: PathBuf,
    /// `psql` (from `bin_dir` if present there, else from `PATH`).
    pub psql: PathBuf,
}

impl PgBinaries {
    /// Finds the binaries the way [`crate::PgInstance::start`] does: `$CACHECLEAR_PG_BIN` if set
    /// (and then nothing else), else `pg_config --bindir`, else the highest-versioned
    /// `/usr/lib/postgresql/*/bin`, else `PATH`.
    ///
    /// # Errors
    /// [`HarnessError::BinaryNotFound`] naming every place searched and what to install.
    pub fn discover() -> Result<Self, HarnessError> {
        let env_dir = std::env::var_os(PG_BIN_ENV);
        Self::discover_with(env_dir.as_deref())
    }

    /// Like [`PgBinaries::discover`], with the value of `$CACHECLEAR_PG_BIN` passed in instead of
    /// read from the (process-global) environment. `None` means "unset"; an empty string counts
    /// as unset too.
    ///
    /// # Errors
    /// [`HarnessError::BinaryNotFound`] naming every place searched and what to install.
    pub fn discover_with(env_dir: Option<&OsStr>) -> Result<Self, HarnessError> {
        let path_var = std::env::var_os("PATH");
        discover_pg(
            env_dir,
            || pg_config_bindir(path_var.as_deref()),
            Path::new("/usr/lib/postgresql"),
            path_var.as_deref(),
        )
    }
}

/// The Redis executables the harness uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RedisBinaries {
    /// `redis-server`.
    pub server: PathBuf,
    /// `redis-cli`, if found (only [`crate::RedisInstance::cli`] needs it).
    pub cli: Option<PathBuf>,
}

impl RedisBinaries {
    /// Finds `redis-server` (and `redis-cli`): in `$CACHECLEAR_REDIS_BIN` if set (and then
    /// nothing else), else on `PATH`. `redis-cli` is looked for next to `redis-server` first.
    ///
    /// # Errors
    /// [`HarnessError::BinaryNotFound`] if `redis-server` is missing.
    pub fn discover() -> Result<Self, HarnessError> {
        let env_dir = std::env::var_os(REDIS_BIN_ENV);
        Self::discover_with(env_dir.as_deref())
    }

    /// Like [`RedisBinaries::discover`], with the value of `$CACHECLEAR_REDIS_BIN` passed in.
    ///
    /// # Errors
    /// [`HarnessError::BinaryNotFound`] if `redis-server` is missing.
    pub fn discover_with(env_dir: Option<&OsStr>) -> Result<Self, HarnessError> {
        discover_redis(env_dir, std::env::var_os("PATH").as_deref())
    }

    /// `redis-cli`, or an error saying how to install it.
    pub(crate) fn require_cli(&self) -> Result<&Path, HarnessError> {
        self.cli
            .as_deref()
            .ok_or_else(|| HarnessError::BinaryNotFound {
                what: "redis-cli".into(),
                searched: format!(
                    "next to {} and on PATH",
                    self.server.parent().unwrap_or(Path::new("?")).display()
                ),
                hint: REDIS_CLI_INSTALL_HINT.into(),
            })
    }
}

fn non_empty(v: Option<&OsStr>) -> Option<&OsStr> {
    v.filter(|s| !s.is_empty())
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p)
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

fn missing_in<'a>(dir: &Path, names: &[&'a str]) -> Vec<&'a str> {
    names
        .iter()
        .copied()
        .filter(|n| !is_executable(&dir.join(n)))
        .collect()
}

fn find_on_path(name: &str, path_var: Option<&OsStr>) -> Option<PathBuf> {
    let path_var = path_var?;
    std::env::split_paths(path_var)
        .filter(|d| !d.as_os_str().is_empty())
        .map(|d| d.join(name))
        .find(|p| is_executable(p))
}

fn pg_config_bindir(path_var: Option<&OsStr>) -> Option<PathBuf> {
    let pg_config = find_on_path("pg_config", path_var)?;
    let out = Command::new(pg_config)
        .arg("--bindir")
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .ok()?;
    if !out.status.success() {
        return None;
    }
    let s = String::from_utf8(out.stdout).ok()?;
    let s = s.trim();
    (!s.is_empty()).then(|| PathBuf::from(s))
}

/// `<root>/<version>/bin` directories, highest version first ("15" > "9.6").
fn versioned_bin_dirs(root: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(root) else {
        return Vec::new();
    };
    let mut found: Vec<(Vec<u64>, PathBuf)> = entries
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            let version = name
                .split('.')
                .map(|part| part.parse::<u64>().ok())
                .collect::<Option<Vec<u64>>>()?;
            Some((version, e.path().join("bin")))
        })
        .collect();
    found.sort_by(|a, b| b.0.cmp(&a.0));
    found.into_iter().map(|(_, p)| p).collect()
}

const PG_SERVER_BINS: [&str; 2] = ["initdb", "postgres"];
const PG_WHAT: &str = "PostgreSQL server binaries (initdb, postgres)";

/// The discovery logic with every input injected, so it can be tested without touching the
/// process environment.
pub(crate) fn discover_pg(
    env_dir: Option<&OsStr>,
    pg_config: impl FnOnce() -> Option<PathBuf>,
    versioned_root: &Path,
    path_var: Option<&OsStr>,
) -> Result<PgBinaries, HarnessError> {
    let finish = |dir: PathBuf| -> Result<PgBinaries, HarnessError> {
        let psql = if is_executable(&dir.join("psql")) {
            dir.join("psql")
        } else {
            find_on_path("psql", path_var).ok_or_else(|| HarnessError::BinaryNotFound {
                what: "psql (the PostgreSQL client)".into(),
                searched: format!("{} and PATH", dir.display()),
                hint: PSQL_INSTALL_HINT.into(),
            })?
        };
        Ok(PgBinaries {
            initdb: dir.join("initdb"),
            postgres: dir.join("postgres"),
            psql,
            bin_dir: dir,
        })
    };

    if let Some(dir) = non_empty(env_dir) {
        let dir = PathBuf::from(dir);
        let missing = missing_in(&dir, &PG_SERVER_BINS);
        if missing.is_empty() {
            return finish(dir);
        }
        return Err(HarnessError::BinaryNotFound {
            what: PG_WHAT.into(),
            searched: format!(
                "{PG_BIN_ENV}={} (missing: {})",
                dir.display(),
                missing.join(", ")
            ),
            hint: format!(
                "point {PG_BIN_ENV} at the directory holding initdb and postgres (e.g. \
                 /usr/lib/postgresql/15/bin), or unset it to search automatically; if they are \
                 not installed, {PG_INSTALL_CMDS}"
            ),
        });
    }

    let mut searched = vec![format!("{PG_BIN_ENV} (unset)")];
    match pg_config() {
        Some(dir) => {
            if missing_in(&dir, &PG_SERVER_BINS).is_empty() {
                return finish(dir);
            }
            searched.push(format!("`pg_config --bindir` = {}", dir.display()));
        }
        None => searched.push("`pg_config --bindir` (no pg_config on PATH)".into()),
    }
    let versioned = versioned_bin_dirs(versioned_root);
    if let Some(dir) = versioned
        .iter()
        .find(|d| missing_in(d, &PG_SERVER_BINS).is_empty())
    {
        return finish(dir.clone());
    }
    searched.push(format!("{}/*/bin", versioned_root.display()));
    let on_path = find_on_path("initdb", path_var)
        .and_then(|initdb| initdb.parent().map(Path::to_path_buf))
        .filter(|dir| missing_in(dir, &PG_SERVER_BINS).is_empty());
    if let Some(dir) = on_path {
        return finish(dir);
    }
    searched.push("PATH".into());
    Err(HarnessError::BinaryNotFound {
        what: PG_WHAT.into(),
        searched: searched.join(", "),
        hint: PG_INSTALL_HINT.into(),
    })
}

pub(crate) fn discover_redis(
    env_dir: Option<&OsStr>,
    path_var: Option<&OsStr>,
) -> Result<RedisBinaries, HarnessError> {
    let server = if let Some(dir) = non_empty(env_dir) {
        let dir = PathBuf::from(dir);
        let server = dir.join("redis-server");
        if !is_executable(&server) {
            return Err(HarnessError::BinaryNotFound {
                what: "redis-server".into(),
                searched: format!("{REDIS_BIN_ENV}={}", dir.display()),
                hint: format!(
                    "point {REDIS_BIN_ENV} at the directory holding redis-server, or unset it to \
                     search PATH; if it is not installed, {REDIS_INSTALL_CMDS}"
                ),
            });
        }
        server
    } else {
        find_on_path("redis-server", path_var).ok_or_else(|| HarnessError::BinaryNotFound {
            what: "redis-server".into(),
            searched: format!("{REDIS_BIN_ENV} (unset), PATH"),
            hint: REDIS_INSTALL_HINT.into(),
        })?
    };
    let cli = server
        .parent()
        .map(|d| d.join("redis-cli"))
        .filter(|p| is_executable(p))
        .or_else(|| find_on_path("redis-cli", path_var));
    Ok(RedisBinaries { server, cli })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn fake_exe(dir: &Path, name: &str) {
        let p = dir.join(name);
        std::fs::write(&p, "#!/bin/sh\nexit 0\n").expect("write fake exe");
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    }

    #[test]
    fn env_dir_that_is_empty_names_the_dir_and_what_to_install() {
        let empty = tempfile::tempdir().expect("tempdir");
        let err = discover_pg(
            Some(empty.path().as_os_str()),
            || panic!("pg_config must not be consulted when the env var is set"),
            Path::new("/nonexistent"),
            None,
        )
        .expect_err("must fail");
        let msg = err.to_string();
        assert!(msg.contains("PostgreSQL server binaries"), "{msg}");
        assert!(msg.contains(&empty.path().display().to_string()), "{msg}");
        assert!(msg.contains("missing: initdb, postgres"), "{msg}");
        assert!(msg.contains("apt-get install postgresql"), "{msg}");
        assert!(msg.contains("CACHECLEAR_PG_BIN"), "{msg}");
    }

    #[test]
    fn nothing_anywhere_lists_every_place_searched() {
        let empty = tempfile::tempdir().expect("tempdir");
        let err = discover_pg(None, || None, empty.path(), Some(empty.path().as_os_str()))
            .expect_err("must fail");
        let msg = err.to_string();
        assert!(msg.contains("CACHECLEAR_PG_BIN (unset)"), "{msg}");
        assert!(msg.contains("pg_config"), "{msg}");
        assert!(msg.contains("PATH"), "{msg}");
        assert!(msg.contains("apt-get install postgresql"), "{msg}");
    }

    #[test]
    fn env_dir_with_binaries_wins_and_psql_falls_back_to_path() {
        let bin = tempfile::tempdir().expect("tempdir");
        fake_exe(bin.path(), "initdb");
        fake_exe(bin.path(), "postgres");
        let client = tempfile::tempdir().expect("tempdir");
        fake_exe(client.path(), "psql");
        let found = discover_pg(
            Some(bin.path().as_os_str()),
            || None,
            Path::new("/nonexistent"),
            Some(client.path().as_os_str()),
        )
        .expect("found");
        assert_eq!(found.bin_dir, bin.path());
        assert_eq!(found.postgres, bin.path().join("postgres"));
        assert_eq!(found.psql, client.path().join("psql"));
    }

    #[test]
    fn missing_psql_says_install_the_client() {
        let bin = tempfile::tempdir().expect("tempdir");
        fake_exe(bin.path(), "initdb");
        fake_exe(bin.path(), "postgres");
        let err = discover_pg(Some(bin.path().as_os_str()), || None, Path::new("/x"), None)
            .expect_err("no psql");
        assert!(err.to_string().contains("postgresql-client"), "{err}");
    }

    #[test]
    fn highest_versioned_dir_is_chosen_numerically() {
        let root = tempfile::tempdir().expect("tempdir");
        for v in ["9.6", "15", "12"] {
            let d = root.path().join(v).join("bin");
            std::fs::create_dir_all(&d).expect("mkdir");
            fake_exe(&d, "initdb");
            fake_exe(&d, "postgres");
            fake_exe(&d, "psql");
        }
        std::fs::create_dir_all(root.path().join("common")).expect("mkdir");
        let found = discover_pg(None, || None, root.path(), None).expect("found");
        assert_eq!(found.bin_dir, root.path().join("15").join("bin"));
    }

    #[test]
    fn pg_config_dir_without_server_binaries_is_skipped() {
        let root = tempfile::tempdir().expect("tempdir");
        let client_only = tempfile::tempdir().expect("tempdir");
        let d = root.path().join("16").join("bin");
        std::fs::create_dir_all(&d).expect("mkdir");
        for n in ["initdb", "postgres", "psql"] {
            fake_exe(&d, n);
        }
        let cdir = client_only.path().to_path_buf();
        let found = discover_pg(None, move || Some(cdir), root.path(), None).expect("found");
        assert_eq!(found.bin_dir, d);
    }

    #[test]
    fn redis_missing_says_what_to_install() {
        let empty = tempfile::tempdir().expect("tempdir");
        let err = discover_redis(None, Some(empty.path().as_os_str())).expect_err("missing");
        let msg = err.to_string();
        assert!(msg.contains("redis-server not found"), "{msg}");
        assert!(msg.contains("apt-get install redis-server"), "{msg}");
        let err = discover_redis(Some(empty.path().as_os_str()), None).expect_err("missing");
        let msg = err.to_string();
        assert!(msg.contains(REDIS_BIN_ENV), "{msg}");
        assert!(msg.contains(&empty.path().display().to_string()), "{msg}");
    }

    #[test]
    fn redis_cli_is_optional_and_its_absence_is_explained() {
        let bin = tempfile::tempdir().expect("tempdir");
        fake_exe(bin.path(), "redis-server");
        let found = discover_redis(Some(bin.path().as_os_str()), None).expect("found");
        assert_eq!(found.cli, None);
        let err = found.require_cli().expect_err("no cli");
        assert!(err.to_string().contains("redis-tools"), "{err}");
    }
}
