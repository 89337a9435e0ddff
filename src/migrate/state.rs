//! A job's state: one enum whose phases carry their own data, and the one rule that says which
//! step from one state to another is possible ([`State::allows`]).
//!
//! ```text
//! queued -> assessing -> allocating -> copying -> resyncing ------------------> cutover
//!                                                      |                           ^
//!                                                      +---> awaiting-close -------+
//!
//! cutover -> cutover (switching) -> switched        (switching: writes held, no cancel)
//!                  |      ^
//!                  v      |  equal
//!                verifying             (verify=yes; a mismatch: failed)
//!
//! any state before the point of no return  -> stopped | cancelled | gone | failed
//! cutover (switching), verifying           -> failed (rolled back; never cancelled)
//! a final state                            -> nothing
//! ```
//!
//! A refused step is a bug in the job's code, never an input to handle: the caller logs it at
//! error level and fails the job (which rolls it back), so a confused job never switches.

use std::fmt;

/// What the status and the events call a state: its phase, without the data. The names are
/// the status's (`.ferry/status`, `ferryfs status`, the metrics' `phase` label).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    Queued,
    Assessing,
    Allocating,
    Copying,
    Resyncing,
    AwaitingClose,
    Cutover,
    Verifying,
    Switched,
    /// The data set was deleted while the job was queued or ran: nothing to move. The job's
    /// record is rolled back (its target freed); a plan goes on.
    Gone,
    Cancelled,
    Failed,
    Stopped,
}

impl Phase {
    /// Every phase, in the order a job goes through them (the final ones last).
    pub const ALL: [Phase; 13] = [
        Phase::Queued,
        Phase::Assessing,
        Phase::Allocating,
        Phase::Copying,
        Phase::Resyncing,
        Phase::AwaitingClose,
        Phase::Cutover,
        Phase::Verifying,
        Phase::Switched,
        Phase::Gone,
        Phase::Cancelled,
        Phase::Failed,
        Phase::Stopped,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Phase::Queued => "queued",
            Phase::Assessing => "assessing",
            Phase::Allocating => "allocating",
            Phase::Copying => "copying",
            Phase::Resyncing => "resyncing",
            Phase::AwaitingClose => "awaiting-close",
            Phase::Cutover => "cutover",
            Phase::Verifying => "verifying",
            Phase::Switched => "switched",
            Phase::Gone => "gone",
            Phase::Cancelled => "cancelled",
            Phase::Failed => "failed",
            Phase::Stopped => "stopped",
        }
    }

    pub fn is_final(self) -> bool {
        matches!(self, Phase::Switched | Phase::Gone | Phase::Cancelled | Phase::Failed | Phase::Stopped)
    }
}

/// What a verification before the switch found (`verify=yes`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Verified {
    /// Logical tracks whose checksums were compared (up to and including a mismatch).
    pub tracks: u64,
    pub bytes: u64,
    /// How long it took, writes held.
    pub elapsed_us: u64,
    /// The first logical track whose source and target differ, if any.
    pub first_mismatch: Option<u64>,
}

/// A job's state. Progress counters that the copier bumps per chunk (bytes copied, passes)
/// are not here: they outlive the phase that counts them (a switched job still shows them),
/// so they stay atomics on the job (mod.rs).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum State {
    Queued,
    Assessing,
    Allocating,
    Copying,
    Resyncing,
    /// Close mode: the job asked for a close and keeps re-syncing until it comes.
    AwaitingClose,
    /// Writes (close mode: opens too) are held for the final re-sync and the switch.
    /// `switching`: the point of no return is behind (`JobState::begin_switch`): a cancel is
    /// refused from here, and the job either switches or fails and rolls back.
    Cutover {
        switching: bool,
    },
    /// Comparing every copied track of the source with the target, writes held.
    Verifying,
    /// The catalog points at the target, durably, and the source is freed. `held_us`: how
    /// long writes (live) or opens (close) were held.
    Switched {
        held_us: u64,
        verified: Option<Verified>,
    },
    Gone,
    Cancelled,
    /// Rolled back: the target freed, the source untouched. `during`: the phase it failed
    /// in; `verified`: what the verification found, if it ran (a mismatch fails the job).
    Failed {
        reason: String,
        during: Phase,
        verified: Option<Verified>,
    },
    /// The mount is stopping: the record stays; the next mount starts the job again.
    Stopped,
}

/// A step [`State::allows`] refused: a bug in the job's code. (Boxed: it is rare, and a
/// `Result` of it stays small.)
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BadTransition {
    pub from: Box<State>,
    pub to: Box<State>,
}

impl fmt::Display for BadTransition {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "refused state transition {} -> {} ({:?} -> {:?})",
            self.from.name(),
            self.to.name(),
            self.from,
            self.to
        )
    }
}

impl std::error::Error for BadTransition {}

impl State {
    pub fn phase(&self) -> Phase {
        match self {
            State::Queued => Phase::Queued,
            State::Assessing => Phase::Assessing,
            State::Allocating => Phase::Allocating,
            State::Copying => Phase::Copying,
            State::Resyncing => Phase::Resyncing,
            State::AwaitingClose => Phase::AwaitingClose,
            State::Cutover { .. } => Phase::Cutover,
            State::Verifying => Phase::Verifying,
            State::Switched { .. } => Phase::Switched,
            State::Gone => Phase::Gone,
            State::Cancelled => Phase::Cancelled,
            State::Failed { .. } => Phase::Failed,
            State::Stopped => Phase::Stopped,
        }
    }

