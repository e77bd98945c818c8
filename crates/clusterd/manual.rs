//! `clusterd completions SHELL` and `clusterd man`: generated from the clap definition in
//! `cli`, so they can never drift from the real flags. The Debian package build
//! (`scripts/build-deb`) runs both against the binary it ships.

use std::io::Write as _;
use std::path::Path;
use std::process::ExitCode;

use anyhow::Context;

/// Prints the completion script for `shell` on stdout.
///
/// # Errors
/// Only if stdout cannot be written.
pub fn completions(
    mut cmd: clap::Command,
    shell: clap_complete::Shell,
) -> anyhow::Result<ExitCode> {
    let mut script = Vec::new();
    clap_complete::generate(shell, &mut cmd, "clusterd", &mut script);
    print_bytes(&script).context("writing the completion script")?;
    Ok(ExitCode::SUCCESS)
}

/// Prints clusterd(1), or with `out_dir` writes clusterd.1 plus one
/// clusterd-COMMAND.1 per visible subcommand (what the package installs).
///
/// # Errors
/// If the directory cannot be created or written, or stdout cannot be written.
pub fn man(cmd: clap::Command, out_dir: Option<&Path>) -> anyhow::Result<ExitCode> {
    let cmd = cmd
        .disable_help_subcommand(true)
        .long_about(LONG_ABOUT)
        .after_long_help(FILES);
    match out_dir {
        Some(dir) => {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
            clap_mangen::generate_to(cmd, dir)
                .with_context(|| format!("writing man pages into {}", dir.display()))?;
        }
        None => {
            let mut page = Vec::new();
            clap_mangen::Man::new(cmd)
                .render(&mut page)
                .context("rendering the man page")?;
            print_bytes(&page).context("writing the man page")?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// The man page's DESCRIPTION (the `--help` text stays short).
const LONG_ABOUT: &str =
    "clusterd runs network services on one Linux host the way Kubernetes runs them \
on a cluster. YAML app manifests in the apps dir say what should run; the daemon \
(`clusterd daemon`, usually the clusterd.service unit) runs each app as N worker processes \
behind one listening port that it owns, replaces workers one by one when a manifest \
changes, restarts crashed workers with backoff, and drains workers before stopping them. \
The other commands talk to the daemon over its control socket, or work on manifest files \
offline (validate, diff, export, import).";

/// Rendered as an extra section of the man page.
const FILES: &str =
    "FILES AND ENVIRONMENT: as root, manifests are read from /etc/clusterd/apps, the control \
socket is /run/clusterd/clusterd.sock, state is kept in /var/lib/clusterd and worker logs \
in /var/log/clusterd; as another user, the XDG equivalents. /etc/clusterd/clusterd.env \
holds site settings for the systemd unit (CLUSTERD_ARGS, CLUSTERD_LOG). CLUSTERD_SOCKET \
points every client command at another daemon; CLUSTERD_APPS_DIR sets the apps dir of \
apply and diff. Full documentation: /usr/share/doc/clusterd/.";

/// Writes to stdout; a reader that went away (`| head`) is not an error.
fn print_bytes(bytes: &[u8]) -> std::io::Result<()> {
    let mut out = std::io::stdout().lock();
    match out.write_all(bytes).and_then(|()| out.flush()) {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        other => other,
    }
}
