//! Watches the apps dir and says what it saw of each file; the controller's intake
//! decides (re-reading the whole directory, so a missed event can never leave the host
//! wrong).
//!
//! Only events that mean a content or a name changed are passed on: a close after
//! writing, a rename in or out, a create, a delete, a write, a change of mode. An open
//! or a read is never a change (notify asks inotify for `IN_OPEN` too, and the daemon's
//! own reads used to wake it again every debounce period, forever). No debounce: a file
//! that arrives complete (renamed into place, or closed after writing) is read at once,
//! and the controller already merges everything queued into one re-plan.
//! The directory (not the files) is watched because editors and `git checkout` replace
//! files by rename.

use std::path::{Path, PathBuf};

use clusterd_core::intake::WriteState;
use notify::event::{AccessKind, AccessMode, CreateKind, EventKind, ModifyKind, RenameMode};
use notify::{RecommendedWatcher, RecursiveMode, Watcher};
use tokio::sync::mpsc;

use super::Msg;

/// Keeps the watcher alive; dropping it stops watching.
pub struct Watch {
    _watcher: RecommendedWatcher,
}

/// What one event says about the files it names.
fn classify(event: &notify::Event) -> Option<Vec<(PathBuf, Option<WriteState>)>> {
    let all = |state: Option<WriteState>| event.paths.iter().map(|p| (p.clone(), state)).collect();
    match event.kind {
        EventKind::Access(AccessKind::Close(AccessMode::Write)) => {
            Some(all(Some(WriteState::Closed)))
        }
        EventKind::Access(_) => None,
        EventKind::Create(CreateKind::Folder) => None,
        EventKind::Create(_)
        | EventKind::Modify(ModifyKind::Data(_))
        | EventKind::Modify(ModifyKind::Any) => Some(all(Some(WriteState::Open))),
        EventKind::Modify(ModifyKind::Name(RenameMode::To)) => Some(all(Some(WriteState::Closed))),
        EventKind::Modify(ModifyKind::Name(RenameMode::Both)) => Some(
            event
                .paths
                .iter()
                .enumerate()
                .map(|(i, p)| (p.clone(), (i == 1).then_some(WriteState::Closed)))
                .collect(),
        ),
        EventKind::Modify(_) | EventKind::Remove(_) | EventKind::Any | EventKind::Other => {
            Some(all(None))
        }
    }
}

/// Starts watching `dir`; changes arrive as `Msg::Files`.
///
/// # Errors
/// When inotify cannot watch the directory (missing, or `max_user_watches` reached);
/// the backstop rescan still works then, so the caller may log and go on.
pub fn watch(dir: &Path, tx: mpsc::UnboundedSender<Msg>) -> notify::Result<Watch> {
    let watched = dir.to_path_buf();
    let mut watcher = notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
        match res {
            Ok(event) => {
                tracing::debug!(kind = ?event.kind, paths = ?event.paths, "apps dir event");
                let Some(files) = classify(&event) else {
                    return;
                };
                // The dir itself removed or moved away: say so, the controller re-watches.
                let dir_gone = matches!(
                    event.kind,
                    EventKind::Remove(_) | EventKind::Modify(ModifyKind::Name(_))
                ) && event.paths.iter().any(|p| p == &watched);
                let _ = tx.send(Msg::Files { files, dir_gone });
            }
            Err(e) => {
                tracing::warn!(error = %e, "manifest watcher");
                let _ = tx.send(Msg::Files {
                    files: Vec::new(),
                    dir_gone: false,
                });
            }
        }
    })?;
    watcher.watch(dir, RecursiveMode::NonRecursive)?;
    Ok(Watch { _watcher: watcher })
}

#[cfg(test)]
mod tests {
    use super::*;
    use notify::event::RemoveKind;

    fn ev(kind: EventKind, paths: &[&str]) -> notify::Event {
        let mut e = notify::Event::new(kind);
        for p in paths {
            e = e.add_path(PathBuf::from(p));
        }
        e
    }

    #[test]
    fn reads_and_opens_are_not_changes() {
        for kind in [
            EventKind::Access(AccessKind::Open(AccessMode::Any)),
            EventKind::Access(AccessKind::Read),
            EventKind::Access(AccessKind::Close(AccessMode::Read)),
        ] {
            assert_eq!(classify(&ev(kind, &["/a/web.yaml"])), None, "{kind:?}");
        }
    }

    #[test]
    fn complete_files_are_closed_and_writes_open() {
        let closed = Some(WriteState::Closed);
        let open = Some(WriteState::Open);
        let p = PathBuf::from("/a/web.yaml");
        assert_eq!(
            classify(&ev(
                EventKind::Access(AccessKind::Close(AccessMode::Write)),
                &["/a/web.yaml"]
            )),
            Some(vec![(p.clone(), closed)])
        );
        assert_eq!(
            classify(&ev(
                EventKind::Modify(ModifyKind::Name(RenameMode::To)),
                &["/a/web.yaml"]
            )),
            Some(vec![(p.clone(), closed)])
        );
        assert_eq!(
            classify(&ev(
                EventKind::Modify(ModifyKind::Name(RenameMode::Both)),
                &["/a/.tmp", "/a/web.yaml"]
            )),
            Some(vec![(PathBuf::from("/a/.tmp"), None), (p.clone(), closed)])
        );
        assert_eq!(
            classify(&ev(
                EventKind::Modify(ModifyKind::Data(notify::event::DataChange::Any)),
                &["/a/web.yaml"]
            )),
            Some(vec![(p.clone(), open)])
        );
        assert_eq!(
            classify(&ev(EventKind::Remove(RemoveKind::File), &["/a/web.yaml"])),
            Some(vec![(p, None)])
        );
    }
}
