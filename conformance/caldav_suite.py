"""External conformance: python-caldav's functional suite against bookdav and stock Radicale 3.9.

Downloads the caldav 3.6.x sdist, starts stock Radicale (file storage, htpasswd) and `bookdav
serve` (SQLite, a provider account) on loopback, runs the suite's external-server test class
(`TestForServer<name>`, generated from `tests/caldav_test_servers.yaml`) against each, and compares
them test by test. Exits non-zero if bookdav fails a test that stock Radicale passes, or if either
run collected nothing. Both servers get caldav's own "radicale" feature profile, so a test skipped
as unsupported is skipped on both.

Run from anywhere: `python conformance/caldav_suite.py` (needs network access to PyPI).
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import tarfile
import tempfile
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.conftest import RunningServer, start_server  # noqa: E402 (needs the repo on the path)

CALDAV_REQUIREMENT = "caldav==3.6.*"
# What caldav's test modules import at collection time beyond caldav's own dependencies.
SUITE_EXTRAS = ("proxy.py", "tzlocal")
STOCK_USER, STOCK_PASSWORD = "user1", "stock-radicale-pw"
SUITE_TIMEOUT_SECONDS = 900
PASSING = "passed"


@dataclass(frozen=True)
class Target:
    """One server the suite runs against, as named in caldav_test_servers.yaml."""

    name: str
    url: str
    username: str
    password: str

    @property
    def test_class(self) -> str:
        return f"TestForServer{self.name}"


def run(command: list[str], **kwargs: object) -> None:
    subprocess.run(command, check=True, **kwargs)  # type: ignore[call-overload]


def fetch_suite(work: Path) -> Path:
    """Download and unpack the caldav sdist; return its folder (the suite is its tests/)."""
    downloads = work / "downloads"
    run(
        [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--quiet",
            "--no-deps",
            "--no-binary",
            ":all:",
            CALDAV_REQUIREMENT,
            "-d",
            str(downloads),
        ]
    )
    (sdist,) = downloads.glob("caldav-*.tar.gz")
    with tarfile.open(sdist) as archive:
        archive.extractall(work, filter="data")
    return work / sdist.name.removesuffix(".tar.gz")


def make_virtualenv(work: Path, suite: Path) -> Path:
    """A throw-away venv on top of the system packages with the suite's own caldav and test
    imports, so bookdav's environment gains nothing that only this foreign suite needs."""
    venv = work / "venv"
    run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)])
    python = venv / "bin" / "python"
    run([str(python), "-m", "pip", "install", "--quiet", str(suite), *SUITE_EXTRAS])
    return python


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def wait_for_port(port: int, process: subprocess.Popen[bytes], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode} before listening")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"nothing listens on port {port} after {timeout} s")


def start_stock_radicale(folder: Path) -> tuple[subprocess.Popen[bytes], Target]:
    """Radicale as shipped: file storage, htpasswd auth (so wrong passwords are refused, as in
    bookdav), owner_only rights, no config file read."""
    folder.mkdir(parents=True)
    htpasswd = folder / "users"
    htpasswd.write_text(f"{STOCK_USER}:{STOCK_PASSWORD}\n", encoding="utf-8")
    port = free_port()
    log = (folder / "radicale.log").open("wb")
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "radicale",
            "--config",
            "",
            "--server-hosts",
            f"127.0.0.1:{port}",
            "--storage-filesystem-folder",
            str(folder / "collections"),
            "--auth-type",
            "htpasswd",
            "--auth-htpasswd-filename",
            str(htpasswd),
            "--auth-htpasswd-encryption",
            "plain",
            "--rights-type",
            "owner_only",
            "--logging-level",
            "warning",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    wait_for_port(port, process)
    return process, Target("stockradicale", f"http://127.0.0.1:{port}/", STOCK_USER, STOCK_PASSWORD)


def start_bookdav(folder: Path) -> tuple[RunningServer, Target]:
    server = start_server(folder)
    username = server.add_user("provider")
    target = Target("bookdav", server.dav_url, username, server.passwords[username])
    return server, target


def write_servers_config(suite: Path, targets: list[Target], features: str) -> None:
    """The suite's server list: only our two external servers (no embedded or docker ones).
    `features` names one of caldav's compatibility profiles, or "" for none (assume everything)."""
    lines = [
        "test-servers:",
        "  radicale:",
        "    enabled: false",
        "  xandikos:",
        "    enabled: false",
    ]
    for target in targets:
        lines += [
            f"  {target.name}:",
            "    type: external",
            "    enabled: true",
            f"    url: {target.url}",
            f"    username: {target.username}",
            f'    password: "{target.password}"',
        ]
        if features:
            lines.append(f"    features: {features}")
    (suite / "tests" / "caldav_test_servers.yaml").write_text("\n".join(lines) + "\n")


