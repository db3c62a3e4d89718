//! Where this process sits in a data-parallel job, read from the variables its launcher set.
//!
//! Three launchers are understood, in this order:
//! - torchrun, and `kiln launch`, which sets the same variables: `RANK`, `WORLD_SIZE`, `LOCAL_RANK`,
//!   `LOCAL_WORLD_SIZE`, `MASTER_ADDR`, `MASTER_PORT`;
//! - Open MPI's `mpirun`: `OMPI_COMM_WORLD_RANK`, `OMPI_COMM_WORLD_SIZE`, `OMPI_COMM_WORLD_LOCAL_RANK`,
//!   `OMPI_COMM_WORLD_LOCAL_SIZE`; the rendezvous comes from `MASTER_ADDR` and `MASTER_PORT`;
//! - Slurm's `srun`: `SLURM_PROCID`, `SLURM_NTASKS`, `SLURM_LOCALID`, `SLURM_NTASKS_PER_NODE`. The rendezvous host
//!   is `MASTER_ADDR`, or else the first host of `SLURM_JOB_NODELIST`; the port is `MASTER_PORT`, or else
//!   [`slurm_default_port`] of `SLURM_JOB_ID`, so every task of a job agrees on it without being told.
//!
//! Slurm comes last because its variables are inherited by everything inside an allocation: the processes of an
//! `mpirun` or a torchrun started from a batch script all see the batch step's `SLURM_PROCID=0`, while the other
//! launchers' variables are set by the launcher for each process it starts.
//!
//! A launcher's variables go together: one of them without the others, or a value that is not a number or is out
//! of range, is a usage error that names the variable and its value rather than a guess.

use kiln_core::{Error, Result};
use std::fmt;

/// The launcher whose variables gave the placement.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    Torchrun,
    Slurm,
    OpenMpi,
}

impl Source {
    pub fn name(self) -> &'static str {
        match self {
            Source::Torchrun => "torchrun",
            Source::Slurm => "slurm",
            Source::OpenMpi => "openmpi",
        }
    }
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// This process's place in a job: its rank among `world` processes and on its own node, and where rank 0 can be
/// reached, when the launcher says.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Placement {
    pub rank: usize,
    pub world: usize,
    pub local_rank: usize,
    /// The number of this job's processes on this node, when the launcher says.
    pub local_world: Option<usize>,
    pub source: Source,
    pub master_addr: Option<String>,
    pub master_port: Option<u16>,
}

/// The rendezvous port of a Slurm job that sets no `MASTER_PORT`. Every task of a job computes the same one, and
/// jobs sharing a node mostly get different ones. It stays within 10000..30000, below Linux's ephemeral ports
/// (32768 and up), so it cannot be taken by the local end of some outgoing connection.
pub fn slurm_default_port(job_id: u64) -> u16 {
    (10_000 + job_id % 20_000) as u16
}

/// The placement the environment of this process describes, or `None` outside a multi-process launch.
pub fn detect_from_process_env() -> Result<Option<Placement>> {
    detect(|name| std::env::var(name).ok())
}

/// The placement that the variables `var` returns describe (a pure function of them, so it can be tested), or
/// `None` when no launcher's variables are set.
pub fn detect(var: impl Fn(&str) -> Option<String>) -> Result<Option<Placement>> {
    let var: &dyn Fn(&str) -> Option<String> = &var;
    if let Some(ranks) = ranks(var, &TORCHRUN)? {
        return Ok(Some(ranks.place(Source::Torchrun, host(var, "MASTER_ADDR")?, port(var, "MASTER_PORT")?)));
    }
    if let Some(ranks) = ranks(var, &OPEN_MPI)? {
        return Ok(Some(ranks.place(Source::OpenMpi, host(var, "MASTER_ADDR")?, port(var, "MASTER_PORT")?)));
    }
    if let Some(ranks) = ranks(var, &SLURM)? {
        let addr = match host(var, "MASTER_ADDR")? {
            Some(addr) => Some(addr),
            None => var("SLURM_JOB_NODELIST")
                .map(|list| {
                    first_host(&list).ok_or_else(|| {
                        Error::Usage(format!(
                            "SLURM_JOB_NODELIST={list:?} is not a Slurm host list (such as node[01-04,07],gpu5)"
                        ))
                    })
                })
                .transpose()?,
        };
        let port = match port(var, "MASTER_PORT")? {
            Some(port) => Some(port),
            None => count(var, "SLURM_JOB_ID")?.map(|id| slurm_default_port(id as u64)),
        };
        return Ok(Some(ranks.place(Source::Slurm, addr, port)));
    }
    Ok(None)
}

