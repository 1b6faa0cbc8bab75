"""The one retry policy: every failed attempt (an error, a timeout, a worker crash, a job found
interrupted at start-up) goes through `RetryPolicy.decide`; the job store only records the result."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Decision:
    retry: bool
    delay_seconds: float  # before the job may be claimed again (retry only)
    error: str  # what to record


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """Retry transient failures with exponential backoff; give up after `max_attempts` failed attempts.

    A permanent error (not audio, a broken rule, a name too long) fails at once: trying again
    meets the same file. A crash or timeout counts like an error, because the file may be the
    cause (a poison file must not crash-loop the worker for ever).
    """

    max_attempts: int = 3
    backoff_seconds: float = 10.0

    def backoff(self, failed_attempts: int) -> float:
        """Delay after the n-th failed attempt (1-based): base, 2 x base, 4 x base, ..."""
        return self.backoff_seconds * float(2 ** max(0, failed_attempts - 1))

    def decide(self, error: str, *, permanent: bool, failed_attempts: int) -> Decision:
        """`failed_attempts` counts the attempt that just failed."""
        if permanent:
            return Decision(False, 0.0, error)
        if failed_attempts >= self.max_attempts:
            return Decision(False, 0.0, f"{error} (gave up after {failed_attempts} attempts)")
        return Decision(True, self.backoff(failed_attempts), error)
