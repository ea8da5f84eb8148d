//! Running qemu: the command line, the serial console streamed line by line, the markers
//! /init prints, and the timeout.

use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

/// How a boot ended.
#[derive(Debug)]
pub enum Outcome {
    /// The command ran and exited with this status.
    Exited(i32),
    /// The VM stopped (crash, panic, power loss) before the command's exit marker.
    Crashed,
    /// The VM was still running at the deadline and was killed.
    TimedOut,
}

#[derive(Debug)]
pub struct Boot<'a> {
    pub kernel: &'a Path,
    pub initrd: &'a Path,
    pub memory_mib: u32,
    pub timeout: Duration,
    pub verbose: bool,
    /// The run's unique marker suffix (see init.sh).
    pub nonce: &'a str,
}

/// Lines of boot noise kept to show when the VM dies before the command starts.
const BOOT_LOG_LINES: usize = 60;

/// Boots the VM and streams its console. Each line of the command's output is given to
/// `on_line`, which returns whether to print it.
pub fn run(boot: &Boot, on_line: &mut dyn FnMut(&str) -> bool) -> Result<Outcome> {
    let mut child = Command::new("qemu-system-x86_64")
        .args([
            "-accel",
            "tcg,thread=multi",
            "-cpu",
            "max",
            "-smp",
            "2",
            "-nographic",
            "-no-reboot",
        ])
        // Never a network card: test traffic stays inside the VM.
        .args(["-nic", "none"])
        .arg("-m")
        .arg(boot.memory_mib.to_string())
        .arg("-kernel")
        .arg(boot.kernel)
        .arg("-initrd")
        .arg(boot.initrd)
        .arg("-append")
        .arg("console=ttyS0 panic=-1 quiet rdinit=/init")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .context("starting qemu-system-x86_64")?;

    let (lines, received) = mpsc::channel();
    let console = child.stdout.take().expect("piped stdout");
    let reader = thread::spawn(move || {
        let mut console = BufReader::new(console);
        let mut line = Vec::new();
        while console.read_until(b'\n', &mut line).is_ok_and(|n| n > 0) {
            let text = String::from_utf8_lossy(&line)
                .trim_end_matches(['\n', '\r'])
                .to_owned();
            if lines.send(text).is_err() {
                break;
            }
            line.clear();
        }
    });

    let start_marker = format!("XTASK-VM-START-{}", boot.nonce);
    let exit_marker = format!("XTASK-VM-EXIT-{} ", boot.nonce);
    let deadline = Instant::now() + boot.timeout;
    let mut boot_log = VecDeque::new();
    let mut started = false;
    let mut outcome = None;
    let stdout = std::io::stdout();
    loop {
        let wait = deadline.saturating_duration_since(Instant::now());
        let line = match received.recv_timeout(wait) {
            Ok(line) => line,
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
            Err(mpsc::RecvTimeoutError::Timeout) => {
                outcome = Some(Outcome::TimedOut);
                break;
            }
        };
        // The marker may follow output that did not end in a newline.
        if let Some(at) = line.find(&exit_marker) {
            let before = &line[..at];
            if !before.is_empty() && on_line(before) {
                let _ = writeln!(stdout.lock(), "{before}");
            }
            let status = line[at + exit_marker.len()..].trim().parse().unwrap_or(1);
            outcome = Some(Outcome::Exited(status));
            if !boot.verbose {
                break;
            }
            continue;
        }
        if !started && line.ends_with(&start_marker) {
            started = true;
            continue;
        }
        if started && outcome.is_none() {
            if on_line(&line) {
                let _ = writeln!(stdout.lock(), "{line}");
            }
        } else if boot.verbose {
            let _ = writeln!(stdout.lock(), "{line}");
        } else {
            boot_log.push_back(line);
            if boot_log.len() > BOOT_LOG_LINES {
                boot_log.pop_front();
            }
        }
    }

    match outcome {
        Some(Outcome::Exited(_)) => {
            // /init powers off right after the marker; give it a moment, then make sure.
            let grace = Instant::now() + Duration::from_secs(10);
            while Instant::now() < grace && child.try_wait()?.is_none() {
                thread::sleep(Duration::from_millis(50));
            }
            let _ = child.kill();
        }
        _ => {
            let _ = child.kill();
        }
    }
    let status = child.wait()?;
    drop(received);
    let _ = reader.join();

    let outcome = outcome.unwrap_or(Outcome::Crashed);
    if matches!(outcome, Outcome::Crashed) && !boot.verbose {
        if !started {
            eprintln!(
                "vm: the VM stopped before the command started ({status}); its console said:"
            );
        }
        for line in boot_log {
            eprintln!("  | {line}");
        }
    }
    Ok(outcome)
}
