//! CPU time from `/proc/*/task/*/schedstat`, for the benches' CPU-per-operation columns
//! (0 where /proc is not available).

use std::path::Path;

/// The CPU time (ns) a `schedstat` file reports.
fn schedstat_ns(path: &Path) -> Option<u64> {
    std::fs::read_to_string(path)
        .ok()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// CPU time (ns) of process `pid`'s threads (`"self"`: this process) named `name`, or of all
/// of them with `None`.
pub(crate) fn threads_cpu_ns(pid: &str, name: Option<&str>) -> u64 {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return 0;
    };
    tasks
        .flatten()
        .filter(|t| {
            name.is_none_or(|name| {
                std::fs::read_to_string(t.path().join("comm")).is_ok_and(|c| c.trim() == name)
            })
        })
        .filter_map(|t| schedstat_ns(&t.path().join("schedstat")))
        .sum()
}

/// CPU time (ns) of the calling thread.
pub(crate) fn this_thread_cpu_ns() -> u64 {
    schedstat_ns(Path::new("/proc/thread-self/schedstat")).unwrap_or(0)
}
