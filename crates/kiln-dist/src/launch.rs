//! `kiln launch`: starts this node's processes of a data-parallel job and watches over them, as torchrun does.
//!
//! Each child gets torchrun's variables (`RANK`, `WORLD_SIZE`, `LOCAL_RANK`, `LOCAL_WORLD_SIZE`, `GROUP_RANK`,
//! `MASTER_ADDR`, `MASTER_PORT`), which [`crate::env::detect`] reads. Its standard output and error are forwarded
//! line by line, each line prefixed with `[rank R] `. A data-parallel job cannot go on without one of its ranks
//! (the others would wait in their next collective until it times out), so when a child fails, by a non-zero exit
//! or a signal, the others are stopped: SIGTERM, then SIGKILL after a grace period. The launch's exit code is that
//! of the first failure (128 + the signal's number for a signal, as shells report it), or 0 when all succeed.
//!
//! Signals: the children stay in the launcher's process group, so a Ctrl-C at the terminal reaches each of them
//! directly, without forwarding. On Linux each child also asks for SIGTERM when the thread that started it ends
//! (`PR_SET_PDEATHSIG`), so a launcher that is killed takes its children with it instead of orphaning them; the
//! thread calling [`run`] must therefore live until it returns, as a program's main thread does.

use kiln_core::{Error, Result};
use std::io::{self, BufRead, BufReader, Read, Write};
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// What `kiln launch` runs on one node.
#[derive(Clone, Debug)]
pub struct LaunchSpec {
    /// Processes on this node, one per GPU.
    pub nproc_per_node: usize,
    /// Nodes in the job, each running its own launcher.
    pub nnodes: usize,
    /// This node's place among them, from 0: its processes are ranks `node_rank * nproc_per_node ..`.
    pub node_rank: usize,
    /// Where rank 0 (the first process of node 0) can be reached.
    pub master_addr: String,
    pub master_port: u16,
    pub program: PathBuf,
    pub args: Vec<String>,
}

/// Where forwarded output goes: shared by every child's forwarding thread.
pub type Sink = Arc<Mutex<dyn Write + Send>>;

/// How long a child has to exit after SIGTERM before it is killed.
const GRACE: Duration = Duration::from_secs(5);
/// How often the children are checked on.
const POLL: Duration = Duration::from_millis(20);
/// How long to wait, once every child has exited, for the rest of their output. A grandchild that outlives its
/// parent may hold a pipe open; its output is then left to the forwarding thread, which is not waited for.
const DRAIN: Duration = Duration::from_secs(1);

/// Runs the node's processes, forwarding their output to this process's standard output and error, and returns
/// the exit code for the launch.
pub fn run(spec: &LaunchSpec) -> Result<i32> {
    run_with_output(spec, Arc::new(Mutex::new(io::stdout())), Arc::new(Mutex::new(io::stderr())))
}

/// [`run`], forwarding the children's standard output to `stdout` and their standard error, with the launcher's
/// own messages, to `stderr`.
pub fn run_with_output(spec: &LaunchSpec, stdout: Sink, stderr: Sink) -> Result<i32> {
    spec.check()?;
    let mut job = Job { children: Vec::new(), forwarders: Vec::new() };
    for local_rank in 0..spec.nproc_per_node {
        job.start(spec, local_rank, &stdout, &stderr)?;
    }
    let code = job.supervise(&stderr);
    job.drain();
    Ok(code)
}

impl LaunchSpec {
    fn check(&self) -> Result<()> {
        let problem = if self.nproc_per_node == 0 {
            "--nproc-per-node must be at least 1".to_string()
        } else if self.nnodes == 0 {
            "--nnodes must be at least 1".to_string()
        } else if self.node_rank >= self.nnodes {
            format!("--node-rank {} is not below --nnodes {}", self.node_rank, self.nnodes)
        } else if self.master_port == 0 {
            "--master-port must be 1 to 65535".to_string()
        } else if self.master_addr.trim().is_empty() {
            "--master-addr is empty".to_string()
        } else {
            return Ok(());
        };
        Err(Error::Usage(problem))
    }

    fn command(&self, local_rank: usize) -> Command {
        let mut command = Command::new(&self.program);
        command
            .args(&self.args)
            .env("RANK", (self.node_rank * self.nproc_per_node + local_rank).to_string())
            .env("WORLD_SIZE", (self.nnodes * self.nproc_per_node).to_string())
            .env("LOCAL_RANK", local_rank.to_string())
            .env("LOCAL_WORLD_SIZE", self.nproc_per_node.to_string())
            .env("GROUP_RANK", self.node_rank.to_string())
            .env("MASTER_ADDR", &self.master_addr)
            .env("MASTER_PORT", self.master_port.to_string())
            // Several children reading one terminal would steal each other's input.
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        #[cfg(target_os = "linux")]
        {
            use std::os::unix::process::CommandExt;
            // SAFETY: runs in the forked child before exec and only calls prctl, which is async-signal-safe.
            unsafe {
                command.pre_exec(|| match libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM as libc::c_ulong) {
                    0 => Ok(()),
                    _ => Err(io::Error::last_os_error()),
                });
            }
        }
        command
    }
}

