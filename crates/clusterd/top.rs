//! `clusterd top`: a live terminal view of every app and worker, like `pm2 monit`.
//!
//! It only reads the control API (`GET /v1/apps` once a second, `GET /v1/daemon` for the
//! log dir) and sends the same reload request as `clusterd reload --no-wait`, so it works
//! against any daemon the socket reaches (`CLUSTERD_SOCKET`). What it shows per worker is
//! what the status JSON carries: pid, state, CPU %, RSS, requests in flight (proxied
//! modes), restarts, uptime, last exit. The daemon takes a fresh CPU/RSS sample for a
//! status request when its last one is over a second old, so watching is what keeps
//! those columns current.
//!
//! The screen is drawn by a pure function of [`View`] (tested with ratatui's test
//! backend); the loop around it owns the terminal, and restores it on every way out:
//! q, Esc, Ctrl-C, an error, or a panic (ratatui's hook).

use std::collections::VecDeque;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use ratatui::crossterm::event::{self, Event, KeyCode, KeyEvent, KeyEventKind, KeyModifiers};
use ratatui::layout::{Constraint, Layout, Rect};
use ratatui::style::{Color, Modifier, Style};
use ratatui::text::{Line, Span};
use ratatui::widgets::{Block, Borders, Cell, Paragraph, Row, Table, TableState};
use ratatui::Frame;

use crate::api_types::{AppStatus, DaemonInfo, Phase, StatusReport};
use crate::client::Client;
use crate::output::{age, human_bytes};

/// How often the status is fetched.
const REFRESH: Duration = Duration::from_secs(1);
/// How often followed log files are polled while the log pane is open.
const LOG_POLL: Duration = Duration::from_millis(250);
/// Lines kept in the log pane.
const LOG_LINES: usize = 500;

/// `clusterd top`.
///
/// # Errors
/// The daemon cannot be reached at start (later failures are shown on screen and
/// retried), or the terminal cannot be set up.
pub fn run(client: &Client) -> anyhow::Result<ExitCode> {
    // Fail before taking over the terminal, so the error prints like any other command's.
    let first: StatusReport = client.get("/v1/apps")?;
    let mut view = View {
        socket: client.socket().display().to_string(),
        ..View::default()
    };
    view.take(first, Instant::now());
    let mut terminal = ratatui::try_init()?;
    let result = event_loop(&mut terminal, client, &mut view);
    ratatui::restore();
    result.map(|()| ExitCode::SUCCESS)
}

fn event_loop(
    terminal: &mut ratatui::DefaultTerminal,
    client: &Client,
    view: &mut View,
) -> anyhow::Result<()> {
    let mut next_fetch = Instant::now() + REFRESH;
    let mut logs: Option<LogFollow> = None;
    loop {
        if let Some(f) = logs.as_mut() {
            f.poll(view);
        }
        terminal.draw(|frame| draw(frame, view))?;
        let now = Instant::now();
        if now >= next_fetch {
            match client.get::<StatusReport>("/v1/apps") {
                Ok(r) => {
                    view.take(r, now);
                    view.error = None;
                }
                Err(e) => view.error = Some(format!("{e:#}")),
            }
            view.fetched = view.fetched.wrapping_add(1);
            next_fetch = now + REFRESH;
            continue;
        }
        let wait = if logs.is_some() {
            LOG_POLL.min(next_fetch - now)
        } else {
            next_fetch - now
        };
        if !event::poll(wait)? {
            continue;
        }
        let Event::Key(key) = event::read()? else {
            continue; // a resize: drawn again at the top of the loop
        };
        match handle_key(view, key) {
            Command::None => {}
            Command::Quit => return Ok(()),
            Command::Reload(app) => {
                let msg = match client.post::<serde_json::Value>(&format!("/v1/apps/{app}/reload"))
                {
                    Ok(_) => format!("{app}: reload requested"),
                    Err(e) => format!("{app}: reload failed: {e:#}"),
                };
                view.message = Some(msg);
                next_fetch = Instant::now();
            }
            Command::FollowLogs(app) => match LogFollow::start(client, &app) {
                Ok(f) => {
                    view.log_app = Some(app);
                    view.log_lines = f.initial.clone().into();
                    logs = Some(f);
                }
                Err(e) => view.message = Some(format!("{app}: no logs: {e:#}")),
            },
            Command::CloseLogs => {
                logs = None;
                view.log_app = None;
                view.log_lines.clear();
            }
        }
    }
}

