//! Process and kernel limits that cap how many connections a run can hold: open files and
//! ephemeral ports.

/// The open-files limit before and after [`raise_nofile_limit`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NofileLimit {
    pub before: u64,
    pub after: u64,
}

/// Raises the open-files limit as far as allowed: to `fs.nr_open` when the process may raise
/// its hard limit (root), else the soft limit to the hard one. Returns the soft
/// limit before and after. Tens of thousands of streams need as many descriptors (twice, with an in-process
/// mock).
pub fn raise_nofile_limit() -> NofileLimit {
    let nr_open = std::fs::read_to_string("/proc/sys/fs/nr_open")
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok())
        .unwrap_or(0)
        .min(1 << 20);
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit read and write a struct we own.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return NofileLimit {
                before: 0,
                after: 0,
            };
        }
        for target in [nr_open.max(lim.rlim_max), lim.rlim_max] {
            if target <= lim.rlim_cur {
                continue;
            }
            let want = libc::rlimit {
                rlim_cur: target,
                rlim_max: target.max(lim.rlim_max),
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &want) == 0 {
                return NofileLimit {
                    before: lim.rlim_cur,
                    after: want.rlim_cur,
                };
            }
        }
    }
    NofileLimit {
        before: lim.rlim_cur,
        after: lim.rlim_cur,
    }
}

/// The kernel's ephemeral port range (`net.ipv4.ip_local_port_range`), inclusive: how many
/// connections one local address can open to one server address and port.
pub fn ephemeral_port_range() -> Option<(u16, u16)> {
    parse_port_range(&std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").ok()?)
}

fn parse_port_range(text: &str) -> Option<(u16, u16)> {
    let mut it = text.split_whitespace().map(|v| v.parse::<u16>().ok());
    match (it.next()??, it.next()??) {
        (lo, hi) if lo <= hi => Some((lo, hi)),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn port_range_parses_the_proc_format_and_rejects_garbage() {
        assert_eq!(parse_port_range("32768\t60999\n"), Some((32768, 60999)));
        assert_eq!(parse_port_range("1024 65535"), Some((1024, 65535)));
        assert_eq!(parse_port_range("60999 32768"), None);
        assert_eq!(parse_port_range("x y"), None);
        assert_eq!(parse_port_range(""), None);
    }

    #[test]
    fn raising_never_lowers_the_limit() {
        let first = raise_nofile_limit();
        assert!(first.after >= first.before);
        let again = raise_nofile_limit();
        assert_eq!(again.before, first.after);
        assert_eq!(again.after, first.after);
    }
}