/// The variables one launcher sets for each process.
struct Names {
    rank: &'static str,
    world: &'static str,
    local_rank: &'static str,
    local_world: &'static str,
    /// Any of these set means this launcher started the process. Slurm's `SLURM_NTASKS` is not among them: an
    /// allocation's interactive shell has it without being one of its tasks.
    triggers: &'static [&'static str],
}

const TORCHRUN: Names = Names {
    rank: "RANK",
    world: "WORLD_SIZE",
    local_rank: "LOCAL_RANK",
    local_world: "LOCAL_WORLD_SIZE",
    triggers: &["RANK", "WORLD_SIZE", "LOCAL_RANK"],
};

const OPEN_MPI: Names = Names {
    rank: "OMPI_COMM_WORLD_RANK",
    world: "OMPI_COMM_WORLD_SIZE",
    local_rank: "OMPI_COMM_WORLD_LOCAL_RANK",
    local_world: "OMPI_COMM_WORLD_LOCAL_SIZE",
    triggers: &["OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK"],
};

const SLURM: Names = Names {
    rank: "SLURM_PROCID",
    world: "SLURM_NTASKS",
    local_rank: "SLURM_LOCALID",
    local_world: "SLURM_NTASKS_PER_NODE",
    triggers: &["SLURM_PROCID"],
};

/// The numbers of a placement, checked against each other.
struct Ranks {
    rank: usize,
    world: usize,
    local_rank: usize,
    local_world: Option<usize>,
}

impl Ranks {
    fn place(self, source: Source, master_addr: Option<String>, master_port: Option<u16>) -> Placement {
        let Ranks { rank, world, local_rank, local_world } = self;
        Placement { rank, world, local_rank, local_world, source, master_addr, master_port }
    }
}

fn ranks(var: &dyn Fn(&str) -> Option<String>, names: &Names) -> Result<Option<Ranks>> {
    let Some(trigger) = names.triggers.iter().find(|name| var(name).is_some()) else {
        return Ok(None);
    };
    let required = |name: &str| -> Result<usize> {
        count(var, name)?.ok_or_else(|| {
            Error::Usage(format!(
                "{trigger}={:?} is set but {name} is not: {}, {} and {} go together",
                var(trigger).unwrap_or_default(),
                names.rank,
                names.world,
                names.local_rank
            ))
        })
    };
    let (rank, world, local_rank) = (required(names.rank)?, required(names.world)?, required(names.local_rank)?);
    let local_world = count(var, names.local_world)?;
    let problem = if world == 0 {
        Some(format!("{}=0: a job has at least one process", names.world))
    } else if rank >= world {
        Some(format!("{}={rank} is not below {}={world}", names.rank, names.world))
    } else {
        match local_world {
            Some(0) => Some(format!("{}=0: a node runs at least one process", names.local_world)),
            Some(local) if local > world => {
                Some(format!("{}={local} is more than {}={world}", names.local_world, names.world))
            }
            Some(local) if local_rank >= local => {
                Some(format!("{}={local_rank} is not below {}={local}", names.local_rank, names.local_world))
            }
            None if local_rank >= world => {
                Some(format!("{}={local_rank} is not below {}={world}", names.local_rank, names.world))
            }
            _ => None,
        }
    };
    match problem {
        Some(problem) => Err(Error::Usage(problem)),
        None => Ok(Some(Ranks { rank, world, local_rank, local_world })),
    }
}