/// What a key asks the loop to do.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Command {
    None,
    Quit,
    Reload(String),
    FollowLogs(String),
    CloseLogs,
}

fn handle_key(view: &mut View, key: KeyEvent) -> Command {
    if key.kind != KeyEventKind::Press {
        return Command::None;
    }
    let apps = view.report.as_ref().map_or(0, |r| r.apps.len());
    match key.code {
        KeyCode::Char('c') if key.modifiers.contains(KeyModifiers::CONTROL) => Command::Quit,
        KeyCode::Char('q') => Command::Quit,
        KeyCode::Esc if view.log_app.is_some() => Command::CloseLogs,
        KeyCode::Esc => Command::Quit,
        KeyCode::Up | KeyCode::Char('k') => {
            view.selected = view.selected.saturating_sub(1);
            Command::None
        }
        KeyCode::Down | KeyCode::Char('j') => {
            if view.selected + 1 < apps {
                view.selected += 1;
            }
            Command::None
        }
        KeyCode::Char('r') => view
            .selected_app()
            .map_or(Command::None, |a| Command::Reload(a.name.clone())),
        KeyCode::Char('l') | KeyCode::Enter => match (&view.log_app, view.selected_app()) {
            (Some(open), Some(a)) if *open == a.name => Command::CloseLogs,
            (_, Some(a)) => Command::FollowLogs(a.name.clone()),
            _ => Command::None,
        },
        _ => Command::None,
    }
}

/// Everything the screen shows; [`draw`] is a pure function of it.
#[derive(Debug, Default)]
pub struct View {
    /// The last status fetched.
    report: Option<StatusReport>,
    /// Why the last fetch failed (the previous report stays on screen).
    error: Option<String>,
    /// Index of the selected app.
    selected: usize,
    /// The socket, for the header.
    socket: String,
    /// A one-line answer to the last key (reload requested, ...).
    message: Option<String>,
    /// The app whose logs are followed, if the log pane is open.
    log_app: Option<String>,
    /// The log pane's lines, newest last.
    log_lines: VecDeque<String>,
    /// Fetch counter, shown so a frozen screen is visible as such.
    fetched: u64,
    /// Per worker pid: its request counter at the previous fetch, and when.
    seen: std::collections::HashMap<u32, (Instant, u64)>,
    /// Per worker pid: requests per second between the last two fetches.
    rates: std::collections::HashMap<u32, f64>,
}

impl View {
    /// Takes a new report in, and turns the workers' request counters into rates.
    fn take(&mut self, report: StatusReport, now: Instant) {
        let mut seen = std::collections::HashMap::new();
        self.rates.clear();
        for i in report.apps.iter().flat_map(|a| a.instances.iter()) {
            let (Some(pid), Some(total)) = (i.pid, i.requests_total) else {
                continue;
            };
            if let Some((then, before)) = self.seen.get(&pid) {
                let secs = now.duration_since(*then).as_secs_f64();
                if secs > 0.0 && total >= *before {
                    #[allow(clippy::cast_precision_loss)]
                    self.rates.insert(pid, (total - before) as f64 / secs);
                }
            }
            seen.insert(pid, (now, total));
        }
        self.seen = seen;
        self.report = Some(report);
    }

    fn rate(&self, pid: Option<u32>) -> Option<f64> {
        pid.and_then(|p| self.rates.get(&p).copied())
    }

    fn selected_app(&self) -> Option<&AppStatus> {
        let apps = &self.report.as_ref()?.apps;
        apps.get(self.selected.min(apps.len().saturating_sub(1)))
    }
}

/// Tails the log files of one app's instances.
struct LogFollow {
    app: String,
    followers: Vec<(u32, clusterd_runtime::logs::Follower)>,
    initial: Vec<String>,
}

impl LogFollow {
    fn start(client: &Client, app: &str) -> anyhow::Result<LogFollow> {
        let info: DaemonInfo = client.get("/v1/daemon")?;
        let dir = PathBuf::from(info.log_dir);
        let files = clusterd_runtime::logs::instance_logs(&dir, app);
        if files.is_empty() {
            anyhow::bail!("nothing in {}", dir.join(app).display());
        }
        let mut initial = Vec::new();
        let mut followers = Vec::new();
        for (index, path) in files {
            for line in clusterd_runtime::logs::tail(&path, 20)? {
                initial.push(format!("{app}[{index}] {line}"));
            }
            followers.push((index, clusterd_runtime::logs::Follower::from_end(path)));
        }
        Ok(LogFollow {
            app: app.to_string(),
            followers,
            initial,
        })
    }

