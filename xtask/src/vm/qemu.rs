//! Running qemu: the command line, the serial console streamed line by line, the markers
//! /init prints, and the timeout.

use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Child, ChildStdout, Command, Stdio};
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

/// `panic=-1`: a panicking kernel reboots at once, and `-no-reboot` makes that qemu's exit.
const KERNEL_ARGS: &str = "console=ttyS0 panic=-1 rdinit=/init";
/// Only warnings and worse from the kernel.
const QUIET_KERNEL_ARGS: &str = "console=ttyS0 panic=-1 rdinit=/init quiet";

/// Lines of boot noise kept to show when the VM dies before the command starts.
const BOOT_LOG_LINES: usize = 60;

/// Boots the VM and streams its console. Each line of the command's output is given to
/// `on_line`, which returns whether to print it.
pub fn run(boot: &Boot, on_line: &mut dyn FnMut(&str) -> bool) -> Result<Outcome> {
    let mut child = spawn(boot)?;
    let (received, reader) = read_lines(child.stdout.take().expect("piped stdout"));
    let mut console = Console::new(boot, on_line);
    let deadline = Instant::now() + boot.timeout;
    let mut timed_out = false;
    loop {
        match received.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            Ok(line) => {
                if console.take(line) && !boot.verbose {
                    break;
                }
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
            Err(mpsc::RecvTimeoutError::Timeout) => {
                timed_out = true;
                break;
            }
        }
    }

    if !timed_out {
        // /init powers off right after its marker, and a dead VM closes its console just
        // before qemu exits: give it a moment to do so by itself.
        let grace = Instant::now() + Duration::from_secs(10);
        while Instant::now() < grace && child.try_wait()?.is_none() {
            thread::sleep(Duration::from_millis(20));
        }
    }
    let _ = child.kill();
    let status = child.wait()?;
    drop(received);
    let _ = reader.join();

    let outcome = match console.exit_status {
        Some(status) => Outcome::Exited(status),
        None if timed_out => Outcome::TimedOut,
        None => Outcome::Crashed,
    };
    // A VM that died while booting explains itself only in the noise we hid.
    if !console.started && !boot.verbose && !matches!(outcome, Outcome::Exited(_)) {
        eprintln!("vm: the command never started (qemu: {status}); the console said:");
        for line in console.boot_log {
            let printable: String = line.chars().filter(|c| !c.is_control()).collect();
            eprintln!("  | {printable}");
        }
    }
    Ok(outcome)
}

fn spawn(boot: &Boot) -> Result<Child> {
    Command::new("qemu-system-x86_64")
        .args(["-accel", "tcg,thread=multi", "-cpu", "max", "-smp", "2"])
        .args(["-nographic", "-no-reboot"])
        // Never a network card: test traffic stays inside the VM.
        .args(["-nic", "none"])
        .arg("-m")
        .arg(boot.memory_mib.to_string())
        .arg("-kernel")
        .arg(boot.kernel)
        .arg("-initrd")
        .arg(boot.initrd)
        .arg("-append")
        .arg(if boot.verbose {
            KERNEL_ARGS
        } else {
            QUIET_KERNEL_ARGS
        })
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .context("starting qemu-system-x86_64")
}

/// Reads the serial console on a thread, one line (without its `\r\n`) per message.
fn read_lines(console: ChildStdout) -> (mpsc::Receiver<String>, thread::JoinHandle<()>) {
    let (lines, received) = mpsc::channel();
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
    (received, reader)
}

/// Sorts console lines: boot noise (hidden unless verbose), the command's output, markers.
struct Console<'a> {
    start_marker: String,
    exit_marker: String,
    verbose: bool,
    on_line: &'a mut dyn FnMut(&str) -> bool,
    started: bool,
    exit_status: Option<i32>,
    boot_log: VecDeque<String>,
}

impl<'a> Console<'a> {
    fn new(boot: &Boot, on_line: &'a mut dyn FnMut(&str) -> bool) -> Self {
        Self {
            start_marker: format!("XTASK-VM-START-{}", boot.nonce),
            exit_marker: format!("XTASK-VM-EXIT-{} ", boot.nonce),
            verbose: boot.verbose,
            on_line,
            started: false,
            exit_status: None,
            boot_log: VecDeque::new(),
        }
    }

    /// Takes one line; returns true once the command's exit marker has been seen.
    fn take(&mut self, line: String) -> bool {
        // The marker may follow output that did not end in a newline.
        if let Some(at) = line.find(&self.exit_marker) {
            if at > 0 {
                self.command_output(&line[..at]);
            }
            self.exit_status = Some(
                line[at + self.exit_marker.len()..]
                    .trim()
                    .parse()
                    .unwrap_or(1),
            );
            return true;
        }
        if !self.started && line.ends_with(&self.start_marker) {
            self.started = true;
        } else if self.started && self.exit_status.is_none() {
            self.command_output(&line);
        } else if self.verbose {
            let _ = writeln!(std::io::stdout().lock(), "{line}");
        } else {
            self.boot_log.push_back(line);
            if self.boot_log.len() > BOOT_LOG_LINES {
                self.boot_log.pop_front();
            }
        }
        self.exit_status.is_some()
    }

    fn command_output(&mut self, line: &str) {
        if (self.on_line)(line) {
            // A closed stdout (`| head`) must not stop the VM's bookkeeping.
            let _ = writeln!(std::io::stdout().lock(), "{line}");
        }
    }
}