    pub fn name(&self) -> &'static str {
        self.phase().name()
    }

    pub fn is_final(&self) -> bool {
        self.phase().is_final()
    }

    /// The switch is decided (or being checked): from here only a switch or a failure.
    pub fn past_no_return(&self) -> bool {
        matches!(self, State::Cutover { switching: true } | State::Verifying)
    }

    /// Whether a job may step from `self` to `to`: the table of docs/design.md ("The state
    /// of a job").
    pub fn allows(&self, to: &State) -> bool {
        use State::*;
        if self.is_final() {
            return false;
        }
        match to {
            Failed { .. } => true,
            Stopped | Cancelled | Gone => !self.past_no_return(),
            _ => matches!(
                (self, to),
                (Queued, Assessing)
                    | (Assessing, Allocating)
                    | (Allocating, Copying)
                    | (Copying, Resyncing)
                    | (Resyncing, AwaitingClose)
                    | (Resyncing, Cutover { switching: false })
                    | (AwaitingClose, Cutover { switching: false })
                    | (Cutover { switching: false }, Cutover { switching: true })
                    | (Cutover { switching: true }, Verifying)
                    | (Verifying, Cutover { switching: true })
                    | (Cutover { switching: true }, Switched { .. })
            ),
        }
    }

    /// `to` if [`State::allows`] it, else the refusal.
    pub fn next(&self, to: State) -> Result<State, BadTransition> {
        if self.allows(&to) {
            Ok(to)
        } else {
            Err(BadTransition { from: Box::new(self.clone()), to: Box::new(to) })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use State::*;

    fn failed() -> State {
        Failed { reason: "x".into(), during: Phase::Copying, verified: None }
    }

    fn switched() -> State {
        Switched { held_us: 1, verified: None }
    }

    /// One state of every kind (both cutovers).
    fn every_state() -> Vec<State> {
        vec![
            Queued,
            Assessing,
            Allocating,
            Copying,
            Resyncing,
            AwaitingClose,
            Cutover { switching: false },
            Cutover { switching: true },
            Verifying,
            switched(),
            Gone,
            Cancelled,
            failed(),
            Stopped,
        ]
    }

    /// The whole table: exactly these steps are allowed, every other pair is refused.
    #[test]
    fn the_transition_table() {
        let forward = [
            (Queued, Assessing),
            (Assessing, Allocating),
            (Allocating, Copying),
            (Copying, Resyncing),
            (Resyncing, AwaitingClose),
            (Resyncing, Cutover { switching: false }),
            (AwaitingClose, Cutover { switching: false }),
            (Cutover { switching: false }, Cutover { switching: true }),
            (Cutover { switching: true }, Verifying),
            (Verifying, Cutover { switching: true }),
            (Cutover { switching: true }, switched()),
        ];
        let before_no_return =
            [Queued, Assessing, Allocating, Copying, Resyncing, AwaitingClose, Cutover { switching: false }];
        let mut allowed: Vec<(State, State)> = forward.to_vec();
        for s in &before_no_return {
            for end in [Stopped, Cancelled, Gone, failed()] {
                allowed.push((s.clone(), end));
            }
        }
        for s in [Cutover { switching: true }, Verifying] {
            allowed.push((s, failed()));
        }
        for from in every_state() {
            for to in every_state() {
                let want = allowed.contains(&(from.clone(), to.clone()));
                assert_eq!(from.allows(&to), want, "{} -> {} ({from:?} -> {to:?})", from.name(), to.name());
                assert_eq!(from.next(to.clone()).is_ok(), want);
            }
        }
    }

    #[test]
    fn impossible_steps_are_refused() {
        for (from, to) in [
            (switched(), Copying),
            (Cancelled, Cutover { switching: false }),
            (Cutover { switching: true }, Cancelled),
            (Verifying, Cancelled),
            (Verifying, Stopped),
            (Cutover { switching: true }, Cutover { switching: false }),
            (Cutover { switching: false }, switched()),
            (Cutover { switching: false }, Verifying),
            (Resyncing, switched()),
            (Queued, Copying),
            (Copying, Copying),
            (failed(), failed()),
            (Stopped, Queued),
            (Gone, switched()),
        ] {
            let e = from.next(to.clone()).unwrap_err();
            assert_eq!((*e.from.clone(), *e.to.clone()), (from.clone(), to.clone()));
            assert!(e.to_string().contains("refused state transition"), "{e}");
        }
    }

    #[test]
    fn final_states_are_the_final_phases() {
        for s in every_state() {
            assert_eq!(s.is_final(), Phase::ALL.iter().any(|p| *p == s.phase() && p.is_final()));
            assert!(!s.is_final() || every_state().iter().all(|t| !s.allows(t)), "{s:?} leads nowhere");
        }
        // Every phase has a state and a distinct name.
        let names: std::collections::HashSet<&str> = Phase::ALL.iter().map(|p| p.name()).collect();
        assert_eq!(names.len(), Phase::ALL.len());
        for p in Phase::ALL {
            assert!(every_state().iter().any(|s| s.phase() == p), "{p:?}");
        }
    }
}
