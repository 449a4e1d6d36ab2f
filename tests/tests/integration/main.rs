//! The privileged integration tests: the real `holdfast` binary, real sockets and real
//! services, each test in a fresh network namespace (see the `holdfast_testkit` crate).
//! One test binary with a module per area, so the suite links once:
//! `cargo test -p holdfast-testkit --test integration AREA::` runs one area.

/// `tests_of!(case: NAME => (ARGS…), …)`: one `#[test]` NAME per line, each returning
/// `case(ARGS…)`, for tests that differ only in data; each keeps its own name, so a
/// failure says which case failed.
macro_rules! tests_of {
    ($case:ident: $($name:ident => ($($arg:expr),*)),+ $(,)?) => {
        $(
            #[test]
            fn $name() -> anyhow::Result<()> {
                $case($($arg),*)
            }
        )+
    };
}

mod cgroups;
mod cli;
mod control;
mod deploy;
mod dispatch;
mod examples;
mod exec;
mod failed;
mod fdstore;
mod gunicorn;
mod handoff;
mod harness;
mod import;
mod impostors;
mod inetd;
mod manager;
mod nspawn;
mod observability;
mod overlap;
mod readiness;
mod reload;
mod restart_load;
mod restarts;
mod services;
mod survive;
mod units;
mod upgrade;
mod watchdog;