    fn poll(&mut self, view: &mut View) {
        for (index, f) in &mut self.followers {
            if let Ok(lines) = f.poll() {
                for line in lines {
                    view.log_lines
                        .push_back(format!("{}[{index}] {line}", self.app));
                }
            }
        }
        while view.log_lines.len() > LOG_LINES {
            view.log_lines.pop_front();
        }
    }
}

fn phase_style(phase: Phase) -> Style {
    let color = match phase {
        Phase::Available => Color::Green,
        Phase::Progressing | Phase::Pending | Phase::Stopping => Color::Yellow,
        Phase::Degraded | Phase::CrashLoopBackOff | Phase::Invalid => Color::Red,
    };
    Style::default().fg(color)
}

fn opt_bytes(b: Option<u64>) -> String {
    b.map_or_else(|| "-".into(), human_bytes)
}

fn opt_cpu(c: Option<f64>) -> String {
    c.map_or_else(|| "-".into(), |c| format!("{c:.1}"))
}

fn opt_rate(r: Option<f64>) -> String {
    r.map_or_else(|| "-".into(), |r| format!("{r:.0}"))
}

/// Draws the whole screen.
pub fn draw(frame: &mut Frame<'_>, view: &View) {
    let apps: &[AppStatus] = view.report.as_ref().map_or(&[], |r| &r.apps);
    let selected = view.selected.min(apps.len().saturating_sub(1));
    let log_height = if view.log_app.is_some() {
        Constraint::Percentage(40)
    } else {
        Constraint::Length(0)
    };
    let [header, apps_area, workers_area, logs_area, footer] = Layout::vertical([
        Constraint::Length(1),
        Constraint::Length(
            u16::try_from(apps.len())
                .unwrap_or(u16::MAX)
                .saturating_add(3)
                .min(20),
        ),
        Constraint::Min(4),
        log_height,
        Constraint::Length(1),
    ])
    .areas(frame.area());

    let title = format!(
        "clusterd top  {} apps  socket {}  refresh 1s  #{}",
        apps.len(),
        view.socket,
        view.fetched
    );
    frame.render_widget(
        Paragraph::new(Line::from(Span::styled(
            title,
            Style::default().add_modifier(Modifier::BOLD),
        ))),
        header,
    );

    draw_apps(frame, apps_area, view, apps, selected);
    draw_workers(frame, workers_area, view, apps.get(selected));

    if let Some(app) = &view.log_app {
        let height = usize::from(logs_area.height.saturating_sub(2));
        let start = view.log_lines.len().saturating_sub(height);
        let lines: Vec<Line<'_>> = view
            .log_lines
            .iter()
            .skip(start)
            .map(|l| Line::from(l.as_str()))
            .collect();
        frame.render_widget(
            Paragraph::new(lines).block(
                Block::default()
                    .borders(Borders::ALL)
                    .title(format!(" logs: {app} (following; l or Esc closes) ")),
            ),
            logs_area,
        );
    }

    let daemon_error = view.report.as_ref().and_then(|r| r.daemon_errors.first());
    let status = match (&view.error, daemon_error, &view.message) {
        (Some(e), _, _) => Span::styled(format!("error: {e}"), Style::default().fg(Color::Red)),
        (None, Some(e), _) => Span::styled(format!("daemon: {e}"), Style::default().fg(Color::Red)),
        (None, None, Some(m)) => Span::raw(m.clone()),
        (None, None, None) => Span::raw(""),
    };
    frame.render_widget(
        Paragraph::new(Line::from(vec![
            Span::styled(
                "q quit  ↑/↓ select  r reload  l logs  ",
                Style::default().add_modifier(Modifier::DIM),
            ),
            status,
        ])),
        footer,
    );
}

