//! The real `tickgate` binary, for tests that need it as its own process (signals, exit
//! statuses, `ulimit`, its command line).

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use super::{Kill, Serving};

/// The binary cargo built for this test run.
pub const BIN: &str = env!("CARGO_BIN_EXE_tickgate");

/// Writes a configuration file `tickgate.toml` in `dir`: both listeners on ephemeral
/// loopback ports, then `extra` (more top-level keys and tables). Returns its path.
pub fn write_config(dir: &Path, extra: &str) -> PathBuf {
    let path = dir.join("tickgate.toml");
    std::fs::write(&path, format!("listen = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n{extra}")).unwrap();
    path
}

/// Spawns `cmd` (a `tickgate serve`, or a shell that execs one) with stdout piped, and
/// reads stdout until its start-up line. The child is owned by a [`Kill`] before anything
/// can panic, so a failed start leaves no process behind. Stdout is closed after the line.
pub fn spawn_serving(cmd: &mut Command) -> (Kill, Serving) {
    let mut child = Kill(cmd.stdout(Stdio::piped()).spawn().unwrap());
    let stdout = BufReader::new(child.0.stdout.take().unwrap());
    match stdout.lines().map_while(Result::ok).find_map(|l| Serving::parse(&l)) {
        Some(serving) => (child, serving),
        None => panic!("tickgate serve exited before serving"),
    }
}
