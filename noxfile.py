"""nox sessions: tests, lint, bench, reliability."""

from __future__ import annotations

import nox

nox.options.sessions = ["lint", "tests"]
nox.options.default_venv_backend = "venv"


@nox.session(python="3.11")
def tests(session: nox.Session) -> None:
    session.install("-e", ".[test]")
    session.run("pytest", *session.posargs)


@nox.session(python="3.11")
def lint(session: nox.Session) -> None:
    session.install("ruff==0.17.6")
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")


@nox.session(python="3.11")
def bench(session: nox.Session) -> None:
    session.install("-e", ".[test]")
    session.run("pytest", "benchmarks/", "--benchmark-enable", "--benchmark-autosave", *session.posargs)


@nox.session(python="3.11")
def reliability(session: nox.Session) -> None:
    """Fault injection on real builds: kill -9, concurrent builds, corruption, disk full, data changes,
    hostile inputs (tests/reliability), plus the parity gate's fault tests (tests/test_verify.py)."""
    session.install("-e", ".[test]")
    session.run("pytest", "tests/reliability", "tests/test_verify.py", "--durations=10", *session.posargs)