fn draw_apps(frame: &mut Frame<'_>, area: Rect, view: &View, apps: &[AppStatus], selected: usize) {
    let header = Row::new([
        "APP", "PHASE", "READY", "RESTARTS", "CPU%", "RSS", "INFLIGHT", "REQ/S", "LISTEN", "AGE",
    ])
    .style(Style::default().add_modifier(Modifier::BOLD));
    let rows = apps.iter().map(|a| {
        let live = a.instances.iter().filter(|i| i.pid.is_some());
        let cpu: Option<f64> = live
            .clone()
            .filter_map(|i| i.cpu_percent)
            .reduce(|x, y| x + y);
        let rss: Option<u64> = live
            .clone()
            .filter_map(|i| i.rss_bytes)
            .reduce(|x, y| x + y);
        let rate: Option<f64> = live
            .clone()
            .filter_map(|i| view.rate(i.pid))
            .reduce(|x, y| x + y);
        let inflight: Option<u64> = live.filter_map(|i| i.inflight).reduce(|x, y| x + y);
        let listen = a
            .listen
            .iter()
            .map(|l| format!("{} {}", l.address, l.mode))
            .collect::<Vec<_>>()
            .join(", ");
        Row::new([
            Cell::from(a.name.clone()),
            Cell::from(a.phase.to_string()).style(phase_style(a.phase)),
            Cell::from(format!("{}/{}", a.ready, a.desired)),
            Cell::from(a.restarts.to_string()),
            Cell::from(opt_cpu(cpu)),
            Cell::from(opt_bytes(rss)),
            Cell::from(inflight.map_or_else(|| "-".into(), |n| n.to_string())),
            Cell::from(opt_rate(rate)),
            Cell::from(if listen.is_empty() {
                "-".into()
            } else {
                listen
            }),
            Cell::from(age(a.age_secs)),
        ])
    });
    let name_width = apps
        .iter()
        .map(|a| a.name.len())
        .max()
        .unwrap_or(0)
        .clamp(3, 32);
    let widths = [
        Constraint::Length(u16::try_from(name_width).unwrap_or(32)),
        Constraint::Length(16),
        Constraint::Length(6),
        Constraint::Length(8),
        Constraint::Length(6),
        Constraint::Length(8),
        Constraint::Length(8),
        Constraint::Length(7),
        Constraint::Fill(1),
        Constraint::Length(5),
    ];
    let table = Table::new(rows, widths)
        .header(header)
        .block(Block::default().borders(Borders::ALL).title(" apps "))
        .row_highlight_style(Style::default().add_modifier(Modifier::REVERSED))
        .highlight_symbol("> ");
    let mut state = TableState::default().with_selected((!apps.is_empty()).then_some(selected));
    frame.render_stateful_widget(table, area, &mut state);
}

