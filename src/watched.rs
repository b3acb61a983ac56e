//! What became of files the broker reloads when they change (the caller policy, the server
//! certificate and key, the client CA bundle and revocation lists): the contents in use, the
//! contents last refused while the files still hold them (what is in force is then older
//! than what is on disk: a renewal or a revocation that did not take), and how many contents
//! were refused, each counted and told once however often the watcher looks.

use std::fmt;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use tracing::{debug, warn};

/// The memory of one set of watched files, by SHA-256 of their contents.
#[derive(Debug)]
pub struct WatchedFiles {
    contents: Mutex<Contents>,
    refusals: AtomicU64,
}

#[derive(Debug)]
struct Contents {
    /// The contents in use (none before the first load).
    loaded: Option<[u8; 32]>,
    /// The contents last refused, while the files still hold them.
    refused: Option<[u8; 32]>,
}

/// `Contents::refused` while a file cannot be read (no content to tell apart).
const UNREADABLE: [u8; 32] = [0xff; 32];

/// What one look at a set of files found.
#[derive(Debug)]
pub enum Look<E> {
    /// New contents, now in use.
    Installed,
    /// The contents in use.
    Unchanged,
    /// Contents refused, or files that cannot be read; `new`: not what the look before
    /// refused (counted, and told as a warning).
    Refused { error: E, new: bool },
    /// The contents refused before, not judged again (`again` false).
    RefusedBefore,
}

impl<E> Look<E> {
    /// `Ok(true)` when new contents were installed; `before` stands for a refusal not
    /// judged again.
    pub fn into_result(self, before: impl FnOnce() -> E) -> Result<bool, E> {
        match self {
            Look::Installed => Ok(true),
            Look::Unchanged => Ok(false),
            Look::Refused { error, .. } => Err(error),
            Look::RefusedBefore => Err(before()),
        }
    }
}

impl<E: fmt::Display> Look<E> {
    /// Logs a refusal (`refused` says what stays in force): as a warning when it is new or an
    /// operator asked (`asked`: SIGHUP), else at debug. Whether new contents were installed.
    pub fn logged(self, asked: bool, refused: &str) -> bool {
        match self {
            Look::Installed => true,
            Look::Unchanged | Look::RefusedBefore => false,
            Look::Refused { error, new } if new || asked => {
                warn!(error = %error, "{refused}");
                false
            }
            Look::Refused { error, .. } => {
                debug!(error = %error, "{refused} (refused before)");
                false
            }
        }
    }
}

impl WatchedFiles {
    /// `loaded`: the digest of the contents in use, if any are yet.
    pub fn new(loaded: Option<[u8; 32]>) -> WatchedFiles {
        WatchedFiles {
            contents: Mutex::new(Contents {
                loaded,
                refused: None,
            }),
            refusals: AtomicU64::new(0),
        }
    }

    /// Judges what was `read` from the files (the contents and their digest): contents other
    /// than those in use go to `install`, and are refused when it fails. Contents refused
    /// before go to it again only with `again`: for what is judged by the time as well (a
    /// certificate not yet valid becomes valid as it is), or to tell the problems again.
    /// Looks are one at a time.
    pub fn look<T, E>(
        &self,
        read: Result<(T, [u8; 32]), E>,
        again: bool,
        install: impl FnOnce(T) -> Result<(), E>,
    ) -> Look<E> {
        let mut contents = self.contents.lock().unwrap_or_else(|p| p.into_inner());
        let (read, digest) = match read {
            Ok(read) => read,
            Err(error) => {
                let new = self.refuse(&mut contents, UNREADABLE);
                return Look::Refused { error, new };
            }
        };
        if contents.loaded == Some(digest) {
            // Put back as it was: the files hold what is in use again.
            contents.refused = None;
            return Look::Unchanged;
        }
        if !again && contents.refused == Some(digest) {
            return Look::RefusedBefore;
        }
        match install(read) {
            Ok(()) => {
                contents.loaded = Some(digest);
                contents.refused = None;
                Look::Installed
            }
            Err(error) => {
                let new = self.refuse(&mut contents, digest);
                Look::Refused { error, new }
            }
        }
    }

    /// Notes `digest` as refused; whether it is new (then counted).
    fn refuse(&self, contents: &mut Contents, digest: [u8; 32]) -> bool {
        let new = contents.refused != Some(digest);
        if new {
            contents.refused = Some(digest);
            self.refusals.fetch_add(1, Ordering::Relaxed);
        }
        new
    }

    /// Whether the files hold contents that were refused (or cannot be read), so that what is
    /// in force is older.
    pub fn refused(&self) -> bool {
        self.contents
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .refused
            .is_some()
    }

    /// Contents refused so far, each once.
    pub fn refusals(&self) -> u64 {
        self.refusals.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_refused_content_is_new_once_until_the_files_hold_what_is_in_use_again() {
        let files = WatchedFiles::new(Some([1; 32]));
        let refuse = |d: [u8; 32]| match files.look(Ok(((), d)), true, |()| Err("bad")) {
            Look::Refused { new, .. } => new,
            _ => panic!("refused"),
        };
        let unreadable = || {
            let read = Err("unreadable");
            match files.look::<(), _>(read, true, |()| panic!("nothing to install")) {
                Look::Refused { new, .. } => new,
                _ => panic!("refused"),
            }
        };
        assert!(!files.refused());
        // Told and counted once per content, however often it is looked at.
        assert!(refuse([2; 32]));
        assert!(!refuse([2; 32]));
        assert!(files.refused());
        assert_eq!(files.refusals(), 1);
        assert!(refuse([3; 32]));
        assert!(unreadable());
        assert!(!unreadable());
        assert_eq!(files.refusals(), 3);
        // The files hold what is in use again: nothing refused; a refusal after is new.
        assert!(matches!(
            files.look::<(), &str>(Ok(((), [1; 32])), true, |()| panic!("in use already")),
            Look::Unchanged
        ));
        assert!(!files.refused());
        assert!(refuse([2; 32]));
        // New contents installed: nothing refused; the count stays.
        assert!(matches!(
            files.look::<(), &str>(Ok(((), [4; 32])), true, |()| Ok(())),
            Look::Installed
        ));
        assert!(!files.refused());
        assert_eq!(files.refusals(), 4);
        assert!(matches!(
            files.look::<(), &str>(Ok(((), [4; 32])), true, |()| panic!("in use already")),
            Look::Unchanged
        ));
    }

    #[test]
    fn a_content_refused_before_is_judged_again_only_when_asked() {
        let files = WatchedFiles::new(None);
        let mut judged = 0;
        let mut look = |again: bool| {
            files.look(Ok(((), [2; 32])), again, |()| {
                judged += 1;
                Err("bad")
            })
        };
        assert!(matches!(look(false), Look::Refused { new: true, .. }));
        assert!(matches!(look(false), Look::RefusedBefore));
        assert!(matches!(look(true), Look::Refused { new: false, .. }));
        assert_eq!(judged, 2);
        assert_eq!(files.refusals(), 1);
    }
}
