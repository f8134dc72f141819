//! Where epochs come from: a number that never repeats across restarts of a node.
//!
//! A client that resumes compares the epoch it holds with the feed's current one *for
//! equality*; an epoch that comes back after a restart makes the server take the client's
//! old seqs as seqs of the new numbering and silently skip records (a resume at seq 13
//! against a feed now at seq 2 waits for seq 14). The start time in whole seconds repeated
//! after `kill -9` and a restart within the same second (systemd's `RestartSec=100ms`).
//!
//! An epoch is therefore `max(last + 1, now_ms)`:
//! - `last` is the highest epoch this node ever handed out, kept in `<state_dir>/epoch`.
//!   The file is written to a temporary file, fsynced, renamed over the old one and the
//!   folder fsynced *before* the epoch is used, so a crash at any point leaves either the
//!   old or the new value, and the value on disk is never below an epoch a client saw.
//!   This is what makes epochs strictly increasing even when the clock goes backwards
//!   (NTP step, a VM restored from a snapshot).
//! - `now_ms` (milliseconds since the Unix epoch) is the fallback when the file is lost
//!   (first start, a wiped or ephemeral state folder): a restart takes far more than a
//!   millisecond, so only a lost file *and* a clock set back at once can repeat an epoch.
//! - A file that exists but cannot be read as a number is a start-up error naming the
//!   file: guessing would defeat the point. Deleting it falls back on the clock.
//!
//! Epochs stay u64 on the wire; they grew from seconds to milliseconds, and clients only
//! compare them for equality.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use thiserror::Error;

/// Name of the file in the state folder.
pub const EPOCH_FILE: &str = "epoch";

/// Environment variable systemd sets for `StateDirectory=`; used when `server.state_dir`
/// is not set.
pub const STATE_DIRECTORY_ENV: &str = "STATE_DIRECTORY";

/// The epoch state could not be read or made durable.
#[derive(Debug, Error)]
pub enum EpochError {
    /// The state folder or file could not be created, read, written or synced.
    #[error("epoch state {path}: {source} (set server.state_dir to a writable folder)")]
    Io {
        /// The file or folder.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The file exists but does not hold an epoch.
    #[error(
        "epoch state file {path} is corrupt ({content:?} is not a positive integer); fix it or delete it to take epochs from the clock"
    )]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// The start of what it holds.
        content: String,
    },
    /// No epoch is left above the last one (the file holds u64::MAX).
    #[error("epoch state file {path}: no epoch left above {last}")]
    Exhausted {
        /// The file.
        path: PathBuf,
        /// The value it holds.
        last: u64,
    },
}

/// The state folder for a configured `server.state_dir`: the configured one, else
/// systemd's `$STATE_DIRECTORY` (its first entry), else `state` in the working folder
/// (a development checkout, like `feeds`).
pub fn resolve_state_dir(configured: Option<&Path>) -> PathBuf {
    if let Some(p) = configured {
        return p.to_owned();
    }
    match std::env::var_os(STATE_DIRECTORY_ENV) {
        Some(v) if !v.is_empty() => {
            let s = v.to_string_lossy().into_owned();
            PathBuf::from(s.split(':').next().unwrap_or(&s))
        }
        _ => PathBuf::from("state"),
    }
}

/// Milliseconds since the Unix epoch (0 when the clock is before 1970).
pub fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

/// Hands out epochs that are strictly above every epoch this node handed out before,
/// across restarts. Shared by the server start (the first epoch of every feed) and the
/// sources that start new epochs (a replay's next pass).
#[derive(Debug)]
pub struct EpochStore {
    file: PathBuf,
    /// The highest epoch handed out (and persisted).
    last: Mutex<u64>,
    /// A lock-free copy of `last` for [`EpochStore::last`].
    last_copy: AtomicU64,
}

impl EpochStore {
    /// Opens (creating the folder if needed) the state in `dir`. A missing file is a
    /// first start; a corrupt one is an error.
    pub fn open(dir: &Path) -> Result<EpochStore, EpochError> {
        std::fs::create_dir_all(dir).map_err(|source| EpochError::Io { path: dir.to_owned(), source })?;
        let file = dir.join(EPOCH_FILE);
        let last = match std::fs::read(&file) {
            Ok(bytes) => parse(&file, &bytes)?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => 0,
            Err(source) => return Err(EpochError::Io { path: file, source }),
        };
        Ok(EpochStore { file, last: Mutex::new(last), last_copy: AtomicU64::new(last) })
    }

    /// The state file.
    pub fn path(&self) -> &Path {
        &self.file
    }

    /// The highest epoch handed out so far (0: none, on a first start).
    pub fn last(&self) -> u64 {
        self.last_copy.load(Ordering::Acquire)
    }

    /// A new epoch, at least `at_least`, above every one handed out before and not below
    /// the clock in milliseconds; durable on disk when this returns. Blocking file I/O
    /// (a few small writes and two fsyncs): call it at start-up or from a blocking task.
    pub fn next(&self, at_least: u64) -> Result<u64, EpochError> {
        self.next_at(at_least, now_ms())
    }

    /// [`EpochStore::next`] with the clock given (tests).
    pub fn next_at(&self, at_least: u64, now_ms: u64) -> Result<u64, EpochError> {
        let mut last = self.last.lock().unwrap_or_else(|p| p.into_inner());
        let above =
            last.checked_add(1).ok_or_else(|| EpochError::Exhausted { path: self.file.clone(), last: *last })?;
        let epoch = above.max(now_ms).max(at_least).max(1);
        self.persist(epoch)?;
        *last = epoch;
        self.last_copy.store(epoch, Ordering::Release);
        Ok(epoch)
    }