/// A non-negative whole number, or `None` when the variable is not set.
fn count(var: &dyn Fn(&str) -> Option<String>, name: &str) -> Result<Option<usize>> {
    var(name)
        .map(|value| {
            value.parse().map_err(|_| Error::Usage(format!("{name}={value:?} is not a non-negative whole number")))
        })
        .transpose()
}

fn port(var: &dyn Fn(&str) -> Option<String>, name: &str) -> Result<Option<u16>> {
    var(name)
        .map(|value| match value.parse::<u16>() {
            Ok(port) if port > 0 => Ok(port),
            _ => Err(Error::Usage(format!("{name}={value:?} is not a port number (1 to 65535)"))),
        })
        .transpose()
}

fn host(var: &dyn Fn(&str) -> Option<String>, name: &str) -> Result<Option<String>> {
    match var(name) {
        Some(value) if value.trim().is_empty() => Err(Error::Usage(format!("{name} is set but empty"))),
        value => Ok(value),
    }
}

/// The first host of a host list in Slurm's compressed syntax, or `None` when it is malformed. `node[01-04,07],gpu5`
/// is node01 to node04, node07 and gpu5, so its first host is `node01`; a name may have several bracket groups
/// (`rack[1-2]-gpu[08-15]`), and numbers keep their zero padding as written.
fn first_host(list: &str) -> Option<String> {
    let mut host = String::new();
    let mut rest = list;
    loop {
        let stop = rest.find(['[', ']', ',']).unwrap_or(rest.len());
        host.push_str(&rest[..stop]);
        rest = &rest[stop..];
        if !rest.starts_with('[') {
            break;
        }
        let close = rest.find(']')?;
        host.push_str(first_of_group(&rest[1..close])?);
        rest = &rest[close + 1..];
    }
    // What stops the first host is the comma before the next one or the end; a stray `]` is malformed.
    (!host.is_empty() && !rest.starts_with(']')).then_some(host)
}