/// The children started so far. Dropping it (when starting one fails) kills those still running.
struct Job {
    children: Vec<Rank>,
    forwarders: Vec<JoinHandle<()>>,
}

struct Rank {
    rank: usize,
    process: Child,
    status: Option<ExitStatus>,
}

impl Job {
    fn start(&mut self, spec: &LaunchSpec, local_rank: usize, stdout: &Sink, stderr: &Sink) -> Result<()> {
        let rank = spec.node_rank * spec.nproc_per_node + local_rank;
        let mut process = spec.command(local_rank).spawn().map_err(|e| Error::io(&spec.program, e))?;
        let pipes: [(Option<Box<dyn Read + Send>>, &Sink); 2] = [
            (process.stdout.take().map(|p| Box::new(p) as Box<dyn Read + Send>), stdout),
            (process.stderr.take().map(|p| Box::new(p) as Box<dyn Read + Send>), stderr),
        ];
        self.children.push(Rank { rank, process, status: None });
        for (pipe, sink) in pipes {
            if let Some(pipe) = pipe {
                let sink = sink.clone();
                let forwarder = std::thread::Builder::new()
                    .name(format!("kiln-launch-rank-{rank}"))
                    .spawn(move || forward(pipe, rank, &sink))
                    .map_err(|e| Error::backend("launch", format!("cannot forward rank {rank}'s output: {e}")))?;
                self.forwarders.push(forwarder);
            }
        }
        Ok(())
    }

    /// Waits for every child; at the first failure stops the others. Returns the launch's exit code.
    fn supervise(&mut self, stderr: &Sink) -> i32 {
        loop {
            if let Some((code, why)) = self.reap() {
                say(stderr, &format!("{why}; stopping the other ranks"));
                self.stop();
                return code;
            }
            if self.running().next().is_none() {
                return 0;
            }
            std::thread::sleep(POLL);
        }
    }

    /// Records the children that have exited; returns the exit code and a description of the first failure.
    fn reap(&mut self) -> Option<(i32, String)> {
        for child in self.running() {
            match child.process.try_wait() {
                Ok(None) => {}
                Ok(Some(status)) => {
                    child.status = Some(status);
                    if !status.success() {
                        return Some((exit_code(status), format!("rank {} failed ({status})", child.rank)));
                    }
                }
                Err(e) => return Some((1, format!("cannot tell whether rank {} is running: {e}", child.rank))),
            }
        }
        None
    }

    /// SIGTERM to every child still running, then SIGKILL to any still running after the grace period.
    fn stop(&mut self) {
        for child in self.running() {
            // SAFETY: kill() only sends a signal. The pid is that of our child, not yet waited for, so it cannot
            // have been reused by another process.
            unsafe { libc::kill(child.process.id() as libc::pid_t, libc::SIGTERM) };
        }
        let deadline = Instant::now() + GRACE;
        while Instant::now() < deadline {
            for child in self.running() {
                if let Ok(Some(status)) = child.process.try_wait() {
                    child.status = Some(status);
                }
            }
            if self.running().next().is_none() {
                return;
            }
            std::thread::sleep(POLL);
        }
        self.kill();
    }

    fn kill(&mut self) {
        for child in self.running() {
            let _ = child.process.kill();
            child.status = child.process.wait().ok();
        }
    }

    fn running(&mut self) -> impl Iterator<Item = &mut Rank> {
        self.children.iter_mut().filter(|child| child.status.is_none())
    }

    /// Lets the forwarding threads finish writing what the children left in their pipes.
    fn drain(&mut self) {
        let deadline = Instant::now() + DRAIN;
        while Instant::now() < deadline && self.forwarders.iter().any(|f| !f.is_finished()) {
            std::thread::sleep(POLL);
        }
        for forwarder in self.forwarders.drain(..).filter(|f| f.is_finished()) {
            let _ = forwarder.join();
        }
    }
}

