//! Data-parallel wiring with real processes: `kiln info --rendezvous` placed by torchrun's, Slurm's and Open MPI's
//! variables, a missing or killed rank ending the job with a message, and `kiln launch` starting a node's ranks.

use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// The kiln binary with nothing of the test runner's environment (a stray RANK, say) but PATH and HOME.
fn kiln(vars: &[(&str, String)], args: &[&str]) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_kiln"));
    command.args(args).env_clear().stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
    for name in ["PATH", "HOME"] {
        if let Some(value) = std::env::var_os(name) {
            command.env(name, value);
        }
    }
    command.envs(vars.iter().map(|(name, value)| (*name, value)));
    command
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn torchrun(rank: usize, world: usize, port: u16) -> Vec<(&'static str, String)> {
    vec![
        ("RANK", rank.to_string()),
        ("WORLD_SIZE", world.to_string()),
        ("LOCAL_RANK", rank.to_string()),
        ("MASTER_ADDR", "127.0.0.1".into()),
        ("MASTER_PORT", port.to_string()),
    ]
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Waits for a process, returning its output and when it ended relative to `since`.
fn finish(child: Child, since: Instant) -> (Output, Duration) {
    let output = child.wait_with_output().unwrap();
    (output, since.elapsed())
}

/// Starts one process per rank with the variables `vars(rank)` and checks that each reports its rank and that
/// all report the same id. Returns the lines.
fn agree(world: usize, args: &[&str], vars: impl Fn(usize) -> Vec<(&'static str, String)>) -> Vec<String> {
    let children: Vec<Child> = (0..world).map(|rank| kiln(&vars(rank), args).spawn().unwrap()).collect();
    let lines: Vec<String> = children
        .into_iter()
        .map(|child| {
            let output = child.wait_with_output().unwrap();
            assert!(output.status.success(), "{}", text(&output.stderr));
            text(&output.stdout).trim_end().to_string()
        })
        .collect();
    let ids: Vec<&str> = lines.iter().map(|line| line.rsplit_once(": id ").unwrap().1).collect();
    for (rank, line) in lines.iter().enumerate() {
        assert!(line.starts_with(&format!("rank {rank} of {world} (local rank ")), "{line}");
        assert_eq!(ids[rank], ids[0], "{lines:?}");
    }
    assert!(ids[0].len() == 16 && ids[0].bytes().all(|b| b.is_ascii_hexdigit()), "{}", ids[0]);
    lines
}

#[test]
fn torchrun_ranks_meet_over_tcp() {
    let port = free_port();
    let lines = agree(3, &["info", "--rendezvous"], |rank| torchrun(rank, 3, port));
    assert!(lines[1].contains(&format!("(local rank 1, from torchrun) rendezvous tcp://127.0.0.1:{port}: id ")));
}

#[test]
fn torchrun_ranks_meet_through_a_file() {
    let path = std::env::temp_dir().join(format!("kiln-cli-test-{}-rendezvous", std::process::id()));
    let rv = format!("file://{}", path.display());
    let lines = agree(3, &["info", "--rendezvous", &rv], |rank| torchrun(rank, 3, 1));
    assert!(lines[0].contains(&format!("rendezvous {rv}: id ")), "{}", lines[0]);
    assert!(!path.exists(), "rank 0 removes the rendezvous file");
}

#[test]
fn slurm_tasks_meet_without_being_asked() {
    let port = free_port();
    let lines = agree(3, &["info"], |rank| {
        vec![
            ("SLURM_PROCID", rank.to_string()),
            ("SLURM_NTASKS", "3".into()),
            ("SLURM_LOCALID", "0".into()),
            ("SLURM_JOB_NODELIST", "node[01-03]".into()),
            ("SLURM_JOB_ID", "4242".into()),
            ("MASTER_ADDR", "127.0.0.1".into()),
            ("MASTER_PORT", port.to_string()),
        ]
    });
    assert!(lines[2].contains("(local rank 0, from slurm)"), "{}", lines[2]);
}

#[test]
fn open_mpi_ranks_meet() {
    let port = free_port();
    let lines = agree(2, &["info", "--rendezvous"], |rank| {
        vec![
            ("OMPI_COMM_WORLD_RANK", rank.to_string()),
            ("OMPI_COMM_WORLD_SIZE", "2".into()),
            ("OMPI_COMM_WORLD_LOCAL_RANK", rank.to_string()),
            ("OMPI_COMM_WORLD_LOCAL_SIZE", "2".into()),
            ("MASTER_ADDR", "127.0.0.1".into()),
            ("MASTER_PORT", port.to_string()),
        ]
    });
    assert!(lines[1].contains("(local rank 1, from openmpi)"), "{}", lines[1]);
}

#[test]
fn a_missing_rank_ends_every_rank_with_its_name() {
    let port = free_port();
    let started = Instant::now();
    let args = ["info", "--rendezvous", "--rendezvous-timeout", "2"];
    let children: Vec<Child> = (0..2).map(|rank| kiln(&torchrun(rank, 3, port), &args).spawn().unwrap()).collect();
    for (rank, child) in children.into_iter().enumerate() {
        let (output, elapsed) = finish(child, started);
        let err = text(&output.stderr);
        assert_eq!(output.status.code(), Some(1), "rank {rank}: {err}");
        assert!(elapsed < Duration::from_secs(10), "rank {rank} took {elapsed:?}");
        assert!(err.contains("missing rank 2"), "rank {rank}: {err}");
    }
}

#[test]
fn a_rank_killed_mid_rendezvous_ends_the_others() {
    let port = free_port();
    let patient = ["info", "--rendezvous", "--rendezvous-timeout", "30"];
    let lead = kiln(&torchrun(0, 3, port), &patient).spawn().unwrap();
    let mut victim = kiln(&torchrun(1, 3, port), &patient).spawn().unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    victim.kill().unwrap();
    let killed = Instant::now();
    let late = kiln(&torchrun(2, 3, port), &["info", "--rendezvous", "--rendezvous-timeout", "3"]).spawn().unwrap();
    let (output, elapsed) = finish(lead, killed);
    let err = text(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{err}");
    assert!(elapsed < Duration::from_secs(10), "rank 0 took {elapsed:?} to notice");
    assert!(err.contains("rank 1 (pid ") && err.contains("closed its connection before all ranks arrived"), "{err}");
    let (output, elapsed) = finish(late, killed);
    assert_eq!(output.status.code(), Some(1), "{}", text(&output.stderr));
    assert!(elapsed < Duration::from_secs(10), "rank 2 took {elapsed:?}");
    victim.wait().unwrap();
}

#[test]
fn launch_starts_ranks_that_meet() {
    let port = free_port().to_string();
    let args = ["launch", "--nproc-per-node", "2", "--master-port", &port, "--", "info", "--rendezvous"];
    let output = kiln(&[], &args).output().unwrap();
    let out = text(&output.stdout);
    assert!(output.status.success(), "{}\n{out}", text(&output.stderr));
    let ids: Vec<&str> = (0..2)
        .map(|rank| {
            let prefix = format!("[rank {rank}] rank {rank} of 2 (local rank {rank}, from torchrun) rendezvous ");
            let line = out.lines().find(|line| line.starts_with(&prefix)).unwrap_or_else(|| panic!("{prefix}\n{out}"));
            line.rsplit_once(": id ").unwrap().1
        })
        .collect();
    assert_eq!(ids[0], ids[1], "{out}");
}

#[test]
fn launch_passes_on_a_failing_rank_s_exit_code() {
    let output = kiln(&[], &["launch", "--nproc-per-node", "2", "--", "info", "--rendezvous", "tcp://nowhere"])
        .output()
        .unwrap();
    let err = text(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{err}");
    assert!(err.contains("] error: rendezvous \"tcp://nowhere\": no port"), "{err}");
    assert!(err.contains("kiln launch: rank "), "{err}");
}

#[test]
fn a_launched_job_without_gpus_ends_on_every_rank_naming_the_library() {
    // No CUDA here: rank 0 cannot make NCCL's id, tells the others at the rendezvous, and every rank exits 1
    // with a message that names the missing library, promptly; training and the all-reduce bench alike.
    for command in [&["train"][..], &["bench", "allreduce"]] {
        let port = free_port();
        let started = Instant::now();
        let args = [command, &["--backend", "cuda", "--rendezvous-timeout", "20"]].concat();
        let children: Vec<Child> = (0..2).map(|rank| kiln(&torchrun(rank, 2, port), &args).spawn().unwrap()).collect();
        for child in children {
            let (output, took) = finish(child, started);
            let err = text(&output.stderr);
            assert_eq!(output.status.code(), Some(1), "{command:?}: {err}");
            assert!(err.contains("libnccl.so") || err.contains("libcuda.so"), "{command:?}: {err}");
            assert!(took < Duration::from_secs(15), "{command:?} took {took:?}: {err}");
        }
    }
}