/// The first number of a bracket group such as `01-04,07`, as written, when every item of the group is a number or
/// an ascending range of numbers.
fn first_of_group(group: &str) -> Option<&str> {
    let number = |text: &str| -> Option<u64> {
        if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        text.parse().ok()
    };
    let mut firsts = group.split(',').map(|item| {
        let (start, end) = item.split_once('-').unwrap_or((item, item));
        (number(start)? <= number(end)?).then_some(start)
    });
    let first = firsts.next()??;
    firsts.all(|f| f.is_some()).then_some(first)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn detect_in(vars: &[(&str, &str)]) -> Result<Option<Placement>> {
        let vars: HashMap<String, String> = vars.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        detect(|name| vars.get(name).cloned())
    }

    fn usage_error(vars: &[(&str, &str)]) -> String {
        match detect_in(vars) {
            Err(Error::Usage(message)) => message,
            other => panic!("{vars:?}: expected a usage error, got {other:?}"),
        }
    }

    #[test]
    fn nothing_set_is_no_placement() {
        assert_eq!(detect_in(&[("PATH", "/bin"), ("SLURM_NTASKS", "4")]).unwrap(), None);
    }

    #[test]
    fn torchrun() {
        let placement = detect_in(&[
            ("RANK", "5"),
            ("WORLD_SIZE", "8"),
            ("LOCAL_RANK", "1"),
            ("LOCAL_WORLD_SIZE", "4"),
            ("MASTER_ADDR", "node01"),
            ("MASTER_PORT", "29500"),
        ]);
        let expected = Placement {
            rank: 5,
            world: 8,
            local_rank: 1,
            local_world: Some(4),
            source: Source::Torchrun,
            master_addr: Some("node01".into()),
            master_port: Some(29500),
        };
        assert_eq!(placement.unwrap(), Some(expected));
        let bare = detect_in(&[("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0")]).unwrap().unwrap();
        assert_eq!((bare.local_world, bare.master_addr, bare.master_port), (None, None, None));
    }

    #[test]
    fn open_mpi() {
        let placement = detect_in(&[
            ("OMPI_COMM_WORLD_RANK", "3"),
            ("OMPI_COMM_WORLD_SIZE", "4"),
            ("OMPI_COMM_WORLD_LOCAL_RANK", "1"),
            ("OMPI_COMM_WORLD_LOCAL_SIZE", "2"),
            ("MASTER_ADDR", "10.0.0.1"),
            ("MASTER_PORT", "6000"),
        ])
        .unwrap()
        .unwrap();
        assert_eq!((placement.rank, placement.world, placement.local_rank, placement.local_world), (3, 4, 1, Some(2)));
        assert_eq!(placement.source, Source::OpenMpi);
        assert_eq!((placement.master_addr.as_deref(), placement.master_port), (Some("10.0.0.1"), Some(6000)));
    }

    const SLURM_TASK: [(&str, &str); 5] = [
        ("SLURM_PROCID", "6"),
        ("SLURM_NTASKS", "8"),
        ("SLURM_LOCALID", "2"),
        ("SLURM_JOB_NODELIST", "node[01-04,07],gpu5"),
        ("SLURM_JOB_ID", "123456"),
    ];

    #[test]
    fn slurm_takes_the_first_node_and_a_port_from_the_job_id() {
        let placement = detect_in(&SLURM_TASK).unwrap().unwrap();
        assert_eq!((placement.rank, placement.world, placement.local_rank, placement.local_world), (6, 8, 2, None));
        assert_eq!(placement.source, Source::Slurm);
        assert_eq!(placement.master_addr.as_deref(), Some("node01"));
        assert_eq!(placement.master_port, Some(13_456));
    }

    #[test]
    fn slurm_rendezvous_can_be_overridden() {
        let mut vars = SLURM_TASK.to_vec();
        vars.extend([("MASTER_ADDR", "head"), ("MASTER_PORT", "29500"), ("SLURM_NTASKS_PER_NODE", "4")]);
        let placement = detect_in(&vars).unwrap().unwrap();
        assert_eq!((placement.master_addr.as_deref(), placement.master_port), (Some("head"), Some(29500)));
        assert_eq!(placement.local_world, Some(4));
        let bare = detect_in(&SLURM_TASK[..3]).unwrap().unwrap();
        assert_eq!((bare.master_addr, bare.master_port), (None, None));
    }

    #[test]
    fn launchers_started_inside_slurm_win() {
        let mut vars = SLURM_TASK.to_vec();
        vars.extend([("RANK", "1"), ("WORLD_SIZE", "2"), ("LOCAL_RANK", "1")]);
        assert_eq!(detect_in(&vars).unwrap().unwrap().source, Source::Torchrun);
        let mut vars = SLURM_TASK.to_vec();
        vars.extend([
            ("OMPI_COMM_WORLD_RANK", "1"),
            ("OMPI_COMM_WORLD_SIZE", "2"),
            ("OMPI_COMM_WORLD_LOCAL_RANK", "0"),
        ]);
        let placement = detect_in(&vars).unwrap().unwrap();
        assert_eq!((placement.source, placement.rank, placement.world), (Source::OpenMpi, 1, 2));
    }

    #[test]
    fn slurm_port_stays_below_ephemeral_ports() {
        for id in [0, 1, 19_999, 20_000, 987_654_321, u64::MAX] {
            assert!((10_000..30_000).contains(&slurm_default_port(id)), "job {id}");
        }
    }

    #[test]
    fn first_hosts_of_slurm_lists() {
        for (list, first) in [
            ("node[01-04,07],gpu5", "node01"),
            ("gpu5,node[01-04]", "gpu5"),
            ("localhost", "localhost"),
            ("n[007]", "n007"),
            ("n[9-10]", "n9"),
            ("rack[2-3]-gpu[08-15,17]", "rack2-gpu08"),
            ("node[3,1]", "node3"),
            ("a.example.org,b.example.org", "a.example.org"),
        ] {
            assert_eq!(first_host(list).as_deref(), Some(first), "{list}");
        }
        for malformed in
            ["", ",node1", "node[01-04", "node[]", "node[a-b]", "node[04-01]", "node01]", "node[1,]", "n[1-]"]
        {
            assert_eq!(first_host(malformed), None, "{malformed:?}");
        }
    }

    #[test]
    fn malformed_values_name_the_variable_and_value() {
        let full = [("RANK", "1"), ("WORLD_SIZE", "2"), ("LOCAL_RANK", "1")];
        let with = |name: &'static str, value: &'static str| {
            let mut vars: Vec<_> = full.iter().copied().filter(|(k, _)| *k != name).collect();
            vars.push((name, value));
            usage_error(&vars)
        };
        for (name, value, expected) in [
            ("RANK", "one", "RANK=\"one\" is not a non-negative whole number"),
            ("RANK", "-1", "RANK=\"-1\""),
            ("RANK", "2", "RANK=2 is not below WORLD_SIZE=2"),
            ("WORLD_SIZE", "0", "WORLD_SIZE=0"),
            ("LOCAL_RANK", "3", "LOCAL_RANK=3 is not below WORLD_SIZE=2"),
            ("LOCAL_WORLD_SIZE", "1", "LOCAL_RANK=1 is not below LOCAL_WORLD_SIZE=1"),
            ("LOCAL_WORLD_SIZE", "0", "LOCAL_WORLD_SIZE=0"),
            ("LOCAL_WORLD_SIZE", "3", "LOCAL_WORLD_SIZE=3 is more than WORLD_SIZE=2"),
            ("MASTER_PORT", "70000", "MASTER_PORT=\"70000\" is not a port number"),
            ("MASTER_PORT", "0", "MASTER_PORT=\"0\""),
            ("MASTER_ADDR", "", "MASTER_ADDR is set but empty"),
        ] {
            let message = with(name, value);
            assert!(message.contains(expected), "{name}={value}: {message}");
        }
    }

    #[test]
    fn partial_sets_are_refused() {
        let message = usage_error(&[("RANK", "1")]);
        assert!(message.contains("RANK=\"1\" is set but WORLD_SIZE is not"), "{message}");
        let message = usage_error(&[("WORLD_SIZE", "2"), ("LOCAL_RANK", "0")]);
        assert!(message.contains("WORLD_SIZE=\"2\" is set but RANK is not"), "{message}");
        let message = usage_error(&[("SLURM_PROCID", "0"), ("SLURM_NTASKS", "2")]);
        assert!(message.contains("SLURM_PROCID=\"0\" is set but SLURM_LOCALID is not"), "{message}");
        let message = usage_error(&[("OMPI_COMM_WORLD_LOCAL_RANK", "0")]);
        assert!(message.contains("is set but OMPI_COMM_WORLD_RANK is not"), "{message}");
    }

    #[test]
    fn slurm_errors() {
        let mut vars = SLURM_TASK.to_vec();
        vars[3] = ("SLURM_JOB_NODELIST", "node[01-");
        assert!(usage_error(&vars).contains("SLURM_JOB_NODELIST=\"node[01-\" is not a Slurm host list"));
        let mut vars = SLURM_TASK.to_vec();
        vars[4] = ("SLURM_JOB_ID", "x");
        assert!(usage_error(&vars).contains("SLURM_JOB_ID=\"x\""));
        let mut vars = SLURM_TASK.to_vec();
        vars[0] = ("SLURM_PROCID", "8");
        assert!(usage_error(&vars).contains("SLURM_PROCID=8 is not below SLURM_NTASKS=8"));
    }
}