    /// Writes `epoch` durably: temporary file, fsync, rename, fsync of the folder.
    fn persist(&self, epoch: u64) -> Result<(), EpochError> {
        let io = |path: &Path| {
            let path = path.to_owned();
            move |source| EpochError::Io { path, source }
        };
        let dir = self.file.parent().unwrap_or(Path::new("."));
        // A name of its own per process and write, so two servers sharing a folder (tests
        // start several in one process) never write into each other's temporary file.
        static WRITES: AtomicU64 = AtomicU64::new(0);
        let n = WRITES.fetch_add(1, Ordering::Relaxed);
        let tmp = dir.join(format!(".{EPOCH_FILE}.{}.{n}.tmp", std::process::id()));
        let written = std::fs::File::create(&tmp)
            .and_then(|mut f| {
                f.write_all(format!("{epoch}\n").as_bytes())?;
                f.sync_all()
            })
            .map_err(io(&tmp))
            .and_then(|()| std::fs::rename(&tmp, &self.file).map_err(io(&self.file)));
        if written.is_err() {
            // Best effort: a full disk must not also collect temporary files.
            let _ = std::fs::remove_file(&tmp);
        }
        written?;
        // The rename is durable only once the folder's entry is.
        #[cfg(unix)]
        std::fs::File::open(dir).and_then(|d| d.sync_all()).map_err(io(dir))?;
        Ok(())
    }
}

fn parse(file: &Path, bytes: &[u8]) -> Result<u64, EpochError> {
    let corrupt = || EpochError::Corrupt {
        path: file.to_owned(),
        content: String::from_utf8_lossy(&bytes[..bytes.len().min(40)]).into_owned(),
    };
    let text = std::str::from_utf8(bytes).map_err(|_| corrupt())?;
    match text.trim().parse::<u64>() {
        Ok(n) if n > 0 => Ok(n),
        _ => Err(corrupt()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_millisecond_and_a_clock_going_backwards_still_increase() {
        let dir = tempfile::tempdir().expect("tempdir");
        let now = 1_767_220_000_000;
        let a = EpochStore::open(dir.path()).expect("open").next_at(0, now).expect("epoch");
        assert_eq!(a, now, "a first start takes the clock");
        // A restart within the same millisecond (and so the same second).
        let b = EpochStore::open(dir.path()).expect("open").next_at(0, now).expect("epoch");
        assert_eq!(b, now + 1);
        // The clock set back by an hour: still above the last one.
        let c = EpochStore::open(dir.path()).expect("open").next_at(0, now - 3_600_000).expect("epoch");
        assert_eq!(c, now + 2);
        // The clock moving on wins again.
        let store = EpochStore::open(dir.path()).expect("open");
        assert_eq!(store.last(), now + 2);
        assert_eq!(store.next_at(0, now + 10_000).expect("epoch"), now + 10_000);
        // `at_least` (a replay pass after `feed.epoch()`) is honoured, in the same process.
        assert_eq!(store.next_at(now + 20_000, now + 10_001).expect("epoch"), now + 20_000);
        assert_eq!(std::fs::read_to_string(dir.path().join(EPOCH_FILE)).expect("file"), format!("{}\n", now + 20_000));
        // No temporary file is left behind.
        assert_eq!(std::fs::read_dir(dir.path()).expect("dir").count(), 1);
    }

    #[test]
    fn a_missing_file_falls_back_on_the_clock_and_a_corrupt_one_is_an_error() {
        let dir = tempfile::tempdir().expect("tempdir");
        let nested = dir.path().join("a/b");
        let store = EpochStore::open(&nested).expect("the folder is created");
        assert_eq!(store.last(), 0);
        assert_eq!(store.next_at(0, 0).expect("epoch"), 1, "never 0, even with a clock before 1970");
        for bad in ["", "abc\n", "-5\n", "0\n", "18446744073709551616\n", "12 13\n"] {
            std::fs::write(nested.join(EPOCH_FILE), bad).expect("write");
            let e = EpochStore::open(&nested).expect_err(bad);
            assert!(matches!(e, EpochError::Corrupt { .. }), "{bad:?}: {e}");
            assert!(e.to_string().contains("delete it"), "{e}");
        }
        std::fs::write(nested.join(EPOCH_FILE), [0xff, 0xfe]).expect("write");
        assert!(matches!(EpochStore::open(&nested), Err(EpochError::Corrupt { .. })));
        std::fs::write(nested.join(EPOCH_FILE), format!("{}\n", u64::MAX)).expect("write");
        let e = EpochStore::open(&nested).expect("open").next_at(0, 5).expect_err("exhausted");
        assert!(matches!(e, EpochError::Exhausted { .. }), "{e}");
        // Surrounding whitespace is fine (a file edited by hand).
        std::fs::write(nested.join(EPOCH_FILE), " 42 \n").expect("write");
        assert_eq!(EpochStore::open(&nested).expect("open").next_at(0, 5).expect("epoch"), 43);
    }

    #[test]
    fn an_unwritable_state_folder_is_an_error() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("not-a-dir");
        std::fs::write(&file, "x").expect("write");
        let e = EpochStore::open(&file.join("state")).expect_err("a file in the way");
        assert!(matches!(e, EpochError::Io { .. }), "{e}");
        assert!(e.to_string().contains("server.state_dir"), "{e}");
    }

    #[test]
    fn state_dir_resolution() {
        assert_eq!(resolve_state_dir(Some(Path::new("/x"))), PathBuf::from("/x"));
    }
}
