//! Watches the apps dir and only says "look again": the reconcile loop re-reads the
//! whole directory, so a missed or merged event can never leave the host wrong. The
//! directory (not the files) is watched because editors and `git checkout` replace
//! files by rename.

use std::path::Path;
use std::time::Duration;

use notify::RecursiveMode;
use notify_debouncer_full::{new_debouncer, DebounceEventResult};
use tokio::sync::mpsc;

use super::Msg;

/// Keeps the watcher alive; dropping it stops watching.
pub struct Watch {
    _debouncer: Box<dyn std::any::Any + Send>,
}

/// Starts watching `dir`; events arrive as `Msg::ManifestsChanged`.
///
/// # Errors
/// When inotify cannot watch the directory (missing, or `max_user_watches` reached);
/// the periodic rescan still works then, so the caller may log and go on.
pub fn watch(dir: &Path, tx: mpsc::UnboundedSender<Msg>) -> notify::Result<Watch> {
    let mut debouncer = new_debouncer(
        Duration::from_millis(150),
        None,
        move |res: DebounceEventResult| match res {
            Ok(events) if events.is_empty() => {}
            Ok(_) => {
                let _ = tx.send(Msg::ManifestsChanged);
            }
            Err(errors) => {
                for e in errors {
                    tracing::warn!(error = %e, "manifest watcher");
                }
                let _ = tx.send(Msg::ManifestsChanged);
            }
        },
    )?;
    debouncer.watch(dir, RecursiveMode::NonRecursive)?;
    Ok(Watch {
        _debouncer: Box::new(debouncer),
    })
}
