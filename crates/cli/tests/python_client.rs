//! The Python client's suite (`clients/python/tests`): the conformance scenarios for its asyncio
//! and threaded clients, its unit and client tests, and its end-to-end test against this
//! binary (`CACHECLEAR_BIN`). Runs in a virtual environment under `target/python-venv`
//! (`python3 -m venv`, then `pip install ./clients/python[test]` from PyPI).

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

const BIN: &str = env!("CARGO_BIN_EXE_cacheclear");

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .expect("the repository root")
}

fn show(output: &Output) -> String {
    format!(
        "--- stdout ---\n{}\n--- stderr ---\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

/// Runs `cmd` to completion; panics with its output (naming `what`) unless it succeeds.
fn run(what: &str, cmd: &mut Command) -> Output {
    let output = cmd
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("{what}: could not start {cmd:?}: {e}"));
    assert!(
        output.status.success(),
        "{what} failed ({}): {cmd:?}\n{}",
        output.status,
        show(&output)
    );
    output
}

#[test]
fn python_client_suite_passes() {
    let root = repo_root();
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .map(|t| if t.is_absolute() { t } else { root.join(t) })
        .unwrap_or_else(|| root.join("target"));
    let venv = target.join("python-venv");
    let python = venv.join("bin").join("python");
    if !python.exists() {
        run(
            "creating the venv (python3 -m venv; on Debian: apt-get install python3-venv)",
            Command::new("python3").args(["-m", "venv"]).arg(&venv),
        );
    }
    // Dependencies (redis, pytest, psycopg), then the package itself rebuilt from this tree
    // (a non-editable install: the wheel carries crates/protocol/lua/*.lua).
    run(
        "pip install ./clients/python[test]",
        Command::new(&python)
            .args([
                "-m",
                "pip",
                "install",
                "--quiet",
                "--disable-pip-version-check",
            ])
            .arg("./clients/python[test]")
            .current_dir(&root),
    );
    run(
        "pip install --force-reinstall --no-deps ./clients/python",
        Command::new(&python)
            .args([
                "-m",
                "pip",
                "install",
                "--quiet",
                "--disable-pip-version-check",
                "--force-reinstall",
                "--no-deps",
                "./clients/python",
            ])
            .current_dir(&root),
    );
    let tmpdir = std::env::var_os("TMPDIR").unwrap_or_else(|| "/tmp".into());
    let output = Command::new(&python)
        .args([
            "-m",
            "pytest",
            "clients/python/tests",
            "-q",
            "-p",
            "no:cacheprovider",
        ])
        .current_dir(&root)
        .env("CACHECLEAR_BIN", BIN)
        .env("TMPDIR", tmpdir)
        .env_remove("PYTHONPATH")
        .stdin(Stdio::null())
        .output()
        .expect("run pytest");
    println!("{}", show(&output));
    assert!(
        output.status.success(),
        "the Python client's suite failed ({}):\n{}",
        output.status,
        show(&output)
    );
}
