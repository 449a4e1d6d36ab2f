//! Instants that survive an exec: serialized as CLOCK_MONOTONIC nanoseconds,
//! the clock `Instant` reads on Linux, which a re-executed holdfast (same
//! boot) reads too. For `#[serde(with = "…")]` on `Instant` fields (and the
//! `option` and `deque` submodules).

use std::time::{Duration, Instant};

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Now, as an `Instant` and as CLOCK_MONOTONIC nanoseconds.
fn now() -> (Instant, i128) {
    let instant = Instant::now();
    let mono = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .map(|t| i128::from(t.tv_sec()) * 1_000_000_000 + i128::from(t.tv_nsec()))
        .unwrap_or(0);
    (instant, mono)
}

pub fn to_nanos(t: Instant) -> i128 {
    let (now, mono) = now();
    if t >= now {
        mono + (t - now).as_nanos() as i128
    } else {
        mono - (now - t).as_nanos() as i128
    }
}

pub fn from_nanos(ns: i128) -> Instant {
    let (now, mono) = now();
    let d = |n: i128| Duration::from_nanos(n.clamp(0, u64::MAX as i128) as u64);
    if ns >= mono {
        super::deadline(now, d(ns - mono))
    } else {
        now.checked_sub(d(mono - ns)).unwrap_or(now)
    }
}

pub fn serialize<S: Serializer>(t: &Instant, s: S) -> Result<S::Ok, S::Error> {
    to_nanos(*t).serialize(s)
}

pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Instant, D::Error> {
    i128::deserialize(d).map(from_nanos)
}

pub mod option {
    use super::*;

    pub fn serialize<S: Serializer>(t: &Option<Instant>, s: S) -> Result<S::Ok, S::Error> {
        t.map(to_nanos).serialize(s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Instant>, D::Error> {
        Option::<i128>::deserialize(d).map(|o| o.map(from_nanos))
    }
}

pub mod deque {
    use super::*;
    use std::collections::VecDeque;

    pub fn serialize<S: Serializer>(t: &VecDeque<Instant>, s: S) -> Result<S::Ok, S::Error> {
        t.iter()
            .map(|i| to_nanos(*i))
            .collect::<Vec<_>>()
            .serialize(s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<VecDeque<Instant>, D::Error> {
        Vec::<i128>::deserialize(d).map(|v| v.into_iter().map(from_nanos).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn instants_round_trip_within_a_millisecond() {
        let now = Instant::now();
        for t in [
            now,
            now + Duration::from_secs(5),
            now - Duration::from_millis(1),
        ] {
            let back = from_nanos(to_nanos(t));
            let diff = if back > t { back - t } else { t - back };
            assert!(diff < Duration::from_millis(1), "{diff:?}");
        }
    }
}
