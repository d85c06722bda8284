//! Progress of the operator's long commands (`rotate-kek`, `backup`,
//! `restore`, `audit verify`): an indicatif bar on a terminal; otherwise no
//! bar, and one plain line when the work starts and one when it ends, so
//! that logs and pipes stay readable.

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use std::io::IsTerminal;

pub struct Progress {
    bar: ProgressBar,
    what: &'static str,
    terminal: bool,
}

/// What one step counts.
#[derive(Clone, Copy)]
pub enum Unit {
    Bytes,
    Keys,
}

impl Progress {
    /// `total`: the amount of work when known (else a spinner).
    pub fn start(what: &'static str, total: Option<u64>, unit: Unit) -> Progress {
        let terminal = std::io::stderr().is_terminal();
        let bar = match total {
            Some(n) => ProgressBar::new(n),
            None => ProgressBar::new_spinner(),
        };
        let count = match unit {
            Unit::Bytes => "{bytes}/{total_bytes}",
            Unit::Keys => "{pos}/{len} data keys",
        };
        let template = match total {
            Some(_) => format!("{{msg}} [{{bar:40}}] {count} ({{eta}})"),
            None => match unit {
                Unit::Bytes => "{msg} {spinner} {bytes} ({elapsed})".to_string(),
                Unit::Keys => "{msg} {spinner} {pos} ({elapsed})".to_string(),
            },
        };
        bar.set_style(
            ProgressStyle::with_template(&template)
                .expect("template")
                .progress_chars("=> "),
        );
        bar.set_message(what);
        if terminal {
            bar.set_draw_target(ProgressDrawTarget::stderr());
            bar.enable_steady_tick(std::time::Duration::from_millis(200));
        } else {
            bar.set_draw_target(ProgressDrawTarget::hidden());
            eprintln!("pdvault: {what}: started");
        }
        Progress { bar, what, terminal }
    }

    pub fn set(&self, done: u64) {
        self.bar.set_position(done);
    }

    pub fn add(&self, n: u64) {
        self.bar.inc(n);
    }

    pub fn set_total(&self, total: u64) {
        self.bar.set_length(total);
    }

    /// Ends the bar (or writes the plain closing line) with `summary`.
    pub fn finish(self, summary: &str) {
        if self.terminal {
            self.bar.finish_and_clear();
        }
        eprintln!("pdvault: {}: {summary}", self.what);
    }
}