def start_suite(
    python: Path, suite: Path, target: Target, work: Path
) -> tuple[subprocess.Popen[bytes], Path, Path]:
    junit = work / f"{target.name}.junit.xml"
    output = work / f"{target.name}.pytest.txt"
    env = {
        **os.environ,
        "PYTHON_CALDAV_TEST_DOCKER": "0",
        "PYTHON_CALDAV_TEST_EMBEDDED": "0",
        # The suite's per-server lock files live in TMPDIR: keep them in our temp folder.
        "TMPDIR": str(work),
    }
    env.pop("PYTEST_ADDOPTS", None)
    process = subprocess.Popen(
        [
            str(python),
            "-m",
            "pytest",
            "tests/test_caldav.py",
            "-k",
            target.test_class,
            "-q",
            "-p",
            "no:cacheprovider",
            "-rfE",
            f"--junitxml={junit}",
        ],
        cwd=suite,
        env=env,
        stdout=output.open("wb"),
        stderr=subprocess.STDOUT,
    )
    return process, junit, output


def outcomes(junit: Path) -> dict[str, str]:
    """Test method name -> passed / failed / error / skipped."""
    results: dict[str, str] = {}
    for case in ET.parse(junit).iter("testcase"):
        outcome = PASSING
        for kind in ("failure", "error", "skipped"):
            if case.find(kind) is not None:
                outcome = "failed" if kind == "failure" else kind
                break
        # A teardown error is reported as a second <testcase> of the same name: keep the worse.
        name = case.get("name", "")
        if results.get(name, PASSING) == PASSING:
            results[name] = outcome
    return results


def print_failures(output: Path) -> None:
    """pytest's one-line reason for each failure (-rfE), kept before the temp folder goes."""
    for line in output.read_text(errors="replace").splitlines():
        if line.startswith(("FAILED tests/", "ERROR tests/")):
            print(f"    {line}")


def summary_line(output: Path) -> str:
    lines = [line for line in output.read_text(errors="replace").splitlines() if line.strip()]
    return lines[-1] if lines else "(no output)"


def compare(stock: dict[str, str], bookdav: dict[str, str]) -> list[str]:
    """Print the tests whose outcome differs; return the ones bookdav fails and stock passes."""
    regressions = []
    for name in sorted(stock.keys() | bookdav.keys()):
        ours, theirs = bookdav.get(name, "missing"), stock.get(name, "missing")
        if ours == theirs:
            continue
        print(f"  {name}: bookdav {ours}, stock Radicale {theirs}")
        if theirs == PASSING and ours in {"failed", "error", "missing"}:
            regressions.append(name)
    return regressions


def counts(results: dict[str, str]) -> str:
    tally: dict[str, int] = {}
    for outcome in results.values():
        tally[outcome] = tally.get(outcome, 0) + 1
    return ", ".join(f"{n} {outcome}" for outcome, n in sorted(tally.items()))


def run_suites(work: Path, features: str) -> tuple[dict[str, str], dict[str, str]]:
    suite = fetch_suite(work)
    python = make_virtualenv(work, suite)
    import radicale

    print(f"caldav suite: {suite.name}; stock Radicale {radicale.VERSION}; features {features!r}")
    radicale_process, stock_target = start_stock_radicale(work / "stock-radicale")
    bookdav_server: RunningServer | None = None
    try:
        bookdav_server, bookdav_target = start_bookdav(work / "bookdav")
        targets = [stock_target, bookdav_target]
        write_servers_config(suite, targets, features)
        # The two runs share nothing but the suite's files: run them side by side.
        runs = {t.name: start_suite(python, suite, t, work) for t in targets}
        results = {}
        for name, (process, junit, output) in runs.items():
            try:
                process.wait(timeout=SUITE_TIMEOUT_SECONDS)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
            print(f"{name}: pytest says: {summary_line(output)}")
            print_failures(output)
            if process.returncode not in (0, 1) or not junit.exists():
                print(output.read_text(errors="replace")[-5000:])
                raise RuntimeError(
                    f"the suite against {name} did not run (exit {process.returncode})"
                )
            results[name] = outcomes(junit)
        return results[stock_target.name], results[bookdav_target.name]
    finally:
        radicale_process.terminate()
        radicale_process.wait(timeout=10)
        if bookdav_server is not None:
            bookdav_server.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--features",
        default="radicale",
        help='caldav compatibility profile for both servers ("" for none; default: radicale)',
    )
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="bookdav-caldav-suite-"))
    try:
        stock, bookdav = run_suites(work, args.features)
    except (RuntimeError, subprocess.CalledProcessError) as exc:
        print(f"caldav suite: could not run: {exc}", file=sys.stderr)
        return 2
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"stock Radicale: {counts(stock)}")
    print(f"bookdav:        {counts(bookdav)}")
    if not stock or not bookdav:
        print("caldav suite: a run collected no test", file=sys.stderr)
        return 2
    print("differences:" if stock != bookdav else "differences: none")
    regressions = compare(stock, bookdav)
    if regressions:
        print(f"FAIL: bookdav fails {len(regressions)} test(s) stock Radicale passes:")
        for name in regressions:
            print(f"  tests/test_caldav.py::TestForServerbookdav::{name}")
        return 1
    print("OK: bookdav fails no test that stock Radicale passes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