impl Drop for Job {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Copies a child's output to `sink` a line at a time, each prefixed with the child's rank.
fn forward(pipe: Box<dyn Read + Send>, rank: usize, sink: &Sink) {
    let mut reader = BufReader::new(pipe);
    let prefix = format!("[rank {rank}] ");
    let mut line = Vec::new();
    loop {
        line.clear();
        match reader.read_until(b'\n', &mut line) {
            Ok(0) | Err(_) => return,
            Ok(_) => {
                if !line.ends_with(b"\n") {
                    line.push(b'\n');
                }
                let mut out = sink.lock().unwrap_or_else(PoisonError::into_inner);
                let _ = out.write_all(prefix.as_bytes()).and_then(|()| out.write_all(&line)).and_then(|()| out.flush());
            }
        }
    }
}

/// The launcher's own messages, told apart from the children's by their prefix.
fn say(sink: &Sink, message: &str) {
    let mut out = sink.lock().unwrap_or_else(PoisonError::into_inner);
    let _ = writeln!(out, "kiln launch: {message}").and_then(|()| out.flush());
}

/// A child's exit code as a shell reports it: 128 + the signal's number when a signal ended it.
fn exit_code(status: ExitStatus) -> i32 {
    use std::os::unix::process::ExitStatusExt;
    status.code().or_else(|| status.signal().map(|signal| 128 + signal)).unwrap_or(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `sh -c SCRIPT` on every rank; the script tells the ranks apart by `$RANK`.
    fn shell(nproc_per_node: usize, script: &str) -> LaunchSpec {
        LaunchSpec {
            nproc_per_node,
            nnodes: 1,
            node_rank: 0,
            master_addr: "127.0.0.1".into(),
            master_port: 29500,
            program: "sh".into(),
            args: vec!["-c".into(), script.into()],
        }
    }

    /// Runs a launch, returning its exit code, what it wrote to standard output and error, and how long it took.
    fn launch(spec: &LaunchSpec) -> (i32, String, String, Duration) {
        let (out, err) = (Arc::new(Mutex::new(Vec::new())), Arc::new(Mutex::new(Vec::new())));
        let started = Instant::now();
        let code = run_with_output(spec, out.clone(), err.clone()).unwrap();
        let text = |sink: Arc<Mutex<Vec<u8>>>| String::from_utf8(sink.lock().unwrap().clone()).unwrap();
        (code, text(out), text(err), started.elapsed())
    }

    /// Whether a process with this pid exists (our children are waited for, so a stopped one is gone).
    fn exists(pid: i32) -> bool {
        // SAFETY: signal 0 sends nothing; it only asks whether the process exists.
        unsafe { libc::kill(pid, 0) == 0 }
    }

    #[test]
    fn all_succeed_with_their_variables_and_prefixed_output() {
        let mut spec = shell(
            2,
            "echo \"rank $RANK of $WORLD_SIZE, local $LOCAL_RANK of $LOCAL_WORLD_SIZE, node $GROUP_RANK, \
             $MASTER_ADDR:$MASTER_PORT\"; echo oops >&2; printf unfinished",
        );
        (spec.nnodes, spec.node_rank, spec.master_addr, spec.master_port) = (2, 1, "head".into(), 1234);
        let (code, out, err, _) = launch(&spec);
        assert_eq!(code, 0, "{err}");
        for (rank, local) in [(2, 0), (3, 1)] {
            let line = format!("[rank {rank}] rank {rank} of 4, local {local} of 2, node 1, head:1234\n");
            assert!(out.contains(&line), "{line:?} in\n{out}");
            assert!(out.contains(&format!("[rank {rank}] unfinished\n")), "{out}");
            assert!(err.contains(&format!("[rank {rank}] oops\n")), "{err}");
        }
    }

    #[test]
    fn a_failure_stops_the_others_and_gives_its_code() {
        let spec = shell(3, "if [ $RANK = 1 ]; then sleep 0.5; exit 3; fi; echo pid $$; exec sleep 30");
        let (code, out, err, elapsed) = launch(&spec);
        assert_eq!(code, 3, "{err}");
        assert!(elapsed < Duration::from_secs(10), "{elapsed:?}");
        assert!(err.contains("kiln launch: rank 1 failed (exit status: 3); stopping the other ranks"), "{err}");
        let pids: Vec<i32> = out.lines().filter_map(|l| l.split_once("pid ")?.1.parse().ok()).collect();
        assert_eq!(pids.len(), 2, "{out}");
        assert!(pids.iter().all(|&pid| !exists(pid)), "sleepers {pids:?} still running");
    }

    #[test]
    fn a_child_that_ignores_sigterm_is_killed_after_the_grace_period() {
        let spec = shell(2, "if [ $RANK = 0 ]; then sleep 0.5; exit 4; fi; trap '' TERM; exec sleep 30");
        let (code, _, err, elapsed) = launch(&spec);
        assert_eq!(code, 4, "{err}");
        assert!(elapsed >= GRACE && elapsed < GRACE + Duration::from_secs(5), "{elapsed:?}");
    }

    #[test]
    fn a_signal_gives_128_plus_its_number() {
        let (code, _, err, _) = launch(&shell(1, "kill -KILL $$"));
        assert_eq!(code, 128 + libc::SIGKILL, "{err}");
    }

    #[test]
    fn bad_specs_are_usage_errors() {
        let mut spec = shell(2, "true");
        spec.node_rank = 1;
        let mut unknown = shell(1, "true");
        unknown.program = "/nonexistent/kiln".into();
        let sink = || Arc::new(Mutex::new(Vec::<u8>::new()));
        match run_with_output(&spec, sink(), sink()) {
            Err(Error::Usage(message)) => {
                assert!(message.contains("--node-rank 1 is not below --nnodes 1"), "{message}")
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(run_with_output(&unknown, sink(), sink()), Err(Error::Io { .. })));
    }
}