fn draw_workers(frame: &mut Frame<'_>, area: Rect, view: &View, app: Option<&AppStatus>) {
    let Some(app) = app else {
        frame.render_widget(
            Paragraph::new("No apps. Drop a manifest into the apps dir.")
                .block(Block::default().borders(Borders::ALL)),
            area,
        );
        return;
    };
    let header = Row::new([
        "IDX",
        "PID",
        "STATE",
        "CPU%",
        "RSS",
        "INFLIGHT",
        "REQ/S",
        "RESTARTS",
        "UPTIME",
        "REVISION",
        "LAST EXIT",
    ])
    .style(Style::default().add_modifier(Modifier::BOLD));
    let rows = app.instances.iter().map(|i| {
        Row::new([
            i.index.to_string(),
            i.pid.map_or_else(|| "-".into(), |p| p.to_string()),
            i.state.to_string(),
            opt_cpu(i.cpu_percent),
            opt_bytes(i.rss_bytes),
            i.inflight.map_or_else(|| "-".into(), |n| n.to_string()),
            opt_rate(view.rate(i.pid)),
            i.restarts.to_string(),
            if i.pid.is_some() {
                age(i.uptime_secs)
            } else {
                "-".into()
            },
            i.revision.clone(),
            i.last_exit.clone().unwrap_or_else(|| "-".into()),
        ])
    });
    let widths = [
        Constraint::Length(4),
        Constraint::Length(8),
        Constraint::Length(9),
        Constraint::Length(6),
        Constraint::Length(8),
        Constraint::Length(8),
        Constraint::Length(7),
        Constraint::Length(8),
        Constraint::Length(6),
        Constraint::Length(9),
        Constraint::Min(10),
    ];
    let mut title = format!(" {}: revision {} ", app.name, app.revision);
    if let Some(e) = &app.error {
        title.push_str(&format!("  error: {e} "));
    }
    frame.render_widget(
        Table::new(rows, widths)
            .header(header)
            .block(Block::default().borders(Borders::ALL).title(title)),
        area,
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use ratatui::backend::TestBackend;
    use ratatui::Terminal;

    /// From JSON, as the daemon sends it, so fields added later need no test change.
    fn app(name: &str, pids: &[u32]) -> AppStatus {
        let instances: Vec<serde_json::Value> = pids
            .iter()
            .enumerate()
            .map(|(i, &pid)| {
                serde_json::json!({"index": i, "pid": pid, "state": "Ready",
                    "revision": "3f2a9c1e", "restarts": 0, "started": null, "uptime_secs": 12,
                    "cpu_percent": 1.5, "rss_bytes": 31_457_280, "inflight": 2})
            })
            .collect();
        serde_json::from_value(serde_json::json!({
            "name": name, "phase": "Available", "revision": "3f2a9c1e",
            "desired": pids.len(), "ready": pids.len(), "restarts": 1, "error": null,
            "listen": [{"name": null, "address": "0.0.0.0:8080", "mode": "http"}],
            "source": format!("/etc/clusterd/apps/{name}.yaml"), "age_secs": 30,
            "instances": instances,
        }))
        .unwrap()
    }

    fn report(apps: Vec<AppStatus>) -> StatusReport {
        let mut r: StatusReport = serde_json::from_value(serde_json::json!({"apps": []})).unwrap();
        r.apps = apps;
        r
    }

    fn screen(view: &View) -> String {
        let mut t = Terminal::new(TestBackend::new(120, 30)).unwrap();
        t.draw(|f| draw(f, view)).unwrap();
        let buf = t.backend().buffer().clone();
        let mut out = String::new();
        for y in 0..buf.area.height {
            for x in 0..buf.area.width {
                out.push_str(buf[(x, y)].symbol());
            }
            out.push('\n');
        }
        out
    }

    fn view() -> View {
        View {
            report: Some(report(vec![app("api", &[4242, 4243]), app("web", &[5151])])),
            socket: "/tmp/s.sock".into(),
            ..View::default()
        }
    }

    #[test]
    fn shows_every_app_and_the_selected_apps_workers() {
        let mut v = view();
        let s = screen(&v);
        assert!(s.contains("api") && s.contains("web"), "{s}");
        assert!(s.contains("2/2") && s.contains("1/1"), "{s}");
        assert!(s.contains("4242") && s.contains("4243"), "{s}");
        assert!(s.contains("3.0"), "summed CPU of api: {s}");
        assert!(!s.contains("5151"), "{s}");
        handle_key(&mut v, KeyEvent::from(KeyCode::Down));
        let s = screen(&v);
        assert!(s.contains("5151") && !s.contains("4242"), "{s}");
    }

    #[test]
    fn keys_map_to_commands() {
        let mut v = view();
        assert_eq!(
            handle_key(&mut v, KeyEvent::from(KeyCode::Char('r'))),
            Command::Reload("api".into())
        );
        handle_key(&mut v, KeyEvent::from(KeyCode::Char('j')));
        handle_key(&mut v, KeyEvent::from(KeyCode::Char('j')));
        assert_eq!(v.selected, 1, "selection stops at the last app");
        assert_eq!(
            handle_key(&mut v, KeyEvent::from(KeyCode::Char('l'))),
            Command::FollowLogs("web".into())
        );
        v.log_app = Some("web".into());
        assert_eq!(
            handle_key(&mut v, KeyEvent::from(KeyCode::Esc)),
            Command::CloseLogs
        );
        assert_eq!(
            handle_key(&mut v, KeyEvent::from(KeyCode::Char('q'))),
            Command::Quit
        );
        assert_eq!(
            handle_key(
                &mut v,
                KeyEvent::new(KeyCode::Char('c'), KeyModifiers::CONTROL)
            ),
            Command::Quit
        );
    }

    #[test]
    fn empty_daemon_and_errors_render() {
        let v = View {
            report: Some(report(vec![])),
            error: Some("cannot reach clusterd".into()),
            ..View::default()
        };
        let s = screen(&v);
        assert!(s.contains("No apps"), "{s}");
        assert!(s.contains("cannot reach clusterd"), "{s}");
    }

    /// REQ/S is the difference of the daemon's request counter between two fetches.
    #[test]
    fn request_rates_come_from_the_counters() {
        let with_total = |total: u64| {
            let mut a = app("web", &[4242]);
            a.instances[0].requests_total = Some(total);
            report(vec![a])
        };
        let mut view = View::default();
        let t0 = Instant::now();
        view.take(with_total(100), t0);
        assert_eq!(view.rate(Some(4242)), None, "one sample is no rate");
        view.take(with_total(400), t0 + Duration::from_secs(2));
        assert_eq!(view.rate(Some(4242)), Some(150.0));
        assert!(screen(&view).contains("150"), "{}", screen(&view));
    }
}
